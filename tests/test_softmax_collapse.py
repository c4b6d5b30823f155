"""SoftmaxCollapseMonitor (Prieto et al. 2025): collapse on a memorising fp32 run and not in fp64, its actions.

The real runs train the example digits MLP (``lightning_optim.examples.digits``) to memorise 16 images with a
large learning rate and no weight decay, as in the paper: in float32 the softmax of some samples becomes
exactly one-hot within 20 steps (their cross-entropy and gradient are exactly 0), while the same run in
float64 (collapse needs a margin of 36.7 instead of 16.6) shows none.
"""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import CSVLogger
from torch.utils.data import DataLoader, TensorDataset

from callback_models import fit
from lightning_optim.callbacks.softmax_collapse import SoftmaxCollapseMonitor
from lightning_optim.examples.digits import DigitsClassifier
from lightning_optim.monitors import tags
from lightning_optim.monitors.numerics import stablemax_cross_entropy

pytest.importorskip("sklearn")

SAMPLES = 16


@pytest.fixture(autouse=True)
def _single_thread(one_thread):
    yield


def _digits() -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.images[:SAMPLES] / 16.0, dtype=torch.float32).unsqueeze(1)
    return x, torch.tensor(digits.target[:SAMPLES])


class Memorise(DigitsClassifier):
    """The example MLP on 16 digits, full batch, AdamW(lr=0.05, no weight decay); records the loss used."""

    def __init__(self, loss: str = "cross_entropy") -> None:
        torch.manual_seed(0)
        super().__init__(hidden=32, lr=0.05, loss=loss)
        self.losses_used: list[str] = []

    def training_step(self, batch, batch_idx):
        self.losses_used.append(self.loss)
        return super().training_step(batch, batch_idx)

    def train_dataloader(self) -> DataLoader:
        x, y = _digits()
        return DataLoader(TensorDataset(x, y), batch_size=SAMPLES)


class Fractions(pl.Callback):
    """The monitor's share after every probe (it logs only then)."""

    def __init__(self, monitor: SoftmaxCollapseMonitor) -> None:
        self.monitor, self.values = monitor, {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step % self.monitor.every_n_steps == 0:
            self.values[trainer.global_step] = float(self.monitor.fraction)


def _run(precision: str = "32-true", steps: int = 30, **kwargs) -> tuple[Memorise, SoftmaxCollapseMonitor, Fractions]:
    module = Memorise(kwargs.pop("loss", "cross_entropy"))
    monitor = SoftmaxCollapseMonitor(every_n_steps=10, **kwargs)
    record = Fractions(monitor)
    fit(module, [monitor, record], max_steps=steps, precision=precision, limit_val_batches=0)
    return module, monitor, record


def test_memorising_run_collapses_in_float32_and_not_in_float64() -> None:
    module32, monitor32, fp32 = _run("32-true")
    _, _, fp64 = _run("64-true")
    assert fp32.values[10] == 0.0 and fp32.values[20] > 0 and fp32.values[30] >= fp32.values[20]
    assert all(v == 0.0 for v in fp64.values.values()) and len(fp64.values) == 3
    # collapsed means: loss and gradient exactly zero for exactly that share of the samples
    x, y = _digits()
    with torch.no_grad():
        per_sample = F.cross_entropy(module32(x), y, reduction="none")
    assert float((per_sample == 0).float().mean()) == pytest.approx(fp32.values[30])
    assert monitor32.probes == 3


class Fixed(pl.LightningModule):
    """Logits given by the test (``probe_logits``): the monitor's arithmetic on known rows."""

    def __init__(self, logits: torch.Tensor) -> None:
        super().__init__()
        self.logits = logits
        self.layer = torch.nn.Linear(1, 1)

    def probe_logits(self, batch):
        return self.logits

    def training_step(self, batch, batch_idx):
        return self.layer(batch[0]).square().mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)

    def train_dataloader(self):
        return DataLoader(TensorDataset(torch.ones(4, 1)), batch_size=4)


@pytest.mark.parametrize(
    "dtype, logits_dtype, expected",
    [
        ("auto", torch.float32, 0.5),  # (0, -16.64) collapses in fp32, (0, -16.63) does not
        ("float64", torch.float32, 0.0),  # the same rows in the softmax precision of the fp64 runs
        ("auto", torch.bfloat16, 0.0),  # bf16 logits go through an fp32 softmax: 16.64 is stored as 16.625
        ("bfloat16", torch.bfloat16, 1.0),  # a bf16 softmax collapses from a margin of 5.55
    ],
)
def test_precision_of_the_collapse_test(dtype: str, logits_dtype: torch.dtype, expected: float) -> None:
    logits = torch.tensor([[0.0, -16.64], [0.0, -16.63]], dtype=logits_dtype)
    monitor = SoftmaxCollapseMonitor(every_n_steps=1, dtype=dtype)
    fit(Fixed(logits), [monitor], max_steps=1)
    assert float(monitor.fraction) == expected


def test_logs_the_share_at_its_cadence(tmp_path: Path) -> None:
    monitor = SoftmaxCollapseMonitor(every_n_steps=2, on_collapse="perp_grad")
    fit(Fixed(torch.tensor([[0.0, -20.0], [0.0, -1.0]])), [monitor], max_steps=4, logger=CSVLogger(str(tmp_path)))
    text = (tmp_path / "lightning_logs" / "version_0" / "metrics.csv").read_text().splitlines()
    header = text[0].split(",")
    rows = [dict(zip(header, line.split(","))) for line in text[1:]]
    logged = [(int(r["step"]), float(r[tags.SOFTMAX_COLLAPSE])) for r in rows if r.get(tags.SOFTMAX_COLLAPSE)]
    assert logged == [(2, 0.5), (4, 0.5)]
    switched = [float(r[tags.SOFTMAX_COLLAPSE_SWITCHED]) for r in rows if r.get(tags.SOFTMAX_COLLAPSE_SWITCHED)]
    assert switched == [1.0, 1.0]  # 0.5 >= 0.1: switched at the first probe, from the next step on
    assert monitor.switched_at == 2


def test_stablemax_action_switches_the_loss_once_collapse_is_seen() -> None:
    module, monitor, record = _run(on_collapse="stablemax", threshold=0.05)
    assert record.values[10] < 0.05 <= record.values[20]
    assert monitor.switched_at == 20
    # the 20 steps up to the probe trained with cross-entropy, the 10 after it with StableMax
    assert module.losses_used == ["cross_entropy"] * 20 + ["stablemax"] * 10
    assert module.loss == "stablemax"


def test_stablemax_loss_of_the_example_is_the_authors_float64_formula() -> None:
    module = Memorise(loss="stablemax")
    x, y = _digits()
    loss = module.training_step((x, y), 0)
    z = module(x).double()  # the authors' utils.py: s(x) = 1/(1 - x) below 0, x + 1 above, in float64
    s = torch.where(z < 0, 1 / (1 - z), z + 1)
    expected = -torch.log(s / s.sum(dim=-1, keepdim=True)).gather(-1, y[:, None]).mean()
    assert float(stablemax_cross_entropy(z, y)) == pytest.approx(float(expected), rel=1e-12)
    assert loss.dtype == torch.float32 and float(loss.detach()) == pytest.approx(float(expected.detach()), rel=1e-6)
    with pytest.raises(ValueError, match="loss"):
        DigitsClassifier(loss="softmax")  # type: ignore[arg-type]


def test_perp_grad_action_makes_every_later_gradient_orthogonal_to_its_weight() -> None:
    module = Memorise()
    weights: list[list[torch.Tensor]] = []  # before each step
    used: list[list[torch.Tensor]] = []  # the gradients each step consumed (after every stage)
    original = module.configure_optimizers

    def configure_optimizers():
        optimizer = original()
        optimizer.register_step_post_hook(lambda o, a, k: used.append([p.grad.clone() for p in module.parameters()]))
        return optimizer

    module.configure_optimizers = configure_optimizers

    class Weights(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            weights.append([p.detach().clone() for p in pl_module.parameters()])

    monitor = SoftmaxCollapseMonitor(every_n_steps=10, on_collapse="perp_grad", threshold=0.05)
    fit(module, [monitor, Weights()], max_steps=25, limit_val_batches=0)
    assert monitor.switched_at == 20 and len(used) == 25
    for step, (grads, ws) in enumerate(zip(used, weights)):
        cosines = [abs(float((g * w).sum() / (g.norm() * w.norm() + 1e-30))) for g, w in zip(grads, ws)]
        if step >= 20:  # from the switch on: orthogonal to the weights they update
            assert max(cosines) < 1e-4
        else:  # before it: the raw gradients, some clearly aligned with their weights
            assert max(cosines) > 1e-3


def test_stablemax_needs_a_loss_attribute_at_fit_start() -> None:
    with pytest.raises(TypeError, match="loss"):
        fit(Fixed(torch.zeros(2, 2)), [SoftmaxCollapseMonitor(on_collapse="stablemax")], max_steps=1)


def test_resume_keeps_the_switched_loss(tmp_path: Path) -> None:
    module, monitor, _ = _run(on_collapse="stablemax", threshold=0.05, steps=20)
    assert monitor.switched_at == 20
    path = tmp_path / "switched.ckpt"
    module.trainer.save_checkpoint(path)
    resumed, again = Memorise(), SoftmaxCollapseMonitor(every_n_steps=10, on_collapse="stablemax", threshold=0.05)
    fit(resumed, [again], max_steps=22, ckpt_path=str(path), limit_val_batches=0)
    assert again.switched_at == 20 and resumed.losses_used == ["stablemax"] * 2


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"every_n_steps": 0}, "every_n_steps"),
        ({"on_collapse": "softmax"}, "on_collapse"),
        ({"threshold": 0.0}, "threshold"),
        ({"threshold": float("nan")}, "threshold"),
        ({"dtype": "float8"}, "dtype"),
        ({"logits_fn": 3}, "logits_fn"),
        ({"skip_1d": 1}, "skip_1d"),
    ],
)
def test_invalid_arguments_are_named(kwargs: dict, name: str) -> None:
    with pytest.raises(ValueError, match=name):
        SoftmaxCollapseMonitor(**kwargs)
