"""Lean sweeps: delete the model weights of finished runs, keeping everything ``dlfa report`` reads.

Each run folder keeps its selected model in ``best/``: for the embedded multilingual-e5-small that is a 470 MB
``model.safetensors`` (the whole encoder, fine-tuned) beside a 17 MB tokenizer copy, so a 12-row x 3-seed sweep
holds about 17 GB. ``dlfa report`` needs none of it: it reads ``metrics.json`` and ``config.json``.

:func:`prune_run` (``keep="report"``) deletes only weight files that dlfa wrote, of a finished run:

* the run must be finished (``metrics.json`` present): a running or interrupted run still needs its weights;
* a file is deleted only if a dlfa checksum file beside it (``best/checksums.json``, or a leftover
  ``checkpoint/checksums.json``) lists it, it is a ``.safetensors`` file, and its sha256 still matches: a file
  replaced or added by anyone else is kept and reported;
* before deleting, the run records what it loses in ``pruned.json`` (names, sizes, sha256, the dlfa version), so
  that ``dlfa evaluate`` (:func:`check_weights_present`) says the weights were pruned instead of "file missing".

Kept: ``metrics.json``, ``config.json``, ``train.log``, ``best/``'s configs, checksums and tokenizer. ``keep="all"``
deletes nothing. Default for training and sweeps: keep the weights (``keep_weights = true``); pruning is asked for.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dlfa.errors import DlfaInputError
from dlfa.io import CHECKSUMS_NAME, read_checksums, sha256_file, write_json_atomic

if TYPE_CHECKING:
    from dlfa.configs import PruneConfig

PRUNED_FILE = "pruned.json"
PRUNED_FORMAT = "dlfa-pruned"
METRICS_FILE = "metrics.json"
MODEL_DIRS = ("best", "checkpoint")  # the recipe's selected model, and a resumption checkpoint left behind
WEIGHTS_NAME = "model.safetensors"  # dlfa.modeling.modeling_dlfa.WEIGHTS_NAME (not imported: it pulls in torch)


def disk_usage(path: str | Path) -> int:
    """Bytes in the files under ``path`` (symbolic links are not followed, and count as nothing)."""
    path = Path(path)
    if path.is_symlink():
        return 0
    if path.is_file():
        return path.stat().st_size
    total = 0
    for dirpath, _, filenames in os.walk(path):
        for name in filenames:
            file = Path(dirpath) / name
            if not file.is_symlink():
                total += file.stat().st_size
    return total


@dataclass
class PruneResult:
    run_dir: Path
    bytes_before: int
    bytes_after: int
    removed: list[str] = field(default_factory=list)  # relative to run_dir
    kept: list[tuple[str, str]] = field(default_factory=list)  # (relative path, why it was not deleted)

    @property
    def bytes_freed(self) -> int:
        return self.bytes_before - self.bytes_after

    def summary(self) -> str:
        kept = f"; kept {len(self.kept)}: " + ", ".join(f"{p} ({why})" for p, why in self.kept) if self.kept else ""
        return (f"{self.run_dir}: {self.bytes_before / 1e6:.1f} MB -> {self.bytes_after / 1e6:.1f} MB, removed "
                f"{', '.join(self.removed) or 'nothing'}{kept}")


def _candidates(run_dir: Path) -> tuple[list[tuple[Path, str]], list[tuple[str, str]]]:
    """(weight file, recorded sha256) pairs dlfa wrote, and files left alone with the reason."""
    found: list[tuple[Path, str]] = []
    kept: list[tuple[str, str]] = []
    for sub in MODEL_DIRS:
        folder = run_dir / sub
        checksums = folder / CHECKSUMS_NAME
        if folder.is_symlink() or not checksums.is_file():
            continue
        try:
            digests = read_checksums(checksums)
        except (OSError, ValueError) as exc:
            kept.append((f"{sub}/", f"{CHECKSUMS_NAME} unreadable: {exc}"))
            continue
        for name, digest in digests.items():
            if "/" in name or "\\" in name or not name.endswith(".safetensors"):
                continue  # only weights, only directly in the model folder
            file = folder / name
            if file.is_symlink() or not file.is_file():
                continue  # already gone (pruned before) or not a plain file
            found.append((file, digest))
    return found, kept


def _read_record(run_dir: Path) -> dict[str, Any] | None:
    path = run_dir / PRUNED_FILE
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise DlfaInputError(f"unreadable prune record ({type(exc).__name__})", path=path) from None
    if not isinstance(data, dict) or data.get("format") != PRUNED_FORMAT or not isinstance(data.get("removed"), dict):
        raise DlfaInputError("not a dlfa prune record", path=path)
    return data


def prune_run(run_dir: str | Path) -> PruneResult:
    """Delete the dlfa-written weight files of a finished run; see the module docstring for what is safe.

    Idempotent: pruning a pruned run removes nothing more. Raises :class:`DlfaInputError` for a folder that is not
    a finished run.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise DlfaInputError("run folder not found", path=run_dir)
    if not (run_dir / METRICS_FILE).is_file():
        raise DlfaInputError("not a finished run (metrics.json missing): only a finished run's weights can be "
                             "pruned", path=run_dir)
    before = disk_usage(run_dir)
    from dlfa import __version__

    found, kept = _candidates(run_dir)
    verified: list[tuple[Path, str, int]] = []
    for file, digest in found:
        rel = file.relative_to(run_dir).as_posix()
        if sha256_file(file) != digest:
            kept.append((rel, f"differs from its sha256 in {CHECKSUMS_NAME}: not what dlfa wrote"))
        else:
            verified.append((file, digest, file.stat().st_size))
    if verified:
        # Record first: a crash between the two leaves a record of files that are still there (harmless), never
        # missing weights that nothing explains.
        record = _read_record(run_dir) or {"format": PRUNED_FORMAT, "removed": {}}
        for file, digest, size in verified:
            record["removed"][file.relative_to(run_dir).as_posix()] = {"bytes": size, "sha256": digest}
        record.update({"dlfa_version": __version__,
                       "note": "the model weights were deleted after the run finished (keep_weights = false); "
                               "metrics.json holds its scores; train it again to evaluate or analyse the model"})
        write_json_atomic(run_dir / PRUNED_FILE, record)
        for file, _, _ in verified:
            file.unlink()
    return PruneResult(run_dir, before, disk_usage(run_dir), [f.relative_to(run_dir).as_posix() for f, _, _ in verified],
                       kept)


def check_weights_present(model_dir: str | Path) -> None:
    """Refuse, in one clear line, a model folder whose weights dlfa pruned (for ``dlfa evaluate`` and analyses).

    ``model_dir`` is a run's ``best/`` (or the run folder itself). Does nothing when the weights are there, or
    when they are missing for another reason (the model loader then names the missing file).
    """
    model_dir = Path(model_dir)
    if (model_dir / WEIGHTS_NAME).is_file():
        return
    for run_dir in (model_dir, model_dir.parent):
        record = run_dir / PRUNED_FILE
        if record.is_file():
            raise DlfaInputError(
                f"the model weights of this run were pruned after it finished ({PRUNED_FILE}, keep_weights = "
                f"false), so it cannot be scored again; its scores are in {METRICS_FILE}; train it again with "
                "keep_weights = true to evaluate or analyse the model", path=run_dir)


def finished_runs(root: str | Path) -> list[Path]:
    """Every folder under ``root`` (itself included) that holds metrics.json; a run's own subfolders are not searched."""
    root = Path(root)
    if not root.is_dir():
        raise DlfaInputError("run folder not found", path=root)
    runs = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        if METRICS_FILE in filenames:
            runs.append(Path(dirpath))
            dirnames[:] = []
    return runs


def run_prune(config: PruneConfig) -> list[PruneResult]:
    """Prune every finished run under the given folders (all folders are checked before anything is deleted)."""
    runs = [run for root in config.runs for run in finished_runs(root)]
    if not runs:
        raise DlfaInputError("no finished runs (folders with metrics.json) found", path=config.runs[0])
    for run in runs:
        _read_record(run)  # a damaged record stops everything before the first deletion
    return [prune_run(run) for run in runs]
