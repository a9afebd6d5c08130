"""Registering models and moving the ``champion`` / ``challenger`` aliases (never stages).

A new version becomes ``champion`` only when it beats the current champion by the chosen
metric on test images *neither* model trained or validated on (from both runs' recorded
splits), by more than a paired bootstrap says the images can be wrong about
(:func:`decide`); when there is no champion yet; or when forced. Otherwise it becomes
``challenger``. Both models are scored the same way - their pyfunc, fed the raw test
files, each at its own threshold - so the comparison is what the production line would see.
The decision, the reason and both figures are tags on the version.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException

from qi.choices import PROMOTION_METRICS
from qi.data.recorded import run_test_files, unseen_by
from qi.evaluation.comparison import Comparison, paired_bootstrap
from qi.evaluation.metrics import binary_metrics
from qi.locks import registration_lock
from qi.serving import IMAGE_COLUMN
from qi.storage import redacted, storage_label
from qi.tags import Tag
from qi.tracking import TrackingError

log = logging.getLogger(__name__)

CHAMPION = "champion"
CHALLENGER = "challenger"
# fewer test images than this, that neither model saw, decide nothing: the champion stays
MIN_COMPARED_IMAGES = 20


@dataclass(frozen=True)
class PromotionDecision:
    version: str
    alias: str  # champion or challenger
    reason: str
    metric: str
    candidate_score: float
    champion_score: float | None
    previous_champion: str | None


class RegistryError(TrackingError):
    """The model registry failed at an operation (a server error, a refused request): one
    line naming the operation and the registry. Never read as "no champion yet"."""


def is_missing(exc: MlflowException) -> bool:
    """Whether the registry said "does not exist" - the only answer that means "no such
    model, version or alias". A missing alias is INVALID_PARAMETER_VALUE "... not found"."""
    code = getattr(exc, "error_code", "")
    return code == "RESOURCE_DOES_NOT_EXIST" or (
        code == "INVALID_PARAMETER_VALUE" and "not found" in str(exc)
    )


@contextmanager
def registry_call(operation: str) -> Iterator[None]:
    """Any registry error inside becomes a :class:`RegistryError` naming ``operation``."""
    try:
        yield
    except MlflowException as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        registry = redacted(mlflow.get_registry_uri())
        raise RegistryError(
            f"model registry {registry}: {operation} failed ({first[:200]}); nothing was "
            "promoted: fix the server or its permissions and run the command again"
        ) from exc


def register(model_uri: str, name: str, tags: dict[str, str], description: str) -> ModelVersion:
    """A new version of ``name`` from a logged model, with links and a description."""
    with registry_call(f"registering {model_uri} as {name}"):
        version = mlflow.register_model(model_uri, name, tags=tags)
        client = mlflow.MlflowClient()
        client.update_model_version(name, version.version, description=description)
        if not client.get_registered_model(name).description:
            client.update_registered_model(
                name,
                description="Visual quality inspection classifier trained by qi: "
                "input images, output ok/defective with a defect probability.",
            )
        return client.get_model_version(name, version.version)


def version_of_trial_run(name: str, trial_run_id: str) -> ModelVersion | None:
    """The version already registered from this trial's run, if any."""
    if not trial_run_id:
        return None
    try:
        with registry_call(f"listing the versions of {name}"):
            versions = mlflow.MlflowClient().search_model_versions(f"name = '{name}'")
    except RegistryError as exc:
        if is_missing(exc.__cause__):
            return None
        raise
    for version in versions:
        if version.tags.get(Tag.BEST_RUN_ID) == trial_run_id:
            return version
    return None


def version_of_uri(model_uri: str) -> ModelVersion | None:
    """The registered version a ``models:/NAME/VERSION`` or ``models:/NAME@ALIAS`` URI
    names; None for a run's or a logged model's URI."""
    if not model_uri.startswith("models:/"):
        return None
    path = model_uri[len("models:/") :]
    client = mlflow.MlflowClient()
    if "@" in path:
        name, alias = path.split("@", 1)
        return client.get_model_version_by_alias(name, alias)
    name, _, version = path.partition("/")
    return client.get_model_version(name, version) if version.isdigit() else None


def champion(name: str) -> ModelVersion | None:
    """The champion version; None only when the registry says there is none."""
    try:
        with registry_call(f"reading the champion of {name}"):
            return mlflow.MlflowClient().get_model_version_by_alias(name, CHAMPION)
    except RegistryError as exc:
        if is_missing(exc.__cause__):
            return None
        raise


def model_scores(model_uri: str, frame: pd.DataFrame) -> tuple[np.ndarray, float]:
    """(defect probabilities, threshold) of a registered pyfunc on raw image files."""
    model = mlflow.pyfunc.load_model(model_uri)
    payload = pd.DataFrame({IMAGE_COLUMN: [Path(p).read_bytes() for p in frame["image_path"]]})
    predictions = model.predict(payload)
    threshold = float(predictions["threshold"].iloc[0]) if len(predictions) else 0.5
    return np.asarray(predictions["defect_probability"].to_numpy(), float), threshold


def score_model(model_uri: str, frame: pd.DataFrame, metric: str) -> float:
    """``metric`` of a registered pyfunc on raw image files, at the model's own threshold."""
    if metric not in PROMOTION_METRICS:
        raise ValueError(f"unknown promotion metric '{metric}': choose one of {PROMOTION_METRICS}")
    scores, threshold = model_scores(model_uri, frame)
    labels = frame["label"].to_numpy().astype(int)
    return float(binary_metrics(labels, scores, threshold)[metric])


def _interval(low_high: tuple[float, float]) -> str:
    return f"[{low_high[0]:.4f}, {low_high[1]:.4f}]"


def decide(comparison: Comparison | None, margin: float, force: bool) -> tuple[str, str]:
    """(alias, reason) from the paired comparison with the champion (None: there is none).
    Pure, for tests.

    The candidate becomes champion only when the lower end of the 90% paired-bootstrap
    interval of (candidate - champion) lies above ``margin``: better by more than the test
    images can be wrong about, with 95% confidence.
    """
    if force:
        return CHAMPION, "promotion forced by the user"
    if comparison is None:
        return CHAMPION, "no champion yet"
    c = comparison
    figures = (
        f"{c.metric} {c.candidate:.4f} {_interval(c.candidate_interval)} vs "
        f"{c.champion:.4f} {_interval(c.champion_interval)} on {c.images} test images "
        f"neither trained or validated on; difference {_interval(c.difference_interval)}"
    )
    if c.difference_interval[0] > margin:
        return CHAMPION, f"beats the champion ({figures}, above the margin {margin:g})"
    return CHALLENGER, f"does not beat the champion by the margin {margin:g} ({figures})"


def promote(
    name: str,
    version: str,
    test_frame: pd.DataFrame,
    metric: str = "f1",
    force: bool = False,
    candidate_score: float | None = None,
    margin: float = 0.0,
) -> PromotionDecision:
    """Compare the candidate with the champion and move the aliases accordingly.

    The two are compared only on the candidate's test images (``test_frame``) that the
    champion's run neither trained nor validated on (from its recorded split), each model
    through its pyfunc at its own threshold, with a paired bootstrap (:func:`decide`). With
    fewer than :data:`MIN_COMPARED_IMAGES` such images (or one class only) the champion
    stays, unless forced. ``candidate_score``: the candidate's ``metric`` on ``test_frame``
    when the caller already has it (the study's evaluation), used where there is no
    champion to compare with.
    """
    if metric not in PROMOTION_METRICS:
        raise ValueError(f"unknown promotion metric '{metric}': choose one of {PROMOTION_METRICS}")
    client = mlflow.MlflowClient()
    current = champion(name)
    comparison, compared, basis = None, len(test_frame), "its test split"
    champion_score = None
    if current is not None and str(current.version) == str(version):
        alias, reason = CHAMPION, "already the champion"
    elif current is None:
        alias, reason = decide(None, margin, force)
    else:
        shared, recorded = unseen_by(test_frame, current.run_id)
        compared = len(shared)
        basis = (
            "test images neither model trained or validated on"
            if recorded
            else "the candidate's test split (the champion's run recorded no split: it may "
            "have trained on some of them)"
        )
        labels = shared["label"].to_numpy().astype(int)
        if compared < MIN_COMPARED_IMAGES or len(np.unique(labels)) < 2:
            alias = CHAMPION if force else CHALLENGER
            reason = (
                "promotion forced by the user"
                if force
                else f"only {compared} test images neither model trained or validated on "
                f"(needs {MIN_COMPARED_IMAGES} of both classes): the champion stays"
            )
        else:
            comparison = paired_bootstrap(
                labels,
                model_scores(f"models:/{name}/{version}", shared),
                model_scores(f"models:/{name}/{current.version}", shared),
                metric,
            )
            alias, reason = decide(comparison, margin, force)
            candidate_score, champion_score = comparison.candidate, comparison.champion
    if candidate_score is None:
        candidate_score = score_model(f"models:/{name}/{version}", test_frame, metric)
    with registry_call(f"setting {name}@{alias} to version {version}"):
        client.set_registered_model_alias(name, alias, str(version))
    decision = PromotionDecision(
        version=str(version),
        alias=alias,
        reason=reason,
        metric=metric,
        candidate_score=candidate_score,
        champion_score=champion_score,
        previous_champion=None if current is None else str(current.version),
    )
    tags = {
        Tag.PROMOTION: alias,
        Tag.PROMOTION_REASON: reason,
        Tag.PROMOTION_METRIC: f"test/{metric}",
        Tag.CANDIDATE_SCORE: f"{candidate_score:.6f}",
        Tag.CHAMPION_SCORE: "" if champion_score is None else f"{champion_score:.6f}",
        Tag.PREVIOUS_CHAMPION: decision.previous_champion or "",
        Tag.TEST_IMAGES: str(compared),
        Tag.COMPARED_ON: basis,
    }
    if comparison is not None:
        tags[Tag.DIFFERENCE_INTERVAL] = _interval(comparison.difference_interval)
        tags[Tag.PROMOTION_MARGIN] = f"{margin:g}"
    with registry_call(f"tagging {name} version {version}"):
        for key, value in tags.items():
            client.set_model_version_tag(name, str(version), key, value)
    log.info("%s version %s -> %s: %s", name, version, alias, reason)
    return decision


def model_uri_of_run(run_id: str) -> str:
    """The model a run logged (the last one, if several)."""
    models = mlflow.search_logged_models(
        filter_string=f"source_run_id = '{run_id}'",
        output_format="list",
        experiment_ids=[mlflow.MlflowClient().get_run(run_id).info.experiment_id],
    )
    if not models:
        raise ValueError(f"run {run_id} logged no model: pass a run of `qi tune` or `qi train`")
    return max(models, key=lambda m: m.creation_timestamp).model_uri


def promote_by_hand(
    name: str,
    version: str | None = None,
    run_id: str | None = None,
    data_dir: Path | None = None,
    metric: str = "f1",
    force: bool = False,
    storage: str | None = None,
    strict: bool = False,
    margin: float = 0.0,
) -> PromotionDecision:
    """``qi promote``: an existing version, or the model of a run (registered first).

    It takes the lock a study's workers take to register (:func:`qi.locks.registration_lock`
    on ``storage``), so a promotion by hand never interleaves with a study's."""
    # the same place a study on that storage (or on the default one) locks
    with registration_lock(name, storage_label(storage, mlflow.get_tracking_uri())):
        return _promote_by_hand(name, version, run_id, data_dir, metric, force, strict, margin)


def _promote_by_hand(
    name: str,
    version: str | None,
    run_id: str | None,
    data_dir: Path | None,
    metric: str,
    force: bool,
    strict: bool,
    margin: float,
) -> PromotionDecision:
    client = mlflow.MlflowClient()
    if (version is None) == (run_id is None):
        raise ValueError("give exactly one of --version or --run-id")
    if run_id is not None:
        registered = register(
            model_uri_of_run(run_id),
            name,
            tags={Tag.SOURCE_RUN_ID: run_id},
            description=f"Registered by hand from run {run_id}.",
        )
        version = str(registered.version)
    try:
        with registry_call(f"reading {name} version {version}"):
            model_version = client.get_model_version(name, str(version))
    except RegistryError as exc:
        if is_missing(exc.__cause__):
            raise ValueError(f"{name} has no version {version}") from exc
        raise
    test = run_test_files(model_version.run_id, data_dir, strict)
    return promote(name, str(version), test, metric, force, margin=margin)
