"""Optimizer-step benchmark on the parameter set of a GPT (default: GPT-2-small-like, ~163M parameters).

Times ``optimizer.step()`` alone (gradients are random and set once) for torch AdamW (fused / foreach),
every optimizer of ours in the registry (``lightning_optim.optimizers(ours=True)``) on each path it offers
and, where importable, third-party references; reports median and min step time, the ratio to torch
AdamW fused and to AdamW foreach, compile time, and the optimizer-state memory in MiB and bytes/param.

    python bench/optimizer_step.py                          # CUDA if available, GPT-2-small set
    python bench/optimizer_step.py --device cpu --size 60m  # the examples/gpt.py 60M preset (57M params)
    python bench/optimizer_step.py --device cpu --scale 0.125 --no-compile
    python bench/optimizer_step.py --dtype bfloat16 --only adamw_fused,spam,stable_spam --sync-check
    python bench/optimizer_step.py --list                   # the candidates, then exit

Parameter sets (``--size``):

- ``gpt2`` (default): token embedding 50304x768, learned positions 1024x768, 12 blocks of LayerNorm
  (weight+bias), attention qkv 768->2304 and proj 768->768 with biases, LayerNorm, MLP 768->3072->768
  with biases, final LayerNorm and an untied lm_head 50304x768 (no bias): 149 tensors, 163,109,376
  parameters (124,475,904 if the head were tied). ``--scale`` multiplies d_model (and with it
  qkv = 3 d_model and the MLP width = 4 d_model); vocabulary, positions and depth stay, so the tensor
  count (which drives multi-tensor launch overhead) is the same at every scale.
- ``tiny``, ``small``, ``20m``, ``60m``: the presets of the GPT example (``lightning_optim.examples.gpt``,
  LLaMA-style: RMSNorm, rotary positions, SwiGLU, untied head, byte vocabulary of 256), built on the meta
  device to read the parameter shapes (no weights are allocated). ``60m``: 8 layers, d_model 768,
  59 tensors, 57,029,376 parameters.

Candidates. Baselines: ``adamw_fused`` (``torch.optim.AdamW(fused=True)``, CPU and CUDA) and
``adamw_foreach``. Ours, read from the registry, so a newly registered optimizer is benchmarked with no
edit here: for each entry ``<key>`` (its first alias, else its lower-case name) the multi-tensor path
(``foreach=True``), ``<key>_compiled`` (``compile=True``) where the entry offers it, and ``<key>_8bit``
(``state_bits=8``) where it offers that. Third-party: ``po_spam`` / ``po_stable_spam`` (pytorch_optimizer)
and ``bnb_adamw8bit`` (bitsandbytes, CUDA only), when importable. Compiled candidates run last (their
compiles take longest) and get at least 3 warm-up steps, so every compile (SPAM compiles twice: clip off
at step 1, on from step 2) happens before the timed steps; ``compile_s`` is the warm-up wall time in
excess of that many steady steps.

Settings shared by all candidates: lr 1e-4, decoupled weight decay 0.01 (where the constructor takes
them), default betas and eps of each optimizer. :data:`BENCH_OVERRIDES` holds the few per-optimizer
settings that make every timed step do an ordinary step's full work: SPAM runs with ``reset_interval`` =
1e6 (no momentum reset and no post-reset lr warm-up during the run) and ``clip_delay=2`` (the smallest
value allowed with clipping on); at least one warm-up step is required, so every timed step is global
step >= 2 and the spike clip runs in every timed step. Stable-SPAM runs with ``reset_interval`` = 1e6 and
no cosine schedule (``total_steps=None``). An optimizer without an entry there gets the generic
settings, and its ``total_steps_arg`` (if any) set to 1e6, a run far longer than the bench.
pytorch_optimizer's SPAM/StableSPAM get the same settings (``grad_accu_steps=2``, ``update_proj_gap`` = 1e6,
``density=1.0``, ``foreach=True``).

The ``*_8bit`` rows run our optimizers with ``state_bits=8`` (block-wise dynamic 8-bit moments for every
tensor with >= 4096 elements, embeddings included, like bitsandbytes' AdamW8bit in ``bnb_adamw8bit``):
expect about 2.03 bytes per parameter for Adam-type state instead of 8. Their step is a per-tensor
dequantize -> update -> requantize loop (not compiled); ``ratio_own_32bit`` compares each (and each
compiled row) with the same optimizer's 32-bit multi-tensor row.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import importlib
import inspect
import json
import math
import platform
import re
import statistics
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch

from lightning_optim.registry import OptimizerInfo, optimizers

LR = 1e-4
WEIGHT_DECAY = 0.01
NO_RESET = 1_000_000  # reset interval (and run length) far beyond any run: timed steps are ordinary steps
SPAM_CLIP_DELAY = 2  # clipping from global step 2 on; warm-up >= 1 step, so every timed step clips
COMPILED_MIN_WARMUP = 3  # warm-up steps a compile=True candidate gets at least (every graph compiled)
RESULTS_DIR = Path(__file__).resolve().parent / "results"
GPT2 = "gpt2"

#: Bench-specific constructor arguments of our optimizers, by registry name, on top of the generic
#: settings (lr, weight decay, the path's flag): what makes every timed step an ordinary step doing its
#: full work. An optimizer not listed here is benchmarked with the generic settings alone.
BENCH_OVERRIDES: dict[str, dict[str, Any]] = {
    # no momentum reset (so no post-reset lr warm-up) in the run; the spike clip on from global step 2
    "SPAM": {"reset_interval": NO_RESET, "clip_delay": SPAM_CLIP_DELAY},
    # no reset, no cosine beta1/gamma1 schedule
    "StableSPAM": {"reset_interval": NO_RESET, "total_steps": None},
}


# -- parameter sets -----------------------------------------------------------------------------------
def gpt2_shapes(
    scale: float = 1.0, n_layer: int = 12, d_model: int = 768, vocab: int = 50304, n_ctx: int = 1024
) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of every parameter of a GPT-2-small-like model with an untied lm_head."""
    d = max(1, round(d_model * scale))
    ff = 4 * d
    shapes: list[tuple[str, tuple[int, ...]]] = [("wte.weight", (vocab, d)), ("wpe.weight", (n_ctx, d))]
    for i in range(n_layer):
        h = f"h.{i}"
        shapes += [
            (f"{h}.ln_1.weight", (d,)),
            (f"{h}.ln_1.bias", (d,)),
            (f"{h}.attn.qkv.weight", (3 * d, d)),
            (f"{h}.attn.qkv.bias", (3 * d,)),
            (f"{h}.attn.proj.weight", (d, d)),
            (f"{h}.attn.proj.bias", (d,)),
            (f"{h}.ln_2.weight", (d,)),
            (f"{h}.ln_2.bias", (d,)),
            (f"{h}.mlp.fc.weight", (ff, d)),
            (f"{h}.mlp.fc.bias", (ff,)),
            (f"{h}.mlp.proj.weight", (d, ff)),
            (f"{h}.mlp.proj.bias", (d,)),
        ]
    shapes += [("ln_f.weight", (d,)), ("ln_f.bias", (d,)), ("lm_head.weight", (vocab, d))]
    return shapes


def example_gpt_sizes() -> list[str]:
    """The size presets of the GPT example (``lightning_optim.examples.gpt.SIZES``)."""
    from lightning_optim.examples.gpt import SIZES

    return list(SIZES)


def example_gpt_shapes(size: str) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of every parameter of ``lightning_optim.examples.gpt.GPT(size=size)``, read from a
    model built on the meta device (no memory allocated, no init run on real tensors)."""
    from lightning_optim.examples.gpt import GPT

    with torch.device("meta"):
        model = GPT(size=size)
    return [(name, tuple(p.shape)) for name, p in model.named_parameters()]


def param_shapes(size: str = GPT2, scale: float = 1.0) -> list[tuple[str, tuple[int, ...]]]:
    """The parameter set of ``--size`` (``gpt2`` scaled by ``scale``, or a GPT-example preset)."""
    return gpt2_shapes(scale) if size == GPT2 else example_gpt_shapes(size)


def count_params(shapes: list[tuple[str, tuple[int, ...]]]) -> int:
    return sum(math.prod(shape) for _, shape in shapes)


def make_params(
    shapes: list[tuple[str, tuple[int, ...]]], device: torch.device, dtype: torch.dtype, seed: int = 0
) -> list[torch.nn.Parameter]:
    """Fresh parameters (randn * 0.02) with random gradients (randn * 1e-3), identical for every candidate."""
    torch.manual_seed(seed)
    params = []
    for _, shape in shapes:
        p = torch.nn.Parameter(torch.randn(shape, device=device, dtype=dtype) * 0.02)
        p.grad = torch.randn_like(p) * 1e-3
        params.append(p)
    return params


# -- candidates ---------------------------------------------------------------------------------------
def _import(module: str, attr: str) -> Any:
    return getattr(importlib.import_module(module), attr)


def _always(device: torch.device) -> str | None:
    return None


def _needs_cuda(device: torch.device) -> str | None:
    return None if device.type == "cuda" else "CUDA only"


def _needs_import(module: str, attr: str) -> Callable[[torch.device], str | None]:
    def check(device: torch.device) -> str | None:
        try:
            _import(module, attr)
        except Exception as exc:  # ImportError, or a library that fails while loading
            return f"{module}.{attr} not importable ({type(exc).__name__}: {exc})"
        return None

    return check


def _needs_cuda_and_import(module: str, attr: str) -> Callable[[torch.device], str | None]:
    def check(device: torch.device) -> str | None:
        return _needs_cuda(device) or _needs_import(module, attr)(device)

    return check


MakeOptimizer = Callable[[list[torch.nn.Parameter]], torch.optim.Optimizer]


def _candidate(label: str, make: MakeOptimizer, **meta: Any) -> dict[str, Any]:
    """A candidate: its label, ``make(params)``, ``available(device)`` (None or why not) and what it is
    (``optimizer``: registry name or None, ``path``, ``state_bits``, ``compiled``, ``twin_32bit``: the
    name of the same optimizer's 32-bit multi-tensor candidate, ``kwargs``: constructor arguments)."""
    entry = dict(available=_always, optimizer=None, path=None, state_bits=32, compiled=False, twin_32bit=None,
                 kwargs=None)
    entry.update(meta, label=label, make=make)
    return entry


def candidate_key(entry: OptimizerInfo) -> str:
    """The bench's name of a registry entry: its first alias, else its lower-case name (``spam``, ``stable_spam``)."""
    return entry.aliases[0] if entry.aliases else entry.name.lower()


def bench_kwargs(entry: OptimizerInfo) -> dict[str, Any]:
    """Constructor arguments of ``entry`` shared by all its candidates: the generic settings (lr, weight
    decay, a long run for ``total_steps_arg``) the constructor accepts, then :data:`BENCH_OVERRIDES`."""
    signature = inspect.signature(entry.cls.__init__).parameters
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in signature.values())
    generic: dict[str, Any] = {"lr": LR, "weight_decay": WEIGHT_DECAY}
    if entry.total_steps_arg is not None:
        generic[entry.total_steps_arg] = NO_RESET
    kwargs = {k: v for k, v in generic.items() if takes_any or k in signature}
    kwargs.update(BENCH_OVERRIDES.get(entry.name, {}))
    return kwargs


def _unsupported(entry: OptimizerInfo) -> str | None:
    """Why ``step()`` on random gradients is not this optimizer's step (None: it is)."""
    if entry.needs_closure:
        return "needs a closure: step() on set gradients is not its step"
    if entry.matrix_only:
        return "matrix-only: the GPT set has 1-D tensors (it needs a second optimizer for them)"
    return None


def _fed_estimates(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """A Hessian-vector optimizer whose every ``step()`` is handed the gradient as its curvature estimate
    first (a dict, no compute), so the timed step is the update itself; the cost of the estimate (an extra
    create_graph backward) is measured separately (docs/algorithms.md, second-order optimizers)."""
    step = optimizer.step

    def step_with_estimate(closure: Any = None) -> Any:
        grads = {p: p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None}
        optimizer.set_hessian_estimate(grads)
        return step(closure)

    optimizer.step = step_with_estimate  # type: ignore[method-assign]
    return optimizer


def _format_kwargs(kwargs: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v!r}" for k, v in kwargs.items())


def our_candidates(entries: Iterable[OptimizerInfo]) -> dict[str, dict[str, dict[str, Any]]]:
    """The candidates of our registry entries, by kind: ``"32bit"`` (the multi-tensor path, or the default
    path of an optimizer without one), ``"compiled"`` (``compile=True``) and ``"8bit"`` (``state_bits=8``)."""
    kinds: dict[str, dict[str, dict[str, Any]]] = {"32bit": {}, "compiled": {}, "8bit": {}}
    for entry in entries:
        key, base = candidate_key(entry), bench_kwargs(entry)
        reason = _unsupported(entry)
        available = _always if reason is None else (lambda device, reason=reason: reason)
        foreach = {"foreach": True} if entry.foreach else {}
        variants = [("32bit", key, {**foreach}, "foreach" if entry.foreach else "default")]
        if entry.compile:
            variants.append(("compiled", f"{key}_compiled", {"compile": True}, "compiled"))
        if entry.state_bits_8:
            variants.append(("8bit", f"{key}_8bit", {**foreach, "state_bits": 8}, "8bit"))
        for kind, name, flags, path in variants:
            kwargs = {**base, **flags}
            kinds[kind][name] = _candidate(
                f"lightning_optim.{entry.cls.__name__}({_format_kwargs(flags)})",
                (lambda ps, build=entry.build, kw=kwargs: _fed_estimates(build(ps, **kw)))
                if entry.needs_hvp
                else (lambda ps, build=entry.build, kw=kwargs: build(ps, **kw)),
                available=available,
                optimizer=entry.name,
                path=path,
                state_bits=8 if kind == "8bit" else 32,
                compiled=kind == "compiled",
                twin_32bit=key if kind != "32bit" else None,
                kwargs=kwargs,
            )
    return kinds


#: pytorch_optimizer twins of our elementwise optimizers: our candidate key -> (its class, arguments that
#: select the same algorithm: decoupled decay, the same rectify/eps semantics as ours where it has a switch)
PO_TWINS: dict[str, tuple[str, dict[str, Any]]] = {
    "ada_belief": ("AdaBelief", {"weight_decouple": True, "fixed_decay": False, "rectify": True, "eps": 1e-16}),
    "adamp": ("AdamP", {}),
    "sgdp": ("SGDP", {"momentum": 0.9}),
    "lion": ("Lion", {"weight_decouple": True}),
    "lamb": ("Lamb", {}),
    "exadam": ("EXAdam", {"weight_decouple": True}),
    "sgd_sai": ("SGDSaI", {}),
}


class MatrixPlusAdamW:
    """torch's Muon on the 2-D tensors and fused AdamW on the rest, stepped together (torch.optim.Muon
    accepts only 2-D parameters; ours and pytorch_optimizer's split inside one optimizer)."""

    def __init__(self, params: list[torch.nn.Parameter]) -> None:
        matrices = [p for p in params if p.dim() == 2]
        rest = [p for p in params if p.dim() != 2]
        self.parts = [torch.optim.Muon(matrices, lr=0.02, weight_decay=WEIGHT_DECAY)]
        if rest:
            self.parts.append(torch.optim.AdamW(rest, lr=LR, weight_decay=WEIGHT_DECAY, fused=True))

    @property
    def state(self) -> dict[Any, Any]:
        return {k: v for part in self.parts for k, v in part.state.items()}

    def step(self) -> None:
        for part in self.parts:
            part.step()


def use_muon_groups(params: list[torch.nn.Parameter]) -> list[dict[str, Any]]:
    """pytorch_optimizer's Muon wants the split as ``use_muon`` groups: 2-D tensors vs the rest."""
    return [
        {"params": [p for p in params if p.dim() >= 2], "use_muon": True},
        {"params": [p for p in params if p.dim() < 2], "use_muon": False},
    ]


def build_candidates(entries: Iterable[OptimizerInfo] | None = None) -> dict[str, dict[str, Any]]:
    """Every candidate in run order: torch AdamW baselines, ours (32-bit), pytorch_optimizer, 8-bit (ours,
    then bitsandbytes), then the compiled ones (their compiles take longest, so a time limit cuts them first)."""
    ours = our_candidates(optimizers(ours=True) if entries is None else entries)
    baselines = {
        "adamw_fused": _candidate(
            "torch.optim.AdamW(fused=True)",
            lambda ps: torch.optim.AdamW(ps, lr=LR, weight_decay=WEIGHT_DECAY, fused=True),
            optimizer="AdamW", path="fused",
        ),
        "adamw_foreach": _candidate(
            "torch.optim.AdamW(foreach=True)",
            lambda ps: torch.optim.AdamW(ps, lr=LR, weight_decay=WEIGHT_DECAY, foreach=True),
            optimizer="AdamW", path="foreach",
        ),
    }
    third_party = {
        "po_spam": _candidate(
            "pytorch_optimizer.SPAM",
            lambda ps: _import("pytorch_optimizer", "SPAM")(
                ps,
                lr=LR,
                weight_decay=WEIGHT_DECAY,
                density=1.0,
                threshold=5000,
                grad_accu_steps=SPAM_CLIP_DELAY,
                update_proj_gap=NO_RESET,
                eps=1e-6,
                foreach=True,
            ),
            available=_needs_import("pytorch_optimizer", "SPAM"),
        ),
        "po_stable_spam": _candidate(
            "pytorch_optimizer.StableSPAM",
            lambda ps: _import("pytorch_optimizer", "StableSPAM")(
                ps,
                lr=LR,
                weight_decay=WEIGHT_DECAY,
                gamma1=0.7,
                gamma2=0.9,
                theta=0.999,
                t_max=None,
                update_proj_gap=NO_RESET,
                eps=1e-8,
                foreach=True,
            ),
            available=_needs_import("pytorch_optimizer", "StableSPAM"),
        ),
    }
    # pytorch_optimizer's ports of the other optimizers we implement, with its decoupled weight decay (the
    # mapping of each is in the optimizer's test file); timm's are not benchmarked: timm pulls a CUDA torch
    # the matrix family's references: torch's Muon, pytorch_optimizer's Muon / SOAP / Conda
    third_party["torch_muon"] = _candidate(
        "torch.optim.Muon (2-D) + AdamW(fused) (rest)", MatrixPlusAdamW,
        available=_needs_import("torch.optim", "Muon"),
    )
    third_party["po_muon"] = _candidate(
        "pytorch_optimizer.Muon",
        lambda ps: _import("pytorch_optimizer", "Muon")(use_muon_groups(ps), lr=0.02, weight_decay=WEIGHT_DECAY),
        available=_needs_import("pytorch_optimizer", "Muon"),
    )
    for name, cls_name in (("soap", "SOAP"), ("conda", "Conda")):
        third_party[f"po_{name}"] = _candidate(
            f"pytorch_optimizer.{cls_name}",
            lambda ps, cls_name=cls_name: _import("pytorch_optimizer", cls_name)(ps, lr=LR, weight_decay=WEIGHT_DECAY),
            available=_needs_import("pytorch_optimizer", cls_name),
        )
    for name, (cls_name, kwargs) in PO_TWINS.items():
        third_party[f"po_{name}"] = _candidate(
            f"pytorch_optimizer.{cls_name}",
            lambda ps, cls_name=cls_name, kwargs=kwargs: _import("pytorch_optimizer", cls_name)(
                ps, lr=LR, weight_decay=WEIGHT_DECAY, **kwargs
            ),
            available=_needs_import("pytorch_optimizer", cls_name),
        )
    # 8-bit state: every tensor with >= 4096 elements, embeddings included, as bitsandbytes' AdamW8bit
    # does, so the memory rows compare like for like.
    bnb = {
        "bnb_adamw8bit": _candidate(
            "bitsandbytes.optim.AdamW8bit",
            lambda ps: _import("bitsandbytes.optim", "AdamW8bit")(ps, lr=LR, weight_decay=WEIGHT_DECAY),
            available=_needs_cuda_and_import("bitsandbytes.optim", "AdamW8bit"),
            path="8bit", state_bits=8,
        ),
    }
    return {**baselines, **ours["32bit"], **third_party, **ours["8bit"], **bnb, **ours["compiled"]}


CANDIDATES: dict[str, dict[str, Any]] = build_candidates()
BASELINES = ("adamw_fused", "adamw_foreach")


# -- measurements -------------------------------------------------------------------------------------
def state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of every tensor in ``optimizer.state`` (recursing into dicts and lists; each tensor once)."""
    seen: set[int] = set()

    def visit(value: Any) -> int:
        if isinstance(value, torch.Tensor):
            if id(value) in seen:
                return 0
            seen.add(id(value))
            return value.numel() * value.element_size()
        if isinstance(value, dict):
            return sum(visit(v) for v in value.values())
        if isinstance(value, (list, tuple)):
            return sum(visit(v) for v in value)
        return 0

    return sum(visit(v) for v in optimizer.state.values())


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def warm_up(optimizer: torch.optim.Optimizer, device: torch.device, steps: int) -> list[float]:
    """Untimed steps (state creation, compiles): the wall time of each in ms, the device synchronised."""
    times = []
    for _ in range(steps):
        _sync(device)
        t0 = time.perf_counter()
        optimizer.step()
        _sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
    return times


def time_steps(optimizer: torch.optim.Optimizer, device: torch.device, iters: int) -> tuple[list[float], list[float]]:
    """Per-step times in ms: (device times, host times). On CUDA the device times come from CUDA events
    recorded around each ``step()`` (steps run back to back, one synchronize before reading); on the CPU
    both are ``time.perf_counter`` wall times."""
    host: list[float] = []
    _sync(device)
    if device.type == "cuda":
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
        for start, end in zip(starts, ends):
            t0 = time.perf_counter()
            start.record()
            optimizer.step()
            end.record()
            host.append((time.perf_counter() - t0) * 1e3)
        torch.cuda.synchronize(device)
        return [s.elapsed_time(e) for s, e in zip(starts, ends)], host
    for _ in range(iters):
        t0 = time.perf_counter()
        optimizer.step()
        host.append((time.perf_counter() - t0) * 1e3)
    return list(host), host


def sync_check(optimizer: torch.optim.Optimizer, device: torch.device) -> tuple[bool, str | None]:
    """One step under ``torch.cuda.set_sync_debug_mode("error")``: (no host-device sync, error text)."""
    torch.cuda.synchronize(device)
    try:
        torch.cuda.set_sync_debug_mode("error")
        optimizer.step()
        ok, error = True, None
    except Exception as exc:  # the sync error, or anything else the step raised: reported, never fatal
        ok, error = False, f"{type(exc).__name__}: {exc}".strip()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    torch.cuda.synchronize(device)
    return ok, error


def run_candidate(
    name: str,
    shapes: list[tuple[str, tuple[int, ...]]],
    device: torch.device,
    dtype: torch.dtype,
    warmup: int,
    iters: int,
    check_sync: bool,
) -> dict[str, Any]:
    cand = CANDIDATES[name]
    params = make_params(shapes, device, dtype)
    n_params = sum(p.numel() for p in params)
    optimizer = cand["make"](params)
    if cand["compiled"]:
        warmup = max(warmup, COMPILED_MIN_WARMUP)
    try:
        warm = warm_up(optimizer, device, warmup)
        nbytes = state_bytes(optimizer)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
            resident = torch.cuda.memory_allocated(device)
        times, host = time_steps(optimizer, device, iters)
        median = statistics.median(times)
        row: dict[str, Any] = {
            "name": name,
            "label": cand["label"],
            "kwargs": cand.get("kwargs"),
            "optimizer": cand["optimizer"],
            "path": cand["path"],
            "state_bits": cand["state_bits"],
            "median_ms": median,
            "min_ms": min(times),
            "ratio": None,
            "ratio_fused": None,
            "ratio_foreach": None,
            "ratio_own_32bit": None,
            "state_mib": nbytes / 2**20,
            "bytes_per_param": nbytes / n_params,
            "state_bytes": nbytes,
            "host_median_ms": statistics.median(host),
            "warmup_steps": warmup,
            "first_step_ms": warm[0],
            "warmup_s": sum(warm) / 1e3,
            # compile time: the warm-up's wall time in excess of as many steady steps
            "compile_s": max(0.0, (sum(warm) - warmup * median) / 1e3) if cand["compiled"] else None,
            "times_ms": times,
        }
        if device.type == "cuda":
            # temporaries a step allocates on top of parameters, gradients and state
            row["step_peak_extra_mib"] = (torch.cuda.max_memory_allocated(device) - resident) / 2**20
        if check_sync:
            row["sync_free"], row["sync_error"] = sync_check(optimizer, device)
        return row
    finally:
        del optimizer, params
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()


def add_ratios(rows: list[dict[str, Any]]) -> str | None:
    """Fill each row's ``ratio_fused`` / ``ratio_foreach`` (median / the AdamW baseline's median),
    ``ratio`` (to the first baseline run: fused, else foreach) and, for 8-bit and compiled rows of ours,
    ``ratio_own_32bit`` (to the same optimizer's 32-bit eager row, multi-tensor where it has that path);
    returns that first baseline."""
    timed = {r["name"]: r for r in rows}
    baseline = next((b for b in BASELINES if b in timed), None)
    for r in rows:
        for key, ref in (("ratio_fused", "adamw_fused"), ("ratio_foreach", "adamw_foreach")):
            r[key] = r["median_ms"] / timed[ref]["median_ms"] if ref in timed else None
        r["ratio"] = r["median_ms"] / timed[baseline]["median_ms"] if baseline else None
        twin = CANDIDATES.get(r["name"], {}).get("twin_32bit")
        r["ratio_own_32bit"] = r["median_ms"] / timed[twin]["median_ms"] if twin in timed else None
    return baseline


def summarize(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per optimizer of ours that was run: its fastest 32-bit path (multi-tensor or compiled) against torch
    AdamW fused and foreach, and its 8-bit row against its 32-bit multi-tensor row."""
    timed = {r["name"]: r for r in rows}
    summary = []
    for entry in optimizers(ours=True):
        key = candidate_key(entry)
        fp32 = [timed[n] for n in (key, f"{key}_compiled") if n in timed]
        eight = timed.get(f"{key}_8bit")
        if not fp32 and eight is None:
            continue
        best = min(fp32, key=lambda r: r["median_ms"]) if fp32 else None
        summary.append({
            "optimizer": entry.name,
            "best_32bit": best and best["name"],
            "best_32bit_path": best and best["path"],
            "median_ms": best and best["median_ms"],
            "ratio_fused": best and best["ratio_fused"],
            "ratio_foreach": best and best["ratio_foreach"],
            "bytes_per_param": best and best["bytes_per_param"],
            "8bit": eight and eight["name"],
            "8bit_median_ms": eight and eight["median_ms"],
            "8bit_ratio_32bit": eight and eight["ratio_own_32bit"],
            "8bit_ratio_fused": eight and eight["ratio_fused"],
            "8bit_bytes_per_param": eight and eight["bytes_per_param"],
        })
    return summary


# -- output -------------------------------------------------------------------------------------------
def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    processor = platform.processor() or platform.machine()
    return f"cpu ({processor})" if processor else "cpu"


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "device"


def set_name(size: str, scale: float) -> str:
    """``gpt2`` (scale 1), ``gpt2-x0.125``, or the GPT-example preset's name."""
    return size if size != GPT2 or scale == 1 else f"{GPT2}-x{scale:g}"


def default_out(device: torch.device, date: str, size: str = GPT2, scale: float = 1.0) -> Path:
    """bench/results/optimizer_step-<device>-<date>.json; ``-<set>`` before the date unless the default set."""
    name = set_name(size, scale)
    tag = "" if name == GPT2 else f"-{slug(name)}"
    return RESULTS_DIR / f"optimizer_step-{slug(device_name(device))}{tag}-{date}.json"


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def format_table(rows: list[dict[str, Any]], baseline: str | None, sync: bool) -> str:
    head = (f"{'name':<22}{'median ms':>11}{'min ms':>11}{'x fused':>9}{'x foreach':>10}{'x own32':>9}"
            f"{'state MiB':>11}{'B/param':>9}{'compile s':>11}")
    if sync:
        head += f"  {'sync-free':<9}"
    lines = [head, "-" * len(head)]
    for r in rows:
        line = (
            f"{r['name']:<22}{r['median_ms']:>11.3f}{r['min_ms']:>11.3f}{_fmt(r['ratio_fused'], '.2f'):>9}"
            f"{_fmt(r['ratio_foreach'], '.2f'):>10}{_fmt(r['ratio_own_32bit'], '.2f'):>9}"
            f"{r['state_mib']:>11.1f}{r['bytes_per_param']:>9.2f}{_fmt(r['compile_s'], '.1f'):>11}"
        )
        if sync:
            line += f"  {'-' if r.get('sync_free') is None else ('yes' if r['sync_free'] else 'NO'):<9}"
        lines.append(line)
    if baseline:
        lines.append("x fused / x foreach = median / median of torch AdamW fused / foreach; "
                     "x own32 = median / median of the same optimizer's 32-bit multi-tensor row")
    else:
        lines.append("ratios: no AdamW baseline (adamw_fused / adamw_foreach) was run")
    return "\n".join(lines)


def format_summary(summary: list[dict[str, Any]]) -> str:
    """The per-optimizer summary as a Markdown table (for the README)."""
    lines = [
        "| optimizer | fastest 32-bit path | ms | x AdamW fused | x AdamW foreach | B/param "
        "| 8-bit ms | 8-bit x its 32-bit | 8-bit B/param |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for s in summary:
        lines.append(
            f"| {s['optimizer']} | {s['best_32bit_path'] or '-'} | {_fmt(s['median_ms'], '.2f')} "
            f"| {_fmt(s['ratio_fused'], '.2f')} | {_fmt(s['ratio_foreach'], '.2f')} "
            f"| {_fmt(s['bytes_per_param'], '.2f')} | {_fmt(s['8bit_median_ms'], '.2f')} "
            f"| {_fmt(s['8bit_ratio_32bit'], '.2f')} | {_fmt(s['8bit_bytes_per_param'], '.2f')} |"
        )
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                        help="parameter/gradient dtype (default float32, like mixed-precision master weights)")
    parser.add_argument("--size", default=GPT2,
                        help="parameter set: gpt2 (default, GPT-2-small-like, 163M) or a preset of the GPT example "
                             "(tiny, small, 20m, 60m; 60m = 57M parameters)")
    parser.add_argument("--scale", type=float, default=1.0,
                        help="--size gpt2 only: multiplies d_model (default 1.0; 0.125 for a quick CPU run)")
    parser.add_argument("--warmup", type=int, default=5,
                        help=f"untimed steps first (>= 1; default 5; compiled candidates >= {COMPILED_MIN_WARMUP})")
    parser.add_argument("--iters", type=int, default=None, help="timed steps (default 20 on CUDA, 5 on CPU)")
    parser.add_argument("--only", default=None, help=f"comma list of candidates out of {','.join(CANDIDATES)}")
    parser.add_argument("--no-compile", action="store_true", help="leave out the compile=True candidates")
    parser.add_argument("--list", action="store_true", help="print the candidates and exit")
    parser.add_argument("--out", default=None,
                        help="JSON path (default bench/results/optimizer_step-<device>[-<set>]-<date>.json)")
    parser.add_argument("--sync-check", action="store_true",
                        help="CUDA: one extra step of each candidate under torch.cuda.set_sync_debug_mode('error')")
    args = parser.parse_args(argv)
    if args.list:
        return args
    args.device = torch.device(args.device)
    if args.device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda but CUDA is not available")
    if args.scale <= 0:
        parser.error("--scale must be > 0")
    if args.size != GPT2:
        sizes = example_gpt_sizes()
        if args.size not in sizes:
            parser.error(f"unknown --size {args.size!r}; choose from {[GPT2, *sizes]}")
        if args.scale != 1.0:
            parser.error("--scale applies to --size gpt2 only")
    if args.warmup < 1:
        parser.error("--warmup must be >= 1 (state is created by the first step; SPAM clips from step 2 on)")
    if args.iters is None:
        args.iters = 20 if args.device.type == "cuda" else 5
    if args.iters < 1:
        parser.error("--iters must be >= 1")
    if args.only:
        names = [n.strip() for n in args.only.split(",") if n.strip()]
        unknown = [n for n in names if n not in CANDIDATES]
        if unknown:
            parser.error(f"unknown candidate(s) {unknown}; choose from {list(CANDIDATES)}")
        args.only = [n for n in CANDIDATES if n in names]
    else:
        args.only = list(CANDIDATES)
    if args.no_compile:
        args.only = [n for n in args.only if not CANDIDATES[n]["compiled"]]
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    command = ["bench/optimizer_step.py", *(sys.argv[1:] if argv is None else argv)]
    args = parse_args(argv)
    if args.list:
        for cand, spec in CANDIDATES.items():
            print(f"{cand:<22}{spec['label']}")
        return {"candidates": list(CANDIDATES)}
    device, dtype = args.device, getattr(torch, args.dtype)
    shapes = param_shapes(args.size, args.scale)
    n_params = count_params(shapes)
    date = datetime.date.today().isoformat()
    name = device_name(device)
    check_sync = args.sync_check and device.type == "cuda"
    out = Path(args.out) if args.out else default_out(device, date, args.size, args.scale)

    print(f"device: {name}")
    print(f"torch: {torch.__version__}  dtype: {args.dtype}  set: {set_name(args.size, args.scale)}")
    print(f"parameters: {n_params:,} in {len(shapes)} tensors (d_model {shapes[0][1][1]})")
    print(f"warm-up steps: {args.warmup} (compiled: >= {COMPILED_MIN_WARMUP})  timed steps: {args.iters}  "
          f"lr {LR}  weight decay {WEIGHT_DECAY}")
    print(f"overrides: {BENCH_OVERRIDES} (clip active in every timed step)")
    if args.no_compile:
        print("compiled candidates left out (--no-compile)")
    if args.sync_check and not check_sync:
        print("sync check: skipped (CUDA only)")

    rows: list[dict[str, Any]] = []
    skipped: list[dict[str, str]] = []
    result: dict[str, Any] = {
        "device": name,
        "torch": torch.__version__,
        "date": date,
        "size": args.size,
        "set": set_name(args.size, args.scale),
        "params": n_params,
        "tensors": len(shapes),
        "dtype": args.dtype,
        "scale": args.scale,
        "warmup": args.warmup,
        "iters": args.iters,
        "baseline": None,
        "settings": {
            "lr": LR,
            "weight_decay": WEIGHT_DECAY,
            "reset_interval": NO_RESET,
            "spam_clip_delay": SPAM_CLIP_DELAY,
            "compiled_min_warmup": COMPILED_MIN_WARMUP,
            "foreach": True,
            "overrides": BENCH_OVERRIDES,
        },
        "complete": False,
        "results": rows,
        "summary": [],
        "skipped": skipped,
        "command": command,
    }

    def write() -> None:
        result["baseline"] = add_ratios(rows)
        result["summary"] = summarize(rows)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2) + "\n")

    for cand in args.only:
        reason = CANDIDATES[cand]["available"](device)
        if reason is None:
            try:
                rows.append(run_candidate(cand, shapes, device, dtype, args.warmup, args.iters, check_sync))
                r = rows[-1]
                compile_note = f", compile {r['compile_s']:.1f} s" if r["compile_s"] is not None else ""
                print(f"{cand}: median {r['median_ms']:.3f} ms{compile_note}", flush=True)
                write()  # a run cut short (a time limit) keeps the rows so far; "complete" stays false
                continue
            except Exception as exc:  # one failing candidate must not end the run
                reason = f"failed: {type(exc).__name__}: {exc}"
        print(f"skipped {cand}: {reason}", flush=True)
        skipped.append({"name": cand, "reason": reason})

    result["complete"] = True
    write()
    baseline = result["baseline"]
    if baseline == "adamw_foreach" and "adamw_fused" in args.only:
        print("note: adamw_fused unavailable here; ratio is to adamw_foreach")

    print()
    print(format_table(rows, baseline, check_sync))
    for r in rows:
        if r.get("sync_free") is False:
            print(f"sync in {r['name']}: {r['sync_error'].splitlines()[0] if r['sync_error'] else ''}")
    if result["summary"]:
        print("\nsummary (fastest 32-bit path of each optimizer of ours; 8-bit against its 32-bit multi-tensor row):\n")
        print(format_summary(result["summary"]))
    print(f"\nwrote {out}")
    return result


if __name__ == "__main__":
    main()
