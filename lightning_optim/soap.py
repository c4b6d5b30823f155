"""SOAP: Adam run in the eigenbasis of Shampoo's preconditioner (docs/algorithms.md#soap)."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor

from lightning_optim._base import StateSpec, StepCountedOptimizer, as_compute, state_dtype, write_back
from lightning_optim.functional import adam_denom, adam_denoms_foreach, decoupled_decay_
from lightning_optim.validation import check_betas, check_bool, check_choice, check_int, check_range

__all__ = ["SOAP", "soap_layout", "merge_small_dims"]

#: torch's limit on the number of dimensions of a tensor: the most preconditioner sides a state can hold
_MAX_SIDES = 64


@dataclass(frozen=True)
class _SOAPStateSpec(StateSpec):
    """:class:`StateSpec` plus SOAP's per-side matrices, stored as ``GG_<d>`` (the statistic L, R, ...) and
    ``Q_<d>`` (its eigenbasis) for every preconditioned dimension d of the (merged) gradient. They are
    neither moments (not parameter-shaped, never reset) nor scalars, but they are SOAP's own state, so a
    state dict holding them is not foreign."""

    matrices: tuple[str, ...] = ("GG", "Q")

    def stored_keys(self) -> set[str]:
        return super().stored_keys() | {f"{k}_{d}" for k in self.matrices for d in range(_MAX_SIDES)}


def merge_small_dims(shape: Sequence[int], max_precond_dim: int) -> tuple[int, ...]:
    """The authors' ``merge_dims`` shape: consecutive dimensions multiplied together while the product
    stays <= ``max_precond_dim``; a dimension that would push the product over starts a new group (a
    dimension larger than the limit on its own stays alone). Size-1 dimensions vanish; never empty.

    Args:
        shape: the gradient's shape (channels-first).
        max_precond_dim: the largest side a preconditioner may have.
    """
    merged: list[int] = []
    running = 1
    for size in shape:
        if running * size <= max_precond_dim:
            running *= size
        elif running > 1:
            merged.append(running)
            running = size
        else:
            merged.append(size)
            running = 1
    if running > 1 or not merged:
        merged.append(running)
    return tuple(merged)


@dataclass(frozen=True)
class _Layout:
    """How SOAP sees one tensor: the shape it preconditions and which of its sides get a matrix."""

    shape: tuple[int, ...]  # the parameter's shape
    view: tuple[int, ...]  # the (merged) shape the preconditioner acts on
    sides: tuple[bool, ...]  # per dimension of ``view``: preconditioned (True) or identity
    channels_last: bool  # a 4-D NHWC tensor permuted to NCHW before merging

    @property
    def preconditioned(self) -> tuple[int, ...]:
        return tuple(d for d, on in enumerate(self.sides) if on)

    def to_view(self, x: Tensor) -> Tensor:
        if self.channels_last:
            x = x.permute(0, 3, 1, 2)
        return x.reshape(self.view)

    def from_view(self, x: Tensor) -> Tensor:
        if self.channels_last:
            s = self.shape
            return x.reshape(s[0], s[3], s[1], s[2]).permute(0, 2, 3, 1)
        return x.reshape(self.shape)


def soap_layout(
    shape: Sequence[int],
    max_precond_dim: int = 10000,
    merge_dims: bool = False,
    precondition_1d: bool = False,
    data_format: str = "channels_first",
) -> _Layout:
    """The preconditioned view of a tensor of ``shape`` under SOAP's options (the authors' rules).

    1-D: one side, preconditioned only with ``precondition_1d`` and n <= ``max_precond_dim`` (never merged).
    0-dim: no side (plain Adam). Otherwise every dimension of the shape (of :func:`merge_small_dims`'s shape
    with ``merge_dims``; a 4-D ``channels_last`` kernel is read as NHWC and permuted to NCHW first) of size
    <= ``max_precond_dim`` gets a matrix, larger ones the identity.

    Args:
        shape: the parameter's shape.
        max_precond_dim: the largest side a preconditioner may have.
        merge_dims: merge small dimensions first (conv kernels).
        precondition_1d: give 1-D tensors a full preconditioner.
        data_format: ``"channels_first"`` or ``"channels_last"`` (only read for 4-D tensors with ``merge_dims``).
    """
    shape = tuple(int(s) for s in shape)
    if len(shape) == 0:
        return _Layout(shape, shape, (), False)
    if len(shape) == 1:
        return _Layout(shape, shape, (precondition_1d and shape[0] <= max_precond_dim,), False)
    channels_last = merge_dims and data_format == "channels_last" and len(shape) == 4
    view = shape
    if merge_dims:
        nchw = (shape[0], shape[3], shape[1], shape[2]) if channels_last else shape
        view = merge_small_dims(nchw, max_precond_dim)
    return _Layout(shape, view, tuple(s <= max_precond_dim for s in view), channels_last)


# -- the math of one tensor --------------------------------------------------------------------------------
def _project(x: Tensor, bases: list[Tensor | None], back: bool = False) -> Tensor:
    """Qᵀ applied along every dimension (``back``: Q): for a matrix Q_Lᵀ X Q_R (back: Q_L X Q_Rᵀ).

    Dimension 0 is contracted and the result's new axis goes last, so after one pass per dimension the
    order is the original one; identity sides only rotate the axes.
    """
    for q in bases:
        if q is None:
            x = x.movedim(0, -1)
        else:
            x = torch.tensordot(x, q, dims=([0], [1 if back else 0]))
    return x


def _outer(g: Tensor, d: int) -> Tensor:
    """Σ over every dimension but d of g ⊗ g: G Gᵀ for d = 0 and Gᵀ G for d = 1 of a matrix."""
    others = [i for i in range(g.dim()) if i != d]
    return torch.tensordot(g, g, dims=(others, others))


def _pow2_scale(m: Tensor) -> Tensor:
    """A power of two s with s·max|m| in [0.5, 1) (for peaks within 2^±126): scaling by it is exact, and no
    product of the scaled matrix with an orthogonal one can overflow (eigenvectors do not change with it)."""
    peak = m.abs().amax()
    _, exponent = torch.frexp(peak)
    # |exponent| <= 126 keeps the scale a normal number in every float dtype (a subnormal peak is scaled
    # up only to ~2^-23, a peak beyond 2^126 down to at most 4: neither can overflow against a unit basis)
    return torch.ldexp(torch.ones_like(peak), -exponent.clamp(-126, 126))


def _eigenbasis(m: Tensor, dtype: torch.dtype) -> Tensor:
    """Eigenvectors of the symmetric m, columns by descending eigenvalue (the authors' eigh + flip).

    As the authors: 1e-30·I is added, and a float32 eigh that fails is retried in float64. A basis that
    still fails (or is not finite) is the identity. The input is scaled by a power of two first.
    """
    work = (m * _pow2_scale(m)).to(dtype)
    work = work + 1e-30 * torch.eye(m.shape[0], dtype=dtype, device=m.device)
    try:
        _, q = torch.linalg.eigh(work)
    except RuntimeError:  # torch.linalg.LinAlgError is a RuntimeError
        try:
            _, q = torch.linalg.eigh(work.double())
        except RuntimeError:
            q = torch.eye(m.shape[0], dtype=torch.float64, device=m.device)
    q = torch.flip(q, dims=[1]).to(m.dtype)
    eye = torch.eye(m.shape[0], dtype=m.dtype, device=m.device)
    return torch.where(torch.isfinite(q).all(), q, eye)


def _update_statistics_(state: dict[str, Any], g: Tensor, layout: _Layout, shampoo_beta: float) -> None:
    """GG_d ← βs·GG_d + (1 − βs)·(g ⊗ g summed over the other dims), for every preconditioned side d.

    A side whose new statistic would not be finite (a NaN/inf gradient, or a finite one whose outer product
    overflows, e.g. an entry of 1e20 in fp32) keeps its previous statistic: decided on the device.
    """
    sides = layout.preconditioned
    if not sides:
        return
    gv = layout.to_view(g)
    for d in sides:
        gg = state[f"GG_{d}"]
        new = gg.lerp(_outer(gv, d).to(gg.dtype), 1 - shampoo_beta)
        gg.copy_(torch.where(torch.isfinite(new).all(), new, gg))


def _refresh_bases_(state: dict[str, Any], layout: _Layout, dtype: torch.dtype) -> None:
    """The authors' refresh: per side, reorder the current basis by the estimated eigenvalues diag(QᵀGG Q)
    (descending), permute exp_avg_sq's index along that side the same way, one power iteration GG·Q and a
    QR decomposition. A side whose new basis is not finite keeps its basis and exp_avg_sq's order."""
    v = state["exp_avg_sq"]
    v_view = layout.to_view(v)
    for d in layout.preconditioned:
        gg, q = state[f"GG_{d}"], state[f"Q_{d}"]
        m = (gg * _pow2_scale(gg)).to(dtype)
        o = q.to(dtype)
        power = m @ o
        order = torch.argsort((o * power).sum(0), descending=True)
        new_q, _ = torch.linalg.qr(power.index_select(1, order))
        new_q = new_q.to(q.dtype)
        ok = torch.isfinite(new_q).all()
        q.copy_(torch.where(ok, new_q, q))
        v_view = torch.where(ok, v_view.index_select(d, order), v_view)
    v.copy_(layout.from_view(v_view))


def _bases(state: dict[str, Any], layout: _Layout) -> list[Tensor | None]:
    return [state[f"Q_{d}"] if on else None for d, on in enumerate(layout.sides)]


def _rotate(x: Tensor, layout: _Layout, bases: list[Tensor | None], back: bool = False) -> Tensor:
    """x (parameter-shaped) projected into the eigenbasis (``back``: out of it), parameter-shaped."""
    if not layout.preconditioned:
        return x
    return layout.from_view(_project(layout.to_view(x), bases, back))


def _normalize(u: Tensor) -> Tensor:
    """u / (1e-30 + RMS(u)) (the authors' ``normalize_grads``); u is bounded (an Adam ratio), so the
    mean of its squares cannot overflow."""
    return u / (1e-30 + u.square().mean().sqrt())


def _step_size(lr: float, t: float, beta1: float, beta2: float, correct_bias: bool, normalize: bool) -> float:
    """lr/(1 − β1^t) (our ε convention); with ``normalize_grads`` the authors' lr·√(1 − β2^t)/(1 − β1^t)."""
    if not correct_bias:
        return lr
    size = lr / (1 - beta1**t)
    return size * math.sqrt(1 - beta2**t) if normalize else size


# -- the optimizer -----------------------------------------------------------------------------------------
class SOAP(StepCountedOptimizer):
    r"""SOAP: Shampoo with Adam in the Preconditioner's eigenbasis.

    Vyas, Morwani, Zhao, Shapira, Brandfonbrener, Janson and Kakade, "SOAP: Improving and Stabilizing
    Shampoo using Adam", ICLR 2025 (arXiv 2409.11321); follows the authors' code nikhilvyas/SOAP ``soap.py``.
    For a matrix parameter W with gradient G (other ranks: one statistic per dimension, see below), with t
    the tensor's Adam step count:

    .. math::
        G' = Q_L^\top G\, Q_R \\
        M \leftarrow \beta_1 M + (1-\beta_1) G \quad(\text{kept in W's coordinates}),\qquad
            M' = Q_L^\top M Q_R \\
        V \leftarrow \beta_2 V + (1-\beta_2)\, G'^{\,2} \quad(\text{in the eigenbasis}) \\
        W \leftarrow W - \frac{\eta}{1-\beta_1^t}\; Q_L \frac{M'}{\sqrt{V/(1-\beta_2^t)} + \epsilon} Q_R^\top,
            \qquad W \leftarrow W\,(1 - \eta\lambda) \\
        L \leftarrow \beta_s L + (1-\beta_s) G G^\top,\qquad R \leftarrow \beta_s R + (1-\beta_s) G^\top G

    and every ``precondition_frequency`` Adam steps (after the update, t mod f = 0) the bases are refreshed
    as the authors do: per side, the columns of Q are reordered by the estimated eigenvalues diag(QᵀLQ)
    (descending), V's index along that side is permuted the same way, then Q ← qr(L·Q) (one power
    iteration). The first basis is eigh(L + 1e-30·I), columns by descending eigenvalue. For a tensor of
    any rank every dimension d of size <= ``max_precond_dim`` has its own statistic (the sum over the other
    dimensions of G ⊗ G) and basis; a larger dimension is left in its coordinates (identity). 1-D tensors
    (and 0-dim ones) are plain Adam unless ``precondition_1d``.

    **First step.** As the authors, a tensor's first step only builds its statistics and bases from that
    gradient: no update, no weight decay, t stays 0 (so the projection never uses the gradient it was
    built from).

    Args:
        params: parameters or param groups (every argument below may be overridden per group).
        lr: learning rate η (default 3e-3, the authors').
        betas: (β1, β2) of Adam (default (0.95, 0.95), the authors').
        shampoo_beta: βs, the EMA coefficient of the statistics L, R; -1 (default, the authors') means β2.
        eps: ε added to √V̂ as in torch Adam (default 1e-8; the authors add it to √V, see deviations).
        weight_decay: decoupled λ (default 0.01, the authors'), applied after the update as the authors do.
        precondition_frequency: f, Adam steps between basis refreshes (default 10).
        max_precond_dim: dimensions larger than this get no preconditioner (default 10000, which leaves
            out common vocabulary sizes).
        merge_dims: precondition the tensor viewed with consecutive dimensions merged while their product
            stays <= ``max_precond_dim`` (:func:`merge_small_dims`; for conv kernels; default False). Note
            that it merges a small matrix whole: a 64×64 weight becomes one 4096-vector with a 4096² statistic.
        precondition_1d: give 1-D tensors (n <= ``max_precond_dim``) a full n×n preconditioner (default False).
        normalize_grads: divide the update by its RMS (+1e-30) before the step (default False; the authors
            find it helps at precondition_frequency ~100 and hurts at ~10).
        data_format: ``"channels_first"`` (NCHW, default) or ``"channels_last"`` (NHWC): how a 4-D kernel is
            read before ``merge_dims`` merges it (no effect otherwise).
        correct_bias: Adam's bias corrections (default True).
        decomposition_dtype: ``"float32"`` (default, the authors') or ``"float64"``: the dtype of eigh and QR
            (float64 parameters always use float64; the statistics and bases are stored in the parameter's state
            dtype: fp32, fp64 for fp64 params).
        foreach: multi-tensor path for the element-wise work (moments, denominators, update, decay) with
            ``torch._foreach_*``; the projections, statistics and refreshes are matrix products per tensor
            on either path (default: on for CUDA params).

    Deviations from the authors' code (see docs/algorithms.md#soap): ε is added to √V̂ (torch's form:
    denominator √V/√(1 − β2^t) + ε, step η/(1 − β1^t)) where the authors add it to √V and scale the step by
    √(1 − β2^t)/(1 − β1^t) (with ``normalize_grads`` the authors' step size is kept, since there ε does not
    matter and √(1 − β2^t) survives the normalisation); M is stored in W's coordinates and projected each
    step (the authors store it in the eigenbasis and rotate it when the basis changes: the same values up
    to rounding, and the first moment that callbacks read is then an EMA of g in W's coordinates); a
    statistic whose update is not finite is not updated, a refreshed basis that is not finite is not taken
    (the previous basis and V's order are kept), and eigh/QR see the statistic scaled by a power of two
    (exact; avoids overflow in L·Q); a 0-dim tensor with ``merge_dims`` is plain Adam (the authors give it
    a 1×1 basis, the same update); every counter lives in the state. A state converted from another
    optimizer (e.g. torch AdamW) keeps its moments for tensors SOAP does not precondition (they are plain
    Adam in the same coordinates); a tensor that needs a preconditioner restarts: its statistics and bases
    are built from the next gradient (step skipped) and its moments and t start from zero.

    State per parameter: ``exp_avg`` (M, W's coordinates), ``exp_avg_sq`` (V, in the eigenbasis: not
    comparable to g², so SpikeAwareClipping refuses SOAP), ``step`` (t, CPU float32), and per
    preconditioned dimension d of size n: ``GG_<d>`` and ``Q_<d>`` (n×n each; fp32 for bf16/fp16 params).
    A moment reset (MomentumReset, the state adapter) zeroes M and V and keeps t, GG and Q.
    """

    state_spec = _SOAPStateSpec(
        moments={"exp_avg": True, "exp_avg_sq": False},
        first_moment="exp_avg",
        second_moment="exp_avg_sq",
        second_moment_like_grad_sq=False,  # V lives in the eigenbasis
    )

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 3e-3,
        betas: tuple[float, float] = (0.95, 0.95),
        shampoo_beta: float = -1.0,
        eps: float = 1e-8,
        weight_decay: float = 0.01,
        precondition_frequency: int = 10,
        max_precond_dim: int = 10000,
        merge_dims: bool = False,
        precondition_1d: bool = False,
        normalize_grads: bool = False,
        data_format: Literal["channels_first", "channels_last"] = "channels_first",
        correct_bias: bool = True,
        decomposition_dtype: Literal["float32", "float64"] = "float32",
        *,
        foreach: bool | None = None,
    ) -> None:
        defaults = dict(
            lr=lr,
            betas=tuple(betas),
            shampoo_beta=shampoo_beta,
            eps=eps,
            weight_decay=weight_decay,
            precondition_frequency=precondition_frequency,
            max_precond_dim=max_precond_dim,
            merge_dims=merge_dims,
            precondition_1d=precondition_1d,
            normalize_grads=normalize_grads,
            data_format=data_format,
            correct_bias=correct_bias,
            decomposition_dtype=decomposition_dtype,
            foreach=foreach,
        )
        super().__init__(params, defaults)

    def _validate_group(self, group: dict[str, Any]) -> None:
        check_range("lr", group["lr"], 0.0)
        check_betas(group["betas"])
        check_range("shampoo_beta", group["shampoo_beta"], -1.0, 1.0, high_open=True)
        if -1.0 < group["shampoo_beta"] < 0.0:
            raise ValueError(
                f"Invalid shampoo_beta: {group['shampoo_beta']!r}; it must be -1 (use betas[1]) or a number in [0, 1)."
            )
        check_range("eps", group["eps"], 0.0)
        check_range("weight_decay", group["weight_decay"], 0.0)
        check_int("precondition_frequency", group["precondition_frequency"], 1)
        check_int("max_precond_dim", group["max_precond_dim"], 1)
        for name in ("merge_dims", "precondition_1d", "normalize_grads", "correct_bias"):
            check_bool(name, group[name])
        check_choice("data_format", group["data_format"], ("channels_first", "channels_last"))
        check_choice("decomposition_dtype", group["decomposition_dtype"], ("float32", "float64"))
        if group.get("foreach") is not None:
            check_bool("foreach", group["foreach"])

    @staticmethod
    def _layout(p: Tensor, group: dict[str, Any]) -> _Layout:
        return soap_layout(
            p.shape, group["max_precond_dim"], group["merge_dims"], group["precondition_1d"], group["data_format"]
        )

    def _has_preconditioner(self, state: dict[str, Any], layout: _Layout) -> bool:
        for d, (n, on) in enumerate(zip(layout.view, layout.sides)):
            for key in (f"GG_{d}", f"Q_{d}"):
                if on != (key in state) or (on and tuple(state[key].shape) != (n, n)):
                    return False
        return not any(f"Q_{d}" in state for d in range(len(layout.view), _MAX_SIDES))

    def _init_preconditioner(self, p: Tensor, state: dict[str, Any], g: Tensor, layout: _Layout, group: dict[str, Any]) -> None:
        """Statistics from this gradient, bases by eigh; a state that had moments restarts from zero."""
        for key in [k for k in state if k.split("_")[0] in ("GG", "Q") and k.split("_")[-1].isdigit()]:
            del state[key]
        dtype = state_dtype(p)
        for d in layout.preconditioned:
            n = layout.view[d]
            state[f"GG_{d}"] = torch.zeros(n, n, dtype=dtype, device=p.device)
        _update_statistics_(state, g, layout, self._shampoo_beta(group))
        decomposition = _decomposition_dtype(group, dtype)
        for d in layout.preconditioned:
            state[f"Q_{d}"] = _eigenbasis(state[f"GG_{d}"], decomposition)
        state["exp_avg"].zero_()
        state["exp_avg_sq"].zero_()
        state["step"].zero_()

    @staticmethod
    def _shampoo_beta(group: dict[str, Any]) -> float:
        return group["shampoo_beta"] if group["shampoo_beta"] >= 0 else group["betas"][1]

    def _step(self, step: int) -> None:
        for group in self.param_groups:
            params = self._params_with_grad(group, "SOAP")
            if not params:
                continue
            updates, states, layouts = [], [], []
            for p in params:
                fresh = "exp_avg" not in self.state[p]
                state = self._init_state(p, group)
                layout = self._layout(p, group)
                if fresh or not self._has_preconditioner(state, layout):
                    # the tensor's first step (or a state without SOAP's bases): build them, no update
                    (g32,) = as_compute([p.grad])
                    self._init_preconditioner(p, state, g32, layout, group)
                    continue
                updates.append(p)
                states.append(state)
                layouts.append(layout)
            if not updates:
                continue
            beta1, beta2 = group["betas"]
            kwargs = dict(
                lr=group["lr"],
                beta1=beta1,
                beta2=beta2,
                eps=group["eps"],
                weight_decay=group["weight_decay"],
                correct_bias=group["correct_bias"],
                normalize=group["normalize_grads"],
            )
            fn = _soap_foreach if self._use_foreach(group, updates) else _soap_single_tensor
            fn(updates, [p.grad for p in updates], states, layouts, **kwargs)
            shampoo_beta = self._shampoo_beta(group)
            for p, state, layout in zip(updates, states, layouts):
                (g32,) = as_compute([p.grad])
                _update_statistics_(state, g32, layout, shampoo_beta)
                if layout.preconditioned and state["step"].item() % group["precondition_frequency"] == 0:
                    _refresh_bases_(state, layout, _decomposition_dtype(group, state_dtype(p)))  # CPU counter


def _decomposition_dtype(group: dict[str, Any], dtype: torch.dtype) -> torch.dtype:
    """float64 if the group asks for it or the state is float64 (float64 parameters), else float32."""
    return torch.float64 if group["decomposition_dtype"] == "float64" or dtype == torch.float64 else torch.float32


def _soap_single_tensor(
    params: list[Tensor],
    grads: list[Tensor],
    states: list[dict[str, Any]],
    layouts: list[_Layout],
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    correct_bias: bool,
    normalize: bool,
) -> None:
    """Reference path: the equations of :class:`SOAP` one tensor at a time."""
    for param, grad, state, layout in zip(params, grads, states, layouts):
        exp_avg, exp_avg_sq, step_t = state["exp_avg"], state["exp_avg_sq"], state["step"]
        step_t += 1
        t = step_t.item()  # CPU counter: no sync
        p32, g32 = as_compute([param, grad])
        bases = _bases(state, layout)
        g_rot = _rotate(g32, layout, bases)
        exp_avg.lerp_(g32, 1 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(g_rot, g_rot, value=1 - beta2)
        denom = adam_denom(exp_avg_sq, t, beta2, eps) if correct_bias else exp_avg_sq.sqrt().add_(eps)
        update = _rotate(_rotate(exp_avg, layout, bases) / denom, layout, bases, back=True)
        if normalize:
            update = _normalize(update)
        p32.add_(update, alpha=-_step_size(lr, t, beta1, beta2, correct_bias, normalize))
        decoupled_decay_(p32, lr, weight_decay)  # after the update, as the authors
        write_back([param], [p32])


def _soap_foreach(
    params: list[Tensor],
    grads: list[Tensor],
    states: list[dict[str, Any]],
    layouts: list[_Layout],
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    correct_bias: bool,
    normalize: bool,
) -> None:
    """Multi-tensor path: the element-wise stages with ``torch._foreach_*``, the projections per tensor."""
    exp_avgs = [s["exp_avg"] for s in states]
    exp_avg_sqs = [s["exp_avg_sq"] for s in states]
    steps = [s["step"] for s in states]
    torch._foreach_add_(steps, 1.0)
    ts = [s.item() for s in steps]  # CPU counters: no sync
    p32, g32 = as_compute(params), as_compute(grads)
    bases = [_bases(s, layout) for s, layout in zip(states, layouts)]
    g_rot = [_rotate(g, layout, b) for g, layout, b in zip(g32, layouts, bases)]
    torch._foreach_lerp_(exp_avgs, g32, 1 - beta1)
    torch._foreach_mul_(exp_avg_sqs, beta2)
    torch._foreach_addcmul_(exp_avg_sqs, g_rot, g_rot, value=1 - beta2)
    if correct_bias:
        denoms = adam_denoms_foreach(exp_avg_sqs, ts, beta2, eps)
    else:
        denoms = torch._foreach_sqrt(exp_avg_sqs)
        torch._foreach_add_(denoms, eps)
    ratios = torch._foreach_div([_rotate(m, layout, b) for m, layout, b in zip(exp_avgs, layouts, bases)], denoms)
    updates = [_rotate(r, layout, b, back=True) for r, layout, b in zip(ratios, layouts, bases)]
    if normalize:
        updates = [_normalize(u) for u in updates]
    torch._foreach_mul_(updates, [-_step_size(lr, t, beta1, beta2, correct_bias, normalize) for t in ts])
    torch._foreach_add_(p32, updates)
    decoupled_decay_(p32, lr, weight_decay)  # after the update, as the authors
    write_back(params, p32)
