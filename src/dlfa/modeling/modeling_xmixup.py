"""X-Mixup (Yang et al., ICLR 2022, "Enhancing Cross-lingual Transfer by Manifold Mixup") around a DLFA model.

During training a parallel pair (English source, its translation as target) goes through the same encoder twice.
The source pass runs as usual and its output at the mixing blocks is kept. In the target pass the output of each
mixing block ``l`` is replaced by a mix with the source::

    A      = MultiHeadAttention(query = target h_l, keys = values = source h_l)   (padding keys masked)
    H(A)   = mean entropy of the target->source attention rows + mean entropy of the source->target rows
    lambda = lambda_0 * sigmoid(w_l * H(A) + b_l)                                   (one value per sentence)
    h_l'   = lambda * attended-source + (1 - lambda) * h_l

and the target pass continues from ``h_l'``. The task head, and a DLFA fusion when ``fuse_layer`` is set, read the
final layers exactly as in the wrapped DLFA model (``DLFAForTokenClassification`` or
``DLFAForSequenceClassification``); with ``fuse_layer`` at or above a mixing block the fusion reads the
mixed states. Inference is on the target alone (the wrapped DLFA model, no mixing), or with a source translation:
then the pair is mixed and the source and target logits are averaged, as in the authors' ``mixup_inference``.

How it hooks in: a forward hook on each mixing block of the encoder (BERT, XLM-R, e5, DistilBERT...: any
encoder whose blocks sit in one ``nn.ModuleList``). The hook does nothing unless a pair forward is running; it
records the block's output in the source pass and replaces it in the target pass. Hooks are registered first
(``prepend``), so transformers' own hidden-state recorders see the mixed states.

Where this follows the authors' TensorFlow code (github.com/yhy1117/X-Mixup, ``xmixup/tasks/layer_mixup.py``) and
where it differs, deliberately:

* **lambda.** ``lambda_0 = 0.5``; one ``Dense(1)`` per mixing layer on the scalar entropy, kernel initialised to
  1 and bias to 0 (their ``entropy_dense``), so at the start ``lambda = 0.5 * sigmoid(H(A))``.
* **H(A) is per sentence.** The authors compute, per sentence, the entropy of every attention row averaged over
  heads and query positions, for the target->source attention plus its transpose (source->target, softmax over
  target positions), and add the two. We do the same with exact masking: the softmax and the entropy run over
  non-padding keys only, and the averages run over non-padding queries only. (Their code multiplies the logits by
  the 0/1 mask inside the cross-entropy, so padding keys enter the normaliser, and their mean includes padding
  query rows; both make H(A) depend on how much padding a batch has.) Natural-log units.
* **Where the mix happens.** The authors mix inside a block: the block's own attention weights compute the
  target->source cross-attention, and the mix replaces the residual before the attention LayerNorm, then the
  block's feed-forward runs. Reaching inside blocks is architecture-specific, so we mix at the block's output
  with a separate learned multi-head cross-attention. Its query and key projections start as copies of the
  self-attention query/key of the block that reads this hidden state (block l+1; block l for the last block),
  so the initial alignment is the pretrained encoder's; its value and output projections start as the identity,
  so ``A`` starts as an attention-weighted average of source hidden states, a point of the same representation
  manifold as ``h_l``. Encoders whose attention layout is not recognised get N(0, initializer_range) query/key.
* **Layer numbering.** Block numbers are 1..N as for ``--fuse-layer`` (``hidden_states[l]`` is block l's output).
  The authors' ``start_layer=0, end_layer=1`` (XNLI, PAWS-X) is our block 1, their ``3 -> 4`` (UD-POS, PAN-X) our
  block 4. Several blocks mix in sequence, each with the source's output of the same block.
* No attention dropout in the mixer (the authors reuse the block's attention dropout).

Persistence: ``save_pretrained`` writes the wrapped DLFA model's Hugging Face folder (so ``load_dlfa_model``, the
recipe's evaluation and plain transformers read the folder as the DLFA model it is) plus ``xmixup_config.json``
and ``xmixup.safetensors`` with the mixers, and checksums.json over both weight files;
:meth:`XMixupModel.from_pretrained` reads both back.
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
    encoder_hidden_size,
    encoder_num_heads,
    encoder_num_layers,
)

XMIXUP_CONFIG_NAME = "xmixup_config.json"
XMIXUP_WEIGHTS_NAME = "xmixup.safetensors"
NEG_INF = -1e9  # additive mask; finite so that fully masked rows (none occur in practice) stay NaN-free


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
    layers: list[int] = field(default_factory=lambda: [1])  # mixing blocks, 1..N
    lambda_max: float = 0.5  # lambda_0
    num_heads: int = 12
    hidden_size: int = 768
    initializer_range: float = 0.02
    init: dict[str, str] = field(default_factory=dict)  # per layer: where query/key started from (informational)


def validate_xmixup_layers(layers: Sequence[int], num_layers: int, option: str = "--xmixup-layers") -> None:
    if not layers:
        raise DlfaInputError("give at least one mixing block", option=option)
    bad = [x for x in layers if isinstance(x, bool) or not isinstance(x, int) or not 1 <= x <= num_layers]
    if bad:
        raise DlfaInputError(f"mixing blocks must be integers in 1..{num_layers} for a {num_layers}-layer encoder, "
                             f"got {bad[0]!r}", option=option)


_QUERY_NAMES = ("query", "q_lin", "q_proj", "q")
_KEY_NAMES = ("key", "k_lin", "k_proj", "k")


def _attention_projections(block: nn.Module, hidden: int) -> tuple[nn.Linear, nn.Linear] | None:
    """The (query, key) linear layers of a block's self-attention, when their names are the usual ones."""
    found: dict[str, nn.Linear] = {}
    for name, module in block.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        if "cross" in name or not isinstance(module, nn.Linear) or module.weight.shape != (hidden, hidden):
            continue
        if leaf in _QUERY_NAMES and "q" not in found:
            found["q"] = module
        elif leaf in _KEY_NAMES and "k" not in found:
            found["k"] = module
    return (found["q"], found["k"]) if len(found) == 2 else None


def masked_softmax_entropy(scores: torch.Tensor, key_mask: torch.Tensor, query_mask: torch.Tensor) -> tuple[
        torch.Tensor, torch.Tensor]:
    """Attention probabilities and the per-sentence mean row entropy.

    ``scores`` (B, heads, Q, K) are attention logits, ``key_mask`` (B, K) and ``query_mask`` (B, Q) are 1 for real
    tokens. The softmax runs over real keys; the entropy ``-sum p log p`` of each row is averaged over heads and
    real queries. Returns probs (B, heads, Q, K) and entropy (B,).
    """
    keys = key_mask[:, None, None, :].to(torch.bool)
    logits = scores.float().masked_fill(~keys, NEG_INF)
    log_probs = torch.log_softmax(logits, dim=-1)
    probs = log_probs.exp()
    row_entropy = -(probs * log_probs.masked_fill(~keys, 0.0)).sum(dim=-1)  # (B, heads, Q)
    queries = query_mask[:, None, :].to(row_entropy.dtype)
    count = (queries.sum(dim=-1) * row_entropy.size(1)).sum(dim=-1).clamp_min(1.0)  # heads x real queries
    entropy = (row_entropy * queries).sum(dim=(1, 2)) / count
    return probs, entropy


@dataclass
class MixStats:
    lam: torch.Tensor  # (B,) mixing ratio lambda per sentence
    entropy: torch.Tensor  # (B,) H(A)
    attention: torch.Tensor  # (B, heads, T_target, T_source) target->source attention probabilities


class CrossAttentionMixer(nn.Module):
    """Target queries attend to source keys/values; lambda from the attention entropy; the mix."""

    def __init__(self, hidden_size: int, num_heads: int, lambda_max: float = 0.5) -> None:
        super().__init__()
        if hidden_size % num_heads:
            raise ValueError(f"hidden size {hidden_size} is not a multiple of {num_heads} heads")
        self.hidden_size, self.num_heads, self.lambda_max = hidden_size, num_heads, lambda_max
        self.head_dim = hidden_size // num_heads
        self.query = nn.Linear(hidden_size, hidden_size)
        self.key = nn.Linear(hidden_size, hidden_size)
        self.value = nn.Linear(hidden_size, hidden_size)
        self.output = nn.Linear(hidden_size, hidden_size)
        self.entropy_dense = nn.Linear(1, 1)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self, std: float = 0.02) -> None:
        for linear in (self.query, self.key):
            nn.init.normal_(linear.weight, std=std)
            nn.init.zeros_(linear.bias)
        for linear in (self.value, self.output):
            linear.weight.copy_(torch.eye(self.hidden_size))
            nn.init.zeros_(linear.bias)
        nn.init.ones_(self.entropy_dense.weight)
        nn.init.zeros_(self.entropy_dense.bias)

    @torch.no_grad()
    def init_query_key_from(self, query: nn.Linear, key: nn.Linear) -> None:
        self.query.weight.copy_(query.weight)
        self.query.bias.copy_(query.bias if query.bias is not None else torch.zeros_like(self.query.bias))
        self.key.weight.copy_(key.weight)
        self.key.bias.copy_(key.bias if key.bias is not None else torch.zeros_like(self.key.bias))

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        return x.view(b, t, self.num_heads, self.head_dim).transpose(1, 2)  # (B, heads, T, d)

    def attention_scores(self, target: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
        q, k = self._heads(self.query(target)), self._heads(self.key(source))
        return q @ k.transpose(-1, -2) / math.sqrt(self.head_dim)  # (B, heads, Tt, Ts)

    def mixing_ratio(self, entropy: torch.Tensor) -> torch.Tensor:
        """lambda = lambda_0 * sigmoid(Dense(H(A))), (B,) -> (B,)."""
        return self.lambda_max * torch.sigmoid(self.entropy_dense(entropy.unsqueeze(-1))).squeeze(-1)

    def forward(self, target: torch.Tensor, target_mask: torch.Tensor, source: torch.Tensor,
                source_mask: torch.Tensor) -> tuple[torch.Tensor, MixStats]:
        scores = self.attention_scores(target, source)
        probs, entropy_ts = masked_softmax_entropy(scores, source_mask, target_mask)
        _, entropy_st = masked_softmax_entropy(scores.transpose(-1, -2), target_mask, source_mask)
        entropy = entropy_ts + entropy_st
        lam = self.mixing_ratio(entropy)
        v = self._heads(self.value(source))
        context = (probs.to(v.dtype) @ v).transpose(1, 2).reshape(target.shape)  # (B, Tt, H)
        attended = self.output(context)
        weight = lam.to(target.dtype)[:, None, None]
        mixed = weight * attended + (1 - weight) * target
        # Padding positions keep the target's states (nothing reads them; this keeps them batch-independent).
        mixed = torch.where(target_mask[:, :, None].to(torch.bool), mixed, target)
        return mixed, MixStats(lam=lam, entropy=entropy, attention=probs)


@dataclass
class XMixupOutput:
    logits: torch.Tensor  # the prediction for a pair: (source + target) / 2; tagging: the target's (not aligned)
    source_logits: torch.Tensor
    target_logits: torch.Tensor
    source_features: torch.Tensor  # what the head read, (B, T, H)
    target_features: torch.Tensor
    source_attention_mask: torch.Tensor
    target_attention_mask: torch.Tensor
    mixed: bool
    stats: dict[int, MixStats] = field(default_factory=dict)


class XMixupModel(nn.Module):
    """A DLFA model (token or sequence head) plus one cross-attention mixer per mixing block, hooked into the
    encoder."""

    def __init__(self, model: DLFAPreTrainedModel, config: XMixupConfig, init_from_encoder: bool = True) -> None:
        super().__init__()
        self.model = model
        enc_cfg = model.encoder.config
        self.num_layers = encoder_num_layers(enc_cfg)
        validate_xmixup_layers(config.layers, self.num_layers)
        config.layers = sorted(set(config.layers))
        config.hidden_size = encoder_hidden_size(enc_cfg)
        config.num_heads = encoder_num_heads(enc_cfg)
        config.initializer_range = float(getattr(enc_cfg, "initializer_range", config.initializer_range) or 0.02)
        self.xmixup_config = config
        self.mixers = nn.ModuleDict({
            str(layer): CrossAttentionMixer(config.hidden_size, config.num_heads, config.lambda_max)
            for layer in config.layers
        })
        blocks = encoder_blocks(model.encoder, self.num_layers)
        if init_from_encoder:
            config.init = {}
            for layer in config.layers:
                mixer = self.mixers[str(layer)]
                mixer.reset_parameters(config.initializer_range)
                reader = layer if layer < self.num_layers else layer - 1  # 0-based index of block l+1 (or l)
                projections = _attention_projections(blocks[reader], config.hidden_size)
                if projections is None:
                    config.init[str(layer)] = f"random N(0, {config.initializer_range})"
                else:
                    mixer.init_query_key_from(*projections)
                    config.init[str(layer)] = f"query/key of block {reader + 1}"
        self._mode: str | None = None  # None (hooks idle), "capture" (source pass) or "mix" (target pass)
        self._captured: dict[int, torch.Tensor] = {}
        self._masks: dict[str, torch.Tensor] = {}
        self._stats: dict[int, MixStats] = {}
        self._hooks = [blocks[layer - 1].register_forward_hook(self._hook(layer), prepend=True)
                       for layer in config.layers]

    @property
    def config(self):
        """The wrapped model's config, so evaluation code treats this model as the DLFA model it wraps."""
        return self.model.config

    @property
    def head_type(self) -> str:
        return self.model.head_type

    def _hook(self, layer: int):
        def hook(module: nn.Module, args: Any, output: Any) -> Any:
            if self._mode is None:
                return None
            hidden = output[0] if isinstance(output, tuple) else output
            if self._mode == "capture":
                self._captured[layer] = hidden
                return None
            mixed, stats = self.mixers[str(layer)](hidden, self._masks["target"], self._captured[layer],
                                                   self._masks["source"])
            self._stats[layer] = stats
            return (mixed, *output[1:]) if isinstance(output, tuple) else mixed

        return hook

    def _run(self, mode: str | None, input_ids, attention_mask, token_type_ids) -> tuple[torch.Tensor, torch.Tensor]:
        self._mode = mode
        try:
            features, _ = self.model.encode(input_ids, attention_mask, token_type_ids)
        finally:
            self._mode = None
        return features, self.model.head(features)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        token_type_ids: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        src_input_ids: torch.Tensor | None = None,
        src_attention_mask: torch.Tensor | None = None,
        src_token_type_ids: torch.Tensor | None = None,
        src_labels: torch.Tensor | None = None,
        mix: bool = True,
        output_hidden_states: bool = False,
    ) -> Any:
        """Target alone (``src_input_ids`` absent): the wrapped DLFA model's output. With a source: both passes.

        ``mix=False`` runs the target pass plain (the scheduled-sampling alternative); labels are not used here,
        the X-Mixup objective (``dlfa.training.xmixup``) reads them from the batch.
        """
        if src_input_ids is None:
            return self.model(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids,
                              labels=labels, output_hidden_states=output_hidden_states)
        self._captured, self._stats = {}, {}
        try:
            source_features, source_logits = self._run("capture" if mix else None, src_input_ids,
                                                       src_attention_mask, src_token_type_ids)
            self._masks = {"source": src_attention_mask, "target": attention_mask}
            target_features, target_logits = self._run("mix" if mix else None, input_ids, attention_mask,
                                                       token_type_ids)
            stats = self._stats
        finally:
            self._captured, self._masks, self._stats = {}, {}, {}
        # A tagging pair's tokens are not aligned (nor equally many), so its logits cannot be averaged.
        logits = (source_logits + target_logits) / 2 if self.model.head_type == "sequence" else target_logits
        return XMixupOutput(
            logits=logits, source_logits=source_logits, target_logits=target_logits,
            source_features=source_features, target_features=target_features,
            source_attention_mask=src_attention_mask, target_attention_mask=attention_mask, mixed=mix, stats=stats,
        )

    # -- persistence ---------------------------------------------------------------------------------------

    def save_pretrained(self, folder: str | Path) -> None:
        """The DLFA model's Hugging Face folder (readable by ``load_dlfa_model``) plus the mixers, checksums last."""
        from dlfa.modeling.storage import write_model_checksums

        folder = Path(folder)
        self.model.save_pretrained(folder)
        (folder / XMIXUP_CONFIG_NAME).write_text(json.dumps(self.xmixup_config.to_dict(), indent=2) + "\n",
                                                 encoding="utf-8")
        save_model(self.mixers, str(folder / XMIXUP_WEIGHTS_NAME))
        write_model_checksums(folder)  # model.safetensors and xmixup.safetensors

    @classmethod
    def from_pretrained(cls, folder: str | Path, device: str | torch.device = "cpu") -> XMixupModel:
        from dlfa.modeling.storage import load_dlfa_model, verify_weights_checksum

        folder = Path(folder)
        model = load_dlfa_model(folder, device="cpu")
        config_path, weights_path = folder / XMIXUP_CONFIG_NAME, folder / XMIXUP_WEIGHTS_NAME
        for path in (config_path, weights_path):
            if not path.is_file():
                raise DlfaInputError("not a saved X-Mixup model (file missing)", path=path)
        verify_weights_checksum(folder, XMIXUP_WEIGHTS_NAME)
        try:
            config = XMixupConfig.from_dict(json.loads(config_path.read_text(encoding="utf-8")))
        except (json.JSONDecodeError, UnicodeDecodeError, TypeError) as exc:
            raise DlfaInputError(f"unreadable X-Mixup config ({exc})", path=config_path) from None
        wrapper = cls(model, config, init_from_encoder=False)
        try:
            missing, unexpected = load_model(wrapper.mixers, str(weights_path), strict=False)
        except Exception as exc:  # safetensors raises several types for corrupt files
            raise DlfaInputError(f"corrupt or truncated weights ({exc})", path=weights_path) from None
        if missing or unexpected:
            raise DlfaInputError(f"mixer weights do not match (missing {sorted(missing)[:3]}, unexpected "
                                 f"{sorted(unexpected)[:3]})", path=weights_path)
        return wrapper.to(device)
