"""``qi train``: one tracked training run, end to end. The CLI and tests call :func:`train`.

The fit itself is :func:`qi.fit.fit`; this module owns the run around it: tags, params, the
data it saw, the test evaluation and the logged model.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace

import mlflow

from qi.anomaly.fitting import DetectorSummary, detector_data, fit_detector
from qi.anomaly.localisation import add_pixel_auroc
from qi.anomaly.method import choose_method
from qi.config import RunConfig
from qi.data.datamodule import PreparedData, check_data_dir, prepare_data
from qi.data.types import types_warning
from qi.evaluation.metrics import Evaluation
from qi.evaluation.report import log_evaluation
from qi.evaluation.scoring import evaluate
from qi.fit import FitResult, fit
from qi.fit.fitting import defect_types_to_learn
from qi.inference import ModelSpec
from qi.interrupts import checkpoint
from qi.models.patchcore import detector_backbone
from qi.serving import log_inspection_model
from qi.tags import Kind, Tag
from qi.tracking import (
    configure_tracking,
    log_config,
    log_metrics,
    log_prepared_data,
    log_run_config,
    standard_tags,
    training_run,
)

log = logging.getLogger(__name__)


@dataclass
class TrainOutcome:
    run_id: str
    result: FitResult
    data: PreparedData
    model_uri: str | None
    evaluation: Evaluation | None = None
    method: str = "classifier"
    method_reason: str = ""
    detector: DetectorSummary | None = None  # a good-only detector's bank and threshold basis


def train(config: RunConfig, progress: bool = True) -> TrainOutcome:
    """Prepare the data, fit, evaluate on the test split and log everything to one run."""
    check_data_dir(config.data)  # a typo in the path should not wait for the tracking store
    configure_tracking(config.tracking)
    requested = config.detector.method
    data = prepare_data(
        config.data, config.synth, progress=progress, good_only=requested != "classifier"
    )
    method, why = choose_method(requested, data.frame, data.layout)
    log.info("method: %s (%s)", method, why)
    if method == "anomaly":
        data = detector_data(data, config.data.seed)
    elif config.model.defect_types != "off":
        warning = types_warning(data.frame, defect_types_to_learn(config, data))
        if warning:
            log.warning("%s", warning)
    log.info(
        "data: %s layout at %s, %d images\n%s",
        data.layout,
        data.root,
        len(data.frame),
        data.counts(),
    )
    tags = standard_tags(
        data.digest,
        {
            Tag.KIND: Kind.TRAIN,
            Tag.DATA_LAYOUT: data.layout,
            Tag.OK_CLASS: data.ok_class,
            Tag.DATA_ROOT: str(data.root),
            Tag.METHOD: method,
            Tag.METHOD_REASON: why,
        },
    )
    with training_run(config.tracking, tags=tags) as run_id:
        mlflow.set_tags(tags)  # also on a run `mlflow run` opened before qi started
        log_run_config(config, run_id)
        log_config(config, run_id)
        log_prepared_data(data, run_id)
        detector = None
        if method == "anomaly":
            result, detector = fit_detector(config, data)
            log_metrics(detector.metrics(), run_id)
        else:
            result = fit(config, data, run_id=run_id, progress=progress)
        log_metrics(
            {f"best_{k.replace('/', '_')}": v for k, v in result.val_metrics.items()}, run_id
        )
        log_metrics(
            {
                "best_epoch": result.best_epoch,
                "epochs_run": result.epochs_run,
                "train_seconds": result.seconds,
                "train_images_per_second": result.images_per_second,
            },
            run_id,
        )
        evaluation = None
        checkpoint("evaluation")
        if (data.frame["split"] == "test").any():
            evaluation = evaluate(
                result.net,
                data,
                config.evaluation.target_recall,
                threshold=0.5 if method == "anomaly" else None,
            )
            if method == "anomaly":
                add_pixel_auroc(evaluation, result.net, data)
            log_evaluation(
                evaluation,
                run_id,
                title="qi train: test evaluation",
                net=result.net,
                preprocess=data.preprocess,
            )
        model_uri = None
        if config.tracking.log_model:
            threshold = evaluation.threshold if evaluation else 0.5
            model = config.model
            if method == "anomaly":  # the detector is named by the encoder it stands on
                model = replace(model, name=detector_backbone(model))
            spec = ModelSpec(
                model=model,
                preprocess=data.preprocess,
                threshold=threshold,
                method=method,
                detector=config.detector if method == "anomaly" else None,
                defect_types=result.net.defect_types,
            )
            info = log_inspection_model(result.net, spec, example_image=data.images[0])
            model_uri = info.model_uri
    return TrainOutcome(
        run_id=run_id,
        result=result,
        data=data,
        model_uri=model_uri,
        evaluation=evaluation,
        method=method,
        method_reason=why,
        detector=detector,
    )
