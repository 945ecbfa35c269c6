"""The recipe's optimizer: AdamW, with an optional lazy (row-sparse) update of the word-embedding table.

The embedded model's word-embedding table holds 96M of its 117.5M parameters (250k XLM-R rows of 384), but a
batch of 32 English sentences touches a few hundred to a few thousand rows. Dense AdamW still reads and writes
the whole table, its gradient and both moments every step; on CPU that step was 27-52% of a training step.

``--embedding-updates lazy`` (:func:`build_optimizer`) makes the table's gradient sparse
(``nn.Embedding(sparse=True)``: only the rows of the batch's tokens) and :class:`LazyAdamW` updates only those
rows, with AdamW's own kernel on the gathered rows, so each touched row gets exactly AdamW's update. This is
*lazy Adam* (TensorFlow Addons' LazyAdam, torch's SparseAdam, with decoupled weight decay). What differs from
AdamW, for the rows of that one table only (every other parameter is updated by plain AdamW):

=====================================  =======================================  ======================================
                                       AdamW (``dense``)                        lazy (``lazy``)
=====================================  =======================================  ======================================
row not in the batch                   moves by its decayed momentum:           does not move
                                       m <- b1*m, v <- b2*v, p -= lr*m^/(√v^+e)
weight decay of a row not in the batch p -= lr*wd*p every step                  none
moments of a row not in the batch      decay every step                         frozen until the row is next seen
bias correction                        global step t                            global step t (the table has a
                                                                                gradient at every step)
row in the batch                       AdamW                                    AdamW (identical update)
gradient norm for clipping             over the dense gradient                  the same value (zero rows add
                                                                                nothing); float sums in another order
moments kept in memory                 2 x the whole table (768 MB)             2 x the rows seen so far
=====================================  =======================================  ======================================

So lazy = dense exactly when every row is in every batch; otherwise the rows that a batch does not touch stand
still. Rows of target-language-only tokens, never in the English training data, keep their pretrained values
under lazy updates (under AdamW they shrink by weight decay, a factor (1 - lr*wd) per step, and a row seen once
keeps drifting along its momentum for a few dozen steps).

Checkpoints hold the moments in AdamW's dense layout (one tensor of the table's shape per moment, zero rows for
rows never seen), so the checkpoint format does not change; loading one rebuilds the compact row store, and
resuming is exact (rows with all-zero moments and rows never seen are updated identically).

``--adamw-implementation`` picks torch's kernel: ``for-loop`` (torch's CPU default: one parameter at a time, a
dozen full passes and temporaries of the parameter's size per step), ``foreach`` (grouped, the same passes) or
``fused`` (one pass per parameter, no temporaries): one step of the embedded model took 0.75 s, 0.64 s and
0.08 s on this project's CPU, and 0.02 s with lazy embedding updates (benchmarks/run.py section g). All three
compute AdamW's update; results differ in the last bits of rounding.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn
from torch.optim.adam import adam as adam_update
from torch.optim.optimizer import _get_fused_kernels_supported_devices, _get_scalar_dtype

LAZY_GROUP = "lazy_rows"  # param-group flag: the group's parameters get row-sparse gradients and lazy updates
ROWS = "rows"  # state key (compact store only): the table row of each stored moment row
MOMENTS = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")


def adamw_kernel(implementation: str, device: torch.device | str) -> dict[str, bool]:
    """AdamW's ``foreach``/``fused`` keywords for ``--adamw-implementation``; ``auto`` = fused where torch has a
    fused kernel for the device type, else torch's default for it."""
    if implementation == "auto":
        supported = torch.device(device).type in _get_fused_kernels_supported_devices()
        implementation = "fused" if supported else "default"
    return {"fused": {"fused": True}, "for-loop": {"foreach": False}, "foreach": {"foreach": True}}.get(
        implementation, {})


def kernel_name(optimizer: torch.optim.Optimizer) -> str:
    """fused, foreach, for-loop or "torch's default" (what ``adamw_kernel`` asked of this optimizer)."""
    defaults = optimizer.defaults
    if defaults.get("fused"):
        return "fused"
    return {True: "foreach", False: "for-loop"}.get(defaults.get("foreach"), "torch's default")


def word_embeddings(model: nn.Module) -> nn.Embedding | None:
    """The encoder's word-embedding table of a DLFA model (or of a model wrapping one, like X-Mixup's)."""
    for candidate in (model, getattr(model, "model", None)):
        get = getattr(candidate, "get_input_embeddings", None)
        if callable(get):
            embeddings = get()
            if isinstance(embeddings, nn.Embedding):
                return embeddings
    return None


def build_optimizer(model: nn.Module, groups: list[dict[str, Any]], learning_rate: float, implementation: str,
                    embedding_updates: str) -> torch.optim.Optimizer:
    """AdamW over ``groups`` (the recipe's decay / no-decay groups).

    With ``embedding_updates == "lazy"`` and a trainable word-embedding table, the table gets sparse gradients
    and a group of its own (``lazy_rows``, its weight decay that of its former group) in a :class:`LazyAdamW`.
    Otherwise this is ``torch.optim.AdamW(groups, lr=learning_rate, <kernel>)``; with ``for-loop`` exactly the
    optimizer of dlfa before these options existed.
    """
    device = next((p.device for group in groups for p in group["params"]), torch.device("cpu"))
    kernel = adamw_kernel(implementation, device)
    embeddings = word_embeddings(model) if embedding_updates == "lazy" else None
    table = embeddings.weight if embeddings is not None and embeddings.weight.requires_grad else None
    if table is None:
        return torch.optim.AdamW(groups, lr=learning_rate, **kernel)
    shared = [name for name, param in model.named_parameters(remove_duplicate=False) if param is table]
    if len(shared) > 1:  # a tied output layer would add a dense gradient to the sparse one
        raise ValueError(f"the word embeddings are shared ({', '.join(shared)}); use dense embedding updates")
    lazy_groups = []
    for group in groups:
        params = [p for p in group["params"] if p is not table]
        if len(params) < len(group["params"]):
            lazy_groups.append({**group, "params": [table], LAZY_GROUP: True})
        lazy_groups.append({**group, "params": params})
    embeddings.sparse = True  # backward now yields a sparse COO gradient holding only the batch's rows
    return LazyAdamW([g for g in lazy_groups if g["params"]], lr=learning_rate, **kernel)


class LazyAdamW(torch.optim.AdamW):
    """AdamW whose ``lazy_rows`` groups take row-sparse gradients and update only the rows in the gradient.

    Dense groups are stepped by torch's AdamW code (``_init_group`` and the functional ``adam``, as
    ``AdamW.step`` does). For a lazy parameter (a table of shape [rows, width]) the coalesced sparse gradient's
    rows, their values and their moments are gathered into small dense tensors, stepped by the same functional
    AdamW (same kernel, same hyperparameters, the parameter's own step count), and written back. The moments are
    stored for the rows seen so far only (``exp_avg``/``exp_avg_sq`` of shape [capacity, width] and ``rows``, the
    table row of each stored row); ``state_dict`` shows them in AdamW's dense layout, ``load_state_dict`` takes
    that layout back. See the module docstring for how this departs from AdamW.
    """

    def __init__(self, params: Iterable[Any], **kwargs: Any) -> None:
        super().__init__(params, **kwargs)
        self._slots: dict[torch.Tensor, torch.Tensor] = {}  # per lazy parameter: slot of each table row, or -1
        self.register_state_dict_post_hook(_dense_state_dict)
        self.register_load_state_dict_post_hook(_compact_after_load)

    @torch.no_grad()
    def step(self, closure=None):  # noqa: ANN001 (torch's signature)
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            if group.get(LAZY_GROUP):
                for param in group["params"]:
                    if param.grad is not None:
                        self._lazy_step(group, param)
            else:
                self._dense_step(group)
        return loss

    def _dense_step(self, group: dict[str, Any]) -> None:
        """AdamW.step for one group (torch.optim.Adam.step's body)."""
        params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps = [], [], [], [], [], []
        has_complex = self._init_group(group, params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps)
        if params:
            self._adam(group, params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, has_complex)

    def _adam(self, group: dict[str, Any], *tensors: Any) -> None:
        *lists, has_complex = tensors
        beta1, beta2 = group["betas"]
        adam_update(*lists, amsgrad=group["amsgrad"], has_complex=has_complex, beta1=beta1, beta2=beta2,
                    lr=group["lr"], weight_decay=group["weight_decay"], eps=group["eps"],
                    maximize=group["maximize"], foreach=group["foreach"], capturable=group["capturable"],
                    differentiable=group["differentiable"], fused=group["fused"],
                    grad_scale=getattr(self, "grad_scale", None), found_inf=getattr(self, "found_inf", None),
                    decoupled_weight_decay=group["decoupled_weight_decay"])

    def _lazy_step(self, group: dict[str, Any], param: torch.Tensor) -> None:
        grad = param.grad
        if not grad.is_sparse:
            raise RuntimeError("a lazy_rows parameter got a dense gradient (its nn.Embedding must be sparse=True)")
        grad = grad.coalesce()  # one entry per row: duplicates (a token twice in the batch) summed
        rows, values = grad.indices()[0], grad.values()
        state = self.state[param]
        if not state:
            fused_or_capturable = bool(group["fused"] or group["capturable"])
            state["step"] = (torch.zeros((), dtype=_get_scalar_dtype(is_fused=group["fused"]), device=param.device)
                             if fused_or_capturable else torch.tensor(0.0, dtype=_get_scalar_dtype()))
            for key in self._moment_keys(group):
                state[key] = param.new_zeros((0, *param.shape[1:]))
            state[ROWS] = torch.zeros(0, dtype=torch.long, device=param.device)
        slots = self._slots_of(param, rows)
        gathered_param = param.index_select(0, rows)
        moments = [state[key].index_select(0, slots) for key in self._moment_keys(group)]
        max_sq = [moments[2]] if group["amsgrad"] else []
        self._adam(group, [gathered_param], [values.to(param.dtype)], [moments[0]], [moments[1]], max_sq,
                   [state["step"]], False)
        param.index_copy_(0, rows, gathered_param)
        for key, value in zip(self._moment_keys(group), moments):
            state[key].index_copy_(0, slots, value)

    @staticmethod
    def _moment_keys(group: dict[str, Any]) -> tuple[str, ...]:
        return MOMENTS if group["amsgrad"] else MOMENTS[:2]

    def _slots_of(self, param: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """The store slots of ``rows``, adding (zero) moments for rows seen for the first time."""
        state = self.state[param]
        slot_of = self._slots.get(param)
        if slot_of is None:
            slot_of = torch.full((param.shape[0],), -1, dtype=torch.long, device=param.device)
            slot_of[state[ROWS]] = torch.arange(len(state[ROWS]), device=param.device)
            self._slots[param] = slot_of
        slots = slot_of[rows]
        new = rows[slots < 0]
        if len(new):
            used = len(state[ROWS])
            capacity = state["exp_avg"].shape[0]
            if used + len(new) > capacity:  # grow by half at least: few reallocations over a run
                extra = max(used + len(new), capacity + capacity // 2) - capacity
                for key in MOMENTS:
                    if key in state:
                        state[key] = torch.cat([state[key], state[key].new_zeros((extra, *state[key].shape[1:]))])
            slot_of[new] = torch.arange(used, used + len(new), device=param.device)
            state[ROWS] = torch.cat([state[ROWS], new])
            slots = slot_of[rows]
        return slots

    def stored_rows(self, param: torch.Tensor) -> int:
        """How many rows of a lazy parameter have moments in memory (rows seen so far)."""
        state = self.state.get(param, {})
        return len(state[ROWS]) if ROWS in state else 0


def _dense_state_dict(optimizer: LazyAdamW, state_dict: dict[str, Any]) -> dict[str, Any]:
    """state_dict in AdamW's layout: a lazy parameter's moments as tensors of its shape (zero rows: never seen)."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    for index, entry in list(state_dict["state"].items()):
        if ROWS not in entry:
            continue
        param, rows = params[index], entry[ROWS]
        dense = {key: value for key, value in entry.items() if key not in MOMENTS and key != ROWS}
        for key in MOMENTS:
            if key in entry:
                full = param.new_zeros(param.shape)
                full.index_copy_(0, rows, entry[key][: len(rows)])
                dense[key] = full
        state_dict["state"][index] = dense
    return state_dict


def _compact_after_load(optimizer: LazyAdamW) -> None:
    """After load_state_dict: the lazy parameters' dense moments back into the compact row store (rows whose
    moments are all zero are left out: an absent row and a zero row are updated alike)."""
    optimizer._slots.clear()
    for group in optimizer.param_groups:
        if not group.get(LAZY_GROUP):
            continue
        for param in group["params"]:
            state = optimizer.state.get(param)
            if not state or ROWS in state:
                continue
            keys = [key for key in MOMENTS if key in state]
            seen = torch.zeros(param.shape[0], dtype=torch.bool, device=param.device)
            for key in keys:
                seen |= state[key].flatten(1).ne(0).any(dim=1)
            rows = seen.nonzero().flatten()
            for key in keys:
                state[key] = state[key].index_select(0, rows)
            state[ROWS] = rows


def clip_gradients(accelerator: Any, parameters: Iterable[torch.Tensor], max_norm: float) -> torch.Tensor:
    """``accelerator.clip_grad_norm_`` (``torch.nn.utils.clip_grad_norm_`` when ``accelerator`` is None), also
    for sparse gradients, which torch's clipping refuses.

    With sparse gradients the total norm is that of the dense gradients and of each coalesced sparse gradient's
    values together: the norm of the same gradient held densely (its zero rows add nothing). Every gradient is
    then scaled by ``min(1, max_norm / (norm + 1e-6))`` as torch does."""
    params = [p for p in parameters if p.grad is not None]
    sparse = [p for p in params if p.grad.is_sparse]
    if not sparse:
        clip = accelerator.clip_grad_norm_ if accelerator is not None else torch.nn.utils.clip_grad_norm_
        return clip(params, max_norm)
    if accelerator is not None:
        accelerator.unscale_gradients()  # fp16's gradient scaler; nothing otherwise
    dense = [p for p in params if not p.grad.is_sparse]
    for p in sparse:
        p.grad = p.grad.coalesce()
    norms = [torch.linalg.vector_norm(p.grad.values(), 2.0) for p in sparse]
    if dense:
        norms.append(torch.nn.utils.get_total_norm([p.grad for p in dense], 2.0).to(norms[0].device))
    total = torch.linalg.vector_norm(torch.stack(norms), 2.0)
    if dense:
        torch.nn.utils.clip_grads_with_norm_(dense, max_norm, total)
    coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)  # as clip_grads_with_norm_ computes it
    for p in sparse:
        p.grad.values().mul_(coef.to(p.grad.device))
    return total
