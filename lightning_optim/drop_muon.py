"""Drop-Muon: Muon that updates only the matrix layers at or above a randomly drawn cutoff (docs/algorithms.md#drop-muon)."""

from __future__ import annotations

import math
import random
from collections.abc import Iterable, Sequence
from typing import Any, Literal

from torch import Tensor

from lightning_optim.matrix import gathered_source
from lightning_optim.muon import Muon
from lightning_optim.projection import projection_seed
from lightning_optim.validation import check_choice

__all__ = ["DropMuon", "drop_muon_cutoff"]

#: salt of the cutoff draw in :func:`~lightning_optim.projection.projection_seed` (index 0: one draw per step)
_CUTOFF_SALT = 0xD20


def drop_muon_cutoff(step: int, num_layers: int, cutoff_probs: Sequence[float] | None = None) -> int:
    """The 0-based cutoff layer index of global step ``step``: a function of the step alone.

    Drawn from a host-side ``random.Random`` seeded by ``projection_seed(step, 0, salt)`` (identical on
    every DDP rank, and after a resume; torch's global RNG is never touched, and no tensor is read back): uniform over ``{0, ..., num_layers - 1}``
    when ``cutoff_probs`` is None (the paper's experiments), else with probability ``cutoff_probs[s]``
    for cutoff s.

    Args:
        step: the 1-based global step.
        num_layers: b, the number of matrix layers (at least 1).
        cutoff_probs: the distribution over cutoffs (b non-negative weights, normalised here), or None.
    """
    rng = random.Random(projection_seed(step, 0, _CUTOFF_SALT))
    if cutoff_probs is None:
        return rng.randrange(num_layers)
    return rng.choices(range(num_layers), weights=[float(w) for w in cutoff_probs])[0]


def _check_cutoff_probs(cutoff_probs: Any) -> tuple[float, ...] | None:
    if cutoff_probs is None:
        return None
    if isinstance(cutoff_probs, (str, bytes)) or not isinstance(cutoff_probs, Sequence) or not cutoff_probs:
        raise ValueError(f"Invalid cutoff_probs: {cutoff_probs!r}; expected None or a non-empty list of floats.")
    values = []
    for w in cutoff_probs:
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w) or w < 0:
            raise ValueError(f"Invalid cutoff_probs: {cutoff_probs!r}; every entry must be a finite float >= 0.")
        values.append(float(w))
    if sum(values) <= 0:
        raise ValueError(f"Invalid cutoff_probs: {cutoff_probs!r}; the weights must not all be 0.")
    return tuple(values)


class DropMuon(Muon):
    r"""Drop-Muon: each step only the matrix layers at or above a sampled cutoff take Muon's update.

    Gruntkowska, Maziane, Qu & Richtárik, "Drop-Muon: Update Less, Converge Faster" (arXiv:2510.02239,
    2025), with the paper's Randomized Progressive Training (RPT) schedule. No code by the authors was
    found; this follows the paper's algorithm. The matrix layers 1, ..., b are ordered by depth; at step k
    a cutoff s_k is drawn and the active set is S_k = {s_k, ..., b}:

    .. math::
        i \notin S_k:\quad M_i \text{ and } W_i \text{ unchanged (no momentum, no decay, no update)} \\
        i \in S_k:\quad \text{Muon's step: } M_i \leftarrow \mu M_i + (1-\mu) G_i,\
            W_i \leftarrow W_i(1-\eta\lambda) - \eta\, s\, \mathrm{NS}_5(U_i)

    (U_i the Nesterov mix or M_i, s = √max(1, m/n); exactly :class:`~lightning_optim.muon.Muon`'s rule and
    functions). With RPT, the layers below the cutoff need no gradient at all (backpropagation can stop
    there), which is where the paper's wall-clock saving comes from; this optimizer only decides which
    layers move, so a training loop that wants the saving must also stop the backward pass (their
    gradients, if present, are simply not used).

    **Layers and depth.** A layer is one matrix parameter (``layers="params"``, default) or one
    ``use_muon`` param group (``layers="groups"``, for groups built per block); the depth order is the
    order in which they appear in the param groups (:func:`~lightning_optim.matrix.split_params` and
    ``model.parameters()`` keep module registration order: first layer first). b counts every matrix
    layer of the optimizer, with or without a gradient this step.

    **The cutoff.** s_k (0-based: layers with index >= s_k are updated) is drawn from a CPU generator
    seeded by the global step (:func:`drop_muon_cutoff`): the same on every DDP rank and after a resume,
    independent of torch's global RNG. Uniform over {0, ..., b − 1} by default (the paper's experiments'
    "uniform index sampling": the last layer is always updated, the first with probability 1/b), or
    ``cutoff_probs`` (b weights; ``[1, 0, ..., 0]`` is plain Muon). The AdamW rule (embeddings, head,
    norms, biases) updates every step.

    Defaults: Muon's (the reference KellerJordan/Muon): lr 0.02, momentum 0.95, Nesterov on, 5 NS steps in
    bf16; AdamW lr 3e-4, betas (0.9, 0.95), eps 1e-10.

    Deviations from the paper: the paper's Algorithm writes the momentum M ← (1 − β)M + βG with the plain
    EMA and the LMO step −t·UVᵀ per layer; we use Muon's implementation of it (Nesterov by default,
    ``nesterov=False`` gives the paper's EMA; Newton-Schulz for UVᵀ; the √max(1, m/n) scale), one lr for all
    layers (the paper's analysis allows a step size per layer: use param groups); the parameters that are
    not matrices take the AdamW rule every step (the paper applies the layer rule to every layer); every
    deviation of :class:`~lightning_optim.muon.Muon` from its reference applies too.

    Args:
        params: parameters, named parameters or param groups (each may set ``use_muon``/``rule``,
            ``flatten`` and any Muon argument).
        lr: learning rate η of the matrix rule (default 0.02).
        momentum: μ of the momentum EMA (default 0.95).
        weight_decay: decoupled decay λ of the updated matrices, W ← W(1 − ηλ) (default 0).
        nesterov: use U = μM + (1 − μ)G instead of M (default True; False is the paper's Algorithm).
        ns_steps: Newton-Schulz iterations (default 5).
        ns_dtype: dtype of the Newton-Schulz iteration, ``"bfloat16"`` or ``"float32"``.
        adjust_lr: ``"spectral"`` (√max(1, m/n), default) or ``"match_rms_adamw"`` (0.2·√max(m, n)).
        adamw_lr: learning rate of the AdamW rule (default 3e-4).
        adamw_betas: (β1, β2) of the AdamW rule (default (0.9, 0.95)).
        adamw_eps: ε of the AdamW rule, added to √v̂ (default 1e-10).
        adamw_weight_decay: decoupled decay of the AdamW rule (default 0).
        cutoff_probs: weights of the cutoffs 0, ..., b − 1 (b = number of layers; normalised), or None
            for the uniform distribution (default).
        layers: what one layer is: ``"params"`` (each matrix parameter, default) or ``"groups"`` (each
            ``use_muon`` group).
        flatten: view 3-D tensors as (shape[0], rest) (Conv1d kernels) instead of per-expert matrices.
        foreach: multi-tensor path (Muon's: foreach momentum, batched Newton-Schulz; default: on for CUDA).

    State per parameter: as :class:`~lightning_optim.muon.Muon` (matrices ``momentum_buffer``, 4
    bytes/param; AdamW parameters ``exp_avg``, ``exp_avg_sq``, 8 bytes/param; a ``step`` each, which
    counts the steps the parameter was updated). The cutoff needs no state (a function of the global step).
    """

    # declared here (not only inherited) so the state adapter is derived for this class itself
    state_spec = Muon.state_spec
    matrix_spec = Muon.matrix_spec
    adamw_spec = Muon.adamw_spec
    rule_names = ("drop_muon", "muon")

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 0.02,
        momentum: float = 0.95,
        weight_decay: float = 0.0,
        nesterov: bool = True,
        ns_steps: int = 5,
        ns_dtype: Literal["bfloat16", "float32"] = "bfloat16",
        adjust_lr: Literal["spectral", "match_rms_adamw"] = "spectral",
        adamw_lr: float = 3e-4,
        adamw_betas: tuple[float, float] = (0.9, 0.95),
        adamw_eps: float = 1e-10,
        adamw_weight_decay: float = 0.0,
        cutoff_probs: list[float] | None = None,
        layers: Literal["params", "groups"] = "params",
        *,
        flatten: bool = False,
        foreach: bool | None = None,
    ) -> None:
        self.cutoff_probs = _check_cutoff_probs(cutoff_probs)
        check_choice("layers", layers, ("params", "groups"))
        self.layers = layers
        self._active: set[int] | None = None
        super().__init__(
            params,
            lr=lr,
            momentum=momentum,
            weight_decay=weight_decay,
            nesterov=nesterov,
            ns_steps=ns_steps,
            ns_dtype=ns_dtype,
            adjust_lr=adjust_lr,
            adamw_lr=adamw_lr,
            adamw_betas=adamw_betas,
            adamw_eps=adamw_eps,
            adamw_weight_decay=adamw_weight_decay,
            flatten=flatten,
            foreach=foreach,
        )

    # -- the layers and the cutoff ------------------------------------------------------------------
    def layer_index(self) -> dict[int, int]:
        """``id(param) → depth index`` of every matrix-rule parameter (0 = first layer)."""
        index: dict[int, int] = {}
        layer = 0
        for group in self.param_groups:
            if not group["use_muon"]:
                continue
            if self.layers == "groups":
                if group["params"]:
                    for p in group["params"]:
                        index[id(p)] = layer
                    layer += 1
                continue
            for p in group["params"]:
                index[id(p)] = layer
                layer += 1
        return index

    def cutoff(self, step: int, num_layers: int) -> int:
        """The cutoff s of ``step`` (layers with index >= s are updated); override to force one."""
        if self.cutoff_probs is not None and len(self.cutoff_probs) != num_layers:
            raise ValueError(
                f"Invalid cutoff_probs: {len(self.cutoff_probs)} weights for {num_layers} matrix layers; "
                "give one weight per layer (cutoff 0, ..., b - 1) or None for the uniform distribution."
            )
        return drop_muon_cutoff(step, num_layers, self.cutoff_probs)

    def _step(self, step: int) -> None:
        index = self.layer_index()
        num_layers = max(index.values(), default=-1) + 1
        if num_layers == 0:
            self._active = None
            return super()._step(step)
        s = self.cutoff(step, num_layers)
        self._active = {pid for pid, layer in index.items() if layer >= s}
        try:
            super()._step(step)
        finally:
            self._active = None

    def _matrix_step(
        self, group: dict[str, Any], params: list[Tensor], grads: list[Tensor], states: list[dict[str, Any]], foreach: bool
    ) -> None:
        if self._active is not None:
            # under FSDP2 the base class passes gathered full copies: look up the sharded parameter
            keep = [i for i, p in enumerate(params) if id(gathered_source(p)) in self._active]
            if not keep:
                return
            params = [params[i] for i in keep]
            grads = [grads[i] for i in keep]
            states = [states[i] for i in keep]
        super()._matrix_step(group, params, grads, states, foreach)
