"""Atomic file writes (a reader, or a crash, never sees a half-written file or folder) and file checksums."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any


@contextlib.contextmanager
def atomic_path(target: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``target``; on success it is renamed onto ``target``.

    Works for files and folders. On error the temporary is removed and ``target`` is untouched.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    staged = tmp / target.name
    try:
        yield staged
        if target.is_dir() and not target.is_symlink():
            # os.replace cannot replace a non-empty folder: move the old one aside first.
            old = tmp / (target.name + ".old")
            os.replace(target, old)
        os.replace(staged, target)
        fsync_path(target.parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


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
