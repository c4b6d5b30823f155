"""State adapters: read and exactly reset the moments an optimizer keeps per parameter.

Callbacks such as spike-aware clipping (against the raw second moment), momentum reset and the QAT
moment reset work with optimizers they did not build. ``state_adapter(optimizer)`` returns the
:class:`StateAdapter` for an optimizer (its class looked up along the MRO, then a rule for
bitsandbytes), whose methods take one per-parameter state dict (``optimizer.state[p]``, or an entry of
``optimizer.state_dict()["state"]``). :func:`register_state_adapter` adds one for another class.

Covered (state keys):

==============================================  ===============  ============  ====================
optimizer                                       first moment     second        also reset
==============================================  ===============  ============  ====================
torch.optim.Adam, AdamW                         exp_avg          exp_avg_sq    max_exp_avg_sq
torch.optim.NAdam, RAdam                        exp_avg          exp_avg_sq    -- (mu_product kept)
torch.optim.Adamax                              exp_avg          exp_inf ** 2  --
torch.optim.SGD                                 momentum_buffer  --            --
torch.optim.RMSprop                             momentum_buffer  square_avg    grad_avg
SPAM, StableSPAM, AdaptiveMomentumAdamW         exp_avg          exp_avg_sq    --
AdaptiveMomentumSGD                             momentum_buffer  --            --
bitsandbytes adam, lamb (Adam*, AdamW*, LAMB*)  state1           state2        --
bitsandbytes lion, momentum (SGD*), lars        state1           --            --
bitsandbytes rmsprop                            --               state1        --
torchao.optim Adam*/AdamW* 8bit, 4bit, Fp8      exp_avg          exp_avg_sq    max_exp_avg_sq
==============================================  ===============  ============  ====================

Contract: reads give the dequantized value (the live tensor itself when stored unquantized); the second
moment is the raw (not bias-corrected) EMA of g², comparable to ``grad ** 2``. ``reset_`` makes the
moments exactly +0 (NaN and Inf included: values are overwritten, never multiplied by 0) and never
touches ``step`` or other bias-correction bookkeeping. With a ``mask`` (0-dim bool tensor on the
state's device) the reset is decided on the device: no host sync, no Python branch on the mask.
Quantized moments: our 8-bit layout (``<key>_codes`` uint8 + ``<key>_absmax`` fp32, 256-blocks,
docs/low_bit_and_qat.md) and bitsandbytes' (``state1``/``state2`` uint8 + ``qmap*`` +
``absmax*``, also nested under ``"__bnb_optimizer_quant_state__"`` as in bitsandbytes' ``state_dict``) and
torchao's tensor subclasses (OptimState8bit, OptimState4bit, OptimStateFp8: ``codes`` + ``scale``).
Deliberately unregistered: Adagrad (torch and bitsandbytes; zeroing ``sum`` would restart its
learning-rate decay rather than forget stale statistics) and bitsandbytes AdEMAMix (two stacked
first moments). This module never imports bitsandbytes or torchao (both optional): bitsandbytes'
optimizers are recognised by module name and ``optimizer_name``, torchao's by their base class
``torchao.optim.adam._AdamBase`` (module and name), on first use.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from lightning_optim.lowbit import check_mask, dequantize_blockwise, load_moment, reset_moment_

__all__ = [
    "BitsAndBytesStateAdapter",
    "KeyedStateAdapter",
    "StateAdapter",
    "TorchAOStateAdapter",
    "iter_states",
    "register_state_adapter",
    "spec_adapter",
    "state_adapter",
]

BNB_NESTED_KEY = "__bnb_optimizer_quant_state__"


# -- helpers -------------------------------------------------------------------------------------------
def _zero_(tensor: Tensor, mask: Tensor | None) -> None:
    # masked_fill_ overwrites NaN/Inf (a multiply by 0 would keep them); the 0-dim mask broadcasts on the device.
    if mask is None:
        tensor.zero_()
    else:
        tensor.masked_fill_(mask, 0)


def _fill_codes_(codes: Tensor, code: Tensor, mask: Tensor | None) -> None:
    # code is a device tensor: masked_fill_ with a tensor value reads it on the host, torch.where does not
    codes.copy_(code.expand_as(codes) if mask is None else torch.where(mask, code, codes))


_ZERO_CODES: dict[tuple[int, torch.device], tuple[Tensor, int, Tensor]] = {}


def _zero_code(qmap: Tensor) -> Tensor:
    """Index of the map entry of smallest magnitude (the exact 0 where the map has one) as a uint8 device tensor.

    argmin stays on the device (no sync). Cached per map tensor; the cached entry holds the map, so its
    address cannot be reused by another tensor while the entry lives. Bounded: after load_state_dict
    bitsandbytes holds one map copy per parameter, torchao always one per state tensor (a miss only
    costs one argmin over 16 or 256 values).
    """
    key = (qmap.data_ptr(), qmap.device)
    hit = _ZERO_CODES.get(key)
    if hit is not None and hit[0] is qmap and hit[1] == qmap._version:
        return hit[2]
    if len(_ZERO_CODES) >= 256:
        _ZERO_CODES.clear()
    code = qmap.abs().argmin().to(torch.uint8)
    _ZERO_CODES[key] = (qmap, qmap._version, code)
    return code


def _is_torchao_quantized(value: Any) -> bool:
    """Whether ``value`` is one of torchao's quantized optimizer-state subclasses (duck-typed: no import)."""
    return isinstance(value, Tensor) and type(value) is not Tensor and isinstance(getattr(value, "codes", None), Tensor)


def _reset_torchao_(value: Tensor, mask: Tensor | None) -> None:
    """Exact +0 for a torchao OptimState8bit / OptimState4bit / OptimStateFp8, in place, sync-free.

    Codes ← the map's smallest-magnitude entry (4-bit: in both nibbles of each byte, 0x77 for the first
    moment) or bit pattern 0 (fp8, +0.0); scale ← 0 always. Then every entry dequantizes to qmap[z]·0 = +0,
    also for 4-bit v, whose map {1/16, ..., 1} has no zero, and where a scale had become Inf/NaN.
    ``value.copy_(zeros)`` would not do: it requantizes and leaves 1/16·1e-12 in 4-bit v.
    """
    codes, qmap = value.codes, getattr(value, "qmap", None)
    if qmap is None:  # fp8: masked_fill_ has no float8 kernel on the CPU; the uint8 view has
        _zero_(codes.view(torch.uint8), mask)
    else:
        code = _zero_code(qmap)
        if codes.numel() != value.numel():  # 4-bit: two codes per byte, high nibble first
            code = code * 17  # (z << 4) | z, on the device
        _fill_codes_(codes, code, mask)
    _zero_(value.scale, mask)


# -- adapters ------------------------------------------------------------------------------------------
class StateAdapter:
    """Reads and exactly resets the moments kept in one optimizer's per-parameter state dicts.

    Subclass it (override :meth:`first_moment`, :meth:`second_moment`, :meth:`reset_`, and :meth:`step`
    if the count is not under ``"step"``) and register an instance with :func:`register_state_adapter`.
    ``quantized`` says whether moments may be stored quantized (then reads return dequantized copies, and
    callbacks that rewrite a moment in place, such as AdaptiveMomentum, refuse the optimizer).
    """

    quantized: bool = False
    name: str = "optimizer"

    @property
    def has_first_moment(self) -> bool:
        """Whether the optimizer may keep a first moment (reads can still give None, e.g. SGD without momentum)."""
        return type(self).first_moment is not StateAdapter.first_moment

    @property
    def has_second_moment(self) -> bool:
        """Whether the optimizer may keep a second moment (a spike clip needs one)."""
        return type(self).second_moment is not StateAdapter.second_moment

    def first_moment(self, state: dict[str, Any]) -> Tensor | None:
        """First moment (dequantized fp32 copy, or the live tensor); None if none is kept or the state is empty."""
        return None

    def second_moment(self, state: dict[str, Any]) -> Tensor | None:
        """Raw (not bias-corrected) EMA of g², comparable to ``grad ** 2``; None if none is kept."""
        return None

    def step(self, state: dict[str, Any]) -> Tensor | int | float | None:
        """The step count as stored (CPU or device tensor, or a Python number); None if absent."""
        return state.get("step")

    def reset_(self, state: dict[str, Any], mask: Tensor | None = None) -> None:
        """Set the moments to exact zeros (where ``mask`` is True, decided on the device); ``step`` untouched."""
        raise NotImplementedError(f"{type(self).__name__} does not implement reset_.")

    def writable_first_moment(self, state: dict[str, Any]) -> Tensor | None:
        """The live first-moment tensor the optimizer updates in place (for callbacks that rewrite it)."""
        if self.quantized:
            raise NotImplementedError(f"{self.name} stores its first moment quantized: there is no live tensor.")
        return self.first_moment(state)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name})"


class _NamedMomentsAdapter(StateAdapter):
    """An adapter whose moments live under named keys: ``first``/``second`` (None: not kept)."""

    def __init__(self, name: str, first: str | None, second: str | None) -> None:
        self.name = name
        self.first = first
        self.second = second

    @property
    def has_first_moment(self) -> bool:
        return self.first is not None

    @property
    def has_second_moment(self) -> bool:
        return self.second is not None


class KeyedStateAdapter(_NamedMomentsAdapter):
    """Adapter for optimizers that keep each moment as one tensor under a key (torch.optim and ours).

    Args:
        name: optimizer name used in messages. first, second: keys of the first and second moment (None:
        not kept). also_reset: further moment keys zeroed by a reset (amsgrad's ``max_exp_avg_sq``,
        centred RMSprop's ``grad_avg``; unsigned map if stored in 8 bits). second_is_inf_norm: the second
        key holds Adamax's infinity-norm EMA u = max(β2·u, |g| + ε); ``second_moment`` returns u², its
        analogue of the EMA of g² (a copy).

    A moment stored in our 8-bit layout (``<key>_codes`` uint8, ``<key>_absmax`` fp32 per 256-block;
    signed map for the first moment, unsigned for the second, √v for second moments written in layout 2)
    is read with :func:`lightning_optim.lowbit.load_moment` and reset with
    :func:`lightning_optim.lowbit.reset_moment_`, the optimizers' own reset: every code ← the map's zero
    (127 signed, 0 unsigned) and every absmax ← 0, so the value is exactly 0 even where absmax had become
    Inf or NaN.
    """

    def __init__(
        self,
        name: str,
        first: str | None = None,
        second: str | None = None,
        *,
        also_reset: tuple[str, ...] = (),
        second_is_inf_norm: bool = False,
    ) -> None:
        super().__init__(name, first, second)
        self.also_reset = tuple(also_reset)
        self.second_is_inf_norm = second_is_inf_norm

    def _read(self, state: dict[str, Any], key: str | None, signed: bool) -> Tensor | None:
        if key is None:
            return None
        if f"{key}_codes" in state:
            return load_moment(state, key, signed)
        return state.get(key)  # None for torch SGD without momentum

    def first_moment(self, state: dict[str, Any]) -> Tensor | None:
        return self._read(state, self.first, signed=True)

    def second_moment(self, state: dict[str, Any]) -> Tensor | None:
        value = self._read(state, self.second, signed=False)
        return value.square() if value is not None and self.second_is_inf_norm else value

    def reset_(self, state: dict[str, Any], mask: Tensor | None = None) -> None:
        check_mask(mask)
        keys = [(self.first, True), (self.second, False)] + [(key, False) for key in self.also_reset]
        for key, signed in keys:
            if key is None:
                continue
            if f"{key}_codes" in state:
                reset_moment_(state, key, signed, mask=mask)
            elif isinstance(state.get(key), Tensor):
                _zero_(state[key], mask)

    def writable_first_moment(self, state: dict[str, Any]) -> Tensor | None:
        if self.first is not None and f"{self.first}_codes" in state:
            raise NotImplementedError(
                f"{self.name} stores its first moment '{self.first}' in 8 bits ('{self.first}_codes'): "
                "there is no live fp32 tensor to write; read it with first_moment and reset it with reset_."
            )
        return self.first_moment(state)


class BitsAndBytesStateAdapter(_NamedMomentsAdapter):
    """Adapter for bitsandbytes optimizers (0.50.x): moments under ``state1``/``state2``.

    Each is fp32 (32-bit optimizers, and parameters below ``min_8bit_size`` = 4096 elements) or uint8
    codes with ``qmap1``/``qmap2`` (256 values) and ``absmax1``/``absmax2`` (one fp32 per 256-block).
    ``step`` is a Python int. ``state_dict()`` moves these tensors (not ``step``) into a nested dict under
    ``"__bnb_optimizer_quant_state__"``; it is looked at first. bitsandbytes' ``state_dict`` shares the
    live tensors (a shallow copy), so resetting a fresh ``state_dict()`` resets the live optimizer too.

    Read: qmap[code]·absmax per block. Reset: codes ← index of 0 in that qmap (found on the device),
    absmax ← 0; fp32 states zeroed. bitsandbytes' own fresh state is codes 0, absmax 0: the same value.
    """

    quantized = True

    def __init__(self, name: str, first: str | None = "state1", second: str | None = "state2") -> None:
        super().__init__(name, first, second)

    @staticmethod
    def _tensors(state: dict[str, Any]) -> dict[str, Any]:
        nested = state.get(BNB_NESTED_KEY)
        return nested if isinstance(nested, dict) else state

    def _read(self, state: dict[str, Any], key: str | None) -> Tensor | None:
        tensors = self._tensors(state)
        value = tensors.get(key) if key is not None else None
        if value is None or value.dtype != torch.uint8:
            return value
        i = key[-1]  # "state1" -> qmap1/absmax1
        return dequantize_blockwise(value, tensors[f"absmax{i}"], tensors[f"qmap{i}"])

    def first_moment(self, state: dict[str, Any]) -> Tensor | None:
        return self._read(state, self.first)

    def second_moment(self, state: dict[str, Any]) -> Tensor | None:
        return self._read(state, self.second)

    def reset_(self, state: dict[str, Any], mask: Tensor | None = None) -> None:
        check_mask(mask)
        tensors = self._tensors(state)
        for key in (self.first, self.second):
            value = tensors.get(key) if key is not None else None
            if value is None:
                continue
            if value.dtype == torch.uint8:
                i = key[-1]
                _fill_codes_(value, _zero_code(tensors[f"qmap{i}"]), mask)
                _zero_(tensors[f"absmax{i}"], mask)  # also clears an Inf/NaN absmax
            else:
                _zero_(value, mask)

    def writable_first_moment(self, state: dict[str, Any]) -> Tensor | None:
        value = self._tensors(state).get(self.first) if self.first is not None else None
        if value is not None and value.dtype == torch.uint8:
            raise NotImplementedError(
                f"{self.name} (bitsandbytes) stores its first moment in 8 bits: there is no live fp32 tensor "
                "to write; read it with first_moment and reset it with reset_."
            )
        return value


class TorchAOStateAdapter(KeyedStateAdapter):
    """Adapter for torchao's low-bit Adam/AdamW (``torchao.optim`` Adam8bit, AdamW8bit, Adam4bit, AdamW4bit,
    AdamFp8, AdamWFp8; 0.18).

    ``exp_avg``, ``exp_avg_sq`` (and amsgrad's ``max_exp_avg_sq``) are tensor subclasses: OptimState8bit
    (uint8 ``codes`` in the parameter's shape, ``scale`` per 256-block, ``qmap``), OptimState4bit (block
    128, two codes per byte, high nibble first), OptimStateFp8 (e4m3 ``codes``, ``scale`` = absmax/448);
    or plain fp32 tensors when the parameter has fewer than 4096 elements or a size that is not a
    multiple of the block. ``step`` is a CPU float tensor, ``group["lr"]`` a 0-dim tensor (the callbacks'
    warm-up changes it in place).

    Read: ``.dequantize()`` (fp32; plain tensors as they are). Reset: see :func:`_reset_torchao_`.
    """

    quantized = True

    def __init__(self, name: str) -> None:
        super().__init__(name, "exp_avg", "exp_avg_sq", also_reset=("max_exp_avg_sq",))

    def _read(self, state: dict[str, Any], key: str | None, signed: bool) -> Tensor | None:
        value = state.get(key) if key is not None else None
        return value.dequantize() if _is_torchao_quantized(value) else value

    def reset_(self, state: dict[str, Any], mask: Tensor | None = None) -> None:
        check_mask(mask)
        for key in (self.first, self.second, *self.also_reset):
            value = state.get(key)
            if _is_torchao_quantized(value):
                _reset_torchao_(value, mask)
            elif isinstance(value, Tensor):
                _zero_(value, mask)

    def writable_first_moment(self, state: dict[str, Any]) -> Tensor | None:
        value = state.get(self.first)
        if _is_torchao_quantized(value):
            raise NotImplementedError(
                f"{self.name} stores its first moment as {type(value).__name__}: there is no live fp32 tensor "
                "to write; read it with first_moment and reset it with reset_."
            )
        return value


# -- registry ------------------------------------------------------------------------------------------
_REGISTRY: dict[type, StateAdapter] = {}

# bitsandbytes ``optimizer_name`` -> (first, second) key; recognised without importing bitsandbytes.
_BNB_KEYS: dict[str, tuple[str | None, str | None]] = {
    "adam": ("state1", "state2"),
    "lamb": ("state1", "state2"),
    "lion": ("state1", None),
    "momentum": ("state1", None),
    "lars": ("state1", None),
    "rmsprop": (None, "state1"),
}
# adapters found by the library rules of state_adapter, one instance per optimizer class
_LIBRARY_ADAPTERS: dict[type, StateAdapter] = {}

_NOT_REGISTERED_WHY = {
    "Adagrad": " Adagrad is left unregistered on purpose: zeroing its 'sum' would restart its learning-rate "
    "decay rather than forget stale statistics.",
}


def register_state_adapter(optimizer_cls: type, adapter: StateAdapter) -> None:
    """Use ``adapter`` for ``optimizer_cls`` and its subclasses (replacing any earlier registration)."""
    if not isinstance(optimizer_cls, type):
        raise TypeError(f"optimizer_cls must be a class, got {optimizer_cls!r}.")
    if not isinstance(adapter, StateAdapter):
        raise TypeError(f"adapter must be a StateAdapter instance, got {adapter!r}.")
    _REGISTRY[optimizer_cls] = adapter


def spec_adapter(optimizer_cls: type) -> KeyedStateAdapter:
    """The adapter of an optimizer class that declares its state with a ``state_spec`` (our optimizers).

    The first and second moment keys come from the declaration; further moments are reset too (with the
    unsigned map when stored in 8 bits). Subclasses of ours without a registration get one from their own
    ``state_spec`` on first use.
    """
    spec = optimizer_cls.state_spec
    others = tuple(k for k in spec.moments if k not in (spec.first_moment, spec.second_moment))
    return KeyedStateAdapter(optimizer_cls.__name__, spec.first_moment, spec.second_moment, also_reset=others)


def state_adapter(optimizer: Optimizer) -> StateAdapter:
    """The adapter for ``optimizer``: its class's registration along the MRO, else the bitsandbytes or torchao rule.

    Raises ``TypeError`` naming the class and its state keys when none applies.
    """
    cls = type(optimizer)
    for klass in cls.__mro__:
        if klass in _REGISTRY:
            if klass is not cls and "state_spec" in cls.__dict__:  # a subclass that declares its own state
                break
            return _REGISTRY[klass]
    if "state_spec" in cls.__dict__ and cls.state_spec.moments:
        register_state_adapter(cls, spec_adapter(cls))
        return _REGISTRY[cls]
    adapter = _LIBRARY_ADAPTERS.get(cls) or _library_adapter(optimizer)
    if adapter is not None:
        _LIBRARY_ADAPTERS[cls] = adapter
        return adapter
    keys = sorted({str(k) for s in getattr(optimizer, "state", {}).values() if isinstance(s, dict) for k in s})
    found = ", ".join(repr(k) for k in keys) if keys else "no state yet"
    raise TypeError(
        f"No state adapter is registered for optimizer {cls.__module__}.{cls.__qualname__} "
        f"(state keys: {found}).{_NOT_REGISTERED_WHY.get(cls.__name__, '')} Register one with "
        "lightning_optim.register_state_adapter(MyOptimizer, adapter), where adapter is a StateAdapter "
        "subclass instance, e.g. lightning_optim.state_adapters.KeyedStateAdapter('MyOptimizer', "
        "first='exp_avg', second='exp_avg_sq')."
    )


def _library_adapter(optimizer: Optimizer) -> StateAdapter | None:
    """An adapter for a bitsandbytes or torchao optimizer, recognised without importing either library."""
    cls = type(optimizer)
    bnb_name = getattr(optimizer, "optimizer_name", None)
    if cls.__module__.startswith("bitsandbytes.") and bnb_name in _BNB_KEYS:
        return BitsAndBytesStateAdapter(cls.__name__, *_BNB_KEYS[bnb_name])
    # torchao.optim's Adam family shares one base class and one state layout
    if any(k.__name__ == "_AdamBase" and k.__module__.startswith("torchao.") for k in cls.__mro__):
        return TorchAOStateAdapter(f"torchao.optim.{cls.__name__}")
    return None


def iter_states(optimizer: Optimizer) -> Iterator[tuple[dict[str, Any], Tensor, dict[str, Any]]]:
    """(group, param, state) for every parameter of every group whose state is not empty."""
    for group in optimizer.param_groups:
        for p in group["params"]:
            state = optimizer.state.get(p)  # .get: do not create entries in the defaultdict
            if state:
                yield group, p, state


def _register_builtin() -> None:
    from lightning_optim.adaptive_momentum import (
        AdaptiveMomentumAdamW,
        AdaptiveMomentumSGD,
    )
    from lightning_optim.spam import SPAM
    from lightning_optim.stable_spam import StableSPAM

    adam = ("exp_avg", "exp_avg_sq")
    # amsgrad's running max is a second-moment statistic: a reset that kept it would keep the old scale.
    for cls in (torch.optim.Adam, torch.optim.AdamW):
        adapter = KeyedStateAdapter(f"torch.optim.{cls.__name__}", *adam, also_reset=("max_exp_avg_sq",))
        register_state_adapter(cls, adapter)
    # NAdam's mu_product is bias-correction bookkeeping like step: kept.
    for cls in (torch.optim.NAdam, torch.optim.RAdam):
        register_state_adapter(cls, KeyedStateAdapter(f"torch.optim.{cls.__name__}", *adam))
    register_state_adapter(
        torch.optim.Adamax, KeyedStateAdapter("torch.optim.Adamax", "exp_avg", "exp_inf", second_is_inf_norm=True)
    )
    register_state_adapter(torch.optim.SGD, KeyedStateAdapter("torch.optim.SGD", "momentum_buffer"))
    # RMSprop has no bias correction: right after a reset its steps are ~1/sqrt(1 - alpha) times larger.
    register_state_adapter(
        torch.optim.RMSprop,
        KeyedStateAdapter("torch.optim.RMSprop", "momentum_buffer", "square_avg", also_reset=("grad_avg",)),
    )
    # Ours declare their moments once (StateSpec); the adapter follows from that declaration. StableSPAM's
    # statistics (m_max, m_norm, v_norm, stat_step) are scalars, which a reset keeps (spec: they survive).
    for cls in (SPAM, StableSPAM, AdaptiveMomentumAdamW, AdaptiveMomentumSGD):
        register_state_adapter(cls, spec_adapter(cls))


_register_builtin()
