import pytest

from qi.data.discovery import DataLayoutError, discover
from tests.helpers import make_class_folders, make_mvtec, write_image


def test_binary_class_folders(tmp_path):
    make_class_folders(tmp_path, {"ok": 5, "defective": 7})
    found = discover(tmp_path)
    assert found.layout == "class_folders" and found.ok_class == "ok"
    assert found.frame["label"].tolist().count(0) == 5
    assert found.frame["label"].tolist().count(1) == 7
    assert set(found.frame["defect_type"]) == {"none", "defect"}
    assert (found.frame["split"] == "").all()


def test_one_folder_per_defect_type_with_mixed_formats(tmp_path):
    make_class_folders(tmp_path, {"Good": 4}, ext=".jpg")
    make_class_folders(tmp_path, {"scratch": 3}, ext=".bmp")
    make_class_folders(tmp_path, {"dent": 2}, ext=".tiff")
    (tmp_path / "notes.txt").write_text("not an image")
    found = discover(tmp_path)
    assert found.ok_class == "Good"
    types = found.frame.groupby("defect_type").size().to_dict()
    assert types == {"none": 4, "scratch": 3, "dent": 2}


def test_kaggle_casting_layout(tiny_casting):
    found = discover(tiny_casting)
    assert found.layout == "split_folders" and found.ok_class == "ok_front"
    frame = found.frame
    assert set(frame["split"]) == {"", "test"}  # val is carved out of train later
    assert (frame["split"] == "test").sum() == 24
    # defect types come from the manifest, not from the single def_front folder
    assert set(frame.loc[frame["label"] == 1, "defect_type"]) >= {"crack", "pin_holes"}


def test_wrapper_folders_are_descended(tmp_path):
    make_class_folders(
        tmp_path / "casting_data" / "casting_data" / "train", {"ok_front": 3, "def_front": 3}
    )
    make_class_folders(
        tmp_path / "casting_data" / "casting_data" / "test", {"ok_front": 2, "def_front": 2}
    )
    found = discover(tmp_path / "casting_data")
    assert found.layout == "split_folders" and len(found.frame) == 10


def test_mvtec_category_is_pooled_for_resplitting(tmp_path):
    make_mvtec(tmp_path / "bottle")
    found = discover(tmp_path / "bottle")
    assert found.layout == "mvtec" and found.ok_class == "good"
    frame = found.frame
    assert len(frame) == 10 + 4 + 10  # ground_truth masks are not images of parts
    assert (frame["split"] == "").all()
    assert frame.groupby("defect_type").size().to_dict() == {"none": 14, "crack": 5, "hole": 5}


def test_mvtec_root_with_categories_asks_for_one(tmp_path):
    make_mvtec(tmp_path / "bottle")
    make_mvtec(tmp_path / "cable")
    with pytest.raises(DataLayoutError, match="point data_dir at one of them"):
        discover(tmp_path)


def test_ok_class_explicit_and_errors(tmp_path):
    make_class_folders(tmp_path, {"accepted": 3, "rejected": 3})
    with pytest.raises(DataLayoutError, match="--ok-class"):
        discover(tmp_path)
    assert discover(tmp_path, ok_class="ACCEPTED").ok_class == "accepted"
    with pytest.raises(DataLayoutError, match="ok_class 'fine' is not a class folder"):
        discover(tmp_path, ok_class="fine")


def test_ambiguous_good_folders(tmp_path):
    make_class_folders(tmp_path, {"ok": 2, "good": 2, "bad": 2})
    with pytest.raises(DataLayoutError, match="several folders"):
        discover(tmp_path)


def test_missing_and_empty_directories(tmp_path):
    with pytest.raises(DataLayoutError, match="does not exist"):
        discover(tmp_path / "nope")
    (tmp_path / "ok").mkdir()
    (tmp_path / "bad").mkdir()
    with pytest.raises(DataLayoutError, match="no images"):
        discover(tmp_path)
    file = write_image(tmp_path / "one.png", 1)
    with pytest.raises(DataLayoutError, match="is a file"):
        discover(file)
