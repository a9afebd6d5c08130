"""After the trials: an ensemble of the best ones, kept only when validation says it is better.

Greedy forward selection with replacement (Caruana et al. 2004, "Ensemble selection from
libraries of models"): start from the trial whose validation log loss is lowest, then add, one
at a time and possibly again, the trial whose addition lowers the averaged probabilities' log
loss most; the best prefix is the ensemble, each trial weighted by how often it was picked.
It is kept only when its validation log loss beats the best single trial's by
:data:`MIN_GAIN`, with at least two distinct members; otherwise the study keeps its best trial.

Candidates are the best complete trials (``--ensemble-candidates``) that share the best
trial's preprocessing (one decode serves every member), its defect types and its split (their
validation images are the same). Heads on a frozen encoder score validation from the feature
cache their fit filled, so selection costs seconds; in the served model they share one encoder
pass (:class:`~qi.models.ensemble.EnsembleNet`).
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, replace

import numpy as np
import optuna
from optuna.trial import TrialState
from sklearn.metrics import log_loss

from qi.data.datamodule import PreparedData
from qi.evaluation.scoring import validation_probabilities
from qi.inference import EnsembleMember, ModelSpec, build_ensemble
from qi.models.ensemble import EnsembleNet
from qi.study.trials import load_trial_network
from qi.tags import TrialAttr

log = logging.getLogger(__name__)

ROUNDS = 20  # picks at most; the best prefix is kept
MIN_GAIN = 0.002  # validation log loss an ensemble must save over the best single trial
EPSILON = 1e-6


def clipped_log_loss(labels: np.ndarray, probabilities: np.ndarray) -> float:
    return float(log_loss(labels, np.clip(probabilities, EPSILON, 1 - EPSILON), labels=[0, 1]))


def forward_selection(
    labels: np.ndarray, candidates: Mapping[int, np.ndarray], rounds: int = ROUNDS
) -> tuple[Counter, float]:
    """Caruana's greedy selection with replacement over ``candidates`` (key -> validation
    probabilities): (picks per key, log loss of their weighted average). Ties go to the
    first key."""
    keys = list(candidates)
    picks: Counter = Counter()
    total = np.zeros(len(labels))
    best: tuple[float, Counter] = (float("inf"), Counter())
    for step in range(1, rounds + 1):
        losses = [clipped_log_loss(labels, (total + candidates[k]) / step) for k in keys]
        choice = keys[int(np.argmin(losses))]
        picks[choice] += 1
        total = total + candidates[choice]
        if min(losses) < best[0] - 1e-12:
            best = (min(losses), Counter(picks))
    return best[1], best[0]


@dataclass(frozen=True)
class EnsembleChoice:
    """What the selection decided, for the parent run and the registry description."""

    members: dict[int, float]  # trial number -> weight (empty: the best trial stays alone)
    ensemble_loss: float
    best_single_loss: float  # the lowest validation log loss of any one candidate
    candidates: int

    @property
    def kept(self) -> bool:
        return bool(self.members)

    def describe(self) -> str:
        if not self.kept:
            return (
                f"the best trial alone: no ensemble of the {self.candidates} best trials "
                f"lowered the validation log loss of the best single one "
                f"({self.best_single_loss:.4f}) by {MIN_GAIN}"
            )
        parts = ", ".join(f"trial {n} ({w:.2f})" for n, w in self.members.items())
        return (
            f"an ensemble of {len(self.members)} trials, {parts}: validation log loss "
            f"{self.ensemble_loss:.4f}, the best single trial's {self.best_single_loss:.4f}"
        )


def same_data_trials(
    ranked: list[optuna.trial.FrozenTrial], best: optuna.trial.FrozenTrial
) -> list[optuna.trial.FrozenTrial]:
    """Of ``ranked`` complete trials, the classifiers trained on the best trial's data."""
    digest = best.user_attrs.get(TrialAttr.DATA_DIGEST)
    return [
        t
        for t in ranked
        if t.state == TrialState.COMPLETE
        and t.user_attrs.get(TrialAttr.DATA_DIGEST) == digest
        and t.user_attrs.get(TrialAttr.METHOD, "classifier") == "classifier"
    ]


def select_ensemble(
    candidates: list[optuna.trial.FrozenTrial], best_spec: ModelSpec, data: PreparedData
) -> tuple[EnsembleNet | None, ModelSpec | None, EnsembleChoice]:
    """The ensemble of ``candidates`` (the study's best trials, best first), or
    ``(None, None, choice)`` when it does not beat the best of them on validation (see the
    module docstring). ``data`` is the best trial's."""
    nets, specs, probabilities = {}, {}, {}
    val_images, val_labels = data.split("val")
    for trial in candidates:
        net, spec = load_trial_network(trial)
        if spec.preprocess != best_spec.preprocess or spec.defect_types != best_spec.defect_types:
            continue
        nets[trial.number], specs[trial.number] = net, spec
        probabilities[trial.number] = validation_probabilities(net, val_images)
    single = {n: clipped_log_loss(val_labels, p) for n, p in probabilities.items()}
    best_single = min(single.values()) if single else float("inf")
    no = EnsembleChoice({}, best_single, best_single, len(probabilities))
    if len(probabilities) < 2 or len(np.unique(val_labels)) < 2:
        return None, None, no
    ordered = dict(sorted(probabilities.items(), key=lambda item: single[item[0]]))
    picks, loss = forward_selection(val_labels, ordered)
    if len(picks) < 2 or loss > best_single - MIN_GAIN:
        return None, None, replace(no, ensemble_loss=loss)
    total = sum(picks.values())
    weights = {number: count / total for number, count in picks.most_common()}
    members = tuple(EnsembleMember(specs[n], w) for n, w in weights.items())
    spec = replace(best_spec, model=members[0].spec.model, ensemble=members)
    ensemble = build_ensemble(spec, [nets[n] for n in weights])
    choice = EnsembleChoice(weights, loss, best_single, len(probabilities))
    log.info("%s", choice.describe())
    return ensemble, spec, choice
