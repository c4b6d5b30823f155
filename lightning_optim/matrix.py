"""Shared machinery of the matrix optimizers (Muon and its successors): orthogonalization, matrix views, the split.

- :func:`newton_schulz` orthogonalizes a matrix (or a batch of them) with the quintic Newton-Schulz
  iteration of Jordan et al.'s Muon, overflow-safe for finite inputs.
- :func:`matrix_view` gives the 2-D (or batched 3-D) view a matrix rule works on: a conv kernel
  (out, in, kh, kw) is viewed as (out, in·kh·kw), a per-expert weight (E, out, in) as E matrices.
- :func:`split_params` / :func:`matrix_param_groups` split a module's parameters between the matrix rule
  (hidden weight matrices) and an AdamW rule (embeddings, the output head, norms, biases, other 1-D
  tensors), as param groups that carry ``use_muon``.

- :class:`MatrixOptimizer` is the base class of the "matrix rule + AdamW rule" optimizers (Muon, NAMO,
  NAMO-D, SinkGD): the split of param groups, the AdamW rule, validation, per-rule state; a subclass
  implements the matrix rule (:meth:`MatrixOptimizer._matrix_step`).

Pure torch; no Lightning import.
"""

from __future__ import annotations

import dataclasses
import re
import sys
from collections.abc import Iterable
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from lightning_optim._base import StateSpec, StepCountedOptimizer, as_compute, write_back
from lightning_optim.functional import adam_step_, adam_step_foreach_
from lightning_optim.validation import check_betas, check_bool, check_choice, check_range

__all__ = [
    "NS_COEFFICIENTS",
    "HEAD_NAMES",
    "MatrixOptimizer",
    "batched_views",
    "GATHER_CHUNK_NUMEL",
    "frobenius_norms",
    "gathered_matrix_step",
    "gathered_source",
    "is_dtensor",
    "matrix_param_groups",
    "matrix_shape",
    "matrix_view",
    "newton_schulz",
    "split_params",
]

#: (a, b, c) of the quintic X ← aX + b(XXᵀ)X + c(XXᵀ)²X (KellerJordan/Muon ``zeropower_via_newtonschulz5``)
NS_COEFFICIENTS: tuple[float, float, float] = (3.4445, -4.7750, 2.0315)
#: name of the last attribute of a Linear that :func:`split_params` treats as the output head
HEAD_NAMES: tuple[str, ...] = ("lm_head", "head", "classifier", "fc_out")

_NS_DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}


# -- matrix views -------------------------------------------------------------------------------------------
def matrix_shape(shape: torch.Size | tuple[int, ...], flatten: bool = False) -> tuple[int, ...]:
    """The shape a matrix rule sees for a parameter of ``shape`` (2-D, or 3-D = a batch of matrices).

    2-D: itself. 3-D (E, out, in): E matrices of (out, in) (per-expert weights), unless ``flatten``
    (Conv1d kernels (out, in, k) are flattened to (out, in·k)). 4-D and more (conv kernels
    (out, in, kh, kw, ...)): (out, in·kh·kw·...).

    Args:
        shape: the parameter's shape (at least 2-D).
        flatten: view a 3-D tensor as (shape[0], rest) instead of a batch.
    """
    shape = tuple(shape)
    if len(shape) < 2:
        raise ValueError(f"a matrix rule needs a tensor with at least 2 dimensions, got shape {shape}")
    if len(shape) == 2 or (len(shape) == 3 and not flatten):
        return shape
    rest = 1
    for d in shape[1:]:
        rest *= d
    return (shape[0], rest)


def matrix_view(t: Tensor, flatten: bool = False) -> Tensor:
    """``t`` reshaped to :func:`matrix_shape` (a view where the memory allows it)."""
    return t.reshape(matrix_shape(t.shape, flatten))


# -- Newton-Schulz --------------------------------------------------------------------------------------------
def newton_schulz(
    g: Tensor,
    steps: int = 5,
    dtype: str | torch.dtype = "bfloat16",
    coefficients: tuple[float, float, float] = NS_COEFFICIENTS,
    eps: float = 1e-7,
) -> Tensor:
    r"""The approximate orthogonal factor U Vᵀ of G = U S Vᵀ by the quintic Newton-Schulz iteration.

    For a matrix (or a batch of matrices along leading dims) G of shape (..., m, n): transpose when m > n
    (so X Xᵀ is the smaller Gram matrix), X₀ = G / (‖G‖_F + ε) (spectral norm ≤ 1), then ``steps`` times

    .. math:: A = X X^\top,\quad B = bA + cA^2,\quad X \leftarrow aX + BX

    in ``dtype`` (bf16 as the reference; fp32 on request), and transpose back. The coefficients
    (3.4445, −4.7750, 2.0315) maximise the slope at 0, so the singular values land in a band around 1
    (about [0.7, 1.2] after 5 steps), not exactly at 1, as the reference intends.

    Overflow-safe: ‖G‖_F is computed as a·‖G/a‖_F with a = max|G| (per matrix), so a finite G whose
    entries' squares overflow fp32 (|g| > 1.8e19) is still normalised correctly; an all-zero G gives 0.
    As in the reference, G is cast to ``dtype`` first and divided there; a new tensor is returned and ``g`` is never written (torch 2.13's ``torch.optim.Muon`` normalises in place and so
    corrupts its bf16 momentum buffer with ``nesterov=False``).

    Args:
        g: the matrix or batch of matrices (at least 2-D; any float dtype).
        steps: number of iterations (5 in the reference).
        dtype: the iteration's dtype, ``"bfloat16"`` or ``"float32"`` (or a torch dtype).
        coefficients: (a, b, c).
        eps: added to the Frobenius norm (1e-7 as the reference).

    Returns:
        A tensor of ``g``'s shape in ``dtype``.
    """
    if g.ndim < 2:
        raise ValueError(f"newton_schulz needs a matrix or a batch of matrices, got shape {tuple(g.shape)}")
    work = _NS_DTYPES[dtype] if isinstance(dtype, str) else dtype
    a, b, c = coefficients
    x = g.to(work)
    transposed = x.size(-2) > x.size(-1)
    if transposed:
        x = x.mT
    # ‖X‖_F as a·‖X/a‖_F with a = max|X| (fp32): finite for every finite X; rounded to the iteration's
    # dtype, as the reference's `X.norm()` of a bf16 X is, so ordinary inputs give the reference's bits
    x32 = x.float()
    peak = x32.abs().amax(dim=(-2, -1), keepdim=True)
    peak = torch.where(peak > 0, peak, torch.ones_like(peak))  # a zero matrix stays zero (no 0/0)
    norm = torch.linalg.matrix_norm(x32 / peak, keepdim=True) * peak
    x = x / (norm.to(work) + eps)
    for _ in range(steps):
        gram = x @ x.mT
        poly = b * gram + (c * gram) @ gram  # the reference's `b * A + c * A @ A` (left to right)
        x = a * x + poly @ x
    if transposed:
        x = x.mT
    return x


# -- the split -------------------------------------------------------------------------------------------------
def _vocab_sizes(module: nn.Module) -> set[int]:
    return {m.num_embeddings for m in module.modules() if isinstance(m, (nn.Embedding, nn.EmbeddingBag))}


def _head_modules(module: nn.Module) -> set[str]:
    """Qualified names of the Linear modules treated as the output head.

    A Linear whose attribute name is one of :data:`HEAD_NAMES` (``lm_head``, ``head``, ``classifier``,
    ``fc_out``, ...), and the last Linear of the module (in registration order) whose ``out_features``
    equals the vocabulary size of one of the model's embeddings.
    """
    linears = [(name, m) for name, m in module.named_modules() if isinstance(m, nn.Linear)]
    heads = {name for name, _ in linears if name.rsplit(".", 1)[-1] in HEAD_NAMES}
    vocab = _vocab_sizes(module)
    for name, m in reversed(linears):
        if m.out_features in vocab:
            heads.add(name)
            break
    return heads


def _classify(module: nn.Module) -> list[tuple[str, Tensor, bool, bool]]:
    """(qualified name, parameter, uses the matrix rule, flatten a 3-D kernel) for each trainable parameter."""
    owners: dict[int, tuple[str, nn.Module]] = {}
    for prefix, mod in module.named_modules():
        for pname, p in mod.named_parameters(recurse=False):
            owners.setdefault(id(p), (f"{prefix}.{pname}" if prefix else pname, mod))
    heads = _head_modules(module)
    head_ids = set()
    for name, mod in module.named_modules():
        if name in heads:
            head_ids.update(id(p) for p in mod.parameters(recurse=False))
    embed_ids = {
        id(p) for m in module.modules() if isinstance(m, (nn.Embedding, nn.EmbeddingBag)) for p in m.parameters(recurse=False)
    }
    out = []
    for name, p in module.named_parameters():  # shared (tied) parameters appear once
        if not p.requires_grad:
            continue
        owner = owners.get(id(p), (name, module))[1]
        if p.ndim < 2 or id(p) in embed_ids or id(p) in head_ids:
            out.append((name, p, False, False))
        else:
            out.append((name, p, True, isinstance(owner, nn.Conv1d) or (p.ndim == 3 and isinstance(owner, nn.modules.conv._ConvNd))))
    return out


def split_params(module: nn.Module, **adamw_options: Any) -> list[dict[str, Any]]:
    """Param groups for Muon-type optimizers: hidden weight matrices → the matrix rule, the rest → AdamW.

    The rule, by module type and shape (each trainable parameter once; a head tied to the embedding is the
    embedding's parameter and goes with it):

    - AdamW (``use_muon: False``): parameters of ``nn.Embedding``/``nn.EmbeddingBag``; the output head,
      i.e. every ``nn.Linear`` whose attribute name is one of :data:`HEAD_NAMES` (``lm_head``, ``head``,
      ``classifier``, ``fc_out``, ...) and the last ``nn.Linear`` whose ``out_features`` equals an
      embedding's vocabulary size; every tensor with fewer than 2 dimensions (biases, norm scales, gains).
    - Matrix rule (``use_muon: True``): every other parameter with 2 or more dimensions: hidden Linear
      weights, conv kernels (viewed as (out, in·kh·kw)), 3-D per-expert weights (E, out, in:
      orthogonalized per expert). Conv1d kernels (3-D) go to a group with ``flatten: True``.

    Args:
        module: the model.
        **adamw_options: options for the AdamW group (e.g. ``lr=3e-4``); the optimizer's ``adamw_*``
            arguments apply otherwise.

    Returns:
        Up to three groups, empty ones left out: ``{"params": [...], "use_muon": True}``, the same with
        ``"flatten": True`` (Conv1d kernels), and ``{"params": [...], "use_muon": False, **adamw_options}``.
    """
    muon, muon_flat, adamw = [], [], []
    for _, p, use_muon, flatten in _classify(module):
        (muon_flat if flatten else muon).append(p) if use_muon else adamw.append(p)
    groups: list[dict[str, Any]] = []
    if muon:
        groups.append({"params": muon, "use_muon": True})
    if muon_flat:
        groups.append({"params": muon_flat, "use_muon": True, "flatten": True})
    if adamw:
        groups.append({"params": adamw, "use_muon": False, **adamw_options})
    return groups


def matrix_param_groups(module: nn.Module) -> dict[str, list[str]]:
    """The split :func:`split_params` would use, by qualified parameter name: ``{"muon": [...], "adamw": [...]}``."""
    out: dict[str, list[str]] = {"muon": [], "adamw": []}
    for name, _, use_muon, _ in _classify(module):
        out["muon" if use_muon else "adamw"].append(name)
    return out



# -- overflow-safe matrix reductions ---------------------------------------------------------------------------
def frobenius_norms(x: Tensor) -> tuple[Tensor, Tensor]:
    """(‖X‖_F, max|X|) of each matrix of ``x`` (shape (..., m, n)), keepdim, fp32, overflow-safe.

    ‖X‖_F = a·‖X/a‖_F with a = max|X| (a zero matrix gives 0, a = 1), so a finite X whose squares overflow
    fp32 still gives a finite norm. NaN entries give NaN.

    Args:
        x: a matrix or a batch of matrices (fp32).
    """
    peak = x.abs().amax(dim=(-2, -1), keepdim=True)
    peak = torch.where(peak > 0, peak, torch.ones_like(peak))
    return torch.linalg.matrix_norm(x / peak, keepdim=True) * peak, peak


def batched_views(tensors: list[Tensor], flatten: bool) -> dict[tuple[int, ...], list[int]]:
    """Indices of ``tensors`` grouped by their :func:`matrix_shape` (what the foreach paths stack)."""
    by_shape: dict[tuple[int, ...], list[int]] = {}
    for i, t in enumerate(tensors):
        by_shape.setdefault(matrix_shape(t.shape, flatten), []).append(i)
    return by_shape


# -- the base class: matrix rule + AdamW rule --------------------------------------------------------------------
_EMBED_OR_HEAD = re.compile(r"(^|_)(emb|embed|embeds|embedding|embeddings|wte|wpe)($|_)|^(" + "|".join(HEAD_NAMES) + ")$")


def _tensor(item: Any) -> Tensor:
    """The tensor of a params entry (a tensor, or a ``(name, tensor)`` pair of ``named_parameters``)."""
    return item[1] if isinstance(item, tuple) else item


def _matrix_by_shape(item: Any) -> bool:
    """The automatic split of a group without ``use_muon``: 2+ dims → the matrix rule, unless a named
    parameter's owning module's name looks like an embedding (``tok_emb``, ``embed_tokens``, ``wte``) or a
    head (``lm_head``)."""
    if _tensor(item).ndim < 2:
        return False
    if isinstance(item, tuple):
        parts = str(item[0]).split(".")
        owner = parts[-2] if len(parts) > 1 else parts[0]  # the attribute name of the owning module
        return not _EMBED_OR_HEAD.search(owner)
    return True


def check_named_betas(name: str, betas: Any) -> None:
    """Validate a (β1, β2) tuple whose argument is called ``name`` (e.g. ``adamw_betas``)."""
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise ValueError(f"Invalid {name}: {betas!r}; expected a tuple of 2 floats in [0, 1).")
    for i, beta in enumerate(betas):
        check_range(f"{name}[{i}]", beta, 0.0, 1.0, high_open=True)


class MatrixOptimizer(StepCountedOptimizer):
    """Base class of the optimizers with a matrix rule for hidden matrices and an AdamW rule for the rest.

    One optimizer object per model (Lightning's scheduler, LearningRateMonitor and checkpointing see one
    optimizer). Every param group carries ``use_muon`` (True: the subclass's matrix rule, False: AdamW;
    the key keeps Muon's name for every subclass, and ``rule:`` accepts ``"matrix"``, ``"adamw"`` and the
    names in :attr:`rule_names`). A group without it is split by shape into two consecutive groups (2+
    dims → matrix rule, 0-/1-D and named embeddings/heads → AdamW); in such a group the plain keys
    configure the matrix part and ``adamw_lr``/``adamw_betas``/``adamw_eps``/``adamw_weight_decay`` the
    AdamW part; an explicit ``weight_decay: 0`` turns the decay off for both. In a ``use_muon: False``
    group ``lr``, ``betas``, ``eps`` and ``weight_decay`` are the AdamW ones, defaulting to ``adamw_*``.
    A matrix group holding a tensor with fewer than 2 dimensions raises ``ValueError``.

    Subclasses declare :attr:`state_spec` (every key), :attr:`matrix_spec` and :attr:`adamw_spec` (what
    one parameter of each rule creates), put ``adamw_*``, ``flatten`` and ``foreach`` into their defaults,
    and implement :meth:`_validate_matrix_options` and :meth:`_matrix_step`. The AdamW rule is
    torch AdamW's (:func:`lightning_optim.functional.adam_step_`): ε added to √v̂, decay θ(1 − η'λ').
    """

    #: names ``rule:`` accepts for the matrix rule (besides ``"matrix"``)
    rule_names: ClassVar[tuple[str, ...]] = ("muon",)
    #: the state one matrix-rule parameter creates / one AdamW-rule parameter creates
    matrix_spec: ClassVar[StateSpec] = StateSpec()
    adamw_spec: ClassVar[StateSpec] = StateSpec(moments={"exp_avg": True, "exp_avg_sq": False})

    def __init__(self, params: Iterable[Any], defaults: dict[str, Any]) -> None:
        # betas given as lists (Python, or YAML without the type hint) become the tuples the groups keep
        for key in ("betas", "adamw_betas"):
            if isinstance(defaults.get(key), list):
                defaults[key] = tuple(defaults[key])
        super().__init__(params, defaults)

    # -- param groups: the split ----------------------------------------------------------------------
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group; one without ``use_muon`` is split by shape into a matrix and an AdamW group."""
        group = dict(param_group)
        params = group["params"]
        params = [params] if isinstance(params, Tensor) else list(params)
        group["params"] = params
        if "rule" in group:
            rule = group.pop("rule")
            matrix_names = ("matrix", *self.rule_names)
            check_choice("rule", rule, (*matrix_names, "adamw"))
            if "use_muon" in group and group["use_muon"] is not (rule in matrix_names):
                raise ValueError(f"Invalid param group: rule={rule!r} contradicts use_muon={group['use_muon']!r}.")
            group["use_muon"] = rule in matrix_names
        use_muon = group.get("use_muon")
        if use_muon is None:
            matrices = [p for p in params if _matrix_by_shape(p)]
            others = [p for p in params if not _matrix_by_shape(p)]
            parts = []
            if matrices or not others:  # an empty group is kept (as a matrix group): never dropped
                parts.append({**group, "params": matrices, "use_muon": True})
            if others:
                parts.append(self._adamw_group({**group, "params": others}, split=True))
            for part in parts:
                super().add_param_group(part)
            return
        check_bool("use_muon", use_muon)
        if use_muon:
            vectors = [tuple(_tensor(p).shape) for p in params if _tensor(p).ndim < 2]
            if vectors:
                raise ValueError(
                    f"Invalid param group with use_muon=True: it holds tensors with fewer than 2 dimensions "
                    f"(shapes {vectors[:4]}); the matrix rule needs matrices. Put them in a group with "
                    "use_muon=False (AdamW), or leave use_muon out to split the group by shape."
                )
            super().add_param_group({**group, "params": params})
        else:
            super().add_param_group(self._adamw_group({**group, "params": params}, split=False))

    def _adamw_group(self, group: dict[str, Any], split: bool) -> dict[str, Any]:
        """The AdamW group: its lr/betas/eps/weight_decay from the group, or from the ``adamw_*`` options."""
        get = lambda key: group.get(key, self.defaults[key])  # noqa: E731
        if split:  # plain keys belong to the matrix part; an explicit weight_decay 0 means "no decay here"
            no_decay = "weight_decay" in group and group["weight_decay"] == 0 and "adamw_weight_decay" not in group
            options = dict(
                lr=get("adamw_lr"),
                betas=get("adamw_betas"),
                eps=get("adamw_eps"),
                weight_decay=0.0 if no_decay else get("adamw_weight_decay"),
            )
        else:
            options = dict(
                lr=group.get("lr", get("adamw_lr")),
                betas=group.get("betas", get("adamw_betas")),
                eps=group.get("eps", get("adamw_eps")),
                weight_decay=group.get("weight_decay", get("adamw_weight_decay")),
            )
        if isinstance(options["betas"], list):
            options["betas"] = tuple(options["betas"])
        return {**group, **options, "use_muon": False}

    def _validate_group(self, group: dict[str, Any]) -> None:
        check_bool("use_muon", group.get("use_muon"))
        check_range("lr", group["lr"], 0.0)
        check_range("weight_decay", group["weight_decay"], 0.0)
        self._validate_matrix_options(group)
        check_range("adamw_lr", group["adamw_lr"], 0.0)
        check_named_betas("adamw_betas", group["adamw_betas"])
        check_range("adamw_eps", group["adamw_eps"], 0.0)
        check_range("adamw_weight_decay", group["adamw_weight_decay"], 0.0)
        check_bool("flatten", group["flatten"])
        if group["foreach"] is not None:
            check_bool("foreach", group["foreach"])
        if not group["use_muon"]:
            check_betas(group["betas"])
            check_range("eps", group["eps"], 0.0)

    def _validate_matrix_options(self, group: dict[str, Any]) -> None:  # pragma: no cover - abstract
        """Validate the matrix rule's own options (every group holds them, from the defaults)."""
        raise NotImplementedError

    # -- state: each parameter holds its rule's moments only ------------------------------------------
    def _init_state(self, p: Tensor, group: dict[str, Any]) -> dict[str, Any]:
        # The class spec lists every key (state dicts load, resets cover all); a parameter's own rule
        # decides which moments it creates (an instance attribute shadows the class's for this call).
        self.state_spec = self.matrix_spec if group["use_muon"] else self.adamw_spec
        try:
            return super()._init_state(p, group)
        finally:
            del self.state_spec

    def _adopt_foreign(self, state_dict: dict[str, Any]) -> dict[str, Any]:
        groups = state_dict.get("param_groups")
        if isinstance(groups, list) and isinstance(state_dict.get("state"), dict):
            if groups and not all("use_muon" in g for g in groups):
                name = type(self).__name__
                keys = sorted({str(k) for s in state_dict["state"].values() for k in s})
                raise ValueError(
                    f"{name}.load_state_dict: the state dict was saved by another optimizer (param groups without "
                    f"'use_muon'; per-parameter state keys {keys}). Its moments cannot be mapped onto {name}'s two "
                    f"rules (matrices keep {sorted(self.matrix_spec.moments) or 'no moments'}, the AdamW rule "
                    f"'exp_avg'/'exp_avg_sq'). Resume with the optimizer that saved it, or load only the model "
                    f"weights and let {name} start from zero."
                )
        return super()._adopt_foreign(state_dict)

    # -- stepping -----------------------------------------------------------------------------------
    def _step(self, step: int) -> None:
        for group in self.param_groups:
            params = self._params_with_grad(group, type(self).__name__)
            if not params:
                continue
            states = [self._init_state(p, group) for p in params]
            foreach = self._use_foreach(group, params)
            grads = [p.grad for p in params]
            if group["use_muon"]:
                if any(is_dtensor(p) for p in params):  # FSDP2/DTensor shards: gather each matrix (gathered_matrix_step)
                    gathered_matrix_step(self, group, params, grads, states, foreach)
                else:
                    self._matrix_step(group, params, grads, states, foreach)
            else:
                fn = adamw_foreach if foreach else adamw_single_tensor
                beta1, beta2 = group["betas"]
                fn(
                    params,
                    grads,
                    [s["exp_avg"] for s in states],
                    [s["exp_avg_sq"] for s in states],
                    [s["step"] for s in states],
                    lr=group["lr"],
                    beta1=beta1,
                    beta2=beta2,
                    eps=group["eps"],
                    weight_decay=group["weight_decay"],
                )

    def _matrix_step(
        self, group: dict[str, Any], params: list[Tensor], grads: list[Tensor], states: list[dict[str, Any]], foreach: bool
    ) -> None:  # pragma: no cover - abstract
        """One step of the matrix rule for ``params`` (with gradients) of a ``use_muon`` group.

        ``states`` hold the keys of :attr:`matrix_spec` (and ``step``, which the rule increments);
        ``foreach`` selects the multi-tensor path (same-shaped matrix views batched).
        """
        raise NotImplementedError


# -- the AdamW rule ---------------------------------------------------------------------------------------------
def adamw_single_tensor(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    steps: list[Tensor],
    **adam: float,
) -> None:
    """AdamW one parameter at a time (:func:`lightning_optim.functional.adam_step_`)."""
    for param, grad, exp_avg, exp_avg_sq, step_t in zip(params, grads, exp_avgs, exp_avg_sqs, steps):
        step_t += 1
        p32, g32 = as_compute([param, grad])
        adam_step_(p32, g32, exp_avg, exp_avg_sq, step_t.item(), **adam)  # CPU step: no sync
        write_back([param], [p32])


def adamw_foreach(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    steps: list[Tensor],
    **adam: float,
) -> None:
    """Multi-tensor AdamW (:func:`lightning_optim.functional.adam_step_foreach_`)."""
    torch._foreach_add_(steps, 1.0)
    grouped = StepCountedOptimizer._group_tensors_by_device_and_dtype([params, grads, exp_avgs, exp_avg_sqs, steps])
    for (dev_params, dev_grads, dev_exp_avgs, dev_exp_avg_sqs, dev_steps), _ in grouped.values():
        p32, g32 = as_compute(dev_params), as_compute(dev_grads)
        counts = [t.item() for t in dev_steps]  # CPU tensors: no device sync
        adam_step_foreach_(p32, g32, dev_exp_avgs, dev_exp_avg_sqs, counts, **adam)
        write_back(dev_params, p32)


def split_spec(spec: StateSpec, matrix_moments: Iterable[str]) -> tuple[StateSpec, StateSpec]:
    """(matrix_spec, adamw_spec) of a class spec: the matrix rule's moments, and Adam's two."""
    matrix = dataclasses.replace(spec, moments={k: spec.moments[k] for k in matrix_moments})
    adamw = dataclasses.replace(spec, moments={"exp_avg": True, "exp_avg_sq": False})
    return matrix, adamw


# -- FSDP2 / DTensor: each matrix gathered for the matrix rule ---------------------------------------------------
def is_dtensor(t: Any) -> bool:
    """Whether ``t`` is a ``torch.distributed.tensor.DTensor`` (what FSDP2's ``fully_shard`` makes of parameters).

    Free for plain tensors: no DTensor can exist before ``torch.distributed.tensor`` is imported, so the
    module is looked up in ``sys.modules`` instead of being imported.
    """
    module = sys.modules.get("torch.distributed.tensor")
    return module is not None and isinstance(t, module.DTensor)


def gathered_source(t: Tensor) -> Tensor:
    """The DTensor parameter a full copy made by :func:`gathered_matrix_step` stands for (``t`` itself otherwise).

    For a matrix rule that keys something on the identity of the parameters it is given (``id(p)``).
    """
    return getattr(t, "_lightning_optim_source", t)


def _local_shard(full: Tensor, like: Any) -> Tensor:
    """This rank's local part of the plain ``full`` tensor, in the layout (mesh, placements) of DTensor ``like``.

    Replicate → Shard is a local slice (the same chunks, uneven ones included, that ``distribute_tensor``
    gives): no communication.
    """
    from torch.distributed.tensor import DTensor, Replicate

    mesh = like.device_mesh
    replicated = DTensor.from_local(full, mesh, [Replicate()] * mesh.ndim, run_check=False)
    return replicated.redistribute(mesh, like.placements).to_local()


def _full(t: Any) -> Any:
    return t.detach().full_tensor() if is_dtensor(t) else t


#: the most elements of full (gathered) parameters :func:`gathered_matrix_step` holds at once: the matrices of a
#: group are gathered and stepped in consecutive chunks of at most this many elements (at least one matrix each),
#: so a rank's peak extra memory is about (2 + state tensors) × this many elements, not the whole unsharded group
GATHER_CHUNK_NUMEL: int = 1 << 26


def gathered_matrix_step(
    opt: MatrixOptimizer,
    group: dict[str, Any],
    params: list[Tensor],
    grads: list[Tensor],
    states: list[dict[str, Any]],
    foreach: bool,
) -> None:
    """One matrix-rule step of ``opt`` for a group holding DTensor parameters (FSDP2 ``fully_shard``, sharded on dim 0).

    The "gather" design: for each DTensor parameter, the full parameter, its gradient and every DTensor of
    its state are all-gathered (``full_tensor()``), so every rank holds the same full matrices; the
    subclass's :meth:`MatrixOptimizer._matrix_step` runs on those plain tensors unchanged (the
    orthogonalization is computed redundantly, identically, on every rank); then each rank copies its local
    shard of the new parameter and of each DTensor state back (a local slice, no communication). State that
    is not a DTensor (CPU ``step`` counters, per-matrix scalars, factor matrices the rule creates with the
    full shape) passes through; entries the rule adds or replaces are kept as it left them (plain tensors,
    the same on every rank). Cost: one all-gather per DTensor parameter, gradient and state tensor per step.

    During the call each full copy carries its gradient in ``.grad`` and :func:`gathered_source` maps it to
    its parameter, and ``opt.param_groups`` list the full copies in place of the parameters (rules that
    enumerate the param groups, e.g. Conda's per-position seeds, find the tensors they are given); the
    groups are restored afterwards, also when the rule raises.

    The parameters are taken in consecutive chunks of at most :data:`GATHER_CHUNK_NUMEL` elements (one
    ``_matrix_step`` call each, so a foreach path batches same-shaped matrices within a chunk): every matrix
    rule here is per matrix, so the chunking changes only the peak memory (and which same-shaped matrices a
    foreach path stacks together).
    """
    chunk: list[int] = []
    numel = 0
    for i, p in enumerate(params):
        if chunk and numel + p.numel() > GATHER_CHUNK_NUMEL:
            _gathered_chunk(opt, group, *_pick(chunk, params, grads, states), foreach)
            chunk, numel = [], 0
        chunk.append(i)
        numel += p.numel()
    _gathered_chunk(opt, group, *_pick(chunk, params, grads, states), foreach)


def _pick(index: list[int], *lists: list[Any]) -> tuple[list[Any], ...]:
    return tuple([items[i] for i in index] for items in lists)


def _gathered_chunk(
    opt: MatrixOptimizer,
    group: dict[str, Any],
    params: list[Tensor],
    grads: list[Tensor],
    states: list[dict[str, Any]],
    foreach: bool,
) -> None:
    """:func:`gathered_matrix_step` for one chunk: gather, run the matrix rule on full tensors, write the shards back."""
    full_params = [_full(p) for p in params]
    full_grads = [_full(g) for g in grads]
    full_states = [{key: _full(value) for key, value in state.items()} for state in states]
    swap: dict[int, Tensor] = {}
    for p, fp, fg in zip(params, full_params, full_grads):
        if fp is not p:
            if fg.dtype == fp.dtype and fg.shape == fp.shape:  # (a reduce_dtype other than the parameter's: not set)
                fp.grad = fg
            fp._lightning_optim_source = p  # type: ignore[attr-defined]
            swap[id(p)] = fp
    saved = [g["params"] for g in opt.param_groups]
    for g in opt.param_groups:
        g["params"] = [swap.get(id(q), q) for q in g["params"]]
    try:
        opt._matrix_step(group, full_params, full_grads, full_states, foreach)
    finally:
        for g, kept in zip(opt.param_groups, saved):
            g["params"] = kept
    for p, fp, state, full_state in zip(params, full_params, states, full_states):
        if fp is not p:
            p.to_local().copy_(_local_shard(fp, p))
            fp.grad = None
        for key in [k for k in state if k not in full_state]:
            del state[key]
        for key, value in full_state.items():
            old = state.get(key)
            if is_dtensor(old):
                old.to_local().copy_(_local_shard(value, old))
            elif value is not old:
                state[key] = value
