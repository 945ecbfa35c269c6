"""dlfa's models: the DLFA transformers classes, X-Mixup around them, and dlfa's side of saving and loading.

Importing this package (any ``dlfa.modeling`` module, hence every dlfa command that builds or reads a model)
registers the DLFA classes with transformers' Auto classes, so that ``AutoConfig``, ``AutoModel``,
``AutoModelForTokenClassification`` and ``AutoModelForSequenceClassification`` read DLFA folders with dlfa's own
code and without ``trust_remote_code``. Without dlfa installed, the same folders load with
``trust_remote_code=True`` from the ``modeling_dlfa.py`` saved beside the weights. ``import dlfa`` alone stays
light (no torch or transformers), so that the command line refuses bad options fast.

dlfa's side (``dlfa.modeling.storage``): :func:`load_dlfa_model` (checksums, the right class, dlfa 0.1 folders
converted in memory, every failure one :class:`~dlfa.errors.DlfaInputError` line), :func:`save_dlfa_model`,
:func:`convert_legacy_folder`; model cards in ``dlfa.modeling.card``.
"""

from __future__ import annotations

from dlfa.errors import DlfaInputError
from dlfa.modeling import modeling_dlfa
from dlfa.modeling.modeling_dlfa import (
    HEAD_CLASSES,
    DLFAConfig,
    DLFAConfigError,
    DLFAForSequenceClassification,
    DLFAForTokenClassification,
    DLFAModel,
    DLFAPreTrainedModel,
)


def _input_error(message: str, option: str | None = None) -> DlfaInputError:
    return DlfaInputError(message, option=option)


# modeling_dlfa cannot import dlfa (it must load where dlfa is not installed): hand it dlfa's error type.
modeling_dlfa.input_error = _input_error


def register_auto_classes() -> None:
    """Register the DLFA classes with transformers' Auto classes (idempotent; done on import)."""
    from transformers import (
        AutoConfig,
        AutoModel,
        AutoModelForSequenceClassification,
        AutoModelForTokenClassification,
    )

    AutoConfig.register(DLFAConfig.model_type, DLFAConfig, exist_ok=True)
    AutoModel.register(DLFAConfig, DLFAModel, exist_ok=True)
    AutoModelForTokenClassification.register(DLFAConfig, DLFAForTokenClassification, exist_ok=True)
    AutoModelForSequenceClassification.register(DLFAConfig, DLFAForSequenceClassification, exist_ok=True)


register_auto_classes()

from dlfa.modeling.storage import (  # noqa: E402 - needs the registration above
    ConvertResult,
    config_input_error,
    convert_legacy_folder,
    is_model_folder,
    load_dlfa_model,
    save_dlfa_model,
)

__all__ = [
    "HEAD_CLASSES", "ConvertResult", "DLFAConfig", "DLFAConfigError", "DLFAForSequenceClassification",
    "DLFAForTokenClassification", "DLFAModel", "DLFAPreTrainedModel", "config_input_error", "convert_legacy_folder",
    "is_model_folder", "load_dlfa_model", "register_auto_classes", "save_dlfa_model",
]
