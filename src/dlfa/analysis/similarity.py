"""``dlfa analyze similarity``: how language-neutral each layer is, on parallel sentences.

DLFA fuses the last layer with a lower one because lower layers are thought to be more language-neutral. This
analysis measures that directly: sentence i of the English file and sentence i of the target-language file are
translations of each other, so per layer we compare their representations

* by the **average cosine similarity** of each English sentence with its translation (a per-pair measure;
  the report gives its standard deviation over sentences as the spread), and
* by **linear CKA** (Kornblith et al. 2019) between the English and the target matrix of sentence
  representations, as in "First Align, then Predict" (Muller et al. 2021): a set-level measure, invariant to
  orthogonal transforms and isotropic scaling, so it compares geometry rather than coordinates.

A sentence representation is the mean of a layer's hidden states over the sentence's real tokens (padding
and the tokenizer's special tokens such as [CLS]/[SEP] or <s>/</s> are left out). Layers are numbered as in
transformers and DLFA: 0 is the embedding output, i the output of block i (1..N). For a DLFA run with a fused
layer, the fused representation the task head reads is an extra row, ``fused``.

Parallel data: XNLI and PAWS-X dev/test files are line-parallel translations (the first text of each pair is
used); UD's PUD treebanks (``<lang>_pud-ud-<split>.conllu``) are sentence-parallel (their ``# text`` lines are
used). The analysis is deterministic (eval mode, no sampling), so it has no seed.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dlfa.errors import DlfaInputError
from dlfa.io import write_json_atomic, write_text_atomic

PAIR_TASKS = ("xnli", "pawsx")
PUD_TASKS = ("udpos",)

# -- the measures --------------------------------------------------------------------------------------------------


def linear_cka(x: np.ndarray, y: np.ndarray) -> float:
    """Linear CKA between two (n, d1) and (n, d2) representation matrices of the same n inputs.

    CKA = ||Y_c^T X_c||_F^2 / (||X_c^T X_c||_F ||Y_c^T Y_c||_F) with column-centred X_c, Y_c. The n x n Gram
    form (same value) is used when n is smaller than the dimensions, which is cheaper. NaN when one matrix is
    constant (its centred form is zero).
    """
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    if x.ndim != 2 or y.ndim != 2 or x.shape[0] != y.shape[0]:
        raise ValueError(f"expected two matrices with the same number of rows, got {x.shape} and {y.shape}")
    x = x - x.mean(axis=0, keepdims=True)
    y = y - y.mean(axis=0, keepdims=True)
    if x.shape[0] < min(x.shape[1], y.shape[1]):
        k, l_ = x @ x.T, y @ y.T
        hsic, norm_x, norm_y = float((k * l_).sum()), float(np.linalg.norm(k)), float(np.linalg.norm(l_))
    else:
        hsic = float(np.linalg.norm(y.T @ x) ** 2)
        norm_x, norm_y = float(np.linalg.norm(x.T @ x)), float(np.linalg.norm(y.T @ y))
    if norm_x == 0.0 or norm_y == 0.0:
        return math.nan
    return hsic / (norm_x * norm_y)


def pairwise_cosine(x: np.ndarray, y: np.ndarray, eps: float = 1e-12) -> np.ndarray:
    """Cosine similarity of row i of x with row i of y, for every i."""
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    if x.shape != y.shape:
        raise ValueError(f"expected matrices of the same shape, got {x.shape} and {y.shape}")
    num = (x * y).sum(axis=1)
    den = np.maximum(np.linalg.norm(x, axis=1) * np.linalg.norm(y, axis=1), eps)
    return num / den


def mean_cosine(x: np.ndarray, y: np.ndarray) -> float:
    return float(pairwise_cosine(x, y).mean())


# -- parallel sentences ------------------------------------------------------------------------------------------


def _pud_file(data_dir: Path, lang: str, split: str) -> Path:
    matches = sorted(data_dir.glob(f"{lang}_pud-ud-{split}.conllu"))
    if not matches:
        have = sorted(p.name.split("_pud")[0] for p in data_dir.glob(f"*_pud-ud-{split}.conllu"))
        raise DlfaInputError(
            f"no parallel UD file {lang}_pud-ud-{split}.conllu (PUD languages here: {', '.join(have) or 'none'})",
            path=data_dir,
        )
    return matches[0]


def read_pud_sentences(path: Path) -> list[str]:
    """The sentences of a CoNLL-U file: its ``# text =`` lines, else the word forms joined by spaces."""
    from dlfa.tasks.base import read_lines

    sentences: list[str] = []
    text: str | None = None
    words: list[str] = []

    def flush() -> None:
        nonlocal text, words
        if text is not None or words:
            sentences.append(text if text is not None else " ".join(words))
        text, words = None, []

    for number, line in read_lines(path):
        line = line.rstrip("\r\n")
        if not line.strip():
            flush()
        elif line.startswith("# text ="):
            text = line.split("=", 1)[1].strip()
        elif line.startswith("#"):
            continue
        else:
            fields = line.split("\t")
            if len(fields) < 2:
                raise DlfaInputError(f"expected 10 tab-separated columns, found {len(fields)}", path=path, line=number)
            if fields[0].isdigit():
                words.append(fields[1])
    flush()
    if not sentences:
        raise DlfaInputError("no sentences", path=path)
    return sentences


def read_parallel(
    task_name: str, data_dir: str | Path, languages: Sequence[str], split: str = "test",
    max_sentences: int | None = None, pivot: str = "en",
) -> dict[str, list[str]]:
    """``{language: sentences}`` for the pivot and every target, aligned by index; checked to be parallel."""
    from dlfa.tasks import get_task

    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise DlfaInputError("data folder not found", path=data_dir)
    texts: dict[str, list[str]] = {}
    wanted = [pivot] + [lang for lang in languages if lang != pivot]
    if task_name in PAIR_TASKS:
        task = get_task(task_name)
        for lang in wanted:
            texts[lang] = [pair.text_a for pair in task.read(data_dir, lang, split)]
        where = f"{task_name} {split}"
    elif task_name in PUD_TASKS:
        get_task(task_name)
        for lang in wanted:
            texts[lang] = read_pud_sentences(_pud_file(data_dir, lang, split))
        where = f"PUD {split}"
    else:
        raise DlfaInputError(f"no parallel data for task {task_name!r}; use one of "
                             f"{', '.join(PAIR_TASKS + PUD_TASKS)}", option="--task")
    n = len(texts[pivot])
    for lang in wanted[1:]:
        if len(texts[lang]) != n:
            raise DlfaInputError(f"the {where} files are not parallel: {lang} has {len(texts[lang])} sentences, "
                                 f"{pivot} has {n}", path=data_dir)
    if max_sentences is not None:
        texts = {lang: items[:max_sentences] for lang, items in texts.items()}
    return texts


# -- models --------------------------------------------------------------------------------------------------------


@dataclass
class AnalysisModel:
    """What the analysis needs of a model: a tokenizer and a function giving all hidden states (and fused)."""

    model: Any  # a DLFA model (a plain encoder is wrapped as a baseline DLFAModel, the encoder alone)
    tokenizer: Any
    num_layers: int
    fuse_layer: int | None
    description: str


def load_analysis_model(model_or_run: str, device: str | torch.device = "cpu") -> AnalysisModel:
    """A run folder (its best/ model), a saved DLFA model folder, or a pretrained encoder name/folder."""
    from transformers import AutoTokenizer

    from dlfa.modeling.modeling_dlfa import DLFAConfig, DLFAModel, DLFAWeightsError, load_encoder
    from dlfa.modeling.storage import is_model_folder, load_dlfa_model

    path = Path(model_or_run)
    folder = None
    if is_model_folder(path):
        folder, description = path, f"DLFA model {path}"
    elif is_model_folder(path / "best"):
        folder, description = path / "best", f"run {path} (best/ model)"
    elif (path / "metrics.json").is_file() or (path / "train.log").is_file():
        raise DlfaInputError("run folder has no saved model (best/ missing)", path=path)
    if folder is not None:
        model = load_dlfa_model(folder, device=device)
        tokenizer = AutoTokenizer.from_pretrained(folder)
    else:
        from dlfa.training.recipe import resolve_model

        resolved = resolve_model(model_or_run)
        try:
            encoder = load_encoder(resolved)
            tokenizer = AutoTokenizer.from_pretrained(resolved)
        except (OSError, ValueError, DLFAWeightsError) as exc:
            raise DlfaInputError(f"cannot load model {model_or_run!r}: {str(exc).splitlines()[0]}",
                                 option="--model") from None
        model = DLFAModel(DLFAConfig(encoder=encoder.config, encoder_name=model_or_run), encoder=encoder).to(device)
        description = f"pretrained encoder {model_or_run}"
    model.eval()
    return AnalysisModel(model, tokenizer, model.num_layers, model.config.fuse_layer, description)


def layer_names(loaded: AnalysisModel) -> list[str]:
    names = [str(i) for i in range(loaded.num_layers + 1)]
    return names + (["fused"] if loaded.fuse_layer is not None else [])


@torch.no_grad()
def sentence_representations(
    loaded: AnalysisModel, sentences: Sequence[str], batch_size: int = 32, max_length: int = 128,
    desc: str | None = None,
) -> dict[str, np.ndarray]:
    """``{layer: (n, H) array}`` of mean-pooled sentence representations, in the input order.

    Batches are formed from length-sorted sentences (less padding); pooling skips padding and special tokens.
    """
    from tqdm.auto import tqdm

    tokenizer, model = loaded.tokenizer, loaded.model
    device = next(model.parameters()).device
    encoded = tokenizer(list(sentences), truncation=True, max_length=max_length, return_special_tokens_mask=True)
    keys = list(encoded.keys())
    order = sorted(range(len(sentences)), key=lambda i: len(encoded["input_ids"][i]))
    names = layer_names(loaded)
    chunks: dict[str, list[np.ndarray]] = {name: [] for name in names}
    progress = tqdm(total=len(sentences), desc=desc, disable=desc is None, leave=False)
    for start in range(0, len(order), batch_size):
        index = order[start:start + batch_size]
        batch = tokenizer.pad([{k: encoded[k][i] for k in keys} for i in index], return_tensors="pt")
        special = batch.pop("special_tokens_mask")
        batch = {k: v.to(device) for k, v in batch.items()}
        features, hidden = model.encode(batch["input_ids"], batch["attention_mask"], batch.get("token_type_ids"),
                                        output_hidden_states=True)
        mask = batch["attention_mask"] * (1 - special.to(device))
        # A sentence of special tokens only (an empty line) keeps its special tokens rather than dividing by 0.
        empty = mask.sum(dim=1) == 0
        mask[empty] = batch["attention_mask"][empty]
        layers = list(hidden) + ([features] if loaded.fuse_layer is not None else [])
        weights = mask.unsqueeze(-1).float()
        for name, states in zip(names, layers):
            pooled = (states.float() * weights).sum(dim=1) / weights.sum(dim=1).clamp_min(1.0)
            chunks[name].append(pooled.cpu().numpy())
        progress.update(len(index))
    progress.close()
    if not order:
        return {name: np.zeros((0, 0), dtype=np.float32) for name in names}
    inverse = np.argsort(np.asarray(order))
    return {name: np.concatenate(chunks[name], axis=0)[inverse] for name in names}


# -- the command ---------------------------------------------------------------------------------------------------


@dataclass
class SimilarityResult:
    layers: list[str]
    languages: list[str]
    cosine: dict[str, dict[str, float]]  # layer -> language -> mean cosine
    cosine_std: dict[str, dict[str, float]]  # layer -> language -> std over sentences
    cka: dict[str, dict[str, float]]
    cosine_control: dict[str, dict[str, float]]  # en i vs translation of i+1 (unrelated sentences)
    sentences: int
    seconds: float
    description: str


def compare(pivot: dict[str, np.ndarray], targets: dict[str, dict[str, np.ndarray]], layers: Sequence[str]
            ) -> tuple[dict, dict, dict, dict]:
    """Per layer and language: mean cosine, its std over sentences, linear CKA, and the mismatched control.

    The control pairs English sentence i with the translation of sentence i+1: mean-pooled states of unrelated
    sentences are already far from orthogonal (anisotropy), so the matched cosine means little without it.
    """
    cos: dict[str, dict[str, float]] = {layer: {} for layer in layers}
    cos_std: dict[str, dict[str, float]] = {layer: {} for layer in layers}
    cka: dict[str, dict[str, float]] = {layer: {} for layer in layers}
    control: dict[str, dict[str, float]] = {layer: {} for layer in layers}
    for lang, reps in targets.items():
        for layer in layers:
            pairs = pairwise_cosine(pivot[layer], reps[layer])
            cos[layer][lang] = float(pairs.mean())
            cos_std[layer][lang] = float(pairs.std(ddof=1)) if len(pairs) > 1 else math.nan
            cka[layer][lang] = linear_cka(pivot[layer], reps[layer])
            control[layer][lang] = mean_cosine(pivot[layer], np.roll(reps[layer], -1, axis=0))
    return cos, cos_std, cka, control


def _with_average(table: dict[str, dict[str, float]], languages: Sequence[str]) -> dict[str, dict[str, float]]:
    return {layer: {**row, "average": float(np.nanmean([row[lang] for lang in languages]))}
            for layer, row in table.items()}


def _csv(table: dict[str, dict[str, float]], columns: Sequence[str]) -> str:
    lines = [",".join(["layer", *columns])]
    for layer, row in table.items():
        lines.append(",".join([layer] + [f"{row[c]:.6f}" for c in columns]))
    return "\n".join(lines) + "\n"


def _markdown(table: dict[str, dict[str, float]], columns: Sequence[str], title: str) -> str:
    from dlfa.reporting.tables import markdown_table

    rows = [[layer] + [f"{row[c]:.3f}" for c in columns] for layer, row in table.items()]
    return f"### {title}\n\n" + markdown_table(["layer", *columns], rows) + "\n"


def _plot(table: dict[str, dict[str, float]], languages: Sequence[str], ylabel: str, title: str, path: Path) -> None:
    from dlfa.reporting.plots import _pyplot, save_figure

    plt = _pyplot()
    layers = list(table)
    xs = list(range(len(layers)))
    fig, ax = plt.subplots(figsize=(7.5, 4.2))
    for lang in languages:
        ax.plot(xs, [table[layer][lang] for layer in layers], marker=".", linewidth=1, label=lang)
    ax.plot(xs, [table[layer]["average"] for layer in layers], color="black", linewidth=2.2, label="average")
    ax.set_xticks(xs, layers)
    ax.set_xlabel("layer (0 = embeddings)")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    save_figure(fig, path)
    plt.close(fig)


def run_similarity(
    model: str, task: str, data_dir: str | Path, languages: Sequence[str] | None, output: str | Path,
    split: str = "test", max_sentences: int | None = 500, batch_size: int = 32, max_length: int = 128,
    device: str | None = None, command: str = "", show_progress: bool = True,
) -> SimilarityResult:
    """Read, encode, compare, and write cosine/CKA CSVs, plots, similarity.md and similarity.json."""
    started = time.time()
    if max_sentences is not None and max_sentences < 2:
        raise DlfaInputError(f"must be at least 2, got {max_sentences}", option="--max-sentences")
    if not languages:
        languages = _available_parallel(task, Path(data_dir), split)
    targets = [lang for lang in dict.fromkeys(languages) if lang != "en"]
    if not targets:
        raise DlfaInputError("give at least one target language other than en", option="--languages")
    texts = read_parallel(task, data_dir, targets, split, max_sentences)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    loaded = load_analysis_model(model, device=device)
    layers = layer_names(loaded)

    def encode(lang: str) -> dict[str, np.ndarray]:
        return sentence_representations(loaded, texts[lang], batch_size, max_length,
                                        desc=f"encode {lang}" if show_progress else None)

    pivot = encode("en")
    reps = {lang: encode(lang) for lang in targets}
    cos, cos_std, cka, control = compare(pivot, reps, layers)
    result = SimilarityResult(layers, targets, cos, cos_std, cka, control, len(texts["en"]),
                              time.time() - started, loaded.description)
    write_similarity(result, Path(output), task=task, split=split, command=command)
    return result


def _available_parallel(task: str, data_dir: Path, split: str) -> list[str]:
    if task in PUD_TASKS:
        return sorted(p.name.split("_pud")[0] for p in data_dir.glob(f"*_pud-ud-{split}.conllu"))
    from dlfa.tasks import get_task

    return get_task(task).available_languages(data_dir, split)


def write_similarity(result: SimilarityResult, output: Path, task: str, split: str, command: str) -> None:
    columns = [*result.languages, "average"]
    tables: dict[str, dict[str, dict[str, float]]] = {
        "cosine": _with_average(result.cosine, result.languages),
        "cka": _with_average(result.cka, result.languages),
    }
    titles = {"cosine": "Average cosine similarity, en vs language (mean-pooled sentence representations)",
              "cka": "Linear CKA, en vs language (mean-pooled sentence representations)"}
    for name, table in tables.items():
        write_text_atomic(output / f"{name}.csv", _csv(table, columns))
        _plot(table, result.languages, "cosine similarity" if name == "cosine" else "linear CKA",
              f"{titles[name].split(',')[0]} · {task} {split}, n={result.sentences}", output / f"{name}.png")
    spread = {layer: float(np.nanmean(list(row.values()))) for layer, row in result.cosine_std.items()}
    control = {layer: float(np.mean(list(row.values()))) for layer, row in result.cosine_control.items()}
    md = [
        "# Cross-lingual similarity per layer",
        "",
        f"Command: `{command}`  ",
        f"Model: {result.description}  ",
        f"Data: {task} {split}, {result.sentences} parallel sentences per language (en vs "
        f"{', '.join(result.languages)}); sentence = mean over real tokens (no padding, no special tokens).  ",
        "Seeds: none (deterministic forward passes in eval mode).  ",
        "Spread: cosine is a mean over sentence pairs; its standard deviation over sentences (averaged over "
        "languages) is listed below its table. CKA is one statistic of the whole set (no spread).  ",
        f"Time: {result.seconds:.1f} s",
        "",
        _markdown(tables["cosine"], columns, titles["cosine"]).rstrip("\n"),
        "",
        "Cosine std over sentences (mean over languages): "
        + ", ".join(f"{layer}: {value:.3f}" for layer, value in spread.items()) + "  ",
        "Control, cosine of mismatched pairs (en sentence i vs translation of i+1; mean over languages): "
        + ", ".join(f"{layer}: {value:.3f}" for layer, value in control.items())
        + ". Only the margin over this control reflects alignment of translations.",
        "",
        _markdown(tables["cka"], columns, titles["cka"]),
        "Files: cosine.csv, cka.csv, cosine.png, cka.png, similarity.json",
        "",
    ]
    write_text_atomic(output / "similarity.md", "\n".join(md))
    write_json_atomic(output / "similarity.json", {
        "command": command, "model": result.description, "task": task, "split": split,
        "sentences": result.sentences, "languages": result.languages, "layers": result.layers,
        "pooling": "mean over non-padding, non-special tokens", "seconds": result.seconds,
        "cosine": tables["cosine"], "cosine_std_over_sentences": _nan_to_none(result.cosine_std),
        "cosine_mismatched_control": result.cosine_control,
        "cka": _nan_to_none(tables["cka"]),
    })


def _nan_to_none(table: dict[str, dict[str, float]]) -> dict[str, dict[str, float | None]]:
    return {k: {c: (None if isinstance(v, float) and math.isnan(v) else v) for c, v in row.items()}
            for k, row in table.items()}


def summary_markdown(result: SimilarityResult) -> str:
    """Both tables for the terminal."""
    columns = [*result.languages, "average"]
    return (_markdown(_with_average(result.cosine, result.languages), columns, "cosine") + "\n"
            + _markdown(_with_average(result.cka, result.languages), columns, "linear CKA"))

