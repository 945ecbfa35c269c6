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
"""

from __future__ import annotations

import http.client
import io
import json
import os
import re
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
from typing import IO

from dlfa.errors import DlfaInputError
from dlfa.io import atomic_path, sha256_file, write_json_atomic

MIRROR_ENV = "DLFA_DOWNLOAD_MIRROR"
CHECKSUMS_FILE = "checksums.json"
DOWNLOADS_DIR = "downloads"
PROVENANCE_FILE = "download.json"  # in each converted task folder: sources, options and per-file counts
CHUNK = 1 << 20
USER_AGENT = "dlfa-download/0.1 (Python urllib)"


@dataclass(frozen=True)
class Source:
    """One archive of a task: where to get it and what its bytes hash to.

    ``sha256=None`` means no checksum was published: the archive is trusted on first use (see module doc).
    ``verified_by`` says where a pinned checksum comes from, so it can be re-checked.
    """

    filename: str
    url: str
    sha256: str | None = None
    size: int | None = None
    verified_by: str = ""


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
    overwrite: bool = False,
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
    if output.exists() and not output.is_dir():
        raise DlfaInputError("output exists and is not a folder", path=output)
    target = output / task
    if target.exists() and not overwrite and not (target / PROVENANCE_FILE).is_file():
        raise DlfaInputError(
            "folder exists and was not made by `dlfa download`; pass --overwrite to replace it", path=target
        )
    created_output = not output.exists()
    opts = _Options(attempts, backoff, timeout, progress, log)
    checksums = _load_checksums(output / CHECKSUMS_FILE)
    fetched: list[Path] = []
    try:
        if task == "panx":
            if not archives:
                raise DlfaInputError(PANX_MANUAL, option="--archive")
            obtained = [_local_panx_archive(Path(p), checksums, output) for p in archives]
        else:
            obtained = _obtain_all(task, output, archives, base_url, sources, checksums, opts, fetched)
        with atomic_path(target) as staged:
            staged.mkdir()
            try:
                stats = _convert(task, [o.path for o in obtained], staged, languages, fused_forms, log)
                if validate:
                    _validate(task, staged)
            except DlfaInputError:
                # An archive trusted on first use that does not convert is not the release: do not keep it.
                for item in obtained:
                    if item.checksum == "trust-on-first-use" and item.path in fetched:
                        item.path.unlink(missing_ok=True)
                raise
            write_json_atomic(staged / PROVENANCE_FILE, {
                "task": task,
                "sources": [o.record() for o in obtained],
                "options": {"languages": list(languages) if languages else None, "fused_forms": fused_forms},
                "files": stats,
            })
    except BaseException:
        _prune_empty(output / DOWNLOADS_DIR, output if created_output else None)
        raise
    for item in obtained:
        if item.checksum != "folder":
            checksums[item.path.name] = item.record()
    write_json_atomic(output / CHECKSUMS_FILE, checksums)
    if not keep_archives:
        for path in fetched:
            path.unlink(missing_ok=True)
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
            if not path.is_file():
                raise DlfaInputError("archive not found", path=path)
            digest = sha256_file(path)
            if expected and digest != expected:
                raise DlfaInputError(_mismatch(path.name, digest, expected, how, output / CHECKSUMS_FILE), path=path)
            result.append(_Obtained(path, digest, source.url, how))
            continue
        url = f"{base_url.rstrip('/')}/{urllib.parse.quote(source.filename)}" if base_url else source.url
        path, digest = _download_verified(source, url, output, expected, how, opts)
        fetched.append(path)
        result.append(_Obtained(path, digest, url, how))
        note = {"pinned": "matches the published checksum", "recorded": f"matches {output / CHECKSUMS_FILE}"}.get(
            how, f"no published checksum: trusted on first use, recorded in {output / CHECKSUMS_FILE}")
        opts.log(f"sha256 {digest}  {source.filename} ({note})")
    return result


def _download_verified(source: Source, url: str, output: Path, expected: str | None, how: str,
                       opts: _Options) -> tuple[Path, str]:
    """``downloads/<file>``, complete and matching ``expected``; reused when already there."""
    downloads = output / DOWNLOADS_DIR
    final = downloads / source.filename
    if final.is_file():
        digest = sha256_file(final)
        if expected is None or digest == expected:
            opts.log(f"using {final} (already downloaded)")
            return final, digest
        opts.log(f"{final} does not match its checksum; downloading it again")
        final.unlink()
    part = downloads / (source.filename + ".part")
    resumed = part.is_file() and part.stat().st_size > 0
    while True:
        opts.log(f"downloading {url}" + (f" (resuming at {part.stat().st_size} bytes)" if resumed else ""))
        _fetch(url, part, source.size if how == "pinned" else None, opts)
        digest = sha256_file(part)
        if expected is None or digest == expected:
            os.replace(part, final)
            return final, digest
        part.unlink(missing_ok=True)
        if not resumed:
            raise DlfaInputError(_mismatch(source.filename, digest, expected, how, output / CHECKSUMS_FILE), path=url)
        opts.log("the resumed partial download does not match the checksum; downloading from the start")
        resumed = False


class _Restart(Exception):
    """The server sent something other than the requested byte range: start the file again."""


def _fetch(url: str, part: Path, size: int | None, opts: _Options) -> None:
    """Fill ``part`` with the whole file at ``url``, resuming what it holds; retries transient failures."""
    failures = 0
    furthest = part.stat().st_size if part.is_file() else 0
    while True:
        offset = part.stat().st_size if part.is_file() else 0
        try:
            if _transfer(url, part, offset, size, opts):
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


def _transfer(url: str, part: Path, offset: int, size: int | None, opts: _Options) -> bool:
    """One request; appends to ``part`` from ``offset``. True when the file is complete."""
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
        if size is not None and total is not None and total != size:
            part.unlink(missing_ok=True)
            raise DlfaInputError(
                f"the server offers {total} bytes, the release has {size}: not the expected file", path=url
            )
        part.parent.mkdir(parents=True, exist_ok=True)
        from tqdm import tqdm

        received = 0
        with open(part, "ab" if offset else "wb") as out, tqdm(
            total=total, initial=offset, unit="B", unit_scale=True, unit_divisor=1024, desc=part.name[:-5],
            disable=None if opts.progress else True, leave=False,
        ) as bar:
            while chunk := response.read(CHUNK):
                out.write(chunk)
                received += len(chunk)
                bar.update(len(chunk))
            out.flush()
            os.fsync(out.fileno())
    return length is None or received >= length


def _content_range(value: str | None) -> tuple[int, int | None]:
    match = re.fullmatch(r"\s*bytes\s+(\d+)-(\d+)/(\d+|\*)\s*", value or "")
    if not match:
        raise _Restart(f"unreadable Content-Range {value!r}")
    return int(match.group(1)), None if match.group(3) == "*" else int(match.group(3))


def _local_panx_archive(path: Path, checksums: dict[str, dict], output: Path) -> _Obtained:
    """A PAN-X archive the user downloaded: checked against the published or the recorded checksum."""
    if not path.exists():
        raise DlfaInputError("archive not found", path=path)
    if path.is_dir():
        return _Obtained(path, "", None, "folder")
    known = PANX_ARCHIVES.get(path.name, Source(path.name, ""))
    expected, how = _expected(known, checksums)
    digest = sha256_file(path)
    if expected and digest != expected:
        raise DlfaInputError(_mismatch(path.name, digest, expected, how, output / CHECKSUMS_FILE), path=path)
    return _Obtained(path, digest, known.url or None, how)


def _prune_empty(folder: Path, also: Path | None) -> None:
    """Remove folders this run created and left empty (a failed run leaves nothing behind)."""
    for path in (folder, also):
        if path is not None and path.is_dir() and not any(path.iterdir()):
            path.rmdir()


# -- reading archives --------------------------------------------------------------------------------------------


def _archive_members(path: Path) -> Iterator[tuple[str, IO[bytes]]]:
    """(member name, binary stream) of every regular file in a zip or tar archive, in archive order."""
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as archive:
                for info in archive.infolist():
                    if not info.is_dir() and not _is_junk(info.filename):
                        with archive.open(info) as stream:
                            yield info.filename, stream
            return
        with tarfile.open(path, "r:*") as archive:
            for member in archive:
                if member.isfile() and not _is_junk(member.name):
                    stream = archive.extractfile(member)
                    if stream is not None:
                        with stream:
                            yield member.name, stream
    except (tarfile.TarError, zipfile.BadZipFile, EOFError, OSError) as exc:
        raise DlfaInputError(f"not a readable zip or tar archive ({exc})", path=path) from None


def _is_junk(name: str) -> bool:
    """macOS resource forks (``__MACOSX/``, ``._name``) that some release zips carry."""
    parts = PurePosixPath(name).parts
    return "__MACOSX" in parts or PurePosixPath(name).name.startswith("._")


def _lines(stream: IO[bytes], where: str) -> Iterator[str]:
    """Decoded lines without their line end; split on ``\\n`` only, as dlfa's readers do."""
    for number, raw in enumerate(stream, start=1):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise DlfaInputError(f"not valid UTF-8 (byte {exc.start})", path=where, line=number) from None
        if number == 1:
            line = line.removeprefix("\ufeff")
        yield line.rstrip("\r\n")


def _clean(text: str) -> str:
    return text.translate(_ODD_SEPARATORS).strip()


class _Writer:
    """The converted files of one task folder with their example counts."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.stats: dict[str, dict[str, int]] = {}

    def write(self, name: str, rows: Iterable[str], counts: list[int]) -> None:
        """Stream ``rows`` (lines) into ``name``; ``counts`` is [examples, dropped], read once rows are spent.

        A file that ends up without examples is not kept (e.g. a treebank released without its text).
        """
        if name in self.stats:
            raise DlfaInputError(f"the archive holds {name} twice", path=self.folder)
        path = self.folder / name
        with open(path, "w", encoding="utf-8", newline="\n") as handle:
            for row in rows:
                handle.write(row)
                handle.write("\n")
        if counts[0]:
            self.stats[name] = {"examples": counts[0], "dropped": counts[1]}
        else:
            path.unlink()


# -- conversion ---------------------------------------------------------------------------------------------------


def _convert(task: str, archives: list[Path], staged: Path, languages: Sequence[str] | None, fused_forms: bool,
             log: Log) -> dict[str, dict[str, int]]:
    from dlfa.tasks import get_task

    if languages and [lang.lower() for lang in languages] == ["all"]:
        wanted: set[str] | None = None
    else:
        wanted = set(languages or get_task(task).languages) | {"en"}
    writer = _Writer(staged)
    try:
        if task == "udpos":
            _convert_udpos(archives[0], writer, wanted, fused_forms)
        elif task == "xnli":
            _convert_xnli(archives[0], archives[1], writer, wanted)
        elif task == "pawsx":
            _convert_pawsx(archives[0], writer, wanted)
        else:
            _convert_panx(archives, writer, wanted)
    except (tarfile.TarError, zipfile.BadZipFile, EOFError, zlib.error, OSError) as exc:
        # A damaged member shows up while it is read, outside _archive_members.
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
    for name, stream in _archive_members(archive):
        match = _UD_FILE.fullmatch(PurePosixPath(name).name)
        if not match or (wanted is not None and match["lang"] not in wanted):
            continue
        counts = [0, 0]

        def sentences(lines: Iterable[str], lang: str, counts: list[int]) -> Iterator[str]:
            for block in _conllu_blocks(lines):
                converted = xtreme_ud_sentence(block, lang, known, fused_forms)
                counts[converted is None] += 1
                if converted is not None:
                    yield from converted
                    yield ""

        # Treebanks released without their text (all forms "_") end up empty and are not kept.
        writer.write(match.group(0), sentences(_lines(stream, f"{archive}:{name}"), match["lang"], counts), counts)


def _conllu_blocks(lines: Iterable[str]) -> Iterator[list[str]]:
    block: list[str] = []
    for line in lines:
        if line.strip():
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
    for name, stream in _archive_members(xnli_zip):
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
    for name, stream in _archive_members(mnli_zip):
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
    for name, stream in _archive_members(archive):
        path = PurePosixPath(name)
        if len(path.parts) < 2 or path.name not in _PAWSX_FILES:
            continue
        lang = path.parent.name
        if not re.fullmatch(r"[a-z]{2,3}", lang) or (wanted is not None and lang not in wanted):
            continue
        rows: list[str] = []
        dropped = 0
        for number, line in enumerate(_lines(stream, f"{archive}:{name}"), start=1):
            fields = line.split("\t")
            if number == 1 and [f.strip().lower() for f in fields] == ["id", "sentence1", "sentence2", "label"]:
                continue
            if not line.strip():
                continue
            if len(fields) != 4 or fields[3].strip() not in ("0", "1"):
                dropped += 1
                continue
            rows.append(f"{_clean(fields[1])}\t{_clean(fields[2])}\t{fields[3].strip()}")
        writer.write(f"{_PAWSX_FILES[path.name]}-{lang}.tsv", rows, [len(rows), dropped])


# PAN-X


def _panx_language_archives(paths: Sequence[Path]) -> Iterator[tuple[str, str, bytes]]:
    """(language, where, bytes of its <lang>.tar.gz) from the given archives, per-language files or folders."""
    for path in paths:
        if path.is_dir():
            files = sorted(p for p in path.rglob("*.tar.gz") if _PANX_ARCHIVE.fullmatch(p.name))
            if not files:
                raise DlfaInputError("no <lang>.tar.gz files in the folder", path=path)
            for file in files:
                yield _PANX_ARCHIVE.fullmatch(file.name)["lang"], str(file), file.read_bytes()
            continue
        match = _PANX_ARCHIVE.fullmatch(path.name)
        if match and _holds_splits(path):
            yield match["lang"], str(path), path.read_bytes()
            continue
        inner = 0
        for name, stream in _archive_members(path):
            inner_match = _PANX_ARCHIVE.fullmatch(PurePosixPath(name).name)
            if inner_match:
                inner += 1
                yield inner_match["lang"], f"{path}:{name}", stream.read()
        if not inner:
            raise DlfaInputError(
                "neither a <lang>.tar.gz with train/dev/test files nor an archive of such files", path=path
            )


def _holds_splits(path: Path) -> bool:
    try:
        with tarfile.open(path, "r:*") as archive:
            return any(PurePosixPath(m.name).name in _PANX_SPLITS for m in archive if m.isfile())
    except (tarfile.TarError, EOFError, OSError):
        return False


def _convert_panx(archives: list[Path], writer: _Writer, wanted: set[str] | None) -> None:
    """WikiANN's ``lang:token<TAB>tag`` files as ``token<TAB>tag``, a blank line between sentences."""
    for lang, where, data in _panx_language_archives(archives):
        if wanted is not None and lang not in wanted:
            continue
        seen = False
        for name, stream in _archive_members_bytes(data, where):
            split = PurePosixPath(name).name
            if split not in _PANX_SPLITS:
                continue  # e.g. "extra"
            seen = True
            rows, sentences, dropped = _panx_rows(_lines(stream, f"{where}:{name}"))
            writer.write(f"{split}-{lang}.tsv", rows, [sentences, dropped])
        if not seen:
            raise DlfaInputError("no train, dev or test file in the archive", path=where)


def _archive_members_bytes(data: bytes, where: str) -> Iterator[tuple[str, IO[bytes]]]:
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:*") as archive:
            for member in archive:
                stream = archive.extractfile(member) if member.isfile() else None
                if stream is not None:
                    yield member.name, stream
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise DlfaInputError(f"not a readable tar archive ({exc})", path=where) from None


def _panx_rows(lines: Iterable[str]) -> tuple[list[str], int, int]:
    """Rows, sentence count and dropped lines. As XTREME: the token is what follows the first ``:``."""
    rows: list[str] = []
    sentence: list[str] = []
    sentences = dropped = 0
    for line in [*lines, ""]:
        if not line.strip():
            if sentence:
                rows.extend(sentence)
                rows.append("")
                sentences += 1
                sentence = []
            continue
        fields = line.strip().split("\t")
        colon = fields[0].find(":")
        token = fields[0][colon + 1:].strip() if colon != -1 else ""
        tag = fields[1].strip() if len(fields) == 2 else ""
        if not token or tag not in _NER_TAGS:
            dropped += 1
            continue
        sentence.append(f"{_clean(token)}\t{tag}")
    return rows, sentences, dropped
