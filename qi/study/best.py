"""The best trial of a study, and what becomes of it: evaluated, logged, registered.

The best model is *kept from its trial*, not retrained on train+val: the trial's early
stopping chose its epoch on the validation split, and a retrain would have no such signal (and
would cost another full fit). Its weights travel as an artifact of its child run, so the best
trial may come from any worker or an earlier session.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, replace

import mlflow
import optuna
from optuna.trial import TrialState

from qi.anomaly.localisation import add_pixel_auroc
from qi.config import RunConfig, TuneConfig
from qi.data.datamodule import PreparedData
from qi.data.recorded import recorded_data
from qi.evaluation.metrics import Evaluation
from qi.evaluation.report import log_evaluation
from qi.evaluation.scoring import evaluate, views_on_validation
from qi.interrupts import checkpoint
from qi.locks import registration_lock
from qi.registry import (
    PromotionDecision,
    promote,
    register,
    version_of_trial_run,
)
from qi.serving import log_inspection_model
from qi.storage import storage_label
from qi.study.ensemble import EnsembleChoice, same_data_trials, select_ensemble
from qi.study.trials import DataByImageSize, load_trial_network
from qi.tags import Tag, TrialAttr
from qi.tracking import log_metrics

log = logging.getLogger(__name__)


@dataclass
class TuneOutcome:
    parent_run_id: str
    study: optuna.Study | None
    best_trial: optuna.trial.FrozenTrial | None
    evaluation: Evaluation | None
    model_uri: str | None
    registered_version: str | None = None
    decision: PromotionDecision | None = None
    method: str = "classifier"
    method_reason: str = ""
    ensemble: EnsembleChoice | None = None  # what the ensemble selection decided, if it ran


def best_trial(study: optuna.Study) -> optuna.trial.FrozenTrial | None:
    """The best complete trial; ties on the objective go to the lower validation loss.

    F1 or accuracy on a few hundred validation images moves in steps of ~0.005 and reaches
    1.0 once a model separates them, so several trials often tie; Optuna would keep the
    first. The loss still ranks them by how far they keep the two classes apart.
    """
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if not complete:
        return None
    return min(complete, key=lambda t: trial_rank(t, study.direction))


def trial_rank(trial: optuna.trial.FrozenTrial, direction: optuna.study.StudyDirection) -> tuple:
    """Sort key of complete trials, best first: objective, then validation loss, then age."""
    loss = trial.user_attrs.get(TrialAttr.VAL_LOSS)
    loss = math.inf if loss is None or math.isnan(loss) else loss
    objective = -trial.value if direction == optuna.study.StudyDirection.MAXIMIZE else trial.value
    return (objective, loss, trial.number)


def data_of_trial(best: optuna.trial.FrozenTrial, here: PreparedData) -> PreparedData:
    """The split the best trial trained on: this worker's when it matches, else the one its
    worker recorded (a session before the folder grew, or a worker elsewhere), so that its
    test images are ones it never trained on. A trial from before recorded splits keeps
    this worker's data, with a warning."""
    trained_on = best.user_attrs.get(TrialAttr.DATA_DIGEST)
    if trained_on in (None, here.digest):
        return here
    parent = best.user_attrs.get(TrialAttr.PARENT_RUN_ID)
    recorded = recorded_data(parent, here.preprocess) if parent else None
    if recorded is None:
        log.warning(
            "the best trial %d was trained on other data (digest %s, now %s) and its split was "
            "not recorded: it is evaluated on this folder's test split",
            best.number,
            trained_on,
            here.digest,
        )
        return here
    log.warning(
        "the best trial %d was trained on other data (digest %s, now %s): it is evaluated on "
        "the %d test images its worker recorded (run %s)",
        best.number,
        trained_on,
        here.digest,
        int((recorded.frame["split"] == "test").sum()),
        parent,
    )
    return recorded


def finish_best(
    best: optuna.trial.FrozenTrial,
    data: DataByImageSize,
    base: RunConfig,
    config: TuneConfig,
    parent_run_id: str,
    study: optuna.Study | None = None,
) -> TuneOutcome:
    """Best value and params on the parent; the best model (or an ensemble of the best
    trials that beats it on validation: :mod:`qi.study.ensemble`) evaluated, logged,
    registered."""
    checkpoint("evaluation")
    mlflow.log_params({f"best.{k}": v for k, v in best.params.items()})
    mlflow.set_tags(
        {
            Tag.BEST_TRIAL: str(best.number),
            Tag.BEST_RUN_ID: best.user_attrs.get(TrialAttr.RUN_ID, ""),
        }
    )
    log_metrics({"best_value": best.value, "best_trial": best.number}, parent_run_id)
    net, spec = load_trial_network(best)
    prepared = data_of_trial(best, data.get(spec.preprocess.image_size))
    settings = base.evaluation
    detector = spec.method == "anomaly"
    if settings.try_test_time_views and not detector and net.test_time_views == 1:
        views = views_on_validation(net, *prepared.split("val"))
        net.test_time_views = views
        spec = replace(spec, model=replace(spec.model, test_time_views=views))
        mlflow.log_param("best.test_time_views", views)
    choice = None
    if study is not None and not detector and config.ensemble_candidates >= 2:
        checkpoint("evaluation")
        ranked = sorted(
            study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)),
            key=lambda t: trial_rank(t, study.direction),
        )
        candidates = same_data_trials(ranked, best)[: config.ensemble_candidates]
        ensemble, ensemble_spec, choice = select_ensemble(candidates, spec, prepared)
        log_ensemble_choice(choice, parent_run_id)
        if ensemble is not None:
            net, spec = ensemble, ensemble_spec
    # a detector's threshold was set on validation when it was fitted: its probability 0.5
    evaluation = evaluate(
        net, prepared, settings.target_recall, threshold=0.5 if detector else None
    )
    if detector:
        add_pixel_auroc(evaluation, net, prepared)
    log_evaluation(
        evaluation,
        parent_run_id,
        title=f"Study {config.study_name}: best trial {best.number}",
        net=net,
        preprocess=prepared.preprocess,
    )
    spec = replace(spec, threshold=evaluation.threshold)
    info = log_inspection_model(net, spec, example_image=prepared.images[0])
    outcome = TuneOutcome(parent_run_id, None, best, evaluation, info.model_uri, ensemble=choice)
    if settings.register:
        # one lock per model name: workers finishing together register the best trial once
        storage = storage_label(config.storage, mlflow.get_tracking_uri())
        checkpoint("registration")
        with registration_lock(config.model_name, storage):
            register_best(outcome, prepared, config, base)
    log.info(
        "best trial %d: %s=%.4f, test accuracy %.4f at threshold %.3f",
        best.number,
        config.metric,
        best.value,
        evaluation.metrics["acc"],
        evaluation.threshold,
    )
    return outcome


def log_ensemble_choice(choice: EnsembleChoice, parent_run_id: str) -> None:
    """The selection's verdict on the parent run: its members (or why none), its losses."""
    mlflow.set_tag(Tag.ENSEMBLE, choice.describe())
    log_metrics(
        {
            "ensemble_val_log_loss": choice.ensemble_loss,
            "best_single_val_log_loss": choice.best_single_loss,
            "ensemble_members": len(choice.members),
        },
        parent_run_id,
    )


def register_best(
    outcome: TuneOutcome, prepared: PreparedData, config: TuneConfig, base: RunConfig
) -> None:
    """Register the best trial's model (once: a trial already registered is skipped) and
    let the promotion rule decide between champion and challenger."""
    best, evaluation = outcome.best_trial, outcome.evaluation
    best_run_id = best.user_attrs.get(TrialAttr.RUN_ID, "")
    existing = version_of_trial_run(config.model_name, best_run_id)
    if existing is not None:
        outcome.registered_version = str(existing.version)
        mlflow.set_tags(
            {
                Tag.REGISTERED_MODEL: config.model_name,
                Tag.REGISTERED_VERSION: outcome.registered_version,
                Tag.PROMOTION: "skipped",
                Tag.PROMOTION_REASON: f"trial {best.number} is already version {existing.version}",
            }
        )
        return
    version = register(
        outcome.model_uri,
        config.model_name,
        description=model_description(evaluation, config, best, outcome.ensemble),
        tags={
            Tag.STUDY_NAME: config.study_name,
            Tag.PARENT_RUN_ID: outcome.parent_run_id,
            Tag.BEST_TRIAL: str(best.number),
            Tag.BEST_RUN_ID: best_run_id,
            Tag.DATA_DIGEST: prepared.digest,
            Tag.DATA_ROOT: str(prepared.root),
            Tag.THRESHOLD: f"{evaluation.threshold:.6f}",
            **({Tag.ENSEMBLE: outcome.ensemble.describe()} if ensembled(outcome) else {}),
        },
    )
    decision = promote(
        config.model_name,
        str(version.version),
        prepared.split_frame("test"),
        base.evaluation.promotion_metric,
        base.evaluation.force_promote,
        # the evaluation scored these test images with the network the version serves
        candidate_score=float(evaluation.metrics[base.evaluation.promotion_metric]),
        margin=base.evaluation.promotion_margin,
    )
    mlflow.set_tags(
        {
            Tag.REGISTERED_MODEL: config.model_name,
            Tag.REGISTERED_VERSION: str(version.version),
            Tag.PROMOTION: decision.alias,
            Tag.PROMOTION_REASON: decision.reason,
        }
    )
    outcome.registered_version, outcome.decision = str(version.version), decision


def ensembled(outcome: TuneOutcome) -> bool:
    return outcome.ensemble is not None and outcome.ensemble.kept


def model_description(
    evaluation: Evaluation, config: TuneConfig, best, ensemble: EnsembleChoice | None = None
) -> str:
    """The registry page's text: what the model is, how well it did, what its threshold
    costs, and how to call it."""
    m = evaluation.metrics
    origin = evaluation.threshold_origin
    kind, origin_of_best = "", "Best trial"
    if ensemble is not None and ensemble.kept:
        kind = f"An ensemble of the study's best trials ({ensemble.describe()}). "
        origin_of_best = "Its best member is trial"
    if best.user_attrs.get(TrialAttr.METHOD) == "anomaly":
        kind = (
            "A good-only detector (PatchCore-style memory bank of good patches; defects only "
            "judged it). "
        )
        origin += ", where its defect probability is 0.5"
    text = (
        f"{kind}{origin_of_best} {best.number} of Optuna study '{config.study_name}' "
        f"({config.metric} {best.value:.4f}). Test: accuracy {m['acc']:.4f}, F1 {m['f1']:.4f}, "
        f"defect recall {m['defect_recall']:.4f}, ROC AUC {m['auroc']:.4f} at threshold "
        f"{evaluation.threshold:.4f} ({origin}). Input: DataFrame column 'image' of encoded "
        "image bytes; output: label, defect_probability, threshold."
    )
    if evaluation.types is not None:
        t = evaluation.types
        text += (
            f"\n\nDefect types ({', '.join(t.types)}): among the {t.caught} caught test "
            f"defects, type accuracy {t.caught_accuracy:.4f}, macro F1 {t.caught_macro_f1:.4f}; "
            "defective rows also carry defect_type and defect_type_probability (params "
            "type_probabilities=true: every type's). The (ok + types) confusion matrix and "
            "report are on the run, under evaluation/."
        )
    elif kind:
        text += (
            "\n\nNo defect types: a detector learns from good images only, so it says "
            "whether a part is defective, not which defect."
        )
    if evaluation.warning:
        text += f"\n\n**{evaluation.warning}**"
    if evaluation.tradeoff is not None:
        text += "\n\nOperating points:\n\n" + evaluation.tradeoff_markdown()
    return text
