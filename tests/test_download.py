"""`dlfa download`: tiny archives with the real releases' layouts, served by a local HTTP server on 127.0.0.1.

Covers conversion into the files dlfa's readers parse, resuming (truncated transfers, a leftover ``.part``, a
server ignoring Range), persistent HTTP errors, pinned and trust-on-first-use checksums, the manual PAN-X
path, and the CLI's one-line errors.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import tarfile
import threading
import zipfile
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from dlfa.cli.main import main
from dlfa.data import download as dl
from dlfa.data.download import Source, download, xtreme_ud_sentence
from dlfa.errors import DlfaInputError
from dlfa.tasks import get_task

FAST = {"backoff": 0.001, "attempts": 3, "progress": False, "log": lambda _message: None}


# -- tiny archives -------------------------------------------------------------------------------------------------


def _tar_gz(files: dict[str, str | bytes]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
        for name, content in files.items():
            data = content.encode("utf-8") if isinstance(content, str) else content
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def _zip(files: dict[str, str | bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, content in files.items():
            archive.writestr(name, content)
    return buffer.getvalue()


def _conllu(*sentences: list[tuple[str, ...]]) -> str:
    """Sentences of (id, form, upos, head) rows; a 2-tuple (range id, form) is a multi-word token line."""
    lines = []
    for n, rows in enumerate(sentences, start=1):
        lines.append(f"# sent_id = {n}")
        for row in rows:
            if len(row) == 2:
                lines.append("\t".join([row[0], row[1]] + ["_"] * 8))
            else:
                token_id, form, upos, head = row
                lines.append("\t".join([token_id, form, "_", upos, "_", "_", head, "dep", "_", "_"]))
        lines.append("")
    return "\n".join(lines) + "\n"


EN = [("1", "The", "DET", "2"), ("2", "cat", "NOUN", "3"), ("3", "sat", "VERB", "0"), ("4", ".", "PUNCT", "3")]
# Spanish "del" = de (ADP) + el (DET), both attached to the noun: a tie broken by Spanish POS precedence (ADP).
ES = [("1", "Casa", "NOUN", "0"), ("2-3", "del"), ("2", "de", "ADP", "5"), ("3", "el", "DET", "5"),
      ("4", "buen", "ADJ", "5"), ("5", "pueblo", "NOUN", "1")]  # fmt: skip
NO_TEXT = [("1", "_", "NOUN", "0"), ("2", "_", "VERB", "1"), ("3", "_", "PUNCT", "1")]


def ud_archive() -> bytes:
    root = "ud-treebanks-v2.5"
    return _tar_gz({
        f"{root}/UD_English-EWT/README.md": "# English EWT\n",
        f"{root}/UD_English-EWT/en_ewt-ud-train.conllu": _conllu(EN, EN),
        f"{root}/UD_English-EWT/en_ewt-ud-dev.conllu": _conllu(EN),
        f"{root}/UD_English-EWT/en_ewt-ud-test.conllu": _conllu(EN),
        f"{root}/UD_English-ESL/en_esl-ud-test.conllu": _conllu(NO_TEXT),  # released without its text
        f"{root}/UD_Spanish-GSD/es_gsd-ud-test.conllu": _conllu(ES, EN) + "1\tbroken line\n\n",
        f"{root}/UD_Czech-PDT/cs_pdt-ud-test.conllu": _conllu(EN),  # not an XTREME language
    })


XNLI_HEADER = ("language\tgold_label\tsentence1_binary_parse\tsentence2_binary_parse\tsentence1_parse\t"
               "sentence2_parse\tsentence1\tsentence2\tpromptID\tpairID\tgenre\tlabel1\tlabel2\tlabel3\tlabel4\t"
               "label5\tsentence1_tokenized\tsentence2_tokenized\tmatch")
MNLI_HEADER = ("gold_label\tsentence1_binary_parse\tsentence2_binary_parse\tsentence1_parse\tsentence2_parse\t"
               "sentence1\tsentence2\tpromptID\tpairID\tgenre\tlabel1\tlabel2\tlabel3\tlabel4\tlabel5")


def _xnli_row(lang: str, label: str, premise: str, hypothesis: str) -> str:
    return "\t".join([lang, label, "(", "(", "(", "(", premise, hypothesis, "1", "1e", "fiction",
                      label, label, label, label, label, premise, hypothesis, "True"])


def _mnli_row(label: str, premise: str, hypothesis: str) -> str:
    return "\t".join([label, "(", "(", "(", "(", premise, hypothesis, "1", "1e", "fiction", label, "", "", "", ""])


def xnli_archives() -> dict[str, bytes]:
    dev = [XNLI_HEADER, _xnli_row("en", "entailment", "A man sleeps.", "A person rests."),
           _xnli_row("de", "entailment", "Ein Mann schläft.", "Eine Person ruht."),
           _xnli_row("de", "contradictory", "Er läuft.", "Er sitzt.")]
    test = [XNLI_HEADER, _xnli_row("en", "neutral", 'He said "hi".', "He is happy."),
            _xnli_row("de", "neutral", "Er sagte „hallo“.", "Er ist froh.")]
    train = [MNLI_HEADER, _mnli_row("entailment", "A dog runs.", "An animal moves."),
             _mnli_row("-", "No majority.", "Skipped."), _mnli_row("contradiction", "It is day.", "It is night.")]
    return {
        "XNLI-1.0.zip": _zip({"XNLI-1.0/xnli.dev.tsv": "\n".join(dev) + "\n",
                              "XNLI-1.0/xnli.test.tsv": "\n".join(test) + "\n",
                              "__MACOSX/XNLI-1.0/._xnli.dev.tsv": b"\x00\x05junk"}),
        "multinli_1.0.zip": _zip({"multinli_1.0/multinli_1.0_train.txt": "\n".join(train) + "\n",
                                  "multinli_1.0/multinli_1.0_dev_matched.txt": MNLI_HEADER + "\n"}),
    }


def pawsx_archive() -> bytes:
    header = "id\tsentence1\tsentence2\tlabel\n"
    return _tar_gz({
        "x-final/en/train.tsv": header + "1\tA cat.\tThe cat.\t1\n2\tRed.\tBlue.\t0\n",
        "x-final/en/dev_2k.tsv": header + "1\tOne.\tUno.\t1\n",
        "x-final/en/test_2k.tsv": header + "1\tTwo.\tDos.\t0\n",
        "x-final/de/translated_train.tsv": header + "1\tEine Katze.\tDie Katze.\t1\n2\tkaputt\n",
        "x-final/de/dev_2k.tsv": header + "1\tEins.\tUno.\t1\n",
        "x-final/de/test_2k.tsv": header + "1\tZwei.\tDos.\t0\n",
    })


def panx_language(lang: str) -> bytes:
    sentence = f"{lang}:Paris\tB-LOC\n{lang}:is\tO\n{lang}:nice\tO\n\n{lang}:Ada\tB-PER\n{lang}:Lovelace\tI-PER\n"
    return _tar_gz({"train": sentence, "dev": sentence, "test": f"{lang}:http://x.org\tO\n", "extra": sentence})


def amazon_photos() -> bytes:
    return _zip({f"panx_dataset/{lang}.tar.gz": panx_language(lang) for lang in ("en", "de", "qu", "ace")})


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# -- local HTTP server -------------------------------------------------------------------------------------------


class _State:
    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.status: dict[str, int] = {}  # file -> HTTP status always returned
        self.status_later: dict[str, int] = {}  # file -> HTTP status returned after its first request
        self.truncate: dict[str, int] = {}  # file -> number of responses still to cut in half
        self.ignore_range: set[str] = set()
        self.forever: set[str] = set()  # files sent without a length, followed by zeros until the client stops
        self.announce: dict[str, int] = {}  # file -> Content-Length announced instead of the true one
        self.requests: list[tuple[str, str | None]] = []  # (file, Range header)
        self.sent: dict[str, int] = {}  # file -> bytes written in its last response


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.0"  # the connection closes after each response: a short body is a truncation

    def log_message(self, format, *args) -> None:  # noqa: A002 - quiet test output
        pass

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        state: _State = self.server.state  # type: ignore[attr-defined]
        name = self.path.lstrip("/")
        range_header = self.headers.get("Range")
        state.requests.append((name, range_header))
        if name in state.status:
            self.send_error(state.status[name])
            return
        if name in state.status_later and sum(r[0] == name for r in state.requests) > 1:
            self.send_error(state.status_later[name])
            return
        if name not in state.files:
            self.send_error(404)
            return
        data = state.files[name]
        if name in state.forever:
            self.send_response(200)
            self.end_headers()  # no Content-Length: the body ends when the connection closes
            state.sent[name] = 0
            try:
                self.wfile.write(data)
                state.sent[name] = len(data)
                for _ in range(4096):  # at most 256 MiB more, in case the client never stops reading
                    self.wfile.write(bytes(65536))
                    state.sent[name] += 65536
            except OSError:  # the client hung up
                pass
            return
        start = 0
        if range_header and name not in state.ignore_range:
            start = int(range_header.removeprefix("bytes=").split("-")[0])
            if start >= len(data):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(data)}")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        body = data[start:]
        self.send_header("Content-Length", str(state.announce.get(name, len(body))))
        self.end_headers()
        if state.truncate.get(name, 0) > 0:
            state.truncate[name] -= 1
            body = body[: len(body) // 2]
        self.wfile.write(body)


@contextlib.contextmanager
def serve_http() -> Iterator[ThreadingHTTPServer]:
    """A local HTTP server on 127.0.0.1 whose behaviour the test sets through ``httpd.state``."""
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    httpd.daemon_threads = True
    httpd.state = _State()  # type: ignore[attr-defined]
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.01}, daemon=True)
    thread.start()
    try:
        yield httpd
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=5)


@pytest.fixture
def server():
    with serve_http() as httpd:
        yield httpd


def _base(httpd) -> str:
    return f"http://127.0.0.1:{httpd.server_address[1]}"


def _serve(httpd, name: str, data: bytes, sha256: str | None = "auto") -> Source:
    httpd.state.files[name] = data
    return Source(name, f"{_base(httpd)}/{name}", sha(data) if sha256 == "auto" else sha256)


def _files_under(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file()) if folder.exists() else []


# -- conversion ------------------------------------------------------------------------------------------------


def test_udpos_download_converts_to_files_the_reader_parses(server, tmp_path):
    archive = ud_archive()
    source = _serve(server, "ud-treebanks-v2.5.tgz", archive)
    folder = download("udpos", tmp_path / "data", sources=[source], **FAST)

    assert folder == tmp_path / "data" / "udpos"
    names = sorted(p.name for p in folder.iterdir())
    assert names == ["download.json", "en_ewt-ud-dev.conllu", "en_ewt-ud-test.conllu", "en_ewt-ud-train.conllu",
                     "es_gsd-ud-test.conllu"]  # no text-less en_esl, no Czech
    udpos = get_task("udpos")
    assert len(udpos.read(folder, "en", "train")) == 2
    spanish = udpos.read(folder, "es", "test")
    assert spanish[0].words == ["Casa", "del", "buen", "pueblo"]  # XTREME's fused token...
    assert spanish[0].tags == ["NOUN", "ADP", "ADJ", "NOUN"]  # ...tagged like its preferred head
    assert len(spanish) == 2  # the broken sentence is left out
    provenance = json.loads((folder / "download.json").read_text())
    assert provenance["files"]["es_gsd-ud-test.conllu"] == {"examples": 2, "dropped": 1}
    recorded = json.loads((tmp_path / "data" / "checksums.json").read_text())
    assert recorded["ud-treebanks-v2.5.tgz"]["sha256"] == sha(archive)
    assert recorded["ud-treebanks-v2.5.tgz"]["checksum"] == "pinned"
    assert (tmp_path / "data" / "downloads" / "ud-treebanks-v2.5.tgz").read_bytes() == archive

    # A second run reuses the verified archive (no request) and replaces the folder in one step.
    before = len(server.state.requests)
    download("udpos", tmp_path / "data", sources=[source], fused_forms=False, **FAST)
    assert len(server.state.requests) == before
    assert udpos.read(folder, "es", "test")[0].words == ["Casa", "de", "el", "buen", "pueblo"]


def test_fused_forms_follow_xtreme_heuristics():
    upos = {"VERB", "PRON", "ADP", "DET", "NOUN", "PUNCT"}
    # Unique highest word: "dárselo" = dar (VERB, root) + se + lo (PRON, attached to the verb) -> VERB.
    block = ["# text = dárselo", "1-3\tdárselo\t_\t_\t_\t_\t_\t_\t_\tSpaceAfter=No",
             "1\tdar\tdar\tVERB\t_\t_\t0\troot\t_\t_", "2\tse\tél\tPRON\t_\t_\t1\tiobj\t_\t_",
             "3\tlo\tél\tPRON\t_\t_\t1\tobj\t_\t_", "4\t.\t.\tPUNCT\t_\t_\t1\tpunct\t_\t_"]
    lines = xtreme_ud_sentence(block, "es", upos)
    assert lines == ["# text = dárselo", "1\tdárselo\tdar\tVERB\t_\t_\t0\troot\t_\tSpaceAfter=No",
                     "2\t.\t.\tPUNCT\t_\t_\t1\tpunct\t_\t_"]
    # Spaces and zero-width non-joiners are removed from forms, as XTREME does.
    assert xtreme_ud_sentence(["1\tمی\u200cروم\t_\tVERB\t_\t_\t0\troot\t_\t_"], "fa", upos)[0].split("\t")[1] == "میروم"
    assert xtreme_ud_sentence(["1\tfoo\t_\tBOGUS\t_\t_\t0\troot\t_\t_"], "en", upos) is None


def test_xnli_download_keeps_gold_test_labels(server, tmp_path):
    sources = [_serve(server, name, data) for name, data in xnli_archives().items()]
    folder = download("xnli", tmp_path, sources=sources, **FAST)

    assert sorted(p.name for p in folder.glob("*.tsv")) == [
        "dev-de.tsv", "dev-en.tsv", "test-de.tsv", "test-en.tsv", "train-en.tsv"]
    xnli = get_task("xnli")
    train = xnli.read(folder, "en", "train")
    assert [(p.text_a, p.label) for p in train] == [("A dog runs.", "entailment"), ("It is day.", "contradiction")]
    assert [p.label for p in xnli.read(folder, "de", "dev")] == ["entailment", "contradiction"]
    test_en = xnli.read(folder, "en", "test")
    assert test_en[0].text_a == 'He said "hi".' and test_en[0].label == "neutral"  # quotes kept, no CSV quoting
    assert (folder / "test-de.tsv").read_text(encoding="utf-8") == "Er sagte „hallo“.\tEr ist froh.\tneutral\n"


def test_pawsx_download(server, tmp_path):
    source = _serve(server, "x-final.tar.gz", pawsx_archive())
    folder = download("pawsx", tmp_path, sources=[source], **FAST)

    assert sorted(p.name for p in folder.glob("*.tsv")) == [
        "dev-de.tsv", "dev-en.tsv", "test-de.tsv", "test-en.tsv", "train-en.tsv", "translate-train-de.tsv"]
    pawsx = get_task("pawsx")
    assert [p.label for p in pawsx.read(folder, "en", "train")] == ["1", "0"]
    assert pawsx.available_languages(folder, "train") == ["en"]  # zero-shot: translated data is not "train"
    assert (folder / "test-de.tsv").read_text(encoding="utf-8") == "Zwei.\tDos.\t0\n"
    assert json.loads((folder / "download.json").read_text())["files"]["translate-train-de.tsv"]["dropped"] == 1


def test_languages_option_restricts_conversion(server, tmp_path):
    sources = [_serve(server, name, data) for name, data in xnli_archives().items()]
    folder = download("xnli", tmp_path, sources=sources, languages=["de"], **FAST)
    assert sorted(p.name for p in folder.glob("*.tsv")) == [
        "dev-de.tsv", "dev-en.tsv", "test-de.tsv", "test-en.tsv", "train-en.tsv"]  # English always
    folder = download("udpos", tmp_path, sources=[_serve(server, "ud.tgz", ud_archive())], languages=["all"], **FAST)
    assert (folder / "cs_pdt-ud-test.conllu").is_file()


def test_mirror_environment_variable(server, tmp_path, monkeypatch):
    archive = pawsx_archive()
    server.state.files["x-final.tar.gz"] = archive
    monkeypatch.setenv("DLFA_DOWNLOAD_MIRROR", _base(server) + "/")
    source = Source("x-final.tar.gz", "https://unreachable.invalid/x-final.tar.gz", sha(archive))
    download("pawsx", tmp_path, sources=[source], **FAST)
    assert server.state.requests == [("x-final.tar.gz", None)]


# -- resuming -------------------------------------------------------------------------------------------------------


def test_truncated_transfer_is_resumed(server, tmp_path):
    archive = pawsx_archive()
    source = _serve(server, "x-final.tar.gz", archive)
    server.state.truncate["x-final.tar.gz"] = 1
    download("pawsx", tmp_path, sources=[source], **FAST)

    half = len(archive) // 2
    assert server.state.requests == [("x-final.tar.gz", None), ("x-final.tar.gz", f"bytes={half}-")]
    assert (tmp_path / "downloads" / "x-final.tar.gz").read_bytes() == archive
    assert not (tmp_path / "downloads" / "x-final.tar.gz.part").exists()


def test_leftover_part_file_is_resumed(server, tmp_path):
    archive = pawsx_archive()
    source = _serve(server, "x-final.tar.gz", archive)
    (tmp_path / "downloads").mkdir()
    (tmp_path / "downloads" / "x-final.tar.gz.part").write_bytes(archive[:100])
    download("pawsx", tmp_path, sources=[source], **FAST)
    assert server.state.requests == [("x-final.tar.gz", "bytes=100-")]
    assert (tmp_path / "downloads" / "x-final.tar.gz").read_bytes() == archive


def test_server_ignoring_range_restarts_from_zero(server, tmp_path):
    archive = pawsx_archive()
    source = _serve(server, "x-final.tar.gz", archive)
    server.state.ignore_range.add("x-final.tar.gz")
    (tmp_path / "downloads").mkdir()
    (tmp_path / "downloads" / "x-final.tar.gz.part").write_bytes(b"stale bytes from another file")
    download("pawsx", tmp_path, sources=[source], **FAST)
    assert (tmp_path / "downloads" / "x-final.tar.gz").read_bytes() == archive


def test_stale_part_that_fails_the_checksum_is_downloaded_again(server, tmp_path):
    archive = pawsx_archive()
    source = _serve(server, "x-final.tar.gz", archive)
    (tmp_path / "downloads").mkdir()
    (tmp_path / "downloads" / "x-final.tar.gz.part").write_bytes(b"\x00" * 50)  # a prefix of some other file
    download("pawsx", tmp_path, sources=[source], **FAST)
    assert server.state.requests == [("x-final.tar.gz", "bytes=50-"), ("x-final.tar.gz", None)]
    assert (tmp_path / "downloads" / "x-final.tar.gz").read_bytes() == archive


def test_transfer_that_keeps_failing_is_a_clear_error_and_stays_resumable(server, tmp_path):
    archive = pawsx_archive()
    source = _serve(server, "x-final.tar.gz", archive)
    server.state.truncate["x-final.tar.gz"] = 1
    server.state.status_later["x-final.tar.gz"] = 503
    with pytest.raises(DlfaInputError, match=r"after 3 attempts \(HTTP 503 .*\); the partial download \(\d+ bytes\) "
                                              r"is kept in .*x-final.tar.gz.part and resumes on the next run"):
        download("pawsx", tmp_path / "out", sources=[source], **FAST)
    assert not (tmp_path / "out" / "pawsx").exists()  # never a half-written dataset
    assert [p.name for p in _files_under(tmp_path / "out")] == ["x-final.tar.gz.part"]

    del server.state.status_later["x-final.tar.gz"]
    download("pawsx", tmp_path / "out", sources=[source], **FAST)
    assert server.state.requests[-1] == ("x-final.tar.gz", f"bytes={len(archive) // 2}-")
    assert (tmp_path / "out" / "downloads" / "x-final.tar.gz").read_bytes() == archive


# -- errors ---------------------------------------------------------------------------------------------------------


def test_persistent_http_500_is_a_clear_error_and_writes_nothing(server, tmp_path):
    source = _serve(server, "x-final.tar.gz", pawsx_archive())
    server.state.status["x-final.tar.gz"] = 500
    with pytest.raises(DlfaInputError) as raised:
        download("pawsx", tmp_path / "out", sources=[source], **FAST)
    assert "download failed after 3 attempts (HTTP 500" in str(raised.value)
    assert "nothing was written" in str(raised.value)
    assert len(server.state.requests) == 3
    assert not (tmp_path / "out").exists()


def test_http_404_is_not_retried(server, tmp_path):
    source = Source("x-final.tar.gz", f"{_base(server)}/missing.tar.gz", None)
    with pytest.raises(DlfaInputError, match="HTTP 404"):
        download("pawsx", tmp_path / "out", sources=[source], **FAST)
    assert len(server.state.requests) == 1
    assert not (tmp_path / "out").exists()


def test_wrong_pinned_checksum_is_a_clear_error_and_writes_nothing(server, tmp_path):
    source = _serve(server, "x-final.tar.gz", pawsx_archive(), sha256="0" * 64)
    (tmp_path / "out").mkdir()
    with pytest.raises(DlfaInputError, match="checksum mismatch for x-final.tar.gz: sha256 [0-9a-f]{64}, expected 0+ "
                                              r"\(the checksum published"):
        download("pawsx", tmp_path / "out", sources=[source], **FAST)
    assert _files_under(tmp_path / "out") == []
    assert list((tmp_path / "out").iterdir()) == []


def test_trust_on_first_use_records_and_enforces_the_checksum(server, tmp_path):
    first = pawsx_archive()
    source = _serve(server, "x-final.tar.gz", first, sha256=None)
    messages: list[str] = []
    download("pawsx", tmp_path, sources=[source], **{**FAST, "log": messages.append}, keep_archives=False)
    assert any(sha(first) in m and "trusted on first use" in m for m in messages)
    recorded = json.loads((tmp_path / "checksums.json").read_text())["x-final.tar.gz"]
    assert recorded["sha256"] == sha(first) and recorded["checksum"] == "trust-on-first-use"
    assert not (tmp_path / "downloads").exists()  # --remove-archives
    before = (tmp_path / "pawsx" / "test-de.tsv").read_text(encoding="utf-8")

    # The server now has another file under the same name: refused, and the earlier dataset stays.
    server.state.files["x-final.tar.gz"] = first + b"\x00"
    with pytest.raises(DlfaInputError, match="expected .*recorded in .*checksums.json"):
        download("pawsx", tmp_path, sources=[source], **FAST)
    assert (tmp_path / "pawsx" / "test-de.tsv").read_text(encoding="utf-8") == before
    assert not (tmp_path / "downloads").exists()
    assert json.loads((tmp_path / "checksums.json").read_text())["x-final.tar.gz"] == recorded


def test_unconvertible_archive_trusted_on_first_use_is_not_kept(server, tmp_path):
    source = _serve(server, "x-final.tar.gz", b"<html>Please sign in</html>", sha256=None)
    with pytest.raises(DlfaInputError, match="not a readable zip or tar archive"):
        download("pawsx", tmp_path / "out", sources=[source], **FAST)
    assert not (tmp_path / "out").exists()  # nothing recorded: a later run is a fresh first use


def test_existing_folder_not_made_by_download_is_not_replaced(server, tmp_path):
    (tmp_path / "pawsx").mkdir()
    (tmp_path / "pawsx" / "mine.tsv").write_text("keep me\n")
    source = _serve(server, "x-final.tar.gz", pawsx_archive())
    with pytest.raises(DlfaInputError, match="not made by `dlfa download`; refusing to replace it"):
        download("pawsx", tmp_path, sources=[source], **FAST)
    assert server.state.requests == []
    assert (tmp_path / "pawsx" / "mine.tsv").read_text() == "keep me\n"


def test_a_folder_made_by_download_is_made_again(server, tmp_path):
    source = _serve(server, "x-final.tar.gz", pawsx_archive())
    folder = download("pawsx", tmp_path, sources=[source], **FAST)
    (folder / "stale.tsv").write_text("old\n")
    assert download("pawsx", tmp_path, sources=[source], **FAST) == folder
    assert (folder / "train-en.tsv").is_file() and not (folder / "stale.tsv").exists()


def test_local_archive_is_used_instead_of_downloading(tmp_path):
    archive = tmp_path / "x-final.tar.gz"
    archive.write_bytes(pawsx_archive())
    source = Source("x-final.tar.gz", "http://127.0.0.1:9/never", sha(archive.read_bytes()))
    folder = download("pawsx", tmp_path / "out", archives=[archive], sources=[source], **FAST)
    assert (folder / "train-en.tsv").is_file()
    assert not (tmp_path / "out" / "downloads").exists()
    with pytest.raises(DlfaInputError, match="not an archive of pawsx"):
        download("pawsx", tmp_path / "out", archives=[tmp_path / "other.zip"], sources=[source], **FAST)


# -- PAN-X (manual) -------------------------------------------------------------------------------------------------


def test_panx_without_archive_explains_the_manual_download(tmp_path):
    with pytest.raises(DlfaInputError) as raised:
        download("panx", tmp_path / "out", **FAST)
    message = str(raised.value)
    assert "--archive" in message and "panx_dataset.tar" in message and "AmazonPhotos.zip" in message
    assert "\n" not in message
    assert not (tmp_path / "out").exists()


def test_panx_from_amazon_photos_zip(tmp_path):
    archive = tmp_path / "AmazonPhotos.zip"
    archive.write_bytes(amazon_photos())
    folder = download("panx", tmp_path / "data", archives=[archive], **FAST)

    # XTREME's languages only (qu and ace are in WikiANN, not in XTREME's PAN-X list); "extra" is ignored.
    assert sorted(p.name for p in folder.glob("*.tsv")) == [
        "dev-de.tsv", "dev-en.tsv", "test-de.tsv", "test-en.tsv", "train-de.tsv", "train-en.tsv"]
    panx = get_task("panx")
    sentences = panx.read(folder, "de", "dev")
    assert [s.words for s in sentences] == [["Paris", "is", "nice"], ["Ada", "Lovelace"]]
    assert sentences[1].tags == ["B-PER", "I-PER"]
    assert (folder / "test-en.tsv").read_text(encoding="utf-8") == "http://x.org\tO\n\n"  # gold labels kept
    recorded = json.loads((tmp_path / "data" / "checksums.json").read_text())["AmazonPhotos.zip"]
    assert recorded["checksum"] == "trust-on-first-use" and recorded["sha256"] == sha(archive.read_bytes())

    # The same name with other bytes is refused (trust on first use).
    archive.write_bytes(_zip({"panx_dataset/en.tar.gz": panx_language("en")}))
    with pytest.raises(DlfaInputError, match="checksum mismatch for AmazonPhotos.zip"):
        download("panx", tmp_path / "data", archives=[archive], **FAST)
    assert (folder / "train-de.tsv").is_file()


def test_panx_from_per_language_files_and_folder(tmp_path):
    for lang in ("en", "qu"):
        (tmp_path / f"{lang}.tar.gz").write_bytes(panx_language(lang))
    folder = download("panx", tmp_path / "a", archives=[tmp_path / "en.tar.gz", tmp_path / "qu.tar.gz"],
                      languages=["qu"], **FAST)
    assert sorted(p.name for p in folder.glob("*.tsv")) == [
        "dev-en.tsv", "dev-qu.tsv", "test-en.tsv", "test-qu.tsv", "train-en.tsv", "train-qu.tsv"]
    folder = download("panx", tmp_path / "b", archives=[tmp_path], **FAST)
    assert get_task("panx").available_languages(folder, "dev") == ["en"]


def test_panx_known_archive_with_wrong_checksum(tmp_path):
    archive = tmp_path / "panx_dataset.tar"
    archive.write_bytes(amazon_photos())
    with pytest.raises(DlfaInputError, match="checksum published for this release"):
        download("panx", tmp_path / "out", archives=[archive], **FAST)
    assert not (tmp_path / "out").exists()


# -- CLI -----------------------------------------------------------------------------------------------------------


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith("dlfa: error: ") and "Traceback" not in err[0]
    return err[0]


def test_cli_download_panx_archive(tmp_path, capsys):
    archive = tmp_path / "AmazonPhotos.zip"
    archive.write_bytes(amazon_photos())
    assert main(["download", "panx", "--output", str(tmp_path / "data"), "--archive", str(archive)]) == 0
    out = capsys.readouterr().out
    assert "panx: 6 files" in out
    assert (tmp_path / "data" / "panx" / "train-en.tsv").is_file()


def test_cli_errors_are_one_line(server, tmp_path, capsys, monkeypatch):
    assert main(["download", "panx", "--output", str(tmp_path / "p")]) == 2
    assert "--archive" in _one_error_line(capsys)

    assert main(["download", "nosuch", "--output", str(tmp_path / "n")]) == 2
    assert "option --task: must be one of udpos, panx, xnli, pawsx, got 'nosuch'" in _one_error_line(capsys)

    # The tiny archives served under the real names are not the real releases: refused by size or checksum.
    server.state.files["x-final.tar.gz"] = pawsx_archive()
    assert main(["download", "pawsx", "--output", str(tmp_path / "m"), "--mirror", _base(server)]) == 2
    assert "the release has 30282057: not the expected file" in _one_error_line(capsys)
    assert not (tmp_path / "m").exists()
    server.state.files["ud-treebanks-v2.5.tgz"] = ud_archive()  # no published size: the checksum decides
    assert main(["download", "udpos", "--output", str(tmp_path / "m"), "--mirror", _base(server)]) == 2
    assert "checksum mismatch for ud-treebanks-v2.5.tgz" in _one_error_line(capsys)
    assert not (tmp_path / "m").exists()

    server.state.status["ud-treebanks-v2.5.tgz"] = 500
    monkeypatch.setitem(dl.download.__kwdefaults__, "backoff", 0.001)
    assert main(["download", "udpos", "--output", str(tmp_path / "u"), "--mirror", _base(server)]) == 2
    attempts = dl.download.__kwdefaults__["attempts"]
    assert f"after {attempts} attempts (HTTP 500" in _one_error_line(capsys)
    assert not (tmp_path / "u").exists()
