"""Numerical-stability statistics and transforms (docs/monitors.md, section 2).

Softmax collapse, the ⊥Grad transform and its alignment statistic, StableMax (Prieto et al., "Grokking at
the Edge of Numerical Stability", ICLR 2025, arXiv 2501.04697) and the opposing-signals probe statistics
(Rosenfeld & Risteski, arXiv 2311.04163).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Literal

import torch
from torch import Tensor

__all__ = [
    "softmax_collapse_fraction",
    "perpendicular_grad_",
    "nlm_cosine",
    "stablemax",
    "stablemax_cross_entropy",
    "loss_delta_stats",
]


def _accum_dtype(dtype: torch.dtype) -> torch.dtype:
    # Reductions of half-precision tensors are accumulated in float32, float64 stays float64.
    return torch.promote_types(dtype, torch.float32)


@torch.no_grad()
def softmax_collapse_fraction(logits: Tensor, mask: Tensor | None = None) -> Tensor:
    r"""Share of samples whose softmax is exactly one-hot: :math:`S = \sum_j e^{z_j - \max_k z_k} = 1`.

    The class dimension is the last one; every other position is a sample and ``mask`` (broadcastable
    to ``logits.shape[:-1]``, true = counted) selects samples, e.g. non-padding tokens. ``S`` is computed
    with torch ops in the logits' own dtype, so the test is exactly "every non-maximal term was absorbed",
    where the gradient vanishes. For two logits ``(0, -d)`` this starts at :math:`d = p \ln 2` with ``p``
    the significand bits: float32 16.6355, float64 36.7368, float16 7.6246, bfloat16 5.5452.
    Returns a float32 0-dim tensor (0 when no sample is selected). Logged as ``stability/softmax_collapse``.
    """
    shifted = logits - logits.amax(dim=-1, keepdim=True)
    collapsed = shifted.exp().sum(dim=-1) == 1
    if mask is None:
        return collapsed.float().mean()
    mask = torch.broadcast_to(mask.bool(), collapsed.shape)
    return (collapsed & mask).sum().float() / mask.sum().clamp(min=1).float()


@torch.no_grad()
def perpendicular_grad_(params: Iterable[Tensor]) -> None:
    r"""⊥Grad, in place on each ``p.grad``: keep only the part of the gradient orthogonal to the weight.

    Per tensor (flattened): :math:`g_\perp = g - \frac{\langle w, g\rangle}{\langle w, w\rangle + 10^{-30}} w`,
    then :math:`g_\perp \leftarrow g_\perp \lVert g\rVert / \lVert g_\perp\rVert` (0 when
    :math:`\lVert g_\perp\rVert = 0`), so the step no longer just rescales the weights (naive loss
    minimisation) and its size is unchanged. Reductions run in float32 for half-precision tensors.
    """
    for p in params:
        g = p.grad
        if g is None:
            continue
        dtype = _accum_dtype(g.dtype)
        w, gc = p.detach().to(dtype), g.to(dtype)
        g_perp = gc - ((w * gc).sum() / ((w * w).sum() + 1e-30)) * w
        perp_norm = torch.linalg.vector_norm(g_perp)
        # where() instead of a division guard: no NaN when g is parallel to w, and no host read.
        scale = torch.where(perp_norm > 0, torch.linalg.vector_norm(gc) / perp_norm, 0.0)
        g.copy_(g_perp * scale)


@torch.no_grad()
def nlm_cosine(params: Iterable[Tensor]) -> Tensor:
    r"""Gradient-weight alignment :math:`\sum\langle w,g\rangle / \sqrt{\sum\lVert w\rVert^2 \sum\lVert g\rVert^2}`.

    Sums run over every parameter tensor with a gradient; a value near 1 means the step mostly rescales the
    weights (naive loss minimisation). float32 0-dim tensor on the first gradient's device (float64 when
    that gradient is float64; a CPU zero when there are no gradients). Logged as ``stability/nlm_cosine``.
    """
    dots, w_sq, g_sq = [], [], []
    device = dtype = None
    for p in params:
        if p.grad is None:
            continue
        if device is None:
            device, dtype = p.grad.device, _accum_dtype(p.grad.dtype)
        w, g = p.detach().flatten().to(dtype), p.grad.flatten().to(dtype)
        dots.append(torch.dot(w, g).to(device))
        w_sq.append(torch.dot(w, w).to(device))
        g_sq.append(torch.dot(g, g).to(device))
    if device is None:
        return torch.zeros((), dtype=torch.float32)
    # sqrt(A)·sqrt(B) rather than sqrt(A·B): same value, no overflow of the product.
    return torch.stack(dots).sum() / (torch.stack(w_sq).sum().sqrt() * torch.stack(g_sq).sum().sqrt())


def _s(z: Tensor) -> Tensor:
    # s(x) = x + 1 for x >= 0, 1 / (1 - x) for x < 0; min(x, 0) keeps the unused branch finite.
    return torch.where(z >= 0, z + 1, 1 / (1 - torch.clamp(z, max=0)))


def stablemax(z: Tensor, dim: int = -1) -> Tensor:
    r"""StableMax (Prieto et al. 2025): :math:`\mathrm{StableMax}(z)_i = s(z_i) / \sum_j s(z_j)` along ``dim``.

    :math:`s(x) = x + 1` for :math:`x \ge 0` and :math:`1/(1 - x)` for :math:`x < 0` (continuous, slope 1 at
    0). Unlike softmax it is not shift-invariant and grows only linearly, so it does not collapse to an
    exact one-hot in floating point.
    """
    s = _s(z)
    return s / s.sum(dim=dim, keepdim=True)


def stablemax_cross_entropy(z: Tensor, target: Tensor, reduction: Literal["mean", "sum", "none"] = "mean") -> Tensor:
    r"""Cross-entropy with StableMax: :math:`-\log \mathrm{StableMax}(z)_y`, classes in the last dimension.

    ``target`` holds class indices of shape ``z.shape[:-1]``. Computed in ``z``'s dtype as
    :math:`\log \sum_j s(z_j) - \log s(z_y)` with :math:`\log s` written via ``log1p``; the authors pass
    float64 logits for grokking tasks (``z.double()``). ``reduction`` as in ``F.cross_entropy``.
    """
    # log s(x) = log1p(x) for x >= 0 and -log1p(-x) for x < 0; the clamps keep the unused branch finite.
    log_s = torch.where(z >= 0, torch.log1p(z.clamp(min=0)), -torch.log1p(-z.clamp(max=0)))
    log_sum = torch.log(_s(z).sum(dim=-1))
    loss = log_sum - log_s.gather(-1, target.long().unsqueeze(-1)).squeeze(-1)
    if reduction == "mean":
        return loss.mean()
    if reduction == "sum":
        return loss.sum()
    if reduction == "none":
        return loss
    raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")


@torch.no_grad()
def loss_delta_stats(
    before: Tensor,
    after: Tensor,
    top_k: int,
    previous_top: tuple[Tensor, Tensor] | None = None,
) -> dict[str, Tensor]:
    r"""Statistics of the per-sample loss change :math:`\Delta = \ell_\text{after} - \ell_\text{before}` of one step.

    Returns 0-dim tensors ``mean``, ``max`` (largest increase), ``min`` (largest decrease), ``abs_p99``
    (99th percentile of :math:`|\Delta|`), ``opposing_mass`` =
    :math:`\min(\sum_{\Delta>0}\Delta, -\sum_{\Delta<0}\Delta) / \sum|\Delta|` (0: all samples moved the same
    way, 0.5: balanced tug of war; 0 when nothing moved) and ``flip_fraction`` = share of the previous
    probe's top-k :math:`|\Delta|` samples whose :math:`\Delta` changed sign now (0 without
    ``previous_top``); and index tensors ``top_increase`` / ``top_decrease`` (largest increases /
    decreases) and ``top_abs`` with ``top_abs_sign`` (largest :math:`|\Delta|`, sign of :math:`\Delta`
    there). Pass ``(stats["top_abs"], stats["top_abs_sign"])`` of the previous probe as ``previous_top``.
    ``k = min(top_k, number of samples)``. Opposing mass and flip fraction are this project's construction
    on top of Rosenfeld & Risteski (arXiv 2311.04163).
    """
    delta = (after.detach() - before.detach()).flatten()
    delta = delta.to(_accum_dtype(delta.dtype))
    k = min(int(top_k), delta.numel())
    magnitude = delta.abs()
    total = magnitude.sum()
    increase, decrease = delta.clamp(min=0).sum(), (-delta).clamp(min=0).sum()
    opposing = torch.where(total > 0, torch.minimum(increase, decrease) / total, 0.0)
    top_abs = magnitude.topk(k).indices
    flips = torch.zeros((), dtype=delta.dtype, device=delta.device)
    if previous_top is not None and previous_top[0].numel() > 0:
        prev_idx, prev_sign = previous_top
        prev_idx = prev_idx.to(delta.device)
        # A sign change means opposite strict signs; a zero on either side is not a flip.
        flips = (torch.sign(delta[prev_idx]) * prev_sign.to(delta.device, delta.dtype) < 0).to(delta.dtype).mean()
    return {
        "mean": delta.mean(),
        "max": delta.max(),
        "min": delta.min(),
        "abs_p99": torch.quantile(magnitude, 0.99),
        "opposing_mass": opposing,
        "flip_fraction": flips,
        "top_increase": delta.topk(k).indices,
        "top_decrease": (-delta).topk(k).indices,
        "top_abs": top_abs,
        "top_abs_sign": torch.sign(delta[top_abs]),
    }


@torch.no_grad()
def perpendicular_grads_(params: Iterable[Tensor], apply: bool = True, alignment: bool = False) -> Tensor | None:
    r"""Multi-tensor, overflow-safe ⊥Grad in place on each ``p.grad``, and optionally the NLM alignment.

    The transform of :func:`perpendicular_grad_` (the authors' ``OrthoGrad``), per tensor:
    :math:`g_\perp = g - \frac{\langle w, g\rangle}{\langle w, w\rangle} w`, rescaled to :math:`\lVert g\rVert`
    (0 when :math:`g_\perp = 0` or :math:`w = 0` leaves it as g), computed with ``torch._foreach_*`` ops per
    (device, dtype) group and without a host read. Every reduction works on :math:`\hat g = g/\max|g|`
    (entries in [-1, 1]), so a finite gradient whose square overflows (an entry of 1e20 in float32) still
    gives a finite result of norm :math:`\lVert g\rVert` (clamped to the dtype's largest value); NaN/inf
    gradients stay non-finite and never raise. Half-precision tensors are computed in float32.

    Args:
        params: parameters; those without a gradient are skipped.
        apply: write :math:`g_\perp` into ``p.grad`` (False: only measure, gradients untouched).
        alignment: also return :func:`nlm_cosine` of the incoming gradients (float32 0-dim tensor on the first
            gradient's device, 0 when there is none or every w or g is 0), from the same reductions.
    """
    groups: dict[tuple[torch.device, torch.dtype], list[Tensor]] = {}
    for p in params:
        if p.grad is not None:
            groups.setdefault((p.grad.device, p.grad.dtype), []).append(p)
    sums: list[Tensor] = []  # per group: (Σ⟨w,g⟩, Σ‖w‖², Σ‖g‖²) in float64
    first_device = None
    for (device, dtype), group in groups.items():
        first_device = device if first_device is None else first_device
        compute = _accum_dtype(dtype)
        grads = [p.grad for p in group]
        weights = [p.detach() if p.dtype == compute else p.detach().to(compute) for p in group]
        in_place = apply and dtype == compute
        if in_place:
            work = grads
        else:
            work = [g.to(compute) if g.dtype != compute else g.clone() for g in grads]
        peaks = torch.stack([torch.maximum(hi, -lo) for lo, hi in (torch.aminmax(g) for g in work)])
        # 0 (a zero gradient) and NaN divide by 1: 0 stays 0 and NaN stays NaN
        peaks = torch.where(peaks > 0, peaks, torch.ones_like(peaks))
        torch._foreach_div_(work, list(peaks.unbind()))  # ĝ, |entries| <= 1
        w_sq = torch.stack(torch._foreach_norm(weights)).square()  # inf for absurd weights: projection off
        dots = torch.stack([torch.dot(w.reshape(-1), g.reshape(-1)) for w, g in zip(weights, work)])
        g_norms = torch.stack(torch._foreach_norm(work))  # ‖ĝ‖ in [1, √n] for a finite non-zero g
        if alignment:
            peaks64 = peaks.double()
            sums.append(torch.stack([
                (dots.double() * peaks64).sum(), w_sq.double().sum(), (g_norms.double() * peaks64).square().sum()
            ]).to(first_device))
        if not apply:
            continue
        coefficients = torch.where(w_sq > 0, dots / w_sq, torch.zeros_like(dots))
        torch._foreach_sub_(work, torch._foreach_mul(weights, list(coefficients.unbind())))
        perp = torch.stack(torch._foreach_norm(work))
        # normalise first (entries <= 1), then scale to ‖g‖ = max|g|·‖ĝ‖: no intermediate can overflow
        torch._foreach_div_(work, list(torch.where(perp > 0, perp, torch.ones_like(perp)).unbind()))
        target = (g_norms * peaks).clamp(max=torch.finfo(compute).max)
        torch._foreach_mul_(work, list(target.unbind()))
        if not in_place:
            if dtype != compute:  # the norm of a half-precision gradient may exceed its own range
                limit = torch.finfo(dtype).max
                torch._foreach_clamp_min_(work, -limit)
                torch._foreach_clamp_max_(work, limit)
            torch._foreach_copy_(grads, work)
    if not alignment:
        return None
    if not sums:
        return torch.zeros((), dtype=torch.float32)
    dot, w_sq_total, g_sq_total = torch.stack(sums).sum(dim=0).unbind()
    denominator = w_sq_total.sqrt() * g_sq_total.sqrt()
    cosine = torch.where(denominator > 0, dot / denominator, torch.zeros_like(dot))
    return cosine.float()


__all__ += ["perpendicular_grads_"]
