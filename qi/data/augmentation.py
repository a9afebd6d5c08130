"""Training-time augmentation with torchvision v2, scaled by one ``strength`` knob.

Inspection images are taken top-down under a fixed camera: flips and rotations keep a part a
valid part, small shifts and scale changes mimic fixture play, brightness/contrast mimic
lighting drift. Nothing here may remove a defect (no crops that cut the part, no blur).
"""

from __future__ import annotations

from torchvision.transforms import v2


def build_augmentation(strength: float) -> v2.Transform | None:
    """A v2 pipeline for uint8 ``(C, H, W)`` tensors; ``None`` when strength is 0."""
    if strength <= 0:
        return None
    s = min(float(strength), 1.0)
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
            v2.ColorJitter(brightness=0.3 * s, contrast=0.3 * s),
        ]
    )
