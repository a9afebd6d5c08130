"""The ``qi`` command line: thin click commands over the library API.

Every option can also come from an environment variable ``QI_<COMMAND>_<OPTION>`` (e.g.
``QI_TRAIN_EPOCHS=5``). User-fixable problems end as one line on stderr and exit code 2 or 1,
never a traceback.
"""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path

import click
from mlflow.exceptions import MlflowException

import qi
from qi.cli_options import (
    INT,
    build_run_config,
    build_tune_config,
    data_options,
    empty_as_none,
    evaluation_options,
    existing_dir,
    fraction,
    model_options,
    positive,
    recall,
    tracking_options,
    user_errors,
)
from qi.config import (
    PROMOTION_METRICS,
    DataConfig,
    EvaluationConfig,
    SynthConfig,
    TrackingConfig,
    TrainConfig,
    TuneConfig,
)
from qi.data.discovery import IMAGE_EXTENSIONS

log = logging.getLogger("qi")


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
    "--n-train", type=INT, default=SynthConfig.n_train, show_default=True, callback=positive
)
@click.option(
    "--n-test", type=INT, default=SynthConfig.n_test, show_default=True, callback=positive
)
@click.option(
    "--image-size", type=INT, default=SynthConfig.image_size, show_default=True, callback=positive
)
@click.option(
    "--defect-fraction",
    type=float,
    default=SynthConfig.defect_fraction,
    show_default=True,
    callback=fraction,
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
    "--epochs", type=INT, default=TrainConfig.epochs, show_default=True, callback=positive
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
    callback=positive,
)
@click.option("--weight-decay", type=float, default=TrainConfig.weight_decay, show_default=True)
@click.option(
    "--patience",
    type=INT,
    default=TrainConfig.early_stopping_patience,
    show_default=True,
    callback=positive,
    help="Early-stopping patience in epochs.",
)
@click.option(
    "--accelerator",
    default=TrainConfig.accelerator,
    show_default=True,
    help="auto uses a GPU when there is one.",
)
@click.option(
    "--precision",
    default=None,
    callback=empty_as_none,
    help="Lightning precision (32-true, bf16-mixed, 16-mixed). Default: bf16-mixed where the "
    "GPU or CPU computes bf16 natively, else 16-mixed on GPUs and 32-true on CPUs.",
)
@click.option("--seed", type=INT, default=TrainConfig.seed, show_default=True)
@tracking_options
@click.option(
    "--target-recall",
    type=float,
    default=EvaluationConfig.target_recall,
    show_default=True,
    callback=recall,
    help="Defect recall the threshold must reach on the validation split.",
)
@user_errors
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
    callback=positive,
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
    callback=positive,
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
    callback=empty_as_none,
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
    callback=empty_as_none,
    help="Comma-separated architectures to search (default: cnn).",
)
@click.option(
    "--search-space",
    default=None,
    callback=empty_as_none,
    help="JSON file overriding search-space ranges and choices.",
)
@click.option(
    "--pretrained",
    default=None,
    callback=empty_as_none,
    help="For backbones: 'imagenet' (torch's hub cache) or a weights file.",
)
@click.option(
    "--enqueue",
    default=None,
    callback=empty_as_none,
    help='Trials to run first, as JSON (inline or a file): {"model.width": 24, ...} or a list.',
)
@click.option(
    "--precision",
    default=None,
    callback=empty_as_none,
    help="Lightning precision (32-true, bf16-mixed, 16-mixed). Default: bf16-mixed where the "
    "GPU or CPU computes bf16 natively, else 16-mixed on GPUs and 32-true on CPUs.",
)
@click.option("--seed", type=INT, default=TuneConfig.seed, show_default=True)
@tracking_options
@evaluation_options
@user_errors
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
        f", log loss {m['log_loss']:.4f} (at 0.5: accuracy {h['acc']:.4f}, F1 {h['f1']:.4f}, "
        f"defect recall {h['defect_recall']:.4f})"
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
    callback=existing_dir,
    help="Images to evaluate on (their test split). Default: the embedded set.",
)
@click.option("--ok-class", default=None, callback=empty_as_none)
@click.option(
    "--seed",
    type=INT,
    default=DataConfig.seed,
    show_default=True,
    help="Split seed: use the training run's to evaluate on its test split.",
)
@click.option("--experiment", default=TrackingConfig.experiment, show_default=True)
@click.option("--tracking-uri", default=None, callback=empty_as_none)
@click.option("--progress/--no-progress", default=True)
@user_errors
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
    callback=existing_dir,
    help="Test images for the comparison (default: the version's own data).",
)
@click.option("--tracking-uri", default=None, callback=empty_as_none)
@user_errors
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


@cli.command()
@click.option(
    "--model",
    "model_uri",
    required=True,
    help="models:/quality-inspector@champion, models:/NAME/3 or models:/m-<id>.",
)
@click.argument("inputs", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option(
    "--output",
    "-o",
    type=click.Path(dir_okay=False, path_type=Path),
    default=Path("predictions.csv"),
    show_default=True,
    help="CSV to write.",
)
@click.option("--batch-size", type=INT, default=64, show_default=True, callback=positive)
@click.option(
    "--tracking-uri",
    default=None,
    callback=empty_as_none,
    help="Where models:/ URIs are looked up (default: MLFLOW_TRACKING_URI or ./mlflow.db).",
)
@click.option("--progress/--no-progress", default=True)
@user_errors
def predict(model_uri, inputs, output, batch_size, tracking_uri, progress) -> None:
    """Score image files and folders (INPUTS) in batches; write file, label, probability."""
    from qi.predict import list_images, predict_files
    from qi.tracking import configure_tracking

    configure_tracking(TrackingConfig(tracking_uri=tracking_uri))
    try:
        files = list_images(list(inputs))
    except FileNotFoundError as exc:
        raise click.BadParameter(str(exc), param_hint="INPUTS") from exc
    if not files:
        raise click.ClickException(f"no images ({', '.join(sorted(IMAGE_EXTENSIONS))}) found")
    try:
        run = predict_files(model_uri, files, batch_size=batch_size, progress=progress)
    except MlflowException as exc:
        raise click.ClickException(f"cannot load {model_uri}: {str(exc).splitlines()[0]}") from exc
    output.parent.mkdir(parents=True, exist_ok=True)
    run.table.to_csv(output, index=False)
    table = run.table
    failed = int(table["error"].ne("").sum())
    defective = int(table["label"].eq("defective").sum())
    click.echo(
        f"{len(table)} images -> {output}: {defective} defective, "
        f"{len(table) - defective - failed} ok, {failed} unreadable; "
        f"{run.images_per_second:.1f} images/s ({run.seconds:.1f} s)"
    )


def main() -> None:
    cli(auto_envvar_prefix="QI")


if __name__ == "__main__":
    main()
