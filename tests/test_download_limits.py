"""`dlfa download` against hostile input (issue 12): size caps, crafted archives, enormous lines, OS errors.

Every case is exactly one :class:`DlfaInputError` line from the API and, through the CLI, exit status 2 with
one stderr line and no traceback. Nothing of the user's is touched and nothing dlfa wrote is left behind
(except a partial download kept on purpose so that it resumes).
"""

from __future__ import annotations

import contextlib
import errno
import gzip
import io
import os
import shutil
import stat
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest
from test_download import FAST, _base, _serve, panx_language, pawsx_archive, serve_http, sha

from dlfa.cli.main import main
from dlfa.data import download as dl
from dlfa.data.download import Source, download
from dlfa.errors import DlfaInputError

MiB = 1 << 20


@pytest.fixture
def server():
    with serve_http() as httpd:
        yield httpd


def _one_line(capsys) -> str:
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    assert len(err) == 1, captured.err
    assert err[0].startswith("dlfa: error: ") and "Traceback" not in captured.err + captured.out
    return err[0]


def _refused(capsys, cli: list[str], *needles: str, api: dict | None = None) -> str:
    """The API (when ``api`` gives its arguments) raises one line, and the CLI exits 2 with one line, both
    containing every needle. Returns the CLI's line."""
    if api is not None:
        with pytest.raises(DlfaInputError) as raised:
            download(**{**FAST, **api})
        message = str(raised.value)
        assert "\n" not in message
        for needle in needles:
            assert needle in message, message
    assert main(["download", *cli]) == 2
    line = _one_line(capsys)
    for needle in needles:
        assert needle in line, line
    return line


def _entries(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*")) if folder.exists() else []


# -- crafted archives ----------------------------------------------------------------------------------------------

SENTENCE = b"en:Paris\tB-LOC\nen:is\tO\n\n"


def _member(name: str, data: bytes = b"", kind: bytes = tarfile.REGTYPE, link: str = "", **pax: str):
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = link
    info.size = len(data) if kind == tarfile.REGTYPE else 0
    info.pax_headers = dict(pax)
    return info, data


def _tar(*members, mode: str = "w:gz", fmt: int = tarfile.GNU_FORMAT) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode=mode, format=fmt) as archive:
        for info, data in members:
            archive.addfile(info, io.BytesIO(data) if info.size else None)
    return buffer.getvalue()


def _panx(*members) -> bytes:
    """A PAN-X language archive: dev and test, then the given members (one of which is usually "train")."""
    return _tar(_member("dev", SENTENCE), _member("test", SENTENCE), *members)


def _amazon(members: dict[str, bytes], symlinks: tuple[str, ...] = ()) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in members.items():
            info = zipfile.ZipInfo(name)
            info.compress_type = zipfile.ZIP_DEFLATED
            if name in symlinks:
                info.create_system = 3
                info.external_attr = (stat.S_IFLNK | 0o777) << 16
            archive.writestr(info, data)
    return buffer.getvalue()


def _panx_cli(tmp_path: Path, name: str, data: bytes) -> tuple[list[str], dict]:
    archive = tmp_path / name
    archive.write_bytes(data)
    out = tmp_path / "out"
    return ["panx", "--output", str(out), "--archive", str(archive)], {"task": "panx", "output": out,
                                                                       "archives": [archive]}


@pytest.mark.parametrize(("member", "problem"), [
    (_member("../../train", SENTENCE), "has a '..' component (path traversal)"),
    (_member("x/..\\..\\train", SENTENCE), "has a '..' component (path traversal)"),
    (_member("/var/data/train", SENTENCE), "has an absolute name"),
    (_member("C:/data/train", SENTENCE), "has an absolute name"),
    (_member("train", kind=tarfile.SYMTYPE, link="/etc/passwd"), "is a symbolic link (to '/etc/passwd')"),
    (_member("train", kind=tarfile.LNKTYPE, link="dev"), "is a hard link (to 'dev')"),
    (_member("train", kind=tarfile.CHRTYPE), "is a device file"),
    (_member("train", kind=tarfile.BLKTYPE), "is a device file"),
    (_member("train", kind=tarfile.FIFOTYPE), "is a FIFO"),
])
def test_unsafe_tar_members_are_refused(tmp_path, capsys, member, problem):
    cli, api = _panx_cli(tmp_path, "en.tar.gz", _panx(member))
    line = _refused(capsys, cli, f"{tmp_path / 'en.tar.gz'}: member {member[0].name!r} {problem}: refused",
                    api=api)
    assert "never extracted" in line
    assert _entries(tmp_path / "out") == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["en.tar.gz"]  # nothing extracted anywhere


def test_archive_that_is_a_device_or_fifo_is_refused(tmp_path, capsys):
    # Reading /dev/zero as an archive would never end.
    _refused(capsys, ["panx", "--output", str(tmp_path / "out"), "--archive", "/dev/zero"],
             "/dev/zero: archive is not a regular file")
    folder = tmp_path / "langs"
    folder.mkdir()
    (folder / "de.tar.gz").write_bytes(panx_language("de"))
    os.mkfifo(folder / "en.tar.gz")
    _refused(capsys, ["panx", "--output", str(tmp_path / "out"), "--archive", str(folder)],
             f"{folder / 'en.tar.gz'}: archive is not a regular file")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(("name", "problem"), [
    ("../panx_dataset/en.tar.gz", "has a '..' component (path traversal)"),
    ("/panx_dataset/en.tar.gz", "has an absolute name"),
    ("D:\\panx_dataset\\en.tar.gz", "has an absolute name"),
])
def test_unsafe_zip_member_names_are_refused(tmp_path, capsys, name, problem):
    data = _amazon({"panx_dataset/de.tar.gz": panx_language("de"), name: panx_language("en")})
    cli, api = _panx_cli(tmp_path, "AmazonPhotos.zip", data)
    _refused(capsys, cli, f"AmazonPhotos.zip: member {name!r} {problem}: refused", api=api)
    assert not (tmp_path / "out").exists()


def test_zip_symlink_member_is_refused(tmp_path, capsys):
    data = _amazon({"panx_dataset/en.tar.gz": b"/home/user/secret.tar.gz"}, symlinks=("panx_dataset/en.tar.gz",))
    cli, api = _panx_cli(tmp_path, "AmazonPhotos.zip", data)
    _refused(capsys, cli, "member 'panx_dataset/en.tar.gz' is a symbolic link: refused", api=api)


def test_unsafe_member_of_a_nested_archive_names_both(tmp_path, capsys):
    data = _amazon({"panx_dataset/en.tar.gz": _panx(_member("../train", SENTENCE))})
    cli, api = _panx_cli(tmp_path, "AmazonPhotos.zip", data)
    _refused(capsys, cli, "AmazonPhotos.zip:panx_dataset/en.tar.gz: member '../train' has a '..' component",
             api=api)


def test_unsafe_member_in_a_downloaded_zip_is_refused(server, tmp_path, capsys, monkeypatch):
    xnli = io.BytesIO()
    with zipfile.ZipFile(xnli, "w") as archive:
        archive.writestr("XNLI-1.0/../../xnli.dev.tsv", "language\tgold_label\n")
    sources = [_serve(server, "XNLI-1.0.zip", xnli.getvalue()), _serve(server, "multinli_1.0.zip", b"")]
    monkeypatch.setitem(dl.SOURCES, "xnli", sources)
    _refused(capsys, ["xnli", "--output", str(tmp_path / "out")],
             "XNLI-1.0.zip: member 'XNLI-1.0/../../xnli.dev.tsv' has a '..' component",
             api={"task": "xnli", "output": tmp_path / "out"})
    assert not (tmp_path / "out" / "xnli").exists()


# -- decompression bombs, enormous lines and headers -----------------------------------------------------------------


def test_gzip_bomb_is_refused_before_it_is_read(tmp_path, capsys):
    # 18 MiB of one repeated row packs into ~20 KB: far beyond 50x its size and over the 16 MiB floor.
    bomb = _panx(_member("train", b"en:a\tO\n" * (18 * MiB // 7)))
    assert len(bomb) < 100_000
    cli, api = _panx_cli(tmp_path, "en.tar.gz", bomb)
    line = _refused(capsys, cli, f"{tmp_path / 'en.tar.gz'}: expands to more than {dl.EXPANSION_FLOOR} bytes",
                    "at member 'train': refused as a likely decompression bomb", api=api)
    assert f"{dl.MAX_EXPANSION}x its {len(bomb)} bytes" in line
    assert not (tmp_path / "out").exists()


def test_nested_bomb_inside_a_zip_is_refused(tmp_path, capsys):
    # The reported case: a small AmazonPhotos.zip whose <lang>.tar.gz expands enormously.
    bomb = _panx(_member("train", b"en:a\tO\n" * (18 * MiB // 7)))
    data = _amazon({"panx_dataset/de.tar.gz": panx_language("de"), "panx_dataset/en.tar.gz": bomb})
    cli, api = _panx_cli(tmp_path, "AmazonPhotos.zip", data)
    _refused(capsys, cli, "AmazonPhotos.zip:panx_dataset/en.tar.gz: expands to more than",
             "decompression bomb", api=api)


def test_header_claiming_a_huge_member_is_refused_without_reading_it(tmp_path, capsys):
    info = tarfile.TarInfo("train")
    info.size = 1 << 36  # 64 GiB announced, nothing behind it
    header = info.tobuf(tarfile.GNU_FORMAT)
    cli, api = _panx_cli(tmp_path, "en.tar.gz", gzip.compress(header + SENTENCE))
    _refused(capsys, cli, "expands to more than", "at member 'train'", api=api)


def test_zip_member_with_a_bomb_ratio_is_refused(tmp_path, capsys):
    data = _amazon({"panx_dataset/en.tar.gz": bytes(17 * MiB)})  # zeros deflate ~1000x
    assert len(data) < 100_000
    cli, api = _panx_cli(tmp_path, "AmazonPhotos.zip", data)
    _refused(capsys, cli, "AmazonPhotos.zip: member 'panx_dataset/en.tar.gz' expands",
             f"to {17 * MiB} bytes, more than {dl.MAX_EXPANSION}x): refused as a likely decompression bomb", api=api)


def test_tar_headers_count_against_the_budget(tmp_path, capsys, monkeypatch):
    # Pax headers are read into memory whole: each is capped, and all of them count as decompressed bytes.
    monkeypatch.setattr(dl, "EXPANSION_FLOOR", 2 * MiB)  # the floor at a size a test writes quickly
    members = [_member(f"note{i}", comment="x" * (900 * 1024)) for i in range(4)]
    data = _tar(_member("train", SENTENCE), *members, fmt=tarfile.PAX_FORMAT)
    cli, api = _panx_cli(tmp_path, "en.tar.gz", data)
    _refused(capsys, cli, "expands to more than", "decompression bomb", api=api)


def test_huge_extended_header_is_refused(tmp_path, capsys):
    data = _tar(_member("train", SENTENCE, comment="x" * (dl.MAX_TAR_HEADER + 1)), fmt=tarfile.PAX_FORMAT)
    cli, api = _panx_cli(tmp_path, "en.tar.gz", data)
    _refused(capsys, cli, f"{tmp_path / 'en.tar.gz'}: a ", f"-byte extended header (more than {dl.MAX_TAR_HEADER})",
             api=api)


def test_too_many_members_are_refused(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(dl, "MAX_MEMBERS", 3)
    cli, api = _panx_cli(tmp_path, "en.tar.gz", _panx(_member("train", SENTENCE), _member("extra", SENTENCE)))
    _refused(capsys, cli, "en.tar.gz: more than 3 members: refused", api=api)
    data = _amazon({f"panx_dataset/{lang}.tar.gz": panx_language(lang) for lang in ("en", "de", "fr", "es")})
    cli, api = _panx_cli(tmp_path, "AmazonPhotos.zip", data)
    _refused(capsys, cli, "AmazonPhotos.zip: more than 3 members: refused", api=api)


def test_enormous_line_is_refused_not_read_into_memory(tmp_path, capsys):
    line = b"en:" + b"a" * dl.MAX_LINE + b"\tO\n"
    cli, api = _panx_cli(tmp_path, "en.tar.gz", _panx(_member("train", SENTENCE + line)))
    _refused(capsys, cli, f"{tmp_path / 'en.tar.gz'}:train:4: a line longer than {dl.MAX_LINE} bytes: refused",
             api=api)
    assert not (tmp_path / "out").exists()


def test_sentence_without_end_is_refused(server, tmp_path, capsys, monkeypatch):
    # Sentences are held in memory until their blank line: one that never ends is refused, UD and PAN-X alike.
    monkeypatch.setattr(dl, "MAX_SENTENCE_LINES", 3)
    cli, api = _panx_cli(tmp_path, "en.tar.gz", _panx(_member("train", SENTENCE + b"en:a\tO\n" * 4)))
    _refused(capsys, cli, "en.tar.gz:train:7: a sentence of more than 3 lines: refused", api=api)
    words = "".join(f"{i}\tw\t_\tNOUN\t_\t_\t0\troot\t_\t_\n" for i in range(1, 5))
    ud = _tar(_member("ud/UD_English-EWT/en_ewt-ud-train.conllu", words.encode()))
    monkeypatch.setitem(dl.SOURCES, "udpos", [_serve(server, "ud-treebanks-v2.5.tgz", ud)])
    _refused(capsys, ["udpos", "--output", str(tmp_path / "ud")],
             "ud-treebanks-v2.5.tgz:ud/UD_English-EWT/en_ewt-ud-train.conllu:4: a sentence of more than 3 lines",
             api={"task": "udpos", "output": tmp_path / "ud"})
    assert _entries(tmp_path / "ud") == ["downloads", "downloads/ud-treebanks-v2.5.tgz"]  # verified: kept for reuse


def test_line_of_exactly_the_cap_is_read(tmp_path):
    longest = b"en:" + b"a" * (dl.MAX_LINE - 5) + b"\tO\n"  # MAX_LINE bytes before its line end
    assert len(longest) == dl.MAX_LINE + 1
    archive = tmp_path / "en.tar.gz"
    archive.write_bytes(_panx(_member("train", SENTENCE + longest)))
    folder = download("panx", tmp_path / "out", archives=[archive], **FAST)
    assert (folder / "train-en.tsv").read_bytes().endswith(b"a\tO\n\n")


def test_archive_with_a_release_like_ratio_is_within_the_caps(tmp_path, monkeypatch):
    # Varied text compresses about 5x: well under the ratio cap, so an archive over the floor converts.
    monkeypatch.setattr(dl, "EXPANSION_FLOOR", 1 * MiB)  # the floor at a size a test writes quickly
    rows = b"".join(b"en:w%d\t%s\n" % (i, [b"O", b"B-PER", b"I-PER"][i % 3]) + (b"\n" if i % 9 == 8 else b"")
                    for i in range(150_000))
    archive = tmp_path / "en.tar.gz"
    archive.write_bytes(_panx(_member("train", rows)))
    assert dl.EXPANSION_FLOOR < len(rows) < 10 * archive.stat().st_size
    folder = download("panx", tmp_path / "out", archives=[archive], **FAST)
    assert (folder / "train-en.tsv").stat().st_size > MiB
    # The same rows repeated into a bomb of the same layout are refused at that floor.
    archive.write_bytes(_panx(_member("train", SENTENCE * (2 * MiB // len(SENTENCE)))))
    with pytest.raises(DlfaInputError, match="decompression bomb"):
        download("panx", tmp_path / "out2", archives=[archive], **FAST)


# -- size caps on downloads ------------------------------------------------------------------------------------------


def test_mirror_streaming_forever_stops_at_the_published_size(server, tmp_path, capsys, monkeypatch):
    data = pawsx_archive()
    server.state.files["x-final.tar.gz"] = data
    server.state.forever.add("x-final.tar.gz")
    monkeypatch.setitem(dl.SOURCES, "pawsx", [Source("x-final.tar.gz", "https://unused.invalid/x-final.tar.gz",
                                                     sha(data), len(data))])
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "mine.txt").write_text("the user's\n")
    _refused(capsys, ["pawsx", "--output", str(tmp_path / "out"), "--mirror", _base(server)],
             f"{_base(server)}/x-final.tar.gz: the server sends more than {len(data)} bytes (the release's size): "
             "refused; the partial download was removed",
             api={"task": "pawsx", "output": tmp_path / "out", "base_url": _base(server)})
    assert _entries(tmp_path / "out") == ["mine.txt"]
    assert server.state.sent["x-final.tar.gz"] < 256 * MiB


def test_unknown_size_stops_at_the_per_source_cap(server, tmp_path, monkeypatch):
    data = pawsx_archive()
    server.state.files["x-final.tar.gz"] = data
    server.state.forever.add("x-final.tar.gz")
    source = Source("x-final.tar.gz", f"{_base(server)}/x-final.tar.gz", None, max_size=64 * 1024)
    with pytest.raises(DlfaInputError, match=r"sends more than 65536 bytes \(the cap for a download of unpublished"):
        download("pawsx", tmp_path / "out", sources=[source], **FAST)
    assert not (tmp_path / "out").exists()
    # Without max_size the module's cap applies.
    monkeypatch.setattr(dl, "UNKNOWN_SIZE_CAP", 32 * 1024)
    with pytest.raises(DlfaInputError, match="sends more than 32768 bytes"):
        download("pawsx", tmp_path / "out", sources=[Source("x-final.tar.gz", source.url)], **FAST)
    assert not (tmp_path / "out").exists()


def test_announced_size_beyond_the_cap_is_refused_before_writing(server, tmp_path, capsys, monkeypatch):
    server.state.files["ud-treebanks-v2.5.tgz"] = b"small"
    server.state.announce["ud-treebanks-v2.5.tgz"] = 10 << 30
    _refused(capsys, ["udpos", "--output", str(tmp_path / "out"), "--mirror", _base(server)],
             f"the server offers {10 << 30} bytes, more than {dl.UNKNOWN_SIZE_CAP} (the cap for a download of "
             "unpublished size): refused")
    assert not (tmp_path / "out").exists()


def test_leftover_part_larger_than_the_release_starts_again(server, tmp_path):
    data = pawsx_archive()
    source = Source("x-final.tar.gz", _serve(server, "x-final.tar.gz", data).url, sha(data), len(data))
    (tmp_path / "downloads").mkdir()
    (tmp_path / "downloads" / "x-final.tar.gz.part").write_bytes(data + b"junk")
    download("pawsx", tmp_path, sources=[source], **FAST)
    assert server.state.requests == [("x-final.tar.gz", None)]
    assert (tmp_path / "downloads" / "x-final.tar.gz").read_bytes() == data


def test_complete_leftover_part_is_checked_without_a_request(server, tmp_path):
    data = pawsx_archive()
    source = Source("x-final.tar.gz", _serve(server, "x-final.tar.gz", data).url, sha(data), len(data))
    (tmp_path / "downloads").mkdir()
    (tmp_path / "downloads" / "x-final.tar.gz.part").write_bytes(data)
    download("pawsx", tmp_path, sources=[source], **FAST)
    assert server.state.requests == []
    assert (tmp_path / "downloads" / "x-final.tar.gz").read_bytes() == data


# -- nothing of the user's is replaced ---------------------------------------------------------------------------------


def test_planted_symlink_part_is_not_written_through(server, tmp_path, capsys, monkeypatch):
    data = pawsx_archive()
    monkeypatch.setitem(dl.SOURCES, "pawsx", [_serve(server, "x-final.tar.gz", data)])
    mine = tmp_path / "mine.bin"
    mine.write_bytes(b"the user's")
    (tmp_path / "out" / "downloads").mkdir(parents=True)
    (tmp_path / "out" / "downloads" / "x-final.tar.gz.part").symlink_to(mine)
    _refused(capsys, ["pawsx", "--output", str(tmp_path / "out")],
             "x-final.tar.gz.part: exists and is not dlfa's partial download (not a plain file)",
             api={"task": "pawsx", "output": tmp_path / "out"})
    assert mine.read_bytes() == b"the user's"
    assert (tmp_path / "out" / "downloads" / "x-final.tar.gz.part").is_symlink()
    assert server.state.requests == []


def test_download_folder_file_that_does_not_match_is_kept(server, tmp_path, capsys, monkeypatch):
    data = pawsx_archive()
    monkeypatch.setitem(dl.SOURCES, "pawsx", [_serve(server, "x-final.tar.gz", data)])
    (tmp_path / "downloads").mkdir()
    (tmp_path / "downloads" / "x-final.tar.gz").write_bytes(b"the user's own file")
    _refused(capsys, ["pawsx", "--output", str(tmp_path)],
             "x-final.tar.gz: exists and does not match its checksum", "move it away or delete it",
             api={"task": "pawsx", "output": tmp_path})
    assert (tmp_path / "downloads" / "x-final.tar.gz").read_bytes() == b"the user's own file"


# -- OS errors -------------------------------------------------------------------------------------------------------


def test_symlink_loops_are_one_line(server, tmp_path, capsys, monkeypatch):
    loop = tmp_path / "loop"
    loop.symlink_to(tmp_path / "loop2")
    (tmp_path / "loop2").symlink_to(loop)
    _refused(capsys, ["pawsx", "--output", str(loop)], f"{loop}: cannot access: too many levels of symbolic links",
             api={"task": "pawsx", "output": loop})
    _refused(capsys, ["panx", "--output", str(tmp_path / "out"), "--archive", str(loop)],
             f"{loop}: cannot access: too many levels of symbolic links",
             api={"task": "panx", "output": tmp_path / "out", "archives": [loop]})
    monkeypatch.setitem(dl.SOURCES, "pawsx", [_serve(server, "x-final.tar.gz", pawsx_archive())])
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "downloads").symlink_to(loop)
    _refused(capsys, ["pawsx", "--output", str(tmp_path / "out")], "too many levels of symbolic links",
             api={"task": "pawsx", "output": tmp_path / "out"})
    assert loop.is_symlink() and (tmp_path / "out" / "downloads").is_symlink()  # the user's links stay
    assert _entries(tmp_path / "out") == ["downloads"]
    dangling = tmp_path / "dangling"
    dangling.symlink_to(tmp_path / "nowhere")
    _refused(capsys, ["pawsx", "--output", str(dangling)], f"{dangling}: is a symbolic link to a missing path")


def test_permission_denied_is_one_line(tmp_path, capsys):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o555)
    if os.access(locked, os.W_OK):  # root with CAP_DAC_OVERRIDE (try: setpriv --bounding-set -dac_override ...)
        locked.chmod(0o755)
        pytest.skip("this process ignores file permissions")
    try:
        _refused(capsys, ["pawsx", "--output", str(locked / "data")],
                 f"{locked}: cannot write here: permission denied", api={"task": "pawsx", "output": locked / "data"})
    finally:
        locked.chmod(0o755)
    archive = tmp_path / "en.tar.gz"
    archive.write_bytes(panx_language("en"))
    archive.chmod(0)
    try:
        _refused(capsys, ["panx", "--output", str(tmp_path / "out"), "--archive", str(archive)],
                 f"{archive}: cannot read: permission denied")
    finally:
        archive.chmod(0o644)
    assert not (tmp_path / "out").exists()


def test_permission_denied_simulated(tmp_path, capsys, monkeypatch):
    """As root (where chmod does not deny), the same lines with the system calls failing."""
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode, **kw: False if Path(path) == tmp_path
                        else real_access(path, mode, **kw))
    _refused(capsys, ["pawsx", "--output", str(tmp_path / "data")],
             f"{tmp_path}: cannot write here: permission denied", api={"task": "pawsx", "output": tmp_path / "data"})
    monkeypatch.undo()
    archive = tmp_path / "en.tar.gz"
    archive.write_bytes(panx_language("en"))

    def unreadable(path):
        raise PermissionError(errno.EACCES, "Permission denied", str(path))

    monkeypatch.setattr(dl, "sha256_file", unreadable)
    _refused(capsys, ["panx", "--output", str(tmp_path / "out"), "--archive", str(archive)],
             f"{archive}: cannot read: permission denied")
    assert not (tmp_path / "out").exists()


def test_read_only_output_is_refused_before_downloading(server, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(dl.SOURCES, "pawsx", [_serve(server, "x-final.tar.gz", pawsx_archive())])
    real_statvfs = os.statvfs

    class ReadOnly:
        def __init__(self, path):
            self.f_flag = real_statvfs(path).f_flag | os.ST_RDONLY

    monkeypatch.setattr(os, "statvfs", ReadOnly)
    _refused(capsys, ["pawsx", "--output", str(tmp_path / "data")],
             f"{tmp_path}: cannot write here: read-only file system", api={"task": "pawsx", "output": tmp_path / "data"})
    assert server.state.requests == []


class _FullDisk:
    """A file whose writes fail with ENOSPC once ``room`` bytes are written (the bytes up to it are kept)."""

    def __init__(self, handle, room: int) -> None:
        self.handle, self.room = handle, room

    def write(self, data):
        if len(data) > self.room:
            self.handle.write(data[: self.room])
            self.handle.flush()
            self.room = 0
            raise OSError(errno.ENOSPC, "No space left on device")
        self.room -= len(data)
        return self.handle.write(data)

    def __getattr__(self, name):
        return getattr(self.handle, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.handle.close()


def test_full_disk_while_downloading_keeps_a_resumable_part(server, tmp_path, capsys, monkeypatch):
    data = pawsx_archive()
    source = _serve(server, "x-final.tar.gz", data)
    monkeypatch.setitem(dl.SOURCES, "pawsx", [source])
    real_fdopen = os.fdopen
    monkeypatch.setattr(os, "fdopen", lambda fd, mode="r", *a, **kw: _FullDisk(real_fdopen(fd, mode, *a, **kw), 100))
    part = tmp_path / "out" / "downloads" / "x-final.tar.gz.part"
    _refused(capsys, ["pawsx", "--output", str(tmp_path / "out")],
             f"{part}: cannot write the download: no space left on the device; the partial download (100 bytes) "
             "is kept and resumes on the next run")
    assert len(server.state.requests) == 1  # a local error is not retried
    monkeypatch.undo()
    monkeypatch.setitem(dl.SOURCES, "pawsx", [source])
    assert main(["download", "pawsx", "--output", str(tmp_path / "out")]) == 0
    assert server.state.requests[-1] == ("x-final.tar.gz", "bytes=100-")
    assert (tmp_path / "out" / "downloads" / "x-final.tar.gz").read_bytes() == data


def test_full_disk_while_converting_changes_nothing(tmp_path, capsys, monkeypatch):
    archive = tmp_path / "en.tar.gz"
    archive.write_bytes(panx_language("en"))
    out = tmp_path / "out"
    assert main(["download", "panx", "--output", str(out), "--archive", str(archive)]) == 0
    capsys.readouterr()
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}

    def full_open(path, mode="r", *args, **kwargs):
        handle = open(path, mode, *args, **kwargs)
        return _FullDisk(handle, 10) if "w" in mode else handle

    monkeypatch.setattr(dl, "open", full_open, raising=False)
    line = _refused(capsys, ["panx", "--output", str(out), "--archive", str(archive)],
                    "cannot write the converted file: no space left on the device; nothing was changed")
    assert str(out / "panx") in line and ".tmp" not in line
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before  # no leftovers, no changes


def test_full_disk_when_staging_or_recording(tmp_path, capsys, monkeypatch):
    archive = tmp_path / "en.tar.gz"
    archive.write_bytes(panx_language("en"))
    out = tmp_path / "out"
    out.mkdir()

    @contextlib.contextmanager
    def no_space(target, replace_folder=False):  # dlfa.io.atomic_path failing to stage the task folder
        raise OSError(errno.ENOSPC, "No space left on device", str(out))
        yield

    with monkeypatch.context() as patch:
        patch.setattr(dl, "atomic_path", no_space)
        _refused(capsys, ["panx", "--output", str(out), "--archive", str(archive)],
                 f"{out}: file system error: no space left on the device")
    assert _entries(out) == []
    real_write = dl.write_json_atomic

    def checksums_fail(path, data):
        if Path(path).name == "checksums.json":
            raise OSError(errno.ENOSPC, "No space left on device")
        real_write(path, data)

    monkeypatch.setattr(dl, "write_json_atomic", checksums_fail)
    _refused(capsys, ["panx", "--output", str(out), "--archive", str(archive)],
             f"{out / 'checksums.json'}: {out / 'panx'} is complete, but the checksums could not be recorded: no "
             "space left on the device")


# -- real file systems: a tiny tmpfs in a private mount namespace (Linux, where unprivileged namespaces work) ------


def _namespace_mount_works(where: Path) -> bool:
    if not shutil.which("unshare") or sys.platform != "linux":
        return False
    where.mkdir(exist_ok=True)
    probe = subprocess.run(["unshare", "-rm", "sh", "-c", f"mount -t tmpfs -o size=64k tmpfs '{where}'"],
                           capture_output=True, timeout=30)
    return probe.returncode == 0


def _in_tiny_fs(mount: Path, options: str, args: list[str]) -> subprocess.CompletedProcess:
    """`python -m dlfa download ARGS` with a fresh tmpfs mounted at ``mount``; afterwards prints what is left."""
    src = str(Path(dl.__file__).resolve().parents[2])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")])}
    script = ('mount -t tmpfs -o "$1" tmpfs "$2" || exit 99; m="$2"; shift 2; "$@"; rc=$?; '
              'echo "left:"; find "$m" -mindepth 1; exit $rc')
    return subprocess.run(["unshare", "-rm", "sh", "-c", script, "sh", options, str(mount), sys.executable, "-m",
                           "dlfa", "download", *args], capture_output=True, text=True, env=env, timeout=120)


def _left(result: subprocess.CompletedProcess) -> list[str]:
    return result.stdout.split("left:\n", 1)[1].split()


@pytest.fixture
def tiny_fs(tmp_path):
    mount = tmp_path / "mnt"
    if not _namespace_mount_works(mount):
        pytest.skip("cannot mount a tmpfs in a private namespace here")
    return mount


def _one_stderr_line(result: subprocess.CompletedProcess) -> str:
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2, result.stderr
    assert len(lines) == 1 and lines[0].startswith("dlfa: error: ") and "Traceback" not in result.stderr, lines
    return lines[0]


def test_real_full_disk_while_downloading(server, tiny_fs):
    server.state.files["ud-treebanks-v2.5.tgz"] = os.urandom(300_000)  # more than the 64 KiB file system
    result = _in_tiny_fs(tiny_fs, "size=64k", ["udpos", "--output", str(tiny_fs / "data"), "--mirror", _base(server)])
    line = _one_stderr_line(result)
    part = tiny_fs / "data" / "downloads" / "ud-treebanks-v2.5.tgz.part"
    assert f"{part}: cannot write the download: no space left on the device" in line
    assert "is kept and resumes on the next run" in line
    assert len(server.state.requests) == 1


def test_real_full_disk_while_converting(tmp_path, tiny_fs):
    rows = b"".join(b"en:word%d\tO\n\n" % i for i in range(30_000))  # ~400 KB converted
    archive = tmp_path / "en.tar.gz"
    archive.write_bytes(_panx(_member("train", rows)))
    result = _in_tiny_fs(tiny_fs, "size=64k", ["panx", "--output", str(tiny_fs), "--archive", str(archive)])
    line = _one_stderr_line(result)
    assert f"{tiny_fs / 'panx'}/" in line and "no space left on the device; nothing was changed" in line
    assert _left(result) == []  # the staged folder is gone


def test_real_read_only_file_system(tmp_path, tiny_fs):
    archive = tmp_path / "en.tar.gz"
    archive.write_bytes(panx_language("en"))
    result = _in_tiny_fs(tiny_fs, "ro,size=64k", ["panx", "--output", str(tiny_fs / "data"), "--archive",
                                                  str(archive)])
    assert f"{tiny_fs}: cannot write here: read-only file system" in _one_stderr_line(result)
