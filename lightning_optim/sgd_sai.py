"""SGD-SaI: SGD with momentum and learning-rate Scaling at Initialization by the gradient SNR."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any, Literal

import torch
from torch import Tensor

from lightning_optim._base import StateSpec, StepCountedOptimizer, as_compute, compiled, state_dtype, write_back
from lightning_optim.functional import decoupled_decay_, peak_abs
from lightning_optim.validation import check_compile, check_range, check_state_bits

__all__ = ["SGDSaI", "gsnr_candidates"]

PENDING = -1.0  # the value of ``state["gsnr"]`` until the tensor's g-SNR has been measured
_CHUNK = 1 << 22  # elements per multi-tensor measuring pass (bounds the scaled copy of the gradients)
_FRESH, _STILL_PENDING = 1.0, 2.0  # compiled step: mode 0 = EMA, 1 = m <- g, 2 = m <- 0


# -- the measurement -------------------------------------------------------------------------------------
def gsnr_candidates(grads: list[Tensor], eps: float, foreach: bool = False) -> list[Tensor]:
    """g-SNR = ‖g‖ / (σ(g) + ε) of each tensor, as 0-dim tensors, finite for every finite gradient.

    σ is the unbiased (n − 1) standard deviation over all entries of the tensor, taken as 0 for a
    one-element tensor (the authors' ``g.std().nan_to_num()``). Both ‖g‖ and σ scale with |g|, so they
    are taken of y = g / max|g| (entries in [−1, 1]) and g-SNR = ‖y‖ / (σ(y) + ε / max|g|), which is the
    same number and cannot overflow where ‖g‖ or g² would (an entry of 1e20 in fp32). A NaN or infinite
    gradient gives a non-finite value, an all-zero one gives 0 (or NaN with ε = 0); the caller decides.

    Args:
        grads: same-device gradients (compute copies: fp32 for half-precision gradients).
        eps: ε added to σ.
        foreach: take the reductions with ``torch._foreach_*`` over chunks of at most 2^22 elements (one
            scaled copy per chunk) instead of one tensor at a time.
    """
    out: list[Tensor] = []
    if not foreach:
        for g in grads:
            out.append(_candidates_of([g], eps, lambda ys: [y.std() for y in ys])[0])
        return out
    start = 0
    while start < len(grads):  # chunks: at least one tensor, at most _CHUNK elements otherwise
        stop, size = start, 0
        while stop < len(grads) and (stop == start or size + grads[stop].numel() <= _CHUNK):
            size += grads[stop].numel()
            stop += 1
        out += _candidates_of(grads[start:stop], eps, _foreach_stds)
        start = stop
    return out


def _foreach_stds(ys: list[Tensor]) -> list[Tensor]:
    """Unbiased standard deviations by two passes (mean, then ‖y − mean‖), the centring in place in ``ys``."""
    means = [y.mean() for y in ys]
    torch._foreach_sub_(ys, means)
    return [norm / math.sqrt(y.numel() - 1) for norm, y in zip(torch._foreach_norm(ys), ys)]


def _candidates_of(grads: list[Tensor], eps: float, stds_of: Any) -> list[Tensor]:
    out: list[Tensor | None] = [None] * len(grads)
    live = [i for i, g in enumerate(grads) if g.numel() > 0]
    for i, g in enumerate(grads):
        if g.numel() == 0:  # nothing to measure: stays pending (and has nothing to update)
            out[i] = torch.zeros((), dtype=g.dtype, device=g.device)
    if not live:
        return out  # type: ignore[return-value]
    xs = [grads[i] for i in live]
    peak = torch.stack(peak_abs(xs))
    safe = torch.where((peak > 0) & torch.isfinite(peak), peak, torch.ones_like(peak))
    ys = torch._foreach_div(xs, list(safe.unbind()))
    norms = torch.stack(torch._foreach_norm(ys))
    several = [i for i, y in enumerate(ys) if y.numel() > 1]
    stds = [torch.zeros_like(n) for n in norms.unbind()]  # σ := 0 for one entry (the authors' nan_to_num)
    for i, std in zip(several, stds_of([ys[i] for i in several]) if several else []):
        stds[i] = std
    snr = norms / (torch.stack(stds) + eps / safe)
    for i, value in zip(live, snr.unbind()):
        out[i] = value
    return out  # type: ignore[return-value]


def _measure_(grads: list[Tensor], gsnrs: list[Tensor], eps: float, foreach: bool) -> tuple[list[Tensor], list[Tensor]]:
    """Measure the g-SNR of the tensors still pending, in place; returns (was pending, measured now) masks.

    A measurement counts when it is finite and > 0; otherwise the tensor stays pending and is measured
    again on its next gradient. All decisions stay on the device (0-dim bool tensors).
    """
    candidates = gsnr_candidates(grads, eps, foreach)
    was, fresh = [], []
    for gsnr, c in zip(gsnrs, candidates):
        pending = gsnr < 0
        took = pending & torch.isfinite(c) & (c > 0)
        gsnr.copy_(torch.where(took, c.to(gsnr.dtype), gsnr))
        was.append(pending)
        fresh.append(took)
    return was, fresh


# -- the host's knowledge of which tensors are measured -----------------------------------------------------
class _MeasuredCache:
    """Which g-SNR tensors the host knows to hold a measurement: only those skip the measuring work.

    A hint, never saved and never deciding a result: every step's values follow from the device state
    alone (a tensor measured on the device but not yet known here goes through the masked update, which
    gives the same bits as the plain one). An entry is valid while it is the same tensor object at the
    same version, so a state replaced by ``load_state_dict``, restored by an undo (``copy_``) or moved to
    another device is measured-or-not afresh. The host learns a measurement without a sync: CPU tensors
    are read directly, CUDA flags are copied to pinned memory without blocking and read at a later step
    once their event has completed; other devices read once (a sync, only on steps that measure).
    """

    def __init__(self) -> None:
        self.known: dict[int, tuple[Tensor, int]] = {}
        self.inflight: list[tuple[Any, Tensor, list[tuple[Tensor, int]]]] = []
        self.modes: dict[int, list[Any]] = {}  # compiled groups: id(gsnr) -> [gsnr, mode tensor, dirty]

    def __deepcopy__(self, memo: dict[int, Any]) -> _MeasuredCache:
        return _MeasuredCache()

    def __reduce__(self) -> tuple[type, tuple[()]]:
        return (_MeasuredCache, ())

    def is_known(self, gsnr: Tensor) -> bool:
        entry = self.known.get(id(gsnr))
        return entry is not None and entry[0] is gsnr and entry[1] == gsnr._version

    def poll(self) -> None:
        waiting = []
        for event, flags, tensors in self.inflight:
            if event is not None and not event.query():
                waiting.append((event, flags, tensors))
                continue
            self._learn(flags.tolist(), tensors)  # a host copy: no device read
        self.inflight = waiting

    def watch(self, gsnrs: list[Tensor]) -> None:
        by_device: dict[torch.device, list[Tensor]] = {}
        for t in gsnrs:
            by_device.setdefault(t.device, []).append(t)
        for device, tensors in by_device.items():
            flags = torch.stack([t >= 0 for t in tensors])
            versions = [(t, t._version) for t in tensors]
            if device.type == "cpu":
                self._learn(flags.tolist(), versions)
            elif device.type == "cuda":
                host = torch.empty(flags.shape, dtype=torch.bool, pin_memory=True)
                host.copy_(flags, non_blocking=True)
                event = torch.cuda.Event()
                event.record()
                self.inflight.append((event, host, versions))
            else:  # pragma: no cover - no such device in CI
                self._learn(flags.cpu().tolist(), versions)

    def _learn(self, flags: list[bool], tensors: list[tuple[Tensor, int]]) -> None:
        for measured, (t, version) in zip(flags, tensors):
            if measured and t._version == version:
                self.known[id(t)] = (t, version)

    def mode(self, gsnr: Tensor) -> list[Any]:
        entry = self.modes.get(id(gsnr))
        if entry is None or entry[0] is not gsnr:
            entry = self.modes[id(gsnr)] = [gsnr, torch.zeros((), dtype=gsnr.dtype, device=gsnr.device), False]
        return entry


# -- the optimizer ---------------------------------------------------------------------------------------
class SGDSaI(StepCountedOptimizer):
    r"""SGD-SaI: SGD with momentum whose learning rate is scaled per tensor by its g-SNR at initialization.

    Xu, Xiang, Cai & Wen, "No More Adam: Learning Rate Scaling at Initialization is All You Need"
    (arXiv 2412.11768); the authors' code is ``sgd_sai/sgd_sai.py`` of AnonymousAlethiometer/SGD_SaI
    (v1.0.3). For each parameter tensor, with g its gradient, n its number of entries and σ the unbiased
    standard deviation of its entries (σ = 0 when n = 1):

    .. math::
        \text{first gradient: } s = \|g\|_2 / (\sigma(g) + \epsilon) \text{ (fixed from then on)},\quad m = g \\
        \text{later steps: } m \leftarrow \mu m + (1 - \mu) g \\
        \theta \leftarrow \theta (1 - \eta\lambda) - \eta\, s\, m

    s is measured once per tensor, on the first gradient the tensor receives (a parameter whose first
    gradient arrives late is measured then), and kept in ``state["gsnr"]`` as a 0-dim tensor, so a resume
    continues with the same scales. Weight decay is decoupled and scaled by η only (not by s), as in the
    authors' code. The defaults are the authors': η = 1e-2, μ = 0.9, ε = 1e-8, λ = 1e-2.

    Args:
        params: parameters or param groups (every argument below may be overridden per group).
        lr: learning rate η (default 1e-2); the step of a tensor is η·s.
        momentum: μ of the momentum EMA m ← μ·m + (1 − μ)·g, in [0, 1) (default 0.9); 0 is plain SGD
            with the g-SNR scales.
        eps: ε added to σ in the g-SNR (default 1e-8).
        weight_decay: decoupled λ, θ ← θ·(1 − η·λ) before the update (default 1e-2).
        state_bits: 32 (fp32 momentum) or 8: block-wise dynamic 8-bit momentum (signed map,
            ``lightning_optim.lowbit``) for parameters with >= 4096 elements, 1.02 bytes per parameter
            instead of 4; smaller tensors keep fp32. Each such tensor is dequantized, updated with the same
            equations and requantized, one at a time. Keep embeddings in a ``state_bits=32`` group.
        foreach: multi-tensor path (default: on for CUDA params); the g-SNR reductions then run with
            ``torch._foreach_norm`` over chunks of tensors.
        compile: run the update through ``torch.compile`` (default False): one fused graph per device and
            dtype, with η and the per-tensor modes as device tensors, so it compiles once and never syncs.
            The measurement itself (steps on which some tensor is not measured yet) runs eagerly before
            it. ``compile=True`` with ``state_bits=8`` raises ``ValueError``.

    Deviations from the authors' code, all in cases their code does not handle or crashes on:

    - One closure call per step (their first ``step`` calls the closure twice: once to measure, once to
      update). Our first step measures on the same gradient it updates with.
    - A parameter without a gradient at the first step is measured on its own first gradient (their
      code raises ``KeyError`` on ``state["gsnr"]``).
    - A measurement that is not finite (a NaN/inf entry in that gradient, or a one-element tensor with
      |g|/ε beyond the state dtype) or is 0 (an all-zero gradient, e.g. a gradient zeroed by SpikeGuard,
      or LoRA's A matrix while B is still zero) does not count: the tensor stays pending (no update,
      momentum kept at 0, weight decay still applied) and is measured on its next gradient. The
      authors would keep NaN (poisoning the tensor for good) or 0 (freezing it for good).
    - ``momentum=0`` is plain SGD with the scales (their code raises ``UnboundLocalError``); the
      momentum buffer is still kept.
    - The g-SNR is computed overflow-safe (see :func:`gsnr_candidates`), and without host syncs (their
      update reads s on the host for every parameter and step).
    - fp32 state and math for bf16/fp16 parameters.

    State per parameter: ``momentum_buffer`` (m: 4 bytes per parameter, half of AdamW's state; 8-bit:
    ``momentum_buffer_codes`` uint8 + ``momentum_buffer_absmax`` fp32 per 256-block) and ``gsnr`` (a
    0-dim tensor on the parameter's device; −1 until measured). Sharded (DTensor) parameters are not
    supported: the g-SNR of a shard is not that of the tensor.
    """

    state_spec = StateSpec(
        moments={"momentum_buffer": True}, first_moment="momentum_buffer", counters=(), scalars=("gsnr",)
    )

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-2,
        momentum: float = 0.9,
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        *,
        state_bits: Literal[32, 8] = 32,
        foreach: bool | None = None,
        compile: bool = False,
    ) -> None:
        defaults = dict(
            lr=lr,
            momentum=momentum,
            eps=eps,
            weight_decay=weight_decay,
            state_bits=state_bits,
            foreach=foreach,
            compile=compile,
        )
        super().__init__(params, defaults)

    def _validate_group(self, group: dict[str, Any]) -> None:
        check_range("lr", group["lr"], 0.0)
        check_range("momentum", group["momentum"], 0.0, 1.0, high_open=True)
        check_range("eps", group["eps"], 0.0)
        check_range("weight_decay", group["weight_decay"], 0.0)
        check_compile(group["compile"])
        check_state_bits(group["state_bits"], group["compile"])

    def _init_state(self, p: Tensor, group: dict[str, Any]) -> dict[str, Any]:
        state = self.state[p]
        if "gsnr" not in state:
            state["gsnr"] = torch.full((), PENDING, dtype=state_dtype(p), device=p.device)
        return super()._init_state(p, group)

    def _cache(self) -> _MeasuredCache:
        return self.__dict__.setdefault("_measured", _MeasuredCache())

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state dict (see :meth:`StepCountedOptimizer.load_state_dict`); which tensors are measured
        is read from the loaded ``gsnr`` values on the next step."""
        super().load_state_dict(state_dict)
        self.__dict__.pop("_measured", None)

    def _step(self, step: int) -> None:
        cache = self._cache()
        cache.poll()
        for group in self.param_groups:
            params = self._params_with_grad(group, "SGDSaI")
            if not params:
                continue
            if any(type(p).__name__ == "DTensor" for p in params):
                raise NotImplementedError(
                    "SGDSaI does not support sharded (DTensor/FSDP2) parameters: the g-SNR of a shard differs "
                    "from the tensor's. Use DDP or a non-sharded strategy."
                )
            states = [self._init_state(p, group) for p in params]
            maybe = [not cache.is_known(s["gsnr"]) for s in states]
            hyper = dict(
                lr=group["lr"], momentum=group["momentum"], eps=group["eps"], weight_decay=group["weight_decay"]
            )
            if group["compile"]:  # never 8-bit: validation rejects compile=True with state_bits=8
                self._compiled_group_step(params, states, maybe, **hyper)
            else:
                full, low_bit = self._split_by_layout(states)
                if full:
                    fn = _sgd_sai_foreach if self._use_foreach(group, params) else _sgd_sai_single_tensor
                    fn(
                        [params[i] for i in full],
                        [params[i].grad for i in full],
                        [states[i]["momentum_buffer"] for i in full],
                        [states[i]["gsnr"] for i in full],
                        [maybe[i] for i in full],
                        **hyper,
                    )
                for i in low_bit:  # dequantize -> update -> requantize, one tensor at a time
                    p, state = params[i], states[i]
                    with self._low_bit_moments(p, state) as (buf,):
                        _sgd_sai_single_tensor([p], [p.grad], [buf], [state["gsnr"]], [maybe[i]], **hyper)
            cache.watch([s["gsnr"] for s, m in zip(states, maybe) if m])

    def _compiled_group_step(
        self,
        params: list[Tensor],
        states: list[dict[str, Any]],
        maybe: list[bool],
        *,
        lr: float,
        momentum: float,
        eps: float,
        weight_decay: float,
    ) -> None:
        cache = self._cache()
        gsnrs = [s["gsnr"] for s in states]
        entries = [cache.mode(t) for t in gsnrs]
        pending = [i for i, m in enumerate(maybe) if m]
        for i, entry in enumerate(entries):
            if not maybe[i] and entry[2]:  # known now: back to the plain EMA
                entry[1].zero_()
                entry[2] = False
        if pending:
            lists = [[params[i].grad for i in pending], [gsnrs[i] for i in pending]]
            grouped = self._group_tensors_by_device_and_dtype(lists, with_indices=True)
            for (grads, dev_gsnrs), indices in grouped.values():
                was, fresh = _measure_(as_compute(grads), dev_gsnrs, eps, foreach=True)
                for k, w, f in zip(indices, was, fresh):
                    entry = entries[pending[k]]
                    mode = torch.where(f, _FRESH, _STILL_PENDING)
                    entry[1].copy_(torch.where(w, mode, 0.0))
                    entry[2] = True
        bufs = [s["momentum_buffer"] for s in states]
        lists = [params, [p.grad for p in params], bufs, gsnrs, [e[1] for e in entries]]
        for dev_lists, _ in self._group_tensors_by_device_and_dtype(lists).values():
            device = dev_lists[0][0].device
            compiled(_sgd_sai_capturable)(
                *dev_lists, self._device_scalar("lr", device, lr), momentum=momentum, weight_decay=weight_decay
            )


# -- the steps ---------------------------------------------------------------------------------------------
def _ema_(bufs: list[Tensor], grads: list[Tensor], momentum: float) -> None:
    """m ← μ·m + (1 − μ)·g in place (m ← g for μ = 0, so a non-finite m is not carried on)."""
    if momentum == 0:
        torch._foreach_copy_(bufs, grads)
        return
    torch._foreach_mul_(bufs, momentum)
    torch._foreach_add_(bufs, grads, alpha=1 - momentum)


def _first_momentum_(bufs: list[Tensor], grads: list[Tensor], was: list[Tensor], fresh: list[Tensor]) -> None:
    """For tensors pending before this step: m ← g where measured now, else m ← 0 (sync-free selects)."""
    for buf, g, w, f in zip(bufs, grads, was, fresh):
        buf.copy_(torch.where(w, torch.where(f, g, 0.0), buf))


def _sgd_sai_single_tensor(
    params: list[Tensor],
    grads: list[Tensor],
    bufs: list[Tensor],
    gsnrs: list[Tensor],
    maybe: list[bool],
    *,
    lr: float,
    momentum: float,
    eps: float,
    weight_decay: float,
) -> None:
    """Reference path: the equations one tensor at a time (``maybe``: the host does not know it measured)."""
    for param, grad, buf, gsnr, unknown in zip(params, grads, bufs, gsnrs, maybe):
        p32, g32 = as_compute([param, grad])
        if momentum == 0:
            buf.copy_(g32)
        else:
            buf.mul_(momentum).add_(g32, alpha=1 - momentum)
        scale = gsnr
        if unknown:
            was, fresh = _measure_([g32], [gsnr], eps, foreach=False)
            _first_momentum_([buf], [g32], was, fresh)
            scale = gsnr.clamp_min(0.0)
        decoupled_decay_(p32, lr, weight_decay)
        p32.addcmul_(buf, scale * -lr)
        write_back([param], [p32])


def _sgd_sai_foreach(
    params: list[Tensor],
    grads: list[Tensor],
    bufs: list[Tensor],
    gsnrs: list[Tensor],
    maybe: list[bool],
    *,
    lr: float,
    momentum: float,
    eps: float,
    weight_decay: float,
) -> None:
    """Multi-tensor path, grouped by device and dtype; the measurement only for the tensors in ``maybe``."""
    grouped = StepCountedOptimizer._group_tensors_by_device_and_dtype([params, grads, bufs, gsnrs], with_indices=True)
    for (dev_params, dev_grads, dev_bufs, dev_gsnrs), indices in grouped.values():
        p32, g32 = as_compute(dev_params), as_compute(dev_grads)
        _ema_(dev_bufs, g32, momentum)
        scales = list(dev_gsnrs)
        unknown = [k for k, i in enumerate(indices) if maybe[i]]
        if unknown:
            was, fresh = _measure_([g32[k] for k in unknown], [dev_gsnrs[k] for k in unknown], eps, foreach=True)
            _first_momentum_([dev_bufs[k] for k in unknown], [g32[k] for k in unknown], was, fresh)
            for k in unknown:
                scales[k] = dev_gsnrs[k].clamp_min(0.0)
        decoupled_decay_(p32, lr, weight_decay)
        torch._foreach_addcmul_(p32, dev_bufs, torch._foreach_mul(scales, -lr))
        write_back(dev_params, p32)


def _sgd_sai_capturable(
    params: list[Tensor],
    grads: list[Tensor],
    bufs: list[Tensor],
    gsnrs: list[Tensor],
    modes: list[Tensor],
    lr: Tensor,
    *,
    momentum: float,
    weight_decay: float,
) -> None:
    """The update for ``torch.compile``: EMA, the per-tensor mode select, decay and the scaled step, with η
    and the modes (0 EMA, 1 m ← g, 2 m ← 0) as device tensors; the selects fuse into the EMA kernel."""
    p32, g32 = as_compute(params), as_compute(grads)
    _ema_(bufs, g32, momentum)
    for buf, g, mode in zip(bufs, g32, modes):
        buf.copy_(torch.where(mode == 0, buf, torch.where(mode == _FRESH, g, 0.0)))
    decoupled_decay_(p32, lr, weight_decay)
    steps = [gsnr.clamp_min(0.0) * -lr for gsnr in gsnrs]
    torch._foreach_addcmul_(p32, bufs, steps)
    write_back(params, p32)
