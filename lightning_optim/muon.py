"""Muon: momentum orthogonalized by Newton-Schulz, with an AdamW rule for the other parameters (docs/algorithms.md#muon)."""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Iterable
from typing import Any, Literal

import torch
from torch import Tensor

from lightning_optim._base import StateSpec, StepCountedOptimizer, as_compute, write_back
from lightning_optim.functional import adam_step_, adam_step_foreach_, decoupled_decay_
from lightning_optim.matrix import HEAD_NAMES, matrix_param_groups, matrix_shape, matrix_view, newton_schulz, split_params
from lightning_optim.validation import check_betas, check_bool, check_choice, check_int, check_range

__all__ = ["Muon", "muon_scale", "split_params", "matrix_param_groups"]

_ADAMW_KEYS = ("adamw_lr", "adamw_betas", "adamw_eps", "adamw_weight_decay")
_SPEC = StateSpec(
    moments={"momentum_buffer": True, "exp_avg": True, "exp_avg_sq": False},
    first_moment="momentum_buffer",
    second_moment="exp_avg_sq",
    second_moment_like_grad_sq=False,  # kept only for the AdamW-rule parameters, not for the matrices
)
# What one parameter holds: the matrix rule keeps the momentum, the AdamW rule Adam's two moments.
_SPEC_MUON = dataclasses.replace(_SPEC, moments={"momentum_buffer": True})
_SPEC_ADAMW = dataclasses.replace(_SPEC, moments={"exp_avg": True, "exp_avg_sq": False})


def muon_scale(rows: int, cols: int, adjust_lr: str) -> float:
    """The factor multiplying the orthogonalized update of a (rows × cols) matrix.

    ``"spectral"``: √max(1, rows/cols) (KellerJordan/Muon). ``"match_rms_adamw"``: 0.2·√max(rows, cols)
    (Moonlight, Liu et al. 2025: the update's RMS matches AdamW's typical 0.2-0.4).

    Args:
        rows: rows of the matrix view (out features).
        cols: columns of the matrix view (in features, times the kernel size for convs).
        adjust_lr: ``"spectral"`` or ``"match_rms_adamw"``.
    """
    if adjust_lr == "match_rms_adamw":
        return 0.2 * math.sqrt(max(rows, cols))
    return math.sqrt(max(1.0, rows / cols))


class Muon(StepCountedOptimizer):
    r"""Muon (MomentUm Orthogonalized by Newton-Schulz) for the hidden matrices, AdamW for the rest, in one optimizer.

    Jordan et al., "Muon: An optimizer for hidden layers in neural networks" (2024,
    https://kellerjordan.github.io/posts/muon/); follows the reference code KellerJordan/Muon ``muon.py``
    (``zeropower_via_newtonschulz5``, ``muon_update``, ``MuonWithAuxAdam``). For a matrix parameter W with
    gradient G (conv kernels viewed as (out, in·kh·kw), 3-D per-expert weights as E matrices):

    .. math::
        M \leftarrow \mu M + (1-\mu) G \qquad (\texttt{momentum.lerp\_(grad, 1-}\mu\texttt{)}) \\
        U = \mu M + (1-\mu) G \text{ (Nesterov, the reference's } \texttt{grad.lerp(momentum, }\mu\texttt{)}),
            \text{ else } U = M \\
        O = \mathrm{NS}_5(U) \approx \text{the orthogonal factor of } U
            \text{ (quintic Newton-Schulz, } (a,b,c) = (3.4445, -4.7750, 2.0315)) \\
        W \leftarrow W(1 - \eta\lambda) - \eta\, s\, O,\quad
            s = \sqrt{\max(1, m/n)} \text{ (spectral) or } 0.2\sqrt{\max(m, n)} \text{ (match\_rms\_adamw)}

    with NS: transpose if m > n, X = U/(‖U‖_F + 1e-7), five times X ← aX + (bA + cA²)X with A = XXᵀ, in
    bf16 (``ns_dtype``). Every other parameter (and any group with ``use_muon: False``) takes AdamW, the
    reference's ``adam_update``: m ← β1 m + (1−β1) g, v ← β2 v + (1−β2) g², θ ← θ(1 − η'λ') −
    η'·m̂/(√v̂ + ε) (the same as torch AdamW; :func:`lightning_optim.functional.adam_step_`).

    **The split.** One optimizer holds both rules, so Lightning's scheduler, LearningRateMonitor and
    checkpointing see one optimizer; every param group carries ``use_muon`` (True: the matrix rule,
    False: AdamW). A group that does not say (plain ``model.parameters()``, what LightningCLI passes, or
    groups from our ``param_groups:`` section) is split by shape into two consecutive groups: tensors with
    2+ dimensions → Muon, 0-/1-D → AdamW. Shape cannot tell embeddings and the output head from hidden
    matrices: build the groups with :func:`lightning_optim.matrix.split_params` (module types), or, from
    YAML, add ``groups: [{params: embedding, use_muon: false}, {params: "lm_head.*", use_muon: false}]``
    to the ``param_groups:`` section (``rule: adamw`` / ``rule: muon`` is accepted for ``use_muon``).
    Options of a user's group are never dropped: in a group split by shape, the plain keys (``lr``,
    ``weight_decay``, ``momentum``, ...) configure its Muon part, ``adamw_lr``/``adamw_betas``/
    ``adamw_eps``/``adamw_weight_decay`` its AdamW part (which also keeps every other key of the group);
    an explicit ``weight_decay: 0`` (what ``param_groups``' ``no_weight_decay`` writes) turns the decay off
    for both parts. In a ``use_muon: False`` group, ``lr``, ``betas``, ``eps`` and ``weight_decay`` are the
    AdamW ones (as in the reference's ``MuonWithAuxAdam``), defaulting to the ``adamw_*`` arguments.
    A ``use_muon: True`` group holding a tensor with fewer than 2 dimensions raises ``ValueError``.

    Defaults (the reference): lr 0.02, momentum 0.95, weight_decay 0, Nesterov on, 5 NS steps in bf16;
    AdamW lr 3e-4, betas (0.9, 0.95), eps 1e-10, weight_decay 0 (``MuonWithAuxAdam``).

    Deviations from the reference code: the Frobenius norm is computed overflow-safe (scaled by max|U|
    first, in fp32, then rounded to the iteration's dtype as the reference's bf16 norm is); the
    gradient is never written (the reference's Nesterov ``grad.lerp_`` overwrites ``p.grad``); the spectral
    scale uses the matrix view's (rows, cols) (for 4-D conv kernels the reference reads the last two dims
    of the kernel, (kh, kw)); bf16/fp16 parameters get fp32 momentum and fp32 math (the reference keeps the
    momentum in the parameter's dtype); parameters are not sorted and no distributed all-gather is done
    (one process updates every matrix; under DDP all ranks compute the same update); a parameter without
    gradient is skipped (the reference sets a zero gradient and still decays it). ``adjust_lr`` and
    ``ns_dtype`` are options not in the reference.

    Args:
        params: parameters, named parameters or param groups (each may set ``use_muon``/``rule``,
            ``flatten`` and any argument below).
        lr: learning rate η of the matrix rule (default 0.02, in units of spectral norm per update).
        momentum: μ of the momentum EMA (default 0.95).
        weight_decay: decoupled decay λ of the matrix rule, W ← W(1 − ηλ) before the update (default 0).
        nesterov: use the Nesterov-style U = μM + (1 − μ)G instead of M (default True).
        ns_steps: Newton-Schulz iterations (default 5).
        ns_dtype: dtype of the Newton-Schulz iteration, ``"bfloat16"`` (the reference) or ``"float32"``.
        adjust_lr: the update scale, ``"spectral"`` (√max(1, m/n), the reference) or
            ``"match_rms_adamw"`` (0.2·√max(m, n), Moonlight; use it with AdamW-like lr and weight decay).
        adamw_lr: learning rate of the AdamW rule (default 3e-4).
        adamw_betas: (β1, β2) of the AdamW rule (default (0.9, 0.95)).
        adamw_eps: ε of the AdamW rule, added to √v̂ (default 1e-10).
        adamw_weight_decay: decoupled decay of the AdamW rule (default 0).
        flatten: view 3-D tensors as (shape[0], rest) (Conv1d kernels) instead of a batch of per-expert
            matrices (default False; :func:`~lightning_optim.matrix.split_params` sets it for Conv1d).
        foreach: multi-tensor path: the momentum with ``torch._foreach_*``, the Newton-Schulz iteration
            batched over same-shaped matrices (``torch.stack``), AdamW with the foreach Adam (default: on
            for CUDA params).

    State per parameter: matrices ``momentum_buffer`` (fp32 for bf16/fp16 parameters, 4 bytes/param),
    AdamW parameters ``exp_avg`` and ``exp_avg_sq`` (8 bytes/param); each a ``step`` (CPU float32).
    """

    state_spec = _SPEC

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 0.02,
        momentum: float = 0.95,
        weight_decay: float = 0.0,
        nesterov: bool = True,
        ns_steps: int = 5,
        ns_dtype: Literal["bfloat16", "float32"] = "bfloat16",
        adjust_lr: Literal["spectral", "match_rms_adamw"] = "spectral",
        adamw_lr: float = 3e-4,
        adamw_betas: tuple[float, float] = (0.9, 0.95),
        adamw_eps: float = 1e-10,
        adamw_weight_decay: float = 0.0,
        *,
        flatten: bool = False,
        foreach: bool | None = None,
    ) -> None:
        defaults = dict(
            lr=lr,
            momentum=momentum,
            weight_decay=weight_decay,
            nesterov=nesterov,
            ns_steps=ns_steps,
            ns_dtype=ns_dtype,
            adjust_lr=adjust_lr,
            adamw_lr=adamw_lr,
            adamw_betas=tuple(adamw_betas) if isinstance(adamw_betas, (list, tuple)) else adamw_betas,
            adamw_eps=adamw_eps,
            adamw_weight_decay=adamw_weight_decay,
            flatten=flatten,
            foreach=foreach,
        )
        super().__init__(params, defaults)

    # -- param groups: the split ----------------------------------------------------------------------
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group; one without ``use_muon`` is split by shape into a Muon and an AdamW group."""
        group = dict(param_group)
        params = group["params"]
        params = [params] if isinstance(params, Tensor) else list(params)
        group["params"] = params
        if "rule" in group:
            rule = group.pop("rule")
            check_choice("rule", rule, ("muon", "adamw"))
            if "use_muon" in group and group["use_muon"] is not (rule == "muon"):
                raise ValueError(f"Invalid param group: rule={rule!r} contradicts use_muon={group['use_muon']!r}.")
            group["use_muon"] = rule == "muon"
        use_muon = group.get("use_muon")
        if use_muon is None:
            matrices = [p for p in params if _matrix_by_shape(p)]
            others = [p for p in params if not _matrix_by_shape(p)]
            parts = []
            if matrices or not others:  # an empty group is kept (as a matrix group): never dropped
                parts.append({**group, "params": matrices, "use_muon": True})
            if others:
                parts.append(self._adamw_group({**group, "params": others}, split=True))
            for part in parts:
                super().add_param_group(part)
            return
        check_bool("use_muon", use_muon)
        if use_muon:
            vectors = [tuple(_tensor(p).shape) for p in params if _tensor(p).ndim < 2]
            if vectors:
                raise ValueError(
                    f"Invalid param group with use_muon=True: it holds tensors with fewer than 2 dimensions "
                    f"(shapes {vectors[:4]}); the matrix rule needs matrices. Put them in a group with "
                    "use_muon=False (AdamW), or leave use_muon out to split the group by shape."
                )
            super().add_param_group({**group, "params": params})
        else:
            super().add_param_group(self._adamw_group({**group, "params": params}, split=False))

    def _adamw_group(self, group: dict[str, Any], split: bool) -> dict[str, Any]:
        """The AdamW group: its lr/betas/eps/weight_decay from the group, or from the ``adamw_*`` options."""
        get = lambda key: group.get(key, self.defaults[key])  # noqa: E731
        if split:  # plain keys belong to the Muon part; an explicit weight_decay 0 means "no decay here"
            no_decay = "weight_decay" in group and group["weight_decay"] == 0 and "adamw_weight_decay" not in group
            options = dict(
                lr=get("adamw_lr"),
                betas=get("adamw_betas"),
                eps=get("adamw_eps"),
                weight_decay=0.0 if no_decay else get("adamw_weight_decay"),
            )
        else:
            options = dict(
                lr=group.get("lr", get("adamw_lr")),
                betas=group.get("betas", get("adamw_betas")),
                eps=group.get("eps", get("adamw_eps")),
                weight_decay=group.get("weight_decay", get("adamw_weight_decay")),
            )
        if isinstance(options["betas"], list):
            options["betas"] = tuple(options["betas"])
        return {**group, **options, "use_muon": False}

    def _validate_group(self, group: dict[str, Any]) -> None:
        check_bool("use_muon", group.get("use_muon"))
        check_range("lr", group["lr"], 0.0)
        check_range("weight_decay", group["weight_decay"], 0.0)
        check_range("momentum", group["momentum"], 0.0, 1.0, high_open=True)
        check_bool("nesterov", group["nesterov"])
        check_int("ns_steps", group["ns_steps"], 1)
        check_choice("ns_dtype", group["ns_dtype"], ("bfloat16", "float32"))
        check_choice("adjust_lr", group["adjust_lr"], ("spectral", "match_rms_adamw"))
        check_range("adamw_lr", group["adamw_lr"], 0.0)
        _check_named_betas("adamw_betas", group["adamw_betas"])
        check_range("adamw_eps", group["adamw_eps"], 0.0)
        check_range("adamw_weight_decay", group["adamw_weight_decay"], 0.0)
        check_bool("flatten", group["flatten"])
        if group["foreach"] is not None:
            check_bool("foreach", group["foreach"])
        if not group["use_muon"]:
            check_betas(group["betas"])
            check_range("eps", group["eps"], 0.0)

    # -- state: each parameter holds its rule's moments only ------------------------------------------
    def _init_state(self, p: Tensor, group: dict[str, Any]) -> dict[str, Any]:
        # The class spec lists every key (state dicts load, resets cover all); a parameter's own rule
        # decides which moments it creates.
        self.state_spec = _SPEC_MUON if group["use_muon"] else _SPEC_ADAMW
        try:
            return super()._init_state(p, group)
        finally:
            del self.state_spec

    def _adopt_foreign(self, state_dict: dict[str, Any]) -> dict[str, Any]:
        groups = state_dict.get("param_groups")
        if isinstance(groups, list) and isinstance(state_dict.get("state"), dict):
            if groups and not all("use_muon" in g for g in groups):
                keys = sorted({str(k) for s in state_dict["state"].values() for k in s})
                raise ValueError(
                    f"Muon.load_state_dict: the state dict was saved by another optimizer (param groups without "
                    f"'use_muon'; per-parameter state keys {keys}). Its moments cannot be mapped onto Muon's two "
                    "rules (matrices keep 'momentum_buffer', the AdamW rule 'exp_avg'/'exp_avg_sq'). Resume with "
                    "the optimizer that saved it, or load only the model weights and let Muon start from zero."
                )
        return super()._adopt_foreign(state_dict)

    # -- stepping -----------------------------------------------------------------------------------
    def _step(self, step: int) -> None:
        for group in self.param_groups:
            params = self._params_with_grad(group, "Muon")
            if not params:
                continue
            states = [self._init_state(p, group) for p in params]
            foreach = self._use_foreach(group, params)
            grads = [p.grad for p in params]
            counters = [s["step"] for s in states]
            if group["use_muon"]:
                fn = _muon_foreach if foreach else _muon_single_tensor
                fn(
                    params,
                    grads,
                    [s["momentum_buffer"] for s in states],
                    counters,
                    lr=group["lr"],
                    momentum=group["momentum"],
                    weight_decay=group["weight_decay"],
                    nesterov=group["nesterov"],
                    ns_steps=group["ns_steps"],
                    ns_dtype=group["ns_dtype"],
                    adjust_lr=group["adjust_lr"],
                    flatten=group["flatten"],
                )
            else:
                fn = _adamw_foreach if foreach else _adamw_single_tensor
                beta1, beta2 = group["betas"]
                fn(
                    params,
                    grads,
                    [s["exp_avg"] for s in states],
                    [s["exp_avg_sq"] for s in states],
                    counters,
                    lr=group["lr"],
                    beta1=beta1,
                    beta2=beta2,
                    eps=group["eps"],
                    weight_decay=group["weight_decay"],
                )


_EMBED_OR_HEAD = re.compile(r"(^|_)(emb|embed|embeds|embedding|embeddings|wte|wpe)($|_)|^(" + "|".join(HEAD_NAMES) + ")$")


def _tensor(item: Any) -> Tensor:
    """The tensor of a params entry (a tensor, or a ``(name, tensor)`` pair of ``named_parameters``)."""
    return item[1] if isinstance(item, tuple) else item


def _matrix_by_shape(item: Any) -> bool:
    """The automatic split of a group without ``use_muon``: 2+ dims → Muon, unless a named parameter's
    owning module's name looks like an embedding (``tok_emb``, ``embed_tokens``, ``wte``) or a head (``lm_head``)."""
    if _tensor(item).ndim < 2:
        return False
    if isinstance(item, tuple):
        parts = str(item[0]).split(".")
        owner = parts[-2] if len(parts) > 1 else parts[0]  # the attribute name of the owning module
        return not _EMBED_OR_HEAD.search(owner)
    return True


def _check_named_betas(name: str, betas: Any) -> None:
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise ValueError(f"Invalid {name}: {betas!r}; expected a tuple of 2 floats in [0, 1).")
    for i, beta in enumerate(betas):
        check_range(f"{name}[{i}]", beta, 0.0, 1.0, high_open=True)


# -- the matrix rule --------------------------------------------------------------------------------------
def _muon_single_tensor(
    params: list[Tensor],
    grads: list[Tensor],
    bufs: list[Tensor],
    steps: list[Tensor],
    *,
    lr: float,
    momentum: float,
    weight_decay: float,
    nesterov: bool,
    ns_steps: int,
    ns_dtype: str,
    adjust_lr: str,
    flatten: bool,
) -> None:
    """Reference path: the equations one parameter at a time (the gradient is never written)."""
    for param, grad, buf, step_t in zip(params, grads, bufs, steps):
        step_t += 1
        p32, g32 = as_compute([param, grad])
        buf.lerp_(g32, 1 - momentum)
        update = torch.lerp(g32, buf, momentum) if nesterov else buf
        rows, cols = matrix_shape(param.shape, flatten)[-2:]
        ortho = newton_schulz(matrix_view(update, flatten), ns_steps, ns_dtype)
        ortho = ortho.mul_(muon_scale(rows, cols, adjust_lr)).reshape(param.shape)
        decoupled_decay_(p32, lr, weight_decay)
        p32.add_(ortho.to(p32.dtype), alpha=-lr)
        write_back([param], [p32])


def _muon_foreach(
    params: list[Tensor],
    grads: list[Tensor],
    bufs: list[Tensor],
    steps: list[Tensor],
    *,
    lr: float,
    momentum: float,
    weight_decay: float,
    nesterov: bool,
    ns_steps: int,
    ns_dtype: str,
    adjust_lr: str,
    flatten: bool,
) -> None:
    """Multi-tensor path: foreach momentum, Newton-Schulz batched over same-shaped matrix views."""
    torch._foreach_add_(steps, 1.0)
    grouped = StepCountedOptimizer._group_tensors_by_device_and_dtype([params, grads, bufs])
    for (dev_params, dev_grads, dev_bufs), _ in grouped.values():
        p32, g32 = as_compute(dev_params), as_compute(dev_grads)
        torch._foreach_lerp_(dev_bufs, g32, 1 - momentum)
        updates = torch._foreach_lerp(g32, dev_bufs, momentum) if nesterov else dev_bufs
        decoupled_decay_(p32, lr, weight_decay)
        by_shape: dict[tuple[int, ...], list[int]] = {}
        for i, p in enumerate(dev_params):
            by_shape.setdefault(matrix_shape(p.shape, flatten), []).append(i)
        for shape, idx in by_shape.items():
            stacked = torch.stack([matrix_view(updates[i], flatten) for i in idx])
            ortho = newton_schulz(stacked, ns_steps, ns_dtype)
            ortho = ortho.mul_(muon_scale(shape[-2], shape[-1], adjust_lr)).float()
            torch._foreach_add_(
                [p32[i] for i in idx], [o.reshape(dev_params[i].shape) for i, o in zip(idx, ortho.unbind())], alpha=-lr
            )
        write_back(dev_params, p32)


# -- the AdamW rule ---------------------------------------------------------------------------------------
def _adamw_single_tensor(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    steps: list[Tensor],
    **adam: float,
) -> None:
    """AdamW one parameter at a time (:func:`lightning_optim.functional.adam_step_`)."""
    for param, grad, exp_avg, exp_avg_sq, step_t in zip(params, grads, exp_avgs, exp_avg_sqs, steps):
        step_t += 1
        p32, g32 = as_compute([param, grad])
        adam_step_(p32, g32, exp_avg, exp_avg_sq, step_t.item(), **adam)  # CPU step: no sync
        write_back([param], [p32])


def _adamw_foreach(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    steps: list[Tensor],
    **adam: float,
) -> None:
    """Multi-tensor AdamW (:func:`lightning_optim.functional.adam_step_foreach_`)."""
    torch._foreach_add_(steps, 1.0)
    grouped = StepCountedOptimizer._group_tensors_by_device_and_dtype([params, grads, exp_avgs, exp_avg_sqs, steps])
    for (dev_params, dev_grads, dev_exp_avgs, dev_exp_avg_sqs, dev_steps), _ in grouped.values():
        p32, g32 = as_compute(dev_params), as_compute(dev_grads)
        counts = [t.item() for t in dev_steps]  # CPU tensors: no device sync
        adam_step_foreach_(p32, g32, dev_exp_avgs, dev_exp_avg_sqs, counts, **adam)
        write_back(dev_params, p32)
