"""GaLore: Adam on low-rank projections of the 2-D gradients (docs/algorithms.md#galore)."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable
from typing import Any, Literal

import torch
from torch import Tensor

from lightning_optim._base import StepCountedOptimizer, as_compute, state_dtype, write_back
from lightning_optim.functional import adam_denom, adam_moments_, adam_step_, adam_step_foreach_, decoupled_decay_
from lightning_optim.projection import (
    PROJ_TYPES,
    ProjectedStateSpec,
    Side,
    moment_shape,
    project,
    project_back,
    projection_layout,
    projection_seed,
    projector_shape,
    refresh_projector,
)
from lightning_optim.validation import check_adam_group, check_bool, check_choice, check_int, check_range

__all__ = ["GaLore"]


class GaLore(StepCountedOptimizer):
    r"""GaLore: AdamW whose moments live on a low-rank projection of each 2-D gradient.

    Zhao, Zhang, Chen, Wang, Anandkumar and Tian, "GaLore: Memory-Efficient LLM Training by Gradient
    Low-Rank Projection", ICML 2024 (arXiv 2403.03507); follows the authors' code jiaweizzhao/GaLore
    (``galore_torch/adamw.py``, ``galore_torch/galore_projector.py``). For a 2-D parameter W (m × n) with
    gradient G, t its count of updates (1-based) and r = min(rank, m, n):

    .. math::
        \text{if } (t-1) \bmod T = 0:\ P \leftarrow \text{top-}r \text{ left (} m \times r \text{) or right
            (} n \times r \text{) singular vectors of } G \\
        R = P^\top G \ (\text{left, } r \times n) \quad\text{or}\quad R = G P \ (\text{right, } m \times r) \\
        M \leftarrow \beta_1 M + (1-\beta_1) R,\quad V \leftarrow \beta_2 V + (1-\beta_2) R^2 \\
        N = \hat M / (\sqrt{\hat V} + \epsilon),\quad \Delta = \alpha\, P N \ (\text{left}) \text{ or }
            \alpha\, N P^\top \ (\text{right}) \\
        W \leftarrow W (1 - \eta\lambda) - \eta\, \Delta

    with M̂ = M/(1 − β1^t), V̂ = V/(1 − β2^t). ``proj_type="std"`` (the authors' default) projects the
    smaller side away: right when m >= n, left otherwise; ``"reverse_std"`` the other one; ``"left"`` /
    ``"right"`` always that side. When P is refreshed the moments are kept as they are, now read in the
    new basis (as the authors). Every other parameter (0-/1-D and >2-D tensors, and every parameter of a
    group with ``rank: None``) takes plain AdamW (:func:`lightning_optim.functional.adam_step_`).

    **Which parameters are projected.** The authors mark the groups to project with ``rank``; here ``rank``
    is an argument with default 128, so a plain ``model.parameters()`` (what LightningCLI passes) projects
    every 2-D tensor, embeddings and output head included. The authors project only the attention and MLP
    weights: put the embedding and the head in a group with ``rank: None`` (from YAML: ``param_groups:
    groups: [{params: embedding, rank: null}, {params: "lm_head.*", rank: null}]``).

    **SVD failures** never crash: when ``torch.linalg.svd`` raises, a ``RuntimeWarning`` is issued and the
    previous projector is kept, or (at a parameter's first refresh) a randomized range finder seeded from
    the global step and the parameter's index is used, so every DDP rank gets the same P. Independently,
    an SVD result (or a gradient) that is not finite is replaced on the device by the same fallback
    (``torch.where``, no host sync and therefore no warning), so a NaN/inf gradient never makes P non-finite
    (see :func:`lightning_optim.projection.refresh_projector`). The SVD runs on G/max|G| (same singular
    vectors, no overflow inside LAPACK) in fp32 (fp64 for fp64 parameters). On a GPU, ``torch.linalg.svd``
    synchronizes with the host (a torch property, as in the authors' code): once per matrix every T steps.

    Defaults (the authors' code): lr 1e-3, betas (0.9, 0.999), eps 1e-6, weight_decay 0 (their ``AdamW``);
    rank 128, update_proj_gap 200, scale 0.25, proj_type "std" (their README; their README's lr is 0.01).

    Deviations from the authors' code: ε is added to √V̂ (torch's form, as in the paper's Algorithm 1; the
    authors' code divides by √V + ε and folds √(1 − β2^t) into the step size, i.e. ε·√(1 − β2^t) in torch's
    form); weight decay is applied before the update (the authors decay the already-updated weight, a
    difference of η²λ·Δ per step); the projector and all math are fp32 for bf16/fp16 parameters (the
    authors cast P back to the gradient's dtype); the projector is a tensor in the optimizer state (the
    authors keep a Python object there, which ``state_dict`` round trips do not restore bit-exactly);
    ``rank`` larger than min(m, n) is clipped to min(m, n) (the authors' slicing does the same); their
    ``proj_type="full"`` (two-sided), the Tucker projector for >2-D tensors and ``correct_bias=False`` are not
    offered; the SVD fallbacks are ours. A state dict saved by another optimizer (torch AdamW) is
    converted: its moments of projected parameters are in the full basis and restart from zero (with their
    ``step``; a warning says so), the others are kept.

    Args:
        params: parameters or param groups (every argument below may be overridden per group).
        lr: learning rate η (default 1e-3).
        betas: (β1, β2) (default (0.9, 0.999)).
        eps: ε added to √V̂ (default 1e-6, the authors').
        weight_decay: decoupled decay λ, W ← W(1 − ηλ) before the update (default 0).
        rank: r, the projection rank of 2-D parameters, clipped to min(m, n) (default 128); ``None``: the
            group takes plain AdamW.
        update_proj_gap: T, the projector is recomputed at a parameter's 1st, (T+1)-th, (2T+1)-th, ...
            update (default 200).
        scale: α, the factor of the projected-back update (default 0.25).
        proj_type: ``"std"`` (default), ``"reverse_std"``, ``"left"`` or ``"right"`` (see above).
        foreach: multi-tensor (``torch._foreach_*``) AdamW for the unprojected tensors (default: on for
            CUDA params); projected matrices are updated one at a time on either path.

    State per projected parameter (m × n, side and r as above): ``exp_avg`` and ``exp_avg_sq`` of R's shape
    ((r, n) left, (m, r) right), ``projector`` (m, r) left or (n, r) right, all fp32 for bf16/fp16
    parameters, and ``step`` (CPU float32): 4·(2·r·n + m·r) bytes (left) or 4·(2·m·r + n·r) bytes (right)
    instead of AdamW's 4·2·m·n. Unprojected parameters keep AdamW's ``exp_avg``, ``exp_avg_sq`` (8 bytes
    per parameter) and ``step``. The second moment is the EMA of R², not of g², and the first moment is
    not in the parameter's shape: SpikeAwareClipping and AdaptiveMomentum refuse GaLore; a moment reset
    (MomentumReset, SpikeGuard) zeroes the projected moments and keeps ``projector`` and ``step``.
    """

    state_spec = ProjectedStateSpec(
        moments={"exp_avg": True, "exp_avg_sq": False},
        first_moment="exp_avg",
        second_moment="exp_avg_sq",
        second_moment_like_grad_sq=False,  # the EMA of the projected R², in R's shape, for projected matrices
        buffers=("projector",),
    )

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-6,
        weight_decay: float = 0.0,
        rank: int | None = 128,
        update_proj_gap: int = 200,
        scale: float = 0.25,
        proj_type: Literal["std", "reverse_std", "left", "right"] = "std",
        *,
        foreach: bool | None = None,
    ) -> None:
        defaults = dict(
            lr=lr,
            betas=tuple(betas) if isinstance(betas, (list, tuple)) else betas,
            eps=eps,
            weight_decay=weight_decay,
            rank=rank,
            update_proj_gap=update_proj_gap,
            scale=scale,
            proj_type=proj_type,
            foreach=foreach,
        )
        super().__init__(params, defaults)

    def _validate_group(self, group: dict[str, Any]) -> None:
        check_adam_group(group)
        if group["rank"] is not None:
            check_int("rank", group["rank"], 1)
        check_int("update_proj_gap", group["update_proj_gap"], 1)
        check_range("scale", group["scale"], 0.0, low_open=True)
        check_choice("proj_type", group["proj_type"], PROJ_TYPES)
        if group["foreach"] is not None:
            check_bool("foreach", group["foreach"])

    # -- state: projected moments have R's shape ------------------------------------------------------
    @staticmethod
    def _layout(p: Tensor, group: dict[str, Any]) -> tuple[Side, int] | None:
        """(side, r) for a projected parameter, None for one that takes plain AdamW."""
        if group["rank"] is None or p.ndim != 2:
            return None
        return projection_layout(p.shape, group["rank"], group["proj_type"])

    def _init_state(self, p: Tensor, group: dict[str, Any]) -> dict[str, Any]:
        """The state of ``p``: AdamW's for unprojected parameters (the base class), R-shaped moments else
        (:func:`init_projected_state`)."""
        return init_projected_state(self, p, group, self._layout(p, group), type(self).__name__, super()._init_state)

    # -- stepping -----------------------------------------------------------------------------------
    def _step(self, step: int) -> None:
        index = 0  # position of a parameter among all the optimizer's parameters: seeds the fallbacks
        for group in self.param_groups:
            first_index = index
            index += len(group["params"])
            params = self._params_with_grad(group, type(self).__name__)
            if not params:
                continue
            position = {id(p): first_index + i for i, p in enumerate(group["params"])}
            states = [self._init_state(p, group) for p in params]
            beta1, beta2 = group["betas"]
            adam = dict(lr=group["lr"], beta1=beta1, beta2=beta2, eps=group["eps"], weight_decay=group["weight_decay"])
            dense = [i for i, p in enumerate(params) if self._layout(p, group) is None]
            if dense:
                fn = _adamw_foreach if self._use_foreach(group, [params[i] for i in dense]) else _adamw_single_tensor
                fn(
                    [params[i] for i in dense],
                    [params[i].grad for i in dense],
                    [states[i]["exp_avg"] for i in dense],
                    [states[i]["exp_avg_sq"] for i in dense],
                    [states[i]["step"] for i in dense],
                    **adam,
                )
            for p, state in zip(params, states):
                layout = self._layout(p, group)
                if layout is None:
                    continue
                seed = projection_seed(step, position[id(p)])
                self._update_matrix(p, state, *layout, group=group, seed=seed, adam=adam)

    def _update_matrix(
        self,
        p: Tensor,
        state: dict[str, Any],
        side: Side,
        r: int,
        *,
        group: dict[str, Any],
        seed: int,
        adam: dict[str, float],
    ) -> None:
        """One projected matrix's step; subclasses (NaturalGaLore, Fira) pass their hooks to :func:`_galore_update`."""
        _galore_update(
            p, state, side, r, seed=seed, update_proj_gap=group["update_proj_gap"], scale=group["scale"], **adam
        )



def init_projected_state(
    optimizer: StepCountedOptimizer,
    p: Tensor,
    group: dict[str, Any],
    layout: tuple[Side, int] | None,
    owner: str,
    unprojected_init: Callable[[Tensor, dict[str, Any]], dict[str, Any]],
) -> dict[str, Any]:
    """The state of ``p`` for a projected-moment optimizer (GaLore and the methods built like it).

    ``layout`` None: the parameter is not projected and takes ``unprojected_init`` (the base class's
    AdamW state). Else its moments have R's shape (:func:`lightning_optim.projection.moment_shape`) and
    ``step`` is a CPU counter. Moments that do not belong to the parameter's current layout (a torch AdamW
    state converted by ``load_state_dict``, or a group whose ``rank``/``proj_type`` changed) restart from
    zero with their step count, with a warning: moments of another basis carry no usable information; the
    spec's buffers (projector, ...) are dropped with them.

    Args:
        optimizer: the optimizer (its ``state``, ``state_spec`` and moment keys).
        p: the parameter.
        group: its param group (``rank``, ``proj_type`` for the warning).
        layout: (side, r) of a projected parameter, or None.
        owner: the optimizer's name in the warning.
        unprojected_init: the state builder for parameters without a projection.
    """
    state = optimizer.state[p]
    if layout is None:
        expected, stale = tuple(p.shape), "projector" in state
    else:
        side, r = layout
        expected = moment_shape(p.shape, side, r)
        projector = state.get("projector")
        stale = projector is None or tuple(projector.shape) != projector_shape(p.shape, side, r)
    moments = optimizer._moments
    present = [k for k in moments if k in state]
    if present and (stale or any(tuple(state[k].shape) != expected for k in present)):
        warnings.warn(
            f"{owner}: the moments of a {tuple(p.shape)} parameter do not match its projection "
            f"(rank={group['rank']}, proj_type={group['proj_type']!r}; e.g. moments converted from "
            "another optimizer); they restart from zero.",
            UserWarning,
            stacklevel=5,
        )
        for key in (*present, *optimizer.state_spec.buffers):
            state.pop(key, None)
        state["step"] = torch.tensor(0.0, dtype=torch.float32)
    if layout is None:
        return unprojected_init(p, group)
    if "step" not in state:
        state["step"] = torch.tensor(0.0, dtype=torch.float32)
    elif state["step"].device.type != "cpu":  # moved by Lightning's _optimizer_to_device on resume
        state["step"] = state["step"].to("cpu")
    for key in moments:
        if key not in state:
            state[key] = torch.zeros(expected, dtype=state_dtype(p), device=p.device)
    return state

def _galore_update(
    param: Tensor,
    state: dict[str, Any],
    side: Side,
    r: int,
    *,
    seed: int,
    update_proj_gap: int,
    scale: float,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    owner: str = "GaLore",
    transform: Callable[[Tensor, int], Tensor] | None = None,
    residual: Callable[[Tensor, Tensor, Tensor, Tensor, int], Tensor] | None = None,
) -> None:
    """One GaLore step of one matrix: refresh P when due, Adam on R = project(G), W ← W(1 − ηλ) − η·α·P N.

    The projected-Adam core shared with NaturalGaLore and Fira:

    - ``transform(R, t)``: replaces R before the moments (NaturalGaLore's natural-gradient correction);
    - ``residual(G, R, D, P, t)``: a further full-rank term E, applied as W ← W − η·E after the low-rank
      update (Fira); D = M / (√V̂ + ε) is the Adam direction before the 1/(1 − β1^t) bias correction.
    Without hooks this is GaLore, operation for operation.
    """
    done = int(state["step"].item())  # CPU counter: no device sync
    state["step"] += 1
    t = done + 1
    p32, g32 = as_compute([param, param.grad])
    if "projector" not in state or done % update_proj_gap == 0:
        state["projector"] = refresh_projector(
            g32.to(state_dtype(param)), r, side, previous=state.get("projector"), seed=seed, owner=owner
        )
    projector = state["projector"]
    grad = g32.to(projector.dtype)
    low_rank = project(grad, projector, side)
    moment_input = low_rank if transform is None else transform(low_rank, t)
    exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
    adam_moments_(exp_avg, exp_avg_sq, moment_input, beta1, beta2)
    direction = exp_avg / adam_denom(exp_avg_sq, t, beta2, eps)
    update = project_back(direction, projector, side)
    extra = None if residual is None else residual(grad, low_rank, direction, projector, t)
    decoupled_decay_(p32, lr, weight_decay)
    p32.add_(update.to(p32.dtype), alpha=-(lr * scale / (1 - beta1**t)))
    if extra is not None:
        p32.add_(extra.to(p32.dtype), alpha=-lr)
    write_back([param], [p32])


# -- the AdamW rule of the unprojected tensors ----------------------------------------------------------
def _adamw_single_tensor(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    steps: list[Tensor],
    **adam: float,
) -> None:
    """AdamW one tensor at a time (:func:`lightning_optim.functional.adam_step_`)."""
    for param, grad, exp_avg, exp_avg_sq, step_t in zip(params, grads, exp_avgs, exp_avg_sqs, steps):
        step_t += 1
        p32, g32 = as_compute([param, grad])
        adam_step_(p32, g32, exp_avg, exp_avg_sq, step_t.item(), **adam)  # CPU step: no sync
        write_back([param], [p32])


def _adamw_foreach(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    steps: list[Tensor],
    **adam: float,
) -> None:
    """Multi-tensor AdamW (:func:`lightning_optim.functional.adam_step_foreach_`), grouped by device and dtype."""
    torch._foreach_add_(steps, 1.0)
    grouped = StepCountedOptimizer._group_tensors_by_device_and_dtype([params, grads, exp_avgs, exp_avg_sqs, steps])
    for (dev_params, dev_grads, dev_exp_avgs, dev_exp_avg_sqs, dev_steps), _ in grouped.values():
        p32, g32 = as_compute(dev_params), as_compute(dev_grads)
        counts = [t.item() for t in dev_steps]  # CPU tensors: no device sync
        adam_step_foreach_(p32, g32, dev_exp_avgs, dev_exp_avg_sqs, counts, **adam)
        write_back(dev_params, p32)
