"""TrainingRegime: chaotic / transition / stable from the drift of activations on a fixed probe batch (Leap+Verify)."""

from __future__ import annotations

import math
from typing import Any

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import Callback
from torch import Tensor, nn

from lightning_optim.callbacks._logging import log_scalars
from lightning_optim.callbacks.opposing_signals import ProbeSet
from lightning_optim.callbacks.softmax_collapse import model_logits
from lightning_optim.monitors import tags
from lightning_optim.monitors.modes import eval_mode
from lightning_optim.validation import check_int, check_range

#: the authors' thresholds (``phase2c_depth_sweep.py``): GPT-2 124M, probes every 50 steps, averaged over 5 seeds
LEAP_VERIFY_THRESHOLDS = (
    sum([0.9974827, 0.9979310, 0.9953635, 0.9961008, 0.9944700]) / 5,
    sum([0.9998489, 0.9996176, 0.9994301, 0.9993165, 0.9992327]) / 5,
)

CHAOTIC, TRANSITION, STABLE = 0, 1, 2
REGIME_NAMES = ("chaotic", "transition", "stable")


class TrainingRegime(Callback):
    r"""The training regime of Leap+Verify (McEntire, "Leap+Verify: Regime-Adaptive Speculative Weight
    Prediction for Accelerating Neural Network Training", arXiv 2602.19580): chaotic, transition or stable,
    from how much the model's representation of a fixed probe batch moved since the last probe.

    Every ``every_n_steps`` optimizer steps (after the step), the activation fingerprint of the probe batch
    is captured: the final hidden state (below), mean-pooled over the sequence for 3-D activations, one
    vector :math:`a_i` per probe sample. With the previous probe's :math:`a'_i`,

    .. math::
        s = \frac{1}{n}\sum_i \frac{a_i \cdot a'_i}{(\lVert a_i\rVert + 10^{-8})(\lVert a'_i\rVert + 10^{-8})}

    (the paper's "Lyapunov proxy": low similarity = the trajectory is chaotic) and the regime is 2
    (stable) if :math:`s \ge \tau_\text{high}`, 0 (chaotic) if :math:`s \le \tau_\text{low}`, else 1
    (transition). This is the authors' code (``src/regime/detect.py``: per-probe cosine with the 1e-8
    guards, mean over probes; the comparisons ``>=``/``<=``); the paper writes one cosine of the concatenated
    fingerprints instead, which weights the samples by their norms.

    Thresholds: ``thresholds=(τ_low, τ_high)``, by default the authors' values for GPT-2 124M with probes
    every 50 steps (:data:`LEAP_VERIFY_THRESHOLDS` ≈ (0.99627, 0.99949), averaged over their five seeds
    from the 30th and 70th percentiles of each run's similarities). They depend on the model, the
    learning rate and the cadence, so for other setups pass ``thresholds=None``: τ_low and τ_high are then
    the 30th and 70th percentiles of every similarity measured so far in this run (the authors'
    ``detect_regimes`` default, applied online; with a single value τ = s ± 0.001 as there).

    Probe batch: the first ``probe_size`` samples of the training dataloader at fit start (see
    :class:`OpposingSignals`; the authors use 100 fixed probe sentences), in the callback state.
    Fingerprint: the output of the submodule ``layer`` if given (the authors hook a named layer), else the
    *input* of the last ``nn.Linear`` of the module (the final hidden state that feeds the output head,
    which is what the authors' ``final_hidden`` resolves to for GPT-2 and LLaMA-style models), else the
    logits (protocol of :class:`SoftmaxCollapseMonitor`). Every module in eval mode, no grad, autocast off.

    Logs ``stability/regime_cosine`` (s) and ``stability/regime`` (0/1/2) from the second probe on (the first
    has nothing to compare with: the authors' "unknown"). ``stability/nlm_cosine`` is a different quantity
    (gradient–weight alignment, :class:`PerpendicularGrad`). :attr:`regime` and :attr:`similarity` hold the
    last values, :attr:`history` the (step, s, regime) of every probe. s is computed on rank 0's
    activations and broadcast, so every rank holds the same regime; the host reads s once per probe.

    Cost: one forward of the probe batch per probe; memory: one fingerprint (probe_size × width).

    Args:
        every_n_steps: probe cadence in optimizer steps (default 50, the authors' checkpoint interval).
        probe_size: samples in the probe batch (default 100, as the authors' probe set).
        thresholds: ``(τ_low, τ_high)`` with τ_low < τ_high, or None for the running percentiles (default:
            the authors' GPT-2 values).
        layer: qualified name of the submodule whose output is the fingerprint (default: the input of the
            last ``nn.Linear``).
    """

    def __init__(
        self,
        every_n_steps: int = 50,
        probe_size: int = 100,
        thresholds: tuple[float, float] | None = LEAP_VERIFY_THRESHOLDS,
        layer: str | None = None,
    ) -> None:
        check_int("every_n_steps", every_n_steps, 1)
        check_int("probe_size", probe_size, 1)
        if thresholds is not None:
            if not isinstance(thresholds, (tuple, list)) or len(thresholds) != 2:
                raise ValueError(f"Invalid thresholds: {thresholds!r}; must be (low, high) or None.")
            check_range("thresholds (low)", thresholds[0], -1.0, 1.0)
            check_range("thresholds (high)", thresholds[1], -1.0, 1.0)
            if not thresholds[0] < thresholds[1]:
                raise ValueError(f"Invalid thresholds: {tuple(thresholds)!r}; low must be below high.")
            thresholds = (float(thresholds[0]), float(thresholds[1]))
        if layer is not None and (not isinstance(layer, str) or not layer):
            raise ValueError(f"Invalid layer: {layer!r}; must be a submodule's qualified name or None.")
        self.every_n_steps = every_n_steps
        self.probe_size = probe_size
        self.thresholds = thresholds
        self.layer = layer
        self.probe: ProbeSet | None = None
        self.similarity: float | None = None
        self.regime: int | None = None
        self.history: list[tuple[int, float, int]] = []  # (global step, s, regime) of every compared probe
        self._fingerprint: Tensor | None = None  # the last probe's, (probe_size, width)
        self._last_probe_step: int | None = None

    # --- Lightning hooks -----------------------------------------------------------------------------
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        from lightning_optim.callbacks.dashboard import attach_dashboard  # it imports every callback

        attach_dashboard(trainer)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.layer is not None:
            names = dict(pl_module.named_modules())
            if self.layer not in names:
                raise ValueError(f"Invalid layer: {self.layer!r}; {type(pl_module).__name__} has no such submodule.")

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.probe is None:
            self.probe = ProbeSet.from_train_dataloader(trainer, self.probe_size, "TrainingRegime")

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        step = trainer.global_step
        if step == 0 or step % self.every_n_steps or step == self._last_probe_step or self.probe is None:
            return
        self._last_probe_step = step
        fingerprint = self.fingerprint(pl_module)
        previous, self._fingerprint = self._fingerprint, fingerprint
        if previous is None or previous.shape != fingerprint.shape:
            return
        s = _mean_cosine(previous, fingerprint)
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.broadcast(s, src=0)
        self.similarity = float(s)  # the probe's one host read
        self.regime = self.classify(self.similarity)
        self.history.append((step, self.similarity, self.regime))
        log_scalars(trainer, {tags.REGIME_COSINE: self.similarity, tags.REGIME: float(self.regime)})

    # --- the measurement -----------------------------------------------------------------------------
    @torch.no_grad()
    def fingerprint(self, pl_module: pl.LightningModule) -> Tensor:
        """The probe batch's pooled activations at the current weights, (probe_size, width) in float64."""
        assert self.probe is not None
        captured: list[Tensor] = []
        module, use_input = self._target(pl_module)

        def hook(mod: nn.Module, args: tuple[Any, ...], output: Any) -> None:
            value = args[0] if use_input else (output[0] if isinstance(output, tuple) else output)
            captured.append(_pool(value.detach()))

        handle = module.register_forward_hook(hook) if module is not None else None
        try:
            with eval_mode(pl_module), torch.autocast(pl_module.device.type, enabled=False):
                for batch in self.probe.chunks(pl_module.device):
                    count = len(captured)
                    logits = model_logits(pl_module, batch, None, "TrainingRegime")
                    if module is None:
                        captured.append(_pool(logits.detach()))
                    elif len(captured) > count + 1:  # the module ran more than once: keep its last call
                        del captured[count:-1]
        finally:
            if handle is not None:
                handle.remove()
        return torch.cat(captured).double()

    def _target(self, pl_module: pl.LightningModule) -> tuple[nn.Module | None, bool]:
        if self.layer is not None:
            return dict(pl_module.named_modules())[self.layer], False
        linears = [m for m in pl_module.modules() if isinstance(m, nn.Linear)]
        return (linears[-1], True) if linears else (None, False)

    def thresholds_now(self) -> tuple[float, float]:
        """(τ_low, τ_high) for the next classification: fixed, or the running 30th/70th percentiles."""
        if self.thresholds is not None:
            return self.thresholds
        seen = [s for _, s, _ in self.history] + ([self.similarity] if self.similarity is not None else [])
        values = torch.tensor([s for s in seen if math.isfinite(s)] or [0.0], dtype=torch.float64)
        low, high = (float(q) for q in torch.quantile(values, torch.tensor([0.3, 0.7], dtype=torch.float64)))
        if high <= low:  # the authors' guard for a degenerate distribution
            mid = (low + high) / 2
            low, high = mid - 0.001, mid + 0.001
        return low, high

    def classify(self, similarity: float) -> int:
        """0 chaotic, 1 transition, 2 stable (a non-finite similarity is chaotic)."""
        if not math.isfinite(similarity):
            return CHAOTIC
        low, high = self.thresholds_now()
        if similarity >= high:
            return STABLE
        if similarity <= low:
            return CHAOTIC
        return TRANSITION

    # --- checkpoints ---------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "probe": None if self.probe is None else self.probe.state_dict(),
            "fingerprint": None if self._fingerprint is None else self._fingerprint.cpu(),
            "similarity": self.similarity,
            "regime": self.regime,
            "history": [list(h) for h in self.history],
            "last_probe_step": self._last_probe_step,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        probe = state_dict.get("probe")
        self.probe = None if probe is None else ProbeSet.from_state(probe)
        fingerprint = state_dict.get("fingerprint")
        self._fingerprint = None if fingerprint is None else fingerprint.clone()
        self.similarity = state_dict.get("similarity")
        self.regime = state_dict.get("regime")
        self.history = [(int(a), float(b), int(c)) for a, b, c in state_dict.get("history", [])]
        self._last_probe_step = state_dict.get("last_probe_step")


def _pool(activation: Tensor) -> Tensor:
    """One vector per sample: as is for (B, D), the mean over positions for (B, T, D), flattened otherwise."""
    if activation.dim() == 3:
        return activation.float().mean(dim=1)
    return activation.float().reshape(activation.shape[0], -1)


def _mean_cosine(a: Tensor, b: Tensor) -> Tensor:
    a, b = a.to(b.device).double(), b.double()
    dots = (a * b).sum(dim=1)
    return (dots / ((a.norm(dim=1) + 1e-8) * (b.norm(dim=1) + 1e-8))).mean()
