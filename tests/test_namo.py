"""NAMO and NAMO-D (lightning_optim.namo): a hand-computed step, several steps against a reference written
from the authors' equations (minxin-zhg/namo src/namo.py), the column clamp, the split, both paths,
resume, overflow, validation. pytorch_optimizer 4.1.0 has neither optimizer, so there is no second opinion."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from lightning_optim.matrix import NS_COEFFICIENTS
from lightning_optim.namo import NAMO, NAMOD, namo_d_matrices_

A, B, C = NS_COEFFICIENTS


# -- references written from the authors' equations -----------------------------------------------------------
def ref_ns(g: torch.Tensor, steps: int = 5) -> torch.Tensor:
    """Quintic Newton-Schulz in fp32: transpose if tall, X/(‖X‖_F + 1e-7), X ← aX + (bA + cA²)X."""
    x = g.float()
    tall = x.size(-2) > x.size(-1)
    if tall:
        x = x.mT
    x = x / (x.norm(dim=(-2, -1), keepdim=True) + 1e-7)
    for _ in range(steps):
        gram = x @ x.mT
        x = A * x + (B * gram + C * gram @ gram) @ x
    return x.mT if tall else x


def ref_namo(p, g, buf, v, t, *, lr, b1, b2, eps, wd, scale=0.2, nesterov=True, column=False, c=0.75):
    """One NAMO (column=False) or NAMO-D step of a 2-D p, as the authors' NAMO/NAMO_D.step (returns p, buf, v)."""
    m, n = p.shape
    buf = buf + (1 - b1) * (g - buf)
    u = g + b1 * (buf - g) if nesterov else buf
    o = ref_ns(u).to(p.dtype)
    base = lr * math.sqrt(1 - b2**t) / (1 - b1**t + 1e-12)
    s = scale * math.sqrt(max(m, n))
    if not column:
        v = b2 * v + (1 - b2) * g.norm() ** 2
        alpha = base * u.norm() / (v.sqrt() + eps)
        p = p * (1 - wd * min(alpha, 1.0)) - min(alpha * s, 1.0) * o
        return p, buf, v
    v = b2 * v + (1 - b2) * g.norm(dim=0) ** 2
    d = u.norm(dim=0) / (v.sqrt() + eps)
    if 0 < c <= 1:
        mean = d.mean()
        d = d.clamp(min=mean * c, max=mean / c)
    decay = (1 - wd * (d * base).clamp(max=1.0)).clamp(min=0.0)
    p = p * decay - o * (d * base * s).clamp(max=1.0)
    return p, buf, v


def _params(shapes, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [nn.Parameter(torch.randn(s, generator=gen).to(dtype)) for s in shapes]


def _set_grads(params, step, scale=1.0):
    gen = torch.Generator().manual_seed(100 + step)
    for p in params:
        p.grad = (scale * torch.randn(p.shape, generator=gen)).to(p.dtype)


def _quintic(x: float, steps: int = 5) -> float:
    for _ in range(steps):
        x = A * x + B * x**3 + C * x**5
    return x


# -- a hand-computed first step ------------------------------------------------------------------------------
def test_namo_first_step_by_hand_on_a_diagonal_gradient():
    """G = [[3, 0, 0], [0, -1, 0]]: NS acts on each singular value σ/‖G‖ as the scalar quintic; at t = 1
    M = (1−β1)G, U = (1−β1²)G, v = (1−β2)‖G‖², α = η√(1−β2)/(1−β1+1e-12)·‖U‖/(√v+ε)."""
    lr, b1, b2, eps, wd = 0.01, 0.95, 0.99, 1e-8, 0.1
    w0 = torch.tensor([[0.5, -0.25, 1.0], [2.0, 0.0, -1.5]], dtype=torch.float64)
    p = nn.Parameter(w0.clone())
    p.grad = torch.tensor([[3.0, 0.0, 0.0], [0.0, -1.0, 0.0]], dtype=torch.float64)
    NAMO([p], lr=lr, betas=(b1, b2), eps=eps, weight_decay=wd, ns_dtype="float32").step()

    g_norm = math.sqrt(10.0)
    u_norm = (1 - b1**2) * g_norm
    alpha = lr * math.sqrt(1 - b2) / (1 - b1 + 1e-12) * u_norm / (math.sqrt(1 - b2) * g_norm + eps)
    assert alpha == pytest.approx(lr * (1 + b1), rel=1e-6)  # the closed form of the first step
    ortho = torch.zeros(2, 3, dtype=torch.float64)
    ortho[0, 0] = _quintic(3 / g_norm)
    ortho[1, 1] = -_quintic(1 / g_norm)
    size = min(alpha * 0.2 * math.sqrt(3), 1.0)
    expected = w0 * (1 - wd * min(alpha, 1.0)) - size * ortho
    torch.testing.assert_close(p.detach(), expected, rtol=0, atol=2e-6)


def test_namo_d_first_step_by_hand_with_the_clamp():
    """Per column at t = 1: v_j = (1−β2)‖G_:j‖², d_j = (1−β1²)‖G_:j‖/(√v_j + ε) ≈ (1−β1²)/√(1−β2) for every
    non-zero column and 0 for a zero column; the clamp lifts the zero column to c·mean(d)."""
    lr, b1, b2, eps, wd, c = 0.01, 0.9, 0.99, 1e-8, 0.1, 0.5
    w0 = torch.tensor([[1.0, 2.0, 3.0], [-1.0, 0.5, 0.25]], dtype=torch.float64)
    p = nn.Parameter(w0.clone())
    g = torch.tensor([[2.0, 0.0, 0.0], [0.0, 1.0, 0.0]], dtype=torch.float64)  # third column zero
    p.grad = g.clone()
    NAMOD([p], lr=lr, betas=(b1, b2), eps=eps, weight_decay=wd, clamp=c, ns_dtype="float32").step()

    d_live = [(1 - b1**2) * x / (math.sqrt(1 - b2) * x + eps) for x in (2.0, 1.0)]
    d = [*d_live, 0.0]
    mean = sum(d) / 3
    d = [min(max(x, c * mean), mean / c) for x in d]
    assert d[2] == pytest.approx(c * mean)  # the zero column was lifted: the clamp is active
    base = lr * math.sqrt(1 - b2) / (1 - b1 + 1e-12)
    s = 0.2 * math.sqrt(3)
    g_norm = math.sqrt(5.0)
    ortho = torch.zeros(2, 3, dtype=torch.float64)
    ortho[0, 0] = _quintic(2 / g_norm)
    ortho[1, 1] = _quintic(1 / g_norm)
    expected = w0.clone()
    for j in range(3):
        decay = max(0.0, 1 - wd * min(d[j] * base, 1.0))
        expected[:, j] = w0[:, j] * decay - min(d[j] * base * s, 1.0) * ortho[:, j]
    torch.testing.assert_close(p.detach(), expected, rtol=0, atol=2e-6)


# -- several steps against the authors' equations --------------------------------------------------------------
@pytest.mark.parametrize("cls", [NAMO, NAMOD])
@pytest.mark.parametrize("foreach", [False, True])
@pytest.mark.parametrize("nesterov", [True, False])
@pytest.mark.parametrize("lr", [0.01, 2.0])  # 2.0: the adaptive step and the update size hit their clamp at 1
def test_steps_match_the_authors_equations(cls, foreach, nesterov, lr):
    shapes = [(4, 6), (6, 3), (4, 6)]
    params = _params(shapes)
    refs = [(p.detach().clone(), torch.zeros(p.shape), torch.zeros(() if cls is NAMO else p.shape[1])) for p in params]
    opt = cls(params, lr=lr, weight_decay=0.1, nesterov=nesterov, ns_dtype="float32", foreach=foreach)
    for t in range(1, 6):
        _set_grads(params, t, scale=0.1 * t)
        grads = [p.grad.clone() for p in params]
        opt.step()
        refs = [
            ref_namo(rp, g, rb, rv, t, lr=lr, b1=0.95, b2=0.99, eps=1e-8, wd=0.1, nesterov=nesterov, column=cls is NAMOD)
            for (rp, rb, rv), g in zip(refs, grads)
        ]
        for p, (rp, _, _) in zip(params, refs):
            torch.testing.assert_close(p.detach(), rp, rtol=1e-5, atol=1e-5)
    for p, (_, rb, rv) in zip(params, refs):
        state = opt.state[p]
        torch.testing.assert_close(state["momentum_buffer"], rb)
        torch.testing.assert_close(state["grad_norm_sq" if cls is NAMO else "col_norm_sq"], rv, rtol=1e-5, atol=0)


def test_namo_d_clamp_one_gives_a_single_scale_and_zero_turns_it_off():
    gen = torch.Generator().manual_seed(3)
    w = torch.randn(5, 4, generator=gen)
    g = torch.randn(5, 4, generator=gen) * torch.tensor([1.0, 10.0, 0.1, 3.0])  # very different columns
    u = 0.3 * g
    options = dict(lr=0.01, beta1=0.95, beta2=0.99, eps=1e-8, weight_decay=0.0, scale=0.2, ns_steps=5, ns_dtype="float32")
    ortho = ref_ns(u)
    for c, same in ((1.0, True), (0.0, False)):
        v = torch.tensor([1.0, 0.01, 5.0, 0.2])  # a history that gives the columns different scales
        new = namo_d_matrices_(w, g, u, v, 1.0, clamp=c, **options)
        per_col = ((w - new) / ortho).mean(dim=0)  # the diagonal D
        assert torch.allclose(per_col, per_col[0].expand(4), rtol=1e-4) is same


def test_experts_are_per_matrix_and_conv_kernels_are_flattened():
    """A 3-D weight steps as its E matrices would one by one (one adaptive scale each); a conv kernel as its
    (out, in·kh·kw) view."""
    for cls in (NAMO, NAMOD):
        expert = _params([(3, 4, 5)])[0]
        singles = [nn.Parameter(expert.detach()[e].clone()) for e in range(3)]
        conv = _params([(4, 2, 3, 3)], seed=1)[0]
        flat = nn.Parameter(conv.detach().reshape(4, 18).clone())
        opt_a = cls([expert, conv], ns_dtype="float32")
        opt_b = cls([*singles, flat], ns_dtype="float32")
        for t in range(1, 4):
            _set_grads([expert, conv], t)
            for e, s in enumerate(singles):
                s.grad = expert.grad[e].clone()
            flat.grad = conv.grad.reshape(4, 18).clone()
            opt_a.step()
            opt_b.step()
        torch.testing.assert_close(expert.detach(), torch.stack([s.detach() for s in singles]))
        torch.testing.assert_close(conv.detach().reshape(4, 18), flat.detach())


# -- the split and the AdamW rule ---------------------------------------------------------------------------------
def test_split_by_shape_and_the_adamw_rule_is_torch_adamw():
    model = nn.Sequential(nn.Linear(4, 5), nn.Linear(5, 3))
    opt = NAMO(model.parameters(), adamw_lr=1e-2, adamw_weight_decay=0.1)
    assert [g["use_muon"] for g in opt.param_groups] == [True, False]
    assert [len(g["params"]) for g in opt.param_groups] == [2, 2]
    biases = [nn.Parameter(p.detach().clone()) for p in opt.param_groups[1]["params"]]
    ref = torch.optim.AdamW(biases, lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    for t in range(3):
        _set_grads(list(model.parameters()), t)
        for b, p in zip(biases, opt.param_groups[1]["params"]):
            b.grad = p.grad.clone()
        opt.step()
        ref.step()
    for b, p in zip(biases, opt.param_groups[1]["params"]):
        torch.testing.assert_close(p.detach(), b.detach())
    assert set(opt.state[model[0].bias]) == {"exp_avg", "exp_avg_sq", "step"}
    assert set(opt.state[model[0].weight]) == {"momentum_buffer", "grad_norm_sq", "step"}


def test_rules_by_name_and_a_matrix_group_refuses_vectors():
    w, b = _params([(3, 3), (3,)])
    opt = NAMOD([{"params": [w], "rule": "namo_d"}, {"params": [b], "rule": "adamw", "lr": 0.5}])
    assert [g["use_muon"] for g in opt.param_groups] == [True, False]
    assert opt.param_groups[1]["lr"] == 0.5 and opt.param_groups[1]["betas"] == (0.9, 0.95)
    assert opt.param_groups[0]["betas"] == (0.95, 0.99)
    with pytest.raises(ValueError, match="use_muon=True"):
        NAMO([{"params": [b], "rule": "matrix"}])
    with pytest.raises(ValueError, match="rule"):
        NAMO([{"params": [w], "rule": "sgd"}])


# -- paths, resume, precision, overflow ---------------------------------------------------------------------------
def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 8), nn.Linear(8, 2))


def _train(model, opt, steps, seed=0):
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        opt.zero_grad()
        model(torch.randn(5, 6, generator=gen)).pow(2).mean().backward()
        opt.step()


@pytest.mark.parametrize("cls", [NAMO, NAMOD])
def test_foreach_equals_per_parameter(cls):
    results = []
    for foreach in (False, True):
        model = _model()
        _train(model, cls(model.parameters(), foreach=foreach, ns_dtype="float32"), 4)
        results.append([p.detach().clone() for p in model.parameters()])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("cls", [NAMO, NAMOD])
@pytest.mark.parametrize("foreach", [False, True])
def test_state_dict_round_trip_is_bit_exact(cls, foreach):
    model = _model()
    opt = cls(model.parameters(), foreach=foreach, ns_dtype="float32")
    _train(model, opt, 3)
    saved_model, saved_opt = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())
    _train(model, opt, 3, seed=1)
    resumed = _model()
    resumed.load_state_dict(saved_model)
    opt2 = cls(resumed.parameters(), foreach=foreach, ns_dtype="float32")
    opt2.load_state_dict(saved_opt)
    _train(resumed, opt2, 3, seed=1)
    for a, b in zip(model.parameters(), resumed.parameters()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("cls", [NAMO, NAMOD])
def test_bf16_parameters_keep_fp32_state(cls):
    w = nn.Parameter(torch.randn(4, 6).bfloat16())
    opt = cls([w])
    for t in range(2):
        w.grad = torch.randn(4, 6).bfloat16()
        opt.step()
    state = opt.state[w]
    assert state["momentum_buffer"].dtype == torch.float32
    assert state["grad_norm_sq" if cls is NAMO else "col_norm_sq"].dtype == torch.float32
    assert w.dtype == torch.bfloat16 and torch.isfinite(w).all()


@pytest.mark.parametrize("cls", [NAMO, NAMOD])
@pytest.mark.parametrize("foreach", [False, True])
def test_a_1e20_entry_keeps_weights_and_state_finite(cls, foreach):
    """‖G‖² = 1e40 overflows fp32; the EMA's increment ((1−β2)‖G‖)‖G‖ = 1e38 does not."""
    w = nn.Parameter(torch.randn(4, 5))
    opt = cls([w], foreach=foreach)
    g = torch.randn(4, 5) * 1e-3
    g[1, 2] = 1e20
    w.grad = g
    opt.step()
    key = "grad_norm_sq" if cls is NAMO else "col_norm_sq"
    assert torch.isfinite(w).all() and torch.isfinite(opt.state[w][key]).all()
    assert opt.state[w][key].max() == pytest.approx(0.01 * 1e40, rel=1e-3)
    w.grad = torch.randn(4, 5)
    opt.step()
    assert torch.isfinite(w).all()


# -- validation --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "cls, name, value",
    [
        (NAMO, "lr", -1.0),
        (NAMO, "lr", float("nan")),
        (NAMO, "betas", (0.95, 1.0)),
        (NAMO, "betas", (float("nan"), 0.99)),
        (NAMO, "eps", float("inf")),
        (NAMO, "weight_decay", -0.1),
        (NAMO, "ns_steps", 0),
        (NAMO, "ns_dtype", "float16"),
        (NAMO, "scale", float("nan")),
        (NAMO, "adamw_lr", float("nan")),
        (NAMO, "adamw_betas", (0.9, 1.5)),
        (NAMO, "adamw_eps", -1.0),
        (NAMOD, "clamp", 1.5),
        (NAMOD, "clamp", float("nan")),
        (NAMOD, "nesterov", 1),
    ],
)
def test_validation_names_the_argument(cls, name, value):
    w = nn.Parameter(torch.randn(3, 3))
    label = {"betas": "betas", "adamw_betas": "adamw_betas"}.get(name, name)
    with pytest.raises(ValueError, match=label):
        cls([w], **{name: value})


def test_yaml_param_groups_rules_and_split_params_build_both_rules():
    """The LightningCLI `param_groups:` section (rule: adamw by name) and split_params (module types)."""
    from lightning_optim.matrix import split_params
    from lightning_optim.param_groups import param_groups

    model = nn.ModuleDict({"emb": nn.Embedding(9, 4), "fc": nn.Linear(4, 4), "lm_head": nn.Linear(4, 9, bias=False)})
    groups = param_groups(model, ["bias"], [{"params": "embedding", "rule": "adamw"}, {"params": "lm_head.*", "rule": "adamw"}])
    for built in (NAMOD(groups), NAMO(split_params(model))):
        rules = {id(p): g["use_muon"] for g in built.param_groups for p in g["params"]}
        assert rules[id(model["emb"].weight)] is False and rules[id(model["lm_head"].weight)] is False
        assert rules[id(model["fc"].weight)] is True and rules[id(model["fc"].bias)] is False


def test_foreign_adamw_state_is_refused_with_the_keys():
    w, b = _params([(4, 3), (4,)])
    adamw = torch.optim.AdamW([w, b])
    _set_grads([w, b], 0)
    adamw.step()
    with pytest.raises(ValueError, match="exp_avg"):
        NAMO([w, b]).load_state_dict(adamw.state_dict())
