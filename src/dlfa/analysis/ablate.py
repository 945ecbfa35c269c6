"""``dlfa analyze ablate``: the layer re-initialisation ablation of "First Align, then Predict".

Muller et al. (2021) re-initialise a range of encoder blocks to random weights before fine-tuning and watch
the transfer gap (English score minus the average target score) grow: when the lower blocks are reset the
model can still learn English but loses what made it cross-lingual, which locates the "aligning" part of
the encoder. DLFA's premise is the same picture (lower layers are more language-neutral), so this ablation is
the natural sanity check of where the useful layers of a given encoder are.

Two runs with the same config and seed: ``unablated/`` (the ordinary recipe) and ``reinit-<a>-<b>/`` (the same
recipe with blocks a..b re-initialised right after the model is built), then ``ablation.md``/``ablation.json``
with English score, target average, gap, and the deltas. The re-initialisation follows BERT's scheme (what
``transformers``' ``_init_weights`` does for BERT/XLM-R/e5): Linear and Embedding weights from
N(0, initializer_range), biases 0, LayerNorm (1, 0), drawn from a generator seeded by the run's seed, so the
global random stream, and with it the data order and dropout, is the same in both arms.

Block numbering follows ``hidden_states``: block i produces ``hidden_states[i]``, i in 1..N.

The English score of the gap comes from data that took no part in checkpoint selection. Where the English
evaluation file is also the selection file (PAN-X: ``dev-en.tsv``, since XTREME withheld the test labels),
both arms split the English selection examples by seed: a fraction (``english_holdout``, default 0.5) is
held out and scores English, the rest selects the checkpoint. Elsewhere (UD-POS, XNLI: an English test file)
the English score is the English test file's, as in an ordinary run. ``ablation.md`` says which.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dlfa.errors import DlfaInputError
from dlfa.io import write_json_atomic, write_text_atomic
from dlfa.modeling.modeling_dlfa import encoder_blocks
from dlfa.training.config import TrainConfig
from dlfa.training.recipe import CONFIG_FILE, METRICS_FILE, FinetuneRecipe

logger = logging.getLogger("dlfa")

UNABLATED = "unablated"
DEFAULT_ENGLISH_HOLDOUT = 0.5  # fraction of the English selection examples that scores English instead


def parse_layer_range(text: str, option: str = "--reinit-layers") -> list[int]:
    """'1-4' -> [1, 2, 3, 4]; '2,5-6' -> [2, 5, 6]."""
    layers: list[int] = []
    try:
        for part in filter(None, (p.strip() for p in text.split(","))):
            if "-" in part:
                low, high = (int(v) for v in part.split("-", 1))
                if high < low:
                    raise ValueError
                layers.extend(range(low, high + 1))
            else:
                layers.append(int(part))
    except ValueError:
        raise DlfaInputError(f"expected block numbers like 1-4 or 1,3,5-6, got {text!r}", option=option) from None
    if not layers:
        raise DlfaInputError("no block numbers given", option=option)
    return sorted(set(layers))


def arm_name(layers: Sequence[int]) -> str:
    """'reinit-1-4' for a contiguous range, 'reinit-1_3_5' otherwise (also the method name in metrics.json)."""
    layers = sorted(layers)
    if layers == list(range(layers[0], layers[-1] + 1)):
        return f"reinit-{layers[0]}-{layers[-1]}" if len(layers) > 1 else f"reinit-{layers[0]}"
    return "reinit-" + "_".join(map(str, layers))


def validate_layers(layers: Sequence[int], num_layers: int, option: str = "--reinit-layers") -> None:
    bad = [x for x in layers if not 1 <= x <= num_layers]
    if bad:
        raise DlfaInputError(f"block numbers must be in 1..{num_layers} for a {num_layers}-layer encoder, got {bad[0]}",
                             option=option)


@torch.no_grad()
def reinitialize_layers(encoder: nn.Module, layers: Sequence[int], seed: int, num_layers: int | None = None) -> int:
    """Reset blocks ``layers`` (1-based) of ``encoder`` in place; returns how many tensors were reset.

    In place, so an optimizer built over the parameters before stays valid.
    """
    config = encoder.config
    if num_layers is None:
        from dlfa.modeling.modeling_dlfa import encoder_num_layers

        num_layers = encoder_num_layers(config)
    validate_layers(layers, num_layers)
    std = float(getattr(config, "initializer_range", 0.02) or 0.02)
    blocks = encoder_blocks(encoder, num_layers)
    generator = torch.Generator(device="cpu").manual_seed(seed)
    count = 0
    for index in sorted(layers):
        for module in blocks[index - 1].modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                module.weight.copy_(torch.randn(module.weight.shape, generator=generator) * std)
                count += 1
                if getattr(module, "bias", None) is not None:
                    module.bias.zero_()
                    count += 1
            elif isinstance(module, nn.LayerNorm) or "LayerNorm" in type(module).__name__:
                if getattr(module, "weight", None) is not None:
                    module.weight.fill_(1.0)
                    count += 1
                if getattr(module, "bias", None) is not None:
                    module.bias.zero_()
                    count += 1
    return count


def english_selection_overlap(task: Any, config: TrainConfig) -> list[Path]:
    """The English evaluation files that also feed checkpoint selection (PAN-X: ``dev-en.tsv`` is both)."""
    lang = config.train_language
    evaluated = {p.resolve() for p in task.files(config.data_dir, lang, task.eval_split)}
    selection = {p.resolve() for p in task.files(config.data_dir, lang, config.dev_split)}
    return sorted(evaluated & selection)


def check_english_holdout(value: float, option: str = "--english-holdout") -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < 1:
        raise DlfaInputError(f"must be a fraction strictly between 0 and 1, got {value!r}", option=option)


class EnglishHoldoutRecipe(FinetuneRecipe):
    """The fine-tuning recipe, with English scored on data that took no part in checkpoint selection.

    When the English evaluation file is also the selection file, the selection examples are split by seed:
    ``english_holdout`` of them score English (``metrics.json`` ``languages.en``), the rest select the
    checkpoint. Otherwise nothing changes. ``metrics.json`` ``english_score`` says where the English score
    came from. Both arms of the ablation use it, so they stay alike in everything but the re-initialisation.
    """

    def __init__(self, config: TrainConfig, english_holdout: float = DEFAULT_ENGLISH_HOLDOUT, **kwargs: Any) -> None:
        check_english_holdout(english_holdout)
        super().__init__(config, **kwargs)
        self.english_holdout = float(english_holdout)
        self._english_part: list | None = None
        self.english_score: dict[str, Any] = {}

    def _read_train_and_dev(self) -> tuple[list, list]:
        train, dev = super()._read_train_and_dev()
        cfg = self.config
        if not english_selection_overlap(self.task, cfg):
            return train, dev
        order = list(range(len(dev)))
        random.Random(f"dlfa-english-holdout:{cfg.seed}").shuffle(order)  # str seeds are hashed with SHA-512
        cut = int(round(self.english_holdout * len(dev)))
        if not 1 <= cut < len(dev):
            raise DlfaInputError(f"{len(dev)} English selection examples are too few to hold out an English "
                                 f"test part of {self.english_holdout:g}", option="--english-holdout")
        self._english_part = [dev[i] for i in sorted(order[:cut])]
        return train, [dev[i] for i in sorted(order[cut:])]

    def _features(self, examples: list, language: str, split: str, subset: str) -> list[dict]:
        # The split English examples are other subsets of the file than a plain run's: other cache keys.
        if self._english_part is not None and language == self.config.train_language and subset.startswith(
                ("select:", "eval:")):
            subset = f"{subset}:english-holdout{self.english_holdout:g}-seed{self.config.seed}"
        return super()._features(examples, language, split, subset)

    def _read_eval_examples(self) -> dict[str, list]:
        examples = super()._read_eval_examples()
        lang = self.config.train_language
        if self._english_part is not None and lang in examples:
            examples[lang] = self._english_part[: self.config.max_eval_examples]
        return examples

    def setup(self) -> None:
        super().setup()
        cfg, task = self.config, self.task
        lang = cfg.train_language
        names = ", ".join(p.name for p in task.files(cfg.data_dir, lang, task.eval_split)) or "none"
        if lang not in self.eval_examples:
            self.english_score = {"source": "none", "text": f"no English score (no {lang} {task.eval_split} file "
                                  "evaluated), so no gap"}
        elif self._english_part is not None:
            self.english_score = {
                "source": "held-out", "split": task.eval_split, "files": names,
                "examples": len(self.eval_examples[lang]), "selection_examples": len(self.dev_examples),
                "fraction": self.english_holdout,
                "text": f"{len(self.eval_examples[lang])} {lang} examples of {names} held out by seed from checkpoint "
                        f"selection (fraction {self.english_holdout:g}); the other {len(self.dev_examples)} "
                        "selected the checkpoint",
            }
        else:
            self.english_score = {
                "source": "eval-split", "split": task.eval_split, "files": names,
                "examples": len(self.eval_examples[lang]), "selection_examples": len(self.dev_examples),
                "text": f"the {lang} {task.eval_split} file ({names}), which took no part in checkpoint selection "
                        f"({lang} {cfg.dev_split})",
            }

    def _method_fields(self) -> dict[str, Any]:
        return {**super()._method_fields(), "english_score": self.english_score}


class AblationRecipe(EnglishHoldoutRecipe):
    """The fine-tuning recipe with some encoder blocks re-initialised before training.

    Uses the recipe's ``_build_model`` hook (re-initialise the new model before the optimizer is built) and
    ``_method_fields`` (the method name in metrics.json). On a recipe without those hooks it falls back to
    re-initialising in place right after ``setup`` (the optimizer built by setup stays valid: same tensors,
    AdamW state still empty) and to rewriting metrics.json. A resumed run loads its checkpoint over these
    weights in ``train``, as it should.
    """

    def __init__(self, config: TrainConfig, reinit_layers: Sequence[int], **kwargs: Any) -> None:
        super().__init__(config, **kwargs)
        self.reinit_layers = sorted(set(reinit_layers))
        self.method = arm_name(self.reinit_layers)
        self._reinitialized = False

    def _reinitialize(self, model: nn.Module) -> None:
        count = reinitialize_layers(model.encoder, self.reinit_layers, self.config.seed)
        self._reinitialized = True
        logger.info("re-initialised encoder blocks %s (%d tensors)", ",".join(map(str, self.reinit_layers)), count)

    def _build_model(self, dlfa_config: Any) -> nn.Module:
        model = super()._build_model(dlfa_config)
        self._reinitialize(model)
        return model

    def _method_fields(self) -> dict[str, Any]:
        # A method of its own, so that `dlfa report` never averages ablated with unablated runs.
        return {**super()._method_fields(), "method": self.method, "fuse_layer": self.config.fuse_layer,
                "reinit_layers": self.reinit_layers}

    def setup(self) -> None:
        super().setup()
        if not self._reinitialized:  # a recipe without the _build_model hook
            self._reinitialize(self.accelerator.unwrap_model(self.model))

    def _write_config(self) -> None:
        super()._write_config()
        if self.accelerator.is_main_process:
            path = self.output_dir / CONFIG_FILE
            data = json.loads(path.read_text(encoding="utf-8"))
            data["ablation"] = {"reinit_layers": self.reinit_layers, "method": self.method,
                                "init": "N(0, initializer_range) Linear/Embedding, zero bias, LayerNorm (1, 0)"}
            write_json_atomic(path, data)

    def evaluate(self) -> dict[str, Any]:
        result = super().evaluate()
        if result and result.get("method") != self.method:  # a recipe without the _method_fields hook
            result.update(self._method_fields())
            write_json_atomic(self.output_dir / METRICS_FILE, result)
        return result


# -- the comparison ------------------------------------------------------------------------------------------------


def transfer_summary(result: dict[str, Any], train_language: str = "en") -> dict[str, Any]:
    """English score, target average (every other language) and the gap, on the primary metric."""
    metric = result["primary_metric"]
    scores = {lang: m[metric] for lang, m in result["languages"].items()}
    targets = {lang: v for lang, v in scores.items() if lang != train_language}
    en = scores.get(train_language)
    target_avg = sum(targets.values()) / len(targets) if targets else None
    gap = en - target_avg if en is not None and target_avg is not None else None
    return {"metric": metric, "scorer": result.get("scorer"), "en": en, "target_average": target_avg, "gap": gap,
            "languages": scores, "seed": result.get("seed"), "method": result.get("method"),
            "english_score": result.get("english_score")}


def _fmt(value: float | None, signed: bool = False) -> str:
    from dlfa.reporting.tables import format_score

    return format_score(value, signed=signed)


def _delta(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else a - b


def comparison(unablated: dict[str, Any], ablated: dict[str, Any], name: str, command: str,
               config: TrainConfig) -> tuple[str, dict[str, Any]]:
    """Markdown and JSON comparing the two arms."""
    from dlfa.reporting.tables import markdown_table

    base, abl = transfer_summary(unablated, config.train_language), transfer_summary(ablated, config.train_language)
    metric = base["metric"]
    rows = [
        [UNABLATED, _fmt(base["en"]), _fmt(base["target_average"]), _fmt(base["gap"]), "", "", ""],
        [name, _fmt(abl["en"]), _fmt(abl["target_average"]), _fmt(abl["gap"]),
         _fmt(_delta(abl["en"], base["en"]), True), _fmt(_delta(abl["target_average"], base["target_average"]), True),
         _fmt(_delta(abl["gap"], base["gap"]), True)],
    ]
    headers = ["arm", f"en {metric}", "targets avg", "gap (en − targets)", "Δ en", "Δ targets", "Δ gap"]
    langs = sorted(set(base["languages"]) | set(abl["languages"]), key=lambda lang: (lang != "en", lang))
    per_lang = [[lang, _fmt(base["languages"].get(lang)), _fmt(abl["languages"].get(lang)),
                 _fmt(_delta(abl["languages"].get(lang), base["languages"].get(lang)), True)] for lang in langs]
    targets = [lang for lang in langs if lang != config.train_language]
    english = (base.get("english_score") or {}).get("text", "not recorded")
    md = "\n".join([
        f"# Layer re-initialisation ablation: {name}",
        "",
        f"Command: `{command}`  ",
        f"Task {config.task}, model {config.model}, fused layer {config.fuse_layer}; both arms: seed {config.seed}, "
        "same config and data order.  ",
        "Seeds: one per arm (n = 1), so no spread is estimated: compare with the seed spread of `dlfa report` "
        "before reading much into small deltas.  ",
        f"Targets: {', '.join(targets) or 'none'} (average over these; the gap is en minus that average).  ",
        f"English score: {english}.  ",
        f"Scorer: {base.get('scorer') or 'not recorded'} (metric {metric}).",
        "",
        markdown_table(headers, rows),
        "",
        markdown_table(["language", UNABLATED, name, "Δ"], per_lang),
        "",
    ])
    data = {"command": command, "task": config.task, "model": config.model, "seed": config.seed,
            "fuse_layer": config.fuse_layer, "metric": metric, "scorer": base.get("scorer"),
            "english_score": base.get("english_score"), "arms": {UNABLATED: base, name: abl},
            "delta": {"en": _delta(abl["en"], base["en"]),
                      "target_average": _delta(abl["target_average"], base["target_average"]),
                      "gap": _delta(abl["gap"], base["gap"])}}
    return md, data


def run_ablation(config: TrainConfig, reinit_layers: Sequence[int], output: str | Path, overwrite: bool = False,
                 resume: bool = False, command: str = "", show_progress: bool = True,
                 english_holdout: float = DEFAULT_ENGLISH_HOLDOUT) -> dict[str, Any]:
    """Train both arms (same seed) and write ablation.md / ablation.json into ``output``.

    ``english_holdout`` (``--english-holdout``): the fraction of English selection examples that scores English
    when the English evaluation file is the selection file (see the module docstring).
    """
    check_english_holdout(english_holdout)
    from transformers import AutoConfig

    from dlfa.modeling.modeling_dlfa import encoder_num_layers
    from dlfa.training.recipe import resolve_model

    output = Path(output)
    layers = sorted(set(reinit_layers))
    try:
        num_layers = encoder_num_layers(AutoConfig.from_pretrained(resolve_model(config.model)))
    except OSError as exc:
        raise DlfaInputError(f"cannot load model {config.model!r}: {str(exc).splitlines()[0]}",
                             option="--model") from None
    validate_layers(layers, num_layers)
    if config.languages and config.languages != ["all"] and config.train_language not in config.languages:
        # The gap needs the English score.
        config = dataclasses.replace(config, languages=[config.train_language, *config.languages])
    if output.exists() and any(output.iterdir()) and not (overwrite or resume):
        raise DlfaInputError(f"{output} exists and is not empty (pass --overwrite, or --resume)", option="--output")
    name = arm_name(layers)
    results = {}
    for arm in (UNABLATED, name):
        arm_config = dataclasses.replace(config, output_dir=str(output / arm))
        logger.info("ablation arm %s -> %s", arm, arm_config.output_dir)
        if arm == UNABLATED:
            recipe = EnglishHoldoutRecipe(arm_config, english_holdout, overwrite=overwrite, resume=resume,
                                          show_progress=show_progress)
        else:
            recipe = AblationRecipe(arm_config, layers, english_holdout=english_holdout, overwrite=overwrite,
                                    resume=resume, show_progress=show_progress)
        results[arm] = recipe.run()
    md, data = comparison(results[UNABLATED], results[name], name, command, config.with_task_defaults())
    data["reinit_layers"] = layers
    data["runs"] = {arm: str(output / arm) for arm in results}
    write_text_atomic(output / "ablation.md", md)
    write_json_atomic(output / "ablation.json", data)
    return {"markdown": md, **data}
