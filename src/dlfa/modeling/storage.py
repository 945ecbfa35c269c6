"""dlfa's side of model folders: checksums, strict loading with one-line errors, dlfa 0.1 folders, conversion.

A model folder (a run's ``best/``) is one Hugging Face model folder: ``config.json`` (the :class:`DLFAConfig`, with
``architectures`` and ``auto_map``), ``model.safetensors``, ``modeling_dlfa.py``, the tokenizer files,
``checksums.json`` (the sha256 of the weights, written last) and, once the run is evaluated, a model card
``README.md``. X-Mixup runs add ``xmixup_config.json`` and ``xmixup.safetensors`` (also checksummed).

dlfa 0.1 wrote ``dlfa_config.json``, the encoder's own ``config.json`` and weights named ``encoder.*``,
``fusion.*`` and ``head.*``. :func:`load_dlfa_model` still reads such folders (converted in memory, with a
warning); :func:`convert_legacy_folder` writes them as a new folder.
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from dlfa.errors import DlfaInputError
from dlfa.io import CHECKSUMS_NAME, atomic_path, read_checksums, sha256_file, write_checksums
from dlfa.modeling.modeling_dlfa import (
    HEAD_CLASSES,
    DLFAConfig,
    DLFAConfigError,
    DLFAModel,
    DLFAPreTrainedModel,
    DLFAWeightsError,
)

logger = logging.getLogger("dlfa")

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
LEGACY_CONFIG_NAME = "dlfa_config.json"  # dlfa 0.1
MODEL_CLASSES: dict[str, type[DLFAPreTrainedModel]] = {cls.__name__: cls for cls in (*HEAD_CLASSES.values(), DLFAModel)}
# Where a DLFAConfig setting comes from on dlfa's command line (for one-line errors naming the option).
CONFIG_OPTIONS = {"fuse_layer": "--fuse-layer", "reduction": "--reduction", "aif_norm": "--aif-norm",
                  "aif_norm_placement": "--aif-norm-placement", "gate_init": "--gate-init", "encoder": "--model"}


def config_input_error(exc: DLFAConfigError) -> DlfaInputError:
    """A DLFAConfig value error as dlfa's one-line error naming the command-line option."""
    return DlfaInputError(exc.message, option=CONFIG_OPTIONS.get(exc.field, f"--{exc.field.replace('_', '-')}"))


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text if text else type(exc).__name__


# -- what a folder holds ----------------------------------------------------------------------------------------


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise DlfaInputError(f"unreadable model config ({_one_line(exc)})", path=path) from None
    if not isinstance(data, dict):
        raise DlfaInputError("unreadable model config (not a JSON object)", path=path)
    return data


def folder_format(folder: Path) -> str | None:
    """``"hf"`` (config.json of model_type dlfa), ``"legacy"`` (dlfa 0.1: dlfa_config.json) or None."""
    if (folder / LEGACY_CONFIG_NAME).is_file():
        return "legacy"
    path = folder / CONFIG_NAME
    if path.is_file():
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return "hf"  # damaged: load_dlfa_model names the file
        return "hf" if isinstance(data, dict) and data.get("model_type") == DLFAConfig.model_type else None
    return None


def is_model_folder(path: str | Path) -> bool:
    """True for a saved DLFA model folder, new or dlfa 0.1 (a damaged config.json counts: loading reports it)."""
    folder = Path(path)
    return folder.is_dir() and folder_format(folder) is not None


def verify_weights_checksum(folder: Path, name: str = WEIGHTS_NAME) -> None:
    """Compare ``folder/name`` with its sha256 in checksums.json, when there is one.

    Folders saved before checksums existed, or by other tools (``save_pretrained`` alone, the Hub), have none and
    load unverified; a checksum file that is present but damaged, or a sha256 that differs, is an error.
    """
    checksums_path = folder / CHECKSUMS_NAME
    if not checksums_path.is_file():
        return
    try:
        expected = read_checksums(checksums_path).get(name)
    except (OSError, ValueError) as exc:
        raise DlfaInputError(str(exc).splitlines()[0], path=checksums_path) from None
    weights_path = folder / name
    if expected is not None and sha256_file(weights_path) != expected:
        raise DlfaInputError(f"corrupt weights (the file does not match its sha256 in {CHECKSUMS_NAME})",
                             path=weights_path)


def write_model_checksums(folder: str | Path) -> None:
    """checksums.json over the folder's weight files (model.safetensors, and X-Mixup's mixers when present)."""
    from dlfa.modeling.modeling_xmixup import XMIXUP_WEIGHTS_NAME

    folder = Path(folder)
    write_checksums(folder, [name for name in (WEIGHTS_NAME, XMIXUP_WEIGHTS_NAME) if (folder / name).is_file()])


# -- loading ----------------------------------------------------------------------------------------------------


def load_dlfa_model(path: str | Path, device: str | torch.device = "cpu") -> DLFAPreTrainedModel:
    """The DLFA model saved in ``path`` (a run's ``best/``), on ``device``, in eval mode.

    Checks the weights against ``checksums.json`` first, picks the class from ``architectures`` (token or sequence
    head), loads strictly from safetensors, and reads dlfa 0.1 folders too (converted in memory, with a warning).
    Every problem is one :class:`DlfaInputError` naming the file.
    """
    folder = Path(path)
    if not folder.is_dir():
        raise DlfaInputError("model folder not found", path=folder)
    # A config.json of another model type is reported by _hf_config, naming the file.
    kind = "legacy" if (folder / LEGACY_CONFIG_NAME).is_file() else "hf" if (folder / CONFIG_NAME).is_file() else None
    if kind is None:
        raise DlfaInputError(f"not a saved dlfa model ({CONFIG_NAME}, or dlfa 0.1's {LEGACY_CONFIG_NAME}, missing)",
                             path=folder)
    weights = folder / WEIGHTS_NAME
    if kind == "legacy":
        config, model_class = legacy_config(folder)
    else:
        config, model_class = _hf_config(folder)
    if not weights.is_file():
        raise DlfaInputError("not a saved dlfa model (file missing)", path=weights)
    verify_weights_checksum(folder)
    if kind == "legacy":
        logger.warning("%s is a dlfa 0.1 model folder (%s); converted in memory. `dlfa convert %s --output NEW` "
                       "writes it as a Hugging Face model folder", folder, LEGACY_CONFIG_NAME, folder)
        model = _load_legacy_weights(folder, config, model_class)
    else:
        try:
            model = model_class.from_pretrained(folder, config=config)
        except DLFAWeightsError as exc:
            message = str(exc).split(": ", 1)[-1]
            raise DlfaInputError(f"weights do not match the model: {_one_line(message)}", path=weights) from None
        except Exception as exc:  # safetensors and transformers raise several types for a damaged file
            raise DlfaInputError(f"corrupt or truncated weights ({_one_line(exc)})", path=weights) from None
    return model.to(device).eval()


def _hf_config(folder: Path) -> tuple[DLFAConfig, type[DLFAPreTrainedModel]]:
    path = folder / CONFIG_NAME
    data = _read_json(path)
    if data.get("model_type") != DLFAConfig.model_type:
        raise DlfaInputError(f"not a DLFA model config (model_type {data.get('model_type')!r}, expected 'dlfa')",
                             path=path)
    architectures = data.get("architectures") or []
    known = [name for name in architectures if name in MODEL_CLASSES] if isinstance(architectures, list) else []
    if not known:
        raise DlfaInputError(f"names no DLFA model class in architectures (got {architectures!r}; expected one of "
                             f"{', '.join(MODEL_CLASSES)})", path=path)
    settings = {k: v for k, v in data.items() if k not in ("model_type", "transformers_version")}
    try:
        config = DLFAConfig(**settings)
    except DLFAConfigError as exc:
        raise DlfaInputError(f"invalid model config ({exc.field}: {exc.message})", path=path) from None
    except (ValueError, TypeError, KeyError, AttributeError) as exc:  # transformers' many ways to refuse a config
        raise DlfaInputError(f"invalid model config ({_one_line(exc)})", path=path) from None
    config.name_or_path = str(folder)
    return config, MODEL_CLASSES[known[0]]


def legacy_config(folder: Path) -> tuple[DLFAConfig, type[DLFAPreTrainedModel]]:
    """The DLFAConfig and class of a dlfa 0.1 folder (dlfa_config.json + the encoder's config.json)."""
    from transformers import AutoConfig

    path = folder / LEGACY_CONFIG_NAME
    data = _read_json(path)
    head = data.get("head", "token")
    if head not in HEAD_CLASSES:
        raise DlfaInputError(f"invalid model config (unknown head {head!r}; expected token or sequence)", path=path)
    num_labels, labels = data.get("num_labels", 2), data.get("labels") or []
    if not isinstance(num_labels, int) or isinstance(num_labels, bool) or num_labels < 1 or not isinstance(
            labels, list) or (labels and len(labels) != num_labels):
        raise DlfaInputError(f"invalid model config ({len(labels) if isinstance(labels, list) else labels!r} label "
                             f"names for num_labels={num_labels!r})", path=path)
    encoder_path = folder / CONFIG_NAME
    if not encoder_path.is_file():
        raise DlfaInputError("not a saved dlfa model (file missing)", path=encoder_path)
    try:
        encoder_config = AutoConfig.from_pretrained(folder)
    except (OSError, ValueError, TypeError, KeyError, AttributeError) as exc:  # transformers' many ways to fail
        raise DlfaInputError(f"unreadable encoder config ({_one_line(exc)})", path=encoder_path) from None
    names = [str(label) for label in labels] or [f"LABEL_{i}" for i in range(num_labels)]
    settings = {k: data[k] for k in ("fuse_layer", "reduction", "aif_norm", "classifier_dropout", "initializer_range",
                                     "encoder_name") if k in data}
    try:
        config = DLFAConfig(encoder=encoder_config, id2label=dict(enumerate(names)),
                            label2id={name: i for i, name in enumerate(names)}, **settings)
    except DLFAConfigError as exc:
        raise DlfaInputError(f"invalid model config ({exc.field}: {exc.message})", path=path) from None
    except (ValueError, TypeError) as exc:
        raise DlfaInputError(f"invalid model config ({_one_line(exc)})", path=path) from None
    model_class = HEAD_CLASSES[head]
    config.architectures = [model_class.__name__]
    config.name_or_path = str(folder)
    return config, model_class


def legacy_key(name: str, head: str) -> str | None:
    """dlfa 0.1 weight name -> the name in the transformers classes (None: dropped, an encoder pooler)."""
    if name.startswith("encoder.pooler."):
        return None
    if name.startswith(("encoder.", "fusion.")):
        return f"dlfa.{name}"
    if head == "token":
        return name.replace("head.classifier.", "classifier.", 1) if name.startswith("head.classifier.") else name
    if name.startswith("head.dense."):
        return name.replace("head.dense.", "classifier.dense.", 1)
    if name.startswith("head.classifier."):
        return name.replace("head.classifier.", "classifier.out_proj.", 1)
    return name


def _load_legacy_weights(folder: Path, config: DLFAConfig, model_class: type[DLFAPreTrainedModel]
                         ) -> DLFAPreTrainedModel:
    from safetensors.torch import load_file

    weights = folder / WEIGHTS_NAME
    try:
        tensors = load_file(str(weights))
    except Exception as exc:  # safetensors raises several types for a damaged file
        raise DlfaInputError(f"corrupt or truncated weights ({_one_line(exc)})", path=weights) from None
    state = {}
    for name, tensor in tensors.items():
        new = legacy_key(name, model_class.head_type or "token")
        if new is not None:
            state[new] = tensor
    model = model_class(config)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    mismatched = sorted(k for k in set(state) & set(expected) if state[k].shape != expected[k].shape)
    if missing or unexpected or mismatched:
        raise DlfaInputError(f"weights do not match the model (missing {missing[:3]}, unexpected {unexpected[:3]}, "
                             f"of another shape {mismatched[:3]})", path=weights)
    model.load_state_dict(state, strict=True)
    return model


# -- saving -----------------------------------------------------------------------------------------------------


def save_dlfa_model(model: Any, folder: str | Path, tokenizer: Any = None) -> None:
    """Write a model folder: transformers' save_pretrained (config.json, model.safetensors, modeling_dlfa.py), the
    tokenizer, and, last, checksums.json. An X-Mixup model adds its mixers (its own save_pretrained)."""
    folder = Path(folder)
    model.save_pretrained(folder)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    write_model_checksums(folder)


# -- conversion -------------------------------------------------------------------------------------------------


@dataclass
class ConvertResult:
    source: Path
    output: Path
    files: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        return f"converted {self.source} (dlfa 0.1) to {self.output}: {', '.join(self.files)}"


_CONVERTED = {LEGACY_CONFIG_NAME, CONFIG_NAME, WEIGHTS_NAME, CHECKSUMS_NAME}


def convert_legacy_folder(source: str | Path, output: str | Path) -> ConvertResult:
    """Write the dlfa 0.1 model folder ``source`` as a Hugging Face model folder ``output`` (a new folder).

    The source is read only (its checksums verified first); every other file in it (the tokenizer, X-Mixup's
    mixers) is copied. ``output`` must not exist or be empty; it appears complete or not at all.
    """
    source, output = Path(source), Path(output)
    if not source.is_dir():
        raise DlfaInputError("model folder not found", path=source)
    kind = folder_format(source)
    if kind == "hf":
        raise DlfaInputError("already a Hugging Face model folder (config.json of model_type 'dlfa'); nothing to "
                             "convert", path=source)
    if kind is None:
        raise DlfaInputError(f"not a dlfa 0.1 model folder ({LEGACY_CONFIG_NAME} missing)", path=source)
    if output.exists() and (not output.is_dir() or any(output.iterdir())):
        raise DlfaInputError(f"{output} exists and is not an empty folder; give a new folder", option="--output")
    if output.resolve() == source.resolve():
        raise DlfaInputError("the output must be a new folder, not the source", option="--output")
    model = load_dlfa_model(source)
    extras = sorted(p for p in source.iterdir() if p.is_file() and p.name not in _CONVERTED)
    with atomic_path(output) as tmp:
        model.save_pretrained(tmp)
        for extra in extras:
            shutil.copy2(extra, tmp / extra.name)
        write_model_checksums(tmp)
        files = sorted(p.name for p in tmp.iterdir())
    logger.info("converted %s to %s", source, output)
    return ConvertResult(source, output, files)
