"""SCALE: numerics against the authors' equations (OptimAI-Lab/Minimalist_LLM_Pretraining scale_optimizer.py)."""

from __future__ import annotations

import copy
import math

import pytest
import torch

import lightning_optim
from lightning_optim.examples.gpt import GPT
from lightning_optim.scale import SCALE, column_normalize, scale_param_groups


def _mat(shape, seed=0, dtype=torch.float64):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


@pytest.mark.parametrize("layout, dim", [("linear", 1), ("embedding", 0)])
def test_normalised_slices_have_rms_one(layout, dim):
    """W0 = 0, lr = 1: W1 = −C(G); every row (linear, (out, in)) or column (embedding, (vocab, dim)) has RMS 1,
    i.e. ℓ2 norm √(its length), and points along G's slice."""
    g = _mat((5, 3), 1) * torch.tensor([1e-3, 1.0, 1e3], dtype=torch.float64)
    p = torch.nn.Parameter(torch.zeros(5, 3, dtype=torch.float64))
    opt = SCALE([{"params": [p], "use_muon": True, "layout": layout}], lr=1.0, foreach=False)
    p.grad = g.clone()
    opt.step()
    update = -p.detach()
    norms = update.norm(dim=dim)  # dim: the axis each slice runs along
    torch.testing.assert_close(norms, torch.full((g.shape[1 - dim],), math.sqrt(g.shape[dim]), dtype=torch.float64))
    expected = g / g.square().mean(dim=dim, keepdim=True).sqrt()
    torch.testing.assert_close(update, expected)


def test_hand_computed_steps_last_layer_momentum_and_decay():
    """Three steps, float64: the hidden matrix W ← W(1−ηλ) − η·C(G); the last layer's M = βM + (1−β)G first."""
    lr, beta, wd = 0.1, 0.9, 0.5
    w0, h0 = _mat((3, 4), 2), _mat((2, 4), 3)
    w, h = torch.nn.Parameter(w0.clone()), torch.nn.Parameter(h0.clone())
    opt = SCALE([{"params": [w], "use_muon": True}, {"params": [h], "use_muon": True, "last_layer": True}],
                lr=lr, momentum=beta, weight_decay=wd, foreach=False)
    ew, eh, m = w0.clone(), h0.clone(), torch.zeros(2, 4, dtype=torch.float64)
    rms_rows = lambda x: x / x.square().mean(dim=1, keepdim=True).sqrt()  # noqa: E731
    for k in range(3):
        gw, gh = _mat((3, 4), 10 + k), _mat((2, 4), 20 + k)
        w.grad, h.grad = gw.clone(), gh.clone()
        opt.step()
        m = beta * m + (1 - beta) * gh
        ew = ew * (1 - lr * wd) - lr * rms_rows(gw)
        eh = eh * (1 - lr * wd) - lr * rms_rows(m)
    torch.testing.assert_close(w.detach(), ew)
    torch.testing.assert_close(h.detach(), eh)
    assert set(opt.state[w]) == {"step"}  # no momentum off the last layer
    torch.testing.assert_close(opt.state[h]["momentum_buffer"], m)


def test_rms_floor_and_zero_rows():
    g = torch.zeros(3, 4, dtype=torch.float64)
    g[1] = 1e-12
    g[2, 0] = 1e20  # finite, its square overflows fp32: normalised overflow-safe
    out = column_normalize(g.float(), "linear", 1e-8)
    assert torch.equal(out[0], torch.zeros(4))
    torch.testing.assert_close(out[1], torch.full((4,), 1e-4))  # RMS 1e-12 < ε: divided by ε
    torch.testing.assert_close(out[2], torch.tensor([2.0, 0, 0, 0]))  # RMS = 1e20/2


def test_auto_last_layer_is_the_head_of_a_standard_gpt():
    model = GPT(size="tiny", seq_len=16)
    opt = SCALE(model.parameters())
    last = [g for g in opt.param_groups if g["last_layer"]]
    assert len(last) == 1 and last[0]["params"] == [model.lm_head.weight]
    # a group that sets last_layer turns the automatic choice off; so does auto_last_layer=False
    marked = SCALE([{"params": [model.lm_head.weight], "last_layer": False}, {"params": [model.tok_emb.weight]}])
    assert not any(g["last_layer"] for g in marked.param_groups)
    assert not any(g["last_layer"] for g in SCALE(model.parameters(), auto_last_layer=False).param_groups)


def test_scale_param_groups_marks_head_and_embedding():
    model = GPT(size="tiny", seq_len=16)
    opt = SCALE(scale_param_groups(model))
    by_param = {id(p): g for g in opt.param_groups for p in g["params"]}
    head, emb = by_param[id(model.lm_head.weight)], by_param[id(model.tok_emb.weight)]
    assert head["use_muon"] and head["last_layer"] and head["layout"] == "linear"
    assert emb["use_muon"] and not emb["last_layer"] and emb["layout"] == "embedding"
    assert not by_param[id(model.norm.weight)]["use_muon"]
    assert sum(g["last_layer"] for g in opt.param_groups) == 1


def _run(params, steps, groups=None, **kw):
    opt = SCALE(groups or params, **kw)
    for i in range(steps):
        for q in params:
            q.grad = torch.sin(3 * q.detach().float() + i).to(q.dtype)
        opt.step()
    return opt


def test_foreach_equals_per_parameter():
    shapes = [(4, 3), (4, 3), (3, 2, 4), (4, 2, 3, 1), (4,), (5, 4)]
    init = [_mat(s, i, torch.float32) for i, s in enumerate(shapes)]
    runs = []
    for foreach in (False, True):
        params = [torch.nn.Parameter(x.clone()) for x in init]
        _run(params, 4, foreach=foreach, weight_decay=0.1)
        runs.append(params)
    for a, b in zip(*runs):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_bf16_params_fp32_momentum():
    x = _mat((5, 4), 4, torch.float32)
    p16, p32 = torch.nn.Parameter(x.to(torch.bfloat16)), torch.nn.Parameter(x.to(torch.bfloat16).float())
    opt16, _ = _run([p16], 3), _run([p32], 3)
    assert p16.dtype == torch.bfloat16 and opt16.state[p16]["momentum_buffer"].dtype == torch.float32
    torch.testing.assert_close(p16.float(), p32.detach(), rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("foreach", [False, True])
def test_state_dict_round_trip_is_bit_exact(foreach):
    init = [_mat((4, 3), 5, torch.float32), _mat((3,), 6, torch.float32), _mat((2, 3), 7, torch.float32)]
    params = [torch.nn.Parameter(x.clone()) for x in init]
    opt = _run(params, 2, foreach=foreach)
    state, weights = copy.deepcopy((opt.state_dict(), [p.detach().clone() for p in params]))
    resumed = [torch.nn.Parameter(w) for w in weights]
    opt2 = SCALE(resumed, foreach=foreach)
    opt2.load_state_dict(state)
    for ps, o in ((params, opt), (resumed, opt2)):
        for i in range(2, 5):
            for q in ps:
                q.grad = torch.cos(q.detach() + i)
            o.step()
    for a, b in zip(params, resumed):
        assert torch.equal(a, b)


def test_validation_names_the_argument():
    p = [torch.nn.Parameter(torch.randn(3, 3))]
    for name, value in [("momentum", 1.0), ("eps", math.nan), ("layout", "rows"), ("last_layer", 1),
                        ("auto_last_layer", "yes"), ("adamw_lr", -1.0)]:
        with pytest.raises(ValueError, match=name):
            SCALE(p, **{name: value})


def test_state_bytes_only_for_the_head():
    model = GPT(size="tiny", seq_len=16)
    opt = SCALE(scale_param_groups(model))
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    opt.step()
    matrix_state = sum(t.numel() for g in opt.param_groups if g["use_muon"] for p in g["params"]
                       for k, t in opt.state[p].items() if k != "step")
    assert matrix_state == model.lm_head.weight.numel()


def test_registered():
    info = lightning_optim.registry.get("scale")
    assert info.cls is SCALE and info.family == "matrix" and info.first_moment == "momentum_buffer"
