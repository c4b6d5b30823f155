"""DDP on CPU with 2 ranks: every optimizer leaves identical parameters on both ranks."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ddp_script import NAMES


@pytest.mark.slow
def test_ddp_two_ranks_keep_identical_parameters(tmp_path: Path) -> None:
    script = Path(__file__).with_name("ddp_script.py")
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, str(script), str(tmp_path)], capture_output=True, text=True, timeout=600, env=env,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rank0 = torch.load(tmp_path / "rank0.pt")
    rank1 = torch.load(tmp_path / "rank1.pt")
    assert set(rank0) == set(NAMES)
    for name in NAMES:
        assert torch.isfinite(rank0[name]).all(), name
        assert torch.equal(rank0[name], rank1[name]), name
