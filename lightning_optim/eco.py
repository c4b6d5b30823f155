"""ECO: training without full-precision master weights (docs/algorithms.md#eco).

The weights are kept on a quantization grid (int8, int4 or fp8 e4m3 codes times a per-channel or per-group
scale) after every step, and the rounding error of each step is fed back into Adam's first moment so that
it is applied by the following steps instead of being lost.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_optim._base import StepCountedOptimizer, as_compute, write_back
from lightning_optim.functional import (
    adam_denom,
    adam_denoms_foreach,
    adam_moments_,
    adam_moments_foreach_,
    decoupled_decay_,
)
from lightning_optim.projection import ProjectedStateSpec, projection_seed
from lightning_optim.validation import check_betas, check_bool, check_choice, check_int, check_range

__all__ = ["ECO", "QuantizedWeight", "WEIGHT_FORMATS", "grid_quantize", "grouped_shape", "state_bytes"]

#: largest code magnitude of each weight format (symmetric grids: int codes in [-q, q], e4m3 values in [-448, 448])
WEIGHT_FORMATS: dict[str, float] = {"int8": 127.0, "int4": 7.0, "fp8_e4m3": 448.0}
ROUNDINGS = ("stochastic", "nearest")
_LOW_PRECISION = (torch.float16, torch.bfloat16)
_SEED_SALT = 0xEC0  # distinguishes ECO's rounding draws from other seeded draws of the same step and index


class QuantizedWeight(NamedTuple):
    """The deployable form of one ECO weight: ``codes * scale`` per group is exactly the parameter's value.

    ``codes`` has the parameter's shape (int8 integers for ``int8``/``int4``, one int4 code per int8;
    ``torch.float8_e4m3fn`` for ``fp8_e4m3``); ``scale`` has shape ``(shape[0], n_groups)``: one scale per
    output channel (row of the ``(shape[0], -1)`` view) and group of ``group_size`` entries along it.
    """

    codes: Tensor
    scale: Tensor
    group_size: int
    weight_format: str

    @property
    def nbytes(self) -> int:
        """Bytes to store it: one byte per code (int4 would pack two per byte: half of that) plus the scales."""
        code_bytes = self.codes.numel() if self.weight_format != "int4" else (self.codes.numel() + 1) // 2
        return code_bytes + self.scale.numel() * self.scale.element_size()


def grouped_shape(shape: torch.Size | tuple[int, ...], group_size: int | None) -> tuple[int, int, int]:
    """``(shape[0], n_groups, G)``: the grouped layout of a tensor of ``shape`` (see :func:`grid_quantize`)."""
    rows = shape[0]
    n = 1
    for d in shape[1:]:
        n *= d
    g = n if group_size is None or group_size >= n else group_size
    return rows, -(-n // g), g


def _grouped(x: Tensor, group_size: int | None) -> tuple[Tensor, int]:
    """``x`` as ``(shape[0], n_groups, G)`` (rows of the ``(shape[0], -1)`` view, the last group zero-padded:
    padding never changes a group's absmax) and the row length n."""
    rows = x.reshape(x.shape[0], -1)
    n = rows.shape[1]
    g = n if group_size is None or group_size >= n else group_size
    pad = (-n) % g
    if pad:
        rows = F.pad(rows, (0, pad))
    return rows.reshape(rows.shape[0], -1, g), n


def _ungrouped(groups: Tensor, n: int, shape: torch.Size) -> Tensor:
    return groups.reshape(groups.shape[0], -1)[:, :n].reshape(shape)


def _scales(groups: Tensor, q_max: float, power_of_two: bool) -> Tensor:
    """s = α/q_max per group (α = max |x| over the group's finite entries), or the smallest power of two
    >= α/q_max; 0 for an all-zero group. Finite for every finite input (α <= fp max, q_max >= 7)."""
    alpha = torch.nan_to_num(groups.abs(), nan=0.0, posinf=0.0).amax(dim=-1, keepdim=True)
    raw = alpha / q_max
    if not power_of_two:
        return raw
    mantissa, exponent = torch.frexp(raw)  # raw = mantissa·2^exponent, mantissa in [0.5, 1)
    up = torch.ldexp(torch.ones_like(raw), exponent)  # 2^exponent >= raw
    return torch.where(alpha > 0, torch.where(mantissa == 0.5, raw, up), torch.zeros_like(raw))


def _round_e4m3(y: Tensor, noise: Tensor | None) -> Tensor:
    """y (|y| <= 448) on the float8 e4m3 grid: to nearest (even), or up with probability (|y| − lo)/spacing."""
    if noise is None:
        return y.to(torch.float8_e4m3fn).to(y.dtype)
    a = y.abs()
    _, exponent = torch.frexp(a)  # a in [2^(exponent-1), 2^exponent)
    # e4m3: 3 mantissa bits; below 2^-6 the subnormals keep the spacing of 2^-6's binade
    spacing = torch.ldexp(torch.ones_like(a), (exponent - 1).clamp_(min=-6) - 3)
    t = a / spacing  # exact: spacing is a power of two
    low = t.floor()
    return torch.copysign((low + (noise < t - low).to(a.dtype)) * spacing, y)


def grid_quantize(
    x: Tensor,
    weight_format: str,
    group_size: int | None = None,
    noise: Tensor | None = None,
    power_of_two: bool = False,
) -> tuple[Tensor, Tensor]:
    """Symmetric quantization of ``x`` (``ndim >= 2``) on ECO's grid; returns (values, scale).

    Per output channel (row of the ``(shape[0], -1)`` view) and group of G = ``group_size`` entries along it
    (None: the whole row), s = max|x|/q_max (q_max = 127 for int8, 7 for int4, 448 for fp8 e4m3) or, with
    ``power_of_two``, the smallest power of two >= that. Codes: int, round(x/s) to nearest even (``noise``
    None) or floor(x/s + u) with ``noise`` u ~ U[0, 1) (stochastic rounding: unbiased), clamped to
    [−q_max, q_max]; fp8, x/s on the e4m3 grid, to nearest or stochastically between its two neighbours.
    ``values = codes * s`` in ``x.dtype`` (clamped to its finite range) and ``scale`` of shape
    ``(shape[0], n_groups)``. NaN entries stay NaN and do not enter the scale; an all-zero group has s = 0.

    Args:
        x: the tensor (the compute copy of a weight).
        weight_format: ``"int8"``, ``"int4"`` or ``"fp8_e4m3"``.
        group_size: entries per scale along a row (None: one scale per row).
        noise: uniform [0, 1) draws of the grouped shape ``(shape[0], n_groups, G)`` for stochastic
            rounding, or None for round-to-nearest.
        power_of_two: power-of-two scales (then every grid value is exact in bf16/fp16: codes have at most
            7 significant bits).
    """
    q_max = WEIGHT_FORMATS[weight_format]
    groups, n = _grouped(x, group_size)
    scale = _scales(groups, q_max, power_of_two)
    y = groups / torch.where(scale > 0, scale, torch.ones_like(scale))
    if weight_format == "fp8_e4m3":
        codes = _round_e4m3(y.clamp(-q_max, q_max), noise)
    else:
        codes = (y.round() if noise is None else (y + noise).floor_()).clamp_(-q_max, q_max)
    limit = torch.finfo(x.dtype).max
    values = (codes * scale).clamp_(-limit, limit)
    return _ungrouped(values, n, x.shape), scale.squeeze(-1)


class ECO(StepCountedOptimizer):
    r"""ECO: AdamW on weights kept quantized, with the quantization error fed back into the momentum.

    Nikdan, Zandieh, Alistarh & Mirrokni, "ECO: Quantized Training without Full-Precision Master
    Weights" (arXiv 2601.22101, 2026), Algorithm 3 (ECO with Adam). There is no full-precision master copy:
    the weight ŵ is on the grid Q, each step starts from it and ends on it again. For the per-parameter
    step t (1-based), bias corrections b1 = 1 − β1^t, b2 = 1 − β2^t:

    .. math::
        m \leftarrow \beta_1 m + (1-\beta_1) g,\quad v \leftarrow \beta_2 v + (1-\beta_2) g^2,\quad
        D = \sqrt{v}/\sqrt{b_2} + \epsilon \\
        \tilde w = \hat w (1 - \eta\lambda) - (\eta/b_1)\, m / D,\quad
        \hat w \leftarrow Q(\tilde w),\quad e = \tilde w - \hat w \\
        m \leftarrow m + (b_1/\eta)\,(1 - 1/\beta_1)\, D \odot e

    The last line is the error feedback: m is corrected so that the next steps apply what rounding took
    from this one (derived from the master-weight trajectory with the approximation e_t ≈ e_{t+1}, which
    spares storing e). Q: per output channel (row of the ``(shape[0], -1)`` view; ``group_size``: groups
    of G entries along it) the absmax scale s = max|w̃|/q_max, codes round(w̃/s) in int8 (q_max 127), int4
    (7) or the float8 e4m3 grid (s = max|w̃|/448), stochastic rounding by default (the paper's main
    setting) with draws seeded from the global step and the parameter's index
    (:func:`~lightning_optim.projection.projection_seed`: every DDP rank draws the same, and a resume
    continues bit for bit). After each step ``p`` holds exactly ``codes * scale``
    (:meth:`quantized_weight` returns them); the scales are in the state (``weight_scale``).

    Which tensors: every parameter with ``ndim >= 2`` (Linear/conv/embedding weights) is quantized; 0-/1-D
    ones (biases, norm gains) are stored in their own dtype: for fp32 that is plain AdamW (no error), for
    bf16/fp16 Q is the cast to that dtype, with the same feedback of its rounding error (no fp32 master copy
    either). bf16/fp16 matrices use power-of-two scales (the smallest 2^k >= max|w̃|/q_max), so that every
    grid value is exactly representable in the parameter's dtype; fp32/fp64 ones use the plain absmax scale.
    The update math runs in fp32 (fp64 for fp64 parameters); moments are fp32 for half-precision params.

    Memory, honestly: the optimizer state is Adam's m and v (8 bytes per parameter) plus one scale per
    row and group (4 bytes per G entries, G = row length by default), as the paper (no extra buffer for
    e). The parameters themselves stay ordinary ``nn.Parameter`` s of the model's dtype whose values lie on
    the grid; the weight memory is saved only where the weights are *stored* as codes + scales
    (:meth:`quantized_weight`, 1 byte per entry for int8/fp8 instead of 4 for an fp32 master copy plus 2
    for bf16 working weights). Within this package the saving is the absent master copy when training
    bf16 parameters, and the deployable checkpoint.

    Composes with :class:`~lightning_optim.callbacks.QuantizationAwareTraining`: with the same format and
    group size (QAT's ``fmt="int"``/``"fp8"``, ``bits=8``, ``group_size`` >= the row length or equal to
    ECO's ``group_size``) QAT's fake quantization of an ECO weight returns it up to one fp32 ulp (the
    scale recomputed from a grid value), so the forward runs on the stored weights; with another grid it
    quantizes them a second time. MomentumReset/SpikeGuard reset m and v exactly (state adapter from
    ``state_spec``); a reset drops the error not yet applied (at most about one grid step per weight).

    Args:
        params: parameters or param groups (every argument below may be overridden per group).
        lr: learning rate η (default 1e-3, torch AdamW's). A zero lr skips the feedback (its coefficient
            divides by η).
        betas: (β1, β2) (default (0.9, 0.999)); β1 must be > 0 with ``error_feedback`` (the coefficient
            has 1/β1).
        eps: ε added to √v̂ as torch Adam (default 1e-8).
        weight_decay: decoupled λ, w̃ = ŵ·(1 − ηλ) before the update (default 1e-2, torch AdamW's).
        weight_format: grid of the matrices: ``"int8"`` (default), ``"int4"`` or ``"fp8_e4m3"``.
        group_size: entries per scale along each output channel (default None: one scale per channel).
        rounding: ``"stochastic"`` (default, the paper's main setting) or ``"nearest"`` (round half to
            even; for hardware without stochastic rounding).
        error_feedback: feed e back into m (default True; False is the naive master-weight-free
            baseline of the paper, whose updates below half a grid step are lost).
        foreach: multi-tensor Adam math (default: on for CUDA params); the quantization runs per tensor.

    Deviations (see docs/algorithms.md#eco): no authors' code was available, the equations follow the
    paper's Algorithm 3 as published; the error-feedback product is computed as ((coefficient·e)·D) and
    dropped where it is not finite (D = inf when v overflowed, where the Adam step itself is 0), so a
    finite gradient never gives a non-finite momentum or weight; the scale ignores NaN entries (a NaN
    gradient entry spoils only its own weight, not its row); power-of-two scales for bf16/fp16 matrices;
    the initial weights are put on the grid by the first step (not before it). State per parameter:
    ``exp_avg``, ``exp_avg_sq`` (fp32 for bf16/fp16 params), ``step`` (CPU float32) and, for quantized
    matrices, ``weight_scale`` (``(shape[0], n_groups)``, fp32; fp64 for fp64 params).
    """

    state_spec = ProjectedStateSpec(
        moments={"exp_avg": True, "exp_avg_sq": False},
        first_moment="exp_avg",
        second_moment="exp_avg_sq",
        buffers=("weight_scale",),
    )

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        weight_format: Literal["int8", "int4", "fp8_e4m3"] = "int8",
        group_size: int | None = None,
        rounding: Literal["stochastic", "nearest"] = "stochastic",
        error_feedback: bool = True,
        *,
        foreach: bool | None = None,
    ) -> None:
        defaults = dict(
            lr=lr,
            betas=tuple(betas),
            eps=eps,
            weight_decay=weight_decay,
            weight_format=weight_format,
            group_size=group_size,
            rounding=rounding,
            error_feedback=error_feedback,
            foreach=foreach,
        )
        super().__init__(params, defaults)

    def _validate_group(self, group: dict[str, Any]) -> None:
        check_range("lr", group["lr"], 0.0)
        check_betas(group["betas"])
        check_range("eps", group["eps"], 0.0)
        check_range("weight_decay", group["weight_decay"], 0.0)
        check_choice("weight_format", group["weight_format"], tuple(WEIGHT_FORMATS))
        if group["group_size"] is not None:
            check_int("group_size", group["group_size"], 1)
        check_choice("rounding", group["rounding"], ROUNDINGS)
        check_bool("error_feedback", group["error_feedback"])
        if group["error_feedback"]:
            check_range("betas (beta1)", group["betas"][0], 0.0, 1.0, low_open=True, high_open=True)

    # -- quantization ----------------------------------------------------------------------------------
    def _noise(self, shape: tuple[int, ...], like: Tensor, seed: int) -> Tensor:
        """U[0, 1) draws of ``shape`` in ``like``'s dtype from a generator on its device seeded with ``seed``."""
        generators = self.__dict__.setdefault("_generators", {})
        device = like.device
        if device not in generators:
            generators[device] = torch.Generator(device=device)
        gen = generators[device].manual_seed(seed)
        return torch.rand(shape, generator=gen, dtype=like.dtype, device=device)

    def _quantize(self, p: Tensor, w: Tensor, state: dict[str, Any], group: dict[str, Any], seed: int) -> Tensor:
        """Q(w̃) for parameter ``p`` (``w`` its compute copy), as a new tensor in ``w``'s dtype; stores the scale."""
        if p.dim() >= 2:
            noise = None
            if group["rounding"] == "stochastic":
                noise = self._noise(grouped_shape(w.shape, group["group_size"]), w, seed)
            values, scale = grid_quantize(
                w, group["weight_format"], group["group_size"], noise, power_of_two=p.dtype in _LOW_PRECISION
            )
            state["weight_scale"] = scale
        else:
            values = w
        if p.dtype != w.dtype:  # what p can hold (exact for grid values; the rounding itself for 0-/1-D)
            values = values.to(p.dtype).to(w.dtype)
        return values

    def quantized_weight(self, p: Tensor) -> QuantizedWeight:
        """``p``'s codes and scales (``codes * scale`` per group is exactly ``p``); ``p`` must be a quantized
        matrix (``ndim >= 2``) that has been stepped at least once.

        Args:
            p: a parameter of this optimizer.
        """
        state = self.state.get(p, {})
        if p.dim() < 2 or "weight_scale" not in state:
            raise ValueError("quantized_weight needs a parameter with ndim >= 2 that ECO has stepped at least once.")
        group = next(g for g in self.param_groups if any(q is p for q in g["params"]))
        scale = state["weight_scale"]
        groups, n = _grouped(p.detach().to(scale.dtype), group["group_size"])
        y = groups / torch.where(scale > 0, scale, torch.ones_like(scale)).unsqueeze(-1)
        if group["weight_format"] == "fp8_e4m3":
            codes = y.to(torch.float8_e4m3fn)
        else:
            codes = y.round().to(torch.int8)
        g = groups.shape[-1]
        return QuantizedWeight(_ungrouped(codes, n, p.shape), scale, g, group["weight_format"])

    # -- stepping ---------------------------------------------------------------------------------------
    def _step(self, step: int) -> None:
        index = 0  # position of a parameter among all the optimizer's parameters: seeds its rounding draws
        for group in self.param_groups:
            position = {id(p): index + i for i, p in enumerate(group["params"])}
            index += len(group["params"])
            params = self._params_with_grad(group, "ECO")
            if not params:
                continue
            states = [self._init_state(p, group) for p in params]
            seeds = [projection_seed(step, position[id(p)], _SEED_SALT) for p in params]
            if self._use_foreach(group, params):
                self._foreach_step(group, params, states, seeds)
            else:
                self._single_tensor_step(group, params, states, seeds)

    def _feedback_coefficient(self, group: dict[str, Any], count: float) -> float | None:
        """(b1/η)(1 − 1/β1), or None when there is no feedback (off, or η = 0)."""
        beta1 = group["betas"][0]
        if not group["error_feedback"] or group["lr"] == 0:
            return None
        return (1 - beta1**count) / group["lr"] * (1 - 1 / beta1)

    @staticmethod
    def _has_error(p: Tensor) -> bool:
        """Whether Q can move ``p`` (quantized matrices; 0-/1-D params in bf16/fp16); fp32 vectors: never."""
        return p.dim() >= 2 or p.dtype in _LOW_PRECISION

    def _single_tensor_step(
        self, group: dict[str, Any], params: list[Tensor], states: list[dict[str, Any]], seeds: list[int]
    ) -> None:
        """Reference path: the equations one parameter at a time."""
        lr, (beta1, beta2), eps = group["lr"], group["betas"], group["eps"]
        for p, state, seed in zip(params, states, seeds):
            state["step"] += 1
            count = state["step"].item()  # CPU counter: no sync
            exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
            w, g = as_compute([p, p.grad])
            adam_moments_(exp_avg, exp_avg_sq, g, beta1, beta2)
            decoupled_decay_(w, lr, group["weight_decay"])
            denom = adam_denom(exp_avg_sq, count, beta2, eps)
            w.addcdiv_(exp_avg, denom, value=-(lr / (1 - beta1**count)))
            quantized = self._quantize(p, w, state, group, seed)
            coefficient = self._feedback_coefficient(group, count)
            if coefficient is not None and self._has_error(p):
                injected = torch.sub(w, quantized).mul_(coefficient).mul_(denom)
                exp_avg.add_(torch.nan_to_num_(injected, nan=0.0, posinf=0.0, neginf=0.0))
            w.copy_(quantized)
            write_back([p], [w])

    def _foreach_step(
        self, group: dict[str, Any], params: list[Tensor], states: list[dict[str, Any]], seeds: list[int]
    ) -> None:
        """Multi-tensor path (grouped by device and dtype): the same operations as the reference path on
        lists, so both give the same bits; the quantization itself runs per tensor (per-row reductions)."""
        lr, (beta1, beta2), eps = group["lr"], group["betas"], group["eps"]
        lists = [params, [p.grad for p in params], [s["exp_avg"] for s in states], [s["exp_avg_sq"] for s in states]]
        grouped = self._group_tensors_by_device_and_dtype(lists, with_indices=True)
        for (dev_params, dev_grads, exp_avgs, exp_avg_sqs), indices in grouped.values():
            dev_states = [states[i] for i in indices]
            steps = [s["step"] for s in dev_states]
            torch._foreach_add_(steps, 1.0)
            counts = [t.item() for t in steps]  # CPU tensors: no device sync
            ws, gs = as_compute(dev_params), as_compute(dev_grads)
            adam_moments_foreach_(exp_avgs, exp_avg_sqs, gs, beta1, beta2)
            decoupled_decay_(ws, lr, group["weight_decay"])
            denoms = adam_denoms_foreach(exp_avg_sqs, counts, beta2, eps)
            torch._foreach_addcdiv_(ws, exp_avgs, denoms, [-(lr / (1 - beta1**t)) for t in counts])
            quantized = [
                self._quantize(p, w, state, group, seeds[i])
                for p, w, state, i in zip(dev_params, ws, dev_states, indices)
            ]
            feedback = [
                (j, c)
                for j, (p, t) in enumerate(zip(dev_params, counts))
                if self._has_error(p) and (c := self._feedback_coefficient(group, t)) is not None
            ]
            if feedback:
                picked = [j for j, _ in feedback]
                injected = torch._foreach_sub([ws[j] for j in picked], [quantized[j] for j in picked])
                torch._foreach_mul_(injected, [c for _, c in feedback])
                torch._foreach_mul_(injected, [denoms[j] for j in picked])
                for t in injected:
                    torch.nan_to_num_(t, nan=0.0, posinf=0.0, neginf=0.0)
                torch._foreach_add_([exp_avgs[j] for j in picked], injected)
            torch._foreach_copy_(ws, quantized)
            write_back(dev_params, ws)


def state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Sum of ``nbytes`` of every tensor in ``optimizer.state`` (moments, counters, scales)."""
    return sum(v.nbytes for s in optimizer.state.values() for v in s.values() if isinstance(v, Tensor))

