"""OpposingSignals: groups of training samples whose losses move in opposite directions (Rosenfeld & Risteski)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import lightning.pytorch as pl
import torch
import torch.distributed as dist
import torch.nn.functional as F
from lightning.fabric.loggers.tensorboard import TensorBoardLogger as _TensorBoardLogger
from lightning.fabric.utilities.apply_func import move_data_to_device
from lightning.pytorch.callbacks import Callback
from lightning_utilities.core.apply_func import apply_to_collection
from torch import Tensor
from torch.utils.data import DataLoader, IterableDataset

from lightning_optim.callbacks._logging import log_scalars
from lightning_optim.callbacks.softmax_collapse import model_logits
from lightning_optim.monitors import tags
from lightning_optim.monitors.modes import eval_mode
from lightning_optim.monitors.numerics import loss_delta_stats, stablemax_cross_entropy
from lightning_optim.validation import check_int

LossFn = Callable[[pl.LightningModule, Any], Tensor]

HISTORY = 8  # probes whose groups are kept (callback state)


class OpposingSignals(Callback):
    r"""Find the training samples with *opposing signals* (Rosenfeld & Risteski, "Outliers with Opposing
    Signals Have an Outsized Effect on Neural Network Optimization", ICLR 2024, arXiv 2311.04163) and log
    how hard they pull against each other.

    The paper identifies paired groups of outliers whose gradients point in opposite directions: around an
    instability one group's loss rises while the other's falls, and the roles alternate until the overall
    loss spikes. It finds them by tracking the loss of individual training samples and taking those whose
    loss changes most over one iteration, split into the ones that got worse and the ones that got
    better. This callback runs that criterion on a fixed probe set:

    1. Probe set: the first ``probe_size`` samples the training dataloader yields at fit start (its
       sampler and dataset are read directly, so the training order and every RNG are left as they are),
       kept in the callback state with their dataset indices (positions in the stream for an
       ``IterableDataset``). Saved in checkpoints; a resumed run probes the same samples.
    2. Every ``every_n_steps`` optimizer steps: per-sample losses :math:`\ell_\text{before}` at the weights
       just before that step (``on_before_optimizer_step``) and :math:`\ell_\text{after}` just after it,
       every module in eval mode, no grad, autocast off, in chunks of the loader's batch size;
       :math:`\Delta = \ell_\text{after} - \ell_\text{before}` (rank 0's Δ is broadcast, so every rank
       holds the same groups).
    3. Groups: the ``top_k`` samples with the largest :math:`|\Delta|`, split by the sign of Δ into the
       rising group :math:`G_+` and the falling group :math:`G_-` (the paper's "largest change in loss").
       They oppose each other when both are non-empty.

    Logged at the probe step (one host transfer per probe, the only sync):

    - ``stability/opposing_signals/group_size``: :math:`\min(|G_+|, |G_-|)` (0: the largest movers all
      moved the same way, no opposing groups);
    - ``stability/opposing_signals/oscillation``: mean Δ over :math:`G_+` minus mean Δ over :math:`G_-`
      (loss units; 0 without opposing groups): how far apart the two groups moved in one step;
    - ``stability/opposing_signals/opposing_mass``: :math:`\min(\sum_{\Delta>0}\Delta, -\sum_{\Delta<0}\Delta)
      / \sum|\Delta|` over the whole probe set (0.5: an even tug of war);
    - ``stability/opposing_signals/flip_fraction``: share of the previous probe's top-k whose Δ changed
      sign now (the alternation the paper describes).

    The last two are this project's constructions (``monitors.loss_delta_stats``). The groups are named in
    :attr:`groups` (the last probe: step, dataset indices and Δ of :math:`G_+` and :math:`G_-`),
    :attr:`history` (the last 8 probes) and, with a TensorBoardLogger, in a text summary
    ``stability/opposing_signals/groups`` (``add_text``).

    Per-sample losses: ``loss_fn(pl_module, batch) -> Tensor[B]`` if given, else
    ``pl_module.probe_losses(batch)`` if defined, else the cross-entropy of the logits (the protocol of
    :class:`SoftmaxCollapseMonitor`) against ``batch[1]``, averaged over every position of a sample (the
    tokens of a sequence); StableMax cross-entropy when ``pl_module.loss == "stablemax"``.

    Cost: two forwards over the probe set per probe. Memory: the probe set on the device and two loss
    vectors. The paper tracks every training sample and inspects the groups by eye; the probe set and the
    logged statistics are how this callback makes that cheap and automatic.

    Args:
        probe_size: samples in the probe set (default 1024, >= 2).
        every_n_steps: probe cadence in optimizer steps (default 250, >= 1).
        top_k: samples with the largest |Δ| that form the two groups (default 16, >= 2).
        loss_fn: ``(pl_module, batch) -> per-sample losses`` for models the default protocol does not fit.
    """

    def __init__(
        self,
        probe_size: int = 1024,
        every_n_steps: int = 250,
        top_k: int = 16,
        loss_fn: LossFn | None = None,
    ) -> None:
        check_int("probe_size", probe_size, 2)
        check_int("every_n_steps", every_n_steps, 1)
        check_int("top_k", top_k, 2)
        if loss_fn is not None and not callable(loss_fn):
            raise ValueError(f"Invalid loss_fn: {loss_fn!r}; must be callable as loss_fn(pl_module, batch).")
        self.probe_size = probe_size
        self.every_n_steps = every_n_steps
        self.top_k = top_k
        self.loss_fn = loss_fn
        self.probe: ProbeSet | None = None
        self.groups: dict[str, Any] | None = None  # the last probe's groups
        self.history: list[dict[str, Any]] = []  # the last HISTORY probes' groups
        self.probes = 0
        self._previous_top: tuple[Tensor, Tensor] | None = None
        self._before: Tensor | None = None
        self._before_step: int | None = None

    # --- Lightning hooks -----------------------------------------------------------------------------
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        from lightning_optim.callbacks.dashboard import attach_dashboard  # it imports every callback

        attach_dashboard(trainer)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.probe is None:
            self.probe = ProbeSet.from_train_dataloader(trainer, self.probe_size, "OpposingSignals")

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        step = trainer.global_step + 1  # the 1-based index of the step about to be taken
        if step % self.every_n_steps or step == self._before_step or self.probe is None:
            return
        self._before_step = step
        self._before = self.losses(pl_module)

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self._before is None or trainer.global_step != self._before_step:
            return
        before, self._before = self._before, None
        self._record(trainer, before, self.losses(pl_module))

    # --- the probe -----------------------------------------------------------------------------------
    @torch.no_grad()
    def losses(self, pl_module: pl.LightningModule) -> Tensor:
        """Per-sample losses of the probe set at the current weights (float32, on the module's device)."""
        assert self.probe is not None
        chunks = []
        with eval_mode(pl_module), torch.autocast(pl_module.device.type, enabled=False):
            for batch in self.probe.chunks(pl_module.device):
                chunks.append(per_sample_losses(pl_module, batch, self.loss_fn, "OpposingSignals").float())
        return torch.cat(chunks)

    def _record(self, trainer: pl.Trainer, before: Tensor, after: Tensor) -> None:
        assert self.probe is not None
        delta = after - before
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.broadcast(delta, src=0)  # identical weights give identical losses; make it exact
        stats = loss_delta_stats(torch.zeros_like(delta), delta, self.top_k, self._previous_top)
        top, sign = stats["top_abs"], stats["top_abs_sign"]
        self._previous_top = (top, sign)
        # the one host transfer of a probe: the top-k and the scalars
        packed = torch.cat([
            delta[top].double(), sign.double(), top.double(),
            torch.stack([stats["opposing_mass"], stats["flip_fraction"]]).double(),
        ]).cpu().tolist()
        k = top.numel()
        top_delta, top_sign, top_pos = packed[:k], packed[k:2 * k], [int(i) for i in packed[2 * k:3 * k]]
        opposing_mass, flip_fraction = packed[3 * k], packed[3 * k + 1]
        rising = [(self.probe.indices[i], d) for i, d, s in zip(top_pos, top_delta, top_sign) if s > 0]
        falling = [(self.probe.indices[i], d) for i, d, s in zip(top_pos, top_delta, top_sign) if s < 0]
        opposed = bool(rising and falling)
        oscillation = 0.0
        if opposed:
            oscillation = sum(d for _, d in rising) / len(rising) - sum(d for _, d in falling) / len(falling)
        step = trainer.global_step
        self.groups = {
            "step": step,
            "increase": [i for i, _ in rising],
            "decrease": [i for i, _ in falling],
            "delta_increase": [d for _, d in rising],
            "delta_decrease": [d for _, d in falling],
            "oscillation": oscillation,
        }
        self.history = (self.history + [self.groups])[-HISTORY:]
        self.probes += 1
        log_scalars(trainer, {
            tags.OPPOSING_GROUP_SIZE: float(min(len(rising), len(falling))),
            tags.OPPOSING_OSCILLATION: oscillation,
            tags.OPPOSING_MASS: opposing_mass,
            tags.OPPOSING_FLIP_FRACTION: flip_fraction,
        })
        if trainer.is_global_zero:
            text = self.summary()
            for logger in trainer.loggers:
                if isinstance(logger, _TensorBoardLogger):
                    logger.experiment.add_text(f"{tags.OPPOSING_SIGNALS}/groups", text, global_step=step)

    def summary(self) -> str:
        """The last probe's groups in one Markdown paragraph (also written to TensorBoard as text)."""
        if self.groups is None:
            return "OpposingSignals: no probe yet."
        g = self.groups

        def listed(indices: list[int], deltas: list[float]) -> str:
            return ", ".join(f"{i} ({d:+.3g})" for i, d in zip(indices, deltas)) or "none"

        return (
            f"Step {g['step']}: loss rose on samples {listed(g['increase'], g['delta_increase'])}; "
            f"fell on samples {listed(g['decrease'], g['delta_decrease'])} "
            f"(dataset index (Δloss); oscillation {g['oscillation']:.3g})."
        )

    # --- checkpoints ---------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        previous = None if self._previous_top is None else [t.cpu() for t in self._previous_top]
        return {
            "probe": None if self.probe is None else self.probe.state_dict(),
            "groups": self.groups,
            "history": list(self.history),
            "probes": self.probes,
            "previous_top": previous,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        probe = state_dict.get("probe")
        self.probe = None if probe is None else ProbeSet.from_state(probe)
        self.groups = state_dict.get("groups")
        self.history = list(state_dict.get("history", []))
        self.probes = int(state_dict.get("probes", 0))
        previous = state_dict.get("previous_top")
        self._previous_top = None if previous is None else (previous[0].clone(), previous[1].clone())
        self._before = None
        self._before_step = None


# --- the probe set (shared with TrainingRegime) ------------------------------------------------------------
class ProbeSet:
    """A fixed set of training samples as one collated batch on the CPU, with their dataset indices."""

    def __init__(self, batch: Any, indices: list[int], chunk_size: int) -> None:
        self.batch = batch
        self.indices = indices
        self.chunk_size = max(1, int(chunk_size))
        self._on_device: tuple[torch.device, Any] | None = None

    def __len__(self) -> int:
        return len(self.indices)

    @classmethod
    def from_train_dataloader(cls, trainer: pl.Trainer, size: int, owner: str) -> ProbeSet:
        """The first ``size`` samples of the training dataloader, without touching its order or any RNG.

        The dataloader comes from the same source Lightning uses (a fresh one from the ``train_dataloader``
        hook of the module or datamodule, or the instance passed to ``fit``). For a map-style dataset its
        batch sampler is read for the indices and the samples are collated with the loader's own
        ``collate_fn``; otherwise the loader is iterated. Either runs in a forked CPU RNG.
        """
        source = getattr(trainer.fit_loop, "_data_source", None)
        with torch.random.fork_rng(devices=[]):
            loader = source.dataloader() if source is not None and source.is_defined() else trainer.train_dataloader
            if not isinstance(loader, DataLoader):
                raise TypeError(
                    f"{owner} needs a single torch DataLoader for training, got {type(loader).__name__}."
                )
            if not isinstance(loader.dataset, IterableDataset) and loader.batch_sampler is not None:
                indices: list[int] = []
                for chunk in loader.batch_sampler:
                    indices.extend(int(i) for i in chunk)
                    if len(indices) >= size:
                        break
                indices = indices[:size]
                batch = loader.collate_fn([loader.dataset[i] for i in indices])
            else:
                batches, count = [], 0
                for item in loader:
                    batches.append(item)
                    count += _batch_len(item)
                    if count >= size:
                        break
                batch = _slice(_concat(batches), 0, size)
                indices = list(range(min(size, count)))
        if not indices:
            raise ValueError(f"{owner}: the training dataloader yielded no samples for the probe set.")
        return cls(batch, indices, loader.batch_size or len(indices))

    def chunks(self, device: torch.device) -> list[Any]:
        """The probe set on ``device`` in chunks of the loader's batch size (moved once, then cached)."""
        if self._on_device is None or self._on_device[0] != device:
            self._on_device = (device, move_data_to_device(self.batch, device))
        batch = self._on_device[1]
        return [_slice(batch, i, i + self.chunk_size) for i in range(0, len(self), self.chunk_size)]

    def state_dict(self) -> dict[str, Any]:
        return {"batch": self.batch, "indices": list(self.indices), "chunk_size": self.chunk_size}

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> ProbeSet:
        return cls(state["batch"], [int(i) for i in state["indices"]], int(state["chunk_size"]))


def per_sample_losses(pl_module: pl.LightningModule, batch: Any, loss_fn: LossFn | None, owner: str) -> Tensor:
    """One loss per sample of ``batch``: ``loss_fn``, ``probe_losses`` or the (StableMax) cross-entropy."""
    if loss_fn is not None:
        losses = loss_fn(pl_module, batch)
    elif callable(getattr(pl_module, "probe_losses", None)):
        losses = pl_module.probe_losses(batch)
    else:
        if not (isinstance(batch, (tuple, list)) and len(batch) >= 2 and isinstance(batch[1], Tensor)):
            raise TypeError(
                f"{owner}: cannot compute per-sample losses of a {type(batch).__name__} batch; define "
                f"`probe_losses(self, batch) -> Tensor` (one loss per sample) or pass {owner}(loss_fn=...)."
            )
        logits, target = model_logits(pl_module, batch, None, owner), batch[1]
        flat_logits, flat_target = logits.reshape(-1, logits.shape[-1]), target.reshape(-1)
        if getattr(pl_module, "loss", None) == "stablemax":
            flat = stablemax_cross_entropy(flat_logits.double(), flat_target, reduction="none").float()
        else:
            flat = F.cross_entropy(flat_logits.float(), flat_target.long(), reduction="none")
        losses = flat.reshape(target.shape[0], -1).mean(dim=1)
    if not isinstance(losses, Tensor) or losses.dim() != 1:
        shape = tuple(losses.shape) if isinstance(losses, Tensor) else type(losses).__name__
        raise TypeError(f"{owner}: per-sample losses must be a 1-D tensor (one loss per sample), got {shape}.")
    return losses


def _batch_len(batch: Any) -> int:
    if isinstance(batch, Tensor):
        return batch.shape[0]
    if isinstance(batch, Mapping):
        return _batch_len(next(iter(batch.values())))
    if isinstance(batch, (tuple, list)) and batch:
        return _batch_len(batch[0])
    raise TypeError(f"Cannot tell the number of samples of a {type(batch).__name__} batch.")


def _concat(batches: list[Any]) -> Any:
    first = batches[0]
    if isinstance(first, Tensor):
        return torch.cat(batches)
    if isinstance(first, Mapping):
        return {key: _concat([b[key] for b in batches]) for key in first}
    if isinstance(first, (tuple, list)):
        return type(first)(_concat(list(parts)) for parts in zip(*batches))
    return first  # a non-tensor leaf (e.g. a name): the first batch's


def _slice(batch: Any, start: int, stop: int) -> Any:
    return apply_to_collection(batch, Tensor, lambda t: t[start:stop] if t.dim() > 0 else t)
