"""FRUGAL: Adam in a state-full subspace, signSGD in its state-free complement (docs/algorithms.md#frugal)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Literal

import torch
from torch import Tensor

from lightning_optim._base import StepCountedOptimizer, as_compute, state_dtype, write_back
from lightning_optim.apollo import adamw_fallback
from lightning_optim.functional import adam_denom, adam_moments_, decoupled_decay_
from lightning_optim.projection import (
    PROJ_TYPES,
    ProjectedStateSpec,
    Side,
    moment_shape,
    project,
    project_back,
    projection_layout,
    projection_seed,
    random_orthonormal,
    refresh_projector,
)
from lightning_optim.validation import check_adam_group, check_bool, check_choice, check_int, check_range

__all__ = ["FRUGAL"]

SUBSPACE_TYPES = ("block", "svd", "random", "columns")
BLOCK_ORDERS = ("descending", "ascending", "random")
INACTIVE_RULES = ("sign_sgd", "sgd", "no")
_SALT_BLOCKS, _SALT_PROJECTION = 11, 13


class FRUGAL(StepCountedOptimizer):
    r"""FRUGAL: full-rank updates with optimizer state only in a subspace.

    Zmushko, Beznosikov, Takáč and Horváth, "FRUGAL: Memory-Efficient Optimization by Reducing State
    Overhead for Scalable Training", ICML 2025 (arXiv 2411.07837); follows the authors' code
    (philip-zmushko/FRUGAL, ``frugal/proj_optimizer_templates.py``, ``frugal/adamw.py``,
    ``frugal/galore_projector.py``, ``frugal/coordinate_projector.py``). Every 2-D parameter's gradient G is
    split into a state-full part, updated by Adam, and the state-free rest, updated by signSGD; the split is
    refreshed every T steps (period k = ⌊(T_global − 1)/T⌋). With ρ the density, η_a = η·``proj_params_lr_scale``
    and η_f = η_a·``inactive_lr_scale``, after the decay W ← W(1 − ηλ):

    - ``proj_type="block"`` (the authors' main experiments, their ``--optimizer frugal``): round(ρ·K) of
      the group's K matrices are state-full, chosen per period in ``block_order`` (``"descending"``: the
      last ones first, then the ones before, cyclically, as their scripts; ``"ascending"``; ``"random"``,
      seeded). A state-full matrix takes Adam, W ← W − η_a M̂/(√V̂ + ε); a state-free one
      W ← W − η_f sign(G).
    - ``"svd"`` / ``"random"``: P = the top-r singular vectors of G (``"svd"``, GaLore's projector) or a
      seeded random orthonormal basis (``"random"``), r = round(ρ·n) (right side) or round(ρ·m) (left),
      the side from ``proj_side`` as GaLore's; R = Pᵀ G (left) or G P (right); Adam on R gives N̂ =
      M̂/(√V̂ + ε); W ← W − η_a·back(N̂) − η_f·sign(G − back(R)), back(X) = P X (left) or X Pᵀ (right).
    - ``"columns"``: ⌊ρ·n⌋ seeded random columns are state-full (Adam on those columns of G), the others
      take signSGD.

    At each refresh the Adam state of every matrix restarts (moments zero, count 0: bias correction starts
    again), as the authors' default ``reset_statistics=True``; with ``reset_statistics=False`` the
    projected moments are kept (``"svd"``/``"random"``/``"columns"``; the block mode always restarts, as
    theirs). ``inactive_update_rule="sgd"`` takes −η_f·(state-free part), ``"no"`` leaves it out (with
    ``"svd"``, ``reset_statistics=False`` and ``proj_params_lr_scale=0.25`` this is GaLore, as the authors
    note). ρ = 1 in the block or column mode is AdamW (restarted every T steps); ρ = 0 is signSGD.
    Non-2-D parameters and every parameter of a group with ``density: None`` take plain AdamW at η.

    Every choice is identical on every DDP rank: the block order is a function of the period, random
    draws use CPU generators seeded by :func:`~lightning_optim.projection.projection_seed` (period start,
    parameter or group index), the SVD is of the (all-reduced) gradient; projectors and column indices are
    stored in the optimizer state, so a resume is bit-exact.

    Defaults (the authors' code and scripts): lr 1e-3, betas (0.9, 0.999), eps 1e-8, weight_decay 0 (their
    scripts; their class default is 0.01), density 0.25, update_gap 200, proj_type "block" with
    block_order "descending" (their scripts; their class default order is "random"), reset_statistics True,
    inactive_update_rule "sign_sgd", proj_params_lr_scale 1, inactive_lr_scale 1 (their pre-training
    value; 0.1 for fine-tuning), proj_side "std".

    Deviations from the authors' code: the refresh schedule follows the global step (the authors read the
    first parameter's count, which is the same when every matrix gets a gradient every step); a matrix
    without a gradient at a refresh is refreshed at its next step with that step's gradient; random draws
    are seeded from the global step and the parameter index (the authors use torch's global RNG, which
    differs across ranks unless seeded alike); the block mode selects among the group's 2-D tensors (the
    authors' projected group holds only the attention/MLP weights: give the embedding and the head their
    own group with ``density: None``); SVD failures fall back as in GaLore; state and math are fp32 for
    bf16/fp16 parameters; the ``"randperm"``, ``"rows"``/``"randk"`` choices, the two-sided ``"full"``
    projection and the ``"mirror"`` order are not offered; ε is added to √V̂ exactly as the authors.

    Args:
        params: parameters or param groups (every argument below may be overridden per group).
        lr: learning rate η (default 1e-3).
        betas: (β1, β2) (default (0.9, 0.999)).
        eps: ε added to √V̂ (default 1e-8, the authors').
        weight_decay: decoupled decay λ, W ← W(1 − ηλ) before the update, every parameter (default 0).
        density: ρ in [0, 1], the state-full fraction (default 0.25); ``None``: the group takes AdamW.
        update_gap: T, the subspace is refreshed at global steps 1, T + 1, 2T + 1, ... (default 200).
        proj_type: ``"block"`` (default), ``"svd"``, ``"random"`` or ``"columns"`` (see above).
        block_order: ``"descending"`` (default), ``"ascending"`` or ``"random"`` (block mode only).
        proj_side: side of the ``"svd"``/``"random"`` projection: ``"std"`` (default), ``"reverse_std"``,
            ``"left"`` or ``"right"``.
        reset_statistics: restart the Adam state at each refresh (default True).
        inactive_update_rule: ``"sign_sgd"`` (default), ``"sgd"`` or ``"no"``.
        proj_params_lr_scale: multiplier of η for the 2-D parameters, both parts (default 1).
        inactive_lr_scale: further multiplier of the state-free part's step (default 1).
        foreach: multi-tensor AdamW for the unprojected tensors (default: on for CUDA params); the 2-D
            parameters are updated one at a time on either path.

    State per 2-D parameter (m × n), fp32 for bf16/fp16 parameters: ``step`` and ``subspace`` (CPU
    counters); block mode: ``exp_avg``/``exp_avg_sq`` of the full shape for a state-full matrix (8 bytes
    per entry), none for a state-free one (on average 8·ρ bytes per entry); ``"svd"``/``"random"``: R-shaped
    moments and ``projector`` ((n, r) right, (m, r) left): 4·(2·m·r + n·r) bytes (right); ``"columns"``:
    moments (m, k) and ``indices`` (k int64), k = ⌊ρ·n⌋: 4·2·m·k + 8·k bytes. The moments are not the
    EMA of the parameter's g² in general: SpikeAwareClipping and AdaptiveMomentum refuse FRUGAL; a moment
    reset (MomentumReset, SpikeGuard) zeroes the moments that exist and keeps the subspace.
    """

    state_spec = ProjectedStateSpec(
        moments={"exp_avg": True, "exp_avg_sq": False},
        first_moment="exp_avg",
        second_moment="exp_avg_sq",
        second_moment_like_grad_sq=False,
        counters=("step", "subspace"),
        buffers=("projector", "indices"),
    )

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        density: float | None = 0.25,
        update_gap: int = 200,
        proj_type: Literal["block", "svd", "random", "columns"] = "block",
        block_order: Literal["descending", "ascending", "random"] = "descending",
        proj_side: Literal["std", "reverse_std", "left", "right"] = "std",
        reset_statistics: bool = True,
        inactive_update_rule: Literal["sign_sgd", "sgd", "no"] = "sign_sgd",
        proj_params_lr_scale: float = 1.0,
        inactive_lr_scale: float = 1.0,
        *,
        foreach: bool | None = None,
    ) -> None:
        defaults = dict(
            lr=lr,
            betas=tuple(betas) if isinstance(betas, (list, tuple)) else betas,
            eps=eps,
            weight_decay=weight_decay,
            density=density,
            update_gap=update_gap,
            proj_type=proj_type,
            block_order=block_order,
            proj_side=proj_side,
            reset_statistics=reset_statistics,
            inactive_update_rule=inactive_update_rule,
            proj_params_lr_scale=proj_params_lr_scale,
            inactive_lr_scale=inactive_lr_scale,
            foreach=foreach,
        )
        super().__init__(params, defaults)

    def _validate_group(self, group: dict[str, Any]) -> None:
        check_adam_group(group)
        if group["density"] is not None:
            check_range("density", group["density"], 0.0, 1.0)
        check_int("update_gap", group["update_gap"], 1)
        check_choice("proj_type", group["proj_type"], SUBSPACE_TYPES)
        check_choice("block_order", group["block_order"], BLOCK_ORDERS)
        check_choice("proj_side", group["proj_side"], PROJ_TYPES)
        check_bool("reset_statistics", group["reset_statistics"])
        check_choice("inactive_update_rule", group["inactive_update_rule"], INACTIVE_RULES)
        check_range("proj_params_lr_scale", group["proj_params_lr_scale"], 0.0)
        check_range("inactive_lr_scale", group["inactive_lr_scale"], 0.0)
        if group["foreach"] is not None:
            check_bool("foreach", group["foreach"])

    @staticmethod
    def _is_split(p: Tensor, group: dict[str, Any]) -> bool:
        return group["density"] is not None and p.ndim == 2

    # -- the subspace of a period ------------------------------------------------------------------------
    @staticmethod
    def active_blocks(count: int, density: float, order: str, period: int, seed: int) -> set[int]:
        """Positions (among the group's K = ``count`` matrices) that are state-full in ``period`` (0-based).

        round(ρ·K) of them (Python's round, as the authors); ``"descending"`` starts at K − 1 and moves down
        by that number each period, ``"ascending"`` starts at 0 and moves up, cyclically; ``"random"`` is a
        seeded permutation.
        """
        n_active = round(count * density)
        if n_active == 0 or count == 0:
            return set()
        if order == "random":
            gen = torch.Generator().manual_seed(seed)
            return set(torch.randperm(count, generator=gen)[:n_active].tolist())
        if order == "ascending":
            start = (period * n_active) % count
            return {(start + j) % count for j in range(n_active)}
        start = (count - 1 - period * n_active) % count
        return {(start - j) % count for j in range(n_active)}

    def _refresh(
        self, p: Tensor, g: Tensor, state: dict[str, Any], group: dict[str, Any], period: int, active: bool, seed: int
    ) -> None:
        """Enter ``period``: a new subspace for ``p`` and, as the authors, a restarted Adam state."""
        kind = group["proj_type"]
        old_shape = tuple(state["exp_avg"].shape) if "exp_avg" in state else None
        shape: tuple[int, ...] | None
        for key in ("projector", "indices"):
            state.pop(key, None)
        if kind == "block":
            shape = tuple(p.shape) if active else None
        elif kind == "columns":
            m, n = p.shape
            k = int(n * group["density"])
            gen = torch.Generator().manual_seed(seed)
            state["indices"] = torch.randperm(n, generator=gen)[:k].to(p.device)
            shape = (m, k) if k > 0 else None
        else:
            side, r = self._side_rank(p, group)
            if r == 0:
                shape = None
            else:
                if kind == "svd":
                    state["projector"] = refresh_projector(g, r, side, previous=None, seed=seed, owner="FRUGAL")
                else:
                    dim = p.shape[1] if side == "right" else p.shape[0]
                    state["projector"] = random_orthonormal(dim, r, seed, device=g.device, dtype=g.dtype)
                shape = moment_shape(p.shape, side, r)
        reset = kind == "block" or group["reset_statistics"] or old_shape != shape
        if reset or shape is None:
            for key in self._moments:
                state.pop(key, None)
            state["step"] = torch.tensor(0.0, dtype=torch.float32)
        if shape is not None:
            for key in self._moments:
                if key not in state:
                    state[key] = torch.zeros(shape, dtype=state_dtype(p), device=p.device)
        state["subspace"] = torch.tensor(float(period + 1), dtype=torch.float32)

    @staticmethod
    def _side_rank(p: Tensor, group: dict[str, Any]) -> tuple[Side, int]:
        """Side and r = round(ρ·dim) of the ``"svd"``/``"random"`` projection (dim: the projected side's)."""
        side, _ = projection_layout(p.shape, 1, group["proj_side"])
        dim = p.shape[1] if side == "right" else p.shape[0]
        return side, round(dim * group["density"])

    # -- stepping -----------------------------------------------------------------------------------
    def _step(self, step: int) -> None:
        index = 0  # position of a parameter among all the optimizer's parameters: seeds its draws
        for group_index, group in enumerate(self.param_groups):
            first_index = index
            index += len(group["params"])
            params = self._params_with_grad(group, "FRUGAL")
            if not params:
                continue
            beta1, beta2 = group["betas"]
            adam = dict(lr=group["lr"], beta1=beta1, beta2=beta2, eps=group["eps"], weight_decay=group["weight_decay"])
            dense = [p for p in params if not self._is_split(p, group)]
            if dense:
                states = [super(FRUGAL, self)._init_state(p, group) for p in dense]
                adamw_fallback(dense, states, foreach=self._use_foreach(group, dense), **adam)
            split = [p for p in params if self._is_split(p, group)]
            if not split:
                continue
            period = (step - 1) // group["update_gap"]
            start = period * group["update_gap"] + 1  # the period's first global step: seeds its draws
            matrices = [p for p in group["params"] if self._is_split(p, group)]
            block_of = {id(p): i for i, p in enumerate(matrices)}
            position = {id(p): first_index + i for i, p in enumerate(group["params"])}
            active = set()
            if group["proj_type"] == "block":
                seed = projection_seed(start, group_index, _SALT_BLOCKS)
                active = self.active_blocks(len(matrices), group["density"], group["block_order"], period, seed)
            for p in split:
                self._matrix_step(p, group, period, block_of[id(p)] in active,
                                  projection_seed(start, position[id(p)], _SALT_PROJECTION), **adam)

    def _matrix_step(
        self,
        p: Tensor,
        group: dict[str, Any],
        period: int,
        active: bool,
        seed: int,
        *,
        lr: float,
        beta1: float,
        beta2: float,
        eps: float,
        weight_decay: float,
    ) -> None:
        """One FRUGAL step of one matrix (see the class docstring for the equations)."""
        state = self.state[p]
        p32, g32 = as_compute([p, p.grad])
        g = g32.to(state_dtype(p))
        if "subspace" not in state or int(state["subspace"].item()) != period + 1:  # CPU counter: no sync
            self._refresh(p, g, state, group, period, active, seed)
        state["step"] += 1
        t = state["step"].item()
        lr_active = lr * group["proj_params_lr_scale"]
        lr_free = lr_active * group["inactive_lr_scale"]
        kind = group["proj_type"]
        has_moments = "exp_avg" in state
        update = None  # the state-full step N̂ in G's shape, times -lr_active
        free = g
        if has_moments:
            if kind == "block":
                low = g
            elif kind == "columns":
                low = g[:, state["indices"]]
            else:
                side, _ = self._side_rank(p, group)
                low = project(g, state["projector"], side)
            exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
            adam_moments_(exp_avg, exp_avg_sq, low, beta1, beta2)
            direction = exp_avg / adam_denom(exp_avg_sq, t, beta2, eps) * (-lr_active / (1 - beta1**t))
            if kind == "block":
                update, free = direction, None
            elif kind == "columns":
                update = torch.zeros_like(g)
                update[:, state["indices"]] = direction
                free = g.clone()
                free[:, state["indices"]] = 0
            else:
                update = project_back(direction, state["projector"], side)
                free = g - project_back(low, state["projector"], side)
        rule = group["inactive_update_rule"]
        if free is not None and rule != "no":
            step_free = free.sign() if rule == "sign_sgd" else free
            update = step_free * (-lr_free) if update is None else update.add_(step_free, alpha=-lr_free)
        decoupled_decay_(p32, lr, weight_decay)
        if update is not None:
            p32.add_(update.to(p32.dtype))
        write_back([p], [p32])
