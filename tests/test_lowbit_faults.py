"""Regression tests of 8-bit optimizer state faults (lightning_optim.lowbit).

1. √-domain second moments: a rarely or weakly updated embedding row no longer has v̂ = 0 beside m̂ ≠ 0.
2. Non-finite entries cost only their own entry (the block's absmax comes from the finite entries).
3. One exact reset (codes ← zero code, absmax ← 0), shared by the optimizers and the state adapters.
4. A construction-time warning for embedding-like parameters with 8-bit state.
5. The bucket-table quantizer gives exactly the codes of a ``searchsorted`` over the thresholds.
"""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch

from lightning_optim import SPAM, AdaptiveMomentumAdamW, StableSPAM
from lightning_optim.lowbit import (
    LINEAR_LAYOUT,
    SQRT_LAYOUT,
    LowBitMoments,
    dequantize_blockwise,
    dequantize_moment,
    device_map,
    dynamic_map,
    load_moment,
    moment_layout,
    quantize_blockwise,
    quantize_moment,
    reset_moment_,
    warn_if_embedding_like,
    zero_code,
)
from lightning_optim.state_adapters import state_adapter
from test_state_adapters import _RecordOps

SIGNED, UNSIGNED = dynamic_map(True), dynamic_map(False)


pytestmark = pytest.mark.usefixtures("one_thread")


def _is_pos_zero(t: torch.Tensor) -> bool:
    return bool((t == 0).all()) and not bool(t.signbit().any())


# ------------------------------------------------------------------ fault 1: embeddings with 8-bit state
def _embedding_grads(steps: int, tiny: float = 1e-3, every: int = 7) -> list[torch.Tensor]:
    """Gradients of a 512×64 table (one 256-block = 4 rows): per block a hot row (×10, every step), a rare
    row (×1, every ``every`` steps), a weak row (×``tiny``, every step) and an untouched row."""
    gen = torch.Generator().manual_seed(0)
    grads = []
    for t in range(steps):
        g = torch.zeros(512, 64)
        g[0::4] = torch.randn(128, 64, generator=gen) * 10.0
        if t % every == 0:
            g[1::4] = torch.randn(128, 64, generator=gen)
        g[2::4] = torch.randn(128, 64, generator=gen) * tiny
        grads.append(g)
    return grads


def _max_step(factory, bits: int, grads: list[torch.Tensor]) -> float:
    """Largest |Δθ| of any entry in any step of an nn.Embedding(512, 64) trained on ``grads``."""
    torch.manual_seed(0)
    embedding = torch.nn.Embedding(512, 64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the embedding warning (fault 4) is the point of this setup
        optimizer = factory(embedding.parameters(), bits)
    worst = 0.0
    for g in grads:
        before = embedding.weight.detach().clone()
        embedding.weight.grad = g.clone()
        optimizer.step()
        worst = max(worst, (embedding.weight.detach() - before).abs().max().item())
    assert ("exp_avg_sq_codes" in optimizer.state[embedding.weight]) == (bits == 8)
    return worst


EMBEDDING_FACTORIES = {
    "spam": lambda ps, bits: SPAM(ps, lr=3e-3, state_bits=bits),
    "stable_spam": lambda ps, bits: StableSPAM(ps, lr=3e-3, state_bits=bits),
    "am_adamw": lambda ps, bits: AdaptiveMomentumAdamW(ps, lr=3e-3, state_bits=bits),
}


@pytest.mark.parametrize("tiny", [1e-3, 1e-4])
@pytest.mark.parametrize("name", EMBEDDING_FACTORIES)
def test_eight_bit_embedding_steps_stay_near_fp32_steps(name: str, tiny: float) -> None:
    # Before the √v layout, v of the weak rows rounded to 0 while m did not: steps of m̂/ε, ~10³-10⁵·lr.
    grads = _embedding_grads(50, tiny=tiny)
    full = _max_step(EMBEDDING_FACTORIES[name], 32, grads)
    eight = _max_step(EMBEDDING_FACTORIES[name], 8, grads)
    assert full < 2 * 3e-3  # Adam-type steps of about lr
    assert eight <= 3 * full, (eight, full)


def test_second_moment_never_rounds_to_zero_beside_a_nonzero_first_moment() -> None:
    # one block: gradients spanning 1 down to 1e-9 of the block's largest, and exact zeros
    g = torch.cat([torch.logspace(0, -9, 200), torch.zeros(56)]) * torch.where(torch.arange(256) % 2 == 0, 1.0, -1.0)
    m, v = 0.1 * g, 0.001 * g * g
    m_hat = dequantize_moment(*quantize_moment(m, True), True)
    v_hat = dequantize_moment(*quantize_moment(v, False), False)
    assert not ((m_hat != 0) & (v_hat == 0)).any()
    assert ((v == 0) == (v_hat == 0)).all()  # positive v stays positive, zeros stay exact zeros
    # where both are kept, Adam's ratio m̂/√v̂ stays within the 8-bit maps' resolution of m/√v
    kept = m_hat != 0
    ratio = (m_hat[kept] / v_hat[kept].sqrt()) / (m[kept] / v[kept].sqrt())
    assert ratio.abs().max() < 3 and (ratio > 0).all()
    # the linear layout (what 8-bit v was before) loses every v below ~1.6e-7 of the block's v
    linear = dequantize_blockwise(*quantize_blockwise(v, UNSIGNED), UNSIGNED)
    assert ((m_hat != 0) & (linear == 0)).any()


def test_sqrt_layout_round_trips_and_resets_exactly() -> None:
    v = torch.rand(3, 700) ** 4
    v[0, :300] = 0
    codes, absmax = quantize_moment(v, False)
    v_hat = dequantize_moment(codes, absmax, False)
    assert torch.equal(quantize_moment(v_hat, False)[0], codes)  # √((map·N)²) = map·N in fp32
    assert torch.equal(v_hat[0, :300], torch.zeros(300)) and (v_hat[v > 0] > 0).all()
    assert ((v_hat - v).abs() <= 0.0071 * absmax.square().repeat_interleave(256)[: v.numel()].view_as(v)).all()


def _digits_like(seed: int = 0) -> tuple[torch.nn.Module, list[tuple[torch.Tensor, torch.Tensor]]]:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.Tanh(), torch.nn.Linear(128, 10))
    gen = torch.Generator().manual_seed(seed)
    batches = [(torch.randn(32, 64, generator=gen), torch.randint(10, (32,), generator=gen)) for _ in range(6)]
    return model, batches


def _fit(model, optimizer, batches) -> None:
    for x, y in batches:
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()


def _to_linear_layout(state_dict: dict) -> dict:
    """The state dict as saved before the √v layout: linear-layout v codes, no ``exp_avg_sq_layout``."""
    legacy = copy.deepcopy(state_dict)
    for entry in legacy["state"].values():
        if "exp_avg_sq_codes" in entry:
            v = dequantize_moment(entry["exp_avg_sq_codes"], entry["exp_avg_sq_absmax"], False)
            entry["exp_avg_sq_codes"], entry["exp_avg_sq_absmax"] = quantize_blockwise(v, UNSIGNED)
            del entry["exp_avg_sq_layout"]
    return legacy


@pytest.mark.parametrize("cls", [SPAM, StableSPAM, AdaptiveMomentumAdamW])
def test_checkpoint_in_the_linear_layout_loads_and_is_converted(cls) -> None:
    model, batches = _digits_like()
    optimizer = cls(model.parameters(), lr=1e-3, state_bits=8)
    _fit(model, optimizer, batches[:4])
    w = model[0].weight
    assert optimizer.state[w]["exp_avg_sq_layout"] == SQRT_LAYOUT
    legacy = _to_linear_layout(optimizer.state_dict())
    saved = legacy["state"][0]
    linear_v = dequantize_blockwise(saved["exp_avg_sq_codes"], saved["exp_avg_sq_absmax"], UNSIGNED)

    weights = copy.deepcopy(model.state_dict())
    runs = {}
    for bits in (8, 32):  # the 32-bit optimizer dequantizes the checkpoint on load (to_full_)
        model.load_state_dict(weights)
        resumed = cls(model.parameters(), lr=1e-3, state_bits=bits)
        resumed.load_state_dict(copy.deepcopy(legacy))
        state = resumed.state[w]
        if bits == 8:
            assert moment_layout(state, "exp_avg_sq", False) == LINEAR_LAYOUT
            assert torch.equal(load_moment(state, "exp_avg_sq", False), linear_v)  # read as saved, not squared
        else:
            assert torch.equal(state["exp_avg_sq"], linear_v)
        _fit(model, resumed, batches[4:5])
        runs[bits] = w.detach().clone()
        if bits == 8:  # the first store wrote the √v layout
            assert state["exp_avg_sq_layout"] == SQRT_LAYOUT
    assert torch.equal(runs[8], runs[32])  # both stepped from the same fp32 m and v


# ------------------------------------------------------------------------- fault 2: non-finite entries
@pytest.mark.parametrize("signed", [True, False])
def test_a_non_finite_entry_costs_only_itself(signed: bool) -> None:
    qmap = dynamic_map(signed)
    x = torch.randn(600) if signed else torch.rand(600)
    bad = x.clone()
    bad[5], bad[17], bad[300] = math.inf, math.nan, -math.inf
    finite = x.clone()
    finite[[5, 17, 300]] = 0.0
    codes, absmax = quantize_blockwise(bad, qmap)
    ref_codes, ref_absmax = quantize_blockwise(finite, qmap)
    assert torch.equal(absmax, ref_absmax)  # from the finite entries
    others = torch.ones(600, dtype=torch.bool)
    others[[5, 17, 300]] = False
    assert torch.equal(codes[others], ref_codes[others])
    x_hat = dequantize_blockwise(codes, absmax, qmap)
    assert torch.equal(x_hat[others], dequantize_blockwise(ref_codes, ref_absmax, qmap)[others])
    assert x_hat[5].item() == absmax[0].item()  # +inf saturates at +N_b
    assert x_hat[17].item() == 0.0  # NaN stores the exact zero
    assert x_hat[300].item() == (qmap[0] * absmax[1]).item()  # -inf: the map's smallest value
    assert torch.isfinite(x_hat).all()


def test_non_finite_second_moment_entries_in_the_sqrt_layout() -> None:
    v = torch.rand(256)
    v[7], v[8] = math.inf, math.nan
    v_hat = dequantize_moment(*quantize_moment(v, False), False)
    top = int(torch.where(torch.isfinite(v), v, 0).argmax())
    assert v_hat[7].item() == v_hat[top].item()  # saturates at the block's finite max (its √ is N_b)
    assert v_hat[8].item() == 0.0
    assert torch.isfinite(v_hat).all()


def test_an_all_non_finite_block_dequantizes_to_zeros() -> None:
    x = torch.tensor([math.inf, -math.inf, math.nan] * 100)
    codes, absmax = quantize_blockwise(x, SIGNED)
    assert _is_pos_zero(absmax) and _is_pos_zero(dequantize_blockwise(codes, absmax, SIGNED))


@pytest.mark.parametrize("bad", [math.inf, -math.inf, math.nan])
def test_spam_step_with_one_non_finite_gradient_entry_keeps_its_block_finite(bad: float) -> None:
    p = torch.nn.Parameter(torch.randn(64, 64))  # 4096 elements: 8-bit moments
    optimizer = SPAM([p], lr=1e-3, state_bits=8)
    gen = torch.Generator().manual_seed(0)
    for step in range(3):
        p.grad = torch.randn(64, 64, generator=gen)
        if step == 2:
            p.grad[0, 0] = bad  # block 0 holds entries 0..255
        optimizer.step()
    state = optimizer.state[p]
    for key, signed in (("exp_avg", True), ("exp_avg_sq", False)):
        value = load_moment(state, key, signed).reshape(-1)
        assert torch.isfinite(value).all(), key  # the bad entry saturates (±inf) or is forgotten (NaN)
        assert torch.isfinite(state[f"{key}_absmax"]).all()
        assert (value[1:256] != 0).all()  # the other 255 entries of that block kept their values
    assert torch.isfinite(p.detach().reshape(-1)[1:]).all()


# ---------------------------------------------------------------------------------- fault 3: one reset
def _poisoned_state() -> dict:
    """Our 8-bit layout with random codes and a block whose absmax is Inf (and one NaN)."""
    gen = torch.Generator().manual_seed(0)
    state = {"step": torch.tensor(5.0)}
    for key, signed in (("exp_avg", True), ("exp_avg_sq", False)):
        state[f"{key}_codes"] = torch.randint(0, 256, (20, 30), generator=gen).to(torch.uint8)
        state[f"{key}_absmax"] = torch.tensor([math.inf, math.nan, 2.0])
    state["exp_avg_sq_layout"] = SQRT_LAYOUT
    return state


def _optimizer_reset(state: dict, mask: torch.Tensor | None) -> None:
    LowBitMoments(state, {"exp_avg": True, "exp_avg_sq": False}).reset_(mask)


def _adapter_reset(state: dict, mask: torch.Tensor | None) -> None:
    optimizer = SPAM([torch.nn.Parameter(torch.zeros(2))], state_bits=8)
    state_adapter(optimizer).reset_(state, mask=mask)


@pytest.mark.parametrize("mask", [None, torch.tensor(True)], ids=["unmasked", "masked"])
@pytest.mark.parametrize("reset", [_optimizer_reset, _adapter_reset], ids=["optimizer", "adapter"])
def test_reset_of_an_inf_absmax_block_gives_exact_zeros(reset, mask) -> None:
    state = _poisoned_state()
    reset(state, mask)
    for key, signed in (("exp_avg", True), ("exp_avg_sq", False)):
        assert _is_pos_zero(load_moment(state, key, signed)), key
        assert (state[f"{key}_codes"] == zero_code(signed)).all() and _is_pos_zero(state[f"{key}_absmax"])
    assert state["step"].item() == 5.0


def _function_reset(state: dict, mask: torch.Tensor | None) -> None:
    for key, signed in (("exp_avg", True), ("exp_avg_sq", False)):
        reset_moment_(state, key, signed, mask=mask)


def test_optimizer_and_adapter_resets_are_one_implementation() -> None:
    results = []
    for reset in (_optimizer_reset, _adapter_reset, _function_reset):
        state = _poisoned_state()
        reset(state, None)
        results.append(state)
    for other in results[1:]:
        assert set(other) == set(results[0])
        for key, value in results[0].items():
            assert torch.equal(other[key], value) if isinstance(value, torch.Tensor) else other[key] == value


def test_masked_reset_is_sync_free_and_false_mask_keeps_everything() -> None:
    state = _poisoned_state()
    before = copy.deepcopy(state)
    reset_moment_(state, "exp_avg", True, mask=torch.tensor(False))
    assert torch.equal(state["exp_avg_codes"], before["exp_avg_codes"])
    assert torch.equal(state["exp_avg_absmax"].view(torch.int32), before["exp_avg_absmax"].view(torch.int32))  # NaN too
    with _RecordOps() as rec:
        for reset in (_optimizer_reset, _adapter_reset):
            reset(state, torch.tensor(True))
    assert rec.names and "aten._local_scalar_dense.default" not in rec.names
    with pytest.raises(ValueError, match="mask"):
        reset_moment_(state, "exp_avg", True, mask=torch.tensor([True]))


# --------------------------------------------------------------------------------- fault 4: the warning
def _groups(*shapes, state_bits: int = 8, names=None) -> list[dict]:
    group = {"params": [torch.nn.Parameter(torch.zeros(s)) for s in shapes], "state_bits": state_bits}
    if names is not None:
        group["param_names"] = list(names)
    return [group]


def test_warns_for_a_tall_eight_bit_table_naming_shape_and_fix() -> None:
    with pytest.warns(UserWarning) as record:
        flagged = warn_if_embedding_like(_groups((512, 64), (64, 64)), "SPAM")
    assert flagged == [(512, 64)] and len(record) == 1
    message = str(record[0].message)
    assert "SPAM" in message and "512×64" in message and "64×64" not in message
    assert "state_bits=32" in message and "param_groups" in message and "'embedding'" in message
    assert record[0].filename == __file__  # points at the caller, not at lowbit.py


@pytest.mark.parametrize(
    "groups",
    [
        _groups((512, 64), state_bits=32),  # already 32-bit
        _groups((256, 8)),  # 2048 elements: fp32 state anyway
        _groups((256, 64)),  # a 4·d × d MLP up-projection
        _groups((64, 512)),  # wide
        _groups((64, 64, 4)),  # not 2-D
        _groups((512, 64), names=["mlp.up_proj.weight"]),  # named: the name decides
    ],
)
def test_no_warning_for_other_parameters(groups) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert warn_if_embedding_like(groups, "SPAM") == []


def test_names_decide_when_the_group_has_them() -> None:
    with pytest.warns(UserWarning, match="100×100"):
        assert warn_if_embedding_like(_groups((100, 100), names=["model.embed_tokens.weight"]), "SPAM") == [(100, 100)]
    with pytest.warns(UserWarning, match="1024×64"):
        warn_if_embedding_like(_groups((1024, 64), names=["transformer.wte.weight"]), "SPAM")


def test_warns_once_per_optimizer_and_accepts_plain_parameter_lists() -> None:
    owner = SPAM([torch.nn.Parameter(torch.zeros(2))])
    groups = _groups((512, 64))
    with pytest.warns(UserWarning) as record:
        warn_if_embedding_like(groups, owner)
        assert warn_if_embedding_like(groups, owner) == []  # already warned for this optimizer
        warn_if_embedding_like(groups, SPAM([torch.nn.Parameter(torch.zeros(2))]))  # another optimizer
        warn_if_embedding_like(groups[0], "SPAM")  # one group dict
        warn_if_embedding_like(groups[0]["params"], "SPAM")  # tensors: taken as a state_bits=8 group
    assert len(record) == 4 and all("SPAM" in str(r.message) for r in record)


# -------------------------------------------------------------------------------- fault 5: the quantizer
def _reference_codes(y: torch.Tensor, qmap: torch.Tensor) -> torch.Tensor:
    """Nearest rounding with ties up by exact float64 comparison against every midpoint."""
    q = qmap.double()
    mid = (q[:-1] + q[1:]) / 2
    return (y.double()[:, None] >= mid[None, :]).sum(1)


@pytest.mark.parametrize("signed", [True, False])
def test_table_quantizer_equals_nearest_rounding_at_every_threshold(signed: bool) -> None:
    qmap = dynamic_map(signed)
    q = qmap.double()
    mid = ((q[:-1] + q[1:]) / 2).float()
    up, down = torch.full_like(mid, math.inf), torch.full_like(mid, -math.inf)
    gen = torch.Generator().manual_seed(0)
    bits = torch.randint(-(2**31), 2**31 - 1, (1 << 15,), dtype=torch.int64, generator=gen).to(torch.int32)
    random = bits.view(torch.float32)
    random = random[torch.isfinite(random) & (random.abs() <= 1)]
    y = torch.cat([mid, torch.nextafter(mid, up), torch.nextafter(mid, down), qmap, random,
                   torch.tensor([0.0, -0.0, 1.0, -1.0, 1e-45, -1e-45])])
    x = torch.cat([torch.ones(1), y])  # absmax 1: y = x exactly
    codes, absmax = quantize_blockwise(x, qmap, block_size=x.numel())
    assert absmax.item() == 1.0
    assert torch.equal(codes[1:].long(), _reference_codes(y, qmap))
    floored, _ = quantize_blockwise(x, qmap, block_size=x.numel(), positive_floor=True)
    first_positive = int((qmap <= 0).sum())
    expect = torch.where((y > 0) & (codes[1:].long() < first_positive), first_positive, codes[1:].long())
    assert torch.equal(floored[1:].long(), expect)


def test_a_map_the_tables_cannot_serve_falls_back_to_searchsorted() -> None:
    # -0.999995 and -0.999985 (two thresholds) share one bucket of 2^-8 width
    qmap = torch.cat([torch.tensor([-1.0, -0.99999, -0.99998]), torch.linspace(-0.9, 1, 253)]).sort().values
    x = torch.cat([torch.ones(1), torch.rand(4000) * 2 - 1, torch.tensor([math.nan, -math.inf])])
    codes, _ = quantize_blockwise(x, qmap, block_size=x.numel())
    assert torch.equal(codes[:-2].long(), _reference_codes(x[:-2], qmap))
    assert codes[-2].item() == int(qmap.abs().argmin()) and codes[-1].item() == 0  # NaN -> nearest 0, -inf -> min


def test_device_map_tables_are_built_without_reading_the_map_back() -> None:
    # the constant maps' rounding tables come from their CPU originals (no device read on first use)
    qmap = device_map(True, "cpu")
    x = torch.randn(4096)
    assert torch.equal(quantize_blockwise(x, qmap)[0], quantize_blockwise(x, SIGNED)[0])


@pytest.mark.parametrize("signed", [True, False])
def test_cpu_chunks_give_the_same_codes_as_one_pass(signed: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    from lightning_optim import lowbit

    n = 3 * lowbit._CPU_CHUNK + 77  # several chunks and a short last block
    x = torch.randn(n, generator=torch.Generator().manual_seed(1)) * torch.logspace(-12, 12, n)
    x[5], x[n - 3] = math.inf, math.nan
    value = x.abs() if not signed else x
    chunked = quantize_moment(value, signed)
    read = dequantize_moment(*chunked, signed)
    monkeypatch.setattr(lowbit, "_CPU_CHUNK", 2 * n)
    whole = quantize_moment(value, signed)
    assert all(torch.equal(a, b) for a, b in zip(chunked, whole))
    assert torch.equal(read, dequantize_moment(*whole, signed))
    empty = quantize_moment(torch.zeros(0), signed)
    assert empty[0].shape == (0,) and empty[1].shape == (0,)
