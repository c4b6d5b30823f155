"""State adapters: reads return the right (live or dequantized) moments, resets give exact zeros, step kept."""

from __future__ import annotations

import copy
import itertools
import subprocess
import sys

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import lightning_optim
import lightning_optim
from lightning_optim import SPAM, AdaptiveMomentumAdamW, AdaptiveMomentumSGD, StableSPAM
from lightning_optim.lowbit import device_map
from lightning_optim.state_adapters import (
    BitsAndBytesStateAdapter,
    KeyedStateAdapter,
    StateAdapter,
    iter_states,
    register_state_adapter,
    state_adapter,
)


class _RecordOps(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.names: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(str(func))
        return func(*args, **(kwargs or {}))


def _train(model: nn.Module, opt: torch.optim.Optimizer, steps: int = 3, seed: int = 0) -> None:
    gen = torch.Generator().manual_seed(seed)
    first = next(model.parameters())
    in_features = model[0].in_features
    for _ in range(steps):
        opt.zero_grad()
        x = torch.randn(4, in_features, generator=gen).to(first.dtype)
        model(x).float().pow(2).mean().backward()
        opt.step()


def _model(dtype: torch.dtype = torch.float32, sizes: tuple[int, ...] = (5, 4, 3)) -> nn.Module:
    torch.manual_seed(0)
    layers = [nn.Linear(a, b) for a, b in itertools.pairwise(sizes)]
    return nn.Sequential(*layers).to(dtype)


def _clone(value):
    return value.clone() if isinstance(value, torch.Tensor) else value


def _snapshot(opt: torch.optim.Optimizer) -> list[dict]:
    return [{k: _clone(v) for k, v in s.items()} for _, _, s in iter_states(opt)]


def _assert_bit_identical(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b)
    for sa, sb in zip(a, b):
        assert sa.keys() == sb.keys()
        for k in sa:
            if isinstance(sa[k], torch.Tensor):
                bits_a, bits_b = (t.reshape(-1).view(torch.uint8) for t in (sa[k], sb[k]))
                assert torch.equal(bits_a, bits_b), k
            else:
                assert sa[k] == sb[k], k


def _is_pos_zero(t: torch.Tensor) -> bool:
    # exact +0.0 bit patterns (not -0.0)
    return bool((t.float().view(torch.int32) == 0).all())


TORCH_CASES = [
    ("adam", torch.optim.Adam, {}, "exp_avg", "exp_avg_sq", ()),
    ("adam_foreach", torch.optim.Adam, {"foreach": True}, "exp_avg", "exp_avg_sq", ()),
    ("adam_single", torch.optim.Adam, {"foreach": False}, "exp_avg", "exp_avg_sq", ()),
    ("adam_fused", torch.optim.Adam, {"fused": True}, "exp_avg", "exp_avg_sq", ()),
    ("adam_amsgrad", torch.optim.Adam, {"amsgrad": True}, "exp_avg", "exp_avg_sq", ("max_exp_avg_sq",)),
    ("adamw", torch.optim.AdamW, {"weight_decay": 0.1}, "exp_avg", "exp_avg_sq", ()),
    ("adamw_fused_amsgrad", torch.optim.AdamW, {"fused": True, "amsgrad": True}, "exp_avg", "exp_avg_sq",
     ("max_exp_avg_sq",)),
    ("nadam", torch.optim.NAdam, {}, "exp_avg", "exp_avg_sq", ()),
    ("radam", torch.optim.RAdam, {}, "exp_avg", "exp_avg_sq", ()),
    ("adamax", torch.optim.Adamax, {}, "exp_avg", None, ("exp_inf",)),
    ("sgd_momentum", torch.optim.SGD, {"lr": 0.1, "momentum": 0.9}, "momentum_buffer", None, ()),
    ("rmsprop", torch.optim.RMSprop, {"lr": 0.01}, None, "square_avg", ()),
    ("rmsprop_centered_momentum", torch.optim.RMSprop, {"lr": 0.01, "centered": True, "momentum": 0.9},
     "momentum_buffer", "square_avg", ("grad_avg",)),
]


def _make(cls, kwargs, dtype=torch.float32):
    if kwargs.get("fused"):
        try:
            model = _model(dtype)
            opt = cls(model.parameters(), **kwargs)
            _train(model, opt, 1)
        except (RuntimeError, AssertionError) as exc:  # pragma: no cover - depends on the torch build
            pytest.skip(f"fused {cls.__name__} unsupported here: {exc}")
    model = _model(dtype)
    opt = cls(model.parameters(), **kwargs)
    _train(model, opt)
    return model, opt


@pytest.mark.parametrize("case", TORCH_CASES, ids=[c[0] for c in TORCH_CASES])
def test_torch_optimizers_read_live_tensors_and_reset_exactly(case):
    _, cls, kwargs, first_key, second_key, extra = case
    model, opt = _make(cls, kwargs)
    adapter = state_adapter(opt)
    assert not adapter.quantized
    assert adapter.has_first_moment == (first_key is not None or cls is torch.optim.RMSprop)  # momentum optional
    assert adapter.has_second_moment == (second_key is not None or cls is torch.optim.Adamax)
    states = list(iter_states(opt))
    assert len(states) == 4
    for _, _, state in states:
        first = adapter.first_moment(state)
        if first_key is None:
            assert first is None
        else:
            assert first is state[first_key]
            assert adapter.writable_first_moment(state) is state[first_key]
        second = adapter.second_moment(state)
        if cls is torch.optim.Adamax:  # infinity-norm analogue, squared
            assert torch.equal(second, state["exp_inf"] ** 2)
        elif second_key is None:
            assert second is None
        else:
            assert second is state[second_key]
        assert adapter.step(state) is state.get("step")

    # mask False: bit-identical; mask True: exact zeros, step (and NAdam's mu_product) untouched
    before = _snapshot(opt)
    for _, _, state in iter_states(opt):
        adapter.reset_(state, mask=torch.tensor(False))
    _assert_bit_identical(before, _snapshot(opt))
    keys = [k for k in (first_key, second_key, *extra) if k is not None]
    for _, _, state in iter_states(opt):
        for k in keys:
            state[k].fill_(float("nan"))
        adapter.reset_(state, mask=torch.tensor(True))
    after = _snapshot(opt)
    for old, new in zip(before, after):
        for k, v in new.items():
            if k in keys:
                assert _is_pos_zero(v), k
            else:
                assert torch.equal(v, old[k]), k  # step, mu_product
    # training goes on from the zero moments
    _train(model, opt, 2, seed=1)
    assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.parametrize("case", TORCH_CASES[:1] + TORCH_CASES[5:6] + TORCH_CASES[10:11], ids=["adam", "adamw", "sgd"])
def test_unmasked_reset_and_nan(case):
    _, cls, kwargs, first_key, second_key, _ = case
    _, opt = _make(cls, kwargs)
    adapter = state_adapter(opt)
    for _, _, state in iter_states(opt):
        step = state.get("step")
        step = step.clone() if isinstance(step, torch.Tensor) else step
        state[first_key].fill_(float("inf"))
        adapter.reset_(state)
        assert _is_pos_zero(state[first_key])
        if second_key:
            assert _is_pos_zero(state[second_key])
        if step is not None:
            assert torch.equal(state["step"], step)


def test_sgd_without_momentum_keeps_no_first_moment():
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    _train(model, opt)
    adapter = state_adapter(opt)
    fake = {"momentum_buffer": None}  # torch versions that store None
    assert adapter.first_moment(fake) is None and adapter.second_moment(fake) is None
    adapter.reset_(fake)
    adapter.reset_({})
    assert adapter.first_moment({}) is None
    assert list(iter_states(opt)) == [] or all(adapter.first_moment(s) is None for _, _, s in iter_states(opt))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="capturable Adam needs an accelerator")
def test_capturable_adam_on_cuda():  # pragma: no cover - GPU only
    model = _model().cuda()
    opt = torch.optim.Adam(model.parameters(), capturable=True)
    for _ in range(3):
        opt.zero_grad()
        model(torch.randn(4, 5, device="cuda")).pow(2).mean().backward()
        opt.step()
    adapter = state_adapter(opt)
    for _, _, state in iter_states(opt):
        assert adapter.step(state).device.type == "cuda"
        step = state["step"].clone()
        adapter.reset_(state, mask=torch.tensor(True, device="cuda"))
        assert _is_pos_zero(state["exp_avg"]) and _is_pos_zero(state["exp_avg_sq"])
        assert torch.equal(state["step"], step)


def test_several_groups_and_dtypes():
    torch.manual_seed(0)
    a = nn.Linear(5, 4)
    b = nn.Linear(4, 3).to(torch.bfloat16)
    opt = torch.optim.AdamW([{"params": a.parameters()}, {"params": b.parameters(), "lr": 1e-2}])
    for _ in range(3):
        opt.zero_grad()
        (b(a(torch.randn(4, 5)).bfloat16()).float() ** 2).mean().backward()
        opt.step()
    adapter = state_adapter(opt)
    seen = list(iter_states(opt))
    assert [g is opt.param_groups[1] for g, _, _ in seen] == [False, False, True, True]
    for _, p, state in seen:
        assert adapter.first_moment(state).dtype == p.dtype  # torch keeps bf16 moments for bf16 params
        adapter.reset_(state)
        assert _is_pos_zero(state["exp_avg"]) and _is_pos_zero(state["exp_avg_sq"])


def test_masked_reset_is_sync_free():
    _, opt = _make(torch.optim.Adam, {"amsgrad": True})
    adapter = state_adapter(opt)
    mask = torch.tensor(True)
    states = [s for _, _, s in iter_states(opt)]
    # our 8-bit layout as well (building its map on first use reads host memory only)
    q = {"exp_avg_codes": torch.full((300,), 3, dtype=torch.uint8), "exp_avg_absmax": torch.ones(2),
         "exp_avg_sq_codes": torch.full((300,), 200, dtype=torch.uint8), "exp_avg_sq_absmax": torch.ones(2)}
    keyed = KeyedStateAdapter("ours", "exp_avg", "exp_avg_sq")
    with _RecordOps() as rec:
        for state in states:
            adapter.second_moment(state)
            adapter.reset_(state, mask=mask)
        keyed.first_moment(q)
        keyed.second_moment(q)
        keyed.reset_(q, mask=mask)
    assert rec.names and "aten._local_scalar_dense.default" not in rec.names
    assert _is_pos_zero(keyed.first_moment(q)) and _is_pos_zero(keyed.second_moment(q))


# -- our optimizers ----------------------------------------------------------------------------------------
OURS = [e for e in lightning_optim.optimizers(ours=True) if not e.needs_hvp]  # HVP ones: tests/test_adahessian.py


@pytest.mark.parametrize("info", OURS, ids=lambda e: e.name)
def test_our_optimizers(info):
    """Every registered optimizer of ours: the adapter reads the StateSpec's first and second moment, a
    masked-off reset changes nothing, a reset zeroes every moment (+0.0) and the buffers its adapter declares
    as moment-like (``also_reset``: Natural GaLore's gradient history), and keeps counters and scalars."""
    spec = info.cls.state_spec
    first_key, second_key = spec.first_moment, spec.second_moment
    model = _model()
    opt = info.build(model.parameters(), **({info.total_steps_arg: 10} if info.total_steps_arg else {}))
    _train(model, opt)
    adapter = state_adapter(opt)
    assert state_adapter(opt) is adapter
    for _, _, state in iter_states(opt):
        # an optimizer with two rules (Muon's matrix and AdamW parts) keeps only its rule's moments
        assert adapter.first_moment(state) is (state.get(first_key) if first_key else None)
        assert adapter.second_moment(state) is (state.get(second_key) if second_key else None)
        zeroed = (*spec.moments, *getattr(adapter, "also_reset", ()))
        kept = {k: v.clone() for k, v in state.items() if k not in zeroed and isinstance(v, torch.Tensor)}
        before = _snapshot(opt)
        adapter.reset_(state, mask=torch.tensor(False))
        _assert_bit_identical(before, _snapshot(opt))
        adapter.reset_(state)
        for key in zeroed:
            if key in state:
                assert _is_pos_zero(state[key]), key
        for k, v in kept.items():  # step counters and per-tensor statistics (StableSPAM's m_max, ...)
            assert torch.equal(state[k], v), k
    _train(model, opt, 2, seed=1)
    assert all(torch.isfinite(p).all() for p in model.parameters())


def _params_after(cls, kwargs, steps, before_step=None):
    model = _model()
    opt = cls(model.parameters(), **kwargs)
    gen = torch.Generator().manual_seed(0)
    for t in range(1, steps + 1):
        opt.zero_grad()
        model(torch.randn(4, 5, generator=gen)).pow(2).mean().backward()
        if before_step is not None:
            before_step(opt, t)
        opt.step()
    return [p.detach().clone() for p in model.parameters()]


def test_adapter_reset_equals_spam_own_reset():
    common = {"lr": 1e-2, "warmup_steps": 0, "threshold": float("inf"), "clip_delay": 0, "foreach": False}

    def reset_at_4(opt, t):
        if t == 4:
            adapter = state_adapter(opt)
            for _, _, state in iter_states(opt):
                adapter.reset_(state)

    own = _params_after(SPAM, {**common, "reset_interval": 4}, 6)
    via_adapter = _params_after(SPAM, {**common, "reset_interval": 0}, 6, reset_at_4)
    assert all(torch.equal(a, b) for a, b in zip(own, via_adapter))


def test_adapter_reset_equals_stable_spam_own_reset_up_to_its_step_restart():
    # StableSPAM's own reset also restarts its Adam count k ("step"); the adapter never touches step,
    # so restart it by hand to compare: the rest (moments zeroed, statistics kept) must match exactly.
    def reset_at_4(opt, t):
        if t == 4:
            adapter = state_adapter(opt)
            for _, _, state in iter_states(opt):
                adapter.reset_(state)
                state["step"].zero_()

    own = _params_after(StableSPAM, {"lr": 1e-2, "reset_interval": 4, "foreach": False}, 6)
    via_adapter = _params_after(StableSPAM, {"lr": 1e-2, "reset_interval": 0, "foreach": False}, 6, reset_at_4)
    assert all(torch.equal(a, b) for a, b in zip(own, via_adapter))


# -- our 8-bit layout ----------------------------------------------------------------------------------------
def _quantize(x: torch.Tensor, qmap: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    flat = x.reshape(-1)
    pad = (-flat.numel()) % 256
    blocks = torch.cat([flat, flat.new_zeros(pad)]).view(-1, 256)
    absmax = blocks.abs().amax(1)
    y = (blocks / absmax.clamp_min(1e-30)[:, None]).reshape(-1)[: flat.numel()]
    codes = (y[:, None] - qmap[None, :]).abs().argmin(1).to(torch.uint8)
    return codes.view(x.shape), absmax


def test_our_8bit_layout_read_and_reset():
    signed, unsigned = device_map(True, "cpu"), device_map(False, "cpu")
    assert signed[127] == 0 and unsigned[0] == 0 and signed.min() > -1 and signed.max() == 1
    m, v = torch.randn(20, 30), torch.rand(20, 30)  # 600 entries: last block partial
    state = {"step": torch.tensor(7.0)}
    state["exp_avg_codes"], state["exp_avg_absmax"] = _quantize(m, signed)
    state["exp_avg_sq_codes"], state["exp_avg_sq_absmax"] = _quantize(v, unsigned)
    adapter = KeyedStateAdapter("ours", "exp_avg", "exp_avg_sq")
    blocks = torch.arange(600) // 256
    expect_m = (signed[state["exp_avg_codes"].long().view(-1)] * state["exp_avg_absmax"][blocks]).view(20, 30)
    assert torch.equal(adapter.first_moment(state), expect_m)
    assert (adapter.first_moment(state) - m).abs().max() <= 0.0071 * m.abs().max()
    assert (adapter.second_moment(state) - v).abs().max() <= 0.0036 * v.abs().max()
    with pytest.raises(NotImplementedError, match="ours"):
        adapter.writable_first_moment(state)
    state["exp_avg_absmax"][0] = float("inf")
    adapter.reset_(state, mask=torch.tensor(False))
    assert state["exp_avg_absmax"][0] == float("inf")
    adapter.reset_(state, mask=torch.tensor(True))
    assert (state["exp_avg_codes"] == 127).all() and (state["exp_avg_sq_codes"] == 0).all()
    assert _is_pos_zero(adapter.first_moment(state)) and _is_pos_zero(adapter.second_moment(state))
    assert state["step"] == 7


# -- bitsandbytes ----------------------------------------------------------------------------------------
def test_module_does_not_import_bitsandbytes():
    code = "import sys, lightning_optim.state_adapters; print('bitsandbytes' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def _bnb():
    return pytest.importorskip("bitsandbytes")


def _bnb_model() -> nn.Module:
    # 8192-, 6400- and 5000-element weights are 8-bit (the last ends in a partial block); biases stay fp32
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(128, 64), nn.Linear(64, 100), nn.Linear(100, 50))


BNB_CASES = [("AdamW8bit", True, True), ("Adam", False, True), ("Lion8bit", True, False), ("PagedAdam8bit", True, True)]


@pytest.mark.filterwarnings("ignore:Paged optimizers are not supported on CPU")
@pytest.mark.parametrize("case", BNB_CASES, ids=[c[0] for c in BNB_CASES])
def test_bitsandbytes_read_and_reset(case):
    bnb = _bnb()
    from bitsandbytes.functional import dequantize_blockwise

    name, eight_bit, has_second = case
    model = _bnb_model()
    opt = getattr(bnb.optim, name)(model.parameters(), lr=1e-3)
    _train(model, opt)
    adapter = state_adapter(opt)
    assert isinstance(adapter, BitsAndBytesStateAdapter) and adapter.quantized and state_adapter(opt) is adapter
    assert adapter.has_first_moment and adapter.has_second_moment == has_second
    n_quantized = 0
    for _, p, state in iter_states(opt):
        assert adapter.step(state) == 3
        for i, read in ((1, adapter.first_moment), (2, adapter.second_moment)):
            if i == 2 and not has_second:
                assert read(state) is None
                continue
            raw = state[f"state{i}"]
            if raw.dtype == torch.uint8:
                n_quantized += 1
                expect = dequantize_blockwise(raw, absmax=state[f"absmax{i}"], code=state[f"qmap{i}"], blocksize=256)
                assert torch.equal(read(state), expect.view(p.shape))
            else:
                assert read(state) is raw
        if state["state1"].dtype == torch.uint8:
            with pytest.raises(NotImplementedError, match=name):
                adapter.writable_first_moment(state)
        else:
            assert adapter.writable_first_moment(state) is state["state1"]
    assert n_quantized == ((2 if has_second else 1) * 3 if eight_bit else 0)  # the three weights

    before = _snapshot(opt)
    for _, _, state in iter_states(opt):
        adapter.reset_(state, mask=torch.tensor(False))
    _assert_bit_identical(before, _snapshot(opt))
    with _RecordOps() as rec:
        for _, _, state in iter_states(opt):
            adapter.reset_(state, mask=torch.tensor(True))
            adapter.second_moment(state)
    assert "aten._local_scalar_dense.default" not in rec.names
    for _, _, state in iter_states(opt):
        assert _is_pos_zero(adapter.first_moment(state))
        if has_second:
            assert _is_pos_zero(adapter.second_moment(state))
        assert adapter.step(state) == 3
        if state["state1"].dtype == torch.uint8:  # bitsandbytes' own dequantize agrees
            assert _is_pos_zero(dequantize_blockwise(state["state1"], absmax=state["absmax1"], code=state["qmap1"],
                                                     blocksize=256))
    _train(model, opt, 3, seed=1)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert all(torch.isfinite(adapter.first_moment(s)).all() for _, _, s in iter_states(opt))


def test_bitsandbytes_nested_state_dict():
    bnb = _bnb()
    model = _bnb_model()
    opt = bnb.optim.AdamW8bit(model.parameters(), lr=1e-3)
    _train(model, opt)
    adapter = state_adapter(opt)
    live = _snapshot(opt)
    sd = copy.deepcopy(opt.state_dict())  # bitsandbytes' state_dict shares the live tensors: copy first
    entries = list(sd["state"].values())
    nested = [e["__bnb_optimizer_quant_state__"] for e in entries]
    assert any(n["state1"].dtype == torch.uint8 for n in nested) and all("step" in e for e in entries)
    for (_, _, state), entry in zip(iter_states(opt), entries):  # reads through the nested form
        assert torch.equal(adapter.first_moment(entry), adapter.first_moment(state))
        assert torch.equal(adapter.second_moment(entry), adapter.second_moment(state))
    for entry in entries:
        adapter.reset_(entry)
        assert _is_pos_zero(adapter.first_moment(entry)) and _is_pos_zero(adapter.second_moment(entry))
        assert entry["step"] == 3
    _assert_bit_identical(live, _snapshot(opt))  # the live optimizer was not touched
    opt.load_state_dict(sd)
    for _, _, state in iter_states(opt):
        assert _is_pos_zero(adapter.first_moment(state)) and _is_pos_zero(adapter.second_moment(state))
    _train(model, opt, 2, seed=1)
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_bitsandbytes_map_matches_ours():
    _bnb()
    from bitsandbytes.functional import create_dynamic_map

    for signed in (True, False):
        assert torch.equal(device_map(signed, "cpu"), create_dynamic_map(signed=signed))


# -- registry ----------------------------------------------------------------------------------------------
def test_unregistered_optimizers_raise_type_error():
    model = _model()
    opt = torch.optim.Adagrad(model.parameters())
    _train(model, opt, 1)
    with pytest.raises(TypeError) as info:
        state_adapter(opt)
    msg = str(info.value)
    assert "Adagrad" in msg and "'sum'" in msg and "'step'" in msg and "register_state_adapter" in msg

    class MyOptimizer(torch.optim.Optimizer):
        def __init__(self, params):
            super().__init__(params, {})

    mine = MyOptimizer(model.parameters())
    with pytest.raises(TypeError, match=r"MyOptimizer.*no state yet.*register_state_adapter"):
        state_adapter(mine)
    adapter = KeyedStateAdapter("MyOptimizer", first="m")
    register_state_adapter(MyOptimizer, adapter)
    try:
        assert lightning_optim.state_adapter(mine) is adapter
    finally:
        from lightning_optim import state_adapters

        state_adapters._REGISTRY.pop(MyOptimizer)
    with pytest.raises(TypeError):
        register_state_adapter(MyOptimizer, object())  # type: ignore[arg-type]


def test_subclasses_use_the_parent_adapter_and_custom_subclass_adapter():
    class MyAdamW(torch.optim.AdamW):
        pass

    model = _model()
    assert state_adapter(MyAdamW(model.parameters())) is state_adapter(torch.optim.AdamW(model.parameters()))

    class Scaled(StateAdapter):
        def first_moment(self, state):
            return state.get("m")

        def reset_(self, state, mask=None):
            state["m"].zero_()

    adapter = Scaled()
    assert adapter.has_first_moment and not adapter.has_second_moment
    assert adapter.second_moment({"m": torch.ones(1)}) is None and adapter.step({"step": 2}) == 2
    assert adapter.writable_first_moment({"m": torch.ones(1)}) is not None
    with pytest.raises(ValueError, match="mask"):
        state_adapter(torch.optim.Adam(model.parameters())).reset_({}, mask=torch.ones(2, dtype=torch.bool))
