"""Score images with a qi model exported to ONNX, without qi or PyTorch.

Needs only ``numpy``, ``opencv-python-headless`` and ``onnxruntime``::

    python score_onnx.py model.onnx part1.png part2.jpg

``qi export`` copies this file beside ``model.onnx`` and proves with it, on the model's test
images, that it scores as the registered model does: this file *is* the preprocessing
contract. The graph takes ``image``: uint8 ``(N, size, size, channels)``, the preprocessed
pixels; it normalises them itself and returns ``defect_probability`` ``(N,)`` (averaged over
the model's test-time views). A part is defective when its probability reaches the
threshold stored in the model's metadata (``qi.threshold``). A model that learned defect
types also returns ``type_probabilities`` ``(N, K)`` over the types named, in order, in
``qi.defect_types``; a defective part's type is the most probable one, an ok part has none.

The steps below repeat ``qi.data.preprocessing.preprocess`` with nothing but OpenCV: decode
with the file's own depth and channels; 16-bit pixels stretched to 8 bits; alpha dropped as
if composited over black; gray or RGB as the model was trained; optional CLAHE; resize to the
model's square size (area interpolation when shrinking, bilinear when enlarging).
"""

from __future__ import annotations

import json
import sys

import cv2
import numpy as np


def settings(session) -> dict:
    """The preprocessing and threshold the export wrote into the model's metadata."""
    meta = session.get_modelmeta().custom_metadata_map
    return {
        "image_size": int(meta["qi.image_size"]),
        "color_mode": meta["qi.color_mode"],
        "clahe": meta["qi.clahe"] == "true",
        "threshold": float(meta["qi.threshold"]),
        "labels": json.loads(meta["qi.labels"]),
        "defect_types": json.loads(meta.get("qi.defect_types", "[]")),
    }


def to_uint8(image: np.ndarray) -> np.ndarray:
    if image.dtype == np.uint8:
        return image
    if image.dtype == np.uint16:  # 12-bit sensors store values far below 65535
        top = int(image.max())
        scale = 255.0 / (65535 if top > 4095 else max(top, 1))
        return np.clip(image.astype(np.float32) * scale, 0, 255).astype(np.uint8)
    raise ValueError(f"{image.dtype} pixels: send 8 or 16-bit images")


def preprocess(image: np.ndarray, config: dict, bgr: bool = True) -> np.ndarray:
    """A decoded image (OpenCV's BGR order when ``bgr``) -> (size, size, channels) uint8."""
    image = to_uint8(image)
    if image.ndim == 3 and image.shape[2] == 1:
        image = image[:, :, 0]
    if image.ndim == 3 and image.shape[2] == 4:
        alpha = image[:, :, 3:4].astype(np.float32) / 255.0
        image = (image[:, :, :3].astype(np.float32) * alpha).astype(np.uint8)
    gray = config["color_mode"] == "gray"
    if image.ndim == 2:
        image = image[:, :, None] if gray else np.repeat(image[:, :, None], 3, axis=2)
    elif gray:
        image = cv2.cvtColor(image, cv2.COLOR_BGR2GRAY if bgr else cv2.COLOR_RGB2GRAY)[:, :, None]
    elif bgr:
        image = cv2.cvtColor(image, cv2.COLOR_BGR2RGB)
    if config["clahe"]:
        clahe = cv2.createCLAHE(clipLimit=2.0, tileGridSize=(8, 8))
        if image.shape[2] == 1:
            image = clahe.apply(image[:, :, 0])[:, :, None]
        else:
            lab = cv2.cvtColor(image, cv2.COLOR_RGB2LAB)
            lab[:, :, 0] = clahe.apply(lab[:, :, 0])
            image = cv2.cvtColor(lab, cv2.COLOR_LAB2RGB)
    size = config["image_size"]
    if image.shape[:2] != (size, size):
        shrinking = image.shape[0] > size or image.shape[1] > size
        interpolation = cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR
        image = cv2.resize(image, (size, size), interpolation=interpolation)
        if image.ndim == 2:
            image = image[:, :, None]
    return np.ascontiguousarray(image)


def load(path: str, config: dict) -> np.ndarray:
    image = cv2.imread(path, cv2.IMREAD_UNCHANGED)
    if image is None:
        raise ValueError(f"{path}: not a readable image")
    return preprocess(image, config)


def score(session, batch: np.ndarray) -> np.ndarray:
    """Defect probabilities of a preprocessed uint8 batch."""
    return session.run(["defect_probability"], {"image": batch})[0]


def score_types(session, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(defect probabilities ``(N,)``, type probabilities ``(N, K)``) of a model that
    learned defect types."""
    defect, types = session.run(["defect_probability", "type_probabilities"], {"image": batch})
    return defect, types


def main(argv: list[str]) -> None:
    import onnxruntime

    if len(argv) < 2:
        sys.exit("usage: python score_onnx.py model.onnx IMAGE...")
    session = onnxruntime.InferenceSession(argv[0], providers=["CPUExecutionProvider"])
    config = settings(session)
    paths = argv[1:]
    batch = np.stack([load(p, config) for p in paths])
    names = config["defect_types"]
    if names:
        probabilities, types = score_types(session, batch)
    else:
        probabilities, types = score(session, batch), np.zeros((len(paths), 0))
    for path, probability, kinds in zip(paths, probabilities, types, strict=True):
        defective = probability >= config["threshold"]
        line = f"{path},{config['labels'][int(defective)]},{probability:.6f}"
        if names:
            line += f",{names[int(kinds.argmax())]},{kinds.max():.6f}" if defective else ",,"
        print(line)


if __name__ == "__main__":
    main(sys.argv[1:])
