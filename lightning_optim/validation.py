"""Validators for optimizer and callback hyper-parameters.

Every check raises ``ValueError`` naming the argument, the value it got and what is allowed, so a typo in
a LightningCLI YAML file fails at construction (or at ``load_state_dict``) instead of turning the weights
into NaN a few steps later. Non-finite values (``nan``, ``inf``) are rejected unless an argument gives
``inf`` a meaning and says so with ``allow_inf=True`` (SPAM's ``threshold=inf`` disables clipping).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from torch import Tensor

__all__ = [
    "check_adam_group",
    "check_betas",
    "check_bool",
    "check_choice",
    "check_compile",
    "check_int",
    "check_range",
    "check_state_bits",
]


def _is_real(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_range(
    name: str,
    value: Any,
    low: float | None = None,
    high: float | None = None,
    *,
    low_open: bool = False,
    high_open: bool = False,
    allow_inf: bool = False,
) -> None:
    """Raise ``ValueError`` naming ``name`` unless ``value`` is a real number in the given interval.

    Args:
        name: the argument's name, as the user wrote it (e.g. ``"lr"``, ``"betas (beta1)"``).
        value: the value to check; bools, strings, tensors and NaN are rejected.
        low: lower bound (None: unbounded).
        high: upper bound (None: unbounded).
        low_open: exclude ``low`` itself.
        high_open: exclude ``high`` itself.
        allow_inf: accept ``+inf`` (when the interval allows it); without it every infinite value is rejected.
    """
    left = "(" if low_open else "["
    right = ")" if high_open else "]"
    allowed = f"{left}{'-inf' if low is None else low}, {'inf' if high is None else high}{right}"
    ok = _is_real(value) and not math.isnan(value) and (allow_inf or math.isfinite(value))
    if ok and low is not None:
        ok = value > low if low_open else value >= low
    if ok and high is not None:
        ok = value < high if high_open else value <= high
    if not ok:
        finite = "" if allow_inf else " and finite"
        raise ValueError(f"Invalid {name}: {value!r}; it must be a number in {allowed}{finite}.")


def check_int(name: str, value: Any, low: int) -> None:
    """Raise ``ValueError`` naming ``name`` unless ``value`` is an integer (not a bool) >= ``low``.

    Args:
        name: the argument's name.
        value: the value to check.
        low: smallest allowed value.
    """
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"Invalid {name}: {value!r}; it must be an integer >= {low}.")


def check_bool(name: str, value: Any) -> None:
    """Raise ``ValueError`` naming ``name`` unless ``value`` is ``True`` or ``False``.

    Args:
        name: the argument's name.
        value: the value to check.
    """
    if not isinstance(value, bool):
        raise ValueError(f"Invalid {name}: {value!r}; it must be True or False.")


def check_choice(name: str, value: Any, allowed: Sequence[Any]) -> None:
    """Raise ``ValueError`` naming ``name`` unless ``value`` is one of ``allowed``.

    Args:
        name: the argument's name.
        value: the value to check.
        allowed: the accepted values.
    """
    if isinstance(value, bool) or value not in allowed:
        raise ValueError(f"Invalid {name}: {value!r}; allowed values are {', '.join(map(repr, allowed))}.")


def check_betas(betas: Any, names: tuple[str, ...] = ("beta1", "beta2")) -> None:
    """Validate an Adam-style ``betas`` tuple: one finite number in [0, 1) per entry of ``names``.

    Args:
        betas: the tuple (or list) to check.
        names: the meaning of each entry, used in messages (e.g. ``("beta_max", "beta2")``).
    """
    if not isinstance(betas, (tuple, list)) or len(betas) != len(names):
        raise ValueError(f"Invalid betas: {betas!r}; expected a tuple of {len(names)} floats in [0, 1).")
    for name, beta in zip(names, betas):
        value = beta.item() if isinstance(beta, Tensor) and beta.numel() == 1 else beta
        check_range(f"betas ({name})", value, 0.0, 1.0, high_open=True)


def check_adam_group(group: dict[str, Any]) -> None:
    """Validate the Adam options of a param group: ``lr``, ``betas``, ``eps``, ``weight_decay``.

    ``betas`` given as a list (a Python or YAML param group) is stored back as a tuple first, as the
    constructors store it.
    """
    check_range("lr", group["lr"], 0.0)
    if isinstance(group["betas"], list):
        group["betas"] = tuple(group["betas"])
    check_betas(group["betas"])
    check_range("eps", group["eps"], 0.0)
    check_range("weight_decay", group["weight_decay"], 0.0)


def check_compile(compile: Any) -> None:
    """Validate the ``compile`` flag of an optimizer (True or False).

    Args:
        compile: the value to check.
    """
    check_bool("compile", compile)


def check_state_bits(state_bits: Any, compile: Any = False) -> None:
    """Raise ``ValueError`` unless ``state_bits`` is 32 or 8, and for 8 together with ``compile=True``.

    Args:
        state_bits: storage width of the optimizer moments (32 or 8).
        compile: the group's ``compile`` flag.
    """
    if isinstance(state_bits, bool) or state_bits not in (32, 8):
        raise ValueError(f"Invalid state_bits: {state_bits!r}; allowed values are 32 and 8.")
    if state_bits == 8 and compile is True:
        # The compiled steps are multi-tensor graphs over fp32 state; the 8-bit path is a per-tensor
        # dequantize -> update -> requantize loop, which would recompile for every parameter shape.
        raise ValueError(
            "Invalid combination compile=True with state_bits=8: the compiled step needs fp32 state; "
            "use compile=False with state_bits=8, or state_bits=32 with compile=True."
        )
