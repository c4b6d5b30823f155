"""Adaptive Memory Momentum: AM-SGD and AM-AdamW (docs/algorithms.md#adaptive-memory-momentum)."""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable
from typing import Any, Literal

import torch
from torch import Tensor

from lightning_optim._base import StateSpec, StepCountedOptimizer, as_compute, compiled, write_back
from lightning_optim.functional import (
    adam_denom,
    adam_denoms_capturable,
    adam_denoms_foreach,
    adaptive_beta,
    am_beta,
    decoupled_decay_,
    effective_beta,
    inverse_sqrt,
    pull_towards_,
    second_moment_capturable_,
    sum_of_squares,
)
from lightning_optim.lowbit import init_moment, is_quantized, load_moment, store_moment_
from lightning_optim.validation import check_betas, check_compile, check_range, check_state_bits

__all__ = ["AdaptiveMomentumSGD", "AdaptiveMomentumAdamW", "adaptive_beta", "effective_beta"]


def _sgd_sums(grad: Tensor, memory: Tensor) -> tuple[Tensor, Tensor]:
    """One tensor's share of A = Σ g² and B = Σ (d − g)² (AM-SGD, reference and 8-bit paths), overflow-safe."""
    return sum_of_squares([grad]), sum_of_squares([memory - grad])


def _sgd_update_(param: Tensor, grad: Tensor, memory: Tensor, weight: Tensor, lr: float, weight_decay: float) -> None:
    """AM-SGD's update of one tensor: d ← d + w(g − d), x ← x(1 − η·wd) − η·d."""
    (p32,) = as_compute([param])
    memory.lerp_(grad, weight.to(device=memory.device, dtype=memory.dtype))
    decoupled_decay_(p32, lr, weight_decay)
    p32.add_(memory, alpha=-lr)
    write_back([param], [p32])


def _adamw_denom_(grad: Tensor, exp_avg_sq: Tensor, t: float, beta2: float, eps: float) -> Tensor:
    """Advance v in place and return D = √v / √(1 − β2^t) + ε for one tensor (AM-AdamW)."""
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    return adam_denom(exp_avg_sq, t, beta2, eps)


def _adamw_sums(grad: Tensor, memory: Tensor, denom: Tensor) -> tuple[Tensor, Tensor]:
    """One tensor's share of A = Σ g²/D and B = Σ (d − g)²/D (AM-AdamW), overflow-safe."""
    scale = inverse_sqrt([denom])
    return sum_of_squares([grad], scale), sum_of_squares([memory - grad], scale)


def _adamw_update_(
    param: Tensor, grad: Tensor, memory: Tensor, denom: Tensor, weight: Tensor, lr: float, weight_decay: float
) -> None:
    """AM-AdamW's update of one tensor: d ← d + w(g − d), x ← x(1 − η·wd) − η·d/D."""
    (p32,) = as_compute([param])
    memory.lerp_(grad, weight.to(device=memory.device, dtype=memory.dtype))
    decoupled_decay_(p32, lr, weight_decay)
    p32.addcdiv_(memory, denom, value=-lr)
    write_back([param], [p32])


class _AdaptiveMomentumBase(StepCountedOptimizer):
    """One β for the whole optimizer: λ and β_max must agree across param groups."""

    _shared = ("memory_weight",)

    def _validate_group(self, group: dict[str, Any]) -> None:
        check_range("lr", group["lr"], 0.0)
        check_range("weight_decay", group["weight_decay"], 0.0)
        check_range("memory_weight", group["memory_weight"], 0.0)
        check_state_bits(group["state_bits"], group.get("compile", False))
        first = self.param_groups[0]
        for key in self._shared:
            if group[key] != first[key]:
                raise ValueError(
                    f"Invalid {key}: {group[key]!r} in a param group differs from {first[key]!r}; "
                    f"{type(self).__name__} computes one β for all groups, so {key} must be equal in every group."
                )

    def _collect(self) -> list[tuple[dict[str, Any], list[Tensor]]]:
        groups = []
        for group in self.param_groups:
            params = self._params_with_grad(group, type(self).__name__)
            if any(type(p).__name__ == "DTensor" for p in params):
                raise NotImplementedError(
                    f"{type(self).__name__} does not support sharded (DTensor/FSDP2) parameters yet: the "
                    "model-wide β needs an all-reduce of the local sums. Use DDP or a non-sharded strategy."
                )
            if params:
                groups.append((group, params))
        return groups

    @property
    def last_beta(self) -> Tensor | None:
        """β* of the last step as a 0-dim device tensor (for logging; not saved in the state dict)."""
        return getattr(self, "_last_beta", None)

    def _beta(self, sq_grads: list[Tensor], sq_diffs: list[Tensor], group: dict[str, Any], beta_max: float) -> Tensor:
        # A and B arrive as float64 partial sums (overflow-safe); β is used in the parameters' precision
        device = sq_grads[0].device
        a = torch.stack([x.to(device) for x in sq_grads]).sum()
        b = torch.stack([x.to(device) for x in sq_diffs]).sum()
        dtype = torch.float64 if self._compute_dtype() == torch.float64 else torch.float32
        beta = am_beta(a, b, group["memory_weight"], beta_max).to(dtype)
        self._last_beta = beta
        return effective_beta(beta, group["memory_weight"])

    def _compute_dtype(self) -> torch.dtype:
        for group in self.param_groups:
            for p in group["params"]:
                return p.dtype
        return torch.float32


class AdaptiveMomentumSGD(_AdaptiveMomentumBase):
    r"""SGD with Adaptive Memory Momentum (AM-SGD).

    Topollai & Choromanska, "Adaptive Memory Momentum via a Model-Based Framework for Deep Learning
    Optimization" (arXiv 2510.04988); the closed form is our definition (docs/algorithms.md#adaptive-memory-momentum).
    With g the gradient and d the momentum (memory), summed over all parameters of the optimizer:

    .. math::
        A = \|g\|^2,\ B = \|d - g\|^2,\ \beta^* = \operatorname{clip}_{[0, \beta_{max}]}((1+\lambda) A/B - \lambda)
            \ (0 \text{ if } B = 0) \\
        \beta_{eff} = (\beta^* + \lambda)/(1 + \lambda),\ d \leftarrow \beta_{eff} d + (1 - \beta_{eff}) g,\
            x \leftarrow x (1 - \eta\,wd) - \eta d

    d starts as the first gradient, so the first step is plain SGD. With λ = 0 and a constant β* this is
    EMA momentum (``torch.optim.SGD(momentum=β, dampening=β)``).

    Args:
        params: parameters or param groups; lr and weight_decay may differ per group, memory_weight and
            beta_max must be equal in all groups (one β is computed for the whole model).
        lr: η (default 1e-2). memory_weight: λ >= 0 (default 0.1). beta_max: upper clip of β*, in [0, 1)
        (default 0.9). weight_decay: decoupled decay (default 0). state_bits: 32 (fp32 memory) or 8:
        block-wise dynamic 8-bit d (signed map, ``lightning_optim.lowbit``) for parameters with >= 4096
        elements, 1.02 bytes per parameter instead of 4; smaller tensors keep fp32. Each such tensor is
        dequantized, updated with the same equations and requantized, one at a time. Keep embeddings in
        a ``state_bits=32`` group. foreach: multi-tensor path (default: on for CUDA params).

    The β* of the last step is exposed as ``last_beta`` (a device tensor; reading it syncs). Sharded
    (DTensor) parameters are not supported yet. State per parameter: ``momentum_buffer`` (d), or
    ``momentum_buffer_codes`` (uint8) and ``momentum_buffer_absmax`` (fp32 per 256-block) when 8-bit.
    """

    _shared = ("memory_weight", "beta_max")
    state_spec = StateSpec(moments={"momentum_buffer": True}, first_moment="momentum_buffer", counters=())

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-2,
        memory_weight: float = 0.1,
        beta_max: float = 0.9,
        weight_decay: float = 0.0,
        *,
        state_bits: Literal[32, 8] = 32,
        foreach: bool | None = None,
    ) -> None:
        defaults = dict(
            lr=lr,
            memory_weight=memory_weight,
            beta_max=beta_max,
            weight_decay=weight_decay,
            state_bits=state_bits,
            foreach=foreach,
        )
        super().__init__(params, defaults)

    def _validate_group(self, group: dict[str, Any]) -> None:
        check_range("beta_max", group["beta_max"], 0.0, 1.0, high_open=True)
        super()._validate_group(group)

    def _step(self, step: int) -> None:
        groups = self._collect()
        if not groups:
            return
        parts = []  # (group, params, grads, buffers) in compute precision, full-precision memories
        low_bit = []  # (group, param, grad, state): 8-bit memories, handled one tensor at a time
        for group, params in groups:
            grads = as_compute([p.grad for p in params])
            kept = []
            for p, g in zip(params, grads):
                state = self.state[p]
                if self._match_layout(group, p, state):
                    low_bit.append((group, p, g, state))
                    continue
                if "momentum_buffer" not in state:  # d <- g: β* = 0 and d_new = g on the first step
                    state["momentum_buffer"] = g.detach().clone(memory_format=torch.preserve_format)
                kept.append((p, g, state["momentum_buffer"]))
            if kept:
                parts.append((group, *map(list, zip(*kept))))

        sq_grads, sq_diffs, diffs = [], [], []
        for group, params, grads, buffers in parts:
            if self._use_foreach(group, params):
                group_diffs = torch._foreach_sub(buffers, grads)
                for (g, e), _ in self._group_tensors_by_device_and_dtype([grads, group_diffs]).values():
                    sq_grads.append(sum_of_squares(g, None))
                    sq_diffs.append(sum_of_squares(e, None))
            else:
                group_diffs = None
                for a, b in map(_sgd_sums, grads, buffers):
                    sq_grads.append(a)
                    sq_diffs.append(b)
            diffs.append(group_diffs)
        for _, _, g, state in low_bit:  # a memory not created yet is d = g, as on the full-precision path
            d = load_moment(state, "momentum_buffer", True, g.dtype) if is_quantized(state, "momentum_buffer") else g
            a, b = _sgd_sums(g, d)
            sq_grads.append(a)
            sq_diffs.append(b)
        weight = 1 - self._beta(sq_grads, sq_diffs, groups[0][0], groups[0][0]["beta_max"])

        for (group, params, grads, buffers), group_diffs in zip(parts, diffs):
            lr, wd = group["lr"], group["weight_decay"]
            if group_diffs is not None:
                lists = [params, buffers, group_diffs]
                for (p, d, e), _ in self._group_tensors_by_device_and_dtype(lists).values():
                    p32 = as_compute(p)
                    pull_towards_(d, e, weight)
                    decoupled_decay_(p32, lr, wd)
                    torch._foreach_add_(p32, d, alpha=-lr)
                    write_back(p, p32)
            else:
                for p, g, d in zip(params, grads, buffers):
                    _sgd_update_(p, g, d, weight, lr, wd)
        for group, p, g, state in low_bit:  # dequantize -> update -> requantize, one tensor at a time
            if is_quantized(state, "momentum_buffer"):
                d = load_moment(state, "momentum_buffer", True, g.dtype)
            else:
                init_moment(state, "momentum_buffer", True, p)
                d = g.clone()
            _sgd_update_(p, g, d, weight, group["lr"], group["weight_decay"])
            store_moment_(state, "momentum_buffer", True, d)


class AdaptiveMomentumAdamW(_AdaptiveMomentumBase):
    r"""AdamW with Adaptive Memory Momentum (AM-AdamW): the AM rule in Adam's diagonal metric.

    Topollai & Choromanska (arXiv 2510.04988); closed form as defined in docs/algorithms.md#adaptive-memory-momentum.
    Per step, with v the second moment of this step and D = √v̂ + ε the Adam denominator (P = 1/D):

    .. math::
        v \leftarrow \beta_2 v + (1-\beta_2) g^2,\ D = \sqrt{v / (1 - \beta_2^t)} + \epsilon \\
        A = \textstyle\sum g^2/D,\ B = \sum (d-g)^2/D,\
            \beta^* = \operatorname{clip}_{[0, \beta_1]}((1+\lambda)A/B - \lambda) \\
        d \leftarrow \beta_{eff} d + (1-\beta_{eff}) g,\ \beta_{eff} = (\beta^*+\lambda)/(1+\lambda),\
            x \leftarrow x(1 - \eta\,wd) - \eta\, d / D

    d starts at 0 (the first step then uses β* = β_max) and is not bias-corrected: its coefficient
    changes every step.

    Args:
        params: parameters or param groups; lr, weight_decay, betas[1] and eps may differ per group,
            memory_weight and betas[0] must be equal in all groups.
        lr: η (default 1e-3). betas: (β_max, β2) (default (0.9, 0.999)); betas[0] is the upper clip of
        β*, named ``betas`` so Lightning's momentum tools and LearningRateMonitor find it. eps: ε added
        to √v̂ (default 1e-8). weight_decay: decoupled decay (default 1e-2). memory_weight: λ (default
        0.1). state_bits: 32 (fp32 moments) or 8: block-wise dynamic 8-bit d (signed map) and v
        (unsigned map, ``lightning_optim.lowbit``) for parameters with >= 4096 elements, 2.03 bytes per
        parameter instead of 8; smaller tensors keep fp32. Each such tensor is dequantized, updated with
        the same equations and requantized, one at a time (phase 1 advances v on a copy it does not
        store; phase 2 recomputes it from the same inputs, so both phases see the same D). Keep
        embeddings in a ``state_bits=32`` group. foreach: multi-tensor path.
        compile: run the multi-tensor step through ``torch.compile`` (default False): two fused phases
        (second moment and the two sums; then the memory and parameter update) around the model-wide β,
        with lr and the step counters as device tensors, so it compiles once per group and never syncs.
        ``compile=True`` with ``state_bits=8`` raises ``ValueError``.

    The third-party implementation this follows used betas (0.89, 0.999); we keep 0.9 = β_max. The β*
    of the last step is exposed as ``last_beta``. State per parameter: ``exp_avg`` (d), ``exp_avg_sq``
    (v), ``step`` (torch Adam's names, so state adapters treat it like Adam); with 8-bit state
    ``<key>_codes`` (uint8) and ``<key>_absmax`` (fp32 per 256-block) replace the moments.
    """

    state_spec = StateSpec(
        moments={"exp_avg": True, "exp_avg_sq": False}, first_moment="exp_avg", second_moment="exp_avg_sq"
    )

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        memory_weight: float = 0.1,
        *,
        state_bits: Literal[32, 8] = 32,
        foreach: bool | None = None,
        compile: bool = False,
    ) -> None:
        defaults = dict(
            lr=lr,
            betas=tuple(betas),
            eps=eps,
            weight_decay=weight_decay,
            memory_weight=memory_weight,
            state_bits=state_bits,
            foreach=foreach,
            compile=compile,
        )
        super().__init__(params, defaults)

    def _validate_group(self, group: dict[str, Any]) -> None:
        check_betas(group["betas"], ("beta_max", "beta2"))
        check_range("eps", group["eps"], 0.0)
        check_compile(group["compile"])
        super()._validate_group(group)
        beta_max = self.param_groups[0]["betas"][0]
        if group["betas"][0] != beta_max:
            raise ValueError(
                f"Invalid betas: betas[0] = {group['betas'][0]!r} in a param group differs from {beta_max!r}; "
                "AdaptiveMomentumAdamW computes one β for all groups, so betas[0] (β_max) must be equal in every group."
            )

    def _step(self, step: int) -> None:
        groups = self._collect()
        if not groups:
            return
        # Phase 1 advances v and t and sums A and B over the model; each group then queues its phase 2,
        # which needs the model-wide β.
        updates: list[Callable[[Tensor], None]] = []
        sq_grads, sq_diffs = [], []
        for group, params in groups:
            _, beta2 = group["betas"]
            eps = group["eps"]
            states = [
                self._init_state(p, group) for p in params
            ]
            full, low_bit = self._split_by_layout(states)
            if low_bit:
                rows = [(params[i], states[i]) for i in low_bit]
                for a, b in self._low_bit_sums(group, rows):
                    sq_grads.append(a)
                    sq_diffs.append(b)
                updates.append(functools.partial(self._low_bit_update, group, rows))
                if not full:
                    continue
                params, states = [params[i] for i in full], [states[i] for i in full]
            exp_avgs = [s["exp_avg"] for s in states]
            exp_avg_sqs = [s["exp_avg_sq"] for s in states]
            steps = [s["step"] for s in states]
            if group["compile"]:
                grads = [p.grad for p in params]  # cast inside the compiled graph
                lists = [grads, exp_avgs, exp_avg_sqs, steps]
                for dev_lists, _ in self._group_tensors_by_device_and_dtype(lists).values():
                    a, b = compiled(_am_adamw_capturable_sums)(*dev_lists, beta2=beta2, eps=eps)
                    sq_grads.append(a)
                    sq_diffs.append(b)
                lists = [params, grads, exp_avgs, exp_avg_sqs, steps]
                updates.append(functools.partial(self._compiled_update, group, lists))
                continue
            grads = as_compute([p.grad for p in params])
            if self._use_foreach(group, params):
                torch._foreach_add_(steps, 1.0)
                counts = [t.item() for t in steps]  # CPU tensors: no device sync
                torch._foreach_mul_(exp_avg_sqs, beta2)
                torch._foreach_addcmul_(exp_avg_sqs, grads, grads, 1 - beta2)
                denoms = adam_denoms_foreach(exp_avg_sqs, counts, beta2, eps)
                diffs = torch._foreach_sub(exp_avgs, grads)
                for (g, e, w), _ in self._group_tensors_by_device_and_dtype([grads, diffs, denoms]).values():
                    scales = inverse_sqrt(w)
                    sq_grads.append(sum_of_squares(g, scales))
                    sq_diffs.append(sum_of_squares(e, scales))
                updates.append(functools.partial(self._foreach_update, group, [params, exp_avgs, denoms, diffs]))
            else:
                denoms = []
                for g, d, v, t in zip(grads, exp_avgs, exp_avg_sqs, steps):
                    t += 1
                    w = _adamw_denom_(g, v, t.item(), beta2, eps)  # CPU step: no sync
                    denoms.append(w)
                    a, b = _adamw_sums(g, d, w)
                    sq_grads.append(a)
                    sq_diffs.append(b)
                updates.append(functools.partial(self._reference_update, group, params, grads, exp_avgs, denoms))
        first = groups[0][0]
        weight = 1 - self._beta(sq_grads, sq_diffs, first, first["betas"][0])
        for update in updates:
            update(weight)

    def _low_bit_sums(
        self, group: dict[str, Any], rows: list[tuple[Tensor, dict[str, Any]]]
    ) -> list[tuple[Tensor, Tensor]]:
        """Phase 1 for 8-bit moments, one tensor at a time: advance t and return each tensor's (A, B).

        v is advanced on a dequantized copy that is not stored: phase 2 recomputes it bit for bit from the
        same stored v and g, so A, B and the update see the same fp32 v and D, and no copy outlives its tensor.
        """
        _, beta2 = group["betas"]
        sums = []
        for p, state in rows:
            (g,) = as_compute([p.grad])
            state["step"] += 1
            d = load_moment(state, "exp_avg", True, g.dtype)
            v = load_moment(state, "exp_avg_sq", False, g.dtype)
            sums.append(_adamw_sums(g, d, _adamw_denom_(g, v, state["step"].item(), beta2, group["eps"])))
        return sums

    def _low_bit_update(self, group: dict[str, Any], rows: list[tuple[Tensor, dict[str, Any]]], weight: Tensor) -> None:
        """Phase 2 for 8-bit moments: dequantize d and v, advance v, update d and x, requantize d and v."""
        _, beta2 = group["betas"]
        for p, state in rows:
            (g,) = as_compute([p.grad])
            with self._low_bit_moments(p, state) as (d, v):
                w = _adamw_denom_(g, v, state["step"].item(), beta2, group["eps"])
                _adamw_update_(p, g, d, w, weight, group["lr"], group["weight_decay"])

    def _compiled_update(self, group: dict[str, Any], lists: list[list[Tensor]], weight: Tensor) -> None:
        # D and d - g are recomputed inside the graph rather than kept from phase 1
        for dev_lists, _ in self._group_tensors_by_device_and_dtype(lists).values():
            device = dev_lists[0][0].device
            compiled(_am_adamw_capturable_update)(
                *dev_lists, self._device_scalar("lr", device, group["lr"]), weight.to(device),
                beta2=group["betas"][1], eps=group["eps"], weight_decay=group["weight_decay"],
            )

    def _foreach_update(self, group: dict[str, Any], lists: list[list[Tensor]], weight: Tensor) -> None:
        lr, wd = group["lr"], group["weight_decay"]
        for (p, d, w, e), _ in self._group_tensors_by_device_and_dtype(lists).values():
            p32 = as_compute(p)
            pull_towards_(d, e, weight)
            decoupled_decay_(p32, lr, wd)
            torch._foreach_addcdiv_(p32, d, w, value=-lr)
            write_back(p, p32)

    @staticmethod
    def _reference_update(
        group: dict[str, Any],
        params: list[Tensor],
        grads: list[Tensor],
        exp_avgs: list[Tensor],
        denoms: list[Tensor],
        weight: Tensor,
    ) -> None:
        for p, g, d, w in zip(params, grads, exp_avgs, denoms):
            _adamw_update_(p, g, d, w, weight, group["lr"], group["weight_decay"])

def _am_adamw_capturable_sums(
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    steps: list[Tensor],
    *,
    beta2: float,
    eps: float,
) -> tuple[Tensor, Tensor]:
    """Compiled phase 1: advance v and t, return A = Σ g²/D and B = Σ (d − g)²/D (D not kept)."""
    g32 = as_compute(grads)
    torch._foreach_add_(steps, 1.0)
    second_moment_capturable_(exp_avg_sqs, g32, beta2)
    denoms = adam_denoms_capturable(exp_avg_sqs, steps, beta2, eps)
    scales = inverse_sqrt(denoms)
    return sum_of_squares(g32, scales), sum_of_squares(torch._foreach_sub(exp_avgs, g32), scales)


def _am_adamw_capturable_update(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    steps: list[Tensor],
    lr: Tensor,
    weight: Tensor,
    *,
    beta2: float,
    eps: float,
    weight_decay: float,
) -> None:
    """Compiled phase 2: d ← d − w(d − g), x ← x(1 − η·wd) − η·d/D, with η and w device tensors."""
    p32, g32 = as_compute(params), as_compute(grads)
    denoms = adam_denoms_capturable(exp_avg_sqs, steps, beta2, eps)
    pull_towards_(exp_avgs, torch._foreach_sub(exp_avgs, g32), weight)
    decoupled_decay_(p32, lr, weight_decay)
    update = torch._foreach_div(exp_avgs, denoms)
    torch._foreach_mul_(update, lr)
    torch._foreach_sub_(p32, update)
    write_back(params, p32)
