from pathlib import Path

import numpy as np
import pytest

from qi.config import DataConfig, SynthConfig
from qi.data import cache
from qi.data.datamodule import InspectionDataModule, prepare_data
from qi.data.discovery import DataLayoutError, discover
from qi.data.preprocessing import ImageDecodeError
from qi.data.splits import assign_splits
from tests.helpers import make_class_folders, make_mvtec


def test_splits_are_stratified_and_reproducible(tmp_path):
    make_class_folders(tmp_path, {"ok": 40, "scratch": 20, "dent": 20})
    frame = discover(tmp_path).frame
    # draws hash the path relative to the root: the same wherever pytest puts tmp_path
    a = assign_splits(frame.copy(), 0.15, 0.15, seed=1, root=tmp_path)
    b = assign_splits(frame.sample(frac=1, random_state=9), 0.15, 0.15, seed=1, root=tmp_path)
    assert a.equals(b)  # input order does not matter
    counts = a.groupby(["split", "defect_type"]).size().unstack()
    assert (counts > 0).all().all()  # every defect type in every split
    # each file's own draw: 12 expected of 80, within the binomial spread (sd 3.2)
    assert 5 <= counts.loc["test"].sum() <= 19 and 5 <= counts.loc["val"].sum() <= 19
    c = assign_splits(frame.copy(), 0.15, 0.15, seed=2, root=tmp_path)
    assert not a["split"].equals(c["split"])


def test_a_growing_folder_keeps_every_files_split(tmp_path):
    """10% more images (and one that became unreadable): no earlier file changes split, in
    a class-folder layout and in the detector's halves of an MVTec test folder."""
    from qi.anomaly.fitting import detector_data

    make_class_folders(tmp_path / "line", {"ok": 60, "scratch": 30, "dent": 30})
    before = prepare_data(DataConfig(data_dir=tmp_path / "line", image_size=16), progress=False)
    grown = make_class_folders(tmp_path / "more", {"ok": 6, "scratch": 3, "dent": 3})
    for path in grown.rglob("*.png"):
        path.rename(tmp_path / "line" / path.parent.name / f"new-{path.name}")
    unreadable = before.frame["image_path"].iloc[7]
    Path(unreadable).write_bytes(b"")
    after = prepare_data(DataConfig(data_dir=tmp_path / "line", image_size=16), progress=False)
    old = before.frame.set_index("image_path")["split"].drop(unreadable)
    assert after.frame.set_index("image_path")["split"].loc[old.index].equals(old)
    assert len(after.frame) == len(before.frame) + 12 - 1

    make_mvtec(tmp_path / "bottle", n_defect=10)
    config = DataConfig(data_dir=tmp_path / "bottle", image_size=16)
    first = detector_data(prepare_data(config, progress=False, good_only=True), seed=0)
    make_class_folders(tmp_path / "extra", {"crack": 2})
    for path in (tmp_path / "extra" / "crack").iterdir():
        path.rename(tmp_path / "bottle" / "test" / "crack" / f"new-{path.name}")
    second = detector_data(prepare_data(config, progress=False, good_only=True), seed=0)
    old = first.frame.set_index("image_path")["split"]
    assert second.frame.set_index("image_path")["split"].loc[old.index].equals(old)


def test_mvtec_defects_reach_the_training_split(tmp_path):
    make_mvtec(tmp_path, n_defect=8)
    data = prepare_data(DataConfig(data_dir=tmp_path, image_size=16), progress=False)
    train = data.split_frame("train")
    assert {"crack", "hole"} <= set(train["defect_type"])
    assert set(data.frame["split"]) == {"train", "val", "test"}


def test_kaggle_test_split_is_kept(tiny_casting):
    data = prepare_data(DataConfig(data_dir=tiny_casting, image_size=24), progress=False)
    assert (data.frame["split"] == "test").sum() == 24
    assert data.frame.loc[data.frame["split"] == "test", "image_path"].str.contains("/test/").all()
    assert data.images.shape == (84, 24, 24, 1)
    # row i of the table is image i of the array
    from qi.data.preprocessing import PreprocessConfig, load_and_preprocess

    row = 17
    expected = load_and_preprocess(data.frame["image_path"][row], PreprocessConfig(image_size=24))
    assert np.array_equal(data.images[row], expected)


def test_decoded_images_are_cached(tiny_casting, monkeypatch, tmp_path):
    monkeypatch.setenv("QI_CACHE_DIR", str(tmp_path / "fresh-cache"))
    config = DataConfig(data_dir=tiny_casting, image_size=20)
    first = prepare_data(config, progress=False)
    assert len(cache.cached_entries()) == 1

    def no_decoding(*args, **kwargs):
        raise AssertionError("decoded again despite the cache")

    monkeypatch.setattr(cache, "_decode_all", no_decoding)
    second = prepare_data(config, progress=False)
    assert np.array_equal(first.images, second.images) and first.digest == second.digest
    monkeypatch.undo()
    monkeypatch.setenv("QI_CACHE_DIR", str(tmp_path / "fresh-cache"))
    prepare_data(DataConfig(data_dir=tiny_casting, image_size=22), progress=False)
    assert len(cache.cached_entries()) == 2  # another size is another entry


def test_unreadable_images_skip_or_stop(tmp_path):
    make_class_folders(tmp_path, {"ok": 8, "bad": 8})
    (tmp_path / "ok" / "zero.png").write_bytes(b"")
    (tmp_path / "bad" / "text.jpg").write_text("not a jpeg")
    data = prepare_data(DataConfig(data_dir=tmp_path, image_size=16), progress=False)
    assert len(data.frame) == 16 and len(data.skipped) == 2
    assert any(p.endswith("zero.png") for p in data.skipped)
    with pytest.raises(ImageDecodeError, match="zero.png|text.jpg"):
        prepare_data(
            DataConfig(data_dir=tmp_path, image_size=16, bad_images="strict"), progress=False
        )


def test_one_class_fails_before_training(tmp_path):
    make_class_folders(tmp_path, {"ok": 6, "bad": 2})
    with pytest.raises(DataLayoutError, match="2 defective image"):
        prepare_data(DataConfig(data_dir=tmp_path, image_size=16), progress=False)


def test_loaders_give_uint8_batches_and_augment_only_training(tiny_casting):
    data = prepare_data(DataConfig(data_dir=tiny_casting, image_size=24), progress=False)
    module = InspectionDataModule(
        data, DataConfig(image_size=24, batch_size=8, augment_strength=1.0)
    )
    images, labels = next(iter(module.train_dataloader()))
    assert images.dtype.is_floating_point is False and images.shape == (8, 1, 24, 24)
    assert set(labels.tolist()) <= {0.0, 1.0}
    val_a = next(iter(module.val_dataloader()))[0]
    val_b = next(iter(module.val_dataloader()))[0]
    assert val_a.equal(val_b)  # no augmentation outside training
    assert data.positive_weight() > 0


def test_default_data_is_the_synthetic_set(monkeypatch):
    from qi.data import synth

    calls = []
    real = synth.default_dataset

    def small_default(config, progress=True):
        calls.append(config)
        return real(SynthConfig(n_train=20, n_test=10, image_size=24), progress=False)

    monkeypatch.setattr(synth, "default_dataset", small_default)
    data = prepare_data(DataConfig(image_size=24), progress=False)
    assert calls and data.layout == "split_folders" and len(data.frame) == 30


def test_changed_preprocessing_code_never_reads_stale_arrays(tiny_casting, monkeypatch, tmp_path):
    """The cache key carries the preprocessing code's digest: arrays decoded by other code
    (here: a poisoned entry, and the module's source swapped for an edited copy) are not
    read, the images are decoded afresh."""
    from qi.data import preprocessing

    monkeypatch.setenv("QI_CACHE_DIR", str(tmp_path / "cache"))
    config = DataConfig(data_dir=tiny_casting, image_size=20)
    fresh = prepare_data(config, progress=False)
    (entry,) = cache.cached_entries()
    np.save(entry, np.zeros_like(np.load(entry)))  # what stale code would have left
    assert not prepare_data(config, progress=False).images.any()  # same code: the entry
    edited = tmp_path / "preprocessing.py"
    edited.write_text(Path(preprocessing.__file__).read_text() + "\n# an edit\n")
    monkeypatch.setattr(preprocessing, "__file__", str(edited))
    again = prepare_data(config, progress=False)
    assert np.array_equal(again.images, fresh.images)
    assert len(cache.cached_entries()) == 2
