"""Smoke test of bench/optimizer_step.py on a tiny CPU parameter set."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench" / "optimizer_step.py"
NAMES = ["adamw_foreach", "spam", "stable_spam", "am_adamw", "am_sgd", "spam_8bit"]


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


def test_optimizer_step_bench_cpu(bench, tmp_path: Path) -> None:
    out = tmp_path / "r.json"
    argv = ["--device", "cpu", "--scale", "0.05", "--iters", "2", "--warmup", "1", "--out", str(out),
            "--only", ",".join(NAMES)]
    returned = bench.main(argv)

    data = json.loads(out.read_text())
    assert data["results"] == returned["results"]
    for key in ("device", "torch", "date", "params", "baseline", "results", "command"):
        assert key in data
    assert data["command"][1:] == argv
    assert data["baseline"] == "adamw_foreach"
    assert data["params"] > 0
    rows = {r["name"]: r for r in data["results"]}
    assert sorted(rows) == sorted(NAMES)
    for row in rows.values():
        assert row["median_ms"] > 0 and row["min_ms"] > 0
        assert row["min_ms"] <= row["median_ms"]
        assert row["ratio"] > 0 and row["state_mib"] > 0
    assert rows["adamw_foreach"]["ratio"] == pytest.approx(1.0)
    # SPAM keeps exactly AdamW's state (exp_avg, exp_avg_sq, CPU step): 8 bytes per fp32 parameter.
    assert rows["spam"]["bytes_per_param"] == rows["adamw_foreach"]["bytes_per_param"]
    assert rows["spam"]["bytes_per_param"] == pytest.approx(8.0, abs=1e-2)
    assert rows["am_sgd"]["bytes_per_param"] == pytest.approx(4.0, abs=1e-2)
    # 8-bit moments: 2 bytes + 2 absmax floats per 256 entries (2.03); small tensors stay fp32
    assert 2.03 <= rows["spam_8bit"]["bytes_per_param"] < 2.2


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
