"""Sophia: a clipped second-order optimizer with a diagonal-Hessian EMA, Hutchinson (SophiaH) or GNB (SophiaG)."""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Sequence
from typing import Any, Literal

import torch
from torch import Tensor

from lightning_optim._base import StateSpec, StepCountedOptimizer, as_compute, compiled, write_back
from lightning_optim.functional import decoupled_decay_
from lightning_optim.hessian import GNB, HUTCHINSON, HessianOptimizerMixin, check_hessian_args, ema_fold_, gnb_fold_
from lightning_optim.lowbit import is_quantized, load_moment, store_moment_
from lightning_optim.validation import check_betas, check_compile, check_int, check_range, check_state_bits

__all__ = ["SophiaG", "SophiaH"]

_KEYS = ("exp_avg", "hessian", "step", "hessian_step")


class _Sophia(HessianOptimizerMixin, StepCountedOptimizer):
    """The update both variants share (the authors' ``_single_tensor_sophiag``, in our three paths)."""

    #: True: the denominator is max(ρ·h, ε) (SophiaH: h may be negative); False: ρ·h + ε (SophiaG's code)
    _clamp_denominator = False

    def _validate_group(self, group: dict[str, Any]) -> None:
        check_range("lr", group["lr"], 0.0)
        check_betas(group["betas"])
        check_range("rho", group["rho"], 0.0, low_open=True)
        check_range("weight_decay", group["weight_decay"], 0.0)
        check_range("eps", group["eps"], 0.0, low_open=True)
        check_compile(group["compile"])
        check_state_bits(group["state_bits"], group["compile"])

    @staticmethod
    def _group_due(group: dict[str, Any], step: int) -> bool:
        # the estimate is refreshed at the end of every k-th step, used from the next one (authors' loop)
        return step % group["update_every"] == 0

    def _update(self, step: int, folds: dict[Tensor, Tensor] | None) -> None:
        name = type(self).__name__
        for group in self.param_groups:
            params = self._params_with_grad(group, name)
            if not params:
                continue
            states = [self._init_state(p, group) for p in params]
            group_folds = folds if folds and self._group_due(group, step) else None
            beta1, beta2 = group["betas"]
            kwargs = dict(
                beta1=beta1, beta2=beta2, rho=group["rho"], eps=group["eps"], weight_decay=group["weight_decay"],
                clamp_denominator=self._clamp_denominator,
            )
            if group["compile"]:
                self._compiled_group_step(group, params, states, group_folds, **kwargs)
                continue
            fn = _sophia_foreach if self._use_foreach(group, params) else _sophia_single_tensor
            self._step_by_layout(
                fn, params, states, _KEYS, zero_moments=False, folds=group_folds, lr=group["lr"], **kwargs
            )

    def _compiled_group_step(
        self, group: dict[str, Any], params: list[Tensor], states: list[dict[str, Any]],
        folds: dict[Tensor, Tensor] | None, **kwargs: Any,
    ) -> None:
        lists = [params, [p.grad for p in params]] + [[s[key] for s in states] for key in _KEYS]
        beta2 = kwargs.pop("beta2")
        for (dev_params, dev_grads, exp_avgs, hessians, steps, hsteps), _ in (
            self._group_tensors_by_device_and_dtype(lists).values()
        ):
            device = dev_params[0].device
            lr = self._device_scalar("lr", device, group["lr"])
            compiled(_sophia_capturable)(dev_params, dev_grads, exp_avgs, hessians, steps, lr, **kwargs)
            if folds:
                _fold_after(dev_params, hessians, hsteps, folds, beta2)


class SophiaH(_Sophia):
    r"""SophiaH: Sophia with the Hutchinson estimate of the Hessian diagonal.

    Liu, Li, Hall, Liang, Ma, "Sophia: A Scalable Stochastic Second-order Optimizer for Language Model
    Pre-training", ICLR 2024 (arXiv 2305.14342), Algorithms 1 and 2 (Hutchinson). The update is the one of
    the authors' PyTorch SophiaG (Liuhong99/Sophia ``sophia.py``); the estimator, its schedule and the
    defaults are those of the co-author's SophiaH (stanford-crfm/levanter ``src/levanter/optim/sophia.py``,
    ``SophiaHConfig``). For the global step T (1-based):

    .. math::
        \theta \leftarrow \theta (1 - \eta\lambda),\qquad m \leftarrow \beta_1 m + (1-\beta_1) g \\
        \theta \leftarrow \theta - \eta\, \operatorname{sign}(m)\,
            \min\!\big(|m| / \max(\rho h, \epsilon),\ 1\big) \\
        \text{if } T \bmod k = 0:\quad \hat h = \operatorname{mean}_s z_s \odot (H z_s),\quad
            h \leftarrow \beta_2 h + (1-\beta_2)\hat h \quad(\text{after the update; used from } T+1)

    with Gaussian probes z and H the Hessian of step T's loss at step T's weights (levanter: the Hessian at
    the weights of the step, refreshed when its count reaches a multiple of k). Until the first refresh
    h = 0 and every entry takes the clipped step η·sign(m) (as in the authors' code).

    Where H z comes from: on a refresh step, an estimate handed in before the step
    (:meth:`set_hessian_estimate`; in Lightning the callback ``lightning_optim.callbacks.HessianEstimator``),
    or gradients that carry their graph (``loss.backward(create_graph=True)``). With neither, the refresh
    step raises a ``RuntimeError`` naming both fixes; other steps need nothing.

    Args:
        params: parameters or param groups (every argument below may be overridden per group).
        lr: learning rate η (default 6e-4, levanter's learning rate; Sophia's η is comparable to AdamW's).
        betas: (β1, β2) of the gradient EMA and of the curvature EMA (default (0.96, 0.99), levanter's).
        rho: ρ (the paper's γ) scaling h in the denominator (default 0.01, levanter's ``GAMMA_SOPHIA_H``).
        weight_decay: decoupled λ, applied before the update (default 0.1, levanter's).
        eps: ε, the floor of the denominator (default 1e-12, levanter's config).
        update_every: k, the refresh interval (default 10, the paper's and levanter's).
        n_samples: Hutchinson probes per refresh (default 1).
        probe: ``"gaussian"`` (default, the paper's and levanter's) or ``"rademacher"``.
        seed: seed of the probes (they depend on (seed, T, parameter index) only: resumes and DDP ranks
            draw the same ones) (default 0).
        state_bits: 32 or 8: block-wise 8-bit m and h (both on the signed map: h may be negative) for
            parameters with >= 4096 elements.
        foreach: multi-tensor path (default: on for CUDA parameters).
        compile: run the element-wise update through ``torch.compile`` (lr a device scalar, device counters;
            the refresh stays eager). ``compile=True`` with ``state_bits=8`` raises ``ValueError``.

    Deviations: levanter bias-corrects m and adds ε inside max(ρh, ε) the same way; here m is not
    bias-corrected (as in the authors' PyTorch SophiaG). The paper refreshes at T mod k = 1 before the
    update; here, as in both codes, at T mod k = 0 after it. A NaN entry of ĥ keeps that entry's h.
    State per parameter: ``exp_avg``, ``hessian`` (fp32 for bf16/fp16 parameters; 8 bytes per parameter),
    the counters ``step``, ``hessian_step``.
    """

    hessian_estimator = HUTCHINSON
    _clamp_denominator = True
    state_spec = StateSpec(
        moments={"exp_avg": True, "hessian": True}, first_moment="exp_avg", counters=("step", "hessian_step")
    )

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 6e-4,
        betas: tuple[float, float] = (0.96, 0.99),
        rho: float = 0.01,
        weight_decay: float = 0.1,
        eps: float = 1e-12,
        update_every: int = 10,
        n_samples: int = 1,
        probe: Literal["rademacher", "gaussian"] = "gaussian",
        seed: int = 0,
        *,
        state_bits: Literal[32, 8] = 32,
        foreach: bool | None = None,
        compile: bool = False,
    ) -> None:
        defaults = dict(
            lr=lr, betas=tuple(betas), rho=rho, weight_decay=weight_decay, eps=eps, update_every=update_every,
            n_samples=n_samples, probe=probe, seed=seed, state_bits=state_bits, foreach=foreach, compile=compile,
        )
        super().__init__(params, defaults)

    def _validate_group(self, group: dict[str, Any]) -> None:
        super()._validate_group(group)
        check_hessian_args(group)

    def _step(self, step: int) -> None:
        estimates = self._hutchinson_for_step(step)  # raises on a refresh step with no way to get one
        self._release_graphs(self.hessian_params())
        self._update(step, estimates)


class SophiaG(_Sophia):
    r"""SophiaG: Sophia with the Gauss-Newton-Bartlett estimate of the Hessian diagonal.

    Liu, Li, Hall, Liang, Ma, "Sophia: A Scalable Stochastic Second-order Optimizer for Language Model
    Pre-training", ICLR 2024 (arXiv 2305.14342); the authors' code is Liuhong99/Sophia (``sophia.py``, the
    optimizer; ``train_sophiag.py``, the loop that refreshes the estimate). For the global step T:

    .. math::
        \theta \leftarrow \theta (1 - \eta\lambda),\qquad m \leftarrow \beta_1 m + (1-\beta_1) g \\
        \theta \leftarrow \theta - \eta\, \operatorname{sign}(m)\, \min\!\big(|m| / (\rho h + \epsilon),\ 1\big) \\
        \text{after step } T \text{ with } T \bmod k = 0:\quad
            h \leftarrow \beta_2 h + (1-\beta_2)\, B\, \hat g \odot \hat g

    where ĝ is the gradient of the mean cross-entropy of the model's logits on B labels sampled from its own
    softmax (:meth:`update_hessian`). Until the first refresh h = 0 and each entry takes the clipped step
    η·sign(m), as in the authors' first k steps. In Lightning the callback
    ``lightning_optim.callbacks.HessianEstimator`` does the extra forward/backward every k steps; without
    it (or a call of :meth:`update_hessian`) SophiaG keeps stepping with its last h, and warns once when it
    has had none for 2k steps.

    Args:
        params: parameters or param groups (every argument below may be overridden per group).
        lr: learning rate η (default 1e-4, the authors' ``SophiaG`` default).
        betas: (β1, β2) of the gradient EMA and of the curvature EMA (default (0.965, 0.99), the authors').
        rho: ρ scaling h in the denominator (default 0.04, the authors'; their GPT-2 configs use 0.03-0.05).
        weight_decay: decoupled λ, applied before the update (default 0.1, the authors').
        eps: ε added to ρ·h (default 1e-15, the authors' constant).
        update_every: k, the refresh interval in steps (default 10, the authors' loop).
        seed: seed of the sampled labels (drawn from (seed, T, rank)) (default 0).
        state_bits: 32 or 8: block-wise 8-bit m (signed map) and h (unsigned, square-root layout) for
            parameters with >= 4096 elements.
        foreach: multi-tensor path (default: on for CUDA parameters).
        compile: run the element-wise update through ``torch.compile`` (lr a device scalar, device counters).
            ``compile=True`` with ``state_bits=8`` raises ``ValueError``.

    Deviations from the authors' code: their ``step(bs=...)`` multiplies h by the tokens per step B at every
    step; here B multiplies the estimate when it is folded in (the paper's B·ĝ⊙ĝ, Algorithm 3), so B is the
    number of labels the estimate was actually sampled for and ``step`` needs no batch size (with a
    constant B the numbers are the same; ``hessian`` holds B times the authors' value). m uses ``lerp``
    (their mul/add form: equal up to rounding). The callback samples on the step's own batch after the
    step (theirs on the next batch). A NaN entry of ĝ keeps that entry's h. State per parameter:
    ``exp_avg``, ``hessian`` (fp32 for bf16/fp16 parameters; 8 bytes per parameter), the counters
    ``step``, ``hessian_step``.
    """

    hessian_estimator = GNB
    state_spec = StateSpec(
        moments={"exp_avg": True, "hessian": False}, first_moment="exp_avg", counters=("step", "hessian_step")
    )

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-4,
        betas: tuple[float, float] = (0.965, 0.99),
        rho: float = 0.04,
        weight_decay: float = 0.1,
        eps: float = 1e-15,
        update_every: int = 10,
        seed: int = 0,
        *,
        state_bits: Literal[32, 8] = 32,
        foreach: bool | None = None,
        compile: bool = False,
    ) -> None:
        defaults = dict(
            lr=lr, betas=tuple(betas), rho=rho, weight_decay=weight_decay, eps=eps, update_every=update_every,
            seed=seed, state_bits=state_bits, foreach=foreach, compile=compile,
        )
        super().__init__(params, defaults)

    def _validate_group(self, group: dict[str, Any]) -> None:
        super()._validate_group(group)
        check_int("update_every", group["update_every"], 1)
        check_int("seed", group["seed"], 0)

    def _step(self, step: int) -> None:
        self._update(step, None)
        self._warn_if_never_refreshed(step)

    def _warn_if_never_refreshed(self, step: int) -> None:
        k = self.param_groups[0]["update_every"]
        if step != 2 * k + 1 or self.__dict__.get("_warned_no_hessian"):
            return
        counts = [s["hessian_step"] for s in self.state.values() if "hessian_step" in s]
        if counts and all(float(c) == 0 for c in counts):  # CPU counters (device ones only when compiled)
            self.__dict__["_warned_no_hessian"] = True
            warnings.warn(
                f"SophiaG has taken {step - 1} steps without a curvature estimate, so every update is the clipped "
                "step lr·sign(m). Add `lightning_optim.callbacks.HessianEstimator()` to the Trainer's callbacks, or "
                "call `optimizer.update_hessian(batch_size=B)` after a backward of the loss on labels sampled from "
                "the model's own softmax.",
                UserWarning,
                stacklevel=3,
            )

    @torch.no_grad()
    def update_hessian(self, batch_size: int, grads: Sequence[Tensor | None] | None = None) -> None:
        """Fold a Gauss-Newton-Bartlett estimate into h: h ← β2·h + (1 − β2)·B·ĝ⊙ĝ, for every parameter with ĝ.

        Call it between steps (the callback does, after every k-th step), after a backward of the mean
        cross-entropy on labels sampled from the model's softmax. Under DDP pass the gradient averaged across
        ranks and B summed over them, so every rank folds the same numbers.

        Args:
            batch_size: B, the number of sampled labels the mean loss was taken over (tokens, for a LM).
            grads: ĝ per parameter in :meth:`hessian_params` order (None entries skipped); default each
                parameter's ``.grad`` (the authors' ``update_hessian()``).
        """
        check_int("batch_size", batch_size, 1)
        params = self.hessian_params()
        if grads is None:
            grads = [p.grad for p in params]
        if len(grads) != len(params):
            raise ValueError(f"update_hessian: got {len(grads)} gradients for {len(params)} parameters.")
        by_param = dict(zip(params, grads))
        signed = self.state_spec.moments["hessian"]
        for group in self.param_groups:
            beta2 = group["betas"][1]
            for p in group["params"]:
                g = by_param[p]
                if g is None:
                    continue
                state = self._init_state(p, group)
                if is_quantized(state, "hessian"):
                    h = load_moment(state, "hessian", signed)
                    gnb_fold_(h, g.detach(), batch_size, beta2)
                    store_moment_(state, "hessian", signed, h, scratch=True)
                else:
                    gnb_fold_(state["hessian"], g.detach(), batch_size, beta2)
                state["hessian_step"] += 1


# -- the update ------------------------------------------------------------------------------------------------
def _denominators(hessians: list[Tensor], rho: float, eps: float, clamp: bool) -> list[Tensor]:
    """ρ·h + ε (SophiaG, the authors' form) or max(ρ·h, ε) (SophiaH: a negative h gives the clipped step)."""
    denoms = torch._foreach_mul(hessians, rho)
    if clamp:
        torch._foreach_clamp_min_(denoms, eps)
    else:
        torch._foreach_add_(denoms, eps)
    return denoms


def _clipped_ratios(
    exp_avgs: list[Tensor], hessians: list[Tensor], rho: float, eps: float, clamp: bool
) -> list[Tensor]:
    """min(|m| / denominator, 1): the size of each entry's step in units of η (h = inf gives 0)."""
    ratios = torch._foreach_abs(exp_avgs)
    torch._foreach_div_(ratios, _denominators(hessians, rho, eps, clamp))
    torch._foreach_clamp_max_(ratios, 1.0)
    return ratios


def _fold_after(
    params: list[Tensor], hessians: list[Tensor], hessian_steps: list[Tensor], folds: dict[Tensor, Tensor], beta2: float
) -> None:
    """h ← β2·h + (1 − β2)·ĥ for the parameters that have an estimate (after their update)."""
    for p, h, u in zip(params, hessians, hessian_steps):
        estimate = folds.get(p)
        if estimate is not None:
            ema_fold_(h, estimate, beta2)
            u += 1


def _sophia_single_tensor(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    hessians: list[Tensor],
    steps: list[Tensor],
    hessian_steps: list[Tensor],
    *,
    folds: dict[Tensor, Tensor] | None,
    lr: float,
    beta1: float,
    beta2: float,
    rho: float,
    eps: float,
    weight_decay: float,
    clamp_denominator: bool,
) -> None:
    """Reference path: the equations one parameter at a time."""
    for param, grad, exp_avg, h, step_t, hstep_t in zip(params, grads, exp_avgs, hessians, steps, hessian_steps):
        step_t += 1
        p32, g32 = as_compute([param, grad])
        decoupled_decay_(p32, lr, weight_decay)
        exp_avg.lerp_(g32, 1 - beta1)
        denom = h * rho
        denom = denom.clamp_min_(eps) if clamp_denominator else denom.add_(eps)
        ratio = (exp_avg.abs() / denom).clamp_max_(1.0)
        p32.addcmul_(exp_avg.sign(), ratio, value=-lr)
        write_back([param], [p32])
        if folds:
            _fold_after([param], [h], [hstep_t], folds, beta2)


def _sophia_foreach(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    hessians: list[Tensor],
    steps: list[Tensor],
    hessian_steps: list[Tensor],
    *,
    folds: dict[Tensor, Tensor] | None,
    lr: float,
    beta1: float,
    beta2: float,
    rho: float,
    eps: float,
    weight_decay: float,
    clamp_denominator: bool,
) -> None:
    """Multi-tensor path, grouped by device and dtype, in the per-parameter path's operation order."""
    lists = [params, grads, exp_avgs, hessians, steps, hessian_steps]
    for (dev_params, dev_grads, dev_exp_avgs, dev_hessians, dev_steps, dev_hsteps), _ in (
        StepCountedOptimizer._group_tensors_by_device_and_dtype(lists).values()
    ):
        torch._foreach_add_(dev_steps, 1.0)
        p32, g32 = as_compute(dev_params), as_compute(dev_grads)
        decoupled_decay_(p32, lr, weight_decay)
        torch._foreach_lerp_(dev_exp_avgs, g32, 1 - beta1)
        ratios = _clipped_ratios(dev_exp_avgs, dev_hessians, rho, eps, clamp_denominator)
        torch._foreach_addcmul_(p32, torch._foreach_sign(dev_exp_avgs), ratios, value=-lr)
        write_back(dev_params, p32)
        if folds:
            _fold_after(dev_params, dev_hessians, dev_hsteps, folds, beta2)


def _sophia_capturable(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    hessians: list[Tensor],
    steps: list[Tensor],
    lr: Tensor,
    *,
    beta1: float,
    rho: float,
    eps: float,
    weight_decay: float,
    clamp_denominator: bool,
) -> None:
    """The multi-tensor update with lr and the step counters on the device, for ``torch.compile``."""
    torch._foreach_add_(steps, 1.0)
    p32, g32 = as_compute(params), as_compute(grads)
    decoupled_decay_(p32, lr, weight_decay)
    torch._foreach_lerp_(exp_avgs, g32, 1 - beta1)
    ratios = _clipped_ratios(exp_avgs, hessians, rho, eps, clamp_denominator)
    torch._foreach_mul_(ratios, torch._foreach_sign(exp_avgs))
    torch._foreach_mul_(ratios, -lr)
    torch._foreach_add_(p32, ratios)
    write_back(params, p32)
