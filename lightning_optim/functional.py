"""The math our optimizers and callbacks share, as plain functions on tensors (no optimizer state objects).

Each piece is written once here and imported by the optimizers (``spam.py``, ``stable_spam.py``,
``adaptive_momentum.py``) and the callbacks, in the three forms torch's own optimizers use
(``torch/optim/adamw.py``): one tensor at a time (the reference path), multi-tensor over lists with
``torch._foreach_*`` (host-side step counts), and *capturable* (step counts and per-step scalars as device
tensors, for ``torch.compile``). All functions run under the caller's ``torch.no_grad()`` and never read
a device tensor on the host.

- Adam: :func:`adam_moments_`, :func:`adam_denom` (√v / √(1 − β2^t) + ε, ε added to √v̂ as in
  ``torch.optim.Adam``), :func:`adam_step_` and their ``_foreach`` / ``_capturable`` twins.
- Decoupled weight decay: :func:`decoupled_decay_` (θ ← θ·(1 − η·λ), applied before the update, η the
  learning rate after every multiplier, as in ``torch.optim.AdamW``).
- SPAM's spike clip :func:`spike_clip_` and its reset schedule with the cosine warm-up
  (:func:`spam_warmup_factor`, :func:`spam_schedule`).
- Adaptive Memory Momentum's coefficient (:func:`adaptive_beta`, :func:`effective_beta`, :func:`am_beta`).
- Overflow-safe reductions (:func:`sum_of_squares`, :func:`safe_norms`): a finite gradient must never
  produce a non-finite statistic, even when one entry's square overflows fp32 (|g| > 1.8e19).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = [
    "adam_denom",
    "adam_denoms_capturable",
    "adam_denoms_foreach",
    "adam_moments_",
    "adam_moments_capturable_",
    "adam_moments_foreach_",
    "adam_step_",
    "adam_step_foreach_",
    "adaptive_beta",
    "am_beta",
    "decoupled_decay_",
    "effective_beta",
    "inverse_sqrt",
    "one_minus_pow",
    "peak_abs",
    "pull_towards_",
    "safe_norms",
    "second_moment_capturable_",
    "spam_schedule",
    "spam_warmup_factor",
    "spike_clip_",
    "sum_of_squares",
]


# -- decoupled weight decay ----------------------------------------------------------------------------
def decoupled_decay_(params: Tensor | Sequence[Tensor], lr: float | Tensor, weight_decay: float) -> None:
    """θ ← θ·(1 − lr·λ) in place for one tensor or a list (``lr`` a float or a 0-dim device tensor).

    Args:
        params: the parameter (or compute copies of them) to decay.
        lr: the learning rate of this step, every multiplier (warm-up, schedule) included.
        weight_decay: λ; 0 does nothing.
    """
    if weight_decay == 0:
        return
    if isinstance(params, Tensor):
        params.mul_(1 - lr * weight_decay)
    elif params:
        torch._foreach_mul_(list(params), 1 - lr * weight_decay)


# -- Adam ----------------------------------------------------------------------------------------------
def adam_moments_(exp_avg: Tensor, exp_avg_sq: Tensor, grad: Tensor, beta1: float, beta2: float) -> None:
    """m ← β1·m + (1 − β1)·g and v ← β2·v + (1 − β2)·g², in place, in torch's AdamW operation order.

    Args:
        exp_avg: m.
        exp_avg_sq: v (raw, not bias-corrected).
        grad: g.
        beta1: β1.
        beta2: β2.
    """
    exp_avg.lerp_(grad, 1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)


def adam_moments_foreach_(
    exp_avgs: list[Tensor], exp_avg_sqs: list[Tensor], grads: list[Tensor], beta1: float, beta2: float
) -> None:
    """Multi-tensor :func:`adam_moments_` (same-device lists).

    Args:
        exp_avgs: first moments.
        exp_avg_sqs: second moments.
        grads: gradients.
        beta1: β1.
        beta2: β2.
    """
    torch._foreach_lerp_(exp_avgs, grads, 1 - beta1)
    torch._foreach_mul_(exp_avg_sqs, beta2)
    torch._foreach_addcmul_(exp_avg_sqs, grads, grads, 1 - beta2)


def adam_moments_capturable_(
    exp_avgs: list[Tensor], exp_avg_sqs: list[Tensor], grads: list[Tensor], beta1: float, beta2: float
) -> None:
    """:func:`adam_moments_foreach_` for compiled steps, with v's increment formed as ((1 − β2)·g)·g.

    Eager ``addcmul`` multiplies the value into the first factor before the second; inductor forms g·g
    first, which overflows to inf for |g| > 1.8e19 where eager gives a finite v. Writing the order out
    keeps the compiled path equal to the eager ones (inside the graph the extra product is fused).

    Args:
        exp_avgs: first moments.
        exp_avg_sqs: second moments.
        grads: gradients.
        beta1: β1.
        beta2: β2.
    """
    torch._foreach_lerp_(exp_avgs, grads, 1 - beta1)
    second_moment_capturable_(exp_avg_sqs, grads, beta2)


def second_moment_capturable_(exp_avg_sqs: list[Tensor], grads: list[Tensor], beta2: float) -> None:
    """v ← β2·v + ((1 − β2)·g)·g for compiled steps (see :func:`adam_moments_capturable_` for the order).

    Args:
        exp_avg_sqs: second moments.
        grads: gradients.
        beta2: β2.
    """
    torch._foreach_mul_(exp_avg_sqs, beta2)
    torch._foreach_addcmul_(exp_avg_sqs, torch._foreach_mul(grads, 1 - beta2), grads)


def adam_denom(exp_avg_sq: Tensor, step: float, beta2: float, eps: float) -> Tensor:
    """D = √v / √(1 − β2^t) + ε for one tensor (a new tensor).

    Args:
        exp_avg_sq: v.
        step: t, the 1-based count of v's updates (a host number).
        beta2: β2.
        eps: ε, added to √v̂ as ``torch.optim.Adam`` does.
    """
    return (exp_avg_sq.sqrt() / (1 - beta2**step) ** 0.5).add_(eps)


def adam_denoms_foreach(exp_avg_sqs: list[Tensor], steps: Sequence[float], beta2: float, eps: float) -> list[Tensor]:
    """Multi-tensor :func:`adam_denom` with one host step count per tensor.

    Args:
        exp_avg_sqs: second moments.
        steps: t per tensor (host numbers).
        beta2: β2.
        eps: ε.
    """
    denoms = torch._foreach_sqrt(exp_avg_sqs)
    torch._foreach_div_(denoms, [(1 - beta2**t) ** 0.5 for t in steps])
    torch._foreach_add_(denoms, eps)
    return denoms


def one_minus_pow(base: float | Tensor, exponents: list[Tensor]) -> list[Tensor]:
    """[1 − base^t for t in exponents], on the device (``base`` a float or a 0-dim device tensor).

    Args:
        base: β (a float, or a device tensor for a per-step β such as Stable-SPAM's β1').
        exponents: device step counters.
    """
    out = torch._foreach_pow([base] * len(exponents) if isinstance(base, Tensor) else base, exponents)
    torch._foreach_neg_(out)
    torch._foreach_add_(out, 1.0)
    return out


def adam_denoms_capturable(exp_avg_sqs: list[Tensor], steps: list[Tensor], beta2: float, eps: float) -> list[Tensor]:
    """:func:`adam_denoms_foreach` with the step counters on the device (torch's capturable Adam).

    Args:
        exp_avg_sqs: second moments.
        steps: t per tensor, as device tensors.
        beta2: β2.
        eps: ε.
    """
    bc2_sqrt = one_minus_pow(beta2, steps)
    torch._foreach_sqrt_(bc2_sqrt)
    denoms = torch._foreach_sqrt(exp_avg_sqs)
    torch._foreach_div_(denoms, bc2_sqrt)
    torch._foreach_add_(denoms, eps)
    return denoms


def adam_step_(
    param: Tensor,
    grad: Tensor,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    step: float,
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
) -> None:
    """One AdamW step of one tensor: moments, decoupled decay, θ ← θ − lr/(1 − β1^t)·m/D.

    Args:
        param: θ (an fp32 compute copy for half-precision parameters).
        grad: g.
        exp_avg: m.
        exp_avg_sq: v.
        step: t after this step's increment (host number).
        lr: the learning rate, every multiplier included.
        beta1: β1.
        beta2: β2.
        eps: ε added to √v̂.
        weight_decay: decoupled λ.
    """
    adam_moments_(exp_avg, exp_avg_sq, grad, beta1, beta2)
    decoupled_decay_(param, lr, weight_decay)
    param.addcdiv_(exp_avg, adam_denom(exp_avg_sq, step, beta2, eps), value=-(lr / (1 - beta1**step)))


def adam_step_foreach_(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    steps: Sequence[float],
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
) -> None:
    """Multi-tensor :func:`adam_step_` (same-device lists; one host step count per tensor).

    Args:
        params: θ (compute copies).
        grads: g.
        exp_avgs: m.
        exp_avg_sqs: v.
        steps: t per tensor.
        lr: learning rate.
        beta1: β1.
        beta2: β2.
        eps: ε.
        weight_decay: decoupled λ.
    """
    adam_moments_foreach_(exp_avgs, exp_avg_sqs, grads, beta1, beta2)
    decoupled_decay_(params, lr, weight_decay)
    denoms = adam_denoms_foreach(exp_avg_sqs, steps, beta2, eps)
    torch._foreach_addcdiv_(params, exp_avgs, denoms, [-(lr / (1 - beta1**t)) for t in steps])


# -- SPAM ----------------------------------------------------------------------------------------------
def spam_warmup_factor(k: int, warmup_steps: int) -> float:
    """SPAM's cosine warm-up after a reset: s = 1 − 0.99·(1 + cos(πk/(N + 1)))/2 for k < N, else 1.

    Args:
        k: steps since the reset (0 at the reset step itself, where s = 0.01).
        warmup_steps: N.
    """
    if k >= warmup_steps:
        return 1.0
    return 1.0 - 0.99 * (1.0 + math.cos(math.pi * k / (warmup_steps + 1))) / 2.0


def spam_schedule(step: int, reset_interval: int, warmup_steps: int) -> tuple[int, bool, float]:
    """SPAM's reset schedule for the 1-based global step T: (k = T mod ΔT, whether T resets, warm-up s).

    Args:
        step: T.
        reset_interval: ΔT (0: never reset).
        warmup_steps: N, the warm-up length after each reset.
    """
    if reset_interval > 0:
        k = step % reset_interval
        reset_happened = step >= reset_interval
    else:
        k, reset_happened = step, False
    is_reset = reset_interval > 0 and k == 0
    scale = spam_warmup_factor(k, warmup_steps) if reset_happened else 1.0
    return k, is_reset, scale


def spike_clip_(grads: list[Tensor], exp_avg_sqs: list[Tensor], threshold: float, scale: Tensor | None = None) -> None:
    """SPAM's element-wise spike clip, in place and sync-free: where g² > ϑ·v, g ← sign(g)·√(ϑ·v).

    Written as a clamp of g to [−√(ϑv), √(ϑv)], which selects the same entries and gives the same values
    as the masked form, with no boolean indexing. An overflowed bound (v = inf) clips nothing.

    Args:
        grads: gradients, clipped in place.
        exp_avg_sqs: raw second moments v (the optimizer's, before this step's update).
        threshold: ϑ.
        scale: a device tensor multiplying the bound, for gradients that still carry a GradScaler's scale.
    """
    bound = torch._foreach_mul(exp_avg_sqs, threshold)
    torch._foreach_sqrt_(bound)
    if scale is not None:
        torch._foreach_mul_(bound, scale)
    torch._foreach_minimum_(grads, bound)
    torch._foreach_neg_(bound)
    torch._foreach_maximum_(grads, bound)


# -- overflow-safe reductions ----------------------------------------------------------------------------
def peak_abs(tensors: list[Tensor]) -> list[Tensor]:
    """max |x| of each tensor as 0-dim tensors (NaN where the tensor holds a NaN).

    Taken as max(max x, −min x) from one ``aminmax`` pass: on the CPU ``_foreach_norm(x, inf)`` is about
    8x slower than an L2 norm (it is not vectorised), while ``aminmax`` costs about as much as one.

    Args:
        tensors: same-device tensors.
    """
    out = []
    for x in tensors:
        low, high = torch.aminmax(x)
        out.append(torch.maximum(high, -low))
    return out


def safe_norms(tensors: list[Tensor], peaks: list[Tensor] | None = None) -> list[Tensor]:
    """Per-tensor L2 norms that stay finite for finite inputs.

    The fp32 norm of a tensor overflows to inf once an entry exceeds √(fp32 max) ≈ 1.8e19, although the
    norm itself is representable. Where that happens (inf from a tensor whose peak |x| is finite), the
    norm is replaced by the upper bound peak·√numel (at most √numel times the true norm, which lies in
    [peak, peak·√numel]). Cheap: the check runs on the stacked 0-dim norms, sync-free.

    Args:
        tensors: same-device tensors.
        peaks: their max |x| if already computed (:func:`peak_abs`); computed otherwise.
    """
    norms = torch._foreach_norm(tensors)
    if peaks is None:
        peaks = peak_abs(tensors)
    n = torch.stack(norms)
    # host-side factors as a scalar list: no tensor built from Python numbers (an H2D copy) every step
    bound = torch.stack(torch._foreach_mul(peaks, [math.sqrt(t.numel()) for t in tensors]))
    overflowed = torch.isinf(n) & torch.isfinite(bound)
    return list(torch.where(overflowed, bound, n).unbind())


def sum_of_squares(tensors: list[Tensor], scales: list[Tensor] | None = None) -> Tensor:
    """Σ_i Σ x_i² (or Σ (x_i·s_i)²) over same-device tensors as a 0-dim float64 tensor, overflow-safe.

    Per-tensor norms are combined in float64, so a model-wide sum above fp32's range stays finite. An
    entry whose own square overflows fp32 makes its tensor's share ``inf``; callers decide what an
    infinite statistic means (see :func:`am_beta`). For a weighted sum Σ x²/D pass ``scales`` = 1/√D
    (:func:`inverse_sqrt`), computed once and shared by every sum over the same D.

    Args:
        tensors: x_i.
        scales: per-entry factors s_i of the same shapes, or None for plain squares.
    """
    if torch.compiler.is_compiling():
        # inside a compiled step a plain reduction fuses with the product (one pass, no temporary);
        # _foreach_norm would run as an opaque kernel on a materialised product
        pairs = tensors if scales is None else [x * s for x, s in zip(tensors, scales)]
        return torch.stack([x.square().sum() for x in pairs]).double().sum()
    norms = torch._foreach_norm(tensors if scales is None else torch._foreach_mul(tensors, scales))
    return torch.stack(norms).double().square().sum()


def inverse_sqrt(tensors: list[Tensor]) -> list[Tensor]:
    """1/√w for each tensor (new tensors): the scales that turn Σ x²/w into :func:`sum_of_squares` form.

    Args:
        tensors: positive weights w (e.g. Adam's denominator; w = inf gives scale 0).
    """
    return torch._foreach_rsqrt(tensors)


# -- Adaptive Memory Momentum -----------------------------------------------------------------------------
def adaptive_beta(sq_grad: Tensor, sq_diff: Tensor, memory_weight: float, beta_max: float) -> Tensor:
    """β* = clip((1 + λ)·A/B − λ, 0, β_max) with A = ⟨g, g⟩_P and B = ⟨d − g, d − g⟩_P; β* = 0 when B = 0.

    The minimiser over [0, β_max] of the proximal model of docs/algorithms.md#adaptive-memory-momentum. Sync-free.

    Args:
        sq_grad: A (0-dim tensor).
        sq_diff: B (0-dim tensor).
        memory_weight: λ.
        beta_max: upper clip.
    """
    positive = sq_diff > 0
    raw = (1 + memory_weight) * sq_grad / torch.where(positive, sq_diff, torch.ones_like(sq_diff)) - memory_weight
    return torch.where(positive, raw.clamp(0.0, beta_max), torch.zeros_like(raw))


def effective_beta(beta: Tensor, memory_weight: float) -> Tensor:
    """β_eff = (β* + λ)/(1 + λ): the EMA coefficient of the memory, d ← β_eff·d + (1 − β_eff)·g.

    Args:
        beta: β*.
        memory_weight: λ.
    """
    return (beta + memory_weight) / (1 + memory_weight)


def am_beta(sq_grad: Tensor, sq_diff: Tensor, memory_weight: float, beta_max: float) -> Tensor:
    """:func:`adaptive_beta` that stays finite when A or B overflowed (or is NaN from inf/inf).

    An infinite A or B comes from a gradient entry whose square overflows; then g dominates d, so
    d − g ≈ −g, A/B → 1 and β* → min(1, β_max) = β_max: that limit is used.

    Args:
        sq_grad: A.
        sq_diff: B.
        memory_weight: λ.
        beta_max: upper clip.
    """
    beta = adaptive_beta(sq_grad, sq_diff, memory_weight, beta_max)
    overflowed = ~(torch.isfinite(sq_grad) & torch.isfinite(sq_diff))
    return torch.where(overflowed, torch.full_like(beta, beta_max), beta)


def pull_towards_(memories: list[Tensor], diffs: list[Tensor], weight: Tensor) -> None:
    """d ← d − w·(d − g) = (1 − w)·d + w·g in place, reusing the d − g a reduction already computed.

    ``weight`` stays a device tensor: ``_foreach_mul_`` has a Tensor overload, while ``_foreach_lerp_``
    only takes a Scalar weight, which would read the tensor on the host (a sync) every step.

    Args:
        memories: d (updated in place).
        diffs: d − g for the same tensors (overwritten).
        weight: w, a 0-dim tensor (1 − β_eff for AM; (β0 − β_eff)/β0 for the AdaptiveMomentum pre-mix).
    """
    torch._foreach_mul_(diffs, weight.to(device=diffs[0].device, dtype=diffs[0].dtype))
    torch._foreach_sub_(memories, diffs)
