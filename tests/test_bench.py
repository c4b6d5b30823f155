"""Smoke tests of the bench scripts on tiny CPU settings, and a syntax check of bench/gpu_check.sh."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lightning_optim import optimizers, registry

BENCH = Path(__file__).resolve().parents[1] / "bench" / "optimizer_step.py"
GPU_CHECK = BENCH.with_name("gpu_check.sh")


@pytest.fixture(scope="module")
def bench():
    # Loaded from its path: bench/ is a folder of scripts, not a package on sys.path.
    spec = importlib.util.spec_from_file_location("bench_optimizer_step", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(spec.name, None)


def _load_script(name: str):
    """A bench script as a module (bench/ is a folder of scripts, not a package)."""
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH.with_name(f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_param_set_is_gpt2_small(bench) -> None:
    shapes = bench.gpt2_shapes(1.0)
    assert len(shapes) == 149
    assert bench.count_params(shapes) == 163_109_376
    assert bench.param_shapes("gpt2", 1.0) == shapes


def test_60m_set_is_the_gpt_example_preset(bench) -> None:
    # read from the example's model on the meta device, so it follows any change of the preset
    shapes = bench.param_shapes("60m")
    assert len(shapes) == 59
    assert bench.count_params(shapes) == 57_029_376
    assert "60m" in bench.example_gpt_sizes()


def test_candidates_come_from_the_registry(bench) -> None:
    cpu = torch.device("cpu")
    ours = optimizers(ours=True)
    assert ours
    for entry in ours:
        key = bench.candidate_key(entry)
        assert bench.CANDIDATES[key]["optimizer"] == entry.name
        assert (f"{key}_compiled" in bench.CANDIDATES) == entry.compile
        assert (f"{key}_8bit" in bench.CANDIDATES) == entry.state_bits_8
        for name in (key, f"{key}_compiled", f"{key}_8bit"):
            if name in bench.CANDIDATES:
                assert bench.CANDIDATES[name]["available"](cpu) is None, name  # nothing of ours is CUDA only
                assert bench.CANDIDATES[name]["kwargs"].items() >= bench.BENCH_OVERRIDES.get(entry.name, {}).items()
    # fused AdamW and every compiled candidate run on the CPU too
    compiled = [n for n, c in bench.CANDIDATES.items() if c["compiled"]]
    assert compiled and all(bench.CANDIDATES[n]["available"](cpu) is None for n in ["adamw_fused", *compiled])
    assert set(compiled) <= set(bench.parse_args(["--device", "cpu"]).only)
    assert not set(compiled) & set(bench.parse_args(["--device", "cpu", "--no-compile"]).only)
    # the bench settings that make every timed step a full one
    assert bench.CANDIDATES["spam"]["kwargs"]["clip_delay"] == 2
    assert bench.CANDIDATES["stable_spam"]["kwargs"]["total_steps"] is None


def test_unlisted_optimizer_gets_the_generic_settings(bench) -> None:
    """A registered optimizer with no BENCH_OVERRIDES entry is benchmarked with the defaults, no bench edit."""
    probe = dataclasses.replace(registry.get("AdamW"), name="BenchProbe", ours=True, state_bits_8=False)
    kinds = bench.our_candidates([probe])
    assert list(kinds["32bit"]) == ["benchprobe"] and not kinds["compiled"] and not kinds["8bit"]
    cand = kinds["32bit"]["benchprobe"]
    assert cand["kwargs"] == {"lr": bench.LR, "weight_decay": bench.WEIGHT_DECAY, "foreach": True}
    params = [torch.nn.Parameter(torch.ones(4, 3))]
    params[0].grad = torch.ones(4, 3)
    optimizer = cand["make"](params)
    assert isinstance(optimizer, torch.optim.AdamW) and optimizer.defaults["foreach"] is True
    optimizer.step()


def test_compiled_candidates_warm_up_through_their_compiles(bench, monkeypatch) -> None:
    fake = bench._candidate("fake", lambda ps: torch.optim.AdamW(ps, foreach=True), compiled=True, path="compiled")
    monkeypatch.setitem(bench.CANDIDATES, "fake_compiled", fake)
    row = bench.run_candidate("fake_compiled", [("w", (8, 4))], torch.device("cpu"), torch.float32, 1, 2, False)
    assert row["warmup_steps"] == bench.COMPILED_MIN_WARMUP
    assert row["compile_s"] is not None and row["compile_s"] >= 0


def test_optimizer_step_bench_cpu(bench, tmp_path: Path) -> None:
    out = tmp_path / "r.json"
    # one optimizer of each family (the contract steps every one of them; here the bench's bookkeeping is
    # checked), SPAM first: its 8-bit row is compared with its 32-bit row below
    by_family: dict[str, str] = {"adam": "spam"}
    for entry in optimizers(ours=True):
        by_family.setdefault(entry.family, bench.candidate_key(entry))
    names = ["adamw_fused", "adamw_foreach", *by_family.values(), "spam_8bit", "spam_compiled"]
    argv = ["--device", "cpu", "--size", "tiny", "--iters", "2", "--warmup", "1", "--out", str(out),
            "--no-compile", "--only", ",".join(names)]
    returned = bench.main(argv)

    data = json.loads(out.read_text())
    assert data["results"] == returned["results"]
    for key in ("device", "torch", "date", "params", "baseline", "results", "summary", "command"):
        assert key in data
    assert data["command"][1:] == argv
    assert data["complete"] is True and data["skipped"] == []
    assert data["baseline"] == "adamw_fused"  # fused AdamW runs on the CPU
    assert data["params"] > 0 and data["set"] == "tiny"
    rows = {r["name"]: r for r in data["results"]}
    assert sorted(rows) == sorted(set(names) - {"spam_compiled"})  # --no-compile
    for row in rows.values():
        assert row["median_ms"] > 0 and row["min_ms"] > 0
        assert row["min_ms"] <= row["median_ms"]
        assert row["state_mib"] > 0
        assert row["ratio_fused"] > 0 and row["ratio_foreach"] > 0 and row["ratio"] == row["ratio_fused"]
    assert rows["adamw_fused"]["ratio_fused"] == pytest.approx(1.0)
    assert rows["adamw_foreach"]["ratio_foreach"] == pytest.approx(1.0)
    assert rows["spam_8bit"]["ratio_own_32bit"] == pytest.approx(
        rows["spam_8bit"]["median_ms"] / rows["spam"]["median_ms"]
    )
    # SPAM keeps exactly AdamW's state (exp_avg, exp_avg_sq, CPU step): 8 bytes per fp32 parameter.
    assert rows["spam"]["bytes_per_param"] == rows["adamw_foreach"]["bytes_per_param"]
    assert rows["spam"]["bytes_per_param"] == pytest.approx(8.0, abs=1e-2)
    assert rows["am_sgd"]["bytes_per_param"] == pytest.approx(4.0, abs=1e-2)
    # 8-bit moments: 2 bytes + 2 absmax floats per 256 entries (2.03); small tensors stay fp32
    assert 2.03 <= rows["spam_8bit"]["bytes_per_param"] < 2.2
    summary = {s["optimizer"]: s for s in data["summary"]}
    assert sorted(summary) == sorted(rows[key]["optimizer"] for key in by_family.values())
    assert summary["SPAM"]["8bit_ratio_32bit"] == pytest.approx(rows["spam_8bit"]["ratio_own_32bit"])
    assert summary["SPAM"]["ratio_fused"] == pytest.approx(rows["spam"]["ratio_fused"])
    assert "| SPAM | foreach |" in bench.format_summary(data["summary"])


def test_gpu_check_script_is_valid_bash() -> None:
    assert os.access(GPU_CHECK, os.X_OK), "bench/gpu_check.sh must be executable"
    subprocess.run(["bash", "-n", str(GPU_CHECK)], check=True)


def test_callback_overhead_bench_cpu_smoke(tmp_path: Path) -> None:
    module = _load_script("callback_overhead")
    out = tmp_path / "c.json"
    argv = ["--device", "cpu", "--size", "tiny", "--seq-len", "32", "--batch-size", "4", "--steps", "3",
            "--warmup", "2", "--only", "all_ours", "--out", str(out)]
    result = module.main(argv)
    assert [r["name"] for r in result["results"]] == ["none", "all_ours"]
    assert json.loads(out.read_text())["results"][1]["steps"] == 3


def test_lr_spike_bench_controller_keeps_the_spike_free_accuracy(tmp_path: Path) -> None:
    """Spec check 10 at smoke scale: digits MLP, AdamW lr 1e-3 x 1000 at step 50 for one step."""
    module = _load_script("lr_spike")
    out = tmp_path / "lr.json"
    argv = ["--device", "cpu", "--tasks", "digits,gpt", "--factors", "1000", "--durations", "1",
            "--digits-steps", "120", "--gpt-steps", "12", "--gpt-spike-at", "6", "--seq-len", "32",
            "--gpt-batch-size", "4", "--gpt-max-bytes", "1000000", "--val-batches", "2", "--out", str(out)]
    result = module.main(argv)
    assert json.loads(out.read_text())["results"] == result["results"]
    rows = {(r["task"], r["method"], r["factor"]): r for r in result["results"]}
    assert len(rows) == 10
    reference = rows["digits", "plain", 1.0]
    controller = rows["digits", "controller", 1000.0]
    assert controller["ratio_at_spike"] > 10 and controller["scale_at_spike"] < 0.1
    assert controller["val_acc"] >= 0.95 * reference["val_acc"]
    assert rows["digits", "controller", 1.0]["val_acc"] >= 0.95 * reference["val_acc"]
    assert "within 5% of the spike-free run" in result["table"]


def test_lowbit_stability_bench_cpu_smoke(tmp_path: Path) -> None:
    module = _load_script("lowbit_stability")
    out = tmp_path / "q.json"
    argv = ["--device", "cpu", "--size", "tiny", "--steps", "3", "--seq-len", "32", "--batch-size", "4",
            "--val-batches", "1", "--lrs", "1e-3", "--only", "fp_adamw,q_stable_spam", "--activations",
            "--out", str(out)]
    result = module.main(argv)
    rows = [(r["config"], r["activations"]) for r in json.loads(out.read_text())["results"]]
    assert rows == [("fp_adamw", False), ("q_stable_spam", False), ("q_stable_spam", True)]
    assert all(0 < r["val_loss"] < module.DIVERGED_LOSS and not r["diverged"] for r in result["results"])
    assert "W4A4 stable_spam" in result["table"]
