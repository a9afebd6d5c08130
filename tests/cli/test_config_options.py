"""Each option is declared once, on its config field, and reaches that field."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from qi.cli import cli
from qi.cli.config_options import ExposedOption, _problem, build_configs
from qi.config import DataConfig, ModelConfig, SearchSpace, TrainConfig, TuneConfig
from qi.options import declaration_of, from_text


def _commands():
    yield "train", cli.commands["train"], []
    yield "tune", cli.commands["tune"], []
    yield "evaluate", cli.commands["evaluate"], []
    yield "promote", cli.commands["promote"], []
    yield "predict", cli.commands["predict"], ["some.png"]
    yield "data synth", cli.commands["data"].commands["synth"], ["out"]
    yield "study status", cli.commands["study"].commands["status"], []
    yield "export", cli.commands["export"], []
    yield "explain", cli.commands["explain"], ["some.png"]


def _other_value(option: ExposedOption, tmp_path: Path) -> tuple[str, object]:
    """A valid command-line text for ``option`` that is not its default, and its value."""
    kind, declaration = option.kind, option.declaration
    if declaration.must_exist == "folder":
        return str(tmp_path), tmp_path
    if declaration.must_exist == "file":
        path = tmp_path / "space.json"
        path.write_text("{}")
        return str(path), path
    if option.param == "enqueue":
        return '{"model.width": 8}', ({"model.width": 8},)
    names = declaration.choice_names() or kind.literal
    if names:
        default = option.default if not isinstance(option.default, tuple) else None
        pick = next(n for n in reversed(names) if n != default)
        return pick, (pick,) if kind.base is tuple else pick
    candidates = {
        int: ["7", "3", "8"],
        float: ["0.3", "0.7", "3.5"],
        str: ["something-else"],
        Path: [str(tmp_path / "out.csv")],
        tuple: ["4,8", "16"],  # tuples of numbers (the detector's stage strides)
    }[kind.base]
    for text in candidates:
        value = from_text(text, kind, declaration)
        if value != option.default and _problem(option, value) is None:
            return text, value
    raise AssertionError(f"no test value for {option.param}")


def _at(configs: dict, path: tuple[str, ...]):
    value = configs[path[0]]
    for name in path[1:]:
        value = getattr(value, name)
    return value


@pytest.mark.parametrize("name, command, arguments", list(_commands()))
def test_every_option_reaches_the_config_field_it_names(name, command, arguments, tmp_path):
    options: list[ExposedOption] = command.callback.__qi_options__
    roots = command.callback.__qi_roots__
    required = []
    for option in options:
        if option.declaration.required:
            required += [option.flags[0], "models:/m/1"]
    assert options, name
    for option in options:
        if option.is_flag:
            flag = option.flags[0]
            args = [f"--no-{flag[2:]}" if option.default else flag]
            value = not option.default
        else:
            text, value = _other_value(option, tmp_path)
            args = [option.flags[0], text]
        context = command.make_context(name, [*arguments, *required, *args])
        configs = build_configs(roots, options, context.params)
        for path in option.targets:
            assert _at(configs, path) == value, (name, option.param, path)


def test_an_option_set_in_several_configs_is_one_option():
    options = cli.commands["tune"].callback.__qi_options__
    (seed,) = [o for o in options if o.param == "seed"]
    assert {".".join(p) for p in seed.targets} == {"run.data.seed", "run.train.seed", "tune.seed"}
    flags = [f for o in options for f in o.flags]
    assert len(flags) == len(set(flags))


def test_choices_are_the_names_the_registries_hold():
    import numpy as np

    from qi.choices import POOLINGS, PROMOTION_METRICS, STAGE_METRICS
    from qi.evaluation.metrics import binary_metrics
    from qi.fit.module import STAGE_METRICS as COMPUTED
    from qi.fit.optimizers import OPTIMIZERS
    from qi.models import model_names
    from qi.models.cnn import ACTIVATIONS
    from qi.study.sampling import PRUNERS, SAMPLERS

    def declared(cls):
        return {f.name: declaration_of(f) for f in dataclasses.fields(cls) if declaration_of(f)}

    assert declared(TuneConfig)["sampler"].choice_names() == tuple(SAMPLERS)
    assert declared(TuneConfig)["pruner"].choice_names() == tuple(PRUNERS)
    assert declared(ModelConfig)["name"].choice_names() == tuple(model_names())
    assert declared(ModelConfig)["activation"].choice_names() == tuple(ACTIVATIONS)
    assert declared(TrainConfig)["optimizer"].choice_names() == tuple(OPTIMIZERS)
    assert tuple(COMPUTED) == STAGE_METRICS
    assert set(PROMOTION_METRICS) <= set(binary_metrics(np.array([0, 1]), np.array([0.2, 0.9])))
    for pooling in POOLINGS:
        from qi.models.parts import GlobalPool

        GlobalPool(pooling)  # each name builds


def test_a_timm_architecture_is_a_model_choice_and_an_empty_one_is_not():
    assert ModelConfig(name="timm:convnext_nano").name == "timm:convnext_nano"
    with pytest.raises(ValueError, match="names no architecture"):
        ModelConfig(name="timm:")
    with pytest.raises(ValueError, match="timm:<name>"):
        ModelConfig(name="vgg")


def test_configs_built_in_python_are_checked_like_the_command_line():
    with pytest.raises(ValueError, match="epochs: must be positive"):
        TrainConfig(epochs=0)
    with pytest.raises(ValueError, match="unknown model 'vgg99'"):
        ModelConfig(name="vgg99")
    with pytest.raises(ValueError, match="val_fraction: must be in"):
        DataConfig(val_fraction=1.5)
    with pytest.raises(ValueError, match="low 0.5 is above high 0.1"):
        SearchSpace(dropout=(0.5, 0.1))
    with pytest.raises(ValueError, match="unknown sampler"):
        TuneConfig(sampler="grid")
