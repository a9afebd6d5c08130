"""Training-time augmentation with torchvision v2, scaled by one ``strength`` knob.

Inspection images are taken top-down under a fixed camera: flips and rotations keep a part a
valid part, small shifts and scale changes mimic fixture play, brightness/contrast mimic
lighting drift. Nothing here may remove a defect (no crops that cut the part, no blur).
"""

from __future__ import annotations

import torch
from torchvision.transforms import v2

AUGMENTATIONS = ("affine", "dihedral")


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


def dihedral_view(images: torch.Tensor, k: int) -> torch.Tensor:
    """View ``k`` (0..7) of a batch ``(N, C, H, W)`` under the square's flips and rotations,
    ordered so that the first 2, 4 or 8 views are groups of their own: identity, horizontal
    flip, vertical flip, 180 degrees, then the four with height and width swapped.

    A part seen top-down is the same part in every view, so these are exact, label-preserving
    copies: the views of a frozen encoder's features (:mod:`qi.data.embeddings`) and of
    test-time averaging.
    """
    if k >= 4:
        images = images.transpose(-1, -2)
    flips = [(), (-1,), (-2,), (-1, -2)][k % 4]
    return images.flip(flips) if flips else images
