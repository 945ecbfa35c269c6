"""X-Mixup (Yang et al., ICLR 2022, "Enhancing Cross-lingual Transfer by Manifold Mixup") around a DLFA model.

This follows the authors' TensorFlow code (github.com/yhy1117/X-Mixup: ``xmixup/tasks/layer_mixup.py``,
``xmixup/models/bert.py``, ``xmixup/tasks/*/{sequence,token}_classification.py``); docs/xmixup.md lists every
point and each departure.

A pair (an English *source*, the *target* sentence) goes through the same encoder twice. The source pass is plain;
at each mixing block ``i`` it leaves ``a_s``, the output of the block's self-attention sub-layer
(``LayerNorm(O(SelfAttn(h_s)) + h_s)``). In the target pass, block ``i`` runs its own self-attention sub-layer,
giving ``a_t``, and then, with the SAME block's weights::

    scores = (a_t W_q)(a_s W_k)^T / sqrt(d)                    per head, (B, heads, T_t, T_s), unmasked
    H      = H(softmax_s(scores)) + H(softmax_t(scores^T))       both directions, one value per sentence
    lambda = lambda_0 * sigmoid(w_i * H + b_i)                   lambda_0 = 0.5; w_i = 1, b_i = 0 at the start
    ctx    = Dropout_attn(softmax_s(scores + source mask)) (a_s W_v)
    a_t'   = LayerNorm_attn(lambda * Dropout(O(ctx)) + (1 - lambda) * a_t)

``O`` is the block's attention output dense layer, ``LayerNorm_attn`` and the dropouts are the block's own
attention-output LayerNorm and dropouts (the authors call ``BertSelfOutput`` with ``ratio=lambda``). The block's
feed-forward sub-layer then runs on ``a_t'`` and the target pass continues. Several mixing blocks mix in turn,
each with the source's ``a_s`` of the same block.

H per direction (``entropy="authors"``, the default; their ``get_attention_entropy``): for each attention row the
cross-entropy between the masked softmax and the softmax of ``scores * key_mask`` (padding logits set to 0, so
padding keys enter the normaliser), averaged over heads and over every query row, padding rows included. It depends
on the padding, so X-Mixup pads every row to ``max_length`` as the authors do (128), which makes it a function of the
sentence pair. ``entropy="masked"`` is the exact masked entropy (softmax and entropy over real keys, average over
real queries): independent of padding, so batches can be padded dynamically, but a different lambda (docs/xmixup.md
gives the measured difference).

Tagging heads pool sub-words as the authors' ``sequence_subword_pooling``: the states of a word's sub-tokens are
summed into one position (dlfa: the word's labelled sub-token; theirs: its first sub-token), every other position
is zero, and the head's dropout and classifier run on that. The representation of the MSE consistency term is
the sum of the dropped-out pooled states over the sentence divided by ``max_length - 2`` (their
``get_sequence_rep``: a mean over the 126 inner positions of a 128-token padded row). Sentence(-pair) heads read
the first token, as theirs.

How it hooks in: a forward hook on the ``attention`` sub-module of each mixing block (BertLayer, RobertaLayer,
XLMRobertaLayer; other blocks are refused). The hook is idle unless a pair forward runs; it records ``a_s`` in the
source pass and returns ``a_t'`` in the target pass, so the encoder's own forward (masks, the remaining blocks,
``hidden_states`` for a DLFA fusion) is unchanged. No new attention weights: the only new parameters are the
per-block ``entropy_dense`` (1 -> 1).

The DLFA model is used only through: ``.encoder`` (a transformers encoder), ``.encode(input_ids, attention_mask,
token_type_ids) -> (features, _)`` (what the head reads, fused when ``fuse_layer`` is set), ``.head(features)``
(sequence heads) or ``.dropout`` and ``.classifier`` (token heads), ``.head_type``, ``.save_pretrained`` and
``load_dlfa_model``.

Persistence: ``save_pretrained`` writes the DLFA model's files plus ``xmixup_config.json`` and
``xmixup.safetensors`` (the entropy_dense weights); :meth:`XMixupModel.from_pretrained` reads both.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_model, save_model
from torch import nn

from dlfa.errors import DlfaInputError
from dlfa.modeling.modeling_dlfa import (
    DLFAPreTrainedModel,
    encoder_blocks,
    encoder_num_layers,
)

XMIXUP_CONFIG_NAME = "xmixup_config.json"
XMIXUP_WEIGHTS_NAME = "xmixup.safetensors"
OPERATOR = "in-block"  # marks folders of this implementation (the earlier variant mixed after the block)
ENTROPY_MODES = ("masked", "authors")
SUPPORTED_BLOCKS = ("BertLayer", "RobertaLayer", "XLMRobertaLayer")
SUPPORTED_MODEL_TYPES = ("bert", "roberta", "xlm-roberta")  # the encoders built from those blocks
MASK_VALUE = -10000.0  # the authors' additive attention mask (exp underflows to 0 in float32, as -inf would)


class DictConfig:
    """JSON round trip for a config dataclass; unknown keys (from newer versions) are ignored on load."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]):
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


@dataclass
class XMixupConfig(DictConfig):
    layers: list[int] = field(default_factory=lambda: [1])  # mixing blocks, 1..N (the authors' start_layer + 1)
    lambda_max: float = 0.5  # lambda_0
    entropy: str = "authors"  # "authors" (rows padded to max_length) or "masked" (see the module docstring)
    max_length: int = 128  # tagging MSE representation: sum / (max_length - 2), as the authors' 128-token rows
    operator: str = OPERATOR

    def __post_init__(self) -> None:
        if self.entropy not in ENTROPY_MODES:
            raise DlfaInputError(f"unknown entropy {self.entropy!r}; expected one of {', '.join(ENTROPY_MODES)}",
                                 option="--xmixup-entropy")
        if not 0 < self.lambda_max <= 1:
            raise DlfaInputError(f"must be in (0, 1], got {self.lambda_max}", option="--xmixup-lambda-max")
        if self.max_length < 3:
            raise DlfaInputError(f"must be at least 3, got {self.max_length}", option="--max-length")


def validate_xmixup_layers(layers: Sequence[int], num_layers: int, option: str = "--xmixup-layers") -> None:
    if not layers:
        raise DlfaInputError("give at least one mixing block", option=option)
    bad = [x for x in layers if isinstance(x, bool) or not isinstance(x, int) or not 1 <= x <= num_layers]
    if bad:
        raise DlfaInputError(f"mixing blocks must be integers in 1..{num_layers} for a {num_layers}-layer encoder, "
                             f"got {bad[0]!r}", option=option)


def check_encoder_type(encoder_config: Any) -> None:
    """The early form of :func:`check_mixing_block`, from the encoder's config alone (before any weights load)."""
    model_type = getattr(encoder_config, "model_type", "")
    if model_type not in SUPPORTED_MODEL_TYPES or getattr(encoder_config, "is_decoder", False):
        raise DlfaInputError(
            f"X-Mixup mixes inside BERT-style encoder blocks ({', '.join(SUPPORTED_MODEL_TYPES)} encoders); this "
            f"model is a {model_type or type(encoder_config).__name__}", option="--model")


def check_mixing_block(block: nn.Module, layer: int) -> None:
    """One line, exit 2, for a block whose inside the operator does not know (only BERT-style blocks)."""
    attention = getattr(block, "attention", None)
    inner = getattr(attention, "self", None)
    output = getattr(attention, "output", None)
    known = (
        type(block).__name__ in SUPPORTED_BLOCKS
        and not getattr(block, "is_decoder", False)
        and all(hasattr(inner, name) for name in ("query", "key", "value", "dropout", "num_attention_heads",
                                                  "attention_head_size"))
        and all(hasattr(output, name) for name in ("dense", "dropout", "LayerNorm"))
    )
    if not known:
        raise DlfaInputError(
            f"X-Mixup mixes inside BERT-style encoder blocks ({', '.join(SUPPORTED_BLOCKS)}); block {layer} of this "
            f"encoder is a {type(block).__name__}", option="--model")


# -- attention entropy and lambda -------------------------------------------------------------------------------


def masked_entropy(scores: torch.Tensor, key_mask: torch.Tensor, query_mask: torch.Tensor) -> torch.Tensor:
    """Mean row entropy of softmax over real keys, averaged over heads and real queries: (B, h, Q, K) -> (B,)."""
    keys = key_mask[:, None, None, :].to(torch.bool)
    log_probs = torch.log_softmax(scores.float().masked_fill(~keys, -1e9), dim=-1)
    row = -(log_probs.exp() * log_probs.masked_fill(~keys, 0.0)).sum(dim=-1)  # (B, h, Q)
    queries = query_mask[:, None, :].to(row.dtype)
    count = (queries.sum(dim=-1) * row.size(1)).sum(dim=-1).clamp_min(1.0)
    return (row * queries).sum(dim=(1, 2)) / count


def authors_entropy(scores: torch.Tensor, key_mask: torch.Tensor) -> torch.Tensor:
    """The authors' ``get_attention_entropy``: (B, h, Q, K) -> (B,).

    ``softmax_cross_entropy_with_logits(labels=softmax(scores + (1 - m) * -10000), logits=scores * m)`` per row,
    then ``reduce_mean`` over heads and every query row (padding rows included).
    """
    mask = key_mask[:, None, None, :].to(torch.float32)
    scores = scores.float()
    target = torch.softmax(scores + (1.0 - mask) * MASK_VALUE, dim=-1)
    row = -(target * torch.log_softmax(scores * mask, dim=-1)).sum(dim=-1)
    return row.mean(dim=(1, 2))


def pair_entropy(scores: torch.Tensor, target_mask: torch.Tensor, source_mask: torch.Tensor,
                 mode: str = "masked") -> torch.Tensor:
    """H(target->source rows) + H(source->target rows, the transposed scores): the authors' ``get_pair_entropy``."""
    transposed = scores.transpose(-1, -2)
    if mode == "authors":
        return authors_entropy(scores, source_mask) + authors_entropy(transposed, target_mask)
    return masked_entropy(scores, source_mask, target_mask) + masked_entropy(transposed, target_mask, source_mask)


class MixingRatio(nn.Module):
    """lambda = lambda_0 * sigmoid(entropy_dense(H)); the authors' Dense(1) starts with kernel 1 and bias 0."""

    def __init__(self, lambda_max: float = 0.5) -> None:
        super().__init__()
        self.lambda_max = lambda_max
        self.entropy_dense = nn.Linear(1, 1)
        with torch.no_grad():
            self.entropy_dense.weight.fill_(1.0)
            self.entropy_dense.bias.zero_()

    def forward(self, entropy: torch.Tensor) -> torch.Tensor:
        # In fp32 even under bf16 autocast: bf16 sigmoid is exactly 1 from 6.24 on (H can start near 10), which
        # would pin lambda to lambda_0 and zero its gradient.
        with torch.autocast(entropy.device.type, enabled=False):
            dense = self.entropy_dense(entropy.unsqueeze(-1).to(self.entropy_dense.weight.dtype))
            return self.lambda_max * torch.sigmoid(dense).squeeze(-1)


@dataclass
class MixStats:
    lam: torch.Tensor  # (B,) mixing ratio per sentence
    entropy: torch.Tensor  # (B,) H of both directions
    scores: torch.Tensor  # (B, heads, T_t, T_s) raw scaled cross-attention scores


def mix_in_block(attention: nn.Module, target: torch.Tensor, target_mask: torch.Tensor, source: torch.Tensor,
                 source_mask: torch.Tensor, ratio: MixingRatio, entropy_mode: str = "masked"
                 ) -> tuple[torch.Tensor, MixStats]:
    """The authors' cross-attention sub-layer with ``ratio``: ``LayerNorm(l * Drop(O(ctx)) + (1 - l) * a_t)``.

    ``attention`` is a BERT-style block's attention module (``.self`` query/key/value/dropout, ``.output``
    dense/dropout/LayerNorm); ``target`` is ``a_t`` (B, T_t, H), ``source`` is ``a_s`` (B, T_s, H).
    """
    inner, out = attention.self, attention.output
    heads, size = inner.num_attention_heads, inner.attention_head_size
    batch, t_len, _ = target.shape

    def split(x: torch.Tensor) -> torch.Tensor:
        return x.view(x.size(0), x.size(1), heads, size).transpose(1, 2)

    q, k, v = split(inner.query(target)), split(inner.key(source)), split(inner.value(source))
    scores = q @ k.transpose(-1, -2) / math.sqrt(size)
    entropy = pair_entropy(scores, target_mask, source_mask, entropy_mode)
    lam = ratio(entropy)
    additive = (1.0 - source_mask[:, None, None, :].to(torch.float32)) * MASK_VALUE
    probs = inner.dropout(torch.softmax(scores.float() + additive, dim=-1).to(v.dtype))
    context = (probs @ v).transpose(1, 2).reshape(batch, t_len, heads * size)
    weight = lam.to(target.dtype)[:, None, None]
    mixed = out.LayerNorm(weight * out.dropout(out.dense(context)) + (1 - weight) * target)
    return mixed, MixStats(lam=lam, entropy=entropy, scores=scores)


def subword_pool(features: torch.Tensor, pool_index: torch.Tensor) -> torch.Tensor:
    """Sum each word's sub-token states into one position: ``pool_index`` (B, T) names it, -1 drops a position.

    The authors' ``sequence_subword_pooling`` (a scatter-add); here a 0/1 matrix product, which is deterministic.
    """
    length = features.size(1)
    positions = torch.arange(length, device=features.device)
    matrix = (pool_index[:, None, :] == positions[None, :, None]).to(features.dtype)  # (B, target pos, source pos)
    return matrix @ features


@dataclass
class XMixupOutput:
    logits: torch.Tensor  # the prediction: pair tasks (source + target) / 2 with a source, tagging the target's
    target_logits: torch.Tensor
    target_rep: torch.Tensor  # (B, H) the representation of the MSE term
    source_logits: torch.Tensor | None = None
    source_rep: torch.Tensor | None = None
    stats: dict[int, MixStats] = field(default_factory=dict)


class XMixupModel(nn.Module):
    """A DLFA model whose target pass mixes with a source inside the chosen encoder blocks."""

    def __init__(self, model: DLFAPreTrainedModel, config: XMixupConfig) -> None:
        super().__init__()
        self.model = model
        self.num_layers = encoder_num_layers(model.encoder.config)
        validate_xmixup_layers(config.layers, self.num_layers)
        config.layers = sorted(set(config.layers))
        blocks = encoder_blocks(model.encoder, self.num_layers)
        for layer in config.layers:
            check_mixing_block(blocks[layer - 1], layer)
        self.xmixup_config = config
        self.ratios = nn.ModuleDict({str(layer): MixingRatio(config.lambda_max) for layer in config.layers})
        self._mode: str | None = None  # None (hooks idle), "capture" (source pass) or "mix" (target pass)
        self._captured: dict[int, torch.Tensor] = {}
        self._masks: dict[str, torch.Tensor] = {}
        self._stats: dict[int, MixStats] = {}
        self._hooks = [blocks[layer - 1].attention.register_forward_hook(self._hook(layer))
                       for layer in config.layers]

    @property
    def config(self):
        """The DLFA model's config (``fuse_layer``, labels...)."""
        return self.model.config

    @property
    def head_type(self) -> str:
        """"token" or "sequence", as the wrapped DLFA model's."""
        return self.model.head_type

    def _hook(self, layer: int):
        def hook(module: nn.Module, args: Any, output: Any) -> Any:
            if self._mode is None:
                return None
            attended = output[0] if isinstance(output, tuple) else output
            if self._mode == "capture":
                self._captured[layer] = attended
                return None
            mixed, stats = mix_in_block(module, attended, self._masks["target"], self._captured[layer],
                                        self._masks["source"], self.ratios[str(layer)], self.xmixup_config.entropy)
            self._stats[layer] = stats
            return (mixed, *output[1:]) if isinstance(output, tuple) else mixed

        return hook

    # -- the narrow interface to the DLFA model -------------------------------------------------------------

    def _features(self, mode: str | None, input_ids, attention_mask, token_type_ids) -> torch.Tensor:
        self._mode = mode
        try:
            features, _ = self.model.encode(input_ids, attention_mask, token_type_ids)
        finally:
            self._mode = None
        return features

    def head_outputs(self, features: torch.Tensor, pool_index: torch.Tensor | None) -> tuple[torch.Tensor,
                                                                                              torch.Tensor]:
        """(logits, representation) from what the head reads.

        Sentence(-pair) heads: the head on the features and the first token's state (the authors'
        ``sequence_output[:, 0]``). Tagging heads: sub-word pooling, the head's dropout once, its classifier, and
        the sum of the dropped-out pooled states / (max_length - 2).
        """
        if self.model.head_type == "sequence":
            return self.model.head(features), features[:, 0]
        if pool_index is None:
            raise ValueError("X-Mixup tagging models classify pooled sub-words: pass pool_index")
        dropped = self.model.dropout(subword_pool(features, pool_index))
        return self.model.classifier(dropped), dropped.sum(dim=1) / (self.xmixup_config.max_length - 2)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        token_type_ids: torch.Tensor | None = None,
        pool_index: torch.Tensor | None = None,
        src_input_ids: torch.Tensor | None = None,
        src_attention_mask: torch.Tensor | None = None,
        src_token_type_ids: torch.Tensor | None = None,
        src_pool_index: torch.Tensor | None = None,
    ) -> XMixupOutput:
        """The target alone (no ``src_input_ids``) or a pair: the source pass, then the mixed target pass.

        A tagging source without ``src_pool_index`` (mixup inference) gives no source logits: only its states at
        the mixing blocks are used.
        """
        if any(getattr(module, "gradient_checkpointing", False) is True for module in self.model.encoder.modules()):
            raise ValueError("X-Mixup's hooks do not survive gradient checkpointing's recomputation")
        if src_input_ids is None:
            features = self._features(None, input_ids, attention_mask, token_type_ids)
            logits, rep = self.head_outputs(features, pool_index)
            return XMixupOutput(logits=logits, target_logits=logits, target_rep=rep)
        self._captured, self._stats = {}, {}
        try:
            source_features = self._features("capture", src_input_ids, src_attention_mask, src_token_type_ids)
            self._masks = {"source": src_attention_mask, "target": attention_mask}
            target_features = self._features("mix", input_ids, attention_mask, token_type_ids)
            stats = self._stats
        finally:
            self._captured, self._masks, self._stats = {}, {}, {}
        target_logits, target_rep = self.head_outputs(target_features, pool_index)
        source_logits = source_rep = None
        if self.model.head_type == "sequence" or src_pool_index is not None:
            source_logits, source_rep = self.head_outputs(source_features, src_pool_index)
        # The authors' mixup inference averages the two logits of a pair; a tagging pair is not aligned.
        logits = (source_logits + target_logits) / 2 if self.model.head_type == "sequence" else target_logits
        return XMixupOutput(logits=logits, target_logits=target_logits, target_rep=target_rep,
                            source_logits=source_logits, source_rep=source_rep, stats=stats)

    # -- persistence ---------------------------------------------------------------------------------------

    def save_pretrained(self, folder: str | Path) -> None:
        """The DLFA model's Hugging Face folder plus ``xmixup_config.json`` and ``xmixup.safetensors`` (checksummed):
        ``load_dlfa_model`` and plain transformers read it as the DLFA model it is (target-only inference)."""
        from dlfa.modeling.storage import write_model_checksums

        folder = Path(folder)
        self.model.save_pretrained(folder)
        (folder / XMIXUP_CONFIG_NAME).write_text(json.dumps(self.xmixup_config.to_dict(), indent=2) + "\n",
                                                 encoding="utf-8")
        save_model(self.ratios, str(folder / XMIXUP_WEIGHTS_NAME))
        write_model_checksums(folder)  # model.safetensors and xmixup.safetensors; replaces the DLFA-only one, last

    @classmethod
    def from_pretrained(cls, folder: str | Path, device: str | torch.device = "cpu") -> XMixupModel:
        from dlfa.modeling.storage import load_dlfa_model, verify_weights_checksum

        folder = Path(folder)
        config_path, weights_path = folder / XMIXUP_CONFIG_NAME, folder / XMIXUP_WEIGHTS_NAME
        for path in (config_path, weights_path):
            if not path.is_file():
                raise DlfaInputError("not a saved X-Mixup model (file missing)", path=path)
        try:
            data = json.loads(config_path.read_text(encoding="utf-8"))
            if not isinstance(data, dict):
                raise TypeError("not a JSON object")
        except (ValueError, TypeError) as exc:
            raise DlfaInputError(f"unreadable X-Mixup config ({exc})", path=config_path) from None
        if data.get("operator") != OPERATOR:
            raise DlfaInputError("saved by dlfa's earlier X-Mixup variant (a separate cross-attention after the "
                                 "block), which this version does not implement; its DLFA model still loads with "
                                 "dlfa evaluate", path=config_path)
        try:
            config = XMixupConfig.from_dict(data)
        except DlfaInputError as exc:
            raise DlfaInputError(f"invalid X-Mixup config ({exc.message})", path=config_path) from None
        model = load_dlfa_model(folder, device="cpu")
        verify_weights_checksum(folder, XMIXUP_WEIGHTS_NAME)
        wrapper = cls(model, config)
        try:
            missing, unexpected = load_model(wrapper.ratios, str(weights_path), strict=False)
        except Exception as exc:  # safetensors raises several types for corrupt files
            raise DlfaInputError(f"corrupt or truncated weights ({exc})", path=weights_path) from None
        if missing or unexpected:
            raise DlfaInputError(f"X-Mixup weights do not match (missing {sorted(missing)[:3]}, unexpected "
                                 f"{sorted(unexpected)[:3]})", path=weights_path)
        return wrapper.to(device)
