"""StabilityDashboard: the TensorBoard custom-scalars page of the stability callbacks.

The layout is read back from the event file of a real tiny run, through TensorBoard's own custom-scalars
plugin (the code that serves the page), and each chart's tag regexes are matched by that plugin against
the tags the callbacks really logged. The ``browser`` test starts ``tensorboard --logdir`` and takes a
screenshot of the page in headless Chromium (skipped without playwright and a Chromium).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("tensorboard")

from lightning.pytorch.callbacks import LearningRateMonitor
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.custom_scalar import layout_pb2

from callback_models import GradientSpike, Regression, fit
from lightning_optim.callbacks import (
    AdaptiveMomentum,
    LRSafetyRadius,
    MomentumReset,
    QuantizationAwareTraining,
    QuantizationMonitor,
    SpikeAwareClipping,
    SpikeGuard,
)
from lightning_optim.callbacks.dashboard import (
    LR_SAFETY_RATIO_LIMIT,
    LR_SAFETY_RATIO_TARGET,
    Z_THRESHOLD,
    StabilityDashboard,
    stability_layout,
)

CONFIG_TAG = "custom_scalars__config__"


class LoggedRegression(Regression):
    """Regression that logs its loss as the examples do (``train/loss``)."""

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        self.log("train/loss", loss)
        return loss


def _sgd(params):
    return torch.optim.SGD(params, lr=0.05)


def _dashboards(trainer) -> list[StabilityDashboard]:
    return [cb for cb in trainer.callbacks if isinstance(cb, StabilityDashboard)]


def _accumulator(run: Path) -> EventAccumulator:
    acc = EventAccumulator(str(run), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    return acc


def _layouts(run: Path) -> list[layout_pb2.Layout]:
    """Every layout written to the event files of ``run``, parsed from the raw summary."""
    acc = _accumulator(run)
    if CONFIG_TAG not in acc.Tags()["tensors"]:
        return []
    return [layout_pb2.Layout.FromString(e.tensor_proto.string_val[0]) for e in acc.Tensors(CONFIG_TAG)]


def _plugins(logdir: Path):
    """TensorBoard's custom-scalars plugin (and the scalars plugin it asks) over ``logdir``."""
    from tensorboard.backend.event_processing import data_provider, plugin_event_multiplexer
    from tensorboard.plugins import base_plugin
    from tensorboard.plugins.custom_scalar.custom_scalars_plugin import CustomScalarsPlugin
    from tensorboard.plugins.scalar.scalars_plugin import ScalarsPlugin

    multiplexer = plugin_event_multiplexer.EventMultiplexer()
    multiplexer.AddRunsFromDirectory(str(logdir))
    multiplexer.Reload()
    instances: dict = {}
    context = base_plugin.TBContext(
        logdir=str(logdir),
        data_provider=data_provider.MultiplexerDataProvider(multiplexer, str(logdir)),
        multiplexer=multiplexer,
        plugin_name_to_instance=instances,
    )
    instances["scalars"] = ScalarsPlugin(context)
    return CustomScalarsPlugin(context), sorted(multiplexer.Runs())


# --------------------------------------------------------------------------- a real tiny run
@pytest.fixture(scope="module")
def guarded_run(tmp_path_factory):
    """12 steps with SpikeGuard(skip, both), LRSafetyRadius, LearningRateMonitor, a gradient spike at step 6;
    no StabilityDashboard attached by the user (SpikeGuard adds it)."""
    root = tmp_path_factory.mktemp("dashboard")
    logger = TensorBoardLogger(str(root / "logs"), name="tb", version=0)
    guard = SpikeGuard(monitor="both", action="skip", warmup_steps=3, z_threshold=4.0)
    radius = LRSafetyRadius(every_n_steps=2)
    callbacks = [GradientSpike({6}), guard, radius, LearningRateMonitor(logging_interval="step")]
    trainer = fit(LoggedRegression(_sgd), callbacks, max_steps=12, logger=logger, log_every_n_steps=1)
    return SimpleNamespace(trainer=trainer, guard=guard, logdir=root / "logs", run=root / "logs" / "tb" / "version_0")


def test_stability_callbacks_attach_one_dashboard_that_writes_the_layout_once(guarded_run) -> None:
    assert len(_dashboards(guarded_run.trainer)) == 1  # added by SpikeGuard's setup, not by LRSafetyRadius again
    # written at fit start: the layout is the first summary of the event file, before any scalar
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    (event_file,) = guarded_run.run.glob("events.out.tfevents.*")
    first = next(e for e in EventFileLoader(str(event_file)).Load() if e.summary.value)
    assert [v.tag for v in first.summary.value] == [CONFIG_TAG]
    layouts = _layouts(guarded_run.run)
    assert len(layouts) == 1
    (category,) = layouts[0].category
    assert category.title == "stability" and not category.closed  # the page opens on it, expanded
    assert [chart.title for chart in category.chart] == [
        "loss with spikes / skips / resets",
        "grad norm with skips / resets",
        "z-score vs threshold",
        "spikes / skips / resets (cumulative)",
        "safety ratio r = τ/ρ_a vs r = 1",
        "learning rate",
    ]


def test_tensorboard_serves_the_layout_and_every_chart_finds_its_tags(guarded_run) -> None:
    """TensorBoard's own plugin: the layout it serves, and the tags each regex selects (``/scalars`` route)."""
    from tensorboard import context

    plugin, runs = _plugins(guarded_run.logdir)
    served = json.loads(plugin.layout_impl(context.RequestContext(), ""))  # the /layout route's body
    assert [c["title"] for c in served["category"]] == ["stability"]
    matched: dict[str, set[str]] = {}
    for chart in served["category"][0]["chart"]:
        tags: set[str] = set()
        for regex in chart["multiline"]["tag"]:
            body = plugin.scalars_impl(context.RequestContext(), runs[0], regex, "")
            assert body["regex_valid"], regex
            assert body["tag_to_events"], f"{regex!r} of chart {chart['title']!r} selects no logged tag"
            tags |= set(body["tag_to_events"])
        matched[chart["title"]] = tags
    assert matched["z-score vs threshold"] == {"stability/grad_norm_z", "stability/loss_z", Z_THRESHOLD}
    assert matched["safety ratio r = τ/ρ_a vs r = 1"] == {"stability/lr_safety_ratio", LR_SAFETY_RATIO_LIMIT}
    assert matched["loss with spikes / skips / resets"] == {
        "train/loss", "stability/spikes", "stability/skipped_steps", "stability/momentum_resets",
    }
    assert matched["learning rate"] == {"lr-SGD"}


def test_reference_lines_are_logged_at_every_logging_step(guarded_run) -> None:
    acc = _accumulator(guarded_run.run)
    threshold = acc.Scalars(Z_THRESHOLD)
    limit = acc.Scalars(LR_SAFETY_RATIO_LIMIT)
    assert {e.value for e in threshold} == {4.0} and {e.value for e in limit} == {1.0}
    # train start (step 0), then every logging step (log_every_n_steps=1) up to the last one
    assert [e.step for e in threshold] == list(range(13)) == [e.step for e in limit]
    spikes = acc.Scalars("stability/spikes")
    assert spikes[-1].value == 1.0  # the injected spike was caught: the z chart has something to show
    assert max(e.value for e in acc.Scalars("stability/grad_norm_z")) > 4.0


# --------------------------------------------------------------------------- triggers and options
def test_lr_safety_radius_alone_writes_the_layout_at_its_first_log(tmp_path: Path) -> None:
    """LRSafetyRadius is no pipeline callback: its first logged scalar attaches the dashboard and writes."""
    logger = TensorBoardLogger(str(tmp_path), name="tb", version=0)
    trainer = fit(LoggedRegression(_sgd), [LRSafetyRadius(mode="control", every_n_steps=2, target_ratio=0.5)],
                  max_steps=4, logger=logger, log_every_n_steps=1)
    assert len(_dashboards(trainer)) == 1
    (layout,) = _layouts(tmp_path / "tb" / "version_0")
    charts = {c.title: list(c.multiline.tag) for c in layout.category[0].chart}
    # no spike/skip/reset counters: the loss chart is the plain one
    assert set(charts) == {"loss", "spikes / skips / resets (cumulative)", "safety ratio r = τ/ρ_a vs r = 1"}
    assert charts["spikes / skips / resets (cumulative)"] == [r"^stability/lr_scaled_steps(/opt\d+)?$"]
    acc = _accumulator(tmp_path / "tb" / "version_0")
    assert {e.value for e in acc.Scalars(LR_SAFETY_RATIO_TARGET)} == {0.5}
    assert [e.step for e in acc.Scalars(LR_SAFETY_RATIO_LIMIT)][-1] == 4


def test_users_dashboard_is_the_only_one_and_enabled_false_writes_nothing(tmp_path: Path) -> None:
    mine = StabilityDashboard(title="mine", loss_tag=r"^train/loss$")
    trainer = fit(LoggedRegression(_sgd), [mine, SpikeGuard(warmup_steps=2), MomentumReset(interval=2, warmup_steps=1)],
                  max_steps=3, logger=TensorBoardLogger(str(tmp_path), name="a", version=0), log_every_n_steps=1)
    assert _dashboards(trainer) == [mine]
    (layout,) = _layouts(tmp_path / "a" / "version_0")
    assert [c.title for c in layout.category] == ["mine"]
    assert layout.category[0].chart[0].multiline.tag[0] == r"^train/loss$"
    assert mine.layout == {"mine": {c.title: ["Multiline", list(c.multiline.tag)] for c in layout.category[0].chart}}

    off = StabilityDashboard(enabled=False)
    trainer = fit(LoggedRegression(_sgd), [SpikeGuard(warmup_steps=2), LRSafetyRadius(every_n_steps=1), off],
                  max_steps=3, logger=TensorBoardLogger(str(tmp_path), name="b", version=0), log_every_n_steps=1)
    assert _dashboards(trainer) == [off]
    acc = _accumulator(tmp_path / "b" / "version_0")
    assert CONFIG_TAG not in acc.Tags()["tensors"]
    assert not {Z_THRESHOLD, LR_SAFETY_RATIO_LIMIT} & set(acc.Tags()["scalars"])
    assert "stability/lr_safety_ratio" in acc.Tags()["scalars"]  # the callbacks themselves still log


def test_no_dashboard_without_a_tensorboard_logger(tmp_path: Path) -> None:
    trainer = fit(Regression(_sgd), [SpikeGuard(warmup_steps=2)], max_steps=2)  # logger=False
    assert _dashboards(trainer) == []
    trainer = fit(Regression(_sgd), [SpikeGuard(warmup_steps=2)], max_steps=2, logger=CSVLogger(str(tmp_path)),
                  log_every_n_steps=1)
    assert _dashboards(trainer) == []
    metrics = (Path(trainer.logger.log_dir) / "metrics.csv").read_text()
    assert "stability/spikes" in metrics and Z_THRESHOLD not in metrics


def test_only_rank_zero_writes(tmp_path: Path) -> None:
    logger = TensorBoardLogger(str(tmp_path), name="tb", version=0)
    trainer = SimpleNamespace(is_global_zero=False, loggers=[logger], callbacks=[SpikeGuard()])
    dashboard = StabilityDashboard()
    dashboard.write_layout(trainer)
    assert dashboard.layout is None and not list(tmp_path.rglob("events.out.tfevents.*"))
    trainer.is_global_zero = True
    dashboard.write_layout(trainer)
    assert list(dashboard.layout["stability"])[2] == "z-score vs threshold"
    assert len(_layouts(tmp_path / "tb" / "version_0")) == 1
    dashboard.write_layout(trainer)  # the same layout to the same writer: not written again
    assert len(_layouts(tmp_path / "tb" / "version_0")) == 1


# --------------------------------------------------------------------------- the layout itself
def _charts(callbacks, **kwargs) -> dict[str, list[str]]:
    (category,) = stability_layout(callbacks, **kwargs).values()
    for kind, _ in category.values():
        assert kind == "Multiline"
    return {title: regexes for title, (_, regexes) in category.items()}


def _selects(regexes: list[str], tag: str) -> bool:
    return any(re.match(regex, tag) for regex in regexes)  # TensorBoard's server matches with re.match


def test_layout_has_only_the_charts_of_attached_producers() -> None:
    assert _charts([]) == {"loss": [r"^train/loss(_step)?$"]}
    resets = _charts([MomentumReset()])
    assert set(resets) == {"loss with spikes / skips / resets", "spikes / skips / resets (cumulative)"}
    assert resets["spikes / skips / resets (cumulative)"] == [r"^stability/momentum_resets(/opt\d+)?$"]

    clip_guard = _charts([SpikeGuard(action="clip")])  # grad_norm monitor, no skips: no loss_z, no skipped_steps
    assert clip_guard["z-score vs threshold"] == [r"^stability/grad_norm_z(/opt\d+)?$", r"^stability/z_threshold(/opt\d+)?$"]
    assert not _selects(clip_guard["spikes / skips / resets (cumulative)"], "stability/skipped_steps")
    skip_guard = _charts([SpikeGuard(action="stop", monitor="loss")])
    assert _selects(skip_guard["z-score vs threshold"], "stability/loss_z")
    assert _selects(skip_guard["grad norm with skips / resets"], "stability/skipped_steps")

    assert "clipped fraction" in _charts([SpikeAwareClipping()])
    assert "beta1 (adaptive momentum)" in _charts([AdaptiveMomentum()])
    assert "learning rate" not in _charts([LRSafetyRadius()])  # no LearningRateMonitor: no lr chart
    monitor = _charts([LRSafetyRadius(), LearningRateMonitor()])
    assert monitor["safety ratio r = τ/ρ_a vs r = 1"] == [
        r"^stability/lr_safety_ratio(/opt\d+)?$", r"^stability/lr_safety_ratio_limit(/opt\d+)?$"
    ]
    control = _charts([LRSafetyRadius(mode="control")])
    assert _selects(control["safety ratio r = τ/ρ_a vs r = 1"], "stability/lr_scale")
    assert _selects(control["spikes / skips / resets (cumulative)"], "stability/lr_scaled_steps")

    assert not any(t.startswith("quant") for t in _charts([QuantizationAwareTraining(every_n_steps=0)]))
    for producers in ([QuantizationAwareTraining()], [QuantizationMonitor()], [QuantizationAwareTraining(every_n_steps=0), QuantizationMonitor()]):
        quant = _charts(producers)
        assert _selects(quant["quant: layer error R"], "quant/layer_error/blocks.3")
        assert not _selects(quant["quant: layer error R"], "quant/layer_error_a/blocks.3")
        assert _selects(quant["quant: MMR"], "quant/mmr/blocks.3/act") and _selects(quant["quant: kurtosis"], "quant/kurtosis/net")
    assert _selects(_charts([QuantizationAwareTraining()])["loss with spikes / skips / resets"], "stability/momentum_resets")
    assert "spikes / skips / resets (cumulative)" not in _charts([QuantizationAwareTraining(reset_moments_on_start=False)])


def test_regexes_select_exactly_their_tags_for_every_optimizer() -> None:
    charts = _charts([SpikeGuard(action="skip"), LRSafetyRadius(), LearningRateMonitor()])
    grad = charts["grad norm with skips / resets"]
    for tag in ("stability/grad_norm", "stability/grad_norm/opt1", "stability/skipped_steps/opt12"):
        assert _selects(grad, tag), tag
    for tag in ("stability/grad_norm_z", "stability/grad_norm/opt", "xstability/grad_norm", "stability/spikes"):
        assert not _selects(grad, tag), tag
    r = charts["safety ratio r = τ/ρ_a vs r = 1"]
    assert _selects(r, "stability/lr_safety_ratio") and not _selects(r, "stability/lr_safety_radius")
    lr = charts["learning rate"]
    for tag in ("lr-AdamW", "lr-AdamW/pg1", "lr-SGD-2"):
        assert _selects(lr, tag), tag
    for tag in ("lr-AdamW-momentum", "lr-AdamW/pg1-weight_decay", "stability/lr_scale", "train/loss"):
        assert not _selects(lr, tag), tag
    loss = charts["loss with spikes / skips / resets"]
    assert _selects(loss, "train/loss") and _selects(loss, "train/loss_step")
    assert not _selects(loss, "train/loss_epoch") and not _selects(loss, "val/loss")


def test_logger_prefix_is_part_of_every_regex() -> None:
    charts = _charts([SpikeGuard(), LearningRateMonitor()], prefix="exp")
    for tag in ("exp-train/loss", "exp-stability/grad_norm_z", "exp-lr-AdamW"):
        assert any(_selects(regexes, tag) for regexes in charts.values()), tag
    assert not any(_selects(regexes, "train/loss") for regexes in charts.values())


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [({"loss_tag": "train/(loss"}, "loss_tag"), ({"lr_tag": "["}, "lr_tag"), ({"title": ""}, "title")],
)
def test_invalid_arguments_are_named(kwargs: dict, name: str) -> None:
    with pytest.raises(ValueError, match=f"Invalid {name}"):
        StabilityDashboard(**kwargs)


# --------------------------------------------------------------------------- headless browser
def _chromium() -> str | None:
    for candidate in (os.environ.get("CHROME_BIN"), "chromium", "chromium-browser", "google-chrome",
                      "google-chrome-stable", "chrome"):
        if candidate and shutil.which(candidate):
            return shutil.which(candidate)
    return None


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _start_tensorboard(logdir: Path, port: int) -> subprocess.Popen:
    """``tensorboard --logdir`` on ``port``; returns once the custom-scalars layout is served."""
    command = [shutil.which("tensorboard")] if shutil.which("tensorboard") else [sys.executable, "-m", "tensorboard.main"]
    command += ["--logdir", str(logdir), "--port", str(port), "--host", "127.0.0.1", "--load_fast=false"]
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}/data/plugin/custom_scalars/layout"
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"tensorboard exited with {proc.returncode}: {proc.stderr.read().decode()[-2000:]}")
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                layout = json.loads(response.read())
            if layout.get("category"):
                return proc
        except (OSError, ValueError):
            pass
        time.sleep(0.5)
    proc.kill()
    raise RuntimeError("tensorboard did not serve the custom-scalars layout within 90 s")


@pytest.mark.browser
def test_custom_scalars_page_in_headless_chromium(request: pytest.FixtureRequest, tmp_path: Path) -> None:
    """Start ``tensorboard --logdir``, open ``#custom_scalars`` in headless Chromium, screenshot it and check
    that the page shows the open ``stability`` category with its charts."""
    sync_api = pytest.importorskip("playwright.sync_api", reason="needs playwright and a headless Chromium")
    executable = _chromium()
    with sync_api.sync_playwright() as playwright:
        try:
            browser = playwright.chromium.launch(headless=True, executable_path=executable)
        except sync_api.Error as error:
            pytest.skip(f"no headless Chromium to run: {error}")
        guarded_run = request.getfixturevalue("guarded_run")  # the run only once a browser is there
        proc = _start_tensorboard(guarded_run.logdir, _free_port())
        port = int(proc.args[proc.args.index("--port") + 1])
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1100})
            page.goto(f"http://127.0.0.1:{port}/#custom_scalars", wait_until="networkidle", timeout=60_000)
            # Playwright's text locators pierce the (open) shadow roots of TensorBoard's Polymer elements
            title = page.get_by_text("stability", exact=True).first
            title.wait_for(state="visible", timeout=60_000)
            page.get_by_text("z-score vs threshold").first.wait_for(state="visible", timeout=60_000)
            page.wait_for_timeout(2000)  # let the charts draw
            shot = tmp_path / "custom_scalars.png"
            page.screenshot(path=str(shot), full_page=True)
            assert page.get_by_text("stability", exact=True).count() >= 1
            assert page.get_by_text("safety ratio r = τ/ρ_a vs r = 1").count() >= 1
            assert shot.stat().st_size > 20_000
        finally:
            browser.close()
            proc.kill()
            proc.wait(timeout=30)
