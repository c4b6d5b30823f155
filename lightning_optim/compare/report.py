"""The comparison's results: ``results.json``, ``results.md`` and the PNG plots.

Per optimizer, its best point (lr, weight decay) is the one with the lowest mean final validation loss over
the seeds; from it come the final loss and its spread, the validation curve (mean over seeds), the median
step time and the optimizer-state bytes. The speed-up is the reference's steps to reach its own final loss
divided by the optimizer's steps to reach that loss, both read off the validation curves with linear
interpolation between logged points ("not reached" when the curve never gets there).
"""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lightning_optim.compare.sweep import OptimizerState, PointScore, Sweep, _canonical_name

__all__ = ["summarize", "steps_to_reach", "write_report", "markdown", "plot_loss_curves", "plot_lr_sensitivity"]


def steps_to_reach(curve: Sequence[Sequence[float]], target: float) -> float | None:
    """The first step at which ``curve`` ([step, loss] pairs) is at or below ``target``, linearly
    interpolated between the two logged points around the crossing; None when it never gets there."""
    previous: Sequence[float] | None = None
    target = target + 1e-9 * abs(target)  # the reference's own final point reaches its final loss
    for step, loss in curve:
        if math.isfinite(loss) and loss <= target:
            if previous is None or not math.isfinite(previous[1]) or previous[1] <= loss:
                return float(step)
            s0, l0 = previous
            return float(s0 + (l0 - target) / (l0 - loss) * (step - s0))
        previous = (step, loss)
    return None


def _mean_curve(curves: Sequence[Sequence[Sequence[float]]]) -> list[list[float]]:
    """Mean over seeds at the steps every seed logged."""
    if not curves:
        return []
    common = set.intersection(*({int(s) for s, _ in c} for c in curves))
    by_step = [{int(s): v for s, v in c} for c in curves]
    return [[step, statistics.fmean(d[step] for d in by_step)] for step in sorted(common)]


def _median(values: Sequence[float | None]) -> float | None:
    found = [v for v in values if isinstance(v, (int, float))]
    return statistics.median(found) if found else None


def _optimizer_summary(sweep: Sweep, state: OptimizerState) -> dict[str, Any]:
    s = sweep.settings
    cand = state.candidate
    records = sweep.records
    counts = {"ok": 0, "diverged": 0, "failed": 0, "pending": 0}
    sensitivity = []
    for j in range(state.lo, state.hi + 1):
        lr = state.lr(j, s)
        score: PointScore = state.scores[j]
        sensitivity.append(
            {"lr": lr, "status": score.status, "final_loss": score.mean, "weight_decay": score.weight_decay}
        )
        for wd in cand.weight_decays:
            for key in state.point_scores[(j, wd)].keys:
                rec = records.get(key)
                counts[rec["status"] if rec else "pending"] += 1
    summary: dict[str, Any] = {
        "optimizer": cand.name,
        "class_path": cand.class_path,
        "center_lr": cand.center_lr,
        "weight_decays": cand.weight_decays,
        "init_args": cand.init_args,
        "complete": state.done,
        "edge": state.edge,
        "runs": counts,
        "sensitivity": sensitivity,
        "best": None,
    }
    if state.best is None:
        return summary
    score = state.scores[state.best]
    best_records = [records[k] for k in score.keys]
    summary["best"] = {
        "lr": state.lr(state.best, s),
        "weight_decay": score.weight_decay,
        "final_loss": score.mean,
        "final_loss_std": score.std,
        "final_loss_min": score.low,
        "final_loss_max": score.high,
        "seeds": [r["seed"] for r in best_records],
        "curve": _mean_curve([r["curve"] for r in best_records]),
        "curves": [r["curve"] for r in best_records],
        "step_time_s": _median([r.get("step_time_s") for r in best_records]),
        "optimizer_time_s": _median([r.get("optimizer_time_s") for r in best_records]),
        "state_bytes": max((r.get("state_bytes") or 0) for r in best_records),
        "keys": score.keys,
    }
    return summary


def _environment() -> dict[str, Any]:
    """Where the report was written: versions, device, CPU count, date (timings only compare within one)."""
    import datetime
    import os
    import platform
    from importlib.metadata import version

    import torch

    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else (platform.processor() or "cpu")
    return {
        "torch": torch.__version__,
        "lightning": version("lightning"),
        "python": platform.python_version(),
        "device": device,
        "cpus": os.cpu_count(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def summarize(sweep: Sweep, complete: bool) -> dict[str, Any]:
    """Everything ``results.json`` holds: the settings, one summary per optimizer, every run."""
    s = sweep.settings
    states = sweep.states()
    summaries = [_optimizer_summary(sweep, st) for st in states]
    names = [x["optimizer"] for x in summaries]
    if s.reference is not None:
        reference = next(n for n in names if _canonical_name(n) == _canonical_name(s.reference))
    else:
        reference = next((n for n in names if n.lower() == "adamw"), names[0])
    ref = next(x for x in summaries if x["optimizer"] == reference)
    target = ref["best"]["final_loss"] if ref["best"] else None
    ref_steps = steps_to_reach(ref["best"]["curve"], target) if ref["best"] else None
    for x in summaries:
        x["steps_to_reference"] = x["speedup"] = None
        if x["best"] is None or target is None or ref_steps is None:
            continue
        steps = steps_to_reach(x["best"]["curve"], target)
        x["steps_to_reference"] = steps
        x["speedup"] = ref_steps / steps if steps else None
    keys = {k for st in states for sc in st.point_scores.values() for k in sc.keys}
    runs = sorted(
        (r for k, r in sweep.records.items() if k in keys),
        key=lambda r: (r["optimizer"], r["lr"], str(r["weight_decay"]), r["seed"]),
    )
    return {
        "settings": s.to_json(),
        "environment": _environment(),
        "config_hash": sweep.hash,
        "complete": complete,
        "reference": {"optimizer": reference, "final_loss": target, "steps": ref_steps},
        "optimizers": summaries,
        "runs": runs,
    }


def _fmt(value: float | None, spec: str = ".4f") -> str:
    return "-" if value is None else format(value, spec)


def markdown(results: dict[str, Any]) -> str:
    """``results.md``: the settings, the ranking table, the lr sensitivity, notes."""
    s = results["settings"]
    ref = results["reference"]
    monitor = s["monitor"]
    seeds = s["seeds"]
    decay = {"cosine": "cosine decay", "linear": "linear decay", "constant": "constant lr"}[s["schedule"]]
    wd_text = ", ".join(f"{w:g}" for w in s["wd_grid"]) if s["wd_sweep"] else "the optimizer default"
    if s["wd_sweep"] and s.get("wd_grids"):
        wd_text += " (" + "; ".join(f"{k}: {', '.join(f'{w:g}' for w in v)}" for k, v in s["wd_grids"].items()) + ")"
    lines = [
        "# Optimizer comparison",
        "",
        f"- config: `{s['config_path']}` (hash `{results['config_hash']}`); budget **{s['budget']} steps**, "
        f"every optimizer compared at the last step's `{monitor}`",
        f"- schedule: {s['warmup_steps']} warm-up step{'' if s['warmup_steps'] == 1 else 's'}, then {decay}"
        + (f" to {s['final_lr_fraction']:g} x lr" if s["schedule"] != "constant" else "")
        + f"; validation every {s['val_every']} steps; seeds {', '.join(map(str, seeds))}",
        f"- lr grid: {s['lr_grid_points']} points x {s['lr_grid_factor']:.4g} around each default, widened up to "
        f"{s['max_widen']} per side; weight decay {wd_text} "
        "(where it matters)",
        f"- reference: **{ref['optimizer']}** (final {monitor} {_fmt(ref['final_loss'])})",
    ]
    if not results["complete"]:
        lines.append("- **incomplete sweep** (stopped by --max-runs): rerun the same command to finish it")
    spread = "min - max" if len(seeds) > 1 else "seeds"
    lines += [
        "",
        f"| optimizer | best lr | wd | final {monitor} | {spread} | steps to {ref['optimizer']}'s loss | speed-up "
        "| step (ms) | optimizer step (ms) | state (MiB) | runs ok / diverged |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    ranked = sorted(
        results["optimizers"], key=lambda x: (x["best"] is None, x["best"]["final_loss"] if x["best"] else 0)
    )
    notes = []
    for x in ranked:
        runs = f"{x['runs']['ok']} / {x['runs']['diverged']}"
        runs += f" (+{x['runs']['failed']} failed)" if x["runs"]["failed"] else ""
        runs += f" (+{x['runs']['pending']} pending)" if x["runs"]["pending"] else ""
        b = x["best"]
        if b is None:
            lines.append(f"| {x['optimizer']} | - | - | no finished run | | | | | | | {runs} |")
            continue
        wd = "default" if b["weight_decay"] is None else f"{b['weight_decay']:g}"
        if len(seeds) > 1:
            spread_text = f"{_fmt(b['final_loss_min'])} - {_fmt(b['final_loss_max'])} (std {_fmt(b['final_loss_std'])})"
        else:
            spread_text = "1"
        steps = "not reached" if x["steps_to_reference"] is None else f"{x['steps_to_reference']:.0f}"
        speedup = "-" if x["speedup"] is None else f"{x['speedup']:.2f}x"
        ms = lambda v: _fmt(None if v is None else 1e3 * v, ".2f")  # noqa: E731
        edge = " (edge)" if x["edge"] else ""
        lines.append(
            f"| {x['optimizer']} | {b['lr']:.3g}{edge} | {wd} | {_fmt(b['final_loss'])} | {spread_text} | {steps} | "
            f"{speedup} | {ms(b['step_time_s'])} | {ms(b['optimizer_time_s'])} | {b['state_bytes'] / 2**20:.3f} "
            f"| {runs} |"
        )
        if x["edge"]:
            notes.append(
                f"- {x['optimizer']}: the best lr is the {x['edge']} edge of the grid after {s['max_widen']} extra "
                "points: raise --max-widen (or --lr-grid-factor) to find its optimum."
            )
    lines += ["", f"## Learning-rate sensitivity (final {monitor} at the best weight decay of each lr)", ""]
    for x in results["optimizers"]:
        best_lr = x["best"]["lr"] if x["best"] else None
        cells = []
        for point in x["sensitivity"]:
            value = _fmt(point["final_loss"]) if point["status"] == "ok" else point["status"]
            cell = f"{point['lr']:.3g}: {value}"
            cells.append(f"**{cell}**" if point["lr"] == best_lr else cell)
        lines.append(f"- {x['optimizer']}: " + " · ".join(cells))
    for status in ("diverged", "failed"):
        found = [r for r in results["runs"] if r["status"] == status]
        if found:
            lines += ["", f"## {status.capitalize()} runs", ""]
            lines += [
                f"- {r['optimizer']} lr={r['lr']:g} wd={r['weight_decay']} seed={r['seed']}: {r.get('reason')}"
                for r in found[:50]
            ]
    if notes:
        lines += ["", "## Notes", "", *notes]
    lines += [
        "",
        "Step times are medians of the whole training step (forward, backward, optimizer) and of the optimizer "
        "part alone, measured on the machine that ran the sweep; state is the bytes of the optimizer's state "
        "tensors after training. See docs/compare.md for how to read this table.",
        "",
    ]
    return "\n".join(lines)


def _figure() -> Any:
    from matplotlib.figure import Figure  # lazily: matplotlib only for the plots

    fig = Figure(figsize=(7.0, 4.5), dpi=100)
    return fig, fig.add_subplot(1, 1, 1)


def plot_loss_curves(results: dict[str, Any], path: Path) -> None:
    """Validation curves of each optimizer's best run (mean over seeds, min-max band), reference loss dashed."""
    fig, ax = _figure()
    monitor = results["settings"]["monitor"]
    for x in results["optimizers"]:
        b = x["best"]
        if not b or not b["curve"]:
            continue
        steps = [p[0] for p in b["curve"]]
        (line,) = ax.plot(steps, [p[1] for p in b["curve"]], marker=".", label=f"{x['optimizer']} (lr {b['lr']:.3g})")
        if len(b["curves"]) > 1:
            per_step = [[dict((int(s), v) for s, v in c).get(int(step)) for c in b["curves"]] for step in steps]
            ax.fill_between(
                steps, [min(v) for v in per_step], [max(v) for v in per_step], color=line.get_color(), alpha=0.2
            )
    target = results["reference"]["final_loss"]
    if target is not None:
        ax.axhline(
            target, color="gray", linestyle="--", linewidth=1, label=f"{results['reference']['optimizer']} final"
        )
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(f"validation {monitor}")
    ax.set_title(f"Best-lr validation curves ({results['settings']['budget']}-step budget)")
    ax.grid(True, alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path)


def plot_lr_sensitivity(results: dict[str, Any], path: Path) -> None:
    """Final validation loss against lr (log x) per optimizer; diverged lrs as crosses along the top."""
    fig, ax = _figure()
    finite = [p["final_loss"] for x in results["optimizers"] for p in x["sensitivity"] if p["status"] == "ok"]
    top = max(finite) * 1.05 if finite else 1.0
    for x in results["optimizers"]:
        ok = [p for p in x["sensitivity"] if p["status"] == "ok"]
        (line,) = ax.plot([p["lr"] for p in ok], [p["final_loss"] for p in ok], marker="o", label=x["optimizer"])
        bad = [p["lr"] for p in x["sensitivity"] if p["status"] == "diverged"]
        if bad:
            ax.scatter(bad, [top] * len(bad), marker="x", color=line.get_color())
    ax.set_xscale("log")
    ax.set_xlabel("learning rate")
    ax.set_ylabel(f"final validation {results['settings']['monitor']}")
    ax.set_title("Learning-rate sensitivity (x: diverged)")
    ax.grid(True, which="both", alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path)


def write_report(sweep: Sweep, complete: bool) -> dict[str, Any]:
    """Write ``results.json``, ``results.md`` and (unless disabled) the two PNGs into the sweep's out dir."""
    results = summarize(sweep, complete)
    out = sweep.out
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    (out / "results.md").write_text(markdown(results))
    if sweep.settings.plots:
        plot_loss_curves(results, out / "loss_curves.png")
        plot_lr_sensitivity(results, out / "lr_sensitivity.png")
    return results
