"""X-Mixup options that TrainConfig does not hold yet (light module: no torch at import time).

The lead moves these fields into TrainConfig (flags ``--xmixup-back-translation``, ``--xmixup-translate-test``,
``--xmixup-teacher``, ``--xmixup-entropy``); until then :meth:`XMixupOptions.from_config` reads them from a config
object with ``getattr(config, name, default)``, and ``XMixupRecipe(config, options=...)`` takes them directly.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, fields
from typing import Any, Literal

from dlfa.errors import DlfaInputError

_LANGUAGE_FILE = re.compile(r"(?P<lang>[a-z]{2,3})=(?P<path>.+)")


@dataclass
class XMixupOptions:
    xmixup_back_translation: list[str] | None = field(default=None, metadata={"help": (
        "English back-translations of the targets, LANG=FILE per parallel language (line i back-translates the "
        "target of that language's pair i): scheduled sampling trains on them instead of the gold English source "
        "with probability 1 - p(step). Without them every batch uses the gold source.")})
    xmixup_translate_test: str | None = field(default=None, metadata={"help": (
        "folder of translate-test files (<split>-<lang>-en-translated.tsv, <lang>.tsv or <lang>.txt; line i "
        "translates evaluation example i into English): those languages are scored with mixup inference, the "
        "others target-only (metrics.json says which); English is mixed with itself.")})
    xmixup_teacher: str | None = field(default=None, metadata={"help": (
        "tagging: a fine-tuned dlfa model folder whose label distributions become the soft labels of target "
        "sentences given without labels (the authors' translate-train-logits)")})
    xmixup_entropy: Literal["authors", "masked"] = field(default="authors", metadata={"help": (
        "attention entropy behind lambda: authors (their formula over every position of rows padded to "
        "--max-length, as their 128-token features) or masked (the exact entropy over real tokens; batches padded "
        "dynamically, faster, another lambda)")})

    def __post_init__(self) -> None:
        if self.xmixup_entropy not in ("authors", "masked"):
            raise DlfaInputError(f"must be authors or masked, got {self.xmixup_entropy!r}", option="--xmixup-entropy")
        for name in ("xmixup_translate_test", "xmixup_teacher"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value.strip()):
                raise DlfaInputError(f"must be a folder, got {value!r}", option="--" + name.replace("_", "-"))
        if self.xmixup_back_translation is not None:
            seen: set[str] = set()
            for spec in self.xmixup_back_translation:
                match = _LANGUAGE_FILE.fullmatch(spec.strip()) if isinstance(spec, str) else None
                if match is None:
                    raise DlfaInputError(f"expected LANG=FILE, got {spec!r}", option="--xmixup-back-translation")
                if match["lang"] in seen:
                    raise DlfaInputError(f"{match['lang']!r} given twice", option="--xmixup-back-translation")
                seen.add(match["lang"])

    @property
    def back_translation_files(self) -> dict[str, str]:
        return {m["lang"]: m["path"] for m in (_LANGUAGE_FILE.fullmatch(s.strip())
                                               for s in self.xmixup_back_translation or [])}

    @classmethod
    def from_config(cls, config: Any) -> XMixupOptions:
        """The options a config object carries (fields TrainConfig does not have yet take their defaults)."""
        return cls(**{f.name: getattr(config, f.name, f.default) for f in fields(cls)})

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}
