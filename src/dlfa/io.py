"""Atomic file writes (a reader, or a crash, never sees a half-written file or folder) and file checksums."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from dlfa.errors import DlfaInputError

TMP_SUFFIX = ".tmp"


@contextlib.contextmanager
def atomic_path(target: str | Path, replace_folder: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside ``target``; on success it is renamed onto ``target``.

    Works for files and folders. On error the temporary is removed and ``target`` is untouched. An existing
    folder is never replaced unless ``replace_folder`` is set, which only the owner of that folder may do (a run
    replacing its own ``best/`` or ``checkpoint/``): an atomic write must not delete a user's folder. A crash between
    the two renames of a folder replacement leaves both versions in the hidden temporary folder, from which
    :func:`recover_folder` restores the newest complete one.
    """
    target = Path(target)
    if target.is_dir() and not target.is_symlink() and not replace_folder:
        raise DlfaInputError("is a folder; refusing to replace it", path=target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=TMP_SUFFIX, dir=target.parent))
    staged = tmp / target.name
    try:
        yield staged
        if target.is_dir() and not target.is_symlink():
            # os.replace cannot replace a non-empty folder: move the old one aside first.
            os.replace(target, tmp / (target.name + ".old"))
        os.replace(staged, target)
        fsync_path(target.parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def recover_folder(target: str | Path, is_complete: Callable[[Path], bool]) -> bool:
    """Finish or undo a folder replacement that a crash interrupted; remove leftover temporaries of ``target``.

    When ``target`` is missing but a temporary holds a complete new version (``is_complete``), that one is moved
    into place, else the old version is put back. Returns True when something was restored.
    """
    target = Path(target)
    leftovers = sorted(target.parent.glob(f".{target.name}.*{TMP_SUFFIX}")) if target.parent.is_dir() else []
    restored = False
    if not target.exists():
        candidates = [t / target.name for t in leftovers] + [t / (target.name + ".old") for t in leftovers]
        for candidate in candidates:
            if candidate.is_dir() and is_complete(candidate):
                os.replace(candidate, target)
                fsync_path(target.parent)
                restored = True
                break
    for leftover in leftovers:
        shutil.rmtree(leftover, ignore_errors=True)
    return restored


def check_new_output(path: str | Path, option: str, allow_existing_folder: bool = False) -> Path:
    """Refuse an output path that names an existing file (or folder), sits in a symlink loop or cannot be created.

    Checked before anything is written, so that a bad ``--output`` is one line and leaves nothing behind.
    """
    path = Path(path)
    try:
        path.resolve(strict=False)
        exists, is_dir = path.exists(), path.is_dir()
    except (OSError, RuntimeError) as exc:  # a symlink loop (RuntimeError before Python 3.13)
        raise DlfaInputError(f"cannot resolve {path} ({getattr(exc, 'strerror', None) or exc})", option=option) from None
    if exists and not is_dir:
        raise DlfaInputError(f"{path} exists and is a file; refusing to replace it", option=option)
    if exists and not allow_existing_folder:
        raise DlfaInputError(f"{path} exists; refusing to replace a folder (choose a new path)", option=option)
    ancestor = path if exists else path.parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise DlfaInputError(f"cannot create {path}: {ancestor} is not a folder", option=option)
    if not os.access(ancestor, os.W_OK | os.X_OK):
        read_only = bool(os.statvfs(ancestor).f_flag & os.ST_RDONLY)
        reason = "is on a read-only file system" if read_only else "is not writable"
        raise DlfaInputError(f"cannot write {path}: {ancestor} {reason}", option=option)
    return path


def write_text_atomic(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())


def write_json_atomic(path: str | Path, data: Any) -> None:
    write_text_atomic(path, json.dumps(data, indent=2, ensure_ascii=False, sort_keys=False) + "\n")


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file, read in 4 MiB chunks (about 1 s per GB, flat memory)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def fsync_path(path: str | Path) -> None:
    """Flush a file (e.g. one written by safetensors) or a folder's entries to disk; best effort.

    Before a checksum vouches for a file, or after a rename, so that a crash cannot leave empty files behind.
    Some file systems refuse fsync on folders; that is ignored.
    """
    flags = os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if Path(path).is_dir() else 0)
    with contextlib.suppress(OSError):
        fd = os.open(path, flags)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


CHECKSUMS_NAME = "checksums.json"
CHECKSUMS_FORMAT = "dlfa-checksums"


def write_checksums(folder: str | Path, names: list[str] | tuple[str, ...]) -> None:
    """Record the sha256 of ``folder/<name>`` for each name in ``folder/checksums.json``.

    Call it after the files are complete: the checksum file is written last (atomically), so its presence vouches
    for every file it lists.
    """
    folder = Path(folder)
    digests = {}
    for name in names:
        fsync_path(folder / name)
        digests[name] = sha256_file(folder / name)
    write_json_atomic(folder / CHECKSUMS_NAME, {"format": CHECKSUMS_FORMAT, "sha256": digests})


def read_checksums(path: str | Path) -> dict[str, str]:
    """File name -> hex sha256 from a checksum file; ValueError (one line) if it is not a valid one.

    OSError (a missing or unreadable file) is left to the caller, which knows whether that is an error.
    """
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"unreadable {Path(path).name} ({str(exc).splitlines()[0]})") from None
    digests = data.get("sha256") if isinstance(data, dict) and data.get("format") == CHECKSUMS_FORMAT else None
    if not isinstance(digests, dict) or not all(
        isinstance(v, str) and len(v) == 64 and all(c in "0123456789abcdef" for c in v) for v in digests.values()
    ):
        raise ValueError(f"{Path(path).name} is not a dlfa checksum file")
    return digests
