"""SPAM(compile=True): the torch.compile'd multi-tensor step agrees with the eager paths, compiles at most
twice (clipping off/on) across resets and warm-ups, and resumes exactly. Runs on the CPU (inductor's C++
backend); on CUDA the same graph is compiled to Triton (tests/test_gpu.py)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch._dynamo.utils import counters

from conftest import flat, make_mlp, train
from lightning_optim import SPAM

KWARGS = dict(lr=1e-2, threshold=20.0, reset_interval=10, warmup_steps=4, clip_delay=3, weight_decay=0.1)
SPIKES = {5: 1e4, 17: 1e3}


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


def test_compiled_step_matches_eager_and_compiles_twice_at_most() -> None:
    eager, compiled = make_mlp(torch.float32), make_mlp(torch.float32)
    train(eager, SPAM(eager.parameters(), foreach=True, **KWARGS), 25, spikes=SPIKES)
    opt = SPAM(compiled.parameters(), compile=True, **KWARGS)
    train(compiled, opt, 25, spikes=SPIKES)  # crosses two resets, warm-ups and clip on/off switches
    # bias corrections run in fp32 on the device here, in float64 on the host in the eager path
    torch.testing.assert_close(flat(compiled), flat(eager), rtol=1e-5, atol=1e-5)
    assert counters["stats"]["unique_graphs"] <= 2
    assert all(s["step"].item() == 25 for s in opt.state.values())

    # resume: counters saved to the checkpoint, moved back to the device on the first step
    saved = copy.deepcopy((compiled.state_dict(), opt.state_dict()))
    train(compiled, opt, 6, start=25)
    resumed = make_mlp(torch.float32, seed=4)
    resumed.load_state_dict(saved[0])
    opt2 = SPAM(resumed.parameters(), compile=True, **KWARGS)
    opt2.load_state_dict(saved[1])
    train(resumed, opt2, 6, start=25)
    assert torch.equal(flat(resumed), flat(compiled))
    assert counters["stats"]["unique_graphs"] <= 2


def test_compile_must_be_a_bool() -> None:
    with pytest.raises(ValueError, match="compile"):
        SPAM([torch.nn.Parameter(torch.zeros(2))], compile="yes")
