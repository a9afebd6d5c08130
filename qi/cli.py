"""The ``qi`` command line: thin click commands over the library API.

Every option can also come from an environment variable ``QI_<COMMAND>_<OPTION>`` (e.g.
``QI_TRAIN_EPOCHS=5``). User-fixable problems end as one line on stderr and exit code 2 or 1,
never a traceback.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings
from dataclasses import replace
from functools import wraps
from pathlib import Path

import click
from mlflow.exceptions import MlflowException

import qi
from qi.config import (
    DataConfig,
    EvaluationConfig,
    ModelConfig,
    RunConfig,
    SynthConfig,
    TrackingConfig,
    TrainConfig,
    TuneConfig,
)
from qi.evaluation import PROMOTION_METRICS

log = logging.getLogger("qi")


def _user_errors(func):
    """Turn the library's user-fixable errors into one-line click errors."""

    @wraps(func)
    def wrapper(*args, **kwargs):
        from qi.data.discovery import DataLayoutError
        from qi.data.preprocessing import ImageDecodeError
        from qi.models.backbones import WeightsNotFoundError
        from qi.tracking import TrackingError

        try:
            return func(*args, **kwargs)
        except (DataLayoutError, ImageDecodeError, WeightsNotFoundError, TrackingError) as exc:
            raise click.ClickException(str(exc)) from exc
        except KeyboardInterrupt:
            click.echo("interrupted: finished runs are kept in MLflow", err=True)
            sys.exit(130)

    return wrapper


class WholeNumber(click.ParamType):
    """An integer that also accepts MLproject's float rendering ("15.0") and "" for unset."""

    name = "integer"

    def convert(self, value, param, ctx):
        if value is None or isinstance(value, int):
            return value
        text = str(value).strip()
        if text == "":
            return None
        try:
            number = float(text)
        except ValueError:
            self.fail(f"{value!r} is not a whole number", param, ctx)
        if not number.is_integer():
            self.fail(f"{value!r} is not a whole number", param, ctx)
        return int(number)


INT = WholeNumber()


def _positive(ctx, param, value):
    if value is not None and value <= 0:
        raise click.BadParameter(f"must be positive, got {value}")
    return value


def _fraction(ctx, param, value):
    if value is not None and not 0 <= value < 1:
        raise click.BadParameter(f"must be in [0, 1), got {value}")
    return value


def _empty_as_none(ctx, param, value):
    """MLproject passes unset string parameters as ''."""
    return None if value in ("", None) else value


def data_options(func=None, *, search_image_size: bool = False):
    """Options that say which images and how to read them (shared by train and tune)."""
    if func is None:
        return lambda f: data_options(f, search_image_size=search_image_size)
    defaults = DataConfig()
    options = [
        click.option(
            "--data-dir",
            default=None,
            callback=_empty_as_none,
            help="Folder of labelled images (class folders, Kaggle train/test, or an "
            "MVTec AD category). Default: the embedded synthetic casting set.",
        ),
        click.option(
            "--ok-class",
            default=None,
            callback=_empty_as_none,
            help="Folder name of the good class (default: detected from good, ok, "
            "ok_front, pass, normal).",
        ),
        click.option(
            "--image-size",
            type=INT,
            default=None if search_image_size else defaults.image_size,
            show_default=not search_image_size,
            callback=_positive,
            help="Fix the image size (default: search the space's sizes)."
            if search_image_size
            else "Images are resized to this square size.",
        ),
        click.option(
            "--color-mode",
            type=click.Choice(["gray", "rgb"]),
            default=defaults.color_mode,
            show_default=True,
        ),
        click.option(
            "--clahe/--no-clahe",
            default=defaults.clahe,
            show_default=True,
            help="Contrast-limited histogram equalisation (uneven lighting).",
        ),
        click.option(
            "--augment-strength",
            type=float,
            default=defaults.augment_strength,
            show_default=True,
            help="0 disables augmentation, 1 is strong.",
        ),
        click.option(
            "--batch-size",
            type=INT,
            default=defaults.batch_size,
            show_default=True,
            callback=_positive,
        ),
        click.option(
            "--val-fraction",
            type=float,
            default=defaults.val_fraction,
            show_default=True,
            callback=_fraction,
        ),
        click.option(
            "--test-fraction",
            type=float,
            default=defaults.test_fraction,
            show_default=True,
            callback=_fraction,
            help="Held-out share when the layout has no test folder.",
        ),
        click.option(
            "--max-images",
            type=INT,
            default=None,
            callback=_positive,
            help="Stratified subsample for quick runs.",
        ),
        click.option(
            "--bad-images",
            type=click.Choice(["skip", "strict"]),
            default=defaults.bad_images,
            show_default=True,
            help="skip: leave unreadable files out and list them; strict: stop.",
        ),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def model_options(func):
    defaults = ModelConfig()
    from qi.models import model_names

    options = [
        click.option(
            "--model",
            "model_name",
            type=click.Choice(model_names()),
            default=defaults.name,
            show_default=True,
            help="Network architecture.",
        ),
        click.option(
            "--depth",
            type=INT,
            default=defaults.depth,
            show_default=True,
            callback=_positive,
            help="CNN blocks.",
        ),
        click.option(
            "--width",
            type=INT,
            default=defaults.width,
            show_default=True,
            callback=_positive,
            help="CNN channels of the first block.",
        ),
        click.option(
            "--activation",
            type=click.Choice(["relu", "gelu", "silu", "leaky_relu", "elu"]),
            default=defaults.activation,
            show_default=True,
        ),
        click.option(
            "--dropout", type=float, default=defaults.dropout, show_default=True, callback=_fraction
        ),
        click.option(
            "--pretrained",
            default=None,
            callback=_empty_as_none,
            help="Backbones: 'imagenet' (from torch's hub cache, never downloaded) "
            "or a weights file.",
        ),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def evaluation_options(func):
    options = [
        click.option(
            "--target-recall",
            type=float,
            default=EvaluationConfig.target_recall,
            show_default=True,
            callback=_recall,
            help="Defect recall the threshold must reach on the validation split.",
        ),
        click.option(
            "--promotion-metric",
            type=click.Choice(PROMOTION_METRICS),
            default=EvaluationConfig.promotion_metric,
            show_default=True,
            help="Test metric a new version must beat to become champion.",
        ),
        click.option(
            "--register/--no-register",
            default=EvaluationConfig.register,
            show_default=True,
            help="Register the best model.",
        ),
        click.option(
            "--force-promote",
            is_flag=True,
            default=False,
            help="Make the new version champion whatever the comparison says.",
        ),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def _recall(ctx, param, value):
    if value is not None and not 0 < value <= 1:
        raise click.BadParameter(f"must be in (0, 1], got {value}")
    return value


def _evaluation_config(options: dict) -> EvaluationConfig:
    return EvaluationConfig(
        target_recall=options.get("target_recall", EvaluationConfig.target_recall),
        promotion_metric=options.get("promotion_metric", EvaluationConfig.promotion_metric),
        register=options.get("register", EvaluationConfig.register),
        force_promote=options.get("force_promote", False),
    )


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(qi.__version__, prog_name="qi")
@click.option("-v", "--verbose", count=True, help="More log output (-vv for debug).")
def cli(verbose: int) -> None:
    """qi: tuned, tracked, registered classifiers for visual quality inspection."""
    logging.basicConfig(
        level=logging.DEBUG if verbose > 1 else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    logging.getLogger("qi").setLevel(logging.DEBUG if verbose else logging.INFO)
    # Lightning adds its own handler; one copy of each message is enough
    logging.getLogger("lightning.pytorch").propagate = False
    warnings.filterwarnings("ignore", ".*LeafSpec.*")  # Lightning internals on torch 2.14


@cli.group()
def data() -> None:
    """Data sets: generate the embedded casting set."""


@data.command("synth")
@click.argument("out", type=click.Path(path_type=Path))
@click.option(
    "--n-train", type=INT, default=SynthConfig.n_train, show_default=True, callback=_positive
)
@click.option(
    "--n-test", type=INT, default=SynthConfig.n_test, show_default=True, callback=_positive
)
@click.option(
    "--image-size", type=INT, default=SynthConfig.image_size, show_default=True, callback=_positive
)
@click.option(
    "--defect-fraction",
    type=float,
    default=SynthConfig.defect_fraction,
    show_default=True,
    callback=_fraction,
)
@click.option("--seed", type=INT, default=SynthConfig.seed, show_default=True)
def data_synth(
    out: Path, n_train: int, n_test: int, image_size: int, defect_fraction: float, seed: int
) -> None:
    """Write the synthetic casting data set (Kaggle casting layout) to OUT."""
    from qi.data import synth

    if out.exists() and any(out.iterdir()):
        raise click.ClickException(f"{out} is not empty: choose a new folder")
    config = SynthConfig(
        n_train=n_train,
        n_test=n_test,
        image_size=image_size,
        defect_fraction=defect_fraction,
        seed=seed,
    )
    synth.generate(out, config)
    click.echo(f"wrote {n_train + n_test} images to {out}")


@cli.command()
@data_options
@model_options
@click.option(
    "--epochs", type=INT, default=TrainConfig.epochs, show_default=True, callback=_positive
)
@click.option(
    "--optimizer",
    type=click.Choice(["adamw", "adam", "sgd"]),
    default=TrainConfig.optimizer,
    show_default=True,
)
@click.option(
    "--learning-rate",
    type=float,
    default=TrainConfig.learning_rate,
    show_default=True,
    callback=_positive,
)
@click.option("--weight-decay", type=float, default=TrainConfig.weight_decay, show_default=True)
@click.option(
    "--patience",
    type=INT,
    default=TrainConfig.early_stopping_patience,
    show_default=True,
    callback=_positive,
    help="Early-stopping patience in epochs.",
)
@click.option(
    "--accelerator",
    default=TrainConfig.accelerator,
    show_default=True,
    help="auto uses a GPU when there is one.",
)
@click.option("--seed", type=INT, default=TrainConfig.seed, show_default=True)
@click.option(
    "--experiment",
    default=TrackingConfig.experiment,
    show_default=True,
    help="MLflow experiment (under `mlflow run`, the run's own).",
)
@click.option("--run-name", default=None, callback=_empty_as_none)
@click.option(
    "--tracking-uri",
    default=None,
    callback=_empty_as_none,
    help="Default: MLFLOW_TRACKING_URI, else sqlite:///mlflow.db here.",
)
@click.option("--progress/--no-progress", default=True, help="Progress bars.")
@click.option(
    "--target-recall",
    type=float,
    default=EvaluationConfig.target_recall,
    show_default=True,
    callback=_recall,
    help="Defect recall the threshold must reach on the validation split.",
)
@_user_errors
def train(**options) -> None:
    """Train one model and log it as an MLflow run."""
    from qi.train import train as run_train

    if not options["progress"]:
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")

    config = build_run_config(options)
    outcome = run_train(config, progress=options["progress"])
    click.echo(
        f"run {outcome.run_id}: {outcome.result.epochs_run} epochs, {outcome.result.seconds:.0f} s"
    )
    if outcome.evaluation is not None:
        click.echo(describe_evaluation(outcome.evaluation))
    if outcome.model_uri:
        click.echo(f"model: {outcome.model_uri}")


@cli.command()
@data_options(search_image_size=True)
@click.option(
    "--n-trials",
    type=INT,
    default=TuneConfig.n_trials,
    show_default=True,
    callback=_positive,
    help="Finished trials the study should have (a resumed study counts its own).",
)
@click.option(
    "--timeout",
    type=float,
    default=TuneConfig.timeout,
    show_default=True,
    help="Seconds for this worker; running trials stop at the deadline. 0: none.",
)
@click.option(
    "--epochs",
    type=INT,
    default=TuneConfig.epochs,
    show_default=True,
    callback=_positive,
    help="Epochs per trial.",
)
@click.option(
    "--study-name",
    default=TuneConfig.study_name,
    show_default=True,
    help="Same name + same storage = the same study (resume, or parallel workers).",
)
@click.option(
    "--storage",
    default=None,
    callback=_empty_as_none,
    help="Optuna storage: a database URL (postgresql://, mysql://, sqlite://) or a "
    "journal file. Default: optuna-studies.journal next to the tracking store.",
)
@click.option(
    "--model-name",
    default=TuneConfig.model_name,
    show_default=True,
    help="Registry name for the best model.",
)
@click.option(
    "--metric",
    default=TuneConfig.metric,
    show_default=True,
    help="Validation metric to optimise: val/f1, val/auroc, val/acc, "
    "val/defect_recall, val/precision or val/loss.",
)
@click.option(
    "--sampler", type=click.Choice(["tpe", "random"]), default=TuneConfig.sampler, show_default=True
)
@click.option(
    "--pruner",
    type=click.Choice(["median", "hyperband", "successive_halving", "none"]),
    default=TuneConfig.pruner,
    show_default=True,
)
@click.option(
    "--models",
    default=None,
    callback=_empty_as_none,
    help="Comma-separated architectures to search (default: cnn).",
)
@click.option(
    "--search-space",
    default=None,
    callback=_empty_as_none,
    help="JSON file overriding search-space ranges and choices.",
)
@click.option(
    "--pretrained",
    default=None,
    callback=_empty_as_none,
    help="For backbones: 'imagenet' (torch's hub cache) or a weights file.",
)
@click.option(
    "--enqueue",
    default=None,
    callback=_empty_as_none,
    help='Trials to run first, as JSON (inline or a file): {"model.width": 24, ...} or a list.',
)
@click.option("--seed", type=INT, default=TuneConfig.seed, show_default=True)
@click.option("--experiment", default=TrackingConfig.experiment, show_default=True)
@click.option("--run-name", default=None, callback=_empty_as_none)
@click.option("--tracking-uri", default=None, callback=_empty_as_none)
@click.option("--progress/--no-progress", default=True, help="Progress bars.")
@evaluation_options
@_user_errors
def tune(**options) -> None:
    """Run an Optuna study; every trial is a nested MLflow run."""
    from qi.tuning import tune as run_tune

    if not options["progress"]:
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")

    base, tune_config = build_tune_config(options)
    outcome = run_tune(base, tune_config, progress=options["progress"])
    study = outcome.study
    click.echo(
        f"study {study.study_name}: {len(study.trials)} trials, parent run {outcome.parent_run_id}"
    )
    if outcome.best_trial is not None:
        click.echo(
            f"best trial {outcome.best_trial.number}: {tune_config.metric} "
            f"{outcome.best_trial.value:.4f}"
        )
        click.echo(describe_evaluation(outcome.evaluation))
        click.echo(f"model: {outcome.model_uri}")
    if outcome.decision is not None:
        d = outcome.decision
        click.echo(
            f"registered {tune_config.model_name} version {d.version} as {d.alias}: {d.reason}"
        )


def describe_evaluation(evaluation) -> str:
    m, h = evaluation.metrics, evaluation.metrics_at_half
    return (
        f"test at threshold {evaluation.threshold:.3f}: accuracy {m['acc']:.4f}, "
        f"F1 {m['f1']:.4f}, defect recall {m['defect_recall']:.4f}, ROC AUC {m['auroc']:.4f}"
        f" (at 0.5: accuracy {h['acc']:.4f}, defect recall {h['defect_recall']:.4f})"
    )


@cli.command()
@click.option(
    "--model",
    "model_uri",
    required=True,
    help="models:/NAME@champion, models:/NAME/3, models:/m-<id> or runs:/<id>/model.",
)
@click.option(
    "--data-dir",
    default=None,
    callback=_empty_as_none,
    help="Images to evaluate on (their test split). Default: the embedded set.",
)
@click.option("--ok-class", default=None, callback=_empty_as_none)
@click.option(
    "--seed",
    type=INT,
    default=DataConfig.seed,
    show_default=True,
    help="Split seed: use the training run's to evaluate on its test split.",
)
@click.option("--experiment", default=TrackingConfig.experiment, show_default=True)
@click.option("--tracking-uri", default=None, callback=_empty_as_none)
@click.option("--progress/--no-progress", default=True)
@_user_errors
def evaluate(model_uri, data_dir, ok_class, seed, experiment, tracking_uri, progress) -> None:
    """Evaluate a logged model on a data set's test split and log the report as a run."""
    from qi.evaluation_report import evaluate_logged_model

    data = DataConfig(data_dir=Path(data_dir) if data_dir else None, ok_class=ok_class, seed=seed)
    tracking = TrackingConfig(tracking_uri=tracking_uri, experiment=experiment)
    try:
        run_id, evaluation = evaluate_logged_model(model_uri, data, tracking, progress)
    except MlflowException as exc:
        raise click.ClickException(f"cannot load {model_uri}: {str(exc).splitlines()[0]}") from exc
    click.echo(f"run {run_id}: {describe_evaluation(evaluation)}")


@cli.command()
@click.option("--model-name", default=TuneConfig.model_name, show_default=True)
@click.option("--version", default=None, help="Registered version to promote.")
@click.option("--run-id", default=None, help="Register this run's model, then promote it.")
@click.option(
    "--metric",
    type=click.Choice(PROMOTION_METRICS),
    default=EvaluationConfig.promotion_metric,
    show_default=True,
)
@click.option("--force", is_flag=True, help="Make it champion without comparing.")
@click.option(
    "--data-dir",
    default=None,
    callback=_empty_as_none,
    help="Test images for the comparison (default: the version's own data).",
)
@click.option("--tracking-uri", default=None, callback=_empty_as_none)
@_user_errors
def promote(model_name, version, run_id, metric, force, data_dir, tracking_uri) -> None:
    """Compare a version with the champion and move the champion/challenger aliases."""
    from qi.registry import promote_by_hand
    from qi.tracking import configure_tracking

    configure_tracking(TrackingConfig(tracking_uri=tracking_uri))
    try:
        decision = promote_by_hand(
            model_name,
            version=version,
            run_id=run_id,
            data_dir=Path(data_dir) if data_dir else None,
            metric=metric,
            force=force,
        )
    except (ValueError, MlflowException) as exc:
        raise click.ClickException(str(exc).splitlines()[0]) from exc
    click.echo(f"{model_name} version {decision.version} is {decision.alias}: {decision.reason}")


def build_tune_config(options: dict) -> tuple[RunConfig, TuneConfig]:
    from qi.study_setup import load_search_space

    try:
        search_space = options["search_space"]
        space = load_search_space(Path(search_space) if search_space else None)
        if options["models"]:
            space = replace(space, models=tuple(m.strip() for m in options["models"].split(",")))
        if options["image_size"]:
            space = replace(space, image_sizes=(options["image_size"],))
        from qi.study_setup import check_search_space, parse_enqueue
        from qi.training import validate_metric

        check_search_space(space)
        validate_metric(options["metric"])
        enqueue = parse_enqueue(options["enqueue"])
    except ValueError as exc:
        raise click.UsageError(str(exc)) from exc
    timeout = options["timeout"] if options["timeout"] else None
    tune_config = TuneConfig(
        study_name=options["study_name"],
        storage=options["storage"],
        n_trials=options["n_trials"],
        timeout=timeout,
        epochs=options["epochs"],
        metric=options["metric"],
        sampler=options["sampler"],
        pruner=options["pruner"],
        seed=options["seed"],
        model_name=options["model_name"],
        space=space,
        enqueue=enqueue,
    )
    data = DataConfig(
        data_dir=Path(options["data_dir"]) if options["data_dir"] else None,
        ok_class=options["ok_class"],
        image_size=options["image_size"] or DataConfig.image_size,
        color_mode=options["color_mode"],
        clahe=options["clahe"],
        augment_strength=options["augment_strength"],
        batch_size=options["batch_size"],
        val_fraction=options["val_fraction"],
        test_fraction=options["test_fraction"],
        max_images=options["max_images"],
        bad_images=options["bad_images"],
        seed=options["seed"],
    )
    base = RunConfig(
        evaluation=_evaluation_config(options),
        data=data,
        model=ModelConfig(pretrained=options["pretrained"]),
        train=TrainConfig(seed=options["seed"]),
        tracking=TrackingConfig(
            tracking_uri=options["tracking_uri"],
            experiment=options["experiment"],
            run_name=options["run_name"],
        ),
    )
    return base, tune_config


def build_run_config(options: dict) -> RunConfig:
    """CLI options -> RunConfig (also used by tests of the CLI mapping)."""
    data = DataConfig(
        data_dir=Path(options["data_dir"]) if options["data_dir"] else None,
        ok_class=options["ok_class"],
        image_size=options["image_size"],
        color_mode=options["color_mode"],
        clahe=options["clahe"],
        augment_strength=options["augment_strength"],
        batch_size=options["batch_size"],
        val_fraction=options["val_fraction"],
        test_fraction=options["test_fraction"],
        max_images=options["max_images"],
        bad_images=options["bad_images"],
        seed=options["seed"],
    )
    model = ModelConfig(
        name=options["model_name"],
        depth=options["depth"],
        width=options["width"],
        activation=options["activation"],
        dropout=options["dropout"],
        pretrained=options["pretrained"],
    )
    train_config = TrainConfig(
        epochs=options["epochs"],
        optimizer=options["optimizer"],
        learning_rate=options["learning_rate"],
        weight_decay=options["weight_decay"],
        early_stopping_patience=options["patience"],
        accelerator=options["accelerator"],
        seed=options["seed"],
    )
    tracking = TrackingConfig(
        tracking_uri=options["tracking_uri"],
        experiment=options["experiment"],
        run_name=options["run_name"],
    )
    return RunConfig(
        data=data,
        model=model,
        train=train_config,
        tracking=tracking,
        evaluation=_evaluation_config(options),
    )


def main() -> None:
    cli(auto_envvar_prefix="QI")


if __name__ == "__main__":
    main()
