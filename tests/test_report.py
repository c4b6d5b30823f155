"""``lightning-optim report``: the verdict's numbers, the PNG and the HTML page.

Known numbers come from event files written here with a SummaryWriter; the real run is a tiny Lightning
fit with SpikeGuard, LRSafetyRadius, a learning-rate ramp that takes r past 1 and an injected gradient
spike, and its verdict is checked against counts read from the raw event records (``EventFileLoader``,
not the ``EventAccumulator`` the report uses).
"""

from __future__ import annotations

import math
import runpy
import struct
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("tensorboard")
pytest.importorskip("matplotlib")

from lightning.pytorch.callbacks import LearningRateMonitor
from lightning.pytorch.loggers import TensorBoardLogger
from torch.utils.tensorboard import SummaryWriter

from callback_models import GradientSpike, Regression, fit
from lightning_optim import report
from lightning_optim.callbacks import LRSafetyRadius, SpikeGuard


def _write(run: Path, series: dict[str, list[tuple[int, float]]]) -> Path:
    writer = SummaryWriter(str(run))
    for tag, points in series.items():
        for step, value in points:
            writer.add_scalar(tag, value, step)
    writer.close()
    return run


def _png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", data[16:24])


RATIOS = [(2, 0.4), (4, 1.5), (6, 0.9), (8, 3.0), (10, 1.0)]  # r = 1 exactly counts as risky


@pytest.fixture
def known_run(tmp_path: Path) -> Path:
    """Two optimizers' counters, r >= 1 at steps 4, 8 and 10, a z threshold, a quant layer error."""
    return _write(tmp_path / "run", {
        "train/loss": [(s, 2.0 - 0.1 * s) for s in range(11)],
        "stability/spikes": [(2, 0.0), (4, 1.0), (6, 1.0), (8, 3.0), (10, 3.0)],
        "stability/spikes/opt1": [(2, 0.0), (10, 2.0)],
        "stability/skipped_steps": [(2, 0.0), (4, 1.0), (10, 1.0)],
        "stability/momentum_resets": [(4, 0.0), (6, 2.0), (10, 2.0)],
        "stability/grad_norm_z": [(2, 0.5), (4, 9.0), (6, -1.0), (8, 30.0)],
        "stability/z_threshold": [(0, 6.0), (10, 6.0)],
        "stability/lr_safety_ratio": RATIOS,
        "stability/lr_safety_ratio_limit": [(0, 1.0), (10, 1.0)],
        "lr-AdamW": [(s, 1e-3 * (1 + s)) for s in range(11)],
        "lr-AdamW-momentum": [(s, 0.9) for s in range(11)],
        "quant/layer_error/net.0": [(5, 0.01), (10, 0.02)],
        "quant/layer_error/net.3": [(5, 0.05), (10, 0.04)],
        "quant/layer_error_a/net.3": [(5, 0.5), (10, 0.5)],
    })


def test_summary_numbers_of_a_known_run(known_run: Path) -> None:
    scalars = report.read_scalars(known_run)
    assert scalars["stability/spikes"] == report.Series([2, 4, 6, 8, 10], [0.0, 1.0, 1.0, 3.0, 3.0])
    summary = report.summarize(scalars, known_run)
    assert (summary.spikes, summary.skipped, summary.resets, summary.shrunk) == (5, 1, 2, None)  # 3 + 2 spikes
    assert summary.optimizers == 2 and summary.last_step == 10
    assert summary.probes == 5 and summary.risky_steps == [4, 8, 10]
    assert (summary.max_ratio, summary.max_ratio_step) == (3.0, 8)
    assert summary.lr_at_max_ratio == pytest.approx(9e-3)  # lr-AdamW, not its -momentum series
    assert (summary.z_threshold, summary.max_z) == (6.0, 30.0)
    assert summary.final_loss == pytest.approx(1.0) and summary.loss_tag == "train/loss"
    assert summary.worst_quant == ("net.3", pytest.approx(0.04))  # the last R, the layer_error_a series ignored
    assert summary.panels == ["loss", "z", "r", "quant"] and summary.missing == []
    verdict = "\n".join(summary.verdict())
    assert "Spikes seen: 5 (summed over 2 optimizers)" in verdict
    assert "Steps skipped: 1; moment resets: 2." in verdict
    assert "Safety ratio r ≥ 1 at 3 of 5 logged probes (steps 4, 8, 10); max r = 3 at step 8." in verdict
    assert "Final loss: 1 (train/loss at step 10)." in verdict
    # r > 1 wins over spikes; the lr that would have kept the worst step at r = 1 is 9e-3 / 3
    assert summary.advice.startswith("updates left the softmax's safe radius (max r = 3)")
    assert "to about 0.003 " in summary.advice


def test_increments_mark_where_a_counter_rose() -> None:
    assert report.increments(report.Series([1, 2, 3, 4, 5], [0.0, 1.0, 1.0, 4.0, 4.0])) == [2, 4]
    assert report.increments(report.Series([10, 20], [2.0, 2.0])) == [10]  # already up at the first log
    assert report.increments(report.Series([], [])) == []


def test_missing_tags_leave_their_panels_out_and_say_so(tmp_path: Path) -> None:
    run = _write(tmp_path / "plain", {"train/loss": [(0, 1.0), (1, 0.5)]})
    summary, png, page = report.write_report(run)
    assert summary.panels == ["loss"] and summary.spikes is None and summary.probes == 0
    left_out = [line for line in summary.verdict() if line.startswith("Left out:")]
    assert len(left_out) == 2
    assert "SpikeGuard was not attached" in left_out[0] and "LRSafetyRadius was not attached" in left_out[1]
    assert summary.advice.startswith("no stability tags found")
    assert png == run / report.PNG_NAME and page == run / report.HTML_NAME
    width, height = _png_size(png)
    assert width == 1100 and 300 < height < 900  # one panel and the text: a shorter page
    assert "LRSafetyRadius was not attached" in page.read_text()


def test_control_mode_and_divergence_advice(tmp_path: Path) -> None:
    run = _write(tmp_path / "control", {
        "train_loss": [(0, 1.0), (5, math.inf)],
        "stability/lr_safety_ratio": [(5, 2.0)],
        "stability/lr_scaled_steps": [(5, 4.0)],
    })
    summary = report.summarize(report.read_scalars(run), run)
    assert summary.loss_tag == "train_loss" and summary.shrunk == 4
    assert "Updates shrunk by LRSafetyRadius: 4." in summary.verdict()
    assert summary.advice.startswith("the loss is not finite")
    assert any("no lr-* tag" in m for m in summary.missing)
    finite = _write(tmp_path / "control2", {"stability/lr_safety_ratio": [(5, 2.0)], "stability/lr_scaled_steps": [(5, 4.0)]})
    assert report.summarize(report.read_scalars(finite)).advice.startswith("the controller shrank 4 updates")
    calm = _write(tmp_path / "calm", {"stability/lr_safety_ratio": [(5, 0.05)], "stability/spikes": [(5, 0.0)]})
    assert report.summarize(report.read_scalars(calm)).advice.startswith("no instability seen, and r stays below 0.1")


def test_cli_picks_the_newest_run_and_reports_missing_event_files(tmp_path: Path, capsys) -> None:
    import os

    old = _write(tmp_path / "logs" / "version_0", {"train/loss": [(0, 3.0)]})
    new = _write(tmp_path / "logs" / "version_1", {"train/loss": [(0, 2.0)]})
    for event_file in old.glob("events.*"):
        os.utime(event_file, (1, 1))
    assert report.find_runs(tmp_path / "logs") == [new, old]
    assert report.main([str(tmp_path / "logs"), "-o", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    assert "2 runs under" in out and "Final loss: 2 " in out and (tmp_path / "out" / report.PNG_NAME).is_file()
    assert report.main([str(tmp_path / "logs"), "--run", "version_0", "-o", str(tmp_path / "out0")]) == 0
    assert "Final loss: 3 " in capsys.readouterr().out
    (tmp_path / "empty").mkdir()
    assert report.main([str(tmp_path / "empty")]) == 1
    assert "no TensorBoard event files" in capsys.readouterr().err
    assert report.main([str(tmp_path / "nowhere")]) == 1


def test_module_runs_as_a_script(tmp_path: Path, monkeypatch) -> None:
    run = _write(tmp_path / "run", {"train/loss": [(0, 1.0), (1, 0.5)]})
    monkeypatch.setattr(sys, "argv", ["report", str(run), "-o", str(tmp_path / "script")])
    monkeypatch.delitem(sys.modules, "lightning_optim.report", raising=False)
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_module("lightning_optim.report", run_name="__main__")
    assert exit_info.value.code == 0 and (tmp_path / "script" / report.HTML_NAME).is_file()


# --------------------------------------------------------------------------- a real tiny run
class LoggedRegression(Regression):
    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        self.log("train/loss", loss)
        return loss

    def configure_optimizers(self):
        optimizer = torch.optim.SGD(self.parameters(), lr=0.05)
        # lr x 1.25 per step (x ~35 over the run): the safety ratio r, proportional to the step, passes 1
        ramp = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.25**step)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": ramp, "interval": "step"}}


def _raw_scalars(run: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar record of the event files, straight from the records (no EventAccumulator)."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
    from tensorboard.util import tensor_util

    out: dict[str, list[tuple[int, float]]] = {}
    for path in sorted(run.glob("events.out.tfevents.*")):
        for event in EventFileLoader(str(path)).Load():
            for value in event.summary.value:
                if value.WhichOneof("value") == "simple_value":
                    out.setdefault(value.tag, []).append((event.step, value.simple_value))
                elif value.metadata.plugin_data.plugin_name == "scalars":
                    out.setdefault(value.tag, []).append((event.step, float(tensor_util.make_ndarray(value.tensor))))
    return out


def test_report_of_a_real_run_matches_the_event_file(tmp_path: Path, one_thread) -> None:
    logger = TensorBoardLogger(str(tmp_path / "logs"), name="tb", version=0)
    callbacks = [
        GradientSpike({8}),
        SpikeGuard(action="skip", warmup_steps=4, z_threshold=5.0),
        LRSafetyRadius(every_n_steps=2),
        LearningRateMonitor(logging_interval="step"),
    ]
    fit(LoggedRegression(lambda p: None), callbacks, max_steps=16, logger=logger, log_every_n_steps=1)
    run = tmp_path / "logs" / "tb" / "version_0"

    assert report.main([str(tmp_path / "logs")]) == 0  # LOGDIR above the run: found by itself
    raw = _raw_scalars(run)
    spikes = raw["stability/spikes"][-1][1]
    skipped = raw["stability/skipped_steps"][-1][1]
    ratios = [v for _, v in raw["stability/lr_safety_ratio"]]
    over = sum(v >= 1.0 for v in ratios)  # r >= 1: what LRSafetyRadius calls risky
    assert spikes >= 1 and skipped == spikes  # the injected spike was caught, and every spike skipped
    assert 0 < over < len(ratios)  # the ramp takes r past 1 part of the way through: both kinds present

    summary = report.summarize(report.read_scalars(run), run)
    assert summary.spikes == spikes and summary.skipped == skipped
    assert summary.probes == len(ratios) and len(summary.risky_steps) == over
    assert summary.risky_steps == [s for s, v in raw["stability/lr_safety_ratio"] if v >= 1.0]
    assert summary.final_loss == pytest.approx(raw["train/loss"][-1][1])
    assert summary.z_threshold == 5.0 and summary.panels == ["loss", "z", "r"]

    png, page = run / report.PNG_NAME, run / report.HTML_NAME
    width, height = _png_size(png)
    assert width == 1100 and 900 < height < 1400 and png.stat().st_size > 30_000  # three panels and the text
    text = page.read_text()
    assert f"Spikes seen: {int(spikes)}" in text and f"Steps skipped: {int(skipped)}" in text
    assert f"Safety ratio r ≥ 1 at {over} of {len(ratios)} logged probes" in text
    assert 'src="data:image/png;base64,' in text
