"""Shared machinery of the matrix optimizers (Muon and its successors): orthogonalization, matrix views, the split.

- :func:`newton_schulz` orthogonalizes a matrix (or a batch of them) with the quintic Newton-Schulz
  iteration of Jordan et al.'s Muon, overflow-safe for finite inputs.
- :func:`matrix_view` gives the 2-D (or batched 3-D) view a matrix rule works on: a conv kernel
  (out, in, kh, kw) is viewed as (out, in·kh·kw), a per-expert weight (E, out, in) as E matrices.
- :func:`split_params` / :func:`matrix_param_groups` split a module's parameters between the matrix rule
  (hidden weight matrices) and an AdamW rule (embeddings, the output head, norms, biases, other 1-D
  tensors), as param groups that carry ``use_muon``.

Pure torch; no Lightning import.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

__all__ = [
    "NS_COEFFICIENTS",
    "HEAD_NAMES",
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

