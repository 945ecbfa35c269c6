"""dlfa: zero-shot cross-lingual transfer with DLFA feature aggregation.

``import dlfa`` registers the DLFA model classes with transformers' Auto classes, so that after it
``AutoModelForTokenClassification.from_pretrained("run/best")`` builds a DLFA model with dlfa's own code. The
registration waits until transformers' Auto classes are first imported: ``import dlfa`` itself loads neither
torch nor transformers, which keeps the command line quick to refuse a bad option.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import sys

__version__ = "0.1.0"

_AUTO_MODULES = ("transformers.models.auto.configuration_auto", "transformers.models.auto.modeling_auto")


class _RegisterOnAutoImport(importlib.abc.MetaPathFinder):
    """Runs ``dlfa.modeling`` (which registers the classes) right after transformers' Auto models are imported."""

    def find_spec(self, name, path, target=None):
        if name != _AUTO_MODULES[1]:
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        if spec is None or spec.loader is None:
            return spec
        exec_module = spec.loader.exec_module

        def exec_and_register(module) -> None:
            exec_module(module)
            importlib.import_module("dlfa.modeling")

        spec.loader.exec_module = exec_and_register
        return spec


if _AUTO_MODULES[1] in sys.modules:
    importlib.import_module("dlfa.modeling")
elif not any(isinstance(finder, _RegisterOnAutoImport) for finder in sys.meta_path):
    sys.meta_path.insert(0, _RegisterOnAutoImport())
