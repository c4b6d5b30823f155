"""EXAdam: Adam with cross-moment debiasing and a gradient acceleration term (arXiv 2412.20302)."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any, Literal

import torch
from torch import Tensor

from lightning_optim._base import StateSpec, StepCountedOptimizer, as_compute, compiled, write_back
from lightning_optim.functional import (
    adam_moments_,
    adam_moments_capturable_,
    adam_moments_foreach_,
    decoupled_decay_,
)
from lightning_optim.validation import check_betas, check_bool, check_compile, check_range, check_state_bits

__all__ = ["EXAdam", "cross_factor", "exadam_growth"]


def exadam_growth(step: float, dynamic_step_size: bool) -> float:
    """The step-size multiplier of step t: ln(√2·√(t + 1)) with ``dynamic_step_size``, else 1.

    Args:
        step: t, the 1-based count of the tensor's moment updates, this step included.
        dynamic_step_size: the growing step size of the paper's first version (arXiv 2412.20302v1).
    """
    return math.log(math.sqrt(2.0) * math.sqrt(step + 1.0)) if dynamic_step_size else 1.0


def cross_factor(x: Tensor, beta_t: float, eps: float) -> Tensor:
    """d = 1 + β^t·x/(x + ε) for one tensor (a new tensor), written as (1 + β^t) − β^t·ε/(x + ε).

    The rewritten form is finite for every x in [0, inf] (x/(x + ε) is inf/inf = NaN once x overflowed);
    d lies in [1, 1 + β^t], so the cancellation in 1 − ε/(x + ε) costs at most one rounding of d.

    Args:
        x: v (for d1) or m² (for d2), non-negative.
        beta_t: β2^t (d1) or β1^t (d2).
        eps: ε > 0.
    """
    return (x + eps).reciprocal_().mul_(-eps * beta_t).add_(1.0 + beta_t)


class EXAdam(StepCountedOptimizer):
    r"""EXAdam: Adam whose moments are debiased by each other, plus a gradient acceleration term.

    Adly, "EXAdam: The Power of Adaptive Cross-Moments", arXiv 2412.20302; follows the authors' code
    (``exadam.py`` of AhmedMostafa16/EXAdam, lines 92-132 at commit 6e3a170, and lines 92-135 of the first
    release 9ff8463 for the dynamic step size). For a parameter whose moments were updated t times:

    .. math::
        \theta \leftarrow \theta (1 - \eta\lambda) \\
        m \leftarrow \beta_1 m + (1-\beta_1) g, \qquad v \leftarrow \beta_2 v + (1-\beta_2) g^2 \\
        d_1 = 1 + \beta_2^t \frac{v}{v + \epsilon}, \qquad d_2 = 1 + \beta_1^t \frac{m^2}{m^2 + \epsilon} \\
        \tilde m = \frac{m}{1-\beta_1^t} d_1, \qquad \tilde v = \frac{v}{1-\beta_2^t} d_2, \qquad
        \tilde g = \frac{g}{1-\beta_1^t} d_1 \\
        \theta \leftarrow \theta - \eta_t \frac{\tilde m + \tilde g}{\sqrt{\tilde v} + \epsilon},
        \qquad \eta_t = \eta \ (\text{default}) \text{ or } \eta \ln(\sqrt 2 \sqrt{t+1})
        \ (\texttt{dynamic\_step\_size=True})

    The dynamic step size η_t = η·ln(√2·√(t + 1)) (0.69·η at t = 1, 2.65·η at t = 100) was the third
    component of the paper's first version and of the authors' first release; the second version of the
    paper and the authors' current code dropped it, so it is off by default. Defaults (authors' code):
    lr 1e-3, betas (0.9, 0.999), eps 1e-8, weight_decay 0.

    Deviations from the authors' code: ε must be > 0 (it enters the ratios v/(v + ε) and m²/(m² + ε), which
    are 0/0 for a zero entry with ε = 0); the ratios are computed as 1 − ε/(x + ε), so an overflowed
    v or m² (a gradient entry above ~1e19 in fp32) gives the ratio's limit 1 instead of inf/inf = NaN;
    √ṽ is formed as √v/√(1 − β2^t)·√d2 and the numerator is applied as m/D′ + g/D′ with D′ = (√ṽ + ε)/d1
    (equal to the equations; no intermediate overflows for gradients near fp32's largest value); the step
    count lives in optimizer state as a CPU tensor (the authors' code keeps a Python int); the authors'
    current code also fails to construct (it still calls ``np.sqrt`` after dropping ``import numpy``).
    Decoupled weight decay θ ← θ(1 − ηλ) comes first and is scaled by the base learning rate η, not by
    η_t, as in the authors' code.

    State per parameter: ``exp_avg`` (m), ``exp_avg_sq`` (v; both fp32 for bf16/fp16 parameters) and
    ``step`` (CPU float32; on the device when compiled), as torch Adam, so a torch AdamW state dict
    converts; 8 bytes per parameter, 2.03 with ``state_bits=8``.

    Args:
        params: parameters or param groups (every argument below may be overridden per group).
        lr: learning rate η (default 1e-3, the authors').
        betas: (β1, β2) of the moment EMAs (default (0.9, 0.999), the authors').
        eps: ε > 0 of the cross-moment ratios and of the denominator (default 1e-8, the authors').
        weight_decay: decoupled weight decay λ, applied first as θ(1 − ηλ) (default 0, the authors').
        dynamic_step_size: multiply η by ln(√2·√(t + 1)) (the paper's first version; default False, as
            the authors' current code and the paper's second version).
        state_bits: 32 (fp32 moments) or 8: block-wise dynamic 8-bit m and v (``lightning_optim.lowbit``)
            for parameters with >= 4096 elements; each is dequantized, updated and requantized.
        foreach: multi-tensor path (default: on for CUDA parameters).
        compile: run the multi-tensor step through ``torch.compile`` with every per-step value (lr, the
            step counters) on the device, so it compiles once and never syncs (not with ``state_bits=8``).
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
        weight_decay: float = 0.0,
        dynamic_step_size: bool = False,
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
            dynamic_step_size=dynamic_step_size,
            state_bits=state_bits,
            foreach=foreach,
            compile=compile,
        )
        super().__init__(params, defaults)

    def _validate_group(self, group: dict[str, Any]) -> None:
        check_range("lr", group["lr"], 0.0)
        check_betas(group["betas"])
        check_range("eps", group["eps"], 0.0, low_open=True)
        check_range("weight_decay", group["weight_decay"], 0.0)
        check_bool("dynamic_step_size", group["dynamic_step_size"])
        check_compile(group["compile"])
        check_state_bits(group["state_bits"], group["compile"])

    def _step(self, step: int) -> None:
        for group in self.param_groups:
            params = self._params_with_grad(group, "EXAdam")
            if not params:
                continue
            states = [self._init_state(p, group) for p in params]
            beta1, beta2 = group["betas"]
            hyper = dict(
                beta1=beta1,
                beta2=beta2,
                eps=group["eps"],
                weight_decay=group["weight_decay"],
                dynamic_step_size=group["dynamic_step_size"],
            )
            keys = ("exp_avg", "exp_avg_sq", "step")
            if group["compile"]:  # never 8-bit: validation rejects compile=True with state_bits=8
                lists = [params, [p.grad for p in params]] + [[s[key] for s in states] for key in keys]
                for dev_lists, _ in self._group_tensors_by_device_and_dtype(lists).values():
                    device = dev_lists[0][0].device
                    compiled(_exadam_capturable)(*dev_lists, self._device_scalar("lr", device, group["lr"]), **hyper)
                continue
            fn = _exadam_foreach if self._use_foreach(group, params) else _exadam_single_tensor
            self._step_by_layout(fn, params, states, keys, zero_moments=False, lr=group["lr"], **hyper)


def _exadam_single_tensor(
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
    dynamic_step_size: bool,
) -> None:
    """Reference path: the equations one parameter at a time (host step counts, no sync)."""
    for param, grad, exp_avg, exp_avg_sq, step_t in zip(params, grads, exp_avgs, exp_avg_sqs, steps):
        step_t += 1
        t = step_t.item()  # CPU counter: no device sync
        p32, g32 = as_compute([param, grad])
        decoupled_decay_(p32, lr, weight_decay)
        adam_moments_(exp_avg, exp_avg_sq, g32, beta1, beta2)
        beta1_t, beta2_t = beta1**t, beta2**t
        d1 = cross_factor(exp_avg_sq, beta2_t, eps)
        d2 = cross_factor(exp_avg * exp_avg, beta1_t, eps)
        # D' = (sqrt(v / (1 - b2^t) * d2) + eps) / d1
        denom = (exp_avg_sq.sqrt() / (1 - beta2_t) ** 0.5).mul_(d2.sqrt_()).add_(eps).div_(d1)
        step_size = lr * exadam_growth(t, dynamic_step_size) / (1 - beta1_t)
        p32.addcdiv_(exp_avg, denom, value=-step_size).addcdiv_(g32, denom, value=-step_size)
        write_back([param], [p32])


def _cross_factors_foreach(xs: list[Tensor], beta_ts: list[float], eps: float) -> list[Tensor]:
    """Multi-tensor :func:`cross_factor` (new tensors)."""
    out = torch._foreach_add(xs, eps)
    torch._foreach_reciprocal_(out)
    torch._foreach_mul_(out, [-eps * b for b in beta_ts])
    torch._foreach_add_(out, [1.0 + b for b in beta_ts])
    return out


def _exadam_foreach(
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
    dynamic_step_size: bool,
) -> None:
    """Multi-tensor path, grouped by device and dtype; the reference path's operation order."""
    grouped = StepCountedOptimizer._group_tensors_by_device_and_dtype([params, grads, exp_avgs, exp_avg_sqs, steps])
    for (dev_params, dev_grads, dev_exp_avgs, dev_exp_avg_sqs, dev_steps), _ in grouped.values():
        torch._foreach_add_(dev_steps, 1.0)
        counts = [t.item() for t in dev_steps]  # CPU tensors: no device sync
        p32, g32 = as_compute(dev_params), as_compute(dev_grads)
        decoupled_decay_(p32, lr, weight_decay)
        adam_moments_foreach_(dev_exp_avgs, dev_exp_avg_sqs, g32, beta1, beta2)
        beta1_ts, beta2_ts = [beta1**t for t in counts], [beta2**t for t in counts]
        d1 = _cross_factors_foreach(dev_exp_avg_sqs, beta2_ts, eps)
        d2 = _cross_factors_foreach(torch._foreach_mul(dev_exp_avgs, dev_exp_avgs), beta1_ts, eps)
        denoms = torch._foreach_sqrt(dev_exp_avg_sqs)
        torch._foreach_div_(denoms, [(1 - b) ** 0.5 for b in beta2_ts])
        torch._foreach_sqrt_(d2)
        torch._foreach_mul_(denoms, d2)
        torch._foreach_add_(denoms, eps)
        torch._foreach_div_(denoms, d1)
        sizes = [-(lr * exadam_growth(t, dynamic_step_size) / (1 - b)) for t, b in zip(counts, beta1_ts)]
        torch._foreach_addcdiv_(p32, dev_exp_avgs, denoms, sizes)
        torch._foreach_addcdiv_(p32, g32, denoms, sizes)
        write_back(dev_params, p32)


def _exadam_capturable(
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
    dynamic_step_size: bool,
) -> None:
    """Multi-tensor step with the step counters and lr on the device, for ``torch.compile``.

    β^t, √(1 − β2^t) and the growth factor are formed in float64 from the counters and rounded once, as
    the eager paths' host numbers are, so the compiled step stays within a few ulps of them.
    """
    torch._foreach_add_(steps, 1.0)
    p32, g32 = as_compute(params), as_compute(grads)
    decoupled_decay_(p32, lr, weight_decay)
    adam_moments_capturable_(exp_avgs, exp_avg_sqs, g32, beta1, beta2)
    dtype = exp_avgs[0].dtype
    steps64 = [s.double() for s in steps]
    beta1_ts64 = torch._foreach_pow(beta1, steps64)
    beta2_ts64 = torch._foreach_pow(beta2, steps64)
    d1 = _cross_factors_capturable(exp_avg_sqs, [b.to(dtype) for b in beta2_ts64], eps)
    d2 = _cross_factors_capturable(torch._foreach_mul(exp_avgs, exp_avgs), [b.to(dtype) for b in beta1_ts64], eps)
    bc2_sqrt = torch._foreach_neg(beta2_ts64)
    torch._foreach_add_(bc2_sqrt, 1.0)
    torch._foreach_sqrt_(bc2_sqrt)
    denoms = torch._foreach_sqrt(exp_avg_sqs)
    torch._foreach_div_(denoms, [b.to(dtype) for b in bc2_sqrt])
    torch._foreach_sqrt_(d2)
    torch._foreach_mul_(denoms, d2)
    torch._foreach_add_(denoms, eps)
    torch._foreach_div_(denoms, d1)
    # denominators times 1 / (-step size) = (beta1^t - 1) / (lr * growth): then addcdiv with value 1
    inv_sizes = torch._foreach_sub(beta1_ts64, 1.0)
    if dynamic_step_size:  # growth = ln(sqrt(2) sqrt(t + 1)) = 0.5 ln(2t + 2)
        growth = torch._foreach_mul(steps64, 2.0)
        torch._foreach_add_(growth, 2.0)
        torch._foreach_log_(growth)
        torch._foreach_mul_(growth, 0.5)
        torch._foreach_div_(inv_sizes, growth)
    inv_sizes = [s.to(dtype) for s in inv_sizes]
    torch._foreach_div_(inv_sizes, lr)
    torch._foreach_mul_(denoms, inv_sizes)
    torch._foreach_addcdiv_(p32, exp_avgs, denoms)
    torch._foreach_addcdiv_(p32, g32, denoms)
    write_back(params, p32)


def _cross_factors_capturable(xs: list[Tensor], beta_ts: list[Tensor], eps: float) -> list[Tensor]:
    """:func:`_cross_factors_foreach` with β^t as device tensors (new tensors)."""
    out = torch._foreach_add(xs, eps)
    torch._foreach_reciprocal_(out)
    torch._foreach_mul_(out, beta_ts)
    torch._foreach_mul_(out, -eps)
    torch._foreach_add_(out, beta_ts)
    torch._foreach_add_(out, 1.0)
    return out
