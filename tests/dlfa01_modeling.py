"""FROZEN COPY of dlfa 0.1's src/dlfa/modeling/modeling_dlfa.py (git 70ab8a4), used only by the tests to write
model folders in dlfa 0.1's format (dlfa_config.json, the encoder's config.json, encoder.*/fusion.*/head.* weights),
which today's loader must still read. Do not edit it to follow the current code.

DLFA: dynamic-layer feature aggregation over a multilingual encoder, in one file.

Chen et al. (2022), "Feature Aggregation in Zero-Shot Cross-Lingual Transfer Using Multilingual BERT".
The encoder's last layer ``L1`` is fused with a lower layer ``L2 = hidden_states[x]`` by an attentional
gate (AIF, after the MS-CAM module of "Attentional Feature Fusion", Dai et al. 2021):

    W = (L1 + L2) / 2
    g = sigmoid(local(W) + global(W))
    L = L1 * g + L2 * (1 - g)

and the task head reads ``L``. With no fused layer (``fuse_layer=None``) the model is the usual baseline:
the head reads the last layer.

Hidden-state numbering follows transformers: ``hidden_states[0]`` is the embedding output and
``hidden_states[i]`` the output of block ``i`` (1..N), so ``fuse_layer`` ranges over 1..N-1.

Design choices the paper leaves open, and what this file does:

* **Bottleneck.** Both AIF branches are ``Linear(H, H/r) -> norm -> ReLU -> Linear(H/r, H)``, r = 4 by
  default. MS-CAM uses 1x1 convolutions, which on a token sequence are exactly per-token linear layers.
* **Normalization.** MS-CAM uses BatchNorm. BatchNorm over tokens mixes statistics across sentences and over
  padding, so a sentence's output would depend on what it is batched with. We use LayerNorm on the
  bottleneck (per token, per sentence), which keeps every output invariant to padding and batching;
  ``aif_norm="none"`` drops it.
* **Global pooling.** The global branch mean-pools ``W`` over the non-padding tokens only (the attention
  mask), applies its bottleneck, and broadcasts the result to every token.
* **Initialization.** Linear weights are drawn from N(0, initializer_range) (0.02, as in BERT), biases are
  zero, LayerNorm is (1, 0). The gate therefore starts close to 0.5: training begins from the plain average
  of the two layers, and no random initial bias favours either.
* **Heads.** Token classification is dropout + linear on every sub-token; the loss and the metrics use one
  sub-token per word (the data pipeline decides which; see ``dlfa.data.features``). Sequence(-pair)
  classification reads the first token (``[CLS]``/``<s>``) through dropout -> dense -> tanh -> dropout ->
  linear, the RoBERTa classification head, since several encoders (XLM-R, e5) ship no trained pooler.

The model wraps any transformers encoder that returns ``hidden_states`` (BERT, XLM-R, DistilBERT, ...).
``save_pretrained`` writes ``dlfa_config.json``, the encoder's ``config.json``, ``model.safetensors`` and, last,
``checksums.json`` with the weights' sha256; ``from_pretrained`` rebuilds the model from those files only (no pickle,
no network) and refuses weights that do not match a recorded sha256.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_model, save_model
from torch import nn

from dlfa.errors import DlfaInputError
from dlfa.io import CHECKSUMS_NAME, read_checksums, sha256_file, write_checksums

DLFA_CONFIG_NAME = "dlfa_config.json"
WEIGHTS_NAME = "model.safetensors"
HEAD_TYPES = ("token", "sequence")


class DictConfig:
    """JSON round trip for a config dataclass; unknown keys (from newer versions) are ignored on load."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]):
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


@dataclass
class DLFAConfig(DictConfig):
    """Everything needed to rebuild a :class:`DLFAModel` apart from the weights."""

    head: str = "token"  # "token" (tagging) or "sequence" (sentence / sentence-pair classification)
    num_labels: int = 2
    labels: list[str] = field(default_factory=list)
    fuse_layer: int | None = None  # x in D_x; None = baseline (last layer only)
    reduction: int = 4  # r: AIF bottleneck is H -> H/r -> H
    aif_norm: str = "layernorm"  # "layernorm" or "none"
    classifier_dropout: float = 0.1
    initializer_range: float = 0.02
    encoder_name: str = ""  # where the encoder came from (hub id, folder or embedded:...); informational

    def __post_init__(self) -> None:
        if self.head not in HEAD_TYPES:
            raise DlfaInputError(f"unknown head {self.head!r}; expected one of {', '.join(HEAD_TYPES)}")
        if self.labels and len(self.labels) != self.num_labels:
            raise DlfaInputError(f"{len(self.labels)} label names given for num_labels={self.num_labels}")
        if self.aif_norm not in ("layernorm", "none"):
            raise DlfaInputError(f"unknown aif_norm {self.aif_norm!r}; expected layernorm or none")
        if self.reduction < 1:
            raise DlfaInputError(f"reduction must be >= 1, got {self.reduction}")


def _config_int(encoder_config: Any, names: tuple[str, ...], what: str) -> int:
    """An integer setting that encoder families name differently (BERT: hidden_size, DistilBERT: dim...)."""
    for name in names:
        value = getattr(encoder_config, name, None)
        if isinstance(value, int):
            return value
    raise ValueError(f"cannot tell the {what} of a {type(encoder_config).__name__}")


def encoder_num_layers(encoder_config: Any) -> int:
    """Number of transformer blocks N of a transformers encoder config (BERT, XLM-R, DistilBERT...)."""
    return _config_int(encoder_config, ("num_hidden_layers", "n_layers", "num_layers"), "number of layers")


def encoder_hidden_size(encoder_config: Any) -> int:
    return _config_int(encoder_config, ("hidden_size", "dim", "d_model"), "hidden size")


def encoder_num_heads(encoder_config: Any) -> int:
    return _config_int(encoder_config, ("num_attention_heads", "n_heads", "num_heads"), "number of attention heads")


def encoder_blocks(encoder: nn.Module, num_layers: int) -> nn.ModuleList:
    """The encoder's list of transformer blocks (BERT/XLM-R: encoder.layer; DistilBERT: transformer.layer)."""
    for path in ("encoder.layer", "transformer.layer", "layers", "layer"):
        module: Any = encoder
        for name in path.split("."):
            module = getattr(module, name, None)
        if isinstance(module, nn.ModuleList) and len(module) == num_layers:
            return module
    for module in encoder.modules():
        if isinstance(module, nn.ModuleList) and len(module) == num_layers:
            return module
    raise DlfaInputError(f"cannot find the {num_layers} transformer blocks of a {type(encoder).__name__}")


def validate_fuse_layer(fuse_layer: int | None, num_layers: int, option: str = "--fuse-layer") -> None:
    """D_x needs 1 <= x < N: layer N is the last layer itself and layer 0 is the embeddings."""
    if fuse_layer is None:
        return
    if not isinstance(fuse_layer, int) or isinstance(fuse_layer, bool) or not 1 <= fuse_layer < num_layers:
        raise DlfaInputError(
            f"fused layer must be an integer in 1..{num_layers - 1} for a {num_layers}-layer encoder, "
            f"got {fuse_layer!r}",
            option=option,
        )


def masked_mean(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Mean over the non-padding tokens: (B, T, H), (B, T) -> (B, H)."""
    mask = attention_mask.to(hidden.dtype).unsqueeze(-1)
    total = (hidden * mask).sum(dim=1)
    count = mask.sum(dim=1).clamp_min(1.0)
    return total / count


class Bottleneck(nn.Module):
    """H -> H/r -> H, applied to the last dimension (a 1x1 convolution in MS-CAM)."""

    def __init__(self, hidden_size: int, reduction: int, norm: str) -> None:
        super().__init__()
        inner = max(1, hidden_size // reduction)
        self.down = nn.Linear(hidden_size, inner)
        self.norm = nn.LayerNorm(inner) if norm == "layernorm" else nn.Identity()
        self.up = nn.Linear(inner, hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(F.relu(self.norm(self.down(x))))


class AIFGate(nn.Module):
    """Attentional Information Fusion gate: g(W) = sigmoid(local(W) + global(W)), values in (0, 1)."""

    def __init__(self, hidden_size: int, reduction: int = 4, norm: str = "layernorm") -> None:
        super().__init__()
        self.local_branch = Bottleneck(hidden_size, reduction, norm)
        self.global_branch = Bottleneck(hidden_size, reduction, norm)

    def forward(self, fused_input: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        local = self.local_branch(fused_input)  # (B, T, H)
        pooled = masked_mean(fused_input, attention_mask)  # (B, H)
        global_ = self.global_branch(pooled).unsqueeze(1)  # (B, 1, H), broadcast over tokens
        return torch.sigmoid(local + global_)


class DLFAFusion(nn.Module):
    """L = L1 * g + L2 * (1 - g) with g = AIF((L1 + L2) / 2)."""

    def __init__(self, hidden_size: int, reduction: int = 4, norm: str = "layernorm") -> None:
        super().__init__()
        self.gate = AIFGate(hidden_size, reduction, norm)

    def forward(self, last: torch.Tensor, lower: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        gate = self.gate((last + lower) / 2, attention_mask)
        # L2 + g * (L1 - L2) is the same blend with one multiply fewer.
        return lower + gate * (last - lower)


class TokenClassificationHead(nn.Module):
    def __init__(self, hidden_size: int, num_labels: int, dropout: float) -> None:
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(hidden_size, num_labels)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.dropout(features))


class SequenceClassificationHead(nn.Module):
    """RoBERTa-style head on the first token."""

    def __init__(self, hidden_size: int, num_labels: int, dropout: float) -> None:
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        self.dense = nn.Linear(hidden_size, hidden_size)
        self.classifier = nn.Linear(hidden_size, num_labels)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        x = self.dropout(features[:, 0])
        x = torch.tanh(self.dense(x))
        return self.classifier(self.dropout(x))


@dataclass
class DLFAOutput:
    logits: torch.Tensor
    loss: torch.Tensor | None = None
    features: torch.Tensor | None = None  # what the head read (fused or last layer), (B, T, H)
    hidden_states: tuple[torch.Tensor, ...] | None = None


class DLFAModel(nn.Module):
    """A transformers encoder, an optional DLFA fusion, and a task head."""

    def __init__(self, config: DLFAConfig, encoder: nn.Module) -> None:
        super().__init__()
        self.config = config
        self.encoder = encoder
        enc_cfg = encoder.config
        self.num_layers = encoder_num_layers(enc_cfg)
        hidden = encoder_hidden_size(enc_cfg)
        validate_fuse_layer(config.fuse_layer, self.num_layers)
        self.fusion = (
            DLFAFusion(hidden, config.reduction, config.aif_norm) if config.fuse_layer is not None else None
        )
        head_cls = TokenClassificationHead if config.head == "token" else SequenceClassificationHead
        self.head = head_cls(hidden, config.num_labels, config.classifier_dropout)
        self._init_new_modules()

    def _init_new_modules(self) -> None:
        for module in [self.head, self.fusion]:
            if module is None:
                continue
            for sub in module.modules():
                if isinstance(sub, nn.Linear):
                    nn.init.normal_(sub.weight, std=self.config.initializer_range)
                    nn.init.zeros_(sub.bias)
                elif isinstance(sub, nn.LayerNorm):
                    nn.init.ones_(sub.weight)
                    nn.init.zeros_(sub.bias)

    @property
    def encoder_accepts_token_type_ids(self) -> bool:
        # DistilBERT has no segment embeddings; BERT-like models do.
        return getattr(self.encoder.config, "type_vocab_size", 0) > 0 and self.encoder.config.model_type != "distilbert"

    def encode(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        token_type_ids: torch.Tensor | None = None,
        output_hidden_states: bool = False,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...] | None]:
        """Return the representation the head reads, and (optionally) all hidden states."""
        kwargs: dict[str, Any] = {"input_ids": input_ids, "attention_mask": attention_mask}
        if token_type_ids is not None and self.encoder_accepts_token_type_ids:
            kwargs["token_type_ids"] = token_type_ids
        need_all = self.fusion is not None or output_hidden_states
        out = self.encoder(**kwargs, output_hidden_states=need_all, return_dict=True)
        hidden_states = out.hidden_states if need_all else None
        if self.fusion is None:
            features = out.last_hidden_state
        else:
            features = self.fusion(hidden_states[-1], hidden_states[self.config.fuse_layer], attention_mask)
        return features, (hidden_states if output_hidden_states else None)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        token_type_ids: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        output_hidden_states: bool = False,
    ) -> DLFAOutput:
        features, hidden_states = self.encode(input_ids, attention_mask, token_type_ids, output_hidden_states)
        logits = self.head(features)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), labels.reshape(-1), ignore_index=-100)
        return DLFAOutput(logits=logits, loss=loss, features=features, hidden_states=hidden_states)

    # -- persistence ---------------------------------------------------------------------------------------

    def save_pretrained(self, folder: str | Path) -> None:
        """Write dlfa_config.json, the encoder's config.json, model.safetensors and (last) checksums.json."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / DLFA_CONFIG_NAME).write_text(json.dumps(self.config.to_dict(), indent=2) + "\n", encoding="utf-8")
        self.encoder.config.save_pretrained(folder)
        # save_model handles tied/shared tensors, which save_file refuses.
        save_model(self, str(folder / WEIGHTS_NAME))
        # safetensors checks the header, not the tensor data: the sha256 catches a flipped bit in the weights.
        write_checksums(folder, (WEIGHTS_NAME,))

    @classmethod
    def from_pretrained(cls, folder: str | Path, device: str | torch.device = "cpu") -> DLFAModel:
        """Rebuild a model saved by :meth:`save_pretrained` (safetensors + JSON only)."""
        from transformers import AutoConfig, AutoModel

        folder = Path(folder)
        config_path = folder / DLFA_CONFIG_NAME
        encoder_config_path = folder / "config.json"
        weights_path = folder / WEIGHTS_NAME
        for path in (config_path, encoder_config_path, weights_path):
            if not path.is_file():
                raise DlfaInputError("not a saved dlfa model (file missing)", path=path)
        try:
            data = json.loads(config_path.read_text(encoding="utf-8"))
            if not isinstance(data, dict):
                raise TypeError("not a JSON object")
            config = DLFAConfig.from_dict(data)
        except (ValueError, TypeError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
            raise DlfaInputError(f"unreadable model config ({exc})", path=config_path) from None
        except DlfaInputError as exc:  # a bad value, reported by DLFAConfig without the file
            raise DlfaInputError(f"invalid model config ({exc.message})", path=config_path) from None
        try:
            encoder_config = AutoConfig.from_pretrained(folder)
            encoder = AutoModel.from_config(encoder_config, add_pooling_layer=False) if _takes_pooler(
                encoder_config) else AutoModel.from_config(encoder_config)
        except (OSError, ValueError, TypeError, KeyError, AttributeError) as exc:  # transformers' many ways to fail
            message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise DlfaInputError(f"unreadable encoder config ({message})", path=encoder_config_path) from None
        verify_weights_checksum(folder)
        model = cls(config, encoder)
        try:
            missing, unexpected = load_model(model, str(weights_path), strict=False, device=str(device))
        except Exception as exc:  # safetensors raises several types for corrupt files
            message = " ".join(str(exc).split())  # one line: load_state_dict lists its problems on several
            raise DlfaInputError(f"corrupt or truncated weights ({message})", path=weights_path) from None
        if missing or unexpected:
            raise DlfaInputError(
                f"weights do not match the model (missing {sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]})",
                path=weights_path,
            )
        return model.to(device)

    @classmethod
    def from_encoder(cls, config: DLFAConfig, encoder_name_or_path: str) -> DLFAModel:
        """A new model around a pretrained encoder (hub id, local folder or resolved embedded folder)."""
        encoder = load_encoder(encoder_name_or_path)
        return cls(config, encoder)


def verify_weights_checksum(folder: Path, name: str = WEIGHTS_NAME) -> None:
    """Compare ``folder/name`` (model.safetensors) with its sha256 in checksums.json, when there is one.

    Folders saved before checksums existed, or by other tools, have none and load unverified; a checksum file that
    is present but damaged, or a sha256 that differs, is an error.
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


def _takes_pooler(encoder_config: Any) -> bool:
    # BERT/XLM-R add an (unused here) pooler by default; leaving it out avoids unused parameters,
    # which distributed data parallel rejects.
    return encoder_config.model_type in ("bert", "xlm-roberta", "roberta", "camembert")


def load_encoder(name_or_path: str) -> nn.Module:
    """Load a pretrained transformers encoder without its pooler."""
    from transformers import AutoConfig, AutoModel

    encoder_config = AutoConfig.from_pretrained(name_or_path)
    kwargs = {"add_pooling_layer": False} if _takes_pooler(encoder_config) else {}
    return AutoModel.from_pretrained(name_or_path, config=encoder_config, **kwargs)
