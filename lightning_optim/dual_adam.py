"""DualAdam: Adam blended with its inverse counterpart (InvAdam), the blend decaying linearly to Adam."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Literal

import torch
from torch import Tensor

from lightning_optim._base import StateSpec, StepCountedOptimizer, as_compute, compiled, write_back
from lightning_optim.functional import (
    adam_denom,
    adam_denoms_foreach,
    adam_moments_,
    adam_moments_capturable_,
    adam_moments_foreach_,
    adam_step_,
    adam_step_foreach_,
    decoupled_decay_,
    one_minus_pow,
)
from lightning_optim.validation import check_betas, check_compile, check_range, check_state_bits

__all__ = ["DualAdam", "dual_adam_mix"]


def dual_adam_mix(step: int, switch_rate: float) -> float:
    """The weight of the inverse update at global step T: α_T = max(0, 1 − ξ·T), set to 0 once α_T < ξ.

    The authors' code uses the blend only while α_T ≥ ξ and the plain Adam step otherwise, so α_T is 0
    from T = 1/ξ on (and already where 0 < α_T < ξ, which happens when 1/ξ is not an integer).

    Args:
        step: T, the 1-based global step.
        switch_rate: ξ.
    """
    alpha = max(0.0, 1.0 - step * switch_rate)
    return alpha if alpha >= switch_rate else 0.0


class DualAdam(StepCountedOptimizer):
    r"""DualAdam: a convex blend of Adam's update and the inverse Adam (InvAdam) update.

    Shi, Chen, Jin and Zhou, "Combining Adam and its Inverse Counterpart to Enhance Generalization of Deep
    Learning Optimizers" (arXiv 2603.07122); follows the authors' code (``DualAdam.py`` of
    LongJin-lab/DualAdam, lines 5-66 at commit e40133b). With D = √v̂ + ε, InvAdam multiplies m̂ by D
    where Adam divides by it (larger steps along directions of large second moment, to escape sharp
    minima); the blend decays linearly to Adam. For the global step T and a parameter whose moments were
    updated t times:

    .. math::
        m \leftarrow \beta_1 m + (1-\beta_1) g, \qquad v \leftarrow \beta_2 v + (1-\beta_2) g^2 \\
        \hat m = \frac{m}{1-\beta_1^t}, \qquad D = \sqrt{\frac{v}{1-\beta_2^t}} + \epsilon \\
        \alpha_T = \max(0, 1 - \xi T) \ \text{ if } \max(0, 1 - \xi T) \ge \xi, \text{ else } 0 \\
        \theta \leftarrow \theta (1 - \eta\lambda) - \eta \left((1-\alpha_T)\frac{\hat m}{D}
            + \alpha_T\, \hat m \odot D\right)

    From T = 1/ξ on (α_T = 0) this is exactly AdamW (ε on √v̂). Defaults (the authors' class): lr 1e-3,
    betas (0.9, 0.999), eps 1e-8, switch_rate ξ 0.01 (α reaches 0 at step 100), weight_decay 0; the
    authors' CIFAR script uses lr 1e-2 with a cosine schedule and ξ = 8e-5 (12 500 inverse steps).

    **Overflow guard** (not in the paper or the authors' code): the inverse term m̂·D grows like g², so a
    large finite gradient entry can make m̂·D overflow (|g| ≳ 1.8e19 in fp32; 0·inf = NaN where v
    overflowed), push a weight beyond its dtype's range (fp16: η·g² > 65504, |g| ≳ 8e3 at η = 1e-3), or,
    on a loss whose gradient grows with the weight, feed back until it overflows (a quadratic from
    |g| ≈ 1e10 at η = 1e-3, within a few steps). Where the blended step
    would leave an entry non-finite or beyond the largest finite value of the parameter's dtype, that
    entry takes Adam's step m̂/D instead (as the authors' code does for every entry once α_T < ξ). Entries
    of ordinary size are never affected; the check is sync-free (``torch.where``).

    Deviations from the authors' code: the bias corrections use each parameter's own update count t (as
    torch Adam; the authors use the global T, which under-corrects a parameter that joined late or
    skipped steps; identical when every parameter gets a gradient every step); α uses the global T,
    stored in ``param_groups[*]["global_step"]`` so a resume continues the blend exactly (the authors'
    counter is a Python attribute that a checkpoint loses); ``step(closure)`` runs the closure under
    ``torch.enable_grad()`` (the authors' ``step`` is decorated ``no_grad`` and calls the closure inside
    it, so a closure's ``backward`` fails, which breaks Lightning); weight decay is decoupled (as the
    authors': θ ← θ − ηλθ, applied before the update); the argument is ``betas`` (the authors' ``beta1``,
    ``beta2``) and ``eps`` (their ``epsilon``).

    State per parameter: ``exp_avg`` (m), ``exp_avg_sq`` (v; both fp32 for bf16/fp16 parameters) and
    ``step`` (CPU float32; on the device when compiled), as torch Adam, so a torch AdamW state dict
    converts; 8 bytes per parameter, 2.03 with ``state_bits=8``.

    Args:
        params: parameters or param groups (every argument below may be overridden per group).
        lr: learning rate η (default 1e-3, the authors').
        betas: (β1, β2) of the moment EMAs (default (0.9, 0.999), the authors').
        eps: ε added to √v̂ in D, in both the Adam and the inverse term (default 1e-8, the authors').
        weight_decay: decoupled weight decay λ, θ(1 − ηλ) before the update (default 0, the authors').
        switch_rate: ξ in [0, 1], the per-step decrease of the inverse weight α (default 0.01, the
            authors'; 0 keeps α = 1, pure InvAdam, whose convergence the paper does not claim).
        state_bits: 32 (fp32 moments) or 8: block-wise dynamic 8-bit m and v (``lightning_optim.lowbit``)
            for parameters with >= 4096 elements; each is dequantized, updated and requantized.
        foreach: multi-tensor path (default: on for CUDA parameters).
        compile: run the multi-tensor step through ``torch.compile`` with every per-step value (lr, α, the
            step counters) on the device: at most two graphs (blend, then Adam), never a sync (not with
            ``state_bits=8``).
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
        switch_rate: float = 0.01,
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
            switch_rate=switch_rate,
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
        check_range("switch_rate", group["switch_rate"], 0.0, 1.0)
        check_compile(group["compile"])
        check_state_bits(group["state_bits"], group["compile"])

    def _step(self, step: int) -> None:
        for group in self.param_groups:
            params = self._params_with_grad(group, "DualAdam")
            if not params:
                continue
            states = [self._init_state(p, group) for p in params]
            beta1, beta2 = group["betas"]
            mix = dual_adam_mix(step, group["switch_rate"])
            hyper = dict(beta1=beta1, beta2=beta2, eps=group["eps"], weight_decay=group["weight_decay"])
            keys = ("exp_avg", "exp_avg_sq", "step")
            if group["compile"]:  # never 8-bit: validation rejects compile=True with state_bits=8
                lists = [params, [p.grad for p in params]] + [[s[key] for s in states] for key in keys]
                for dev_lists, _ in self._group_tensors_by_device_and_dtype(lists).values():
                    device = dev_lists[0][0].device
                    compiled(_dual_adam_capturable)(
                        *dev_lists,
                        self._device_scalar("lr", device, group["lr"]),
                        self._device_scalar("mix", device, mix),
                        self._device_scalar("keep", device, 1.0 - mix),
                        inverse=mix > 0,
                        limit=torch.finfo(dev_lists[0][0].dtype).max,
                        **hyper,
                    )
                continue
            fn = _dual_adam_foreach if self._use_foreach(group, params) else _dual_adam_single_tensor
            self._step_by_layout(fn, params, states, keys, zero_moments=False, lr=group["lr"], mix=mix, **hyper)


def _dual_adam_single_tensor(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    steps: list[Tensor],
    *,
    lr: float,
    mix: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
) -> None:
    """Reference path: the equations one parameter at a time (host step counts, no sync)."""
    adam = dict(lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay)
    for param, grad, exp_avg, exp_avg_sq, step_t in zip(params, grads, exp_avgs, exp_avg_sqs, steps):
        step_t += 1
        t = step_t.item()  # CPU counter: no device sync
        p32, g32 = as_compute([param, grad])
        if mix == 0:
            adam_step_(p32, g32, exp_avg, exp_avg_sq, t, **adam)
            write_back([param], [p32])
            continue
        adam_moments_(exp_avg, exp_avg_sq, g32, beta1, beta2)
        decoupled_decay_(p32, lr, weight_decay)
        denom = adam_denom(exp_avg_sq, t, beta2, eps)
        m_hat = exp_avg / (1 - beta1**t)
        adam_update = m_hat / denom
        blend = (m_hat * denom).mul_(mix).add_(adam_update, alpha=1 - mix)
        candidate = p32.add(blend, alpha=-lr)
        p32.add_(adam_update, alpha=-lr)
        _keep_representable_([p32], [candidate], torch.finfo(param.dtype).max)
        write_back([param], [p32])


def _keep_representable_(params: list[Tensor], candidates: list[Tensor], limit: float) -> None:
    """params ← candidates where |candidate| <= limit (finite and within the parameter dtype's range);
    elsewhere (overflow, or NaN from 0·inf) params keep the value they hold (Adam's step)."""
    for param, candidate in zip(params, candidates):
        param.copy_(torch.where(candidate.abs() <= limit, candidate, param))


def _dual_adam_foreach(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    steps: list[Tensor],
    *,
    lr: float,
    mix: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
) -> None:
    """Multi-tensor path, grouped by device and dtype; the reference path's operation order."""
    grouped = StepCountedOptimizer._group_tensors_by_device_and_dtype([params, grads, exp_avgs, exp_avg_sqs, steps])
    for (dev_params, dev_grads, dev_exp_avgs, dev_exp_avg_sqs, dev_steps), _ in grouped.values():
        torch._foreach_add_(dev_steps, 1.0)
        counts = [t.item() for t in dev_steps]  # CPU tensors: no device sync
        p32, g32 = as_compute(dev_params), as_compute(dev_grads)
        if mix == 0:
            adam_step_foreach_(
                p32, g32, dev_exp_avgs, dev_exp_avg_sqs, counts,
                lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay,
            )
            write_back(dev_params, p32)
            continue
        adam_moments_foreach_(dev_exp_avgs, dev_exp_avg_sqs, g32, beta1, beta2)
        decoupled_decay_(p32, lr, weight_decay)
        denoms = adam_denoms_foreach(dev_exp_avg_sqs, counts, beta2, eps)
        m_hats = torch._foreach_div(dev_exp_avgs, [1 - beta1**t for t in counts])
        adam_updates = torch._foreach_div(m_hats, denoms)
        blends = torch._foreach_mul(m_hats, denoms)
        torch._foreach_mul_(blends, mix)
        torch._foreach_add_(blends, adam_updates, alpha=1 - mix)
        candidates = torch._foreach_add(p32, blends, alpha=-lr)
        torch._foreach_add_(p32, adam_updates, alpha=-lr)
        _keep_representable_(p32, candidates, torch.finfo(dev_params[0].dtype).max)
        write_back(dev_params, p32)


def _dual_adam_capturable(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    steps: list[Tensor],
    lr: Tensor,
    mix: Tensor,
    keep: Tensor,
    *,
    inverse: bool,
    limit: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
) -> None:
    """Multi-tensor step with lr, α, 1 − α and the step counters on the device, for ``torch.compile``
    (``inverse``: α > 0, the blend with the overflow guard; else plain AdamW).

    The bias corrections are formed in float64 from the counters and rounded once, as the eager paths'
    host numbers are, and the operations follow the eager order: the inverse term grows like g², so
    after a large gradient a rounding difference of one ulp is amplified from step to step.
    """
    torch._foreach_add_(steps, 1.0)
    p32, g32 = as_compute(params), as_compute(grads)
    adam_moments_capturable_(exp_avgs, exp_avg_sqs, g32, beta1, beta2)
    decoupled_decay_(p32, lr, weight_decay)
    steps64 = [s.double() for s in steps]
    bc1 = [b.to(exp_avgs[0].dtype) for b in one_minus_pow(beta1, steps64)]
    bc2_sqrt = one_minus_pow(beta2, steps64)
    torch._foreach_sqrt_(bc2_sqrt)
    denoms = torch._foreach_sqrt(exp_avg_sqs)
    torch._foreach_div_(denoms, [b.to(exp_avg_sqs[0].dtype) for b in bc2_sqrt])
    torch._foreach_add_(denoms, eps)
    m_hats = torch._foreach_div(exp_avgs, bc1)
    adam_updates = torch._foreach_div(m_hats, denoms)
    if inverse:
        blends = torch._foreach_mul(m_hats, denoms)
        torch._foreach_mul_(blends, mix)
        torch._foreach_add_(blends, torch._foreach_mul(adam_updates, keep))
        torch._foreach_mul_(blends, lr)
        candidates = torch._foreach_sub(p32, blends)
        torch._foreach_mul_(adam_updates, lr)
        torch._foreach_sub_(p32, adam_updates)
        torch._foreach_copy_(p32, [torch.where(c.abs() <= limit, c, p) for p, c in zip(p32, candidates)])
    else:
        torch._foreach_mul_(adam_updates, lr)
        torch._foreach_sub_(p32, adam_updates)
    write_back(params, p32)
