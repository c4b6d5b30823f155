"""Sync-free z-score spike statistic for the gradient norm and the loss (docs/monitors.md, section 1)."""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
from torch import Tensor

__all__ = ["ZScore"]

_MODES = ("ema", "window")


class ZScore:
    r"""Running z-score of a scalar series with upward spike detection; every state lives on the device.

    Non-finite ``x`` always gives ``z = +inf`` and ``spike = True`` (also during warm-up) and never enters
    the statistics or the counts.

    Overflow safety: σ² is computed from squared deviations in the statistics dtype, so a single finite
    value whose square overflows it (1e30 in float32) would make σ² infinite for good, and every later z
    0 or NaN. A value is therefore only *usable* if :math:`|x| \le B = \sqrt{\text{finfo.max} / (8n)}`,
    ``n`` the buffer length (``warmup`` in EMA mode, ``window`` in window mode; float32, n = 50:
    B ≈ 9.2e17). Every accepted value, and so μ and every winsorised value, lies in [-B, B]: a squared
    deviation is at most 4B², a sum of them over the buffer at most finfo.max / 2, so σ² stays finite.
    A value beyond B is treated exactly like a non-finite one (``z = +inf``, spike, not counted): such a
    value cannot be represented in the statistic, and for a gradient norm or a loss it is a blow-up, not
    a sample of the series. This costs one comparison on the device, no host read. (Computing in float64
    instead would not be enough: the outlier would still dominate the EMA μ, σ for thousands of steps, and
    some devices, e.g. MPS, have no float64.)

    EMA mode (defaults follow ZClip, Kumar et al. 2025, arXiv 2504.02507: ``alpha=0.97``,
    ``threshold=2.5``, ``warmup=25``):

    1. the first ``warmup`` usable values fill a buffer, no decisions (``z = 0``, no spike); after the
       last one :math:`\mu` = mean and :math:`\sigma^2` = population variance of the buffer;
    2. then :math:`z = (x - \mu) / \max(\sigma, 10^{-4}|\mu|, 10^{-12})`, spike iff :math:`z >` threshold;
    3. update with the winsorised :math:`x' = x` (no spike) or :math:`\mu + \text{threshold}\cdot\sigma`:
       :math:`\delta = x' - \mu`, :math:`\mu \leftarrow \mu + (1-\alpha)\delta`,
       :math:`\sigma^2 \leftarrow \alpha(\sigma^2 + (1-\alpha)\delta^2)`.

    Window mode (OLMo-core's preset is ``threshold=6, window=128, min_count=64``): a ring buffer of the last
    ``window`` accepted values; no decision until it holds ``min_count`` values; :math:`\mu, \sigma` are the
    mean and population standard deviation of the buffer; spike iff :math:`x > \mu + \text{threshold}\cdot
    \sigma`; spikes are not inserted. ``z`` is reported with the same floor on :math:`\sigma` as in EMA mode.

    Buffers are allocated on the first :meth:`update`, on the device of ``x``: statistics in float64 if
    ``x`` is float64, else float32. ``update`` never reads a tensor on the host (no ``.item()``, no Python
    branch on a tensor value), so it can run every step without synchronising a GPU.
    """

    def __init__(
        self,
        mode: Literal["ema", "window"] = "ema",
        alpha: float = 0.97,
        threshold: float = 2.5,
        warmup: int = 25,
        window: int = 128,
        min_count: int = 64,
    ) -> None:
        if mode not in _MODES:
            raise ValueError(f"mode must be one of {_MODES}, got {mode!r}")
        if not 0.0 < alpha < 1.0:
            raise ValueError(f"alpha must be in (0, 1), got {alpha}")
        if not threshold > 0.0:
            raise ValueError(f"threshold must be > 0, got {threshold}")
        if int(warmup) != warmup or warmup < 1:
            raise ValueError(f"warmup must be an integer >= 1, got {warmup}")
        if int(window) != window or window < 1:
            raise ValueError(f"window must be an integer >= 1, got {window}")
        if int(min_count) != min_count or not 1 <= min_count <= window:
            raise ValueError(f"min_count must be an integer in [1, window={window}], got {min_count}")
        self.mode = mode
        self.alpha = float(alpha)
        self.threshold = float(threshold)
        self.warmup = int(warmup)
        self.window = int(window)
        self.min_count = int(min_count)
        # Device state, created lazily: count = usable values accepted so far (it also gives the fill and
        # the write position of the buffer), buf = warm-up buffer (EMA) or ring buffer (window).
        self._count: Tensor | None = None
        self._buf: Tensor | None = None
        self._mu: Tensor | None = None  # EMA mode only
        self._var: Tensor | None = None  # EMA mode only

    # ------------------------------------------------------------------ state
    def _init_state(self, device: torch.device, dtype: torch.dtype) -> None:
        size = self.warmup if self.mode == "ema" else self.window
        self._count = torch.zeros((), dtype=torch.int64, device=device)
        self._buf = torch.zeros(size, dtype=dtype, device=device)
        if self.mode == "ema":
            self._mu = torch.zeros((), dtype=dtype, device=device)
            self._var = torch.zeros((), dtype=dtype, device=device)

    def _ensure_state(self, x: Tensor) -> None:
        if self._buf is None:
            self._init_state(x.device, torch.float64 if x.dtype == torch.float64 else torch.float32)
        elif self._buf.device != x.device:  # state loaded from a checkpoint (CPU) or the input moved
            # non_blocking: a copy from pageable host memory is staged before returning, so this is safe
            # and avoids the stream synchronisation of a blocking host-to-device copy.
            def move(t: Tensor) -> Tensor:
                return t.to(x.device, non_blocking=True)

            self._count, self._buf = move(self._count), move(self._buf)
            if self.mode == "ema":
                self._mu, self._var = move(self._mu), move(self._var)

    def _buffer_stats(self) -> tuple[Tensor, Tensor]:
        """Mean and population variance of the filled part of the buffer (0 while it is empty)."""
        buf = self._buf
        n = torch.clamp(self._count, max=buf.numel())
        valid = torch.arange(buf.numel(), device=buf.device) < n
        n = n.clamp(min=1).to(buf.dtype)
        mu = torch.where(valid, buf, 0.0).sum() / n
        var = torch.where(valid, (buf - mu).square(), 0.0).sum() / n
        return mu, var

    @property
    def ready(self) -> Tensor:
        """0-dim bool device tensor: warm-up complete (EMA) or ``min_count`` values held (window)."""
        if self._count is None:
            return torch.zeros((), dtype=torch.bool)
        return self._count >= (self.warmup if self.mode == "ema" else self.min_count)

    @property
    def mean(self) -> Tensor:
        """Running mean μ (the "running value", e.g. the running gradient norm), 0-dim device tensor.

        EMA mode: μ once warm-up is complete, before that the mean of the values seen so far.
        Window mode: the mean of the ring buffer. 0 before the first value.
        """
        return self._stats()[0]

    @property
    def var(self) -> Tensor:
        """Running population variance σ², same conventions as :attr:`mean`."""
        return self._stats()[1]

    def _stats(self) -> tuple[Tensor, Tensor]:
        if self._buf is None:
            return torch.zeros(()), torch.zeros(())
        buf_mu, buf_var = self._buffer_stats()
        if self.mode == "window":
            return buf_mu, buf_var
        ready = self.ready
        return torch.where(ready, self._mu, buf_mu), torch.where(ready, self._var, buf_var)

    # ----------------------------------------------------------------- update
    @torch.no_grad()
    def update(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Feed one value; returns ``(z, is_spike)`` as 0-dim tensors on the device of ``x``."""
        x = torch.as_tensor(x).detach()
        self._ensure_state(x)
        x = x.reshape(()).to(self._buf.dtype)
        if self.mode == "ema":
            return self._update_ema(x)
        return self._update_window(x)

    def _usable(self, x: Tensor) -> Tensor:
        """|x| <= B (see the class docstring): finite and too small to overflow a sum of squared deviations.

        B is a Python float from the buffer's dtype and length, so the comparison reads nothing on the host;
        NaN compares False.
        """
        bound = math.sqrt(torch.finfo(self._buf.dtype).max / (8 * self._buf.numel()))
        return x.abs() <= bound

    def _z(self, x: Tensor, mu: Tensor, sigma: Tensor) -> Tensor:
        # Relative floor: a constant series (sigma = 0) gives z = 0 instead of 0/0.
        return (x - mu) / torch.maximum(sigma, 1e-4 * mu.abs()).clamp(min=1e-12)

    def _update_ema(self, x: Tensor) -> tuple[Tensor, Tensor]:
        count, buf, mu, var = self._count, self._buf, self._mu, self._var
        usable = self._usable(x)
        ready = count >= self.warmup
        sigma = var.sqrt()
        z = self._z(x, mu, sigma)
        spike = ~usable | (ready & (z > self.threshold))
        z = torch.where(usable, torch.where(ready, z, 0.0), math.inf)

        # EMA step with the winsorised value; applied only to usable values after warm-up.
        delta = torch.where(spike, mu + self.threshold * sigma, x) - mu
        mu_ema = mu + (1.0 - self.alpha) * delta
        var_ema = self.alpha * (var + (1.0 - self.alpha) * delta.square())

        # Warm-up: write x at position `count` through a device index; rewriting the old value when x is
        # not accepted keeps this a single unconditional kernel.
        write = usable & ~ready
        idx = count.clamp(max=self.warmup - 1).view(1)  # 1-element index: a 0-dim one is read as a Python int
        buf.index_put_((idx,), torch.where(write, x, buf.index_select(0, idx)))
        count.add_(usable.to(count.dtype))
        completes = write & (count == self.warmup)
        buf_var, buf_mu = torch.var_mean(buf, correction=0)

        take_ema = ready & usable
        mu.copy_(torch.where(take_ema, mu_ema, torch.where(completes, buf_mu, mu)))
        var.copy_(torch.where(take_ema, var_ema, torch.where(completes, buf_var, var)))
        return z, spike

    def _update_window(self, x: Tensor) -> tuple[Tensor, Tensor]:
        count, buf = self._count, self._buf
        usable = self._usable(x)
        ready = count >= self.min_count
        mu, var = self._buffer_stats()
        sigma = var.sqrt()
        spike = ~usable | (ready & (x > mu + self.threshold * sigma))
        z = torch.where(usable, torch.where(ready, self._z(x, mu, sigma), 0.0), math.inf)

        # Ring buffer: accepted values overwrite the oldest entry at count mod window.
        accept = ~spike
        idx = torch.remainder(count, self.window).view(1)
        buf.index_put_((idx,), torch.where(accept, x, buf.index_select(0, idx)))
        count.add_(accept.to(count.dtype))
        return z, spike

    # ------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        """Configuration plus CPU copies of the device state (``None`` before the first update).

        Plain ints, floats, strings and tensors only, so ``torch.load(weights_only=True)`` can read it.
        """

        def cpu(t: Tensor | None) -> Tensor | None:
            return None if t is None else t.detach().to("cpu", copy=True)

        return {
            "mode": self.mode,
            "alpha": self.alpha,
            "threshold": self.threshold,
            "warmup": self.warmup,
            "window": self.window,
            "min_count": self.min_count,
            "count": cpu(self._count),
            "buffer": cpu(self._buf),
            "mean": cpu(self._mu),
            "var": cpu(self._var),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`; the tensors move to the device of the next ``update``."""
        for key in ("mode", "warmup", "window"):  # they fix the meaning and the size of the buffers
            if state_dict[key] != getattr(self, key):
                raise ValueError(f"state_dict has {key}={state_dict[key]!r}, this ZScore has {getattr(self, key)!r}")
        self.alpha = float(state_dict["alpha"])
        self.threshold = float(state_dict["threshold"])
        self.min_count = int(state_dict["min_count"])

        def own(t: Tensor | None) -> Tensor | None:
            return None if t is None else t.detach().clone()

        self._count, self._buf = own(state_dict["count"]), own(state_dict["buffer"])
        self._mu, self._var = own(state_dict["mean"]), own(state_dict["var"])

    def __repr__(self) -> str:
        if self.mode == "ema":
            args = f"alpha={self.alpha}, threshold={self.threshold}, warmup={self.warmup}"
        else:
            args = f"threshold={self.threshold}, window={self.window}, min_count={self.min_count}"
        return f"{type(self).__name__}(mode={self.mode!r}, {args})"
