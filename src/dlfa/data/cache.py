"""A cache of tokenized features, so that a second run with the same inputs does not tokenize again.

The key covers everything the features depend on: the tokenizer (a hash of its full serialized form), the
task, the split, the language, the maximum length, the exact data files (path, size, modification time),
the example subset, how the text was read (UD: XTREME's preprocessing or raw) and the featurization code
version. Changing any of them gives another key, so stale
entries are never hit. Entries are safetensors files (flat int arrays plus offsets; no pickle), written
atomically with a checksum; a damaged entry is reported, deleted and rebuilt, never used.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load_file, save_file

from dlfa.io import atomic_path

logger = logging.getLogger("dlfa")

# Bump when featurization changes in a way that changes its output.
FEATURE_VERSION = 1
_FINGERPRINTS: dict[int, str] = {}


def cache_root() -> Path:
    from platformdirs import user_cache_dir

    if os.environ.get("DLFA_FEATURE_CACHE_DIR"):
        return Path(os.environ["DLFA_FEATURE_CACHE_DIR"])
    return Path(os.environ.get("DLFA_CACHE_DIR") or user_cache_dir("dlfa")) / "features"


def tokenizer_fingerprint(tokenizer) -> str:
    """Hash of the tokenizer's complete serialized form (vocabulary, normalizer, special tokens...)."""
    cached = _FINGERPRINTS.get(id(tokenizer))
    if cached:
        return cached
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        text = backend.to_str()
    else:  # slow tokenizers: their vocabulary and settings
        text = json.dumps([sorted(tokenizer.get_vocab().items()), str(tokenizer.init_kwargs)], default=str)
    digest = hashlib.sha256(text.encode("utf-8")).hexdigest()
    _FINGERPRINTS[id(tokenizer)] = digest
    return digest


def file_fingerprint(paths: Sequence[Path]) -> list[list]:
    return [[str(Path(p).resolve()), p.stat().st_size, p.stat().st_mtime_ns] for p in map(Path, paths)]


def cache_key(tokenizer, task: str, split: str, language: str, max_length: int, files: Sequence[Path],
              subset: str = "all", preprocessing: str | None = None) -> str:
    """``preprocessing``: the reading of the files' text (``Task.read``); ``None`` for tasks read one way, and
    then left out of the key, so that their keys are those of earlier dlfa versions."""
    parts = {
        "version": FEATURE_VERSION,
        "tokenizer": tokenizer_fingerprint(tokenizer),
        "task": task,
        "split": split,
        "language": language,
        "max_length": max_length,
        "files": file_fingerprint(files),
        "subset": subset,
    }
    if preprocessing is not None:
        parts["preprocessing"] = preprocessing
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:32]


def _pack(features: Sequence[dict]) -> dict[str, np.ndarray]:
    arrays: dict[str, np.ndarray] = {}
    for key in features[0] if features else []:
        values = [f[key] for f in features]
        if isinstance(values[0], list):
            lengths = np.array([len(v) for v in values], dtype=np.int64)
            arrays[f"{key}.offsets"] = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
            arrays[f"{key}.values"] = np.array([x for v in values for x in v], dtype=np.int64)
        else:
            arrays[f"{key}.scalar"] = np.array(values, dtype=np.int64)
    return arrays


def _digest(arrays: dict[str, np.ndarray]) -> str:
    digest = hashlib.sha256()
    for name in sorted(arrays):
        digest.update(name.encode())
        digest.update(np.ascontiguousarray(arrays[name]).tobytes())
    return digest.hexdigest()


def _unpack(arrays: dict[str, np.ndarray], count: int) -> list[dict]:
    features: list[dict] = [{} for _ in range(count)]
    for name, array in arrays.items():
        key, kind = name.rsplit(".", 1)
        if kind == "scalar":
            for feature, value in zip(features, array.tolist(), strict=True):
                feature[key] = value
        elif kind == "offsets":
            values = arrays[f"{key}.values"].tolist()
            bounds = array.tolist()
            for i, feature in enumerate(features):
                feature[key] = values[bounds[i] : bounds[i + 1]]
    return features


class FeatureCache:
    def __init__(self, root: Path | None = None, enabled: bool = True) -> None:
        self.root = root or cache_root()
        self.enabled = enabled
        self.hits = 0
        self.misses = 0

    def get_or_build(self, key: str, build: Callable[[], list[dict]]) -> list[dict]:
        if not self.enabled:
            return build()
        path = self.root / f"{key}.safetensors"
        if path.exists():
            features = self._load(path, key)
            if features is not None:
                self.hits += 1
                return features
        self.misses += 1
        features = build()
        self._store(path, key, features)
        return features

    def _load(self, path: Path, key: str) -> list[dict] | None:
        try:
            from safetensors import safe_open

            with safe_open(str(path), framework="np") as handle:
                meta = handle.metadata() or {}
            arrays = load_file(str(path))
            if meta.get("key") != key:
                raise ValueError("key mismatch")
            if meta.get("sha256") != _digest(arrays):
                raise ValueError("checksum mismatch")
            features = _unpack(arrays, int(meta["count"]))
        except (SafetensorError, OSError, ValueError, KeyError, IndexError) as exc:
            logger.warning("feature cache entry %s is damaged (%s); rebuilding it", path, exc)
            path.unlink(missing_ok=True)
            return None
        return features

    def _store(self, path: Path, key: str, features: list[dict]) -> None:
        if not features:
            return
        with atomic_path(path) as tmp:
            arrays = _pack(features)
            metadata = {"key": key, "count": str(len(features)), "sha256": _digest(arrays)}
            save_file(arrays, str(tmp), metadata=metadata)
