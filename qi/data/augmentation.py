"""Training-time augmentation with torchvision v2, scaled by one ``strength`` knob.

Inspection images are taken top-down under a fixed camera: flips and rotations keep a part a
valid part, small shifts and scale changes mimic fixture play, brightness/contrast mimic
lighting drift. Nothing here may remove a defect (no crops that cut the part, no blur).
"""

from __future__ import annotations

import torch
from torchvision.transforms import v2

from qi.choices import AUGMENTATIONS
from qi.views import dihedral_view


class RandomDihedral(torch.nn.Module):
    """One of the eight flips/rotations of the square, at random: exact copies, no
    interpolation, no empty corners."""

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return dihedral_view(image, int(torch.randint(8, ())))


def build_augmentation(strength: float, kind: str = "affine") -> v2.Transform | None:
    """A v2 pipeline for uint8 ``(C, H, W)`` tensors; ``None`` when strength is 0.

    ``affine``: flips, any rotation (``180 * strength`` degrees), small shifts and scale
    changes, interpolated; ``dihedral``: only the eight exact flips/rotations of the square.
    Both add brightness/contrast drift.
    """
    if strength <= 0:
        return None
    s = min(float(strength), 1.0)
    jitter = v2.ColorJitter(brightness=0.3 * s, contrast=0.3 * s)
    if kind == "dihedral":
        return v2.Compose([RandomDihedral(), jitter])
    if kind != "affine":
        raise ValueError(f"unknown augmentation '{kind}': choose one of {AUGMENTATIONS}")
    return v2.Compose(
        [
            v2.RandomHorizontalFlip(),
            v2.RandomVerticalFlip(),
            v2.RandomAffine(
                degrees=180 * s,
                translate=(0.06 * s, 0.06 * s),
                scale=(1 - 0.1 * s, 1 + 0.1 * s),
                interpolation=v2.InterpolationMode.BILINEAR,
            ),
            jitter,
        ]
    )
