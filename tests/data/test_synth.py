import hashlib

import cv2
import numpy as np
import pandas as pd

from qi.config import SynthConfig
from qi.data import synth


def _digest(folder):
    h = hashlib.sha256()
    for path in sorted(folder.rglob("*.png")):
        h.update(str(path.relative_to(folder)).encode())
        h.update(path.read_bytes())
    return h.hexdigest()


def test_generation_is_deterministic_for_a_seed(tmp_path):
    config = SynthConfig(n_train=12, n_test=6, image_size=40, seed=7)
    a = synth.generate(tmp_path / "a", config, progress=False)
    b = synth.generate(tmp_path / "b", config, progress=False)
    c = synth.generate(
        tmp_path / "c", SynthConfig(n_train=12, n_test=6, image_size=40, seed=8), progress=False
    )
    assert _digest(a) == _digest(b)
    assert _digest(a) != _digest(c)
    assert (a / "defect_types.csv").read_text() == (b / "defect_types.csv").read_text()


def test_layout_matches_kaggle_casting_set(tiny_casting):
    for split in ("train", "test"):
        for folder in ("def_front", "ok_front"):
            assert list((tiny_casting / split / folder).glob("cast_*_0_*.png"))
    manifest = pd.read_csv(tiny_casting / "defect_types.csv")
    assert len(manifest) == 84
    assert set(manifest["defect_type"]) == {"none", *synth.DEFECT_TYPES}
    defective = manifest[manifest["label"] == "defective"]
    assert (defective["path"].str.contains("def_front")).all()
    assert abs(len(defective) / len(manifest) - 0.57) < 0.05
    image = cv2.imread(str(tiny_casting / manifest["path"][0]), cv2.IMREAD_UNCHANGED)
    assert image.shape == (48, 48) and image.dtype == np.uint8


def test_defects_change_the_part():
    good = synth.render_casting(96, seed=5, defect_type=None).astype(int)
    for defect in synth.DEFECT_TYPES:
        bad = synth.render_casting(96, seed=5, defect_type=defect).astype(int)
        # same part and light (same seed), so only the defect differs: a local change
        changed = np.abs(bad - good) > 20
        assert 3 < changed.sum() < 0.1 * changed.size, defect


def test_default_dataset_is_generated_once(monkeypatch, tmp_path):
    monkeypatch.setenv("QI_CACHE_DIR", str(tmp_path / "cache"))
    config = SynthConfig(n_train=6, n_test=4, image_size=32)
    first = synth.default_dataset(config, progress=False)
    stamp = (first / "train").stat().st_mtime_ns
    second = synth.default_dataset(config, progress=False)
    assert first == second and (second / "train").stat().st_mtime_ns == stamp


def test_the_manifest_boxes_every_defect_where_its_pixels_changed(tmp_path):
    import csv

    import cv2

    out = synth.generate(tmp_path / "set", SynthConfig(n_train=10, n_test=4, image_size=64))
    with open(out / synth.MANIFEST) as manifest:
        rows = list(csv.DictReader(manifest))
    assert {"x0", "y0", "x1", "y1"} <= set(rows[0])
    plan = {r["path"]: r for r in synth.plan_images(SynthConfig(n_train=10, n_test=4))}
    for row in rows:
        if row["label"] == "ok":
            assert row["x0"] == ""
            continue
        x0, y0, x1, y1 = (int(row[k]) for k in ("x0", "y0", "x1", "y1"))
        assert 0 <= x0 <= x1 < 64 and 0 <= y0 <= y1 < 64
        image = cv2.imread(str(out / row["path"]), cv2.IMREAD_GRAYSCALE)
        twin = synth.render_casting(64, plan[row["path"]]["seed"], None)
        ys, xs = np.nonzero(image.astype(int) != twin.astype(int))
        # shading reads the height map's gradient: a changed pixel may light its neighbour
        assert xs.min() >= x0 - 1 and xs.max() <= x1 + 1 and ys.min() >= y0 - 1, row["path"]
        assert ys.max() <= y1 + 1
