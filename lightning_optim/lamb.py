"""LAMB: layer-wise adaptive moments (You et al., ICLR 2020, arXiv 1904.00962, Algorithm 2)."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any, Literal

import torch
from torch import Tensor

from lightning_optim._base import StateSpec, StepCountedOptimizer, as_compute, compiled, write_back
from lightning_optim.functional import (
    adam_denoms_capturable,
    adam_denoms_foreach,
    adam_moments_,
    adam_moments_capturable_,
    adam_moments_foreach_,
    one_minus_pow,
    safe_norms,
)
from lightning_optim.validation import check_betas, check_bool, check_compile, check_range, check_state_bits

__all__ = ["LAMB", "trust_factors"]


class LAMB(StepCountedOptimizer):
    r"""LAMB: Adam's direction, rescaled per tensor by the trust ratio ‖w‖/‖r‖.

    You et al., "Large Batch Optimization for Deep Learning: Training BERT in 76 minutes", ICLR 2020
    (arXiv 1904.00962), Algorithm 2; the implementation the paper links is tensorflow/addons
    ``optimizers/lamb.py``. Per parameter tensor w, with t its step count:

    .. math::
        m \leftarrow \beta_1 m + (1-\beta_1) g,\quad v \leftarrow \beta_2 v + (1-\beta_2) g^2 \\
        \hat m = m / (1 - \beta_1^t),\quad \hat v = v / (1 - \beta_2^t) \\
        r = \hat m / (\sqrt{\hat v} + \epsilon) + \lambda w \\
        w \leftarrow w - \eta\, \rho\, r,\quad
            \rho = \|w\| / \|r\| \text{ if } \|w\| > 0 \text{ and } \|r\| > 0, \text{ else } 1

    (φ = identity; ρ is computed from w before the step). Every tensor thus moves by η·‖w‖ in norm.

    Args:
        params: parameters or param groups (every argument below may be overridden per group).
        lr: learning rate η (default 1e-3, as tensorflow/addons and apex).
        betas: (β1, β2) of Adam's moments (default (0.9, 0.999), as the paper's experiments).
        eps: ε added to √v̂ as in torch Adam and the paper (default 1e-6, as tensorflow/addons and apex).
        weight_decay: λ, added to r as the paper defines it, so it is scaled by the trust ratio (default
            0.01, as apex and the paper's BERT runs; tensorflow/addons defaults to 0). This is LAMB's
            own decoupled form, not the AdamW-style θ·(1 − η·λ) of our other optimizers.
        bias_correction: use m̂, v̂ as in Algorithm 2 (default True); False uses m, v (the paper's v3
            and cybertronai/pytorch-lamb), as apex's ``bias_correction=False``.
        max_grad_norm: clip the gradients of all parameters of this optimizer (every param group) by
            their global L2 norm n before the moments: g ← g·c/max(n, c), in place in ``p.grad`` as
            ``torch.nn.utils.clip_grad_norm_`` does, for each group whose value c is set (default None:
            off, as Algorithm 2; apex defaults to 1.0). n is overflow-safe (``safe_norms``, combined in
            float64) and the scale stays on the device (no sync). A non-finite n can only come from a
            non-finite gradient entry; the gradients are then left unclipped, so the damage stays in
            those entries (torch's clip would zero every gradient).
        clamp_trust_ratio: upper bound of ρ (default None: none, as the paper). Implementations bound it
            in different places: DeepSpeed clamps ρ to [0.01, 10], timm's ``trust_clip`` to 1,
            cybertronai/pytorch-lamb and pytorch_optimizer clamp ‖w‖ to 10 (a φ).
        state_bits: 32 (fp32 moments) or 8: block-wise dynamic 8-bit ``exp_avg``/``exp_avg_sq``
            (``lightning_optim.lowbit``) for parameters with >= 4096 elements, 2.03 bytes per parameter
            instead of 8; smaller tensors keep fp32. Each such parameter is dequantized, updated with
            the same equations and requantized, one tensor at a time (its norms are per tensor anyway).
            Keep embeddings in a ``state_bits=32`` group.
        foreach: multi-tensor path (default None: on for CUDA parameters).
        compile: run the multi-tensor step through ``torch.compile`` (default False); η and the step
            counters are then device tensors, so it compiles once per group and never syncs (``step``
            lives on the parameter's device; the gradient clip runs eagerly before it, also sync-free).
            ``compile=True`` with ``state_bits=8`` raises ``ValueError``.

    Deviations and choices. The trust ratio applies to every tensor, as Algorithm 2; apex applies it
    only to tensors with λ ≠ 0 (unless ``use_nvlamb``) and tensorflow/addons skips the tensors excluded
    from weight decay, so with a ``no_weight_decay`` param group those implementations give biases and
    norm weights plain Adam steps. The step count t is per parameter, as torch Adam (tensorflow/addons
    uses the global iteration, apex a per-group count; they differ only for parameters that skip steps).
    ρ is applied as η·‖w‖·(r/‖r‖) (ρ itself is never formed, so it cannot overflow). A NaN ‖r‖ (from a
    non-finite gradient entry) gives ρ = 1, as tensorflow/addons' ``tf.where`` form does: that tensor
    then takes a plain Adam step and its non-finite entries stay non-finite. A second moment that
    overflows (|g| > ~1e19 in fp32) makes that entry's r = 0, as in torch AdamW. State per parameter:
    ``exp_avg``, ``exp_avg_sq`` (fp32 for bf16/fp16 parameters: 8 bytes/param) and ``step`` (CPU
    float32); with 8-bit state ``<key>_codes`` (uint8) and ``<key>_absmax`` (fp32 per 256-block).
    """

    state_spec = StateSpec(
        moments={"exp_avg": True, "exp_avg_sq": False}, first_moment="exp_avg", second_moment="exp_avg_sq"
    )

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-6,
        weight_decay: float = 0.01,
        bias_correction: bool = True,
        max_grad_norm: float | None = None,
        clamp_trust_ratio: float | None = None,
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
            bias_correction=bias_correction,
            max_grad_norm=max_grad_norm,
            clamp_trust_ratio=clamp_trust_ratio,
            state_bits=state_bits,
            foreach=foreach,
            compile=compile,
        )
        super().__init__(params, defaults)

    def _validate_group(self, group: dict[str, Any]) -> None:
        check_range("lr", group["lr"], 0.0)
        check_betas(group["betas"])
        check_range("eps", group["eps"], 0.0)
        check_range("weight_decay", group["weight_decay"], 0.0)
        check_bool("bias_correction", group["bias_correction"])
        for name in ("max_grad_norm", "clamp_trust_ratio"):
            if group[name] is not None:
                check_range(name, group[name], 0.0, low_open=True)
        check_compile(group["compile"])
        check_state_bits(group["state_bits"], group["compile"])

    def _step(self, step: int) -> None:
        groups = [(g, self._params_with_grad(g, "LAMB")) for g in self.param_groups]
        groups = [(g, params) for g, params in groups if params]
        if any(g["max_grad_norm"] is not None for g, _ in groups):
            _clip_by_global_norm_(groups)
        keys = ("exp_avg", "exp_avg_sq", "step")
        for group, params in groups:
            states = [self._init_state(p, group) for p in params]
            beta1, beta2 = group["betas"]
            hyper = dict(
                beta1=beta1, beta2=beta2, eps=group["eps"], weight_decay=group["weight_decay"],
                bias_correction=group["bias_correction"], clamp=group["clamp_trust_ratio"],
            )
            if group["compile"]:  # never 8-bit: validation rejects compile=True with state_bits=8
                lists = [params, [p.grad for p in params]] + [[s[key] for s in states] for key in keys]
                for dev_lists, _ in self._group_tensors_by_device_and_dtype(lists).values():
                    lr = self._device_scalar("lr", dev_lists[0][0].device, group["lr"])
                    compiled(_lamb_capturable)(*dev_lists, lr, **hyper)
                continue
            fn = _lamb_foreach if self._use_foreach(group, params) else _lamb_single_tensor
            self._step_by_layout(fn, params, states, keys, zero_moments=False, lr=group["lr"], **hyper)


def _clip_by_global_norm_(groups: list[tuple[dict[str, Any], list[Tensor]]]) -> None:
    """g ← g·c/max(n, c) in place for the groups with ``max_grad_norm`` c, n the global norm of all grads.

    Per-tensor norms come from :func:`safe_norms` on fp32 views (finite for finite gradients) and are
    combined in float64 on the first gradient's device; a non-finite n leaves the gradients as they are.
    """
    grads = [p.grad for _, params in groups for p in params]
    device = grads[0].device
    partial = []
    for (dev_grads,), _ in StepCountedOptimizer._group_tensors_by_device_and_dtype([grads]).values():
        norms = safe_norms(as_compute(dev_grads))
        partial.append(torch.stack(norms).double().square().sum().to(device))
    total = torch.stack(partial).sum().sqrt()
    for group, params in groups:
        limit = group["max_grad_norm"]
        if limit is None:
            continue
        scale = torch.where(torch.isfinite(total), limit / torch.clamp_min(total, limit), 1.0)
        group_grads = [p.grad for p in params]
        for (dev_grads,), _ in StepCountedOptimizer._group_tensors_by_device_and_dtype([group_grads]).values():
            dtype = torch.float64 if dev_grads[0].dtype == torch.float64 else torch.float32
            torch._foreach_mul_(dev_grads, scale.to(device=dev_grads[0].device, dtype=dtype))


def trust_factors(w_norms: Tensor, r_norms: Tensor, clamp: float | None) -> tuple[Tensor, Tensor]:
    """(a, d) per tensor with ρ = a/d: (‖w‖, ‖r‖) where both are > 0, else (1, 1); a ≤ clamp·d if clamped.

    The update is then η·a·(r/d): r/d has entries of magnitude ≤ 1, so no factor can overflow even
    where ‖w‖/‖r‖ would. A NaN norm fails the ``> 0`` test and gives ρ = 1 (tensorflow/addons' ``tf.where``).

    Args:
        w_norms: ‖w‖ of each tensor (stacked 0-dim norms).
        r_norms: ‖r‖ of each tensor.
        clamp: upper bound of ρ, or None.
    """
    ok = (w_norms > 0) & (r_norms > 0)
    num = torch.where(ok, w_norms, 1.0)
    den = torch.where(ok, r_norms, 1.0)
    if clamp is not None:
        num = torch.minimum(num, den * clamp)
    return num, den


def _bias_corrections(beta1: float, beta2: float, step: float, bias_correction: bool) -> tuple[float, float]:
    """(1 − β1^t, t for :func:`adam_denoms_foreach`): with ``bias_correction=False`` t = inf gives 1 − 0 = 1."""
    t = step if bias_correction else math.inf
    return 1 - beta1**t, t


def _lamb_single_tensor(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    steps: list[Tensor],
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    bias_correction: bool,
    clamp: float | None,
) -> None:
    """Reference path: Algorithm 2 one parameter at a time."""
    for param, grad, exp_avg, exp_avg_sq, step_t in zip(params, grads, exp_avgs, exp_avg_sqs, steps):
        step_t += 1
        bc1, t = _bias_corrections(beta1, beta2, step_t.item(), bias_correction)  # CPU step: no sync
        p32, g32 = as_compute([param, grad])
        adam_moments_(exp_avg, exp_avg_sq, g32, beta1, beta2)
        (denom,) = adam_denoms_foreach([exp_avg_sq], [t], beta2, eps)
        update = torch.div(exp_avg, denom).div_(bc1)
        if weight_decay != 0:
            update.add_(p32, alpha=weight_decay)
        _apply_trust_ratio_([p32], [update], lr, 0.0, clamp)
        write_back([param], [p32])


def _lamb_foreach(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    steps: list[Tensor],
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    bias_correction: bool,
    clamp: float | None,
) -> None:
    """Multi-tensor path, grouped by device and dtype; norms of all tensors at once (``safe_norms``)."""
    grouped = StepCountedOptimizer._group_tensors_by_device_and_dtype([params, grads, exp_avgs, exp_avg_sqs, steps])
    for (dev_params, dev_grads, dev_exp_avgs, dev_exp_avg_sqs, dev_steps), _ in grouped.values():
        torch._foreach_add_(dev_steps, 1.0)
        corrections = [_bias_corrections(beta1, beta2, s.item(), bias_correction) for s in dev_steps]  # CPU
        p32, g32 = as_compute(dev_params), as_compute(dev_grads)
        adam_moments_foreach_(dev_exp_avgs, dev_exp_avg_sqs, g32, beta1, beta2)
        denoms = adam_denoms_foreach(dev_exp_avg_sqs, [t for _, t in corrections], beta2, eps)
        updates = torch._foreach_div(dev_exp_avgs, denoms)
        del denoms
        torch._foreach_div_(updates, [bc1 for bc1, _ in corrections])
        _apply_trust_ratio_(p32, updates, lr, weight_decay, clamp)
        write_back(dev_params, p32)


def _apply_trust_ratio_(
    params: list[Tensor], updates: list[Tensor], lr: float | Tensor, weight_decay: float, clamp: float | None
) -> None:
    """r ← r + λw, then w ← w − η·a·(r/d) with (a, d) from :func:`trust_factors` (same-device lists)."""
    if weight_decay != 0:
        torch._foreach_add_(updates, params, alpha=weight_decay)
    num, den = trust_factors(torch.stack(safe_norms(params)), torch.stack(safe_norms(updates)), clamp)
    torch._foreach_div_(updates, den.unbind())
    torch._foreach_mul_(updates, (num * lr).unbind())
    torch._foreach_sub_(params, updates)


def _lamb_capturable(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    steps: list[Tensor],
    lr: Tensor,
    *,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    bias_correction: bool,
    clamp: float | None,
) -> None:
    """The multi-tensor step with η and the step counters on the device, for ``torch.compile``."""
    torch._foreach_add_(steps, 1.0)
    p32, g32 = as_compute(params), as_compute(grads)
    adam_moments_capturable_(exp_avgs, exp_avg_sqs, g32, beta1, beta2)
    if bias_correction:
        denoms = adam_denoms_capturable(exp_avg_sqs, steps, beta2, eps)
        updates = torch._foreach_div(exp_avgs, denoms)
        torch._foreach_div_(updates, one_minus_pow(beta1, steps))
    else:
        denoms = torch._foreach_sqrt(exp_avg_sqs)
        torch._foreach_add_(denoms, eps)
        updates = torch._foreach_div(exp_avgs, denoms)
    _apply_trust_ratio_(p32, updates, lr, weight_decay, clamp)
    write_back(params, p32)
