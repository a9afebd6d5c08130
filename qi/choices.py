"""The names a user chooses among, one tuple per registry; this module imports nothing.

Each registry (networks in :mod:`qi.models`, optimizers in :mod:`qi.fit.optimizers`, samplers
and pruners in :mod:`qi.study.sampling`, ...) is a dict keyed by the names listed here, and a
test checks that the two agree. The options in :mod:`qi.config` take their choices from this
module, so building a config or printing ``qi --help`` loads no torch, Lightning, MLflow or
Optuna: the names live below everything that uses them, and every import points down.
"""

from __future__ import annotations

# pretrained encoders qi knows where to find weights for (qi.models.encoders.BACKBONES)
BACKBONES = (
    "efficientnet_lite0",
    "efficientnet_lite1",
    "efficientnet_lite2",
    "resnet18",
    "resnet34",
    "efficientnet_b0",
    "mobilenet_v3_small",
    "mobilenet_v3_large",
)
MODELS = ("cnn", *BACKBONES)  # qi.models.MODELS
# the encoder a good-only detector uses where the configuration names the CNN, which has no
# pretrained features to compare (qi.models.patchcore.detector_backbone)
DETECTOR_BACKBONE = "efficientnet_lite0"
# any timm architecture, built offline with a weights file the user names
TIMM_PREFIX = "timm:"

ACTIVATIONS = ("relu", "gelu", "silu", "leaky_relu", "elu")  # qi.models.cnn.ACTIVATIONS
POOLINGS = ("max", "avg", "avgmax")  # qi.models.parts.GlobalPool
FINETUNE_MODES = ("head", "last", "all")  # qi.models.InspectionNet.set_finetune
# how a head on a frozen encoder's cached features is fitted: mlp by gradient (Lightning),
# logistic and svm by scikit-learn, copied into torch layers (qi.fit.estimators)
HEAD_KINDS = ("mlp", "logistic", "svm")
AUGMENTATIONS = ("affine", "dihedral")  # qi.data.augmentation.build_augmentation
# classifier: learns good and defective; anomaly: learns good images only (qi.anomaly)
METHODS = ("auto", "classifier", "anomaly")  # qi.anomaly.method.choose_method
# auto: learn which defect too when the data names enough of each (qi.data.types.learnable_types)
DEFECT_TYPE_MODES = ("auto", "off")
OPTIMIZERS = ("adamw", "adam", "sgd")  # qi.fit.optimizers.OPTIMIZERS
SAMPLERS = ("tpe", "random")  # qi.study.sampling.SAMPLERS
PRUNERS = ("median", "hyperband", "successive_halving", "none")  # qi.study.sampling.PRUNERS

# metrics computed per stage and epoch by qi.fit.module.STAGE_METRICS; "loss" beside them
STAGE_METRICS = ("f1", "auroc", "acc", "defect_recall", "precision")
# macro F1 of the defect type among defective images, for a model that learns types
TYPE_METRICS = ("type_macro_f1",)
METRICS = (*STAGE_METRICS, *TYPE_METRICS, "loss")
# test metrics a new model version may be compared on (keys of qi.evaluation binary_metrics)
PROMOTION_METRICS = ("f1", "acc", "auroc", "average_precision", "defect_recall", "macro_f1")


def objective_metrics() -> tuple[str, ...]:
    """What a study may optimise: every validation metric."""
    return tuple(f"val/{m}" for m in METRICS)


def metric_mode(metric: str) -> str:
    """ "min" for losses, "max" for every other metric."""
    return "min" if metric.rsplit("/", 1)[-1] == "loss" else "max"


def validate_metric(metric: str) -> str:
    stage, _, name = metric.rpartition("/")
    if stage not in ("val", "train") or name not in METRICS:
        choices = ", ".join(objective_metrics())
        raise ValueError(f"unknown metric '{metric}': choose one of {choices}")
    return metric
