"""Faults found by adversarial testing of the optimizers (issue: one optimizer core and a fault contract).

Each test failed on the code before the fix: overflow of a 1e20 gradient entry, StableSPAM's multi-tensor
paths after an all-zero gradient, non-finite hyper-parameters, unvalidated loaded groups and foreign
state dicts.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch

import lightning_optim as lo

AM = (lo.AdaptiveMomentumSGD, lo.AdaptiveMomentumAdamW)


def _params(seed: int = 0) -> list[torch.nn.Parameter]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(8, 4, generator=gen)), torch.nn.Parameter(torch.randn(5, generator=gen))]


def _step(optimizer: torch.optim.Optimizer, params: list[torch.nn.Parameter], grads: list[torch.Tensor]) -> None:
    for p, g in zip(params, grads):
        p.grad = g.clone()
    optimizer.step()


def _benign(params: list[torch.nn.Parameter], i: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(100 + i)
    return [torch.randn(p.shape, generator=gen) for p in params]


@pytest.mark.parametrize("cls", [lo.StableSPAM, *AM, lo.SPAM])
@pytest.mark.parametrize("foreach", [False, True])
def test_one_1e20_gradient_entry_keeps_every_weight_finite(cls: type, foreach: bool) -> None:
    # 1e20 is finite in fp32, its square (1e40) is not: norms and sums must not overflow into NaN
    params = _params()
    optimizer = cls(params, foreach=foreach)
    for i in range(3):
        _step(optimizer, params, _benign(params, i))
    spike = _benign(params, 3)
    spike[0][2, 1] = 1e20
    _step(optimizer, params, spike)
    for i in range(4, 8):
        _step(optimizer, params, _benign(params, i))
    assert all(torch.isfinite(p).all() for p in params), [p for p in params]
    # one entry's overflow must not freeze or poison the rest of the model
    assert torch.isfinite(params[1]).all()


def test_adaptive_momentum_beta_stays_finite_after_overflow() -> None:
    params = _params()
    optimizer = lo.AdaptiveMomentumSGD(params, foreach=True)
    _step(optimizer, params, _benign(params, 0))
    spike = _benign(params, 1)
    spike[1][0] = 1e20
    _step(optimizer, params, spike)
    # A and B both overflow: the limit A/B -> 1 gives beta* = beta_max
    assert float(optimizer.last_beta) == pytest.approx(0.9)


@pytest.mark.parametrize("path", ["single", "foreach", "compiled"])
def test_stable_spam_all_zero_gradient_after_a_large_one(path: str) -> None:
    if path == "compiled":
        pytest.importorskip("torch._inductor")
    params = _params()
    kwargs = {"single": dict(foreach=False), "foreach": dict(foreach=True), "compiled": dict(compile=True)}[path]
    optimizer = lo.StableSPAM(params, **kwargs)
    _step(optimizer, params, [g * 1e4 for g in _benign(params, 0)])
    _step(optimizer, params, [torch.zeros_like(p) for p in params])
    assert all(torch.isfinite(p).all() for p in params)
    for key in ("exp_avg", "exp_avg_sq", "m_max", "m_norm", "v_norm"):
        assert all(torch.isfinite(optimizer.state[p][key]).all() for p in params), key


def test_stable_spam_paths_agree_on_zero_gradient_after_a_large_one() -> None:
    results = []
    for foreach in (False, True):
        params = _params()
        optimizer = lo.StableSPAM(params, foreach=foreach)
        _step(optimizer, params, [g * 1e4 for g in _benign(params, 0)])
        _step(optimizer, params, [torch.zeros_like(p) for p in params])
        _step(optimizer, params, _benign(params, 2))
        results.append(torch.cat([p.detach().reshape(-1) for p in params]))
    torch.testing.assert_close(results[0], results[1], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize(
    "cls, name",
    [
        (lo.SPAM, "lr"),
        (lo.SPAM, "weight_decay"),
        (lo.SPAM, "eps"),
        (lo.StableSPAM, "lr"),
        (lo.StableSPAM, "weight_decay"),
        (lo.AdaptiveMomentumSGD, "memory_weight"),
        (lo.AdaptiveMomentumSGD, "lr"),
        (lo.AdaptiveMomentumAdamW, "memory_weight"),
        (lo.AdaptiveMomentumAdamW, "weight_decay"),
    ],
)
@pytest.mark.parametrize("value", [math.inf, math.nan])
def test_non_finite_hyper_parameters_are_rejected(cls: type, name: str, value: float) -> None:
    with pytest.raises(ValueError, match=f"Invalid {name}"):
        cls(_params(), **{name: value})


def test_spam_threshold_inf_stays_allowed() -> None:
    lo.SPAM(_params(), threshold=math.inf)  # documented: disables clipping


@pytest.mark.parametrize(
    "cls, key, value",
    [
        (lo.SPAM, "lr", -5.0),
        (lo.SPAM, "betas", (1.5, 0.999)),
        (lo.StableSPAM, "gamma1", math.inf),
        (lo.AdaptiveMomentumSGD, "memory_weight", math.nan),
    ],
)
def test_load_state_dict_validates_the_loaded_groups(cls: type, key: str, value: object) -> None:
    params = _params()
    optimizer = cls(params)
    _step(optimizer, params, _benign(params, 0))
    saved = copy.deepcopy(optimizer.state_dict())
    saved["param_groups"][0][key] = value
    before = copy.deepcopy(optimizer.state_dict())
    with pytest.raises(ValueError, match=key):
        optimizer.load_state_dict(saved)
    # the optimizer is left as it was, and still steps
    after = optimizer.state_dict()
    assert after["param_groups"][0][key] == before["param_groups"][0][key]
    _step(optimizer, params, _benign(params, 1))
    assert all(torch.isfinite(p).all() for p in params)


@pytest.mark.parametrize("cls", [lo.SPAM, lo.StableSPAM, lo.AdaptiveMomentumAdamW])
def test_adamw_state_dict_is_converted_with_a_warning(cls: type) -> None:
    params = _params()
    adamw = torch.optim.AdamW(params, lr=1e-3)
    for i in range(3):
        _step(adamw, params, _benign(params, i))
    optimizer = cls(params)
    with pytest.warns(UserWarning, match="another optimizer"):
        optimizer.load_state_dict(adamw.state_dict())
    assert optimizer.param_groups[0]["global_step"] == 3
    # moments carried over, missing hyper-parameters from the constructor; the next step works
    torch.testing.assert_close(optimizer.state[params[0]]["exp_avg"], adamw.state[params[0]]["exp_avg"])
    _step(optimizer, params, _benign(params, 3))
    assert all(torch.isfinite(p).all() for p in params)


def test_foreign_state_keys_are_refused_with_a_message() -> None:
    params = _params()
    stable = lo.StableSPAM(params)
    _step(stable, params, _benign(params, 0))
    spam = lo.SPAM(params)
    with pytest.raises(ValueError, match="saved by another optimizer.*m_max"):
        spam.load_state_dict(stable.state_dict())
    _step(spam, params, _benign(params, 1))  # untouched, still usable


def test_sgd_state_dict_converts_into_adaptive_momentum_sgd() -> None:
    params = _params()
    sgd = torch.optim.SGD(params, lr=1e-2, momentum=0.9, dampening=0.9)
    for i in range(2):
        _step(sgd, params, _benign(params, i))
    am = lo.AdaptiveMomentumSGD(params)
    with pytest.warns(UserWarning, match="another optimizer"):
        am.load_state_dict(sgd.state_dict())
    _step(am, params, _benign(params, 2))
    assert all(torch.isfinite(p).all() for p in params)
