"""The model card (``best/README.md``) of a finished run, written from its ``metrics.json`` and ``config.json``.

The card says what the model is (base encoder, fused layer, gate settings, head, labels), what it was trained and
selected on, its English-dev score and its zero-shot score per language (named by scorer), the seed, the command
and the versions that produced it, how to load it, and the licences of the data behind it. The recipe writes it
after ``metrics.json``; :func:`write_model_card` rewrites it for any finished run.
"""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path
from typing import Any

from dlfa.errors import DlfaInputError
from dlfa.io import write_text_atomic

CARD_NAME = "README.md"

# The licences of each task's official sources (what `dlfa download` fetches), for data not in a MANIFEST.tsv.
OFFICIAL_LICENCES = {
    "udpos": "Universal Dependencies v2.5 treebanks: each treebank has its own licence, stated in its LICENSE.txt "
             "(most are CC BY-SA 4.0 or 3.0; several are non-commercial, CC BY-NC-SA).",
    "panx": "WikiANN (Pan et al., 2017) with the splits of Rahimi et al. (2019), as used by XTREME: annotations "
            "derived automatically from Wikipedia (text under CC BY-SA); the release states no licence of its own, "
            "so check its terms before redistributing.",
    "xnli": "XNLI 1.0 (Conneau et al., 2018): CC BY-NC 4.0 (non-commercial). Its English training data, MultiNLI, "
            "is mostly under the OANC's permissive licence, with some genres under CC BY-SA 3.0 and other "
            "permissive licences (see the MultiNLI data description).",
    "pawsx": "PAWS-X (Yang et al., 2019): may be freely used for any purpose; acknowledging Google LLC as the source "
             "is appreciated.",
}
_LANGUAGE_CODE = re.compile(r"[a-z]{2,3}")


def _read(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DlfaInputError("not a finished run (file missing)", path=path) from None
    except (OSError, ValueError) as exc:
        raise DlfaInputError(f"unreadable ({' '.join(str(exc).split())})", path=path) from None
    if not isinstance(data, dict):
        raise DlfaInputError("unreadable (not a JSON object)", path=path)
    return data


def _number(value: Any) -> str:
    return f"{value:.2f}" if isinstance(value, (int, float)) and not isinstance(value, bool) else "-"


def _manifest_licences(data_dir: Path, files: list[Path]) -> dict[str, list[str]] | None:
    """licence -> file names, from the MANIFEST.tsv beside or above the data folder (None: no manifest)."""
    for folder in (data_dir, data_dir.parent):
        manifest = folder / "MANIFEST.tsv"
        if not manifest.is_file():
            continue
        try:
            with manifest.open(encoding="utf-8", newline="") as handle:
                rows = {row.get("file", ""): row for row in csv.DictReader(handle, delimiter="\t")}
        except (OSError, UnicodeDecodeError, csv.Error):
            return None
        licences: dict[str, list[str]] = {}
        for path in files:
            try:
                key = path.resolve().relative_to(folder.resolve()).as_posix()
            except ValueError:
                key = path.name
            row = rows.get(key)
            licence = (row.get("license_as_stated") or "").strip() if row else ""
            label = licence or ("not stated in MANIFEST.tsv" if row else "not listed in MANIFEST.tsv")
            licences.setdefault(label, []).append(path.name)
        return licences
    return None


def _data_files(task: Any, train_config: dict[str, Any], languages: list[str]) -> list[Path]:
    data_dir = train_config.get("data_dir") or ""
    train_language = train_config.get("train_language", "en")
    files: list[Path] = []
    for language, split in [(train_language, train_config.get("train_split", "train")),
                            (train_language, train_config.get("dev_split", "dev"))] + [
            (lang, task.eval_split) for lang in languages]:
        try:
            files.extend(p for p in task.files(data_dir, language, split) if p not in files)
        except OSError:
            continue
    return files


def model_card(run_dir: str | Path) -> str:
    """The Markdown card of a finished run (its metrics.json, config.json and best/config.json)."""
    from dlfa.tasks import get_task

    run_dir = Path(run_dir)
    metrics = _read(run_dir / "metrics.json")
    run = _read(run_dir / "config.json")
    train = run.get("config", {}) if isinstance(run.get("config"), dict) else {}
    resolved = run.get("resolved", {}) if isinstance(run.get("resolved"), dict) else {}
    versions = run.get("versions", {}) if isinstance(run.get("versions"), dict) else {}
    model_config = _read(run_dir / "best" / "config.json")
    encoder = model_config.get("encoder") if isinstance(model_config.get("encoder"), dict) else model_config

    task = get_task(metrics.get("task", train.get("task", "")))
    languages = list(metrics.get("languages", {}))
    primary = metrics.get("primary_metric", task.primary_metric)
    fuse_layer = metrics.get("fuse_layer", model_config.get("fuse_layer"))
    method = metrics.get("method", "dlfa" if fuse_layer is not None else "baseline")
    base = train.get("model") or model_config.get("encoder_name") or "?"
    num_layers = encoder.get("num_hidden_layers") or encoder.get("n_layers") or resolved.get("num_layers")
    hidden = encoder.get("hidden_size") or encoder.get("dim")
    row = {"baseline": "baseline (the head reads the last layer)",
           "dlfa": f"DLFA D_{fuse_layer}", "xmixup": "X-Mixup" + (f" + DLFA D_{fuse_layer}" if fuse_layer else "")
           }.get(method, f"{method}+D_{fuse_layer}" if fuse_layer is not None else method)  # variants: gate-baseline+D_8
    selection = metrics.get("selection", {}) if isinstance(metrics.get("selection"), dict) else {}
    labels = [model_config.get("id2label", {})[k] for k in sorted(model_config.get("id2label", {}), key=int)]
    pipeline_tag = "token-classification" if task.head == "token" else "text-classification"

    front = ["---", "library_name: transformers", f"pipeline_tag: {pipeline_tag}",
             f"tags: [dlfa, zero-shot-cross-lingual-transfer, {task.name}]"]
    train_language = selection.get("language", train.get("train_language", "en"))
    codes = [lang for lang in dict.fromkeys([train_language, *languages]) if _LANGUAGE_CODE.fullmatch(lang)]
    if codes:
        front.append(f"language: [{', '.join(codes)}]")
    if "/" in base and not Path(base).exists() and not base.startswith("embedded:"):
        front.append(f"base_model: {base}")
    front.append("---")

    out = front + ["", f"# {row} on `{base}` for {task.name} (zero-shot cross-lingual transfer)", ""]
    mix = metrics.get("xmixup") if isinstance(metrics.get("xmixup"), dict) else None
    if mix is None:
        trained_on = (f"Fine-tuned on {train_language} {task.name} and applied unchanged to the other languages: no "
                      "target-language label was used in training or in checkpoint selection. ")
    else:
        trained_on = (f"Fine-tuned on {train_language} {task.name} with X-Mixup (Yang et al., 2022) on parallel pairs "
                      f"with {', '.join(map(str, mix.get('parallel') or []))} (translations; see metrics.json for "
                      f"which sides carry labels); checkpoint selection used {train_language} only. ")
    out.append(
        trained_on
        + ("DLFA (Chen et al., 2022) fuses encoder layer "
           f"{fuse_layer} into the last layer through an attentional gate (AIF) and the head reads the fused "
           "representation." if fuse_layer is not None else "The head reads the encoder's last layer.")
        + f" Trained with dlfa {versions.get('dlfa', '?')}.")
    gate = (f"r = {model_config.get('reduction')}, norm {model_config.get('aif_norm')} "
            f"({model_config.get('aif_norm_placement', 'bottleneck')}), gate start "
            f"{model_config.get('gate_init', 'average')}") if fuse_layer is not None else "none (baseline)"
    head = ("a tag per word, predicted on its first sub-token that carries characters"
            if task.head == "token" else "one label per sentence pair, from the first token ([CLS]/<s>)")
    out += ["", "## Model", "", "| | |", "|---|---|",
            f"| base encoder | `{base}` ({encoder.get('model_type', '?')}, {num_layers} layers, hidden size "
            f"{hidden}) |",
            f"| method | {row} |",
            f"| fused layer | {fuse_layer if fuse_layer is not None else 'none'} of {num_layers} |",
            f"| AIF gate | {gate} |",
            f"| head | {head} |",
            f"| labels | {len(labels)}: {', '.join(labels)} |"]
    if mix is not None:
        out.append(f"| X-Mixup | mixing blocks {mix.get('layers')}, alpha {mix.get('alpha')}, schedule "
                   f"{mix.get('schedule')}; the mixers (`xmixup.safetensors`) serve only inference with a source "
                   "translation (dlfa's `XMixupModel`); transformers loads the target-only model |")

    out += ["", "## Training data", "",
            f"* Task: {task.name} (`{train.get('data_dir', '?')}`), trained on {train_language} "
            f"`{train.get('train_split', 'train')}`"
            + (f", first {train['max_train_examples']} examples" if train.get("max_train_examples") else "")
            + f" ({resolved.get('train_features', '?')} features of at most {train.get('max_length', '?')} sub-tokens).",
            f"* Checkpoint selection: {train_language} `{selection.get('split', train.get('dev_split', 'dev'))}`"
            + (" (held out of the training file by seed)" if selection.get("held_out_from_training_file") else "")
            + f", {primary}; best at step {selection.get('best_step', '?')} of {resolved.get('total_steps', '?')}.",
            f"* Optimisation: {_length(train, resolved)}, learning rate {train.get('learning_rate', '?')}, "
            f"batch size {train.get('batch_size', '?')}, seed {metrics.get('seed', train.get('seed', '?'))}."]

    out += ["", "## Results", "",
            f"English-dev ({train_language} `{selection.get('split', 'dev')}`) {primary}: "
            f"**{_number(selection.get('best_score'))}** (the only selection signal).", "",
            f"Zero-shot {primary} on `{metrics.get('eval_split', task.eval_split)}` (scorer "
            f"`{metrics.get('scorer') or train.get('scorer') or task.get_scorer(None).name}`, dlfa's {task.name} "
            f"{primary}, in percent):", "",
            f"| language | {primary} |", "|---|---|"]
    leaky = set(metrics.get("leaky_languages") or [])
    for lang, scores in metrics.get("languages", {}).items():
        mark = " (leaky: see dlfa's honest-evaluation rules)" if lang in leaky else ""
        mark += " (training language)" if lang == train_language else ""
        out.append(f"| {lang}{mark} | {_number(scores.get(primary) if isinstance(scores, dict) else None)} |")
    averages = metrics.get("average_zero_shot", {}) or {}
    out += [f"| **average, zero-shot languages** | {_number(averages.get(primary))} |",
            f"| average, all evaluated | {_number((metrics.get('average') or {}).get(primary))} |"]
    out += ["", f"One run, seed {metrics.get('seed', train.get('seed', '?'))}; other seeds of a sweep are separate "
                "models. Scores of one seed vary; compare rows over seeds (`dlfa report`)."]

    command = run.get("command") or "?"
    version_text = ", ".join(f"{k} {v}" for k, v in versions.items())
    out += ["", "## Reproduce", "", "```bash", command, "```", "", f"Versions: {version_text}."]

    out += ["", "## Use", "", "```python",
            "from transformers import pipeline",
            "# trust_remote_code runs modeling_dlfa.py from this folder; with dlfa installed (import dlfa.modeling)",
            "# the registered classes are used instead.",
            f'pipe = pipeline("{pipeline_tag}", model="path/or/hub-id", trust_remote_code=True'
            + (', aggregation_strategy="first")' if task.head == "token" else ")"),
            "```"]
    if task.head == "token":
        out += ["", "dlfa's word-level tags (one per word, as its evaluation scores them) from the pipeline: "
                    "`dlfa.modeling.pipelines.tag_words(pipe, [words, ...])`, which gives the words pre-split "
                    "and expands the pipeline's entity groups."]

    out += ["", "## Data licences", ""]
    data_dir = Path(train.get("data_dir") or ".")
    licences = _manifest_licences(data_dir, _data_files(task, train, languages)) if train.get("data_dir") else None
    if licences:
        out.append(f"Files read by this run, with the licences stated in `{data_dir.name}`'s MANIFEST.tsv:")
        out.append("")
        for licence, names in sorted(licences.items()):
            out.append(f"* {licence}: {', '.join(names)}")
        out.append("")
    out.append(f"Official sources: {OFFICIAL_LICENCES.get(task.name, 'see the task data documentation.')}")
    out.append("The model's weights are derived from this data and from the base encoder, whose own licence "
               "applies as well.")
    return "\n".join(out) + "\n"


def write_model_card(run_dir: str | Path) -> Path:
    """Write ``run_dir/best/README.md`` (atomically) and return its path."""
    run_dir = Path(run_dir)
    path = run_dir / "best" / CARD_NAME
    if not path.parent.is_dir():
        raise DlfaInputError("run folder has no saved model (best/ missing)", path=run_dir)
    write_text_atomic(path, model_card(run_dir))
    return path


def _length(train: dict, resolved: dict) -> str:
    """How long the run trained: the optimizer steps it took (``max_steps`` wins over ``epochs``)."""
    steps = resolved.get("total_steps")
    if train.get("max_steps"):
        return f"{train['max_steps']} optimizer steps (--max-steps)"
    return f"{train.get('epochs', '?')} epochs" + (f" ({steps} optimizer steps)" if steps else "")
