"""Decode a file list once; later runs and every trial of a study reuse the array.

The cache key covers each file's path, size and modification time, the preprocessing
settings, the cache's format and the preprocessing code's version (:func:`code_version`), so
an edited or replaced image, another image size or a changed preprocessing is decoded afresh.
Entries are plain ``.npy`` files in ``<cache_dir>/images`` written atomically (safe for
parallel workers).
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import cv2
import numpy as np
from tqdm.auto import tqdm

from qi.config import BadImagePolicy, cache_dir
from qi.data import preprocessing
from qi.data.preprocessing import ImageDecodeError, PreprocessConfig, load_and_preprocess

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DecodedImages:
    images: np.ndarray  # (N, size, size, channels) uint8, one per usable path
    paths: list[str]  # the usable paths, in input order
    skipped: dict[str, str]  # path -> reason, for files that could not be used


# bump when the entries' layout changes (what the .npy and .json hold)
CACHE_FORMAT = 2


def code_version() -> str:
    """What decoding depends on besides the settings: the preprocessing code itself (a
    digest of its source, so a change there never reads arrays the old code made, with no
    version number to forget) and OpenCV's and NumPy's versions."""
    source = _source_digest(preprocessing.__file__)
    return f"{source}/cv2 {cv2.__version__}/np {np.__version__}"


@functools.cache
def _source_digest(path: str) -> str:
    """Read once per process (every prepare_data asks)."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]


def cache_key(paths: list[str], config: PreprocessConfig) -> str:
    settings = {"format": CACHE_FORMAT, "code": code_version(), **asdict(config)}
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode())
    for path in paths:
        stat = os.stat(path)
        digest.update(f"{path}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:24]


def _decode_all(paths: list[str], config: PreprocessConfig, progress: bool) -> list:
    def work(path: str) -> np.ndarray | str:
        try:
            return load_and_preprocess(path, config)
        except ImageDecodeError as exc:
            return str(exc)

    # OpenCV releases the GIL while decoding and resizing, so threads use every core
    workers = min(8, os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(
            tqdm(
                pool.map(work, paths),
                total=len(paths),
                desc="decoding images",
                unit="img",
                disable=not progress,
            )
        )


def decode_images(
    paths: list[str],
    config: PreprocessConfig,
    policy: BadImagePolicy = "skip",
    use_cache: bool = True,
    progress: bool = True,
) -> DecodedImages:
    """Decoded, preprocessed images for ``paths``, from the cache when it has them."""
    folder = cache_dir() / "images"
    key = cache_key(paths, config) if use_cache else ""
    array_file = folder / f"{key}.npy"
    meta_file = folder / f"{key}.json"
    if use_cache and array_file.exists() and meta_file.exists():
        meta = json.loads(meta_file.read_text())
        if policy == "strict" and meta["skipped"]:
            reason = next(iter(meta["skipped"].values()))
            raise ImageDecodeError(f"{reason} (use bad_images=skip to leave such files out)")
        log.debug("decoded images from cache %s", array_file)
        return DecodedImages(np.load(array_file), meta["paths"], meta["skipped"])

    results = _decode_all(paths, config, progress)
    kept_paths, arrays, skipped = [], [], {}
    for path, result in zip(paths, results, strict=True):
        if isinstance(result, str):
            if policy == "strict":
                raise ImageDecodeError(f"{result} (use bad_images=skip to leave such files out)")
            skipped[path] = result
        else:
            kept_paths.append(path)
            arrays.append(result)
    shape = (0, config.image_size, config.image_size, config.channels)
    images = np.stack(arrays) if arrays else np.zeros(shape, np.uint8)
    if use_cache:
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / f"{key}.{os.getpid()}.tmp.npy"
        np.save(tmp, images)
        os.replace(tmp, array_file)
        tmp_meta = folder / f"{key}.{os.getpid()}.tmp.json"
        tmp_meta.write_text(json.dumps({"paths": kept_paths, "skipped": skipped}))
        os.replace(tmp_meta, meta_file)
    return DecodedImages(images, kept_paths, skipped)


def cached_entries() -> list[Path]:
    """The cache files, for ``qi cache`` style housekeeping and tests."""
    folder = cache_dir() / "images"
    return sorted(folder.glob("*.npy")) if folder.exists() else []
