"""TrainingRegime (Leap+Verify, McEntire 2026): activation-cosine regime detection on a fixed probe batch.

A digits run whose learning rate decays by 0.85 per step goes from chaotic (the representation moves a
lot between probes) through transition to stable; the logged cosine is recomputed here from copies of the
weights at the probe steps, and the classification is checked against the authors' rule.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger

from callback_models import fit
from lightning_optim.callbacks.opposing_signals import ProbeSet
from lightning_optim.callbacks.training_regime import (
    CHAOTIC,
    LEAP_VERIFY_THRESHOLDS,
    STABLE,
    TRANSITION,
    TrainingRegime,
)
from lightning_optim.examples.digits import DigitsClassifier, DigitsDataModule
from lightning_optim.monitors import tags

pytest.importorskip("sklearn")

EVERY, PROBE = 5, 64


@pytest.fixture(autouse=True)
def _single_thread(one_thread):
    yield


def _decaying() -> DigitsClassifier:
    torch.manual_seed(0)
    module = DigitsClassifier(hidden=64, lr=1e-2)

    def configure_optimizers():
        optimizer = torch.optim.AdamW(module.parameters(), lr=1e-2)
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.85**step)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    module.configure_optimizers = configure_optimizers
    return module


class Weights(pl.Callback):
    """A copy of the network at every probe step (after its optimizer step)."""

    def __init__(self) -> None:
        self.at: dict[int, torch.nn.Module] = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step % EVERY == 0:
            self.at[trainer.global_step] = copy.deepcopy(pl_module.net).eval()


def test_decaying_run_goes_from_chaotic_to_stable_and_logs_the_cosine(tmp_path: Path) -> None:
    module, weights = _decaying(), Weights()
    regime = TrainingRegime(every_n_steps=EVERY, probe_size=PROBE, thresholds=(0.95, 0.999))
    fit(module, [regime, weights], max_steps=40, datamodule=DigitsDataModule(batch_size=64), limit_val_batches=0,
        logger=CSVLogger(str(tmp_path)), log_every_n_steps=EVERY)
    steps = [h[0] for h in regime.history]
    assert steps == [10, 15, 20, 25, 30, 35, 40]  # the first probe (step 5) has nothing to compare with
    regimes = [h[2] for h in regime.history]
    assert regimes[0] == CHAOTIC and regimes[-1] == STABLE and TRANSITION in regimes
    assert regimes == sorted(regimes)  # the representation settles monotonically as the lr decays
    # s recomputed: per-sample cosine of the input of the last Linear (the final hidden state), averaged
    x = regime.probe.batch[0]
    for step, s, r in regime.history:
        hidden = [net[:-1](x).double() for net in (weights.at[step - EVERY], weights.at[step])]
        cosine = (hidden[0] * hidden[1]).sum(1) / ((hidden[0].norm(dim=1) + 1e-8) * (hidden[1].norm(dim=1) + 1e-8))
        assert s == pytest.approx(float(cosine.mean()), rel=1e-9, abs=1e-12)
        assert r == (STABLE if s >= 0.999 else CHAOTIC if s <= 0.95 else TRANSITION)
    lines = (tmp_path / "lightning_logs" / "version_0" / "metrics.csv").read_text().splitlines()
    header = lines[0].split(",")
    rows = [dict(zip(header, line.split(","))) for line in lines[1:]]
    logged = [(int(row["step"]), float(row[tags.REGIME])) for row in rows if row.get(tags.REGIME)]
    assert logged == [(step, float(r)) for step, _, r in regime.history]
    assert len([row for row in rows if row.get(tags.REGIME_COSINE)]) == 7


def test_classification_with_the_authors_thresholds_and_running_percentiles() -> None:
    fixed = TrainingRegime()
    low, high = LEAP_VERIFY_THRESHOLDS
    assert (low, high) == pytest.approx((0.9962696, 0.99948916))
    assert [fixed.classify(s) for s in (low, 0.998, high, 0.9)] == [CHAOTIC, TRANSITION, STABLE, CHAOTIC]
    running = TrainingRegime(thresholds=None)
    running.history = [(i, s, 0) for i, s in enumerate([0.1, 0.2, 0.3, 0.4])]
    running.similarity = 0.5
    # 30th / 70th percentiles (linear interpolation) of (0.1, 0.2, 0.3, 0.4, 0.5): 0.22 and 0.38
    assert running.thresholds_now() == pytest.approx((0.22, 0.38))
    assert running.classify(0.5) == STABLE and running.classify(0.3) == TRANSITION and running.classify(0.2) == CHAOTIC
    single = TrainingRegime(thresholds=None)
    single.similarity = 0.7
    assert single.thresholds_now() == pytest.approx((0.699, 0.701))  # the authors' guard for one value
    assert fixed.classify(float("nan")) == CHAOTIC and running.classify(float("nan")) == CHAOTIC  # diverged


def test_fingerprint_of_a_language_model_is_its_final_hidden_state_pooled_over_tokens() -> None:
    from lightning_optim.examples.gpt import GPT

    torch.manual_seed(0)
    gpt = GPT(n_layer=1, d_model=16, n_head=2, seq_len=8)
    x = torch.randint(0, 256, (5, 8))
    regime = TrainingRegime(probe_size=5)
    regime.probe = ProbeSet((x, x), list(range(5)), 2)
    captured = []
    handle = gpt.norm.register_forward_hook(lambda m, a, out: captured.append(out.detach()))
    with torch.no_grad():
        gpt(x)
    handle.remove()
    torch.testing.assert_close(regime.fingerprint(gpt), captured[0].mean(dim=1).double())
    named = TrainingRegime(probe_size=5, layer="blocks.0")
    named.probe = regime.probe
    assert named.fingerprint(gpt).shape == (5, 16)


def test_resume_compares_with_the_saved_fingerprint(tmp_path: Path) -> None:
    data = DigitsDataModule(batch_size=64)
    first = TrainingRegime(every_n_steps=EVERY, probe_size=16, thresholds=None)
    trainer = fit(_decaying(), [first], max_steps=10, datamodule=data, limit_val_batches=0)
    trainer.save_checkpoint(tmp_path / "ten.ckpt")
    again = TrainingRegime(every_n_steps=EVERY, probe_size=16, thresholds=None)
    fit(_decaying(), [again], max_steps=15, datamodule=data, limit_val_batches=0, ckpt_path=str(tmp_path / "ten.ckpt"))
    assert again.probe.indices == first.probe.indices
    assert [h[0] for h in again.history] == [10, 15] and again.history[0] == first.history[0]


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"every_n_steps": 0}, "every_n_steps"),
        ({"probe_size": 0}, "probe_size"),
        ({"thresholds": (0.99, 0.9)}, "thresholds"),
        ({"thresholds": (0.9, float("nan"))}, "thresholds"),
        ({"thresholds": 0.9}, "thresholds"),
        ({"layer": ""}, "layer"),
    ],
)
def test_invalid_arguments_are_named(kwargs: dict, name: str) -> None:
    with pytest.raises(ValueError, match=name):
        TrainingRegime(**kwargs)


def test_unknown_layer_is_named_at_fit_start() -> None:
    with pytest.raises(ValueError, match="no_such_layer"):
        fit(_decaying(), [TrainingRegime(layer="no_such_layer")], max_steps=1,
            datamodule=DigitsDataModule(batch_size=64), limit_val_batches=0)


def test_dashboard_has_the_charts_of_the_attached_monitors() -> None:
    from lightning_optim.callbacks.dashboard import stability_layout
    from lightning_optim.callbacks.opposing_signals import OpposingSignals
    from lightning_optim.callbacks.perpendicular_grad import PerpendicularGrad
    from lightning_optim.callbacks.softmax_collapse import SoftmaxCollapseMonitor

    def patterns(callbacks) -> dict[str, list[str]]:
        return {title: chart[1] for title, chart in stability_layout(callbacks)["stability"].items()}

    assert list(patterns([])) == ["loss"]
    monitors = [
        TrainingRegime(), OpposingSignals(), PerpendicularGrad(), SoftmaxCollapseMonitor(on_collapse="perp_grad")
    ]
    charts = patterns(monitors)
    every = [p for ps in charts.values() for p in ps]
    ours = (tags.REGIME, tags.REGIME_COSINE, tags.OPPOSING_GROUP_SIZE, tags.OPPOSING_OSCILLATION, tags.OPPOSING_MASS,
            tags.OPPOSING_FLIP_FRACTION, tags.NLM_COSINE, tags.SOFTMAX_COLLAPSE, tags.SOFTMAX_COLLAPSE_SWITCHED)
    for tag in ours:
        assert sum(bool(re.search(p, tag)) for p in every) == 1, tag  # exactly one chart shows it
    monitor_only = patterns([SoftmaxCollapseMonitor()])["softmax collapse (share of samples)"]
    assert not any(re.search(p, tags.SOFTMAX_COLLAPSE_SWITCHED) for p in monitor_only)  # no action, no switch line
