"""The eight flips and rotations of the square: views that keep a part the same part.

Training augmentation (:mod:`qi.data.augmentation`), the cached features of a frozen encoder
(:mod:`qi.data.embeddings`) and test-time averaging (:class:`qi.models.InspectionNet`) all use
these views; they live here, below both data and models, so neither imports the other.
"""

from __future__ import annotations

import torch

VIEWS = 8  # every flip and rotation: the training copies of a frozen encoder's features


def dihedral_view(images: torch.Tensor, k: int) -> torch.Tensor:
    """View ``k`` (0..7) of a batch ``(N, C, H, W)`` under the square's flips and rotations,
    ordered so that the first 2, 4 or 8 views are groups of their own: identity, horizontal
    flip, vertical flip, 180 degrees, then the four with height and width swapped.

    A part seen top-down is the same part in every view, so these are exact, label-preserving
    copies: the views of a frozen encoder's features and of test-time averaging.
    """
    if k >= 4:
        images = images.transpose(-1, -2)
    flips = [(), (-1,), (-2,), (-1, -2)][k % 4]
    return images.flip(flips) if flips else images
