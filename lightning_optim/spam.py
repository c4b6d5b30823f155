"""SPAM: Spike-Aware Adam with Momentum Reset (docs/algorithms.md#spam)."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any, Literal

import torch
from torch import Tensor

from lightning_optim._base import StateSpec, StepCountedOptimizer, as_compute, compiled, write_back
from lightning_optim.functional import (
    adam_denoms_capturable,
    adam_moments_capturable_,
    adam_step_,
    adam_step_foreach_,
    decoupled_decay_,
    spam_schedule,
    spam_warmup_factor,
    spike_clip_,
)
from lightning_optim.validation import check_betas, check_compile, check_int, check_range, check_state_bits

__all__ = ["SPAM", "spam_warmup_factor", "spam_schedule", "spike_clip_"]


class SPAM(StepCountedOptimizer):
    r"""SPAM: Adam with spike-aware clipping and periodic momentum reset.

    Huang et al., "SPAM: Spike-Aware Adam with Momentum Reset for Stable LLM Training", ICLR 2025
    (arXiv 2501.06842). For the global step T (1-based), k = T mod ΔT steps since the last reset and
    s the cosine warm-up factor (s = 1 − 0.99·(1 + cos(πk/(N+1)))/2 for k < N after a reset, else 1):

    .. math::
        \text{reset step } (k = 0):\ m, v \leftarrow 0 \quad(t \text{ keeps counting}) \\
        g \leftarrow \operatorname{sign}(g)\sqrt{\vartheta v} \text{ where } g^2 > \vartheta v
            \quad(\text{if } k \ge D) \\
        m \leftarrow \beta_1 m + (1-\beta_1) g,\quad v \leftarrow \beta_2 v + (1-\beta_2) g^2 \\
        \theta \leftarrow \theta (1 - \eta s \lambda) - \eta s\, \hat m / (\sqrt{\hat v} + \epsilon)

    Args:
        params: parameters or param groups (every argument below may be overridden per group).
        lr: learning rate η (default 1e-3). betas: (β1, β2) (default (0.9, 0.999)). eps: ε added to
        √v̂ as in torch Adam (default 1e-6). weight_decay: decoupled decay λ applied before the update
        and scaled by s (default 0). threshold: spike threshold ϑ (default 5000; ``math.inf`` disables
        clipping). reset_interval: ΔT steps between moment resets (default 500; 0 never resets).
        warmup_steps: N cosine warm-up steps after each reset (default 150). clip_delay: D steps after
        a reset before clipping starts (default 20; must be >= 2 when clipping is on). state_bits: 32
        (fp32 moments) or 8: block-wise dynamic 8-bit moments (``lightning_optim.lowbit``) for
        parameters with >= 4096 elements, 2.03 bytes per parameter instead of 8; smaller tensors keep
        fp32. Each such parameter is dequantized, updated with the same equations and requantized, one
        tensor at a time; a reset writes the zero code. Keep embeddings in a ``state_bits=32`` group
        (they are sensitive to 8-bit state). foreach: multi-tensor path (default: on for CUDA params).
        compile: run the multi-tensor step through ``torch.compile`` (default False), which fuses it
        into a few kernels. Every per-step value (lr·s, the reset mask, the step counters) is then a
        device tensor, so it compiles at most twice (clipping off/on) and never syncs; ``step`` state
        lives on the parameter's device, as in torch's capturable Adam. The first steps pay the
        compile time. ``compile=True`` with ``state_bits=8`` raises ``ValueError``.

    Deviations from the authors' code (see docs/algorithms.md#spam): ε is added to √v̂ (torch's form, so
    SPAM reduces exactly to AdamW + callbacks), the reset interval is an argument, clipping is disabled
    with ``threshold=inf`` instead of 0, weight decay comes before the update and is warmed up with it,
    T lives in ``param_groups[*]["global_step"]`` so resumes are exact, no sparse momentum, no host syncs.
    Clipped gradients are written back into ``p.grad``. State per parameter: ``exp_avg``,
    ``exp_avg_sq`` (fp32 for bf16/fp16 parameters) and ``step`` (CPU float32), as torch Adam; with
    8-bit state ``exp_avg_codes``/``exp_avg_absmax`` and ``exp_avg_sq_codes``/``exp_avg_sq_absmax``
    (uint8 codes in the parameter's shape, fp32 absmax per 256-block) replace the moments.
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
        weight_decay: float = 0.0,
        threshold: float = 5000.0,
        reset_interval: int = 500,
        warmup_steps: int = 150,
        clip_delay: int = 20,
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
            threshold=threshold,
            reset_interval=reset_interval,
            warmup_steps=warmup_steps,
            clip_delay=clip_delay,
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
        check_range("threshold", group["threshold"], 0.0, low_open=True, allow_inf=True)
        check_int("reset_interval", group["reset_interval"], 0)
        check_int("warmup_steps", group["warmup_steps"], 0)
        if math.isfinite(group["threshold"]):
            check_int("clip_delay", group["clip_delay"], 2)
        else:
            check_int("clip_delay", group["clip_delay"], 0)
        check_compile(group["compile"])
        check_state_bits(group["state_bits"], group["compile"])

    def _step(self, step: int) -> None:
        for group in self.param_groups:
            params = self._params_with_grad(group, "SPAM")
            if not params:
                continue
            k, is_reset, scale = spam_schedule(step, group["reset_interval"], group["warmup_steps"])
            states = [self._init_state(p, group) for p in params]
            if group["compile"]:  # never 8-bit: validation rejects compile=True with state_bits=8
                self._compiled_group_step(group, params, states, group["lr"] * scale, is_reset, k)
                continue
            beta1, beta2 = group["betas"]
            kwargs = dict(
                lr=group["lr"] * scale,
                beta1=beta1,
                beta2=beta2,
                eps=group["eps"],
                weight_decay=group["weight_decay"],
                threshold=group["threshold"] if k >= group["clip_delay"] else math.inf,
                reset=is_reset,
            )
            fn = _spam_foreach if self._use_foreach(group, params) else _spam_single_tensor
            self._step_by_layout(fn, params, states, ("exp_avg", "exp_avg_sq", "step"), zero_moments=is_reset, **kwargs)

    def _compiled_group_step(
        self, group: dict[str, Any], params: list[Tensor], states: list[dict[str, Any]], lr: float, reset: bool, k: int
    ) -> None:
        lists = [params, [p.grad for p in params]] + [[s[key] for s in states] for key in ("exp_avg", "exp_avg_sq", "step")]
        beta1, beta2 = group["betas"]
        for (dev_params, *rest), _ in self._group_tensors_by_device_and_dtype(lists).values():
            device = dev_params[0].device
            compiled(_spam_capturable)(
                dev_params,
                *rest,
                self._device_scalar("lr", device, lr),
                self._device_scalar("keep", device, 0.0 if reset else 1.0),
                beta1=beta1, beta2=beta2, eps=group["eps"], weight_decay=group["weight_decay"],
                threshold=group["threshold"], clip=math.isfinite(group["threshold"]) and k >= group["clip_delay"],
            )


def _spam_single_tensor(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    steps: list[Tensor],
    *,
    threshold: float,
    reset: bool,
    **adam: float,
) -> None:
    """Reference path: the spec's equations one parameter at a time (masked clip with ``torch.where``)."""
    for param, grad, exp_avg, exp_avg_sq, step_t in zip(params, grads, exp_avgs, exp_avg_sqs, steps):
        if reset:
            exp_avg.zero_()
            exp_avg_sq.zero_()
        step_t += 1
        p32, g32 = as_compute([param, grad])
        if math.isfinite(threshold):
            limit = exp_avg_sq * threshold
            g32 = torch.where(g32 * g32 > limit, g32.sign() * limit.sqrt(), g32)
            grad.copy_(g32)
        adam_step_(p32, g32, exp_avg, exp_avg_sq, step_t.item(), **adam)  # CPU step: no sync
        write_back([param], [p32])


def _spam_foreach(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    steps: list[Tensor],
    *,
    threshold: float,
    reset: bool,
    **adam: float,
) -> None:
    """Multi-tensor path, grouped by device and dtype; same operation order as torch's foreach AdamW."""
    grouped = StepCountedOptimizer._group_tensors_by_device_and_dtype([params, grads, exp_avgs, exp_avg_sqs, steps])
    for (dev_params, dev_grads, dev_exp_avgs, dev_exp_avg_sqs, dev_steps), _ in grouped.values():
        if reset:
            torch._foreach_zero_(dev_exp_avgs)
            torch._foreach_zero_(dev_exp_avg_sqs)
        torch._foreach_add_(dev_steps, 1.0)
        p32, g32 = as_compute(dev_params), as_compute(dev_grads)
        if math.isfinite(threshold):
            spike_clip_(g32, dev_exp_avg_sqs, threshold)
            write_back(dev_grads, g32)
        counts = [t.item() for t in dev_steps]  # CPU tensors: no device sync
        adam_step_foreach_(p32, g32, dev_exp_avgs, dev_exp_avg_sqs, counts, **adam)
        write_back(dev_params, p32)


def _spam_capturable(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    steps: list[Tensor],
    lr: Tensor,
    keep: Tensor,
    *,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    threshold: float,
    clip: bool,
) -> None:
    """Multi-tensor step with every per-step value on the device (lr, keep = 0 at a reset, step counters),
    for ``torch.compile``; bias corrections as in torch's capturable foreach Adam."""
    torch._foreach_mul_(exp_avgs, keep)
    torch._foreach_mul_(exp_avg_sqs, keep)
    torch._foreach_add_(steps, 1.0)
    p32, g32 = as_compute(params), as_compute(grads)
    if clip:
        spike_clip_(g32, exp_avg_sqs, threshold)
        write_back(grads, g32)
    adam_moments_capturable_(exp_avgs, exp_avg_sqs, g32, beta1, beta2)
    decoupled_decay_(p32, lr, weight_decay)
    neg_step_size = torch._foreach_pow(beta1, steps)  # becomes lr / (beta1^t - 1) = -lr / bc1
    torch._foreach_sub_(neg_step_size, 1)
    torch._foreach_div_(neg_step_size, lr)
    torch._foreach_reciprocal_(neg_step_size)
    denom = adam_denoms_capturable(exp_avg_sqs, steps, beta2, eps)
    torch._foreach_div_(denom, neg_step_size)
    torch._foreach_addcdiv_(p32, exp_avgs, denom)
    write_back(params, p32)

