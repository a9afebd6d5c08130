"""Heatmaps point at the defect: the synth knows where it drew each one."""

import csv
from pathlib import Path

import pytest

from qi.config import DataConfig, ModelConfig, RunConfig, SynthConfig, TrackingConfig, TrainConfig
from qi.data import synth
from qi.heatmaps import heatmaps, peak


def _inside(box: list[int], point: tuple[int, int], margin: float) -> bool:
    x0, y0, x1, y1 = box
    x, y = point
    return x0 - margin <= x <= x1 + margin and y0 - margin <= y <= y1 + margin


@pytest.mark.slow
def test_heatmap_peaks_fall_on_the_planted_defects(tmp_path_factory):
    """qi's CNN, trained for 30 s on 500 castings at 128 px: the Grad-CAM peak of most
    defective test images lies in the box the synth recorded, dilated by one heatmap cell
    (its 8x8 map is upsampled: a peak is only as precise as a cell), and far more often than
    in the box of another image (a map that peaks anywhere would match those too)."""
    from qi.train import train

    size = 128
    root = synth.generate(
        tmp_path_factory.mktemp("castings"),
        SynthConfig(n_train=500, n_test=60, image_size=size, seed=3),
        progress=False,
    )
    outcome = train(
        RunConfig(
            data=DataConfig(data_dir=root, image_size=size, batch_size=32),
            model=ModelConfig(pretrained=None),
            train=TrainConfig(epochs=10),
            tracking=TrackingConfig(experiment="qi-test"),
        ),
        progress=False,
    )
    with open(root / synth.MANIFEST) as manifest:
        regions = {row["path"]: row for row in csv.DictReader(manifest)}
    images, _ = outcome.data.split("test")
    maps = heatmaps(outcome.result.net, images)
    boxes, peaks = [], []
    for path, heatmap in zip(outcome.data.split_frame("test")["image_path"], maps, strict=True):
        row = regions[str(Path(path).relative_to(root))]
        if row["label"] == "defective":
            boxes.append([int(row[k]) for k in synth.REGION_COLUMNS])
            peaks.append(peak(heatmap))
    cell = size / 8
    hits = sum(_inside(b, p, cell) for b, p in zip(boxes, peaks, strict=True))
    shifted = boxes[1:] + boxes[:1]
    chance = sum(_inside(b, p, cell) for b, p in zip(shifted, peaks, strict=True))
    assert len(boxes) >= 20
    assert hits >= 0.8 * len(boxes), (hits, len(boxes))
    assert hits >= 2 * chance, (hits, chance)
