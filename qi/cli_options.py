"""Shared click pieces for ``qi``: option types, validators, option groups, and the mapping
from parsed options to the typed config dataclasses."""

from __future__ import annotations

import signal
import sys
from dataclasses import replace
from functools import wraps
from pathlib import Path

import click

from qi.config import (
    PROMOTION_METRICS,
    DataConfig,
    EvaluationConfig,
    ModelConfig,
    RunConfig,
    TrackingConfig,
    TrainConfig,
    TuneConfig,
)


def user_errors(func):
    """Turn the library's user-fixable errors into one-line click errors; make SIGTERM
    (``docker stop``, a scheduler) stop a command the way Ctrl-C does."""

    @wraps(func)
    def wrapper(*args, **kwargs):
        from qi.data.discovery import DataLayoutError
        from qi.data.preprocessing import ImageDecodeError
        from qi.models.backbones import WeightsNotFoundError
        from qi.tracking import TrackingError

        previous = signal.signal(signal.SIGTERM, _interrupt)
        try:
            return func(*args, **kwargs)
        except (DataLayoutError, ImageDecodeError, WeightsNotFoundError, TrackingError) as exc:
            raise click.ClickException(str(exc)) from exc
        except KeyboardInterrupt:
            click.echo(
                "interrupted: finished trials and runs are kept; run the same command "
                "again to resume",
                err=True,
            )
            sys.exit(130)
        finally:
            signal.signal(signal.SIGTERM, previous)

    return wrapper


def _interrupt(signum, frame):
    raise KeyboardInterrupt


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


def positive(ctx, param, value):
    if value is not None and value <= 0:
        raise click.BadParameter(f"must be positive, got {value}")
    return value


def fraction(ctx, param, value):
    if value is not None and not 0 <= value < 1:
        raise click.BadParameter(f"must be in [0, 1), got {value}")
    return value


def empty_as_none(ctx, param, value):
    """MLproject passes unset string parameters as ''."""
    return None if value in ("", None) else value


def existing_dir(ctx, param, value):
    """An optional folder that must exist: a typo fails before anything starts (exit 2)."""
    value = empty_as_none(ctx, param, value)
    if value is not None:
        path = Path(value).expanduser()
        if not path.exists():
            raise click.BadParameter(f"{path} does not exist: check the path")
        if not path.is_dir():
            raise click.BadParameter(f"{path} is a file: give the folder holding the images")
    return value


def data_options(func=None, *, search_image_size: bool = False):
    """Options that say which images and how to read them (shared by train and tune)."""
    if func is None:
        return lambda f: data_options(f, search_image_size=search_image_size)
    defaults = DataConfig()
    options = [
        click.option(
            "--data-dir",
            default=None,
            callback=existing_dir,
            help="Folder of labelled images (class folders, Kaggle train/test, or an "
            "MVTec AD category). Default: the embedded synthetic casting set.",
        ),
        click.option(
            "--ok-class",
            default=None,
            callback=empty_as_none,
            help="Folder name of the good class (default: detected from good, ok, "
            "ok_front, pass, normal).",
        ),
        click.option(
            "--image-size",
            type=INT,
            default=None if search_image_size else defaults.image_size,
            show_default=not search_image_size,
            callback=positive,
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
            callback=positive,
        ),
        click.option(
            "--val-fraction",
            type=float,
            default=defaults.val_fraction,
            show_default=True,
            callback=fraction,
        ),
        click.option(
            "--test-fraction",
            type=float,
            default=defaults.test_fraction,
            show_default=True,
            callback=fraction,
            help="Held-out share when the layout has no test folder.",
        ),
        click.option(
            "--max-images",
            type=INT,
            default=None,
            callback=positive,
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
            callback=positive,
            help="CNN blocks.",
        ),
        click.option(
            "--width",
            type=INT,
            default=defaults.width,
            show_default=True,
            callback=positive,
            help="CNN channels of the first block.",
        ),
        click.option(
            "--activation",
            type=click.Choice(["relu", "gelu", "silu", "leaky_relu", "elu"]),
            default=defaults.activation,
            show_default=True,
        ),
        click.option(
            "--dropout", type=float, default=defaults.dropout, show_default=True, callback=fraction
        ),
        click.option(
            "--pretrained",
            default=None,
            callback=empty_as_none,
            help="Backbones: 'imagenet' (from torch's hub cache, never downloaded) "
            "or a weights file.",
        ),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def tracking_options(func):
    """Where a run goes and how it shows progress (train and tune)."""
    options = [
        click.option(
            "--experiment",
            default=TrackingConfig.experiment,
            show_default=True,
            help="MLflow experiment (under `mlflow run`, the run's own).",
        ),
        click.option("--run-name", default=None, callback=empty_as_none),
        click.option(
            "--tracking-uri",
            default=None,
            callback=empty_as_none,
            help="Default: MLFLOW_TRACKING_URI, else sqlite:///mlflow.db here.",
        ),
        click.option("--progress/--no-progress", default=True, help="Progress bars."),
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
            callback=recall,
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


def recall(ctx, param, value):
    if value is not None and not 0 < value <= 1:
        raise click.BadParameter(f"must be in (0, 1], got {value}")
    return value


def evaluation_config(options: dict) -> EvaluationConfig:
    return EvaluationConfig(
        target_recall=options.get("target_recall", EvaluationConfig.target_recall),
        promotion_metric=options.get("promotion_metric", EvaluationConfig.promotion_metric),
        register=options.get("register", EvaluationConfig.register),
        force_promote=options.get("force_promote", False),
    )


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
    base = RunConfig(
        data=_data_config(options),
        model=ModelConfig(pretrained=options["pretrained"]),
        train=TrainConfig(seed=options["seed"], precision=options["precision"]),
        tracking=_tracking_config(options),
        evaluation=evaluation_config(options),
    )
    return base, tune_config


def build_run_config(options: dict) -> RunConfig:
    """CLI options -> RunConfig (also used by tests of the CLI mapping)."""
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
        precision=options["precision"],
        seed=options["seed"],
    )
    return RunConfig(
        data=_data_config(options),
        model=model,
        train=train_config,
        tracking=_tracking_config(options),
        evaluation=evaluation_config(options),
    )


def _data_config(options: dict) -> DataConfig:
    """The data options shared by train and tune (tune may leave the image size unset)."""
    return DataConfig(
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


def _tracking_config(options: dict) -> TrackingConfig:
    return TrackingConfig(
        tracking_uri=options["tracking_uri"],
        experiment=options["experiment"],
        run_name=options["run_name"],
    )
