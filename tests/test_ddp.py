"""DDP on CPU with 2 ranks: every optimizer leaves identical parameters on both ranks."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ddp_script import NAMES


def _run(script_name: str, out: Path) -> None:
    script = Path(__file__).with_name(script_name)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, str(script), str(out)], capture_output=True, text=True, timeout=600, env=env, cwd=out
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


@pytest.mark.slow
def test_ddp_two_ranks_keep_identical_parameters(tmp_path: Path) -> None:
    _run("ddp_script.py", tmp_path)
    rank0 = torch.load(tmp_path / "rank0.pt")
    rank1 = torch.load(tmp_path / "rank1.pt")
    assert set(rank0) == set(NAMES)
    for name in NAMES:
        assert torch.isfinite(rank0[name]).all(), name
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
