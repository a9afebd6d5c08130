"""Every name qi writes into MLflow and Optuna and reads back: tags, artifact paths, trial
attributes. One place, so a writer and its reader can't drift apart.

Tags are searchable in the MLflow UI and API (``tags.`qi.kind` = 'trial'``); the README's
tables describe them for users.
"""

from __future__ import annotations


class Tag:
    """Run and model-version tags (``qi.*``), and the MLflow system tags qi sets."""

    # what a run is
    KIND = "qi.kind"  # train | tune | trial | evaluate
    VERSION = "qi.version"
    GIT_COMMIT = "qi.git_commit"
    DATA_DIGEST = "qi.data_digest"
    DATA_LAYOUT = "qi.data_layout"
    DATA_ROOT = "qi.data_root"
    OK_CLASS = "qi.ok_class"
    METHOD = "qi.method"  # classifier or anomaly (a good-only detector)
    METHOD_REASON = "qi.method_reason"  # why --method chose it
    MODEL_URI = "qi.model_uri"
    # studies and trials
    STUDY_NAME = "qi.study_name"
    STORAGE = "qi.storage"
    CONTINUES_STUDY = "qi.continues_study"
    WORKER = "qi.worker"
    TRIAL_NUMBER = "qi.trial_number"
    TRIAL_STATE = "qi.trial_state"  # complete | pruned | failed | interrupted
    PRUNED_BY = "qi.pruned_by"  # pruner | deadline | budget
    ERROR = "qi.error"
    INTERRUPTED = "qi.interrupted"
    BEST_TRIAL = "qi.best_trial"
    BEST_RUN_ID = "qi.best_run_id"
    ENSEMBLE = "qi.ensemble"  # the study's ensemble: its trials and weights, or why none
    # registry (on the study's parent run and on model versions)
    REGISTERED_MODEL = "qi.registered_model"
    REGISTERED_VERSION = "qi.registered_version"
    PARENT_RUN_ID = "qi.parent_run_id"
    SOURCE_RUN_ID = "qi.source_run_id"
    THRESHOLD = "qi.threshold"
    PROMOTION = "qi.promotion"  # champion | challenger | skipped
    PROMOTION_REASON = "qi.promotion_reason"
    PROMOTION_METRIC = "qi.promotion_metric"
    CANDIDATE_SCORE = "qi.candidate_score"
    CHAMPION_SCORE = "qi.champion_score"
    PREVIOUS_CHAMPION = "qi.previous_champion_version"
    TEST_IMAGES = "qi.test_images"  # how many images the promotion compared on
    COMPARED_ON = "qi.compared_on"  # which: images neither model saw, or (old runs) all
    DIFFERENCE_INTERVAL = "qi.difference_interval"  # 90% paired bootstrap, candidate - champion
    PROMOTION_MARGIN = "qi.promotion_margin"
    ONNX = "qi.onnx"  # on a model version: the runs:/ URI of its parity-checked ONNX export
    ONNX_PARITY = "qi.onnx_parity"
    # MLflow's own
    PARENT_RUN = "mlflow.parentRunId"
    RUN_NAME = "mlflow.runName"
    NOTE = "mlflow.note.content"  # the run's description in the UI
    EXPERIMENT_KIND = "mlflow.experimentKind"  # an experiment tag: which view the UI opens on
    MODEL_TRAINING = "custom_model_development"  # its value for qi's experiments


class Kind:
    """Values of :attr:`Tag.KIND`."""

    TRAIN = "train"
    TUNE = "tune"
    TRIAL = "trial"
    EVALUATE = "evaluate"


class TrialState:
    """Values of :attr:`Tag.TRIAL_STATE`."""

    COMPLETE = "complete"
    PRUNED = "pruned"
    FAILED = "failed"
    INTERRUPTED = "interrupted"


class Artifact:
    """Artifact paths on runs."""

    CONFIG = "config.json"  # the run's full configuration, written first
    SPLIT_COUNTS = "data/split_counts.csv"
    SPLIT = "data/split.csv"  # every file: relative path, label, defect type, split, sha256
    SKIPPED_IMAGES = "data/skipped_images.json"
    EVALUATION_DIR = "evaluation"
    STUDY_DIR = "study"
    TRIALS_TABLE = "study/trials.csv"
    TRIAL_MODEL_DIR = "trial_model"  # a trial's weights and spec, on its child run
    TRIAL_WEIGHTS = "weights.pt"
    TRIAL_SPEC = "spec.json"
    MODEL = "model"  # the logged pyfunc model's name
    ONNX = "onnx"  # qi export: model.onnx, score_onnx.py, parity.json


class TrialAttr:
    """Optuna trial user attributes qi sets, linking a trial to MLflow."""

    RUN_ID = "mlflow_run_id"
    PARENT_RUN_ID = "mlflow_parent_run_id"
    WORKER = "worker"
    DATA_DIGEST = "data_digest"
    VAL_LOSS = "val_loss"
    METHOD = "method"  # "classifier" or "anomaly" (trials before it existed: classifier)
