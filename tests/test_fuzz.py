"""Fuzzed data files: every reader either parses a file sanely or raises one clear DlfaInputError.

Several hundred files are generated in the test from a seeded ``random.Random`` (nothing is committed): valid
files of every supported form (UD CoNLL-U, PAN-X in XTREME's and WikiANN's forms, XNLI plain / XNLI-MT /
XNLI 1.0 header, PAWS-X plain / release header), then damaged copies of them: truncated files and lines, wrong
column counts, unknown labels, invalid UTF-8, Latin-1 and UTF-16 files, random bytes and text, NUL bytes, 5 MB
lines, mixed formats, BOMs, CRLF and CR line ends, empty and blank files, odd Unicode separators, odd token ids.

For each file the outcome must be a non-empty list of examples with sane fields, or a ``DlfaInputError``
whose message is one line starting with the file path (``path:line:`` when about a line); no other
exception. Files that differ from a valid one only in a BOM, CRLF line ends or a missing final newline must
parse exactly like it. A sample goes through ``python -m dlfa train`` in a subprocess: exit status 2, one
stderr line, no traceback.
"""

from __future__ import annotations

import random
import string
import subprocess
import sys
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import write_conllu

from dlfa.data.features import TaggedSentence
from dlfa.errors import DlfaInputError
from dlfa.tasks import get_task
from dlfa.tasks.base import SentencePair
from dlfa.tasks.panx import NER_TAGS
from dlfa.tasks.udpos import UPOS_TAGS
from dlfa.tasks.xnli import NLI_LABELS

SEED = 20221
HUGE = 5 * 2**20  # a 5 MB line
WORDS = ["the", "cat", "Haus", "çà", "日本", "123", "-", "’s", "Straße", "ا", "ü", "New", "York", "(", ")"]
# Messages about a whole file; every other error must name a line.
WHOLE_FILE = ("no sentences in the file", "no sentence pairs in the file", "no rows for language")
BAD_UTF8 = [b"\xff", b"\xc3", b"\xc0\xaf", b"\xed\xa0\x80", b"\xe2\x82", b"\xf8\x88\x80\x80\x80", b"\x80"]
SEPARATORS = ["\u2028", "\u2029", "\x85", "\x0b", "\x0c", "\x1c", "\u200b", "\ufeff", "\x7f"]
ODD_IDS = ["²", "١", "0", "01", "99999999999999999999", " 1", "1 ", "-1", "1-", "1.", "x", "", "1e3", "①", "٣",
           "9" * 5000, "0" * 5000 + "1"]


# ------------------------------------------------------------------------------------------ valid files


def _words(rng: random.Random, low: int = 1, high: int = 7) -> list[str]:
    return [rng.choice(WORDS) for _ in range(rng.randint(low, high))]


def conllu(rng: random.Random) -> str:
    lines = []
    for number in range(rng.randint(1, 4)):
        words = _words(rng)
        lines += [f"# sent_id = s{number}", f"# text = {' '.join(words)}"]
        for i, word in enumerate(words, start=1):
            if rng.random() < 0.15 and i < len(words):
                lines.append("\t".join([f"{i}-{i + 1}", word + "x"] + ["_"] * 8))
            lines.append("\t".join([str(i), word, word.lower(), rng.choice(UPOS_TAGS), "_", "_", str(i - 1),
                                    "dep", "_", "_"]))
            if rng.random() < 0.1:
                lines.append("\t".join([f"{i}.1", "elided"] + ["_"] * 8))
        lines.append("")
    return "\n".join(lines) + "\n"


def panx(rng: random.Random, prefixed: bool = False) -> str:
    sentences = []
    for _ in range(rng.randint(1, 4)):
        rows = [f"{'en:' if prefixed else ''}{w}\t{rng.choice(NER_TAGS)}" for w in _words(rng, 2)]
        sentences.append("\n".join(rows))
    return "\n\n".join(sentences) + "\n"


def _sentence(rng: random.Random) -> str:
    return " ".join(_words(rng, 1, 9))


def pairs(rng: random.Random, labels: tuple[str, ...], header: str | None = None, ids: bool = False) -> str:
    rows = [header] if header else []
    for n in range(rng.randint(1, 5)):
        fields = [_sentence(rng), _sentence(rng), rng.choice(labels)]
        rows.append("\t".join(([str(n)] if ids else []) + fields))
    return "\n".join(rows) + "\n"


def xnli_release(rng: random.Random) -> str:
    rows = ["language\tgold_label\tsentence1_binary_parse\tsentence1\tsentence2\tpairID"]
    for n in range(rng.randint(1, 6)):
        label = rng.choice(NLI_LABELS + ("-",))
        rows.append("\t".join([rng.choice(["en", "de", "fr"]), label, "( x )", _sentence(rng), _sentence(rng), str(n)]))
    rows.append("\t".join(["en", "neutral", "( x )", "a", "b", "99"]))  # at least one usable English row
    return "\n".join(rows) + "\n"


@dataclass(frozen=True)
class Form:
    """A file form: the task that reads it, its file name, a generator and the label column (or None)."""

    task: str
    filename: str
    make: Callable[[random.Random], str]
    language: str | None = None  # for files with a language column: also read one language


FORMS = {
    "udpos": Form("udpos", "en-train.conllu", conllu),
    "panx": Form("panx", "train-en.tsv", panx),
    "panx-wikiann": Form("panx", "train-en.tsv", lambda rng: panx(rng, prefixed=True)),
    "xnli": Form("xnli", "train-en.tsv", lambda rng: pairs(rng, NLI_LABELS)),
    "xnli-mt": Form("xnli", "train-en.tsv",
                    lambda rng: pairs(rng, ("entailment", "neutral", "contradictory"), "premise\thypo\tlabel")),
    "xnli-1.0": Form("xnli", "train-en.tsv", xnli_release, language="en"),
    "pawsx": Form("pawsx", "train-en.tsv", lambda rng: pairs(rng, ("0", "1"))),
    "pawsx-release": Form("pawsx", "train-en.tsv",
                          lambda rng: pairs(rng, ("0", "1"), "id\tsentence1\tsentence2\tlabel", ids=True)),
}


# ------------------------------------------------------------------------------------------- mutations


def _lines(data: bytes) -> list[bytes]:
    return data.split(b"\n")


def _content_line(rng: random.Random, lines: list[bytes]) -> int:
    candidates = [i for i, line in enumerate(lines) if line.strip() and not line.startswith(b"#")]
    return rng.choice(candidates) if candidates else 0


def _edit_line(rng: random.Random, data: bytes, edit: Callable[[list[bytes]], list[bytes]]) -> bytes:
    lines = _lines(data)
    i = _content_line(rng, lines)
    lines[i] = b"\t".join(edit(lines[i].split(b"\t")))
    return b"\n".join(lines)


def _insert(rng: random.Random, data: bytes, piece: bytes) -> bytes:
    at = rng.randrange(len(data) + 1)
    return data[:at] + piece + data[at:]


def _random_text(rng: random.Random) -> bytes:
    alphabet = string.printable + "\t\t\n\nçé日本\u2028"
    return "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 3000))).encode("utf-8")


def _huge(rng: random.Random, data: bytes, name: str) -> bytes:
    """A 5 MB line: alone, as a field of an otherwise valid row, or as the label field."""
    kind = rng.choice(["alone", "field", "label"])
    if kind == "alone":
        return b"a" * HUGE
    blob = bytes(rng.choice(b"abcdefgh") for _ in range(64)) * (HUGE // 64)
    lines = _lines(data)
    i = _content_line(rng, lines)
    fields = lines[i].split(b"\t")
    where = len(fields) - 1 if kind == "label" else (1 if name == "udpos" or name.endswith("release") else 0)
    fields[min(where, len(fields) - 1)] = blob
    lines[i] = b"\t".join(fields)
    return b"\n".join(lines)


def _other_form(rng: random.Random, name: str) -> bytes:
    other = rng.choice([n for n in FORMS if n != name])
    return FORMS[other].make(rng).encode("utf-8")


def _mixed(rng: random.Random, data: bytes, name: str) -> bytes:
    other = _other_form(rng, name)
    return data + other if rng.random() < 0.5 else other + b"\n" + data


def _odd_id(rng: random.Random, data: bytes) -> bytes:
    return _edit_line(rng, data, lambda f: [rng.choice(ODD_IDS).encode("utf-8")] + f[1:])


def _bom_inside(rng: random.Random, data: bytes) -> bytes:
    lines = _lines(data)
    i = rng.randrange(1, len(lines)) if len(lines) > 1 else 0
    lines[i] = b"\xef\xbb\xbf" + lines[i]
    return b"\n".join(lines)


def _whitespace_field(rng: random.Random, data: bytes) -> bytes:
    def edit(fields: list[bytes]) -> list[bytes]:
        i = rng.randrange(len(fields))
        return fields[:i] + [rng.choice([b" ", b"", b"   ", b"\xc2\xa0"])] + fields[i + 1 :]

    return _edit_line(rng, data, edit)


MUTATIONS: dict[str, Callable[[random.Random, bytes, str], bytes]] = {
    "valid": lambda rng, d, n: d,
    "truncated-file": lambda rng, d, n: d[: rng.randrange(len(d) + 1)],
    "truncated-line": lambda rng, d, n: _edit_line(rng, d, lambda f: f[: rng.randrange(1, len(f) + 1)]),
    "missing-column": lambda rng, d, n: _edit_line(rng, d, lambda f: f[:-1] if len(f) > 1 else [b""]),
    "extra-column": lambda rng, d, n: _edit_line(rng, d, lambda f: f + [b"extra"]),
    "bad-label": lambda rng, d, n: _edit_line(rng, d, lambda f: f[:-1] + [rng.choice([b"B-MISC", b"2", b"yes",
                                                                                      b"NOUNS", b"\\t", b"O O"])]),
    "bad-utf8": lambda rng, d, n: _insert(rng, d, rng.choice(BAD_UTF8)),
    "latin1": lambda rng, d, n: d.replace(b"the", "thé".encode("latin-1")) + "café\n".encode("latin-1"),
    "utf16": lambda rng, d, n: d.decode("utf-8").encode(rng.choice(["utf-16", "utf-16-le", "utf-32"])),
    "random-bytes": lambda rng, d, n: bytes(rng.randrange(256) for _ in range(rng.randint(1, 3000))),
    "random-text": lambda rng, d, n: _random_text(rng),
    "nul-byte": lambda rng, d, n: _insert(rng, d, b"\x00"),
    "huge-line": _huge,
    "mixed-formats": _mixed,
    "bom": lambda rng, d, n: b"\xef\xbb\xbf" + d,
    "bom-inside": lambda rng, d, n: _bom_inside(rng, d),
    "utf16-bom-utf8-body": lambda rng, d, n: b"\xff\xfe" + d,
    "crlf": lambda rng, d, n: d.replace(b"\n", b"\r\n"),
    "cr-only": lambda rng, d, n: d.replace(b"\n", b"\r"),
    "no-final-newline": lambda rng, d, n: d.rstrip(b"\n"),
    "empty": lambda rng, d, n: b"",
    "blank-lines": lambda rng, d, n: rng.choice([b"\n", b"\n\n\n", b"  \n\t\n", b"\r\n\r\n", b"\t"]),
    "whitespace-field": lambda rng, d, n: _whitespace_field(rng, d),
    "unicode-separator": lambda rng, d, n: _insert(rng, d, rng.choice(SEPARATORS).encode("utf-8")),
    "odd-token-id": lambda rng, d, n: _odd_id(rng, d),
}
# Parses that must equal the parse of the unmutated file.
SAME_AS_VALID = {"bom", "crlf", "no-final-newline"}


@dataclass
class Case:
    form: str
    mutation: str
    index: int
    data: bytes
    base: bytes


def generate_cases() -> list[Case]:
    """Every form x every mutation, twice with different draws (odd token ids: UD only, more draws)."""
    rng = random.Random(SEED)
    cases = []
    for form_name, form in FORMS.items():
        for mutation, mutate in MUTATIONS.items():
            if mutation == "odd-token-id" and form.task != "udpos":
                continue
            draws = 2 if mutation != "huge-line" else 1
            draws = len(ODD_IDS) if mutation == "odd-token-id" else draws
            for index in range(draws):
                base = form.make(rng).encode("utf-8")
                cases.append(Case(form_name, mutation, index, mutate(rng, base, form_name), base))
    return cases


# ------------------------------------------------------------------------------------------- checking


def read(form: Form, path: Path) -> list:
    task = get_task(form.task)
    examples = task.read_file(path)
    if form.language is not None:
        task.read_language_file(path, form.language)
    return examples


def check_examples(task_name: str, examples: list) -> str | None:
    """None when the parse is sane, else what is wrong."""
    task = get_task(task_name)
    if not isinstance(examples, list) or not examples:
        return f"empty or not a list: {type(examples).__name__}"
    for example in examples:
        if task.head == "token":
            if not isinstance(example, TaggedSentence) or not example.words:
                return f"bad sentence {example!r:.200}"
            if len(example.words) != len(example.tags):
                return "words and tags differ in length"
            texts = example.words
            if any(tag not in task.labels for tag in example.tags):
                return f"unknown tag in {example.tags!r:.200}"
            if any(not word or not word.strip() for word in texts):
                return "empty word"
        else:
            if not isinstance(example, SentencePair) or example.label not in task.labels:
                return f"bad pair {example!r:.200}"
            texts = [example.text_a, example.text_b]
        if any(not isinstance(t, str) or "\n" in t or "\t" in t or "\x00" in t for t in texts):
            return f"a field holds a newline, tab or NUL: {texts!r:.200}"
    return None


def check_error(exc: DlfaInputError, path: Path, data: bytes) -> str | None:
    """None when the error is one line starting with the path (and ``:line`` when about a line)."""
    text = str(exc)
    if len(text.splitlines()) != 1 or "\n" in text or "\r" in text:
        return f"not one line: {text[:300]!r}"
    if not text.startswith(f"{path}:"):
        return f"does not start with the path: {text[:300]!r}"
    if exc.line is None:
        if not exc.message.startswith(WHOLE_FILE):
            return f"no line number: {text[:300]!r}"
    else:
        if not text.startswith(f"{path}:{exc.line}: "):
            return f"line not after the path: {text[:300]!r}"
        if not 1 <= exc.line <= data.count(b"\n") + 1:
            return f"line {exc.line} outside the file: {text[:300]!r}"
    if len(text) > 2000:
        return f"message of {len(text)} characters"
    return None


CASES = generate_cases()


def test_case_count_and_categories() -> None:
    assert len(CASES) >= 200
    assert {c.mutation for c in CASES} == set(MUTATIONS)
    assert {c.form for c in CASES} == set(FORMS)


def outcome(case: Case, folder: Path) -> tuple[str, str | None, DlfaInputError | None]:
    """('parsed' | 'error' | 'crash', problem or None, the error)."""
    form = FORMS[case.form]
    path = folder / f"{case.form}-{case.mutation}-{case.index}" / form.filename
    path.parent.mkdir(parents=True)
    path.write_bytes(case.data)
    try:
        examples = read(form, path)
    except DlfaInputError as exc:
        return "error", check_error(exc, path, case.data), exc
    except Exception as exc:  # noqa: BLE001 - any other type is the failure this test looks for
        return "crash", f"{type(exc).__name__}: {str(exc)[:300]}", None
    problem = check_examples(form.task, examples)
    if problem is None and case.mutation in SAME_AS_VALID:
        base = path.with_name("base-" + path.name)
        base.write_bytes(case.base)
        if read(form, base) != examples:
            problem = "parse differs from the unmutated file's"
    return "parsed", problem, None


def test_every_fuzzed_file_parses_or_gives_one_clear_error(tmp_path: Path) -> None:
    counts: Counter[str] = Counter()
    problems = []
    for case in CASES:
        kind, problem, _ = outcome(case, tmp_path)
        counts[kind] += 1
        if kind == "crash" or problem:
            problems.append(f"{case.form}/{case.mutation}/{case.index} ({kind}): {problem}")
    assert not problems, f"{len(problems)} of {len(CASES)} files mishandled:\n" + "\n".join(problems)
    assert counts["parsed"] > 20 and counts["error"] > 100, counts


def test_valid_forms_parse_and_mutations_that_must_fail_do(tmp_path: Path) -> None:
    for case in CASES:
        kind, _, exc = outcome(case, tmp_path)
        if case.mutation in ("valid", "bom", "crlf", "no-final-newline"):
            assert kind == "parsed", (case.form, case.mutation, str(exc)[:200])
        if case.mutation in ("empty", "blank-lines", "nul-byte", "utf16", "extra-column"):
            assert kind == "error", (case.form, case.mutation)


# ----------------------------------------------------------------------------------------------- CLI

CLI_SAMPLE = 6  # each case is a subprocess (~5 s); the in-process test covers every file


def _data_dir(folder: Path, form: Form) -> Path:
    """A data folder whose English training file is replaced by the fuzzed one; other files are valid."""
    folder.mkdir(parents=True)
    rng = random.Random(SEED)
    if form.task == "udpos":
        for name in ("en-dev.conllu", "de-test.conllu"):
            write_conllu(folder / name, [[("the", "DET"), ("cat", "NOUN")]])
    elif form.task == "panx":
        for name in ("dev-en.tsv", "dev-de.tsv"):
            (folder / name).write_text(panx(rng), encoding="utf-8")
    else:
        labels = NLI_LABELS if form.task == "xnli" else ("0", "1")
        for name in ("dev-en.tsv", "test-de.tsv"):
            (folder / name).write_text(pairs(rng, labels), encoding="utf-8")
    return folder


def test_cli_sample_exits_2_with_one_line(tmp_path: Path, tiny_model_dir: Path) -> None:
    failing = [c for c in CASES if outcome(c, tmp_path / "probe")[0] == "error"]
    rng = random.Random(SEED)
    by_task: dict[str, list[Case]] = {}
    for case in failing:
        by_task.setdefault(FORMS[case.form].task, []).append(case)
    sample = [case for cases in by_task.values() for case in rng.sample(cases, min(2, len(cases)))][:CLI_SAMPLE]
    assert len(sample) == CLI_SAMPLE
    for n, case in enumerate(sample):
        form = FORMS[case.form]
        data_dir = _data_dir(tmp_path / f"cli{n}", form)
        train_file = data_dir / form.filename
        train_file.write_bytes(case.data)
        try:
            read(form, train_file)
            raise AssertionError("expected an input error")
        except DlfaInputError as exc:
            expected = f"dlfa: error: {exc}"
        args = ["train", "--task", form.task, "--model", str(tiny_model_dir), "--data-dir", str(data_dir),
                "--languages", "de", "--output", str(tmp_path / f"run{n}"), "--epochs", "1"]
        if form.task in ("xnli", "pawsx"):
            args += ["--train-split", "train"]
        done = subprocess.run([sys.executable, "-m", "dlfa", *args], capture_output=True, text=True, timeout=300)
        where = f"{case.form}/{case.mutation}/{case.index}"
        assert "Traceback" not in done.stderr + done.stdout, (where, done.stderr[-2000:])
        assert done.returncode == 2, (where, done.returncode, done.stderr[-2000:])
        assert done.stderr.splitlines() == [expected], (where, done.stderr[-2000:])
        assert not (tmp_path / f"run{n}").exists()


@pytest.mark.parametrize("token_id", ["²", "١", "①", "9" * 5000])
def test_odd_token_ids_are_input_errors(tmp_path: Path, token_id: str) -> None:
    """Found by fuzzing: "²".isdigit() is True but int("²") fails, as does int() of 5000 digits."""
    path = tmp_path / "en-test.conllu"
    path.write_text("\t".join([token_id, "word", "_", "NOUN"] + ["_"] * 6) + "\n", encoding="utf-8")
    with pytest.raises(DlfaInputError, match=r"en-test\.conllu:1: token id") as info:
        get_task("udpos").read_file(path)
    assert len(str(info.value)) < 300


@pytest.mark.parametrize("form", [" ", "\u00a0", "  "])
def test_whitespace_only_word_forms_are_input_errors(tmp_path: Path, form: str) -> None:
    path = tmp_path / "en-test.conllu"
    path.write_text("\t".join(["1", form, "_", "NOUN"] + ["_"] * 6) + "\n", encoding="utf-8")
    with pytest.raises(DlfaInputError, match=r"en-test\.conllu:1: empty word form"):
        get_task("udpos").read_file(path)


def test_huge_unknown_label_gives_a_short_message(tmp_path: Path) -> None:
    path = tmp_path / "test-de.tsv"
    path.write_text("a\tb\t" + "x" * HUGE + "\n", encoding="utf-8")
    with pytest.raises(DlfaInputError, match=r"test-de\.tsv:1: unknown label 'xxx") as info:
        get_task("pawsx").read_file(path)
    assert len(str(info.value)) < 300
