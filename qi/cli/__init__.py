"""The ``qi`` command line: thin click commands over the library API.

Every option comes from a declaration in :mod:`qi.config` (see
:mod:`qi.cli.config_options`); a command here only says which configs it builds and what it
prints. Every option can also come from an environment variable ``QI_<COMMAND>_<OPTION>``
(e.g. ``QI_TRAIN_EPOCHS=5``). User-fixable problems end as one line on stderr and exit code 2
or 1, never a traceback.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings
from functools import wraps
from pathlib import Path
from typing import TYPE_CHECKING

import click

import qi
from qi.cli.config_options import config_options
from qi.config import (
    EvaluateConfig,
    ExplainConfig,
    ExportConfig,
    PredictConfig,
    PromoteConfig,
    RunConfig,
    StatusConfig,
    SynthConfig,
    TuneConfig,
)

if TYPE_CHECKING:  # the training stack loads only where a command runs it
    from qi.anomaly.fitting import DetectorSummary

log = logging.getLogger("qi")


def mlflow_error() -> type[Exception]:
    """MLflow's exception class, imported only when an error is being handled (an except
    clause's expression runs then): ``qi --help`` loads no MLflow."""
    from mlflow.exceptions import MlflowException

    return MlflowException


progress_option = click.option("--progress/--no-progress", default=True, help="Progress bars.")

# which declared fields each command offers (dotted paths under the names of its configs)
TRAIN_OPTIONS = dict(
    run=RunConfig,
    exclude=("run.synth.*", "run.evaluation.promotion_metric", "run.evaluation.register",
             "run.evaluation.force_promote", "run.evaluation.promotion_margin",
             "run.data.strict_data"),
)  # fmt: skip
TUNE_OPTIONS = dict(
    tune=TuneConfig,
    run=RunConfig,
    include=("run.data.*", "tune.*", "run.model.pretrained", "run.model.defect_types",
             "run.train.precision", "run.train.seed", "run.tracking.*", "run.evaluation.*",
             "run.detector.*"),
    exclude=("tune.space.*", "run.data.image_size", "run.data.strict_data"),
)  # fmt: skip


def user_errors(func):
    """Turn the library's user-fixable errors into one-line click errors; make Ctrl-C and
    SIGTERM (``docker stop``, a scheduler) always stop a command with exit status 130
    (:mod:`qi.interrupts`)."""

    @wraps(func)
    def wrapper(*args, **kwargs):
        from qi.data.discovery import DataLayoutError
        from qi.data.preprocessing import ImageDecodeError
        from qi.interrupts import requested, stop_on_signals
        from qi.models.encoders import UnknownArchitectureError
        from qi.models.weights import WeightsMismatchError, WeightsNotFoundError
        from qi.storage import StorageError
        from qi.tracking import TrackingError

        try:
            with stop_on_signals():
                result = func(*args, **kwargs)
                if requested() is None:
                    return result
                raise KeyboardInterrupt  # swallowed on the way, and no checkpoint came after
        except (
            DataLayoutError,
            ImageDecodeError,
            WeightsNotFoundError,
            WeightsMismatchError,
            UnknownArchitectureError,
            TrackingError,
            StorageError,
        ) as exc:
            raise click.ClickException(str(exc)) from exc
        except KeyboardInterrupt:
            click.echo(
                "interrupted: finished trials and runs are kept; run the same command "
                "again to resume",
                err=True,
            )
            sys.exit(130)

    return wrapper


def quiet_artifact_uploads(progress: bool) -> None:
    if not progress:
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")


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
@config_options(synth=SynthConfig)
def data_synth(out: Path, synth: SynthConfig) -> None:
    """Write the synthetic casting data set (Kaggle casting layout) to OUT."""
    from qi.data import synth as synthetic

    if out.exists() and any(out.iterdir()):
        raise click.ClickException(f"{out} is not empty: choose a new folder")
    synthetic.generate(out, synth)
    click.echo(f"wrote {synth.n_train + synth.n_test} images to {out}")


@cli.command()
@config_options(**TRAIN_OPTIONS)
@progress_option
@user_errors
def train(run: RunConfig, progress: bool) -> None:
    """Train one model and log it as an MLflow run."""
    from qi.train import train as run_train

    quiet_artifact_uploads(progress)
    outcome = run_train(run, progress=progress)
    click.echo(f"method: {outcome.method} ({outcome.method_reason})")
    click.echo(
        f"run {outcome.run_id}: {outcome.result.epochs_run} epochs, {outcome.result.seconds:.0f} s"
    )
    if outcome.evaluation is not None:
        click.echo(describe_evaluation(outcome.evaluation))
    if outcome.detector is not None:
        click.echo(describe_detector(outcome.detector, run.detector.max_false_alarm_rate))
    if outcome.model_uri:
        click.echo(f"model: {outcome.model_uri}")
    click.echo(f"MLflow UI: {ui_link(outcome.run_id)}")


@cli.command()
@config_options(**TUNE_OPTIONS)
@progress_option
@user_errors
def tune(tune: TuneConfig, run: RunConfig, progress: bool) -> None:
    """Run an Optuna study; every trial is a nested MLflow run."""
    from qi.study import tune as run_tune
    from qi.study.space import resolve_study

    quiet_artifact_uploads(progress)
    try:
        resolve_study(run, tune)  # a bad search-space file is a usage error, before any work
    except ValueError as exc:
        raise click.UsageError(str(exc)) from exc
    outcome = run_tune(run, tune, progress=progress)
    study = outcome.study
    click.echo(f"method: {outcome.method} ({outcome.method_reason})")
    click.echo(
        f"study {study.study_name}: {len(study.trials)} trials, parent run {outcome.parent_run_id}"
    )
    if outcome.best_trial is not None:
        click.echo(
            f"best trial {outcome.best_trial.number}: {tune.metric} {outcome.best_trial.value:.4f}"
        )
        if outcome.ensemble is not None:
            click.echo(f"model: {outcome.ensemble.describe()}")
        click.echo(describe_evaluation(outcome.evaluation))
        click.echo(f"model: {outcome.model_uri}")
    if outcome.decision is not None:
        d = outcome.decision
        click.echo(f"registered {tune.model_name} version {d.version} as {d.alias}: {d.reason}")
    click.echo(f"MLflow UI: {ui_link(outcome.parent_run_id)}")


def describe_detector(summary: DetectorSummary, false_alarm_rate: float) -> str:
    """What a good-only detector kept, and what its threshold rests on."""
    text = (
        f"memory bank: {summary.bank_patches} of {summary.candidate_patches} good patches "
        f"({summary.bank_mb:.1f} MB)"
    )
    if not summary.recall_measured:
        text += (
            f"\nno defect recall was measured: validation held "
            f"{summary.validation_defects} defective image(s); the threshold flags "
            f"{false_alarm_rate:.0%} of held-out good images"
        )
    return text


def ui_link(run_id: str) -> str:
    """Where the run is in MLflow's UI. The link asks for the model-training view: MLflow
    3's UI otherwise opens every experiment on the GenAI overview until the user switches
    (it remembers the switch per browser)."""
    import mlflow

    uri = mlflow.get_tracking_uri()
    experiment = mlflow.get_run(run_id).info.experiment_id
    page = f"#/experiments/{experiment}/runs/{run_id}?workflowType=machine_learning"
    if uri.startswith("http"):
        return f"{uri.rstrip('/')}/{page}"
    return f"mlflow ui --backend-store-uri {uri}, then http://127.0.0.1:5000/{page}"


def describe_evaluation(evaluation) -> str:
    """The CLI's summary: test figures, the trade-off table, and a warning where due."""
    m, h = evaluation.metrics, evaluation.metrics_at_half
    lines = [
        f"test at threshold {evaluation.threshold:.3f}: accuracy {m['acc']:.4f}, "
        f"F1 {m['f1']:.4f}, defect recall {m['defect_recall']:.4f}, ROC AUC {m['auroc']:.4f}"
        f", log loss {m['log_loss']:.4f} (at 0.5: accuracy {h['acc']:.4f}, F1 {h['f1']:.4f}, "
        f"defect recall {h['defect_recall']:.4f})",
        f"threshold {evaluation.threshold:.3f}: {evaluation.threshold_origin}",
    ]
    if "pixel_auroc" in m:  # a detector on data with defect masks
        lines.append(
            f"pixel ROC AUC of the anomaly maps {m['pixel_auroc']:.4f} "
            f"({m['pixel_auroc_images']:.0f} test images with masks)"
        )
    if evaluation.types is not None:
        t = evaluation.types
        lines.append(
            f"defect types ({', '.join(t.types)}): type accuracy {t.caught_accuracy:.4f} and "
            f"macro F1 {t.caught_macro_f1:.4f} among the {t.caught} caught defects"
        )
    if evaluation.tradeoff is not None:
        lines += ["operating points (threshold chosen on validation):"]
        lines += [f"  {line}" for line in evaluation.tradeoff_markdown().splitlines()]
    if evaluation.warning:
        lines.append(evaluation.warning)
    return "\n".join(lines)


@cli.command()
@config_options(
    evaluate=EvaluateConfig,
    run=RunConfig,
    include=("evaluate.*", "run.data.data_dir", "run.data.ok_class", "run.data.seed",
             "run.data.strict_data", "run.tracking.experiment", "run.tracking.tracking_uri"),
)  # fmt: skip
@progress_option
@user_errors
def evaluate(evaluate: EvaluateConfig, run: RunConfig, progress: bool) -> None:
    """Evaluate a logged model on a data set's test split and log the report as a run.

    Use the training run's --seed to evaluate on its own test split.
    """
    from qi.evaluation.run import evaluate_logged_model

    try:
        run_id, evaluation = evaluate_logged_model(
            evaluate.model_uri, run.data, run.tracking, progress
        )
    except mlflow_error() as exc:
        raise click.ClickException(
            f"cannot load {evaluate.model_uri}: {str(exc).splitlines()[0]}"
        ) from exc
    click.echo(f"run {run_id}: {describe_evaluation(evaluation)}")


@cli.command()
@config_options(
    promote=PromoteConfig,
    run=RunConfig,
    include=("promote.*", "run.evaluation.promotion_metric", "run.evaluation.force_promote",
             "run.evaluation.promotion_margin", "run.data.strict_data",
             "run.tracking.tracking_uri"),
    aliases={"run.evaluation.promotion_metric": ("--metric",),
             "run.evaluation.force_promote": ("--force",)},
)  # fmt: skip
@user_errors
def promote(promote: PromoteConfig, run: RunConfig) -> None:
    """Compare a version with the champion and move the champion/challenger aliases."""
    from qi.registry import promote_by_hand
    from qi.tracking import configure_tracking

    configure_tracking(run.tracking)
    try:
        decision = promote_by_hand(
            promote.model_name,
            version=promote.version,
            run_id=promote.run_id,
            data_dir=promote.data_dir,
            metric=run.evaluation.promotion_metric,
            force=run.evaluation.force_promote,
            storage=promote.storage,
            strict=run.data.strict_data,
            margin=run.evaluation.promotion_margin,
        )
    except (ValueError, mlflow_error()) as exc:
        raise click.ClickException(str(exc).splitlines()[0]) from exc
    click.echo(
        f"{promote.model_name} version {decision.version} is {decision.alias}: {decision.reason}"
    )


@cli.command()
@click.argument("inputs", nargs=-1, required=True, type=click.Path(path_type=Path))
@config_options(
    predict=PredictConfig, run=RunConfig, include=("predict.*", "run.tracking.tracking_uri")
)
@progress_option
@user_errors
def predict(inputs: tuple[Path, ...], predict: PredictConfig, run: RunConfig, progress) -> None:
    """Score image files and folders (INPUTS) in batches; write file, label, probability."""
    from qi.data.discovery import IMAGE_EXTENSIONS
    from qi.predict import list_images, predict_files
    from qi.tracking import configure_tracking

    configure_tracking(run.tracking)
    try:
        files = list_images(list(inputs))
    except FileNotFoundError as exc:
        raise click.BadParameter(str(exc), param_hint="INPUTS") from exc
    if not files:
        raise click.ClickException(f"no images ({', '.join(sorted(IMAGE_EXTENSIONS))}) found")
    try:
        scored = predict_files(
            predict.model_uri, files, batch_size=predict.batch_size, progress=progress
        )
    except mlflow_error() as exc:
        raise click.ClickException(
            f"cannot load {predict.model_uri}: {str(exc).splitlines()[0]}"
        ) from exc
    output = predict.output
    output.parent.mkdir(parents=True, exist_ok=True)
    table = scored.table
    table.to_csv(output, index=False)
    failed = int(table["error"].ne("").sum())
    defective = int(table["label"].eq("defective").sum())
    click.echo(
        f"{len(table)} images -> {output}: {defective} defective, "
        f"{len(table) - defective - failed} ok, {failed} unreadable; "
        f"{scored.images_per_second:.1f} images/s ({scored.seconds:.1f} s)"
    )


@cli.group()
def study() -> None:
    """Studies: what a running or finished study looks like."""


@study.command("status")
@config_options(
    status=StatusConfig,
    tune=TuneConfig,
    run=RunConfig,
    include=("status.*", "tune.study_name", "tune.storage", "tune.grace_period",
             "run.tracking.tracking_uri"),
)  # fmt: skip
@user_errors
def study_status(status: StatusConfig, tune: TuneConfig, run: RunConfig) -> None:
    """Trials by state, workers and their heartbeats, the best trial and its run."""
    import json

    from qi.study.status import format_status
    from qi.study.status import study_status as read_status
    from qi.tracking import configure_tracking

    tracking_uri = configure_tracking(run.tracking)
    found = read_status(tune.storage, tune.study_name, tracking_uri, tune.grace_period)
    click.echo(json.dumps(found, indent=2) if status.json else format_status(found))


@cli.command()
@click.argument("inputs", nargs=-1, required=True, type=click.Path(path_type=Path))
@config_options(
    explain=ExplainConfig, run=RunConfig, include=("explain.*", "run.tracking.tracking_uri")
)
@user_errors
def explain(inputs: tuple[Path, ...], explain: ExplainConfig, run: RunConfig) -> None:
    """Show where the model looks: a Grad-CAM overlay per image file of INPUTS."""
    from qi.explain import explain_files
    from qi.predict import list_images
    from qi.tracking import configure_tracking

    configure_tracking(run.tracking)
    try:
        files = list_images(list(inputs))
    except FileNotFoundError as exc:
        raise click.BadParameter(str(exc), param_hint="INPUTS") from exc
    try:
        explained = explain_files(explain.model_uri, files, explain.output)
    except mlflow_error() as exc:
        raise click.ClickException(
            f"cannot load {explain.model_uri}: {str(exc).splitlines()[0]}"
        ) from exc
    for item in explained:
        if item.error:
            click.echo(f"{item.file}: unreadable: {item.error}", err=True)
        else:
            click.echo(f"{item.file}: {item.label} {item.defect_probability:.3f} -> {item.overlay}")
    click.echo(f"{sum(not e.error for e in explained)} overlays in {explain.output}")


@cli.command()
@config_options(
    export=ExportConfig,
    run=RunConfig,
    include=("export.*", "run.data.strict_data", "run.tracking.tracking_uri"),
)
@user_errors
def export(export: ExportConfig, run: RunConfig) -> None:
    """Export a model to ONNX; publish it only when it scores the test images as the model."""
    from qi.export import ParityError, export_model
    from qi.tracking import configure_tracking

    configure_tracking(run.tracking)
    try:
        done = export_model(
            export.model_uri,
            export.output,
            export.data_dir,
            export.tolerance,
            export.publish,
            strict_data=run.data.strict_data,
        )
    except ParityError as exc:
        raise click.ClickException(str(exc)) from exc
    except (mlflow_error(), ValueError) as exc:
        raise click.ClickException(
            f"cannot export {export.model_uri}: {str(exc).splitlines()[0]}"
        ) from exc
    parity = done.parity
    click.echo(
        f"{export.output / 'model.onnx'} (opset {done.opset}): max |ONNX - model| "
        f"{parity.max_abs_difference:.1e} on {parity.images} test images, "
        f"{parity.decisions_differ} decisions differ"
    )
    click.echo(f"published: {done.published}" if done.published else "not published")


def main() -> None:
    from qi.runtime import keep_freed_memory

    keep_freed_memory()  # 2-3x faster CPU forward passes (see qi.runtime)
    cli(auto_envvar_prefix="QI")


__all__ = ["cli", "main"]
