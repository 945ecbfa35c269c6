"""``dlfa evaluate``: score a finished run's selected model on (other) target languages."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from dlfa.data.batching import Collator
from dlfa.errors import DlfaInputError
from dlfa.evaluation.evaluate import average, evaluate_examples
from dlfa.io import write_json_atomic
from dlfa.modeling.modeling_dlfa import DLFA_CONFIG_NAME, DLFAModel
from dlfa.tasks import get_task


def _load_run_config(run: Path) -> dict[str, Any]:
    path = run / "config.json"
    try:
        return json.loads(path.read_text(encoding="utf-8"))["config"]
    except FileNotFoundError:
        raise DlfaInputError("not a dlfa run folder (config.json missing)", path=run) from None
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise DlfaInputError(f"unreadable run config ({exc})", path=path) from None


def evaluate_run(
    run: str | Path,
    data_dir: str | None = None,
    languages: list[str] | None = None,
    batch_size: int = 64,
    max_examples: int | None = None,
    output: str | None = None,
    translate_test: str | None = None,
) -> dict[str, Any]:
    """Score ``run``'s selected model; an X-Mixup model is scored by :func:`dlfa.training.xmixup.evaluate_folder`
    (its tagging head pools sub-words), with mixup inference for the languages ``translate_test`` has files for."""
    from transformers import AutoTokenizer

    from dlfa.modeling.modeling_xmixup import XMIXUP_CONFIG_NAME

    run = Path(run)
    if (run / DLFA_CONFIG_NAME).is_file():  # given the model folder itself
        model_dir, run = run, run.parent
    else:
        model_dir = run / "best"
    if not run.is_dir():
        raise DlfaInputError("run folder not found", path=run)
    config = _load_run_config(run)
    task = get_task(config["task"])
    data_dir = data_dir or config["data_dir"]
    langs = task.resolve_languages(data_dir, languages, option="--languages")
    examples = {lang: task.read(data_dir, lang, task.eval_split)[:max_examples] for lang in langs}

    if (model_dir / XMIXUP_CONFIG_NAME).is_file():
        from dlfa.training.xmixup import evaluate_folder

        model, per_language = evaluate_folder(model_dir, task, data_dir, examples, config.get("train_language", "en"),
                                              config["max_length"], batch_size, translate_test)
    else:
        if translate_test is not None:
            raise DlfaInputError("mixup inference needs an X-Mixup model", option="--translate-test", path=model_dir)
        model = DLFAModel.from_pretrained(model_dir)
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        collator = Collator(tokenizer, task.head)
        per_language = {}
        for lang in langs:
            features = task.featurize(examples[lang], tokenizer, config["max_length"])
            per_language[lang] = evaluate_examples(task, model, examples[lang], features, collator, batch_size,
                                                   desc=f"eval {lang}")
    metric_names = [k for k, v in next(iter(per_language.values())).items() if isinstance(v, float)]
    result = {
        "task": task.name,
        "model_dir": str(model_dir),
        "fuse_layer": model.config.fuse_layer,
        "primary_metric": task.primary_metric,
        "eval_split": task.eval_split,
        "data_dir": str(data_dir),
        "languages": per_language,
        "average": {m: average(per_language, m) for m in metric_names},
    }
    if output:
        write_json_atomic(output, result)
    return result
