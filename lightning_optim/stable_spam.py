"""Stable-SPAM: adaptive spike clipping, gradient-norm scaling and momentum reset (docs/algorithms.md#stable-spam)."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any, Literal

import torch
from torch import Tensor

from lightning_optim._base import StateSpec, StepCountedOptimizer, as_compute, compiled, write_back
from lightning_optim.functional import (
    adam_denoms_capturable,
    adam_step_,
    adam_step_foreach_,
    decoupled_decay_,
    one_minus_pow,
    peak_abs,
    safe_norms,
    second_moment_capturable_,
)
from lightning_optim.validation import check_betas, check_compile, check_int, check_range, check_state_bits

__all__ = ["StableSPAM", "stable_spam_schedule"]

_STATS = ("m_max", "m_norm", "v_norm")


def stable_spam_schedule(step: int, total_steps: int | None, eta_min: float) -> float:
    """Cosine factor s(T) = eta_min + (1 - eta_min)(1 + cos(pi min(T, N+1) / (N+1))) / 2; 1 when N is None."""
    if total_steps is None:
        return 1.0
    span = total_steps + 1
    return eta_min + (1.0 - eta_min) * (1.0 + math.cos(math.pi * min(step, span) / span)) / 2.0


class StableSPAM(StepCountedOptimizer):
    r"""Stable-SPAM: Adam with adaptive max-based clipping, norm scaling, β1 annealing and resets.

    Huang et al., "Stable-SPAM: How to Train in 4-Bit More Stably than 16-Bit Adam" (arXiv 2502.17055).
    Per parameter tensor, with u its count of statistic updates, s the cosine factor of the global step
    (β1' = β1·s, γ1' = γ1·s) and k its Adam step since the last reset:

    .. math::
        M = \max|g|,\ m_{max} \leftarrow \gamma_3 m_{max} + (1-\gamma_3) M,\
            \hat m_{max} = m_{max} / (1 - \gamma_3^u) \\
        g \leftarrow g\, \hat m_{max} / M \text{ where } |g| > \hat m_{max} \\
        n = \|g\|,\ m_n \leftarrow \gamma_1' m_n + (1-\gamma_1') n,\ v_n \leftarrow \gamma_2 v_n + (1-\gamma_2) n^2,\
            \hat g = g\, c / n,\ c = \hat m_n / (\sqrt{\hat v_n} + \epsilon) \\
        \text{Adam}(\hat g;\ \beta_1', \beta_2, k) \text{ with } m, v \leftarrow 0,\ k \leftarrow 0
            \text{ first at a reset step (every ΔT global steps)}

    Decoupled weight decay θ ← θ(1 − η·wd) comes first.

    Args:
        params: parameters or param groups (every argument below may be overridden per group).
        lr: η (default 1e-3). betas: (β1, β2) (default (0.9, 0.999)). eps: ε (default 1e-8).
        weight_decay: decoupled decay (default 0). gamma1: EMA of the gradient norm (default 0.7).
        gamma2: EMA of the squared norm (default 0.9). gamma3: EMA of max|g| (default 0.999).
        total_steps: length of the cosine β1/γ1 schedule (default None: no schedule). eta_min: its floor
        (default 0.5). reset_interval: ΔT steps between moment resets (default 1000; 0 never resets).
        state_bits: 32 (fp32 moments) or 8: block-wise dynamic 8-bit ``exp_avg``/``exp_avg_sq``
        (``lightning_optim.lowbit``) for parameters with >= 4096 elements, 2.03 bytes per parameter
        instead of 8; smaller tensors and the scalars (m_max, m_norm, v_norm, counters) stay fp32. Each
        such parameter is dequantized, updated with the same equations and requantized, one tensor at a
        time; a reset writes the zero code. Keep embeddings in a ``state_bits=32`` group. foreach:
        multi-tensor path (default: on for CUDA params). compile: run the multi-tensor step through
        ``torch.compile`` (default False); lr, β1', γ1', the reset mask and the counters are then device
        tensors, so it compiles once per group and never syncs (``step``/``stat_step`` live on the
        parameter's device). ``compile=True`` with ``state_bits=8`` raises ``ValueError``.

    The authors recommend lr 4e-4, γ1 0.7, γ2 0.9, γ3 0.999, reset 500 for 4-bit training and lr 8e-4,
    γ1 0.85, γ2 0.99999, reset 1000 for BF16, with total_steps = the number of training steps.

    Deviations from the authors' code (docs/algorithms.md#stable-spam): a reset step updates and uses the
    fresh zero moments; the statistics are bias-corrected with u, which a reset never touches; the
    cosine schedule holds at eta_min after total_steps instead of cycling; T is saved in
    ``param_groups[*]["global_step"]``; arguments renamed (update_proj_gap → reset_interval, total_T →
    total_steps, theta → gamma3); no amsgrad; no host syncs. ``p.grad`` of fp32 parameters is
    overwritten with the clipped, normalised gradient. State per parameter: ``exp_avg``,
    ``exp_avg_sq``, ``step`` (k), ``stat_step`` (u), ``m_max``, ``m_norm``, ``v_norm``; with 8-bit
    state the moments are ``<key>_codes`` (uint8) and ``<key>_absmax`` (fp32 per 256-block).
    """

    state_spec = StateSpec(
        moments={"exp_avg": True, "exp_avg_sq": False},
        first_moment="exp_avg",
        second_moment="exp_avg_sq",
        second_moment_like_grad_sq=False,  # v is the EMA of the clipped, norm-scaled gradient
        counters=("step", "stat_step"),
        scalars=_STATS,
    )

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        gamma1: float = 0.7,
        gamma2: float = 0.9,
        gamma3: float = 0.999,
        total_steps: int | None = None,
        eta_min: float = 0.5,
        reset_interval: int = 1000,
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
            gamma1=gamma1,
            gamma2=gamma2,
            gamma3=gamma3,
            total_steps=total_steps,
            eta_min=eta_min,
            reset_interval=reset_interval,
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
        for name in ("gamma1", "gamma2", "gamma3"):
            check_range(name, group[name], 0.0, 1.0, high_open=True)
        if group["total_steps"] is not None:
            check_int("total_steps", group["total_steps"], 1)
        check_range("eta_min", group["eta_min"], 0.0, 1.0, low_open=True)
        check_int("reset_interval", group["reset_interval"], 0)
        check_compile(group["compile"])
        check_state_bits(group["state_bits"], group["compile"])

    def _step(self, step: int) -> None:
        for group in self.param_groups:
            params = self._params_with_grad(group, "StableSPAM")
            if not params:
                continue
            scale = stable_spam_schedule(step, group["total_steps"], group["eta_min"])
            interval = group["reset_interval"]
            states = [self._init_state(p, group) for p in params]
            beta1, beta2 = group["betas"]
            keys = ("exp_avg", "exp_avg_sq", "step", "stat_step", *_STATS)
            reset = interval > 0 and step % interval == 0
            hyper = dict(
                gamma2=group["gamma2"], gamma3=group["gamma3"], eps=group["eps"], beta2=beta2,
                weight_decay=group["weight_decay"],
            )
            per_step = dict(lr=group["lr"], beta1=beta1 * scale, gamma1=group["gamma1"] * scale)
            if group["compile"]:  # per-step values go in as device tensors, in the capturable step's order
                # never 8-bit: validation rejects compile=True with state_bits=8
                lists = [params, [p.grad for p in params]] + [[s[key] for s in states] for key in keys]
                per_step["keep"] = 0.0 if reset else 1.0
                for dev_lists, _ in self._group_tensors_by_device_and_dtype(lists).values():
                    device = dev_lists[0][0].device
                    tensors = [self._device_scalar(name, device, value) for name, value in per_step.items()]
                    compiled(_stable_spam_capturable)(*dev_lists, *tensors, **hyper)
                continue
            fn = _stable_spam_foreach if self._use_foreach(group, params) else _stable_spam_single_tensor
            self._step_by_layout(fn, params, states, keys, zero_moments=reset, reset=reset, **per_step, **hyper)


def _stable_spam_single_tensor(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    steps: list[Tensor],
    stat_steps: list[Tensor],
    m_maxs: list[Tensor],
    m_norms: list[Tensor],
    v_norms: list[Tensor],
    *,
    gamma1: float,
    gamma2: float,
    gamma3: float,
    reset: bool,
    **adam: float,
) -> None:
    """Reference path: the spec's equations one parameter at a time."""
    eps = adam["eps"]
    for i, param in enumerate(params):
        p32, g = as_compute([param, grads[i]])
        stat_steps[i] += 1
        u = stat_steps[i].item()  # CPU tensor: no device sync
        # 1. adaptive clip against the bias-corrected running max
        peak = g.abs().amax()
        m_maxs[i].lerp_(peak, 1 - gamma3)
        m_max_hat = m_maxs[i] / (1 - gamma3**u)
        g.copy_(torch.where(g.abs() > m_max_hat, g * _clip_ratio(peak, m_max_hat), g))
        # 2. rescale the tensor to the running norm ratio
        (norm,) = safe_norms([g], [torch.minimum(peak, m_max_hat)])
        stat = _statistic_norm(norm)
        m_norms[i].mul_(gamma1).add_(stat * (1 - gamma1))
        v_norms[i].mul_(gamma2).addcmul_(stat, stat, value=1 - gamma2)
        c = (m_norms[i] / (1 - gamma1**u)) / ((v_norms[i] / (1 - gamma2**u)).sqrt() + eps)
        positive = norm > 0
        g.mul_(torch.where(positive, c / torch.where(positive, norm, 1.0), 1.0))
        # 3. Adam on the fresh moments at a reset step
        if reset:
            exp_avgs[i].zero_()
            exp_avg_sqs[i].zero_()
            steps[i].zero_()
        steps[i] += 1
        adam_step_(p32, g, exp_avgs[i], exp_avg_sqs[i], steps[i].item(), **adam)
        write_back([param], [p32])


def _stable_spam_foreach(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    steps: list[Tensor],
    stat_steps: list[Tensor],
    m_maxs: list[Tensor],
    m_norms: list[Tensor],
    v_norms: list[Tensor],
    *,
    gamma1: float,
    gamma2: float,
    gamma3: float,
    reset: bool,
    **adam: float,
) -> None:
    """Multi-tensor path: per-tensor reductions with ``_foreach_norm``, per-tensor factors as 0-dim tensors."""
    eps = adam["eps"]
    lists = [params, grads, exp_avgs, exp_avg_sqs, steps, stat_steps, m_maxs, m_norms, v_norms]
    for dev_lists, _ in StepCountedOptimizer._group_tensors_by_device_and_dtype(lists).values():
        dev_params, dev_grads, dev_m, dev_v, dev_steps, dev_u, dev_m_max, dev_m_norm, dev_v_norm = dev_lists
        p32, g32 = as_compute(dev_params), as_compute(dev_grads)
        torch._foreach_add_(dev_u, 1.0)
        us = [u.item() for u in dev_u]  # CPU tensors: no device sync
        _clip_and_normalise_(
            g32, dev_m_max, dev_m_norm, dev_v_norm,
            [1 - gamma3**u for u in us], [1 - gamma1**u for u in us], [1 - gamma2**u for u in us],
            gamma1=gamma1, gamma2=gamma2, gamma3=gamma3, eps=eps,
        )
        # 3. Adam on the fresh moments at a reset step
        if reset:
            torch._foreach_zero_(dev_m)
            torch._foreach_zero_(dev_v)
            torch._foreach_zero_(dev_steps)
        torch._foreach_add_(dev_steps, 1.0)
        adam_step_foreach_(p32, g32, dev_m, dev_v, [t.item() for t in dev_steps], **adam)
        write_back(dev_params, p32)


def _clip_and_normalise_(
    grads: list[Tensor],
    m_maxs: list[Tensor],
    m_norms: list[Tensor],
    v_norms: list[Tensor],
    bc3: list[float] | list[Tensor],
    bc1: list[float] | list[Tensor],
    bc2: list[float] | list[Tensor],
    *,
    gamma1: float | Tensor,
    gamma2: float,
    gamma3: float,
    eps: float,
) -> None:
    """Steps 1-2 on same-device tensors, in place: the adaptive clip, then the rescale to the running norm
    ratio. Bias corrections 1 − γ^u come as host floats (eager) or device tensors (compiled), and γ1' as a
    float or a device tensor; per-tensor factors stay 0-dim device tensors, so nothing is read on the host."""
    # 1. entries above m_max_hat are scaled by m_max_hat / max|g|
    peaks = peak_abs(grads)
    torch._foreach_lerp_(m_maxs, peaks, 1 - gamma3)
    m_max_hat = torch._foreach_div(m_maxs, bc3)
    peak, cap = torch.stack(peaks), torch.stack(m_max_hat)
    ratio_minus_one = (_clip_ratio(peak, cap) - 1.0).unbind()
    factor = torch._foreach_abs(grads)
    torch._foreach_sub_(factor, m_max_hat)
    torch._foreach_sign_(factor)
    torch._foreach_clamp_min_(factor, 0.0)  # 1 where |g| > m_max_hat, else 0
    torch._foreach_mul_(factor, ratio_minus_one)
    torch._foreach_add_(factor, 1.0)
    torch._foreach_mul_(grads, factor)
    del factor
    # 2. rescale each tensor by c / n (vectorised over the tensors)
    norms = safe_norms(grads, torch.minimum(peak, cap).unbind())
    stats = _statistic_norm(torch.stack(norms)).unbind()
    torch._foreach_mul_(m_norms, gamma1)  # not _foreach_lerp_: it would read a tensor γ1' on the host
    torch._foreach_add_(m_norms, torch._foreach_mul(stats, 1 - gamma1))
    torch._foreach_mul_(v_norms, gamma2)
    torch._foreach_addcmul_(v_norms, stats, stats, 1 - gamma2)
    m_hat = torch._foreach_div(m_norms, bc1)
    denom = torch._foreach_div(v_norms, bc2)
    torch._foreach_sqrt_(denom)
    torch._foreach_add_(denom, eps)
    c = torch.stack(torch._foreach_div(m_hat, denom))
    n = torch.stack(norms)
    positive = n > 0
    torch._foreach_mul_(grads, torch.where(positive, c / torch.where(positive, n, 1.0), 1.0).unbind())


def _clip_ratio(peak: Tensor, cap: Tensor) -> Tensor:
    """m̂_max / max|g| where the peak exceeds the cap, else 1: always in (0, 1], never inf or NaN.

    Dividing by a clamped peak everywhere overflows for an all-zero gradient after a large one
    (m̂_max / tiny = inf, and the 0·inf of the masked multiply is NaN).
    """
    clipped = peak > cap
    return torch.where(clipped, cap / torch.where(clipped, peak, torch.ones_like(peak)), torch.ones_like(peak))


def _statistic_norm(norm: Tensor) -> Tensor:
    """The norm as it enters m_norm and v_norm: capped at √(dtype max)·1e-4, so v_norm = EMA(n²) and
    its bias correction by 1 − γ2^u (down to 1e-5 for γ2 = 0.99999) stay finite; a real gradient norm is
    never near that cap (1.8e15 in fp32), only an overflowing one."""
    return norm.clamp_max(torch.finfo(norm.dtype).max ** 0.5 * 1e-4)


def _stable_spam_capturable(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    steps: list[Tensor],
    stat_steps: list[Tensor],
    m_maxs: list[Tensor],
    m_norms: list[Tensor],
    v_norms: list[Tensor],
    lr: Tensor,
    beta1: Tensor,
    gamma1: Tensor,
    keep: Tensor,
    *,
    beta2: float,
    gamma2: float,
    gamma3: float,
    eps: float,
    weight_decay: float,
) -> None:
    """The multi-tensor step with lr, β1', γ1', the reset mask (keep = 0) and all counters on the device,
    for ``torch.compile``."""
    p32, g32 = as_compute(params), as_compute(grads)
    decoupled_decay_(p32, lr, weight_decay)
    torch._foreach_add_(stat_steps, 1.0)
    _clip_and_normalise_(
        g32, m_maxs, m_norms, v_norms,
        one_minus_pow(gamma3, stat_steps), one_minus_pow(gamma1, stat_steps), one_minus_pow(gamma2, stat_steps),
        gamma1=gamma1, gamma2=gamma2, gamma3=gamma3, eps=eps,
    )
    for moment in (exp_avgs, exp_avg_sqs, steps):  # fresh moments and k = 1 at a reset step
        torch._foreach_mul_(moment, keep)
    torch._foreach_add_(steps, 1.0)
    torch._foreach_mul_(exp_avgs, beta1)
    torch._foreach_add_(exp_avgs, torch._foreach_mul(g32, 1 - beta1))
    second_moment_capturable_(exp_avg_sqs, g32, beta2)
    denoms = adam_denoms_capturable(exp_avg_sqs, steps, beta2, eps)
    torch._foreach_mul_(denoms, one_minus_pow(beta1, steps))
    update = torch._foreach_div(exp_avgs, denoms)
    torch._foreach_mul_(update, lr)
    torch._foreach_sub_(p32, update)
    write_back(params, p32)
