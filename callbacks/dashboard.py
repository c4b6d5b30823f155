"""StabilityDashboard: a TensorBoard custom-scalars page for the stability callbacks, written at fit start.

TensorBoard's default Scalars page opens on ``epoch`` and ``hp_metric``, groups tags alphabetically and
has no reference lines. The *Custom Scalars* page (``http://localhost:6006/#custom_scalars``) shows charts
defined by a layout stored in the event file. :class:`StabilityDashboard` writes one such layout: a
single open category (``stability`` by default) whose charts put each statistic next to what it should be
read against, and only the charts whose producers are attached to the trainer.

It is the one owner of the layout. Every stability callback of this package adds a dashboard when none is
attached: the pipeline callbacks (:class:`~lightning_optim.callbacks.SpikeGuard`, MomentumReset,
SpikeAwareClipping, AdaptiveMomentum, QuantizationAwareTraining), LRSafetyRadius and QuantizationMonitor,
in their ``setup``, so the layout is written at fit start.
Attach ``StabilityDashboard(enabled=False)`` to turn it off, or your own instance to change its options.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
from lightning.fabric.loggers.tensorboard import TensorBoardLogger as _TensorBoardLogger
from lightning.pytorch.callbacks import Callback, LearningRateMonitor
from lightning.pytorch.utilities import rank_zero_info

from lightning_optim.callbacks.adaptive_momentum import AdaptiveMomentum
from lightning_optim.callbacks.lr_safety import LRSafetyRadius
from lightning_optim.callbacks.momentum_reset import MomentumReset
from lightning_optim.callbacks.qat import QuantizationAwareTraining
from lightning_optim.callbacks.quant_monitor import QuantizationMonitor
from lightning_optim.callbacks.spike_clipping import SpikeAwareClipping
from lightning_optim.callbacks.spike_guard import SpikeGuard
from lightning_optim.monitors import tags

__all__ = [
    "LR_SAFETY_RATIO_LIMIT",
    "LR_SAFETY_RATIO_TARGET",
    "Z_THRESHOLD",
    "StabilityDashboard",
    "attach_dashboard",
    "stability_layout",
]

# Constant reference series the dashboard logs (TensorBoard has no horizontal reference lines).
Z_THRESHOLD, LR_SAFETY_RATIO_LIMIT, LR_SAFETY_RATIO_TARGET = (
    tags.Z_THRESHOLD, tags.LR_SAFETY_RATIO_LIMIT, tags.LR_SAFETY_RATIO_TARGET
)

Layout = dict[str, dict[str, list[Any]]]  # {category: {chart title: ["Multiline", [tag regex, ...]]}}

_OPT = r"(/opt\d+)?"  # a second optimizer's tags end in /opt<i> (monitors.tags.tag_for)


class StabilityDashboard(Callback):
    """Writes a TensorBoard custom-scalars layout for the attached stability callbacks, once per fit on rank 0.

    Charts of the page (each only when its producer is attached; ``<i>`` optimizer suffixes included):

    - *loss with spikes / skips / resets*: the training loss (``loss_tag``) with the cumulative
      ``stability/spikes``, ``stability/skipped_steps`` and ``stability/momentum_resets``, so a jump of a
      counter lines up with the loss;
    - *grad norm with skips / resets* (SpikeGuard): ``stability/grad_norm`` with the same counters;
    - *z-score vs threshold* (SpikeGuard): ``stability/grad_norm_z`` (and ``stability/loss_z`` when the
      loss is monitored) with ``stability/z_threshold``, a constant series at SpikeGuard's ``z_threshold``;
    - *spikes / skips / resets (cumulative)*: every counter, ``stability/lr_scaled_steps`` included;
    - *safety ratio r vs r = 1* (LRSafetyRadius): ``stability/lr_safety_ratio`` with
      ``stability/lr_safety_ratio_limit`` = 1 (and ``stability/lr_safety_ratio_target`` in control mode
      with a target other than 1, and ``stability/lr_scale``), next to the *learning rate* chart (the
      ``lr_tag`` series of a LearningRateMonitor);
    - *clipped fraction* (SpikeAwareClipping), *β1* (AdaptiveMomentum);
    - *quant: layer error R*, *quant: MMR*, *quant: kurtosis* (QuantizationAwareTraining or
      QuantizationMonitor): the ``quant/`` series of every layer.

    The constant series are host floats, logged to the TensorBoard loggers only, at train start, on every
    logging step and at train end (no device work). With TensorBoard's default "Ignore outliers in chart
    scaling" a chart's y-range is the 5-95 % quantile range of all its points; because the reference
    series has a point at every logging step, the r = 1 (threshold) line stays in range and a peak shows
    as the curve leaving the chart above it; untick the option (left sidebar) to see the whole peak, or
    use ``lightning-optim report``. Nothing happens without a TensorBoardLogger.

    Args:
        title: the category (page section) title (default ``"stability"``).
        loss_tag: regular expression of the training-loss tag (default ``^train/loss(_step)?$``, what
            ``self.log("train/loss", ...)`` produces).
        lr_tag: regular expression of the learning-rate tags (default: LearningRateMonitor's ``lr-*``
            series without its ``-momentum``/``-weight_decay`` ones).
        enabled: False attaches a dashboard that writes nothing, which also stops the stability callbacks
            from adding one (default True).
    """

    def __init__(
        self,
        title: str = "stability",
        loss_tag: str = r"^train/loss(_step)?$",
        lr_tag: str = r"^lr-(?!.*-(momentum|weight_decay)$)",
        enabled: bool = True,
    ) -> None:
        if not isinstance(title, str) or not title:
            raise ValueError(f"Invalid title: {title!r}; must be a non-empty string.")
        for name, pattern in (("loss_tag", loss_tag), ("lr_tag", lr_tag)):
            try:
                re.compile(pattern)
            except (re.error, TypeError) as error:
                raise ValueError(f"Invalid {name}: {pattern!r}; not a regular expression ({error}).") from None
        self.title = title
        self.loss_tag = loss_tag
        self.lr_tag = lr_tag
        self.enabled = bool(enabled)
        self.layout: Layout | None = None  # the last layout written (None before the first write)
        self._written = False  # for the current fit
        self._last_constants_step: int | None = None

    # --- the layout ----------------------------------------------------------------------------------
    def build_layout(self, callbacks: Sequence[Callback], prefix: str = "") -> Layout:
        """The layout for ``callbacks`` (tags prefixed by a TensorBoardLogger ``prefix``, if any)."""
        return stability_layout(callbacks, title=self.title, loss_tag=self.loss_tag, lr_tag=self.lr_tag, prefix=prefix)

    def write_layout(self, trainer: pl.Trainer) -> None:
        """Write the layout to every TensorBoardLogger of ``trainer`` (rank 0 only); idempotent per fit."""
        self._written = True
        if not self.enabled or not trainer.is_global_zero:
            return
        for logger in _tensorboard_loggers(trainer):
            layout = self.build_layout(trainer.callbacks, _prefix(logger))
            writer = logger.experiment
            if getattr(writer, "_lightning_optim_layout", None) == layout:
                continue  # the same writer got this very layout already (a second fit with one logger)
            writer.add_custom_scalars(layout)
            writer.flush()
            writer._lightning_optim_layout = layout
            self.layout = layout
            rank_zero_info(
                f"StabilityDashboard: TensorBoard page {self.title!r} written to {logger.log_dir}; run "
                f"`tensorboard --logdir {logger.root_dir}` and open http://localhost:6006/#custom_scalars"
            )

    # --- the constant reference series ---------------------------------------------------------------
    def constants(self, callbacks: Sequence[Callback]) -> dict[str, float]:
        """The reference series for ``callbacks``: z threshold, r = 1 and the controller's target."""
        out: dict[str, float] = {}
        guard = next((cb for cb in callbacks if isinstance(cb, SpikeGuard)), None)
        if guard is not None:
            out[Z_THRESHOLD] = float(guard.z_threshold)
        radius = next((cb for cb in callbacks if isinstance(cb, LRSafetyRadius)), None)
        if radius is not None:
            out[LR_SAFETY_RATIO_LIMIT] = 1.0
            if radius.mode == "control" and radius.target_ratio != 1.0:
                out[LR_SAFETY_RATIO_TARGET] = float(radius.target_ratio)
        return out

    def _log_constants(self, trainer: pl.Trainer) -> None:
        step = trainer.global_step
        if not self.enabled or step == self._last_constants_step:
            return  # once per step (gradient accumulation calls the batch hooks several times)
        self._last_constants_step = step
        values = self.constants(trainer.callbacks)
        if values:
            for logger in _tensorboard_loggers(trainer):
                logger.log_metrics(values, step=step)

    # --- Lightning hooks -----------------------------------------------------------------------------
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._written = False
        self._last_constants_step = None
        self.write_layout(trainer)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._log_constants(trainer)  # after a resume global_step is the restored one here

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if trainer._logger_connector.should_update_logs:
            self._log_constants(trainer)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._log_constants(trainer)  # the reference lines reach the last step


def attach_dashboard(trainer: pl.Trainer) -> StabilityDashboard | None:
    """The trainer's :class:`StabilityDashboard`, appended to ``trainer.callbacks`` if none is attached.

    Called from the ``setup`` hook of every stability callback, so the layout is written at fit start:
    nothing is added outside ``fit`` or without a TensorBoardLogger.
    """
    dashboard = next((cb for cb in trainer.callbacks if isinstance(cb, StabilityDashboard)), None)
    if dashboard is None:
        if trainer.state.fn != "fit" or not _tensorboard_loggers(trainer):
            return None
        dashboard = StabilityDashboard()
        trainer.callbacks.append(dashboard)  # a hook loop running now reaches it as well
    return dashboard


def stability_layout(
    callbacks: Sequence[Callback],
    title: str = "stability",
    loss_tag: str = r"^train/loss(_step)?$",
    lr_tag: str = r"^lr-(?!.*-(momentum|weight_decay)$)",
    prefix: str = "",
) -> Layout:
    """The custom-scalars layout (``SummaryWriter.add_custom_scalars`` format) for the producers in ``callbacks``.

    ``prefix`` is a TensorBoardLogger prefix: its tags are ``f"{prefix}-{tag}"``. Charts without an
    attached producer are left out; the loss chart is always there.
    """
    def of(kind: type) -> list[Any]:
        return [cb for cb in callbacks if isinstance(cb, kind)]

    def exact(tag: str) -> str:
        return f"^{re.escape(head)}{re.escape(tag)}{_OPT}$"

    def under(tag_prefix: str) -> str:
        return f"^{re.escape(head)}{re.escape(tag_prefix)}/"

    def user(pattern: str) -> str:  # a user regex anchored at the start: the logger prefix goes after ^
        return f"^{re.escape(head)}{pattern[1:]}" if head and pattern.startswith("^") else pattern

    head = f"{prefix}-" if prefix else ""
    guards, radii = of(SpikeGuard), of(LRSafetyRadius)
    qats = of(QuantizationAwareTraining)
    quant = bool(of(QuantizationMonitor)) or any(getattr(q._stats, "every_n_steps", None) != 0 for q in qats)

    counters: list[str] = []
    if guards:
        counters.append(tags.SPIKES)
        if any(g.action in ("skip", "stop") for g in guards):
            counters.append(tags.SKIPPED_STEPS)
    if guards or of(MomentumReset) or any(q.reset_moments_on_start for q in qats):
        counters.append(tags.MOMENTUM_RESETS)
    control = any(r.mode == "control" for r in radii)
    all_counters = counters + ([tags.LR_SCALED_STEPS] if control else [])

    charts: dict[str, list[Any]] = {}
    charts["loss with spikes / skips / resets" if counters else "loss"] = [
        "Multiline", [user(loss_tag)] + [exact(t) for t in counters]
    ]
    if guards:
        charts["grad norm with skips / resets"] = ["Multiline", [exact(tags.GRAD_NORM)] + [exact(t) for t in counters[1:]]]
        z_tags = [tags.GRAD_NORM_Z] + ([tags.LOSS_Z] if any(g.monitor != "grad_norm" for g in guards) else [])
        charts["z-score vs threshold"] = ["Multiline", [exact(t) for t in z_tags] + [exact(Z_THRESHOLD)]]
    if all_counters:
        charts["spikes / skips / resets (cumulative)"] = ["Multiline", [exact(t) for t in all_counters]]
    if radii:
        ratio = [tags.LR_SAFETY_RATIO, LR_SAFETY_RATIO_LIMIT]
        if control:
            ratio += [LR_SAFETY_RATIO_TARGET, tags.LR_SCALE]
        charts["safety ratio r = τ/ρ_a vs r = 1"] = ["Multiline", [exact(t) for t in ratio]]
    if of(LearningRateMonitor):
        charts["learning rate"] = ["Multiline", [user(lr_tag)]]
    if of(SpikeAwareClipping):
        charts["clipped fraction"] = ["Multiline", [exact(tags.CLIPPED_FRACTION)]]
    if of(AdaptiveMomentum):
        charts["beta1 (adaptive momentum)"] = ["Multiline", [exact(tags.BETA1)]]
    if quant:
        charts["quant: layer error R"] = ["Multiline", [under(tags.QUANT_LAYER_ERROR)]]
        charts["quant: MMR"] = ["Multiline", [under(tags.QUANT_MMR)]]
        charts["quant: kurtosis"] = ["Multiline", [under(tags.QUANT_KURTOSIS)]]
    # the numerical-stability monitors (imported here, not at the top: they import the dashboard lazily)
    from lightning_optim.callbacks.opposing_signals import OpposingSignals
    from lightning_optim.callbacks.perpendicular_grad import PerpendicularGrad
    from lightning_optim.callbacks.softmax_collapse import SoftmaxCollapseMonitor
    from lightning_optim.callbacks.training_regime import TrainingRegime

    collapse = of(SoftmaxCollapseMonitor)
    if collapse:
        switched = [tags.SOFTMAX_COLLAPSE_SWITCHED] if any(c.on_collapse != "none" for c in collapse) else []
        collapse_tags = [tags.SOFTMAX_COLLAPSE, *switched]
        charts["softmax collapse (share of samples)"] = ["Multiline", [exact(t) for t in collapse_tags]]
    if of(PerpendicularGrad):
        charts["NLM alignment cos(w, g) before ⊥Grad"] = ["Multiline", [exact(tags.NLM_COSINE)]]
    if of(OpposingSignals):
        charts["opposing signals: group size"] = ["Multiline", [exact(tags.OPPOSING_GROUP_SIZE)]]
        charts["opposing signals: oscillation"] = ["Multiline", [exact(tags.OPPOSING_OSCILLATION)]]
        charts["opposing signals: opposing mass / flip fraction"] = [
            "Multiline", [exact(tags.OPPOSING_MASS), exact(tags.OPPOSING_FLIP_FRACTION)]
        ]
    if of(TrainingRegime):
        charts["training regime (0 chaotic, 1 transition, 2 stable)"] = ["Multiline", [exact(tags.REGIME)]]
        charts["activation cosine between probes"] = ["Multiline", [exact(tags.REGIME_COSINE)]]
    from lightning_optim.callbacks.adaptive_batch_size import AdaptiveBatchSize

    if of(AdaptiveBatchSize):
        charts["adaptive batch: accumulation and multiplier"] = [
            "Multiline", [exact(tags.ACCUMULATE_GRAD_BATCHES), exact(tags.BATCH_SIZE_MULTIPLIER)]
        ]
        charts["adaptive batch: norm test T (grows when T > 1)"] = ["Multiline", [exact(tags.NORM_TEST)]]
    return {title: charts}


def _tensorboard_loggers(trainer: pl.Trainer) -> list[_TensorBoardLogger]:
    return [logger for logger in trainer.loggers if isinstance(logger, _TensorBoardLogger)]


def _prefix(logger: _TensorBoardLogger) -> str:
    return str(getattr(logger, "_prefix", "") or "")
