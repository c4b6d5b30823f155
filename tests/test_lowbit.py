"""Block-wise dynamic 8-bit optimizer state (docs/low_bit_and_qat.md, part A; "Checks" 1, 2, 4, 5)."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from lightning_optim import SPAM, AdaptiveMomentumAdamW, AdaptiveMomentumSGD, StableSPAM, lowbit
from lightning_optim.lowbit import (
    SQRT_LAYOUT,
    LowBitMoments,
    dequantize_blockwise,
    dynamic_map,
    load_moment,
    quantize_blockwise,
    quantize_moment,
    zero_code,
)
from lightning_optim.state_adapters import state_adapter

SIGNED, UNSIGNED = dynamic_map(True), dynamic_map(False)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # Tensors here are small: one thread avoids oversubscription when the machine is busy.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


MOMENTS = {"exp_avg": True, "exp_avg_sq": False}


def _is_pos_zero(t: torch.Tensor) -> bool:
    return bool((t == 0).all()) and not bool(t.signbit().any())


def _moments_of(optimizer: torch.optim.Optimizer) -> dict[str, bool]:
    return {"momentum_buffer": True} if isinstance(optimizer, AdaptiveMomentumSGD) else MOMENTS


# ------------------------------------------------------------------------------------------- maps (check 1)
def test_maps() -> None:
    for qmap in (SIGNED, UNSIGNED):
        assert qmap.dtype == torch.float32 and qmap.shape == (256,)
        assert (qmap[1:] > qmap[:-1]).all()  # strictly increasing
        assert qmap[-1].item() == 1.0
    assert SIGNED[0].item() == pytest.approx(-0.992968738, abs=1e-9)
    assert (SIGNED == 0).sum() == 1 and SIGNED[127].item() == 0.0 and zero_code(True) == 127
    assert SIGNED[128].item() == pytest.approx(5.5e-7, rel=1e-6)  # smallest positive
    assert not (SIGNED == -1).any()
    assert UNSIGNED[0].item() == 0.0 and zero_code(False) == 0
    assert UNSIGNED[1].item() == pytest.approx(3.25e-7, rel=1e-6)


def test_maps_equal_bitsandbytes_bit_for_bit() -> None:
    functional = pytest.importorskip("bitsandbytes.functional")
    for signed in (True, False):
        theirs = functional.create_dynamic_map(signed).to(torch.float32)
        assert torch.equal(dynamic_map(signed).view(torch.int32), theirs.view(torch.int32))


# ------------------------------------------------------------------------------------- round trip (check 2)
def _round_trip(x: torch.Tensor, qmap: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    codes, absmax = quantize_blockwise(x, qmap)
    return dequantize_blockwise(codes, absmax, qmap), codes, absmax


@pytest.mark.parametrize("signed", [True, False])
def test_zeros_and_map_values_come_back_exactly(signed: bool) -> None:
    qmap = dynamic_map(signed)
    scales = torch.tensor([3.7, 1e-3, 250.0, 1.0])
    x = (qmap.repeat(4).view(4, 256) * scales[:, None]).reshape(-1)  # map[i]·N_b in every block
    x_hat, codes, absmax = _round_trip(x, qmap)
    assert torch.equal(x_hat, x) and torch.equal(codes.view(4, 256), torch.arange(256).repeat(4, 1).to(torch.uint8))
    zeros = torch.zeros(700)
    x_hat, codes, absmax = _round_trip(zeros, qmap)
    assert torch.equal(x_hat, zeros) and (codes == zero_code(signed)).all() and (absmax == 0).all()
    mixed = torch.zeros(300)
    mixed[5], mixed[290] = 2.5, 0.75
    assert torch.equal(_round_trip(mixed, qmap)[0], mixed)  # zeros beside non-zeros, last block short


def test_block_extremes() -> None:
    x = torch.randn(1000) * 5
    blocks = x.view(-1)[:768].view(3, 256)
    x_hat, _, absmax = _round_trip(x, SIGNED)
    peak = blocks.abs().amax(1)
    assert torch.equal(absmax[:3], peak)
    x[0], x[256] = 90.0, -90.0  # block 0 has a positive maximum, block 1 a negative extreme
    x_hat, _, absmax = _round_trip(x, SIGNED)
    assert x_hat[0].item() == 90.0
    assert x_hat[256].item() == pytest.approx(-0.992968738 * 90.0, rel=1e-7)
    assert x_hat[256].item() == (SIGNED[0] * absmax[1]).item()


@pytest.mark.parametrize("signed,bound", [(True, 0.0070313), (False, 0.0035157)])
def test_error_bound(signed: bool, bound: float) -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(64 * 256 + 77, generator=gen) * torch.logspace(-3, 3, 64 * 256 + 77)
    x = x if signed else x.abs()
    x_hat, _, absmax = _round_trip(x, dynamic_map(signed))
    n_b = absmax.repeat_interleave(256)[: x.numel()].double()
    # the spec's bound (half the widest gap, rounded up) plus the fp32 rounding of map[code]·N_b, which
    # -N_b (error 0.00703125·N_b exactly before rounding) can reach
    assert ((x_hat.double() - x.double()).abs() <= (bound + 2**-24) * n_b).all()


def test_nearest_rounding_ties_to_the_larger_value() -> None:
    q = SIGNED.double()
    mid = (q[:-1] + q[1:]) / 2
    exact = (mid.float().double() == mid).nonzero().flatten()  # midpoints representable in fp32
    assert len(exact) > 100
    x = torch.ones(len(exact) + 1)
    x[1:] = mid[exact].float()
    codes, absmax = quantize_blockwise(x, SIGNED)
    assert absmax[0].item() == 1.0
    assert torch.equal(codes[1:].long(), exact + 1)  # a tie goes up
    below = torch.nextafter(x[1:], torch.full_like(x[1:], -math.inf))
    codes_below, _ = quantize_blockwise(torch.cat([torch.ones(1), below]), SIGNED)
    assert torch.equal(codes_below[1:].long(), exact)  # just below a midpoint goes down


def test_outlier_leaves_other_blocks_bit_identical() -> None:
    x = torch.randn(5 * 256 + 10)
    codes, absmax = quantize_blockwise(x, SIGNED)
    y = x.clone()
    y[2 * 256 + 17] = 1000.0
    codes_y, absmax_y = quantize_blockwise(y, SIGNED)
    others = torch.ones(6, dtype=torch.bool)
    others[2] = False
    assert torch.equal(absmax_y[others], absmax[others])
    keep = others.repeat_interleave(256)[: x.numel()]
    assert torch.equal(codes_y[keep], codes[keep])
    assert absmax_y[2].item() == 1000.0


def test_shapes_dtypes_and_all_zero_block() -> None:
    x = torch.randn(3, 5, 7).double()
    x[0] = 0
    codes, absmax = quantize_blockwise(x, UNSIGNED)
    assert codes.shape == x.shape and codes.dtype == torch.uint8
    assert absmax.dtype == torch.float32 and absmax.shape == (1,)
    assert dequantize_blockwise(codes, absmax, UNSIGNED).shape == x.shape
    codes, absmax = quantize_blockwise(torch.zeros(513), SIGNED)
    assert absmax.shape == (3,) and not torch.isnan(dequantize_blockwise(codes, absmax, SIGNED)).any()


def test_dequantize_equals_bitsandbytes_dequantize() -> None:
    functional = pytest.importorskip("bitsandbytes.functional")
    x = torch.randn(3000)
    codes, absmax = quantize_blockwise(x, SIGNED)
    theirs = functional.dequantize_blockwise(codes, absmax=absmax, code=SIGNED, blocksize=256)
    assert torch.equal(dequantize_blockwise(codes, absmax, SIGNED), theirs)


def test_bitsandbytes_cpu_quantizer_misrounds_zeros() -> None:
    """Documents spec A.7: bitsandbytes 0.50.2's CPU quantizer maps 0 to ±2.125e-5·N_b; ours is exact."""
    bnb = pytest.importorskip("bitsandbytes")
    if bnb.__version__ != "0.50.2":
        pytest.skip(f"measured on bitsandbytes 0.50.2, found {bnb.__version__}")
    x = torch.zeros(512)
    x[0], x[300] = 1.0, 2.0
    codes, state = bnb.functional.quantize_blockwise(x, code=SIGNED, blocksize=256)
    theirs = bnb.functional.dequantize_blockwise(codes, state)
    assert theirs[1].item() != 0.0 and theirs[1].item() == pytest.approx(2.125e-5, rel=1e-3)
    assert torch.equal(_round_trip(x, SIGNED)[0], x)


# ------------------------------------------------------------------------------------------ memory (check 4)
def _moment_bytes(state: dict) -> int:
    return sum(v.numel() * v.element_size() for k, v in state.items() if k != "step" and isinstance(v, torch.Tensor))


def test_memory_of_a_4096_square_parameter() -> None:
    p = torch.nn.Parameter(torch.zeros(4096, 4096))
    p.grad = torch.zeros_like(p)
    full, eight = SPAM([p], state_bits=32), SPAM([p], state_bits=8)
    full.step()
    eight.step()
    assert _moment_bytes(full.state[p]) == 134_217_728
    assert _moment_bytes(eight.state[p]) == 34_078_720  # 25.39%
    assert set(eight.state[p]) == {
        "step", "exp_avg_codes", "exp_avg_absmax", "exp_avg_sq_codes", "exp_avg_sq_absmax", "exp_avg_sq_layout"
    }
    assert eight.state[p]["exp_avg_sq_layout"] == SQRT_LAYOUT  # a Python int: no tensor bytes


# ----------------------------------------------------------------------------------- digits runs (check 5)
@pytest.fixture(scope="module")
def digits() -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.as_tensor(data.images / 16.0, dtype=torch.float32).reshape(-1, 64)  # as examples/digits.py
    return x, torch.as_tensor(data.target, dtype=torch.int64)


def _mlp(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.GELU(), torch.nn.Linear(128, 10))


def _train(model, optimizer, data, steps: int, start: int = 0) -> float:
    """Mini-batches of 64 fixed by the step index; returns the final full-training-set loss."""
    x, y = data
    for i in range(start, start + steps):
        idx = torch.randint(len(y), (64,), generator=torch.Generator().manual_seed(i))
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
        optimizer.step()
    with torch.no_grad():
        return torch.nn.functional.cross_entropy(model(x), y).item()


FACTORIES = {
    "spam": lambda ps, bits: SPAM(ps, lr=1e-3, reset_interval=100, warmup_steps=20, state_bits=bits),
    "stable_spam": lambda ps, bits: StableSPAM(ps, lr=1e-3, reset_interval=100, total_steps=300, state_bits=bits),
    "am_adamw": lambda ps, bits: AdaptiveMomentumAdamW(ps, lr=1e-3, state_bits=bits),
    "am_sgd": lambda ps, bits: AdaptiveMomentumSGD(ps, lr=0.05, state_bits=bits),
}


@pytest.mark.parametrize("name", FACTORIES)
def test_eight_bit_training_matches_32_bit(name: str, digits, monkeypatch: pytest.MonkeyPatch) -> None:
    resets: dict[int, list[int]] = {32: [], 8: []}
    if name == "spam":  # the steps at which each run resets its moments
        spam_module = __import__("lightning_optim.spam", fromlist=["_spam_foreach"])
        original, original_reset = spam_module._spam_foreach, LowBitMoments.reset_

        def spy(*args, reset: bool, **kwargs):
            if reset and opt.param_groups[0]["state_bits"] == 32:
                resets[32].append(opt.param_groups[0]["global_step"] + 1)
            return original(*args, reset=reset, **kwargs)

        def spy_reset(self, mask=None) -> None:
            resets[8].append(opt.param_groups[0]["global_step"] + 1)
            original_reset(self, mask)

        monkeypatch.setattr(spam_module, "_spam_foreach", spy)
        monkeypatch.setattr(LowBitMoments, "reset_", spy_reset)
    losses = {}
    for bits in (32, 8):
        model = _mlp()
        opt = FACTORIES[name](model.parameters(), bits)
        opt.param_groups[0]["foreach"] = True
        losses[bits] = _train(model, opt, digits, 300)
        quantized = [k for k in opt.state[model[0].weight] if k.endswith("_codes")]
        assert bool(quantized) == (bits == 8)
    assert losses[8] < 1.0  # it learned (chance is ln 10 = 2.3)
    assert abs(losses[8] - losses[32]) <= 0.05 * losses[32], losses
    if name == "spam":
        assert resets[32] == resets[8] == [100, 200, 300]


# ------------------------------------------------------------------------------------- resets and layouts
def _opt_on_digits(name: str, digits, bits: int = 8, steps: int = 5, **kwargs):
    model = _mlp()
    opt = FACTORIES[name](model.parameters(), bits)
    for group in opt.param_groups:
        group.update(kwargs)
    _train(model, opt, digits, steps)
    return model, opt


@pytest.mark.parametrize("name", FACTORIES)
def test_reset_of_quantized_state_gives_exact_zeros(name: str, digits) -> None:
    model, opt = _opt_on_digits(name, digits)
    state = opt.state[model[0].weight]
    assert all((state[f"{k}_absmax"] > 0).all() for k in _moments_of(opt))
    moments = LowBitMoments(state, _moments_of(opt))
    moments.reset_()
    for key, signed in _moments_of(opt).items():
        assert _is_pos_zero(state[f"{key}_absmax"])  # absmax 0 as well: a fresh moment's state
        assert (state[f"{key}_codes"] == zero_code(signed)).all()
        value = load_moment(state, key, signed)
        assert torch.equal(value, torch.zeros_like(value)) and not value.signbit().any()


def test_spam_reset_step_starts_from_zero_moments(digits) -> None:
    model, opt = _opt_on_digits("spam", digits, steps=99)
    w = model[0].weight
    x, y = digits
    opt.zero_grad()
    torch.nn.functional.cross_entropy(model(x[:64]), y[:64]).backward()
    g = w.grad.clone()
    opt.step()  # step 100: reset, then m = 0.1 g and v = 0.001 g² (k = 0 < clip_delay: no clip)
    m = torch.zeros_like(g).lerp_(g, 0.1)
    v = torch.zeros_like(g).mul_(0.999).addcmul_(g, g, value=0.001)
    state = opt.state[w]
    assert torch.equal(state["exp_avg_codes"], quantize_blockwise(m, SIGNED)[0])
    assert torch.equal(state["exp_avg_sq_codes"], quantize_moment(v, False)[0])  # √v, unsigned map


@pytest.mark.parametrize("name", FACTORIES)
def test_state_dict_round_trip_is_exact(name: str, digits) -> None:
    model, opt = _opt_on_digits(name, digits)
    saved = copy.deepcopy(opt.state_dict())
    fresh = FACTORIES[name](model.parameters(), 8)
    fresh.load_state_dict(saved)
    for p in model.parameters():
        assert set(fresh.state[p]) == set(opt.state[p])
        for key, value in opt.state[p].items():
            if isinstance(value, torch.Tensor):
                assert fresh.state[p][key].dtype == value.dtype and torch.equal(fresh.state[p][key], value), key
    assert fresh.state[model[0].weight]["exp_avg_codes" if name != "am_sgd" else "momentum_buffer_codes"].dtype == (
        torch.uint8
    )


@pytest.mark.parametrize("name", FACTORIES)
def test_resume_continues_bit_identically(name: str, digits) -> None:
    model, opt = _opt_on_digits(name, digits, steps=0)
    _train(model, opt, digits, 60)
    saved = copy.deepcopy((model.state_dict(), opt.state_dict()))
    _train(model, opt, digits, 50, start=60)

    resumed = _mlp(seed=7)
    resumed.load_state_dict(saved[0])
    resumed_opt = FACTORIES[name](resumed.parameters(), 8)
    resumed_opt.load_state_dict(saved[1])
    _train(resumed, resumed_opt, digits, 50, start=60)
    for a, b in zip(model.parameters(), resumed.parameters()):
        assert torch.equal(a, b)
    for a, b in zip(model.parameters(), resumed.parameters()):
        for key, value in opt.state[a].items():
            if isinstance(value, torch.Tensor):
                assert torch.equal(resumed_opt.state[b][key], value), key


@pytest.mark.parametrize("name", FACTORIES)
def test_load_converts_between_32_and_8_bit_layouts(name: str, digits) -> None:
    model, full = _opt_on_digits(name, digits, bits=32)
    w = model[0].weight
    moments = _moments_of(full)
    # 32-bit checkpoint -> 8-bit optimizer: the moments are quantized
    eight = FACTORIES[name](model.parameters(), 8)
    eight.load_state_dict(copy.deepcopy(full.state_dict()))
    for key, signed in moments.items():
        codes, absmax = quantize_moment(full.state[w][key], signed)
        assert key not in eight.state[w]
        assert torch.equal(eight.state[w][f"{key}_codes"], codes)
        assert torch.equal(eight.state[w][f"{key}_absmax"], absmax)
    assert torch.equal(eight.state[model[2].bias][next(iter(moments))], full.state[model[2].bias][next(iter(moments))])
    # 8-bit checkpoint -> 32-bit optimizer: the moments are dequantized
    back = FACTORIES[name](model.parameters(), 32)
    back.load_state_dict(copy.deepcopy(eight.state_dict()))
    for key, signed in moments.items():
        assert f"{key}_codes" not in back.state[w] and f"{key}_layout" not in back.state[w]
        assert back.state[w][key].dtype == torch.float32
        assert torch.equal(back.state[w][key], load_moment(eight.state[w], key, signed))
    _train(model, back, digits, 2, start=5)  # both keep training
    _train(model, eight, digits, 2, start=5)


def test_per_group_state_bits_and_small_tensors(digits) -> None:
    torch.manual_seed(0)
    embedding = torch.nn.Embedding(100, 64)  # 6400 elements, but its group keeps fp32
    model = _mlp()
    opt = SPAM(
        [{"params": embedding.parameters(), "state_bits": 32}, {"params": model.parameters()}], lr=1e-3, state_bits=8
    )
    x, y = digits
    for i in range(3):
        opt.zero_grad()
        h = model(x[:32]) + embedding(torch.arange(32) % 100)[:, :10]
        torch.nn.functional.cross_entropy(h, y[:32]).backward()
        opt.step()
    assert opt.state[embedding.weight]["exp_avg"].dtype == torch.float32
    assert "exp_avg_codes" in opt.state[model[0].weight]  # 8192 elements
    for p in (model[0].bias, model[2].weight, model[2].bias):  # < 4096 elements: fp32
        assert opt.state[p]["exp_avg"].dtype == torch.float32 and "exp_avg_codes" not in opt.state[p]


def test_changing_a_groups_state_bits_converts_on_the_next_step(digits) -> None:
    model, opt = _opt_on_digits("stable_spam", digits, bits=32)
    w = model[0].weight
    opt.param_groups[0]["state_bits"] = 8
    _train(model, opt, digits, 1, start=5)
    assert "exp_avg_codes" in opt.state[w] and "exp_avg" not in opt.state[w]
    assert opt.state[w]["m_max"].dtype == torch.float32  # scalars stay fp32


def test_am_sgd_first_step_memory_is_the_gradient(digits) -> None:
    model, opt = _opt_on_digits("am_sgd", digits, steps=1)
    assert opt.last_beta.item() == 0.0  # d = g exactly: B = 0, β* = 0, as with fp32 state
    state = opt.state[model[0].weight]
    assert "momentum_buffer_codes" in state and "momentum_buffer" not in state


def test_bf16_parameters_with_eight_bit_state() -> None:
    p = torch.nn.Parameter(torch.randn(64, 80, dtype=torch.bfloat16))
    for opt in (SPAM([p], state_bits=8), StableSPAM([p], state_bits=8), AdaptiveMomentumAdamW([p], state_bits=8)):
        before = p.detach().clone()
        for _ in range(2):
            p.grad = torch.randn_like(p)
            opt.step()
        assert p.dtype == torch.bfloat16 and not torch.equal(p, before) and torch.isfinite(p).all()
        assert opt.state[p]["exp_avg_codes"].dtype == torch.uint8


# --------------------------------------------------------------------------------------------- adapters
@pytest.mark.parametrize("name", FACTORIES)
def test_state_adapter_reads_and_resets_our_eight_bit_state(name: str, digits) -> None:
    model, opt = _opt_on_digits(name, digits)
    adapter = state_adapter(opt)
    state = opt.state[model[0].weight]
    moments = _moments_of(opt)
    first = next(iter(moments))
    assert torch.equal(adapter.first_moment(state), load_moment(state, first, True))
    if "exp_avg_sq" in moments:
        assert torch.equal(adapter.second_moment(state), load_moment(state, "exp_avg_sq", False))
    small = opt.state[model[2].bias]
    assert adapter.first_moment(small) is small[first]  # fp32 tensors are read live
    adapter.reset_(state)
    for key, signed in moments.items():
        value = load_moment(state, key, signed)
        assert torch.equal(value, torch.zeros_like(value))
    _train(model, opt, digits, 2, start=5)  # the optimizer keeps working on the reset state
    assert torch.isfinite(load_moment(state, first, True)).all()


def test_lowbit_module_is_exported() -> None:
    import lightning_optim

    assert lightning_optim.lowbit is lowbit
    assert lightning_optim.quantize_blockwise is quantize_blockwise
