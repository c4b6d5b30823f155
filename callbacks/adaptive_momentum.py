"""AdaptiveMomentum: the adaptive-memory-momentum coefficient applied to an existing optimizer's EMA."""

from __future__ import annotations

import torch
from torch import Tensor

from lightning_optim import registry
from lightning_optim.functional import adam_denom, adam_denoms_capturable, am_beta, effective_beta, inverse_sqrt, pull_towards_, sum_of_squares
from lightning_optim.callbacks._base import StabilityCallback, StepContext
from lightning_optim.callbacks._pipeline import OptimizerPipeline
from lightning_optim.monitors import tags
from lightning_optim.state_adapters import state_adapter
from lightning_optim.validation import check_range

_SUPPORTED = (
    "torch.optim.SGD (momentum > 0, dampening == momentum, nesterov=False), torch.optim.Adam, and every registered "
    "optimizer whose first moment is Adam's EMA (registry flag adam_first_moment: torch.optim.AdamW, "
    "lightning_optim.SPAM), and their subclasses"
)


class AdaptiveMomentum(StabilityCallback):
    """Adaptive Memory Momentum (Topollai & Choromanska, arXiv 2510.04988) for an optimizer you already use.

    Each optimizer step (after AMP unscaling and the other stability stages), with g′ the gradient the
    first moment will consume (−g under ``maximize``, plus wd·θ for coupled weight decay) and d the
    optimizer's first moment (SGD ``momentum_buffer``, Adam ``exp_avg``), over all parameters at once:

        A = ⟨g′, g′⟩_P,  B = ⟨d − g′, d − g′⟩_P,  β* = clip((1 + λ)·A/B − λ, 0, β_max)  (0 when B = 0)
        β_eff = (β* + λ)/(1 + λ)

    with P = 1 for SGD and P = 1/(√v̂′ + ε) for Adam (v′ = β2·v + (1 − β2)·g′², v̂′ = v′/(1 − β2^(t+1))).
    The optimizer's own β0 (``momentum`` or ``betas[0]``) is left untouched: the memory is pre-mixed in
    place, d ← (β_eff·d + (β0 − β_eff)·g′)/β0, so the optimizer's update d ← β0·d + (1 − β0)·g′ yields
    exactly β_eff·d + (1 − β_eff)·g′. Sync-free (β never reaches the host), and the same for foreach and
    fused kernels. Nothing happens for a parameter before its first moment exists. Torch's Adam still
    divides exp_avg by 1 − β0^t, unlike :class:`lightning_optim.AdaptiveMomentumAdamW`.
    SGD(momentum=dampening=μ0) + this callback equals :class:`lightning_optim.AdaptiveMomentumSGD`.
    Logs ``stability/beta1``, the coefficient the EMA actually applies (β_eff), and ``stability/beta_star``
    (β* in [0, β_max]). β_eff is above β_max whenever β* is near β_max: at β* = β_max it is
    (β_max + λ)/(1 + λ), 0.909 for the defaults; that is the memory term λ at work, not a clipping failure.
    Quantized first moments and other optimizers raise at fit start.

    Args:
        memory_weight: λ ≥ 0 (default 0.1).
        beta_max: β_max in [0, 1) (default 0.9).
    """

    stage_order = 3

    def __init__(self, memory_weight: float = 0.1, beta_max: float = 0.9) -> None:
        super().__init__()
        check_range("memory_weight", memory_weight, 0.0)
        check_range("beta_max", beta_max, 0.0, 1.0, high_open=True)
        self.memory_weight = float(memory_weight)
        self.beta_max = float(beta_max)
        self._beta: dict[int, Tensor] = {}

    def check_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        # Quantized moments (bitsandbytes, torchao) first: the pre-mix rewrites d in place, and a
        # requantized d would carry a fresh rounding error every step on top of the optimizer's own.
        # Their small fp32 tensors alone would not help: the big ones are the quantized ones.
        try:
            quantized = state_adapter(optimizer).quantized
        except TypeError:  # no adapter at all: _kind names the supported optimizers
            quantized = False
        if quantized:
            raise TypeError(
                f"AdaptiveMomentum does not support {type(optimizer).__name__}: it stores its first moment "
                "quantized (8/4-bit codes with per-block scales), so the pre-mix of the momentum cannot be "
                f"written back exactly. Use a 32-bit optimizer ({_SUPPORTED}) or "
                "lightning_optim.AdaptiveMomentumAdamW."
            )
        _kind(optimizer)

    def before_step(self, ctx: StepContext) -> None:
        # under a GradScaler a non-finite step is skipped by the scaler after this hook: keep it out of d
        beta = self.premix_(ctx.optimizer, ctx.amp_scale, keep_if_nonfinite=ctx.grad_scaler)
        if beta is not None:
            self._beta[ctx.pipeline.index] = beta

    @torch.no_grad()
    def premix_(
        self, optimizer: torch.optim.Optimizer, amp_scale: Tensor | None = None, keep_if_nonfinite: bool = False
    ) -> Tensor | None:
        """Pre-mix the first moments of ``optimizer`` for its next step; returns β_eff (a device tensor).

        Usable without Lightning: call it after ``backward()`` and before ``optimizer.step()``.
        ``keep_if_nonfinite``: leave d untouched (one select per tensor) when the gradient is not finite.
        """
        kind = _kind(optimizer)
        memories, grads, weights, beta0s = [], [], [], []
        for group in optimizer.param_groups:
            beta0 = float(group["momentum"] if kind == "sgd" else group["betas"][0])
            decay = _coupled_decay(optimizer, group)
            for p in group["params"]:
                state = optimizer.state.get(p)
                key = "momentum_buffer" if kind == "sgd" else "exp_avg"
                if p.grad is None or not state or state.get(key) is None:
                    continue
                g = _consumed_gradient(p, decay, group.get("maximize", False), amp_scale)
                memories.append(state[key])
                grads.append(g)
                beta0s.append(beta0)
                if kind == "adam":
                    weights.append(_adam_denominator(state, g, group))
        if not memories:
            return None
        diffs = torch._foreach_sub(memories, grads)
        scales = inverse_sqrt(weights) if weights else None
        sq_grad = sum_of_squares(grads, scales)
        sq_diff = sum_of_squares(diffs, scales)
        # float64 sums, so a model-wide sum above fp32's range stays finite; β in the moments' precision
        beta = am_beta(sq_grad, sq_diff, self.memory_weight, self.beta_max).to(memories[0].dtype)
        beta_eff = effective_beta(beta, self.memory_weight)
        # d ← (β_eff·d + (β0 − β_eff)·g′)/β0 = d − ((β0 − β_eff)/β0)·(d − g′), per group's β0
        finite = torch.isfinite(sq_grad) & torch.isfinite(sq_diff)
        for beta0 in sorted(set(beta0s)):
            idx = [i for i, b in enumerate(beta0s) if b == beta0]
            weight = (beta0 - beta_eff) / beta0
            group_memories = [memories[i] for i in idx]
            if keep_if_nonfinite:
                mixed = [d.clone() for d in group_memories]
                pull_towards_(mixed, [diffs[i] for i in idx], weight)
                for d, new in zip(group_memories, mixed):
                    torch.where(finite, new, d, out=d)
            else:
                pull_towards_(group_memories, [diffs[i] for i in idx], weight)
        return beta_eff

    def metrics(self, pipeline: OptimizerPipeline) -> dict[str, Tensor | float]:
        beta = self._beta.get(pipeline.index)
        if beta is None:
            return {}
        # β* = β_eff·(1 + λ) − λ: recovered on logging steps only, so the step keeps one tensor per pipeline
        return {tags.BETA1: beta, tags.BETA_STAR: beta * (1 + self.memory_weight) - self.memory_weight}


def _kind(optimizer: torch.optim.Optimizer) -> str:
    """"sgd" or "adam": which first-moment update the pre-mix inverts (subclasses included)."""
    name = type(optimizer).__name__
    info = registry.info_for(optimizer)
    if isinstance(optimizer, torch.optim.SGD):
        for group in optimizer.param_groups:
            if not group["momentum"] > 0 or group["dampening"] != group["momentum"] or group["nesterov"]:
                raise ValueError(
                    "AdaptiveMomentum needs torch.optim.SGD with momentum > 0, dampening == momentum and "
                    f"nesterov=False (got momentum={group['momentum']}, dampening={group['dampening']}, "
                    f"nesterov={group['nesterov']})."
                )
        return "sgd"
    if isinstance(optimizer, torch.optim.Adam) or (info is not None and info.adam_first_moment):
        for group in optimizer.param_groups:
            if not float(group["betas"][0]) > 0:
                raise ValueError(f"AdaptiveMomentum needs betas[0] > 0 for {name} (got {group['betas'][0]}).")
            if group.get("state_bits", 32) != 32:
                raise NotImplementedError(f"AdaptiveMomentum cannot pre-mix the quantized first moment of {name}.")
        return "adam"
    raise TypeError(f"AdaptiveMomentum does not support {name}; supported: {_SUPPORTED}.")


def _consumed_gradient(p: Tensor, coupled_decay: float, maximize: bool, amp_scale: Tensor | None) -> Tensor:
    """g′: the gradient the optimizer's first moment will consume at this step."""
    g = p.grad if amp_scale is None else p.grad / amp_scale
    if maximize:
        g = -g
    if coupled_decay:
        g = g + coupled_decay * p.detach()
    return g


def _coupled_decay(optimizer: torch.optim.Optimizer, group: dict) -> float:
    """Weight decay that torch adds to the gradient before the first moment (SGD, Adam; not AdamW, SPAM)."""
    coupled = isinstance(optimizer, torch.optim.SGD) or (
        isinstance(optimizer, torch.optim.Adam)
        and not isinstance(optimizer, torch.optim.AdamW)
        and not group.get("decoupled_weight_decay", False)
    )
    return float(group.get("weight_decay", 0.0)) if coupled else 0.0


def _adam_denominator(state: dict, g: Tensor, group: dict) -> Tensor:
    """√v̂′ + ε with v′ = β2·v + (1 − β2)·g′² and v̂′ = v′/(1 − β2^(t+1)), t the stored step."""
    beta2 = float(group["betas"][1])
    v = state["exp_avg_sq"] * beta2 + (1 - beta2) * g.square()
    step = state["step"]
    if isinstance(step, Tensor) and step.device.type != "cpu":  # fused/capturable: the step lives on the device
        return adam_denoms_capturable([v], [step + 1], beta2, float(group["eps"]))[0]
    return adam_denom(v, float(step) + 1, beta2, float(group["eps"]))  # a CPU tensor or number: no device sync
