"""Damaged files on disk: truncated or corrupted → a clear error or a rebuild, never silently used.

Covers what tests/test_resume.py, tests/test_modeling.py, tests/test_cache_and_guard.py and
tests/test_embedded.py leave out, for the four things dlfa reads back: the run checkpoint, the saved model
(``best/``), the feature cache and the embedded-model cache. Gaps of the current code are written as strict
``xfail`` tests naming the change they need, so that they start failing (XPASS) once it is made (none is left).

Checkpoints and saved models carry sha256 checksums (``checksums.json``), which catch any damage to the files they
list. The ``rehash`` variants re-record the checksums after the damage, as a buggy writer would, to test the
structural checks behind them.
"""

from __future__ import annotations

import json
import random
import struct
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.numpy import load_file, save_file
from test_embedded import NAME, write_tiny_e5s1

import dlfa.modeling.embedded as emb
from dlfa.data.cache import FeatureCache
from dlfa.errors import DlfaInputError
from dlfa.io import CHECKSUMS_NAME, write_checksums
from dlfa.modeling import load_dlfa_model, save_dlfa_model
from dlfa.modeling.modeling_dlfa import DLFAForTokenClassification
from dlfa.training.checkpoint import CHECKSUMS_FILE, FILES, load_checkpoint, save_checkpoint

SAMPLED_POSITIONS = 60


def _header_length(path: Path) -> int:
    """Bytes of a safetensors file before its tensor data: 8-byte length + JSON header."""
    return 8 + struct.unpack("<Q", path.read_bytes()[:8])[0]


def _flip(path: Path, position: int, bit: int = 0) -> None:
    data = bytearray(path.read_bytes())
    data[position] ^= 1 << bit
    path.write_bytes(bytes(data))


def _state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ---------------------------------------------------------------------------------------------- checkpoint


@pytest.fixture
def trained(tiny_model_dir: Path):
    """A tiny DLFA model after one optimizer step, with its optimizer and scheduler."""
    torch.manual_seed(0)
    model = DLFAForTokenClassification.from_encoder(str(tiny_model_dir), fuse_layer=1, id2label=["a", "b", "c"])
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    ids, mask = torch.tensor([[0, 5, 6, 2]]), torch.ones(1, 4, dtype=torch.long)
    model(ids, mask, labels=torch.tensor([[0, 1, 2, 0]])).loss.backward()
    optimizer.step()
    scheduler.step()
    return model, optimizer, scheduler


@pytest.fixture
def checkpoint(trained, tmp_path: Path) -> Path:
    model, optimizer, scheduler = trained
    folder = tmp_path / "ckpt"
    save_checkpoint(folder, model, optimizer, scheduler, torch.Generator().manual_seed(1), {"step": 1})
    return folder


def _load(folder: Path, trained) -> dict:
    model, optimizer, scheduler = trained
    return load_checkpoint(folder, model, optimizer, scheduler, torch.Generator())


@pytest.mark.parametrize("name", FILES)
@pytest.mark.parametrize("keep", [0, 7, 8, 0.5, -1])
def test_truncated_checkpoint_file_is_a_clear_error(checkpoint: Path, trained, name: str, keep: float) -> None:
    path = checkpoint / name
    data = path.read_bytes()
    cut = int(len(data) * keep) if isinstance(keep, float) else (keep if keep >= 0 else len(data) + keep)
    path.write_bytes(data[:cut])
    with pytest.raises(DlfaInputError, match="corrupt checkpoint") as info:
        _load(checkpoint, trained)
    assert str(info.value).startswith(str(checkpoint)) and "\n" not in str(info.value)


def _restored(folder: Path, trained) -> dict[str, torch.Tensor]:
    """Everything load_checkpoint restores, as tensors: weights, optimizer state, RNG and sampler states."""
    model, optimizer, scheduler = trained
    sampler = torch.Generator()
    progress = load_checkpoint(folder, model, optimizer, scheduler, sampler)
    state = {f"model.{k}": v for k, v in _state(model).items()}
    for index, entry in optimizer.state_dict()["state"].items():
        state.update({f"optimizer.{index}.{k}": torch.as_tensor(v).clone() for k, v in entry.items()})
    state["rng.torch"] = torch.get_rng_state()
    state["rng.sampler"] = sampler.get_state()
    state["progress.step"] = torch.tensor(progress["step"])
    return state


def _rehash(folder: Path) -> None:
    """Record the checksums of a checkpoint's files as they are now (damage included)."""
    write_checksums(folder, FILES)


def _header_outcomes(folder: Path, trained, name: str, rehash: bool = False) -> dict[str, list[int]]:
    """Flip one random bit at sampled header positions of one file: how did each load end?"""
    reference = _restored(folder, trained)
    path = folder / name
    original = path.read_bytes()
    checksums = (folder / CHECKSUMS_FILE).read_bytes()
    rng = random.Random(name)
    size = _header_length(path)
    outcomes: dict[str, list[int]] = {}
    for position in sorted(rng.sample(range(size), min(SAMPLED_POSITIONS, size))):
        path.write_bytes(original)
        _flip(path, position, rng.randrange(8))
        if rehash:
            _rehash(folder)
        try:
            kind = "identical" if _same(_restored(folder, trained), reference) else "silently different"
        except DlfaInputError:
            kind = "clear error"
        except Exception as exc:  # noqa: BLE001 - any other exception is a finding
            kind = f"crash ({type(exc).__name__})"
        outcomes.setdefault(kind, []).append(position)
    path.write_bytes(original)
    (folder / CHECKSUMS_FILE).write_bytes(checksums)
    return outcomes


@pytest.mark.parametrize("rehash", [False, True])
@pytest.mark.parametrize("name", ["model.safetensors", "optimizer.safetensors", "rng.safetensors"])
def test_checkpoint_header_damage_is_a_clear_error_or_harmless(
    checkpoint: Path, trained, name: str, rehash: bool
) -> None:
    """Single-bit flips in a safetensors header: a clear error, or exactly the undamaged checkpoint's state.

    With ``rehash``, a renamed optimizer tensor ('36.exp_avg_sq' -> '26.exp_avg_sq') must not restore its state
    onto another parameter, a renamed 'torch_cpu' must not be a bare KeyError and a renamed 'sampler' must not
    leave the sampler silently unrestored.
    """
    outcomes = _header_outcomes(checkpoint, trained, name, rehash)
    assert set(outcomes) <= {"clear error", "identical"}, outcomes


@pytest.mark.parametrize("rehash", [False, True])
@pytest.mark.parametrize("damage", ["garbage", "not an object", "list"])
def test_unparseable_checkpoint_state_is_a_clear_error(checkpoint: Path, trained, damage: str, rehash: bool) -> None:
    text = {"garbage": "{not json", "not an object": '"text"', "list": "[1, 2]"}[damage]
    (checkpoint / "state.json").write_text(text)
    if rehash:
        _rehash(checkpoint)
    with pytest.raises(DlfaInputError, match="corrupt checkpoint") as info:
        _load(checkpoint, trained)
    assert str(info.value).startswith(str(checkpoint)) and "\n" not in str(info.value)


@pytest.mark.parametrize("rehash", [False, True])
@pytest.mark.parametrize("key", ["scheduler", "python_random", "numpy_random", "progress", "optimizer"])
def test_checkpoint_state_missing_a_key_is_a_clear_error(checkpoint: Path, trained, key: str, rehash: bool) -> None:
    state = json.loads((checkpoint / "state.json").read_text())
    del state[key]
    (checkpoint / "state.json").write_text(json.dumps(state))
    if rehash:
        _rehash(checkpoint)
    with pytest.raises(DlfaInputError, match="corrupt checkpoint") as info:
        _load(checkpoint, trained)
    if rehash:
        assert f"state.json has no '{key}'" in str(info.value)


@pytest.mark.parametrize("name", FILES)
def test_checkpoint_data_corruption_is_detected(checkpoint: Path, trained, name: str) -> None:
    path = checkpoint / name
    if name == "state.json":
        state = json.loads(path.read_text())
        state["progress"]["step"] = 7
        path.write_text(json.dumps(state))
    else:
        _flip(path, path.stat().st_size - 2, 6)
    with pytest.raises(DlfaInputError, match=f"corrupt checkpoint.*{name}.*sha256") as info:
        _load(checkpoint, trained)
    assert str(info.value).startswith(str(checkpoint)) and "\n" not in str(info.value)


@pytest.mark.parametrize("damage", ["missing", "empty", "garbage", "truncated", "not ours", "wrong digest",
                                    "entry missing", "extra entry"])
def test_damaged_checkpoint_checksums_are_a_clear_error(checkpoint: Path, trained, damage: str) -> None:
    path = checkpoint / CHECKSUMS_FILE
    data = json.loads(path.read_text())
    if damage == "missing":
        path.unlink()
    elif damage in ("empty", "garbage", "truncated"):
        text = path.read_text()
        path.write_text({"empty": "", "garbage": "\x00 not json", "truncated": text[: len(text) // 2]}[damage])
    elif damage == "not ours":
        path.write_text(json.dumps({"model.safetensors": "0" * 64}))
    else:
        digests = data["sha256"]
        if damage == "wrong digest":
            digests["rng.safetensors"] = "0" * 64
        elif damage == "entry missing":
            del digests["rng.safetensors"]
        else:
            digests["other.safetensors"] = "0" * 64
        path.write_text(json.dumps(data))
    expected = "incomplete checkpoint" if damage == "missing" else "corrupt checkpoint"
    with pytest.raises(DlfaInputError, match=expected) as info:
        _load(checkpoint, trained)
    assert str(info.value).startswith(str(checkpoint)) and "\n" not in str(info.value)
    assert CHECKSUMS_FILE in str(info.value) or "rng.safetensors" in str(info.value)


def test_checkpoint_is_safetensors_and_json_only(checkpoint: Path) -> None:
    assert sorted(p.name for p in checkpoint.iterdir()) == sorted((*FILES, CHECKSUMS_FILE))
    assert json.loads((checkpoint / CHECKSUMS_FILE).read_text())["sha256"].keys() == set(FILES)


def _rewrite_safetensors(path: Path, change) -> None:
    """Rewrite a checkpoint's safetensors file through ``change(tensors)``, then re-record the checksums."""
    from safetensors.torch import load_file as load_torch
    from safetensors.torch import save_file as save_torch

    tensors = load_torch(str(path))
    change(tensors)
    save_torch(tensors, str(path))
    _rehash(path.parent)


@pytest.mark.parametrize("damage", ["renamed", "wrong shape", "extra", "missing", "names no parameter"])
def test_optimizer_state_must_match_the_parameters(checkpoint: Path, trained, damage: str) -> None:
    state_path = checkpoint / "state.json"
    state = json.loads(state_path.read_text())
    moment = next(n for n in state["optimizer"]["tensors"] if n.endswith(".exp_avg"))
    index = moment.split(".")[0]
    if damage == "names no parameter":  # consistently renamed in both files: only the index check can tell
        state["optimizer"]["tensors"] = [n.replace(moment, "10000.exp_avg") for n in state["optimizer"]["tensors"]]
        state_path.write_text(json.dumps(state))

    def change(tensors: dict[str, torch.Tensor]) -> None:
        if damage in ("renamed", "names no parameter"):
            tensors["10000.exp_avg" if damage == "names no parameter" else f"{index}.exp_avg_x"] = tensors.pop(moment)
        elif damage == "wrong shape":
            tensors[moment] = torch.zeros(tensors[moment].numel() + 1)
        elif damage == "extra":
            tensors[f"{index}.extra"] = torch.zeros(1)
        else:
            del tensors[moment]

    _rewrite_safetensors(checkpoint / "optimizer.safetensors", change)
    with pytest.raises(DlfaInputError, match="corrupt checkpoint.*optimizer"):
        _load(checkpoint, trained)


def test_optimizer_tensor_on_a_parameter_of_another_shape_is_refused(checkpoint: Path, trained) -> None:
    state = json.loads((checkpoint / "state.json").read_text())
    names = state["optimizer"]["tensors"]
    shapes: dict[str, tuple] = {}
    _rewrite_safetensors(checkpoint / "optimizer.safetensors", lambda t: shapes.update({n: t[n].shape for n in t}))
    # Swap the state of two parameters of different shapes, names and all: only the shape check can tell.
    first = next(n for n in names if n.endswith(".exp_avg"))
    second = next(n for n in names if n.endswith(".exp_avg") and shapes[n] != shapes[first])

    def swap(tensors: dict[str, torch.Tensor]) -> None:
        tensors[first], tensors[second] = tensors[second], tensors[first]

    _rewrite_safetensors(checkpoint / "optimizer.safetensors", swap)
    with pytest.raises(DlfaInputError, match="corrupt checkpoint.*shape"):
        _load(checkpoint, trained)


def test_rng_state_without_the_sampler(checkpoint: Path, trained) -> None:
    _rewrite_safetensors(checkpoint / "rng.safetensors", lambda tensors: tensors.pop("sampler"))
    with pytest.raises(DlfaInputError, match="corrupt checkpoint.*rng.safetensors has no 'sampler'"):
        _load(checkpoint, trained)
    model, optimizer, scheduler = trained
    assert load_checkpoint(checkpoint, model, optimizer, scheduler, None) == {"step": 1}  # no sampler to restore


def test_rng_state_without_torch_cpu_is_a_clear_error(checkpoint: Path, trained) -> None:
    _rewrite_safetensors(checkpoint / "rng.safetensors", lambda tensors: tensors.pop("torch_cpu"))
    with pytest.raises(DlfaInputError, match="corrupt checkpoint.*rng.safetensors has no 'torch_cpu'"):
        _load(checkpoint, trained)


# ---------------------------------------------------------------------------------------------- best/ model


@pytest.fixture
def saved(tiny_model_dir: Path, tmp_path: Path) -> Path:
    torch.manual_seed(0)
    model = DLFAForTokenClassification.from_encoder(str(tiny_model_dir), fuse_layer=2, id2label=list("abcde"))
    save_dlfa_model(model, tmp_path / "best")
    return tmp_path / "best"


@pytest.fixture
def saved_legacy(tiny_model_dir: Path, tmp_path: Path) -> Path:
    """A best/ folder as dlfa 0.1 wrote it (dlfa_config.json + the encoder's config.json)."""
    from dlfa01_modeling import DLFAConfig as LegacyConfig
    from dlfa01_modeling import DLFAModel as LegacyModel

    torch.manual_seed(0)
    LegacyModel.from_encoder(LegacyConfig(num_labels=5, fuse_layer=2), str(tiny_model_dir)).save_pretrained(
        tmp_path / "legacy")
    return tmp_path / "legacy"


@pytest.mark.parametrize("keep", [0, 7, 8, 100, 0.5])
def test_truncated_model_weights_are_a_clear_error(saved: Path, keep: float) -> None:
    path = saved / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep) if isinstance(keep, float) else keep])
    with pytest.raises(DlfaInputError, match="model.safetensors"):
        load_dlfa_model(saved)


def test_model_header_damage_is_an_error_or_harmless(saved: Path) -> None:
    reference = _state(load_dlfa_model(saved))
    path = saved / "model.safetensors"
    original = path.read_bytes()
    rng = random.Random(0)
    size = _header_length(path)
    for position in rng.sample(range(size), min(SAMPLED_POSITIONS, size)):
        path.write_bytes(original)
        _flip(path, position, rng.randrange(8))
        try:
            loaded = load_dlfa_model(saved)
        except DlfaInputError:
            continue
        assert _same(_state(loaded), reference), f"flipped header byte {position} changed the loaded weights"


DAMAGES = ("truncated", "garbage", "empty", "not an object")


@pytest.mark.parametrize("folder,name,damage", [
    *(("saved", "config.json", damage) for damage in (*DAMAGES, "bad value", "no model type", "bad encoder")),
    *(("saved_legacy", name, damage) for name in ("dlfa_config.json", "config.json") for damage in DAMAGES),
    ("saved_legacy", "dlfa_config.json", "bad value"),
    ("saved_legacy", "config.json", "no model type"),
])
def test_damaged_model_config_is_a_clear_error(request, folder: str, name: str, damage: str) -> None:
    saved = request.getfixturevalue(folder)
    path = saved / name
    text = path.read_text()
    path.write_text({"truncated": text[: len(text) // 2], "garbage": "\x00\x01 not json", "empty": "",
                     "not an object": "[1, 2]", "no model type": "{}",
                     "bad value": text.replace('"layernorm"', '"batchnorm"'),
                     "bad encoder": text.replace('"model_type": "bert"', '"model_type": "no-such-model"')}[damage])
    with pytest.raises(DlfaInputError, match=name.replace(".", r"\.")) as info:
        load_dlfa_model(saved)
    assert info.value.path == str(path) and "\n" not in str(info.value)


def test_model_weight_bit_flip_is_detected(saved: Path) -> None:
    path = saved / "model.safetensors"
    _flip(path, _header_length(path) + (path.stat().st_size - _header_length(path)) // 2, 6)
    with pytest.raises(DlfaInputError, match="model.safetensors.*sha256") as info:
        load_dlfa_model(saved)
    assert info.value.path == str(path)


def test_model_checksum_is_recorded_last_and_matches(saved: Path) -> None:
    from dlfa.io import sha256_file

    checksums = json.loads((saved / CHECKSUMS_NAME).read_text())
    assert checksums["sha256"] == {"model.safetensors": sha256_file(saved / "model.safetensors")}
    assert (saved / CHECKSUMS_NAME).stat().st_mtime_ns >= (saved / "model.safetensors").stat().st_mtime_ns


def test_model_without_a_checksum_still_loads(saved: Path) -> None:
    """Folders saved before checksums existed (or by other tools) load unverified."""
    reference = _state(load_dlfa_model(saved))
    (saved / CHECKSUMS_NAME).unlink()
    assert _same(_state(load_dlfa_model(saved)), reference)


def test_model_checksum_without_the_weights_entry_still_loads(saved: Path) -> None:
    reference = _state(load_dlfa_model(saved))
    path = saved / CHECKSUMS_NAME
    data = json.loads(path.read_text())
    data["sha256"] = {}
    path.write_text(json.dumps(data))
    assert _same(_state(load_dlfa_model(saved)), reference)


@pytest.mark.parametrize("damage", ["empty", "garbage", "truncated", "not ours", "bad digest"])
def test_damaged_model_checksums_are_a_clear_error(saved: Path, damage: str) -> None:
    path = saved / CHECKSUMS_NAME
    text = path.read_text()
    data = json.loads(text)
    data["sha256"]["model.safetensors"] = "xyz"
    path.write_text({"empty": "", "garbage": "\x00 not json", "truncated": text[: len(text) // 2],
                     "not ours": json.dumps({"model.safetensors": "0" * 64}), "bad digest": json.dumps(data)}[damage])
    with pytest.raises(DlfaInputError, match=CHECKSUMS_NAME.replace(".", r"\.")) as info:
        load_dlfa_model(saved)
    assert info.value.path == str(path) and "\n" not in str(info.value)


# ---------------------------------------------------------------------------------------------- feature cache


FEATURES = [
    {"input_ids": [0, 7, 8, 2], "labels": [-100, 3, 4, -100], "sentence_index": 0, "word_indices": [0, 1]},
    {"input_ids": [0, 9, 2], "labels": [-100, 1, -100], "sentence_index": 1, "word_indices": [0]},
    {"input_ids": [0, 2], "labels": [-100, -100], "sentence_index": 2, "word_indices": []},
]
KEY = "0123456789abcdef0123456789abcdef"


def _cache_entry(root: Path, key: str = KEY, features: list[dict] = FEATURES) -> Path:
    FeatureCache(root).get_or_build(key, lambda: features)
    return root / f"{key}.safetensors"


def _reads_back_or_rebuilds(root: Path, key: str = KEY) -> str:
    """'hit' if the entry was used (it must then equal FEATURES), 'rebuilt' if it was rebuilt."""
    cache = FeatureCache(root)
    rebuilt = []
    got = cache.get_or_build(key, lambda: rebuilt.append(1) or FEATURES)
    assert got == FEATURES
    return "rebuilt" if rebuilt else "hit"


def test_every_single_bit_flip_of_a_cache_entry_is_caught(tmp_path: Path) -> None:
    entry = _cache_entry(tmp_path)
    original = entry.read_bytes()
    rng = random.Random(1)
    outcomes = {"hit": 0, "rebuilt": 0}
    for position in range(len(original)):
        entry.write_bytes(original)
        _flip(entry, position, rng.randrange(8))
        outcomes[_reads_back_or_rebuilds(tmp_path)] += 1
    # Flips in JSON whitespace/padding may be harmless; every other one must have been rebuilt.
    assert outcomes["rebuilt"] > 0.9 * len(original), outcomes


@pytest.mark.parametrize("damage", ["empty", "other key", "count+1", "count-1"])
def test_damaged_cache_entry_is_rebuilt(tmp_path: Path, damage: str) -> None:
    entry = _cache_entry(tmp_path)
    if damage == "empty":
        entry.write_bytes(b"")
    elif damage == "other key":
        other = _cache_entry(tmp_path / "other", key="f" * 32, features=FEATURES)
        entry.write_bytes(other.read_bytes())
    else:
        with safe_open(str(entry), framework="np") as handle:
            metadata = dict(handle.metadata())
        arrays = load_file(str(entry))
        metadata["count"] = str(len(FEATURES) + (1 if damage == "count+1" else -1))
        save_file(arrays, str(entry), metadata=metadata)
    assert _reads_back_or_rebuilds(tmp_path) == "rebuilt"


# ---------------------------------------------------------------------------------------------- embedded model


@pytest.fixture
def embedded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A tiny embedded-model conversion in a private cache (see tests/test_embedded.py)."""
    source = write_tiny_e5s1(tmp_path / "tiny-q4.bin")
    monkeypatch.setattr(emb, "embedded_source_path", lambda name: source)
    return emb.embedded_model_dir(NAME, cache_dir=tmp_path / "cache")


def test_embedded_weight_bit_flip_fails_the_full_check(embedded: Path) -> None:
    from dlfa.modeling.embedded import verify_embedded_dir

    weights = embedded / "model.safetensors"
    _flip(weights, weights.stat().st_size - 5, 3)
    verify_embedded_dir(embedded)  # sizes unchanged: the cheap check on every load cannot see it
    with pytest.raises(DlfaInputError, match="model.safetensors does not match its sha256"):
        verify_embedded_dir(embedded, full=True)


def test_embedded_weight_bit_flip_is_rebuilt_on_use(embedded: Path) -> None:
    weights = embedded / "model.safetensors"
    good = weights.read_bytes()
    _flip(weights, weights.stat().st_size - 5, 3)
    folder = emb.embedded_model_dir(NAME, cache_dir=embedded.parent.parent)
    assert (folder / "model.safetensors").read_bytes() == good


def test_embedded_full_check_runs_once_per_process(embedded: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The full re-hash is memoised per folder; a rewritten file (new mtime or inode) is hashed again."""
    hashed: list[str] = []
    real = emb.sha256_file
    monkeypatch.setattr(emb, "sha256_file", lambda path: hashed.append(path.name) or real(path))
    cache_dir = embedded.parent.parent
    assert emb.embedded_model_dir(NAME, cache_dir=cache_dir) == embedded
    assert "model.safetensors" in hashed  # first use in this process after the conversion: hashed once
    hashed.clear()
    assert emb.embedded_model_dir(NAME, cache_dir=cache_dir) == embedded
    assert hashed == []
    weights = embedded / "model.safetensors"
    data = weights.read_bytes()
    weights.unlink()
    weights.write_bytes(data)  # same bytes, another inode: hashed again, and still good
    assert emb.embedded_model_dir(NAME, cache_dir=cache_dir) == embedded
    assert "model.safetensors" in hashed
