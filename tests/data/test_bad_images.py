"""Bad files in real folders: skipped and listed, or refused, never a crash mid-run."""

import json
import struct
import zlib
from dataclasses import replace
from pathlib import Path

import mlflow
import numpy as np
import pytest

from qi.config import DataConfig
from qi.data.datamodule import prepare_data
from qi.data.discovery import DataLayoutError
from qi.data.preprocessing import ImageDecodeError, decode_image
from qi.train import train
from tests.helpers import make_class_folders, write_image


def png_bomb(width=40_000, height=40_000) -> bytes:
    """A valid PNG header declaring a huge image; decoding it would take gigabytes."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data))
            + kind
            + data
            + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
        )

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"\x00" * 64))
        + chunk(b"IEND", b"")
    )


def test_decompression_bomb_is_refused_from_its_header():
    with pytest.raises(ImageDecodeError, match="decompression bomb|pixel limit"):
        decode_image(png_bomb())


@pytest.fixture
def messy_folder(tmp_path):
    root = make_class_folders(tmp_path / "data", {"ok": 8, "defective": 8})
    (root / "ok" / "zero.png").write_bytes(b"")
    (root / "ok" / "notes.jpg").write_text("a text file with an image extension")
    whole = (root / "ok" / "ok_0.png").read_bytes()
    (root / "defective" / "cut.png").write_bytes(whole[: len(whole) // 3])
    (root / "defective" / "bomb.png").write_bytes(png_bomb())
    write_image(root / "ok" / "deep.png", 99, dtype=np.uint16)  # 16-bit: kept
    write_image(root / "defective" / "alpha.png", 98, channels=4)  # RGBA: kept
    (root / "scratch").mkdir()  # an empty defect-type folder is just empty
    return root


def test_bad_images_are_skipped_and_listed(messy_folder):
    data = prepare_data(DataConfig(data_dir=messy_folder, image_size=16), progress=False)
    skipped = {Path(p).name for p in data.skipped}
    assert skipped == {"zero.png", "notes.jpg", "cut.png", "bomb.png"}
    assert len(data.frame) == 18  # 16 + the 16-bit and the RGBA image
    assert {"deep.png", "alpha.png"} <= {Path(p).name for p in data.frame["image_path"]}


def test_strict_policy_stops_at_the_first_bad_file(messy_folder):
    with pytest.raises(ImageDecodeError, match=r"(zero|notes|cut|bomb)\.(png|jpg)"):
        prepare_data(
            DataConfig(data_dir=messy_folder, image_size=16, bad_images="strict"), progress=False
        )


def test_skipped_files_are_an_artifact_of_the_run(messy_folder, tiny_config, caplog):
    config = replace(tiny_config, data=replace(tiny_config.data, data_dir=messy_folder))
    with caplog.at_level("WARNING"):
        outcome = train(config, progress=False)
    assert "skipped 4 unreadable image(s)" in caplog.text
    path = mlflow.artifacts.download_artifacts(
        run_id=outcome.run_id, artifact_path="data/skipped_images.json"
    )
    listed = {Path(row["path"]).name for row in json.loads(Path(path).read_text())}
    assert listed == {"zero.png", "notes.jpg", "cut.png", "bomb.png"}


def test_one_class_or_empty_class_fails_fast(tmp_path):
    make_class_folders(tmp_path / "a", {"ok": 10})
    (tmp_path / "a" / "defective").mkdir()
    with pytest.raises(DataLayoutError, match="0 defective image"):
        prepare_data(DataConfig(data_dir=tmp_path / "a"), progress=False)
    make_class_folders(tmp_path / "b", {"good": 6})
    with pytest.raises(DataLayoutError, match="0 defective image"):
        prepare_data(DataConfig(data_dir=tmp_path / "b"), progress=False)
