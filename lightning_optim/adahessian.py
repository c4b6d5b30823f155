"""AdaHessian: Adam with the Hutchinson estimate of the Hessian diagonal in place of the gradient's square."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any, Literal

import torch
from torch import Tensor

from lightning_optim._base import StateSpec, StepCountedOptimizer, as_compute, write_back
from lightning_optim.functional import adam_denom, adam_denoms_foreach, decoupled_decay_, second_moment_capturable_
from lightning_optim.hessian import HessianOptimizerMixin, check_hessian_args, spatial_average_abs
from lightning_optim.validation import check_betas, check_bool, check_range, check_state_bits

__all__ = ["AdaHessian"]


class AdaHessian(HessianOptimizerMixin, StepCountedOptimizer):
    r"""AdaHessian: an adaptive second-order optimizer (Hessian-diagonal Adam).

    Yao, Gholami, Shen, Mustafa, Keutzer, Mahoney, "ADAHESSIAN: An Adaptive Second Order Optimizer for
    Machine Learning", AAAI 2021 (arXiv 2006.00719); the authors' code is amirgholami/adahessian,
    ``image_classification/optim_adahessian.py``. For the global step T, on a Hessian step (every
    ``update_every`` steps, from T = 1) with Rademacher probes z (``n_samples`` of them averaged):

    .. math::
        D = |\operatorname{mean}_s\, z_s \odot (H z_s)| \quad(\text{4-D kernels: its mean over dims 2, 3}) \\
        m \leftarrow \beta_1 m + (1-\beta_1) g,\qquad v \leftarrow \beta_2 v + (1-\beta_2) D^2
            \quad(\text{Hessian steps only}) \\
        \theta \leftarrow \theta (1 - \eta\lambda) - \eta\, \frac{m / (1-\beta_1^{t})}
            {\big(\sqrt{v} / \sqrt{1-\beta_2^{u}}\big)^{k} + \epsilon}

    with t the parameter's step count and u its count of Hessian updates (u = t when ``update_every=1``).

    Where the Hessian comes from. On a Hessian step the optimizer needs H z: either an estimate handed in
    before the step (:meth:`set_hessian_estimate`; in Lightning the callback
    ``lightning_optim.callbacks.HessianEstimator`` does it, from ``on_before_backward``, with automatic
    optimization and an unchanged ``training_step``), or gradients that carry their graph
    (``loss.backward(create_graph=True)``, as in the authors' training loop), from which ``step`` computes
    it. With neither, ``step`` raises a ``RuntimeError`` that names both fixes. Gradients with a graph are
    detached after the estimate (the authors' ``grad.detach_()``), which frees the graph.

    Args:
        params: parameters or param groups (every argument below may be overridden per group).
        lr: learning rate η (default 0.15, the authors').
        betas: (β1, β2) of the gradient EMA and of the EMA of D² (default (0.9, 0.999), the authors').
        eps: ε added to the powered denominator (default 1e-4, the authors').
        weight_decay: decoupled λ, θ ← θ·(1 − η·λ) before the update (default 0, the authors'). The authors'
            ``main.py`` passes ``weight_decay / lr`` so that the per-step decay is their nominal 5e-4.
        hessian_power: k, the power of the root denominator, in [0, 1] (default 1; the authors suggest 0.5
            for some tasks).
        update_every: a Hessian step every this many steps, at T = 1, 1 + n, ... (default 1, the authors').
            Between Hessian steps v keeps its value; its bias correction counts its own updates.
        n_samples: Hutchinson probes per estimate (default 1, the authors').
        probe: ``"rademacher"`` (default, the authors') or ``"gaussian"``.
        spatial_average: average |D| of 4-D (conv) kernels over their spatial dims (default True, the authors').
        seed: seed of the probes; the probe of parameter i at step T depends on (seed, T, i) only, so a
            resumed run and every DDP rank draw the same ones (default 0).
        state_bits: 32 (fp32 moments) or 8: block-wise dynamic 8-bit m and v for parameters with >= 4096
            elements (``lightning_optim.lowbit``; v in the square-root layout), 2.03 bytes per parameter.
        foreach: multi-tensor path (default: on for CUDA parameters).

    Deviations from the authors' code: decay is written θ·(1 − ηλ) before the update (the same numbers as
    their θ − η(m̂/denom + λθ)); the denominator is (√v/√(1 − β2^u))^k + ε with u counting v's updates
    (theirs counts steps, equal at ``update_every=1``, the only setting their code has); 3-D and other
    tensors keep element-wise |D| (their image-classification code handles <= 2-D and 4-D only); a NaN
    entry of D keeps that entry's v; a parameter whose first gradient comes on a step without an estimate
    is not moved until its first estimate (its m still accumulates). DDP: the callback averages the
    estimate across ranks (the authors' multi-GPU branch is incomplete). State per parameter: ``exp_avg``,
    ``exp_hessian_diag_sq`` (fp32 for bf16/fp16 parameters; 8 bytes per parameter) and the CPU counters
    ``step``, ``hessian_step``. No ``compile`` path: a step is dominated by the extra backward of H z.
    """

    state_spec = StateSpec(
        moments={"exp_avg": True, "exp_hessian_diag_sq": False},
        first_moment="exp_avg",
        second_moment=None,
        counters=("step", "hessian_step"),
    )

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 0.15,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-4,
        weight_decay: float = 0.0,
        hessian_power: float = 1.0,
        update_every: int = 1,
        n_samples: int = 1,
        probe: Literal["rademacher", "gaussian"] = "rademacher",
        spatial_average: bool = True,
        seed: int = 0,
        *,
        state_bits: Literal[32, 8] = 32,
        foreach: bool | None = None,
    ) -> None:
        defaults = dict(
            lr=lr,
            betas=tuple(betas),
            eps=eps,
            weight_decay=weight_decay,
            hessian_power=hessian_power,
            update_every=update_every,
            n_samples=n_samples,
            probe=probe,
            spatial_average=spatial_average,
            seed=seed,
            state_bits=state_bits,
            foreach=foreach,
        )
        super().__init__(params, defaults)

    def _validate_group(self, group: dict[str, Any]) -> None:
        check_range("lr", group["lr"], 0.0)
        check_betas(group["betas"])
        check_range("eps", group["eps"], 0.0)
        check_range("weight_decay", group["weight_decay"], 0.0)
        check_range("hessian_power", group["hessian_power"], 0.0, 1.0)
        check_bool("spatial_average", group["spatial_average"])
        check_hessian_args(group)
        check_state_bits(group["state_bits"])

    @staticmethod
    def _group_due(group: dict[str, Any], step: int) -> bool:
        return (step - 1) % group["update_every"] == 0

    def _step(self, step: int) -> None:
        estimates = self._hutchinson_for_step(step)  # raises when a Hessian step has no way to get one
        self._release_graphs(self.hessian_params())
        for group in self.param_groups:
            params = self._params_with_grad(group, "AdaHessian")
            if not params:
                continue
            states = [self._init_state(p, group) for p in params]
            folds = None
            if estimates and self._group_due(group, step):
                average = group["spatial_average"]
                folds = {p: spatial_average_abs(estimates[p], average) for p in params if p in estimates}
            beta1, beta2 = group["betas"]
            fn = _adahessian_foreach if self._use_foreach(group, params) else _adahessian_single_tensor
            self._step_by_layout(
                fn,
                params,
                states,
                ("exp_avg", "exp_hessian_diag_sq", "step", "hessian_step"),
                zero_moments=False,
                folds=folds,
                lr=group["lr"],
                beta1=beta1,
                beta2=beta2,
                eps=group["eps"],
                weight_decay=group["weight_decay"],
                hessian_power=group["hessian_power"],
            )


def _fold_squares_(exp_hessian_diag_sqs: list[Tensor], estimates: list[Tensor], beta2: float) -> None:
    """v ← β2·v + ((1 − β2)·D)·D (the shared second-moment update with D for g); NaN entries of D keep v."""
    if not exp_hessian_diag_sqs:
        return
    estimates = [d.to(v.dtype) for v, d in zip(exp_hessian_diag_sqs, estimates)]
    updated = [v.clone() for v in exp_hessian_diag_sqs]
    second_moment_capturable_(updated, estimates, beta2)
    for v, new, d in zip(exp_hessian_diag_sqs, updated, estimates):
        v.copy_(torch.where(torch.isnan(d), v, new))


def _hessian_denoms(
    exp_hessian_diag_sqs: list[Tensor], counts: Sequence[float], beta2: float, eps: float, power: float
) -> list[Tensor]:
    """(√v / √(1 − β2^u))^k + ε per tensor; for k = 1 exactly Adam's denominator (``adam_denoms_foreach``)."""
    if power == 1:
        return adam_denoms_foreach(exp_hessian_diag_sqs, counts, beta2, eps)
    denoms = torch._foreach_sqrt(exp_hessian_diag_sqs)
    torch._foreach_div_(denoms, [(1 - beta2**u) ** 0.5 for u in counts])
    torch._foreach_pow_(denoms, power)
    torch._foreach_add_(denoms, eps)
    return denoms


def _adahessian_single_tensor(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_hessian_diag_sqs: list[Tensor],
    steps: list[Tensor],
    hessian_steps: list[Tensor],
    *,
    folds: dict[Tensor, Tensor] | None,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    hessian_power: float,
) -> None:
    """Reference path: the equations one parameter at a time (CPU counters: no device sync)."""
    lists = zip(params, grads, exp_avgs, exp_hessian_diag_sqs, steps, hessian_steps)
    for param, grad, exp_avg, v, step_t, hstep_t in lists:
        step_t += 1
        p32, g32 = as_compute([param, grad])
        exp_avg.lerp_(g32, 1 - beta1)
        estimate = folds.get(param) if folds else None
        if estimate is not None:
            hstep_t += 1
            _fold_squares_([v], [estimate], beta2)
        t, u = step_t.item(), hstep_t.item()
        if u == 0:  # no curvature estimate yet: the parameter waits for its first one
            continue
        decoupled_decay_(p32, lr, weight_decay)
        if hessian_power == 1:
            denom = adam_denom(v, u, beta2, eps)
        else:
            denom = (v.sqrt() / (1 - beta2**u) ** 0.5).pow_(hessian_power).add_(eps)
        p32.addcdiv_(exp_avg, denom, value=-(lr / (1 - beta1**t)))
        write_back([param], [p32])


def _adahessian_foreach(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_hessian_diag_sqs: list[Tensor],
    steps: list[Tensor],
    hessian_steps: list[Tensor],
    *,
    folds: dict[Tensor, Tensor] | None,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    hessian_power: float,
) -> None:
    """Multi-tensor path, grouped by device and dtype, in the per-parameter path's operation order."""
    lists = [params, grads, exp_avgs, exp_hessian_diag_sqs, steps, hessian_steps]
    for (dev_params, dev_grads, dev_exp_avgs, dev_vs, dev_steps, dev_hsteps), _ in (
        StepCountedOptimizer._group_tensors_by_device_and_dtype(lists).values()
    ):
        torch._foreach_add_(dev_steps, 1.0)
        p32, g32 = as_compute(dev_params), as_compute(dev_grads)
        torch._foreach_lerp_(dev_exp_avgs, g32, 1 - beta1)
        if folds:
            fold = [i for i, p in enumerate(dev_params) if p in folds]
            if fold:
                torch._foreach_add_([dev_hsteps[i] for i in fold], 1.0)
                _fold_squares_([dev_vs[i] for i in fold], [folds[dev_params[i]] for i in fold], beta2)
        counts = [u.item() for u in dev_hsteps]  # CPU counters: no device sync
        live = [i for i, u in enumerate(counts) if u > 0]
        if not live:
            continue
        live_p32 = [p32[i] for i in live]
        decoupled_decay_(live_p32, lr, weight_decay)
        denoms = _hessian_denoms([dev_vs[i] for i in live], [counts[i] for i in live], beta2, eps, hessian_power)
        step_sizes = [-(lr / (1 - beta1 ** dev_steps[i].item())) for i in live]
        torch._foreach_addcdiv_(live_p32, [dev_exp_avgs[i] for i in live], denoms, step_sizes)
        write_back([dev_params[i] for i in live], live_p32)
