"""LRSafetyRadius callback: monitor and control modes (docs/lr_safety_radius.md, "Checks" 6, 7, 9, 10)."""

from __future__ import annotations

import importlib.util
import math
import types
import warnings
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.plugins.precision import MixedPrecision
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from callback_models import GradientSpike, Regression, fit, flat_params
from lightning_optim.callbacks import LRSafetyRadius, SpikeGuard
from lightning_optim.callbacks.lr_safety import _check_strategy
from lightning_optim.examples.digits import DigitsDataModule
from lightning_optim.monitors import safety_radius
from lightning_optim.monitors.safety_radius import functional_logits

BENCH = Path(__file__).resolve().parents[1] / "bench" / "lr_spike.py"


def _bench():
    # bench/ is a folder of scripts, not a package: load the LR-spike models from the script itself
    spec = importlib.util.spec_from_file_location("bench_lr_spike", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class Probed(LRSafetyRadius):
    """Records the 1-based optimizer step of every probe and the scale it applied (test-only host reads)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.probed: list[int] = []
        self.scales: list[float] = []
        self.ratios: list[float] = []

    def _probe(self, old, update):
        ratio, radius = super()._probe(old, update)
        self.probed.append(self.completed)
        self.ratios.append(float(ratio))
        if self.mode == "control":
            self.scales.append(float(torch.clamp(self.target_ratio / ratio, max=1.0)) if float(ratio) > 0 else 1.0)
        return ratio, radius


class NoisyRegression(Regression):
    """Regression with Dropout and BatchNorm: a probe must neither draw dropout masks nor update statistics."""

    def __init__(self, make_optimizer, **kwargs) -> None:
        super().__init__(make_optimizer, **kwargs)
        torch.manual_seed(1)
        self.net = nn.Sequential(nn.Linear(6, 16), nn.BatchNorm1d(16), nn.Dropout(0.3), nn.Tanh(), nn.Linear(16, 3))


def _adamw(lr: float = 1e-2):
    return lambda p: torch.optim.AdamW(p, lr=lr, weight_decay=0.01)


# --------------------------------------------------------------------------- 6. eval mode, monitor is passive
def test_monitor_mode_leaves_training_bit_identical() -> None:
    plain = NoisyRegression(_adamw())
    fit(plain, [], max_steps=12)
    watched = NoisyRegression(_adamw())
    callback = Probed(every_n_steps=1)
    fit(watched, [callback], max_steps=12)
    assert callback.probed == list(range(1, 13))
    assert torch.equal(flat_params(watched), flat_params(plain))  # no dropout draws, no parameter change
    bn_plain, bn_watched = plain.net[1], watched.net[1]
    assert torch.equal(bn_watched.running_mean, bn_plain.running_mean)
    assert torch.equal(bn_watched.running_var, bn_plain.running_var)
    assert bn_watched.num_batches_tracked == bn_plain.num_batches_tracked == 12
    assert [m.training for m in watched.modules()] == [m.training for m in plain.modules()]
    assert all(r > 0 for r in callback.ratios)


def test_control_mode_that_never_acts_is_bit_identical() -> None:
    plain = Regression(_adamw())
    fit(plain, [], max_steps=10)
    controlled = Regression(_adamw())
    callback = LRSafetyRadius(mode="control", target_ratio=1e9)
    fit(controlled, [callback], max_steps=10)
    assert float(callback.scaled_steps) == 0 and float(callback.scale) == 1.0
    assert torch.equal(flat_params(controlled), flat_params(plain))


def test_probe_with_dropout_is_deterministic() -> None:
    module = NoisyRegression(_adamw())
    callback = LRSafetyRadius(every_n_steps=1)
    fit(module, [callback], max_steps=2)
    callback._module, callback._batch = module, next(iter(module.train_dataloader()))
    params = [p.detach().clone() for p in module.parameters()]
    update = [torch.full_like(p, 1e-3) for p in params]
    module.train()
    first = callback._probe(params, update)
    second = callback._probe(params, update)
    assert torch.equal(first[0], second[0]) and module.training and module.net[2].training


# --------------------------------------------------------------------------- 7. controller
class StepSnapshots(pl.Callback):
    """θ_old, the gradient and the learning rate of every step (read inside the closure, before the update),
    and the parameters after it."""

    def __init__(self) -> None:
        self.steps: list[tuple[list[torch.Tensor], list[torch.Tensor], float, object]] = []
        self.after: list[list[torch.Tensor]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.batch = batch

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        params = [p.detach().clone() for p in pl_module.parameters()]
        grads = [p.grad.detach().clone() for p in pl_module.parameters()]
        self.steps.append((params, grads, optimizer.param_groups[0]["lr"], self.batch))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.after.append([p.detach().clone() for p in pl_module.parameters()])


def _digits(bench, lr: float, factor: float, at: int, optimizer: str = "adamw"):
    model = bench.SpikedDigits(arch="mlp")
    model.spike = bench.SpikeSchedule(at, 1, factor)
    if optimizer == "sgd":
        model.configure_optimizers = lambda: {
            "optimizer": (opt := torch.optim.SGD(model.parameters(), lr=lr)),
            "lr_scheduler": {"scheduler": torch.optim.lr_scheduler.LambdaLR(opt, model.spike), "interval": "step"},
        }
    else:
        model.adamw_lr = lr
    return model


def test_control_step_is_old_plus_scaled_update() -> None:
    """SGD, so p = -lr g is known: after each control step θ = θ_old + s·p with s from an independent probe."""
    bench = _bench()
    torch.manual_seed(0)
    model = _digits(bench, lr=0.5, factor=100.0, at=3, optimizer="sgd")
    keep = StepSnapshots()
    callback = Probed(mode="control", target_ratio=1.0, method="jvp")

    fit(model, [callback, keep], max_steps=5, datamodule=DigitsDataModule(batch_size=64))
    names = [n for n, _ in model.named_parameters()]
    acted = 0
    for i, ((old, grads, lr, batch), new) in enumerate(zip(keep.steps, keep.after)):
        update = {n: -lr * g for n, g in zip(names, grads)}
        rows = 1 if i == 0 else 64  # the first probe learns S from one row
        x = batch[0][:rows]
        logits_fn = functional_logits(model, lambda m: m(x))
        model.eval()
        ref = safety_radius(logits_fn, dict(zip(names, old)), update, method="jvp")
        model.train()
        s = min(1.0, 1.0 / ref.ratio.item())
        assert callback.scales[i] == pytest.approx(s, rel=1e-5)
        for o, u, n in zip(old, update.values(), new):
            torch.testing.assert_close(n, o + s * u, rtol=1e-6, atol=1e-6)
        acted += s < 1
    assert acted >= 1 and callback.ratios[3] > 1  # the 100x step was scaled back


def test_controller_caps_the_ratio_of_a_10000x_adamw_step() -> None:
    """Digits MLP, AdamW lr 1e-3 x 1e4 for one step: the kept update has r <= target_ratio."""
    bench = _bench()
    torch.manual_seed(0)
    model = _digits(bench, lr=1e-3, factor=1e4, at=4)
    keep = StepSnapshots()
    callback = Probed(mode="control", target_ratio=1.0)

    fit(model, [callback, keep], max_steps=6, datamodule=DigitsDataModule(batch_size=64))
    names = [n for n, _ in model.named_parameters()]
    old, _, lr, batch = keep.steps[4]
    assert lr == pytest.approx(10.0)
    kept = {n: a - o for n, a, o in zip(names, keep.after[4], old)}
    model.eval()
    res = safety_radius(functional_logits(model, lambda m: m(batch[0])), dict(zip(names, old)), kept, method="jvp")
    assert callback.ratios[4] > 100  # the proposed update was far outside the radius
    assert res.ratio.item() <= 1.0 + 1e-4
    assert res.ratio.item() == pytest.approx(1.0, rel=1e-3)
    assert float(callback.scaled_steps) >= 1


@pytest.mark.parametrize("action", ["skip", "reset"])
def test_composes_with_spike_guard(action: str) -> None:
    """A skipped step has p = 0 for the controller or is restored after it; a reset step is probed as usual."""
    module = Regression(_adamw())
    guard, controller = SpikeGuard(warmup_steps=10, action=action), Probed(mode="control", target_ratio=0.5)
    fit(module, [GradientSpike({20}, 1e4), controller, guard], max_steps=30)
    assert float(guard._states[0].counters[0]) == 1.0  # the spike was seen
    # one clock for every callback: the step SpikeGuard undid is not counted (30 optimizer steps ran)
    assert controller.completed == (29 if action == "skip" else 30) and len(controller.scales) == 30
    assert torch.isfinite(flat_params(module)).all()


# --------------------------------------------------------------------------- logits sources
class TensorBatches(Regression):
    """Batches are plain tensors; the target is a fixed function of the input."""

    def training_step(self, batch, batch_idx):
        return torch.nn.functional.mse_loss(self.net(batch), batch[:, :3].sin())

    def train_dataloader(self):
        return DataLoader(torch.randn(64, 6, generator=torch.Generator().manual_seed(0)), batch_size=8)


class WithForward(Regression):
    pass


class WithProbeLogits(Regression):
    def probe_logits(self, batch):
        return self.net(batch[0])


class WithOutputObject(Regression):
    def forward(self, x):
        return types.SimpleNamespace(logits=self.net(x))


class DictBatches(Regression):
    def training_step(self, batch, batch_idx):
        return torch.nn.functional.mse_loss(self.net(batch["x"]), batch["y"])

    def train_dataloader(self):
        data = TensorDataset(torch.randn(64, 6), torch.randn(64, 3))
        return DataLoader([{"x": x, "y": y} for x, y in data], batch_size=8)


@pytest.mark.parametrize(
    ("module_cls", "kwargs"),
    [
        (WithForward, {}),
        (WithProbeLogits, {}),
        (WithOutputObject, {}),
        (Regression, {"logits_fn": lambda module, batch: module.net(batch[0])}),
    ],
    ids=["forward", "probe_logits", "output_with_logits", "logits_fn"],
)
def test_logits_sources_agree(module_cls, kwargs) -> None:
    reference = Probed(every_n_steps=2)
    fit(WithForward(_adamw()), [reference], max_steps=6)
    callback = Probed(every_n_steps=2, **kwargs)
    fit(module_cls(_adamw()), [callback], max_steps=6)
    assert callback.probed == [2, 4, 6]
    assert callback.ratios == pytest.approx(reference.ratios, rel=1e-6)


def test_tensor_batches_use_forward() -> None:
    callback = Probed(every_n_steps=1)
    fit(TensorBatches(_adamw()), [callback], max_steps=3)
    assert callback.probed == [1, 2, 3] and all(r > 0 for r in callback.ratios)


def test_unknown_batch_layout_names_probe_logits() -> None:
    with pytest.raises(TypeError, match="probe_logits"):
        fit(DictBatches(_adamw()), [LRSafetyRadius(every_n_steps=1)], max_steps=2)
    callback = Probed(every_n_steps=1, logits_fn=lambda module, batch: module.net(batch["x"]))
    fit(DictBatches(_adamw()), [callback], max_steps=2)
    assert callback.probed == [1, 2]


def test_language_model_rows_follow_max_samples() -> None:
    from lightning_optim.examples.gpt import GPT

    shapes: list[tuple[int, ...]] = []

    def logits_fn(module, batch):
        shapes.append(tuple(batch[0].shape))
        return module(batch[0])

    class TinyLM(GPT):
        def train_dataloader(self):
            x = torch.randint(0, 256, (32, 17), generator=torch.Generator().manual_seed(0))
            return DataLoader(TensorDataset(x[:, :-1], x[:, 1:]), batch_size=8)

    torch.manual_seed(0)
    callback = LRSafetyRadius(mode="control", max_samples=40, logits_fn=logits_fn)
    fit(TinyLM(size="tiny", seq_len=16), [callback], max_steps=3)
    # the first probe (one row) learns S = 16 positions per row; then max(1, 40 // 16) = 2 rows
    assert callback.positions_per_row == 16
    assert shapes == [(1, 16), (2, 16), (2, 16)]
    assert callback.method == "jvp"


# --------------------------------------------------------------------------- 8. fallback warns once
class NoForwardRule(torch.autograd.Function):
    @staticmethod
    def forward(x):
        return x * 2

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def backward(ctx, grad):
        return grad * 2


class CustomOp(Regression):
    def forward(self, x):
        return NoForwardRule.apply(self.net(x))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return torch.nn.functional.mse_loss(self(x), y)


def test_auto_falls_back_once_and_remembers() -> None:
    callback = Probed(mode="control")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fit(CustomOp(_adamw()), [callback], max_steps=5)
    fallbacks = [w for w in caught if "finite differences" in str(w.message)]
    assert len(fallbacks) == 1
    assert callback.method == "finite_difference" and callback.probed == [1, 2, 3, 4, 5]


# --------------------------------------------------------------------------- AMP, accumulation
def test_grad_scaler_skipped_step_is_not_counted() -> None:
    module = Regression(_adamw(), loss_spikes={3: math.inf})
    callback = Probed(every_n_steps=2)
    plugin = MixedPrecision("16-mixed", "cpu", torch.amp.GradScaler("cpu"))
    fit(module, [callback], max_steps=8, plugins=[plugin])
    assert callback.completed == 7  # the scaler skipped the inf step: no hooks ran, no snapshot was kept
    assert callback.probed == [2, 4, 6]
    assert torch.isfinite(flat_params(module)).all() and callback._snapshot is None


def test_gradient_accumulation_probes_per_optimizer_step() -> None:
    callback = Probed(mode="control", every_n_steps=3)
    fit(Regression(_adamw()), [callback], max_steps=6, accumulate_grad_batches=2)
    assert callback.completed == 6 and callback.probed == [1, 2, 3, 4, 5, 6]


# --------------------------------------------------------------------------- logging
def _tensorboard(log_dir: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(log_dir))
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


@pytest.mark.parametrize("mode", ["monitor", "control"])
def test_tensorboard_tags(mode: str, tmp_path: Path) -> None:
    from lightning.pytorch.loggers import TensorBoardLogger

    logger = TensorBoardLogger(tmp_path, name="tb", version=0)
    callback = LRSafetyRadius(mode=mode, every_n_steps=5, target_ratio=0.05)
    fit(Regression(_adamw(5e-2)), [callback], max_steps=12, logger=logger, log_every_n_steps=100)
    scalars = _tensorboard(tmp_path / "tb" / "version_0")
    ratio = scalars["stability/lr_safety_ratio"]
    assert [step for step, _ in ratio] == [5, 10]
    radius = scalars["stability/lr_safety_radius"]
    assert all(r > 0 and rho > 0 for (_, r), (_, rho) in zip(ratio, radius))
    if mode == "control":
        scales = scalars["stability/lr_scale"]
        assert [step for step, _ in scales] == [5, 10]
        for (_, r), (_, s) in zip(ratio, scales):
            assert s == pytest.approx(min(1.0, 0.05 / r), rel=1e-5)
        counts = [v for _, v in scalars["stability/lr_scaled_steps"]]
        assert counts == sorted(counts) and 1 <= counts[-1] <= 10
    else:
        assert "stability/lr_scale" not in scalars


# --------------------------------------------------------------------------- resume
@pytest.mark.parametrize("mode", ["monitor", "control"])
def test_resume_matches_uninterrupted(mode: str, tmp_path: Path) -> None:
    def run(max_epochs: int, ckpt: str | None = None) -> tuple[pl.Trainer, Probed, Regression]:
        module = Regression(_adamw(5e-2))
        callback = Probed(mode=mode, every_n_steps=7, target_ratio=0.05)
        trainer = fit(module, [callback], max_steps=-1, max_epochs=max_epochs, ckpt_path=ckpt)
        return trainer, callback, module

    _, full_cb, full = run(2)
    trainer, first_cb, _ = run(1)
    ckpt = tmp_path / "half.ckpt"
    trainer.save_checkpoint(ckpt)
    _, resumed_cb, resumed = run(2, str(ckpt))
    assert resumed_cb.completed == full_cb.completed == 128
    assert first_cb.probed + resumed_cb.probed == full_cb.probed
    assert resumed_cb.positions_per_row == 1
    if mode == "control":
        assert float(resumed_cb.scaled_steps) == float(full_cb.scaled_steps) > 0
    torch.testing.assert_close(flat_params(resumed), flat_params(full), rtol=0, atol=0)


# --------------------------------------------------------------------------- errors
@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"mode": "clip"}, "mode"),
        ({"every_n_steps": 0}, "every_n_steps"),
        ({"target_ratio": 0.0}, "target_ratio"),
        ({"target_ratio": -1.0}, "target_ratio"),
        ({"max_samples": 0}, "max_samples"),
        ({"method": "exact"}, "method"),
        ({"fd_epsilon": 0.0}, "fd_epsilon"),
        ({"logits_fn": 3}, "logits_fn"),
        ({"verbose": "yes"}, "verbose"),
    ],
)
def test_bad_arguments_name_the_argument(kwargs: dict, name: str) -> None:
    with pytest.raises(ValueError, match=name):
        LRSafetyRadius(**kwargs)


def test_two_optimizers_and_sharded_strategies_are_refused() -> None:
    class Two(Regression):
        def configure_optimizers(self):
            half = len(list(self.parameters())) // 2
            params = list(self.parameters())
            return [torch.optim.SGD(params[:half], lr=0.1), torch.optim.SGD(params[half:], lr=0.1)]

        def training_step(self, batch, batch_idx):
            return None

    Two.automatic_optimization = False
    with pytest.raises(ValueError, match="exactly one optimizer"):
        fit(Two(_adamw()), [LRSafetyRadius()], max_steps=1)

    class FSDPLike:
        pass

    with pytest.raises(NotImplementedError, match="FSDPLike"):
        _check_strategy(types.SimpleNamespace(strategy=FSDPLike()))


# --------------------------------------------------------------------------- 9. DDP
@pytest.mark.slow
def test_ddp_ranks_apply_the_same_scale(tmp_path: Path) -> None:
    from test_ddp import _run

    _run("ddp_lr_safety_script.py", tmp_path)
    rank0, rank1 = (torch.load(tmp_path / f"lr_safety-rank{r}.pt") for r in (0, 1))
    assert rank0["scales"] == rank1["scales"] and min(rank0["scales"]) < 1
    assert rank0["local_spreads"] != rank1["local_spreads"]  # different data, yet one decision
    assert torch.equal(rank0["params"], rank1["params"])


# --------------------------------------------------------------------------- the end-of-fit verdict
@pytest.mark.parametrize(("lr", "expect"), [(1e-3, "headroom"), (1e3, "lower the learning rate")])
def test_verdict_reports_the_probes_and_advises(lr: float, expect: str, capsys: pytest.CaptureFixture) -> None:
    """verbose=True prints one verdict at the end of fit: the last/peak r and the count of probes with
    r >= 1 equal what the probes measured, and the advice follows r (a tiny lr: headroom; a huge one: lower)."""
    callback = Probed(every_n_steps=2)
    fit(Regression(lambda p: torch.optim.SGD(p, lr=lr)), [callback], max_steps=6)
    out = capsys.readouterr().out.strip().splitlines()[-1]
    ratios = [float(r) for r in callback.ratios]
    assert len(ratios) == 3 and callback.probes == 3
    assert f"last r = {ratios[-1]:.3g}" in out and f"peak r = {max(ratios):.3g}" in out
    assert f"{sum(r >= 1 for r in ratios)} of 3 probes had r >= 1" in out
    assert expect in out


def test_verdict_before_any_probe_says_so() -> None:
    assert "no probe ran" in LRSafetyRadius(every_n_steps=50).verdict({"train/loss": torch.tensor(1.5)})
