"""Optimizer-step benchmark on the parameter set of a GPT-2-small-like model (~163M parameters).

Times ``optimizer.step()`` alone (gradients are random and set once) for torch AdamW (fused / foreach),
lightning-optim's optimizers and, where importable, third-party references; reports median and min
step time, the ratio to torch AdamW, and the optimizer-state memory in MiB and bytes per parameter.

    python bench/optimizer_step.py                          # CUDA if available, full size
    python bench/optimizer_step.py --device cpu --scale 0.125
    python bench/optimizer_step.py --dtype bfloat16 --only adamw_fused,spam,stable_spam --sync-check

Parameter set (scale 1): token embedding 50304x768, learned positions 1024x768, 12 blocks of
LayerNorm (weight+bias), attention qkv 768->2304 and proj 768->768 with biases, LayerNorm, MLP
768->3072->768 with biases, final LayerNorm and an untied lm_head 50304x768 (no bias): 149 tensors,
163,109,376 parameters (124,475,904 if the head were tied). ``--scale`` multiplies d_model (and with
it qkv = 3 d_model and the MLP width = 4 d_model); vocabulary, positions and depth stay, so the tensor
count (which drives multi-tensor launch overhead) is the same at every scale.

Settings shared by all candidates: lr 1e-4, decoupled weight decay 0.01, default betas and eps of each
optimizer, multi-tensor (``foreach=True``) paths. SPAM runs with ``reset_interval`` = 1e6 (no momentum
reset and no post-reset lr warm-up during the run) and ``clip_delay=2`` (the smallest value allowed
with clipping on), and at least one warm-up step is required: every timed step is global step >= 2, so
the spike clip runs in every timed step. Stable-SPAM runs with ``reset_interval`` = 1e6 and no cosine
schedule (``total_steps=None``). pytorch_optimizer's SPAM/StableSPAM get the same settings
(``grad_accu_steps=2``, ``update_proj_gap`` = 1e6, ``density=1.0``, ``foreach=True``).

The ``*_8bit`` rows run our optimizers with ``state_bits=8`` (block-wise dynamic 8-bit moments for every
tensor with >= 4096 elements, embeddings included, like bitsandbytes' AdamW8bit in ``bnb_adamw8bit``):
expect about 2.03 bytes per parameter for Adam-type state instead of 8. Their step is a per-tensor
dequantize -> update -> requantize loop (not compiled).
"""

from __future__ import annotations

import argparse
import datetime
import gc
import importlib
import json
import math
import platform
import re
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

LR = 1e-4
WEIGHT_DECAY = 0.01
NO_RESET = 1_000_000  # reset interval far beyond any run: timed steps are ordinary steps
SPAM_CLIP_DELAY = 2  # clipping from global step 2 on; warm-up >= 1 step, so every timed step clips
RESULTS_DIR = Path(__file__).resolve().parent / "results"


# -- parameter set ------------------------------------------------------------------------------------
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


def _lo(attr: str) -> Any:
    return _import("lightning_optim", attr)


CANDIDATES: dict[str, dict[str, Any]] = {
    "adamw_fused": dict(
        label="torch.optim.AdamW(fused=True)",
        available=_needs_cuda,
        make=lambda ps: torch.optim.AdamW(ps, lr=LR, weight_decay=WEIGHT_DECAY, fused=True),
    ),
    "adamw_foreach": dict(
        label="torch.optim.AdamW(foreach=True)",
        available=lambda device: None,
        make=lambda ps: torch.optim.AdamW(ps, lr=LR, weight_decay=WEIGHT_DECAY, foreach=True),
    ),
    "spam": dict(
        label="lightning_optim.SPAM",
        available=lambda device: None,
        make=lambda ps: _lo("SPAM")(
            ps, lr=LR, weight_decay=WEIGHT_DECAY, reset_interval=NO_RESET, clip_delay=SPAM_CLIP_DELAY, foreach=True
        ),
    ),
    "spam_compiled": dict(
        label="lightning_optim.SPAM(compile=True)",
        available=_needs_cuda,
        make=lambda ps: _lo("SPAM")(
            ps, lr=LR, weight_decay=WEIGHT_DECAY, reset_interval=NO_RESET, clip_delay=SPAM_CLIP_DELAY, compile=True
        ),
    ),
    "stable_spam": dict(
        label="lightning_optim.StableSPAM",
        available=lambda device: None,
        make=lambda ps: _lo("StableSPAM")(ps, lr=LR, weight_decay=WEIGHT_DECAY, reset_interval=NO_RESET, foreach=True),
    ),
    "stable_spam_compiled": dict(
        label="lightning_optim.StableSPAM(compile=True)",
        available=_needs_cuda,
        make=lambda ps: _lo("StableSPAM")(ps, lr=LR, weight_decay=WEIGHT_DECAY, reset_interval=NO_RESET, compile=True),
    ),
    "am_adamw": dict(
        label="lightning_optim.AdaptiveMomentumAdamW",
        available=lambda device: None,
        make=lambda ps: _lo("AdaptiveMomentumAdamW")(ps, lr=LR, weight_decay=WEIGHT_DECAY, foreach=True),
    ),
    "am_adamw_compiled": dict(
        label="lightning_optim.AdaptiveMomentumAdamW(compile=True)",
        available=_needs_cuda,
        make=lambda ps: _lo("AdaptiveMomentumAdamW")(ps, lr=LR, weight_decay=WEIGHT_DECAY, compile=True),
    ),
    "am_sgd": dict(
        label="lightning_optim.AdaptiveMomentumSGD",
        available=lambda device: None,
        make=lambda ps: _lo("AdaptiveMomentumSGD")(ps, lr=LR, weight_decay=WEIGHT_DECAY, foreach=True),
    ),
    "po_spam": dict(
        label="pytorch_optimizer.SPAM",
        available=_needs_import("pytorch_optimizer", "SPAM"),
        make=lambda ps: _import("pytorch_optimizer", "SPAM")(
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
    ),
    "po_stable_spam": dict(
        label="pytorch_optimizer.StableSPAM",
        available=_needs_import("pytorch_optimizer", "StableSPAM"),
        make=lambda ps: _import("pytorch_optimizer", "StableSPAM")(
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
    ),
    # 8-bit state (state_bits=8): every tensor with >= 4096 elements, embeddings included, as bitsandbytes'
    # AdamW8bit below does, so the memory rows compare like for like.
    "spam_8bit": dict(
        label="lightning_optim.SPAM(state_bits=8)",
        available=lambda device: None,
        make=lambda ps: _lo("SPAM")(
            ps, lr=LR, weight_decay=WEIGHT_DECAY, reset_interval=NO_RESET, clip_delay=SPAM_CLIP_DELAY, foreach=True,
            state_bits=8,
        ),
    ),
    "stable_spam_8bit": dict(
        label="lightning_optim.StableSPAM(state_bits=8)",
        available=lambda device: None,
        make=lambda ps: _lo("StableSPAM")(
            ps, lr=LR, weight_decay=WEIGHT_DECAY, reset_interval=NO_RESET, foreach=True, state_bits=8
        ),
    ),
    "am_adamw_8bit": dict(
        label="lightning_optim.AdaptiveMomentumAdamW(state_bits=8)",
        available=lambda device: None,
        make=lambda ps: _lo("AdaptiveMomentumAdamW")(ps, lr=LR, weight_decay=WEIGHT_DECAY, foreach=True, state_bits=8),
    ),
    "am_sgd_8bit": dict(
        label="lightning_optim.AdaptiveMomentumSGD(state_bits=8)",
        available=lambda device: None,
        make=lambda ps: _lo("AdaptiveMomentumSGD")(ps, lr=LR, weight_decay=WEIGHT_DECAY, foreach=True, state_bits=8),
    ),
    "bnb_adamw8bit": dict(
        label="bitsandbytes.optim.AdamW8bit",
        available=_needs_cuda_and_import("bitsandbytes.optim", "AdamW8bit"),
        make=lambda ps: _import("bitsandbytes.optim", "AdamW8bit")(ps, lr=LR, weight_decay=WEIGHT_DECAY),
    ),
}
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
    params = make_params(shapes, device, dtype)
    n_params = sum(p.numel() for p in params)
    optimizer = CANDIDATES[name]["make"](params)
    try:
        for _ in range(warmup):
            optimizer.step()
        _sync(device)
        nbytes = state_bytes(optimizer)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
            resident = torch.cuda.memory_allocated(device)
        times, host = time_steps(optimizer, device, iters)
        row: dict[str, Any] = {
            "name": name,
            "label": CANDIDATES[name]["label"],
            "median_ms": statistics.median(times),
            "min_ms": min(times),
            "ratio": None,
            "state_mib": nbytes / 2**20,
            "bytes_per_param": nbytes / n_params,
            "state_bytes": nbytes,
            "host_median_ms": statistics.median(host),
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


# -- output -------------------------------------------------------------------------------------------
def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    processor = platform.processor() or platform.machine()
    return f"cpu ({processor})" if processor else "cpu"


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "device"


def default_out(device: torch.device, date: str) -> Path:
    return RESULTS_DIR / f"optimizer_step-{slug(device_name(device))}-{date}.json"


def format_table(rows: list[dict[str, Any]], baseline: str | None, sync: bool) -> str:
    head = f"{'name':<16}{'median ms':>11}{'min ms':>11}{'ratio':>8}{'state MiB':>12}{'B/param':>9}"
    if sync:
        head += f"  {'sync-free':<9}"
    lines = [head, "-" * len(head)]
    for r in rows:
        ratio = "-" if r["ratio"] is None else f"{r['ratio']:.2f}"
        line = (
            f"{r['name']:<16}{r['median_ms']:>11.3f}{r['min_ms']:>11.3f}{ratio:>8}"
            f"{r['state_mib']:>12.1f}{r['bytes_per_param']:>9.2f}"
        )
        if sync:
            line += f"  {'-' if r.get('sync_free') is None else ('yes' if r['sync_free'] else 'NO'):<9}"
        lines.append(line)
    lines.append(f"ratio = median / median of {baseline}" if baseline else "ratio: no baseline (adamw_*) was run")
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                        help="parameter/gradient dtype (default float32, like mixed-precision master weights)")
    parser.add_argument("--scale", type=float, default=1.0, help="multiplies d_model (default 1.0; 0.125 for a quick CPU run)")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps first (>= 1; default 5)")
    parser.add_argument("--iters", type=int, default=None, help="timed steps (default 20 on CUDA, 5 on CPU)")
    parser.add_argument("--only", default=None, help=f"comma list of candidates out of {','.join(CANDIDATES)}")
    parser.add_argument("--out", default=None, help="JSON path (default bench/results/optimizer_step-<device>-<date>.json)")
    parser.add_argument("--sync-check", action="store_true",
                        help="CUDA: one extra step of each candidate under torch.cuda.set_sync_debug_mode('error')")
    args = parser.parse_args(argv)
    args.device = torch.device(args.device)
    if args.device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda but CUDA is not available")
    if args.scale <= 0:
        parser.error("--scale must be > 0")
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
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    command = ["bench/optimizer_step.py", *(sys.argv[1:] if argv is None else argv)]
    args = parse_args(argv)
    device, dtype = args.device, getattr(torch, args.dtype)
    shapes = gpt2_shapes(args.scale)
    n_params = count_params(shapes)
    date = datetime.date.today().isoformat()
    name = device_name(device)
    check_sync = args.sync_check and device.type == "cuda"

    print(f"device: {name}")
    print(f"torch: {torch.__version__}  dtype: {args.dtype}  scale: {args.scale}")
    print(f"parameters: {n_params:,} in {len(shapes)} tensors (d_model {shapes[0][1][1]})")
    print(f"warm-up steps: {args.warmup}  timed steps: {args.iters}  lr {LR}  weight decay {WEIGHT_DECAY}")
    print(f"SPAM: reset_interval={NO_RESET}, clip_delay={SPAM_CLIP_DELAY} (clip active in every timed step)")
    if args.sync_check and not check_sync:
        print("sync check: skipped (CUDA only)")

    rows: list[dict[str, Any]] = []
    skipped: list[dict[str, str]] = []
    for cand in args.only:
        reason = CANDIDATES[cand]["available"](device)
        if reason is None:
            try:
                rows.append(run_candidate(cand, shapes, device, dtype, args.warmup, args.iters, check_sync))
                continue
            except Exception as exc:  # one failing candidate must not end the run
                reason = f"failed: {type(exc).__name__}: {exc}"
        print(f"skipped {cand}: {reason}")
        skipped.append({"name": cand, "reason": reason})

    timed = {r["name"]: r for r in rows}
    baseline = next((b for b in BASELINES if b in timed), None)
    if baseline:
        for r in rows:
            r["ratio"] = r["median_ms"] / timed[baseline]["median_ms"]
    if baseline == "adamw_foreach" and "adamw_fused" in args.only:
        print("note: adamw_fused unavailable here; ratios are to adamw_foreach")

    print()
    print(format_table(rows, baseline, check_sync))
    for r in rows:
        if r.get("sync_free") is False:
            print(f"sync in {r['name']}: {r['sync_error'].splitlines()[0] if r['sync_error'] else ''}")

    result = {
        "device": name,
        "torch": torch.__version__,
        "date": date,
        "params": n_params,
        "tensors": len(shapes),
        "dtype": args.dtype,
        "scale": args.scale,
        "warmup": args.warmup,
        "iters": args.iters,
        "baseline": baseline,
        "settings": {
            "lr": LR,
            "weight_decay": WEIGHT_DECAY,
            "reset_interval": NO_RESET,
            "spam_clip_delay": SPAM_CLIP_DELAY,
            "foreach": True,
        },
        "results": rows,
        "skipped": skipped,
        "command": command,
    }
    out = Path(args.out) if args.out else default_out(device, date)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {out}")
    return result


if __name__ == "__main__":
    main()
