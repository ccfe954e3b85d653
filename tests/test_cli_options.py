"""The CLI's shared option declarations (ft.cli.options): commands that pass their options to a service by
name, flags whose help is the docstring of the setting they set, and defaults taken from the service."""

from __future__ import annotations

import inspect

import pytest
import typer

from ft.cli.app import app
from ft.config.train import DataSection, DistributedSection, TuneSection
from ft.services import dataset_prepare, evaluation, export, serving, tune

ROOT = typer.main.get_command(app)


def _command(path: str):
    """A (sub)command of `ft` as typer builds it (typer ships its own click, so no isinstance checks)."""
    cmd = ROOT
    for part in path.split():
        cmd = cmd.commands[part]  # type: ignore[attr-defined]
    return cmd


def _params(path: str, *cli_only: str) -> set[str]:
    return {p.name for p in _command(path).params if p.name not in cli_only} - {None}  # type: ignore[misc]


def _keywords(fn) -> set[str]:
    return {n for n, p in inspect.signature(fn).parameters.items() if p.kind is not p.VAR_POSITIONAL}


@pytest.mark.parametrize(
    ("command", "service", "cli_only", "from_cli"),
    [
        # (the command, the service it calls with command_args, CLI-only parameters, what the CLI adds itself)
        ("evaluate", evaluation.evaluate, {"as_json"}, {"progress"}),
        ("export", export.export, {"as_json", "push", "private"}, {"reuse_existing", "progress"}),
        ("tune", tune.tune, {"as_json"}, {"progress", "on_note"}),
    ],
)
def test_options_passed_by_name_are_the_services_keywords(command, service, cli_only, from_cli):
    """A command's parameter named unlike its service's keyword would be a TypeError at run time."""
    params = _params(command, *cli_only)
    keywords = _keywords(service) - {"ws"}
    assert params <= keywords, params - keywords
    # And every keyword the user can set is a flag (nothing of the service unreachable from the CLI).
    assert keywords - params - from_cli <= {"config"}, keywords - params - from_cli


def test_prepare_passes_data_settings_by_key_and_the_rest_by_name():
    params = _params("dataset prepare", "as_json")
    data_keys = set(dataset_prepare.DATA_OPTIONS)
    assert data_keys <= params, data_keys - params
    keywords = _keywords(dataset_prepare.prepare_dataset) - {"ws"}
    assert params - data_keys <= keywords, params - data_keys - keywords


@pytest.mark.parametrize(
    ("command", "model", "not_fields"),
    [
        ("serve", serving.ServeOptions, set()),
        ("evaluate", evaluation.EvalOptions, {"run", "checkpoint", "dataset", "as_json"}),
    ],
)
def test_option_flags_take_help_and_default_from_the_services_options_model(command, model, not_fields):
    """One owner of each option's meaning and default: the service's model, not a copy in the CLI."""
    cmd = _command(command)
    fields = model.model_fields
    names = {p.name for p in cmd.params} - not_fields
    assert names == set(fields), names ^ set(fields)
    default = model()
    for p in cmd.params:
        if p.name in not_fields:
            continue
        if p.name == "cors_origins":  # a repeatable flag: none given is the field's empty list
            assert not p.default and default.cors_origins == []
            continue
        assert p.default == getattr(default, p.name), p.name
        doc = fields[p.name].description
        if doc:  # serve's host and port are shared with `ft ui` (cli.options.HostOpt / PortOpt)
            assert p.help == doc, p.name


def test_evaluate_service_defaults_are_its_options_models():
    params = inspect.signature(evaluation.evaluate).parameters
    default = evaluation.EvalOptions()
    for name in evaluation.EvalOptions.model_fields:
        assert params[name].default == getattr(default, name), name


@pytest.mark.parametrize(
    ("command", "flag", "model", "key"),
    [
        ("dataset prepare", "--max-bad", DataSection, "max_bad"),
        ("dataset prepare", "--format", DataSection, "format"),
        ("dataset prepare", "--val", DataSection, "val_split"),
        ("train", "--nproc", DistributedSection, "nproc"),
        ("tune", "--trials", TuneSection, "trials"),
    ],
)
def test_a_setting_flag_explains_itself_with_the_settings_own_docstring(command, flag, model, key):
    opt = next(p for p in _command(command).params if flag in getattr(p, "opts", ()))
    assert opt.help.startswith(model.model_fields[key].description)
    section = {DataSection: "data", DistributedSection: "distributed", TuneSection: "tune"}[model]
    assert opt.help.endswith(f"Default: train.yml's {section}.{key}.")


def test_a_setting_with_a_fixed_set_of_values_lists_them():
    opt = next(p for p in _command("dataset prepare").params if "--format" in getattr(p, "opts", ()))
    assert "Allowed: one of auto, chat, sharegpt, alpaca, completions, text." in opt.help
