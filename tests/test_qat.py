"""QuantizationAwareTraining and QuantizationMonitor (low_bit_and_qat.md check 8, resume, tags, composition)."""

from __future__ import annotations

import copy
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import TensorBoardLogger
from torch import nn
from torch.utils.data import DataLoader, Subset

from callback_models import History, Regression, fit, flat_params
from lightning_optim.callbacks import MomentumReset, QuantizationAwareTraining, QuantizationMonitor, SpikeGuard
from lightning_optim.monitors import dequantize_groups, fake_quantize, quantize_groups
from lightning_optim.spam import spam_warmup_factor
from lightning_optim.state_adapters import iter_states, state_adapter

RESUME_SAMPLES = 96  # 12 steps per epoch (batch 8)
LR = 1e-2


class QuantRegression(Regression):
    """Regression with a forward (the calibration pass calls it) and a tiny validation loop."""

    def __init__(self, samples: int = 512, **kwargs) -> None:
        super().__init__(lambda p: torch.optim.AdamW(p, lr=LR, weight_decay=0.01), **kwargs)
        self.samples = samples  # fewer samples: shorter epochs for the resume test
        self.val_classes: list[type] = []

    def train_dataloader(self):
        data = super().train_dataloader().dataset
        return DataLoader(Subset(data, range(self.samples)), batch_size=8, shuffle=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def validation_step(self, batch, batch_idx):
        self.val_classes.append(type(self.net[0]))

    def val_dataloader(self):
        return self.train_dataloader()


def _qat(**kwargs) -> QuantizationAwareTraining:
    return QuantizationAwareTraining(**{"bits": 4, "group_size": 4, **kwargs})


class Recorder(pl.Callback):
    """Per optimizer step: the lr the step used and whether the moments were all zero right before it;
    after the step: checks that every target computes F.linear(x, ŵ, b) and that state_dict keys are kept."""

    def __init__(self, bits: int = 4, group_size: int = 4) -> None:
        self.bits, self.group_size = bits, group_size
        self.lrs: dict[int, float] = {}
        self.zero_moments: dict[int, bool] = {}
        self.snapshots: dict[int, tuple] = {}
        self.checked_steps: list[int] = []
        self.keys: set[str] | None = None

    def on_train_start(self, trainer, pl_module) -> None:
        self.keys = set(pl_module.state_dict())
        self.params = list(pl_module.parameters())

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        step = trainer.global_step
        self.lrs[step] = optimizer.param_groups[0]["lr"]
        adapter = state_adapter(optimizer)
        moments = [m for _, _, s in iter_states(optimizer) for m in (adapter.first_moment(s), adapter.second_moment(s))]
        self.zero_moments[step] = bool(moments) and all(torch.equal(m, torch.zeros_like(m)) for m in moments)
        self.snapshots[step] = copy.deepcopy(
            ([p.detach() for p in pl_module.parameters()], [p.grad for p in pl_module.parameters()], optimizer.state_dict())
        )

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        assert set(pl_module.state_dict()) == self.keys and list(pl_module.parameters()) == self.params
        if type(pl_module.net[0]) is nn.Linear:
            return
        gen = torch.Generator().manual_seed(trainer.global_step)  # not the global RNG
        for module in (pl_module.net[0], pl_module.net[3]):
            x = torch.randn(5, module.in_features, generator=gen)
            w_hat = fake_quantize(module.weight, self.bits, "int", self.group_size)
            assert torch.equal(module(x), F.linear(x, w_hat, module.bias))
        self.checked_steps.append(trainer.global_step)


def test_before_start_identical_then_quantized(tmp_path: Path) -> None:
    """Check 8: bit-identical to the plain model before start_step; F.linear(x, ŵ, b) afterwards (training and
    validation); state_dict keys unchanged; plain classes again after fit."""
    start = 10
    plain, plain_history = QuantRegression(), History()
    fit(plain, [plain_history], max_steps=start)
    module, history, recorder = QuantRegression(), History(), Recorder()
    qat = _qat(start_step=start)
    fit(module, [qat, recorder, history], max_steps=16, val_check_interval=13, limit_val_batches=1, num_sanity_val_steps=0)
    for mine, ref in zip(history.params[:start], plain_history.params):
        assert torch.equal(mine, ref)
    assert not torch.equal(history.params[start], history.params[start - 1])
    assert recorder.checked_steps == list(range(start + 1, 17))  # active from the batch at global_step 10 on
    assert qat.active and qat.activation_step == start
    assert module.val_classes and all(cls is not nn.Linear for cls in module.val_classes)  # validation quantized
    assert all(type(m) in (nn.Linear, nn.LayerNorm, nn.Tanh) for m in module.net)
    assert not hasattr(module.net[0], "_qat_spec")


@pytest.mark.parametrize("reset", [True, False])
def test_activation_resets_moments_and_warms_up(reset: bool) -> None:
    """Check 8: at activation the moments read back as zeros and the next update is that of AdamW with
    zeroed moments at lr·0.01; the warm-up continues with SPAM's cosine factor; the lr is restored."""
    start = 5
    module, recorder = QuantRegression(), Recorder()
    qat = _qat(start_step=start, reset_moments_on_start=reset)
    fit(module, [qat, recorder, History()], max_steps=start + 3)
    record = module.trainer.optimizers[0]._lightning_optim_step_record
    if not reset:
        assert not recorder.zero_moments[start] and recorder.lrs[start] == LR and record.resets == 0
        return
    assert recorder.zero_moments[start] and not recorder.zero_moments[start - 1]
    assert record.resets == 1 and qat._reset_at == {0: start + 1}
    for k in range(3):
        assert recorder.lrs[start + k] == pytest.approx(LR * spam_warmup_factor(k, 150), rel=1e-12)
    assert recorder.lrs[start] == pytest.approx(LR * 0.01, rel=1e-12)
    assert module.trainer.optimizers[0].param_groups[0]["lr"] == LR  # restored after every step
    # the update at activation equals a fresh AdamW step with zero moments (step count kept) at 0.01·lr
    params, grads, state = recorder.snapshots[start]
    after = recorder.snapshots[start + 1][0]
    ref = [p.clone().requires_grad_() for p in params]
    optimizer = torch.optim.AdamW(ref, lr=LR * 0.01, weight_decay=0.01)
    optimizer.load_state_dict({**state, "param_groups": [{**state["param_groups"][0], "lr": LR * 0.01}]})
    for p, g in zip(ref, grads):
        p.grad = g
    optimizer.step()
    for r, a in zip(ref, after):
        assert torch.equal(r.detach(), a)


def test_export_codes_and_scales() -> None:
    module = QuantRegression()
    for bits, fmt in ((4, "int"), (8, "int"), (8, "fp8")):
        qat = QuantizationAwareTraining(bits=bits, fmt=fmt, group_size=4)
        exported = qat.export_quantized_state_dict(module)
        assert set(exported) == {"net.0.weight", "net.0.weight_scale", "net.3.weight", "net.3.weight_scale"}
        for name in ("net.0", "net.3"):
            weight = module.get_submodule(name).weight
            codes, scales = exported[f"{name}.weight"], exported[f"{name}.weight_scale"]
            assert codes.shape == weight.shape
            assert scales.shape == (weight.shape[0], -(-weight.shape[1] // 4)) and scales.dtype == torch.float32
            if fmt == "int":
                assert codes.dtype == torch.int8 and int(codes.abs().max()) == 2 ** (bits - 1) - 1
            else:
                assert codes.dtype == torch.float8_e4m3fn
            w_hat = dequantize_groups(quantize_groups(weight, bits, fmt, 4)._replace(codes=codes, scales=scales))
            assert torch.equal(w_hat, fake_quantize(weight, bits, fmt, 4))


def test_swap_keeps_parameters_and_restores_classes() -> None:
    class MyLinear(nn.Linear):
        pass

    model = nn.Module()
    model.body = nn.Sequential(MyLinear(4, 4), nn.ReLU(), nn.Linear(4, 4))
    model.head = nn.Linear(4, 2)
    model.emb = nn.Embedding(5, 4)
    model.qat_exclude = ["head"]
    params = {name: p for name, p in model.named_parameters()}
    keys = list(model.state_dict())
    qat = QuantizationAwareTraining(bits=8, group_size=2, exclude=["body.2"])
    qat._swap_in(model)
    assert set(qat.targets(model)) == {"body.0"}
    assert isinstance(model.body[0], MyLinear) and type(model.body[0]) is not MyLinear
    assert type(model.body[2]) is nn.Linear and type(model.head) is nn.Linear
    assert dict(model.named_parameters()) == params and list(model.state_dict()) == keys
    qat.remove()
    assert type(model.body[0]) is MyLinear and not hasattr(model.body[0], "_qat_spec")


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="Invalid bits"):
        QuantizationAwareTraining(bits=4, fmt="fp8")
    with pytest.raises(ValueError, match="Invalid group_size"):
        QuantizationAwareTraining(group_size=0)
    with pytest.raises(ValueError, match="Invalid start_step"):
        QuantizationAwareTraining(start_step=-1)
    with pytest.raises(ValueError, match="Invalid max_rows"):
        QuantizationMonitor(max_rows=0)


def _resume_callbacks(start: int) -> list:
    return [_qat(start_step=start), MomentumReset(interval=40, warmup_steps=10)]


@pytest.mark.parametrize("start", [15, 30])
def test_resume_is_bit_identical(start: int, tmp_path: Path) -> None:
    """A checkpoint (step 24) inside the warm-up after activation (15) or before activation (30)."""
    full = QuantRegression(RESUME_SAMPLES)
    fit(full, _resume_callbacks(start), max_epochs=4, max_steps=-1)
    first = QuantRegression(RESUME_SAMPLES)
    trainer = fit(first, _resume_callbacks(start), max_epochs=2, max_steps=-1)
    ckpt = tmp_path / "stop.ckpt"
    trainer.save_checkpoint(ckpt)
    state = torch.load(ckpt, weights_only=False)["callbacks"]
    resumed = QuantRegression(RESUME_SAMPLES)
    callbacks = _resume_callbacks(start)
    fit(resumed, callbacks, max_epochs=4, max_steps=-1, ckpt_path=str(ckpt))
    assert torch.equal(flat_params(resumed), flat_params(full))
    qat = callbacks[0]
    assert qat.active and qat.activation_step == start and qat._reset_at == {0: start + 1}
    assert resumed.trainer.optimizers[0]._lightning_optim_step_record.resets == 2  # QAT's and the periodic one
    saved = next(v for k, v in state.items() if "QuantizationAwareTraining" in k)
    assert saved["active"] == (start < 24)
    assert torch.equal(saved["stats"]["calibration"], qat._stats.calibration)


def _scalars(log_dir: Path) -> dict[str, list]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(log_dir))
    events.Reload()
    return {tag: events.Scalars(tag) for tag in events.Tags()["scalars"]}


def test_qat_logs_quant_tags(tmp_path: Path) -> None:
    logger = TensorBoardLogger(tmp_path, name="tb", version=0)
    fit(QuantRegression(), [_qat(start_step=5)], max_steps=20, logger=logger, log_every_n_steps=5)
    scalars = _scalars(tmp_path / "tb" / "version_0")
    assert all(tag.startswith(("stability/", "quant/")) for tag in scalars)
    for prefix in ("layer_error", "layer_error_a", "layer_error_b", "layer_error_c", "mmr", "kurtosis"):
        for layer in ("net.0", "net.3"):
            assert [e.step for e in scalars[f"quant/{prefix}/{layer}"]] == [5, 10, 15, 20]
    for layer in ("net.0", "net.3"):
        assert f"quant/mmr/{layer}/act" in scalars and f"quant/kurtosis/{layer}/act" in scalars
    assert all(e.value == 0.0 for e in scalars["quant/layer_error_a/net.0"])  # nothing arrives before layer 1
    assert all(0.0 < e.value < 1.0 for e in scalars["quant/layer_error/net.3"])
    assert scalars["stability/momentum_resets"][-1].value == 1.0


def test_monitor_logs_and_keeps_calibration(tmp_path: Path) -> None:
    logger = TensorBoardLogger(tmp_path, name="tb", version=0)
    monitor = QuantizationMonitor(every_n_steps=10, max_rows=3, group_depth=1)
    module = QuantRegression()
    before = flat_params(module)
    ref = QuantRegression()
    fit(ref, [], max_steps=20)
    fit(module, [monitor, _qat(start_step=100)], max_steps=20, logger=logger)
    assert torch.equal(flat_params(module), flat_params(ref)) and not torch.equal(before, flat_params(module))
    x0 = next(iter(module.train_dataloader()))[0]
    assert torch.equal(monitor.calibration, x0[:3]) and monitor.state_dict()["calibration"].shape == (3, 6)
    scalars = _scalars(tmp_path / "tb" / "version_0")
    # group_depth=1: "net.0" and "net.3" fall into one group "net" (the maximum); QAT leaves quant/ to the monitor
    quant = sorted(tag for tag in scalars if tag.startswith("quant/"))
    assert quant == sorted(
        [f"quant/{p}/net" for p in ("layer_error", "layer_error_a", "layer_error_b", "layer_error_c", "mmr", "kurtosis")]
        + ["quant/mmr/net/act", "quant/kurtosis/net/act"]
    )
    assert [e.step for e in scalars["quant/layer_error/net"]] == [10, 20]
    assert scalars["quant/layer_error_b/net"][0].value > 0


@pytest.mark.parametrize("start", [10, 19])
def test_composes_with_momentum_reset_and_spike_guard(start: int) -> None:
    """SpikeGuard leads the pipeline; QAT's reset at start + 1 and the periodic one at 20 are both counted
    (once when they fall on the same step, with the longer warm-up), whatever the callback order."""
    results = []
    for order in (0, 1):
        module, recorder = QuantRegression(), Recorder()
        callbacks = [SpikeGuard(warmup_steps=5), MomentumReset(interval=20, warmup_steps=5), _qat(start_step=start)]
        if order:
            callbacks = [callbacks[0], callbacks[2], callbacks[1]]
        fit(module, [*callbacks, recorder], max_steps=24)
        record = module.trainer.optimizers[0]._lightning_optim_step_record
        assert record.resets == (2 if start == 10 else 1)
        assert recorder.lrs[start] == pytest.approx(LR * 0.01, rel=1e-12)
        assert recorder.lrs[start + 1] == pytest.approx(LR * spam_warmup_factor(1, 150), rel=1e-12)
        results.append(flat_params(module))
        assert torch.isfinite(results[-1]).all()
    assert torch.equal(results[0], results[1])
