"""Stability callbacks with third-party low-bit optimizers (low_bit_and_qat.md part B, numeric check 3).

bitsandbytes (AdamW8bit, PagedAdamW8bit, Lion8bit) in Lightning fits on the CPU, and torchao's AdamW8bit,
AdamW4bit and AdamWFp8 (read/reset on real optimizer state, one fit). The adapters' basic bitsandbytes
read/reset checks live in test_state_adapters.py; here they are extended, not repeated.
"""

from __future__ import annotations

import copy
import math
import subprocess
import sys

import lightning.pytorch as pl
import pytest
import torch
from torch import nn

from callback_models import GradientSpike, Regression, fit
from lightning_optim.callbacks import AdaptiveMomentum, MomentumReset, SpikeAwareClipping, SpikeGuard
from lightning_optim.state_adapters import TorchAOStateAdapter, iter_states, state_adapter
from test_state_adapters import _RecordOps, _assert_bit_identical, _is_pos_zero, _train

pytestmark = [
    pytest.mark.filterwarnings(
        "ignore:Paged optimizers are not supported on CPU",
        "ignore:.*does not have many workers",  # Lightning's DataLoader hint
    ),
    pytest.mark.usefixtures("one_thread"),
]

LR = 1e-3
THRESHOLD = 5000.0


class LowBitRegression(Regression):
    """Regression with a 64×64 hidden layer: its 4096-element weight gets quantized (8-bit) moments."""

    def __init__(self, make_optimizer, seed: int = 0) -> None:
        super().__init__(make_optimizer, seed=seed)
        torch.manual_seed(seed)
        self.net = nn.Sequential(nn.Linear(6, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 3))


def _moments(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    adapter = state_adapter(optimizer)
    out = []
    for _, _, state in iter_states(optimizer):
        out += [m for m in (adapter.first_moment(state), adapter.second_moment(state)) if m is not None]
    return out


def _n_quantized(optimizer: torch.optim.Optimizer) -> int:
    """Quantized moment tensors (bitsandbytes uint8 states, torchao subclasses)."""
    return sum(
        (isinstance(v, torch.Tensor) and v.dtype == torch.uint8) or hasattr(v, "codes")
        for _, _, s in iter_states(optimizer)
        for v in s.values()
    )


class Probe(pl.Callback):
    """What the optimizer step is about to use, per global step (host syncs: tests only).

    Placed after the stability callbacks it sees their result (they all run in the first one's hook);
    placed before them, the raw gradient. ``over``: share of entries with g² > ϑ·v (v pre-step, dequantized).
    """

    def __init__(self) -> None:
        self.rows: dict[int, dict] = {}

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        adapter = state_adapter(optimizer)
        moments = _moments(optimizer)
        over, total = 0, 0
        if adapter.has_second_moment:
            for _, p, state in iter_states(optimizer):
                v = adapter.second_moment(state)
                over += int((p.grad.square() > THRESHOLD * v * (1 + 1e-5)).sum())
                total += p.numel()
        grads = [p.grad.reshape(-1) for p in pl_module.parameters() if p.grad is not None]
        self.rows[trainer.global_step] = {
            "zero": bool(moments) and all(_is_pos_zero(m) for m in moments),
            "lr": float(optimizer.param_groups[0]["lr"]),
            "grad_norm": float(torch.cat(grads).norm()),
            "over": over / total if total else 0.0,
            "n_quantized": _n_quantized(optimizer),
        }


# -- bitsandbytes ------------------------------------------------------------------------------------------
def _bnb_factory(name: str):
    bnb = pytest.importorskip("bitsandbytes")
    return lambda params: getattr(bnb.optim, name)(params, lr=LR)


def _fit(factory, callbacks: list[pl.Callback], steps: int) -> tuple[pl.Trainer, LowBitRegression]:
    module = LowBitRegression(factory)
    trainer = fit(module, callbacks, max_steps=steps)
    params = torch.cat([p.detach().reshape(-1) for p in module.parameters()])
    assert torch.isfinite(params).all()
    return trainer, module


@pytest.mark.parametrize("name", ["AdamW8bit", "PagedAdamW8bit"])
def test_bnb_spike_aware_clipping_fit(name):
    # on the CPU bitsandbytes runs paged optimizers unpaged (with a warning): same state, same adapter
    before, after = Probe(), Probe()
    spike = GradientSpike({20}, factor=1e4)
    trainer, _ = _fit(_bnb_factory(name), [spike, before, SpikeAwareClipping(THRESHOLD, clip_delay=5), after], 25)
    assert after.rows[10]["n_quantized"] == 2  # the 64×64 weight's state1/state2 are uint8 codes
    assert before.rows[20]["over"] > 0.5  # the spike is far above ϑ·v ...
    # ... and every entry leaves clipped once clipping is active (T = global step + 1 >= clip_delay)
    assert all(row["over"] == 0.0 for step, row in after.rows.items() if step >= 4)
    assert after.rows[20]["grad_norm"] < before.rows[20]["grad_norm"] / 10
    assert all(math.isfinite(float(m.abs().max())) for m in _moments(trainer.optimizers[0]))


@pytest.mark.parametrize("name", ["AdamW8bit", "PagedAdamW8bit", "Lion8bit"])
def test_bnb_momentum_reset_fit(name):
    probe = Probe()
    trainer, _ = _fit(_bnb_factory(name), [MomentumReset(interval=10, warmup_steps=5), probe], 22)
    for step in (9, 19):  # T = 10, 20: moments exactly +0 (dequantized), the update scaled by s(0) = 0.01
        assert probe.rows[step]["zero"] and probe.rows[step]["n_quantized"] >= 1
        assert probe.rows[step]["lr"] == pytest.approx(0.01 * LR)
    for step in (5, 15, 21):
        assert not probe.rows[step]["zero"]
    assert probe.rows[21]["lr"] < LR and probe.rows[16]["lr"] == LR  # T = 22 in the warm-up, T = 17 after it
    optimizer = trainer.optimizers[0]
    assert all(state_adapter(optimizer).step(s) == 22 for _, _, s in iter_states(optimizer))  # step kept


@pytest.mark.parametrize("name", ["AdamW8bit", "Lion8bit"])
def test_bnb_spike_guard_reset_fit(name):
    probe = Probe()
    callbacks = [GradientSpike({20}, factor=1e4), SpikeGuard(warmup_steps=10, reset_warmup_steps=5), probe]
    _fit(_bnb_factory(name), callbacks, 24)
    # T = 21: the spiking gradient was rescaled to the running norm; T = 22: moments reset, warm-up starts
    assert probe.rows[20]["grad_norm"] < 5 * probe.rows[19]["grad_norm"]
    assert probe.rows[21]["zero"] and probe.rows[21]["n_quantized"] >= 1
    assert probe.rows[21]["lr"] == pytest.approx(0.01 * LR)
    assert not any(probe.rows[s]["zero"] for s in (19, 20, 22))


def test_bnb_lion_has_no_second_moment_for_spike_aware_clipping():
    with pytest.raises(TypeError, match="SpikeAwareClipping needs a second moment.*Lion8bit"):
        fit(LowBitRegression(_bnb_factory("Lion8bit")), [SpikeAwareClipping()], max_steps=1)


def test_adaptive_momentum_rejects_quantized_first_moments():
    with pytest.raises(TypeError, match="AdaptiveMomentum does not support AdamW8bit.*quantized.*exactly"):
        fit(LowBitRegression(_bnb_factory("AdamW8bit")), [AdaptiveMomentum()], max_steps=1)
    # also when every tensor is below min_8bit_size (fp32 states): the optimizer as a whole is quantized
    bnb = pytest.importorskip("bitsandbytes")
    small = bnb.optim.Lion8bit(nn.Linear(4, 3).parameters())
    with pytest.raises(TypeError, match="Lion8bit.*quantized"):
        AdaptiveMomentum().check_optimizer(small)
    AdaptiveMomentum().check_optimizer(torch.optim.AdamW(nn.Linear(4, 3).parameters()))  # still fine


def _bnb_trained(name: str = "AdamW8bit") -> torch.optim.Optimizer:
    model = nn.Sequential(nn.Linear(128, 64), nn.Linear(64, 100), nn.Linear(100, 50))  # 8-bit weights
    optimizer = _bnb_factory(name)(model.parameters())
    _train(model, optimizer)
    return optimizer


def test_bnb_reset_overwrites_nonfinite_absmax_and_codes():
    # extends test_state_adapters: an Inf/NaN block scale must not survive a reset (0·Inf = NaN)
    optimizer = _bnb_trained()
    from bitsandbytes.functional import dequantize_blockwise

    adapter = state_adapter(optimizer)
    quantized = [s for _, _, s in iter_states(optimizer) if s["state1"].dtype == torch.uint8]
    for state in quantized:
        state["absmax1"][0] = math.inf
        state["absmax2"][-1] = math.nan
        state["state1"].random_(0, 256)
        adapter.reset_(state)
        for i in (1, 2):
            ours = adapter.first_moment(state) if i == 1 else adapter.second_moment(state)
            theirs = dequantize_blockwise(state[f"state{i}"], absmax=state[f"absmax{i}"], code=state[f"qmap{i}"],
                                          blocksize=256)
            assert _is_pos_zero(ours) and _is_pos_zero(theirs)


def test_bnb_nested_state_dict_masked_reset_is_sync_free():
    # extends test_state_adapters (unmasked nested reset): the masked path through the nested form
    optimizer = _bnb_trained()
    adapter = state_adapter(optimizer)
    entries = list(copy.deepcopy(optimizer.state_dict())["state"].values())
    before = copy.deepcopy(entries)
    for entry in entries:
        adapter.reset_(entry, mask=torch.tensor(False))
    _assert_bit_identical([e["__bnb_optimizer_quant_state__"] for e in before],
                          [e["__bnb_optimizer_quant_state__"] for e in entries])
    with _RecordOps() as rec:
        for entry in entries:
            adapter.reset_(entry, mask=torch.tensor(True))
    assert "aten._local_scalar_dense.default" not in rec.names
    for entry in entries:
        assert _is_pos_zero(adapter.first_moment(entry)) and _is_pos_zero(adapter.second_moment(entry))
        assert entry["step"] == 3


# -- torchao -----------------------------------------------------------------------------------------------
@pytest.fixture
def torchao_optim(monkeypatch):
    """torchao.optim with its per-parameter step run eagerly.

    torchao compiles the step with torch.compile (inductor, a C++ build on the CPU: ~10 s per optimizer
    class); the eager step runs the same code on the same state subclasses.
    """
    optim = pytest.importorskip("torchao.optim")
    monkeypatch.setattr(torch, "compile", lambda fn, **kwargs: fn)
    return optim


def _torchao_model() -> nn.Module:
    # 8192 and 6400 elements: quantized (multiples of both blocks, 256 and 128); 5000: fp32 (not a multiple);
    # biases: fp32 (< 4096)
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(128, 64), nn.Linear(64, 100), nn.Linear(100, 50))


TORCHAO_CASES = [("AdamW8bit", "OptimState8bit"), ("AdamW4bit", "OptimState4bit"), ("AdamWFp8", "OptimStateFp8")]


def _inner(value) -> dict[str, torch.Tensor]:
    return {"codes": value.codes.clone(), "scale": value.scale.clone()}


@pytest.mark.parametrize("case", TORCHAO_CASES, ids=[c[0] for c in TORCHAO_CASES])
def test_torchao_read_and_reset(torchao_optim, case):
    name, subclass = case
    model = _torchao_model()
    optimizer = getattr(torchao_optim, name)(model.parameters(), lr=LR)
    _train(model, optimizer)
    # amsgrad's running max, which torchao's eager step cannot update (no aten.maximum on its subclasses):
    # a buffer made by torchao's own constructor, holding v
    for _, p, state in iter_states(optimizer):
        state["max_exp_avg_sq"] = optimizer._new_buffer(p, False)
        state["max_exp_avg_sq"].copy_(adapter_v := state_adapter(optimizer).second_moment(state))
        assert torch.isfinite(adapter_v).all()
    adapter = state_adapter(optimizer)
    assert isinstance(adapter, TorchAOStateAdapter) and adapter.quantized and state_adapter(optimizer) is adapter
    assert adapter.name == f"torchao.optim.{name}" and adapter.has_first_moment and adapter.has_second_moment
    keys = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")
    states = [s for _, _, s in iter_states(optimizer)]
    assert [type(s["exp_avg"]).__name__ == subclass for s in states] == [True, False, True, False, False, False]
    for state in states:
        step = state["step"]
        assert step.device.type == "cpu" and step.dtype == torch.float32 and adapter.step(state) is step
        assert isinstance(optimizer.param_groups[0]["lr"], torch.Tensor)
        if type(state["exp_avg"]).__name__ == subclass:
            assert torch.equal(adapter.first_moment(state), state["exp_avg"].dequantize())
            assert torch.equal(adapter.second_moment(state), state["exp_avg_sq"].dequantize())
            assert not _is_pos_zero(adapter.second_moment(state))
            with pytest.raises(NotImplementedError, match=f"{name}.*{subclass}"):
                adapter.writable_first_moment(state)
        else:
            assert adapter.first_moment(state) is state["exp_avg"] is adapter.writable_first_moment(state)
            assert adapter.second_moment(state) is state["exp_avg_sq"]

    quantized = [s for s in states if type(s["exp_avg"]).__name__ == subclass]
    before = [{k: _inner(s[k]) for k in keys} for s in quantized]
    for state in states:
        adapter.reset_(state, mask=torch.tensor(False))
    for old, state in zip(before, quantized):
        for k in keys:
            _assert_bit_identical([old[k]], [_inner(state[k])])
    quantized[0]["exp_avg"].scale[0] = math.inf  # a non-finite scale is cleared as well
    quantized[1]["exp_avg_sq"].scale[-1] = math.nan
    with _RecordOps() as rec:
        for state in states:
            adapter.reset_(state, mask=torch.tensor(True))
            adapter.first_moment(state)
    assert "aten._local_scalar_dense.default" not in rec.names
    for state in states:
        for k in keys:  # exact +0, read through torchao's own dequantize
            value = state[k]
            assert _is_pos_zero(value.dequantize() if hasattr(value, "codes") else value), k
        assert adapter.step(state) == 3
    if name == "AdamW4bit":  # the 0x77 byte; and why v needs its scale zeroed (spec B)
        assert (quantized[0]["exp_avg"].codes == 0x77).all()
        v = quantized[0]["exp_avg_sq"]
        v.copy_(torch.zeros(v.shape))
        assert not _is_pos_zero(v.dequantize())  # requantized zeros: 1/16 · 1e-12, not 0
        adapter.reset_(quantized[0])
        assert _is_pos_zero(v.dequantize())
    for state in states:
        del state["max_exp_avg_sq"]  # the eager step would try to update it (see above)
    _train(model, optimizer, 2, seed=1)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert all(torch.isfinite(m).all() and not _is_pos_zero(m) for m in _moments(optimizer)[:2])


def test_torchao_fit_with_tensor_lr(torchao_optim):
    # group["lr"] is a 0-dim tensor that torchao refuses to see replaced: the warm-up scales it in place
    probe = Probe()
    callbacks = [MomentumReset(5, warmup_steps=2), SpikeAwareClipping(clip_delay=2), SpikeGuard(warmup_steps=4), probe]
    trainer, _ = _fit(lambda params: torchao_optim.AdamW8bit(params, lr=LR), callbacks, 8)
    optimizer = trainer.optimizers[0]
    assert probe.rows[4]["zero"] and probe.rows[4]["n_quantized"] == 2  # T = 5
    assert not probe.rows[5]["zero"] and not probe.rows[3]["zero"]
    lr = optimizer.param_groups[0]["lr"]
    assert probe.rows[4]["lr"] == pytest.approx(0.01 * LR, rel=1e-6) and probe.rows[7]["lr"] == float(lr)
    assert isinstance(lr, torch.Tensor) and torch.equal(lr, torch.tensor(LR))  # restored exactly
    assert all(float(s["step"]) == 8 for _, _, s in iter_states(optimizer))
    with pytest.raises(TypeError, match="AdaptiveMomentum does not support AdamW8bit.*quantized"):
        AdaptiveMomentum().check_optimizer(optimizer)
    for action in ("skip", "stop"):  # undoing a step copies the state, which torchao's types cannot do
        with pytest.raises(TypeError, match=f"action='{action}'.*AdamW8bit"):
            SpikeGuard(action=action).check_optimizer(optimizer)
    SpikeGuard(action="clip").check_optimizer(optimizer)


def test_module_does_not_import_torchao():
    code = "import sys, lightning_optim.state_adapters; print('torchao' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


# -- ours: 8-bit state (√-layout second moments) through the adapters ---------------------------------------
def _ours_8bit(params):
    from lightning_optim import SPAM

    # the callbacks do the clipping and the resets: SPAM's own are off
    return SPAM(params, lr=LR, threshold=math.inf, reset_interval=0, clip_delay=0, state_bits=8)


def test_ours_8bit_momentum_reset_and_spike_clipping_fit():
    from lightning_optim.lowbit import SQRT_LAYOUT, load_moment

    before, after = Probe(), Probe()
    callbacks = [GradientSpike({15}, factor=1e4), before, SpikeAwareClipping(THRESHOLD, clip_delay=5),
                 MomentumReset(interval=10, warmup_steps=5), after]
    trainer, module = _fit(_ours_8bit, callbacks, 22)
    optimizer = trainer.optimizers[0]
    state = optimizer.state[module.net[2].weight]  # 64×64: 8-bit moments, v in the √ layout
    assert state["exp_avg_sq_layout"] == SQRT_LAYOUT and after.rows[5]["n_quantized"] == 2
    adapter = state_adapter(optimizer)
    assert torch.equal(adapter.second_moment(state), load_moment(state, "exp_avg_sq", False))
    for step in (9, 19):  # T = 10, 20: the adapter's reset gives exact +0 (dequantized)
        assert after.rows[step]["zero"] and after.rows[step]["lr"] == pytest.approx(0.01 * LR)
    assert not after.rows[14]["zero"]
    assert before.rows[15]["over"] > 0.5 and after.rows[15]["over"] == 0.0  # the spike is clipped against √-layout v
    assert all(torch.isfinite(m).all() for m in _moments(optimizer))
