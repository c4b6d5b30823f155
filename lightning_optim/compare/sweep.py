"""The sweep: which runs a comparison needs, edge-widening of the lr grid, resumable run bookkeeping.

Per optimizer the lr grid is a geometric lattice around a centre c (the registry's ``default_lr``):
lr_j = c · factor^(j − (points − 1)/2) for j = 0 .. points − 1, crossed with a weight-decay grid (where the
registry says weight decay matters) and the seeds. A point (lr, wd) scores the mean final validation loss
over its seeds, if every seed finished without diverging; an lr scores its best weight decay. While the
best lr is the lowest (highest) grid point, one more point j − 1 (j + 1) is added on that side, up to
``max_widen`` per side; a diverged or failed point is never best. When every lr diverged the grid grows
downwards. The state is recomputed from the finished records each time, so an interrupted sweep resumes
exactly where it stopped and a finished run is never repeated (records are keyed by
:func:`~lightning_optim.compare.runner.run_key`).
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import json
import os
import queue
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lightning_optim.compare.runner import ConfigError, Runner, RunRecord, RunSpec, run_one

__all__ = [
    "SweepError",
    "Settings",
    "Candidate",
    "PointScore",
    "OptimizerState",
    "Sweep",
    "resolve_candidate",
    "config_hash",
    "lr_at",
]


class SweepError(ValueError):
    """A bad argument or config: the command reports it and exits with status 2."""


def _sig(value: float) -> float:
    """``value`` rounded to 6 significant digits (stable run keys, readable names)."""
    return float(f"{value:.6g}")


def lr_at(center: float, factor: float, points: int, j: int) -> float:
    """The j-th lr of the lattice: center · factor^(j − (points − 1)/2), 6 significant digits."""
    return _sig(center * factor ** (j - (points - 1) / 2))


@dataclass
class Settings:
    """The sweep's options (the command-line flags of ``lightning-optim compare``)."""

    config_path: str
    config: dict[str, Any]
    optimizers: list[str]
    budget: int
    out: str
    lr_grid_points: int = 5
    lr_grid_factor: float = 10**0.5
    max_widen: int = 2
    lr_centers: dict[str, float] = field(default_factory=dict)
    wd_grid: list[float] = field(default_factory=lambda: [0.0, 0.1])
    wd_grids: dict[str, list[float]] = field(default_factory=dict)
    wd_sweep: bool = True
    seeds: list[int] = field(default_factory=lambda: [0])
    schedule: str = "cosine"
    warmup_fraction: float = 0.05
    final_lr_fraction: float = 0.0
    val_every: int | None = None
    monitor: str = "val/loss"
    divergence_factor: float = 3.0
    reference: str | None = None
    opt_args: dict[str, dict[str, Any]] = field(default_factory=dict)
    max_runs: int | None = None
    gpus: str = "auto"
    subprocess: bool = False
    threads: int | None = None
    tensorboard: bool = True
    plots: bool = True
    command: list[str] = field(default_factory=list)

    @property
    def warmup_steps(self) -> int:
        return int(round(self.warmup_fraction * self.budget))

    @property
    def validate_every(self) -> int:
        return self.val_every if self.val_every is not None else max(1, self.budget // 20)

    def result_settings(self) -> dict[str, Any]:
        """The settings besides the config that change a run's result (hashed into its key)."""
        return {
            "schedule": self.schedule,
            "warmup_steps": self.warmup_steps,
            "final_lr_fraction": self.final_lr_fraction,
            "val_every": self.validate_every,
            "monitor": self.monitor,
            "divergence_factor": self.divergence_factor,
        }

    def to_json(self) -> dict[str, Any]:
        data = {k: v for k, v in self.__dict__.items() if k != "config"}
        return {**data, "warmup_steps": self.warmup_steps, "val_every": self.validate_every}


def config_hash(config: Mapping[str, Any], settings: Mapping[str, Any]) -> str:
    """12 hex digits of SHA-256 over the config (as parsed: comments and key order do not count) and the
    result-changing sweep settings."""
    text = json.dumps({"config": config, "settings": settings}, sort_keys=True, default=repr)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


# ---------------------------------------------------------------------------------------------------------
# Candidates


@dataclass
class Candidate:
    """One optimizer of the comparison, resolved."""

    name: str
    class_path: str
    center_lr: float
    weight_decays: list[float | None]
    init_args: dict[str, Any]
    registered: bool


def _import_class(path: str) -> type:
    module_name, _, attr = path.rpartition(".")
    if not module_name:
        raise ImportError(path)
    module = importlib.import_module(module_name)
    obj = module
    for part in attr.split("."):
        obj = getattr(obj, part)
    if not isinstance(obj, type):
        raise ImportError(f"{path} is not a class")
    return obj


def resolve_candidate(name: str, settings: Settings) -> Candidate:
    """A registered optimizer name or alias, or an optimizer class path, with its grid centre and wd grid.

    Raises:
        SweepError: unknown name (the message lists the registered names), no lr to centre on, or a
            weight-decay grid for an optimizer without a ``weight_decay`` argument.
    """
    import torch

    from lightning_optim import registry

    try:
        info = registry.get(name)
        cls = info.cls
    except ValueError as error:
        if "." not in name:
            raise SweepError(f"{error} Or give an optimizer class path such as torch.optim.SGD.") from None
        try:
            cls = _import_class(name)
        except (ImportError, AttributeError) as import_error:
            raise SweepError(f"Cannot import optimizer class {name!r}: {import_error}. {error}") from None
        if not issubclass(cls, torch.optim.Optimizer):
            raise SweepError(f"{name!r} is not a torch.optim.Optimizer subclass.") from None
        info = registry.info_for(cls)
    display = info.name if info is not None and info.cls is cls else cls.__name__
    signature = inspect.signature(cls.__init__).parameters
    defaults = {k: p.default for k, p in signature.items() if p.default is not inspect.Parameter.empty}

    center = _lookup(settings.lr_centers, name, display)
    if center is None:
        if info is not None and info.cls is cls:
            center = info.default_lr
        elif isinstance(defaults.get("lr"), (int, float)) and not isinstance(defaults.get("lr"), bool):
            center = float(defaults["lr"])
    if center is None or not center > 0:
        raise SweepError(f"{display} has no default lr to centre the grid on; give one with --lr-center {display}=LR.")

    init_args = dict(_lookup(settings.opt_args, name, display) or {})
    total_steps_arg = info.total_steps_arg if info is not None else None
    if total_steps_arg is not None:
        init_args.setdefault(total_steps_arg, settings.budget)
    for key in ("lr", "weight_decay"):
        if key in init_args:
            raise SweepError(f"--opt-arg {display}.{key}: {key} is swept; use --lr-center / --wd-grid instead.")
    accepts_wd = "weight_decay" in signature
    matters = info.weight_decay_matters if info is not None else True
    own_grid = _lookup(settings.wd_grids, name, display)
    if own_grid is not None and not accepts_wd:
        raise SweepError(f"--wd-grid-for {display}: {display} has no weight_decay argument.")
    grid = own_grid if own_grid is not None else settings.wd_grid
    # an explicit --wd-grid-for wins over the registry's weight_decay_matters
    sweep_wd = settings.wd_sweep and accepts_wd and (matters or own_grid is not None)
    weight_decays: list[float | None] = list(grid) if sweep_wd else [None]
    return Candidate(
        display, f"{cls.__module__}.{cls.__qualname__}", float(center), weight_decays, init_args, info is not None
    )


def _canonical_name(name: str) -> str:
    """A registry alias as its entry's name (``stable_spam`` -> ``stablespam``), lower-case."""
    from lightning_optim import registry

    try:
        return registry.get(name).name.lower()
    except ValueError:
        return name.lower()


def _lookup(table: Mapping[str, Any], *names: str) -> Any:
    """``table``'s value for the first of ``names`` it holds (case-insensitive, aliases resolved)."""
    lowered = {_canonical_name(k): v for k, v in table.items()}
    for n in names:
        if _canonical_name(n) in lowered:
            return lowered[_canonical_name(n)]
    return None


# ---------------------------------------------------------------------------------------------------------
# Scores and the widening state machine


@dataclass
class PointScore:
    """The result of one grid point (an lr, or an lr with one weight decay), aggregated over seeds."""

    status: str  # "ok", "pending", "diverged" or "failed"
    mean: float | None = None
    std: float | None = None
    low: float | None = None
    high: float | None = None
    weight_decay: float | None = None
    keys: list[str] = field(default_factory=list)


def _aggregate(records: Sequence[RunRecord | None], weight_decay: float | None, keys: list[str]) -> PointScore:
    if any(r is None for r in records):
        return PointScore("pending", weight_decay=weight_decay, keys=keys)
    statuses = {r["status"] for r in records}
    if "diverged" in statuses:
        return PointScore("diverged", weight_decay=weight_decay, keys=keys)
    if statuses != {"ok"}:
        return PointScore("failed", weight_decay=weight_decay, keys=keys)
    losses = [float(r["final_loss"]) for r in records]
    std = statistics.stdev(losses) if len(losses) > 1 else 0.0
    return PointScore("ok", statistics.fmean(losses), std, min(losses), max(losses), weight_decay, keys)


@dataclass
class OptimizerState:
    """Where one optimizer's sweep stands: its lr index range, and (when done) its best point."""

    candidate: Candidate
    lo: int
    hi: int
    done: bool
    pending: list[RunSpec]
    scores: dict[int, PointScore]  # per lr index: its best weight decay
    point_scores: dict[tuple[int, float | None], PointScore]
    best: int | None
    edge: str | None  # "low" / "high": best on an edge that --max-widen did not let grow

    def lr(self, j: int, settings: Settings) -> float:
        return lr_at(self.candidate.center_lr, settings.lr_grid_factor, settings.lr_grid_points, j)


class Sweep:
    """All runs of a comparison, their records under ``out/runs``, and the execution of the missing ones.

    Args:
        settings: the options.
        runner: runs one spec in-process (default :func:`~lightning_optim.compare.runner.run_one`; tests
            inject a fake objective of the lr). Only the default runner runs in worker processes.
        log: where progress lines go (default: print to stdout).
    """

    def __init__(
        self, settings: Settings, runner: Runner | None = None, log: Callable[[str], None] | None = None
    ) -> None:
        self.settings = settings
        self.runner = runner or run_one
        self.log = log or (lambda line: print(line, flush=True))
        self.out = Path(settings.out)
        self.runs_dir = self.out / "runs"
        self.hash = config_hash(settings.config, settings.result_settings())
        self.candidates = [resolve_candidate(name, settings) for name in settings.optimizers]
        names = [c.name for c in self.candidates]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise SweepError(f"Optimizer(s) listed twice: {', '.join(duplicates)}.")
        named = (*settings.opt_args, *settings.lr_centers, *settings.wd_grids)
        unknown = [k for k in named if _lookup({n: 1 for n in names}, k) is None]
        if unknown:
            raise SweepError(
                f"--opt-arg/--lr-center/--wd-grid-for name(s) {', '.join(sorted(set(unknown)))} are not in "
                f"--optimizers ({', '.join(names)})."
            )
        if settings.reference is not None and _lookup({n: 1 for n in names}, settings.reference) is None:
            raise SweepError(f"--reference {settings.reference} is not in --optimizers ({', '.join(names)}).")
        self.records: dict[str, RunRecord] = self._load_records()
        self.executed = 0

    # -- records --------------------------------------------------------------------------------------
    def _load_records(self) -> dict[str, RunRecord]:
        records: dict[str, RunRecord] = {}
        if not self.runs_dir.is_dir():
            return records
        for path in sorted(self.runs_dir.glob("*.json")):
            try:
                record = json.loads(path.read_text())
            except (OSError, json.JSONDecodeError):
                continue  # a torn file (cannot happen with the atomic writes below, but a user may edit)
            if isinstance(record, dict) and record.get("status") in ("ok", "diverged") and "key" in record:
                records[record["key"]] = record  # failed runs are tried again
        return records

    def record_path(self, spec: RunSpec) -> Path:
        wd = "default" if spec.weight_decay is None else f"{spec.weight_decay:g}"
        return self.runs_dir / f"{spec.optimizer}_lr={spec.lr:g}_wd={wd}_seed={spec.seed}_{spec.key}.json"

    def _save(self, spec: RunSpec, record: RunRecord) -> RunRecord:
        full = {
            "key": spec.key,
            "optimizer": spec.optimizer,
            "class_path": spec.class_path,
            "lr": spec.lr,
            "weight_decay": spec.weight_decay,
            "seed": spec.seed,
            "budget": spec.budget,
            "config_hash": spec.config_hash,
            "init_args": spec.init_args,
            "schedule": {
                "decay": spec.schedule,
                "warmup_steps": spec.warmup_steps,
                "final_lr_fraction": spec.final_lr_fraction,
            },
            "tensorboard": str(Path(spec.tb_dir) / spec.tb_name / spec.tb_version) if spec.tb_dir else None,
            **record,
        }
        self.runs_dir.mkdir(parents=True, exist_ok=True)
        path = self.record_path(spec)
        fd, tmp = tempfile.mkstemp(dir=self.runs_dir, suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            json.dump(full, f, indent=1)
        os.replace(tmp, path)  # atomic: an interrupted sweep never leaves half a record
        self.records[spec.key] = full  # failed ones too: not retried in this invocation (a rerun retries them)
        return full

    # -- specs ----------------------------------------------------------------------------------------
    def spec(self, candidate: Candidate, lr: float, weight_decay: float | None, seed: int) -> RunSpec:
        s = self.settings
        version = f"lr={lr:g},wd={'default' if weight_decay is None else f'{weight_decay:g}'}"
        if len(s.seeds) > 1:
            version += f",seed={seed}"
        return RunSpec(
            optimizer=candidate.name,
            class_path=candidate.class_path,
            lr=lr,
            weight_decay=weight_decay,
            seed=seed,
            budget=s.budget,
            config=s.config,
            config_hash=self.hash,
            init_args=candidate.init_args,
            schedule=s.schedule,
            warmup_steps=s.warmup_steps,
            final_lr_fraction=s.final_lr_fraction,
            val_every=s.validate_every,
            monitor=s.monitor,
            divergence_factor=s.divergence_factor,
            tb_dir=str(self.out / "tb") if s.tensorboard else None,
            tb_name=candidate.name,
            tb_version=version,
            force_cpu=s.gpus == "none",
            threads=s.threads,
        )

    def state(self, candidate: Candidate) -> OptimizerState:
        """Replay the widening from the records: the current range, what is missing, the best point."""
        s = self.settings
        lo, hi = 0, s.lr_grid_points - 1
        while True:
            pending: list[RunSpec] = []
            scores: dict[int, PointScore] = {}
            point_scores: dict[tuple[int, float | None], PointScore] = {}
            for j in range(lo, hi + 1):
                lr = lr_at(candidate.center_lr, s.lr_grid_factor, s.lr_grid_points, j)
                per_wd = []
                for wd in candidate.weight_decays:
                    specs = [self.spec(candidate, lr, wd, seed) for seed in s.seeds]
                    found = [self.records.get(sp.key) for sp in specs]
                    pending += [sp for sp, r in zip(specs, found, strict=True) if r is None]
                    score = _aggregate(found, wd, [sp.key for sp in specs])
                    point_scores[(j, wd)] = score
                    per_wd.append(score)
                scores[j] = _best_of(per_wd)
            if pending:
                return OptimizerState(candidate, lo, hi, False, pending, scores, point_scores, None, None)
            ok = [j for j in range(lo, hi + 1) if scores[j].status == "ok"]
            can_low, can_high = -lo < s.max_widen, hi - (s.lr_grid_points - 1) < s.max_widen
            if not ok:
                if can_low and all(scores[j].status == "diverged" for j in scores):
                    lo -= 1
                    continue
                return OptimizerState(candidate, lo, hi, True, [], scores, point_scores, None, None)
            best = min(ok, key=lambda j: (scores[j].mean, j))
            if best == lo and can_low:
                lo -= 1
            elif best == hi and can_high:
                hi += 1
            else:  # interior, or on an edge that may not grow any more
                edge = "low" if best == lo else "high" if best == hi else None
                return OptimizerState(candidate, lo, hi, True, [], scores, point_scores, best, edge)

    def states(self) -> list[OptimizerState]:
        return [self.state(c) for c in self.candidates]

    # -- execution ------------------------------------------------------------------------------------
    def devices(self) -> list[int]:
        """CUDA device indices to run on (empty: the CPU, or the config's accelerator in-process)."""
        gpus = self.settings.gpus
        if gpus == "none":
            return []
        if gpus == "auto":
            import torch

            return list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
        return [int(g) for g in gpus.split(",")]

    def run(self) -> bool:
        """Run the missing runs, round by round (widening adds rounds). True when the sweep is complete,
        False when ``max_runs`` stopped it first."""
        devices = self.devices()
        parallel = self.runner is run_one and (len(devices) > 1 or self.settings.subprocess)
        while True:
            pending = [spec for st in self.states() for spec in st.pending]
            if not pending:
                return True
            if self.settings.max_runs is not None:
                left = self.settings.max_runs - self.executed
                if left <= 0:
                    return False
                pending = pending[:left]
            if parallel:
                self._run_parallel(pending, devices)
            else:
                device = devices[0] if len(devices) == 1 and self.settings.gpus not in ("auto", "none") else None
                for spec in pending:
                    spec.device = device
                    self._finish(spec, self.runner(spec))

    def _finish(self, spec: RunSpec, record: RunRecord) -> None:
        if record.get("config_error"):
            raise ConfigError(record["config_error"])
        self.executed += 1
        full = self._save(spec, record)
        loss = full.get("final_loss")
        result = (
            f"{self.settings.monitor} {loss:.4f}"
            if full["status"] == "ok" and loss is not None
            else full.get("reason") or ""
        )
        wd = "default" if spec.weight_decay is None else f"{spec.weight_decay:g}"
        wall = full.get("wall_s")
        timing = f" ({wall:.1f} s)" if isinstance(wall, (int, float)) else ""
        what = f"{spec.optimizer} lr={spec.lr:g} wd={wd} seed={spec.seed}"
        self.log(f"[run {self.executed}] {what}: {full['status']}, {result}{timing}")

    def _run_parallel(self, specs: list[RunSpec], devices: list[int]) -> None:
        free: queue.Queue[int | None] = queue.Queue()
        for d in devices or [None]:
            free.put(d)
        work = self.out / "work"
        work.mkdir(parents=True, exist_ok=True)

        def job(spec: RunSpec) -> RunRecord:
            device = free.get()
            try:
                return self._subprocess(spec, device, work)
            finally:
                free.put(device)

        with ThreadPoolExecutor(max_workers=max(1, len(devices))) as pool:
            futures = {pool.submit(job, spec): spec for spec in specs}
            for future in as_completed(futures):
                self._finish(futures[future], future.result())

    def _subprocess(self, spec: RunSpec, device: int | None, work: Path) -> RunRecord:
        spec_path, record_path, log_path = (work / f"{spec.key}.{ext}" for ext in ("spec.json", "record.json", "log"))
        spec_path.write_text(json.dumps(spec.to_json()))
        record_path.unlink(missing_ok=True)
        env = dict(os.environ)
        if device is not None:
            env["CUDA_VISIBLE_DEVICES"] = str(device)
        started = time.perf_counter()
        with open(log_path, "w") as log:
            proc = subprocess.run(
                [sys.executable, "-m", "lightning_optim.compare.runner", str(spec_path), str(record_path)],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                check=False,
            )
        if proc.returncode == 0 and record_path.exists():
            record = json.loads(record_path.read_text())
            spec_path.unlink()
            record_path.unlink()  # the sweep saves it under runs/; the log stays
            return record
        tail = log_path.read_text()[-2000:] if log_path.exists() else ""
        return {
            "status": "failed",
            "reason": f"worker exited with status {proc.returncode}; log {log_path}: {tail[-500:]}",
            "wall_s": time.perf_counter() - started,
        }


def _best_of(scores: Sequence[PointScore]) -> PointScore:
    ok = [s for s in scores if s.status == "ok"]
    if ok:
        return min(ok, key=lambda s: s.mean)
    for status in ("pending", "diverged"):
        found = [s for s in scores if s.status == status]
        if found:
            return found[0]
    return scores[0]
