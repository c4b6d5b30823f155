"""Shared machinery of lightning-optim's optimizers.

Every optimizer here keeps the global step T in its param groups (``group["global_step"]``, completed
steps) so that ``state_dict()``/``load_state_dict()`` resume schedules and resets exactly, validates its
hyper-parameters per param group, keeps fp32 state for bf16/fp16 parameters and offers a per-parameter
reference path next to a multi-tensor (``torch._foreach_*``) path.
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Iterable, Iterator
from typing import Any, Callable

import torch
from torch import Tensor
from torch.optim.optimizer import Optimizer, _default_to_fused_or_foreach

from lightning_optim.lowbit import LowBitMoments, init_moment, is_low_bit, is_quantized, to_full_, to_low_bit_

_LOW_PRECISION = (torch.float16, torch.bfloat16)


def check_range(
    name: str,
    value: float,
    low: float | None = None,
    high: float | None = None,
    *,
    low_open: bool = False,
    high_open: bool = False,
) -> None:
    """Raise ``ValueError`` naming ``name`` unless ``value`` lies in the given interval."""
    left = "(" if low_open else "["
    right = ")" if high_open else "]"
    allowed = f"{left}{'-inf' if low is None else low}, {'inf' if high is None else high}{right}"
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and not math.isnan(value)
    if ok and low is not None:
        ok = value > low if low_open else value >= low
    if ok and high is not None:
        ok = value < high if high_open else value <= high
    if not ok:
        raise ValueError(f"Invalid {name}: {value!r}; allowed range is {allowed}.")


def check_int(name: str, value: int, low: int) -> None:
    """Raise ``ValueError`` naming ``name`` unless ``value`` is an integer >= ``low``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"Invalid {name}: {value!r}; must be an integer >= {low}.")


def check_betas(betas: Any, names: tuple[str, ...] = ("beta1", "beta2")) -> None:
    """Validate an Adam-style ``betas`` pair: each entry in [0, 1)."""
    if not isinstance(betas, (tuple, list)) or len(betas) != len(names):
        raise ValueError(f"Invalid betas: {betas!r}; expected a tuple of {len(names)} floats in [0, 1).")
    for name, beta in zip(names, betas):
        check_range(f"betas ({name})", float(beta) if isinstance(beta, Tensor) else beta, 0.0, 1.0, high_open=True)


def check_state_bits(state_bits: Any, compile: Any = False) -> None:
    """Raise ``ValueError`` unless ``state_bits`` is 32 or 8, and for 8 together with ``compile=True``."""
    if isinstance(state_bits, bool) or state_bits not in (32, 8):
        raise ValueError(f"Invalid state_bits: {state_bits!r}; allowed values are 32 and 8.")
    if state_bits == 8 and compile is True:
        # The compiled steps are multi-tensor graphs over fp32 state; the 8-bit path is a per-tensor
        # dequantize -> update -> requantize loop, which would recompile for every parameter shape.
        raise ValueError(
            "Invalid combination compile=True with state_bits=8: the compiled step needs fp32 state; "
            "use compile=False with state_bits=8, or state_bits=32 with compile=True."
        )


def state_dtype(param: Tensor) -> torch.dtype:
    """Optimizer state and math run in fp32 for half-precision parameters, in the parameter's dtype otherwise."""
    return torch.float32 if param.dtype in _LOW_PRECISION else param.dtype


def as_compute(tensors: list[Tensor]) -> list[Tensor]:
    """fp32 working copies of half-precision tensors; other tensors are returned as they are (no copy)."""
    return [t.float() if t.dtype in _LOW_PRECISION else t for t in tensors]


def write_back(targets: list[Tensor], computed: list[Tensor]) -> None:
    """Copy fp32 working copies back into half-precision targets (no-op where they are the same tensor)."""
    pairs = [(t, c) for t, c in zip(targets, computed) if t is not c]
    if pairs:
        torch._foreach_copy_([t for t, _ in pairs], [c for _, c in pairs])


class StepCountedOptimizer(Optimizer):
    """Base class: one global step counter stored in every param group, per-group validation, exact resume.

    Subclasses implement :meth:`_validate_group` and :meth:`_step` (given T, the 1-based index of the
    current step). The counter lives in ``param_groups`` (not in a Python attribute and not under a string
    key of ``optimizer.state``) because torch's and distributed checkpointing round-trip param groups.
    """

    # Keys of per-parameter state that are counters: kept as float32 tensors on the CPU (as torch keeps
    # Adam's ``step``) so that reading them never syncs with an accelerator.
    _counter_keys: tuple[str, ...] = ("step",)
    # Moment keys -> whether their 8-bit form uses the signed map (first moments) or the unsigned one.
    _moments: dict[str, bool] = {}

    def __init__(self, params: Iterable[Any], defaults: dict[str, Any]) -> None:
        super().__init__(params, defaults)

    # -- param groups ------------------------------------------------------------------------------
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        self._validate_group(group)
        # A group added later joins the shared clock instead of starting its own.
        group["global_step"] = self.param_groups[0].get("global_step", 0) if len(self.param_groups) > 1 else 0

    def _validate_group(self, group: dict[str, Any]) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def _use_foreach(self, group: dict[str, Any], params: list[Tensor]) -> bool:
        if group.get("foreach") is None:
            _, foreach = _default_to_fused_or_foreach(params, differentiable=False, use_fused=False)
            return foreach
        return bool(group["foreach"])

    # -- stepping -----------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Perform one optimization step; returns the closure's loss (``None`` without a closure)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        step = self.param_groups[0].get("global_step", 0) + 1
        self._step(step)
        for group in self.param_groups:
            group["global_step"] = step
        return loss

    def _step(self, step: int) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    @staticmethod
    def _params_with_grad(group: dict[str, Any], owner: str) -> list[Tensor]:
        params = []
        for p in group["params"]:
            if p.grad is None:
                continue
            if p.grad.is_sparse:
                raise RuntimeError(f"{owner} does not support sparse gradients.")
            if torch.is_complex(p):
                raise RuntimeError(f"{owner} does not support complex parameters.")
            params.append(p)
        return params

    def _init_state(
        self,
        p: Tensor,
        keys: Iterable[str],
        counters: Iterable[str] = ("step",),
        on_device: bool = False,
        group: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """Lazily create zero moments (fp32 for half-precision params) and float32 counters.

        With ``group``, moments of a parameter that :func:`~lightning_optim.lowbit.is_low_bit` selects are
        created in the 8-bit layout, and existing moments are converted when the group's ``state_bits``
        changed. Counters live on the CPU, so reading them never syncs, unless ``on_device`` (a compiled
        step reads them on the device, as torch's capturable Adam does). A counter found on the other side
        (moved by Lightning's ``_optimizer_to_device`` on resume, or after switching paths) is moved once.
        """
        state = self.state[p]
        if not state:
            low_bit = group is not None and is_low_bit(group, p)
            for key in counters:
                state[key] = torch.tensor(0.0, dtype=torch.float32)
            for key in keys:
                if low_bit:
                    init_moment(state, key, self._moments[key], p)
                else:
                    state[key] = torch.zeros_like(p, dtype=state_dtype(p), memory_format=torch.preserve_format)
        elif group is not None:
            self._match_layout(group, p, state)
        device = p.device if on_device else torch.device("cpu")
        for key in counters:
            if state[key].device != device:
                state[key] = state[key].to(device)
        return state

    # -- 8-bit state ----------------------------------------------------------------------------------
    def _match_layout(self, group: dict[str, Any], p: Tensor, state: dict[str, Any]) -> bool:
        """Convert ``p``'s moments to the layout its group asks for; returns whether they are 8-bit."""
        low_bit = is_low_bit(group, p)
        for key, signed in self._moments.items():
            if low_bit and key in state:
                to_low_bit_(state, key, signed)
            elif not low_bit and is_quantized(state, key):
                to_full_(state, key, signed, state_dtype(p))
        return low_bit

    def _split_by_layout(self, states: list[dict[str, Any]]) -> tuple[list[int], list[int]]:
        """Indices of the parameters with full-precision moments and of those with 8-bit moments."""
        first = next(iter(self._moments))
        quantized = [is_quantized(s, first) for s in states]
        return [i for i, q in enumerate(quantized) if not q], [i for i, q in enumerate(quantized) if q]

    @contextlib.contextmanager
    def _low_bit_moments(self, p: Tensor, state: dict[str, Any], reset: bool = False) -> Iterator[list[Tensor]]:
        """Dequantized working copies of ``p``'s 8-bit moments (in ``_moments`` order), requantized on exit.

        ``reset`` first writes the zero code into every moment (absmax unchanged): the copies are then
        exact zeros. Nothing is stored if the body raises.
        """
        moments = LowBitMoments(state, self._moments, state_dtype(p))
        if reset:
            moments.reset_()
        yield moments.load()
        moments.store()

    def _step_by_layout(
        self,
        fn: Callable[..., None],
        params: list[Tensor],
        states: list[dict[str, Any]],
        keys: tuple[str, ...],
        *,
        zero_moments: bool,
        **kwargs: Any,
    ) -> None:
        """Run a functional step ``fn(params, grads, *state_lists, **kwargs)`` (state lists in ``keys`` order).

        Parameters with full-precision moments go through one multi-tensor call; each one with 8-bit
        moments goes through the same ``fn`` on fp32 copies of its moments, one tensor at a time
        (``zero_moments``: a reset step, the copies start from exact zeros).
        """
        full, low_bit = self._split_by_layout(states)
        if full:
            fn(
                [params[i] for i in full],
                [params[i].grad for i in full],
                *[[states[i][key] for i in full] for key in keys],
                **kwargs,
            )
        for i in low_bit:
            p, state = params[i], states[i]
            with self._low_bit_moments(p, state, reset=zero_moments) as moments:
                copies = dict(zip(self._moments, moments))
                fn([p], [p.grad], *[[copies[key] if key in copies else state[key]] for key in keys], **kwargs)

    def _device_scalar(self, name: str, device: torch.device, value: float) -> Tensor:
        """A persistent 0-dim float32 tensor on ``device`` set to ``value`` for a compiled step.

        ``fill_`` launches a kernel with the value as its argument: no sync, and the compiled graph sees
        the same tensor input every step, so it does not recompile. Created lazily (not in ``__init__``)
        because torch's ``Optimizer.__getstate__`` keeps only defaults, state and param groups.
        """
        scalars = self.__dict__.setdefault("_device_scalars", {})
        if (name, device) not in scalars:
            scalars[(name, device)] = torch.zeros((), dtype=torch.float32, device=device)
        return scalars[(name, device)].fill_(value)

    # -- state_dict ---------------------------------------------------------------------------------
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state dict without torch's cast of every state tensor to the parameter's dtype.

        torch casts all state to the parameter dtype, which would round fp32 moments of bf16 parameters to
        bf16, turn uint8 codes of 8-bit moments into floats and move CPU counters to the device; here each
        tensor keeps the dtype it was saved with (counters stay float32 on the CPU), so a resume continues
        bit for bit. ``state_bits`` is a storage choice of this run: each group keeps its own value (not
        the checkpoint's), and moments saved in the other layout (8-bit vs full precision) are converted.
        """
        saved = state_dict["state"]
        saved_ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        state_bits = [g.get("state_bits") for g in self.param_groups]
        super().load_state_dict(state_dict)
        for group, bits in zip(self.param_groups, state_bits):
            if bits is not None:
                group["state_bits"] = bits
                check_state_bits(bits, group.get("compile", False))
        params = [p for g in self.param_groups for p in g["params"]]
        for saved_id, p in zip(saved_ids, params):
            if saved_id not in saved or p not in self.state:
                continue
            for key, value in saved[saved_id].items():
                if not isinstance(value, Tensor):
                    continue
                if key in self._counter_keys:
                    self.state[p][key] = value.detach().to(device="cpu", dtype=torch.float32).clone()
                else:
                    self.state[p][key] = value.detach().to(device=p.device, dtype=value.dtype).clone()
        for group in self.param_groups:
            for p in group["params"]:
                if self.state.get(p):
                    self._match_layout(group, p, self.state[p])


def adam_update_single(
    param: Tensor,
    grad: Tensor,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    t: float,
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
) -> None:
    """Decoupled decay then the Adam moment update and step, in torch's single-tensor AdamW order."""
    exp_avg.lerp_(grad, 1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    if weight_decay != 0:
        param.mul_(1 - lr * weight_decay)
    step_size = lr / (1 - beta1**t)
    denom = (exp_avg_sq.sqrt() / (1 - beta2**t) ** 0.5).add_(eps)
    param.addcdiv_(exp_avg, denom, value=-step_size)


def adam_update_foreach(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    counts: list[float],
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
) -> None:
    """Multi-tensor twin of :func:`adam_update_single` (torch's foreach AdamW order, per-tensor step counts)."""
    torch._foreach_lerp_(exp_avgs, grads, 1 - beta1)
    torch._foreach_mul_(exp_avg_sqs, beta2)
    torch._foreach_addcmul_(exp_avg_sqs, grads, grads, 1 - beta2)
    if weight_decay != 0:
        torch._foreach_mul_(params, 1 - lr * weight_decay)
    step_sizes = [-(lr / (1 - beta1**t)) for t in counts]
    denom = torch._foreach_sqrt(exp_avg_sqs)
    torch._foreach_div_(denom, [(1 - beta2**t) ** 0.5 for t in counts])
    torch._foreach_add_(denom, eps)
    torch._foreach_addcdiv_(params, exp_avgs, denom, step_sizes)


def check_compile(compile: Any) -> None:
    if not isinstance(compile, bool):
        raise ValueError(f"Invalid compile: {compile!r}; must be True or False.")


@functools.cache
def compiled(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``torch.compile(fn)``, built once per function and shared by every optimizer instance."""
    return torch.compile(fn, dynamic=False)


def capturable_adam_denoms(exp_avg_sqs: list[Tensor], steps: list[Tensor], beta2: float, eps: float) -> list[Tensor]:
    """√v / √(1 − β2^t) + ε with the step counters on the device (torch's capturable Adam), for compiled steps."""
    bc2_sqrt = torch._foreach_pow(beta2, steps)
    torch._foreach_sub_(bc2_sqrt, 1)
    torch._foreach_neg_(bc2_sqrt)
    torch._foreach_sqrt_(bc2_sqrt)
    denoms = torch._foreach_sqrt(exp_avg_sqs)
    torch._foreach_div_(denoms, bc2_sqrt)
    torch._foreach_add_(denoms, eps)
    return denoms
