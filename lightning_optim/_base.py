"""Shared machinery of lightning-optim's optimizers.

Every optimizer here keeps the global step T in its param groups (``group["global_step"]``, completed
steps) so that ``state_dict()``/``load_state_dict()`` resume schedules and resets exactly, validates its
hyper-parameters per param group, keeps fp32 state for bf16/fp16 parameters and offers a per-parameter
reference path next to a multi-tensor (``torch._foreach_*``) path.
"""

from __future__ import annotations

import contextlib
import functools
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import Tensor
from torch.optim.optimizer import Optimizer, _default_to_fused_or_foreach

from lightning_optim.lowbit import (
    LowBitMoments,
    init_moment,
    is_low_bit,
    is_quantized,
    quantized_keys,
    to_full_,
    to_low_bit_,
    warn_if_embedding_like,
)

_LOW_PRECISION = (torch.float16, torch.bfloat16)
#: param-group options that say how a step runs and stores its state, not what it computes: a resumed
#: run keeps its own values (see :meth:`StepCountedOptimizer.load_state_dict`)
_RUN_OPTIONS = ("state_bits", "foreach", "compile")

@dataclass(frozen=True)
class StateSpec:
    """What an optimizer keeps per parameter, declared once on the class (``state_spec``).

    The 8-bit layout, the moment reset, the state adapter the callbacks use, the conversion of a state
    dict saved by another optimizer and the registry's capability flags all follow from it.

    Args:
        moments: moment keys, in the order the functional steps take them, mapped to whether their 8-bit
            form uses the signed dynamic map (first moments) or the unsigned one (second moments).
        first_moment: the key of the EMA of g that momentum callbacks read and reset (None: none).
        second_moment: the key of the second moment (an EMA of squared gradients) that resets zero
            (None: none kept).
        second_moment_like_grad_sq: the second moment is the raw (not bias-corrected) EMA of the
            gradient's own g², comparable to ``grad ** 2``, so SpikeAwareClipping may clip against it
            (False e.g. for Stable-SPAM, whose v is the EMA of the normalised gradient).
        counters: per-parameter step counters, kept as float32 CPU tensors (device ones when compiled).
        scalars: further per-parameter 0-dim statistics (created as zeros), never reset.
    """

    moments: dict[str, bool] = field(default_factory=dict)
    first_moment: str | None = None
    second_moment: str | None = None
    second_moment_like_grad_sq: bool = True
    counters: tuple[str, ...] = ("step",)
    scalars: tuple[str, ...] = ()

    @property
    def keys(self) -> tuple[str, ...]:
        """Every key a full-precision state of one parameter holds."""
        return (*self.moments, *self.counters, *self.scalars)

    def stored_keys(self) -> set[str]:
        """Every key a state may hold, in either layout (``<key>_codes``/``<key>_absmax`` when 8-bit)."""
        quantized = {name for k, signed in self.moments.items() for name in quantized_keys(k, signed)}
        return set(self.keys) | quantized


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

    #: the per-parameter state, declared once (see :class:`StateSpec`)
    state_spec: StateSpec = StateSpec()

    def __init__(self, params: Iterable[Any], defaults: dict[str, Any]) -> None:
        super().__init__(params, defaults)

    @property
    def _moments(self) -> dict[str, bool]:
        return self.state_spec.moments

    @property
    def _counter_keys(self) -> tuple[str, ...]:
        return self.state_spec.counters

    # -- param groups ------------------------------------------------------------------------------
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        self._validate_group(group)
        warn_if_embedding_like(group, self)
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

    def _init_state(self, p: Tensor, group: dict[str, Any]) -> dict[str, Any]:
        """The state of ``p``, with every key of :attr:`state_spec` created if missing.

        Moments start as exact zeros (fp32 for half-precision params), in the 8-bit layout when
        :func:`~lightning_optim.lowbit.is_low_bit` selects ``p``; existing moments are converted when the
        group's ``state_bits`` changed. Missing keys are filled one by one, so a state converted from
        another optimizer (e.g. torch AdamW's ``exp_avg``/``exp_avg_sq``/``step``) gets what it lacks.
        Counters live on the CPU, so reading them never syncs, unless the group is compiled (a compiled
        step reads them on the device, as torch's capturable Adam does). A counter found on the other
        side (moved by Lightning's ``_optimizer_to_device`` on resume, or after switching paths) is moved once.
        """
        spec = self.state_spec
        state = self.state[p]
        low_bit = self._match_layout(group, p, state)
        for key in spec.counters:
            if key not in state:
                state[key] = torch.tensor(0.0, dtype=torch.float32)
        for key, signed in spec.moments.items():
            if key in state or is_quantized(state, key):
                continue
            if low_bit:
                init_moment(state, key, signed, p)
            else:
                state[key] = torch.zeros_like(p, dtype=state_dtype(p), memory_format=torch.preserve_format)
        for key in spec.scalars:
            if key not in state:
                state[key] = torch.zeros((), dtype=state_dtype(p), device=p.device)
        device = p.device if group.get("compile", False) else torch.device("cpu")
        for key in spec.counters:
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

        ``reset`` first resets every moment (zero code, absmax 0, as a fresh moment): the copies are then
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
        """Load a state dict: exact dtypes, re-validated hyper-parameters, foreign state converted or refused.

        torch casts all state to the parameter dtype, which would round fp32 moments of bf16 parameters to
        bf16, turn uint8 codes of 8-bit moments into floats and move CPU counters to the device; here each
        tensor keeps the dtype it was saved with (counters stay float32 on the CPU), so a resume continues
        bit for bit. ``state_bits``, ``foreach`` and ``compile`` are choices of this run: each group keeps
        its own values (not the checkpoint's; resuming an eager run with ``compile=True`` compiles), and
        moments saved in the other layout (8-bit vs full precision) are converted.

        Every loaded param group is validated like a constructor argument (a checkpoint edited to
        ``lr=-5`` raises ``ValueError``, and the optimizer is left as it was). A state dict saved by
        another optimizer (e.g. torch AdamW, after a config switched to SPAM) is converted when its
        per-parameter state only holds keys this optimizer knows (:attr:`state_spec`): hyper-parameters
        it lacks come from this optimizer's constructor arguments, missing state starts at zero, the
        global step is taken from the saved ``step`` counts, and a ``UserWarning`` lists what was filled.
        Any other state key raises ``ValueError`` naming the keys and what to do.
        """
        state_dict = self._adopt_foreign(state_dict)
        saved = state_dict["state"]
        saved_ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        # how this run executes and stores the step is its own choice, not the checkpoint's
        run_options = [{k: g[k] for k in _RUN_OPTIONS if k in g} for g in self.param_groups]
        backup = ([dict(g) for g in self.param_groups], self.state)
        super().load_state_dict(state_dict)
        for group, options in zip(self.param_groups, run_options):
            group.update(options)
        try:
            for i, group in enumerate(self.param_groups):
                self._validate_group(group)
        except ValueError as error:
            self.param_groups[:] = backup[0]
            self.state = backup[1]
            raise ValueError(
                f"{type(self).__name__}.load_state_dict: param group {i} of the state dict is invalid: {error} "
                "Fix the value in the checkpoint, or resume the model weights only."
            ) from error
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

    def _adopt_foreign(self, state_dict: dict[str, Any]) -> dict[str, Any]:
        """``state_dict`` itself when this optimizer saved it; else a converted copy, or a ``ValueError``."""
        groups = state_dict.get("param_groups")
        if not isinstance(groups, list) or not isinstance(state_dict.get("state"), dict):
            raise ValueError(
                f"{type(self).__name__}.load_state_dict expects an optimizer state dict with 'state' and "
                f"'param_groups', got keys {sorted(map(str, state_dict))}."
            )
        known = self.state_spec.stored_keys()
        foreign_keys = sorted({str(k) for s in state_dict["state"].values() for k in s if k not in known})
        missing = [sorted(k for k in self.defaults if k not in g) for g in groups]
        if not foreign_keys and not any(missing) and all("global_step" in g for g in groups):
            return state_dict
        name = type(self).__name__
        if foreign_keys:
            raise ValueError(
                f"{name}.load_state_dict: the state dict was saved by another optimizer (per-parameter state "
                f"keys {foreign_keys} are not {name}'s {sorted(self.state_spec.keys)}; group keys "
                f"{sorted({str(k) for g in groups for k in g} - {'params'})}). Resume with the optimizer that "
                "saved it, or load only the model weights (e.g. `LightningModule.load_from_checkpoint` then a "
                "fresh fit, or `torch.load(path)['state_dict']`) and let this optimizer start from zero."
            )
        if len(groups) != len(self.param_groups):
            raise ValueError(
                f"{name}.load_state_dict: the state dict has {len(groups)} param groups, this optimizer has "
                f"{len(self.param_groups)}; build it with the same param groups as the one that saved it."
            )
        steps = [float(s["step"]) for s in state_dict["state"].values() if "step" in s]
        converted = []
        for group, current in zip(groups, self.param_groups):
            filled = {k: current[k] for k in self.defaults if k not in group}
            new = {**group, **filled}
            new.setdefault("global_step", int(max(steps, default=0)))
            converted.append(new)
        warnings.warn(
            f"{name}.load_state_dict: converting a state dict saved by another optimizer; hyper-parameters it "
            f"lacked were taken from {name}'s arguments ({sorted({k for m in missing for k in m})}), state "
            f"{name} keeps that it lacked starts at zero, and the global step is the largest saved step.",
            UserWarning,
            stacklevel=3,
        )
        return {**state_dict, "param_groups": converted}


@functools.cache
def compiled(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``torch.compile(fn)``, built once per function and shared by every optimizer instance."""
    return torch.compile(fn, dynamic=False)
