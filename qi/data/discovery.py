"""Find the labelled images in the folder layouts users bring, as one DataFrame.

Three layouts are recognised (case-insensitive folder names)::

    class folders             split folders (Kaggle casting)    MVTec AD category
    root/                     root/                             root/            (e.g. bottle/)
      ok/        *.png          train/                            train/good/
      defective/ *.png            def_front/                      test/good/
    or one folder per             ok_front/                       test/<defect type>/
    defect type plus one        test/ (val/ optional)             ground_truth/  (ignored)
    good folder                   def_front/
                                  ok_front/

A root holding just one folder is descended into (archives often unpack as ``x/x/...``).
Which class folder is "good" comes from ``ok_class`` or from common names. A
``defect_types.csv`` at the root (columns ``path`` and ``defect_type``, as the embedded
set writes it) refines the defect type of each file.

The result has one row per image: ``image_path`` (absolute), ``label`` (0 ok, 1 defective),
``defect_type`` (``"none"`` for good images), ``split`` (``train``/``val``/``test`` where the
layout fixes it, else empty; :func:`qi.data.splits.assign_splits` fills the rest).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from qi.data.types import GOOD_TYPE

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"})
GOOD_CLASS_NAMES = (
    "good",
    "ok",
    "ok_front",
    "pass",
    "passed",
    "normal",
    "non_defective",
    "nondefective",
    "no_defect",
    "intact",
)
SPLIT_NAMES = {
    "train": "train",
    "training": "train",
    "val": "val",
    "valid": "val",
    "validation": "val",
    "test": "test",
    "testing": "test",
}
MANIFEST_NAMES = ("defect_types.csv",)
COLUMNS = ["image_path", "label", "defect_type", "split"]


class DataLayoutError(ValueError):
    """The folder cannot be read as a labelled image set; the message says what to change."""


@dataclass(frozen=True)
class DiscoveredData:
    frame: pd.DataFrame
    layout: str  # "class_folders" | "split_folders" | "mvtec"
    root: Path
    ok_class: str


def _subdirs(path: Path) -> list[Path]:
    return sorted(p for p in path.iterdir() if p.is_dir() and not p.name.startswith("."))


def _images_in(folder: Path) -> list[Path]:
    """Image files below ``folder`` (recursively: some sets nest by date or camera)."""
    return sorted(
        p
        for p in folder.rglob("*")
        if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file() and not p.name.startswith(".")
    )


def _has_direct_images(folder: Path) -> bool:
    return any(p.suffix.lower() in IMAGE_EXTENSIONS for p in folder.iterdir())


def _descend_wrappers(root: Path) -> Path:
    """Skip folders that only wrap one other folder (``x/x/...`` archives); a lone folder
    holding images is a class, not a wrapper."""
    while True:
        subdirs = _subdirs(root)
        lowered = {d.name.lower() for d in subdirs}
        if (
            len(subdirs) == 1
            and not _has_direct_images(root)
            and not _has_direct_images(subdirs[0])
            and not lowered & set(SPLIT_NAMES)
        ):
            root = subdirs[0]
        else:
            return root


def choose_ok_class(class_names: list[str], ok_class: str | None, where: Path) -> str:
    """The folder name meaning "good": the explicit one, or the one common name present."""
    by_lower = {name.lower(): name for name in class_names}
    if ok_class:
        if ok_class.lower() in by_lower:
            return by_lower[ok_class.lower()]
        raise DataLayoutError(
            f"ok_class '{ok_class}' is not a class folder in {where} "
            f"(found: {', '.join(sorted(class_names))})"
        )
    matches = [by_lower[n] for n in GOOD_CLASS_NAMES if n in by_lower]
    if len(matches) == 1:
        return matches[0]
    hint = f"found: {', '.join(sorted(class_names)) or 'no class folders'}"
    if not matches:
        raise DataLayoutError(
            f"no folder in {where} looks like the good class ({hint}); name it with --ok-class"
        )
    raise DataLayoutError(
        f"several folders in {where} could be the good class ({hint}); choose one with --ok-class"
    )


def _class_rows(folder_by_class: dict[str, Path], ok_class: str, split: str) -> list[dict]:
    defect_classes = [c for c in folder_by_class if c != ok_class]
    rows = []
    for name, folder in folder_by_class.items():
        is_ok = name == ok_class
        for path in _images_in(folder):
            rows.append(
                {
                    "image_path": str(path.resolve()),
                    "label": 0 if is_ok else 1,
                    # a lone defect folder (def_front) names no type; several folders are types
                    "defect_type": "none"
                    if is_ok
                    else (name if len(defect_classes) > 1 else "defect"),
                    "split": split,
                }
            )
    return rows


def _is_mvtec(root: Path) -> bool:
    train, test = root / "train", root / "test"
    if not (train.is_dir() and test.is_dir()):
        return False
    train_classes = {d.name.lower() for d in _subdirs(train)}
    return train_classes == {"good"} and len(_subdirs(test)) > 1


def _read_mvtec(root: Path) -> tuple[list[dict], str]:
    rows = _class_rows({"good": root / "train" / "good"}, "good", split="")
    test_classes = {d.name: d for d in _subdirs(root / "test")}
    ok = choose_ok_class(list(test_classes), "good", root / "test")
    # MVTec's test folder holds every defect; pooling and re-splitting puts defects in train
    test_rows = _class_rows(test_classes, ok, split="")
    for row in test_rows:
        if row["label"] == 1:
            row["defect_type"] = Path(row["image_path"]).parent.name
    return rows + test_rows, ok


def _read_split_folders(root: Path, ok_class: str | None) -> tuple[list[dict], str]:
    split_dirs = {
        SPLIT_NAMES[d.name.lower()]: d for d in _subdirs(root) if d.name.lower() in SPLIT_NAMES
    }
    class_names = sorted({c.name for d in split_dirs.values() for c in _subdirs(d)})
    ok = choose_ok_class(class_names, ok_class, root)
    rows: list[dict] = []
    for split, split_dir in split_dirs.items():
        by_class = {c.name: c for c in _subdirs(split_dir)}
        # the Kaggle val is carved out of train later, so "train" keeps an empty split mark
        rows += _class_rows(by_class, ok, split="" if split == "train" else split)
    return rows, ok


MANIFEST_WARNINGS = 5  # bad rows named one by one; the rest counted


def _apply_manifest(frame: pd.DataFrame, root: Path, ok_class: str) -> pd.DataFrame:
    """Refine defective images' types from ``defect_types.csv``. A row naming a missing file
    or a good image is ignored with a warning naming the row; a defective image typed as the
    good class is an error (the folder and the table disagree about the part)."""
    for name in MANIFEST_NAMES:
        manifest = root / name
        if not manifest.is_file():
            continue
        table = pd.read_csv(manifest, dtype=str, keep_default_na=False)
        if not {"path", "defect_type"} <= set(table.columns):
            raise DataLayoutError(f"{manifest} needs the columns 'path' and 'defect_type'")
        labels = dict(zip(frame["image_path"], frame["label"], strict=True))
        good_names = {ok_class.lower(), GOOD_TYPE, *GOOD_CLASS_NAMES}
        types: dict[str, str] = {}
        ignored: list[str] = []
        for row, (path, kind) in enumerate(zip(table["path"], table["defect_type"], strict=True)):
            line = row + 2  # the header is line 1
            key = str((root / path).resolve())
            if key not in labels:
                ignored.append(f"{manifest} line {line}: {path} is not an image of {root}")
            elif labels[key] == 0:
                if kind.strip() and kind.strip().lower() not in good_names:
                    ignored.append(
                        f"{manifest} line {line}: {path} is a good image typed '{kind}'; the "
                        "type is ignored (move the file to a defect folder if it is defective)"
                    )
            elif not kind.strip():
                ignored.append(f"{manifest} line {line}: {path} has no defect_type")
            elif kind.strip().lower() in good_names:
                raise DataLayoutError(
                    f"{manifest} line {line}: {path} is defective but typed '{kind}', the good "
                    "class's name: name its defect, or move the file to the good folder"
                )
            else:
                types[key] = kind.strip()
        for message in ignored[:MANIFEST_WARNINGS]:
            log.warning("%s", message)
        if len(ignored) > MANIFEST_WARNINGS:
            log.warning("%s: %d more rows ignored", manifest, len(ignored) - MANIFEST_WARNINGS)
        known = frame["image_path"].map(types)
        defective = frame["label"] == 1
        frame.loc[defective & known.notna(), "defect_type"] = known[defective & known.notna()]
    return frame


def discover(data_dir: Path | str, ok_class: str | None = None) -> DiscoveredData:
    """Read ``data_dir`` in whichever supported layout it has."""
    root = Path(data_dir).expanduser()
    if not root.exists():
        raise DataLayoutError(f"data directory {root} does not exist: check the path")
    if not root.is_dir():
        raise DataLayoutError(f"data directory {root} is a file: give the folder holding images")
    root = _descend_wrappers(root.resolve())
    lowered = {d.name.lower() for d in _subdirs(root)}
    if _is_mvtec(root):
        rows, ok = _read_mvtec(root)
        layout = "mvtec"
    elif lowered & {"train", "training"}:
        rows, ok = _read_split_folders(root, ok_class)
        layout = "split_folders"
    else:
        by_class = {d.name: d for d in _subdirs(root)}
        mvtec_categories = [d for d in by_class.values() if _is_mvtec(d)]
        if mvtec_categories:
            names = ", ".join(d.name for d in mvtec_categories[:5])
            raise DataLayoutError(
                f"{root} holds MVTec AD categories ({names}, ...): point data_dir at one of them"
            )
        ok = choose_ok_class(list(by_class), ok_class, root)
        rows = _class_rows(by_class, ok, split="")
        layout = "class_folders"
    frame = pd.DataFrame(rows, columns=COLUMNS)
    if frame.empty:
        raise DataLayoutError(f"no images ({', '.join(sorted(IMAGE_EXTENSIONS))}) found in {root}")
    frame = _apply_manifest(frame, root, ok)
    return DiscoveredData(frame=frame.reset_index(drop=True), layout=layout, root=root, ok_class=ok)
