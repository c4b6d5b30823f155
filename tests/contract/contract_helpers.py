"""Machinery of the fault contract (tests/contract): paths, faults, tiny parameter sets and one step driver.

Everything is derived from the optimizer registry (:func:`lightning_optim.optimizers`), so an optimizer is
covered the day it is registered. Capability flags decide how it is driven:

- ``matrix_only``: only 2-D parameters are built (the bias is left out; the other params are matrices);
- ``needs_closure``: every step gets a closure (in fact every optimizer does: Lightning always passes
  one, and the closure is where the faults are injected);
- ``needs_hvp``: the closure's backward uses ``create_graph=True`` and faults are injected without
  cutting the gradient's graph;
- ``total_steps_arg``: set to the run's length;
- ``foreach`` / ``compile`` / ``state_bits_8``: which paths apply.

This module is named ``contract_helpers`` (not ``conftest``): tests/conftest.py is imported as the module
``conftest`` by the rest of the suite, and a second ``conftest.py`` here would replace it in
``sys.modules`` during a full run.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch
from torch import Tensor

import lightning_optim
from lightning_optim.registry import OptimizerInfo

OURS: list[OptimizerInfo] = lightning_optim.optimizers(ours=True)

N_STEPS = 6  # steps of every fault sequence
FAULT_STEP = 2  # 0-based step that receives a one-step fault
SPLIT = 3  # round trip: steps before the state_dict is saved (the fault step lies before it)


# --- paths --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Path:
    """One way of running an optimizer: constructor overrides and the capability flags it needs."""

    name: str
    overrides: dict[str, Any]
    requires: tuple[str, ...] = ()
    large: bool = False  # parameters of >= 4096 elements (8-bit state applies only to those)

    def applies(self, info: OptimizerInfo) -> bool:
        return all(getattr(info, flag) for flag in self.requires)

    def kwargs(self, info: OptimizerInfo) -> dict[str, Any]:
        """The overrides this optimizer's constructor accepts (``foreach`` only where it has one)."""
        return {k: v for k, v in self.overrides.items() if k in info.defaults or k in ("compile", "state_bits")}


PER_PARAM = Path("per_param", {"foreach": False})
FOREACH = Path("foreach", {"foreach": True}, ("foreach",))
COMPILED = Path("compiled", {"compile": True}, ("compile",))
EIGHT_BIT = Path("8bit", {"state_bits": 8, "foreach": False}, ("state_bits_8",), large=True)
EIGHT_BIT_FOREACH = Path("8bit_foreach", {"state_bits": 8, "foreach": True}, ("state_bits_8", "foreach"), large=True)
PER_PARAM_LARGE = Path("per_param_large", {"foreach": False}, large=True)  # the 32-bit reference of 8-bit
EAGER_PATHS = (PER_PARAM, FOREACH, EIGHT_BIT, EIGHT_BIT_FOREACH)


# --- faults -------------------------------------------------------------------------------------------
GradEdit = Callable[[dict[str, Tensor], int], None]


@dataclass(frozen=True)
class Fault:
    """A fault sequence of :data:`N_STEPS` steps.

    Args:
        name: test id.
        finite: every gradient of the sequence is finite (so the weights must stay finite).
        benign: ordinary gradients, on which 8-bit state must stay close to 32-bit state.
        dtype: dtype of the parameters.
        sparse_rows: add an embedding-shaped parameter whose rows get gradients only on some steps.
        extra_group: ``"empty"`` (a param group with ``params: []``) or ``"no_grad"`` (a group whose only
            parameter never gets a gradient).
        edit: changes the gradients after backward: ``edit(params, step)``.
    """

    name: str
    finite: bool = True
    benign: bool = False
    dtype: torch.dtype = torch.float32
    sparse_rows: bool = False
    extra_group: str | None = None
    edit: GradEdit | None = field(default=None, compare=False)


def set_grad(p: Tensor, value: Tensor | None) -> None:
    """Replace ``p.grad``; a gradient with a graph (``create_graph=True``) keeps it (value + 0·graph)."""
    if value is None or p.grad is None or not p.grad.requires_grad:
        p.grad = value
    else:
        p.grad = p.grad + (value.to(p.grad.dtype) - p.grad).detach()


def _entry(value: float, step: int = FAULT_STEP, name: str = "w1") -> GradEdit:
    """Set one entry of ``name``'s gradient to ``value`` at ``step``."""

    def edit(params: dict[str, Tensor], i: int) -> None:
        if i == step:
            g = params[name].grad.detach().clone()
            g.view(-1)[1] = value
            set_grad(params[name], g)

    return edit


def _zero_after_large(params: dict[str, Tensor], i: int) -> None:
    """A 1e4× gradient at FAULT_STEP, then two all-zero gradients."""
    for p in params.values():
        if p.grad is None:
            continue
        if i == FAULT_STEP:
            set_grad(p, p.grad.detach() * 1e4)
        elif i in (FAULT_STEP + 1, FAULT_STEP + 2):
            set_grad(p, torch.zeros_like(p.grad))


def _missing_grad(params: dict[str, Tensor], i: int) -> None:
    """``w2`` has no gradient on steps 0, 2 and 3 (its state is created late, then it skips steps)."""
    if i in (0, FAULT_STEP, FAULT_STEP + 1):
        params["w2"].grad = None


FAULTS: tuple[Fault, ...] = (
    Fault("none", benign=True),
    Fault("nan_entry", finite=False, edit=_entry(math.nan)),
    Fault("inf_entry", finite=False, edit=_entry(math.inf)),
    Fault("entry_1e20", edit=_entry(1e20)),  # finite, but its square overflows fp32
    Fault("zero_after_large", edit=_zero_after_large),
    Fault("sparse_rows", benign=True, sparse_rows=True),
    Fault("bf16", benign=True, dtype=torch.bfloat16),
    Fault("fp16", benign=True, dtype=torch.float16),
    Fault("bf16_entry_1e20", dtype=torch.bfloat16, edit=_entry(1e20)),  # finite in bf16, square overflows
    Fault("fp16_entry_6e4", dtype=torch.float16, edit=_entry(6e4)),  # finite in fp16, square overflows fp16
    Fault("empty_group", benign=True, extra_group="empty"),
    Fault("no_grad_group", benign=True, extra_group="no_grad"),
    Fault("missing_grad", benign=True, edit=_missing_grad),
)


def _compiled_finite(params: dict[str, Tensor], i: int) -> None:
    """The finite faults in one sequence (the compiled path: same shapes and dtypes on every step, so one
    graph per optimizer serves every compiled case): a 1e20 entry at step 1, 1e4× at 3, zeros at 4."""
    _entry(1e20, 1)(params, i)
    for p in params.values():
        if i == 3:
            set_grad(p, p.grad.detach() * 1e4)
        elif i == 4:
            set_grad(p, torch.zeros_like(p.grad))


def _compiled_non_finite(params: dict[str, Tensor], i: int) -> None:
    """The non-finite faults in one sequence (compiled path): an inf entry at step 2, a NaN entry at 4."""
    _entry(math.inf, 2)(params, i)
    _entry(math.nan, 4)(params, i)


COMPILED_FAULTS: tuple[Fault, ...] = (
    Fault("finite_sequence", edit=_compiled_finite),
    Fault("non_finite_sequence", finite=False, edit=_compiled_non_finite),
)
FAULTS_BY_NAME = {f.name: f for f in FAULTS + COMPILED_FAULTS}


# --- parameters and the loss ------------------------------------------------------------------------
def shapes(info: OptimizerInfo, fault: Fault, large: bool) -> dict[str, tuple[int, ...]]:
    """A couple of Linear-like parameters; 64×64 (8-bit eligible) when ``large``."""
    out: dict[str, tuple[int, ...]] = {
        "w1": (64, 64) if large else (4, 3),
        "b1": (64,) if large else (4,),
        "w2": (2, 64) if large else (2, 4),  # stays 32-bit on the 8-bit path: mixed layouts
    }
    if fault.sparse_rows:
        out["emb"] = (1024, 4) if large else (16, 4)  # nn.Embedding-shaped: num_embeddings × dim
    if fault.extra_group == "no_grad":
        out["frozen"] = (2, 2)
    if info.matrix_only:
        out = {k: v for k, v in out.items() if len(v) == 2}
    return out


def make_params(info: OptimizerInfo, fault: Fault, large: bool, seed: int = 0) -> dict[str, torch.nn.Parameter]:
    gen = torch.Generator().manual_seed(seed)
    return {
        name: torch.nn.Parameter((0.5 * torch.randn(shape, generator=gen)).to(fault.dtype))
        for name, shape in shapes(info, fault, large).items()
    }


def param_groups(params: dict[str, Tensor], fault: Fault) -> list[dict[str, Any]]:
    main = [p for name, p in params.items() if name != "frozen"]
    groups: list[dict[str, Any]] = [{"params": main}]
    if fault.extra_group == "empty":
        groups.append({"params": []})
    elif fault.extra_group == "no_grad":
        groups.append({"params": [params["frozen"]]})
    return groups


RARE_SCALE = 1e-4  # rare embedding rows: gradients 1e-4 of the frequent rows' (a rare token)


def _embedding_rows(rows: int, step: int) -> tuple[Tensor, Tensor]:
    """Row indices that get a gradient at ``step`` and their scale: rows r ≡ 0 (mod 8) every step (scale
    1), rows r ≡ 1 (mod 8) only on steps 0 and 3 (scale RARE_SCALE); every other row never (exact zeros)."""
    r = torch.arange(rows)
    frequent = r[r % 8 == 0]
    if step in (0, 3):
        rare = r[r % 8 == 1]
        return torch.cat([frequent, rare]), torch.cat([torch.ones(len(frequent)), torch.full((len(rare),), RARE_SCALE)])
    return frequent, torch.ones(len(frequent))


def loss_fn(params: dict[str, Tensor], step: int) -> Tensor:
    """A quadratic pull towards per-step random targets: g = p − t (no feedback that could blow up a
    weight made huge by a fault); the embedding only through the rows of :func:`_embedding_rows`."""
    gen = torch.Generator().manual_seed(1000 + step)
    total = torch.zeros(())
    for name in sorted(params):
        if name == "frozen":
            continue
        p = params[name].float()
        target = torch.randn(p.shape, generator=gen)
        if name == "emb":
            idx, scale = _embedding_rows(p.shape[0], step)
            total = total + 0.5 * (scale[:, None] * (p[idx] - target[idx]) ** 2).sum()
        else:
            total = total + 0.5 * ((p - target) ** 2).sum()
    return total


# --- building and stepping --------------------------------------------------------------------------
def build(info: OptimizerInfo, groups: Any, path: Path, **overrides: Any) -> torch.optim.Optimizer:
    kwargs = path.kwargs(info)
    if info.total_steps_arg is not None:
        kwargs.setdefault(info.total_steps_arg, N_STEPS)
    kwargs.update(overrides)
    return info.build(groups, **kwargs)


def step(
    optimizer: torch.optim.Optimizer,
    params: dict[str, Tensor],
    info: OptimizerInfo,
    fault: Fault,
    i: int,
    grads: Callable[[dict[str, Tensor], int], None] | None = None,
) -> None:
    """One optimizer step through a closure: backward of :func:`loss_fn`, then the fault's edit
    (``grads`` replaces the gradients instead, for fuzzing)."""

    def closure() -> Tensor:
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(params, i)
        loss.backward(create_graph=info.needs_hvp)
        if grads is not None:
            grads(params, i)
        if fault.edit is not None:
            fault.edit(params, i)
        return loss.detach()

    optimizer.step(closure)


def run(
    info: OptimizerInfo,
    path: Path,
    fault: Fault,
    steps: range,
    params: dict[str, torch.nn.Parameter] | None = None,
    optimizer: torch.optim.Optimizer | None = None,
) -> tuple[dict[str, torch.nn.Parameter], torch.optim.Optimizer]:
    if params is None:
        params = make_params(info, fault, path.large)
    if optimizer is None:
        optimizer = build(info, param_groups(params, fault), path)
    for i in steps:
        step(optimizer, params, info, fault, i)
    return params, optimizer


def weights(params: dict[str, Tensor]) -> dict[str, Tensor]:
    return {name: p.detach().clone() for name, p in params.items()}


def fresh_copy(
    info: OptimizerInfo, fault: Fault, path: Path, params: dict[str, Tensor], optimizer: torch.optim.Optimizer
) -> tuple[dict[str, torch.nn.Parameter], torch.optim.Optimizer]:
    """A checkpoint round trip: deep copies of the weights and of ``optimizer.state_dict()`` loaded into
    parameters with a different init and a freshly built optimizer."""
    saved_weights, saved_state = copy.deepcopy((weights(params), optimizer.state_dict()))
    resumed = make_params(info, fault, path.large, seed=1)
    with torch.no_grad():
        for name, p in resumed.items():
            p.copy_(saved_weights[name])
    resumed_optimizer = build(info, param_groups(resumed, fault), path)
    resumed_optimizer.load_state_dict(saved_state)
    return resumed, resumed_optimizer


# --- comparisons -------------------------------------------------------------------------------------
_INT_VIEW = {
    torch.float64: torch.int64,
    torch.float32: torch.int32,
    torch.bfloat16: torch.int16,
    torch.float16: torch.int16,
}


def bit_equal(a: Tensor, b: Tensor) -> bool:
    """Same dtype, shape, device and bits (NaNs included, unlike ``torch.equal``)."""
    if a.dtype != b.dtype or a.shape != b.shape or a.device != b.device:
        return False
    if a.dtype in _INT_VIEW:
        return torch.equal(a.contiguous().view(_INT_VIEW[a.dtype]), b.contiguous().view(_INT_VIEW[b.dtype]))
    return torch.equal(a, b)


def differences(a: Any, b: Any, where: str = "") -> Iterator[str]:
    """Where two nested structures (state dicts) are not bit-identical."""
    if isinstance(a, Tensor) or isinstance(b, Tensor):
        if not (isinstance(a, Tensor) and isinstance(b, Tensor) and bit_equal(a, b)):
            yield where
    elif isinstance(a, dict) and isinstance(b, dict):
        if set(a) != set(b):
            yield f"{where} keys {sorted(map(str, set(a) ^ set(b)))}"
        for key in set(a) & set(b):
            yield from differences(a[key], b[key], f"{where}[{key!r}]")
    elif isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        if len(a) != len(b):
            yield f"{where} length {len(a)} != {len(b)}"
        for i, (x, y) in enumerate(zip(a, b)):
            yield from differences(x, y, f"{where}[{i}]")
    elif not (a == b or (isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b))):
        yield f"{where}: {a!r} != {b!r}"


def tensors(value: Any) -> Iterator[Tensor]:
    """Every tensor in a nested dict/list/tuple (a state dict, a checkpoint)."""
    if isinstance(value, Tensor):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from tensors(item)
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from tensors(item)


def non_finite(items: Any) -> int:
    """Number of NaN/Inf entries in the floating-point tensors of ``items``."""
    return sum(int((~torch.isfinite(t.detach())).sum()) for t in tensors(items) if t.is_floating_point())


TOLERANCES = {  # per-parameter vs foreach (vs compiled): both compute in fp32, half-precision rounds once
    torch.float32: dict(rtol=1e-5, atol=1e-6),
    torch.bfloat16: dict(rtol=1e-2, atol=1e-2),
    torch.float16: dict(rtol=2e-3, atol=1e-3),
}


# --- parametrization -------------------------------------------------------------------------------
def optimizer_param(info: OptimizerInfo, *values: Any, id_suffix: str = "", skip: str | None = None) -> Any:
    marks = [pytest.mark.skip(reason=skip)] if skip else []
    return pytest.param(info, *values, id=f"{info.name}{id_suffix}", marks=marks)


def path_cases(spec: tuple[tuple[Path, tuple[Fault, ...] | None], ...]) -> list[Any]:
    """(info, path[, fault]) for every registered optimizer and every (path, faults) of ``spec`` (faults
    None: no fault argument); paths an optimizer does not offer are listed as skipped."""
    cases = []
    for info in OURS:
        for path, faults in spec:
            skip = None
            if not path.applies(info):
                skip = f"{info.name} does not offer the {path.name} path ({', '.join(path.requires)})"
            if faults is None:
                cases.append(optimizer_param(info, path, id_suffix=f"-{path.name}", skip=skip))
                continue
            for fault in faults:
                cases.append(optimizer_param(info, path, fault, id_suffix=f"-{path.name}-{fault.name}", skip=skip))
    return cases


EAGER = tuple((path, FAULTS) for path in EAGER_PATHS)
ALL_PATHS = EAGER + ((COMPILED, COMPILED_FAULTS),)
