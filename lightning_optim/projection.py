"""Low-rank projection machinery shared by the projected-state optimizers (GaLore; later Fira, APOLLO, FRUGAL).

A projector of a gradient matrix G (m × n) is a matrix P with r orthonormal columns, stored in one form for
both sides (``(m, r)`` for ``"left"``, ``(n, r)`` for ``"right"``):

- left:  R = Pᵀ G (r × n), back-projection P N (m × n);
- right: R = G P (m × r), back-projection N Pᵀ (m × n).

:func:`refresh_projector` computes P as the top-r singular vectors of G (SVD in fp32, fp64 for fp64
gradients) and never fails: when the SVD raises (non-convergence; on the CPU LAPACK also raises for a
non-finite input) it warns and falls back to the previous projector, or, when there is none, to a
randomized range finder (Halko, Martinsson & Tropp 2011) seeded from the global step, so that every DDP
rank computes the same P. Independently of any exception, the new P is only taken where G and the SVD
result are finite (decided on the device with ``torch.where``: no host sync), so a non-finite gradient
never produces a non-finite projector. :func:`gaussian_projection` and :func:`random_orthonormal` are the
seeded random projections (same seed, same matrix on every rank and device type).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from lightning_optim._base import StateSpec

__all__ = [
    "PROJ_TYPES",
    "ProjectedStateSpec",
    "gaussian_projection",
    "moment_shape",
    "project",
    "project_back",
    "projection_layout",
    "projection_seed",
    "projector_shape",
    "random_orthonormal",
    "range_finder",
    "refresh_projector",
    "top_singular_vectors",
]

#: projection sides: ``std`` projects the smaller dimension away (right when m >= n, as the GaLore
#: authors), ``reverse_std`` the larger one, ``left``/``right`` always that side
PROJ_TYPES = ("std", "reverse_std", "left", "right")
Side = Literal["left", "right"]


@dataclass(frozen=True)
class ProjectedStateSpec(StateSpec):
    """A :class:`~lightning_optim._base.StateSpec` whose moments may be low-rank, plus per-parameter buffers.

    Args:
        buffers: further per-parameter tensors the optimizer creates itself in their own shapes (the
            projection matrices): saved, loaded and never reset; absent for unprojected parameters.
        (the other fields as :class:`~lightning_optim._base.StateSpec`; the moments of a projected parameter
        have the projected shape, not the parameter's).
    """

    buffers: tuple[str, ...] = ()

    @property
    def keys(self) -> tuple[str, ...]:
        """Every key a full-precision state of one parameter may hold."""
        return (*self.moments, *self.counters, *self.scalars, *self.buffers)


# -- layout -----------------------------------------------------------------------------------------------
def projection_layout(shape: tuple[int, ...] | torch.Size, rank: int, proj_type: str) -> tuple[Side, int]:
    """(side, r) of the projection of a 2-D tensor: r = min(rank, m, n).

    Args:
        shape: (m, n).
        rank: the requested rank (clipped to min(m, n), as the authors' slicing ``U[:, :rank]`` does).
        proj_type: one of :data:`PROJ_TYPES`.
    """
    m, n = shape
    if proj_type == "std":
        side: Side = "right" if m >= n else "left"
    elif proj_type == "reverse_std":
        side = "left" if m >= n else "right"
    elif proj_type in ("left", "right"):
        side = proj_type  # type: ignore[assignment]
    else:
        raise ValueError(f"Invalid proj_type: {proj_type!r}; allowed values are {', '.join(map(repr, PROJ_TYPES))}.")
    return side, min(int(rank), m, n)


def moment_shape(shape: tuple[int, ...] | torch.Size, side: Side, r: int) -> tuple[int, int]:
    """Shape of R (and of the moments kept on it): (r, n) for left, (m, r) for right."""
    m, n = shape
    return (r, n) if side == "left" else (m, r)


def projector_shape(shape: tuple[int, ...] | torch.Size, side: Side, r: int) -> tuple[int, int]:
    """Shape of the stored projector: (m, r) for left, (n, r) for right."""
    m, n = shape
    return (m, r) if side == "left" else (n, r)


def project(grad: Tensor, projector: Tensor, side: Side) -> Tensor:
    """R = Pᵀ G (left) or G P (right)."""
    return projector.mT @ grad if side == "left" else grad @ projector


def project_back(low_rank: Tensor, projector: Tensor, side: Side) -> Tensor:
    """P N (left) or N Pᵀ (right): back to the parameter's shape."""
    return projector @ low_rank if side == "left" else low_rank @ projector.mT


# -- seeded random projections --------------------------------------------------------------------------------
def projection_seed(step: int, index: int, salt: int = 0) -> int:
    """A 63-bit seed from the global step and the parameter's index in the optimizer (same on every rank).

    Args:
        step: the 1-based global step.
        index: the parameter's position among all parameters of the optimizer.
        salt: distinguishes several random draws of one step.
    """
    return (int(step) * 1_000_003 + int(index) * 8191 + int(salt) * 131 + 0x5DEECE66D) % (2**63 - 1)


def gaussian_projection(rows: int, cols: int, seed: int, *, device: torch.device | str, dtype: torch.dtype) -> Tensor:
    """A (rows × cols) matrix of i.i.d. N(0, 1) entries drawn from ``seed`` (a CPU generator: the same matrix
    on every device and rank; one host-to-device copy, no sync)."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    return torch.randn(rows, cols, generator=gen, dtype=torch.float64).to(device=device, dtype=dtype)


def random_orthonormal(rows: int, cols: int, seed: int, *, device: torch.device | str, dtype: torch.dtype) -> Tensor:
    """A (rows × cols) matrix with orthonormal columns (cols <= rows): Q of the QR of a seeded Gaussian."""
    return torch.linalg.qr(gaussian_projection(rows, cols, seed, device=device, dtype=dtype)).Q


# -- top-r singular vectors and their fallbacks -------------------------------------------------------------
def _normalised(matrix: Tensor) -> Tensor:
    """G / max|G| (G where max|G| is 0): the same singular vectors, and no overflow inside the SVD for finite
    entries up to fp32's max. A non-finite G stays non-finite (so LAPACK still reports it)."""
    low, high = torch.aminmax(matrix)
    peak = torch.maximum(high, -low)
    return matrix / torch.where(peak > 0, peak, torch.ones_like(peak))


def top_singular_vectors(matrix: Tensor, r: int, side: Side) -> Tensor:
    """The top-r left (``(m, r)``) or right (``(n, r)``) singular vectors of ``matrix``; may raise.

    Args:
        matrix: G, fp32 or fp64.
        r: number of vectors (<= min(m, n)).
        side: ``"left"`` (columns of U) or ``"right"`` (rows of Vᴴ, returned as columns).
    """
    u, _, vh = torch.linalg.svd(_normalised(matrix), full_matrices=False)
    return u[:, :r] if side == "left" else vh[:r].mT


def range_finder(matrix: Tensor, r: int, side: Side, seed: int, power_iters: int = 1) -> Tensor:
    """A randomized range finder: orthonormal Q (``(m, r)`` left, ``(n, r)`` right) spanning approximately the
    top-r singular subspace of ``matrix``, with ``power_iters`` power iterations; never raises, always finite.

    Non-finite entries of the matrix are read as 0; a result that is still not finite (or a matrix that is
    all zero) leaves a seeded random orthonormal basis.

    Args:
        matrix: G.
        r: rank.
        side: which singular subspace.
        seed: seed of the Gaussian test matrix (:func:`projection_seed`).
        power_iters: number of power iterations (each one multiplies by G Gᵀ or Gᵀ G).
    """
    a = matrix if side == "left" else matrix.mT
    a = _normalised(torch.nan_to_num(a, nan=0.0, posinf=0.0, neginf=0.0))
    omega = gaussian_projection(a.shape[1], r, seed, device=a.device, dtype=a.dtype)
    q = torch.linalg.qr(a @ omega).Q
    for _ in range(power_iters):
        q = torch.linalg.qr(a @ torch.linalg.qr(a.mT @ q).Q).Q
    fallback = random_orthonormal(a.shape[0], r, seed, device=a.device, dtype=a.dtype)
    informative = torch.isfinite(q).all() & (a.abs().amax() > 0)
    return torch.where(informative, q, fallback)


def refresh_projector(
    grad: Tensor,
    r: int,
    side: Side,
    *,
    previous: Tensor | None,
    seed: int,
    owner: str = "optimizer",
) -> Tensor:
    """A new projector for ``grad``: its top-r singular vectors, or a fallback; never raises, always finite.

    When ``torch.linalg.svd`` raises (``LinAlgError``: no convergence, or a non-finite input on the CPU) a
    ``RuntimeWarning`` is issued and the fallback is used: ``previous`` when given (and of the right
    shape), else :func:`range_finder`. Without an exception the SVD result is used only where the gradient
    and the result are finite, else the same fallback (decided on the device, without a warning: reading
    the decision on the host would be a sync).

    Args:
        grad: G (fp32 or fp64).
        r: rank (<= min(m, n)).
        side: ``"left"`` or ``"right"``.
        previous: the projector in use so far (None at the first refresh).
        seed: seed of the range finder (:func:`projection_seed`).
        owner: name used in the warning.
    """
    m, n = grad.shape
    expected = projector_shape(grad.shape, side, r)
    if previous is not None and (tuple(previous.shape) != expected or previous.dtype != grad.dtype):
        previous = None

    def fallback() -> Tensor:
        return previous if previous is not None else range_finder(grad, r, side, seed)

    try:
        svd = top_singular_vectors(grad, r, side)
    except (torch.linalg.LinAlgError, RuntimeError) as error:
        used = "the previous projection" if previous is not None else "a randomized range finder"
        warnings.warn(
            f"{owner}: the SVD of a {m}x{n} gradient failed ({str(error).splitlines()[0]}); using {used} "
            "for this refresh instead.",
            RuntimeWarning,
            stacklevel=3,
        )
        return fallback().clone()
    ok = torch.isfinite(grad).all() & torch.isfinite(svd).all()
    return torch.where(ok, svd, fallback())
