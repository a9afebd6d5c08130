"""Features of a frozen encoder, computed once and cached on disk.

A study that trains classifier heads on a frozen pretrained encoder would otherwise run the
encoder over every image in every trial; with the features cached, a head trains in seconds.
Augmentation stays honest: the training images' features are taken of their flipped and
rotated views (:func:`qi.views.dihedral_view`), the same copies a training loop
would show the network.

The cache key is a digest of the pixels themselves (so of the files and the preprocessing),
of the encoder's weights and buffers, of its class and of the view: features of other weights
or other preprocessing are never reused. Average and max pooled features are stored side by
side, for the last map and for every intermediate stage
(:meth:`~qi.models.encoders.TimmEncoder.pooled_maps`), so trials that differ in pooling or in
the stages they read
(``--feature-stages``) share one pass of the encoder. Entries are ``.npy``
files of float16 ``(N, D)`` arrays in ``<cache_dir>/embeddings``, written atomically (parallel
workers).
"""

from __future__ import annotations

import hashlib
import logging
import os

import numpy as np
import torch
from tqdm.auto import tqdm

from qi.config import cache_dir
from qi.views import dihedral_view

log = logging.getLogger(__name__)

FORMAT = "qi-embeddings-2"  # bump when the way features are computed changes
BATCH = 64


def array_digest(images: np.ndarray) -> str:
    digest = hashlib.sha256(f"{images.shape}{images.dtype}".encode())
    digest.update(np.ascontiguousarray(images).data)
    return digest.hexdigest()[:24]


def module_digest(module: torch.nn.Module) -> str:
    """Digest of a module's class, weights and buffers."""
    digest = hashlib.sha256(f"{FORMAT}{type(module).__name__}".encode())
    for name, tensor in module.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:24]


def _device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@torch.inference_mode()
def _compute(net, images: np.ndarray, view: int, progress: bool, device) -> np.ndarray:
    """Average and max pooled features of every map (any pooling and stages slice them)."""
    out = []
    batches = range(0, len(images), BATCH)
    for start in tqdm(batches, desc=f"features, view {view}", unit="batch", disable=not progress):
        chunk = torch.from_numpy(images[start : start + BATCH]).permute(0, 3, 1, 2)
        chunk = dihedral_view(chunk.to(device), view).contiguous(memory_format=torch.channels_last)
        normalised = (chunk.float() - net.mean) / net.std
        out.append(net.encoder.pooled_maps(normalised).float().cpu().numpy().astype(np.float16))
    if out:
        return np.concatenate(out)
    return np.zeros((0, 2 * sum(net.encoder.map_widths)), np.float16)


def embeddings(net, images: np.ndarray, views: int, progress: bool = True) -> np.ndarray:
    """``(views, N, D)`` float32 features of the first ``views`` views of ``images`` (uint8,
    ``(N, H, W, C)``), from the cache where it has them. ``net`` is an
    :class:`~qi.models.InspectionNet`; only its (frozen) encoder and normalisation are used."""
    folder = cache_dir() / "embeddings"
    key = f"{array_digest(images)}-{module_digest(net.encoder)}-{module_digest_norm(net)}"
    device = _device()
    was_training = net.training
    net.eval().to(device)
    result = []
    try:
        for view in range(views):
            path = folder / f"{key}-v{view}.npy"
            if path.exists():
                result.append(np.load(path))
                continue
            features = _compute(net, images, view, progress, device)
            folder.mkdir(parents=True, exist_ok=True)
            tmp = folder / f"{key}-v{view}.{os.getpid()}.tmp.npy"
            np.save(tmp, features)
            os.replace(tmp, path)
            result.append(features)
    finally:
        net.to("cpu").train(was_training)
    return np.stack(result)[..., net.encoder.pooled_columns()].astype(np.float32)


def module_digest_norm(net) -> str:
    """The input normalisation is part of what the encoder sees."""
    digest = hashlib.sha256()
    for tensor in (net.mean, net.std):
        digest.update(tensor.detach().cpu().numpy().tobytes())
    return digest.hexdigest()[:8]
