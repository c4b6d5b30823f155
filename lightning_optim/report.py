"""``lightning-optim report LOGDIR``: a one-page stability report (PNG + HTML) from TensorBoard event files.

    lightning-optim report lightning_logs               # the most recent run under lightning_logs/
    python -m lightning_optim.report lightning_logs/gpt/version_0 -o reports/

The run's scalars are read with TensorBoard's ``EventAccumulator`` (every point, no reservoir sampling).
The page has up to four panels, each only when its tags were logged: the training loss with the steps at
which ``stability/spikes``, ``stability/skipped_steps`` and ``stability/momentum_resets`` went up marked;
the gradient-norm z-score with SpikeGuard's threshold; the safety ratio r (``stability/lr_safety_ratio``)
with the r = 1 line against the learning rate (LearningRateMonitor's ``lr-*``); the per-layer
quantization error ``quant/layer_error/*``. Below them a short verdict: spikes seen, steps skipped,
moment resets, updates shrunk, logged probes with r ≥ 1 (what LRSafetyRadius calls risky), the final
loss, the panels left out and one line of advice. ``stability_report.png`` and ``stability_report.html``
(the PNG embedded, and the verdict as text) are written to the run's directory unless ``--output`` names
another. matplotlib is imported only when the PNG is drawn.

Counters are logged every ``log_every_n_steps`` at ``trainer.global_step`` after the optimizer step,
Lightning's ``self.log`` at the step before it: a marker sits on the loss of the batch before the first
logged step at which its counter was higher than at the previous logged step, so with a logging interval
n > 1 it may trail the event by up to n - 1 steps.
"""

from __future__ import annotations

import argparse
import base64
import html
import math
import re
import sys
import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

from lightning_optim.monitors import tags

__all__ = ["Series", "StabilityReport", "find_runs", "main", "read_scalars", "summarize", "write_report"]

PNG_NAME = "stability_report.png"
HTML_NAME = "stability_report.html"
# the dashboard's constant reference series (callbacks/dashboard.py)
Z_THRESHOLD, LR_SAFETY_RATIO_TARGET = tags.Z_THRESHOLD, tags.LR_SAFETY_RATIO_TARGET

_LOSS_CANDIDATES = ("train/loss", "train/loss_step", "train_loss", "train_loss_step", "loss")
_LR = re.compile(r"^lr-(?!.*-(momentum|weight_decay)$)")
_EVENTS = "events.out.tfevents.*"


class Series(NamedTuple):
    """One scalar tag: steps in increasing order, one value per step (the last one logged for it)."""

    steps: list[int]
    values: list[float]

    @property
    def last(self) -> float:
        return self.values[-1]


@dataclass
class StabilityReport:
    """The verdict's numbers, read from one run; ``None`` where the tag was not logged."""

    run: Path
    last_step: int | None = None
    loss_tag: str | None = None
    final_loss: float | None = None
    last_step_of_loss: int | None = None
    spikes: int | None = None
    skipped: int | None = None
    resets: int | None = None
    shrunk: int | None = None  # LRSafetyRadius(mode="control"): updates scaled down (s < 1)
    optimizers: int = 1
    probes: int = 0  # logged values of stability/lr_safety_ratio
    risky_steps: list[int] = field(default_factory=list)  # their steps with r >= 1 (LRSafetyRadius's "risky")
    max_ratio: float | None = None
    max_ratio_step: int | None = None
    lr_at_max_ratio: float | None = None
    z_threshold: float | None = None
    max_z: float | None = None
    worst_quant: tuple[str, float] | None = None  # (layer, last layer error R) of the largest
    panels: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    advice: str = ""

    def verdict(self) -> list[str]:
        """The verdict as lines of text (what the PNG and the HTML show)."""
        lines = [f"Run: {self.run}" + (f" (last logged step {self.last_step})" if self.last_step is not None else "")]
        suffix = f" (summed over {self.optimizers} optimizers)" if self.optimizers > 1 else ""
        if self.spikes is not None:
            z = f"; max grad-norm z {self.max_z:.3g}" if self.max_z is not None else ""
            thr = f" against threshold {self.z_threshold:g}" if self.z_threshold is not None and z else ""
            lines.append(f"Spikes seen: {self.spikes}{suffix}{z}{thr}.")
        actions = []
        if self.skipped is not None:
            actions.append(f"steps skipped: {self.skipped}")
        if self.resets is not None:
            actions.append(f"moment resets: {self.resets}")
        if self.shrunk is not None:
            actions.append(f"updates shrunk by LRSafetyRadius: {self.shrunk}")
        if actions:
            text = "; ".join(actions) + "."
            lines.append(text[0].upper() + text[1:])
        if self.probes:
            over = len(self.risky_steps)
            where = f" (step{'s' if over > 1 else ''} {_step_list(self.risky_steps)})" if over else ""
            lines.append(
                f"Safety ratio r ≥ 1 at {over} of {self.probes} logged probes{where}; "
                f"max r = {self.max_ratio:.3g} at step {self.max_ratio_step}."
            )
        if self.final_loss is not None:
            lines.append(f"Final loss: {self.final_loss:.4g} ({self.loss_tag} at step {self.last_step_of_loss}).")
        if self.worst_quant is not None:
            layer, value = self.worst_quant
            lines.append(f"Largest quantization layer error R: {value:.3g} ({layer}).")
        lines.extend(f"Left out: {m}." for m in self.missing)
        lines.append(f"Advice: {self.advice}")
        return lines


# --------------------------------------------------------------------------- reading
def find_runs(logdir: str | Path) -> list[Path]:
    """Directories at or under ``logdir`` (or the directory of an event file) that hold event files,
    most recently written first."""
    path = Path(logdir)
    if path.is_file():
        return [path.parent]
    newest: dict[Path, float] = {}
    for event_file in path.rglob(_EVENTS):
        if event_file.is_file():
            mtime = event_file.stat().st_mtime
            newest[event_file.parent] = max(mtime, newest.get(event_file.parent, -math.inf))
    return sorted(newest, key=lambda run: (-newest[run], str(run)))


def read_scalars(run: str | Path) -> dict[str, Series]:
    """Every scalar of the event files in directory ``run`` (all points; the last value of a repeated step)."""
    from tensorboard.backend.event_processing import event_accumulator as ea
    from tensorboard.util import tensor_util

    accumulator = ea.EventAccumulator(str(run), size_guidance={ea.SCALARS: 0, ea.TENSORS: 0})
    accumulator.Reload()
    found = accumulator.Tags()
    points: dict[str, dict[int, float]] = {}
    for tag in found.get(ea.SCALARS, []):
        points[tag] = {e.step: float(e.value) for e in accumulator.Scalars(tag)}
    for tag in found.get(ea.TENSORS, []):  # new-style scalar summaries (a 0-dim tensor of the scalars plugin)
        if accumulator.SummaryMetadata(tag).plugin_data.plugin_name != "scalars" or tag in points:
            continue
        points[tag] = {e.step: float(tensor_util.make_ndarray(e.tensor_proto).item()) for e in accumulator.Tensors(tag)}
    out = {}
    for tag, by_step in points.items():
        steps = sorted(by_step)
        out[tag] = Series(steps, [by_step[s] for s in steps])
    return out


# --------------------------------------------------------------------------- the numbers
def _family(scalars: dict[str, Series], tag: str) -> dict[str, Series]:
    """``tag`` and its per-optimizer variants ``tag/opt<i>``."""
    pattern = re.compile(rf"^{re.escape(tag)}(/opt\d+)?$")
    return {name: series for name, series in sorted(scalars.items()) if pattern.match(name)}


def _counter(scalars: dict[str, Series], tag: str) -> int | None:
    family = _family(scalars, tag)
    if not family:
        return None
    return sum(round(s.last) for s in family.values() if math.isfinite(s.last))


def increments(series: Series) -> list[int]:
    """Steps at which a cumulative counter is higher than at the previous logged step (from 0 before the first)."""
    out, previous = [], 0.0
    for step, value in zip(series.steps, series.values):
        if value > previous:
            out.append(step)
        previous = value
    return out


def _loss_tag(scalars: dict[str, Series], loss_tag: str | None) -> str | None:
    if loss_tag is not None:
        return loss_tag if loss_tag in scalars else None
    for candidate in _LOSS_CANDIDATES:
        if candidate in scalars:
            return candidate
    return next((tag for tag in sorted(scalars) if re.match(r"^train.*loss", tag)), None)


def lr_tags(scalars: dict[str, Series]) -> list[str]:
    return sorted(tag for tag in scalars if _LR.match(tag))


def quant_error_tags(scalars: dict[str, Series]) -> list[str]:
    return sorted(tag for tag in scalars if tag.startswith(tags.QUANT_LAYER_ERROR + "/"))


def _value_at(series: Series, step: int) -> float | None:
    """The value in effect at ``step``: the last logged at or before it (else the first)."""
    chosen = None
    for s, v in zip(series.steps, series.values):
        if s > step:
            break
        chosen = v
    return chosen if chosen is not None else (series.values[0] if series.values else None)


def summarize(scalars: dict[str, Series], run: str | Path = ".", loss_tag: str | None = None) -> StabilityReport:
    """The verdict's numbers from a run's scalars (:func:`read_scalars`)."""
    report = StabilityReport(run=Path(run))
    if scalars:
        report.last_step = max(s.steps[-1] for s in scalars.values() if s.steps)
    report.optimizers = max(1, len(_family(scalars, tags.SPIKES)), len(_family(scalars, tags.MOMENTUM_RESETS)))
    report.spikes = _counter(scalars, tags.SPIKES)
    report.skipped = _counter(scalars, tags.SKIPPED_STEPS)
    report.resets = _counter(scalars, tags.MOMENTUM_RESETS)
    report.shrunk = _counter(scalars, tags.LR_SCALED_STEPS)

    report.loss_tag = _loss_tag(scalars, loss_tag)
    if report.loss_tag is not None:
        loss = scalars[report.loss_tag]
        report.final_loss, report.last_step_of_loss = loss.last, loss.steps[-1]
        report.panels.append("loss")
    else:
        wanted = loss_tag or " / ".join(_LOSS_CANDIDATES[:3])
        report.missing.append(f"loss panel (no {wanted} tag: log the training loss as self.log('train/loss', loss))")

    z_family = _family(scalars, tags.GRAD_NORM_Z)
    if z_family:
        report.panels.append("z")
        finite = [v for s in z_family.values() for v in s.values if math.isfinite(v)]
        report.max_z = max(finite) if finite else None
        if Z_THRESHOLD in scalars:
            report.z_threshold = scalars[Z_THRESHOLD].last
    else:
        report.missing.append("grad-norm z panel (no stability/grad_norm_z: SpikeGuard was not attached)")

    ratio = scalars.get(tags.LR_SAFETY_RATIO)
    if ratio is not None:
        report.panels.append("r")
        report.probes = len(ratio.steps)
        report.risky_steps = [s for s, v in zip(ratio.steps, ratio.values) if v >= 1.0]
        finite = [(v, s) for s, v in zip(ratio.steps, ratio.values) if math.isfinite(v)]
        if finite:
            report.max_ratio, report.max_ratio_step = max(finite)
        lrs = lr_tags(scalars)
        if lrs and report.max_ratio_step is not None:
            report.lr_at_max_ratio = _value_at(scalars[lrs[0]], report.max_ratio_step)
        if not lrs:
            report.missing.append("the learning rate next to r (no lr-* tag: attach LearningRateMonitor)")
    else:
        report.missing.append("r panel (no stability/lr_safety_ratio: LRSafetyRadius was not attached)")

    quant = quant_error_tags(scalars)
    if quant:
        report.panels.append("quant")
        finite = [(scalars[t].last, t) for t in quant if math.isfinite(scalars[t].last)]
        if finite:
            value, tag = max(finite)
            report.worst_quant = (tag[len(tags.QUANT_LAYER_ERROR) + 1 :], value)
    report.advice = _advice(report)
    return report


def _advice(report: StabilityReport) -> str:
    if report.final_loss is not None and not math.isfinite(report.final_loss):
        return (
            "the loss is not finite: training diverged. Restart from the last good checkpoint with a lower "
            "learning rate, and attach SpikeGuard (action='skip') to keep bad steps out of the weights."
        )
    if report.risky_steps and report.max_ratio is not None:
        lower = ""
        if report.lr_at_max_ratio is not None and report.max_ratio > 0:
            lower = f" to about {report.lr_at_max_ratio / report.max_ratio:.3g} (r grows in proportion to the step)"
        if report.shrunk:
            return (
                f"the controller shrank {report.shrunk} updates: the schedule runs past the edge (r ≥ 1); lower "
                f"the peak learning rate{lower} so that it does not have to."
            )
        return (
            f"updates left the softmax's safe radius (max r = {report.max_ratio:.3g}): lower the peak learning "
            f"rate{lower}, or use LRSafetyRadius(mode='control') to cap r at 1."
        )
    if report.spikes:
        return (
            f"{report.spikes} spike(s) were caught and handled; if they recur, lower the learning rate or "
            "lengthen the warm-up."
        )
    if report.max_ratio is not None and report.max_ratio < 0.1:
        return "no instability seen, and r stays below 0.1: the learning rate has room to grow."
    if report.spikes is None and not report.probes:
        return "no stability tags found: attach SpikeGuard and LRSafetyRadius to get a verdict."
    return "no instability seen."


def _step_list(steps: list[int], limit: int = 12) -> str:
    shown = ", ".join(str(s) for s in steps[:limit])
    return shown + (f", ... ({len(steps) - limit} more)" if len(steps) > limit else "")


# --------------------------------------------------------------------------- the page
def plot_report(scalars: dict[str, Series], report: StabilityReport, path: str | Path) -> Path:
    """Draw the one-page PNG of ``report`` to ``path`` (matplotlib, imported here, without pyplot)."""
    from matplotlib.figure import Figure

    lines = [piece for line in report.verdict() for piece in textwrap.wrap(line, 118, subsequent_indent="    ")]
    panels = report.panels
    height = 2.7 * len(panels) + 0.19 * len(lines) + 0.8
    fig = Figure(figsize=(11.0, height), dpi=100)
    ratios = [2.7] * len(panels) + [0.19 * len(lines) + 0.3]
    grid = fig.add_gridspec(
        len(ratios), 1, height_ratios=ratios, hspace=0.5, left=0.08, right=0.9, top=1 - 0.6 / height, bottom=0.01
    )
    fig.suptitle(f"Stability report: {report.run}", fontsize=12, y=1 - 0.12 / height, va="top")
    axes = [fig.add_subplot(grid[i, 0]) for i in range(len(panels))]
    marks = {
        "spike": (tags.SPIKES, "tab:red", "-"),
        "skipped step": (tags.SKIPPED_STEPS, "tab:orange", "--"),
        "moment reset": (tags.MOMENTUM_RESETS, "tab:purple", ":"),
    }
    for ax, panel in zip(axes, panels):
        if panel == "loss":
            loss = scalars[report.loss_tag]  # type: ignore[index]
            ax.plot(loss.steps, loss.values, color="tab:blue", lw=1.2, label=report.loss_tag)
            for label, (tag, color, style) in marks.items():
                # our counters are logged at trainer.global_step after the optimizer step, Lightning's
                # self.log at the step before it: the marker goes to the loss of the batch that stepped
                steps = sorted({s - 1 for series in _family(scalars, tag).values() for s in increments(series)})
                if steps:
                    ax.vlines(steps, 0, 1, transform=ax.get_xaxis_transform(), colors=color, linestyles=style,
                              lw=1.2, alpha=0.8, label=f"{label} ({len(steps)} logged steps)")
            finite = [v for v in loss.values if math.isfinite(v)]
            if finite and min(finite) > 0 and max(finite) / min(finite) > 100:
                ax.set_yscale("log")
            ax.set_title("training loss, spikes / skips / resets marked", fontsize=10, loc="left")
        elif panel == "z":
            for tag, series in _family(scalars, tags.GRAD_NORM_Z).items():
                ax.plot(series.steps, series.values, lw=1.0, label=tag)
            for tag, series in _family(scalars, tags.LOSS_Z).items():
                ax.plot(series.steps, series.values, lw=1.0, alpha=0.7, label=tag)
            threshold = report.z_threshold
            if threshold is not None:
                ax.axhline(threshold, color="tab:red", ls="--", lw=1.0, label=f"threshold {threshold:g}")
                above = [(s, v) for series in _family(scalars, tags.GRAD_NORM_Z).values()
                         for s, v in zip(series.steps, series.values) if v > threshold]
                if above:
                    ax.scatter(*zip(*above), color="tab:red", s=18, zorder=3, label=f"z > threshold ({len(above)})")
            top = report.max_z if report.max_z is not None else 0.0
            if top > 10 * max(threshold or 1.0, 1.0):
                ax.set_yscale("symlog", linthresh=max(threshold or 1.0, 1.0))  # the peak stays in view
            ax.set_title("gradient-norm z-score" + ("" if threshold is not None else " (threshold not logged)"),
                         fontsize=10, loc="left")
        elif panel == "r":
            ratio = scalars[tags.LR_SAFETY_RATIO]
            ax.plot(ratio.steps, ratio.values, color="tab:green", marker="o", ms=3, lw=1.0, label="r = τ/ρ_a")
            ax.axhline(1.0, color="tab:red", ls="--", lw=1.0, label="r = 1")
            if LR_SAFETY_RATIO_TARGET in scalars:
                target = scalars[LR_SAFETY_RATIO_TARGET].last
                ax.axhline(target, color="tab:olive", ls=":", lw=1.0, label=f"target {target:g}")
            over = [(s, v) for s, v in zip(ratio.steps, ratio.values) if v >= 1.0]
            if over:
                ax.scatter(*zip(*over), color="tab:red", s=22, zorder=3, label=f"r ≥ 1 ({len(over)})")
            if report.max_ratio is not None and report.max_ratio > 10:
                ax.set_yscale("symlog", linthresh=1.0)
            ax.set_ylabel("r")
            lrs = lr_tags(scalars)[:4]
            if lrs:
                twin = ax.twinx()
                for i, tag in enumerate(lrs):
                    series = scalars[tag]
                    twin.plot(series.steps, series.values, color=("tab:gray", "tab:brown", "tab:pink", "tab:cyan")[i],
                              lw=1.0, alpha=0.8, label=tag)
                twin.set_ylabel("learning rate")
                twin.legend(loc="upper right", fontsize=7)
            ax.set_title("safety ratio r against the learning rate" + ("" if lrs else " (lr not logged)"),
                         fontsize=10, loc="left")
        elif panel == "quant":
            quant = quant_error_tags(scalars)
            for tag in quant[:12]:
                series = scalars[tag]
                ax.plot(series.steps, series.values, lw=1.0, label=tag[len(tags.QUANT_LAYER_ERROR) + 1 :])
            more = f" (12 of {len(quant)} layers)" if len(quant) > 12 else ""
            ax.set_title(f"quantization layer error R = ||h~ - h|| / ||h||{more}", fontsize=10, loc="left")
        ax.grid(True, alpha=0.3)
        ax.legend(loc="upper left", fontsize=7)
        ax.set_xlabel("step", fontsize=8)
    starts = [s.steps[0] for s in scalars.values() if s.steps]
    if starts and report.last_step is not None and report.last_step > min(starts):
        for ax in axes:  # one step axis for every panel: the markers line up with the curves below
            ax.set_xlim(min(starts), report.last_step)
    text = fig.add_subplot(grid[len(panels), 0])
    text.axis("off")
    text.text(0.0, 1.0, "\n".join(lines), va="top", ha="left", family="monospace", fontsize=8.5, transform=text.transAxes)
    path = Path(path)
    fig.savefig(path, format="png")
    return path


def write_html(report: StabilityReport, png: Path, path: str | Path) -> Path:
    """An HTML page with the verdict as text and the PNG embedded (a data URL: the page stands alone)."""
    encoded = base64.b64encode(png.read_bytes()).decode("ascii")
    items = "\n".join(f"  <li>{html.escape(line)}</li>" for line in report.verdict())
    page = f"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>Stability report: {html.escape(str(report.run))}</title>
<style>body {{ font-family: sans-serif; margin: 2em; max-width: 1150px; }} li {{ margin: 0.2em 0; }}
img {{ max-width: 100%; border: 1px solid #ccc; }}</style>
</head>
<body>
<h1>Stability report</h1>
<h2>Verdict</h2>
<ul>
{items}
</ul>
<img src="data:image/png;base64,{encoded}" alt="stability report of {html.escape(str(report.run))}">
</body>
</html>
"""
    path = Path(path)
    path.write_text(page, encoding="utf-8")
    return path


def write_report(
    run: str | Path, output: str | Path | None = None, loss_tag: str | None = None
) -> tuple[StabilityReport, Path, Path]:
    """Read ``run`` (a directory with event files), write the PNG and HTML to ``output`` (default: ``run``)."""
    run = Path(run)
    scalars = read_scalars(run)
    report = summarize(scalars, run, loss_tag)
    out = Path(output) if output is not None else run
    out.mkdir(parents=True, exist_ok=True)
    png = plot_report(scalars, report, out / PNG_NAME)
    page = write_html(report, png, out / HTML_NAME)
    return report, png, page


# --------------------------------------------------------------------------- command line
def main(argv: list[str] | None = None) -> int:
    """``lightning-optim report LOGDIR [--run RUN] [--output DIR] [--loss-tag TAG]``; returns the exit status."""
    parser = argparse.ArgumentParser(
        prog="lightning-optim report",
        description="Write a one-page stability report (PNG and HTML) from a run's TensorBoard event files.",
    )
    parser.add_argument("logdir", help="a run directory, a directory above runs (the newest run is used), or an event file")
    parser.add_argument("--run", default=None, help="the run to report, a path relative to LOGDIR (default: the newest)")
    parser.add_argument("-o", "--output", default=None, help="directory for the report files (default: the run's)")
    parser.add_argument("--loss-tag", default=None, help="training-loss tag (default: train/loss or a similar tag)")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)

    logdir = Path(args.logdir)
    if not logdir.exists():
        print(f"lightning-optim report: {logdir} does not exist", file=sys.stderr)
        return 1
    runs = find_runs(logdir / args.run if args.run else logdir)
    if not runs:
        print(f"lightning-optim report: no TensorBoard event files ({_EVENTS}) under {logdir}", file=sys.stderr)
        return 1
    run = runs[0]
    if len(runs) > 1:
        others = ", ".join(str(r.relative_to(logdir)) if r.is_relative_to(logdir) else str(r) for r in runs[1:6])
        print(f"{len(runs)} runs under {logdir}; reporting the newest, {run} (others: {others}; pick one with --run)")
    report, png, page = write_report(run, args.output, args.loss_tag)
    print("\n".join(report.verdict()))
    print(f"Wrote {png} and {page}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
