"""The good-only detector as a network: pretrained patch features against a memory bank.

PatchCore (Roth et al. 2022) in one ``nn.Module`` so that it scores, serves and exports like
qi's classifiers: uint8 images in, a defect probability out (``probabilities``), and an
anomaly map at image resolution (``anomaly_maps``) for ``qi explain``.

- patch features: the feature maps of two (or more) intermediate encoder stages, each
  averaged over a small neighbourhood of cells (local context, as the paper's aggregation;
  zeros beyond the map's border count, as in the paper's and anomalib's pooling, so border
  patches stay unlike inner ones: ROC AUC 0.918 -> 0.933 on ELPV, 0.980 -> 0.988 on the
  castings against averaging the cells inside the map only, qi's way before 2026-12-07,
  which models of that time keep),
  the coarser ones resized to the finest stage's grid, stacked along channels;
- patch score: the mean Euclidean distance to the ``neighbours`` nearest patches of the
  memory bank (fp16, chosen from good images only: :mod:`qi.anomaly.memory_bank`), computed
  in torch in chunks of the bank, so memory does not grow with the bank and the graph
  exports to ONNX (anomalib turned faiss down for the same reason);
- image score: the largest patch score (or the mean of the ``top_patches`` largest: a crack
  that crosses many patches outweighs one odd good patch); anomaly map: patch scores resized
  to the image and smoothed with a Gaussian (sigma 4 px, as the paper);
- probability: ``sigmoid((score - centre) / scale)``. ``centre`` is the raw score the
  operating point chose, so the decision threshold of every detector is 0.5, and callers
  keep their ``defect_probability`` column; ``scale`` is the spread of held-out good scores.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from qi import choices
from qi.config import DetectorConfig, ModelConfig
from qi.models.encoders import backbone_of, stage_indices

DEFAULT_BACKBONE = choices.DETECTOR_BACKBONE
BANK_CHUNK = 4096  # bank patches per distance block: (query patches x 4096) floats at a time
SMOOTHING_SIGMA = 4.0


def gaussian_kernel(sigma: float) -> torch.Tensor:
    radius = max(1, int(round(4 * sigma)))
    x = torch.arange(-radius, radius + 1, dtype=torch.float32)
    kernel = torch.exp(-(x**2) / (2 * sigma**2))
    return kernel / kernel.sum()


class PatchCoreNet(nn.Module):
    """uint8 ``(N, C, H, W)`` images -> defect probability; see the module docstring."""

    method = "anomaly"
    defect_types: tuple[str, ...] = ()  # good images teach no type

    def __init__(
        self,
        encoder: nn.Module,
        mean: tuple[float, ...],
        std: tuple[float, ...],
        stage_indices: Sequence[int],
        neighbourhood: int,
        neighbours: int,
        bank: torch.Tensor,  # (M, D)
        top_patches: int = 1,
        zero_padding: bool = True,
    ) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))
        self.encoder = encoder
        self.stage_indices = tuple(int(i) for i in stage_indices)
        self.neighbourhood = int(neighbourhood)
        self.neighbours = int(neighbours)
        self.top_patches = int(top_patches)
        self.zero_padding = bool(zero_padding)
        self.register_buffer("memory_bank", bank.to(torch.float16))
        self.register_buffer("centre", torch.tensor(0.0))
        self.register_buffer("scale", torch.tensor(1.0))
        self.register_buffer("smoothing", gaussian_kernel(SMOOTHING_SIGMA))
        self.test_time_views = 1  # the interface of qi's networks; a detector has one view

    def patch_features(self, images: torch.Tensor) -> torch.Tensor:
        """``(N, D, h, w)`` patch features at the finest chosen stage's grid."""
        x = (images.float() - self.mean) / self.std
        maps = self.encoder.stage_features(x, self.stage_indices)
        k = self.neighbourhood
        if k > 1:
            maps = [
                F.avg_pool2d(m, k, stride=1, padding=k // 2, count_include_pad=self.zero_padding)
                for m in maps
            ]
        size = maps[0].shape[-2:]
        resized = [maps[0]] + [
            F.interpolate(m, size=size, mode="bilinear", align_corners=False) for m in maps[1:]
        ]
        return torch.cat(resized, dim=1)

    def patch_scores(self, images: torch.Tensor) -> torch.Tensor:
        """``(N, h, w)`` distance of each patch to its nearest bank patches."""
        features = self.patch_features(images).float()
        n, dim, h, w = features.shape
        queries = features.permute(0, 2, 3, 1).reshape(n * h * w, dim)
        query_norms = (queries * queries).sum(1, keepdim=True)
        nearest = None
        for start in range(0, self.memory_bank.shape[0], BANK_CHUNK):
            bank = self.memory_bank[start : start + BANK_CHUNK].float()
            distances = query_norms - 2 * queries @ bank.T + (bank * bank).sum(1)[None, :]
            k = min(self.neighbours, bank.shape[0])
            block = torch.topk(distances, k, dim=1, largest=False).values
            nearest = block if nearest is None else torch.cat([nearest, block], dim=1)
            if nearest.shape[1] > self.neighbours:
                nearest = torch.topk(nearest, self.neighbours, dim=1, largest=False).values
        distance = nearest.clamp_min(0).sqrt().mean(1)
        return distance.reshape(n, h, w)

    def raw_scores(self, images: torch.Tensor) -> torch.Tensor:
        """The image score: its largest patch score, or the mean of its ``top_patches``."""
        scores = self.patch_scores(images).flatten(1)
        if self.top_patches == 1:
            return scores.amax(1)
        k = min(self.top_patches, scores.shape[1])
        return torch.topk(scores, k, dim=1).values.mean(1)

    def calibrated(self, raw: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid((raw - self.centre) / self.scale)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """The logit of the defect probability (as a classifier's ``forward``)."""
        return (self.raw_scores(images) - self.centre) / self.scale

    def probabilities(self, images: torch.Tensor) -> torch.Tensor:
        return self.calibrated(self.raw_scores(images))

    def anomaly_maps(self, images: torch.Tensor) -> torch.Tensor:
        """``(N, H, W)`` in 0..1 on the probability scale: 0.5 is the decision threshold."""
        scores = self.patch_scores(images)[:, None]
        maps = F.interpolate(scores, size=images.shape[-2:], mode="bilinear", align_corners=False)
        kernel = self.smoothing
        pad = kernel.numel() // 2
        maps = F.conv2d(F.pad(maps, (pad, pad, 0, 0), mode="replicate"), kernel.view(1, 1, 1, -1))
        maps = F.conv2d(F.pad(maps, (0, 0, pad, pad), mode="replicate"), kernel.view(1, 1, -1, 1))
        return self.calibrated(maps[:, 0])

    @property
    def bank_megabytes(self) -> float:
        return self.memory_bank.numel() * self.memory_bank.element_size() / 2**20


def detector_backbone(model: ModelConfig) -> str:
    """The encoder a detector uses: the configured backbone, or EfficientNet-Lite0 when the
    configuration names the CNN (trained from scratch, it has no features to compare)."""
    return DEFAULT_BACKBONE if model.name == "cnn" else model.name


def build_detector(
    model: ModelConfig,
    detector: DetectorConfig,
    channels: int,
    bank: torch.Tensor | None = None,
) -> PatchCoreNet:
    """A detector with ``model``'s pretrained encoder cut after its last chosen stage (the
    later stages are never run, so they are neither computed nor stored). ``bank=None``
    leaves an empty bank of the right width for a saved state to fill."""
    from qi.models import architecture_of  # the package imports this module

    name = detector_backbone(model)
    architecture = architecture_of(name)
    with torch.random.fork_rng(devices=[]):
        encoder = backbone_of(name).build(model.pretrained, channels, "avg")
    indices = stage_indices(encoder.feature_info, detector.stage_strides, name, "--stage-strides")
    encoder.model.prune_intermediate_layers(indices=indices, prune_head=True)
    encoder.eval()
    for parameter in encoder.parameters():
        parameter.requires_grad = False
    mean, std = architecture.mean, architecture.std
    if channels == 1:
        mean, std = (sum(mean) / 3,), (sum(std) / 3,)
    width = sum(encoder.feature_info[i].channels for i in indices)
    if bank is None:
        bank = torch.zeros(1, width)
    net = PatchCoreNet(
        encoder,
        mean,
        std,
        indices,
        detector.neighbourhood,
        detector.neighbours,
        bank,
        detector.top_patches,
        detector.zero_padding,
    )
    return net.eval()
