"""Behaviour every lightning-optim optimizer shares: foreach = reference path, exact resume, fp32 state for
half-precision parameters, param groups, closures, validation of arguments and gradients."""

from __future__ import annotations

import math

import pytest
import torch

from conftest import flat, make_mlp, restore_from_checkpoint, train
import lightning_optim
from lightning_optim import SPAM, AdaptiveMomentumAdamW, AdaptiveMomentumSGD, StableSPAM

# Small intervals so that resets, warm-ups, clipping and the Stable-SPAM schedule all happen within a test.
FACTORIES = {
    "spam": lambda params, **kw: SPAM(
        params, lr=1e-2, threshold=20.0, reset_interval=10, warmup_steps=4, clip_delay=3, weight_decay=0.1, **kw
    ),
    "stable_spam": lambda params, **kw: StableSPAM(
        params, lr=1e-2, total_steps=30, reset_interval=15, weight_decay=0.1, **kw
    ),
    "am_sgd": lambda params, **kw: AdaptiveMomentumSGD(params, lr=5e-2, weight_decay=0.1, **kw),
    "am_adamw": lambda params, **kw: AdaptiveMomentumAdamW(params, lr=1e-2, **kw),
}
SPIKES = {5: 1e4, 17: 1e3, 31: 1e5}
# Plain SGD takes a 1e5x spike at face value and the MLP then saturates chaotically, which amplifies
# last-bit differences; AM-SGD gets mild spikes.
SPIKES_FOR = {"am_sgd": {5: 10.0, 17: 3.0}}


def grouped(model: torch.nn.Module) -> list[dict]:
    """Two groups with different lr and weight decay: matrices, then vectors (biases, norm)."""
    matrices = [p for p in model.parameters() if p.ndim > 1]
    vectors = [p for p in model.parameters() if p.ndim <= 1]
    return [{"params": matrices}, {"params": vectors, "lr": 3e-3, "weight_decay": 0.0}]


@pytest.mark.parametrize("name", FACTORIES)
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
def test_foreach_matches_reference(name: str, dtype: torch.dtype, tol: float) -> None:
    results = []
    for foreach in (False, True):
        model = make_mlp(dtype)
        model[1].bias.requires_grad_(False)  # a parameter that never has a gradient
        opt = FACTORIES[name](grouped(model), foreach=foreach)
        train(model, opt, 40, spikes=SPIKES_FOR.get(name, SPIKES))
        results.append(flat(model))
    assert torch.isfinite(results[0]).all()
    torch.testing.assert_close(results[1], results[0], rtol=tol, atol=tol)


@pytest.mark.parametrize("name", FACTORIES)
@pytest.mark.parametrize("foreach", [False, True])
def test_resume_is_bit_identical(name: str, foreach: bool) -> None:
    model = make_mlp(torch.float32)
    opt = FACTORIES[name](grouped(model), foreach=foreach)
    train(model, opt, 50, spikes=SPIKES)

    first = make_mlp(torch.float32)
    opt1 = FACTORIES[name](grouped(first), foreach=foreach)
    train(first, opt1, 23, spikes=SPIKES)
    resumed, opt2 = restore_from_checkpoint(first, opt1, lambda m: FACTORIES[name](grouped(m), foreach=foreach))
    del first, opt1
    assert opt2.param_groups[0]["global_step"] == 23
    train(resumed, opt2, 27, start=23, spikes=SPIKES)
    assert torch.equal(flat(resumed), flat(model))


@pytest.mark.parametrize("name", FACTORIES)
@pytest.mark.parametrize("foreach", [False, True])
def test_half_precision_params_keep_fp32_state(name: str, foreach: bool) -> None:
    torch.manual_seed(0)
    master = torch.randn(64, 8)
    grads = [torch.randn(64, 8) for _ in range(3)]
    low = torch.nn.Parameter(master.bfloat16())
    ref = torch.nn.Parameter(low.detach().float())  # fp32 twin starting from the same (rounded) values
    opt_low = FACTORIES[name]([low], foreach=foreach)
    opt_ref = FACTORIES[name]([ref], foreach=foreach)
    for g in grads:
        low.grad = g.bfloat16()
        ref.grad = g.bfloat16().float()
        opt_low.step()
        opt_ref.step()
        # the bf16 parameter is exactly the fp32 computation rounded once; only its rounding is lost, so
        # restart the twin from the rounded value to compare step by step
        assert torch.equal(low.detach(), ref.detach().bfloat16())
        ref.data.copy_(low.detach().float())
    tensors = [v for v in opt_low.state[low].values() if isinstance(v, torch.Tensor) and v.numel() > 1]
    assert tensors and all(t.dtype == torch.float32 for t in tensors)

    reloaded = FACTORIES[name]([torch.nn.Parameter(low.detach().clone())], foreach=foreach)
    reloaded.load_state_dict(opt_low.state_dict())
    for key, value in opt_low.state[low].items():
        loaded = next(iter(reloaded.state.values()))[key]
        assert loaded.dtype == value.dtype and torch.equal(loaded, value), key


@pytest.mark.parametrize("name", FACTORIES)
def test_closure_loss_is_returned_and_params_without_grad_untouched(name: str) -> None:
    model = make_mlp(torch.float32)
    frozen = model[3].bias
    frozen.requires_grad_(False)
    before = frozen.detach().clone()
    opt = FACTORIES[name](model.parameters())
    x, y = torch.randn(4, 6), torch.randn(4, 3)

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        return loss

    loss = opt.step(closure)
    assert isinstance(loss, torch.Tensor) and loss.ndim == 0
    assert torch.equal(frozen, before) and frozen not in opt.state
    assert opt.step() is None  # no closure: no loss


@pytest.mark.parametrize("name", FACTORIES)
def test_group_added_later_joins_the_global_step(name: str) -> None:
    a, b = torch.nn.Parameter(torch.randn(3)), torch.nn.Parameter(torch.randn(3))
    opt = FACTORIES[name]([a])
    for _ in range(4):
        a.grad = torch.randn(3)
        opt.step()
    opt.add_param_group({"params": [b]})
    assert [g["global_step"] for g in opt.param_groups] == [4, 4]
    a.grad, b.grad = torch.randn(3), torch.randn(3)
    opt.step()
    assert [g["global_step"] for g in opt.param_groups] == [5, 5]
    assert "global_step" in opt.state_dict()["param_groups"][1]


@pytest.mark.parametrize("name", FACTORIES)
def test_sparse_and_complex_gradients_are_rejected(name: str) -> None:
    emb = torch.nn.Embedding(10, 4, sparse=True)
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(RuntimeError, match="sparse"):
        FACTORIES[name](emb.parameters()).step()
    z = torch.nn.Parameter(torch.randn(3, dtype=torch.complex64))
    z.grad = torch.randn(3, dtype=torch.complex64)
    with pytest.raises(RuntimeError, match="complex"):
        FACTORIES[name]([z]).step()


BAD_ARGS = [
    (SPAM, {"lr": -1.0}, "lr"),
    (SPAM, {"betas": (1.0, 0.999)}, "beta1"),
    (SPAM, {"betas": (0.9, -0.1)}, "beta2"),
    (SPAM, {"eps": -1e-8}, "eps"),
    (SPAM, {"weight_decay": -0.1}, "weight_decay"),
    (SPAM, {"threshold": 0.0}, "threshold"),
    (SPAM, {"reset_interval": -1}, "reset_interval"),
    (SPAM, {"reset_interval": 2.5}, "reset_interval"),
    (SPAM, {"warmup_steps": -2}, "warmup_steps"),
    (SPAM, {"clip_delay": 1}, "clip_delay"),
    (SPAM, {"state_bits": 16}, "state_bits"),
    (StableSPAM, {"lr": float("nan")}, "lr"),
    (StableSPAM, {"betas": (0.9,)}, "betas"),
    (StableSPAM, {"gamma1": 1.0}, "gamma1"),
    (StableSPAM, {"gamma2": -0.5}, "gamma2"),
    (StableSPAM, {"gamma3": 1.5}, "gamma3"),
    (StableSPAM, {"total_steps": 0}, "total_steps"),
    (StableSPAM, {"eta_min": 0.0}, "eta_min"),
    (StableSPAM, {"eta_min": 1.5}, "eta_min"),
    (StableSPAM, {"reset_interval": -5}, "reset_interval"),
    (StableSPAM, {"weight_decay": -1.0}, "weight_decay"),
    (AdaptiveMomentumSGD, {"lr": -0.1}, "lr"),
    (AdaptiveMomentumSGD, {"memory_weight": -0.1}, "memory_weight"),
    (AdaptiveMomentumSGD, {"beta_max": 1.0}, "beta_max"),
    (AdaptiveMomentumSGD, {"weight_decay": -1.0}, "weight_decay"),
    (AdaptiveMomentumAdamW, {"betas": (0.9, 1.0)}, "beta2"),
    (AdaptiveMomentumAdamW, {"betas": (-0.1, 0.9)}, "beta_max"),
    (AdaptiveMomentumAdamW, {"eps": -1.0}, "eps"),
    (AdaptiveMomentumAdamW, {"memory_weight": -1.0}, "memory_weight"),
]


@pytest.mark.parametrize("cls,kwargs,name", BAD_ARGS, ids=[f"{c.__name__}-{n}" for c, _, n in BAD_ARGS])
def test_invalid_arguments_raise_value_error_naming_them(cls: type, kwargs: dict, name: str) -> None:
    with pytest.raises(ValueError, match=name):
        cls([torch.nn.Parameter(torch.zeros(2))], **kwargs)


@pytest.mark.parametrize("cls", [SPAM, StableSPAM])
def test_invalid_group_override_is_rejected(cls: type) -> None:
    a, b = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(2))
    with pytest.raises(ValueError, match="reset_interval"):
        cls([{"params": [a]}, {"params": [b], "reset_interval": -3}])


def test_spam_infinite_threshold_allows_small_clip_delay() -> None:
    SPAM([torch.nn.Parameter(torch.zeros(2))], threshold=math.inf, clip_delay=0)


@pytest.mark.parametrize("cls", [SPAM, StableSPAM, AdaptiveMomentumSGD, AdaptiveMomentumAdamW])
def test_eight_bit_state_is_accepted_and_used_for_large_tensors(cls: type) -> None:
    big, small = torch.nn.Parameter(torch.randn(64, 64)), torch.nn.Parameter(torch.randn(10))
    optimizer = cls([big, small], state_bits=8)
    big.grad, small.grad = torch.randn_like(big), torch.randn_like(small)
    optimizer.step()
    key = "momentum_buffer" if cls is AdaptiveMomentumSGD else "exp_avg"
    assert optimizer.state[big][f"{key}_codes"].dtype == torch.uint8 and key not in optimizer.state[big]
    assert optimizer.state[small][key].dtype == torch.float32  # < 4096 elements: fp32


@pytest.mark.parametrize("cls", [SPAM, StableSPAM, AdaptiveMomentumSGD, AdaptiveMomentumAdamW])
@pytest.mark.parametrize("bits", [16, 4, "8", True])
def test_bad_state_bits_raise_value_error(cls: type, bits: object) -> None:
    with pytest.raises(ValueError, match="state_bits"):
        cls([torch.nn.Parameter(torch.zeros(2))], state_bits=bits)


@pytest.mark.parametrize("cls", [SPAM, StableSPAM, AdaptiveMomentumAdamW])
def test_compile_with_eight_bit_state_raises_value_error_naming_both(cls: type) -> None:
    with pytest.raises(ValueError, match="compile=True.*state_bits=8"):
        cls([torch.nn.Parameter(torch.zeros(2))], state_bits=8, compile=True)
    a, b = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(2))
    with pytest.raises(ValueError, match="state_bits=8"):  # per-group override too
        cls([{"params": [a]}, {"params": [b], "state_bits": 8}], compile=True)


@pytest.mark.parametrize("info", lightning_optim.optimizers(ours=True), ids=lambda e: e.name)
def test_resume_keeps_this_runs_execution_options(info) -> None:
    """foreach / compile / state_bits say how this run steps, not what it computes: loading a checkpoint
    saved with other values keeps the current ones (resuming an eager run with compile=True compiles)."""
    param = torch.nn.Parameter(torch.randn(3, 2))
    overrides = {info.total_steps_arg: 10} if info.total_steps_arg else {}
    saved = info.build([param], foreach=False, **overrides)
    (param * torch.randn(3, 2)).square().sum().backward(create_graph=info.needs_hvp)
    saved.step()
    run = {"foreach": True}
    if info.compile:
        run["compile"] = True
    resumed = info.build([param], **run, **overrides)
    resumed.load_state_dict(saved.state_dict())
    assert {k: resumed.param_groups[0][k] for k in run} == run
    assert resumed.param_groups[0]["global_step"] == 1
