"""Every option of every command, fed invalid values: exit status 2, one line on stderr, no traceback, nothing written.

The cases are generated from the config dataclasses themselves (type, range, choices), so an option added later is
covered without editing this file. Validation runs before any heavy import, so these cases are fast.
"""

from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from pathlib import Path

import pytest

from dlfa.cli.main import COMMANDS, main
from dlfa.errors import DlfaInputError
from dlfa.options import META, flag_of, int_list
from dlfa.training.config import SweepConfig, TrainConfig


def _required(command: str, tmp: Path) -> list[str]:
    """Valid values for the required options of a command (the bad option must be the only problem)."""
    data = str(tmp / "data")
    return {
        "train": ["--task", "udpos", "--data-dir", data, "--output", str(tmp / "out")],
        "evaluate": ["--run", str(tmp / "run")],
        "sweep": ["--tasks", "udpos", "--data-dir", data, "--output", str(tmp / "out")],
        "download": ["udpos", "--output", str(tmp / "out")],
        "report": [str(tmp / "runs"), "--output", str(tmp / "out")],
        "analyze similarity": ["--model", "m", "--data-dir", data, "--output", str(tmp / "out")],
        "analyze ablate": ["--task", "udpos", "--data-dir", data, "--output", str(tmp / "out"),
                           "--reinit-layers", "1"],
        "convert": [str(tmp / "old"), "--output", str(tmp / "out")],
        "prune": [str(tmp / "runs")],
        "rank-layers": ["--task", "udpos", "--data-dir", data, "--output", str(tmp / "out")],
        "demo": ["--output", str(tmp / "out")],
        "tasks": [],
    }[command]


def _bad_values(annotation, spec) -> list[str]:
    """Command-line strings that the field must refuse."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in args if a is not type(None)][0]
        return _bad_values(inner, spec)
    if origin is typing.Literal:
        return ["no-such-choice"]
    low, high = spec.get("low"), spec.get("high")
    if origin is list:
        item = args[0]
        if spec.get("parse") is int_list:
            values = ["1,x", "5-2", ","]
            if low is not None:
                values.append(str(int(low) - 1))
            return values
        if item is str:
            return ["X!", ","] if spec.get("parse") else [""]  # comma lists are language codes; else any path
        return []
    if annotation is bool:
        return ["maybe"]
    if annotation is int:
        values = ["abc", "1.5", "nan"]
        if low is not None:
            values.append(str(int(low) - 1))
        if high is not None:
            values.append(str(int(high) + 1))
        return values
    if annotation is float:
        values = ["abc", "nan", "inf", "-inf"]
        if low is not None:
            values.append(repr(low - 1.0) if not spec.get("low_open") else repr(float(low)))
        if high is not None and math.isfinite(high):
            values.append(repr(high + 1.0))
        return values
    if annotation is str:
        return [""]
    return []


def _cases():
    for name, command in COMMANDS.items():
        for config_class in command.configs():
            hints = typing.get_type_hints(config_class)
            for f in dataclasses.fields(config_class):
                spec = f.metadata.get(META, {})
                if not f.init or not spec.get("cli", True) or spec.get("positional"):
                    continue
                for value in _bad_values(hints[f.name], spec):
                    yield pytest.param(name, flag_of(config_class, f.name), value,
                                       id=f"{name.replace(' ', '-')}{flag_of(config_class, f.name)}={value!r}")


CASES = list(_cases())


def test_every_option_of_every_command_is_covered():
    covered = {(c.values[0], c.values[1]) for c in CASES}
    for name, command in COMMANDS.items():
        for config_class in command.configs():
            for f in dataclasses.fields(config_class):
                spec = f.metadata.get(META, {})
                if f.init and spec.get("cli", True) and not spec.get("positional"):
                    assert (name, flag_of(config_class, f.name)) in covered, (name, f.name)
    assert len(CASES) > 200


@pytest.mark.parametrize("command,option,value", CASES)
def test_invalid_value_is_one_line_exit_2_and_writes_nothing(command, option, value, tmp_path, capsys):
    argv = [*command.split(), *_required(command, tmp_path), option, value]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert "Traceback" not in err[0] and err[0].startswith("dlfa: error: ")
    assert option in err[0] or "--" in err[0], err[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == [], "something was written"


@pytest.mark.parametrize("command", list(COMMANDS))
def test_help_describes_every_option_with_its_default(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([*command.split(), "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for config_class in COMMANDS[command].configs():
        for f in dataclasses.fields(config_class):
            if f.init and f.metadata.get(META, {}).get("cli", True):
                assert f.metadata.get("help"), f"{config_class.__name__}.{f.name} has no help"
    assert text.count("(default: ") + text.count("(required)") >= 1


def test_train_help_marks_required_options(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = capsys.readouterr().out
    required = text.split("required options:")[1].split("options:")[0]
    for flag in ("--task", "--data-dir", "--output"):
        assert flag in required
    assert "--seed SEED" in text and "(default: 42)" in text


def test_missing_required_option_is_named(capsys, tmp_path):
    assert main(["train", "--task", "udpos", "--data-dir", str(tmp_path)]) == 2
    assert capsys.readouterr().err.strip() == "dlfa: error: option --output: is required"


@pytest.mark.parametrize("suffix", [".json", ".yaml"])
def test_config_file_values_are_validated_and_named(tmp_path, capsys, suffix):
    path = tmp_path / f"run{suffix}"
    data = {"task": "udpos", "batch_size": 0}
    path.write_text(json.dumps(data) if suffix == ".json" else "task: udpos\nbatch_size: 0\n", encoding="utf-8")
    assert main(["train", "--config", str(path), "--data-dir", str(tmp_path), "--output", str(tmp_path / "o")]) == 2
    assert capsys.readouterr().err.strip() == (
        f"dlfa: error: {path}: field 'batch_size': must be an integer >= 1 and <= 65536, got 0")


@pytest.mark.parametrize("content,expected", [
    ("[1, 2]", "a config file holds one mapping"),
    ("{\"task\": \"udpos\", \"epochs\": \"three\"}", "field 'epochs': must be a number, got 'three'"),
    ("{\"task\": \"udpos\", \"nope\": 1}", "unknown field 'nope'"),
    ("{\"gradient_accumulation_steps\": 0}", "field 'gradient_accumulation_steps': must be an integer >= 1"),
    ("{\"seed\": -1}", "field 'seed': must be an integer >= 0"),
    ("{broken", "invalid JSON"),
])
def test_bad_config_files(tmp_path, capsys, content, expected):
    path = tmp_path / "run.json"
    path.write_text(content, encoding="utf-8")
    assert main(["train", "--config", str(path), "--output", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert expected in err and str(path) in err and err.count("\n") == 0


def test_config_file_that_is_a_folder(tmp_path, capsys):
    assert main(["train", "--config", str(tmp_path), "--output", str(tmp_path / "o")]) == 2
    assert "is a folder, not a config file" in capsys.readouterr().err


def test_options_override_the_config_file(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("task: panx\nseed: 3\nlanguages: de,fr\n", encoding="utf-8")
    from dlfa.options import parse_config

    config = parse_config(TrainConfig, {"seed": 4, "data_dir": "d", "output_dir": "o"}, file=path)
    assert (config.task, config.seed, config.languages) == ("panx", 4, ["de", "fr"])


@pytest.mark.parametrize("kwargs,option", [
    ({"seed": -1}, "--seed"),
    ({"learning_rate": float("nan")}, "--learning-rate"),
    ({"learning_rate": float("inf")}, "--learning-rate"),
    ({"epochs": float("inf")}, "--epochs"),
    ({"max_length": 1}, "--max-length"),
    ({"warmup_ratio": -0.1}, "--warmup-ratio"),
    ({"weight_decay": -0.01}, "--weight-decay"),
    ({"gradient_accumulation_steps": 0}, "--gradient-accumulation-steps"),
    ({"batch_size": 6, "gradient_accumulation_steps": 4}, "--gradient-accumulation-steps"),
    ({"fuse_layer": True}, "--fuse-layer"),
    ({"languages": []}, "--languages"),
    ({"task": "nope"}, "--task"),
])
def test_python_api_validates_like_the_command_line(kwargs, option):
    """The same checks whatever builds the config: here the Python API."""
    with pytest.raises(DlfaInputError) as info:
        TrainConfig(**{"task": "udpos", "data_dir": "d", "output_dir": "o", **kwargs})
    assert info.value.option == option


@pytest.mark.parametrize("kwargs,message", [
    ({"seeds": []}, "--seeds: must not be empty"),
    ({"seeds": [1, 1]}, "--seeds: names a seed twice"),
    ({"parallel": 0}, "--parallel: must be an integer >= 1"),
    ({"tasks": ["udpos", "udpos"]}, "--tasks: names a task twice"),
    ({"data_root": "r"}, "--data-dir: give --data-dir for one task or --data-root"),
    ({"train": {"seed": 3}}, "seed"),
    ({"train": {"batch_size": 0}}, "--batch-size"),
])
def test_sweep_config_validation(kwargs, message):
    base = {"tasks": ["udpos"], "data_dir": "d", "output_dir": "o"}
    with pytest.raises(DlfaInputError, match=message):
        SweepConfig(**{**base, **kwargs})


def test_sweep_with_empty_seeds_is_refused_on_the_command_line(capsys, tmp_path):
    assert main(["sweep", "--tasks", "udpos", "--data-dir", str(tmp_path), "--output", str(tmp_path / "o"),
                 "--seeds", ""]) == 2
    assert "option --seeds: must not be empty" in capsys.readouterr().err


@pytest.mark.parametrize("bad", [["--batch-size", "0"], ["--data-dir", "/no/such/folder"],
                                 ["--task", "panx"]])
def test_bad_input_is_refused_before_heavy_imports(bad, tiny_udpos_dir, tmp_path):
    """A bad option or path must not wait for torch or the model code: they are imported only after the checks."""
    import subprocess
    import sys

    args = ["train", "--task", "udpos", "--data-dir", str(tiny_udpos_dir), "--output", str(tmp_path / "o"), *bad]
    code = (f"import sys; from dlfa.cli.main import main; rc = main({args!r}); heavy = [m for m in ('torch', "
            "'dlfa.training.recipe', 'seqeval', 'accelerate') if m in sys.modules]; print(rc, heavy)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120).stdout
    assert out.strip() == "2 []"
