#!/usr/bin/env python
"""Mutation check: plant known wrong answers in the science code and see whether the test suite notices.

    python benchmarks/mutation_check.py                  # every mutant; table + benchmarks/results/mutation.json
    python benchmarks/mutation_check.py --list           # the mutants, their files and test selections
    python benchmarks/mutation_check.py --only dlfa-layer-minus-1,xm-kl-reversed   # some (prints; no JSON unless
                                                                                   # --output is given)

Each mutant is one exact textual edit of one source file: (id, file, original snippet, replacement, what it
breaks, the tests that should notice). The snippet must occur exactly once in the file and the edited file must
still compile, or the script refuses to run (so the list cannot silently rot when the code changes; a test,
``tests/test_mutation_check.py``, checks the list against the tree on every suite run).

The working tree is never edited: for each mutant, ``src/`` is copied to a temporary folder, the edit is made
there, and pytest runs the mutant's test selection from the repository root with ``PYTHONPATH`` pointing at the
copy (``-x``: the first failure kills the mutant). A mutant is *killed* when a selected test fails or errors
(a timeout also counts, shown as such), *survived* when every selected test passes. Before the mutants, the
union of all selections runs once on an unmodified copy and must pass (``--no-baseline`` skips that), so that
a kill means the mutant, not a test that fails anyway.

Equivalent mutants (edits that change nothing observable) are left off the list: removing
``module._is_hf_initialized = True`` in ``DLFAModel.__init__`` is one under transformers 5, whose models flag their
own tensors as initialised (``test_from_encoder_keeps_the_pretrained_encoder_weights`` guards the behaviour).

Selections are kept tight (the tests that exercise the mutated code) because each run costs a pytest start
(~7 s, torch and transformers imports) plus the tests. One thread per run (``OMP_NUM_THREADS=1``); ``--jobs``
runs several mutants at once.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUTPUT = ROOT / "benchmarks" / "results" / "mutation.json"
DEFAULT_TIMEOUT = 600  # seconds per mutant (the slowest selections take about 60 s on two busy cores)


@dataclass(frozen=True)
class Mutant:
    id: str
    file: str  # relative to the repository root, under src/
    original: str  # exact snippet, found exactly once in the file
    replacement: str
    description: str
    tests: tuple[str, ...]  # pytest node ids or test files, relative to the repository root


@dataclass
class Outcome:
    id: str
    status: str  # "killed", "survived", "timeout" (counts as killed) or "error" (the run itself failed)
    killed_by: str | None
    seconds: float
    description: str
    file: str
    tests: list[str]
    detail: str = ""  # the tail of pytest's output for survived/error runs

    @property
    def killed(self) -> bool:
        return self.status in ("killed", "timeout")


class MutantError(ValueError):
    """A mutant that cannot be applied as written (its snippet is missing or ambiguous, or it does not compile)."""


# -- the mutants ---------------------------------------------------------------------------------------------------

DLFA = "src/dlfa/modeling/modeling_dlfa.py"
XMIX = "src/dlfa/modeling/modeling_xmixup.py"
XTRAIN = "src/dlfa/training/xmixup.py"
SCORING = "src/dlfa/tasks/scoring.py"
UDPOS = "src/dlfa/tasks/udpos.py"
GUARD = "src/dlfa/evaluation/guard.py"
RECIPE = "src/dlfa/training/recipe.py"
ABLATE = "src/dlfa/analysis/ablate.py"
FEATURES = "src/dlfa/data/features.py"
EVALUATE = "src/dlfa/evaluation/evaluate.py"

MODELING_TESTS = ("tests/test_modeling.py",)


def _xm(*names: str) -> tuple[str, ...]:
    return tuple(f"tests/test_xmixup.py::{name}" for name in names)


# The fast X-Mixup tests (under a second each): operator, entropy, lambda, pooling, schedule, losses.
XM_UNIT = _xm(
    "test_in_block_operator_lambda_and_entropy_by_hand", "test_authors_entropy_by_hand_including_padding_rows",
    "test_pair_entropy_adds_both_directions", "test_masked_entropy_by_hand_and_padding_invariant",
    "test_lambda_is_half_sigmoid_of_entropy_at_the_start", "test_mixing_happens_inside_the_block_before_its_feed_forward",
    "test_plain_passes_gradients_and_fusion", "test_predict_mixes_features_that_carry_a_source",
    "test_subword_pool_by_hand", "test_pooled_tagging_features_match_the_task_and_pool_words",
    "test_tagging_head_pools_drops_once_and_scales_the_representation", "test_schedule_values_and_draws",
    "test_pair_objective_by_hand", "test_tagging_objective_by_hand", "test_tagging_pair_features_soft_labels_and_losses",
)
XM_PAIR_RUNS = _xm("test_train_and_evaluate_end_to_end_target_only",
                   "test_without_back_translations_every_batch_mixes_with_the_gold_source",
                   "test_back_translations_scheduled_sampling_and_mixup_inference")
XM_TAGGING_RUNS = _xm("test_tagging_end_to_end", "test_tagging_mixup_inference_with_a_translate_test_file",
                      "test_tagging_back_translations_train_the_target_term_alone", "test_teacher_soft_labels")
SCORER_TESTS = ("tests/test_scorers.py::test_seqeval_scorer_is_the_installed_seqeval_122",
                "tests/test_scorers.py::test_every_metrics_dict_names_its_scorer",
                "tests/test_scorers.py::test_xtreme2020_matches_real_seqeval_0012")
PANX_TESTS = ("tests/test_tasks.py::test_seqeval_entity_metrics_hand_example",
              "tests/test_tasks.py::test_panx_score_from_features",
              "tests/test_scorers.py::test_panx_scorer_equals_seqeval_0012_on_iob2")
GUARD_TESTS = ("tests/test_cache_and_guard.py::test_guard_refuses_translations_of_the_training_file",
               "tests/test_cache_and_guard.py::test_training_file_itself_is_never_a_silent_target")
HOLDOUT_TESTS = ("tests/test_cache_and_guard.py::test_dev_holdout_is_disjoint_from_training_and_covers_the_file",
                 "tests/test_cache_and_guard.py::test_training_and_selection_on_one_file_hold_out_a_part")


def _m(id: str, file: str, original: str, replacement: str, description: str, tests: Sequence[str]) -> Mutant:
    return Mutant(id, file, original, replacement, description, tuple(tests))


MUTANTS: tuple[Mutant, ...] = (
    # -- DLFA: which layers are fused -------------------------------------------------------------------------
    _m("dlfa-layer-minus-1", DLFA, "hidden_states[self.config.fuse_layer], attention_mask)",
       "hidden_states[self.config.fuse_layer - 1], attention_mask)",
       "L2 off by one: fuses hidden_states[x-1] instead of [x]", MODELING_TESTS),
    _m("dlfa-layer-plus-1", DLFA, "hidden_states[self.config.fuse_layer], attention_mask)",
       "hidden_states[self.config.fuse_layer + 1], attention_mask)",
       "L2 off by one: fuses hidden_states[x+1] instead of [x]", MODELING_TESTS),
    _m("dlfa-l1-first-layer", DLFA, "features = self.fusion(hidden_states[-1],",
       "features = self.fusion(hidden_states[1],", "L1 is the first block's output, not the last", MODELING_TESTS),
    _m("dlfa-l1-second-to-last", DLFA, "features = self.fusion(hidden_states[-1],",
       "features = self.fusion(hidden_states[-2],", "L1 off by one: the second-to-last layer", MODELING_TESTS),
    _m("dlfa-head-reads-last-layer", DLFA, "output = BaseModelOutput(last_hidden_state=features,",
       "output = BaseModelOutput(last_hidden_state=out.last_hidden_state,",
       "the fusion runs but the head reads the plain last layer", MODELING_TESTS),
    # -- DLFA: the fusion equation ----------------------------------------------------------------------------
    _m("dlfa-g-swapped", DLFA, "return lower + gate * (last - lower)", "return last + gate * (lower - last)",
       "g swapped with 1-g: L = L1 (1-g) + L2 g", MODELING_TESTS),
    _m("dlfa-w-is-l1", DLFA, "gate = self.gate((last + lower) / 2, attention_mask)",
       "gate = self.gate(last, attention_mask)", "W = L1 instead of (L1 + L2) / 2", MODELING_TESTS),
    _m("dlfa-w-is-l2", DLFA, "gate = self.gate((last + lower) / 2, attention_mask)",
       "gate = self.gate(lower, attention_mask)", "W = L2 instead of (L1 + L2) / 2", MODELING_TESTS),
    _m("dlfa-w-not-halved", DLFA, "gate = self.gate((last + lower) / 2, attention_mask)",
       "gate = self.gate(last + lower, attention_mask)", "W = L1 + L2 (not halved)", MODELING_TESTS),
    _m("dlfa-no-sigmoid", DLFA, "return torch.sigmoid(local + global_)", "return local + global_",
       "the gate's sigmoid removed", MODELING_TESTS),
    _m("dlfa-local-only", DLFA, "return torch.sigmoid(local + global_)", "return torch.sigmoid(local)",
       "g from the local branch alone", MODELING_TESTS),
    _m("dlfa-global-only", DLFA, "return torch.sigmoid(local + global_)",
       "return torch.sigmoid(global_.expand_as(local))", "g from the global branch alone", MODELING_TESTS),
    _m("dlfa-global-shares-local-weights", DLFA, "global_ = self.global_branch(pooled).unsqueeze(1)",
       "global_ = self.local_branch(pooled).unsqueeze(1)", "the global branch runs the local branch's weights",
       MODELING_TESTS),
    # -- DLFA: global pooling ---------------------------------------------------------------------------------
    _m("dlfa-global-pools-padding", DLFA, "pooled = masked_mean(fused_input, attention_mask)",
       "pooled = fused_input.mean(dim=1)", "global branch: plain mean over every position, padding included",
       MODELING_TESTS),
    _m("dlfa-masked-mean-padded-count", DLFA, "count = mask.sum(dim=1).clamp_min(1.0)",
       "count = torch.full_like(mask.sum(dim=1), mask.size(1))",
       "masked mean divided by the padded length, not the number of real tokens", MODELING_TESTS),
    # -- DLFA: the bottleneck and its norms -------------------------------------------------------------------
    _m("dlfa-no-relu", DLFA, "return self.out_norm(self.up(F.relu(self.norm(self.down(x)))))",
       "return self.out_norm(self.up(self.norm(self.down(x))))", "bottleneck without its ReLU", MODELING_TESTS),
    _m("dlfa-norm-skipped", DLFA, "return self.out_norm(self.up(F.relu(self.norm(self.down(x)))))",
       "return self.out_norm(self.up(F.relu(self.down(x))))", "bottleneck skips its first LayerNorm",
       MODELING_TESTS),
    _m("dlfa-mscam-out-norm-skipped", DLFA, "return self.out_norm(self.up(F.relu(self.norm(self.down(x)))))",
       "return self.up(F.relu(self.norm(self.down(x))))",
       "placement mscam skips the LayerNorm after the second linear layer", MODELING_TESTS),
    _m("dlfa-norm-after-relu", DLFA, "return self.out_norm(self.up(F.relu(self.norm(self.down(x)))))",
       "return self.out_norm(self.up(self.norm(F.relu(self.down(x)))))",
       "bottleneck: ReLU before the LayerNorm instead of after", MODELING_TESTS),
    # -- DLFA: initialisation ---------------------------------------------------------------------------------
    _m("dlfa-gate-bias-sign", DLFA, "bias = BASELINE_GATE_BIAS if config.gate_init",
       "bias = -BASELINE_GATE_BIAS if config.gate_init",
       "gate_init=baseline starts g near 0.03 (L2) instead of 0.97 (L1)", MODELING_TESTS),
    _m("dlfa-gate-bias-not-halved", DLFA,
       "self.local_branch = Bottleneck(hidden_size, reduction, norm, placement, bias / 2)",
       "self.local_branch = Bottleneck(hidden_size, reduction, norm, placement, bias)",
       "gate_init=baseline: the local branch gets the whole bias (local + global starts at 1.5x)", MODELING_TESTS),
    _m("dlfa-gate-bias-before-mscam-norm", DLFA,
       "last = self.out_norm if isinstance(self.out_norm, nn.LayerNorm) else self.up", "last = self.up",
       "gate_init=baseline with mscam: the bias sits before the final LayerNorm, which cancels it", MODELING_TESTS),
    _m("dlfa-gate-bias-ignored", DLFA, 'init.constant_(module.bias, getattr(module, "initial_bias", 0.0))',
       "init.zeros_(module.bias)", "gate_init=baseline ignored (every bias zero)", MODELING_TESTS),
    # -- DLFA: heads, loss, settings --------------------------------------------------------------------------
    _m("dlfa-seq-head-mean", DLFA, "x = self.dropout(features[:, 0])", "x = self.dropout(features.mean(dim=1))",
       "sentence head reads the mean over tokens, not the first token", MODELING_TESTS),
    _m("dlfa-seq-head-no-tanh", DLFA, "x = torch.tanh(self.dense(x))", "x = self.dense(x)",
       "sentence head without its tanh", MODELING_TESTS),
    _m("dlfa-loss-half-precision", DLFA, "logits.reshape(-1, logits.size(-1)).float()",
       "logits.reshape(-1, logits.size(-1))", "loss computed in the autocast dtype, not float32", MODELING_TESTS),
    _m("dlfa-fuse-layer-n-accepted", DLFA, "num_layers is None or fuse_layer < num_layers)",
       "num_layers is None or fuse_layer <= num_layers)", "D_N accepted (the last layer fused with itself)",
       MODELING_TESTS),
    # -- X-Mixup: the mixing operator (the previous helper's list, /tmp/mut/run.py) ---------------------------
    _m("xm-entropy-drop-st-masked", XMIX,
       "return masked_entropy(scores, source_mask, target_mask) + masked_entropy(transposed, target_mask, "
       "source_mask)", "return masked_entropy(scores, source_mask, target_mask)",
       "masked entropy: source->target direction dropped", XM_UNIT),
    _m("xm-entropy-drop-ts-masked", XMIX,
       "return masked_entropy(scores, source_mask, target_mask) + masked_entropy(transposed, target_mask, "
       "source_mask)", "return masked_entropy(transposed, target_mask, source_mask)",
       "masked entropy: target->source direction dropped", XM_UNIT),
    _m("xm-entropy-drop-st-authors", XMIX,
       "return authors_entropy(scores, source_mask) + authors_entropy(transposed, target_mask)",
       "return authors_entropy(scores, source_mask)", "authors' entropy: source->target direction dropped", XM_UNIT),
    _m("xm-entropy-drop-ts-authors", XMIX,
       "return authors_entropy(scores, source_mask) + authors_entropy(transposed, target_mask)",
       "return authors_entropy(transposed, target_mask)", "authors' entropy: target->source direction dropped",
       XM_UNIT),
    _m("xm-lambda-swapped", XMIX,
       "mixed = out.LayerNorm(weight * out.dropout(out.dense(context)) + (1 - weight) * target)",
       "mixed = out.LayerNorm((1 - weight) * out.dropout(out.dense(context)) + weight * target)",
       "lambda swapped with 1-lambda in the mix", XM_UNIT),
    _m("xm-no-layernorm", XMIX,
       "mixed = out.LayerNorm(weight * out.dropout(out.dense(context)) + (1 - weight) * target)",
       "mixed = weight * out.dropout(out.dense(context)) + (1 - weight) * target",
       "no LayerNorm after the mix", XM_UNIT),
    _m("xm-no-output-projection", XMIX,
       "mixed = out.LayerNorm(weight * out.dropout(out.dense(context)) + (1 - weight) * target)",
       "mixed = out.LayerNorm(weight * context + (1 - weight) * target)",
       "the block's output projection O not applied to the context", XM_UNIT),
    _m("xm-no-lambda0", XMIX, "return self.lambda_max * torch.sigmoid(dense).squeeze(-1)",
       "return torch.sigmoid(dense).squeeze(-1)", "lambda without lambda_0 (up to 1 instead of 0.5)", XM_UNIT),
    _m("xm-entropy-dense-zero", XMIX, "self.entropy_dense.weight.fill_(1.0)", "self.entropy_dense.weight.fill_(0.0)",
       "entropy_dense kernel starts at 0 (lambda ignores H at the start)", XM_UNIT),
    _m("xm-scores-scaled-by-d", XMIX, "scores = q @ k.transpose(-1, -2) / math.sqrt(size)",
       "scores = q @ k.transpose(-1, -2) / size", "attention scores scaled by d, not sqrt(d)", XM_UNIT),
    _m("xm-source-padding-keys", XMIX,
       "probs = inner.dropout(torch.softmax(scores.float() + additive, dim=-1).to(v.dtype))",
       "probs = inner.dropout(torch.softmax(scores.float(), dim=-1).to(v.dtype))",
       "source padding keys take attention", XM_UNIT),
    _m("xm-authors-logits-unmasked", XMIX, "row = -(target * torch.log_softmax(scores * mask, dim=-1)).sum(dim=-1)",
       "row = -(target * torch.log_softmax(scores, dim=-1)).sum(dim=-1)",
       "authors' entropy: logits not multiplied by the key mask", XM_UNIT),
    _m("xm-masked-entropy-padding-queries", XMIX, "queries = query_mask[:, None, :].to(row.dtype)",
       "queries = torch.ones_like(query_mask[:, None, :]).to(row.dtype)",
       "masked entropy averages over padding queries too", XM_UNIT),
    _m("xm-mix-after-ffn", XMIX,
       "self._hooks = [blocks[layer - 1].attention.register_forward_hook(self._hook(layer))",
       "self._hooks = [blocks[layer - 1].output.register_forward_hook(self._hook(layer))",
       "mixing applied after the block's FFN instead of before it", XM_UNIT),
    _m("xm-mixing-block-off-by-one", XMIX,
       "self._hooks = [blocks[layer - 1].attention.register_forward_hook(self._hook(layer))",
       "self._hooks = [blocks[layer].attention.register_forward_hook(self._hook(layer))",
       "mixing block off by one (block i+1 mixes)", XM_UNIT),
    _m("xm-source-block-input", XMIX, "self._captured[layer] = attended", "self._captured[layer] = args[0]",
       "the source side is the block input, not a_s (its attention sub-layer output)", XM_UNIT),
    # -- X-Mixup: heads ---------------------------------------------------------------------------------------
    _m("xm-no-subword-pool", XMIX, "dropped = self.model.dropout(subword_pool(features, pool_index))",
       "dropped = self.model.dropout(features)", "tagging head without sub-word pooling", XM_UNIT),
    _m("xm-subword-mean", XMIX, "return matrix @ features",
       "return (matrix / matrix.sum(dim=-1, keepdim=True).clamp_min(1.0)) @ features",
       "sub-word pooling averages instead of summing", XM_UNIT),
    _m("xm-rep-max-length", XMIX, "dropped.sum(dim=1) / (self.xmixup_config.max_length - 2)",
       "dropped.sum(dim=1) / self.xmixup_config.max_length", "tagging MSE representation / max_length, not - 2",
       XM_UNIT),
    _m("xm-pair-rep-mean", XMIX, "return self.model.head(features), features[:, 0]",
       "return self.model.head(features), features.mean(dim=1)",
       "pair MSE representation is the mean, not [CLS]", XM_UNIT),
    _m("xm-mixup-inference-target-only", XMIX,
       "logits = (source_logits + target_logits) / 2 if self.model.head_type",
       "logits = target_logits if self.model.head_type",
       "mixup inference does not average the pair's logits", XM_UNIT),
    _m("xm-pool-into-first-piece", XTRAIN,
       "labelled = {word_ids[p]: prefix + k for k, p in enumerate(positions)\n"
       "                if feature[\"labels\"][prefix + k] != IGNORE_INDEX}",
       "labelled = {word_ids[p]: prefix + k for k, p in reversed(list(enumerate(positions)))}",
       "sub-words pooled into the word's first piece, not its labelled one", XM_UNIT),
    # -- X-Mixup: scheduled sampling and the choice of source -------------------------------------------------
    _m("xm-schedule-inverted", XTRAIN, "return 0.0 if exponent > 700 else k / (k + math.exp(exponent))",
       "return 1.0 if exponent > 700 else 1 - k / (k + math.exp(exponent))",
       "scheduled sampling inverted (back-translations first, gold later)", XM_UNIT),
    _m("xm-draw-inverted", XTRAIN,
       "return random.Random(f\"xmixup:{seed}:{step}:{micro_batch}\").random() <= probability",
       "return random.Random(f\"xmixup:{seed}:{step}:{micro_batch}\").random() > probability",
       "the draw picks gold with probability 1 - p", XM_UNIT),
    _m("xm-gold-bt-swapped", XTRAIN,
       "output = self.model(**model_inputs(batch, SOURCE_PREFIX if gold else BACK_PREFIX))",
       "output = self.model(**model_inputs(batch, BACK_PREFIX if gold else SOURCE_PREFIX))",
       "back-translated and gold sources swapped", XM_PAIR_RUNS),
    _m("xm-no-bt-still-draws", XTRAIN, "gold = not self.has_back_translation or draw_gold(",
       "gold = draw_gold(", "without back-translations a batch can still draw one (and train on the target alone)",
       XM_PAIR_RUNS),
    _m("xm-tagging-bt-source-labels", XTRAIN, 'batch[SOURCE_PREFIX + "labels"] if gold else None',
       'batch[SOURCE_PREFIX + "labels"]',
       "tagging: a back-translated source is trained against the gold source's tags", XM_TAGGING_RUNS),
    # -- X-Mixup: losses --------------------------------------------------------------------------------------
    _m("xm-alpha-swapped-pairs", XTRAIN, "task = alpha * ce_source + (1 - alpha) * ce_target",
       "task = (1 - alpha) * ce_source + alpha * ce_target", "pairs: alpha swapped", XM_UNIT),
    _m("xm-alpha-swapped-tagging", XTRAIN, "task = alpha * source_task + (1 - alpha) * target_task",
       "task = (1 - alpha) * source_task + alpha * target_task", "tagging: alpha swapped", XM_UNIT),
    _m("xm-kl-reversed", XTRAIN, "kl = keras_kl(output.source_logits, output.target_logits)",
       "kl = keras_kl(output.target_logits, output.source_logits)", "KL(target || source) instead of the reverse",
       XM_UNIT),
    _m("xm-kl-no-clip", XTRAIN, "y = torch.softmax(source_logits.float(), dim=-1).clamp(KERAS_EPSILON, 1.0)",
       "y = torch.softmax(source_logits.float(), dim=-1)", "KL without keras' clipping of y", XM_UNIT),
    _m("xm-mse-sum", XTRAIN, "return (source_rep.float() - target_rep.float()).pow(2).mean(dim=-1)",
       "return (source_rep.float() - target_rep.float()).pow(2).sum(dim=-1)", "MSE summed over hidden units",
       XM_UNIT),
    _m("xm-soft-ce-no-eps", XTRAIN, "torch.log(probs + SOFT_LOG_EPSILON)", "torch.log(probs)",
       "soft cross-entropy without the authors' + 1e-6", XM_UNIT),
    _m("xm-soft-ce-threshold", XTRAIN, "active = soft_labels.sum(dim=-1) > 0.5", "active = soft_labels.sum(dim=-1) > 0.0",
       "soft cross-entropy counts rows whose labels sum to 0.5 or less", XM_UNIT),
    _m("xm-tagging-bt-keeps-alpha", XTRAIN, "    else:\n        task = target_task\n",
       "    else:\n        task = (1 - alpha) * target_task\n", "tagging with a back-translation keeps 1 - alpha",
       XM_UNIT),
    _m("xm-mse-weight-ignored", XTRAIN, "total = (task + kl_weight * kl + mse_weight * mse).mean()",
       "total = (task + kl_weight * kl + mse).mean()", "pairs: MSE weight ignored", XM_UNIT),
    _m("xm-kl-weight-ignored", XTRAIN, "total = (task + kl_weight * kl + mse_weight * mse).mean()",
       "total = (task + kl + mse_weight * mse).mean()", "pairs: KL weight ignored", XM_UNIT),
    _m("xm-soft-labels-hardened", XTRAIN, "target_task = soft_cross_entropy(output.target_logits, soft_labels)",
       "target_task = soft_cross_entropy(output.target_logits, (soft_labels > 0.5).float())",
       "tagging target trained on hardened labels, not the soft ones", XM_UNIT),
    # -- X-Mixup: inference and data hygiene ------------------------------------------------------------------
    _m("xm-predict-ignores-source", XTRAIN,
       "return model_inputs(batch, SOURCE_PREFIX if SOURCE_PREFIX + \"input_ids\" in batch else None)",
       "return model_inputs(batch, None)", "mixup inference ignores the translate-test source", XM_UNIT),
    _m("xm-english-not-self-mixed", XTRAIN, "return self.eval_examples[lang]  # mixed with itself",
       "return self.translations.get(lang)  # mixed with itself", "English is not mixed with itself at test time",
       XM_PAIR_RUNS),
    _m("xm-teacher-wrong-position", XTRAIN, "probs[row][labels[row] != IGNORE_INDEX].tolist()",
       "probs[row].roll(-1, 0)[labels[row] != IGNORE_INDEX].tolist()",
       "teacher soft labels read at the sub-token after the labelled one", _xm("test_teacher_soft_labels")),
    _m("xm-selection-pairs-kept", XTRAIN, "if _key(pair.source) in selection:",
       "if _key(pair.source) in selection and False:", "pairs whose English side selects checkpoints are trained on",
       XM_PAIR_RUNS),
    _m("xm-evaluation-pairs-kept", XTRAIN, "elif any(text in evaluated for text in texts):", "elif False:",
       "pairs that appear in an evaluation file are trained on",
       _xm("test_pairs_overlapping_evaluation_data_are_dropped_and_eval_files_refused")),
    # -- scorers ----------------------------------------------------------------------------------------------
    _m("sc-xtreme2020-conj-one-type", SCORING, 'tag, type_ = chunk[0], chunk.split("-")[-1]',
       'tag, type_ = chunk[0], chunk[1:].split("-", 1)[-1] or "_"',
       "xtreme-2020 with seqeval 1.x types (SCONJ and CCONJ one type)", SCORER_TESTS),
    _m("sc-xtreme2020-no-sentence-break", SCORING, 'for tag in [*sentence, "O"]]', "for tag in sentence]",
       "xtreme-2020 joins sentences without the O between them", SCORER_TESTS),
    _m("sc-xtreme2020-s-continues", SCORING, 'chunk_end = prev_tag in ("E", "S")', 'chunk_end = prev_tag in ("E",)',
       "xtreme-2020: a tag starting with S (SCONJ, SYM) does not end its chunk", SCORER_TESTS),
    _m("sc-udpos-default-seqeval", UDPOS, 'default_scorer = "xtreme-2020"', 'default_scorer = "seqeval"',
       "UD-POS default scorer is the installed seqeval, not xtreme-2020",
       ("tests/test_scorers.py::test_scorer_registry_defaults_and_names",
        "tests/test_scorers.py::test_every_metrics_dict_names_its_scorer")),
    _m("sc-panx-accuracy", SCORING, '"f1": 100.0 * float(f1_score(gold, predicted, **kwargs)),',
       '"f1": word_accuracy(gold, predicted)["accuracy"],', "PAN-X 'f1' is word accuracy", PANX_TESTS),
    _m("sc-panx-macro", SCORING, 'kwargs = {"mode": None, "zero_division": 0}',
       'kwargs = {"mode": None, "zero_division": 0, "average": "macro"}', "PAN-X entity F1 macro- not micro-averaged",
       PANX_TESTS),
    _m("sc-xtreme2020-mean-not-f1", SCORING, "return 2 * p * r / (p + r) if p + r > 0 else 0",
       "return (p + r) / 2 if p + r > 0 else 0", "xtreme-2020: arithmetic mean of precision and recall, not F1",
       SCORER_TESTS),
    _m("sc-panx-precision-recall-swapped", SCORING,
       '"precision": 100.0 * float(precision_score(gold, predicted, **kwargs)),\n'
       '        "recall": 100.0 * float(recall_score(gold, predicted, **kwargs)),',
       '"precision": 100.0 * float(recall_score(gold, predicted, **kwargs)),\n'
       '        "recall": 100.0 * float(precision_score(gold, predicted, **kwargs)),',
       "PAN-X precision and recall swapped", PANX_TESTS),
    _m("ud-zwnj-kept", UDPOS, r'return "".join(form.strip().replace("\u200c", "").split(" "))',
       r'return "".join(form.strip().split(" "))', "XTREME UD preprocessing keeps zero-width non-joiners",
       ("tests/test_scorers.py::test_xtreme_preprocessing_removes_spaces_and_zwnj",)),
    # -- sub-token alignment and prediction -------------------------------------------------------------------
    _m("feat-label-bare-piece", FEATURES,
       "chosen = next((p for p in positions if piece_carries_characters(tokens[p])), positions[0])",
       "chosen = positions[0]", "the label sits on a bare '▁' piece that sees none of the word",
       ("tests/test_udpos_data.py",)),
    _m("feat-label-last-piece", FEATURES,
       "chosen = next((p for p in positions if piece_carries_characters(tokens[p])), positions[0])",
       "chosen = positions[-1]", "the label sits on the word's last sub-token", ("tests/test_udpos_data.py",)),
    _m("eval-token-head-next-subtoken", EVALUATE, "results[index] = predicted[row][labels[row] != -100].tolist()",
       "results[index] = predicted[row].roll(-1, 0)[labels[row] != -100].tolist()",
       "evaluation reads the prediction of the sub-token after the labelled one",
       ("tests/test_tasks.py::test_token_predictions_are_read_at_the_labelled_sub_token",)),
    # -- honest evaluation ------------------------------------------------------------------------------------
    _m("guard-translations-through", GUARD,
       "translation = eval_split == train_split and eval_split in task.parallel_splits", "translation = False",
       "the guard lets translations of the training file through", GUARD_TESTS),
    _m("guard-training-file-through", GUARD, "same_file = bool(eval_files & train_files)", "same_file = False",
       "the guard lets the training file itself through", GUARD_TESTS),
    _m("guard-allow-inverted", GUARD, "if leaky and not allow_leaky:", "if leaky and allow_leaky:",
       "--allow-leaky-evaluation inverted", GUARD_TESTS),
    _m("holdout-train-keeps-dev", RECIPE, "train = [train[i] for i in sorted(order[cut:])]",
       "train = [train[i] for i in sorted(order)]", "dev holdout: the held-out examples are also trained on",
       HOLDOUT_TESTS),
    _m("holdout-dev-from-train", RECIPE, "dev = [train[i] for i in sorted(order[:cut])]",
       "dev = [train[i] for i in sorted(order[-cut:])]",
       "dev holdout: the selection examples are drawn from the training part", HOLDOUT_TESTS),
    _m("ablate-english-in-selection", ABLATE, "return train, [dev[i] for i in sorted(order[cut:])]",
       "return train, dev", "ablate: the held-out English examples also select the checkpoint",
       ("tests/test_ablate_english.py::test_english_holdout_is_disjoint_from_selection",)),
)


# -- the machinery ---------------------------------------------------------------------------------------------


def mutated_text(root: Path, mutant: Mutant) -> str:
    """The mutant's file with the edit made; MutantError unless the snippet occurs exactly once and it compiles."""
    path = root / mutant.file
    if not path.is_file():
        raise MutantError(f"{mutant.id}: {mutant.file} not found")
    text = path.read_text(encoding="utf-8")
    count = text.count(mutant.original)
    if count != 1:
        raise MutantError(f"{mutant.id}: the original snippet occurs {count} times in {mutant.file} (must be once); "
                          "update the mutant to the current code")
    if mutant.replacement == mutant.original:
        raise MutantError(f"{mutant.id}: the replacement equals the original")
    edited = text.replace(mutant.original, mutant.replacement)
    try:
        compile(edited, str(path), "exec")
    except SyntaxError as exc:
        raise MutantError(f"{mutant.id}: the mutated {mutant.file} does not compile ({exc.msg}, line {exc.lineno})"
                          ) from None
    return edited


def check_mutants(root: Path, mutants: Sequence[Mutant]) -> None:
    """Every mutant applies, ids are unique, files are under src/ and the selected test files exist."""
    problems = []
    seen: set[str] = set()
    for mutant in mutants:
        if mutant.id in seen:
            problems.append(f"{mutant.id}: duplicate id")
        seen.add(mutant.id)
        if not mutant.file.startswith("src/"):
            problems.append(f"{mutant.id}: {mutant.file} is not under src/ (only src/ is copied)")
        if not mutant.tests:
            problems.append(f"{mutant.id}: no tests selected")
        for test in mutant.tests:
            if not (root / test.split("::", 1)[0]).is_file():
                problems.append(f"{mutant.id}: test file of {test} not found")
        try:
            mutated_text(root, mutant)
        except MutantError as exc:
            problems.append(str(exc))
    if problems:
        raise MutantError("; ".join(problems))


def copy_sources(root: Path, destination: Path) -> Path:
    """A copy of ``root/src`` under ``destination`` (without byte-code); returns the copy's ``src``."""
    target = destination / "src"
    shutil.copytree(root / "src", target, ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info"))
    return target


def test_environment(source: Path, scratch: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTEST_ADDOPTS")}
    env.update({
        "PYTHONPATH": str(source),
        "OMP_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
        "PYTHONDONTWRITEBYTECODE": "1",
        # save_pretrained copies modeling_dlfa.py beside the weights; remote-code loads import it from this cache,
        # so a mutated copy must never land in the user's cache (or be read back by another run).
        "HF_MODULES_CACHE": str(scratch / "hf-modules"),
        "TOKENIZERS_PARALLELISM": "false",
    })
    return env


_FAILURE = re.compile(r"^(FAILED|ERROR) (\S+)")


def first_failure(output: str) -> str | None:
    """The node id of the first FAILED/ERROR line of pytest's short summary."""
    for line in output.splitlines():
        match = _FAILURE.match(line.strip())
        if match:
            return match.group(2)
    return None


def run_pytest(root: Path, source: Path, scratch: Path, tests: Sequence[str], timeout: float,
               python: str = sys.executable, stop_first: bool = True) -> tuple[int | None, str, float]:
    """(pytest's exit status or None on timeout, its output, seconds) for ``tests`` against the sources at
    ``source``, run from ``root``."""
    command = [python, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-o", "addopts=", "-rfE", "--tb=line",
               *(["-x"] if stop_first else []), *tests]
    start = time.monotonic()
    try:
        done = subprocess.run(command, cwd=root, env=test_environment(source, scratch), capture_output=True,
                              text=True, timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        output = (exc.stdout or b"").decode("utf-8", "replace") if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        return None, output, time.monotonic() - start
    return done.returncode, done.stdout + done.stderr, time.monotonic() - start


def imported_from(source: Path, scratch: Path, python: str = sys.executable) -> str:
    """Where ``import dlfa`` resolves under the test environment (must be the copy)."""
    done = subprocess.run([python, "-c", "import dlfa; print(dlfa.__file__)"], env=test_environment(source, scratch),
                          capture_output=True, text=True, timeout=120, check=True)
    return done.stdout.strip()


def _tail(text: str, lines: int = 15) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


def run_mutant(root: Path, mutant: Mutant, timeout: float, python: str = sys.executable) -> Outcome:
    """Apply the mutant to a temporary copy of src/, run its tests, and say whether they noticed."""
    edited = mutated_text(root, mutant)
    with tempfile.TemporaryDirectory(prefix=f"dlfa-mutant-{mutant.id}-") as folder:
        scratch = Path(folder)
        source = copy_sources(root, scratch)
        (scratch / mutant.file).write_text(edited, encoding="utf-8")
        status, output, seconds = run_pytest(root, source, scratch, mutant.tests, timeout, python)
    base = {"id": mutant.id, "seconds": round(seconds, 1), "description": mutant.description, "file": mutant.file,
            "tests": list(mutant.tests)}
    if status is None:
        return Outcome(status="timeout", killed_by=f"timeout after {timeout:g} s", **base)
    if status == 0:
        return Outcome(status="survived", killed_by=None, detail=_tail(output), **base)
    if status in (1, 2):  # tests failed, or collection/import failed (the mutant broke the import)
        return Outcome(status="killed", killed_by=first_failure(output) or "collection or import error", **base)
    return Outcome(status="error", killed_by=None, detail=f"pytest exit status {status}\n{_tail(output)}", **base)


def run_baseline(root: Path, mutants: Sequence[Mutant], timeout: float, python: str = sys.executable) -> dict:
    """The union of the selections on an unmodified copy: must pass, or kills would mean nothing."""
    tests = list(dict.fromkeys(t for m in mutants for t in m.tests))
    with tempfile.TemporaryDirectory(prefix="dlfa-mutant-baseline-") as folder:
        scratch = Path(folder)
        source = copy_sources(root, scratch)
        where = imported_from(source, scratch, python)
        if not Path(where).resolve().is_relative_to(source.resolve()):
            raise RuntimeError(f"the tests would import dlfa from {where}, not from the mutated copy; check for "
                               "an install that shadows PYTHONPATH")
        status, output, seconds = run_pytest(root, source, scratch, tests, timeout * 3, python, stop_first=False)
    if status != 0:
        raise RuntimeError(f"the unmutated test selection does not pass (exit status {status}):\n{_tail(output, 30)}")
    return {"tests": len(tests), "seconds": round(seconds, 1), "passed": True}


def select(mutants: Sequence[Mutant], only: str | None) -> list[Mutant]:
    if not only:
        return list(mutants)
    wanted = [name.strip() for name in only.split(",") if name.strip()]
    known = {m.id: m for m in mutants}
    unknown = [name for name in wanted if name not in known]
    if unknown:
        raise SystemExit(f"option --only: unknown mutant {unknown[0]!r} (see --list)")
    return [known[name] for name in wanted]


def table(outcomes: Sequence[Outcome]) -> str:
    rows = [("id", "status", "killed by", "what the mutant breaks")]
    for o in outcomes:
        killer = (o.killed_by or "-").removeprefix("tests/")
        rows.append((o.id, o.status, killer, o.description))
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    lines = []
    for n, row in enumerate(rows):
        lines.append("  ".join(cell.ljust(width) for cell, width in zip(row[:3], widths, strict=True)) + "  " + row[3])
        if n == 0:
            lines.append("  ".join("-" * w for w in widths) + "  " + "-" * 22)
    return "\n".join(lines)


def git_state(root: Path) -> dict:
    def git(*args: str) -> str:
        try:
            return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=30).stdout.strip()
        except OSError:
            return ""

    return {"commit": git("rev-parse", "HEAD"), "dirty": bool(git("status", "--porcelain", "--", "src", "tests"))}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--list", action="store_true", help="list the mutants and exit")
    parser.add_argument("--only", help="comma-separated mutant ids")
    parser.add_argument("--output", type=Path, default=None,
                        help=f"JSON results (default {DEFAULT_OUTPUT.relative_to(ROOT)} for a full run; none with "
                             "--only)")
    parser.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT, help="seconds per mutant")
    parser.add_argument("--jobs", type=int, default=1, help="mutants run at once (default 1)")
    parser.add_argument("--no-baseline", action="store_true", help="skip the unmutated run of the selections")
    args = parser.parse_args(argv)
    if args.jobs < 1 or not args.timeout > 0:
        parser.error("--jobs must be >= 1 and --timeout > 0")

    mutants = select(MUTANTS, args.only)
    try:
        check_mutants(ROOT, mutants)
    except MutantError as exc:
        print(f"mutation_check: {exc}", file=sys.stderr)
        return 2
    if args.list:
        for m in mutants:
            print(f"{m.id}\t{m.file}\t{m.description}\n\ttests: {' '.join(m.tests)}")
        print(f"{len(mutants)} mutants")
        return 0
    output = args.output if args.output is not None else (None if args.only else DEFAULT_OUTPUT)

    started = datetime.datetime.now(datetime.timezone.utc)
    clock = time.monotonic()
    baseline = None
    if not args.no_baseline:
        print(f"baseline: the {len({t for m in mutants for t in m.tests})} selected tests on unmodified sources ...",
              flush=True)
        try:
            baseline = run_baseline(ROOT, mutants, args.timeout)
        except RuntimeError as exc:
            print(f"mutation_check: {exc}", file=sys.stderr)
            return 1
        print(f"baseline passed in {baseline['seconds']} s", flush=True)

    outcomes: list[Outcome] = []

    def one(mutant: Mutant) -> Outcome:
        outcome = run_mutant(ROOT, mutant, args.timeout)
        print(f"[{outcome.status:8}] {mutant.id} ({outcome.seconds:.0f} s) {outcome.killed_by or ''}", flush=True)
        return outcome

    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        outcomes = list(pool.map(one, mutants))
    seconds = time.monotonic() - clock

    killed = sum(o.killed for o in outcomes)
    survived = [o.id for o in outcomes if o.status == "survived"]
    errors = [o.id for o in outcomes if o.status == "error"]
    print()
    print(table(outcomes))
    print(f"\n{len(outcomes)} mutants: {killed} killed, {len(survived)} survived, {len(errors)} errors "
          f"({seconds / 60:.1f} min)")
    for o in outcomes:
        if o.status in ("survived", "error"):
            print(f"\n{o.id} {o.status}:\n{o.detail}")
    if output is not None:
        sys.path.insert(0, str(ROOT / "src"))
        from dlfa.io import write_json_atomic

        record = {
            "generated": started.isoformat(timespec="seconds"),
            "command": " ".join(["python", "benchmarks/mutation_check.py", *(argv if argv is not None else sys.argv[1:])]),
            "git": git_state(ROOT),
            "python": platform.python_version(),
            "timeout_s": args.timeout,
            "jobs": args.jobs,
            "baseline": baseline,
            "summary": {"mutants": len(outcomes), "killed": killed, "survived": len(survived), "errors": len(errors),
                        "survivors": survived, "seconds": round(seconds, 1)},
            "mutants": [{k: v for k, v in asdict(o).items() if k != "detail" or v} for o in outcomes],
        }
        output.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(output, record)
        print(f"\nwrote {output}")
    return 0 if not survived and not errors else 1


if __name__ == "__main__":
    sys.exit(main())
