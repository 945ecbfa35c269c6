"""``dlfa evaluate``: score a finished run's selected model on (other) target languages.

Reads model folders of every dlfa version: Hugging Face folders (config.json of model_type dlfa) and dlfa 0.1
folders (dlfa_config.json), see ``dlfa.modeling.storage``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from dlfa.configs import EvaluateConfig
from dlfa.data.batching import Collator
from dlfa.errors import DlfaInputError
from dlfa.evaluation.evaluate import average, evaluate_examples
from dlfa.io import check_new_output, write_json_atomic
from dlfa.modeling.storage import is_model_folder, load_dlfa_model
from dlfa.reporting.prune import check_weights_present
from dlfa.tasks import get_task


def _load_run_file(run: Path) -> dict[str, Any]:
    path = run / "config.json"
    try:
        saved = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(saved["config"], dict):
            raise TypeError("its 'config' is not an object")
        return saved
    except FileNotFoundError:
        raise DlfaInputError("not a dlfa run folder (config.json missing)", path=run) from None
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise DlfaInputError(f"unreadable run config ({exc})", path=path) from None


def evaluate_run(config: EvaluateConfig) -> dict[str, Any]:
    """Score the selected model of a run (``config.run``) on the languages of a data folder."""
    import torch
    from transformers import AutoTokenizer

    from dlfa.modeling.modeling_xmixup import XMIXUP_CONFIG_NAME

    output = check_new_output(config.output, "--output") if config.output else None
    run = Path(config.run)
    if not run.is_dir():
        raise DlfaInputError(f"folder not found: {run}", option="--run")
    if is_model_folder(run):  # given the model folder itself (a run folder's config.json is not one)
        model_dir, run = run, run.parent
    else:
        model_dir = run / "best"
    check_weights_present(model_dir)  # weights deleted by prune_run: say so, not "file missing"
    run_file = _load_run_file(run)
    saved = run_file["config"]
    # The precision the run evaluated in (bf16 where --mixed-precision auto chose it), so that scores match its
    # metrics.json; runs from before the option: fp32.
    resolved = run_file.get("resolved")
    precision = resolved.get("mixed_precision", "no") if isinstance(resolved, dict) else "no"
    autocast_dtype = {"bf16": torch.bfloat16}.get(precision)
    task = get_task(saved["task"])
    chosen = task.get_scorer(config.scorer if config.scorer is not None else saved.get("scorer"))
    if config.ud_preprocessing is not None and task.name != "udpos":
        raise DlfaInputError(f"applies to UD-POS runs only (this run is {task.name})", option="--ud-preprocessing")
    preprocessing = task.preprocessing_from({**saved, "ud_preprocessing": config.ud_preprocessing}
                                            if config.ud_preprocessing is not None else saved)
    data_dir = Path(config.data_dir) if config.data_dir else Path(saved["data_dir"])
    if not data_dir.is_absolute() and not data_dir.is_dir() and not config.data_dir:
        raise DlfaInputError(f"the run's data folder {data_dir} is relative (saved by an older dlfa) and not found from "
                             "here; give --data-dir", option="--data-dir")
    task.check_data_dir(data_dir)
    langs = task.resolve_languages(data_dir, config.languages, option="--languages")
    examples = {lang: task.read(data_dir, lang, task.eval_split, preprocessing)[:config.max_eval_examples]
                for lang in langs}
    batch_size = config.batch_size

    if (model_dir / XMIXUP_CONFIG_NAME).is_file():
        from dlfa.training.xmixup import evaluate_folder

        model, per_language = evaluate_folder(model_dir, task, data_dir, examples, saved.get("train_language", "en"),
                                              saved["max_length"], batch_size, config.translate_test,
                                              scorer=chosen.name, preprocessing=preprocessing,
                                              autocast_dtype=autocast_dtype)
    else:
        if config.translate_test is not None:
            raise DlfaInputError("mixup inference needs an X-Mixup model", option="--translate-test", path=model_dir)
        model = load_dlfa_model(model_dir)
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        collator = Collator(tokenizer, task.head)
        per_language = {}
        for lang in langs:
            features = task.featurize(examples[lang], tokenizer, saved["max_length"])
            per_language[lang] = evaluate_examples(task, model, examples[lang], features, collator, batch_size,
                                                   desc=f"eval {lang}", scorer=chosen.name,
                                                   autocast_dtype=autocast_dtype)
    metric_names = [k for k, v in next(iter(per_language.values())).items() if isinstance(v, float)]
    result = {
        "task": task.name,
        "model_dir": str(model_dir),
        "fuse_layer": model.config.fuse_layer,
        "scorer": chosen.name,
        "primary_metric": chosen.metric,
        "eval_split": task.eval_split,
        "precision": "bf16" if autocast_dtype is not None else "fp32",
        **({"preprocessing": preprocessing} if preprocessing else {}),
        "data_dir": str(data_dir),
        "languages": per_language,
        "average": {m: average(per_language, m) for m in metric_names},
    }
    if output is not None:
        write_json_atomic(output, result)
    return result
