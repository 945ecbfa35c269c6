"""No code path loads pickle: checkpoints, saved models and the feature cache are safetensors + JSON only.

(a) A static check of ``src/dlfa`` (comments and strings ignored): no ``torch.load``/``torch.save``, no
``pickle``/``dill``/``joblib``-style modules, no ``numpy.load(..., allow_pickle=True)``.
(b) A runtime check: with ``pickle.load``/``loads``/``Unpickler``, ``torch.load``/``save`` and pickling
``numpy.load`` made to fail (and recorded), a tiny run trains with checkpoints, resumes from its checkpoint,
reloads its saved model and hits the feature cache.
"""

from __future__ import annotations

import ast
import io
import json
import pickle
import re
import tokenize
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy
import pytest
import torch

from dlfa.data.cache import FeatureCache
from dlfa.modeling import load_dlfa_model
from dlfa.training.config import TrainConfig
from dlfa.training.recipe import FinetuneRecipe

SRC = Path(__file__).resolve().parents[1] / "src" / "dlfa"

PICKLING_MODULES = {"pickle", "_pickle", "cPickle", "dill", "cloudpickle", "joblib", "shelve", "marshal"}
FORBIDDEN_CALLS = {"torch.load", "torch.save", "torch.serialization.load", "torch.serialization.save"}
NUMPY_LOADS = {"numpy.load", "np.load"}
# What the code-only text (comments and strings removed) must not contain, as a second net behind the AST.
TEXT_PATTERNS = [
    re.compile(r"\btorch\s*\.\s*(load|save)\b"),
    re.compile(r"\b(c|_)?pickle\b"),
    re.compile(r"\ballow_pickle\s*=\s*True\b"),
    re.compile(r"\b(dill|cloudpickle|joblib|shelve)\b"),
]


def _dotted(node: ast.AST) -> str | None:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        base = _dotted(node.value)
        return None if base is None else f"{base}.{node.attr}"
    return None


def pickle_uses(source: str, filename: str = "<source>") -> list[str]:
    """Every pickle-loading or -saving construct in ``source`` (comments and docstrings ignored)."""
    found: list[str] = []
    tree = ast.parse(source, filename)
    aliases: dict[str, str] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                top = alias.name.split(".")[0]
                aliases[alias.asname or top] = alias.name if alias.asname else top
                if alias.name.split(".")[0] in PICKLING_MODULES:
                    found.append(f"{filename}:{node.lineno}: import {alias.name}")
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if module.split(".")[0] in PICKLING_MODULES:
                found.append(f"{filename}:{node.lineno}: from {module} import ...")
            for alias in node.names:
                full = f"{module}.{alias.name}"
                aliases[alias.asname or alias.name] = full
                if full in FORBIDDEN_CALLS or full in NUMPY_LOADS:
                    found.append(f"{filename}:{node.lineno}: from {module} import {alias.name}")
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        name = _dotted(node.func)
        if name is None:
            continue
        head, _, rest = name.partition(".")
        resolved = aliases.get(head, head) + (f".{rest}" if rest else "")
        if resolved in FORBIDDEN_CALLS or resolved.split(".")[0] in PICKLING_MODULES:
            found.append(f"{filename}:{node.lineno}: {name}(...)")
        if resolved in NUMPY_LOADS or resolved == "numpy.load":
            for keyword in node.keywords:
                if keyword.arg == "allow_pickle" and not (
                    isinstance(keyword.value, ast.Constant) and keyword.value.value is False
                ):
                    found.append(f"{filename}:{node.lineno}: {name}(..., allow_pickle=...)")
    return found


SKIPPED_TOKENS = {tokenize.COMMENT, tokenize.STRING} | {
    getattr(tokenize, name) for name in ("FSTRING_START", "FSTRING_MIDDLE", "FSTRING_END") if hasattr(tokenize, name)
}


def code_text(source: str) -> str:
    """The source without comments and string literals."""
    kept = []
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type in SKIPPED_TOKENS:
            continue
        kept.append(token.string)
    return " ".join(kept)


def text_hits(source: str, filename: str = "<source>") -> list[str]:
    text = code_text(source)
    return [f"{filename}: {m.group(0)!r}" for pattern in TEXT_PATTERNS for m in pattern.finditer(text)]


def test_checker_finds_what_it_should_and_ignores_comments_and_docstrings() -> None:
    bad = [
        "import torch\nstate = torch.load(path)\n",
        "import torch as T\nT.save(x, p)\n",
        "from torch import load\nload(p)\n",
        "import pickle\n",
        "import numpy as np\nnp.load(p, allow_pickle=True)\n",
        "from joblib import load\n",
    ]
    for source in bad:
        assert pickle_uses(source) or text_hits(source), source
    good = (
        '"""Uses torch.load? No: safetensors, no pickle."""\n'
        "# torch.load(x) is never called\nimport numpy as np\nnp.load(p)\nnp.load(p, allow_pickle=False)\n"
    )
    assert pickle_uses(good) == [] and text_hits(good) == []


def test_source_never_loads_or_saves_pickle() -> None:
    files = sorted(SRC.rglob("*.py"))
    assert len(files) > 10
    found = []
    for path in files:
        source = path.read_text(encoding="utf-8")
        name = str(path.relative_to(SRC.parent))
        found += pickle_uses(source, name) + text_hits(source, name)
    assert found == [], "\n".join(found)


# --------------------------------------------------------------------------------------------- runtime


@pytest.fixture
def no_pickle(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Make every pickle entry point fail; returns the list of attempted calls."""
    calls: list[str] = []

    def blocked(name: str, original: Callable[..., Any] | None = None,
                allowed: Callable[..., bool] | None = None) -> Callable[..., Any]:
        def guard(*args: Any, **kwargs: Any) -> Any:
            if allowed is not None and original is not None and allowed(*args, **kwargs):
                return original(*args, **kwargs)
            calls.append(name)
            raise AssertionError(f"{name} called: pickle is not allowed here")

        return guard

    class NoUnpickler:
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            calls.append("pickle.Unpickler")
            raise AssertionError("pickle.Unpickler used")

    monkeypatch.setattr(pickle, "load", blocked("pickle.load"))
    monkeypatch.setattr(pickle, "loads", blocked("pickle.loads"))
    monkeypatch.setattr(pickle, "Unpickler", NoUnpickler)
    monkeypatch.setattr(torch, "load", blocked("torch.load"))
    monkeypatch.setattr(torch.serialization, "load", blocked("torch.serialization.load"))
    monkeypatch.setattr(torch, "save", blocked("torch.save"))
    monkeypatch.setattr(torch.serialization, "save", blocked("torch.serialization.save"))
    monkeypatch.setattr(numpy, "load", blocked("numpy.load(allow_pickle=True)", numpy.load,
                                               lambda *a, **k: not k.get("allow_pickle", False)))
    return calls


def test_guard_blocks_pickle(no_pickle: list[str], tmp_path: Path) -> None:
    with pytest.raises(AssertionError):
        pickle.loads(b"\x80\x04K\x01.")
    with pytest.raises(AssertionError):
        torch.load(tmp_path / "x.pt")
    assert no_pickle == ["pickle.loads", "torch.load"]


def test_train_resume_and_reload_without_pickle(no_pickle: list[str], tiny_model_dir: Path, tiny_udpos_dir: Path,
                                                tmp_path: Path) -> None:
    out = tmp_path / "run"
    config = TrainConfig(task="udpos", model=str(tiny_model_dir), data_dir=str(tiny_udpos_dir), output_dir=str(out),
                         languages=["de"], epochs=2, batch_size=2, learning_rate=5e-4, checkpoint_every=2, seed=1,
                         fuse_layer=2, cpu=True)
    # A first run that stops after training: its last checkpoint stays, as after a kill.
    first = FinetuneRecipe(config, show_progress=False)
    try:
        first.setup()
        first.train()
    finally:
        first.cleanup()
    state = json.loads((out / "checkpoint" / "state.json").read_text())
    assert 0 < state["progress"]["step"] < first.total_steps
    assert first.feature_cache.misses >= 2

    second = FinetuneRecipe(config, show_progress=False, resume=True)
    result = second.run()
    assert second.resume_from == out / "checkpoint"
    assert second.feature_cache.hits >= 2  # train and dev features came from the cache
    assert result["languages"]["de"]["words"] > 0

    model = load_dlfa_model(out / "best")
    assert model.config.fuse_layer == 2

    # The feature cache on its own: an entry is read back (not rebuilt) without pickle.
    cache = FeatureCache(tmp_path / "cache")
    features = [{"input_ids": [0, 5, 2], "labels": [-100, 3, -100], "sentence_index": 0, "word_indices": [0]}]
    cache.get_or_build("k" * 32, lambda: features)
    assert cache.get_or_build("k" * 32, lambda: pytest.fail("rebuilt instead of read")) == features
    assert no_pickle == []
