"""Samplers and pruners by name; the config's choices are :data:`qi.choices.SAMPLERS` and
:data:`qi.choices.PRUNERS`."""

from __future__ import annotations

import warnings

import optuna


def _tpe(seed: int) -> optuna.samplers.BaseSampler:
    # few startup trials: default budgets are tens of trials, not hundreds; group: the space
    # is conditional (CNN and backbone parameters never appear together)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna.samplers.TPESampler(
            seed=seed, n_startup_trials=5, multivariate=True, group=True
        )


def _random(seed: int) -> optuna.samplers.BaseSampler:
    return optuna.samplers.RandomSampler(seed=seed)


# name -> builder(seed), keyed by qi.choices.SAMPLERS
SAMPLERS = {"tpe": _tpe, "random": _random}


def _median(epochs: int) -> optuna.pruners.BasePruner:
    # early validation F1 swings widely: judge a trial only in its second half
    return optuna.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=epochs // 2)


def _hyperband(epochs: int) -> optuna.pruners.BasePruner:
    return optuna.pruners.HyperbandPruner(min_resource=1, max_resource=epochs)


def _successive_halving(epochs: int) -> optuna.pruners.BasePruner:
    return optuna.pruners.SuccessiveHalvingPruner(min_resource=1)  # rungs need no length


def _no_pruning(epochs: int) -> optuna.pruners.BasePruner:
    return optuna.pruners.NopPruner()


# name -> builder(epochs per trial), keyed by qi.choices.PRUNERS
PRUNERS = {
    "median": _median,
    "hyperband": _hyperband,
    "successive_halving": _successive_halving,
    "none": _no_pruning,
}


def build_sampler(name: str, seed: int) -> optuna.samplers.BaseSampler:
    return SAMPLERS[name](seed)


def build_pruner(name: str, epochs: int) -> optuna.pruners.BasePruner:
    return PRUNERS[name](epochs)
