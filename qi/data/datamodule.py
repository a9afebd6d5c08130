"""From a data folder to train/val/test loaders: discovery, split, decode (cached), augment.

:func:`prepare_data` does the expensive part once and returns a :class:`PreparedData` that a
study shares across trials; :class:`InspectionDataModule` only wraps it in loaders with the
batch size and augmentation of one configuration.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader, Dataset

from qi.config import DataConfig, SynthConfig
from qi.data import synth
from qi.data.augmentation import build_augmentation
from qi.data.cache import decode_images
from qi.data.discovery import DataLayoutError, discover
from qi.data.preprocessing import PreprocessConfig, typical_size
from qi.data.splits import assign_splits, check_classes, subsample
from qi.data.types import type_targets
from qi.interrupts import checkpoint

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")


def file_digest(path: str | Path) -> str:
    """sha256 of a file's bytes (a missing file: empty string)."""
    try:
        return hashlib.sha256(Path(path).read_bytes()).hexdigest()
    except OSError:
        return ""


@dataclass
class PreparedData:
    """Split table plus decoded images, aligned row by row."""

    frame: pd.DataFrame  # image_path, label, defect_type, split
    images: np.ndarray  # (N, H, W, C) uint8
    root: Path
    layout: str
    ok_class: str
    preprocess: PreprocessConfig
    skipped: dict[str, str] = field(default_factory=dict)
    source_size: int | None = None  # median shorter side of the files, in pixels

    @property
    def digest(self) -> str:
        """Identifies the data and its split: same files, labels and split -> same digest."""
        table = self.frame[["image_path", "label", "defect_type", "split"]].copy()
        table["image_path"] = [str(Path(p).relative_to(self.root)) for p in table["image_path"]]
        content = table.to_csv(index=False).encode()
        return hashlib.sha256(content).hexdigest()[:16]

    def split_table(self) -> pd.DataFrame:
        """What a run records of its data (:data:`qi.tags.Artifact.SPLIT`): each file's path
        relative to the folder, label, defect type, split and content digest, so a later
        command scores exactly these files, and knows when one changed."""
        table = self.frame[["image_path", "label", "defect_type", "split"]].copy()
        table["sha256"] = [file_digest(p) for p in table["image_path"]]
        table["image_path"] = [
            Path(p).relative_to(self.root).as_posix() for p in table["image_path"]
        ]
        return table

    def split(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        mask = (self.frame["split"] == name).to_numpy()
        return self.images[mask], self.frame["label"].to_numpy()[mask]

    def targets(self, name: str, types: tuple[str, ...] = ()) -> tuple[np.ndarray, np.ndarray]:
        """(images, targets) of a split: the 0/1 labels, or with ``types`` learned, rows of
        (label, index of the defect type in ``types`` or -1) (:mod:`qi.data.types`)."""
        images, labels = self.split(name)
        if not types:
            return images, labels
        mask = (self.frame["split"] == name).to_numpy()
        kinds = type_targets(self.frame[mask], types)
        return images, np.stack([labels.astype(np.float32), kinds.astype(np.float32)], axis=1)

    def split_frame(self, name: str) -> pd.DataFrame:
        return self.frame[self.frame["split"] == name].reset_index(drop=True)

    def positive_weight(self) -> float:
        """ok/defective ratio in train: weights the loss so both classes count alike."""
        return positive_weight(self.split("train")[1])

    def counts(self) -> pd.DataFrame:
        """Images per split and class, for logs and run descriptions."""
        return pd.crosstab(self.frame["split"], self.frame["label"].map({0: "ok", 1: "defective"}))


def resolve_data_dir(config: DataConfig, synth_config: SynthConfig, progress: bool = True) -> Path:
    """The user's folder, or the embedded synthetic set (generated once and cached)."""
    if config.data_dir is not None and str(config.data_dir) != "":
        return Path(config.data_dir)
    return synth.default_dataset(synth_config, progress=progress)


def check_data_dir(config: DataConfig) -> None:
    """Fail at once on a data directory that does not exist (before slower checks)."""
    if config.data_dir is not None and not Path(config.data_dir).expanduser().is_dir():
        discover(config.data_dir)  # raises the precise DataLayoutError


def prepare_data(
    config: DataConfig,
    synth_config: SynthConfig = SynthConfig(),
    progress: bool = True,
    good_only: bool = False,
) -> PreparedData:
    """Discover, split and decode; fails fast with a clear message on unusable data.

    ``good_only``: the method may learn from good images alone, so data without defects is
    accepted (:func:`qi.data.splits.check_classes`)."""
    checkpoint("data")
    data_dir = resolve_data_dir(config, synth_config, progress)
    found = discover(data_dir, config.ok_class)
    frame = subsample(found.frame, config.max_images, config.seed, found.root)
    check_classes(frame, str(found.root), good_only)
    preprocess = PreprocessConfig.from_data_config(config)
    paths = frame["image_path"].tolist()
    decoded = decode_images(paths, preprocess, policy=config.bad_images, progress=progress)
    if decoded.skipped:
        log.warning(
            "skipped %d unreadable image(s) in %s, e.g. %s",
            len(decoded.skipped),
            found.root,
            next(iter(decoded.skipped.values())),
        )
        frame = frame[~frame["image_path"].isin(decoded.skipped)]
        check_classes(frame, str(found.root), good_only)
    frame = assign_splits(frame, config.val_fraction, config.test_fraction, config.seed, found.root)
    position = {p: i for i, p in enumerate(decoded.paths)}
    images = decoded.images[[position[p] for p in frame["image_path"]]]
    for name in ("train", "val"):
        if not (frame["split"] == name).any():
            raise DataLayoutError(f"the {name} split of {found.root} is empty: add images")
    return PreparedData(
        frame=frame,
        images=images,
        root=found.root,
        layout=found.layout,
        ok_class=found.ok_class,
        preprocess=preprocess,
        skipped=decoded.skipped,
        source_size=typical_size(frame["image_path"].tolist()),
    )


class ImageArrayDataset(Dataset):
    """uint8 ``(C, H, W)`` tensors and float targets (labels, or (label, type) rows) from an
    in-memory array."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, transform=None) -> None:
        # (N, H, W, C) -> (N, C, H, W) once, shared memory with the array when possible
        self.images = torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2)))
        self.labels = torch.from_numpy(labels.astype(np.float32))
        self.transform = transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        image = self.images[index]
        if self.transform is not None:
            image = self.transform(image)
        return image, self.labels[index]


class InspectionDataModule(pl.LightningDataModule):
    """Loaders over :class:`PreparedData` for one batch size and augmentation strength."""

    def __init__(
        self, data: PreparedData, config: DataConfig, defect_types: tuple[str, ...] = ()
    ) -> None:
        super().__init__()
        self.data = data
        self.config = config
        self.defect_types = defect_types
        self.augmentation = build_augmentation(config.augment_strength, config.augmentation)

    def _loader(self, split: str, train: bool) -> DataLoader:
        images, labels = self.data.targets(split, self.defect_types)
        dataset = ImageArrayDataset(images, labels, self.augmentation if train else None)
        workers = self.config.num_workers
        return DataLoader(
            dataset,
            batch_size=self.config.batch_size,
            shuffle=train,
            drop_last=train and len(dataset) > self.config.batch_size,
            num_workers=workers,
            persistent_workers=workers > 0,
            pin_memory=torch.cuda.is_available(),
            generator=torch.Generator().manual_seed(self.config.seed) if train else None,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", train=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", train=False)


def positive_weight(labels: np.ndarray) -> float:
    """The defective class's loss weight that makes both classes count alike."""
    positives = max(int(np.sum(labels)), 1)
    return float((len(labels) - positives) / positives)


class FeatureDataModule(pl.LightningDataModule):
    """Loaders over cached encoder features: each training view is a sample of its own,
    validation images come with all their views, ``(N, V, D)``, for the head to average.

    A batch holds ``batch_size`` images' worth of views, so an epoch has as many steps as an
    epoch over the images would.
    """

    def __init__(
        self,
        train: np.ndarray,  # (V, N, D)
        train_labels: np.ndarray,
        val: np.ndarray,  # (V', M, D)
        val_labels: np.ndarray,
        config: DataConfig,
    ) -> None:
        super().__init__()
        views, n, dim = train.shape
        self.train_set = torch.utils.data.TensorDataset(
            torch.from_numpy(train.reshape(views * n, 1, dim)),
            # views-major like the features: (label[, type]) rows repeated once per view
            torch.from_numpy(np.concatenate([train_labels] * views).astype(np.float32)),
        )
        self.val_set = torch.utils.data.TensorDataset(
            torch.from_numpy(np.ascontiguousarray(val.transpose(1, 0, 2))),
            torch.from_numpy(val_labels.astype(np.float32)),
        )
        self.batch_size = config.batch_size * views
        self.seed = config.seed
        self.training_arrays = (train, train_labels)  # what a scikit-learn head is fitted on

    def train_dataloader(self) -> DataLoader:
        return DataLoader(
            self.train_set,
            batch_size=self.batch_size,
            shuffle=True,
            drop_last=len(self.train_set) > self.batch_size,
            generator=torch.Generator().manual_seed(self.seed),
        )

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=max(self.batch_size, 256))
