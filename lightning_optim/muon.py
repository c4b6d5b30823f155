"""Muon: momentum orthogonalized by Newton-Schulz, with an AdamW rule for the other parameters (docs/algorithms.md#muon)."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any, Literal

import torch
from torch import Tensor

from lightning_optim._base import StateSpec, StepCountedOptimizer, as_compute, write_back
from lightning_optim.functional import decoupled_decay_
from lightning_optim.matrix import (
    MatrixOptimizer,
    matrix_param_groups,
    matrix_shape,
    matrix_view,
    newton_schulz,
    split_params,
    split_spec,
)
from lightning_optim.validation import check_bool, check_choice, check_int, check_range

__all__ = ["Muon", "muon_scale", "split_params", "matrix_param_groups"]

_SPEC = StateSpec(
    moments={"momentum_buffer": True, "exp_avg": True, "exp_avg_sq": False},
    first_moment="momentum_buffer",
    second_moment="exp_avg_sq",
    second_moment_like_grad_sq=False,  # kept only for the AdamW-rule parameters, not for the matrices
)
# What one parameter holds: the matrix rule keeps the momentum, the AdamW rule Adam's two moments.
_SPEC_MUON, _SPEC_ADAMW = split_spec(_SPEC, ("momentum_buffer",))


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


class Muon(MatrixOptimizer):
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

    **The split** (the machinery lives in the shared base :class:`~lightning_optim.matrix.MatrixOptimizer`,
    also used by NAMO, NAMO-D and SinkGD; ``rule: matrix`` is accepted too). One optimizer holds both rules, so Lightning's scheduler, LearningRateMonitor and
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
    matrix_spec = _SPEC_MUON
    adamw_spec = _SPEC_ADAMW
    rule_names = ("muon",)

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
            adamw_betas=adamw_betas,
            adamw_eps=adamw_eps,
            adamw_weight_decay=adamw_weight_decay,
            flatten=flatten,
            foreach=foreach,
        )
        super().__init__(params, defaults)

    def _validate_matrix_options(self, group: dict[str, Any]) -> None:
        check_range("momentum", group["momentum"], 0.0, 1.0, high_open=True)
        check_bool("nesterov", group["nesterov"])
        check_int("ns_steps", group["ns_steps"], 1)
        check_choice("ns_dtype", group["ns_dtype"], ("bfloat16", "float32"))
        check_choice("adjust_lr", group["adjust_lr"], ("spectral", "match_rms_adamw"))

    # -- stepping -----------------------------------------------------------------------------------
    def _matrix_step(
        self, group: dict[str, Any], params: list[Tensor], grads: list[Tensor], states: list[dict[str, Any]], foreach: bool
    ) -> None:
        fn = _muon_foreach if foreach else _muon_single_tensor
        fn(
            params,
            grads,
            [s["momentum_buffer"] for s in states],
            [s["step"] for s in states],
            lr=group["lr"],
            momentum=group["momentum"],
            weight_decay=group["weight_decay"],
            nesterov=group["nesterov"],
            ns_steps=group["ns_steps"],
            ns_dtype=group["ns_dtype"],
            adjust_lr=group["adjust_lr"],
            flatten=group["flatten"],
        )


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


# the AdamW rule lives in lightning_optim.matrix (MatrixOptimizer, adamw_single_tensor, adamw_foreach)
