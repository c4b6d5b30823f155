"""HessianEstimator: the extra backward that AdaHessian, SophiaH and SophiaG need, in automatic optimization."""

from __future__ import annotations

import contextlib
import math
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from torch import Tensor
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from lightning_optim.functional import safe_norms
from lightning_optim.hessian import GNB, HUTCHINSON, HessianOptimizerMixin, hutchinson_diagonal, mix_seed, sample_labels

__all__ = ["HessianEstimator"]

_GNB_SALT = 0x6E62  # keeps the label-sampling streams apart from the probe streams


class HessianEstimator(Callback):
    """Computes the curvature estimate of the second-order optimizers so a plain ``training_step`` trains them.

    Add it next to an :class:`~lightning_optim.AdaHessian`, :class:`~lightning_optim.SophiaH` or
    :class:`~lightning_optim.SophiaG` optimizer (from YAML: ``trainer.callbacks``); nothing else changes.
    What it does, on the steps the optimizer asks for (``optimizer.hessian_due``; ``update_every`` of the
    optimizer: every step for AdaHessian, every 10th for Sophia):

    - **Hutchinson** (AdaHessian, SophiaH), in ``on_before_backward``: g = ∂L/∂θ with ``create_graph=True``
      (``torch.autograd.grad``, so DDP's gradient hooks do not fire and Lightning's own backward still runs
      on the retained graph), then H z for the optimizer's probes (seeded by (seed, step, parameter)), and
      D = mean z ⊙ H z. With gradient accumulation the micro-batches' D are summed (the same probes on every
      micro-batch, so the sum is the estimate for the accumulated loss, which Lightning has already divided
      by the number of micro-batches). A GradScaler's scale is divided out; an estimate that overflowed in
      fp16 is dropped for that step, as the GradScaler drops overflowed gradients (the optimizer then keeps
      its curvature EMA; this check reads one flag on the host per Hessian step, with a GradScaler only).
      In ``on_before_optimizer_step``
      the sum is averaged across DDP ranks and handed to the optimizer, which uses it in that step only (a
      step the GradScaler skips drops it). Cost on a Hessian step: one backward with ``create_graph=True``
      plus one Hessian-vector product per probe, on top of the usual backward.
    - **Gauss-Newton-Bartlett** (SophiaG), in ``on_train_batch_end`` after every k-th optimizer step: one extra
      forward of the batch for the logits, labels ŷ sampled from their softmax (seeded by (seed, step,
      rank)), one backward of the mean cross-entropy on ŷ; ĝ is averaged across ranks, clipped like the
      training gradients when the Trainer clips (``gradient_clip_val``, as the authors' loop clips it), and
      ``optimizer.update_hessian(batch_size=B, grads=ĝ)`` folds B·ĝ⊙ĝ into h (B: sampled labels on all ranks).

    Logits for GNB: the LightningModule's ``hessian_logits(batch) -> Tensor`` if it defines one, else
    ``pl_module(batch[0])`` for a tuple/list batch (``pl_module(batch)`` for a tensor batch), e.g. the GPT of
    ``lightning_optim.examples.gpt`` (``forward(x)`` returns logits of shape (B, T, V)). The last dimension
    is the class dimension; every other position is one label (B counts them all).

    Composes with DDP (``strategy="ddp"``: every rank ends each step with the same optimizer state),
    gradient accumulation, ``16-mixed`` (GradScaler) and ``bf16-mixed``. Not supported: sharded strategies
    (FSDP, DeepSpeed: the Hessian-vector product needs the full parameters) and modules whose backward
    cannot be differentiated twice (``torch.compile``d modules for Hutchinson).

    Args:
        clip_gnb_gradient: clip the GNB gradient ĝ with the Trainer's ``gradient_clip_val`` /
            ``gradient_clip_algorithm`` before it is squared (default True, as the authors' loop).
        math_attention: during the forward of a Hutchinson step (from ``on_train_batch_start`` to the
            backward), restrict ``scaled_dot_product_attention`` to PyTorch's math kernel: the flash and
            memory-efficient kernels have no double backward (default True; other steps keep the fast ones).
    """

    def __init__(self, clip_gnb_gradient: bool = True, math_attention: bool = True) -> None:
        for name, value in (("clip_gnb_gradient", clip_gnb_gradient), ("math_attention", math_attention)):
            if not isinstance(value, bool):
                raise ValueError(f"Invalid {name}: {value!r}; it must be True or False.")
        self.clip_gnb_gradient = clip_gnb_gradient
        self.math_attention = math_attention
        self._attention: contextlib.ExitStack | None = None
        self._sums: dict[int, tuple[int, dict[Tensor, Tensor]]] = {}  # id(optimizer) -> (step, param -> ΣD)
        self._steps_at_batch_start: dict[int, int] = {}
        self._scaled: dict[int, bool] = {}  # id(optimizer) -> the estimate came from a GradScaler-scaled loss

    # -- which optimizers ---------------------------------------------------------------------------------
    @staticmethod
    def _targets(trainer: pl.Trainer, kind: str) -> list[Any]:
        return [o for o in trainer.optimizers if isinstance(o, HessianOptimizerMixin) and o.hessian_estimator == kind]

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not any(isinstance(o, HessianOptimizerMixin) for o in trainer.optimizers):
            found = ", ".join(type(o).__name__ for o in trainer.optimizers) or "none"
            raise ValueError(
                "HessianEstimator works with the second-order optimizers AdaHessian, SophiaH and SophiaG (found: "
                f"{found}). Remove the callback, or configure one of them."
            )
        strategy = type(trainer.strategy).__name__
        if "FSDP" in strategy or "DeepSpeed" in strategy or "ModelParallel" in strategy:
            raise ValueError(
                f"HessianEstimator does not support the sharded strategy {strategy}: the Hessian-vector product needs "
                "the full parameters. Use strategy='ddp' (or a single device)."
            )
        self._sums.clear()

    # -- Hutchinson ---------------------------------------------------------------------------------------------
    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: Tensor) -> None:
        try:
            self._hutchinson(trainer, loss)
        finally:
            self._leave_math_attention()  # the forward is done: the usual backward may use any kernel

    def _hutchinson(self, trainer: pl.Trainer, loss: Tensor) -> None:
        if not isinstance(loss, Tensor) or not loss.requires_grad:
            return
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        scale = getattr(scaler, "_scale", None) if scaler is not None else None  # the loss arrives scaled
        for optimizer in self._targets(trainer, HUTCHINSON):
            step = optimizer.param_groups[0].get("global_step", 0) + 1
            if not optimizer.hessian_due(step):
                continue
            due = [(g, m) for g, m in optimizer.hessian_settings() if optimizer._group_due(g, step)]
            members = [(i, p) for _, m in due for i, p in m if p.requires_grad]
            if not members:
                continue
            with torch.enable_grad():
                grads = torch.autograd.grad(loss, [p for _, p in members], create_graph=True, allow_unused=True)
            by_param = {p: g for (_, p), g in zip(members, grads)}
            kept = self._sums.get(id(optimizer))
            sums = kept[1] if kept is not None and kept[0] == step else {}
            for group, group_members in due:
                live = [(i, p) for i, p in group_members if p in by_param]
                estimates = hutchinson_diagonal(
                    [by_param[p] for _, p in live], [p for _, p in live], [i for i, _ in live],
                    seed=group["seed"], step=step, n_samples=group["n_samples"], probe=group["probe"],
                )
                for (_, p), d in zip(live, estimates):
                    if d is None:
                        continue
                    if scale is not None:
                        d = d / scale.to(d.dtype)
                    sums[p] = sums[p] + d if p in sums else d
            del grads, by_param  # frees the graph of the gradients (the forward graph stays for the backward)
            self._sums[id(optimizer)] = (step, sums)
            self._scaled[id(optimizer)] = scale is not None

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        kept = self._sums.pop(id(optimizer), None)
        if kept is None or not isinstance(optimizer, HessianOptimizerMixin):
            return
        step, sums = kept
        if step != optimizer.param_groups[0].get("global_step", 0) + 1 or not sums:
            return
        params = list(sums)
        values = _mean_over_ranks(trainer, [sums[p] for p in params])
        scaled = self._scaled.pop(id(optimizer), False)
        if scaled and not bool(torch.stack([torch.isfinite(v).all() for v in values]).all()):
            # fp16: H z of the scaled loss overflowed. Like the GradScaler with its gradients, drop the estimate
            # of this step (one host read per Hessian step, with a GradScaler only; the same on every rank)
            optimizer.set_hessian_estimate({}, step=step)
            return
        optimizer.set_hessian_estimate(dict(zip(params, values)), step=step)

    # -- Gauss-Newton-Bartlett --------------------------------------------------------------------------------
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        for optimizer in self._targets(trainer, GNB):
            self._steps_at_batch_start[id(optimizer)] = optimizer.param_groups[0].get("global_step", 0)
        hutchinson = self._targets(trainer, HUTCHINSON)
        due = any(o.hessian_due(o.param_groups[0].get("global_step", 0) + 1) for o in hutchinson)
        if self.math_attention and due:
            from torch.nn.attention import SDPBackend, sdpa_kernel

            self._leave_math_attention()
            self._attention = contextlib.ExitStack()
            self._attention.enter_context(sdpa_kernel([SDPBackend.MATH]))

    def _leave_math_attention(self) -> None:
        if self._attention is not None:
            self._attention.close()
            self._attention = None

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._leave_math_attention()

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._leave_math_attention()

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._leave_math_attention()
        targets = []
        for optimizer in self._targets(trainer, GNB):
            step = optimizer.param_groups[0].get("global_step", 0)
            stepped = step > self._steps_at_batch_start.get(id(optimizer), step)
            if stepped and optimizer.hessian_due(step):
                targets.append((optimizer, step))
        if targets:
            self._gnb(trainer, pl_module, batch, targets)

    def _gnb(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, targets: list[tuple[Any, int]]
    ) -> None:
        with torch.enable_grad(), trainer.precision_plugin.forward_context():
            logits = _logits(pl_module, batch)
        logits = logits.reshape(-1, logits.shape[-1])
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        scale = getattr(scaler, "_scale", None) if scaler is not None else None
        for optimizer, step in targets:
            params = optimizer.hessian_params()
            want = [p for p in params if p.requires_grad]
            seed = optimizer.param_groups[0]["seed"]
            gen = torch.Generator(device=logits.device)
            gen.manual_seed(mix_seed(seed, step, trainer.global_rank, _GNB_SALT))
            labels = sample_labels(logits, gen)
            with torch.enable_grad():
                loss = F.cross_entropy(logits.float(), labels)
                if scale is not None:  # keep fp16 activations' gradients from underflowing, as the GradScaler does
                    loss = loss * scale.to(loss.dtype)
                grads = torch.autograd.grad(loss, want, retain_graph=len(targets) > 1, allow_unused=True)
            present = [(p, g) for p, g in zip(want, grads) if g is not None]
            if not present:
                continue
            values = [g.detach() for _, g in present]
            values = [v.float() if v.dtype in (torch.float16, torch.bfloat16) else v for v in values]
            if scale is not None:
                values = [v / scale.to(v.dtype) for v in values]
            values = _mean_over_ranks(trainer, values)
            # an overflowed estimate (fp16) carries no information: NaN keeps h where it is (update_hessian)
            values = [torch.where(torch.isfinite(v), v, torch.full_like(v, math.nan)) for v in values]
            if self.clip_gnb_gradient and trainer.gradient_clip_val:
                _clip_like_trainer(values, float(trainer.gradient_clip_val), trainer.gradient_clip_algorithm)
            by_param = {p: v for (p, _), v in zip(present, values)}
            optimizer.update_hessian(
                batch_size=labels.numel() * trainer.world_size, grads=[by_param.get(p) for p in params]
            )


def _logits(pl_module: pl.LightningModule, batch: Any) -> Tensor:
    """The logits GNB samples from: ``hessian_logits(batch)`` if defined, else the module applied to the inputs."""
    hook = getattr(pl_module, "hessian_logits", None)
    if callable(hook):
        out = hook(batch)
    elif isinstance(batch, (tuple, list)) and batch:
        out = pl_module(batch[0])
    elif isinstance(batch, Tensor):
        out = pl_module(batch)
    else:
        out = None
    if not isinstance(out, Tensor) or out.ndim < 2 or not out.is_floating_point():
        raise TypeError(
            "HessianEstimator (SophiaG) needs the model's logits: define `hessian_logits(self, batch) -> Tensor` on "
            f"{type(pl_module).__name__} returning scores of shape (..., num_classes), or make `forward(batch[0])` "
            f"return them (got {type(out).__name__} from the batch of type {type(batch).__name__})."
        )
    return out


def _mean_over_ranks(trainer: pl.Trainer, values: list[Tensor]) -> list[Tensor]:
    """The element-wise mean of each tensor over the DDP ranks (one all-reduce per device and dtype)."""
    if trainer.world_size <= 1:
        return values
    out: list[Tensor | None] = [None] * len(values)
    buckets: dict[tuple[torch.device, torch.dtype], list[int]] = {}
    for i, v in enumerate(values):
        buckets.setdefault((v.device, v.dtype), []).append(i)
    for indices in buckets.values():
        chunk = [values[i] for i in indices]
        flat = trainer.strategy.reduce(_flatten_dense_tensors(chunk), reduce_op="mean")
        for i, v in zip(indices, _unflatten_dense_tensors(flat, chunk)):
            out[i] = v
    return out  # type: ignore[return-value]


def _clip_like_trainer(values: list[Tensor], clip_val: float, algorithm: str | None) -> None:
    """Clip ĝ in place like Lightning clips gradients: by the global 2-norm (sync-free) or by value."""
    if algorithm == "value":
        torch._foreach_clamp_min_(values, -clip_val)
        torch._foreach_clamp_max_(values, clip_val)
        return
    finite = [torch.nan_to_num(v, nan=0.0) for v in values]
    total = torch.stack([n.double() for n in safe_norms(finite)]).square().sum().sqrt()
    coef = (clip_val / (total + 1e-6)).clamp(max=1.0)
    torch._foreach_mul_(values, coef.to(values[0].dtype))
