"""Decode and preprocess images: the one code path for training, evaluation and serving.

Any PNG/JPEG/BMP/TIFF in 8 or 16 bit, grayscale, RGB or RGBA, any size, becomes a square
uint8 array ``(size, size, channels)``. Normalisation to floats happens inside the network
(:class:`qi.models.InspectionNet`), so what is cached and what a caller sends stay uint8.
"""

from __future__ import annotations

import io
import re
import warnings
from dataclasses import dataclass

import cv2
import numpy as np
from PIL import Image, UnidentifiedImageError

from qi.config import ColorMode, DataConfig

# past any inspection camera (Pillow's own decompression-bomb limit, ~179 megapixels)
MAX_PIXELS = 2 * 89_478_485


class ImageDecodeError(ValueError):
    """An image that cannot be used; the message names the problem."""


@dataclass(frozen=True)
class PreprocessConfig:
    """What the served model must repeat exactly; it travels with the model."""

    image_size: int = 128
    color_mode: ColorMode = "gray"
    clahe: bool = False

    @classmethod
    def from_data_config(cls, data: DataConfig) -> PreprocessConfig:
        return cls(image_size=data.image_size, color_mode=data.color_mode, clahe=data.clahe)

    @property
    def channels(self) -> int:
        return 1 if self.color_mode == "gray" else 3


def decode_image(data: bytes | bytearray | memoryview) -> np.ndarray:
    """Decode encoded image bytes as OpenCV does from a file (BGR order, any depth)."""
    buffer = np.frombuffer(data, dtype=np.uint8)
    if buffer.size == 0:
        raise ImageDecodeError("empty image data (0 bytes)")
    check_declared_size(data)
    image = cv2.imdecode(buffer, cv2.IMREAD_UNCHANGED)
    if image is None:
        raise ImageDecodeError("not a decodable PNG/JPEG/BMP/TIFF image")
    return image


def check_declared_size(data: bytes | bytearray | memoryview) -> None:
    """Refuse a decompression bomb from its header alone, before anything is allocated.

    Pillow reads width and height without decoding pixels; formats it cannot parse are left
    to OpenCV, whose own limit is a gigapixel.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as image:
                width, height = image.size
    except Image.DecompressionBombError as exc:  # Pillow names the pixel count only
        pixels = re.search(r"\((\d+) pixels\)", str(exc))
        count = pixels.group(1) if pixels else "too many"
        raise ImageDecodeError(
            f"image of {count} pixels is over the {MAX_PIXELS} pixel limit: send it downscaled"
        ) from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError):
        return
    if width * height > MAX_PIXELS:
        raise ImageDecodeError(
            f"image of {width}x{height} pixels is over the {MAX_PIXELS} pixel limit: send it "
            "downscaled"
        )


def header_size(path: str) -> tuple[int, int] | None:
    """(width, height) from the file's header, without decoding pixels; None if unreadable."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                return image.size
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError):
        return None


def typical_size(paths: list[str], sample: int = 32) -> int | None:
    """The median shorter side of (a spread-out sample of) the images, from their headers:
    the detail the files actually hold, so a model need not look at them larger."""
    if not paths:
        return None
    step = max(1, len(paths) // sample)
    sizes = [header_size(p) for p in paths[::step][:sample]]
    sides = sorted(min(s) for s in sizes if s)
    return sides[len(sides) // 2] if sides else None


def read_image(path: str) -> np.ndarray:
    """Read an image file with its original depth and channels."""
    with open(path, "rb") as fh:
        data = fh.read()
    return decode_image(data)


def to_uint8(image: np.ndarray) -> np.ndarray:
    """Scale 16-bit or float images to 0..255; 8-bit passes through."""
    if image.dtype == np.uint8:
        return image
    if image.dtype == np.uint16:
        # stretch by the real range: 12-bit sensors store values far below 65535
        top = int(image.max())
        scale = 255.0 / (65535 if top > 4095 else max(top, 1))
        return np.clip(image.astype(np.float32) * scale, 0, 255).astype(np.uint8)
    if np.issubdtype(image.dtype, np.floating):
        finite = np.nan_to_num(image.astype(np.float32))
        top = 1.0 if finite.max() <= 1.0 else 255.0
        return np.clip(finite / top * 255.0, 0, 255).astype(np.uint8)
    if image.dtype == bool:
        return image.astype(np.uint8) * 255
    return np.clip(image, 0, 255).astype(np.uint8)


def to_color_mode(image: np.ndarray, color_mode: ColorMode, bgr: bool = True) -> np.ndarray:
    """(H, W, C) uint8 in the wanted channels. ``bgr`` says how 3/4-channel input is ordered."""
    if image.ndim == 3 and image.shape[2] == 1:
        image = image[:, :, 0]
    if image.ndim == 3 and image.shape[2] == 4:
        # drop alpha as if composited over black: transparent pixels carry no part
        alpha = image[:, :, 3:4].astype(np.float32) / 255.0
        image = (image[:, :, :3].astype(np.float32) * alpha).astype(np.uint8)
    if image.ndim == 2:
        if color_mode == "gray":
            return image[:, :, None]
        return np.repeat(image[:, :, None], 3, axis=2)
    if image.ndim != 3 or image.shape[2] != 3:
        raise ImageDecodeError(f"unsupported image shape {image.shape}")
    if color_mode == "gray":
        code = cv2.COLOR_BGR2GRAY if bgr else cv2.COLOR_RGB2GRAY
        return cv2.cvtColor(image, code)[:, :, None]
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB) if bgr else image


def equalize(image: np.ndarray) -> np.ndarray:
    """CLAHE on luminance: evens out uneven lighting without shifting colours."""
    clahe = cv2.createCLAHE(clipLimit=2.0, tileGridSize=(8, 8))
    if image.shape[2] == 1:
        return clahe.apply(image[:, :, 0])[:, :, None]
    lab = cv2.cvtColor(image, cv2.COLOR_RGB2LAB)
    lab[:, :, 0] = clahe.apply(lab[:, :, 0])
    return cv2.cvtColor(lab, cv2.COLOR_LAB2RGB)


def preprocess(image: np.ndarray, config: PreprocessConfig, bgr: bool = True) -> np.ndarray:
    """Any decoded image -> (size, size, channels) uint8, exactly as the model was trained."""
    if image.size == 0 or min(image.shape[:2]) == 0:
        raise ImageDecodeError(f"zero-sized image {image.shape}")
    if image.shape[0] * image.shape[1] > MAX_PIXELS:
        raise ImageDecodeError(
            f"image of {image.shape[1]}x{image.shape[0]} pixels is over the "
            f"{MAX_PIXELS} pixel limit"
        )
    image = to_color_mode(to_uint8(image), config.color_mode, bgr=bgr)
    if config.clahe:
        image = equalize(image)
    size = config.image_size
    if image.shape[:2] != (size, size):
        shrinking = image.shape[0] > size or image.shape[1] > size
        interpolation = cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR
        image = cv2.resize(image, (size, size), interpolation=interpolation)
        if image.ndim == 2:
            image = image[:, :, None]
    return np.ascontiguousarray(image)


def load_and_preprocess(path: str, config: PreprocessConfig) -> np.ndarray:
    """Read a file and preprocess it; errors name the file."""
    try:
        return preprocess(read_image(path), config)
    except (ImageDecodeError, OSError, cv2.error) as exc:
        raise ImageDecodeError(f"{path}: {exc}") from exc
