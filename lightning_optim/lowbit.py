"""Block-wise dynamic 8-bit storage of optimizer moments (docs/low_bit_and_qat.md, part A).

Quantizer. A tensor x is stored as ``codes`` (uint8, the shape of x) and ``absmax`` (fp32, one per block
of 256 elements): x̂ = map[code]·absmax of the code's block. The maps are the "dynamic tree" maps of
Dettmers et al. (arXiv 2110.02861), equal bit for bit to bitsandbytes' ``create_dynamic_map``: signed for
first moments, unsigned for second moments. Rounding is to the nearest map value, ties to the larger one.

Non-finite entries cost only their own entry: a block's absmax N_b is the largest *finite* |x|, so the
other entries round as if the bad one were absent. The bad entry itself saturates: +inf stores the map's
largest value (+N_b), -inf its smallest (-0.99296874·N_b signed, 0 unsigned), and NaN the code of 0 (it
dequantizes to exactly 0). A block with no finite non-zero entry has N_b = 0 and dequantizes to zeros.

Second moments are stored in the square-root domain (layout 2). The dynamic map spans about seven decades
below a block's maximum; v = EMA(g²) spans twice as many decades as m = EMA(g) for the same gradients,
so in the linear layout (layout 1) an entry whose gradients are 10⁻⁴ of the block's largest kept m̂ ≠ 0
but rounded v to 0, and Adam then stepped by m̂/ε: an embedding row that sees gradients only now and then,
next to a row that sees large ones every step, moved by ~10³·lr. Storing s = √v with the unsigned map
gives v the dynamic range and the relative precision that m has (s scales like |g|, as m does), and s is
what Adam divides by. Besides, a positive s never rounds to 0: it rounds up to the smallest positive map
value, so an underflow over-estimates the denominator (a smaller, safe step) instead of dividing by ε;
exact zeros (fresh or reset state, rows that never had a gradient) stay exact zeros. Dequantizing gives
v̂ = (map[code]·N_b)², whose fp32 square root is map[code]·N_b again, so requantizing an unchanged v̂ gives
the same codes. The layout costs nothing extra: 2 + 2·4/256 = 2.03 bytes per parameter for Adam's two
moments instead of 8, and the layout version is a Python int in the state.

Optimizer state layout: ``<key>_codes`` and ``<key>_absmax`` replace ``<key>``; an unsigned (second)
moment also has ``<key>_layout = 2`` (:data:`SQRT_LAYOUT`). Maps are constants and are never saved.
Checkpoints written before the square-root layout have no ``<key>_layout``: they are read in the linear
layout and rewritten in the square-root layout by the next store (see :func:`moment_layout`). A moment is
stored in 8 bits iff its group has ``state_bits=8`` and the parameter has at least :data:`MIN_8BIT_SIZE`
elements.

Resets (:func:`reset_moment_`, used by the optimizers and by the state adapters) write the map's zero code
and absmax 0: the same state as a fresh moment, exactly +0 even where a block's absmax had become Inf/NaN.

Speed. Nearest rounding is a table lookup on the top 16 bits of y = x/N_b (sign, exponent and 7 mantissa
bits): each such bucket of floats holds at most one decision threshold t of the dynamic maps, so
code = first_code[bucket] + (y >= t[bucket]), exactly what a ``searchsorted`` over the 255 thresholds
gives (a map without that property falls back to ``searchsorted``). On the CPU, tensors are processed
in chunks of 2^18 elements, so the temporaries stay in cache and are reused by the allocator. Measured
on 4M fp32 entries, one CPU thread: quantize ~40 ms (``searchsorted``: ~320 ms), dequantize ~10 ms.
The bitsandbytes 0.50 CPU quantizer is not used: it is not nearest rounding (codes off by up to 6 in about
0.3% of entries, and every |y| below ~2·10⁻⁵, zeros included, comes back as ±2.125·10⁻⁵·N_b). Its CPU
dequantize gives the same values and is ~2x faster, but saves only a few ms per tensor against an import
of bitsandbytes on the step path (seconds). Everything here is pure torch and sync-free on the step path.
"""

from __future__ import annotations

import functools
import math
import sys
import warnings
import weakref
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "BLOCK_SIZE",
    "LINEAR_LAYOUT",
    "MIN_8BIT_SIZE",
    "SQRT_LAYOUT",
    "check_mask",
    "dequantize_blockwise",
    "dequantize_moment",
    "dynamic_map",
    "moment_layout",
    "quantize_blockwise",
    "quantize_moment",
    "quantized_keys",
    "reset_moment_",
    "warn_if_embedding_like",
    "zero_code",
]

BLOCK_SIZE = 256
MIN_8BIT_SIZE = 4096  # smaller tensors keep fp32 moments (bitsandbytes' min_8bit_size)
LINEAR_LAYOUT = 1  # x̂ = map[code]·absmax (all signed moments; unsigned ones saved before layout 2)
SQRT_LAYOUT = 2  # unsigned moments: √v is quantized, v̂ = (map[code]·absmax)²
_ZERO_CODE = {True: 127, False: 0}
_BUCKET_SHIFT = 16  # a lookup bucket is the top 16 bits of a float32: sign, exponent, 7 mantissa bits
_CPU_CHUNK = 1 << 18  # elements per pass on the CPU (see _chunk)


def dynamic_map(signed: bool) -> Tensor:
    """The 256 sorted float32 values of the dynamic tree map (a fresh CPU tensor).

    signed = {±10^(i−6)·(b_j + b_(j+1))/2 : i = 0…6, b = linspace(0.1, 1, 2^i + 1)} ∪ {0, 1};
    unsigned uses 2^(i+1) + 1 points and no negatives. Computed in float32 like bitsandbytes, so the
    values are bit-identical to ``bitsandbytes.functional.create_dynamic_map(signed)``.
    """
    parts = [torch.tensor([0.0, 1.0], dtype=torch.float32)]
    for i in range(7):
        bounds = torch.linspace(0.1, 1, (2**i if signed else 2 ** (i + 1)) + 1, dtype=torch.float32)
        means = (10 ** (i - 6)) * ((bounds[:-1] + bounds[1:]) / 2.0)
        parts += [means, -means] if signed else [means]
    return torch.cat(parts).sort().values


def zero_code(signed: bool) -> int:
    """Index of the exact 0 in the signed (127) or unsigned (0) map: the code a reset writes."""
    return _ZERO_CODE[signed]


# -- rounding tables -------------------------------------------------------------------------------------
def _round_up_thresholds(qmap: Tensor) -> Tensor:
    """Decision thresholds of nearest rounding with ties to the larger value, as float32 on the CPU.

    The exact midpoint of two neighbours, computed in float64, is rounded up to the next float32: a
    float32 y then lies at or above the threshold iff it is at or above the exact midpoint, so
    ``searchsorted(thresholds, y, right=True)`` is exact nearest rounding with ties up.
    """
    q = qmap.detach().to(device="cpu", dtype=torch.float64)
    mid = (q[:-1] + q[1:]) / 2
    t = mid.to(torch.float32)
    below = t.double() < mid
    return torch.where(below, torch.nextafter(t, torch.full_like(t, math.inf)), t)


def _bucket_ends() -> tuple[Tensor, Tensor]:
    """The smallest and largest float32 value of each of the 2^16 buckets (NaN for the NaN buckets)."""
    top = torch.arange(1 << 16, dtype=torch.int64) << _BUCKET_SHIFT
    first = top.to(torch.int32).view(torch.float32)  # mantissa tail 0: the smallest magnitude
    last = (top | ((1 << _BUCKET_SHIFT) - 1)).to(torch.int32).view(torch.float32)  # the largest magnitude
    negative = torch.signbit(first)
    return torch.where(negative, last, first), torch.where(negative, first, last)


def _lookup_tables(qmap: Tensor, thresholds: Tensor, positive_floor: bool) -> tuple[Tensor, Tensor] | None:
    """(first code, bound) per bucket, such that code(y) = first + (y > bound); None if impossible.

    first[b] is the code of the bucket's smallest value; bound[b] is the float32 just below the one
    decision threshold t inside the bucket (y >= t iff y > bound; ``gt`` is cheaper than ``ge``), or
    FLT_MAX if the bucket holds none. A map with two thresholds in one bucket (none of the dynamic maps)
    cannot use the table. ``positive_floor``: codes of positive values are raised to the map's smallest
    positive value. ±inf have buckets of their own (0x7F80, 0xFF80) and get the codes of ±1; a NaN made
    by arithmetic has its quiet bit set, so it falls in the other exponent-255 buckets: the code of 0.
    """
    low, high = _bucket_ends()
    search = functools.partial(torch.searchsorted, thresholds, right=True)
    first, last = search(low), search(high)
    if positive_floor:
        floor = _first_positive(qmap)
        positive = high > 0  # bucket 0 holds +0 and the smallest subnormals: only its high end is > 0
        last = torch.where(positive, last.clamp_min(floor), last)
        first = torch.where(positive & (low > 0), first.clamp_min(floor), first)
    finite = torch.isfinite(low) & torch.isfinite(high)
    plus_one, minus_one = (int(search(torch.tensor(v))) for v in (1.0, -1.0))
    if ((last - first)[finite] > 1).any() or plus_one == 0:
        return None
    padded = torch.cat([thresholds, thresholds.new_tensor([math.inf])])
    threshold = torch.where(last > first, padded[first.clamp_max(len(thresholds))], math.inf)
    if positive_floor:  # bucket 0: +0 keeps its code, a positive subnormal is raised to the floor
        threshold = torch.where((low <= 0) & (high > 0) & (last > first), high.new_tensor(1e-45), threshold)
    bound = torch.nextafter(threshold, torch.full_like(threshold, -math.inf))  # +inf -> FLT_MAX: never
    first = torch.where(finite, first, int(search(torch.zeros(()))))
    bound = torch.where(finite, bound, torch.finfo(torch.float32).max)
    first[0x7F80] = plus_one - 1  # +inf > FLT_MAX adds the 1
    first[0xFF80] = minus_one
    return first.to(torch.uint8), bound.to(torch.float32)


def _first_positive(qmap: Tensor) -> int:
    """Index of the smallest positive value of a sorted CPU map."""
    return int(torch.searchsorted(qmap, torch.zeros(()), right=True))


class _Rounding:
    """Nearest-rounding tables of one map on its device: thresholds, and the bucket tables if they apply.

    Built from a CPU copy of the map (``source``; the constant maps keep theirs, a user map on an
    accelerator is read once on the host), then moved to the map's device once.
    """

    def __init__(self, qmap: Tensor, source: Tensor | None = None) -> None:
        self.qmap, self.version = qmap, qmap._version  # the entry keeps qmap alive: its address stays unique
        self.source = (qmap if source is None else source).detach().to(device="cpu", dtype=torch.float32)
        self.thresholds = _round_up_thresholds(self.source)
        self.first_positive = _first_positive(self.source)
        self.device_thresholds = self.thresholds.to(qmap.device)
        self._tables: dict[bool, tuple[Tensor, Tensor] | None] = {}

    def tables(self, positive_floor: bool) -> tuple[Tensor, Tensor] | None:
        """(first code, bound) bucket tables on the map's device; None if this map cannot use them."""
        if positive_floor not in self._tables:
            tables = _lookup_tables(self.source, self.thresholds, positive_floor)
            self._tables[positive_floor] = None if tables is None else tuple(t.to(self.qmap.device) for t in tables)
        return self._tables[positive_floor]


# (data_ptr, device) -> rounding tables of that map, built on first quantization
_ROUNDING: dict[tuple[int, torch.device], _Rounding] = {}
# (signed, device) -> the constant map on that device, and id of such a map -> its CPU original
_MAPS: dict[tuple[bool, torch.device], Tensor] = {}
_SOURCES: dict[int, Tensor] = {}


def device_map(signed: bool, device: torch.device | str) -> Tensor:
    """The dynamic map on ``device``, cached, for use on the step path (never read back to the host)."""
    device = torch.device(device)
    key = (signed, device)
    if key not in _MAPS:
        source = dynamic_map(signed)
        _MAPS[key] = qmap = source.to(device)
        _SOURCES[id(qmap)] = source  # _MAPS keeps qmap alive: its id stays unique
    return _MAPS[key]


def _rounding(qmap: Tensor) -> _Rounding:
    """Rounding tables of ``qmap`` from the cache, built on first use (no device read for the constant maps)."""
    key = (qmap.data_ptr(), qmap.device)
    hit = _ROUNDING.get(key)
    if hit is not None and hit.qmap is qmap and hit.version == qmap._version:
        return hit
    if len(_ROUNDING) >= 64:  # bounded: keep the constant maps' tables, drop user maps'
        for k in [k for k, v in _ROUNDING.items() if id(v.qmap) not in _SOURCES]:
            del _ROUNDING[k]
    source = _SOURCES.get(id(qmap)) if qmap._version == 0 else None
    _ROUNDING[key] = entry = _Rounding(qmap, source)
    return entry


def _thresholds(qmap: Tensor) -> Tensor:
    """Decision thresholds of ``qmap`` on its device (cached)."""
    return _rounding(qmap).device_thresholds


# -- quantize / dequantize ---------------------------------------------------------------------------------
def _num_blocks(n: int, block_size: int) -> int:
    return -(-n // block_size)


def _finite_absmax(view: Tensor, nonnegative: bool, out: Tensor | None) -> tuple[Tensor, Tensor]:
    """(per-row max of |x| over the finite entries, a scratch tensor shaped like ``view``).

    One Inf/NaN cannot poison a row's maximum; a row without finite non-zero entries gets 0.
    ``nonnegative``: x is known to be >= 0 or NaN (√v), so |x| needs no pass of its own.
    """
    if nonnegative:
        scratch = view.nan_to_num(nan=0.0, posinf=0.0, neginf=0.0)
        return torch.amax(scratch, dim=1, out=out).abs_(), scratch  # abs_: √(-0.0) is -0.0
    scratch = view.abs().nan_to_num_(nan=0.0, posinf=0.0)
    return torch.amax(scratch, dim=1, out=out), scratch


def _codes(y: Tensor, rounding: _Rounding, positive_floor: bool, out: Tensor | None) -> Tensor:
    """uint8 codes of the flat fp32 ``y`` (finite values in [-1, 1], ±inf, NaN): nearest, ties up."""
    tables = rounding.tables(positive_floor)
    if tables is None:  # a map the bucket tables cannot serve
        y = y.nan_to_num(nan=0.0, posinf=1.0, neginf=-1.0)
        codes = torch.searchsorted(rounding.device_thresholds, y, right=True, out_int32=True)
        if positive_floor:
            codes = torch.where((y > 0) & (codes < rounding.first_positive), rounding.first_positive, codes)
        return codes.to(torch.uint8) if out is None else out.copy_(codes)
    first, bound = tables
    bucket = y.view(torch.int32).bitwise_right_shift(_BUCKET_SHIFT).bitwise_and_(0xFFFF)
    codes = torch.index_select(first, 0, bucket, out=out)
    return codes.add_(y > bound.index_select(0, bucket))


def _chunk(device: torch.device, n: int, block_size: int) -> int:
    """Elements per pass: on the CPU about 2^18 (whole blocks), so the temporaries (~1 MB) stay in cache
    and the allocator reuses them; elsewhere the whole tensor (one kernel per op)."""
    if device.type != "cpu" or n <= _CPU_CHUNK:
        return max(n, 1)
    return max(block_size, _CPU_CHUNK // block_size * block_size)


def _quantize_chunk(
    flat: Tensor,
    rounding: _Rounding,
    block_size: int,
    positive_floor: bool,
    nonnegative: bool,
    codes: Tensor,
    absmax: Tensor,
) -> None:
    """Quantize the flat fp32 ``flat`` into ``codes`` (uint8, same length) and ``absmax`` (its blocks)."""
    n = flat.numel()
    blocks = _num_blocks(n, block_size)
    padded = blocks * block_size != n
    if padded:  # the last block is shorter: pad with zeros, which never raise N_b
        flat = torch.nn.functional.pad(flat, (0, blocks * block_size - n))
    view = flat.view(blocks, block_size)
    absmax, scratch = _finite_absmax(view, nonnegative, absmax)
    # ±inf/N_b stays ±inf and NaN stays NaN: _codes saturates the one and stores 0 for the other. A block
    # without a finite non-zero entry is divided by +inf: its zeros stay zeros and its ±inf become NaN,
    # so the whole block stores the zero code and reads as +0 (not -0.99·0 = -0).
    y = torch.div(view, torch.where(absmax > 0, absmax, math.inf).unsqueeze(1), out=scratch).view(-1)
    if padded:
        codes.copy_(_codes(y, rounding, positive_floor, None)[:n])
    else:
        _codes(y, rounding, positive_floor, codes)


def _quantize(
    x: Tensor,
    qmap: Tensor,
    block_size: int,
    *,
    positive_floor: bool = False,
    nonnegative: bool = False,
    out: tuple[Tensor, Tensor] | None = None,
) -> tuple[Tensor, Tensor]:
    """:func:`quantize_blockwise`, optionally written into ``out`` = (codes, absmax), e.g. the state's own."""
    n = x.numel()
    flat = x.detach().reshape(-1).float()
    if out is None:
        out = (
            torch.empty(x.shape, dtype=torch.uint8, device=x.device),
            torch.empty(_num_blocks(n, block_size), dtype=torch.float32, device=x.device),
        )
    codes, absmax = out
    direct = codes.is_contiguous()  # else quantize into a temporary and copy
    flat_codes = codes.view(-1) if direct else torch.empty(n, dtype=torch.uint8, device=x.device)
    rounding = _rounding(qmap)
    step = _chunk(x.device, n, block_size)
    for start in range(0, n, step):
        stop = min(n, start + step)
        block_range = slice(start // block_size, _num_blocks(stop, block_size))
        _quantize_chunk(
            flat[start:stop], rounding, block_size, positive_floor, nonnegative,
            flat_codes[start:stop], absmax[block_range],
        )
    if not direct:
        codes.copy_(flat_codes.view(codes.shape))
    return codes, absmax


def quantize_blockwise(
    x: Tensor, qmap: Tensor, block_size: int = BLOCK_SIZE, *, positive_floor: bool = False
) -> tuple[Tensor, Tensor]:
    """Block-wise quantization of ``x``: (codes uint8 shaped like x, absmax fp32 of ⌈n/B⌉ blocks).

    Per block N_b = max|x| over its finite entries (fp32), y = x/N_b (0 where N_b = 0), code = index of
    the map value nearest to y, ties to the larger value. Non-finite entries: ±inf → the map's largest /
    smallest value (y = ±1), NaN → the value nearest 0 (the exact 0 of the dynamic maps); in a block
    with N_b = 0 every entry gets the code of 0. Sync-free: shapes come from metadata only.

    Args:
        x: the tensor (any float dtype; computed in fp32).
        qmap: 256 sorted float32 map values, on x's device.
        block_size: elements per absmax block (the last block may be shorter).
        positive_floor: positive entries never get a code whose value is <= 0; they round up to the
            map's smallest positive value at least (used for √v, where under-estimating is unsafe).
    """
    return _quantize(x, qmap, block_size, positive_floor=positive_floor)


def _dequantize(codes: Tensor, absmax: Tensor, qmap: Tensor, block_size: int, square: bool) -> Tensor:
    """map[code]·N_b per block (then squared for the √ layout), one cache-sized chunk at a time on the CPU."""
    n = codes.numel()
    flat = codes.reshape(-1)
    out = torch.empty(n, dtype=qmap.dtype, device=codes.device)
    step = _chunk(codes.device, n, block_size)
    for start in range(0, n, step):
        stop = min(n, start + step)
        # int32 indices: cheaper to make than int64
        values = torch.index_select(qmap, 0, flat[start:stop].int(), out=out[start:stop])
        scales = absmax[start // block_size : _num_blocks(stop, block_size)]
        full = (stop - start) // block_size * block_size
        if full:
            values[:full].view(-1, block_size).mul_(scales[: full // block_size].unsqueeze(1))
        if full != stop - start:  # the short last block
            values[full:].mul_(scales[full // block_size :])
        if square:
            values.square_()
    return out.view(codes.shape)


def dequantize_blockwise(codes: Tensor, absmax: Tensor, qmap: Tensor, block_size: int = BLOCK_SIZE) -> Tensor:
    """x̂ = map[code]·N_b of the code's block, in fp32 and the shape of ``codes`` (sync-free)."""
    return _dequantize(codes, absmax, qmap, block_size, square=False)


# -- moment encodings ----------------------------------------------------------------------------------------
def quantize_moment(
    value: Tensor, signed: bool, *, out: tuple[Tensor, Tensor] | None = None, scratch: bool = False
) -> tuple[Tensor, Tensor]:
    """(codes, absmax) of a moment in the current layout: signed map on m; unsigned map on √v, floored.

    Args:
        value: the moment (fp32 working copy, or any float tensor).
        signed: first moment (signed map) or second moment (√ with the unsigned map).
        out: (codes, absmax) tensors to write into, e.g. the state's own.
        scratch: ``value`` is a working copy about to be dropped: √v may overwrite it.
    """
    qmap = device_map(signed, value.device)
    if signed:
        return _quantize(value, qmap, BLOCK_SIZE, out=out)
    # √ of a negative v (never made by an optimizer) is NaN, which stores 0
    in_place = scratch and value.dtype == torch.float32 and value.is_contiguous()
    root = value.detach().sqrt_() if in_place else value.detach().float().sqrt()
    return _quantize(root, qmap, BLOCK_SIZE, positive_floor=True, nonnegative=True, out=out)


def dequantize_moment(codes: Tensor, absmax: Tensor, signed: bool, layout: int = SQRT_LAYOUT) -> Tensor:
    """fp32 value of a moment stored by :func:`quantize_moment` (``layout`` applies to unsigned moments)."""
    square = not signed and layout != LINEAR_LAYOUT
    return _dequantize(codes, absmax, device_map(signed, codes.device), BLOCK_SIZE, square)


def moment_layout(state: dict[str, Any], key: str, signed: bool) -> int:
    """Layout of 8-bit moment ``key``: :data:`SQRT_LAYOUT` for unsigned moments written by this version,
    :data:`LINEAR_LAYOUT` for signed moments and for unsigned ones saved before (no ``<key>_layout``)."""
    return LINEAR_LAYOUT if signed else state.get(f"{key}_layout", LINEAR_LAYOUT)


# -- optimizer state helpers -----------------------------------------------------------------------------
def is_low_bit(group: dict[str, Any], param: Tensor) -> bool:
    """Whether ``param``'s moments are stored in 8 bits: group state_bits = 8 and >= 4096 elements."""
    return group.get("state_bits", 32) == 8 and param.numel() >= MIN_8BIT_SIZE


def is_quantized(state: dict[str, Any], key: str) -> bool:
    """Whether moment ``key`` of this per-parameter state is in the 8-bit layout."""
    return f"{key}_codes" in state


def quantized_keys(key: str, signed: bool) -> tuple[str, ...]:
    """The state keys that replace moment ``key`` in the 8-bit layout: codes, absmax, and for an unsigned
    (second) moment its layout version (a Python int)."""
    return (f"{key}_codes", f"{key}_absmax") if signed else (f"{key}_codes", f"{key}_absmax", f"{key}_layout")


def _set_layout(state: dict[str, Any], key: str, signed: bool) -> None:
    if not signed:
        state[f"{key}_layout"] = SQRT_LAYOUT


def init_moment(state: dict[str, Any], key: str, signed: bool, param: Tensor) -> None:
    """Create moment ``key`` as exact zeros in the 8-bit layout: zero codes, absmax 0."""
    state[f"{key}_codes"] = torch.full(param.shape, zero_code(signed), dtype=torch.uint8, device=param.device)
    state[f"{key}_absmax"] = torch.zeros(
        _num_blocks(param.numel(), BLOCK_SIZE), dtype=torch.float32, device=param.device
    )
    _set_layout(state, key, signed)


def load_moment(state: dict[str, Any], key: str, signed: bool, dtype: torch.dtype = torch.float32) -> Tensor:
    """A dequantized working copy of an 8-bit moment (``dtype``, fp32 by default), in either layout."""
    value = dequantize_moment(
        state[f"{key}_codes"], state[f"{key}_absmax"], signed, moment_layout(state, key, signed)
    )
    return value if value.dtype == dtype else value.to(dtype)


def store_moment_(state: dict[str, Any], key: str, signed: bool, value: Tensor, *, scratch: bool = False) -> None:
    """Requantize a working copy into the existing codes and absmax of moment ``key`` (in place).

    Always writes the current layout, so a moment loaded from an older checkpoint is converted here.
    ``scratch``: ``value`` is dropped afterwards and may be overwritten (saves a temporary).
    """
    quantize_moment(value, signed, out=(state[f"{key}_codes"], state[f"{key}_absmax"]), scratch=scratch)
    _set_layout(state, key, signed)


def check_mask(mask: Tensor | None) -> None:
    """Raise ``ValueError`` unless ``mask`` is None or a 0-dim bool tensor (metadata only: no sync)."""
    if mask is not None and not (isinstance(mask, Tensor) and mask.dtype == torch.bool and mask.dim() == 0):
        raise ValueError(f"Invalid mask: expected None or a 0-dim bool tensor, got {mask!r}.")


def reset_moment_(state: dict[str, Any], key: str, signed: bool, *, mask: Tensor | None = None) -> None:
    """Exact +0 of an 8-bit moment: codes ← the map's zero index and absmax ← 0, in place.

    The result is a fresh moment's state and reads as +0 in either layout, also where a block's absmax had
    become Inf or NaN (values are overwritten, never multiplied by 0). Never zero the codes alone: code 0
    of the signed map is −0.99296874, not 0. ``mask`` (a 0-dim bool tensor on the state's device) resets
    only where it is True, decided on the device: no host sync.
    """
    check_mask(mask)
    codes, absmax = state[f"{key}_codes"], state[f"{key}_absmax"]
    if mask is None:
        codes.fill_(zero_code(signed))
        absmax.zero_()
    else:
        codes.masked_fill_(mask, zero_code(signed))
        absmax.masked_fill_(mask, 0.0)


def to_low_bit_(state: dict[str, Any], key: str, signed: bool) -> None:
    """Convert a full-precision moment ``key`` of ``state`` to the 8-bit layout (no-op if absent)."""
    value = state.pop(key, None)
    if value is None:
        return
    state[f"{key}_codes"], state[f"{key}_absmax"] = quantize_moment(value, signed)
    _set_layout(state, key, signed)


def to_full_(state: dict[str, Any], key: str, signed: bool, dtype: torch.dtype) -> None:
    """Convert an 8-bit moment ``key`` of ``state`` back to one ``dtype`` tensor (no-op if absent)."""
    if not is_quantized(state, key):
        return
    value = load_moment(state, key, signed, dtype)
    del state[f"{key}_codes"], state[f"{key}_absmax"]
    state.pop(f"{key}_layout", None)
    state[key] = value


class LowBitMoments:
    """Working copies of one parameter's 8-bit moments: :meth:`load` dequantizes, :meth:`store` requantizes.

    ``moments`` maps each key to whether it uses the signed map. Only the tensor in hand has fp32
    temporaries; they are dropped after :meth:`store`.
    """

    def __init__(self, state: dict[str, Any], moments: dict[str, bool], dtype: torch.dtype = torch.float32) -> None:
        self.state = state
        self.moments = moments
        self.dtype = dtype
        self.values: dict[str, Tensor] = {}

    def reset_(self, mask: Tensor | None = None) -> None:
        """Exact zeros of every moment on the quantized state (see :func:`reset_moment_`)."""
        for key, signed in self.moments.items():
            reset_moment_(self.state, key, signed, mask=mask)

    def load(self) -> list[Tensor]:
        """Dequantized working copies, in the order of ``moments``."""
        self.values = {k: load_moment(self.state, k, s, self.dtype) for k, s in self.moments.items()}
        return list(self.values.values())

    def store(self) -> None:
        """Requantize the working copies into the state and drop them."""
        for key, signed in self.moments.items():
            store_moment_(self.state, key, signed, self.values.pop(key), scratch=True)


# -- construction-time warning ---------------------------------------------------------------------------------
EMBEDDING_NAME_PARTS = ("embed", "wte", "wpe")  # nn.Embedding attributes: embed_tokens, word_embeddings, wte...
EMBEDDING_ASPECT = 4  # rows > 4·columns: taller than a transformer MLP's up-projection (4·d × d)
_WARNED: weakref.WeakSet[Any] = weakref.WeakSet()


def _embedding_like(param: Tensor, name: str | None, group: dict[str, Any]) -> bool:
    """Whether ``param`` would get 8-bit state and looks like an embedding table (see warn_if_embedding_like)."""
    if param.dim() != 2 or not is_low_bit(group, param):
        return False
    if name is not None:
        return any(part in name.lower() for part in EMBEDDING_NAME_PARTS)
    rows, cols = param.shape
    return rows > EMBEDDING_ASPECT * cols


def _as_groups(param_groups_or_params: Any) -> list[dict[str, Any]]:
    """Param-group dicts from one group, a list of groups, or an iterable of tensors (``state_bits=8``)."""
    if isinstance(param_groups_or_params, dict):
        return [param_groups_or_params]
    items = list(param_groups_or_params)
    if items and all(isinstance(item, dict) for item in items):
        return items
    return [{"params": items, "state_bits": 8}]


def _user_stacklevel() -> int:
    """stacklevel of the first caller outside lightning_optim and torch, so the warning names user code."""
    frame, level = sys._getframe(1), 1
    while frame is not None and frame.f_globals.get("__name__", "").split(".")[0] in ("lightning_optim", "torch"):
        frame, level = frame.f_back, level + 1
    return level


def warn_if_embedding_like(param_groups_or_params: Any, owner: Any) -> list[tuple[int, ...]]:
    """Warn (UserWarning) when 2-D parameters that look like embedding tables would get 8-bit state.

    Embedding rows that receive gradients only now and then are the case 8-bit state handles worst (the
    8-bit paper keeps embeddings in 32 bits). A parameter is flagged if its group has ``state_bits=8``, it
    has >= :data:`MIN_8BIT_SIZE` elements, it is 2-D, and: when the group carries torch's
    ``param_names`` (an optimizer built from ``model.named_parameters()``), its name contains ``embed``,
    ``wte`` or ``wpe``; otherwise it has more than 4 times as many rows as columns (num_embeddings ≫
    embedding_dim; the tallest common dense weight, a transformer MLP's up-projection, is 4·d × d, so an
    output head over a vocabulary or an 8× MLP may be flagged too; naming the parameters avoids that).

    Args:
        param_groups_or_params: one param group (dict), a list of them, or an iterable of tensors (taken
            as one ``state_bits=8`` group).
        owner: the optimizer (warns at most once per optimizer object) or a name (warns on every call).

    Returns:
        The shapes flagged by this call (empty if none, or if ``owner`` had already been warned).
    """
    name = owner if isinstance(owner, str) else type(owner).__name__
    if not isinstance(owner, str) and owner in _WARNED:
        return []
    flagged = []
    for group in _as_groups(param_groups_or_params):
        names = group.get("param_names")
        for i, param in enumerate(group["params"]):
            if isinstance(param, Tensor) and _embedding_like(param, names[i] if names else None, group):
                flagged.append(tuple(param.shape))
    if flagged:
        if not isinstance(owner, str):
            _WARNED.add(owner)
        shapes = ", ".join("×".join(map(str, s)) for s in flagged)
        warnings.warn(
            f"{name}: parameter(s) of shape {shapes} look like embedding tables and would get 8-bit state "
            "(state_bits=8); rows that get gradients only sometimes are handled worst by 8-bit moments. Put "
            "embeddings in a state_bits=32 group, e.g. lightning_optim.param_groups(model, groups="
            "[{'params': 'embedding', 'state_bits': 32}]).",
            UserWarning,
            stacklevel=_user_stacklevel(),
        )
    return flagged
