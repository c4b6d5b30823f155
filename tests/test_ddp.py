"""DDP on CPU with 2 ranks: every optimizer leaves identical parameters on both ranks."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from ddp_callbacks_script import FAULTS
from ddp_script import NAMES, STEPS


def _run(script_name: str, out: Path, *args: str) -> None:
    script = Path(__file__).with_name(script_name)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, str(script), str(out), *args], capture_output=True, text=True, timeout=600, env=env, cwd=out
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


@pytest.mark.slow
def test_ddp_two_ranks_keep_identical_parameters(tmp_path: Path) -> None:
    _run("ddp_script.py", tmp_path)
    rank0 = torch.load(tmp_path / "rank0.pt")
    rank1 = torch.load(tmp_path / "rank1.pt")
    initial = torch.load(tmp_path / "initial.pt")
    assert set(rank0) == set(NAMES)
    for rank in (0, 1):  # every optimizer took its STEPS steps (Lightning counts each optimizer's step)
        assert torch.load(tmp_path / f"steps{rank}.pt") == dict.fromkeys(NAMES, STEPS)
    for name in NAMES:
        assert torch.isfinite(rank0[name]).all(), name
        assert not torch.equal(rank0[name], initial[name]), f"{name} did not move"
        assert torch.equal(rank0[name], rank1[name]), name


@pytest.mark.slow
def test_ddp_stability_callbacks_take_the_same_decision_on_both_ranks(tmp_path: Path) -> None:
    """A spike seen by rank 0 only: both ranks flag it, act on the same step and stay identical."""
    _run("ddp_callbacks_script.py", tmp_path)
    for action in ("skip", "reset"):
        rank0, rank1 = (torch.load(tmp_path / f"{action}-rank{r}.pt") for r in (0, 1))
        assert torch.isfinite(rank0["params"]).all()
        assert torch.equal(rank0["params"], rank1["params"]), action
        assert torch.equal(rank0["counters"], rank1["counters"]) and float(rank0["counters"][0]) == 1.0
        assert rank0["resets"] == rank1["resets"] == (1 if action == "skip" else 2)
        assert rank0["completed"] == rank1["completed"] == (39 if action == "skip" else 40)


def _assert_same(a: Any, b: Any, where: str) -> None:
    """Nested dicts of tensors, numbers and None are equal, tensors bit for bit."""
    if isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), where
        for key in a:
            _assert_same(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and torch.equal(a, b), f"{where}: {a} != {b}"
    else:
        assert a == b, f"{where}: {a} != {b}"


@pytest.mark.slow
def test_ddp_fault_on_one_rank_after_the_all_reduce_keeps_the_guard_identical(tmp_path: Path) -> None:
    """A NaN or 1e6x gradient on rank 0 only: same statistics, counters and decisions on both ranks. A NaN
    gradient is zeroed (reset, clip) or the step undone (skip) everywhere, so the parameters stay equal; a
    1e6x one is rescaled to the same μ on each rank, so they agree up to rounding."""
    _run("ddp_callbacks_script.py", tmp_path, "faults")
    for fault, actions in FAULTS.items():
        for action in actions:
            name = f"{fault}-{action}"
            rank0, rank1 = (torch.load(tmp_path / f"{name}-rank{r}.pt") for r in (0, 1))
            _assert_same(rank0["guard"], rank1["guard"], f"{name} guard")
            assert float(rank0["guard"][0]["counters"][0]) == 1.0, name
            assert rank0["resets"] == rank1["resets"] and rank0["completed"] == rank1["completed"], name
            assert torch.isfinite(rank0["params"]).all() and torch.isfinite(rank1["params"]).all(), name
            if fault == "nan":
                assert torch.equal(rank0["params"], rank1["params"]), name
            else:
                torch.testing.assert_close(rank0["params"], rank1["params"], rtol=0.0, atol=1e-6, msg=name)
