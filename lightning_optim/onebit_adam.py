"""1-bit Adam: Adam during a warm-up, then a frozen variance and 1-bit compressed momentum (docs/algorithms.md#onebitadam).

Pieces:

- :class:`OneBitAdam`, the optimizer. Its compressed momentum all-reduce uses ``torch.distributed``
  directly (the default process group, as Lightning's DDP sets it up); without a process group (or with
  one rank) it runs the same two-stage compression arithmetic locally, with no communication.
- :func:`onebit_comm_hook`, a DDP communication hook: the usual mean all-reduce of a gradient bucket
  during the warm-up, and no communication at all (each rank keeps its LOCAL gradient) for the buckets
  whose parameters are all in OneBitAdam groups past their ``freeze_step``.
- ``lightning_optim.callbacks.OneBitAdamDDP``, the Lightning callback that installs the hook on the strategy's
  ``DistributedDataParallel`` model in ``on_fit_start`` (``Trainer(strategy="ddp",
  callbacks=[OneBitAdamDDP()])``). Lightning's own ``DDPStrategy(ddp_comm_hook=...)`` is not enough: it
  registers hooks on CUDA only and silently ignores them on CPU/gloo. Without the hook DDP keeps
  averaging gradients in backward, which stays correct (the ranks still agree) but saves nothing; the
  optimizer warns once when that happens after the warm-up. Without Lightning:
  ``ddp_model.register_comm_hook(None, onebit_comm_hook)``.
- the compression primitives (:func:`padded_numel`, :func:`compress_with_feedback_`, :func:`pack_bits`,
  :func:`unpack_bits`), pure torch, used by the optimizer and by the tests.

Pure torch: this module does not import Lightning.
"""

from __future__ import annotations

import math
import warnings
import weakref
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor
from torch.utils.weak import WeakIdKeyDictionary

from lightning_optim._base import StateSpec, StepCountedOptimizer, as_compute, write_back
from lightning_optim.functional import adam_denom, adam_step_, adam_step_foreach_, decoupled_decay_, safe_norms
from lightning_optim.state_adapters import KeyedStateAdapter, register_state_adapter
from lightning_optim.validation import check_betas, check_bool, check_int, check_range

__all__ = [
    "OneBitAdam",
    "compress_with_feedback_",
    "onebit_comm_hook",
    "pack_bits",
    "padded_numel",
    "unpack_bits",
]

_LOW_PRECISION = (torch.float16, torch.bfloat16)
_SHIFTS: dict[torch.device, Tensor] = {}


@dataclass(frozen=True)
class OneBitStateSpec(StateSpec):
    """:class:`~lightning_optim._base.StateSpec` plus the compression-error buffers (flat, padded, created at
    the first compressed step; saved and loaded, zeroed by a moment reset, not parameter-shaped)."""

    errors: tuple[str, ...] = ()

    @property
    def keys(self) -> tuple[str, ...]:
        return (*self.moments, *self.counters, *self.scalars, *self.errors)


# -- compression primitives -------------------------------------------------------------------------------
def padded_numel(numel: int, world_size: int) -> int:
    """DeepSpeed's buffer length: ``numel`` rounded up to a multiple of W·lcm(W, 8), so every rank's chunk
    (length / W) is a whole number of bytes of sign bits.

    Args:
        numel: entries of the tensor.
        world_size: W, the number of ranks.
    """
    unit = world_size * math.lcm(world_size, 8)
    return -(-numel // unit) * unit


def compress_with_feedback_(buffer: Tensor, error: Tensor) -> tuple[Tensor, Tensor]:
    """Error-compensated 1-bit compression of a flat buffer; ``error`` is updated in place.

    x = buffer + e; C(x) = s·sign(x) with s = ‖x‖₂/√n (so ‖C(x)‖₂ = ‖x‖₂, the scale of the paper and of
    DeepSpeed's backends) and sign(x) = +1 where x ≥ 0 (zeros, −0.0 and NaN included, as DeepSpeed's
    ``sign().add_(1).bool()``), −1 where x < 0; e ← x − C(x). The norm is overflow-safe
    (:func:`~lightning_optim.functional.safe_norms`): an entry above √(fp32 max) gives a finite scale.

    Args:
        buffer: the values to send (flat, same length as ``error``); not modified.
        error: the feedback e (flat), overwritten with the new error.

    Returns:
        (s, negative): the 0-dim scale and the bool mask of the −1 entries, i.e. C(x) = where(negative, −s, s).
    """
    error.add_(buffer)  # error now holds x
    scale = safe_norms([error])[0] / math.sqrt(error.numel())
    negative = error < 0
    error.sub_(torch.where(negative, -scale, scale))
    return scale, negative


def _shifts(device: torch.device) -> Tensor:
    if device not in _SHIFTS:
        _SHIFTS[device] = torch.arange(7, -1, -1, dtype=torch.uint8, device=device)
    return _SHIFTS[device]


def pack_bits(bits: Tensor) -> Tensor:
    """Pack a bool tensor whose last dimension is a multiple of 8 into uint8 (most significant bit first).

    Args:
        bits: bool tensor (..., 8k).
    """
    grouped = bits.reshape(*bits.shape[:-1], -1, 8).to(torch.uint8) << _shifts(bits.device)
    return grouped.sum(-1, dtype=torch.uint8)


def unpack_bits(packed: Tensor) -> Tensor:
    """Inverse of :func:`pack_bits`: uint8 (..., k) to bool (..., 8k).

    Args:
        packed: uint8 tensor.
    """
    bits = (packed.unsqueeze(-1) >> _shifts(packed.device)) & 1
    return bits.reshape(*packed.shape[:-1], -1).bool()


def _to_bytes(values: Tensor) -> Tensor:
    return values.contiguous().view(torch.uint8)


def _from_bytes(raw: Tensor, dtype: torch.dtype) -> Tensor:
    return raw.contiguous().view(dtype)


# -- DDP communication hook ----------------------------------------------------------------------------------
# parameter -> (weak reference to its OneBitAdam, param group index); filled by OneBitAdam.add_param_group
_OWNERS: WeakIdKeyDictionary = WeakIdKeyDictionary()


def _local_gradients(params: Iterable[Tensor]) -> bool:
    """Whether every parameter belongs to a OneBitAdam group whose next step is a compressed one."""
    seen = False
    owners = []
    for p in params:
        entry = _OWNERS.get(p)
        optimizer = entry[0]() if entry is not None else None
        if optimizer is None or entry[1] >= len(optimizer.param_groups):
            return False
        group = optimizer.param_groups[entry[1]]
        if group.get("global_step", 0) < group["freeze_step"]:
            return False
        owners.append(optimizer)
        seen = True
    for optimizer in owners:
        optimizer.__dict__["_local_grads_step"] = optimizer.param_groups[0].get("global_step", 0)
    return seen


def onebit_comm_hook(state: Any, bucket: dist.GradBucket) -> torch.futures.Future[Tensor]:
    """DDP communication hook for :class:`OneBitAdam`: skips the gradient all-reduce after the warm-up.

    A bucket is returned unreduced (no communication; each rank keeps its local gradient, which the
    optimizer folds into its momentum before the compressed momentum all-reduce) when every parameter
    in it belongs to a OneBitAdam param group whose next step T = global_step + 1 exceeds its
    ``freeze_step``. Any other bucket (warm-up, parameters of another optimizer) gets DDP's usual
    mean all-reduce (divide by W, sum). The decision reads only the optimizer's step counter, which is
    identical on every rank.

    Args:
        state: a ``torch.distributed.ProcessGroup`` to reduce over, or None for the default group (what
            ``DDPStrategy(ddp_comm_hook=onebit_comm_hook)`` passes).
        bucket: DDP's gradient bucket.
    """
    tensor = bucket.buffer()
    if _local_gradients(bucket.parameters()):
        future: torch.futures.Future[Tensor] = torch.futures.Future()
        future.set_result(tensor)
        return future
    group = state if isinstance(state, dist.ProcessGroup) else None
    tensor.div_(dist.get_world_size(group))
    work = dist.all_reduce(tensor, group=group, async_op=True)
    return work.get_future().then(lambda fut: fut.value()[0])


# DDP checks the hook's annotations as objects (this module's postponed annotations are strings)
onebit_comm_hook.__annotations__ = {
    "state": Any, "bucket": dist.GradBucket, "return": torch.futures.Future[torch.Tensor]
}


# -- the optimizer -----------------------------------------------------------------------------------------
def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    return 1, 0


class OneBitAdam(StepCountedOptimizer):
    r"""1-bit Adam: Adam during ``freeze_step`` warm-up steps, then the variance frozen and the momentum
    exchanged in 1 bit per entry with worker and server error feedback.

    Tang et al., "1-bit Adam: Communication Efficient Large-Scale Training with Adam's Convergence Speed",
    ICML 2021 (arXiv 2102.02888); authors' code: DeepSpeed ``deepspeed/runtime/fp16/onebit/adam.py`` and the
    compressed all-reduce of ``deepspeed/runtime/comm/{nccl,compressed}.py``. For the global step T
    (1-based), t the parameter's own step count, W ranks, rank r, g the gradient of this rank:

    .. math::
        T \le T_w:\quad m \leftarrow \beta_1 m + (1-\beta_1) g,\ v \leftarrow \beta_2 v + (1-\beta_2) g^2
            \quad(g \text{ all-reduced by DDP: plain Adam}) \\
        T > T_w:\quad m \leftarrow \beta_1 m + (1-\beta_1) g \quad(g \text{ local}, v \text{ frozen}) \\
        x = m + e_w,\ \hat m = s_w \operatorname{sign}(x),\ s_w = \lVert x\rVert_2/\sqrt{n},
            \ e_w \leftarrow x - \hat m \\
        y = \tfrac1W \textstyle\sum_j \hat m_j[\text{chunk } r] + e_s,\ \bar m_r = s_s \operatorname{sign}(y),
            \ e_s \leftarrow y - \bar m_r \quad(\text{rank } r \text{ serves chunk } r) \\
        m \leftarrow \bar m = [\bar m_0, \dots, \bar m_{W-1}] \quad(\text{all-gathered: identical on every rank}) \\
        \theta \leftarrow \theta(1 - \eta\lambda) - \eta\, \frac{m / (1-\beta_1^t)}{\sqrt{v/(1-\beta_2^{t_v})} + \epsilon}

    with t_v the number of warm-up steps that updated v, sign(0) = +1, and x, e_w zero-padded to n =
    :func:`padded_numel` entries (DeepSpeed's buffer layout). Each rank sends W·(n/W)/8 bytes of signs plus
    its scale in one ``all_to_all_single`` and n/W/8 bytes plus the server scale in one ``all_gather``
    per (param group, device, dtype) and step, instead of DDP's 4n-byte all-reduce. With no process
    group or one rank the same arithmetic runs locally (W = 1: both compressions and both errors
    apply; DeepSpeed skips the compression at one rank, see docs). Under DDP, install
    :func:`onebit_comm_hook` (Lightning: the ``lightning_optim.callbacks.OneBitAdamDDP`` callback) so backward stops
    all-reducing gradients after the warm-up.

    Args:
        params: parameters or param groups (every argument below may be overridden per group).
        lr: learning rate η (default 1e-3, DeepSpeed's).
        betas: (β1, β2) (default (0.9, 0.999), DeepSpeed's).
        eps: ε added to √v̂ as in torch Adam (default 1e-8, DeepSpeed's; DeepSpeed also adds it to √v).
        weight_decay: decoupled decay λ, θ ← θ·(1 − ηλ) before the update (default 0). DeepSpeed adds λθ to
            the update, which is the same step.
        freeze_step: T_w, warm-up steps of plain Adam (default 100000, DeepSpeed's; its tutorial uses
            15-25% of the run, e.g. 23000 for BERT-large, 400 for SQuAD fine-tuning). Must be >= 1 (the
            frozen v needs a warm-up).
        bias_correction: divide m by 1 − β1^t and v by 1 − β2^{t_v} as torch Adam (default True: the
            warm-up is torch Adam exactly). False reproduces DeepSpeed's arithmetic, which never
            bias-corrects (its ``bias_correction`` argument is stored but unused).
        cuda_aware: DeepSpeed's MPI-backend flag. True hands device tensors to the collectives as they
            are (NCCL, CUDA-aware MPI); False (default) stages the 1-bit messages of CUDA tensors through
            host memory unless the process group's backend is NCCL (e.g. gloo with CUDA parameters).
        foreach: multi-tensor path for the element-wise stages (default: on for CUDA params); the
            compression itself is per tensor (one scale per tensor, as DeepSpeed).

    Deviations from DeepSpeed (docs/algorithms.md#onebitadam): bias correction by default (see
    ``bias_correction``); no dummy first step (DeepSpeed's first ``step`` only allocates buffers and
    updates nothing); compression at one rank; the sign messages and the scales travel in 2 collectives
    per group instead of 4 per tensor (same bytes, same arithmetic); the errors are kept by
    ``load_state_dict`` in a single process (DeepSpeed always resets them; under a process group of
    more than one rank we reset them too, because a checkpoint holds one rank's errors); no
    ``exp_avg_mask``, ``max_grad_norm``, ``eps_inside_sqrt`` (unused by DeepSpeed's step) or AMSGrad.
    NaN/inf gradients after the warm-up make the whole tensor's scale non-finite (as in DeepSpeed);
    finite ones keep the weights finite (overflow-safe norms; half-precision weights saturate at their
    largest finite value instead of rounding to inf). Every rank must have gradients for the same
    parameters (DDP guarantees it). State per parameter: ``exp_avg``, ``exp_avg_sq`` (fp32 for
    bf16/fp16 parameters), ``step`` and ``exp_avg_sq_step`` (CPU float32), and after the warm-up
    ``worker_error`` (n entries, padded) and ``server_error`` (n/W): 16 bytes/param at W = 1, 12 + 4/W
    in general.
    """

    state_spec = OneBitStateSpec(
        moments={"exp_avg": True, "exp_avg_sq": False},
        first_moment="exp_avg",
        second_moment="exp_avg_sq",
        counters=("step", "exp_avg_sq_step"),
        errors=("worker_error", "server_error"),
    )

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        freeze_step: int = 100000,
        bias_correction: bool = True,
        *,
        cuda_aware: bool = False,
        foreach: bool | None = None,
    ) -> None:
        defaults = dict(
            lr=lr,
            betas=tuple(betas),
            eps=eps,
            weight_decay=weight_decay,
            freeze_step=freeze_step,
            bias_correction=bias_correction,
            cuda_aware=cuda_aware,
            foreach=foreach,
        )
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        index = len(self.param_groups) - 1
        ref = weakref.ref(self)
        for p in self.param_groups[index]["params"]:
            _OWNERS[p] = (ref, index)

    def _validate_group(self, group: dict[str, Any]) -> None:
        check_range("lr", group["lr"], 0.0)
        check_betas(group["betas"])
        check_range("eps", group["eps"], 0.0)
        check_range("weight_decay", group["weight_decay"], 0.0)
        check_int("freeze_step", group["freeze_step"], 1)
        check_bool("bias_correction", group["bias_correction"])
        check_bool("cuda_aware", group["cuda_aware"])
        if group["foreach"] is not None:
            check_bool("foreach", group["foreach"])

    def _init_state(self, p: Tensor, group: dict[str, Any]) -> dict[str, Any]:
        state = self.state[p]
        if "step" in state and "exp_avg_sq_step" not in state:  # converted from Adam: v had `step` updates
            state["exp_avg_sq_step"] = state["step"].detach().to(device="cpu", dtype=torch.float32).clone()
        return super()._init_state(p, group)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """As :meth:`StepCountedOptimizer.load_state_dict`; the compression errors are kept in a single
        process (bit-exact resume) and dropped under a process group of more than one rank (a checkpoint
        holds one rank's errors; they restart at zero, as DeepSpeed always does)."""
        super().load_state_dict(state_dict)
        if _world()[0] > 1:
            for state in self.state.values():
                for key in self.state_spec.errors:
                    state.pop(key, None)

    # -- stepping -----------------------------------------------------------------------------------
    def _step(self, step: int) -> None:
        world, rank = _world()
        for group in self.param_groups:
            params = self._params_with_grad(group, "OneBitAdam")
            if not params:
                continue
            states = [self._init_state(p, group) for p in params]
            foreach = self._use_foreach(group, params)
            if step <= group["freeze_step"]:
                self._warmup(group, params, states, foreach)
            else:
                if world > 1 and self.__dict__.get("_local_grads_step") != step - 1:
                    self._warn_no_hook()
                self._compressed(group, params, states, foreach, world, rank)

    @staticmethod
    def _warn_no_hook() -> None:
        warnings.warn(
            "OneBitAdam: past freeze_step, but DDP all-reduced the gradients in backward (no "
            "onebit_comm_hook ran), so the 1-bit momentum exchange saves no communication. Add the "
            "callback lightning_optim.callbacks.OneBitAdamDDP() to the Trainer (or register the hook "
            "with ddp_model.register_comm_hook(None, onebit_comm_hook)).",
            UserWarning,
            stacklevel=4,
        )

    def _warmup(self, group: dict[str, Any], params: list[Tensor], states: list[dict[str, Any]], foreach: bool) -> None:
        beta1, beta2 = group["betas"]
        adam = dict(lr=group["lr"], beta1=beta1, beta2=beta2, eps=group["eps"], weight_decay=group["weight_decay"])
        for state in states:
            state["step"] += 1
            state["exp_avg_sq_step"] += 1
        # bias_correction=False: t = inf makes 1 - beta^t exactly 1 (DeepSpeed's m / (sqrt(v) + eps))
        counts = [s["step"].item() if group["bias_correction"] else math.inf for s in states]  # CPU: no sync
        p32, g32 = as_compute(params), as_compute([p.grad for p in params])
        if foreach:
            lists = [p32, g32, [s["exp_avg"] for s in states], [s["exp_avg_sq"] for s in states]]
            grouped = self._group_tensors_by_device_and_dtype(lists, with_indices=True)
            for (dp, dg, dm, dv, *_), indices in grouped.values():
                adam_step_foreach_(dp, dg, dm, dv, [counts[i] for i in indices], **adam)
        else:
            for p, g, s, c in zip(p32, g32, states, counts):
                adam_step_(p, g, s["exp_avg"], s["exp_avg_sq"], c, **adam)
        write_back(params, p32)

    def _compressed(
        self,
        group: dict[str, Any],
        params: list[Tensor],
        states: list[dict[str, Any]],
        foreach: bool,
        world: int,
        rank: int,
    ) -> None:
        beta1, beta2 = group["betas"]
        for state in states:
            state["step"] += 1
        p32, g32 = as_compute(params), as_compute([p.grad for p in params])
        exp_avgs = [s["exp_avg"] for s in states]
        # local momentum: m <- beta1 m + (1 - beta1) g with this rank's gradient
        if foreach:
            torch._foreach_lerp_(exp_avgs, g32, 1 - beta1)
        else:
            for m, g in zip(exp_avgs, g32):
                m.lerp_(g, 1 - beta1)
        # the exchange, per (device, dtype) of the state (one pair of collectives each)
        buckets: dict[tuple[torch.device, torch.dtype], list[int]] = {}
        for i, m in enumerate(exp_avgs):
            buckets.setdefault((m.device, m.dtype), []).append(i)
        for indices in buckets.values():
            self._exchange(group, [params[i] for i in indices], [states[i] for i in indices], world, rank)
        # the update with the frozen v and the averaged compressed momentum
        bc = group["bias_correction"]
        steps = [s["step"].item() if bc else math.inf for s in states]
        v_steps = [s["exp_avg_sq_step"].item() if bc else math.inf for s in states]
        v_steps = [t if t > 0 else math.inf for t in v_steps]  # no warm-up gradient: v = 0, nothing to correct
        lr, eps = group["lr"], group["eps"]
        decoupled_decay_(p32, lr, group["weight_decay"])
        if foreach:
            denoms = torch._foreach_sqrt([s["exp_avg_sq"] for s in states])
            torch._foreach_div_(denoms, [(1 - beta2**t) ** 0.5 for t in v_steps])
            torch._foreach_add_(denoms, eps)
            torch._foreach_addcdiv_(p32, exp_avgs, denoms, [-(lr / (1 - beta1**t)) for t in steps])
        else:
            for p, s, m, t, tv in zip(p32, states, exp_avgs, steps, v_steps):
                p.addcdiv_(m, adam_denom(s["exp_avg_sq"], tv, beta2, eps), value=-(lr / (1 - beta1**t)))
        for p, p_fp in zip(params, p32):
            if p.dtype in _LOW_PRECISION:  # saturate instead of rounding a huge finite step to inf
                limit = torch.finfo(p.dtype).max
                p_fp.clamp_(-limit, limit)
        write_back(params, p32)

    def _errors(self, p: Tensor, state: dict[str, Any], n: int, world: int) -> tuple[Tensor, Tensor]:
        """The worker and server errors of ``p`` for this world size (zeros when new or of another layout)."""
        dtype = state["exp_avg"].dtype
        worker, server = state.get("worker_error"), state.get("server_error")
        if worker is None or worker.numel() != n or server is None or server.numel() != n // world:
            if worker is not None:
                warnings.warn(
                    f"OneBitAdam: compression errors of a {tuple(p.shape)} parameter were saved for another world "
                    "size; they restart at zero.",
                    UserWarning,
                    stacklevel=5,
                )
            state["worker_error"] = torch.zeros(n, dtype=dtype, device=p.device)
            state["server_error"] = torch.zeros(n // world, dtype=dtype, device=p.device)
        return state["worker_error"], state["server_error"]

    def _exchange(
        self, group: dict[str, Any], params: list[Tensor], states: list[dict[str, Any]], world: int, rank: int
    ) -> None:
        """Two-stage compressed all-reduce of the momenta of same-device, same-dtype tensors; writes the
        averaged decompressed momentum into each ``exp_avg``."""
        exp_avgs = [s["exp_avg"] for s in states]
        sizes = [padded_numel(m.numel(), world) for m in exp_avgs]
        chunks = [n // world for n in sizes]
        worker_scales, worker_negatives = [], []
        for p, s, m, n in zip(params, states, exp_avgs, sizes):
            worker_error, _ = self._errors(p, s, n, world)
            flat = m.reshape(-1)
            buffer = flat if n == flat.numel() else torch.cat([flat, flat.new_zeros(n - flat.numel())])
            scale, negative = compress_with_feedback_(buffer, worker_error)
            worker_scales.append(scale)
            worker_negatives.append(negative)
        dtype = exp_avgs[0].dtype
        if world == 1:
            # W = 1: the "server" averages one worker's compressed momentum
            received = [torch.where(neg, -s, s) for neg, s in zip(worker_negatives, worker_scales)]
        else:
            received = self._phase_one(group, worker_negatives, worker_scales, chunks, world, rank, dtype)
        server_scales, server_negatives = [], []
        for s, y in zip(states, received):
            scale, negative = compress_with_feedback_(y, s["server_error"])
            server_scales.append(scale)
            server_negatives.append(negative)
        if world == 1:
            averaged = [torch.where(neg, -s, s) for neg, s in zip(server_negatives, server_scales)]
        else:
            averaged = self._phase_two(group, server_negatives, server_scales, chunks, world, dtype)
        for m, full in zip(exp_avgs, averaged):
            m.copy_(full[: m.numel()].view(m.shape))

    # -- communication ------------------------------------------------------------------------------
    @staticmethod
    def _stage(group: dict[str, Any], device: torch.device) -> bool:
        return device.type == "cuda" and not group["cuda_aware"] and dist.get_backend() != "nccl"

    def _phase_one(
        self,
        group: dict[str, Any],
        negatives: list[Tensor],
        scales: list[Tensor],
        chunks: list[int],
        world: int,
        rank: int,
        dtype: torch.dtype,
    ) -> list[Tensor]:
        """All-to-all of the sign bits (chunk j to rank j) with every worker scale appended; returns, per
        tensor, y = (1/W)·Σ_j s_j·sign_j[chunk r] (before the server error)."""
        device = negatives[0].device
        signs = torch.cat([pack_bits(neg.view(world, c)) for neg, c in zip(negatives, chunks)], dim=1)
        scale_bytes = _to_bytes(torch.stack(scales))
        send = torch.cat([signs, scale_bytes.expand(world, -1)], dim=1).contiguous()
        stage = self._stage(group, device)
        send_c = send.cpu() if stage else send
        recv = torch.empty_like(send_c)
        dist.all_to_all_single(recv, send_c)
        recv = recv.to(device) if stage else recv
        sign_bytes = signs.shape[1]
        all_scales = _from_bytes(recv[:, sign_bytes:], dtype)  # (W, tensors): rank j's worker scales
        out, offset = [], 0
        for i, c in enumerate(chunks):
            negative = unpack_bits(recv[:, offset : offset + c // 8])  # (W, c): my chunk from every rank
            offset += c // 8
            weights = (all_scales[:, i] * (1 / world)).unsqueeze(1)
            out.append(torch.where(negative, -weights, weights).sum(0))
        return out

    def _phase_two(
        self,
        group: dict[str, Any],
        negatives: list[Tensor],
        scales: list[Tensor],
        chunks: list[int],
        world: int,
        dtype: torch.dtype,
    ) -> list[Tensor]:
        """All-gather of the server chunks' sign bits and scales; returns each full decompressed momentum."""
        device = negatives[0].device
        send = torch.cat([pack_bits(neg) for neg in negatives] + [_to_bytes(torch.stack(scales))]).contiguous()
        stage = self._stage(group, device)
        send_c = send.cpu() if stage else send
        gathered = [torch.empty_like(send_c) for _ in range(world)]
        dist.all_gather(gathered, send_c)
        recv = torch.stack(gathered).to(device) if stage else torch.stack(gathered)
        sign_bytes = sum(c // 8 for c in chunks)
        all_scales = _from_bytes(recv[:, sign_bytes:], dtype)  # (W, tensors)
        out, offset = [], 0
        for i, c in enumerate(chunks):
            negative = unpack_bits(recv[:, offset : offset + c // 8])  # (W, c): chunk j served by rank j
            offset += c // 8
            s = all_scales[:, i].unsqueeze(1)
            out.append(torch.where(negative, -s, s).reshape(-1))
        return out


class _OneBitStateAdapter(KeyedStateAdapter):
    """exp_avg / exp_avg_sq as Adam's; a reset in the compressed phase (t > t_v) zeroes m and both errors
    but keeps the frozen v (a zeroed v would stay zero: every later step would be η·m/ε)."""

    def reset_(self, state: dict[str, Any], mask: Tensor | None = None) -> None:
        step, v_step = state.get("step"), state.get("exp_avg_sq_step")
        frozen = isinstance(step, Tensor) and isinstance(v_step, Tensor) and float(step) > float(v_step)  # CPU counters
        if not frozen:
            super().reset_(state, mask)
            return
        KeyedStateAdapter(self.name, self.first, None).reset_(state, mask)
        for key in OneBitAdam.state_spec.errors:
            if isinstance(state.get(key), Tensor):
                if mask is None:
                    state[key].zero_()
                else:
                    state[key].masked_fill_(mask, 0)


register_state_adapter(OneBitAdam, _OneBitStateAdapter("OneBitAdam", "exp_avg", "exp_avg_sq"))
