"""AdaBelief: Adam whose second moment is the EMA of (g − m)², the belief in the observed gradient."""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Iterable, Iterator
from typing import Any, Literal

import torch
from torch import Tensor

from lightning_optim._base import StateSpec, StepCountedOptimizer, as_compute, compiled, state_dtype, write_back
from lightning_optim.functional import adam_denom, adam_denoms_foreach, decoupled_decay_, second_moment_capturable_
from lightning_optim.lowbit import LowBitMoments, is_quantized
from lightning_optim.validation import check_betas, check_bool, check_compile, check_range, check_state_bits

__all__ = ["AdaBelief", "adabelief_step_size", "RECTIFY_THRESHOLD"]

#: ρ_t at or above which the rectified update is adaptive (the authors' PyTorch 0.2 code: ``N_sma >= 5``)
RECTIFY_THRESHOLD = 5.0

_MAX = "max_exp_avg_var"
_SPEC = StateSpec(
    moments={"exp_avg": True, "exp_avg_var": False, _MAX: False},
    first_moment="exp_avg",
    second_moment="exp_avg_var",
    second_moment_like_grad_sq=False,  # s is the EMA of (g - m)^2 (+ eps), not of g^2
)
# The running max exists only for groups with amsgrad=True (see AdaBelief._init_state).
_SPEC_WITHOUT_MAX = dataclasses.replace(_SPEC, moments={k: v for k, v in _SPEC.moments.items() if k != _MAX})


def adabelief_step_size(
    step: float, *, lr: float, beta1: float, beta2: float, rectify: bool, degenerated_to_sgd: bool
) -> tuple[str, float]:
    """Which update a tensor with ``step`` updates of its moments takes, and its step size (host math).

    Returns ``("adam", lr/(1 − β1^t))`` without rectification (divide m by √(s/(1 − β2^t)) + ε). With it,
    ρ∞ = 2/(1 − β2) − 1 and ρ_t = ρ∞ − 2t·β2^t/(1 − β2^t): ``("rectified", lr·r_t/(1 − β1^t))``
    with r_t = √((1 − β2^t)·(ρ_t − 4)(ρ_t − 2)ρ∞ / ((ρ∞ − 4)(ρ∞ − 2)ρ_t)) when ρ_t ≥ 5 (divide m by
    √s + ε), else ``("sgd", lr/(1 − β1^t))`` (θ ← θ − step·m) or, without ``degenerated_to_sgd``,
    ``("none", 0.0)``.

    Args:
        step: t, the 1-based count of this tensor's moment updates, this step included.
        lr: the learning rate.
        beta1: β1.
        beta2: β2.
        rectify: RAdam-style rectification.
        degenerated_to_sgd: below the threshold, step along m (else: no update).
    """
    bias_correction1 = 1 - beta1**step
    if not rectify:
        return "adam", lr / bias_correction1
    bias_correction2 = 1 - beta2**step
    rho_inf = 2 / (1 - beta2) - 1
    rho = rho_inf - 2 * step * beta2**step / bias_correction2
    if rho >= RECTIFY_THRESHOLD:  # then rho_inf > rho >= 5: every factor below is positive
        ratio = (rho - 4) / (rho_inf - 4) * (rho - 2) / rho * rho_inf / (rho_inf - 2)
        return "rectified", math.sqrt(bias_correction2 * ratio) / bias_correction1 * lr
    if degenerated_to_sgd:
        return "sgd", 1 / bias_correction1 * lr
    return "none", 0.0


class AdaBelief(StepCountedOptimizer):
    r"""AdaBelief: Adam with the step size adapted by the belief in the observed gradient.

    Zhuang et al., "AdaBelief Optimizer: Adapting Stepsizes by the Belief in Observed Gradients",
    NeurIPS 2020 (arXiv 2010.07468); follows the authors' ``adabelief-pytorch`` 0.2.1
    (``pypi_packages/adabelief_pytorch0.2.1/adabelief_pytorch/AdaBelief.py`` of
    juntang-zhuang/Adabelief-Optimizer). For a parameter whose moments were updated t times (its own
    ``step`` counter, as in the authors' code), with the decoupled decay first:

    .. math::
        \theta \leftarrow \theta (1 - \eta\lambda) \\
        m \leftarrow \beta_1 m + (1-\beta_1) g, \qquad
        s \leftarrow \beta_2 s + (1-\beta_2)(g - m)^2 + \epsilon \\
        \text{amsgrad: } s_{\max} \leftarrow \max(s_{\max}, s), \text{ and } s_{\max} \text{ replaces } s
            \text{ below} \\
        \text{rectify off: } \theta \leftarrow \theta - \frac{\eta}{1-\beta_1^t}\,
            \frac{m}{\sqrt{s/(1-\beta_2^t)} + \epsilon} \\
        \text{rectify on, } \rho_t \ge 5: \theta \leftarrow \theta - \frac{\eta\, r_t}{1-\beta_1^t}\,
            \frac{m}{\sqrt{s} + \epsilon};\quad
        \rho_t < 5: \theta \leftarrow \theta - \frac{\eta}{1-\beta_1^t} m \text{ (degenerated to SGD)}

    with ρ∞ = 2/(1 − β2) − 1, ρ_t = ρ∞ − 2t·β2^t/(1 − β2^t) and
    r_t = √((1 − β2^t)·(ρ_t − 4)(ρ_t − 2)ρ∞ / ((ρ∞ − 4)(ρ∞ − 2)ρ_t)) (:func:`adabelief_step_size`).
    With β2 = 0.999 the first five steps of a parameter are SGD steps with momentum and bias correction.

    **ε, unlike our convention** (ε added to √v̂ only): ε enters twice, as in the authors' code and the
    paper's Algorithm 2. It is added inside the EMA of s (and stays in the stored state, so s ≥ ε and
    s → ε/(1 − β2) for a constant gradient) and again to the square root: to √ŝ = √(s/(1 − β2^t))
    without rectification (the convention's place), to √s itself (not bias-corrected; the bias
    correction is folded into r_t) in the rectified update, as the authors' PyTorch code does. Hence the
    tiny default 1e-16 (the authors advise ε ≈ the square of Adam's ε, and 1e-8 where SGD beats Adam).

    Deviations from the authors' PyTorch 0.2.1 code: with ``amsgrad=True`` and ``rectify=True`` the running
    max also divides the rectified update (their PyTorch code tracks the max but divides by s there, so
    amsgrad has no effect once rectified; their TensorFlow 0.2.1 code and pytorch_optimizer use the max,
    as here). Weight decay is always decoupled and scaled by lr (the authors' defaults
    ``weight_decouple=True``, ``fixed_decay=False``; their L2 and fixed-decay options are not offered:
    fixed decay λ' equals ``weight_decay=λ'/lr`` at a constant lr). bf16 parameters also get fp32 state and
    math (the authors upcast fp16 only). Defaults (the authors' 0.2.1 signature): lr 1e-3, betas
    (0.9, 0.999), eps 1e-16, weight_decay 0, amsgrad False, rectify True, degenerated_to_sgd True; the
    authors' README recommends ``rectify=False`` in its usage example and ``rectify=True`` for
    Transformers and GANs.

    Args:
        params: parameters or param groups (every argument below may be overridden per group).
        lr: learning rate η (default 1e-3).
        betas: (β1, β2) of the EMAs of g and of (g − m)² (default (0.9, 0.999)).
        eps: ε, added inside the EMA of s and to its square root, see above (default 1e-16).
        weight_decay: decoupled decay λ: θ ← θ(1 − ηλ) before the update (default 0).
        amsgrad: divide by the running max of s instead of s (default False). Only then is the state
            ``max_exp_avg_var`` allocated.
        rectify: RAdam-style rectification of the adaptive step, with SGD steps while ρ_t < 5
            (default True, as the authors' 0.2 code).
        degenerated_to_sgd: while ρ_t < 5 (rectify only) take the SGD step θ ← θ − η/(1 − β1^t)·m; if
            False, no update at all on those steps (the decay still applies) (default True).
        state_bits: 32 (fp32 moments) or 8: block-wise dynamic 8-bit moments (``lightning_optim.lowbit``;
            s and its max in the square-root layout, so a positive s never rounds to 0) for parameters
            with >= 4096 elements, one tensor at a time; smaller tensors keep fp32. Keep embeddings in a
            ``state_bits=32`` group.
        foreach: multi-tensor ``torch._foreach_*`` path (default: on for CUDA params).
        compile: run the multi-tensor step through ``torch.compile`` (default False), rectify and amsgrad
            included: lr and the step counters are device tensors (``step`` state lives on the
            parameter's device, as in torch's capturable Adam), the per-tensor step sizes and the SGD /
            adaptive choice are computed on the device (float64), so it never syncs and compiles once
            per configuration. ``compile=True`` with ``state_bits=8`` raises ``ValueError``.

    State per parameter: ``exp_avg`` (m), ``exp_avg_var`` (s, ε included), ``max_exp_avg_var`` (amsgrad
    only) (fp32 for bf16/fp16 parameters) and ``step`` (CPU float32; the authors' key names); with 8-bit
    state ``<key>_codes`` (uint8) and ``<key>_absmax`` (fp32 per 256-block) replace the moments. s is not
    an EMA of g², so SpikeAwareClipping does not clip against it.
    """

    state_spec = _SPEC

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-16,
        weight_decay: float = 0.0,
        amsgrad: bool = False,
        rectify: bool = True,
        degenerated_to_sgd: bool = True,
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
            amsgrad=amsgrad,
            rectify=rectify,
            degenerated_to_sgd=degenerated_to_sgd,
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
        check_bool("amsgrad", group["amsgrad"])
        check_bool("rectify", group["rectify"])
        check_bool("degenerated_to_sgd", group["degenerated_to_sgd"])
        check_compile(group["compile"])
        check_state_bits(group["state_bits"], group["compile"])

    # -- state: the amsgrad max only where a group uses it --------------------------------------------
    def _init_state(self, p: Tensor, group: dict[str, Any]) -> dict[str, Any]:
        state = self.state[p]
        if group["amsgrad"] or _MAX in state or is_quantized(state, _MAX):
            return super()._init_state(p, group)
        # The class spec lists the max (so state dicts holding it load, 8-bit conversion and resets cover
        # it); without amsgrad the base initialises the state under the spec without it, for this call.
        self.state_spec = _SPEC_WITHOUT_MAX
        try:
            return super()._init_state(p, group)
        finally:
            del self.state_spec

    @contextlib.contextmanager
    def _low_bit_moments(self, p: Tensor, state: dict[str, Any], reset: bool = False) -> Iterator[list[Tensor]]:
        """The base's 8-bit working copies, of the moments this state holds (the max only with amsgrad)."""
        held = {key: signed for key, signed in self._moments.items() if is_quantized(state, key)}
        moments = LowBitMoments(state, held, state_dtype(p))
        if reset:
            moments.reset_()
        yield moments.load()
        moments.store()

    # -- stepping -----------------------------------------------------------------------------------
    def _step(self, step: int) -> None:
        for group in self.param_groups:
            params = self._params_with_grad(group, "AdaBelief")
            if not params:
                continue
            states = [self._init_state(p, group) for p in params]
            keys = ("exp_avg", "exp_avg_var", "step") + ((_MAX,) if group["amsgrad"] else ())
            beta1, beta2 = group["betas"]
            hyper = dict(
                beta1=beta1,
                beta2=beta2,
                eps=group["eps"],
                weight_decay=group["weight_decay"],
                amsgrad=group["amsgrad"],
                rectify=group["rectify"],
                degenerated_to_sgd=group["degenerated_to_sgd"],
            )
            if group["compile"]:  # never 8-bit: validation rejects compile=True with state_bits=8
                lists = [params, [p.grad for p in params]] + [[s[key] for s in states] for key in keys]
                for (dev_params, *rest), _ in self._group_tensors_by_device_and_dtype(lists).values():
                    lr = self._device_scalar("lr", dev_params[0].device, group["lr"])
                    compiled(_adabelief_capturable)(dev_params, *rest, lr=lr, **hyper)
                continue
            fn = _adabelief_foreach if self._use_foreach(group, params) else _adabelief_single_tensor
            self._step_by_layout(fn, params, states, keys, zero_moments=False, lr=group["lr"], **hyper)


def _adabelief_single_tensor(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_vars: list[Tensor],
    steps: list[Tensor],
    max_exp_avg_vars: list[Tensor] | None = None,
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    amsgrad: bool,
    rectify: bool,
    degenerated_to_sgd: bool,
) -> None:
    """Reference path: the equations one parameter at a time, in the authors' operation order."""
    for i, (param, grad, exp_avg, exp_avg_var, step_t) in enumerate(zip(params, grads, exp_avgs, exp_avg_vars, steps)):
        step_t += 1
        t = step_t.item()  # a CPU counter: no sync
        p32, g32 = as_compute([param, grad])
        decoupled_decay_(p32, lr, weight_decay)
        exp_avg.lerp_(g32, 1 - beta1)
        residual = g32 - exp_avg
        # eager addcmul forms ((1 − β2)·r)·r (see functional.adam_moments_capturable_): finite for |r| < 5.8e20 at β2 = 0.999
        exp_avg_var.mul_(beta2).addcmul_(residual, residual, value=1 - beta2).add_(eps)
        second = exp_avg_var
        if amsgrad:
            second = torch.maximum(max_exp_avg_vars[i], exp_avg_var, out=max_exp_avg_vars[i])
        kind, step_size = adabelief_step_size(
            t, lr=lr, beta1=beta1, beta2=beta2, rectify=rectify, degenerated_to_sgd=degenerated_to_sgd
        )
        if kind == "adam":
            p32.addcdiv_(exp_avg, adam_denom(second, t, beta2, eps), value=-step_size)
        elif kind == "rectified":
            p32.addcdiv_(exp_avg, second.sqrt().add_(eps), value=-step_size)
        elif kind == "sgd":
            p32.add_(exp_avg, alpha=-step_size)
        write_back([param], [p32])


def _adabelief_foreach(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_vars: list[Tensor],
    steps: list[Tensor],
    max_exp_avg_vars: list[Tensor] | None = None,
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    amsgrad: bool,
    rectify: bool,
    degenerated_to_sgd: bool,
) -> None:
    """Multi-tensor path, grouped by device and dtype. Tensors with different step counts (a parameter
    that skipped steps) may take different kinds of update; each kind is one set of foreach calls."""
    lists = [params, grads, exp_avgs, exp_avg_vars, steps] + ([max_exp_avg_vars] if amsgrad else [])
    for (dev_params, dev_grads, dev_exp_avgs, dev_exp_avg_vars, dev_steps, *dev_max), _ in (
        StepCountedOptimizer._group_tensors_by_device_and_dtype(lists).values()
    ):
        torch._foreach_add_(dev_steps, 1.0)
        p32, g32 = as_compute(dev_params), as_compute(dev_grads)
        decoupled_decay_(p32, lr, weight_decay)
        torch._foreach_lerp_(dev_exp_avgs, g32, 1 - beta1)
        residuals = torch._foreach_sub(g32, dev_exp_avgs)
        second_moment_capturable_(dev_exp_avg_vars, residuals, beta2)  # s ← β2·s + ((1 − β2)·r)·r
        del residuals
        torch._foreach_add_(dev_exp_avg_vars, eps)
        second = dev_exp_avg_vars
        if amsgrad:
            torch._foreach_maximum_(dev_max[0], dev_exp_avg_vars)
            second = dev_max[0]
        counts = [t.item() for t in dev_steps]  # CPU tensors: no device sync
        plan = [
            adabelief_step_size(
                t, lr=lr, beta1=beta1, beta2=beta2, rectify=rectify, degenerated_to_sgd=degenerated_to_sgd
            )
            for t in counts
        ]
        by_kind: dict[str, list[int]] = {}
        for i, (kind, _) in enumerate(plan):
            by_kind.setdefault(kind, []).append(i)
        for kind, idx in by_kind.items():
            ps, ms = [p32[i] for i in idx], [dev_exp_avgs[i] for i in idx]
            neg_steps = [-plan[i][1] for i in idx]
            if kind == "adam":
                denoms = adam_denoms_foreach([second[i] for i in idx], [counts[i] for i in idx], beta2, eps)
                torch._foreach_addcdiv_(ps, ms, denoms, neg_steps)
            elif kind == "rectified":
                denoms = torch._foreach_sqrt([second[i] for i in idx])
                torch._foreach_add_(denoms, eps)
                torch._foreach_addcdiv_(ps, ms, denoms, neg_steps)
            elif kind == "sgd":
                torch._foreach_add_(ps, torch._foreach_mul(ms, neg_steps))
        write_back(dev_params, p32)


def _adabelief_capturable(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_vars: list[Tensor],
    steps: list[Tensor],
    max_exp_avg_vars: list[Tensor] | None = None,
    *,
    lr: Tensor,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    amsgrad: bool,
    rectify: bool,
    degenerated_to_sgd: bool,
) -> None:
    """Multi-tensor step with lr and the step counters on the device, for ``torch.compile``.

    The per-tensor step sizes and the rectified/SGD choice of :func:`adabelief_step_size` are computed
    on the device in float64 from the stacked counters; the choice is a per-tensor ``torch.where``, so
    the update a tensor does not take never leaks into it (no 0·inf).
    """
    torch._foreach_add_(steps, 1.0)
    p32, g32 = as_compute(params), as_compute(grads)
    decoupled_decay_(p32, lr, weight_decay)
    torch._foreach_lerp_(exp_avgs, g32, 1 - beta1)
    residuals = torch._foreach_sub(g32, exp_avgs)
    second_moment_capturable_(exp_avg_vars, residuals, beta2)
    torch._foreach_add_(exp_avg_vars, eps)
    second = exp_avg_vars
    if amsgrad:
        torch._foreach_maximum_(max_exp_avg_vars, exp_avg_vars)
        second = max_exp_avg_vars

    t = torch.stack(steps).double()
    lr64 = lr.double()
    bias_correction1 = 1 - torch.pow(beta1, t)
    bias_correction2 = 1 - torch.pow(beta2, t)
    if not rectify:
        step_sizes = (lr64 / bias_correction1).float().unbind()
        denoms = torch._foreach_sqrt(second)
        torch._foreach_div_(denoms, list(bias_correction2.sqrt().float().unbind()))
        torch._foreach_add_(denoms, eps)
        updates = torch._foreach_div(exp_avgs, denoms)
        torch._foreach_mul_(updates, list(step_sizes))
        torch._foreach_sub_(p32, updates)
        write_back(params, p32)
        return

    rho_inf = 2 / (1 - beta2) - 1
    rho = rho_inf - 2 * t * torch.pow(beta2, t) / bias_correction2
    adaptive = rho >= RECTIFY_THRESHOLD
    # negative or undefined where not adaptive (rho < 5, or rho_inf in (2, 4]): never selected below
    ratio = (rho - 4) * (rho - 2) * rho_inf / ((rho_inf - 4) * (rho_inf - 2) * rho)
    rectified = (lr64 * (bias_correction2 * ratio).clamp_min(0).sqrt() / bias_correction1).float()
    sgd = (lr64 / bias_correction1).float()
    denoms = torch._foreach_sqrt(second)
    torch._foreach_add_(denoms, eps)
    for i, (p, m, d) in enumerate(zip(p32, exp_avgs, denoms)):  # traced into one graph: no Python loop at run time
        p.sub_(torch.where(adaptive[i], rectified[i] * m / d, sgd[i] * m if degenerated_to_sgd else 0.0))
    write_back(params, p32)
