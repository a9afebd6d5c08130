"""``qi evaluate``: a logged or registered model on a data set's test split, as its own run."""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path

import mlflow

from qi.config import DataConfig, TrackingConfig
from qi.data.datamodule import PreparedData, prepare_data
from qi.data.preprocessing import PreprocessConfig
from qi.data.recorded import data_config_of_run, recorded_data
from qi.evaluation.metrics import Evaluation
from qi.evaluation.report import log_evaluation
from qi.evaluation.scoring import evaluate
from qi.tags import Kind, Tag
from qi.tracking import configure_tracking, log_dataset, standard_tags, training_run

log = logging.getLogger(__name__)


def evaluate_logged_model(
    model_uri: str, data_config: DataConfig, tracking: TrackingConfig, progress: bool = True
) -> tuple[str, Evaluation]:
    """Score ``model_uri`` on the test split of ``data_config``'s images; log a new run.

    The model keeps its own threshold and preprocessing; the figures at 0.5 are reported
    beside them.
    """
    configure_tracking(tracking)
    model = mlflow.pyfunc.load_model(model_uri).unwrap_python_model()
    preprocess = model.spec.preprocess
    good_only = model.spec.method == "anomaly"
    data_config = replace(
        data_config,
        image_size=preprocess.image_size,
        color_mode=preprocess.color_mode,
        clahe=preprocess.clahe,
    )
    data = model_test_data(model_uri, data_config, preprocess, good_only, progress)
    # at the model's own threshold, with validation's trade-off table beside it
    evaluation = evaluate(model.net, data, target_recall=None, threshold=model.spec.threshold)
    tags = standard_tags(data.digest, {Tag.KIND: Kind.EVALUATE, Tag.MODEL_URI: model_uri})
    with training_run(tracking, tags=tags) as run_id:
        mlflow.set_tags(tags)
        log_dataset(data.frame, data.root, data.digest, name=data.root.name, run_id=run_id)
        log_evaluation(
            evaluation,
            run_id,
            title=f"Evaluation of {model_uri}",
            net=model.net,
            preprocess=data.preprocess,
        )
    return run_id, evaluation


def model_test_data(
    model_uri: str,
    data_config: DataConfig,
    preprocess: PreprocessConfig,
    good_only: bool,
    progress: bool,
) -> PreparedData:
    """The images a model is evaluated on: its run's recorded split where the folder is the
    run's own (or none is given), so a model trained with other fractions, seed or image
    budget is scored on exactly its test images; another folder's own split otherwise."""
    run_id = mlflow.models.get_model_info(model_uri).run_id
    recorded_root = mlflow.MlflowClient().get_run(run_id).data.tags.get(Tag.DATA_ROOT)
    given = data_config.data_dir
    if given is None or (recorded_root and Path(given).resolve() == Path(recorded_root).resolve()):
        data = recorded_data(run_id, preprocess, given, data_config.strict_data, progress)
        if data is not None:
            return data
        log.warning(
            "run %s recorded no split (logged by an earlier qi): re-deriving it from the run's "
            "data settings",
            run_id,
        )
        data_config = replace(
            data_config_of_run(run_id, given),
            image_size=preprocess.image_size,
            color_mode=preprocess.color_mode,
            clahe=preprocess.clahe,
        )
    return prepare_data(data_config, progress=progress, good_only=good_only)
