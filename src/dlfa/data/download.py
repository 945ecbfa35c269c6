"""``dlfa download TASK``: fetch a task's data from its official release and convert it to dlfa's layout.

Why not XTREME's ``download_data.sh``: it needs bash, wget and networkx, and it deletes the gold test labels
(dlfa scores test sets itself, so they are kept here). The conversion follows XTREME's ``utils_preprocess.py``
(and, for UD, its ``conllu_to_conll.py`` fused-form step) so that the examples match XTREME's.

What makes it safe to interrupt and re-run:

* an archive is written to ``downloads/<name>.part``, resumed with an HTTP Range request, checked against its
  SHA-256 and only then renamed to ``downloads/<name>``;
* a converted task folder is built beside its target and renamed into place in one step
  (:func:`dlfa.io.atomic_path`), so a reader never sees half of a dataset;
* checksums: the ones published for these releases are pinned in :data:`SOURCES`; an archive without one is
  trusted on first use and its checksum is recorded in ``checksums.json``, which later downloads must match.

HTTP uses only the standard library (urllib). ``DLFA_DOWNLOAD_MIRROR`` (or ``base_url``) fetches the archives
by file name from another server, e.g. a local mirror; the checksums still apply.

What keeps a bad mirror or a crafted archive from filling the disk or the memory (each refusal is one
:class:`DlfaInputError` line naming the URL, archive, member or line):

* a download may not grow beyond the release's published size (or the size recorded on first use, or
  :data:`UNKNOWN_SIZE_CAP` when neither is known); the partial file, dlfa's own, is removed;
* archives are read as streams, never extracted: every member name is checked (no ``..``, absolute names or
  drive letters), links, devices and other special members are refused, and the bytes an archive decompresses
  to are capped at :data:`MAX_EXPANSION` times its size (at least :data:`EXPANSION_FLOOR`), per zip member too;
* a line of a release file may not exceed :data:`MAX_LINE` bytes, a sentence :data:`MAX_SENTENCE_LINES` lines;
* an OS error (permissions, a full disk, a read-only file system, a symlink loop) is one line naming the path;
  only files dlfa created are ever removed (``.part`` files, the staged conversion, archives it downloaded).
"""

from __future__ import annotations

import bz2
import contextlib
import errno
import gzip
import http.client
import itertools
import json
import lzma
import os
import re
import stat
import tarfile
import time
import urllib.error
import urllib.parse
import urllib.request
import zipfile
import zlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import IO, NamedTuple

from dlfa.errors import DlfaInputError
from dlfa.io import atomic_path, sha256_file, write_json_atomic

MIRROR_ENV = "DLFA_DOWNLOAD_MIRROR"
CHECKSUMS_FILE = "checksums.json"
DOWNLOADS_DIR = "downloads"
PROVENANCE_FILE = "download.json"  # in each converted task folder: sources, options and per-file counts
CHUNK = 1 << 20
USER_AGENT = "dlfa-download/0.1 (Python urllib)"

# Limits (see the module doc). The largest published size here is MultiNLI's 227 MB; UD v2.5's is not pinned.
UNKNOWN_SIZE_CAP = 2 << 30  # bytes a download of unpublished size may reach (Source.max_size overrides it)
# Decompressed bytes per archive byte. gzip and deflate reach ~1000x on repeated data (a bomb); text releases
# such as these compress 3-10x, so 50x leaves a wide margin and still stops a bomb at 5% of its size.
MAX_EXPANSION = 50
EXPANSION_FLOOR = 16 << 20  # tiny archives (tar headers and padding compress ~100x) may always expand this far
MAX_LINE = 1 << 20  # bytes in one line; the longest lines of these releases (MultiNLI's parses) are ~10 KB
MAX_SENTENCE_LINES = 100_000  # lines of one UD or PAN-X sentence, held in memory; real ones have under 2,000
MAX_MEMBERS = 100_000  # members of one archive; UD v2.5, the largest, has about 2,000 files
MAX_TAR_HEADER = 1 << 20  # data of one pax or GNU long-name header (tarfile reads it into memory whole)


@dataclass(frozen=True)
class Source:
    """One archive of a task: where to get it and what its bytes hash to.

    ``sha256=None`` means no checksum was published: the archive is trusted on first use (see module doc).
    ``size``: the published size in bytes; a transfer that announces another size or grows beyond it is refused.
    ``verified_by`` says where a pinned checksum comes from, so it can be re-checked. ``max_size``: where the
    size is unknown, the most bytes a transfer may reach (default :data:`UNKNOWN_SIZE_CAP`).
    """

    filename: str
    url: str
    sha256: str | None = None
    size: int | None = None
    verified_by: str = ""
    max_size: int | None = None


# The official sources XTREME uses (scripts/download_data.sh), with the gold test labels kept. XNLI's English
# training data is MultiNLI's release (XTREME took the same 392,702 pairs from XNLI-MT's copy).
SOURCES: dict[str, list[Source]] = {
    "udpos": [
        Source(
            "ud-treebanks-v2.5.tgz",
            "https://lindat.mff.cuni.cz/repository/xmlui/bitstream/handle/11234/1-3105/ud-treebanks-v2.5.tgz",
            "5ff973e44345a5f69b94cc1427158e14e851c967d58773cc2ac5a1d3adaca409",
            None,
            "pyconll's corpus registry (tests/int), two versions agreeing",
        ),
    ],
    "xnli": [
        Source(
            "XNLI-1.0.zip",
            "https://dl.fbaipublicfiles.com/XNLI/XNLI-1.0.zip",
            "4ba1d5e1afdb7161f0f23c66dc787802ccfa8a25a3ddd3b165a35e50df346ab1",
            17865352,
            "TensorFlow Datasets url_checksums/xnli.txt (NYU mirror of the same file, same size)",
        ),
        Source(
            "multinli_1.0.zip",
            "https://cims.nyu.edu/~sbowman/multinli/multinli_1.0.zip",
            "049f507b9e36b1fcb756cfd5aeb3b7a0cfcb84bf023793652987f7e7e0957822",
            226850426,
            "TensorFlow Datasets url_checksums/multi_nli.txt",
        ),
    ],
    "pawsx": [
        Source(
            "x-final.tar.gz",
            "https://storage.googleapis.com/paws/pawsx/x-final.tar.gz",
            "4146db499101d66e68ae4c8ed3cf9dadecd625f44b7d8cf3d4a0fe93afc4fd9f",
            30282057,
            "TensorFlow Datasets text/paws_x_wiki/checksums.tsv",
        ),
    ],
    # PAN-X (WikiANN, Rahimi et al.'s splits) cannot be fetched reliably: it is a manual download, see
    # PANX_ARCHIVES and PANX_MANUAL.
    "panx": [],
}

# Archives accepted by ``dlfa download panx --archive``: the same <lang>.tar.gz files (train/dev/test) packed
# two ways. Known names are checked against their published checksum where there is one.
PANX_ARCHIVES: dict[str, Source] = {
    "panx_dataset.tar": Source(
        "panx_dataset.tar",
        "https://www.dropbox.com/s/12h3qqog6q4bjve/panx_dataset.tar?dl=1",
        "e2720a94b6590d4d70e9a7725106d1e5bdaafde730e06d8101ce4981d1417cce",
        234126336,
        "TensorFlow Datasets text/wikiann/checksums.tsv",
    ),
    "AmazonPhotos.zip": Source(
        "AmazonPhotos.zip", "https://www.amazon.com/clouddrive/share/d3KGCRCIYwhKJF0H3eWA26hjg2ZCRhjpEQtDL70FSBN"
    ),
}

PANX_MANUAL = (
    "PAN-X (WikiANN) cannot be downloaded automatically: get panx_dataset.tar "
    f"({PANX_ARCHIVES['panx_dataset.tar'].url}) or AmazonPhotos.zip ({PANX_ARCHIVES['AmazonPhotos.zip'].url}) "
    "in a browser, then run `dlfa download panx --archive PATH` (PATH: that file, per-language <lang>.tar.gz "
    "files, or a folder of them; see docs/data.md)"
)

# conllu_to_conll.py's POS ranks, used to pick the word that carries a fused token's tag when several words of
# the span are equally high in the tree.
POS_PRECEDENCE: dict[str, tuple[str, ...]] = {
    "default": ("VERB", "NOUN", "PROPN", "PRON", "ADJ", "NUM", "ADV", "INTJ", "AUX", "ADP", "DET", "PART", "CCONJ",
                "SCONJ", "X", "PUNCT"),
    "es": ("VERB", "AUX", "PRON", "ADP", "DET"),
    "fr": ("VERB", "AUX", "PRON", "NOUN", "ADJ", "ADV", "ADP", "DET", "PART", "SCONJ", "CONJ"),
    "it": ("VERB", "AUX", "ADV", "PRON", "ADP", "DET", "INTJ"),
}  # fmt: skip

_UD_FILE = re.compile(r"(?P<lang>[a-z]{2,3})_(?P<tb>[a-z0-9]+)-ud-(?P<split>train|dev|test)\.conllu")
_PANX_ARCHIVE = re.compile(r"(?P<lang>[a-z]+(?:-[a-z]+)*)\.tar\.gz")
_PANX_SPLITS = ("train", "dev", "test")
_PAWSX_FILES = {"train.tsv": "train", "translated_train.tsv": "translate-train", "dev_2k.tsv": "dev",
                "test_2k.tsv": "test"}  # fmt: skip
_NLI_LABELS = ("entailment", "neutral", "contradiction")
_NER_TAGS = ("O", "B-PER", "I-PER", "B-ORG", "I-ORG", "B-LOC", "I-LOC")
# Line separators other than \n that some readers (str.splitlines) would split on; replaced by a space.
_ODD_SEPARATORS = {ord(c): " " for c in "\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029"}

Log = Callable[[str], None]


# -- public entry point ------------------------------------------------------------------------------------------


def download(
    task: str,
    output: str | Path = "data",
    *,
    archives: Sequence[str | Path] = (),
    languages: Sequence[str] | None = None,
    base_url: str | None = None,
    sources: Sequence[Source] | None = None,
    fused_forms: bool = True,
    keep_archives: bool = True,
    attempts: int = 4,
    backoff: float = 1.0,
    timeout: float = 60.0,
    progress: bool = True,
    validate: bool = True,
    log: Log = print,
) -> Path:
    """Download (or take from ``archives``) a task's release, verify it, convert it into ``output/<task>``.

    ``languages``: the languages to convert (default: the task's XTREME list; ``["all"]``: every language in
    the release); English is always included since it is the training language. ``sources`` replaces the
    task's entries of :data:`SOURCES` (tests, other mirrors); ``base_url`` (default: ``$DLFA_DOWNLOAD_MIRROR``)
    fetches each archive as ``<base_url>/<file name>``. ``fused_forms`` (UD only): XTREME's tokens, where a
    multi-word token such as Spanish *del* (= *de el*) is one word tagged like its head; ``False`` keeps UD's
    syntactic words. ``backoff`` is the first retry delay in seconds (it doubles each time).
    Returns the converted task folder. Every failure is a one-line :class:`DlfaInputError`.
    """
    if task not in SOURCES:
        raise DlfaInputError(f"unknown task {task!r} (known: {', '.join(sorted(SOURCES))})", option="TASK")
    if attempts < 1:
        raise DlfaInputError("must be at least 1", option="attempts")
    output = Path(output)
    output_stat = _stat(output)
    if output_stat is not None and not stat.S_ISDIR(output_stat.st_mode):
        raise DlfaInputError("output exists and is not a folder", path=output)
    target = output / task
    made_by_dlfa = (target / PROVENANCE_FILE).is_file()
    if _stat(target) is not None and not made_by_dlfa:
        # Never replace what dlfa did not make; a folder it made is made again.
        raise DlfaInputError("folder exists and was not made by `dlfa download`; refusing to replace it (move it "
                             "away or choose another --output)", path=target)
    _check_writable(output)
    created_output = output_stat is None
    opts = _Options(attempts, backoff, timeout, progress, log)
    checksums = _load_checksums(output / CHECKSUMS_FILE)
    fetched: list[Path] = []
    try:
        try:
            if task == "panx":
                if not archives:
                    raise DlfaInputError(PANX_MANUAL, option="--archive")
                obtained = [_local_panx_archive(Path(p), checksums, output) for p in archives]
            else:
                obtained = _obtain_all(task, output, archives, base_url, sources, checksums, opts, fetched)
            with atomic_path(target, replace_folder=made_by_dlfa) as staged:
                staged.mkdir()
                try:
                    stats = _convert(task, [o.path for o in obtained], staged, target, languages, fused_forms, log)
                    if validate:
                        _validate(task, staged)
                except DlfaInputError:
                    # An archive trusted on first use that does not convert is not the release: do not keep it.
                    for item in obtained:
                        if item.checksum == "trust-on-first-use" and item.path in fetched:
                            with contextlib.suppress(OSError):
                                item.path.unlink(missing_ok=True)
                    raise
                provenance = {
                    "task": task,
                    "sources": [o.record() for o in obtained],
                    "options": {"languages": list(languages) if languages else None, "fused_forms": fused_forms},
                    "files": stats,
                }
                try:
                    write_json_atomic(staged / PROVENANCE_FILE, provenance)
                except OSError as exc:
                    raise _os_error(exc, target / PROVENANCE_FILE, "cannot write") from None
        except OSError as exc:
            # Whatever else the file system refused (creating the staged task folder, renaming it into place, ...).
            raise _os_error(exc, exc.filename or target, "file system error") from None
    except BaseException:
        _prune_empty(output / DOWNLOADS_DIR, output if created_output else None)
        raise
    for item in obtained:
        if item.checksum != "folder":
            checksums[item.path.name] = item.record()
    try:
        write_json_atomic(output / CHECKSUMS_FILE, checksums)
    except OSError as exc:
        raise _os_error(exc, output / CHECKSUMS_FILE,
                        f"{target} is complete, but the checksums could not be recorded") from None
    if not keep_archives:
        for path in fetched:
            try:
                path.unlink(missing_ok=True)
            except OSError as exc:
                log(f"could not remove {path}: {_reason(exc)}")
        _prune_empty(output / DOWNLOADS_DIR, None)
    total = sum(s["examples"] for s in stats.values())
    log(f"{task}: {len(stats)} files, {total} examples in {target}")
    return target


# -- obtaining and verifying archives ----------------------------------------------------------------------------


@dataclass
class _Options:
    attempts: int
    backoff: float
    timeout: float
    progress: bool
    log: Log


@dataclass
class _Obtained:
    """A verified archive and how its checksum was established."""

    path: Path
    sha256: str
    url: str | None
    checksum: str  # "pinned", "recorded" (trusted on an earlier first use) or "trust-on-first-use"

    def record(self) -> dict:
        return {"file": self.path.name, "sha256": self.sha256, "bytes": self.path.stat().st_size, "url": self.url,
                "checksum": "trust-on-first-use" if self.checksum == "recorded" else self.checksum}


def _load_checksums(path: Path) -> dict[str, dict]:
    if not path.exists():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DlfaInputError(f"cannot read the recorded checksums ({exc})", path=path) from None
    if not isinstance(data, dict) or not all(isinstance(v, dict) and isinstance(v.get("sha256"), str)
                                             for v in data.values()):
        raise DlfaInputError("expected an object of {file: {sha256: ...}}", path=path)
    return data


def _expected(source: Source, checksums: dict[str, dict]) -> tuple[str | None, str]:
    """The checksum an archive must have and its origin ("pinned", "recorded" or none yet)."""
    if source.sha256:
        return source.sha256.lower(), "pinned"
    if source.filename in checksums:
        return checksums[source.filename]["sha256"].lower(), "recorded"
    return None, "trust-on-first-use"


def _mismatch(name: str, got: str, expected: str, how: str, checksums_path: Path) -> str:
    where = "the checksum published for this release" if how == "pinned" else f"the one recorded in {checksums_path}"
    hint = "" if how == "pinned" else " (delete its entry there if the new file is the one you want)"
    return f"checksum mismatch for {name}: sha256 {got}, expected {expected} ({where}){hint}; nothing was kept"


def _obtain_all(task: str, output: Path, archives: Sequence[str | Path], base_url: str | None,
                sources: Sequence[Source] | None, checksums: dict[str, dict], opts: _Options,
                fetched: list[Path]) -> list[_Obtained]:
    """Every source of the task: a given local archive (matched by file name) or a verified download."""
    wanted = list(sources) if sources is not None else SOURCES[task]
    local = {Path(p).name: Path(p) for p in archives}
    unknown = sorted(set(local) - {s.filename for s in wanted})
    if unknown:
        names = ", ".join(s.filename for s in wanted)
        raise DlfaInputError(f"{unknown[0]} is not an archive of {task} (expected: {names})", option="--archive")
    base_url = base_url if base_url is not None else os.environ.get(MIRROR_ENV) or None
    result = []
    for source in wanted:
        expected, how = _expected(source, checksums)
        if source.filename in local:
            path = local[source.filename]
            _check_archive_file(path)
            digest = _sha256(path)
            if expected and digest != expected:
                raise DlfaInputError(_mismatch(path.name, digest, expected, how, output / CHECKSUMS_FILE), path=path)
            result.append(_Obtained(path, digest, source.url, how))
            continue
        url = f"{base_url.rstrip('/')}/{urllib.parse.quote(source.filename)}" if base_url else source.url
        cap = _size_cap(source, how, checksums, output / CHECKSUMS_FILE)
        path, digest = _download_verified(source, url, output, expected, how, cap, opts)
        fetched.append(path)
        result.append(_Obtained(path, digest, url, how))
        note = {"pinned": "matches the published checksum", "recorded": f"matches {output / CHECKSUMS_FILE}"}.get(
            how, f"no published checksum: trusted on first use, recorded in {output / CHECKSUMS_FILE}")
        opts.log(f"sha256 {digest}  {source.filename} ({note})")
    return result


_RELEASE_SIZE = "the release's size"


@dataclass(frozen=True)
class _SizeCap:
    """The most bytes a download may have; ``exact``: it must have exactly that many (a known size)."""

    limit: int
    exact: bool
    origin: str  # where the figure comes from, for messages

    def announced(self, total: int) -> str | None:
        """Why a transfer announcing ``total`` bytes is refused before anything is written, or None."""
        if self.exact and total != self.limit:
            has = f"the release has {self.limit}" if self.origin == _RELEASE_SIZE else (
                f"expected {self.limit} ({self.origin})")
            return f"the server offers {total} bytes, {has}: not the expected file"
        if total > self.limit:
            return f"the server offers {total} bytes, more than {self.limit} ({self.origin}): refused"
        return None

    def exceeded(self) -> str:
        return f"the server sends more than {self.limit} bytes ({self.origin}): refused; the partial download " \
               "was removed"


def _size_cap(source: Source, how: str, checksums: dict[str, dict], checksums_path: Path) -> _SizeCap:
    """From the known sizes: the published one, else the one recorded on first use, else a generous cap."""
    if source.size is not None:
        return _SizeCap(source.size, True, _RELEASE_SIZE)
    recorded = checksums.get(source.filename, {}).get("bytes") if how == "recorded" else None
    if isinstance(recorded, int) and not isinstance(recorded, bool) and recorded > 0:
        return _SizeCap(recorded, True, f"the size recorded in {checksums_path} on first use")
    return _SizeCap(source.max_size or UNKNOWN_SIZE_CAP, False, "the cap for a download of unpublished size")


def _download_verified(source: Source, url: str, output: Path, expected: str | None, how: str, cap: _SizeCap,
                       opts: _Options) -> tuple[Path, str]:
    """``downloads/<file>``, complete and matching ``expected``; reused when already there."""
    downloads = output / DOWNLOADS_DIR
    final = downloads / source.filename
    final_stat = _stat(final)
    if final_stat is not None:
        if not stat.S_ISREG(final_stat.st_mode):
            raise DlfaInputError("exists and is not a file; move it away", path=final)
        digest = _sha256(final)
        if expected is None or digest == expected:
            opts.log(f"using {final} (already downloaded)")
            return final, digest
        # Not what dlfa would have put there (it renames only verified files): never replace it.
        raise DlfaInputError(f"exists and does not match its checksum (sha256 {digest}, expected {expected}); "
                             "move it away or delete it to download the file again", path=final)
    part = downloads / (source.filename + ".part")
    part_stat = _stat(part, follow=False)
    if part_stat is not None and not stat.S_ISREG(part_stat.st_mode):
        raise DlfaInputError("exists and is not dlfa's partial download (not a plain file); move it away", path=part)
    if part_stat is not None and part_stat.st_size > cap.limit:
        opts.log(f"{part} is larger than the file can be; downloading from the start")
        part.unlink()
    resumed = part.is_file() and part.stat().st_size > 0
    while True:
        size = part.stat().st_size if part.is_file() else 0
        if cap.exact and size == cap.limit:
            opts.log(f"{part} is complete; checking it")
        else:
            opts.log(f"downloading {url}" + (f" (resuming at {size} bytes)" if resumed else ""))
            _fetch(url, part, cap, opts)
        digest = _sha256(part)
        if expected is None or digest == expected:
            try:
                os.replace(part, final)
            except OSError as exc:
                raise _os_error(exc, final, "cannot move the verified download into place") from None
            return final, digest
        part.unlink(missing_ok=True)
        if not resumed:
            raise DlfaInputError(_mismatch(source.filename, digest, expected, how, output / CHECKSUMS_FILE), path=url)
        opts.log("the resumed partial download does not match the checksum; downloading from the start")
        resumed = False


class _Restart(Exception):
    """The server sent something other than the requested byte range: start the file again."""


def _fetch(url: str, part: Path, cap: _SizeCap, opts: _Options) -> None:
    """Fill ``part`` with the whole file at ``url``, resuming what it holds; retries transient failures.

    Errors of the local file system are not retried: :func:`_transfer` raises them as one line.
    """
    failures = 0
    furthest = part.stat().st_size if part.is_file() else 0
    while True:
        offset = part.stat().st_size if part.is_file() else 0
        try:
            if _transfer(url, part, offset, cap, opts):
                return
            problem = "the server closed the connection before the end of the file"
        except urllib.error.HTTPError as exc:
            exc.close()
            if exc.code == 416 and offset:
                part.unlink()  # the partial file is not a prefix of what the server has
                problem = "the server refused to resume (HTTP 416)"
            elif exc.code in (408, 425, 429) or exc.code >= 500:
                problem = f"HTTP {exc.code} {exc.reason}"
            else:
                raise DlfaInputError(f"download failed: HTTP {exc.code} {exc.reason}", path=url) from None
        except _Restart as exc:
            part.unlink(missing_ok=True)
            problem = str(exc)
        except (urllib.error.URLError, http.client.HTTPException, OSError) as exc:
            problem = _describe(exc)
        now = part.stat().st_size if part.is_file() else 0
        if now > furthest:  # progress: a truncated transfer that moved forward is not a failure
            furthest = now
            failures = 0
            continue
        failures += 1
        if failures >= opts.attempts:
            kept = (f"; the partial download ({now} bytes) is kept in {part} and resumes on the next run"
                    if now else "; nothing was written")
            raise DlfaInputError(f"download failed after {opts.attempts} attempts ({problem}){kept}", path=url)
        delay = opts.backoff * 2 ** (failures - 1)
        opts.log(f"{problem}; retrying in {delay:g} s")
        time.sleep(delay)


def _describe(exc: BaseException) -> str:
    if isinstance(exc, urllib.error.URLError) and not isinstance(exc, urllib.error.HTTPError):
        return f"cannot reach the server: {exc.reason}"
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


class _PartFile:
    """``downloads/<file>.part`` opened for appending; a local OS error becomes one line naming the file.

    Opened without following a symbolic link, so that a link planted there cannot make dlfa write elsewhere.
    """

    def __init__(self, part: Path, append: bool) -> None:
        self.part = part
        flags = os.O_WRONLY | os.O_CREAT | (os.O_APPEND if append else os.O_TRUNC) | getattr(os, "O_NOFOLLOW", 0)
        try:
            part.parent.mkdir(parents=True, exist_ok=True)
            self.handle = os.fdopen(os.open(part, flags, 0o666), "ab" if append else "wb")
        except OSError as exc:
            raise _os_error(exc, exc.filename or part, "cannot write the download") from None

    def write(self, data: bytes) -> None:
        try:
            self.handle.write(data)
        except OSError as exc:
            raise self._failed(exc) from None

    def close(self, sync: bool) -> None:
        try:
            if sync:
                self.handle.flush()
                os.fsync(self.handle.fileno())
            self.handle.close()
        except OSError as exc:
            with contextlib.suppress(OSError):
                self.handle.close()
            raise self._failed(exc) from None

    def _failed(self, exc: OSError) -> DlfaInputError:
        with contextlib.suppress(OSError):
            self.handle.close()
        size = self.part.stat().st_size if self.part.is_file() else 0
        kept = f"; the partial download ({size} bytes) is kept and resumes on the next run" if size else ""
        return _os_error(exc, self.part, "cannot write the download", kept)


def _transfer(url: str, part: Path, offset: int, cap: _SizeCap, opts: _Options) -> bool:
    """One request; appends to ``part`` from ``offset``. True when the file is complete.

    Never lets ``part`` grow beyond ``cap``: a server that announces more, or sends more than it announced or
    than the cap allows (a mirror streaming forever), is refused and the partial file, dlfa's own, removed.
    """
    headers = {"User-Agent": USER_AGENT, "Accept-Encoding": "identity"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    request = urllib.request.Request(url, headers=headers)
    with urllib.request.urlopen(request, timeout=opts.timeout) as response:
        length_header = response.headers.get("Content-Length")
        length = int(length_header) if length_header and length_header.strip().isdigit() else None
        if offset and response.status == 206:
            start, total = _content_range(response.headers.get("Content-Range"))
            if start != offset:
                raise _Restart(f"the server resumed at byte {start}, not {offset}")
        else:
            offset, total = 0, length  # the server ignored the Range header: start again
        if total is None and length is not None:
            total = offset + length
        refusal = cap.announced(total) if total is not None else None
        if refusal:
            part.unlink(missing_ok=True)
            raise DlfaInputError(refusal, path=url)
        from tqdm import tqdm

        received = 0
        out = _PartFile(part, append=bool(offset))
        try:
            with tqdm(total=total, initial=offset, unit="B", unit_scale=True, unit_divisor=1024,
                      desc=part.name[:-5], disable=None if opts.progress else True, leave=False) as bar:
                while chunk := response.read(CHUNK):
                    if offset + received + len(chunk) > cap.limit:
                        out.close(sync=False)
                        part.unlink(missing_ok=True)
                        raise DlfaInputError(cap.exceeded(), path=url)
                    out.write(chunk)
                    received += len(chunk)
                    bar.update(len(chunk))
        finally:
            if not out.handle.closed:
                out.close(sync=True)
    return length is None or received >= length


def _content_range(value: str | None) -> tuple[int, int | None]:
    match = re.fullmatch(r"\s*bytes\s+(\d+)-(\d+)/(\d+|\*)\s*", value or "")
    if not match:
        raise _Restart(f"unreadable Content-Range {value!r}")
    return int(match.group(1)), None if match.group(3) == "*" else int(match.group(3))


def _local_panx_archive(path: Path, checksums: dict[str, dict], output: Path) -> _Obtained:
    """A PAN-X archive the user downloaded: checked against the published or the recorded checksum."""
    found = _stat(path)
    if found is None:
        raise DlfaInputError("archive not found", path=path)
    if stat.S_ISDIR(found.st_mode):
        return _Obtained(path, "", None, "folder")
    _check_archive_file(path)
    known = PANX_ARCHIVES.get(path.name, Source(path.name, ""))
    expected, how = _expected(known, checksums)
    digest = _sha256(path)
    if expected and digest != expected:
        raise DlfaInputError(_mismatch(path.name, digest, expected, how, output / CHECKSUMS_FILE), path=path)
    return _Obtained(path, digest, known.url or None, how)


def _prune_empty(folder: Path, also: Path | None) -> None:
    """Remove folders this run created and left empty (a failed run leaves nothing behind); best effort."""
    for path in (folder, also):
        with contextlib.suppress(OSError):
            if path is not None and path.is_dir() and not path.is_symlink() and not any(path.iterdir()):
                path.rmdir()


# -- file system errors ------------------------------------------------------------------------------------------

_OS_REASONS = {
    errno.ENOSPC: "no space left on the device",
    errno.EROFS: "read-only file system",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
    errno.ELOOP: "too many levels of symbolic links (a symlink loop?)",
    errno.ENOTDIR: "a part of the path is not a folder",
    errno.ENAMETOOLONG: "file name too long",
    errno.EISDIR: "is a folder",
    errno.EIO: "input/output error",
}
if hasattr(errno, "EDQUOT"):
    _OS_REASONS[errno.EDQUOT] = "disk quota exceeded"


def _reason(exc: OSError) -> str:
    return _OS_REASONS.get(exc.errno or -1) or exc.strerror or str(exc) or type(exc).__name__


def _os_error(exc: OSError, path: str | Path | None, doing: str, tail: str = "") -> DlfaInputError:
    """One line for an OS error: the path, what dlfa was doing and the system's reason."""
    return DlfaInputError(f"{doing}: {_reason(exc)}{tail}", path=path if path is not None else exc.filename)


def _stat(path: Path, follow: bool = True) -> os.stat_result | None:
    """``path``'s stat, None when it does not exist; any other failure (a symlink loop, ...) is one line."""
    try:
        return path.stat() if follow else path.lstat()
    except FileNotFoundError:
        if follow and path.is_symlink():
            raise DlfaInputError("is a symbolic link to a missing path", path=path) from None
        return None
    except OSError as exc:
        raise _os_error(exc, path, "cannot access") from None


def _check_writable(output: Path) -> None:
    """Refuse up front an output dlfa could not write (checked before anything is downloaded)."""
    folder = output
    found = _stat(folder)
    while found is None and folder.parent != folder:
        folder = folder.parent
        found = _stat(folder)
    if found is None:
        return
    if not stat.S_ISDIR(found.st_mode):
        raise DlfaInputError("is not a folder", path=folder)
    read_only = False
    with contextlib.suppress(OSError, AttributeError):
        read_only = bool(os.statvfs(folder).f_flag & os.ST_RDONLY)
    if read_only:
        raise DlfaInputError("cannot write here: read-only file system", path=folder)
    if not os.access(folder, os.W_OK | os.X_OK):
        raise DlfaInputError("cannot write here: permission denied", path=folder)


def _check_archive_file(path: Path) -> None:
    found = _stat(path)
    if found is None:
        raise DlfaInputError("archive not found", path=path)
    if not stat.S_ISREG(found.st_mode):
        raise DlfaInputError("archive is not a regular file (a folder, device or FIFO)", path=path)


def _sha256(path: Path) -> str:
    try:
        return sha256_file(path)
    except OSError as exc:
        raise _os_error(exc, path, "cannot read") from None


# -- reading archives --------------------------------------------------------------------------------------------


# Errors that a damaged archive raises while it is read (gzip.BadGzipFile is an OSError).
_READ_ERRORS = (tarfile.TarError, zipfile.BadZipFile, EOFError, zlib.error, lzma.LZMAError, OSError)
_DRIVE = re.compile(r"[A-Za-z]:")


class _Budget:
    """The bytes an archive may decompress to: :data:`MAX_EXPANSION` times its size, at least the floor.

    Bytes read from a nested archive count against the enclosing archive's budget too.
    """

    def __init__(self, where: str, size: int, parent: _Budget | None) -> None:
        self.where, self.size, self.parent = where, size, parent
        self.limit = max(EXPANSION_FLOOR, MAX_EXPANSION * size)
        self.used = 0

    def charge(self, count: int, member: str) -> None:
        budget: _Budget | None = self
        while budget is not None:
            budget.used += count
            budget = budget.parent
        self.check(0, member)

    def check(self, ahead: int, member: str) -> None:
        """Refuse now if ``ahead`` more bytes would go over the budget (or an enclosing archive's)."""
        if self.used + ahead > self.limit:
            raise DlfaInputError(
                f"expands to more than {self.limit} bytes ({MAX_EXPANSION}x its {self.size} bytes, at least "
                f"{EXPANSION_FLOOR}) at member {member!r}: refused as a likely decompression bomb", path=self.where)
        if self.parent is not None:
            self.parent.check(ahead, member)


class _Member(NamedTuple):
    """A regular file of an archive: its name, a stream of its bytes (valid until the next member), its size
    and the decompression budget of its archive (which an archive nested in it also draws on)."""

    name: str
    stream: IO[bytes]
    size: int
    budget: _Budget


class _Counted:
    """A decompressed stream whose every byte is charged to a budget (tar headers and skipped members too)."""

    def __init__(self, source: IO[bytes], budget: _Budget) -> None:
        self.source, self.budget, self.member = source, budget, "(tar headers)"

    def read(self, size: int = -1) -> bytes:
        data = self.source.read(size if size is not None and size >= 0 else CHUNK)
        self.budget.charge(len(data), self.member)
        return data


class _HeaderTooLarge(Exception):
    pass


class _GuardedTarInfo(tarfile.TarInfo):
    """Refuses a huge pax or GNU long-name header before tarfile reads its data into memory.

    ``_proc_member`` is tarfile's documented hook for subclasses ("can be overridden in a subclass").
    """

    _META_TYPES = (tarfile.XHDTYPE, tarfile.XGLTYPE, tarfile.SOLARIS_XHDTYPE, tarfile.GNUTYPE_LONGNAME,
                   tarfile.GNUTYPE_LONGLINK)

    def _proc_member(self, tarfile):  # tarfile's own signature, hence no annotations
        if self.type in self._META_TYPES and self.size > MAX_TAR_HEADER:
            raise _HeaderTooLarge(f"a {self.size}-byte extended header (more than {MAX_TAR_HEADER}): refused")
        return super()._proc_member(tarfile)


def _member_problem(name: str) -> str | None:
    """Why a member name is refused: a release never has one that could point outside its folder."""
    if not name or "\x00" in name:
        return "has an empty name" if not name else "has a NUL byte in its name"
    if name.startswith(("/", "\\")) or _DRIVE.match(name):
        return "has an absolute name"
    if ".." in name.replace("\\", "/").split("/"):
        return "has a '..' component (path traversal)"
    return None


def _tar_type_problem(member: tarfile.TarInfo) -> str | None:
    if member.issym():
        return f"is a symbolic link (to {member.linkname!r})"
    if member.islnk():
        return f"is a hard link (to {member.linkname!r})"
    if member.ischr() or member.isblk():
        return "is a device file"
    if member.isfifo():
        return "is a FIFO"
    if member.issparse():
        return "is a sparse file"
    if not (member.isfile() or member.isdir()):
        return f"has the unsupported type {member.type!r}"
    return None


def _zip_type_problem(info: zipfile.ZipInfo) -> str | None:
    mode = info.external_attr >> 16
    if info.create_system != 3 or not stat.S_IFMT(mode):  # no Unix file type recorded: a plain file or folder
        return None
    if stat.S_ISLNK(mode):
        return "is a symbolic link"
    if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
        return "is a device file or another special file"
    return None


def _refuse_member(where: str, name: str, problem: str) -> DlfaInputError:
    return DlfaInputError(f"member {name!r} {problem}: refused (an archive is read, never extracted, and a "
                          "release has no such member)", path=where)


def _archive_members(path: Path) -> Iterator[_Member]:
    """Every regular file of a zip or tar archive (plain, gzip, bzip2 or xz), in archive order, as a stream.

    Nothing is extracted. Every member is checked (:func:`_member_problem`, links, devices) and the
    decompressed bytes are capped (:class:`_Budget`); each refusal is one line naming the archive and member.
    """
    where = str(path)
    try:
        size = path.stat().st_size
        if zipfile.is_zipfile(path):
            yield from _zip_members(path, where, size)
            return
        with open(path, "rb") as raw:
            yield from _tar_members(raw, where, size, None)
    except _READ_ERRORS as exc:
        if isinstance(exc, OSError) and exc.errno is not None:
            raise _os_error(exc, path, "cannot read the archive") from None
        raise DlfaInputError(f"not a readable zip or tar archive ({exc})", path=path) from None


def _zip_members(path: Path, where: str, size: int) -> Iterator[_Member]:
    budget = _Budget(where, size, None)
    with zipfile.ZipFile(path) as archive:
        infos = archive.infolist()
        if len(infos) > MAX_MEMBERS:
            raise DlfaInputError(f"more than {MAX_MEMBERS} members: refused", path=where)
        for info in infos:  # all of them, before anything is converted
            problem = _member_problem(info.filename) or _zip_type_problem(info)
            if problem:
                raise _refuse_member(where, info.filename, problem)
        for info in infos:
            if info.is_dir() or _is_junk(info.filename):
                continue
            # zipfile never yields more than the declared size, so the declared sizes bound what is read.
            if info.file_size > max(EXPANSION_FLOOR, MAX_EXPANSION * info.compress_size):
                raise DlfaInputError(
                    f"member {info.filename!r} expands {info.file_size / max(info.compress_size, 1):.0f}x "
                    f"({info.compress_size} to {info.file_size} bytes, more than {MAX_EXPANSION}x): refused as a "
                    "likely decompression bomb", path=where)
            budget.check(info.file_size, info.filename)
            budget.charge(info.file_size, info.filename)
            with archive.open(info) as stream:
                yield _Member(info.filename, stream, info.file_size, budget)


def _tar_members(raw: IO[bytes], where: str, size: int, parent: _Budget | None) -> Iterator[_Member]:
    """A tar archive read as one stream from ``raw`` (its compression recognised by its first bytes)."""
    budget = _Budget(where, size, parent)
    magic = raw.peek(6)[:6] if hasattr(raw, "peek") else b""
    with contextlib.ExitStack() as stack:
        data: IO[bytes] = raw
        if magic.startswith(b"\x1f\x8b"):
            data = stack.enter_context(gzip.GzipFile(fileobj=raw, mode="rb"))
        elif magic.startswith(b"BZh"):
            data = stack.enter_context(bz2.BZ2File(raw))
        elif magic.startswith(b"\xfd7zXZ\x00"):
            data = stack.enter_context(lzma.LZMAFile(raw))
        counted = _Counted(data, budget)
        try:
            archive = stack.enter_context(
                tarfile.open(fileobj=counted, mode="r|", bufsize=CHUNK, tarinfo=_GuardedTarInfo))
            for number, member in enumerate(archive, start=1):
                if number > MAX_MEMBERS:
                    raise DlfaInputError(f"more than {MAX_MEMBERS} members: refused", path=where)
                problem = _member_problem(member.name) or _tar_type_problem(member)
                if problem:
                    raise _refuse_member(where, member.name, problem)
                if member.isdir():
                    continue
                budget.check(member.size, member.name)  # the header says how much follows: refuse early
                if _is_junk(member.name):
                    continue
                stream = archive.extractfile(member)
                if stream is None:
                    continue
                counted.member = member.name
                with stream:
                    yield _Member(member.name, stream, member.size, budget)
                counted.member = "(tar headers)"
        except _HeaderTooLarge as exc:
            raise DlfaInputError(str(exc), path=where) from None


def _nested_tar_members(stream: IO[bytes], where: str, size: int, parent: _Budget | None) -> Iterator[_Member]:
    """:func:`_tar_members` of an archive inside an archive (PAN-X's <lang>.tar.gz), errors as one line."""
    try:
        yield from _tar_members(stream, where, size, parent)
    except _READ_ERRORS as exc:
        raise DlfaInputError(f"not a readable tar archive ({exc})", path=where) from None


def _is_junk(name: str) -> bool:
    """macOS resource forks (``__MACOSX/``, ``._name``) that some release zips carry."""
    parts = PurePosixPath(name).parts
    return "__MACOSX" in parts or PurePosixPath(name).name.startswith("._")


def _lines(stream: IO[bytes], where: str) -> Iterator[str]:
    """Decoded lines without their line end; split on ``\\n`` only, as dlfa's readers do.

    A line is read up to :data:`MAX_LINE` bytes, so one enormous line is refused, never held in memory.
    """
    number = 0
    while True:
        try:
            raw = stream.readline(MAX_LINE + 1)
        except _READ_ERRORS as exc:
            raise DlfaInputError(f"cannot read the archive member ({exc})", path=where,
                                 line=number + 1) from None
        if not raw:
            return
        number += 1
        if len(raw) > MAX_LINE and not raw.endswith(b"\n"):
            raise DlfaInputError(f"a line longer than {MAX_LINE} bytes: refused (no release has one)",
                                 path=where, line=number)
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise DlfaInputError(f"not valid UTF-8 (byte {exc.start})", path=where, line=number) from None
        if number == 1:
            line = line.removeprefix("\ufeff")
        yield line.rstrip("\r\n")


def _check_sentence(sentence: list[str], where: str, number: int) -> None:
    """A sentence is held in memory until its end: refuse one that does not end."""
    if len(sentence) >= MAX_SENTENCE_LINES:
        raise DlfaInputError(f"a sentence of more than {MAX_SENTENCE_LINES} lines: refused (no release has one)",
                             path=where, line=number)


def _clean(text: str) -> str:
    return text.translate(_ODD_SEPARATORS).strip()


class _Writer:
    """The converted files of one task folder with their example counts.

    ``folder`` is the staged folder; messages name ``shown``, the task folder it becomes.
    """

    def __init__(self, folder: Path, shown: Path) -> None:
        self.folder = folder
        self.shown = shown
        self.stats: dict[str, dict[str, int]] = {}

    def write(self, name: str, rows: Iterable[str], counts: list[int]) -> None:
        """Stream ``rows`` (lines) into ``name``; ``counts`` is [examples, dropped], read once rows are spent.

        A file that ends up without examples is not kept (e.g. a treebank released without its text). An OS
        error while writing (a full disk, ...) is one line naming the file; reading errors stay the reader's.
        """
        if name in self.stats:
            raise DlfaInputError(f"the archive holds {name} twice", path=self.shown)
        path = self.folder / name
        try:
            handle = open(path, "w", encoding="utf-8", newline="\n")
        except OSError as exc:
            raise self._failed(exc, name) from None
        try:
            for row in rows:
                try:
                    handle.write(row)
                    handle.write("\n")
                except OSError as exc:
                    raise self._failed(exc, name) from None
            try:
                handle.close()
            except OSError as exc:
                raise self._failed(exc, name) from None
        finally:
            with contextlib.suppress(OSError):
                handle.close()
        if counts[0]:
            self.stats[name] = {"examples": counts[0], "dropped": counts[1]}
        else:
            path.unlink()

    def _failed(self, exc: OSError, name: str) -> DlfaInputError:
        return _os_error(exc, self.shown / name, "cannot write the converted file", "; nothing was changed")


# -- conversion ---------------------------------------------------------------------------------------------------


def _convert(task: str, archives: list[Path], staged: Path, target: Path, languages: Sequence[str] | None,
             fused_forms: bool, log: Log) -> dict[str, dict[str, int]]:
    from dlfa.tasks import get_task

    if languages and [lang.lower() for lang in languages] == ["all"]:
        wanted: set[str] | None = None
    else:
        wanted = set(languages or get_task(task).languages) | {"en"}
    writer = _Writer(staged, target)
    try:
        if task == "udpos":
            _convert_udpos(archives[0], writer, wanted, fused_forms)
        elif task == "xnli":
            _convert_xnli(archives[0], archives[1], writer, wanted)
        elif task == "pawsx":
            _convert_pawsx(archives[0], writer, wanted)
        else:
            _convert_panx(archives, writer, wanted)
    except _READ_ERRORS as exc:
        # Left over from reading (members and lines map their own errors; writing errors are the writer's).
        raise DlfaInputError(f"cannot read the archive ({exc})", path=archives[0]) from None
    if not writer.stats:
        raise DlfaInputError(f"no {task} files for the requested languages in the archive", path=archives[0])
    found = {_file_language(name) for name in writer.stats}
    missing = sorted((wanted or set()) - found)
    if missing:
        log(f"{task}: not in the release: {', '.join(missing)}")
    for name, counts in sorted(writer.stats.items()):
        if counts["dropped"]:
            log(f"{task}: {name}: {counts['dropped']} malformed or unlabeled rows/sentences left out")
    return writer.stats


def _file_language(name: str) -> str:
    match = _UD_FILE.fullmatch(name) or re.fullmatch(r"(?:translate-)?(?:train|dev|test)-(?P<lang>.+)\.tsv", name)
    return match["lang"] if match else ""


def _validate(task: str, folder: Path) -> None:
    """Every converted file parses with dlfa's reader for the task (a failure keeps the old folder)."""
    from dlfa.tasks import get_task

    reader = get_task(task)
    for path in sorted(folder.iterdir()):
        if path.name != PROVENANCE_FILE:
            reader.read_file(path)


# UD-POS


def _convert_udpos(archive: Path, writer: _Writer, wanted: set[str] | None, fused_forms: bool) -> None:
    """One CoNLL-U file per treebank and split (dlfa's reader joins a language's treebanks)."""
    from dlfa.tasks.udpos import UPOS_TAGS

    known = frozenset(UPOS_TAGS)
    for name, stream, _, _ in _archive_members(archive):
        match = _UD_FILE.fullmatch(PurePosixPath(name).name)
        if not match or (wanted is not None and match["lang"] not in wanted):
            continue
        counts = [0, 0]

        def sentences(lines: Iterable[str], lang: str, counts: list[int], where: str) -> Iterator[str]:
            for block in _conllu_blocks(lines, where):
                converted = xtreme_ud_sentence(block, lang, known, fused_forms)
                counts[converted is None] += 1
                if converted is not None:
                    yield from converted
                    yield ""

        # Treebanks released without their text (all forms "_") end up empty and are not kept.
        where = f"{archive}:{name}"
        writer.write(match.group(0), sentences(_lines(stream, where), match["lang"], counts, where), counts)


def _conllu_blocks(lines: Iterable[str], where: str) -> Iterator[list[str]]:
    block: list[str] = []
    for number, line in enumerate(lines, start=1):
        if line.strip():
            _check_sentence(block, where, number)
            block.append(line)
        elif block:
            yield block
            block = []
    if block:
        yield block


def xtreme_ud_sentence(block: Sequence[str], lang: str, upos: frozenset[str] | set[str],
                       fused_forms: bool = True) -> list[str] | None:
    """One CoNLL-U sentence as XTREME's UD-POS data has it, or None when XTREME (or dlfa's reader) drops it.

    XTREME (conllu_to_conll.py --replace_subtokens_with_fused_forms, then utils_preprocess.py): a multi-word
    token becomes one word with the fused form, tagged like the span's word that is highest in the tree (ties:
    :data:`POS_PRECEDENCE`); sentences whose forms are (nearly) all ``_`` (treebanks distributed without
    text) are dropped; spaces and zero-width non-joiners are removed from forms. Sentences with malformed
    lines or tags outside the UPOS set are dropped too, since dlfa's reader would reject the whole file.
    """
    comments = [line for line in block if line.startswith("#")]
    words: list[list[str]] = []
    spans: list[tuple[int, int, list[str]]] = []
    for line in block:
        if line.startswith("#"):
            continue
        cols = line.split("\t")
        if len(cols) != 10:
            return None
        token_id = cols[0]
        if "." in token_id:
            continue  # empty node of the enhanced graph
        if "-" in token_id:
            start, _, end = token_id.partition("-")
            if not (start.isdigit() and end.isdigit() and int(start) < int(end)):
                return None
            spans.append((int(start), int(end), cols))
            continue
        if not token_id.isdigit() or int(token_id) != len(words) + 1:
            return None
        words.append(cols)
    if not words:
        return None
    if fused_forms and spans:
        words = _fuse(words, spans, lang)
        if words is None:
            return None
        body = words
    else:
        body = [line.split("\t") for line in block if not line.startswith("#")]
    forms = [cols[1] for cols in words]
    empty = sum(form == "_" for form in forms)
    if not (empty == 0 or empty < len(forms) - 1):
        return None
    out = []
    for cols in body:
        if cols[0].isdigit():
            if cols[3] not in upos:
                return None
            form = "".join(cols[1].strip().replace("\u200c", "").split(" "))
            cols = [cols[0], form or cols[1]] + cols[2:]
            if not cols[1].strip():
                return None
        out.append("\t".join(cols))
    return comments + out


def _fuse(words: list[list[str]], spans: list[tuple[int, int, list[str]]], lang: str) -> list[list[str]] | None:
    """Replace each multi-word token's words by its head word carrying the fused form; renumber the rest."""
    heads = {i: int(cols[6]) if cols[6].isdigit() else 0 for i, cols in enumerate(words, start=1)}

    def depth(node: int) -> int:
        steps, seen = 0, set()
        while node and node not in seen:
            seen.add(node)
            node = heads.get(node, 0)
            steps += 1
        return steps

    precedence = POS_PRECEDENCE.get(lang, POS_PRECEDENCE["default"])
    owner: dict[int, int] = {}
    fused: dict[int, list[str]] = {}
    for start, end, cols in spans:
        if end > len(words):
            return None
        span = list(range(start, end + 1))
        depths = [depth(i) for i in span]
        top = [i for i, d in zip(span, depths) if d == min(depths)]
        head = min(top, key=lambda i: precedence.index(words[i - 1][3]) if words[i - 1][3] in precedence
                   else len(precedence))
        for i in span:
            owner[i] = head
        fused[head] = cols
    new_id: dict[int, int] = {}
    for i in range(1, len(words) + 1):
        if owner.get(i, i) == i:
            new_id[i] = len(new_id) + 1
    out = []
    for i, cols in enumerate(words, start=1):
        if owner.get(i, i) != i:
            continue
        cols = list(cols)
        if i in fused:
            cols[1], cols[9] = fused[i][1], fused[i][9]
        if cols[6].isdigit() and cols[6] != "0":
            head = owner.get(int(cols[6]), int(cols[6]))
            cols[6] = str(new_id.get(head, 0))
        cols[0] = str(new_id[i])
        cols[8] = "_"  # enhanced dependencies refer to the old numbering
        out.append(cols)
    return out


# XNLI


def _convert_xnli(xnli_zip: Path, mnli_zip: Path, writer: _Writer, wanted: set[str] | None) -> None:
    """XNLI 1.0 dev/test per language and MultiNLI's training set, as ``premise<TAB>hypothesis<TAB>label``."""
    found: set[str] = set()
    for name, stream, _, _ in _archive_members(xnli_zip):
        base = PurePosixPath(name).name
        split = {"xnli.dev.tsv": "dev", "xnli.test.tsv": "test"}.get(base)
        if split is None:
            continue
        found.add(base)
        by_language: dict[str, list[str]] = {}
        dropped: dict[str, int] = {}
        for lang, row in _nli_rows(_lines(stream, f"{xnli_zip}:{name}"), f"{xnli_zip}:{name}", True):
            if wanted is not None and lang not in wanted:
                continue
            if row is None or not re.fullmatch(r"[a-z]{2,3}", lang):
                dropped[lang] = dropped.get(lang, 0) + 1
            else:
                by_language.setdefault(lang, []).append(row)
        for lang, rows in sorted(by_language.items()):
            writer.write(f"{split}-{lang}.tsv", rows, [len(rows), dropped.get(lang, 0)])
    if found != {"xnli.dev.tsv", "xnli.test.tsv"}:
        raise DlfaInputError("no XNLI-1.0/xnli.dev.tsv and xnli.test.tsv in the archive", path=xnli_zip)
    for name, stream, _, _ in _archive_members(mnli_zip):
        if PurePosixPath(name).name == "multinli_1.0_train.txt":
            counts = [0, 0]

            def kept(pairs: Iterable[tuple[str, str | None]], counts: list[int]) -> Iterator[str]:
                for _, row in pairs:
                    counts[row is None] += 1
                    if row is not None:
                        yield row

            rows = _nli_rows(_lines(stream, f"{mnli_zip}:{name}"), f"{mnli_zip}:{name}", False)
            writer.write("train-en.tsv", kept(rows, counts), counts)
            return
    raise DlfaInputError("no multinli_1.0/multinli_1.0_train.txt in the archive", path=mnli_zip)


def _nli_rows(lines: Iterator[str], where: str, by_language: bool) -> Iterator[tuple[str, str | None]]:
    """(language, output row or None for a dropped row) from a release file with a header line."""
    header = next(lines, None)
    names = (header or "").split("\t")
    needed = ["sentence1", "sentence2", "gold_label"] + (["language"] if by_language else [])
    if any(n not in names for n in needed):
        raise DlfaInputError(f"header without the columns {', '.join(needed)}", path=where, line=1)
    index = {n: names.index(n) for n in needed}
    for line in lines:
        if not line.strip():
            continue
        fields = line.split("\t")
        lang = fields[index["language"]].strip() if by_language and len(fields) > index["language"] else "en"
        if len(fields) != len(names):
            yield lang, None
            continue
        label = fields[index["gold_label"]].strip()
        label = "contradiction" if label == "contradictory" else label
        if label not in _NLI_LABELS:  # "-": the annotators did not agree (MultiNLI); XTREME's data has none
            yield lang, None
            continue
        yield lang, f"{_clean(fields[index['sentence1']])}\t{_clean(fields[index['sentence2']])}\t{label}"


# PAWS-X


def _convert_pawsx(archive: Path, writer: _Writer, wanted: set[str] | None) -> None:
    """``x-final/<lang>/*.tsv`` as ``sentence1<TAB>sentence2<TAB>label`` (header dropped).

    English ``train.tsv`` becomes ``train-en.tsv``; the machine-translated ``translated_train.tsv`` files become
    ``translate-train-<lang>.tsv``, which the zero-shot setting never reads as training data.
    """
    for name, stream, _, _ in _archive_members(archive):
        path = PurePosixPath(name)
        if len(path.parts) < 2 or path.name not in _PAWSX_FILES:
            continue
        lang = path.parent.name
        if not re.fullmatch(r"[a-z]{2,3}", lang) or (wanted is not None and lang not in wanted):
            continue
        counts = [0, 0]
        rows = _pawsx_rows(_lines(stream, f"{archive}:{name}"), counts)
        writer.write(f"{_PAWSX_FILES[path.name]}-{lang}.tsv", rows, counts)


def _pawsx_rows(lines: Iterable[str], counts: list[int]) -> Iterator[str]:
    """Output rows of one PAWS-X file; ``counts`` becomes [kept, dropped]."""
    for number, line in enumerate(lines, start=1):
        fields = line.split("\t")
        if number == 1 and [f.strip().lower() for f in fields] == ["id", "sentence1", "sentence2", "label"]:
            continue
        if not line.strip():
            continue
        if len(fields) != 4 or fields[3].strip() not in ("0", "1"):
            counts[1] += 1
            continue
        counts[0] += 1
        yield f"{_clean(fields[1])}\t{_clean(fields[2])}\t{fields[3].strip()}"


# PAN-X


class _PanxArchive(NamedTuple):
    """One language's <lang>.tar.gz: a stream of its bytes, valid until the next one."""

    lang: str
    where: str
    stream: IO[bytes]
    size: int
    parent: _Budget | None  # the budget of the archive it is packed in


def _panx_language_archives(paths: Sequence[Path]) -> Iterator[_PanxArchive]:
    """Each language's <lang>.tar.gz from the given archives, per-language files or folders, as a stream."""
    for path in paths:
        found = _stat(path)
        if found is not None and stat.S_ISDIR(found.st_mode):
            files = sorted(p for p in path.rglob("*.tar.gz") if _PANX_ARCHIVE.fullmatch(p.name))
            if not files:
                raise DlfaInputError("no <lang>.tar.gz files in the folder", path=path)
            for file in files:
                _check_archive_file(file)  # not a FIFO or a device named like an archive
                with _open_archive_file(file) as (stream, size):
                    yield _PanxArchive(_PANX_ARCHIVE.fullmatch(file.name)["lang"], str(file), stream, size, None)
            continue
        match = _PANX_ARCHIVE.fullmatch(path.name)
        if match and _holds_splits(path):
            with _open_archive_file(path) as (stream, size):
                yield _PanxArchive(match["lang"], str(path), stream, size, None)
            continue
        inner = 0
        for member in _archive_members(path):
            inner_match = _PANX_ARCHIVE.fullmatch(PurePosixPath(member.name).name)
            if inner_match:
                inner += 1
                yield _PanxArchive(inner_match["lang"], f"{path}:{member.name}", member.stream, member.size,
                                   member.budget)
        if not inner:
            raise DlfaInputError(
                "neither a <lang>.tar.gz with train/dev/test files nor an archive of such files", path=path
            )


@contextlib.contextmanager
def _open_archive_file(path: Path) -> Iterator[tuple[IO[bytes], int]]:
    try:
        handle = open(path, "rb")
        size = os.fstat(handle.fileno()).st_size
    except OSError as exc:
        raise _os_error(exc, path, "cannot read the archive") from None
    with handle:
        yield handle, size


def _holds_splits(path: Path) -> bool:
    """Whether ``path`` is one language's archive (it holds a train, dev or test file)."""
    for member in _archive_members(path):
        if PurePosixPath(member.name).name in _PANX_SPLITS:
            return True
    return False


def _convert_panx(archives: list[Path], writer: _Writer, wanted: set[str] | None) -> None:
    """WikiANN's ``lang:token<TAB>tag`` files as ``token<TAB>tag``, a blank line between sentences."""
    for lang, where, data, size, parent in _panx_language_archives(archives):
        if wanted is not None and lang not in wanted:
            continue
        seen = False
        for name, stream, _, _ in _nested_tar_members(data, where, size, parent):
            split = PurePosixPath(name).name
            if split not in _PANX_SPLITS:
                continue  # e.g. "extra"
            seen = True
            counts = [0, 0]
            rows = _panx_rows(_lines(stream, f"{where}:{name}"), counts, f"{where}:{name}")
            writer.write(f"{split}-{lang}.tsv", rows, counts)
        if not seen:
            raise DlfaInputError("no train, dev or test file in the archive", path=where)


def _panx_rows(lines: Iterable[str], counts: list[int], where: str) -> Iterator[str]:
    """Output lines; ``counts`` becomes [sentences, dropped lines]. As XTREME: the token follows the first ``:``."""
    sentence: list[str] = []
    for number, line in enumerate(itertools.chain(lines, [""]), start=1):
        if not line.strip():
            if sentence:
                yield from sentence
                yield ""
                counts[0] += 1
                sentence = []
            continue
        fields = line.strip().split("\t")
        colon = fields[0].find(":")
        token = fields[0][colon + 1:].strip() if colon != -1 else ""
        tag = fields[1].strip() if len(fields) == 2 else ""
        if not token or tag not in _NER_TAGS:
            counts[1] += 1
            continue
        _check_sentence(sentence, where, number)
        sentence.append(f"{_clean(token)}\t{tag}")
