"""DropMuon: Muon on the matrix layers at or above a per-step random cutoff (lightning_optim/drop_muon.py)."""

from __future__ import annotations

import copy

import pytest
import torch

from lightning_optim.drop_muon import DropMuon, drop_muon_cutoff
from lightning_optim.matrix import newton_schulz
from lightning_optim.muon import Muon

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors on a busy 2-core machine


def _params(seed: int = 0, dtype: torch.dtype = torch.float32) -> list[torch.nn.Parameter]:
    """Three matrix layers (two of the same shape: batched on the foreach path) and a bias (AdamW)."""
    gen = torch.Generator().manual_seed(seed)
    shapes = [(4, 3), (3, 5), (3, 5), (4,)]
    return [torch.nn.Parameter(torch.randn(s, generator=gen).to(dtype)) for s in shapes]


def _grads(step: int, params: list[torch.Tensor]) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(100 + step)
    return [torch.randn(p.shape, generator=gen).to(p.dtype) for p in params]


def _run(opt: torch.optim.Optimizer, params: list[torch.Tensor], steps: range) -> None:
    for t in steps:
        for p, g in zip(params, _grads(t, params)):
            p.grad = g
        opt.step()


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().contiguous().view(torch.int32)


@pytest.mark.parametrize("foreach", [False, True])
def test_cutoff_zero_is_muon_bit_for_bit(foreach: bool) -> None:
    """With every cutoff forced to 0 (cutoff_probs = [1, 0, 0]) every layer moves every step: Muon exactly."""
    a, b = _params(), _params()
    drop = DropMuon(a, cutoff_probs=[1.0, 0.0, 0.0], foreach=foreach, weight_decay=0.1)
    muon = Muon(b, foreach=foreach, weight_decay=0.1)
    _run(drop, a, range(4))
    _run(muon, b, range(4))
    for x, y in zip(a, b):
        assert torch.equal(_bits(x), _bits(y))
    for x, y in zip(a, b):
        for key in muon.state[y]:
            assert torch.equal(drop.state[x][key], muon.state[y][key]), key


@pytest.mark.parametrize("foreach", [False, True])
def test_layers_below_the_cutoff_are_unchanged(foreach: bool) -> None:
    """Cutoff always 2: layers 0 and 1 keep weights and zero momentum; layer 2 takes Muon's step from the
    equations (M = (1−μ)G, U = μM + (1−μ)G, W − η·√max(1, m/n)·NS(U)); the AdamW bias moves every step."""
    params = _params()
    start = [p.detach().clone() for p in params]
    opt = DropMuon(params, cutoff_probs=[0.0, 0.0, 1.0], foreach=foreach, ns_dtype="float32")
    g = _grads(0, params)
    for p, gi in zip(params, g):
        p.grad = gi
    opt.step()
    for i in (0, 1):
        assert torch.equal(params[i], start[i])
        assert not opt.state[params[i]]["momentum_buffer"].any()
        assert float(opt.state[params[i]]["step"]) == 0.0
    mu, lr = 0.95, 0.02
    m = (1 - mu) * g[2]
    u = mu * m + (1 - mu) * g[2]
    expected = start[2] - lr * 1.0 * newton_schulz(u, 5, "float32")  # 3×5: scale √max(1, 3/5) = 1
    torch.testing.assert_close(params[2].detach(), expected, rtol=1e-6, atol=1e-7)
    assert not torch.equal(params[3], start[3])  # AdamW part always updated


def test_cutoff_sequence_is_a_function_of_the_step_only() -> None:
    """Two optimizers built separately draw the same cutoffs; torch's global RNG is neither used nor moved;
    the uniform default covers every cutoff about equally often."""
    torch.manual_seed(123)
    rng_before = torch.get_rng_state()
    first = [drop_muon_cutoff(t, 5) for t in range(1, 1001)]
    second = [drop_muon_cutoff(t, 5) for t in range(1, 1001)]
    assert first == second
    assert torch.equal(rng_before, torch.get_rng_state())
    counts = torch.bincount(torch.tensor(first), minlength=5).double() / len(first)
    assert torch.all((counts - 0.2).abs() < 0.05), counts
    assert len(set(first[:50])) > 1  # not a constant

    # the optimizers themselves: same weights after separate construction, whatever the global RNG does
    a, b = _params(), _params()
    opt_a, opt_b = DropMuon(a), DropMuon(b)
    _run(opt_a, a, range(6))
    torch.manual_seed(999)
    _run(opt_b, b, range(6))
    for x, y in zip(a, b):
        assert torch.equal(x, y)


def test_skipped_steps_follow_the_drawn_cutoffs() -> None:
    """Each layer's step counter equals the number of steps whose cutoff was at or below its index."""
    params = _params()
    opt = DropMuon(params)
    _run(opt, params, range(10))
    cutoffs = [drop_muon_cutoff(t, 3) for t in range(1, 11)]
    for i in range(3):
        assert float(opt.state[params[i]]["step"]) == sum(c <= i for c in cutoffs)
    assert float(opt.state[params[3]]["step"]) == 10.0


def test_paths_agree_and_resume_is_bit_exact() -> None:
    a, b = _params(), _params()
    per, multi = DropMuon(a, foreach=False), DropMuon(b, foreach=True)
    _run(per, a, range(3))
    _run(multi, b, range(3))
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=1e-6, atol=1e-7)
    saved_w, saved_s = copy.deepcopy(([p.detach().clone() for p in a], per.state_dict()))
    c = _params(seed=7)
    with torch.no_grad():
        for p, w in zip(c, saved_w):
            p.copy_(w)
    resumed = DropMuon(c, foreach=False)
    resumed.load_state_dict(saved_s)
    _run(per, a, range(3, 7))
    _run(resumed, c, range(3, 7))
    for x, y in zip(a, c):
        assert torch.equal(_bits(x), _bits(y))


def test_layers_groups_treats_each_group_as_one_layer() -> None:
    params = _params()
    groups = [
        {"params": params[:2], "use_muon": True},
        {"params": params[2:3], "use_muon": True},
        {"params": params[3:], "use_muon": False},
    ]
    opt = DropMuon(groups, layers="groups", cutoff_probs=[0.0, 1.0])
    assert opt.layer_index() == {id(params[0]): 0, id(params[1]): 0, id(params[2]): 1}
    start = [p.detach().clone() for p in params]
    _run(opt, params, range(2))
    assert torch.equal(params[0], start[0]) and torch.equal(params[1], start[1])
    assert not torch.equal(params[2], start[2])


def test_bf16_params_keep_fp32_momentum() -> None:
    params = _params(dtype=torch.bfloat16)
    opt = DropMuon(params, cutoff_probs=[1.0, 0.0, 0.0])
    _run(opt, params, range(2))
    assert opt.state[params[0]]["momentum_buffer"].dtype == torch.float32
    assert all(p.dtype == torch.bfloat16 and torch.isfinite(p).all() for p in params)


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"cutoff_probs": [1.0, float("nan"), 0.0]}, "cutoff_probs"),
        ({"cutoff_probs": [-1.0, 1.0, 0.0]}, "cutoff_probs"),
        ({"cutoff_probs": [0.0, 0.0, 0.0]}, "cutoff_probs"),
        ({"cutoff_probs": "uniform"}, "cutoff_probs"),
        ({"layers": "blocks"}, "layers"),
        ({"momentum": 1.0}, "momentum"),
        ({"lr": float("nan")}, "lr"),
    ],
)
def test_validation_names_the_argument(kwargs: dict, name: str) -> None:
    with pytest.raises(ValueError, match=name):
        DropMuon(_params(), **kwargs)


def test_cutoff_probs_of_the_wrong_length_is_refused_at_step() -> None:
    params = _params()
    opt = DropMuon(params, cutoff_probs=[0.5, 0.5])  # 3 layers
    for p, g in zip(params, _grads(0, params)):
        p.grad = g
    with pytest.raises(ValueError, match="cutoff_probs"):
        opt.step()
