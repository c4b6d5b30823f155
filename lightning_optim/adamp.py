"""AdamP and SGDP: momentum optimizers that drop the radial part of the update on scale-invariant weights.

Heo et al., "AdamP: Slowing Down the Slowdown for Momentum Optimizers on Scale-invariant Weights", ICLR 2021
(arXiv 2006.08217); the authors' code is clovaai/AdamP (``adamp/adamp.py``, ``adamp/sgdp.py``), which is
the specification followed here (docs/algorithms.md lists where it differs from the paper).

The projection (:func:`radial_projection_`) is shared by both optimizers and by all their paths
(per-parameter, multi-tensor, compiled, 8-bit): per tensor of two or more dimensions it takes batched
reductions over all but the first dimension, decides on the device (``torch.where``, never a Python
branch on a tensor) and stays finite for every finite gradient, even one whose square overflows fp32.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any, Literal

import torch
from torch import Tensor

from lightning_optim._base import StateSpec, StepCountedOptimizer, as_compute, compiled, write_back
from lightning_optim.functional import (
    adam_denom,
    adam_denoms_capturable,
    adam_denoms_foreach,
    adam_moments_,
    adam_moments_capturable_,
    adam_moments_foreach_,
    decoupled_decay_,
    one_minus_pow,
)
from lightning_optim.validation import check_betas, check_bool, check_compile, check_range, check_state_bits

__all__ = ["SGDP", "AdamP", "radial_projection_"]


# -- the projection ------------------------------------------------------------------------------------
def _row_scales(x: Tensor, dims: tuple[int, ...]) -> Tensor:
    """max |x| over ``dims`` per leading index (clamped to the dtype's smallest normal, so zero rows
    divide by a positive number and stay zero; NaN and inf propagate)."""
    peak = torch.maximum(x.amax(dim=dims), x.amin(dim=dims).neg())
    return peak.clamp_min(torch.finfo(x.dtype).tiny)


def radial_projection_(update: Tensor, param: Tensor, grad: Tensor, delta: float, eps: float) -> Tensor:
    r"""AdamP's projection of one tensor (two or more dimensions), in place on ``update``; returns whether it
    projected, as a 0-dim bool tensor on the device.

    With the channel view (one row per index of the first dimension, d = numel / rows entries each) and
    the layer view (one row, d = numel), cos = |⟨g, w⟩| / (max(‖g‖, ε)·max(‖w‖, ε)) per row (what
    ``F.cosine_similarity(..., eps=ε).abs()`` computes). The first view, channel then layer, whose
    largest cos is below δ/√d is used:

    .. math::
        \hat w = w / (\|w\| + \epsilon),\quad u \leftarrow u - \hat w\,\langle \hat w, u\rangle \quad(\text{per row})

    Overflow-safe without a sync: g and w are divided by their per-row peak |x| before the reductions
    (entries in [-1, 1], so no square overflows; cos is scale-invariant), and the per-row results are
    combined in float64 (float32 on MPS), where the layer view's sums and the norms stay finite for every
    finite fp32 input. The removed component is applied as u ← u − ŵ·c with c = peak·⟨w, u⟩/(‖w‖ + ε)²,
    |c·ŵ| ≤ ‖u‖, so a finite update stays finite.

    Args:
        update: u, the update to project (changed in place).
        param: w (the weights before this step's decay), in the compute dtype.
        grad: g, the raw gradient, in the compute dtype (used for the cosine only).
        delta: δ; 0 never projects.
        eps: ε inside the cosine (norm clamp) and in the normalisation ‖w‖ + ε.
    """
    dims = tuple(range(1, param.ndim))
    shape = (-1,) + (1,) * (param.ndim - 1)
    acc = torch.float32 if param.device.type == "mps" else torch.float64
    g_scale, p_scale = _row_scales(grad, dims), _row_scales(param, dims)
    g_hat = grad / g_scale.view(shape)
    p_hat = param / p_scale.view(shape)
    gs, ps = g_scale.to(acc), p_scale.to(acc)
    g_norm = torch.linalg.vector_norm(g_hat, dim=dims).to(acc) * gs
    p_norm = torch.linalg.vector_norm(p_hat, dim=dims).to(acc) * ps
    dot = (g_hat * p_hat).sum(dim=dims).to(acc) * (gs * ps)
    radial = (p_hat * update).sum(dim=dims).to(acc) * ps  # ⟨w, u⟩ per row
    cols = param.numel() // param.shape[0]

    channel = (dot.abs() / (g_norm.clamp_min(eps) * p_norm.clamp_min(eps))).amax() < delta / math.sqrt(cols)
    g_norm_layer = g_norm.square().sum().sqrt()
    p_norm_layer = p_norm.square().sum().sqrt()
    cos_layer = dot.sum().abs() / (g_norm_layer.clamp_min(eps) * p_norm_layer.clamp_min(eps))
    layer = cos_layer < delta / math.sqrt(param.numel())

    coef_channel = radial / (p_norm + eps).square()
    coef_layer = radial.sum() / (p_norm_layer + eps).square()
    coef = torch.where(channel, coef_channel, torch.where(layer, coef_layer, torch.zeros_like(coef_layer)))
    update.addcmul_(p_hat, (coef * ps).to(update.dtype).view(shape), value=-1.0)
    return channel | layer


def _project_(
    updates: Sequence[Tensor], params: Sequence[Tensor], grads: Sequence[Tensor], delta: float, eps: float
) -> list[Tensor | None]:
    """:func:`radial_projection_` for every tensor with two or more dimensions (and entries); None for the
    others, which the authors' code never projects (biases, norm scales, scalars)."""
    return [
        radial_projection_(u, p, g, delta, eps) if p.ndim > 1 and p.numel() > 0 else None
        for u, p, g in zip(updates, params, grads)
    ]


def _decay_(
    params: Sequence[Tensor], projected: Sequence[Tensor | None], lr: float | Tensor, weight_decay: float, wd_ratio: float
) -> None:
    """θ ← θ·(1 − lr·λ·r) with r = wd_ratio where the update was projected, else 1 (authors' order: after
    the projection, before the update). The factor of a projected tensor is picked on the device."""
    if weight_decay == 0:
        return
    plain = [p for p, flag in zip(params, projected) if flag is None]
    decoupled_decay_(plain, lr, weight_decay)
    pairs = [(p, flag) for p, flag in zip(params, projected) if flag is not None]
    if not pairs:
        return
    factors = []
    for p, flag in pairs:
        if isinstance(lr, Tensor):  # compiled step: lr is a device tensor
            reduced, full = 1 - lr * (weight_decay * wd_ratio), 1 - lr * weight_decay
            factors.append(torch.where(flag, reduced, full).to(p.dtype))
        else:  # factors from host numbers; torch.full fills on the device (no host-to-device copy)
            reduced = torch.full((), 1 - lr * weight_decay * wd_ratio, dtype=p.dtype, device=p.device)
            factors.append(torch.where(flag, reduced, 1 - lr * weight_decay))
    torch._foreach_mul_([p for p, _ in pairs], factors)


# -- AdamP ---------------------------------------------------------------------------------------------
class AdamP(StepCountedOptimizer):
    r"""AdamP: Adam whose update loses its radial component on scale-invariant weights.

    Heo et al., "AdamP: Slowing Down the Slowdown for Momentum Optimizers on Scale-invariant Weights", ICLR
    2021 (arXiv 2006.08217), following the authors' ``adamp/adamp.py`` (clovaai/AdamP). Per parameter, at
    step t:

    .. math::
        m \leftarrow \beta_1 m + (1-\beta_1) g,\quad v \leftarrow \beta_2 v + (1-\beta_2) g^2,\quad
            D = \sqrt{v}/\sqrt{1-\beta_2^t} + \epsilon \\
        u = m / D \quad(\text{nesterov: } u = (\beta_1 m + (1-\beta_1) g) / D) \\
        u \leftarrow \Pi_w(u),\ r = \text{wd\_ratio} \text{ if } \max \cos(g, w) < \delta/\sqrt{d}
            \text{ in the channel or else the layer view, else } r = 1 \\
        w \leftarrow w\,(1 - \eta \lambda r) - \frac{\eta}{1-\beta_1^t}\, u

    with Π_w(u) = u − ŵ⟨ŵ, u⟩, ŵ = w/(‖w‖ + ε) per row of the chosen view (:func:`radial_projection_`).
    Only tensors with two or more dimensions are projected (as in the authors' code); the others take the
    plain AdamW step with r = 1. The cosine uses the raw gradient g, the projection acts on the update u.

    Deviations from the authors' code: none in the equations. Their cosine is ``F.cosine_similarity``,
    whose fp32 norm overflows for |g| > 1.8e19 (the cosine then reads 0 and the tensor is projected);
    here the reductions are overflow-safe, so such a gradient gets its true cosine. Their decay
    p·(1 − ηλr) after the projection and before the update is kept (it is our convention, with r
    added); the step count t is per parameter (as theirs) and the global step lives in ``param_groups``.

    Args:
        params: parameters or param groups (every argument below may be overridden per group).
        lr: learning rate η (default 1e-3, as the authors).
        betas: (β1, β2) (default (0.9, 0.999), as the authors).
        eps: ε, added to √v̂ as in torch Adam and used inside the cosine and the normalisation of w (default
            1e-8, as the authors).
        weight_decay: decoupled decay λ, applied before the update and scaled by lr (default 0, as the
            authors).
        delta: δ, threshold of the scale-invariance test cos < δ/√d (default 0.1, as the authors; 0 never
            projects).
        wd_ratio: r, the factor of λ on projected tensors, in [0, 1] (default 0.1, as the authors).
        nesterov: use the Nesterov form of the first moment in u (default False, as the authors).
        state_bits: 32 (fp32 moments) or 8: block-wise dynamic 8-bit moments (``lightning_optim.lowbit``) for
            parameters with >= 4096 elements, 2.03 bytes per parameter instead of 8; each such tensor is
            dequantized, stepped with the same equations and requantized. Keep embeddings at 32 bits.
        foreach: multi-tensor path (default: on for CUDA parameters); the projection runs tensor by tensor
            on batched reductions.
        compile: run the multi-tensor step through ``torch.compile`` (default False): lr and the step
            counters are device tensors, so it compiles once per param group and never syncs; ``step``
            state lives on the parameter's device. ``compile=True`` with ``state_bits=8`` raises ValueError.

    State per parameter: ``exp_avg``, ``exp_avg_sq`` (fp32 for bf16/fp16 parameters) and ``step`` (CPU
    float32), as torch Adam; with 8-bit state ``<key>_codes``/``<key>_absmax`` replace the moments.
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
        delta: float = 0.1,
        wd_ratio: float = 0.1,
        nesterov: bool = False,
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
            delta=delta,
            wd_ratio=wd_ratio,
            nesterov=nesterov,
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
        check_range("delta", group["delta"], 0.0)
        check_range("wd_ratio", group["wd_ratio"], 0.0, 1.0)
        check_bool("nesterov", group["nesterov"])
        check_compile(group["compile"])
        check_state_bits(group["state_bits"], group["compile"])

    def _hyper(self, group: dict[str, Any]) -> dict[str, Any]:
        beta1, beta2 = group["betas"]
        return dict(
            beta1=beta1, beta2=beta2, eps=group["eps"], weight_decay=group["weight_decay"],
            delta=group["delta"], wd_ratio=group["wd_ratio"], nesterov=group["nesterov"],
        )

    def _step(self, step: int) -> None:
        for group in self.param_groups:
            params = self._params_with_grad(group, "AdamP")
            if not params:
                continue
            states = [self._init_state(p, group) for p in params]
            keys = ("exp_avg", "exp_avg_sq", "step")
            if group["compile"]:  # never 8-bit: validation rejects compile=True with state_bits=8
                lists = [params, [p.grad for p in params]] + [[s[k] for s in states] for k in keys]
                for (dev_params, *rest), _ in self._group_tensors_by_device_and_dtype(lists).values():
                    lr = self._device_scalar("lr", dev_params[0].device, group["lr"])
                    compiled(_adamp_capturable)(dev_params, *rest, lr, **self._hyper(group))
                continue
            fn = _adamp_foreach if self._use_foreach(group, params) else _adamp_single_tensor
            self._step_by_layout(fn, params, states, keys, zero_moments=False, lr=group["lr"], **self._hyper(group))


def _adamp_single_tensor(
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
    delta: float,
    wd_ratio: float,
    nesterov: bool,
) -> None:
    """Reference path: the authors' step one parameter at a time (CPU step counters, no sync)."""
    for param, grad, exp_avg, exp_avg_sq, step_t in zip(params, grads, exp_avgs, exp_avg_sqs, steps):
        step_t += 1
        t = step_t.item()
        p32, g32 = as_compute([param, grad])
        adam_moments_(exp_avg, exp_avg_sq, g32, beta1, beta2)
        numerator = exp_avg.lerp(g32, 1 - beta1) if nesterov else exp_avg
        update = numerator / adam_denom(exp_avg_sq, t, beta2, eps)
        projected = _project_([update], [p32], [g32], delta, eps)
        _decay_([p32], projected, lr, weight_decay, wd_ratio)
        p32.add_(update.mul_(-lr / (1 - beta1**t)))
        write_back([param], [p32])


def _adamp_foreach(
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
    delta: float,
    wd_ratio: float,
    nesterov: bool,
) -> None:
    """Multi-tensor path, grouped by device and dtype; the same operations as the reference path."""
    grouped = StepCountedOptimizer._group_tensors_by_device_and_dtype([params, grads, exp_avgs, exp_avg_sqs, steps])
    for (dev_params, dev_grads, dev_exp_avgs, dev_exp_avg_sqs, dev_steps), _ in grouped.values():
        torch._foreach_add_(dev_steps, 1.0)
        counts = [t.item() for t in dev_steps]  # CPU tensors: no device sync
        p32, g32 = as_compute(dev_params), as_compute(dev_grads)
        adam_moments_foreach_(dev_exp_avgs, dev_exp_avg_sqs, g32, beta1, beta2)
        numerators = torch._foreach_lerp(dev_exp_avgs, g32, 1 - beta1) if nesterov else dev_exp_avgs
        updates = torch._foreach_div(numerators, adam_denoms_foreach(dev_exp_avg_sqs, counts, beta2, eps))
        projected = _project_(updates, p32, g32, delta, eps)
        _decay_(p32, projected, lr, weight_decay, wd_ratio)
        torch._foreach_mul_(updates, [-lr / (1 - beta1**t) for t in counts])
        torch._foreach_add_(p32, updates)
        write_back(dev_params, p32)


def _adamp_capturable(
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
    delta: float,
    wd_ratio: float,
    nesterov: bool,
) -> None:
    """Multi-tensor step with lr and the step counters on the device, for ``torch.compile``."""
    torch._foreach_add_(steps, 1.0)
    p32, g32 = as_compute(params), as_compute(grads)
    adam_moments_capturable_(exp_avgs, exp_avg_sqs, g32, beta1, beta2)
    numerators = torch._foreach_lerp(exp_avgs, g32, 1 - beta1) if nesterov else exp_avgs
    updates = torch._foreach_div(numerators, adam_denoms_capturable(exp_avg_sqs, steps, beta2, eps))
    projected = _project_(updates, p32, g32, delta, eps)
    _decay_(p32, projected, lr, weight_decay, wd_ratio)
    step_sizes = one_minus_pow(beta1, steps)  # becomes -lr / (1 - beta1^t)
    torch._foreach_reciprocal_(step_sizes)
    torch._foreach_mul_(step_sizes, -lr)
    torch._foreach_mul_(updates, step_sizes)
    torch._foreach_add_(p32, updates)
    write_back(params, p32)


# -- SGDP ----------------------------------------------------------------------------------------------
class SGDP(StepCountedOptimizer):
    r"""SGDP: SGD with momentum whose update loses its radial component on scale-invariant weights.

    Heo et al., "AdamP: Slowing Down the Slowdown for Momentum Optimizers on Scale-invariant Weights", ICLR
    2021 (arXiv 2006.08217), following the authors' ``adamp/sgdp.py`` (clovaai/AdamP). Per parameter:

    .. math::
        b \leftarrow \mu b + (1 - \tau) g \quad(b \text{ starts at } 0),\quad
            u = g + \mu b \ (\text{nesterov}) \text{ or } u = b \\
        u \leftarrow \Pi_w(u),\ r = \text{wd\_ratio} \text{ if } \max \cos(g, w) < \delta/\sqrt{d}
            \text{ in the channel or else the layer view, else } r = 1 \\
        w \leftarrow w\,(1 - \eta \lambda r / (1 - \mu)) - \eta\, u

    with the projection of :class:`AdamP` (:func:`radial_projection_`), on tensors with two or more
    dimensions only. As in the authors' code, without Nesterov u *is* the buffer b, so the projection
    also removes the radial component from the stored momentum (the paper's algorithm projects only the
    step; pytorch_optimizer follows the paper here). The decay is divided by 1 − μ as theirs. Unlike
    torch SGD the buffer starts at zero, so with dampening τ > 0 the first step is (1 − τ)·g.

    Deviations from the authors' code: none in the equations (overflow-safe cosine as in :class:`AdamP`;
    the global step lives in ``param_groups``). Nesterov is not restricted to momentum > 0 and zero
    dampening (the authors do not restrict it; with μ = 0 it is plain SGDP).

    Args:
        params: parameters or param groups (every argument below may be overridden per group).
        lr: learning rate η. The authors' constructor has no default (required); their README uses
            0.1 (with momentum 0.9, nesterov, weight decay 1e-5), which is the default here.
        momentum: μ in [0, 1) (default 0, as the authors).
        dampening: τ in [0, 1] (default 0, as the authors).
        weight_decay: decoupled decay λ, applied before the update as w·(1 − ηλr/(1 − μ)) (default 0, as
            the authors).
        nesterov: Nesterov momentum u = g + μb (default False, as the authors).
        eps: ε inside the cosine and in the normalisation of w (default 1e-8, as the authors).
        delta: δ, threshold of the scale-invariance test cos < δ/√d (default 0.1, as the authors; 0 never
            projects).
        wd_ratio: r, the factor of λ on projected tensors, in [0, 1] (default 0.1, as the authors).
        state_bits: 32 (fp32 buffer) or 8: block-wise dynamic 8-bit buffer (signed map,
            ``lightning_optim.lowbit``) for parameters with >= 4096 elements, 1.02 bytes per parameter
            instead of 4; smaller tensors keep fp32.
        foreach: multi-tensor path (default: on for CUDA parameters).
        compile: run the multi-tensor step through ``torch.compile`` (default False); lr is a device
            tensor, so it compiles once per param group and never syncs. ``compile=True`` with
            ``state_bits=8`` raises ValueError.

    State per parameter: ``momentum_buffer`` (b; fp32 for bf16/fp16 parameters; kept also with μ = 0, as
    the authors), or ``momentum_buffer_codes``/``momentum_buffer_absmax`` when 8-bit. The name is torch
    SGD's, so a torch SGD state dict converts.
    """

    state_spec = StateSpec(moments={"momentum_buffer": True}, first_moment="momentum_buffer", counters=())

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 0.1,
        momentum: float = 0.0,
        dampening: float = 0.0,
        weight_decay: float = 0.0,
        nesterov: bool = False,
        eps: float = 1e-8,
        delta: float = 0.1,
        wd_ratio: float = 0.1,
        *,
        state_bits: Literal[32, 8] = 32,
        foreach: bool | None = None,
        compile: bool = False,
    ) -> None:
        defaults = dict(
            lr=lr,
            momentum=momentum,
            dampening=dampening,
            weight_decay=weight_decay,
            nesterov=nesterov,
            eps=eps,
            delta=delta,
            wd_ratio=wd_ratio,
            state_bits=state_bits,
            foreach=foreach,
            compile=compile,
        )
        super().__init__(params, defaults)

    def _validate_group(self, group: dict[str, Any]) -> None:
        check_range("lr", group["lr"], 0.0)
        check_range("momentum", group["momentum"], 0.0, 1.0, high_open=True)
        check_range("dampening", group["dampening"], 0.0, 1.0)
        check_range("weight_decay", group["weight_decay"], 0.0)
        check_bool("nesterov", group["nesterov"])
        check_range("eps", group["eps"], 0.0)
        check_range("delta", group["delta"], 0.0)
        check_range("wd_ratio", group["wd_ratio"], 0.0, 1.0)
        check_compile(group["compile"])
        check_state_bits(group["state_bits"], group["compile"])

    @staticmethod
    def _hyper(group: dict[str, Any]) -> dict[str, Any]:
        return dict(
            momentum=group["momentum"], dampening=group["dampening"],
            weight_decay=group["weight_decay"] / (1 - group["momentum"]), nesterov=group["nesterov"],
            eps=group["eps"], delta=group["delta"], wd_ratio=group["wd_ratio"],
        )

    def _step(self, step: int) -> None:
        for group in self.param_groups:
            params = self._params_with_grad(group, "SGDP")
            if not params:
                continue
            states = [self._init_state(p, group) for p in params]
            if group["compile"]:
                lists = [params, [p.grad for p in params], [s["momentum_buffer"] for s in states]]
                for (dev_params, *rest), _ in self._group_tensors_by_device_and_dtype(lists).values():
                    lr = self._device_scalar("lr", dev_params[0].device, group["lr"])
                    compiled(_sgdp_capturable)(dev_params, *rest, lr, **self._hyper(group))
                continue
            fn = _sgdp_foreach if self._use_foreach(group, params) else _sgdp_single_tensor
            self._step_by_layout(
                fn, params, states, ("momentum_buffer",), zero_moments=False, lr=group["lr"], **self._hyper(group)
            )


def _sgdp_single_tensor(
    params: list[Tensor],
    grads: list[Tensor],
    buffers: list[Tensor],
    *,
    lr: float,
    momentum: float,
    dampening: float,
    weight_decay: float,
    nesterov: bool,
    eps: float,
    delta: float,
    wd_ratio: float,
) -> None:
    """Reference path, one parameter at a time (``weight_decay`` is already λ/(1 − μ))."""
    for param, grad, buf in zip(params, grads, buffers):
        p32, g32 = as_compute([param, grad])
        buf.mul_(momentum).add_(g32, alpha=1 - dampening)
        update = g32.add(buf, alpha=momentum) if nesterov else buf  # the authors project b itself
        projected = _project_([update], [p32], [g32], delta, eps)
        _decay_([p32], projected, lr, weight_decay, wd_ratio)
        p32.add_(update, alpha=-lr)
        write_back([param], [p32])


def _sgdp_foreach(
    params: list[Tensor],
    grads: list[Tensor],
    buffers: list[Tensor],
    *,
    lr: float,
    momentum: float,
    dampening: float,
    weight_decay: float,
    nesterov: bool,
    eps: float,
    delta: float,
    wd_ratio: float,
) -> None:
    """Multi-tensor path, grouped by device and dtype; the same operations as the reference path."""
    grouped = StepCountedOptimizer._group_tensors_by_device_and_dtype([params, grads, buffers])
    for (dev_params, dev_grads, dev_buffers), _ in grouped.values():
        p32, g32 = as_compute(dev_params), as_compute(dev_grads)
        _sgdp_multi_tensor_(p32, g32, dev_buffers, lr, momentum, dampening, weight_decay, nesterov, eps, delta, wd_ratio)
        write_back(dev_params, p32)


def _sgdp_multi_tensor_(
    p32: list[Tensor],
    g32: list[Tensor],
    buffers: list[Tensor],
    lr: float | Tensor,
    momentum: float,
    dampening: float,
    weight_decay: float,
    nesterov: bool,
    eps: float,
    delta: float,
    wd_ratio: float,
) -> None:
    torch._foreach_mul_(buffers, momentum)
    torch._foreach_add_(buffers, g32, alpha=1 - dampening)
    updates = torch._foreach_add(g32, buffers, alpha=momentum) if nesterov else buffers
    projected = _project_(updates, p32, g32, delta, eps)
    _decay_(p32, projected, lr, weight_decay, wd_ratio)
    if isinstance(lr, Tensor):
        torch._foreach_add_(p32, torch._foreach_mul(updates, -lr))
    else:
        torch._foreach_add_(p32, updates, alpha=-lr)


def _sgdp_capturable(
    params: list[Tensor],
    grads: list[Tensor],
    buffers: list[Tensor],
    lr: Tensor,
    *,
    momentum: float,
    dampening: float,
    weight_decay: float,
    nesterov: bool,
    eps: float,
    delta: float,
    wd_ratio: float,
) -> None:
    """Multi-tensor step with lr on the device, for ``torch.compile``."""
    p32, g32 = as_compute(params), as_compute(grads)
    _sgdp_multi_tensor_(p32, g32, buffers, lr, momentum, dampening, weight_decay, nesterov, eps, delta, wd_ratio)
    write_back(params, p32)
