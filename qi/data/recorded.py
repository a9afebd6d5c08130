"""The data a run recorded, read back: the same files in the same splits, checked against the
folder as it is now.

``qi evaluate``, ``qi promote`` and ``qi export`` score a model on *its* test images, the ones
its run recorded (:data:`qi.tags.Artifact.SPLIT`), not on a split re-derived from the folder
with whatever settings the command has. A file that changed since (another content digest) or
went missing is left out, with one line saying how many; ``--strict-data`` stops instead. Files
added since are not the run's and are not scored. Runs logged before qi recorded splits have
no table: the caller re-derives the split from the run's own data settings (files keep their
split for life, :mod:`qi.data.splits`) and says so.
"""

from __future__ import annotations

import logging
import tempfile
from dataclasses import replace
from pathlib import Path

import mlflow
import pandas as pd
from mlflow.exceptions import MlflowException

from qi.config import DataConfig, from_dict
from qi.data.cache import decode_images
from qi.data.datamodule import PreparedData, file_digest, prepare_data
from qi.data.discovery import DataLayoutError
from qi.data.preprocessing import PreprocessConfig, typical_size
from qi.tags import Artifact, Tag
from qi.tracking import read_run_config

log = logging.getLogger(__name__)


class DataChangedError(DataLayoutError):
    """Files a run recorded changed or went missing, and ``--strict-data`` was asked for."""


def recorded_split(run_id: str) -> pd.DataFrame | None:
    """The split table the run logged; None for a run logged before qi recorded splits."""
    with tempfile.TemporaryDirectory(prefix="qi-split-") as tmp:
        try:
            path = mlflow.artifacts.download_artifacts(
                run_id=run_id, artifact_path=Artifact.SPLIT, dst_path=tmp
            )
        except (MlflowException, OSError):
            artifacts = {a.path for a in mlflow.MlflowClient().list_artifacts(run_id, "data")}
            if Artifact.SPLIT in artifacts:
                raise  # it is there and could not be read: not an old run
            return None
        return pd.read_csv(path, keep_default_na=False, dtype={"defect_type": str})


def recorded_root(run_id: str, data_dir: Path | None = None) -> Path:
    """The folder a run's recorded paths are relative to: ``data_dir``, else its tag."""
    if data_dir is not None:
        return Path(data_dir)
    return Path(mlflow.MlflowClient().get_run(run_id).data.tags.get(Tag.DATA_ROOT, ""))


def recorded_files(
    run_id: str, data_dir: Path | None = None, strict: bool = False
) -> tuple[pd.DataFrame, Path] | None:
    """(the run's recorded files that still match, with absolute paths; their folder), or
    None when the run recorded no split. ``data_dir`` replaces the folder the run recorded
    (the same files elsewhere)."""
    table = recorded_split(run_id)
    if table is None:
        return None
    root = recorded_root(run_id, data_dir)
    if not str(root) or not root.is_dir():
        raise DataLayoutError(
            f"run {run_id} recorded its images under '{root}', which is not a folder here: "
            "pass --data-dir"
        )
    table["image_path"] = [str(root / p) for p in table["image_path"]]
    now = [file_digest(p) for p in table["image_path"]]
    missing = sum(d == "" for d in now)
    changed = sum(d not in ("", old) for d, old in zip(now, table["sha256"], strict=True))
    if missing or changed:
        message = (
            f"{root}: {changed} of the {len(table)} files run {run_id} recorded changed and "
            f"{missing} are missing"
        )
        if strict:
            raise DataChangedError(f"{message}: restore them, or leave out --strict-data")
        log.warning("%s; using the %d that still match", message, len(table) - changed - missing)
        table = table[[d == old for d, old in zip(now, table["sha256"], strict=True)]]
    return table.drop(columns="sha256").reset_index(drop=True), root


def recorded_data(
    run_id: str,
    preprocess: PreprocessConfig,
    data_dir: Path | None = None,
    strict: bool = False,
    progress: bool = False,
) -> PreparedData | None:
    """The run's recorded files (:func:`recorded_files`) decoded with ``preprocess``."""
    found = recorded_files(run_id, data_dir, strict)
    if found is None:
        return None
    frame, root = found
    tags = mlflow.MlflowClient().get_run(run_id).data.tags
    decoded = decode_images(frame["image_path"].tolist(), preprocess, progress=progress)
    frame = frame[frame["image_path"].isin(decoded.paths)].reset_index(drop=True)
    position = {p: i for i, p in enumerate(decoded.paths)}
    return PreparedData(
        frame=frame,
        images=decoded.images[[position[p] for p in frame["image_path"]]],
        root=root,
        layout=tags.get(Tag.DATA_LAYOUT, ""),
        ok_class=tags.get(Tag.OK_CLASS, ""),
        preprocess=preprocess,
        skipped=decoded.skipped,
        source_size=typical_size(frame["image_path"].tolist()),
    )


def data_config_of_run(run_id: str, data_dir: Path | None = None) -> DataConfig:
    """The data settings a run was evaluated with (its logged ``config.json``): what
    re-derives its split where it recorded none; ``data_dir`` replaces the folder."""
    raw = read_run_config(run_id)
    raw = raw.get("base", raw)  # a study's parent run logs {"base": ..., "tune": ...}
    data = from_dict(DataConfig, raw.get("data", {}))
    root = data_dir or data.data_dir
    if root is None:
        tags = mlflow.MlflowClient().get_run(run_id).data.tags
        root = Path(tags[Tag.DATA_ROOT]) if tags.get(Tag.DATA_ROOT) else None
    if root is None:
        raise ValueError(f"run {run_id} records no data folder: pass --data-dir")
    return replace(data, data_dir=Path(root))


def run_test_files(
    run_id: str, data_dir: Path | None = None, strict: bool = False, good_only: bool = False
) -> pd.DataFrame:
    """The test split of a run: as recorded, or (a run from before) re-derived from its own
    data settings, with a one-line note."""
    found = recorded_files(run_id, data_dir, strict)
    if found is not None:
        frame, _ = found
        return frame[frame["split"] == "test"].reset_index(drop=True)
    log.warning(
        "run %s recorded no split (logged by an earlier qi): its test split is re-derived from "
        "its data settings",
        run_id,
    )
    data = prepare_data(data_config_of_run(run_id, data_dir), progress=False, good_only=good_only)
    return data.split_frame("test")


def files_seen_by(run_id: str, data_dir: Path | None = None) -> tuple[set[str], set[str]] | None:
    """(absolute paths, content digests) of the files a run trained or validated on, as it
    recorded them; None for a run that recorded no split."""
    table = recorded_split(run_id)
    if table is None:
        return None
    root = recorded_root(run_id, data_dir)
    seen = table[table["split"] != "test"]
    return {str(root / p) for p in seen["image_path"]}, set(seen["sha256"])


def unseen_by(frame: pd.DataFrame, run_id: str) -> tuple[pd.DataFrame, bool]:
    """The rows of ``frame`` (image_path, label) that the run neither trained nor validated
    on - by path, and by content (a copy under another name counts as seen) - and whether
    the run recorded what it saw at all (if not, every row is returned)."""
    seen = files_seen_by(run_id)
    if seen is None:
        return frame.reset_index(drop=True), False
    paths, digests = seen
    keep = [p not in paths and file_digest(p) not in digests for p in frame["image_path"]]
    return frame[keep].reset_index(drop=True), True
