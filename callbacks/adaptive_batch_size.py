"""AdaptiveBatchSize: AdAdaGrad's norm test, growing the batch through gradient accumulation."""

from __future__ import annotations

import math
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback, GradientAccumulationScheduler
from torch import Tensor

from lightning_optim.callbacks._logging import log_scalars
from lightning_optim.monitors import tags
from lightning_optim.validation import check_int, check_range

__all__ = ["AdaptiveBatchSize", "norm_test_statistic"]


def norm_test_statistic(sum_sq: float, mean_sq: float, count: int, eta: float) -> tuple[float, float]:
    r"""The norm test on ``count`` equal-size gradient estimates G_1..G_K: (T, the variance of their mean).

    With Ḡ their mean and s² = (Σ‖G_k‖² − K‖Ḡ‖²)/(K − 1) the unbiased trace of their covariance, the
    variance of Ḡ is s²/K and the test passes iff s²/K ≤ η²‖Ḡ‖², i.e. iff T = s²/(K·η²·‖Ḡ‖²) ≤ 1. The
    batch that would pass is T times the current one. s² is clamped at 0 (rounding can make the
    difference slightly negative when all estimates agree). T is NaN when it cannot be formed (K < 2,
    ‖Ḡ‖ = 0 or non-finite sums).

    Args:
        sum_sq: Σ_k ‖G_k‖².
        mean_sq: ‖Ḡ‖².
        count: K.
        eta: η of the test.
    """
    if count < 2 or not (math.isfinite(sum_sq) and math.isfinite(mean_sq)) or mean_sq <= 0:
        return math.nan, math.nan
    variance = max(sum_sq - count * mean_sq, 0.0) / (count - 1) / count
    return variance / (eta**2 * mean_sq), variance


class AdaptiveBatchSize(Callback):
    r"""Grow the effective batch size with AdAdaGrad's norm test, through ``trainer.accumulate_grad_batches``.

    Lau, Liu & Kolar, "AdAdaGrad: Adaptive Batch Size Schemes for Adaptive Gradient Methods"
    (arXiv 2402.11215; authors' code timlautk/AdAdaGrad, ``tests.py`` ``norm_test``). The test asks
    whether the mini-batch gradient Ḡ is accurate enough: with Var the variance of Ḡ as an estimate of
    the true gradient,

    .. math::
        \mathrm{Var}(\bar G) \le \eta^2 \|\bar G\|^2 ,\qquad
        T = \frac{\mathrm{Var}(\bar G)}{\eta^2 \|\bar G\|^2},\qquad
        b_{new} = \lceil \max(b, T\,b) \rceil

    and when it fails (T > 1) the batch grows to the size b·T that would pass. The authors estimate Var
    from per-sample gradients; here the estimates are the micro-batch gradients of one accumulation
    window (K = accumulation × world size of them, each over one micro-batch), so no per-sample gradient
    and no extra backward is needed: Var(Ḡ) = s²/K with s² the unbiased trace of the covariance of the
    micro-batch gradients (:func:`norm_test_statistic`). With micro-batches of one sample this is exactly
    the authors' statistic. The micro-batch size never changes and no dataloader is rebuilt: the batch
    grows by raising ``trainer.accumulate_grad_batches``, which Lightning 2.6 reads afresh at every
    micro-batch (``training_epoch_loop._accumulated_batches_reached``, the ``zero_grad`` of
    ``optimization/automatic.py`` and the loss normalisation); A' = the smallest multiple of the current
    accumulation A ≥ ⌈A·T⌉, capped at ``max_accumulation``.

    How: during a checked window, a hook on every parameter adds the squared norm of each micro-batch's
    gradient contribution (its local contribution, before DDP's all-reduce and before it is added into
    ``p.grad``) to a device sum; after the window's last backward ‖p.grad‖² gives ‖Ḡ‖² (after DDP's
    averaging). Lightning scales each micro-batch loss by 1/A, so G_k = A·(contribution). Every
    ``check_every_n_steps``-th optimizer step the window's sums are all-reduced (sum over ranks) and read
    on the host: the one host sync, on checked steps only. Every rank then takes the same decision from
    the same reduced numbers. Other windows cost nothing (no hooks). Windows whose statistic is not
    finite (NaN/inf gradients, an AMP overflow, ‖Ḡ‖ = 0) decide nothing. GradScaler: contributions and
    p.grad carry the same scale, which cancels in T.

    A new accumulation A' takes effect at the first window start whose batch index is a multiple of A'
    (always the next epoch's first batch, and with A' a multiple of A at most A'/A − 1 windows later):
    Lightning places windows at batch indices that are multiples of the accumulation, so switching
    elsewhere would mix two windows.

    Logged every ``log_every_n_steps`` (host numbers, no sync) under ``stability/``:

    - ``stability/accumulate_grad_batches``: the current accumulation A.
    - ``stability/batch_size_multiplier``: A divided by the accumulation the run started with (the
      factor by which the effective batch has grown).
    - ``stability/norm_test``: T of the last checked window (the test passes iff T ≤ 1).

    Deviations from the authors' code: micro-batch gradients instead of per-sample gradients (see
    above); a check every ``check_every_n_steps`` steps (theirs: every step, ``test_interval=1``) on
    that step's window only; the new size is rounded up to a multiple of the current accumulation; a
    single device needs ``min_accumulation`` >= 2 (two estimates at least), so the run starts at twice
    the trainer's batch unless ``accumulate_grad_batches`` was already >= 2. The augmented inner-product
    test is not implemented: it needs every micro-batch gradient's inner product with the window's mean,
    which is known only after the window (A stored gradients or a second pass).

    Requirements: automatic optimization, one optimizer, single device or DDP (the parameters are not
    sharded), no ``GradientAccumulationScheduler`` (it would overwrite the accumulation each epoch) and a
    strategy that leaves accumulation to Lightning (not DeepSpeed). The state (accumulation, pending
    growth, last statistics, counts) is saved in checkpoints and restored at fit start.

    Args:
        eta: η of the norm test, > 0 (default 0.1, the authors' default; larger tolerates more noise).
        check_every_n_steps: test the window of every n-th optimizer step (default 10, >= 1).
        min_accumulation: accumulation at fit start is at least this (default 2, >= 1; 1 is allowed
            under DDP with >= 2 ranks).
        max_accumulation: the accumulation never grows above this (default 64, >= min_accumulation).
    """

    def __init__(
        self,
        eta: float = 0.1,
        check_every_n_steps: int = 10,
        min_accumulation: int = 2,
        max_accumulation: int = 64,
    ) -> None:
        check_range("eta", eta, 0.0, None, low_open=True)
        check_int("check_every_n_steps", check_every_n_steps, 1)
        check_int("min_accumulation", min_accumulation, 1)
        check_int("max_accumulation", max_accumulation, 1)
        if max_accumulation < min_accumulation:
            raise ValueError(
                f"Invalid max_accumulation: {max_accumulation!r}; it must be >= min_accumulation ({min_accumulation})."
            )
        self.eta = float(eta)
        self.check_every_n_steps = check_every_n_steps
        self.min_accumulation = min_accumulation
        self.max_accumulation = max_accumulation

        self.accumulation: int | None = None  # current A (None until fit start)
        self.start_accumulation: int | None = None
        self.pending: int = 0  # a grown A' waiting for an aligned window start (0: none)
        self.norm_test: float = math.nan  # T of the last checked window
        self.variance: float = math.nan  # Var(Ḡ) = s²/K of the last checked window
        self.grad_norm_sq: float = math.nan  # ‖Ḡ‖² of the last checked window
        self.checks: int = 0
        self.increases: int = 0

        self._loaded: dict[str, Any] | None = None
        self._handles: list[Any] = []
        self._norms: list[Tensor] = []  # per-parameter contribution norms of the current micro-batch
        self._sum_sq: Tensor | None = None  # Σ over the window's micro-batches of ‖contribution‖²
        self._mean_sq: Tensor | None = None  # ‖p.grad‖² after the latest backward of the window
        self._micro: int = 0
        self._recording = False  # between on_before_backward and on_after_backward of a checked window
        self._stepped = False  # an optimizer step ran since the last on_train_batch_end

    # --- fit start -----------------------------------------------------------------------------------
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not pl_module.automatic_optimization:
            raise RuntimeError("AdaptiveBatchSize needs automatic optimization (it grows accumulate_grad_batches).")
        if len(trainer.optimizers) != 1:
            raise RuntimeError(f"AdaptiveBatchSize supports exactly one optimizer, got {len(trainer.optimizers)}.")
        if getattr(trainer.strategy, "handles_gradient_accumulation", False):
            raise RuntimeError(
                f"AdaptiveBatchSize cannot drive {type(trainer.strategy).__name__}, which handles gradient "
                "accumulation itself; use a single device or DDP."
            )
        if any(isinstance(cb, GradientAccumulationScheduler) for cb in trainer.callbacks):
            raise RuntimeError(
                "AdaptiveBatchSize and GradientAccumulationScheduler both set trainer.accumulate_grad_batches; "
                "use one of them."
            )
        if self._loaded is not None:
            saved, self._loaded = self._loaded, None
            self.accumulation = int(saved["accumulation"])
            self.start_accumulation = int(saved["start_accumulation"])
            self.pending = int(saved["pending"])
            self.norm_test = float(saved["norm_test"])
            self.variance = float(saved["variance"])
            self.grad_norm_sq = float(saved["grad_norm_sq"])
            self.checks = int(saved["checks"])
            self.increases = int(saved["increases"])
        else:  # a fresh run (also when this instance fitted before)
            self.accumulation = max(int(trainer.accumulate_grad_batches), self.min_accumulation)
            self.start_accumulation = self.accumulation
            self.pending, self.checks, self.increases = 0, 0, 0
            self.norm_test = self.variance = self.grad_norm_sq = math.nan
        if self.accumulation * trainer.world_size < 2:
            raise ValueError(
                "AdaptiveBatchSize needs at least two micro-batch gradients per optimizer step to estimate their "
                f"variance: accumulation {self.accumulation} x world size {trainer.world_size} < 2. Set "
                "min_accumulation >= 2 (the default) or train on >= 2 DDP ranks."
            )
        trainer.accumulate_grad_batches = self.accumulation

    # --- per micro-batch ------------------------------------------------------------------------------
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        a = self.accumulation or int(trainer.accumulate_grad_batches)
        if batch_idx % a != 0:
            return  # inside a window
        if self.pending and batch_idx % self.pending == 0:  # an aligned window start: grow now
            self.accumulation, self.pending = self.pending, 0
            self.increases += 1
            trainer.accumulate_grad_batches = a = self.accumulation
        if self._handles:  # a window that ended without an optimizer step (e.g. the epoch was cut short)
            self._stop()
        checked = (trainer.global_step + 1) % self.check_every_n_steps == 0
        if checked and max(a, self.pending) < self.max_accumulation:
            self._start(pl_module)

    def _start(self, pl_module: pl.LightningModule) -> None:
        self._norms, self._sum_sq, self._mean_sq, self._micro = [], None, None, 0
        for p in pl_module.parameters():
            if p.requires_grad:
                self._handles.append(p.register_hook(self._record))

    def _record(self, grad: Tensor) -> None:
        if self._recording:  # Lightning's backward only, not an autograd.grad in training_step
            self._norms.append(torch.linalg.vector_norm(grad.detach(), dtype=torch.float32))

    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: Tensor) -> None:
        self._recording = bool(self._handles)

    def _stop(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles, self._norms = [], []

    def on_after_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._recording = False
        if not self._handles:
            return
        self._micro += 1
        if self._norms:
            share = torch.stack(self._norms).double().square().sum()
            self._sum_sq = share if self._sum_sq is None else self._sum_sq + share
            self._norms = []
        grads = [p.grad for p in pl_module.parameters() if p.grad is not None]
        if grads:
            norms = torch._foreach_norm([g.detach() for g in grads])
            self._mean_sq = torch.stack(norms).double().square().sum()

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        self._stepped = True
        if not self._handles:
            return
        self._stop()
        a = int(trainer.accumulate_grad_batches)  # the 1/A Lightning scaled each micro-batch loss by
        nan = torch.full((), math.nan, dtype=torch.float64, device=pl_module.device)
        sums = [nan if v is None else v.to(nan.device) for v in (self._sum_sq, self._mean_sq)]
        # every rank reaches this collective on the same step (the checked windows are rank-identical)
        reduced = trainer.strategy.reduce(torch.stack(sums), reduce_op="sum")
        sum_sq, mean_sq = reduced.tolist()  # the one host read, on checked steps only
        world, k = trainer.world_size, self._micro
        # G_k = A·contribution; p.grad = (k/A)·Ḡ after DDP's averaging (k = A except in an epoch's last window)
        count = world * k
        t, variance = norm_test_statistic(a * a * sum_sq, (a / k) ** 2 * mean_sq / world, count, self.eta)
        self._sum_sq = self._mean_sq = None
        self.checks += 1
        if not math.isfinite(t):
            return
        self.norm_test, self.variance, self.grad_norm_sq = t, variance, (a / k) ** 2 * mean_sq / world
        if t > 1.0:
            needed = math.ceil(k * t)
            grown = min(self.max_accumulation, a * math.ceil(needed / a))
            if grown > max(a, self.pending):
                self.pending = grown

    # --- logging ----------------------------------------------------------------------------------------
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        stepped, self._stepped = self._stepped, False  # log once per optimizer step, after it
        if not stepped or not trainer.loggers or not trainer._logger_connector.should_update_logs:
            return
        if self.accumulation is None:
            return
        metrics: dict[str, float] = {
            tags.ACCUMULATE_GRAD_BATCHES: float(self.accumulation),
            tags.BATCH_SIZE_MULTIPLIER: self.accumulation / float(self.start_accumulation or self.accumulation),
        }
        if math.isfinite(self.norm_test):
            metrics[tags.NORM_TEST] = self.norm_test
        log_scalars(trainer, metrics)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._stop()

    # --- checkpoints --------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The accumulation (current, at the start, pending), the last window's statistics and the counts."""
        if self._loaded is not None and self.accumulation is None:
            return dict(self._loaded)
        return {
            "accumulation": self.accumulation or self.min_accumulation,
            "start_accumulation": self.start_accumulation or self.min_accumulation,
            "pending": self.pending,
            "norm_test": self.norm_test,
            "variance": self.variance,
            "grad_norm_sq": self.grad_norm_sq,
            "checks": self.checks,
            "increases": self.increases,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._loaded = dict(state_dict)
