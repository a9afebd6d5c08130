import cv2
import numpy as np
import pytest

from qi.data.preprocessing import (
    ImageDecodeError,
    PreprocessConfig,
    decode_image,
    load_and_preprocess,
    preprocess,
)
from tests.helpers import write_image


@pytest.mark.parametrize("channels", [1, 3, 4])
@pytest.mark.parametrize("color_mode", ["gray", "rgb"])
def test_any_channels_become_the_wanted_shape(channels, color_mode):
    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, (30, 50) if channels == 1 else (30, 50, channels), np.uint8)
    out = preprocess(image, PreprocessConfig(image_size=24, color_mode=color_mode))
    assert out.shape == (24, 24, 1 if color_mode == "gray" else 3) and out.dtype == np.uint8


def test_sixteen_bit_is_scaled_not_clipped(tmp_path):
    twelve_bit = (np.linspace(0, 4095, 64 * 64).reshape(64, 64)).astype(np.uint16)
    path = tmp_path / "deep.png"
    cv2.imwrite(str(path), twelve_bit)
    out = load_and_preprocess(str(path), PreprocessConfig(image_size=64))
    assert out.max() == 255 and out.min() == 0


def test_rgb_array_and_bgr_file_agree(tmp_path):
    rgb = np.zeros((20, 20, 3), np.uint8)
    rgb[..., 0] = 200  # red
    path = tmp_path / "red.png"
    cv2.imwrite(str(path), rgb[..., ::-1])  # OpenCV writes BGR
    config = PreprocessConfig(image_size=20, color_mode="rgb")
    from_file = load_and_preprocess(str(path), config)
    from_array = preprocess(rgb, config, bgr=False)
    assert np.array_equal(from_file, from_array) and from_file[0, 0, 0] == 200


def test_clahe_stretches_a_flat_image():
    rng = np.random.default_rng(1)
    flat = (100 + rng.integers(0, 10, (64, 64))).astype(np.uint8)
    plain = preprocess(flat, PreprocessConfig(image_size=64))
    equalized = preprocess(flat, PreprocessConfig(image_size=64, clahe=True))
    assert equalized.std() > 2 * plain.std()


def test_bad_inputs_name_the_problem(tmp_path):
    with pytest.raises(ImageDecodeError, match="0 bytes"):
        decode_image(b"")
    with pytest.raises(ImageDecodeError, match="not a decodable"):
        decode_image(b"this is not a png")
    truncated = tmp_path / "cut.png"
    whole = write_image(tmp_path / "whole.png", 3, size=(64, 64)).read_bytes()
    truncated.write_bytes(whole[: len(whole) // 3])
    with pytest.raises(ImageDecodeError, match="cut.png"):
        load_and_preprocess(str(truncated), PreprocessConfig(image_size=16))
    with pytest.raises(ImageDecodeError, match="zero-sized"):
        preprocess(np.zeros((0, 5), np.uint8), PreprocessConfig())
