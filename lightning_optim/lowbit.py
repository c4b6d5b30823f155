"""Block-wise dynamic 8-bit storage of optimizer moments (shared/specs/low_bit_and_qat.md, part A).

A moment x is stored as ``codes`` (uint8, the shape of x) and ``absmax`` (fp32, one per block of 256
elements): x̂ = map[code]·absmax of the code's block. The maps are the "dynamic tree" maps of Dettmers et
al. (arXiv 2110.02861), equal bit for bit to bitsandbytes' ``create_dynamic_map``: signed for first
moments, unsigned for second moments. Everything here is pure torch and sync-free on the step path;
the bitsandbytes CPU quantizer is not used because it misrounds values near zero.

Optimizer state layout: ``<key>_codes`` and ``<key>_absmax`` replace ``<key>``; maps are constants and
are never saved. A moment is stored in 8 bits iff its group has ``state_bits=8`` and the parameter has
at least :data:`MIN_8BIT_SIZE` elements. Memory: 2 + 2·4/256 = 2.03 bytes per parameter for Adam's two
moments instead of 8.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "BLOCK_SIZE",
    "MIN_8BIT_SIZE",
    "dequantize_blockwise",
    "dynamic_map",
    "quantize_blockwise",
    "zero_code",
]

BLOCK_SIZE = 256
MIN_8BIT_SIZE = 4096  # smaller tensors keep fp32 moments (bitsandbytes' min_8bit_size)
_ZERO_CODE = {True: 127, False: 0}


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


# (data_ptr, device) -> (qmap, its _version, thresholds on qmap's device); the entry keeps qmap alive,
# so its address cannot be reused while the entry lives.
_THRESHOLDS: dict[tuple[int, torch.device], tuple[Tensor, int, Tensor]] = {}
_MAPS: dict[tuple[bool, torch.device], Tensor] = {}


def device_map(signed: bool, device: torch.device | str) -> Tensor:
    """The dynamic map on ``device``, cached (with its thresholds), for use on the step path."""
    device = torch.device(device)
    key = (signed, device)
    if key not in _MAPS:
        qmap = dynamic_map(signed)
        thresholds = _round_up_thresholds(qmap)
        _MAPS[key] = qmap = qmap.to(device)
        _THRESHOLDS[(qmap.data_ptr(), qmap.device)] = (qmap, qmap._version, thresholds.to(device))
    return _MAPS[key]


def _thresholds(qmap: Tensor) -> Tensor:
    """Thresholds of ``qmap`` from the cache; a map not seen before is read once on the host."""
    key = (qmap.data_ptr(), qmap.device)
    hit = _THRESHOLDS.get(key)
    if hit is not None and hit[0] is qmap and hit[1] == qmap._version:
        return hit[2]
    if len(_THRESHOLDS) >= 64:  # bounded: keep the cached constant maps, drop user maps
        for k in [k for k, v in _THRESHOLDS.items() if not any(v[0] is m for m in _MAPS.values())]:
            del _THRESHOLDS[k]
    thresholds = _round_up_thresholds(qmap).to(qmap.device)
    _THRESHOLDS[key] = (qmap, qmap._version, thresholds)
    return thresholds


def _num_blocks(n: int, block_size: int) -> int:
    return -(-n // block_size)


def quantize_blockwise(x: Tensor, qmap: Tensor, block_size: int = BLOCK_SIZE) -> tuple[Tensor, Tensor]:
    """Block-wise quantization of ``x``: (codes uint8 shaped like x, absmax fp32 of ⌈n/B⌉ blocks).

    Per block N_b = max|x| (fp32), y = x/N_b (0 where N_b = 0), code = index of the map value nearest
    to y, ties to the larger value. Sync-free: shapes come from metadata only.
    """
    n = x.numel()
    blocks = _num_blocks(n, block_size)
    flat = x.detach().reshape(-1).float()
    if blocks * block_size != n:  # the last block is shorter: pad with zeros, which never raise N_b
        flat = torch.nn.functional.pad(flat, (0, blocks * block_size - n))
    view = flat.view(blocks, block_size)
    absmax = view.abs().amax(dim=1)
    y = view / torch.where(absmax > 0, absmax, torch.ones_like(absmax)).unsqueeze(1)
    codes = torch.searchsorted(_thresholds(qmap), y.reshape(-1), right=True, out_int32=True)
    return codes[:n].to(torch.uint8).view(x.shape), absmax


def dequantize_blockwise(codes: Tensor, absmax: Tensor, qmap: Tensor, block_size: int = BLOCK_SIZE) -> Tensor:
    """x̂ = map[code]·N_b of the code's block, in fp32 and the shape of ``codes`` (sync-free)."""
    n = codes.numel()
    values = qmap.index_select(0, codes.reshape(-1).long())
    # expand instead of repeat_interleave: the latter computes its output size on the host
    scale = absmax.reshape(-1, 1).expand(-1, block_size).reshape(-1)[:n]
    return (values * scale).view(codes.shape)


# -- optimizer state helpers -----------------------------------------------------------------------------
def is_low_bit(group: dict[str, Any], param: Tensor) -> bool:
    """Whether ``param``'s moments are stored in 8 bits: group state_bits = 8 and >= 4096 elements."""
    return group.get("state_bits", 32) == 8 and param.numel() >= MIN_8BIT_SIZE


def is_quantized(state: dict[str, Any], key: str) -> bool:
    """Whether moment ``key`` of this per-parameter state is in the 8-bit layout."""
    return f"{key}_codes" in state


def init_moment(state: dict[str, Any], key: str, signed: bool, param: Tensor) -> None:
    """Create moment ``key`` as exact zeros in the 8-bit layout: zero codes, absmax 0."""
    state[f"{key}_codes"] = torch.full(param.shape, zero_code(signed), dtype=torch.uint8, device=param.device)
    state[f"{key}_absmax"] = torch.zeros(
        _num_blocks(param.numel(), BLOCK_SIZE), dtype=torch.float32, device=param.device
    )


def load_moment(state: dict[str, Any], key: str, signed: bool, dtype: torch.dtype = torch.float32) -> Tensor:
    """A dequantized working copy of an 8-bit moment (``dtype``, fp32 by default)."""
    codes = state[f"{key}_codes"]
    value = dequantize_blockwise(codes, state[f"{key}_absmax"], device_map(signed, codes.device))
    return value if value.dtype == dtype else value.to(dtype)


def store_moment_(state: dict[str, Any], key: str, signed: bool, value: Tensor) -> None:
    """Requantize a working copy into the existing codes and absmax of moment ``key`` (in place)."""
    codes, absmax = state[f"{key}_codes"], state[f"{key}_absmax"]
    new_codes, new_absmax = quantize_blockwise(value, device_map(signed, codes.device))
    codes.copy_(new_codes)
    absmax.copy_(new_absmax)


def reset_moment_(state: dict[str, Any], key: str, signed: bool) -> None:
    """Exact zero of an 8-bit moment: codes ← the map's zero index, absmax unchanged.

    Never zero the codes: code 0 of the signed map is −0.99296874, not 0.
    """
    state[f"{key}_codes"].fill_(zero_code(signed))


def to_low_bit_(state: dict[str, Any], key: str, signed: bool) -> None:
    """Convert a full-precision moment ``key`` of ``state`` to the 8-bit layout (no-op if absent)."""
    value = state.pop(key, None)
    if value is None:
        return
    codes, absmax = quantize_blockwise(value, device_map(signed, value.device))
    state[f"{key}_codes"], state[f"{key}_absmax"] = codes, absmax


def to_full_(state: dict[str, Any], key: str, signed: bool, dtype: torch.dtype) -> None:
    """Convert an 8-bit moment ``key`` of ``state`` back to one ``dtype`` tensor (no-op if absent)."""
    if not is_quantized(state, key):
        return
    value = load_moment(state, key, signed, dtype)
    del state[f"{key}_codes"], state[f"{key}_absmax"]
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

    def reset_(self) -> None:
        """Exact zeros of every moment on the quantized state (zero codes, absmax unchanged)."""
        for key, signed in self.moments.items():
            reset_moment_(self.state, key, signed)

    def load(self) -> list[Tensor]:
        """Dequantized working copies, in the order of ``moments``."""
        self.values = {k: load_moment(self.state, k, s, self.dtype) for k, s in self.moments.items()}
        return list(self.values.values())

    def store(self) -> None:
        """Requantize the working copies into the state and drop them."""
        for key, signed in self.moments.items():
            store_moment_(self.state, key, signed, self.values[key])
        self.values = {}
