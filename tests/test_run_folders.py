"""Nothing of the user's is ever lost, failed runs are marked and resumable, and runs can move."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from conftest import CONLLU_SENTENCES, write_conllu

from dlfa.cli.main import main


def _train(model_dir, data_dir, out, *extra):
    return ["train", "--task", "udpos", "--model", str(model_dir), "--data-dir", str(data_dir), "--output", str(out),
            "--epochs", "1", "--batch-size", "4", "--learning-rate", "1e-3", "--languages", "de", *extra]


def _one_line(capsys, progress: bool = False) -> str:
    """The one error line on stderr; with ``progress``, the run had started and progress bars and its setup line
    (precision, optimizer) may precede it."""
    err = capsys.readouterr().err.strip().splitlines()
    assert not any("Traceback" in line for line in err), err
    if progress:
        err = [line for line in err if line.startswith("dlfa:") and not line.startswith("dlfa: precision ")]
    assert len(err) == 1, err
    return err[0]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, tiny_model_dir):
    data = tmp_path_factory.mktemp("data") / "udpos"
    data.mkdir()
    write_conllu(data / "en-train.conllu", CONLLU_SENTENCES["en"] * 4)
    write_conllu(data / "en-dev.conllu", CONLLU_SENTENCES["en"])
    write_conllu(data / "de-test.conllu", CONLLU_SENTENCES["de"])
    run = tmp_path_factory.mktemp("runs") / "run"
    assert main(_train(tiny_model_dir, data, run)) == 0
    return run


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_evaluate_never_replaces_an_existing_folder_or_file(finished_run, tmp_path, capsys):
    """The data-loss case: `dlfa evaluate --run R --output R` used to delete R and put a JSON file in its place."""
    (finished_run / "my-notes.txt").write_text("mine", encoding="utf-8")
    before = _snapshot(finished_run)
    assert main(["evaluate", "--run", str(finished_run), "--output", str(finished_run)]) == 2
    assert "refusing to replace a folder" in _one_line(capsys)
    assert _snapshot(finished_run) == before
    mine = tmp_path / "scores.json"
    mine.write_text("{}", encoding="utf-8")
    assert main(["evaluate", "--run", str(finished_run), "--output", str(mine)]) == 2
    assert "exists and is a file" in _one_line(capsys)
    assert mine.read_text(encoding="utf-8") == "{}"
    (finished_run / "my-notes.txt").unlink()


def test_atomic_write_refuses_to_replace_a_folder(tmp_path):
    from dlfa.errors import DlfaInputError
    from dlfa.io import write_json_atomic

    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "keep").write_text("x", encoding="utf-8")
    with pytest.raises(DlfaInputError, match="is a folder; refusing to replace it"):
        write_json_atomic(folder, {"a": 1})
    assert (folder / "keep").read_text(encoding="utf-8") == "x"
    assert [p.name for p in tmp_path.iterdir()] == ["folder"]  # no temporary left


@pytest.mark.parametrize("kind", ["file", "symlink-loop", "read-only"])
def test_bad_output_paths_are_one_line_and_leave_nothing(tiny_model_dir, tiny_udpos_dir, tmp_path, capsys, kind,
                                                         monkeypatch):
    out = tmp_path / "out"
    if kind == "file":
        out.write_text("mine", encoding="utf-8")
        expected = "exists and is a file"
    elif kind == "symlink-loop":
        os.symlink(tmp_path / "b", tmp_path / "a")
        os.symlink(tmp_path / "a", tmp_path / "b")
        out = tmp_path / "a" / "run"
        expected = "option --output:"
    else:
        locked = tmp_path / "locked"
        locked.mkdir()
        out = locked / "run"
        real_access = os.access
        monkeypatch.setattr(os, "access", lambda p, mode, **k: False if Path(p) == locked else real_access(p, mode))
        expected = "is not writable"
    assert main(_train(tiny_model_dir, tiny_udpos_dir, out)) == 2
    assert expected in _one_line(capsys)
    if kind == "file":
        assert out.read_text(encoding="utf-8") == "mine"
    else:
        assert not (tmp_path / "locked" / "run").exists()


def test_a_run_that_fails_before_it_starts_leaves_no_folder(tiny_model_dir, tiny_udpos_dir, tmp_path, capsys):
    broken = tmp_path / "broken-model"
    shutil.copytree(tiny_model_dir, broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:200])  # a truncated download
    out = tmp_path / "run"
    assert main(_train(broken, tiny_udpos_dir, out)) == 2
    _one_line(capsys)
    assert not out.exists()


def test_pickle_only_model_folder_is_refused(tiny_model_dir, tiny_udpos_dir, tmp_path, capsys):
    pickled = tmp_path / "pickled"
    shutil.copytree(tiny_model_dir, pickled)
    (pickled / "model.safetensors").rename(pickled / "pytorch_model.bin")
    out = tmp_path / "run"
    assert main(_train(pickled, tiny_udpos_dir, out)) == 2
    line = _one_line(capsys)
    assert "option --model:" in line and "only pytorch_model.bin (pickle)" in line and "safetensors" in line
    assert not out.exists()


def _diverging(monkeypatch, at_step: int):
    """Make the training loss NaN from optimizer step ``at_step`` on (what --learning-rate inf used to hide)."""
    import torch

    from dlfa.training.recipe import FinetuneRecipe

    real = FinetuneRecipe.training_loss

    def loss(self, batch, step):
        value = real(self, batch, step)
        return value * torch.tensor(float("nan")) if step + 1 >= at_step else value

    monkeypatch.setattr(FinetuneRecipe, "training_loss", loss)


def test_diverged_run_is_marked_failed_and_resumable(tiny_model_dir, tiny_udpos_dir, tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    args = _train(tiny_model_dir, tiny_udpos_dir, out, "--epochs", "2", "--eval-every", "2")
    _diverging(monkeypatch, at_step=4)
    assert main(args) == 2
    line = _one_line(capsys, progress=True)
    assert "option --learning-rate: training diverged: the loss is nan at step 4" in line
    failed = json.loads((out / "failed.json").read_text(encoding="utf-8"))
    assert failed["resumable"] is True and "diverged" in failed["message"]
    assert not (out / "metrics.json").exists()
    # A plain run refuses the folder and says why; --resume continues it.
    monkeypatch.undo()
    assert main(args) == 2
    assert "holds a failed run (pass --resume to continue it" in _one_line(capsys)
    assert main([*args, "--resume"]) == 0
    metrics = json.loads((out / "metrics.json").read_text(encoding="utf-8"))
    assert [h["step"] for h in metrics["selection"]["history"]] == [2, 4, 6]
    assert not (out / "failed.json").exists() and not (out / "checkpoint").exists()


def test_a_moved_run_resumes(tiny_model_dir, tiny_udpos_dir, tmp_path, capsys, monkeypatch):
    first = tmp_path / "first"
    args = _train(tiny_model_dir, tiny_udpos_dir, first, "--epochs", "2", "--eval-every", "2")
    _diverging(monkeypatch, at_step=4)
    assert main(args) == 2
    capsys.readouterr()
    monkeypatch.undo()
    moved = tmp_path / "elsewhere" / "moved"
    moved.parent.mkdir()
    shutil.move(first, moved)
    config = json.loads((moved / "config.json").read_text(encoding="utf-8"))["config"]
    assert "output_dir" not in config and Path(config["data_dir"]).is_absolute()
    assert main([*_train(tiny_model_dir, tiny_udpos_dir, moved, "--epochs", "2", "--eval-every", "2"), "--resume"]) == 0
    assert "resumed from" in (moved / "train.log").read_text(encoding="utf-8")
    reference = tmp_path / "reference"
    assert main(_train(tiny_model_dir, tiny_udpos_dir, reference, "--epochs", "2", "--eval-every", "2")) == 0
    ours = json.loads((moved / "metrics.json").read_text(encoding="utf-8"))
    theirs = json.loads((reference / "metrics.json").read_text(encoding="utf-8"))
    assert ours["languages"] == theirs["languages"]


def test_a_crash_between_the_renames_of_a_checkpoint_is_recovered(tiny_model_dir, tiny_udpos_dir, tmp_path,
                                                                   capsys, monkeypatch):
    out = tmp_path / "run"
    args = _train(tiny_model_dir, tiny_udpos_dir, out, "--epochs", "2", "--eval-every", "2")
    _diverging(monkeypatch, at_step=4)
    assert main(args) == 2
    capsys.readouterr()
    monkeypatch.undo()
    # What a kill between "move the old checkpoint aside" and "move the new one in" leaves behind.
    leftover = out / ".checkpoint.abc123.tmp"
    leftover.mkdir()
    os.replace(out / "checkpoint", leftover / "checkpoint")
    (out / ".best.zzz.tmp").mkdir()  # an unfinished temporary of best/
    assert main([*args, "--resume"]) == 0
    log = (out / "train.log").read_text(encoding="utf-8")
    assert "resumed from" in log and "at step 2" in log  # not a restart from step 0
    assert not list(out.glob(".*.tmp"))


def test_overwrite_only_replaces_a_runs_own_files(finished_run, tiny_model_dir, tmp_path, capsys):
    stranger = tmp_path / "stranger"
    stranger.mkdir()
    (stranger / "thesis.tex").write_text("mine", encoding="utf-8")
    data = json.loads((finished_run / "config.json").read_text(encoding="utf-8"))["config"]["data_dir"]
    assert main([*_train(tiny_model_dir, data, stranger), "--overwrite"]) == 2
    assert "holds no dlfa run" in _one_line(capsys)
    assert [p.name for p in stranger.iterdir()] == ["thesis.tex"]

    copy = tmp_path / "copy"
    shutil.copytree(finished_run, copy)
    (copy / "notes.md").write_text("mine", encoding="utf-8")
    (copy / "failed.json").write_text("{}", encoding="utf-8")
    assert main([*_train(tiny_model_dir, data, copy), "--overwrite"]) == 0
    assert (copy / "notes.md").read_text(encoding="utf-8") == "mine"
    assert not (copy / "failed.json").exists() and (copy / "metrics.json").is_file()


def test_data_folder_messages(tiny_model_dir, tiny_udpos_dir, tmp_path, capsys):
    assert main(_train(tiny_model_dir, tmp_path / "missing", tmp_path / "r1")) == 2
    assert _one_line(capsys).endswith(f"option --data-dir: folder not found: {tmp_path / 'missing'}")
    args = _train(tiny_model_dir, tiny_udpos_dir, tmp_path / "r2")
    args[args.index("udpos")] = "panx"
    assert main(args) == 2
    assert "holds udpos files, not panx files (use --task udpos)" in _one_line(capsys)
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(_train(tiny_model_dir, empty, tmp_path / "r3")) == 2
    assert "no udpos files in" in _one_line(capsys)
    assert not any((tmp_path / name).exists() for name in ("r1", "r2", "r3"))


@pytest.mark.parametrize("name", ["DE-test.conllu", "de_CH-test.conllu"])
def test_misnamed_target_files_are_not_skipped_silently(tiny_model_dir, tiny_udpos_dir, tmp_path, capsys, name):
    shutil.copy(tiny_udpos_dir / "de-test.conllu", tiny_udpos_dir / name)
    assert main(_train(tiny_model_dir, tiny_udpos_dir, tmp_path / "run")) == 2
    line = _one_line(capsys)
    assert name in line and "file name not understood" in line


def test_duplicate_training_files_are_refused(tiny_model_dir, tiny_udpos_dir, tmp_path, capsys):
    shutil.copy(tiny_udpos_dir / "en-train.conllu", tiny_udpos_dir / "en_ewt-ud-train.conllu")
    assert main(_train(tiny_model_dir, tiny_udpos_dir, tmp_path / "run")) == 2
    assert "same content as" in _one_line(capsys)


def test_xnli_without_train_file_hints_at_train_split(tiny_model_dir, tmp_path, capsys):
    data = tmp_path / "xnli"
    data.mkdir()
    (data / "dev-en.tsv").write_text("a cat\ta dog\tneutral\n" * 4, encoding="utf-8")
    (data / "test-de.tsv").write_text("eine Katze\tein Hund\tneutral\n", encoding="utf-8")
    args = ["train", "--task", "xnli", "--model", str(tiny_model_dir), "--data-dir", str(data),
            "--output", str(tmp_path / "run")]
    assert main(args) == 2
    assert "train on it with --train-split dev" in _one_line(capsys)


def test_ctrl_c_says_how_to_resume(monkeypatch, capsys, tiny_model_dir, tiny_udpos_dir, tmp_path):
    from dlfa.training.recipe import FinetuneRecipe

    def interrupted(self):
        raise KeyboardInterrupt

    monkeypatch.setattr(FinetuneRecipe, "train", interrupted)
    assert main(_train(tiny_model_dir, tiny_udpos_dir, tmp_path / "run")) == 130
    assert _one_line(capsys, progress=True) == "dlfa: interrupted; to continue, run the same command with --resume"
    assert json.loads((tmp_path / "run" / "failed.json").read_text(encoding="utf-8"))["message"] == "interrupted"


def test_tasks_table_lists_the_languages_present(tiny_udpos_dir, capsys):
    assert main(["tasks"]) == 0
    table = capsys.readouterr().out
    assert table.startswith("| task") and "udpos" in table and "(XTREME)" in table
    assert main(["tasks", "--data-dir", str(tiny_udpos_dir)]) == 0
    table = capsys.readouterr().out
    assert "test 3: de, en, ja" in table and "not in this folder" in table
