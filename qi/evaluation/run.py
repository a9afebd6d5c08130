"""``qi evaluate``: a logged or registered model on a data set's test split, as its own run."""

from __future__ import annotations

from dataclasses import replace

import mlflow

from qi.config import DataConfig, TrackingConfig
from qi.data.datamodule import prepare_data
from qi.evaluation.metrics import Evaluation, evaluation_from_scores
from qi.evaluation.report import log_evaluation
from qi.inference import defect_probabilities
from qi.tags import Kind, Tag
from qi.tracking import configure_tracking, log_dataset, standard_tags, training_run


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
    data_config = replace(
        data_config,
        image_size=preprocess.image_size,
        color_mode=preprocess.color_mode,
        clahe=preprocess.clahe,
    )
    data = prepare_data(data_config, progress=progress, good_only=model.spec.method == "anomaly")
    images, labels = data.split("test")
    scores = defect_probabilities(model.net, images)
    val_images, val_labels = data.split("val")
    evaluation = evaluation_from_scores(
        labels,
        scores,
        data.split_frame("test"),
        model.spec.threshold,
        target_recall=None,
        validation=(val_labels, defect_probabilities(model.net, val_images)),
    )
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
