"""Heatmaps point at the defect: the synth knows where it drew each one."""

import pytest

from qi.config import DataConfig, ModelConfig, RunConfig, SynthConfig, TrackingConfig, TrainConfig
from qi.data import synth
from qi.heatmaps import heatmaps
from tests.helpers import peaks_in_defect_boxes


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
    images, _ = outcome.data.split("test")
    maps = heatmaps(outcome.result.net, images)
    defective, hits, chance = peaks_in_defect_boxes(root, outcome.data, maps, margin=size / 8)
    assert defective >= 20
    assert hits >= 0.8 * defective, (hits, defective)
    assert hits >= 2 * chance, (hits, chance)
