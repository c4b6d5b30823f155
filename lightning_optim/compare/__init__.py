"""``lightning-optim compare``: a fair optimizer comparison on your own model.

    lightning-optim compare --config my_model.yaml --optimizers AdamW,SPAM,StableSPAM --budget-steps 2000

Every optimizer gets the same budget, the same schedule (linear warm-up + cosine to the end of the
budget), the same data order and seeds, and its own learning-rate sweep (a log grid around its registry
default, widened while the best lr sits on an edge; weight decay too where it matters). They are compared
by the final validation loss at the last step, as Wen et al. (2025, "Fantastic Pretraining Optimizers and
Where to Find Them") recommend. See docs/compare.md.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import Any

__all__ = ["main", "build_parser"]

PROG = "lightning-optim compare"


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _nonnegative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def _finite(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be finite, got {text!r}")
    return value


def _names(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise argparse.ArgumentTypeError("expected a comma-separated list of optimizer names, got nothing")
    return names


def _floats(text: str) -> list[float]:
    values = [_finite(v) for v in text.split(",") if v.strip()]
    if not values:
        raise argparse.ArgumentTypeError("the grid is empty: give at least one value")
    if any(v < 0 for v in values):
        raise argparse.ArgumentTypeError(f"weight decays must be >= 0, got {text!r}")
    return list(dict.fromkeys(values))


def _ints(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values:
        raise argparse.ArgumentTypeError("expected at least one seed")
    return list(dict.fromkeys(values))


def _gpus(text: str) -> str:
    if text in ("auto", "none"):
        return text
    try:
        ids = [int(g) for g in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected 'auto', 'none' or GPU indices such as 0,1 (got {text!r})") from None
    if not ids or any(g < 0 for g in ids):
        raise argparse.ArgumentTypeError(f"GPU indices must be >= 0 (got {text!r})")
    return ",".join(map(str, dict.fromkeys(ids)))


def _name_value(text: str) -> tuple[str, str]:
    name, sep, value = text.partition("=")
    if not sep or not name.strip() or not value.strip():
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE, got {text!r}")
    return name.strip(), value.strip()


def build_parser() -> argparse.ArgumentParser:
    """The ``lightning-optim compare`` argument parser."""
    p = argparse.ArgumentParser(
        prog=PROG,
        description="Compare optimizers fairly on your LightningCLI model: equal budget and schedule, a tuned lr "
        "per optimizer, compared at the end of training.",
        epilog="Outputs in --out: results.json, results.md, loss_curves.png, lr_sensitivity.png, tb/ (TensorBoard), "
        "runs/ (one record per finished run; rerun the same command to resume). See docs/compare.md.",
    )
    p.add_argument("--config", required=True, help="LightningCLI YAML of model + data (+ trainer, param_groups)")
    p.add_argument(
        "--optimizers",
        required=True,
        type=_names,
        help="comma-separated registered names or class paths, or 'all' (every registered optimizer)",
    )
    p.add_argument("--budget-steps", required=True, type=_positive_int, help="optimizer steps per run")
    p.add_argument("--out", default=None, help="output directory (default: compare-<config name>)")
    g = p.add_argument_group("learning-rate and weight-decay grid")
    g.add_argument("--lr-grid-points", type=_positive_int, default=5, help="lrs per optimizer (default 5)")
    g.add_argument(
        "--lr-grid-factor", type=_finite, default=10**0.5, help="ratio of neighbouring lrs (default sqrt(10))"
    )
    g.add_argument(
        "--max-widen",
        type=_nonnegative_int,
        default=2,
        help="extra lrs per side while the best is on an edge (default 2)",
    )
    g.add_argument(
        "--lr-center",
        action="append",
        type=_name_value,
        default=[],
        metavar="NAME=LR",
        help="grid centre (default: the registry's default lr)",
    )
    g.add_argument(
        "--wd-grid", type=_floats, default=[0.0, 0.1], help="weight decays where they matter (default 0,0.1)"
    )
    g.add_argument(
        "--wd-grid-for",
        action="append",
        type=_name_value,
        default=[],
        metavar="NAME=LIST",
        help="one optimizer's weight decays (e.g. Lion=0,1: decoupled decay scales with its smaller lr)",
    )
    g.add_argument(
        "--no-wd-sweep", dest="wd_sweep", action="store_false", help="keep each optimizer's default weight decay"
    )
    g.add_argument(
        "--opt-arg",
        action="append",
        type=_name_value,
        default=[],
        metavar="NAME.ARG=VALUE",
        help="a fixed optimizer argument (YAML value)",
    )
    r = p.add_argument_group("runs")
    r.add_argument("--seeds", type=_ints, default=[0], help="comma-separated seeds (default 0)")
    r.add_argument(
        "--schedule",
        choices=("cosine", "linear", "constant"),
        default="cosine",
        help="decay after the warm-up (default cosine)",
    )
    r.add_argument(
        "--warmup-fraction", type=_finite, default=0.05, help="linear warm-up, fraction of the budget (default 0.05)"
    )
    r.add_argument("--final-lr-fraction", type=_finite, default=0.0, help="lr at the end of the decay / lr (default 0)")
    r.add_argument("--val-every", type=_positive_int, default=None, help="validate every N steps (default budget/20)")
    r.add_argument(
        "--monitor", default="val/loss", help="validation metric compared, lower is better (default val/loss)"
    )
    r.add_argument(
        "--divergence-factor",
        type=_finite,
        default=3.0,
        help="diverged when train loss > this x the first loss (default 3)",
    )
    r.add_argument(
        "--reference", default=None, help="optimizer the speed-ups refer to (default AdamW if listed, else the first)"
    )
    r.add_argument(
        "--max-runs", type=_nonnegative_int, default=None, help="stop after this many new runs (resume later)"
    )
    r.add_argument(
        "--gpus",
        type=_gpus,
        default="auto",
        help="'auto' (all visible; one run per GPU in parallel), 'none' (CPU) or 0,1,...",
    )
    r.add_argument("--subprocess", action="store_true", help="one fresh process per run even on one device")
    r.add_argument(
        "--threads",
        type=_positive_int,
        default=None,
        help="torch.set_num_threads per run (1 is fastest for tiny models on busy CPUs)",
    )
    r.add_argument("--no-tensorboard", dest="tensorboard", action="store_false", help="no TensorBoard logs")
    r.add_argument("--no-plots", dest="plots", action="store_false", help="no PNG plots")
    r.add_argument("--dry-run", action="store_true", help="print the plan (optimizers, grids, number of runs) and exit")
    return p


def _load_config(path: str) -> dict[str, Any]:
    import yaml

    from lightning_optim.compare.sweep import SweepError

    file = Path(path)
    if not file.is_file():
        raise SweepError(f"--config {path}: no such file.")
    try:
        config = yaml.safe_load(file.read_text())
    except yaml.YAMLError as error:
        raise SweepError(f"--config {path} is not valid YAML: {error}") from None
    if not isinstance(config, dict) or "model" not in config:
        raise SweepError(f"--config {path} must be a LightningCLI config mapping with a `model:` section.")
    return config


def _all_optimizers() -> list[str]:
    """``--optimizers all``: every registered optimizer, AdamW first (the second-order ones run with the
    ``HessianEstimator`` callback, which the runner adds)."""
    from lightning_optim import registry

    names = [e.name for e in registry.optimizers()]
    return sorted(names, key=lambda n: n.lower() != "adamw")


def _settings(args: argparse.Namespace, argv: list[str] | None = None) -> Any:
    import yaml

    from lightning_optim.compare.sweep import Settings, SweepError

    if args.lr_grid_factor <= 1:
        raise SweepError(f"--lr-grid-factor must be > 1, got {args.lr_grid_factor:g}.")
    if not 0 <= args.warmup_fraction < 1:
        raise SweepError(f"--warmup-fraction must be in [0, 1), got {args.warmup_fraction:g}.")
    if not 0 <= args.final_lr_fraction <= 1:
        raise SweepError(f"--final-lr-fraction must be in [0, 1], got {args.final_lr_fraction:g}.")
    if args.divergence_factor <= 1:
        raise SweepError(f"--divergence-factor must be > 1, got {args.divergence_factor:g}.")
    if args.val_every is not None and args.val_every > args.budget_steps:
        raise SweepError(f"--val-every {args.val_every} exceeds --budget-steps {args.budget_steps}.")
    centers: dict[str, float] = {}
    for name, value in args.lr_center:
        try:
            lr = _finite(value)
        except argparse.ArgumentTypeError as error:
            raise SweepError(f"--lr-center {name}={value}: {error}.") from None
        if lr <= 0:
            raise SweepError(f"--lr-center {name}={value}: the lr must be > 0.")
        centers[name] = lr
    wd_grids: dict[str, list[float]] = {}
    for name, value in args.wd_grid_for:
        try:
            wd_grids[name] = _floats(value)
        except argparse.ArgumentTypeError as error:
            raise SweepError(f"--wd-grid-for {name}={value}: {error}.") from None
    opt_args: dict[str, dict[str, Any]] = {}
    for target, value in args.opt_arg:
        name, dot, key = target.rpartition(".")
        if not dot or not name or not key:
            raise SweepError(f"--opt-arg {target}={value}: expected NAME.ARG=VALUE, e.g. SPAM.warmup_steps=20.")
        try:
            opt_args.setdefault(name, {})[key] = yaml.safe_load(value)
        except yaml.YAMLError as error:
            raise SweepError(f"--opt-arg {target}={value}: not a YAML value ({error}).") from None
    optimizers = list(args.optimizers)
    if [n.lower() for n in optimizers] == ["all"]:
        optimizers = _all_optimizers()
    config = _load_config(args.config)
    out = args.out or f"compare-{Path(args.config).stem}"
    return Settings(
        config_path=args.config,
        config=config,
        optimizers=optimizers,
        budget=args.budget_steps,
        out=out,
        lr_grid_points=args.lr_grid_points,
        lr_grid_factor=args.lr_grid_factor,
        max_widen=args.max_widen,
        lr_centers=centers,
        wd_grid=args.wd_grid,
        wd_grids=wd_grids,
        wd_sweep=args.wd_sweep,
        seeds=args.seeds,
        schedule=args.schedule,
        warmup_fraction=args.warmup_fraction,
        final_lr_fraction=args.final_lr_fraction,
        val_every=args.val_every,
        monitor=args.monitor,
        divergence_factor=args.divergence_factor,
        reference=args.reference,
        opt_args=opt_args,
        max_runs=args.max_runs,
        gpus=args.gpus,
        subprocess=args.subprocess,
        threads=args.threads,
        tensorboard=args.tensorboard,
        plots=args.plots,
        command=[PROG, *(argv or [])],
    )


def _plan(sweep: Any) -> str:
    s = sweep.settings
    lines = [f"{PROG}: {len(sweep.candidates)} optimizers, budget {s.budget} steps, seeds {s.seeds}, out {s.out}"]
    total = 0
    for c in sweep.candidates:
        from lightning_optim.compare.sweep import lr_at

        lrs = [lr_at(c.center_lr, s.lr_grid_factor, s.lr_grid_points, j) for j in range(s.lr_grid_points)]
        wds = ["default" if w is None else f"{w:g}" for w in c.weight_decays]
        n = len(lrs) * len(wds) * len(s.seeds)
        total += n
        done = sum(
            1 for st in [sweep.state(c)] for sc in st.point_scores.values() for k in sc.keys if k in sweep.records
        )
        lines.append(
            f"  {c.name}: lr {', '.join(f'{x:.3g}' for x in lrs)} x wd {', '.join(wds)}: {n} runs ({done} done)"
        )
    per = max(len(c.weight_decays) for c in sweep.candidates) * len(s.seeds)
    extra = 2 * s.max_widen * sum(len(c.weight_decays) for c in sweep.candidates) * len(s.seeds)
    lines.append(f"  total: {total} runs on the initial grids, at most {extra} more from widening ({per} per extra lr)")
    return "\n".join(lines)


def main(argv: list[str] | None = None, *, runner: Any = None) -> int:
    """Run ``lightning-optim compare`` with ``argv`` (without the ``compare`` word); returns the exit status.

    Args:
        argv: the command-line arguments (default ``sys.argv[1:]``).
        runner: replaces the run of one spec (tests inject a fake objective of the lr; see
            :class:`~lightning_optim.compare.sweep.Sweep`).
    """
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # argparse already printed usage and the error
        return int(exit_.code or 0)

    from lightning_optim.compare.report import markdown, write_report
    from lightning_optim.compare.runner import ConfigError
    from lightning_optim.compare.sweep import Sweep, SweepError

    try:
        sweep = Sweep(_settings(args, argv), runner=runner)
        if args.dry_run:
            print(_plan(sweep))
            return 0
        complete = sweep.run()
    except (SweepError, ConfigError) as error:
        print(f"{PROG}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(
            f"\n{PROG}: interrupted; the finished runs are saved, rerun the same command to continue.", file=sys.stderr
        )
        return 130
    results = write_report(sweep, complete)
    table = markdown(results)
    print(table.split("\n## ")[0].rstrip())
    where = f"\nresults: {sweep.out / 'results.md'}, {sweep.out / 'results.json'}"
    print(where + (f"; TensorBoard: tensorboard --logdir {sweep.out / 'tb'}" if args.tensorboard else ""))
    if not complete:
        print(f"stopped after {sweep.executed} runs (--max-runs); rerun the same command to continue.")
    elif all(x["best"] is None for x in results["optimizers"]):
        print(f"{PROG}: no optimizer finished a run without diverging or failing (see results.md).", file=sys.stderr)
        return 1
    return 0
