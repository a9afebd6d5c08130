"""Where a model looks: Grad-CAM heatmaps of the defect logit, with the ``grad-cam`` library.

An inspector told "defective, 0.93" asks *where*. Grad-CAM weighs the last convolutional
feature maps of the encoder by the gradient of the defect logit and shows the result over the
image. Every network qi builds names its ``cam_layer`` (the last feature map before pooling:
the CNN's last block before its max pooling, EfficientNet-Lite's head convolution, a
ResNet's last stage, a MobileNet's last block), so every backbone explains the same way.
"""

from __future__ import annotations

import logging

import cv2
import numpy as np
import torch
from pytorch_grad_cam import GradCAM
from pytorch_grad_cam.utils.image import show_cam_on_image
from pytorch_grad_cam.utils.model_targets import BinaryClassifierOutputTarget

from qi.inference import map_batches
from qi.models import InspectionNet

log = logging.getLogger(__name__)


def cam_layers(net: InspectionNet) -> list[torch.nn.Module]:
    """The modules whose outputs Grad-CAM weighs (see the module docstring): one, or an
    ensemble's distinct encoders' (Grad-CAM averages their maps)."""
    if hasattr(net, "cam_layers"):
        return net.cam_layers
    return [net.encoder.cam_layer]


def heatmaps(net: InspectionNet, batch: np.ndarray, batch_size: int = 16) -> np.ndarray:
    """Grad-CAM of the defect logit for a preprocessed uint8 ``(N, H, W, C)`` batch:
    ``(N, H, W)`` floats in 0..1 (each map scaled to its own maximum).

    A good-only detector shows its anomaly map instead, on its probability scale (0.5 is the
    decision threshold, so a good part stays cold)."""
    if net.method == "anomaly" and len(batch):
        return map_batches(net.anomaly_maps, batch, batch_size)
    was_training = net.training
    net.eval()
    maps = []
    try:
        with GradCAM(model=net, target_layers=cam_layers(net)) as cam:
            for start in range(0, len(batch), batch_size):
                chunk = torch.from_numpy(batch[start : start + batch_size]).permute(0, 3, 1, 2)
                # a frozen encoder has no parameter that asks for gradients: the input does
                images = chunk.float().requires_grad_(True)
                targets = [BinaryClassifierOutputTarget(1)] * len(chunk)
                maps.append(cam(input_tensor=images, targets=targets))
    finally:
        net.train(was_training)
    size = batch.shape[1:3]
    return np.concatenate(maps) if maps else np.zeros((0, *size), np.float32)


def overlay(image: np.ndarray, heatmap: np.ndarray, weight: float = 0.45) -> np.ndarray:
    """The heatmap in colour over the (gray or RGB) image: ``(H, W, 3)`` uint8 RGB."""
    rgb = np.repeat(image, 3, axis=2) if image.shape[2] == 1 else image
    return show_cam_on_image(
        rgb.astype(np.float32) / 255, heatmap, use_rgb=True, image_weight=1 - weight
    )


def overlay_png(image: np.ndarray, heatmap: np.ndarray) -> bytes:
    ok, buffer = cv2.imencode(".png", cv2.cvtColor(overlay(image, heatmap), cv2.COLOR_RGB2BGR))
    if not ok:
        raise ValueError("could not encode the heatmap as PNG")
    return buffer.tobytes()


def peak(heatmap: np.ndarray) -> tuple[int, int]:
    """(x, y) of the heatmap's maximum."""
    y, x = np.unravel_index(int(np.argmax(heatmap)), heatmap.shape)
    return int(x), int(y)


class Explainer:
    """Images and their heatmap overlays for files, as the model sees them (its own
    preprocessing): what the evaluation report puts next to each mistake."""

    def __init__(self, net: InspectionNet, preprocess) -> None:
        self.net, self.preprocess = net, preprocess

    def __call__(self, paths: list[str]) -> list[tuple[np.ndarray, np.ndarray]]:
        from qi.data.preprocessing import load_and_preprocess

        if not paths:
            return []
        batch = np.stack([load_and_preprocess(str(p), self.preprocess) for p in paths])
        maps = heatmaps(self.net, batch)
        shown = [np.repeat(i, 3, axis=2) if i.shape[2] == 1 else i for i in batch]
        return [(image, overlay(raw, m)) for image, raw, m in zip(shown, batch, maps, strict=True)]
