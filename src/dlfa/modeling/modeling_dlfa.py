"""DLFA: dynamic-layer feature aggregation over a multilingual encoder, as native transformers classes, in one file.

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

What is in this file (the layout of transformers' ``modeling_bert.py``): :class:`DLFAConfig`, the AIF gate and the
fusion (:class:`Bottleneck`, :class:`AIFGate`, :class:`DLFAFusion`), :class:`DLFAPreTrainedModel`, the base
:class:`DLFAModel` (encoder + fusion; its ``last_hidden_state`` is the fused ``L``), the two heads
:class:`DLFAForTokenClassification` and :class:`DLFAForSequenceClassification`, and their output types. The file
imports only torch, transformers and the standard library: ``save_pretrained`` copies it next to the weights
(``auto_map`` in ``config.json``), so a saved model loads where dlfa is not installed::

    AutoModelForTokenClassification.from_pretrained(folder_or_hub_id, trust_remote_code=True)

Design choices the paper leaves open, and what this file does:

* **Bottleneck.** Both AIF branches are ``Linear(H, H/r) -> norm -> ReLU -> Linear(H/r, H)``, r = ``reduction``
  (4 by default). MS-CAM uses 1x1 convolutions, which on a token sequence are exactly per-token linear layers.
* **Normalization** (``aif_norm``). MS-CAM uses BatchNorm. BatchNorm over tokens mixes statistics across
  sentences and over padding, so a sentence's output would depend on what it is batched with. We use LayerNorm
  (per token, per sentence), which keeps every output invariant to padding and batching; ``"none"`` drops it.
* **Where the norm sits** (``aif_norm_placement``). ``"bottleneck"`` (default): after the first linear layer
  only, ``Linear -> LN -> ReLU -> Linear``. ``"mscam"``: after both linear layers of each branch, as MS-CAM puts
  BatchNorm after both 1x1 convolutions: ``Linear -> LN(H/r) -> ReLU -> Linear -> LN(H)``. The final LN makes each
  branch's output unit-variance per token, so with ``"mscam"`` the gate starts spread around its initial value
  (pre-activation std about sqrt(2): 95% of g within 0.06-0.94 for ``"average"``) rather than close to it.
  ``aif_norm="none"`` has no norm to place, so ``"mscam"`` with it is refused.
* **Global pooling.** The global branch mean-pools ``W`` over the non-padding tokens only (the attention
  mask), applies its bottleneck, and broadcasts the result to every token.
* **Initialization** (``_init_weights``). New linear weights are drawn from N(0, initializer_range) (0.02, as in
  BERT), biases are zero, LayerNorm is (1, 0). A pretrained encoder is never re-initialised
  (:meth:`DLFAPreTrainedModel.from_encoder` loads it first; transformers marks loaded weights as initialised).
* **Gate start** (``gate_init``). ``"average"`` (default, the paper): with the initialization above both branches
  output about 0, so g starts close to 0.5 and training begins from the plain average of the two layers.
  ``"baseline"``: the last additive term of each branch (the bias of its last linear layer, or of its final
  LayerNorm with ``"mscam"``, since a LayerNorm would cancel a bias placed before it) starts at
  ``BASELINE_GATE_BIAS / 2``, so ``local + global`` starts near 3.5 and g near sigmoid(3.5) = 0.97: D_x starts
  as the baseline (L = 0.97 L1 + 0.03 L2) and moves toward layer x only where that lowers the loss. Why 3.5:
  the gate's gradient scales with g(1 - g), which is 0.028 at g = 0.97 (a ninth of its value at g = 0.5) but
  0.007 at g = 0.993 (bias 5), where the gate would barely learn; below about 3 (g < 0.95) the start is no
  longer close to the baseline. With the default placement the random part of ``local + global`` has std about
  0.02 sqrt(H/r) (0.28 for H = 768, r = 4), which keeps 95% of the initial g within 0.95-0.98 (0.36-0.63 for
  ``"average"``; measured on random inputs). With ``"mscam"`` the bias sits in the final LayerNorm and 95% of g
  start within 0.68-0.998.
* **Heads.** Token classification is dropout + linear on every sub-token (:class:`DLFAForTokenClassification`,
  BERT's head); the loss and the metrics use one sub-token per word (the data pipeline decides which; see
  ``dlfa.data.features``). Sequence(-pair) classification reads the first token (``[CLS]``/``<s>``) through
  dropout -> dense -> tanh -> dropout -> linear (:class:`DLFAForSequenceClassification`, RoBERTa's head), since
  several encoders (XLM-R, e5) ship no trained pooler. Loss: cross-entropy in float32, ``-100`` ignored.
* **Encoder.** Any transformers encoder that returns ``hidden_states`` (BERT, XLM-R, DistilBERT, ...), built
  with ``AutoModel.from_config(config.encoder)`` and without its pooler where the class has one (the pooler is
  unused; an unused parameter is also what distributed data parallel rejects). A checkpoint that has pooler
  weights is accepted and its pooler ignored.

Departures from MS-CAM's gate, in one table (the bullets above say why):

=====================  ======================================  ================================================
part                   MS-CAM (Dai et al., 2021)               here
=====================  ======================================  ================================================
1x1 convolutions       Conv1x1 over channels                   the same map: per-token Linear
normalization          BatchNorm after both convolutions       LayerNorm after the first (default) or both
                                                               linear layers (``aif_norm_placement``), or none
global pooling         average over every position             mean over non-padding tokens only
initial gate           whatever the init gives (BN gamma 1)    g near 0.5 (``average``) or 0.97 (``baseline``)
=====================  ======================================  ================================================

Loading is strict: :meth:`DLFAPreTrainedModel.from_pretrained` reads safetensors only and raises
:class:`DLFAWeightsError` when the checkpoint lacks a weight of the model (or has one of another shape, or an
unexpected one other than a pooler), instead of initialising it at random. Saving is transformers' own
``save_pretrained``; ``push_to_hub`` comes with :class:`~transformers.PreTrainedModel`. The encoder alone is
exported with :meth:`DLFAPreTrainedModel.save_encoder`.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoConfig, AutoModel, PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import BaseModelOutput, SequenceClassifierOutput, TokenClassifierOutput
from transformers.utils import logging

try:  # transformers >= 5: init functions that leave loaded (flagged) tensors alone
    from transformers import initialization as init
except ImportError:  # pragma: no cover - older transformers
    from torch.nn import init

AIF_NORMS = ("layernorm", "none")
AIF_NORM_PLACEMENTS = ("bottleneck", "mscam")
GATE_INITS = ("average", "baseline")
BASELINE_GATE_BIAS = 3.5  # gate_init="baseline": g starts near sigmoid(3.5) = 0.97 (module docstring: why)
POOLER_KEYS = r"encoder\.pooler\."  # a pooler in an encoder checkpoint is accepted and ignored

logger = logging.get_logger(__name__)


def _value_error(message: str, option: str | None = None) -> Exception:
    return ValueError(message if option is None else f"{option}: {message}")


# The exception that :func:`validate_fuse_layer` and :func:`encoder_blocks` raise for a bad user setting:
# ValueError here; dlfa (``dlfa.modeling``) sets its DlfaInputError, which its command line prints as one line.
input_error: Callable[..., Exception] = _value_error


class DLFAConfigError(ValueError):
    """A bad :class:`DLFAConfig` value; ``field`` names the setting."""

    def __init__(self, field: str, message: str) -> None:
        self.field = field
        self.message = message
        super().__init__(f"DLFAConfig.{field}: {message}")


class DLFAWeightsError(ValueError):
    """A checkpoint that does not hold exactly the model's weights (missing, mismatched or unexpected ones)."""


# -- encoder helpers (used by dlfa's analyses and X-Mixup as well) -------------------------------------------------


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
    raise input_error(f"cannot find the {num_layers} transformer blocks of a {type(encoder).__name__}")


def _fuse_layer_problem(fuse_layer: Any, num_layers: int | None) -> str | None:
    """Why ``fuse_layer`` is not a valid x of D_x (1 <= x < N), or None when it is (None is the baseline)."""
    if fuse_layer is None:
        return None
    if isinstance(fuse_layer, int) and not isinstance(fuse_layer, bool) and fuse_layer >= 1 and (
            num_layers is None or fuse_layer < num_layers):
        return None
    if num_layers is None:
        return f"fused layer must be a positive integer or None, got {fuse_layer!r}"
    return f"fused layer must be an integer in 1..{num_layers - 1} for a {num_layers}-layer encoder, got {fuse_layer!r}"


def validate_fuse_layer(fuse_layer: int | None, num_layers: int, option: str = "--fuse-layer") -> None:
    """D_x needs 1 <= x < N: layer N is the last layer itself and layer 0 is the embeddings."""
    problem = _fuse_layer_problem(fuse_layer, num_layers)
    if problem:
        raise input_error(problem, option=option)


def masked_mean(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Mean over the non-padding tokens: (B, T, H), (B, T) -> (B, H)."""
    mask = attention_mask.to(hidden.dtype).unsqueeze(-1)
    total = (hidden * mask).sum(dim=1)
    count = mask.sum(dim=1).clamp_min(1.0)
    return total / count


def encoder_model_kwargs(encoder_config: PretrainedConfig) -> dict[str, Any]:
    """``{"add_pooling_layer": False}`` for encoder classes that take it (BERT, XLM-R, ...), else nothing."""
    from transformers.models.auto.modeling_auto import MODEL_MAPPING

    try:
        model_class = MODEL_MAPPING[type(encoder_config)]
    except KeyError:
        return {}
    if "add_pooling_layer" in inspect.signature(model_class.__init__).parameters:
        return {"add_pooling_layer": False}
    return {}


def load_encoder(name_or_path: str, **kwargs: Any) -> PreTrainedModel:
    """A pretrained transformers encoder (Hub id or folder), from safetensors, without its pooler.

    Missing or mismatched weights are an error (transformers would initialise them at random); weights the encoder
    does not use (a pooler, pretraining heads such as BERT's ``cls.*``) are ignored, with one info line.
    """
    config = AutoConfig.from_pretrained(name_or_path, **kwargs)
    verbosity = logging.get_verbosity()
    logging.set_verbosity_error()  # transformers' load report would list the unused weights as a warning table
    try:
        encoder, info = AutoModel.from_pretrained(name_or_path, config=config, use_safetensors=True,
                                                  output_loading_info=True, **encoder_model_kwargs(config), **kwargs)
    finally:
        logging.set_verbosity(verbosity)
    problems = _loading_problems(info, unexpected=False)
    if problems:
        raise DLFAWeightsError(f"{name_or_path}: the encoder's weights do not match {type(encoder).__name__} "
                               f"({problems})")
    if info.get("unexpected_keys"):
        logger.info("%s: weights the encoder does not use were left out: %s", name_or_path,
                    _some_keys(info["unexpected_keys"]))
    return encoder


def _some_keys(keys: Any) -> str:
    names = sorted(str(k[0] if isinstance(k, tuple) else k) for k in keys)
    return ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")


def _loading_problems(info: Mapping[str, Any], unexpected: bool = True) -> str:
    some = _some_keys
    problems = []
    if info.get("missing_keys"):
        problems.append(f"missing {some(info['missing_keys'])}")
    if info.get("mismatched_keys"):
        problems.append(f"of another shape {some(info['mismatched_keys'])}")
    if unexpected and info.get("unexpected_keys"):
        problems.append(f"unexpected {some(info['unexpected_keys'])}")
    if info.get("error_msgs"):
        problems.append(" ".join(str(info["error_msgs"][0]).split()))
    return "; ".join(problems)


# -- configuration -----------------------------------------------------------------------------------------------


class DLFAConfig(PretrainedConfig):
    r"""Configuration of a DLFA model: the encoder's own config plus the fusion and head settings.

    Args:
        encoder (`PretrainedConfig` or `dict`, *optional*): the encoder's configuration (a dict in ``config.json``,
            rebuilt with ``AutoConfig.for_model``). A model cannot be built without it.
        fuse_layer (`int`, *optional*): x of D_x, the encoder layer (1..N-1) fused with the last one; ``None`` is
            the baseline (the head reads the last layer).
        reduction (`int`, defaults to 4): r, the AIF bottleneck is H -> H/r -> H.
        aif_norm (`str`, defaults to ``"layernorm"``): ``"layernorm"`` or ``"none"``.
        aif_norm_placement (`str`, defaults to ``"bottleneck"``): ``"bottleneck"`` (after the first linear layer of
            each gate branch) or ``"mscam"`` (after both).
        gate_init (`str`, defaults to ``"average"``): ``"average"`` (g starts near 0.5) or ``"baseline"`` (g
            starts near 0.97, D_x starts as the baseline).
        classifier_dropout (`float`, defaults to 0.1): dropout before (and, for sequences, inside) the head.
        initializer_range (`float`, defaults to 0.02): std of the new linear layers' initial weights.
        encoder_name (`str`): where the encoder came from (Hub id, folder, ``embedded:...``); informational.
        id2label / label2id / num_labels: the labels, as for every transformers classification model.
    """

    model_type = "dlfa"
    # Trainer's prediction loop leaves these outputs out (the fused features would fill memory).
    keys_to_ignore_at_inference = ["features", "hidden_states", "attentions"]

    def __init__(
        self,
        encoder: PretrainedConfig | Mapping[str, Any] | None = None,
        fuse_layer: int | None = None,
        reduction: int = 4,
        aif_norm: str = "layernorm",
        aif_norm_placement: str = "bottleneck",
        gate_init: str = "average",
        classifier_dropout: float = 0.1,
        initializer_range: float = 0.02,
        encoder_name: str = "",
        **kwargs: Any,
    ) -> None:
        if isinstance(encoder, Mapping):
            settings = dict(encoder)
            if not settings.get("model_type"):
                raise DLFAConfigError("encoder", "the encoder config has no model_type")
            try:
                encoder = AutoConfig.for_model(**settings)
            except (ValueError, KeyError, TypeError) as exc:
                raise DLFAConfigError("encoder", str(exc).splitlines()[0] if str(exc) else type(exc).__name__) from None
        elif encoder is not None and not isinstance(encoder, PretrainedConfig):
            raise DLFAConfigError("encoder", f"expected a config or a dict, got {type(encoder).__name__}")
        self.encoder = encoder
        self.fuse_layer = fuse_layer
        self.reduction = reduction
        self.aif_norm = aif_norm
        self.aif_norm_placement = aif_norm_placement
        self.gate_init = gate_init
        self.classifier_dropout = classifier_dropout
        self.initializer_range = initializer_range
        self.encoder_name = encoder_name
        if kwargs.get("id2label") is not None and kwargs.get("label2id") is None:
            kwargs["label2id"] = {str(name): int(i) for i, name in dict(kwargs["id2label"]).items()}
        super().__init__(**kwargs)
        self._check()

    def _check(self) -> None:
        num_layers = encoder_num_layers(self.encoder) if self.encoder is not None else None
        problem = _fuse_layer_problem(self.fuse_layer, num_layers)
        if problem:
            raise DLFAConfigError("fuse_layer", problem)
        if not isinstance(self.reduction, int) or isinstance(self.reduction, bool) or self.reduction < 1:
            raise DLFAConfigError("reduction", f"must be an integer >= 1, got {self.reduction!r}")
        if self.encoder is not None and self.reduction > encoder_hidden_size(self.encoder):
            raise DLFAConfigError("reduction", f"must be at most the hidden size {encoder_hidden_size(self.encoder)}, "
                                               f"got {self.reduction}")
        for name, allowed in (("aif_norm", AIF_NORMS), ("aif_norm_placement", AIF_NORM_PLACEMENTS),
                              ("gate_init", GATE_INITS)):
            if getattr(self, name) not in allowed:
                raise DLFAConfigError(name, f"must be one of {', '.join(allowed)}, got {getattr(self, name)!r}")
        if self.aif_norm == "none" and self.aif_norm_placement != "bottleneck":
            raise DLFAConfigError("aif_norm_placement", f"{self.aif_norm_placement!r} places a norm, but aif_norm is "
                                                        "'none'")
        if not _is_number(self.classifier_dropout) or not 0 <= self.classifier_dropout < 1:
            raise DLFAConfigError("classifier_dropout", f"must be in [0, 1), got {self.classifier_dropout!r}")
        if not _is_number(self.initializer_range) or not self.initializer_range > 0:
            raise DLFAConfigError("initializer_range", f"must be a positive number, got {self.initializer_range!r}")
        if not isinstance(self.encoder_name, str):
            raise DLFAConfigError("encoder_name", f"must be a string, got {self.encoder_name!r}")
        if self.problem_type not in (None, "single_label_classification"):
            raise DLFAConfigError("problem_type", f"DLFA heads do single-label classification, not {self.problem_type}")

    def _require_encoder(self) -> PretrainedConfig:
        if self.encoder is None:
            raise DLFAConfigError("encoder", "no encoder config: build the model with from_encoder() or give one")
        return self.encoder


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


# -- the AIF gate and the fusion -----------------------------------------------------------------------------------


class Bottleneck(nn.Module):
    """H -> H/r -> H, applied to the last dimension (a 1x1 convolution in MS-CAM), with its norm(s)."""

    def __init__(self, hidden_size: int, reduction: int, norm: str = "layernorm", placement: str = "bottleneck",
                 output_bias: float = 0.0) -> None:
        super().__init__()
        inner = max(1, hidden_size // reduction)
        self.down = nn.Linear(hidden_size, inner)
        self.norm = nn.LayerNorm(inner) if norm == "layernorm" else nn.Identity()
        self.up = nn.Linear(inner, hidden_size)
        self.out_norm = nn.LayerNorm(hidden_size) if norm == "layernorm" and placement == "mscam" else nn.Identity()
        # The branch's last additive term (the final LayerNorm's bias with "mscam", else the last linear layer's,
        # which a LayerNorm after it would cancel) starts at `output_bias`; _init_weights reads this.
        last = self.out_norm if isinstance(self.out_norm, nn.LayerNorm) else self.up
        last.initial_bias = output_bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out_norm(self.up(F.relu(self.norm(self.down(x)))))


class AIFGate(nn.Module):
    """Attentional Information Fusion gate: g(W) = sigmoid(local(W) + global(W)), values in (0, 1)."""

    def __init__(self, hidden_size: int, reduction: int = 4, norm: str = "layernorm", placement: str = "bottleneck",
                 bias: float = 0.0) -> None:
        super().__init__()
        # The two branches share the starting bias, so local + global starts near `bias`.
        self.local_branch = Bottleneck(hidden_size, reduction, norm, placement, bias / 2)
        self.global_branch = Bottleneck(hidden_size, reduction, norm, placement, bias / 2)

    def forward(self, fused_input: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        local = self.local_branch(fused_input)  # (B, T, H)
        pooled = masked_mean(fused_input, attention_mask)  # (B, H)
        global_ = self.global_branch(pooled).unsqueeze(1)  # (B, 1, H), broadcast over tokens
        return torch.sigmoid(local + global_)


class DLFAFusion(nn.Module):
    """L = L1 * g + L2 * (1 - g) with g = AIF((L1 + L2) / 2)."""

    def __init__(self, hidden_size: int, reduction: int = 4, norm: str = "layernorm", placement: str = "bottleneck",
                 bias: float = 0.0) -> None:
        super().__init__()
        self.gate = AIFGate(hidden_size, reduction, norm, placement, bias)

    def forward(self, last: torch.Tensor, lower: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        gate = self.gate((last + lower) / 2, attention_mask)
        # L2 + g * (L1 - L2) is the same blend with one multiply fewer.
        return lower + gate * (last - lower)


# -- outputs -------------------------------------------------------------------------------------------------------


@dataclass
class DLFATokenClassifierOutput(TokenClassifierOutput):
    """transformers' token-classification output plus ``features``: what the head read (fused L, or the last
    layer for the baseline), (batch, tokens, hidden)."""

    features: torch.Tensor | None = None


@dataclass
class DLFASequenceClassifierOutput(SequenceClassifierOutput):
    """transformers' sequence-classification output plus ``features`` (see :class:`DLFATokenClassifierOutput`)."""

    features: torch.Tensor | None = None


# -- models --------------------------------------------------------------------------------------------------------


class DLFAPreTrainedModel(PreTrainedModel):
    """Weight initialization, strict safetensors loading and the encoder-first constructor of DLFA models."""

    config_class = DLFAConfig
    base_model_prefix = "dlfa"
    main_input_name = "input_ids"
    supports_gradient_checkpointing = True
    _keys_to_ignore_on_load_unexpected = [POOLER_KEYS]
    head_type: str | None = None  # "token" or "sequence" for the heads

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        """New modules only: the encoder is a PreTrainedModel of its own and is initialised (or loaded) by it."""
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, nn.LayerNorm):
            init.ones_(module.weight)
        if isinstance(module, (nn.Linear, nn.LayerNorm)) and module.bias is not None:
            # Zero, but for the last layer of a gate branch under gate_init="baseline" (see Bottleneck).
            init.constant_(module.bias, getattr(module, "initial_bias", 0.0))

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: Any, *model_args: Any, **kwargs: Any):
        """transformers' ``from_pretrained`` (folder or Hub id), from safetensors only, and strict.

        A weight of the model that the checkpoint lacks (or holds with another shape), or a checkpoint weight the
        model does not have (other than an encoder pooler), raises :class:`DLFAWeightsError` instead of leaving a
        randomly initialised weight behind.
        """
        if kwargs.get("use_safetensors") is False:
            raise ValueError("DLFA models load from safetensors only (use_safetensors=False was given)")
        kwargs["use_safetensors"] = True
        # Mismatched shapes are reported (and refused) below, with their names, rather than by transformers.
        kwargs["ignore_mismatched_sizes"] = True
        want_info = kwargs.pop("output_loading_info", False)
        model, info = super().from_pretrained(pretrained_model_name_or_path, *model_args, output_loading_info=True,
                                              **kwargs)
        problems = _loading_problems(info)
        if problems:
            raise DLFAWeightsError(f"{pretrained_model_name_or_path}: the weights do not match {cls.__name__} "
                                   f"({problems})")
        return (model, info) if want_info else model

    @classmethod
    def from_encoder(cls, encoder_name_or_path: str, fuse_layer: int | None = None,
                     id2label: Mapping[int, str] | Sequence[str] | None = None, **config_kwargs: Any):
        """A new model around a pretrained encoder (Hub id or folder): the encoder's weights as loaded, new
        fusion and head initialised as in ``_init_weights``.

        ``id2label`` is a mapping or a list of label names (``label2id`` follows); other keyword arguments are
        :class:`DLFAConfig` settings (``reduction``, ``gate_init``...).
        """
        encoder = load_encoder(encoder_name_or_path)
        if id2label is not None:
            labels = dict(id2label) if isinstance(id2label, Mapping) else dict(enumerate(id2label))
            config_kwargs["id2label"] = {int(k): str(v) for k, v in labels.items()}
            config_kwargs["label2id"] = {v: k for k, v in config_kwargs["id2label"].items()}
        config_kwargs.setdefault("encoder_name", str(encoder_name_or_path))
        config = cls.config_class(encoder=encoder.config, fuse_layer=fuse_layer, **config_kwargs)
        return cls(config, encoder=encoder)

    def save_pretrained(self, save_directory: Any, *args: Any, **kwargs: Any) -> Any:
        """transformers' ``save_pretrained`` (safetensors, this file beside it); ``auto_map`` also names
        :class:`DLFAModel`, so ``AutoModel`` reads the folder as the base model (the fused features)."""
        if kwargs.get("safe_serialization") is False:
            raise ValueError("DLFA models are saved as safetensors only (safe_serialization=False was given)")
        auto_map = dict(getattr(self.config, "auto_map", None) or {})
        module = type(self).__module__.rsplit(".", 1)[-1]
        auto_map.setdefault("AutoConfig", f"{module}.DLFAConfig")
        auto_map.setdefault("AutoModel", f"{module}.DLFAModel")
        self.config.auto_map = auto_map
        return super().save_pretrained(save_directory, *args, **kwargs)

    def save_encoder(self, save_directory: Any, **kwargs: Any) -> Any:
        """Export the (fine-tuned) encoder alone as an ordinary transformers model folder.

        ``AutoModel.from_pretrained(folder)`` reads it back; the folder has no pooler (DLFA never uses one), so load
        BERT- and XLM-R-type encoders with ``add_pooling_layer=False`` (or expect a new, random pooler). Save the
        tokenizer beside it with ``tokenizer.save_pretrained(folder)``.
        """
        return self.base_model.encoder.save_pretrained(save_directory, **kwargs)


class DLFAModel(DLFAPreTrainedModel):
    """The encoder and, with ``fuse_layer``, the DLFA fusion; ``last_hidden_state`` is what a head reads."""

    # Read from a head's checkpoint, the base model leaves the head's weights out.
    _keys_to_ignore_on_load_unexpected = [POOLER_KEYS, r"(^|\.)classifier\."]

    def __init__(self, config: DLFAConfig, encoder: PreTrainedModel | None = None) -> None:
        super().__init__(config)
        encoder_config = config._require_encoder()
        if encoder is None:
            encoder = AutoModel.from_config(encoder_config, **encoder_model_kwargs(encoder_config))
        else:
            # A given (pretrained) encoder keeps its weights: initialization skips modules marked initialised.
            for module in encoder.modules():
                module._is_hf_initialized = True
        self.encoder = encoder
        self.num_layers = encoder_num_layers(encoder.config)
        hidden = encoder_hidden_size(encoder.config)
        problem = _fuse_layer_problem(config.fuse_layer, self.num_layers)
        if problem:
            raise DLFAConfigError("fuse_layer", problem)
        bias = BASELINE_GATE_BIAS if config.gate_init == "baseline" else 0.0
        self.fusion = (DLFAFusion(hidden, config.reduction, config.aif_norm, config.aif_norm_placement, bias)
                       if config.fuse_layer is not None else None)
        forward_args = inspect.signature(encoder.forward).parameters
        # DistilBERT has no segment embeddings; BERT-like models do.
        self._takes_token_types = "token_type_ids" in forward_args and getattr(encoder.config, "type_vocab_size", 1) > 0
        self.post_init()

    def encode(self, input_ids: torch.Tensor | None, attention_mask: torch.Tensor | None = None,
               token_type_ids: torch.Tensor | None = None, output_hidden_states: bool = False,
               ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...] | None]:
        """(what a head reads: the fused L or the last layer, all hidden states when asked for)."""
        out = self(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids,
                   output_hidden_states=output_hidden_states, return_dict=True)
        return out.last_hidden_state, out.hidden_states

    def get_input_embeddings(self) -> nn.Module:
        return self.encoder.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.encoder.set_input_embeddings(value)

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
    ) -> BaseModelOutput | tuple:
        output_hidden_states = (output_hidden_states if output_hidden_states is not None
                                else self.config.output_hidden_states)
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        if attention_mask is None:
            shape = input_ids.shape if input_ids is not None else inputs_embeds.shape[:2]
            device = input_ids.device if input_ids is not None else inputs_embeds.device
            attention_mask = torch.ones(shape, dtype=torch.long, device=device)
        kwargs: dict[str, Any] = {"attention_mask": attention_mask}
        if inputs_embeds is not None:
            kwargs["inputs_embeds"] = inputs_embeds
        else:
            kwargs["input_ids"] = input_ids
        if token_type_ids is not None and self._takes_token_types:
            kwargs["token_type_ids"] = token_type_ids
        if output_attentions:
            kwargs["output_attentions"] = True
        need_all = self.fusion is not None or bool(output_hidden_states)
        out = self.encoder(**kwargs, output_hidden_states=need_all, return_dict=True)
        if self.fusion is None:
            features = out.last_hidden_state
        else:
            hidden_states = out.hidden_states
            features = self.fusion(hidden_states[-1], hidden_states[self.config.fuse_layer], attention_mask)
        output = BaseModelOutput(last_hidden_state=features,
                                 hidden_states=out.hidden_states if output_hidden_states else None,
                                 attentions=getattr(out, "attentions", None) if output_attentions else None)
        return output if return_dict else output.to_tuple()


class _HeadShortcuts:
    """Shortcuts from a head model into its base model, for code that treats every DLFA model alike."""

    @property
    def encoder(self) -> PreTrainedModel:
        return self.base_model.encoder

    @property
    def fusion(self) -> DLFAFusion | None:
        return self.base_model.fusion

    @property
    def num_layers(self) -> int:
        return self.base_model.num_layers

    def encode(self, input_ids: torch.Tensor | None, attention_mask: torch.Tensor | None = None,
               token_type_ids: torch.Tensor | None = None, output_hidden_states: bool = False,
               ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...] | None]:
        """See :meth:`DLFAModel.encode`."""
        return self.base_model.encode(input_ids, attention_mask, token_type_ids, output_hidden_states)


def _classification_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    # float32 even under fp16/bf16 autocast: the loss of a large vocabulary of labels is not precise in half.
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), labels.reshape(-1).to(logits.device),
                           ignore_index=-100)


class DLFAForTokenClassification(_HeadShortcuts, DLFAPreTrainedModel):
    """DLFA with a tagging head: dropout + linear on every sub-token (BERT's token-classification head)."""

    head_type = "token"

    def __init__(self, config: DLFAConfig, encoder: PreTrainedModel | None = None) -> None:
        super().__init__(config)
        self.num_labels = config.num_labels
        self.dlfa = DLFAModel(config, encoder=encoder)
        self.dropout = nn.Dropout(config.classifier_dropout)
        self.classifier = nn.Linear(encoder_hidden_size(self.dlfa.encoder.config), config.num_labels)
        self.post_init()

    def head(self, features: torch.Tensor) -> torch.Tensor:
        """Logits from what the head reads, (B, T, H) -> (B, T, labels)."""
        return self.classifier(self.dropout(features))

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
    ) -> DLFATokenClassifierOutput | tuple:
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        out = self.dlfa(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids,
                        inputs_embeds=inputs_embeds, output_attentions=output_attentions,
                        output_hidden_states=output_hidden_states, return_dict=True)
        logits = self.head(out.last_hidden_state)
        loss = _classification_loss(logits, labels) if labels is not None else None
        output = DLFATokenClassifierOutput(loss=loss, logits=logits, hidden_states=out.hidden_states,
                                           attentions=out.attentions, features=out.last_hidden_state)
        return output if return_dict else output.to_tuple()


class DLFAClassificationHead(nn.Module):
    """RoBERTa's sentence head on the first token: dropout -> dense -> tanh -> dropout -> out_proj."""

    def __init__(self, hidden_size: int, num_labels: int, dropout: float) -> None:
        super().__init__()
        self.dense = nn.Linear(hidden_size, hidden_size)
        self.dropout = nn.Dropout(dropout)
        self.out_proj = nn.Linear(hidden_size, num_labels)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        x = self.dropout(features[:, 0])
        x = torch.tanh(self.dense(x))
        return self.out_proj(self.dropout(x))


class DLFAForSequenceClassification(_HeadShortcuts, DLFAPreTrainedModel):
    """DLFA with a sentence(-pair) head on the first token (RoBERTa's classification head)."""

    head_type = "sequence"

    def __init__(self, config: DLFAConfig, encoder: PreTrainedModel | None = None) -> None:
        super().__init__(config)
        self.num_labels = config.num_labels
        self.dlfa = DLFAModel(config, encoder=encoder)
        self.classifier = DLFAClassificationHead(encoder_hidden_size(self.dlfa.encoder.config), config.num_labels,
                                                 config.classifier_dropout)
        self.post_init()

    def head(self, features: torch.Tensor) -> torch.Tensor:
        """Logits from what the head reads, (B, T, H) -> (B, labels)."""
        return self.classifier(features)

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
    ) -> DLFASequenceClassifierOutput | tuple:
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        out = self.dlfa(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids,
                        inputs_embeds=inputs_embeds, output_attentions=output_attentions,
                        output_hidden_states=output_hidden_states, return_dict=True)
        logits = self.head(out.last_hidden_state)
        loss = _classification_loss(logits, labels) if labels is not None else None
        output = DLFASequenceClassifierOutput(loss=loss, logits=logits, hidden_states=out.hidden_states,
                                              attentions=out.attentions, features=out.last_hidden_state)
        return output if return_dict else output.to_tuple()


HEAD_CLASSES: dict[str, type[DLFAPreTrainedModel]] = {
    "token": DLFAForTokenClassification,
    "sequence": DLFAForSequenceClassification,
}

# save_pretrained writes ``auto_map`` and copies this file beside the weights (trust_remote_code loading).
DLFAConfig.register_for_auto_class()
DLFAModel.register_for_auto_class("AutoModel")
DLFAForTokenClassification.register_for_auto_class("AutoModelForTokenClassification")
DLFAForSequenceClassification.register_for_auto_class("AutoModelForSequenceClassification")

__all__ = [
    "AIFGate", "Bottleneck", "DLFAClassificationHead", "DLFAConfig", "DLFAConfigError", "DLFAForSequenceClassification",
    "DLFAForTokenClassification", "DLFAFusion", "DLFAModel", "DLFAPreTrainedModel", "DLFASequenceClassifierOutput",
    "DLFATokenClassifierOutput", "DLFAWeightsError", "HEAD_CLASSES", "encoder_blocks", "encoder_hidden_size",
    "encoder_model_kwargs", "encoder_num_heads", "encoder_num_layers", "load_encoder", "masked_mean",
    "validate_fuse_layer",
]
