"""The optimizer fault contract: every registered optimizer of ours × path × fault (see contract_helpers).

(a) finite gradients never make the weights non-finite, and no fault makes ``step`` raise;
(b) the paths agree: per-parameter vs foreach vs compiled within a tight tolerance, 8-bit within a loose
    tolerance of 32-bit on benign gradients;
(c) a ``state_dict`` round trip into fresh parameters and a fresh optimizer continues bit for bit;
(d) a torch AdamW state dict is converted (with a UserWarning) or refused with a ValueError naming the
    foreign keys, never a KeyError at the next step;
(e) NaN/inf/negative hyper-parameters are rejected with a ValueError naming the argument, by the
    constructor and by ``load_state_dict``, which leaves the optimizer as it was.

Plus a hypothesis fuzz: finite gradients of any magnitude in [1e-30, 1e30] keep the weights finite.
Nothing here names an optimizer: a newly registered one is covered as it is.
"""

from __future__ import annotations

import copy
import functools
import math
import warnings
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from contract_helpers import (
    ALL_PATHS,
    COMPILED,
    COMPILED_FAULTS,
    EIGHT_BIT,
    EIGHT_BIT_FOREACH,
    FAULTS,
    FAULTS_BY_NAME,
    FOREACH,
    N_STEPS,
    OURS,
    PER_PARAM,
    PER_PARAM_LARGE,
    SPLIT,
    TOLERANCES,
    Fault,
    Path,
    build,
    differences,
    fresh_copy,
    make_params,
    non_finite,
    optimizer_param,
    param_groups,
    path_cases,
    run,
    set_grad,
    step,
    weights,
)
from lightning_optim.registry import OptimizerInfo

INFOS = {info.name: info for info in OURS}
PATHS = {p.name: p for p in (PER_PARAM, FOREACH, COMPILED, EIGHT_BIT, EIGHT_BIT_FOREACH, PER_PARAM_LARGE)}


@functools.cache
def _final(info_name: str, path_name: str, fault_name: str) -> dict[str, torch.Tensor]:
    """Weights after the whole fault sequence (cached: (a) and (b) share the runs)."""
    params, _ = run(INFOS[info_name], PATHS[path_name], FAULTS_BY_NAME[fault_name], range(N_STEPS))
    return weights(params)


def final(info: OptimizerInfo, path: Path, fault: Fault) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in _final(info.name, path.name, fault.name).items()}


def _reference(info: OptimizerInfo, path: Path) -> Path:
    """The path ``path`` must agree with."""
    if path is COMPILED:
        return FOREACH if info.foreach else PER_PARAM
    return {FOREACH.name: PER_PARAM, EIGHT_BIT_FOREACH.name: EIGHT_BIT}[path.name]


# --- (a) finite weights, no raise ---------------------------------------------------------------------
@pytest.mark.parametrize("info, path, fault", path_cases(ALL_PATHS))
def test_step_survives_the_fault(info: OptimizerInfo, path: Path, fault: Fault) -> None:
    """No fault makes step() raise; with finite gradients the weights stay finite (and keep their dtype)."""
    result = final(info, path, fault)
    assert all(w.dtype == fault.dtype for w in result.values())
    if fault.finite:
        bad = {name: non_finite(w) for name, w in result.items() if non_finite(w)}
        assert not bad, f"non-finite weight entries after finite gradients: {bad}"


# --- (b) the paths agree ----------------------------------------------------------------------------
@pytest.mark.parametrize(
    "info, path, fault", path_cases(((FOREACH, FAULTS), (EIGHT_BIT_FOREACH, FAULTS), (COMPILED, COMPILED_FAULTS)))
)
def test_paths_agree(info: OptimizerInfo, path: Path, fault: Fault) -> None:
    """foreach = per-parameter (8-bit foreach = 8-bit per-parameter; compiled = eager multi-tensor),
    NaN in the same places."""
    reference = _reference(info, path)
    expected, got = final(info, reference, fault), final(info, path, fault)
    for name in expected:
        torch.testing.assert_close(
            got[name], expected[name], equal_nan=True, **TOLERANCES[fault.dtype],
            msg=lambda m, name=name: f"{path.name} vs {reference.name}, parameter {name}: {m}",
        )


# |w8 − w32| ≤ this · max |w32 − w0| for every entry: 8-bit never drifts further than the largest 32-bit
# move (rare 1e-4 embedding rows reach ~0.5 from quantization alone; a v rounded to 0 moves by ~1e3·lr)
EIGHT_BIT_TOLERANCE = 1.0


@pytest.mark.parametrize("info, path, fault", path_cases(((EIGHT_BIT, tuple(f for f in FAULTS if f.benign)),)))
def test_8bit_state_stays_close_to_32bit(info: OptimizerInfo, path: Path, fault: Fault) -> None:
    """On benign gradients (sparse embedding rows with 1e-4 rare-row gradients included) no entry of the
    8-bit run drifts from the 32-bit run by more than half the largest 32-bit move, over a few steps."""
    start = weights(make_params(info, fault, large=True))
    w32, w8 = final(info, PER_PARAM_LARGE, fault), final(info, path, fault)
    largest_move = max(float((w32[k].float() - start[k].float()).abs().max()) for k in w32)
    assert largest_move > 0
    for name in w32:
        drift = float((w8[name].float() - w32[name].float()).abs().max())
        assert drift <= EIGHT_BIT_TOLERANCE * largest_move, (
            f"parameter {name} {tuple(w32[name].shape)}: 8-bit drifts {drift:.3g} from 32-bit, "
            f"the largest 32-bit move is {largest_move:.3g}"
        )


# --- (c) exact state_dict round trip ------------------------------------------------------------------
@pytest.mark.parametrize("info, path, fault", path_cases(ALL_PATHS))
def test_state_dict_round_trip_is_exact(info: OptimizerInfo, path: Path, fault: Fault) -> None:
    """k steps, save, load into fresh params and a fresh optimizer, m more steps on both: bit-identical
    weights and optimizer state."""
    params, optimizer = run(info, path, fault, range(SPLIT))
    resumed, resumed_optimizer = fresh_copy(info, fault, path, params, optimizer)
    run(info, path, fault, range(SPLIT, N_STEPS), params, optimizer)
    run(info, path, fault, range(SPLIT, N_STEPS), resumed, resumed_optimizer)
    diff = list(differences(weights(resumed), weights(params), "weights"))
    diff += differences(resumed_optimizer.state_dict(), optimizer.state_dict(), "state_dict")
    assert not diff, f"the resumed run differs in: {diff[:10]}"


# --- (d) a foreign (torch AdamW) state dict -----------------------------------------------------------
def _state_keys(optimizer: torch.optim.Optimizer) -> set[str]:
    return {str(k) for s in optimizer.state.values() for k in s}


@pytest.mark.parametrize("info, path", path_cases(tuple((p, None) for p in (PER_PARAM, FOREACH, COMPILED, EIGHT_BIT))))
def test_foreign_adamw_state_dict_converts_or_is_refused(info: OptimizerInfo, path: Path) -> None:
    """A config switched from AdamW: its state dict is converted (UserWarning; the next steps run, weights
    finite) or refused with a ValueError naming the foreign keys (the optimizer stays usable)."""
    fault = FAULTS_BY_NAME["none"]
    params = make_params(info, fault, path.large)
    # the hyper-parameters both share as the config had them (a changed constant would also recompile)
    shared = {k: info.defaults[k] for k in ("lr", "betas", "eps", "weight_decay") if k in info.defaults}
    adamw = torch.optim.AdamW(param_groups(params, fault), **shared)
    run(info, path, fault, range(3), params, adamw)
    foreign = copy.deepcopy(adamw.state_dict())
    adamw_keys = {str(k) for s in foreign["state"].values() for k in s}

    probe_params = make_params(info, fault, path.large)  # the keys this optimizer keeps itself
    _, probe = run(info, path, fault, range(1), probe_params)
    foreign_keys = sorted(adamw_keys - _state_keys(probe))

    optimizer = build(info, param_groups(params, fault), path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            optimizer.load_state_dict(foreign)
        except ValueError as error:
            message = str(error)
            assert any(k in message for k in adamw_keys), f"the ValueError names no state key: {message}"
            unnamed = [k for k in foreign_keys if k not in message]
            assert not unnamed, f"the ValueError does not name the foreign keys {unnamed}: {message}"
        else:
            assert any(issubclass(w.category, UserWarning) for w in caught), (
                f"a foreign state dict was loaded silently (keys {sorted(adamw_keys)}); expected a UserWarning"
            )
    run(info, path, fault, range(3, 6), params, optimizer)  # never a KeyError at the next step
    assert non_finite(params) == 0


# --- (e) bad hyper-parameters -------------------------------------------------------------------------
def _fmt(value: Any) -> str:
    return ",".join(map(_fmt, value)) if isinstance(value, tuple) else repr(value)


def bad_values(info: OptimizerInfo) -> list[tuple[str, Any]]:
    """NaN and inf (unless documented as valid) for every numeric default (each entry of ``betas``), and
    -1 for lr, weight_decay and eps; NaN and inf for the total-steps argument too."""
    out: list[tuple[str, Any]] = []
    for name, default in info.defaults.items():
        non_finite_values = (math.nan,) if name in info.accepts_inf else (math.nan, math.inf)
        if name == "betas" and isinstance(default, tuple):
            for i in range(len(default)):
                for bad in non_finite_values:
                    out.append((name, tuple(bad if j == i else b for j, b in enumerate(default))))
            continue
        if isinstance(default, bool) or not isinstance(default, (int, float)):
            continue
        out += [(name, bad) for bad in non_finite_values]
        if name in ("lr", "weight_decay", "eps"):
            out.append((name, -1.0))
    if info.total_steps_arg is not None and info.defaults.get(info.total_steps_arg) is None:
        out += [(info.total_steps_arg, math.nan), (info.total_steps_arg, math.inf)]
    return out


def _bad_cases(extra: bool) -> list[Any]:
    cases = []
    for info in OURS:
        values = bad_values(info)
        if extra:  # the examples of a hand-edited checkpoint
            values += [(n, v) for n, v in (("lr", -5.0), ("betas", (1.5, 0.999))) if n in info.defaults]
        cases += [optimizer_param(info, n, v, id_suffix=f"-{n}={_fmt(v)}") for n, v in values]
    return cases


@pytest.mark.parametrize("info, name, value", _bad_cases(extra=False))
def test_constructor_rejects_bad_hyperparameter(info: OptimizerInfo, name: str, value: Any) -> None:
    params = make_params(info, FAULTS_BY_NAME["none"], large=False)
    with pytest.raises(ValueError) as error:
        build(info, list(params.values()), PER_PARAM, **{name: value})
    assert name in str(error.value), f"the message does not name {name!r}: {error.value}"


def _same(a: Any, b: Any) -> bool:
    return not list(differences(a, b))


@pytest.mark.parametrize("info, name, value", _bad_cases(extra=True))
def test_load_state_dict_rejects_bad_hyperparameter(info: OptimizerInfo, name: str, value: Any) -> None:
    """A checkpoint edited to a bad value is refused with a ValueError naming it, and the optimizer is left
    exactly as it was (it continues bit for bit like a twin that never saw the bad state dict). A key
    that load_state_dict deliberately does not take from the checkpoint (a storage choice of this run,
    e.g. the state width) may instead be ignored, as long as the bad value never reaches the group."""
    fault = FAULTS_BY_NAME["none"]
    params, optimizer = run(info, PER_PARAM, fault, range(2))
    twin_params, twin = run(info, PER_PARAM, fault, range(2))
    bad = copy.deepcopy(optimizer.state_dict())
    bad["param_groups"][0][name] = value
    before = copy.deepcopy(optimizer.param_groups[0][name])
    try:
        optimizer.load_state_dict(bad)
    except ValueError as error:
        assert name in str(error), f"the message does not name {name!r}: {error}"
    else:
        assert not _same(optimizer.param_groups[0][name], value), (
            f"load_state_dict accepted {name}={value!r} into param group 0"
        )
    assert _same(optimizer.param_groups[0][name], before)
    run(info, PER_PARAM, fault, range(2, 4), params, optimizer)
    run(info, PER_PARAM, fault, range(2, 4), twin_params, twin)
    diff = list(differences(weights(params), weights(twin_params), "weights"))
    diff += differences(optimizer.state_dict(), twin.state_dict(), "state_dict")
    assert not diff, f"the refused load changed the optimizer: {diff[:10]}"


# --- fuzz: finite gradients of any magnitude -------------------------------------------------------------
@pytest.mark.parametrize("info, path", path_cases(tuple((p, None) for p in (PER_PARAM, FOREACH, EIGHT_BIT))))
@settings(
    max_examples=6, deadline=None, derandomize=True, database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.differing_executors],
)
@given(exponents=st.lists(st.floats(-27.0, 27.0), min_size=4, max_size=4), seed=st.integers(0, 2**20))
def test_finite_gradients_of_any_magnitude_keep_weights_finite(
    info: OptimizerInfo, path: Path, exponents: list[float], seed: int
) -> None:
    """Four steps whose gradient entries have random signs and magnitudes 10^(e + u), e drawn per step in
    [-27, 27] and u per entry in [-3, 3]: every magnitude in [1e-30, 1e30], finite, so finite weights."""
    fault = FAULTS_BY_NAME["none"]
    params = make_params(info, fault, path.large)
    optimizer = build(info, param_groups(params, fault), path)

    def grads(params: dict[str, torch.Tensor], i: int) -> None:
        gen = torch.Generator().manual_seed(seed * 16 + i)
        for p in params.values():
            if p.grad is not None:
                u = torch.rand(p.shape, generator=gen) * 6 - 3
                sign = torch.randint(0, 2, p.shape, generator=gen) * 2 - 1
                value = (sign * torch.pow(10.0, exponents[i] + u)).clamp(-1e30, 1e30)
                set_grad(p, value.to(p.dtype))

    for i in range(len(exponents)):
        step(optimizer, params, info, fault, i, grads=grads)
    assert non_finite(params) == 0, f"non-finite weights after gradients of magnitude 10^{exponents}"
