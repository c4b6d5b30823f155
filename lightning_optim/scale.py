"""SCALE: column-normalized SGD with first-order momentum only on the last layer (docs/algorithms.md#scale)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Literal

import torch
from torch import Tensor, nn

from lightning_optim._base import StateSpec, StepCountedOptimizer, as_compute, write_back
from lightning_optim.functional import decoupled_decay_
from lightning_optim.matrix import MatrixOptimizer, _classify, _head_modules, batched_views, matrix_view, split_spec
from lightning_optim.validation import check_bool, check_choice, check_range

__all__ = ["SCALE", "LAYOUTS", "column_normalize", "scale_param_groups"]

#: how a matrix's "columns" (the paper's, for y = x W) map onto the torch layout: ``linear`` weights are
#: (out, in), so each row (one output feature, over the inputs) is normalised; ``embedding`` weights are
#: (vocab, dim) = (in, out), so each column (one output feature, over the vocabulary) is normalised
LAYOUTS = ("linear", "embedding")

_SPEC = StateSpec(
    moments={"momentum_buffer": True, "exp_avg": True, "exp_avg_sq": False},
    first_moment="momentum_buffer",
    second_moment="exp_avg_sq",
)
_SPEC_LAST, _SPEC_ADAMW = split_spec(_SPEC, ("momentum_buffer",))
_SPEC_PLAIN, _ = split_spec(_SPEC, ())  # matrices other than the last layer: only `step`


def column_normalize(g: Tensor, layout: str = "linear", eps: float = 1e-8) -> Tensor:
    r"""The paper's column-wise normalisation C(G) of each matrix of ``g`` (..., m, n), as the authors' code.

    Each output feature's slice is divided by its root-mean-square, floored at ``eps``:
    ``layout="linear"`` (torch (out, in) weights) normalises each row over dim -1,
    ``layout="embedding"`` ((vocab, dim) weights) each column over dim -2:

    .. math:: C(G)_{i,:} = G_{i,:} / \max\big(\sqrt{\tfrac1n \textstyle\sum_j G_{ij}^2},\ \epsilon\big)

    so every normalised slice has RMS 1 (ℓ2 norm √n, n its length) unless its RMS is below ε; a zero slice
    stays zero. Overflow-safe: the RMS is computed as a·RMS(G/a) with a the slice's max|G| (finite for every
    finite G). Returns a new tensor in ``g``'s dtype.

    Args:
        g: a matrix or a batch of matrices (fp32/fp64).
        layout: ``"linear"`` or ``"embedding"`` (see :data:`LAYOUTS`).
        eps: floor of the RMS (the authors' ``clamp_min(1e-8)``).
    """
    dim = -1 if layout == "linear" else -2
    peak = g.abs().amax(dim=dim, keepdim=True)
    peak = torch.where(peak > 0, peak, torch.ones_like(peak))
    rms = (g / peak).square().mean(dim=dim, keepdim=True).sqrt() * peak
    return g / rms.clamp_min(eps)


def scale_param_groups(module: nn.Module, **adamw_options: Any) -> list[dict[str, Any]]:
    """SCALE's split of ``module``, as the authors: hidden matrices and embeddings → column-normalized SGD,
    the output head → the same with momentum (``last_layer: True``), 0-/1-D tensors → AdamW.

    The head is what :func:`lightning_optim.matrix.split_params` treats as the head (a Linear named
    ``lm_head``/``head``/``classifier``/``fc_out``, or the last Linear whose ``out_features`` is an
    embedding's vocabulary size); ``nn.Embedding``/``nn.EmbeddingBag`` weights get ``layout: "embedding"``.
    A head tied to the embedding is one parameter: it goes with the embedding (no momentum), as in the
    authors' code (its name holds ``embed_tokens``).

    Args:
        module: the model.
        **adamw_options: options of the AdamW group (e.g. ``lr=1e-3``).

    Returns:
        Non-empty groups among: hidden matrices ``{"use_muon": True}`` (and ``"flatten": True`` for Conv1d
        kernels), embeddings ``{"use_muon": True, "layout": "embedding"}``, the head ``{"use_muon": True,
        "last_layer": True}``, the rest ``{"use_muon": False, **adamw_options}``.
    """
    embed_ids = {
        id(p) for m in module.modules() if isinstance(m, (nn.Embedding, nn.EmbeddingBag)) for p in m.parameters(recurse=False)
    }
    heads = _head_modules(module)
    head_ids = {id(m.weight) for name, m in module.named_modules() if name in heads and isinstance(m, nn.Linear)}
    hidden, hidden_flat, embeddings, head, adamw = [], [], [], [], []
    for _, p, use_muon, flatten in _classify(module):
        if p.ndim < 2:
            adamw.append(p)
        elif id(p) in embed_ids:
            embeddings.append(p)
        elif id(p) in head_ids:
            head.append(p)
        elif use_muon:
            (hidden_flat if flatten else hidden).append(p)
        else:
            adamw.append(p)
    groups = [
        {"params": hidden, "use_muon": True},
        {"params": hidden_flat, "use_muon": True, "flatten": True},
        {"params": embeddings, "use_muon": True, "layout": "embedding"},
        {"params": head, "use_muon": True, "last_layer": True},
        {"params": adamw, "use_muon": False, **adamw_options},
    ]
    return [g for g in groups if g["params"]]


class SCALE(MatrixOptimizer):
    r"""SCALE: column-normalized SGD for every matrix, first-order momentum only on the last layer.

    Glentis, Li, Han & Hong, "A Minimalist Optimizer Design for LLM Pretraining" (arXiv 2506.16659, 2025),
    Algorithm 1 ("Stochastic Column-normAlized Last-layer momEntum"); follows the authors' code
    OptimAI-Lab/Minimalist_LLM_Pretraining (``mem_eff_pt/pt_scale/scale_optimizer.py``,
    ``mem_eff_pt/utils/train_utils.py``, ``scripts/*_scale.sh``). For a matrix W with gradient G:

    .. math::
        M = \beta M + (1-\beta) G \ \text{(last layer)},\qquad M = G \ \text{(every other matrix)} \\
        W \leftarrow W(1 - \eta\lambda) - \eta\, C(M),\qquad
            C(M)_{i,:} = M_{i,:} / \max(\mathrm{RMS}(M_{i,:}), \epsilon)

    C normalises each output feature's slice to RMS 1 (:func:`column_normalize`): the paper's "columns"
    are those of the y = xW matrix, i.e. the rows of a torch ``nn.Linear`` weight (out, in) (normalised
    over the inputs, dim -1) and the columns of an ``nn.Embedding`` weight (vocab, dim) (over the
    vocabulary, dim -2; ``layout: "embedding"``), as the authors' code. No second moments; the only
    state is the last layer's momentum (EMA form, ``lerp``). 0-/1-D tensors take the AdamW rule.

    **The last layer.** A group key ``last_layer: true`` marks the parameters that get momentum (the
    authors: every ≥2-D parameter outside attention/MLP/embeddings, i.e. ``lm_head``). From a module,
    :func:`scale_param_groups` marks the head by module type and the embeddings' layout. From bare
    ``model.parameters()`` (LightningCLI) nothing can be told by shape, so with ``auto_last_layer=True``
    (default) and no group holding a ``last_layer`` key, the last parameter of the last matrix-rule group
    (in parameter order) is taken as the last layer: for a standard GPT/LLaMA, whose head is registered
    last, that is ``lm_head.weight`` (it is split into its own group with ``last_layer: True``). Set
    ``last_layer`` in a group (YAML ``param_groups: groups: [{params: "lm_head.*", last_layer: true}]``) or
    ``auto_last_layer=False`` to choose yourself; mark embeddings with ``layout: embedding``.

    **The split** (shared base :class:`~lightning_optim.matrix.MatrixOptimizer`): every group carries
    ``use_muon`` (``rule: scale``/``matrix``/``adamw`` accepted); a group without it is split by shape
    (2+ dims → SCALE, 0-/1-D and named embeddings/heads → AdamW); conv kernels are viewed as
    (out, in·kh·kw) (the authors' ``view(size(0), -1)``), 3-D weights as per-expert matrices.

    Defaults (the authors' ``scripts/60m_scale.sh``–``350m_scale.sh`` and ``args.py``): lr 1e-3, momentum
    0.9, weight_decay 0, eps 1e-8; AdamW rule for the 0-/1-D tensors: lr 2e-2 (their ``--adam_lr``
    default; their 1B/7B scripts use 1e-3), betas (0.9, 0.999), eps 1e-8, weight decay 0 (they share
    ``--weight_decay``).

    Deviations from the authors' code: the AdamW rule is torch AdamW's (ε added to √v̂; the authors add ε
    to √v and fold √(1 − β2^t) into the step size) with its own ``adamw_lr`` (the authors scale their
    ``adam_lr`` by lr/max_lr, which an lr scheduler does for every group here); the RMS is computed
    overflow-safe (scaled by the slice's max|G|); bf16/fp16 parameters get fp32 state and math (the authors
    keep the momentum in the parameter's dtype); 3-D weights are per-expert matrices (the authors flatten
    every >2-D tensor); the last layer is chosen as described above (the authors: by module names).

    Args:
        params: parameters, named parameters or param groups (each may set ``use_muon``/``rule``,
            ``last_layer``, ``layout``, ``flatten`` and any argument below).
        lr: η of the matrix rule (default 1e-3).
        momentum: β of the last layer's momentum (default 0.9).
        weight_decay: decoupled decay λ of the matrix rule, W(1 − ηλ) before the update (default 0).
        eps: floor ε of each slice's RMS in C (default 1e-8).
        last_layer: the default of the group key: momentum for the group's matrices (default False).
        layout: the default of the group key, ``"linear"`` ((out, in): rows normalised) or ``"embedding"``
            ((vocab, dim): columns normalised) (default ``"linear"``).
        auto_last_layer: when no param group given holds a ``last_layer`` key, mark the last parameter of
            the last matrix-rule group as the last layer (default True).
        adamw_lr: learning rate of the AdamW rule (default 2e-2).
        adamw_betas: (β1, β2) of the AdamW rule (default (0.9, 0.999)).
        adamw_eps: ε of the AdamW rule, added to √v̂ (default 1e-8).
        adamw_weight_decay: decoupled decay of the AdamW rule (default 0).
        flatten: view 3-D tensors as (shape[0], rest) (Conv1d kernels) instead of per-expert matrices.
        foreach: multi-tensor path: foreach momentum, decay and update, the normalisation batched over
            same-shaped matrix views (default: on for CUDA params).

    State per parameter: last-layer matrices ``momentum_buffer`` (4 bytes/param, fp32 for bf16/fp16
    parameters), other matrices none (0 bytes/param); AdamW parameters ``exp_avg``, ``exp_avg_sq`` (8
    bytes/param); each a ``step`` (CPU float32). For a model: bytes/param ≈ (4·N_head + 8·N_1d)/N_total.
    """

    state_spec = _SPEC
    matrix_spec = _SPEC_LAST
    adamw_spec = _SPEC_ADAMW
    rule_names = ("scale", "muon")

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        eps: float = 1e-8,
        last_layer: bool = False,
        layout: Literal["linear", "embedding"] = "linear",
        auto_last_layer: bool = True,
        adamw_lr: float = 2e-2,
        adamw_betas: tuple[float, float] = (0.9, 0.999),
        adamw_eps: float = 1e-8,
        adamw_weight_decay: float = 0.0,
        *,
        flatten: bool = False,
        foreach: bool | None = None,
    ) -> None:
        params = [params] if isinstance(params, Tensor) else list(params)
        marked = any(isinstance(g, dict) and "last_layer" in g for g in params)
        check_bool("auto_last_layer", auto_last_layer)
        super().__init__(
            params,
            dict(
                lr=lr,
                momentum=momentum,
                weight_decay=weight_decay,
                eps=eps,
                last_layer=last_layer,
                layout=layout,
                adamw_lr=adamw_lr,
                adamw_betas=adamw_betas,
                adamw_eps=adamw_eps,
                adamw_weight_decay=adamw_weight_decay,
                flatten=flatten,
                foreach=foreach,
            ),
        )
        if auto_last_layer and not marked and not last_layer:
            self._mark_last_layer()

    def _mark_last_layer(self) -> None:
        """The last parameter of the last non-empty matrix group becomes the last layer (its own group)."""
        for group in reversed(self.param_groups):
            if group["use_muon"] and group["params"]:
                if len(group["params"]) == 1:
                    group["last_layer"] = True
                    return
                head = group["params"].pop()
                new = {k: v for k, v in group.items() if k not in ("params", "global_step")}
                self.add_param_group({**new, "params": [head], "last_layer": True})
                return

    def _validate_matrix_options(self, group: dict[str, Any]) -> None:
        check_range("momentum", group["momentum"], 0.0, 1.0, high_open=True)
        check_range("eps", group["eps"], 0.0)
        check_bool("last_layer", group["last_layer"])
        check_choice("layout", group["layout"], LAYOUTS)

    def _init_state(self, p: Tensor, group: dict[str, Any]) -> dict[str, Any]:
        if group["use_muon"] and not group["last_layer"]:  # plain column-normalized SGD: no moments
            self.state_spec = _SPEC_PLAIN
            try:
                return StepCountedOptimizer._init_state(self, p, group)
            finally:
                del self.state_spec
        return super()._init_state(p, group)

    def _matrix_step(
        self, group: dict[str, Any], params: list[Tensor], grads: list[Tensor], states: list[dict[str, Any]], foreach: bool
    ) -> None:
        fn = _scale_foreach if foreach else _scale_single_tensor
        fn(
            params,
            grads,
            [s.get("momentum_buffer") for s in states] if group["last_layer"] else None,
            [s["step"] for s in states],
            lr=group["lr"],
            momentum=group["momentum"],
            weight_decay=group["weight_decay"],
            eps=group["eps"],
            layout=group["layout"],
            flatten=group["flatten"],
        )


def _scale_single_tensor(
    params: list[Tensor],
    grads: list[Tensor],
    bufs: list[Tensor] | None,
    steps: list[Tensor],
    *,
    lr: float,
    momentum: float,
    weight_decay: float,
    eps: float,
    layout: str,
    flatten: bool,
) -> None:
    """Reference path: one parameter at a time (a 3-D weight is its batch of per-expert matrices)."""
    for i, (param, grad, step_t) in enumerate(zip(params, grads, steps)):
        step_t += 1
        p32, g32 = as_compute([param, grad])
        direction = g32
        if bufs is not None:
            bufs[i].lerp_(g32, 1 - momentum)
            direction = bufs[i]
        update = column_normalize(matrix_view(direction, flatten), layout, eps).reshape(param.shape)
        decoupled_decay_(p32, lr, weight_decay)
        p32.add_(update, alpha=-lr)
        write_back([param], [p32])


def _scale_foreach(
    params: list[Tensor],
    grads: list[Tensor],
    bufs: list[Tensor] | None,
    steps: list[Tensor],
    *,
    lr: float,
    momentum: float,
    weight_decay: float,
    eps: float,
    layout: str,
    flatten: bool,
) -> None:
    """Multi-tensor path: foreach momentum and decay, the normalisation batched over same-shaped views."""
    torch._foreach_add_(steps, 1.0)
    lists = [params, grads] + ([bufs] if bufs is not None else [])
    grouped = StepCountedOptimizer._group_tensors_by_device_and_dtype(lists)
    for tensors, _ in grouped.values():
        dev_params, dev_grads = tensors[0], tensors[1]
        p32, g32 = as_compute(dev_params), as_compute(dev_grads)
        directions = g32
        if bufs is not None:
            torch._foreach_lerp_(tensors[2], g32, 1 - momentum)
            directions = tensors[2]
        decoupled_decay_(p32, lr, weight_decay)
        for idx in batched_views(dev_params, flatten).values():
            normalized = column_normalize(torch.stack([matrix_view(directions[i], flatten) for i in idx]), layout, eps)
            torch._foreach_add_(
                [p32[i] for i in idx],
                [x.reshape(dev_params[i].shape) for i, x in zip(idx, normalized.unbind())],
                alpha=-lr,
            )
        write_back(dev_params, p32)
