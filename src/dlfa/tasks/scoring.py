"""Named scorers: which function turned gold and predicted labels into the numbers of a run.

A task offers one or more :class:`Scorer` objects (``Task.scorers``, ``Task.default_scorer``); every metrics
dict a task returns carries the scorer's name under ``"scorer"``, so that metrics.json, reports and tables
can say which function made their numbers. The scorers:

==================== ================================================================================
``xtreme-2020``      UD-POS. XTREME's 2020 call, ``seqeval.metrics.f1_score`` over the raw UPOS sequences,
                     with the semantics of seqeval 0.0.12, the version XTREME's published numbers used.
                     seqeval reads each UPOS tag as an IOB tag: the first letter is the chunk prefix and,
                     in 0.0.12, the whole tag is the chunk type, so all 17 tags are distinct types. The
                     F1 is over chunks: runs of equal tags (a tag starting with S, SCONJ and SYM, always
                     ends its chunk). Implemented here (a port of 0.0.12's chunking, MIT licence, see
                     :func:`xtreme2020_chunks`) so that dlfa need not depend on 0.0.12 at run time; a test
                     compares it with the real 0.0.12 package.
``seqeval``          UD-POS. The same call with the installed seqeval (>= 1.2). Since 0.0.13 the chunk type
                     is the tag without its first letter, so SCONJ and CCONJ both become type ``CONJ``:
                     confusing them counts as correct (and a CCONJ run followed by SCONJ loses a chunk);
                     and X gets the type ``_`` of the ``O`` that seqeval puts between sentences, so an X
                     run at the end of a sentence joins the sentence break (and the next sentence's X
                     run). Most likely what papers of 2022 (DLFA, X-Mixup) ran.
``accuracy``         Word accuracy (UD-POS): correct tags over all words; no seqeval involved.
                     XNLI and PAWS-X: example accuracy.
``seqeval-entity-f1`` PAN-X. Entity-level precision, recall and F1 from the installed seqeval, default
                     (conlleval-like) mode, XTREME's call. For B-/I- entity tags seqeval 0.0.12 and 1.x
                     agree (a test checks it), so this is also XTREME's 2020 PAN-X score.
==================== ================================================================================

seqeval itself is imported inside the functions: importing seqeval 1.x pulls in scikit-learn (about 1 s),
and task modules are imported by every command, including those that only check options.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from dlfa.errors import DlfaInputError

# Gold and predicted labels (per-sentence tag lists for tagging, one label per example otherwise) -> numbers.
ScoreFunction = Callable[[Sequence, Sequence], dict[str, float]]


@dataclass(frozen=True)
class Scorer:
    """A named way to score: its ``metric`` is the headline number (selection maximises it, tables show it)."""

    name: str
    metric: str
    description: str
    compute: ScoreFunction

    def __call__(self, gold: Sequence, predicted: Sequence) -> dict:
        """The metrics, with the scorer's name first (``{"scorer": name, metric: ..., ...}``)."""
        if len(gold) != len(predicted):
            raise ValueError(f"{len(gold)} gold and {len(predicted)} predicted sequences")
        metrics = self.compute(gold, predicted)
        return {"scorer": self.name, **metrics}


def scorer_registry(*scorers: Scorer) -> Mapping[str, Scorer]:
    return {scorer.name: scorer for scorer in scorers}


def pick_scorer(scorers: Mapping[str, Scorer], name: str | None, default: str, task: str,
                option: str = "--scorer") -> Scorer:
    """The scorer called ``name`` (``None``: the task's default), or one line naming the choices."""
    chosen = default if name is None else name
    try:
        return scorers[chosen]
    except KeyError:
        raise DlfaInputError(f"unknown scorer {chosen!r} for {task} (choices: {', '.join(scorers)}; default "
                             f"{default})", option=option) from None


# -- seqeval 0.0.12, ported ----------------------------------------------------------------------------------
#
# The three functions below reproduce seqeval 0.0.12's ``get_entities``, ``end_of_chunk`` and
# ``start_of_chunk`` (seqeval/metrics/sequence_labeling.py, Copyright (c) 2018 chakki, MIT licence), the
# release XTREME's 2020 numbers were computed with. The line that differs from seqeval >= 0.0.13 is the
# chunk type: 0.0.12 takes ``tag.split("-")[-1]`` (the whole UPOS tag), later releases take
# ``tag[1:].split("-", 1)[-1] or "_"`` (the UPOS tag without its first letter; "_" for X and O). The chunk
# logic is kept branch for branch, so the port also holds for IOB/IOBES tags.


def _end_of_chunk(prev_tag: str, tag: str, prev_type: str, type_: str) -> bool:
    chunk_end = prev_tag in ("E", "S")
    if prev_tag in ("B", "I") and tag in ("B", "S", "O"):
        chunk_end = True
    if prev_tag != "O" and prev_tag != "." and prev_type != type_:
        chunk_end = True
    return chunk_end


def _start_of_chunk(prev_tag: str, tag: str, prev_type: str, type_: str) -> bool:
    chunk_start = tag in ("B", "S")
    if prev_tag in ("E", "S", "O") and tag in ("E", "I"):
        chunk_start = True
    if tag != "O" and tag != "." and prev_type != type_:
        chunk_start = True
    return chunk_start


def xtreme2020_chunks(sentences: Sequence[Sequence[str]]) -> list[tuple[str, int, int]]:
    """seqeval 0.0.12's ``get_entities`` over a list of sentences: (type, first, last) over the joined sequence.

    As in 0.0.12, sentences are joined with an ``O`` after each, and the offsets index that joined sequence.
    """
    seq = [tag for sentence in sentences for tag in [*sentence, "O"]]
    prev_tag, prev_type, begin = "O", "", 0
    chunks: list[tuple[str, int, int]] = []
    for i, chunk in enumerate([*seq, "O"]):
        tag, type_ = chunk[0], chunk.split("-")[-1]
        if _end_of_chunk(prev_tag, tag, prev_type, type_):
            chunks.append((prev_type, begin, i - 1))
        if _start_of_chunk(prev_tag, tag, prev_type, type_):
            begin = i
        prev_tag, prev_type = tag, type_
    return chunks


def xtreme2020_f1(gold: Sequence[Sequence[str]], predicted: Sequence[Sequence[str]]) -> float:
    """seqeval 0.0.12's ``f1_score(gold, predicted)`` (micro F1 over chunk sets), as a fraction."""
    true_chunks = set(xtreme2020_chunks(gold))
    pred_chunks = set(xtreme2020_chunks(predicted))
    correct = len(true_chunks & pred_chunks)
    p = correct / len(pred_chunks) if pred_chunks else 0
    r = correct / len(true_chunks) if true_chunks else 0
    return 2 * p * r / (p + r) if p + r > 0 else 0


# -- the installed seqeval -----------------------------------------------------------------------------------


def seqeval_f1(gold: Sequence[Sequence[str]], predicted: Sequence[Sequence[str]]) -> float:
    """The installed seqeval's ``f1_score(gold, predicted)`` with its defaults, as XTREME's run_tag.py calls it."""
    from seqeval.metrics import f1_score

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # seqeval warns that UPOS tags are not IOB tags; XTREME ignores that
        return float(f1_score([list(s) for s in gold], [list(s) for s in predicted]))


# -- metric dicts ----------------------------------------------------------------------------------------------


def word_accuracy(gold: Sequence[Sequence[str]], predicted: Sequence[Sequence[str]]) -> dict[str, float]:
    """Correct tags over all words, in percent (sentences must have equal lengths)."""
    total = sum(len(tags) for tags in gold)
    correct = sum(g == p for gs, ps in zip(gold, predicted, strict=True) for g, p in zip(gs, ps, strict=True))
    return {"accuracy": 100.0 * correct / max(total, 1), "words": total}


def pos_f1_xtreme2020(gold: Sequence[Sequence[str]], predicted: Sequence[Sequence[str]]) -> dict[str, float]:
    accuracy = word_accuracy(gold, predicted)  # first: it checks the lengths
    return {"f1": 100.0 * float(xtreme2020_f1(gold, predicted)), **accuracy}


def pos_f1_seqeval(gold: Sequence[Sequence[str]], predicted: Sequence[Sequence[str]]) -> dict[str, float]:
    accuracy = word_accuracy(gold, predicted)
    return {"f1": 100.0 * seqeval_f1(gold, predicted), **accuracy}


def entity_f1_seqeval(gold: Sequence[Sequence[str]], predicted: Sequence[Sequence[str]]) -> dict[str, float]:
    """Entity-level precision, recall and F1 (installed seqeval, default mode as in XTREME), in percent."""
    from seqeval.metrics import f1_score, precision_score, recall_score

    for g, p in zip(gold, predicted, strict=True):
        if len(g) != len(p):
            raise ValueError(f"a sentence has {len(g)} gold and {len(p)} predicted tags")
    gold, predicted = [list(s) for s in gold], [list(s) for s in predicted]
    kwargs = {"mode": None, "zero_division": 0}
    return {
        "f1": 100.0 * float(f1_score(gold, predicted, **kwargs)),
        "precision": 100.0 * float(precision_score(gold, predicted, **kwargs)),
        "recall": 100.0 * float(recall_score(gold, predicted, **kwargs)),
        "words": sum(len(tags) for tags in gold),
    }


def example_accuracy(gold: Sequence[str], predicted: Sequence[str]) -> dict[str, float]:
    """Correct labels over all examples, in percent."""
    correct = sum(g == p for g, p in zip(gold, predicted, strict=True))
    return {"accuracy": 100.0 * correct / max(len(gold), 1), "examples": len(gold)}


XTREME_2020 = Scorer(
    "xtreme-2020", "f1",
    "seqeval 0.0.12 F1 over the UPOS sequences (XTREME's 2020 scoring; all 17 tags distinct)",
    pos_f1_xtreme2020,
)
SEQEVAL = Scorer(
    "seqeval", "f1",
    "installed seqeval (>= 1.2) F1 over the UPOS sequences (SCONJ and CCONJ one chunk type)",
    pos_f1_seqeval,
)
WORD_ACCURACY = Scorer("accuracy", "accuracy", "word accuracy", word_accuracy)
SEQEVAL_ENTITY_F1 = Scorer(
    "seqeval-entity-f1", "f1", "seqeval entity-level F1, default (conlleval-like) mode", entity_f1_seqeval
)
EXAMPLE_ACCURACY = Scorer("accuracy", "accuracy", "example accuracy", example_accuracy)
