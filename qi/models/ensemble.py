"""Several trained networks as one: the weighted average of their defect probabilities.

A study's best few trials often err on different images; averaging their probabilities
(Caruana et al. 2004, chosen by :mod:`qi.study.ensemble`) can beat the best of them. The
ensemble is one ``nn.Module`` with the interface of qi's networks (``probabilities``,
``probabilities_and_types``, ``forward`` = the logit of the averaged probability,
``defect_types``, ``method``), so evaluation, the pyfunc, REST, ``qi predict``, Grad-CAM
heatmaps and ONNX export take it as they take one network.

**One encoder pass.** Heads trained on the same frozen pretrained encoder (the study's cheap
trials) read the same features: their members share that encoder's module, so it is stored
once (in the weights file and the ONNX graph) and run once per view; each head then reads its
own columns of the pooled maps (:meth:`~qi.models.encoders.TimmEncoder.pooled_maps`), as it
did from the feature cache in training. Every member keeps its own test-time views.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from qi.views import dihedral_view


def shared_encoder_groups(keys: Sequence[tuple | None]) -> list[list[int]]:
    """Members that may share one encoder pass, by their encoder key (``None``: a member
    whose encoder learned, which shares nothing): lists of member positions, first seen
    first."""
    groups: dict[tuple, list[int]] = {}
    alone: list[list[int]] = []
    for position, key in enumerate(keys):
        if key is None:
            alone.append([position])
        else:
            groups.setdefault(key, []).append(position)
    return sorted([*groups.values(), *alone], key=lambda g: g[0])


class EnsembleNet(nn.Module):
    """Members' defect probabilities averaged with ``weights`` (summing to 1); their type
    probabilities likewise. ``groups`` lists members that share a frozen encoder
    (:func:`shared_encoder_groups`): their encoders are tied to the group's first."""

    method = "classifier"

    def __init__(
        self, members: Sequence[nn.Module], weights: Sequence[float], groups: list[list[int]]
    ) -> None:
        super().__init__()
        if len(members) != len(weights) or not members:
            raise ValueError(f"{len(members)} members with {len(weights)} weights")
        types = {tuple(m.defect_types) for m in members}
        if len(types) > 1:
            raise ValueError(f"members learned different defect types: {sorted(types)}")
        self.members = nn.ModuleList(members)
        total = float(sum(weights))
        self.register_buffer("weights", torch.tensor([w / total for w in weights]))
        self.groups = [list(g) for g in groups]
        for group in self.groups:
            for position in group[1:]:  # one module: stored once, run once
                self.members[position].encoder.model = self.members[group[0]].encoder.model
        self.defect_types: tuple[str, ...] = next(iter(types))

    @property
    def test_time_views(self) -> int:
        """The most views any member averages (what one image costs in encoder passes)."""
        return max(m.test_time_views for m in self.members)

    def _group_outputs(
        self, group: list[int], images: torch.Tensor, all_views: bool
    ) -> list[torch.Tensor]:
        """``(N, 1 + K)`` (defect probability, type probabilities) of each member of
        ``group``, averaged over its test-time views (``all_views``) or of the image as it
        is; the shared encoder runs once per view."""
        members = [self.members[p] for p in group]
        views = [m.test_time_views if all_views else 1 for m in members]
        if len(members) == 1 and all_views:
            defect, types = members[0].probabilities_and_types(images)
            return [torch.cat([defect[:, None], types], dim=1)]
        first = members[0]
        sums: list[torch.Tensor | None] = [None] * len(members)
        for view in range(max(views)):
            normalised = (dihedral_view(images, view).float() - first.mean) / first.std
            if len(members) == 1:
                logits_of = [first.head(first.encoder(normalised))]
            else:
                pooled = first.encoder.pooled_maps(normalised)
                logits_of = [m.head(pooled[:, m.encoder.pooled_columns()]) for m in members]
            for i, logits in enumerate(logits_of):
                if view >= views[i]:
                    continue
                logits = logits.float()
                both = torch.cat(
                    [torch.sigmoid(logits[:, :1]), torch.softmax(logits[:, 1:], dim=1)], dim=1
                )
                sums[i] = both if sums[i] is None else sums[i] + both
        return [s / v for s, v in zip(sums, views, strict=True)]

    def _averaged(self, images: torch.Tensor, all_views: bool) -> torch.Tensor:
        total = None
        for group in self.groups:
            outputs = self._group_outputs(group, images, all_views)
            for position, output in zip(group, outputs, strict=True):
                weighted = self.weights[position] * output
                total = weighted if total is None else total + weighted
        return total

    def probabilities_and_types(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        total = self._averaged(images, all_views=True)
        return total[:, 0], total[:, 1:]

    def probabilities(self, images: torch.Tensor) -> torch.Tensor:
        return self.probabilities_and_types(images)[0]

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """The logit of the members' averaged defect probability of the image as it is, one
        view each, as a single network's ``forward``: what Grad-CAM differentiates (through
        every test-time view its backward pass would hold eight encoders' activations)."""
        return torch.logit(self._averaged(images, all_views=False)[:, 0], eps=1e-6)

    @property
    def cam_layers(self) -> list[nn.Module]:
        """Each distinct encoder's Grad-CAM layer (a shared encoder's once)."""
        return [self.members[g[0]].encoder.cam_layer for g in self.groups]
