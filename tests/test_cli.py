"""End-to-end train + evaluate on tiny data, and every bad input ending in one line with exit status 2."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from conftest import write_conllu

from dlfa.cli.main import main


def _train_args(model_dir, data_dir, out, *extra):
    return ["train", "--task", "udpos", "--model", str(model_dir), "--data-dir", str(data_dir),
            "--output", str(out), "--epochs", "3", "--batch-size", "4", "--learning-rate", "1e-3", *extra]


def test_train_and_evaluate_end_to_end(tiny_model_dir, tiny_udpos_dir, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(_train_args(tiny_model_dir, tiny_udpos_dir, out, "--fuse-layer", "2", "--seed", "7")) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["languages"]) == {"de", "en", "ja"}
    assert metrics["fuse_layer"] == 2 and metrics["seed"] == 7 and metrics["method"] == "dlfa"
    assert [h["step"] for h in metrics["selection"]["history"]] == [3, 6, 9]  # 12 sentences / 4 per batch
    assert metrics["selection"]["best_score"] == max(h["score"] for h in metrics["selection"]["history"])
    for name in ("config.json", "train.log", "best/model.safetensors", "best/config.json", "best/modeling_dlfa.py",
                 "best/README.md", "best/tokenizer.json"):
        assert (out / name).is_file(), name
    config = json.loads((out / "config.json").read_text())
    assert config["config"]["fuse_layer"] == 2 and config["resolved"]["num_layers"] == 4
    assert "average" in capsys.readouterr().out

    # Re-scoring the saved model gives the numbers the run reported.
    assert main(["evaluate", "--run", str(out), "--output", str(tmp_path / "eval.json")]) == 0
    again = json.loads((tmp_path / "eval.json").read_text())
    for lang in ("de", "en", "ja"):
        assert again["languages"][lang]["accuracy"] == pytest.approx(metrics["languages"][lang]["accuracy"])


def test_training_learns_the_tiny_task(tiny_model_dir, tiny_udpos_dir, tmp_path):
    out = tmp_path / "run"
    assert main(_train_args(tiny_model_dir, tiny_udpos_dir, out, "--epochs", "15", "--languages", "en")) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["languages"]["en"]["accuracy"] > 80  # memorises 3 training sentences; chance is ~6%


def test_same_seed_same_result(tiny_model_dir, tiny_udpos_dir, tmp_path):
    results = []
    for name in ("a", "b"):
        assert main(_train_args(tiny_model_dir, tiny_udpos_dir, tmp_path / name, "--fuse-layer", "1")) == 0
        results.append(json.loads((tmp_path / name / "metrics.json").read_text())["selection"]["history"])
    assert results[0] == results[1]


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert "Traceback" not in err[0]
    return err[0]


@pytest.mark.parametrize(
    "breakage,expected",
    [
        ("malformed", "en-train.conllu:2: expected 10 tab-separated"),
        ("unknown_tag", "en-train.conllu:1: unknown UPOS tag 'NOUNS'"),
        ("empty", "en-train.conllu: no sentences"),
        ("missing", "no udpos train file for language 'en'"),
    ],
)
def test_bad_data_files(tiny_model_dir, tiny_udpos_dir, tmp_path, capsys, breakage, expected):
    train = tiny_udpos_dir / "en-train.conllu"
    if breakage == "malformed":
        train.write_text("1\tthe\t_\tDET\t_\t_\t_\t_\t_\t_\n2\tcat NOUN\n", encoding="utf-8")
    elif breakage == "unknown_tag":
        train.write_text("1\tcat\t_\tNOUNS\t_\t_\t_\t_\t_\t_\n", encoding="utf-8")
    elif breakage == "empty":
        train.write_text("", encoding="utf-8")
    else:
        train.unlink()
    out = tmp_path / "run"
    assert main(_train_args(tiny_model_dir, tiny_udpos_dir, out)) == 2
    assert expected in _one_error_line(capsys)
    assert not out.exists()  # nothing written for a run that could not start


def test_bad_target_file_is_caught_before_training(tiny_model_dir, tiny_udpos_dir, tmp_path, capsys):
    write_conllu(tiny_udpos_dir / "ja-test.conllu", [[("猫", "NOUN")]])
    (tiny_udpos_dir / "ja-test.conllu").write_bytes(b"1\t\xff\xfe\t_\tNOUN\t_\t_\t_\t_\t_\t_\n")
    out = tmp_path / "run"
    assert main(_train_args(tiny_model_dir, tiny_udpos_dir, out)) == 2
    assert "ja-test.conllu:1: not valid UTF-8" in _one_error_line(capsys)
    assert not out.exists()


@pytest.mark.parametrize(
    "extra,expected",
    [
        (["--fuse-layer", "4"], "option --fuse-layer: fused layer must be an integer in 1..3"),
        (["--fuse-layer", "0"], "option --fuse-layer: must be an integer >= 1, got 0"),
        (["--fuse-layer", "top"], "option --fuse-layer: must be an integer or 'none'"),
        (["--languages", "de,xx"], "option --languages: unknown language 'xx'"),
        (["--batch-size", "0"], "option --batch-size: must be an integer >= 1"),
    ],
)
def test_bad_options(tiny_model_dir, tiny_udpos_dir, tmp_path, capsys, extra, expected):
    out = tmp_path / "run"
    assert main(_train_args(tiny_model_dir, tiny_udpos_dir, out, *extra)) == 2
    assert expected in _one_error_line(capsys)
    assert not out.exists()


def test_unknown_task_and_option(capsys):
    assert main(["train", "--task", "nope", "--data-dir", "x"]) == 2
    assert "option --task: invalid choice: 'nope' (choose from 'udpos', 'panx', 'xnli', 'pawsx')" in _one_error_line(capsys)
    assert main(["train", "--no-such-flag"]) == 2
    assert "unrecognized arguments: --no-such-flag" in _one_error_line(capsys)


def test_console_script_exit_status_and_no_traceback(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "dlfa", "train", "--task", "udpos", "--data-dir", str(tmp_path / "nowhere"),
         "--model", str(tmp_path), "--output", str(tmp_path / "run")],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "Traceback" not in result.stderr
    assert "nowhere" in result.stderr


def test_demo_end_to_end_on_the_shipped_sample(tiny_model_dir, tmp_path, capsys):
    """`dlfa demo` (README's first command) on the tiny model: every run, the table, the plot, the JSON."""
    out = tmp_path / "demo"
    args = ["demo", "--model", str(tiny_model_dir), "--fuse-layer", "2", "--epochs", "1", "--seeds", "1,2",
            "--output", str(out)]
    assert main(args) == 0
    summary = json.loads((out / "demo.json").read_text(encoding="utf-8"))
    assert summary["seeds"] == [1, 2]
    languages = [row["language"] for row in summary["rows"]]
    assert languages[-1] == "average" and set(languages[:-1]) == {"de", "es", "fr", "it", "nl", "ru"}
    for row in summary["rows"]:
        assert len(row["baseline"]) == len(row["D_2"]) == 2  # one score per seed
        assert row["delta"] == pytest.approx([d - b for b, d in zip(row["baseline"], row["D_2"])])
        assert all(0.0 <= v <= 100.0 for v in row["baseline"] + row["D_2"])
    for name in ("demo.md", "demo.png", "demo.svg", "seed-1/baseline/metrics.json", "seed-2/dlfa/metrics.json"):
        assert (out / name).is_file(), name
    assert json.loads((out / "seed-2/dlfa/metrics.json").read_text(encoding="utf-8"))["fuse_layer"] == 2
    assert not list(out.rglob("*.safetensors"))  # the demo keeps no weights unless --keep-weights
    printed = capsys.readouterr().out
    assert "D_2" in printed and "over 2 seeds" in printed and "fine-tunings" in printed
    # A second demo into the same folder refuses to overwrite it: one line, exit status 2.
    assert main(args) == 2
    assert capsys.readouterr().err.count("\n") == 1


def test_demo_checks_the_layer_before_training_anything(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--model", str(tiny_model_dir), "--fuse-layer", "100", "--output", str(out)]) == 2
    assert "option --fuse-layer: fused layer must be an integer in 1..3" in _one_error_line(capsys)
    assert not out.exists()
