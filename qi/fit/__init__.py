"""Fitting one configuration: what ``qi train`` (:mod:`qi.train`) and every Optuna trial
(:mod:`qi.study.trials`) call.

:func:`~qi.fit.fitting.fit` takes prepared data and an MLflow run id owned by the caller,
trains with early stopping, restores the best epoch and returns the network with its
validation figures. It never starts or ends MLflow runs. The test split is scored by
:mod:`qi.evaluation`, once, at the chosen threshold and at 0.5.

- :mod:`~qi.fit.module`: the LightningModule and its per-stage metrics;
- :mod:`~qi.fit.optimizers`: optimizers by name;
- :mod:`~qi.fit.callbacks`: early stopping for studies, the attached logger, interrupts;
- :mod:`~qi.fit.precision`: mixed precision where the hardware computes it;
- :mod:`~qi.fit.fitting`: :func:`fit` itself.
"""

from qi.fit.fitting import FitResult, fit

__all__ = ["FitResult", "fit"]
