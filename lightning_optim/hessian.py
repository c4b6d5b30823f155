"""Diagonal-Hessian estimates for the second-order optimizers (AdaHessian, SophiaH, SophiaG), pure torch.

Two estimators, written once and used by the optimizers (``adahessian.py``, ``sophia.py``) and by the
Lightning callback ``lightning_optim.callbacks.HessianEstimator``:

- **Hutchinson** (:func:`hutchinson_diagonal`): for a probe z with E[z zᵀ] = I (Rademacher ±1 or standard
  Gaussian), E[z ⊙ (H z)] = diag(H). H z is one extra backward through the graph of the gradient
  (``create_graph=True``): the gradient of ⟨∇L, z⟩. With ``n_samples`` probes the estimate is their mean.
  Rademacher probes are exact for a diagonal H (z ⊙ (H z) = z² ⊙ diag(H) = diag(H)).
- **Gauss-Newton-Bartlett** (:func:`sample_labels`, :func:`gnb_fold_`): labels ŷ drawn from the model's own
  softmax, ĝ = ∇ (1/B Σ_b CE(logits_b, ŷ_b)), ĥ = B·ĝ ⊙ ĝ. Its expectation over ŷ is B·E[ĝ ĝᵀ] diagonal,
  the diagonal of the Gauss-Newton matrix of the mean loss (Bartlett's identity), and it is never negative.

Probes and sampled labels are drawn from generators seeded by (seed, global step, ...) (:func:`mix_seed`):
a resumed run and every DDP rank draw the same probes, so the estimate (averaged across ranks by the
callback) and every rank's optimizer state stay identical. Each parameter gets its own generator (seeded
also by its index in the optimizer), so its probe does not depend on which other parameters have a
gradient at that step.

This module never imports Lightning. The mixin :class:`HessianOptimizerMixin` is the protocol the
callback drives: which estimator an optimizer needs, on which steps, and where the estimate goes.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, ClassVar, Literal

import torch
from torch import Tensor

from lightning_optim.validation import check_choice, check_int

__all__ = [
    "GNB",
    "HUTCHINSON",
    "HessianOptimizerMixin",
    "Probe",
    "draw_probe",
    "ema_fold_",
    "gnb_fold_",
    "hutchinson_diagonal",
    "mix_seed",
    "sample_labels",
    "spatial_average_abs",
]

HUTCHINSON = "hutchinson"
GNB = "gnb"
Probe = Literal["rademacher", "gaussian"]
PROBES = ("rademacher", "gaussian")

_MASK64 = (1 << 64) - 1


def mix_seed(*values: int) -> int:
    """A 63-bit seed from integers (seed, step, sample, parameter index, rank, ...), well mixed.

    SplitMix64 finaliser over the values in order, so nearby steps and indices give unrelated streams.

    Args:
        values: non-negative integers.
    """
    x = 0x9E3779B97F4A7C15
    for v in values:
        x = (x ^ (int(v) & _MASK64)) & _MASK64
        x = (x + 0x9E3779B97F4A7C15) & _MASK64
        x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
        x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
        x ^= x >> 31
    return x >> 1


def _generator(device: torch.device, seed: int) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed)


def draw_probe(
    like: Tensor, *, seed: int, step: int, sample: int, index: int, probe: str, dtype: torch.dtype | None = None
) -> Tensor:
    """One Hutchinson probe z shaped like ``like``: Rademacher ±1 or standard Gaussian entries.

    Drawn in fp32 from a generator seeded by (seed, step, sample, index) on ``like``'s device, then cast
    (±1 is exact in every dtype).

    Args:
        like: the parameter (shape and device).
        seed: the run's seed.
        step: the 1-based global step the estimate belongs to.
        sample: the probe's number among ``n_samples``.
        index: the parameter's index in its optimizer (over all param groups).
        probe: ``"rademacher"`` or ``"gaussian"``.
        dtype: dtype of the result (default: ``like``'s).
    """
    gen = _generator(like.device, mix_seed(seed, step, sample, index))
    if probe == "rademacher":
        z = torch.randint(0, 2, like.shape, generator=gen, device=like.device, dtype=torch.float32).mul_(2).sub_(1)
    else:
        z = torch.randn(like.shape, generator=gen, device=like.device, dtype=torch.float32)
    return z.to(dtype or like.dtype)


def _estimate_dtype(p: Tensor) -> torch.dtype:
    return torch.float64 if p.dtype == torch.float64 else torch.float32


def hutchinson_diagonal(
    grads: Sequence[Tensor | None],
    params: Sequence[Tensor],
    indices: Sequence[int],
    *,
    seed: int,
    step: int,
    n_samples: int = 1,
    probe: str = "rademacher",
) -> list[Tensor | None]:
    """D = (1/n) Σ_s z_s ⊙ (H z_s) for each parameter (fp32; float64 for float64 parameters).

    ``grads`` are gradients that carry their graph (``loss.backward(create_graph=True)`` or
    ``torch.autograd.grad(loss, params, create_graph=True)``). A gradient without a graph does not depend
    on any parameter, so its rows of H are zero: its estimate is exact zeros (None where the gradient is
    None). The graph is retained (the caller's backward may still need it); it is freed with the gradients.

    Args:
        grads: ∇L per parameter (None: the parameter is not in the loss).
        params: the parameters.
        indices: each parameter's index in its optimizer (seeds its probe).
        seed: the run's seed.
        step: the 1-based global step (seeds the probes).
        n_samples: number of probes averaged.
        probe: ``"rademacher"`` or ``"gaussian"``.
    """
    out: list[Tensor | None] = [
        None if g is None else torch.zeros_like(p, dtype=_estimate_dtype(p)) for g, p in zip(grads, params)
    ]
    live = [i for i, g in enumerate(grads) if g is not None and g.requires_grad]
    if not live:
        return out
    for s in range(n_samples):
        probes = [
            draw_probe(params[i], seed=seed, step=step, sample=s, index=indices[i], probe=probe, dtype=grads[i].dtype)
            for i in live
        ]
        hvps = torch.autograd.grad(
            [grads[i] for i in live],
            [params[i] for i in live],
            grad_outputs=probes,
            retain_graph=True,
            allow_unused=True,
        )
        for i, z, hz in zip(live, probes, hvps):
            if hz is not None:
                target = out[i]
                target.addcmul_(z.to(target.dtype), hz.detach().to(target.dtype), value=1.0 / n_samples)
    return out


def spatial_average_abs(estimate: Tensor, spatial_average: bool = True) -> Tensor:
    """AdaHessian's |D|, averaged over a conv kernel's spatial dimensions (dims 2, 3 of a 4-D tensor).

    The authors' ``get_trace`` (amirgholami/adahessian, image_classification/optim_adahessian.py) takes
    |H z| (= |z ⊙ H z| for ±1 probes) and, for 4-D kernels, its mean over the kernel window, broadcast back.
    Other shapes keep the element-wise |D|. Returns a new tensor of ``estimate``'s shape.

    Args:
        estimate: D.
        spatial_average: average 4-D kernels over dims (2, 3) (the authors' rule); False: |D| everywhere.
    """
    d = estimate.abs()
    if spatial_average and d.ndim == 4:
        d = d.mean(dim=(2, 3), keepdim=True).expand_as(estimate).contiguous()
    return d


def ema_fold_(h: Tensor, estimate: Tensor, beta2: float) -> None:
    """h ← β2·h + (1 − β2)·ĥ in place; an entry where ĥ is NaN keeps its h (a NaN says nothing of curvature).

    Args:
        h: the curvature EMA (fp32 or float64).
        estimate: ĥ (same shape; cast to h's dtype).
        beta2: β2.
    """
    e = estimate.to(h.dtype)
    new = h * beta2 + e * (1 - beta2)
    h.copy_(torch.where(torch.isnan(e), h, new))


def gnb_fold_(h: Tensor, grad: Tensor, batch_size: int, beta2: float) -> None:
    """h ← β2·h + (1 − β2)·B·ĝ⊙ĝ in place, formed as ((1 − β2)·B·ĝ)·ĝ (an entry that overflows becomes +inf,
    which the Sophia update turns into a zero step for it); NaN entries of ĝ keep their h.

    Args:
        h: the curvature EMA.
        grad: ĝ, the gradient of the mean loss on sampled labels.
        batch_size: B, the number of sampled labels that mean was taken over.
        beta2: β2.
    """
    g = grad.to(h.dtype)
    new = h * beta2 + (g * ((1 - beta2) * batch_size)) * g
    h.copy_(torch.where(torch.isnan(g), h, new))


def sample_labels(logits: Tensor, generator: torch.Generator) -> Tensor:
    """Labels drawn from softmax(logits) along the last dimension (no gradient), shape ``logits.shape[:-1]``.

    Args:
        logits: (..., V) scores.
        generator: a generator on ``logits``' device.
    """
    flat = logits.detach().reshape(-1, logits.shape[-1]).float()
    probs = torch.softmax(flat, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).reshape(logits.shape[:-1])


class HessianOptimizerMixin:
    """The protocol between a second-order optimizer and ``HessianEstimator`` (and the closure path).

    ``hessian_estimator`` says what the optimizer needs: ``"hutchinson"`` (a Hessian-vector product of the
    step's own loss: AdaHessian, SophiaH) or ``"gnb"`` (an extra forward/backward on sampled labels after the
    step: SophiaG). :meth:`hessian_due` says on which steps. A Hutchinson estimate is handed in with
    :meth:`set_hessian_estimate` before the step it belongs to and consumed by that step (a step the
    GradScaler skips drops it); without one, the step computes it from gradients that carry a graph.
    """

    hessian_estimator: ClassVar[str] = HUTCHINSON

    param_groups: list[dict[str, Any]]

    def hessian_due(self, step: int) -> bool:
        """Whether the 1-based global step ``step`` refreshes the curvature estimate of some param group.

        Args:
            step: for ``"hutchinson"`` the step about to run; for ``"gnb"`` the step just completed.
        """
        return any(self._group_due(group, step) for group in self.param_groups)

    @staticmethod
    def _group_due(group: dict[str, Any], step: int) -> bool:  # pragma: no cover - abstract
        raise NotImplementedError

    def hessian_params(self) -> list[Tensor]:
        """Every parameter of the optimizer, in the order that indexes the probes."""
        return [p for group in self.param_groups for p in group["params"]]

    def hessian_settings(self) -> list[tuple[dict[str, Any], list[tuple[int, Tensor]]]]:
        """(group, [(index, param), ...]) per param group: what the probes of each group are drawn with."""
        out, index = [], 0
        for group in self.param_groups:
            out.append((group, [(index + i, p) for i, p in enumerate(group["params"])]))
            index += len(group["params"])
        return out

    def set_hessian_estimate(self, estimates: Mapping[Tensor, Tensor | None], step: int | None = None) -> None:
        """Hand in the raw Hutchinson estimate D ≈ diag(H) per parameter for the next step (or ``step``).

        Only parameters of groups due at that step use it; the step consumes it. Nothing is stored in the
        optimizer's state, so a checkpoint never holds a pending estimate.

        Args:
            estimates: parameter -> D (fp32 or the parameter's dtype), None for parameters without one.
            step: the 1-based global step it belongs to (default: the next one).
        """
        if self.hessian_estimator != HUTCHINSON:
            raise RuntimeError(
                f"{type(self).__name__} takes a Gauss-Newton-Bartlett estimate through update_hessian(), not a "
                "Hutchinson estimate."
            )
        target = self.param_groups[0].get("global_step", 0) + 1 if step is None else int(step)
        self.__dict__["_pending_hessian"] = (target, {p: e for p, e in estimates.items() if e is not None})

    def _take_pending(self, step: int) -> dict[Tensor, Tensor] | None:
        pending = self.__dict__.pop("_pending_hessian", None)
        if pending is None or pending[0] != step:
            return None
        return pending[1]

    def _hutchinson_for_step(self, step: int) -> dict[Tensor, Tensor] | None:
        """The raw estimates of every due group's parameters with a gradient at ``step``: the one handed in,
        else computed from gradients that carry a graph. None when no group is due. Raises when a group is
        due and there is neither."""
        pending = self._take_pending(step)
        due = [(g, members) for g, members in self.hessian_settings() if self._group_due(g, step)]
        members = [(i, p) for _, m in due for i, p in m if p.grad is not None]
        if not members:
            return None
        if pending is not None:
            return pending
        if not any(p.grad.requires_grad for _, p in members):
            name = type(self).__name__
            raise RuntimeError(
                f"{name} needs a Hessian-vector product at global step {step}, but the gradients carry no graph. "
                "In Lightning, add the callback `lightning_optim.callbacks.HessianEstimator()` to "
                "`Trainer(callbacks=[...])` (it computes the estimate without changing your training_step); in "
                "plain PyTorch, call `loss.backward(create_graph=True)` before `optimizer.step()`, or hand in an "
                "estimate with `optimizer.set_hessian_estimate({param: D})`."
            )
        estimates: dict[Tensor, Tensor] = {}
        for group, group_members in due:
            live = [(i, p) for i, p in group_members if p.grad is not None]
            if not live:
                continue
            found = hutchinson_diagonal(
                [p.grad for _, p in live],
                [p for _, p in live],
                [i for i, _ in live],
                seed=group["seed"],
                step=step,
                n_samples=group["n_samples"],
                probe=group["probe"],
            )
            estimates.update({p: d for (_, p), d in zip(live, found) if d is not None})
        return estimates

    @staticmethod
    def _release_graphs(params: Sequence[Tensor]) -> None:
        """Detach gradients that carry a graph (create_graph=True): the values stay, the graph and the
        parameter ↔ gradient reference cycle go (as the authors' ``grad.detach_()``)."""
        for p in params:
            if p.grad is not None and p.grad.requires_grad:
                p.grad = p.grad.detach()


def check_hessian_args(group: dict[str, Any]) -> None:
    """Validate the estimation hyper-parameters every second-order optimizer has.

    Args:
        group: a param group (``update_every``, ``n_samples``, ``probe``, ``seed``).
    """
    check_int("update_every", group["update_every"], 1)
    check_int("n_samples", group["n_samples"], 1)
    check_choice("probe", group["probe"], PROBES)
    check_int("seed", group["seed"], 0)
