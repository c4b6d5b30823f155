"""compile=True (SPAM, StableSPAM, AdaptiveMomentumAdamW): the torch.compile'd multi-tensor step agrees with
the eager path, compiles a bounded number of graphs across resets, warm-ups and schedules (per-step values
are device tensors, never baked-in constants), and resumes exactly. Runs on the CPU (inductor's C++
backend); on CUDA the same graphs compile to Triton (tests/test_gpu.py)."""

from __future__ import annotations


import pytest
import torch
from torch._dynamo.utils import counters

from conftest import flat, make_mlp, restore_from_checkpoint, train
from lightning_optim import SPAM, AdaptiveMomentumAdamW, StableSPAM

CASES = {
    # name: (factory, most graphs for one param group)
    "spam": (
        lambda params, **kw: SPAM(
            params, lr=1e-2, threshold=20.0, reset_interval=10, warmup_steps=4, clip_delay=3, weight_decay=0.1, **kw
        ),
        2,  # clipping off / on
    ),
    "stable_spam": (
        lambda params, **kw: StableSPAM(params, lr=1e-2, total_steps=20, reset_interval=10, weight_decay=0.1, **kw),
        1,
    ),
    "am_adamw": (lambda params, **kw: AdaptiveMomentumAdamW(params, lr=1e-2, **kw), 2),  # sums / update
}
SPIKES = {5: 1e4, 17: 1e3}


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("name", CASES)
def test_compiled_step_matches_eager_and_resumes_exactly(name: str) -> None:
    factory, most_graphs = CASES[name]
    eager, model = make_mlp(torch.float32), make_mlp(torch.float32)
    eager_opt = factory(eager.parameters(), foreach=True)
    train(eager, eager_opt, 25, spikes=SPIKES)
    opt = factory(model.parameters(), compile=True)
    train(model, opt, 25, spikes=SPIKES)  # crosses resets, warm-ups, clip switches and the cosine schedule
    # bias corrections run in fp32 on the device here, in float64 on the host in the eager path
    torch.testing.assert_close(flat(model), flat(eager), rtol=1e-5, atol=1e-5)
    assert counters["stats"]["unique_graphs"] <= most_graphs
    assert all(s["step"].device == p.device for p, s in opt.state.items())
    for p, q in zip(model.parameters(), eager.parameters()):  # the same counters as eager, reset steps included
        for key in ("step", "stat_step"):
            if key in eager_opt.state[q]:
                assert opt.state[p][key].item() == eager_opt.state[q][key].item(), key

    resumed, opt2 = restore_from_checkpoint(model, opt, lambda m: factory(m.parameters(), compile=True), seed=4)
    train(model, opt, 6, start=25)
    train(resumed, opt2, 6, start=25)
    assert torch.equal(flat(resumed), flat(model))
    assert counters["stats"]["unique_graphs"] <= most_graphs  # the resumed optimizer reuses the graphs


@pytest.mark.parametrize("name", CASES)
def test_compile_must_be_a_bool(name: str) -> None:
    with pytest.raises(ValueError, match="compile"):
        CASES[name][0]([torch.nn.Parameter(torch.zeros(2))], compile="yes")
