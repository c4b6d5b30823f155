"""Lion: EvoLved Sign Momentum (Chen et al. 2023, arXiv 2302.06675; authors' code google/automl lion/)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Literal

import torch
from torch import Tensor

from lightning_optim._base import StateSpec, StepCountedOptimizer, as_compute, compiled, write_back
from lightning_optim.functional import decoupled_decay_
from lightning_optim.validation import check_betas, check_compile, check_range, check_state_bits

__all__ = ["Lion"]


class Lion(StepCountedOptimizer):
    r"""Lion: the sign of an interpolation of momentum and gradient, with a second, slower EMA as momentum.

    Chen et al., "Symbolic Discovery of Optimization Algorithms", NeurIPS 2023 (arXiv 2302.06675);
    the authors' PyTorch code is google/automl ``lion/lion_pytorch.py``. Per parameter, with m the one
    moment (``exp_avg``):

    .. math::
        c = \beta_1 m + (1 - \beta_1) g \\
        \theta \leftarrow \theta (1 - \eta\lambda) - \eta \operatorname{sign}(c) \\
        m \leftarrow \beta_2 m + (1 - \beta_2) g

    β1 only sets the interpolation that is signed; the momentum itself is an EMA with β2. So m is *not*
    Adam's first moment with β1 = ``betas[0]`` (AdaptiveMomentum must not pre-mix it), and there is no
    second moment. Every entry moves by exactly η per step (plus the decay), so η should be 3-10x smaller
    than AdamW's and λ 3-10x larger to keep the decay η·λ comparable (the authors' advice).

    Args:
        params: parameters or param groups (every argument below may be overridden per group).
        lr: learning rate η (default 1e-4, the authors' default).
        betas: (β1, β2): β1 weights the momentum in the signed interpolation c, β2 is the decay of the
            momentum EMA (default (0.9, 0.99), the authors' default; they use (0.95, 0.98) where
            stability matters).
        weight_decay: decoupled decay λ, θ ← θ·(1 − η·λ) before the update, as the authors' code
            (default 0, the authors' default).
        state_bits: 32 (fp32 momentum) or 8: block-wise dynamic 8-bit momentum on the signed map
            (``lightning_optim.lowbit``) for parameters with >= 4096 elements, 1.02 bytes per parameter
            instead of 4; smaller tensors keep fp32. Each such parameter is dequantized, updated with
            the same equations and requantized, one tensor at a time. Keep embeddings in a
            ``state_bits=32`` group.
        foreach: multi-tensor path (default None: on for CUDA parameters).
        compile: run the multi-tensor step through ``torch.compile`` (default False); η is then a device
            tensor, so it compiles once per group and never syncs. ``compile=True`` with
            ``state_bits=8`` raises ``ValueError``.

    Deviations from the authors' code: none in the math (same operation order: c = m·β1 + g·(1 − β1),
    decay, update, then m ← m·β2 + g·(1 − β2)); fp32 momentum and fp32 math for bf16/fp16 parameters;
    validation of every hyper-parameter (NaN/inf rejected). Non-finite gradients: ``torch.sign`` of NaN
    is 0, so a NaN entry leaves its weight where it is but turns its m into NaN (that entry stays frozen
    until its momentum is reset, e.g. by the MomentumReset callback); an inf entry makes m infinite and
    moves the weight by η every step until then. Finite gradients always give finite weights (c and m
    are convex combinations of finite numbers). State per parameter: ``exp_avg`` (4 bytes/param for
    fp32/bf16/fp16 parameters), no step counter (Lion has no bias correction); with 8-bit state
    ``exp_avg_codes`` (uint8) and ``exp_avg_absmax`` (fp32 per 256-block).
    """

    state_spec = StateSpec(moments={"exp_avg": True}, first_moment="exp_avg", counters=())

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-4,
        betas: tuple[float, float] = (0.9, 0.99),
        weight_decay: float = 0.0,
        *,
        state_bits: Literal[32, 8] = 32,
        foreach: bool | None = None,
        compile: bool = False,
    ) -> None:
        defaults = dict(
            lr=lr,
            betas=tuple(betas),
            weight_decay=weight_decay,
            state_bits=state_bits,
            foreach=foreach,
            compile=compile,
        )
        super().__init__(params, defaults)

    def _validate_group(self, group: dict[str, Any]) -> None:
        check_range("lr", group["lr"], 0.0)
        check_betas(group["betas"])
        check_range("weight_decay", group["weight_decay"], 0.0)
        check_compile(group["compile"])
        check_state_bits(group["state_bits"], group["compile"])

    def _step(self, step: int) -> None:
        for group in self.param_groups:
            params = self._params_with_grad(group, "Lion")
            if not params:
                continue
            states = [self._init_state(p, group) for p in params]
            beta1, beta2 = group["betas"]
            hyper = dict(beta1=beta1, beta2=beta2, weight_decay=group["weight_decay"])
            if group["compile"]:  # never 8-bit: validation rejects compile=True with state_bits=8
                lists = [params, [p.grad for p in params], [s["exp_avg"] for s in states]]
                for dev_lists, _ in self._group_tensors_by_device_and_dtype(lists).values():
                    lr = self._device_scalar("lr", dev_lists[0][0].device, group["lr"])
                    compiled(_lion_capturable)(*dev_lists, lr, **hyper)
                continue
            fn = _lion_foreach if self._use_foreach(group, params) else _lion_single_tensor
            self._step_by_layout(fn, params, states, ("exp_avg",), zero_moments=False, lr=group["lr"], **hyper)


def _lion_single_tensor(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    *,
    lr: float,
    beta1: float,
    beta2: float,
    weight_decay: float,
) -> None:
    """Reference path: Lion's equations one parameter at a time."""
    for param, grad, exp_avg in zip(params, grads, exp_avgs):
        p32, g32 = as_compute([param, grad])
        direction = torch.mul(exp_avg, beta1).add_(g32, alpha=1 - beta1).sign_()
        decoupled_decay_(p32, lr, weight_decay)
        p32.add_(direction, alpha=-lr)
        exp_avg.mul_(beta2).add_(g32, alpha=1 - beta2)
        write_back([param], [p32])


def _lion_foreach(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    *,
    lr: float,
    beta1: float,
    beta2: float,
    weight_decay: float,
) -> None:
    """Multi-tensor path, grouped by device and dtype; the reference path's operation order."""
    grouped = StepCountedOptimizer._group_tensors_by_device_and_dtype([params, grads, exp_avgs])
    for (dev_params, dev_grads, dev_exp_avgs), _ in grouped.values():
        p32, g32 = as_compute(dev_params), as_compute(dev_grads)
        directions = _signed_interpolation(dev_exp_avgs, g32, beta1)
        decoupled_decay_(p32, lr, weight_decay)
        torch._foreach_add_(p32, directions, alpha=-lr)
        _momentum_(dev_exp_avgs, g32, beta2)
        write_back(dev_params, p32)


def _signed_interpolation(exp_avgs: list[Tensor], grads: list[Tensor], beta1: float) -> list[Tensor]:
    """sign(β1·m + (1 − β1)·g) for each tensor (new tensors), in the authors' operation order."""
    directions = torch._foreach_mul(exp_avgs, beta1)
    torch._foreach_add_(directions, grads, alpha=1 - beta1)
    torch._foreach_sign_(directions)
    return directions


def _momentum_(exp_avgs: list[Tensor], grads: list[Tensor], beta2: float) -> None:
    """m ← β2·m + (1 − β2)·g in place, in the authors' operation order."""
    torch._foreach_mul_(exp_avgs, beta2)
    torch._foreach_add_(exp_avgs, grads, alpha=1 - beta2)


def _lion_capturable(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    lr: Tensor,
    *,
    beta1: float,
    beta2: float,
    weight_decay: float,
) -> None:
    """The multi-tensor step with η as a 0-dim device tensor, for ``torch.compile`` (same equations)."""
    p32, g32 = as_compute(params), as_compute(grads)
    directions = _signed_interpolation(exp_avgs, g32, beta1)
    decoupled_decay_(p32, lr, weight_decay)
    torch._foreach_mul_(directions, lr)
    torch._foreach_sub_(p32, directions)
    _momentum_(exp_avgs, g32, beta2)
    write_back(params, p32)
