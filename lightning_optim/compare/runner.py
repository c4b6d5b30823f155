"""One run of a comparison: the user's LightningCLI config with one optimizer, lr, weight decay and seed.

:func:`run_one` builds model, data and trainer from the config through
:class:`~lightning_optim.cli.LightningOptimCLI` (so ``param_groups`` and short optimizer names keep working),
with these sections replaced: ``optimizer`` (the candidate with its lr, weight decay, the budget for
optimizers that need the run's length, and any extra arguments), ``lr_scheduler`` (the shared
:class:`~lightning_optim.compare.schedule.WarmupCosine`, stepped every optimizer step), ``seed_everything``
and the trainer's length, validation cadence, logger and output settings. It trains for the budget, stops
early on divergence, and returns a JSON-ready record (:data:`RunRecord`).

``python -m lightning_optim.compare.runner SPEC.json RECORD.json`` runs one spec in a fresh process (the
sweep does this per GPU, with ``CUDA_VISIBLE_DEVICES`` set).
"""

from __future__ import annotations

import copy
import gc
import hashlib
import json
import logging
import math
import statistics
import sys
import time
import warnings
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["RunSpec", "RunRecord", "Runner", "ConfigError", "run_one", "run_key", "state_bytes", "build_config"]

#: A finished run as the sweep stores it: the spec's fields plus ``status`` (``"ok"``, ``"diverged"`` or
#: ``"failed"``), ``final_loss``, ``curve`` ([step, validation loss] pairs), ``steps``, timings, memory.
RunRecord = dict[str, Any]

SCHEDULER_CLASS_PATH = "lightning_optim.compare.schedule.WarmupCosine"

# callbacks that would break an equal-budget, end-of-training comparison (or need checkpointing)
_DROPPED_CALLBACKS = ("ModelCheckpoint", "EarlyStopping")
# callbacks that need a logger (dropped with --no-tensorboard)
_LOGGER_CALLBACKS = ("LearningRateMonitor",)


class ConfigError(ValueError):
    """The user's config cannot be built (every run would fail the same way)."""


@dataclass
class RunSpec:
    """Everything one run needs; JSON-serializable (it crosses to worker processes as JSON).

    Args:
        optimizer: display name (the registry name, or the class name of a class path).
        class_path: importable optimizer class.
        lr: the base learning rate (param-group lrs of the config keep their ratio to it).
        weight_decay: passed as ``weight_decay`` (None: not passed, the optimizer's default).
        seed: ``seed_everything(seed)`` before the run is built.
        budget: optimizer steps (``trainer.max_steps``); the schedule ends there.
        config: the user's LightningCLI config (parsed YAML).
        config_hash: hash of the config and the sweep settings that change results (part of the run key).
        init_args: further optimizer arguments (the budget for ``total_steps_arg``, ``--opt-arg`` values).
        schedule: ``"cosine"``, ``"linear"`` or ``"constant"`` (after the warm-up).
        warmup_steps: linear warm-up steps.
        final_lr_fraction: lr at the end of the decay, as a fraction of the base lr.
        val_every: validate every this many optimizer steps (and always at the last one).
        monitor: the logged validation metric compared (``val/loss``).
        divergence_factor: stop when the training loss exceeds this times the first step's loss.
        tb_dir: TensorBoard ``save_dir`` (None: no logger); runs go to ``tb_dir/<tb_name>/<tb_version>``.
        tb_name: TensorBoard experiment name (the optimizer).
        tb_version: TensorBoard version directory (``lr=...,wd=...``).
        device: CUDA device index for an in-process run on one of several GPUs (None: trainer's choice).
        force_cpu: run on the CPU whatever the config says.
        threads: ``torch.set_num_threads`` for the run (None: unchanged); not part of the key.
    """

    optimizer: str
    class_path: str
    lr: float
    weight_decay: float | None
    seed: int
    budget: int
    config: dict[str, Any]
    config_hash: str
    init_args: dict[str, Any] = field(default_factory=dict)
    schedule: str = "cosine"
    warmup_steps: int = 0
    final_lr_fraction: float = 0.0
    val_every: int = 100
    monitor: str = "val/loss"
    divergence_factor: float = 3.0
    tb_dir: str | None = None
    tb_name: str = ""
    tb_version: str = ""
    device: int | None = None
    force_cpu: bool = False
    threads: int | None = None

    @property
    def key(self) -> str:
        """The run's identity: optimizer (class and fixed arguments) + lr + wd + seed + budget + config hash."""
        return run_key(self)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> RunSpec:
        return cls(**data)


def _canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, default=repr, separators=(",", ":"))


def run_key(spec: RunSpec) -> str:
    """16 hex digits of SHA-256 over the fields that decide a run's result (see :attr:`RunSpec.key`)."""
    ident = {
        "optimizer": spec.optimizer,
        "class_path": spec.class_path,
        "init_args": spec.init_args,
        "lr": spec.lr,
        "weight_decay": spec.weight_decay,
        "seed": spec.seed,
        "budget": spec.budget,
        "config_hash": spec.config_hash,
    }
    return hashlib.sha256(_canonical(ident).encode()).hexdigest()[:16]


# ---------------------------------------------------------------------------------------------------------
# The config of one run


def _needs_hessian_estimator(class_path: str) -> bool:
    """Whether the optimizer at ``class_path`` takes its curvature estimate from ``HessianEstimator``."""
    import importlib

    from lightning_optim.hessian import HessianOptimizerMixin

    module, _, name = class_path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError):
        return False
    return isinstance(cls, type) and issubclass(cls, HessianOptimizerMixin)


def _as_callback_list(callbacks: Any) -> list[Any]:
    if callbacks is None:
        return []
    return list(callbacks) if isinstance(callbacks, (list, tuple)) else [callbacks]


def _callback_name(callback: Any) -> str:
    path = callback.get("class_path", "") if isinstance(callback, Mapping) else str(callback)
    return str(path).rsplit(".", 1)[-1]


def _scale_group_lrs(config: dict[str, Any], lr: float) -> None:
    """Keep each ``param_groups.groups[i].lr`` in its ratio to the config's optimizer lr, at the swept ``lr``.

    Without an optimizer lr in the config there is no ratio to keep: group lrs stay as written.
    """
    sections = config.get("param_groups")
    groups = sections.get("groups") if isinstance(sections, Mapping) else None
    optimizer = config.get("optimizer")
    init_args = optimizer.get("init_args") if isinstance(optimizer, Mapping) else None
    base = init_args.get("lr") if isinstance(init_args, Mapping) else None
    if not groups or not isinstance(base, (int, float)) or isinstance(base, bool) or base <= 0:
        return
    for group in groups:
        if isinstance(group, dict) and isinstance(group.get("lr"), (int, float)) and not isinstance(group["lr"], bool):
            group["lr"] = group["lr"] * (lr / base)


def build_config(spec: RunSpec) -> dict[str, Any]:
    """The LightningCLI config (a dict, as parsed YAML) of one run: the user's with the compare overrides."""
    config = copy.deepcopy(spec.config)
    for key in ("ckpt_path", "config"):  # subcommand-level keys of `lightning-optim fit`: not parser keys here
        config.pop(key, None)
    _scale_group_lrs(config, spec.lr)
    config["seed_everything"] = spec.seed
    init_args = {**spec.init_args, "lr": spec.lr}
    if spec.weight_decay is not None:
        init_args["weight_decay"] = spec.weight_decay
    config["optimizer"] = {"class_path": spec.class_path, "init_args": init_args}
    config["lr_scheduler"] = {
        "class_path": SCHEDULER_CLASS_PATH,
        "init_args": {
            "total_steps": spec.budget,
            "warmup_steps": spec.warmup_steps,
            "decay": spec.schedule,
            "final_lr_fraction": spec.final_lr_fraction,
        },
    }
    trainer = dict(config.get("trainer") or {})
    accumulate = trainer.get("accumulate_grad_batches") or 1
    dropped = _DROPPED_CALLBACKS + (_LOGGER_CALLBACKS if spec.tb_dir is None else ())
    callbacks = [c for c in _as_callback_list(trainer.get("callbacks")) if _callback_name(c) not in dropped]
    if _needs_hessian_estimator(spec.class_path) and not any(
        _callback_name(c) == "HessianEstimator" for c in callbacks
    ):  # AdaHessian / Sophia train in Lightning with the callback that computes their curvature estimate
        callbacks.append({"class_path": "lightning_optim.callbacks.HessianEstimator"})
    trainer.update(
        max_steps=spec.budget,
        max_epochs=-1,
        min_steps=None,
        min_epochs=None,
        max_time=None,
        fast_dev_run=False,
        val_check_interval=spec.val_every * int(accumulate),  # counted in batches when not per epoch
        check_val_every_n_epoch=None,
        num_sanity_val_steps=0,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=callbacks,
        devices=[spec.device] if spec.device is not None else 1,
        num_nodes=1,
        strategy="auto",
    )
    if spec.force_cpu:
        trainer["accelerator"] = "cpu"
        trainer["devices"] = 1
    if spec.tb_dir is None:
        trainer["logger"] = False
    else:
        trainer["logger"] = {
            "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
            "init_args": {
                "save_dir": spec.tb_dir,
                "name": spec.tb_name,
                "version": spec.tb_version,
                "default_hp_metric": False,
            },
        }
    config["trainer"] = trainer
    return config


# ---------------------------------------------------------------------------------------------------------
# Recording


class _Diverged(Exception):
    """Raised from the recorder callback to stop a diverged run at once."""

    def __init__(self, step: int, reason: str) -> None:
        super().__init__(reason)
        self.step = step
        self.reason = reason


def _loss_of(outputs: Any) -> Any:
    if isinstance(outputs, Mapping):
        return outputs.get("loss")
    return outputs


def state_bytes(optimizer: Any) -> int:
    """Bytes of every tensor in ``optimizer.state`` (nested dicts, lists and tuples walked; shared storage
    counted once per tensor object)."""
    import torch

    seen: set[int] = set()

    def walk(value: Any) -> int:
        if isinstance(value, torch.Tensor):
            if id(value) in seen:
                return 0
            seen.add(id(value))
            return value.numel() * value.element_size()
        if isinstance(value, Mapping):
            return sum(walk(v) for v in value.values())
        if isinstance(value, (list, tuple)):
            return sum(walk(v) for v in value)
        inner = getattr(value, "__dict__", None)  # e.g. a quantized-state object holding its tensors
        return walk(inner) if isinstance(inner, dict) and not isinstance(value, type) else 0

    return sum(walk(s) for s in optimizer.state.values())


def _make_recorder(monitor: str, divergence_factor: float) -> Any:
    import lightning.pytorch as pl
    import torch

    class CompareRecorder(pl.Callback):
        """Validation curve, per-step wall times, divergence stop."""

        def __init__(self) -> None:
            self.curve: list[list[float]] = []
            self.step_times: list[float] = []
            self.optimizer_times: list[float] = []
            self.initial_loss: float | None = None
            self.last_loss: float | None = None
            self._t0 = 0.0
            self._t_opt: float | None = None
            self._cuda = False

        def _now(self) -> float:
            if self._cuda:
                torch.cuda.synchronize()
            return time.perf_counter()

        def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
            self._cuda = pl_module.device.type == "cuda"

        def on_train_batch_start(
            self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
        ) -> None:
            self._t_opt = None
            self._t0 = self._now()

        def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
            self._t_opt = self._now()  # after forward/backward; the last call wins (closures may run twice)

        def on_train_batch_end(
            self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
        ) -> None:
            end = self._now()
            self.step_times.append(end - self._t0)
            if self._t_opt is not None:
                self.optimizer_times.append(end - self._t_opt)
            loss = _loss_of(outputs)
            if loss is None:
                return
            value = float(loss)  # one host sync per step: the divergence check needs the value
            self.last_loss = value
            step = trainer.global_step
            if not math.isfinite(value):
                raise _Diverged(step, f"non-finite training loss {value} at step {step}")
            if self.initial_loss is None:
                self.initial_loss = value
            elif self.initial_loss > 0 and value > divergence_factor * self.initial_loss:
                raise _Diverged(
                    step,
                    f"training loss {value:.4g} at step {step} > {divergence_factor:g} x the first loss "
                    f"{self.initial_loss:.4g}",
                )

        def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
            if trainer.sanity_checking:
                return
            metric = trainer.callback_metrics.get(monitor)
            if metric is None:
                available = ", ".join(sorted(trainer.callback_metrics)) or "none"
                raise KeyError(f"the model logs no {monitor!r} in validation (logged: {available}); set --monitor")
            value = float(metric)
            step = trainer.global_step
            if self.curve and self.curve[-1][0] == step:
                self.curve[-1][1] = value
            else:
                self.curve.append([step, value])
            if not math.isfinite(value):
                raise _Diverged(step, f"non-finite {monitor} {value} at step {step}")

    return CompareRecorder()


@contextmanager
def _quiet() -> Iterator[None]:
    """Lightning's info lines (devices, "max_steps reached") and its advisory warnings off for one run."""
    names = ("lightning.pytorch", "lightning.fabric", "lightning", "pytorch_lightning")
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.WARNING)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r".*does not have many workers.*")
            warnings.filterwarnings("ignore", message=r".*configure_optimizers.* will be overridden.*")
            warnings.filterwarnings("ignore", message=r".*smaller than the logging interval.*")
            warnings.filterwarnings("ignore", message=r".*Checkpoint directory.*exists.*")
            warnings.filterwarnings("ignore", message=r".*LeafSpec.*")
            warnings.filterwarnings("ignore", message=r"(?s).*was deprecated in v4\.")  # jsonargparse, via LightningCLI
            warnings.filterwarnings("ignore", message=r"(?s).*JsonargparseDeprecationWarning")
            yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


@contextmanager
def _bare_argv() -> Iterator[None]:
    saved = sys.argv
    sys.argv = saved[:1]
    try:
        yield
    finally:
        sys.argv = saved


@contextmanager
def _threads(threads: int | None) -> Iterator[None]:
    import torch

    before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def _make_cli_class() -> type:
    from lightning.pytorch.cli import LightningCLI

    from lightning_optim.cli import LightningOptimCLI
    from lightning_optim.compare.schedule import WarmupCosine

    class CompareCLI(LightningOptimCLI):
        """LightningOptimCLI whose shared schedule steps every optimizer step (LightningCLI's default: epochs)."""

        @staticmethod
        def configure_optimizers(lightning_module: Any, optimizer: Any, lr_scheduler: Any = None) -> Any:
            if isinstance(lr_scheduler, WarmupCosine):
                return {"optimizer": optimizer, "lr_scheduler": {"scheduler": lr_scheduler, "interval": "step"}}
            return LightningCLI.configure_optimizers(lightning_module, optimizer, lr_scheduler)

    return CompareCLI


def _builds_with_sgd(spec: RunSpec) -> bool:
    """Whether the run's config builds with plain ``torch.optim.SGD`` instead of the candidate (to tell an
    optimizer's failure from the config's)."""
    import dataclasses

    probe = dataclasses.replace(spec, class_path="torch.optim.SGD", init_args={}, weight_decay=None, tb_dir=None)
    try:
        with _bare_argv():
            _make_cli_class()(
                args=build_config(probe), run=False, save_config_callback=None, parser_kwargs={"exit_on_error": False}
            )
    except Exception:  # noqa: BLE001
        return False
    return True


def run_one(spec: RunSpec) -> RunRecord:
    """Train one spec for its budget and return its record (never raises for a failed or diverged run).

    Raises:
        ConfigError: the config cannot be parsed or instantiated (the same for every run of the sweep).
    """
    from jsonargparse import ArgumentError
    from lightning.pytorch import seed_everything

    started = time.perf_counter()
    record: RunRecord = {"status": "ok", "final_loss": None, "curve": [], "steps": 0, "reason": None}
    with _quiet(), _threads(spec.threads):
        seed_everything(spec.seed, workers=True, verbose=False)
        try:
            with _bare_argv():  # the config comes as `args`; LightningCLI must not also read our command line
                cli = _make_cli_class()(
                    args=build_config(spec),
                    run=False,
                    save_config_callback=None,
                    parser_kwargs={"exit_on_error": False},
                )
        except (ArgumentError, SystemExit) as error:
            raise ConfigError(f"the config cannot be built for {spec.optimizer}: {error}") from None
        except Exception as error:  # noqa: BLE001 (an optimizer rejecting an argument is one run's failure)
            reason = f"{type(error).__name__}: {error}"
            if not _builds_with_sgd(spec):  # model, data or trainer: every run would fail the same way
                raise ConfigError(f"the config cannot be built: {reason}") from error
            record.update(status="failed", reason=f"building the optimizer failed: {reason}")
            record["wall_s"] = time.perf_counter() - started
            return record
        recorder = _make_recorder(spec.monitor, spec.divergence_factor)
        trainer = cli.trainer
        trainer.callbacks.append(recorder)
        try:
            trainer.fit(cli.model, datamodule=cli.datamodule)
            if trainer.global_step < spec.budget:
                record.update(status="failed", reason=f"training stopped at step {trainer.global_step} < budget")
            elif not recorder.curve or recorder.curve[-1][0] != trainer.global_step:
                trainer.validate(cli.model, datamodule=cli.datamodule, verbose=False)
        except _Diverged as diverged:
            record.update(status="diverged", reason=diverged.reason, diverged_at=diverged.step)
        except Exception as error:  # noqa: BLE001 (recorded, the sweep goes on)
            record.update(status="failed", reason=f"{type(error).__name__}: {error}")
        record["steps"] = trainer.global_step
        record["curve"] = recorder.curve
        if record["status"] == "ok":
            final = recorder.curve[-1] if recorder.curve else None
            record["final_loss"] = final[1] if final and final[0] == spec.budget else None
            if record["final_loss"] is None:
                record.update(status="failed", reason=record["reason"] or "no validation at the last step")
        record["initial_train_loss"] = recorder.initial_loss
        record["last_train_loss"] = recorder.last_loss
        record["step_time_s"] = _median(recorder.step_times)
        record["optimizer_time_s"] = _median(recorder.optimizer_times)
        record["state_bytes"] = sum(state_bytes(o) for o in trainer.optimizers)
        record["param_groups"] = [
            {"lr": g.get("lr"), "weight_decay": g.get("weight_decay"), "params": sum(p.numel() for p in g["params"])}
            for o in trainer.optimizers
            for g in o.param_groups
        ]  # after training: the lrs are the schedule's last
        record["device"] = str(cli.model.device)
        record["optimizer_args"] = build_config(spec)["optimizer"]["init_args"]
        on_cuda = cli.model.device.type == "cuda"
        del cli, trainer, recorder
        gc.collect()  # the next run in this process should not find this one's tensors
        if on_cuda:
            import torch

            torch.cuda.empty_cache()
    record["wall_s"] = time.perf_counter() - started
    return record


#: What the sweep calls per run (tests inject a fake objective of the lr).
Runner = Callable[[RunSpec], RunRecord]


def _worker(argv: list[str]) -> int:
    """``python -m lightning_optim.compare.runner SPEC.json RECORD.json``: run one spec, write its record."""
    spec_path, record_path = argv
    spec = RunSpec.from_json(json.loads(Path(spec_path).read_text()))
    try:
        record = run_one(spec)
    except ConfigError as error:
        record = {"status": "failed", "config_error": str(error), "reason": str(error)}
    Path(record_path).write_text(json.dumps(record))
    return 0


if __name__ == "__main__":
    sys.exit(_worker(sys.argv[1:]))
