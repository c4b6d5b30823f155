"""Muon (lightning_optim.muon) and the matrix machinery (lightning_optim.matrix): the equations, the split,
torch's and pytorch_optimizer's Muon as second opinions, the bf16 momentum buffer, resume, validation."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from lightning_optim.matrix import NS_COEFFICIENTS, matrix_param_groups, matrix_shape, newton_schulz, split_params
from lightning_optim.muon import Muon, muon_scale
from lightning_optim.param_groups import param_groups

A, B, C = NS_COEFFICIENTS


# -- references written from the equations (KellerJordan/Muon muon.py) ---------------------------------------
def ref_ns(g: torch.Tensor, steps: int = 5, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The reference's order: cast, transpose if rows > cols, X / (‖X‖_F + 1e-7), X ← aX + (bA + cA²)X."""
    x = g.to(dtype)
    tall = g.size(-2) > g.size(-1)
    if tall:
        x = x.mT
    x = x / (x.norm(dim=(-2, -1), keepdim=True) + 1e-7)
    for _ in range(steps):
        gram = x @ x.mT
        x = A * x + (B * gram + C * gram @ gram) @ x
    return x.mT if tall else x


def ref_muon_step(p, g, buf, *, lr, mu, wd, nesterov, scale_rule="spectral", dtype=torch.float32):
    """One Muon step of one parameter (returns new p, new buf), flattening conv kernels, per expert for 3-D."""
    buf = buf + (1 - mu) * (g - buf)
    u = g + mu * (buf - g) if nesterov else buf
    view = u.reshape(u.shape[0], -1) if u.ndim >= 4 else u
    rows, cols = view.shape[-2:]
    o = ref_ns(view, dtype=dtype).float().reshape(p.shape)
    s = math.sqrt(max(1, rows / cols)) if scale_rule == "spectral" else 0.2 * math.sqrt(max(rows, cols))
    return p * (1 - lr * wd) - lr * s * o, buf


def ref_adamw_step(p, g, m, v, t, *, lr, betas, eps, wd):
    b1, b2 = betas
    m = b1 * m + (1 - b1) * g
    v = b2 * v + (1 - b2) * g * g
    m_hat, v_hat = m / (1 - b1**t), v / (1 - b2**t)
    return p * (1 - lr * wd) - lr * m_hat / (v_hat.sqrt() + eps), m, v


def _params(shapes, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [nn.Parameter(torch.randn(s, generator=gen, dtype=torch.float32).to(dtype)) for s in shapes]


def _grads(params, step, scale=1.0):
    gen = torch.Generator().manual_seed(100 + step)
    return [scale * torch.randn(p.shape, generator=gen) for p in params]


def _run(opt, params, steps, scale=1.0):
    for t in range(steps):
        for p, g in zip(params, _grads(params, t, scale)):
            p.grad = g.to(p.dtype)
        opt.step()


SHAPES = [(6, 4), (4, 6), (5,), (3, 2, 3, 3), (2, 3, 4)]  # tall, wide, 1-D, conv kernel, 2 experts


# -- Newton-Schulz -------------------------------------------------------------------------------------------
def test_newton_schulz_closed_form_on_a_diagonal_matrix():
    """NS maps each singular value σ/‖G‖_F through the quintic p(σ) = aσ + bσ³ + cσ⁵ five times."""
    d = torch.tensor([3.0, 1.0, 0.5], dtype=torch.float64)
    g = torch.zeros(3, 5, dtype=torch.float64)
    g[range(3), range(3)] = d
    sigma = d / (d.norm() + 1e-7)
    for _ in range(5):
        sigma = A * sigma + B * sigma**3 + C * sigma**5
    out = newton_schulz(g, 5, torch.float64)
    expected = torch.zeros_like(g)
    expected[range(3), range(3)] = sigma
    torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-7)  # ε enters after fp32 norm: 1e-6 rel.
    torch.testing.assert_close(newton_schulz(g.T, 5, torch.float64), expected.T, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("dtype, tol", [("float32", 1e-5), ("bfloat16", 0.0)])  # bf16: the reference's bits
@pytest.mark.parametrize("shape", [(8, 5), (5, 8), (3, 6, 4)])
def test_newton_schulz_matches_the_reference(dtype, tol, shape):
    g = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    got = newton_schulz(g, 5, dtype)
    assert got.dtype == getattr(torch, dtype) and got.shape == g.shape
    torch.testing.assert_close(got.float(), ref_ns(g, dtype=getattr(torch, dtype)).float(), rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_newton_schulz_singular_values_lie_in_the_quintic_band(dtype):
    """The quintic does not converge to 1: on random matrices the singular values lie in about [0.67, 1.14]."""
    g = torch.randn(32, 16, generator=torch.Generator().manual_seed(2))
    s = torch.linalg.svdvals(newton_schulz(g, 5, dtype).float())
    assert 0.6 < s.min() and s.max() < 1.2
    assert s.max() - s.min() > 0.1  # not an exact orthogonalization (that would be a different iteration)


def test_newton_schulz_is_overflow_safe_and_keeps_zero():
    g = torch.randn(4, 3, generator=torch.Generator().manual_seed(3))
    g[1, 1] = 1e20  # its square overflows fp32: a naive Frobenius norm is inf and the result 0
    out = newton_schulz(g, 5, "float32")
    assert torch.isfinite(out).all() and out.abs().max() > 0.5
    torch.testing.assert_close(out, newton_schulz(g / 1e20, 5, "float32"), rtol=1e-4, atol=1e-5)
    assert torch.equal(newton_schulz(torch.zeros(3, 4), 5, "float32"), torch.zeros(3, 4))


def test_matrix_shapes():
    assert matrix_shape((6, 4)) == (6, 4)
    assert matrix_shape((8, 3, 3, 3)) == (8, 27)
    assert matrix_shape((4, 6, 5)) == (4, 6, 5)  # per expert
    assert matrix_shape((4, 6, 5), flatten=True) == (4, 30)  # Conv1d
    with pytest.raises(ValueError, match="at least 2"):
        matrix_shape((5,))


# -- the update --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("nesterov", [True, False])
@pytest.mark.parametrize("adjust_lr", ["spectral", "match_rms_adamw"])
@pytest.mark.parametrize("foreach", [False, True])
def test_three_steps_match_the_equations(nesterov, adjust_lr, foreach):
    """fp32 NS: Muon on 2-D/4-D/3-D tensors, AdamW on the 1-D one, against the references above."""
    params = _params(SHAPES)
    kw = dict(lr=0.05, momentum=0.9, weight_decay=0.1, nesterov=nesterov, adjust_lr=adjust_lr)
    adamw = dict(lr=1e-2, betas=(0.8, 0.9), eps=1e-8, wd=0.05)
    opt = Muon(params, ns_dtype="float32", adamw_lr=adamw["lr"], adamw_betas=adamw["betas"],
               adamw_eps=adamw["eps"], adamw_weight_decay=adamw["wd"], foreach=foreach, **kw)
    ref = [p.detach().double().clone() for p in params]
    bufs = [torch.zeros_like(r) for r in ref]
    vs = [torch.zeros_like(r) for r in ref]
    for t in range(3):
        grads = _grads(params, t)
        for p, g in zip(params, grads):
            p.grad = g.clone()
        opt.step()
        for i, g in enumerate(grads):
            g = g.double()
            if ref[i].ndim >= 2:
                ref[i], bufs[i] = ref_muon_step(ref[i], g, bufs[i], lr=kw["lr"], mu=kw["momentum"],
                                                wd=kw["weight_decay"], nesterov=nesterov, scale_rule=adjust_lr,
                                                dtype=torch.float64)
            else:
                ref[i], bufs[i], vs[i] = ref_adamw_step(ref[i], g, bufs[i], vs[i], t + 1, **adamw)
    for p, r in zip(params, ref):
        torch.testing.assert_close(p.detach().double(), r, rtol=1e-5, atol=1e-6)
    assert set(opt.state[params[0]]) == {"momentum_buffer", "step"}
    assert set(opt.state[params[2]]) == {"exp_avg", "exp_avg_sq", "step"}


def test_bf16_newton_schulz_matches_the_reference_within_bf16_rounding():
    params = _params([(8, 6), (6, 8)])
    opt = Muon(params, lr=0.02)  # ns_dtype bfloat16, the default
    ref = [p.detach().clone() for p in params]
    bufs = [torch.zeros_like(r) for r in ref]
    for t in range(3):
        grads = _grads(params, t)
        for p, g in zip(params, grads):
            p.grad = g.clone()
        opt.step()
        for i, g in enumerate(grads):
            ref[i], bufs[i] = ref_muon_step(ref[i], g, bufs[i], lr=0.02, mu=0.95, wd=0.0, nesterov=True,
                                            dtype=torch.bfloat16)
    # same bf16 operation order as the reference; the fp32 EMA written out (not lerp) and the scale applied
    # in fp32 (the reference scales the bf16 update) flip a few bf16 roundings: 1% of one step (lr·|O| ≈ 0.01)
    for p, r in zip(params, ref):
        torch.testing.assert_close(p.detach(), r, rtol=0, atol=1e-4)


def test_conv_kernel_is_flattened_and_experts_are_orthogonalized_one_by_one():
    """momentum 0, Nesterov off: the step is −lr·s·NS(view of G) exactly."""
    conv, experts, conv1d = _params([(4, 2, 3, 3), (3, 4, 6), (4, 3, 5)])
    g_conv, g_exp, g_1d = _grads([conv, experts, conv1d], 0)
    opt = Muon([{"params": [conv, experts]}, {"params": [conv1d], "flatten": True}], lr=1.0, momentum=0.0,
               nesterov=False, ns_dtype="float32")
    before = [conv.detach().clone(), experts.detach().clone(), conv1d.detach().clone()]
    conv.grad, experts.grad, conv1d.grad = g_conv.clone(), g_exp.clone(), g_1d.clone()
    opt.step()
    torch.testing.assert_close(before[0] - conv.detach(), ref_ns(g_conv.reshape(4, 18)).reshape(4, 2, 3, 3))
    for e in range(3):  # each expert on its own: (4, 6) is wide, scale 1
        torch.testing.assert_close(before[1][e] - experts.detach()[e], ref_ns(g_exp[e]), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(before[2] - conv1d.detach(), ref_ns(g_1d.reshape(4, 15)).reshape(4, 3, 5))
    assert muon_scale(8, 2, "spectral") == 2.0 and muon_scale(2, 8, "spectral") == 1.0
    assert muon_scale(2, 8, "match_rms_adamw") == pytest.approx(0.2 * math.sqrt(8))


def test_the_adamw_rule_is_torch_adamw():
    params = _params([(7,), (3,)])
    twins = [nn.Parameter(p.detach().clone()) for p in params]
    opt = Muon([{"params": params, "use_muon": False}], adamw_weight_decay=0.1, adamw_lr=1e-2)
    torch_opt = torch.optim.AdamW(twins, lr=1e-2, betas=(0.9, 0.95), eps=1e-10, weight_decay=0.1, foreach=False)
    _run(opt, params, 4)
    _run(torch_opt, twins, 4)
    for p, q in zip(params, twins):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


def test_gradient_is_not_written():
    (p,) = _params([(5, 3)])
    g = torch.randn(5, 3)
    p.grad = g.clone()
    Muon([p], nesterov=True).step()
    assert torch.equal(p.grad, g)  # the reference's Nesterov `grad.lerp_` overwrites p.grad


# -- second opinions: torch.optim.Muon and pytorch_optimizer ----------------------------------------------------
def assert_same_moves(params, twins, start, band=0.06):
    """Equal within bf16 rounding: bf16 Newton-Schulz implementations that round in different places
    (torch fuses b·A + c·A² into one addmm) differ by ~3% of a parameter's total move after 3 steps (our
    own bf16 vs fp32 NS differ by as much); a wrong scale (√(8/6)), momentum or decay is 15% or more."""
    for p, q, p0 in zip(params, twins, start):
        ours, theirs = p.detach() - p0, q.detach() - p0
        assert theirs.norm() > 0
        assert (ours - theirs).norm() / theirs.norm() < band


@pytest.mark.parametrize("nesterov", [False, True])
@pytest.mark.parametrize("adjust_lr, torch_fn", [("spectral", "original"), ("match_rms_adamw", "match_rms_adamw")])
def test_matches_torch_muon_within_bf16_rounding(nesterov, adjust_lr, torch_fn):
    """fp32 params. torch 2.13's Muon keeps the momentum as an EMA (buf.lerp_(g, 1 − μ)), as the reference,
    and orthogonalizes in bf16; it normalises by max(‖X‖, ε) instead of ‖X‖ + ε (no difference here).
    Mapping: lr, weight_decay, momentum, nesterov equal; adjust_lr_fn "original" ↔ "spectral"."""
    params = _params([(8, 6), (6, 8)])
    twins = [nn.Parameter(p.detach().clone()) for p in params]
    kw = dict(lr=0.02, weight_decay=0.1, momentum=0.95, nesterov=nesterov)
    start = [p.detach().clone() for p in params]
    _run(Muon(params, adjust_lr=adjust_lr, **kw), params, 3)
    _run(torch.optim.Muon(twins, adjust_lr_fn=torch_fn, **kw), twins, 3)
    assert_same_moves(params, twins, start)


def test_matches_pytorch_optimizer_muon_within_bf16_rounding():
    """pytorch_optimizer 4.1 Muon (needs explicit use_muon groups; use_adjusted_lr=False is the spectral
    scale; adamw_wd ↔ adamw_weight_decay). No disagreement found beyond bf16 rounding."""
    pytorch_optimizer = pytest.importorskip("pytorch_optimizer")
    params = _params([(8, 6), (6, 8), (5,)])
    twins = [nn.Parameter(p.detach().clone()) for p in params]
    start = [p.detach().clone() for p in params]
    _run(Muon(params, weight_decay=0.1, adamw_lr=1e-2), params, 3)
    ref = pytorch_optimizer.Muon(
        [{"params": twins[:2], "use_muon": True}, {"params": twins[2:], "use_muon": False}],
        lr=0.02, weight_decay=0.1, adamw_lr=1e-2, foreach=False,
    )
    _run(ref, twins, 3)
    assert_same_moves(params[:2], twins[:2], start[:2])
    torch.testing.assert_close(params[2], twins[2], rtol=1e-6, atol=1e-7)


def test_bf16_momentum_buffer_stays_the_ema_unlike_torch_muon():
    """bf16 params, nesterov=False, two steps: our fp32 buffer is exactly the EMA of the gradients. torch
    2.13's Muon normalises `grad.bfloat16()` in place, which for a bf16 buffer *is* the buffer: after its
    step the buffer holds the normalised (and orthogonalized-input) matrix, no longer the EMA."""
    (p,) = _params([(6, 4)], dtype=torch.bfloat16)
    twin = nn.Parameter(p.detach().clone())
    g1, g2 = (g.bfloat16() for g in _grads([p], 0)), None
    g1 = list(g1)[0]
    g2 = _grads([p], 1)[0].bfloat16()
    opt = Muon([p], nesterov=False)
    for g in (g1, g2):
        p.grad = g.clone()
        opt.step()
    buf = opt.state[p]["momentum_buffer"]
    assert buf.dtype == torch.float32
    ema = 0.95 * (0.05 * g1.float()) + 0.05 * g2.float()
    torch.testing.assert_close(buf, ema, rtol=1e-6, atol=1e-7)

    torch_opt = torch.optim.Muon([twin], lr=0.02, nesterov=False)
    torch_ema = torch.zeros(6, 4, dtype=torch.bfloat16)
    for g in (g1, g2):
        twin.grad = g.clone()
        torch_ema = torch_ema.lerp(g, 0.05)  # what its buffer should hold (bf16, its own dtype)
        torch_opt.step()
    torch_buf = torch_opt.state[twin]["momentum_buffer"]
    if torch.allclose(torch_buf.float(), torch_ema.float(), rtol=1e-2, atol=1e-3):
        pytest.skip("this torch's Muon keeps its bf16 momentum buffer intact (the bug is fixed)")
    # observed with torch 2.13: the buffer was divided by its Frobenius norm, so it has norm ≈ 1
    assert torch.linalg.matrix_norm(torch_buf.float()) == pytest.approx(1.0, rel=2e-2)


# -- paths, resume, validation -----------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_foreach_equals_per_parameter(dtype):
    shapes = [(6, 4), (6, 4), (4, 6), (5,), (3, 2, 3, 3), (2, 3, 4)]
    a, b = _params(shapes, dtype), _params(shapes, dtype)
    _run(Muon(a, weight_decay=0.1, foreach=False), a, 3)
    _run(Muon(b, weight_decay=0.1, foreach=True), b, 3)
    for p, q in zip(a, b):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


def test_state_dict_round_trip_is_bit_exact():
    params = _params(SHAPES)
    opt = Muon(params, weight_decay=0.1)
    _run(opt, params, 2)
    saved = copy.deepcopy((opt.state_dict(), [p.detach().clone() for p in params]))
    twin = _params(SHAPES, seed=5)
    with torch.no_grad():
        for q, w in zip(twin, saved[1]):
            q.copy_(w)
    twin_opt = Muon(twin, weight_decay=0.1)
    twin_opt.load_state_dict(saved[0])
    for o, ps in ((opt, params), (twin_opt, twin)):
        for t in range(2, 4):
            for p, g in zip(ps, _grads(ps, t)):
                p.grad = g
            o.step()
    for p, q in zip(params, twin):
        assert torch.equal(p, q)
    assert twin_opt.param_groups[0]["global_step"] == 4


@pytest.mark.parametrize(
    "name, value",
    [("lr", -1.0), ("momentum", 1.0), ("ns_steps", 0), ("ns_dtype", "float16"), ("adjust_lr", "rms"),
     ("adamw_betas", (0.9, 1.0)), ("adamw_eps", math.nan), ("adamw_lr", math.inf), ("nesterov", 1),
     ("weight_decay", math.nan), ("flatten", "yes")],
)
def test_validation_names_the_argument(name, value):
    with pytest.raises(ValueError, match=name):
        Muon(_params([(3, 2), (2,)]), **{name: value})


# -- the split ------------------------------------------------------------------------------------------------
class _Toy(nn.Module):
    def __init__(self, vocab=11, d=6, tie=False):
        super().__init__()
        self.tok_emb = nn.Embedding(vocab, d)
        self.conv = nn.Conv2d(2, 3, 3)
        self.conv1d = nn.Conv1d(3, 4, 2)
        self.experts = nn.Parameter(torch.randn(2, d, d))
        self.fc = nn.Linear(d, d)
        self.norm = nn.LayerNorm(d)
        self.proj = nn.Linear(d, vocab, bias=False)  # the head, found by its vocabulary-sized output
        if tie:
            self.proj.weight = self.tok_emb.weight


def test_split_params_by_module_type():
    split = matrix_param_groups(_Toy())
    assert split["muon"] == ["experts", "conv.weight", "conv1d.weight", "fc.weight"]
    assert split["adamw"] == ["tok_emb.weight", "conv.bias", "conv1d.bias", "fc.bias", "norm.weight", "norm.bias",
                              "proj.weight"]
    groups = split_params(_Toy(), lr=1e-3)
    assert [(g["use_muon"], g.get("flatten", False), len(g["params"])) for g in groups] == [
        (True, False, 3), (True, True, 1), (False, False, 7)]
    assert groups[2]["lr"] == 1e-3
    tied = matrix_param_groups(_Toy(tie=True))  # a tied head is the embedding's tensor: listed once, AdamW
    assert "proj.weight" not in tied["adamw"] + tied["muon"] and "tok_emb.weight" in tied["adamw"]
    named_head = nn.ModuleDict({"body": nn.Linear(4, 4), "lm_head": nn.Linear(4, 9)})
    assert matrix_param_groups(named_head)["adamw"] == ["body.bias", "lm_head.weight", "lm_head.bias"]


def test_split_params_groups_build_muon():
    model = _Toy()
    opt = Muon(split_params(model), adamw_lr=1e-3)
    assert [g["use_muon"] for g in opt.param_groups] == [True, True, False]
    assert opt.param_groups[2]["lr"] == 1e-3 and opt.param_groups[2]["betas"] == (0.9, 0.95)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    opt.step()
    assert "momentum_buffer" in opt.state[model.conv1d.weight] and "exp_avg" in opt.state[model.tok_emb.weight]


def test_bare_parameters_split_by_shape_and_named_parameters_by_name():
    model = _Toy()
    opt = Muon(model.parameters())
    muon_ids = {id(p) for g in opt.param_groups if g["use_muon"] for p in g["params"]}
    assert muon_ids == {id(p) for p in model.parameters() if p.ndim >= 2}  # embedding included: shape only
    assert [g["use_muon"] for g in opt.param_groups] == [True, False]
    assert opt.param_groups[1]["lr"] == 3e-4 and opt.param_groups[0]["lr"] == 0.02
    named = Muon(model.named_parameters())
    adamw_names = [n for g in named.param_groups if not g["use_muon"] for n in g["param_names"]]
    assert "tok_emb.weight" in adamw_names and "fc.weight" not in adamw_names


def test_every_group_option_survives():
    """A DeepSpeed Muon once dropped users' groups; here each group is kept (split in two when mixed)."""
    (w, b, e, v) = _params([(4, 3), (4,), (5, 2), (3,)])
    opt = Muon([
        {"params": [w, b], "lr": 0.01, "tag": "mixed", "adamw_lr": 1e-3, "weight_decay": 0.0},
        {"params": [e], "use_muon": False, "lr": 5e-4, "tag": "emb", "betas": (0.8, 0.9)},
        {"params": [v], "rule": "adamw", "tag": "vec"},
        {"params": [], "tag": "empty"},
    ], weight_decay=0.1, adamw_weight_decay=0.2)
    summary = [(g["tag"], g["use_muon"], g["lr"], g["weight_decay"], len(g["params"])) for g in opt.param_groups]
    assert summary == [
        ("mixed", True, 0.01, 0.0, 1), ("mixed", False, 1e-3, 0.0, 1),  # explicit weight_decay 0: no decay
        ("emb", False, 5e-4, 0.2, 1), ("vec", False, 3e-4, 0.2, 1), ("empty", True, 0.02, 0.1, 0)]
    assert opt.param_groups[2]["betas"] == (0.8, 0.9)
    assert sorted(id(p) for g in opt.param_groups for p in g["params"]) == sorted(map(id, (w, b, e, v)))


def test_a_matrix_group_refuses_vectors_and_bad_rules():
    w, b = _params([(4, 3), (4,)])
    with pytest.raises(ValueError, match="use_muon=True"):
        Muon([{"params": [w, b], "use_muon": True}])
    with pytest.raises(ValueError, match="rule"):
        Muon([{"params": [w], "rule": "sgd"}])


def test_param_groups_yaml_rules_pass_use_muon_through():
    """What the LightningCLI `param_groups:` section builds: embedding and head sent to AdamW by name."""
    model = nn.ModuleDict({"emb": nn.Embedding(9, 4), "fc": nn.Linear(4, 4), "lm_head": nn.Linear(4, 9, bias=False)})
    groups = param_groups(model, ["bias"], [{"params": "embedding", "use_muon": False},
                                           {"params": "lm_head.*", "use_muon": False}])
    opt = Muon(groups)
    rules = {id(p): g["use_muon"] for g in opt.param_groups for p in g["params"]}
    assert rules[id(model["emb"].weight)] is False and rules[id(model["lm_head"].weight)] is False
    assert rules[id(model["fc"].weight)] is True and rules[id(model["fc"].bias)] is False


def test_foreign_adamw_state_is_refused_with_the_keys():
    params = _params([(4, 3), (4,)])
    adamw = torch.optim.AdamW(params)
    _run(adamw, params, 1)
    with pytest.raises(ValueError, match="exp_avg"):
        Muon(params).load_state_dict(adamw.state_dict())
