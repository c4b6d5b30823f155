"""ECO numeric checks (docs/algorithms.md#eco): hand-computed float64 steps (int8, fp8), the grid invariant,
the closed form of the error feedback on a stuck weight, stochastic rounding, path agreement, resume, overflow,
validation and the composition with QuantizationAwareTraining + QuantizationMonitor.

pytorch_optimizer 4.1.0 has no ECO (nor any master-weight-free optimizer), so there is no second
implementation to compare with; instead ECO is checked against torch AdamW where Q is the identity (fp32
vectors: bit for bit) and against AdamW with master weights on a quadratic (the feedback keeps ECO closer
than the naive master-weight-free update).
"""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch
from lightning.pytorch.loggers import TensorBoardLogger

from callback_models import Regression, fit
from lightning_optim.callbacks import QuantizationAwareTraining, QuantizationMonitor
from lightning_optim.eco import ECO, WEIGHT_FORMATS, grid_quantize, state_bytes
from lightning_optim.monitors import fake_quantize

B1, B2, EPS = 0.9, 0.999, 1e-8


def _reference_step(w, m, v, g, t, *, lr, wd, fmt):
    """One ECO step from the paper's equations, round-to-nearest, one scale per row (float64)."""
    m = B1 * m + (1 - B1) * g
    v = B2 * v + (1 - B2) * g * g
    bc1, bc2 = 1 - B1**t, 1 - B2**t
    d = v.sqrt() / math.sqrt(bc2) + EPS
    w_tilde = w * (1 - lr * wd) - lr / bc1 * m / d
    s = w_tilde.abs().amax(dim=1, keepdim=True) / WEIGHT_FORMATS[fmt]
    if fmt == "fp8_e4m3":
        codes = (w_tilde / s).to(torch.float8_e4m3fn).double()
    else:
        codes = (w_tilde / s).round()
    w_hat = codes * s
    m = m + bc1 / lr * (1 - 1 / B1) * d * (w_tilde - w_hat)
    return w_hat, m, v, s


@pytest.mark.parametrize("fmt", ["int8", "fp8_e4m3"])
def test_hand_computed_two_steps_float64(fmt: str) -> None:
    gen = torch.Generator().manual_seed(0)
    w0 = torch.randn(2, 5, generator=gen, dtype=torch.float64)
    grads = [torch.randn(2, 5, generator=gen, dtype=torch.float64) for _ in range(2)]
    p = torch.nn.Parameter(w0.clone())
    opt = ECO([p], lr=0.01, weight_decay=0.1, eps=EPS, weight_format=fmt, rounding="nearest", foreach=False)
    w, m, v = w0.clone(), torch.zeros_like(w0), torch.zeros_like(w0)
    for t, g in enumerate(grads, start=1):
        p.grad = g.clone()
        opt.step()
        w, m_new, v, s = _reference_step(w, m, v, g, t, lr=0.01, wd=0.1, fmt=fmt)
        plain_ema = B1 * m + (1 - B1) * g
        m = m_new
        torch.testing.assert_close(p.detach(), w, rtol=1e-13, atol=0)
        torch.testing.assert_close(opt.state[p]["exp_avg"], m, rtol=1e-12, atol=1e-15)
        torch.testing.assert_close(opt.state[p]["exp_avg_sq"], v, rtol=1e-13, atol=0)
        torch.testing.assert_close(opt.state[p]["weight_scale"], s, rtol=1e-15, atol=0)  # (rows, 1 group)
        assert (m - plain_ema).abs().max() > 1e-6  # the feedback did change the momentum


def _on_grid(p: torch.Tensor, opt: ECO) -> None:
    q = opt.quantized_weight(p)
    codes = q.codes.double()
    q_max = WEIGHT_FORMATS[q.weight_format]
    if q.weight_format == "fp8_e4m3":
        assert q.codes.dtype == torch.float8_e4m3fn
    else:
        assert q.codes.dtype == torch.int8 and codes.abs().max() <= q_max
    rows = codes.reshape(p.shape[0], -1)
    pad = (-rows.shape[1]) % q.group_size
    groups = torch.nn.functional.pad(rows, (0, pad)).reshape(p.shape[0], -1, q.group_size)
    values = (groups * q.scale.double().unsqueeze(-1)).reshape(p.shape[0], -1)[:, : rows.shape[1]]
    assert torch.equal(values.to(p.dtype).reshape(p.shape), p.detach())  # codes * scale is exactly p
    # and the round trip through the grid is the identity: dequant(quant(p)) == p
    again, _ = grid_quantize(p.detach().to(q.scale.dtype), q.weight_format, q.group_size,
                             power_of_two=p.dtype in (torch.bfloat16, torch.float16))
    assert torch.equal(again.to(p.dtype), p.detach())


def test_weights_lie_on_the_grid_after_every_step() -> None:
    gen = torch.Generator().manual_seed(1)
    for dtype in (torch.float32, torch.bfloat16):
        for fmt in WEIGHT_FORMATS:
            for rounding in ("stochastic", "nearest"):
                w = torch.nn.Parameter(torch.randn(4, 10, generator=gen).to(dtype))
                opt = ECO([w], lr=0.05, weight_format=fmt, group_size=4, rounding=rounding)
                for _ in range(3):
                    w.grad = torch.randn(4, 10, generator=gen).to(dtype)
                    opt.step()
                    _on_grid(w, opt)
                assert opt.state[w]["weight_scale"].shape == (4, 3)  # ceil(10 / 4) groups per row


def test_error_feedback_accumulates_sub_grid_updates_closed_form() -> None:
    """Row (127, 10): scale 1, grid step 1. A constant gradient g on the second entry with lr < 1/2 never
    moves it without feedback (Adam's step is ~lr and rounds back). With feedback, while the weight is
    stuck e = −(lr/b1)·m̃/D and the injection turns m̃ into m̃/β1, so m̃_k = k(1 − β1)g and the tentative
    move is δ_k = lr·k(1 − β1)/(1 − β1^k)·g/(g + ε): the weight moves by one grid step at the first k
    with δ_k > 1/2, not before."""
    lr, g = 0.047, 1e-3

    def delta(k: int) -> float:
        return lr * k * (1 - B1) / (1 - B1**k) * g / (g + EPS)

    k_star = next(k for k in range(1, 10_000) if delta(k) > 0.5)
    assert delta(k_star) - 0.5 > 1e-4 and 0.5 - delta(k_star - 1) > 1e-4  # no tie within rounding noise

    def run(feedback: bool, steps: int) -> list[float]:
        p = torch.nn.Parameter(torch.tensor([[127.0, 10.0]], dtype=torch.float64))
        opt = ECO([p], lr=lr, eps=EPS, weight_decay=0.0, rounding="nearest", error_feedback=feedback)
        out = []
        for _ in range(steps):
            p.grad = torch.tensor([[0.0, g]], dtype=torch.float64)
            opt.step()
            out.append(p[0, 1].item())
            assert p[0, 0].item() == 127.0
        return out

    with_feedback = run(True, k_star)
    assert with_feedback[:-1] == [10.0] * (k_star - 1) and with_feedback[-1] == 9.0
    assert run(False, 3 * k_star) == [10.0] * (3 * k_star)


def test_feedback_tracks_master_weights_better_than_naive() -> None:
    """On a quadratic, ECO (int8 grid) ends closer to AdamW with fp32 master weights than the naive
    master-weight-free update without feedback, with either rounding (measured: nearest 0.64 vs 1.54,
    stochastic 0.11 vs 0.47 in Frobenius distance after 200 steps)."""
    gen = torch.Generator().manual_seed(3)
    target = torch.randn(8, 16, generator=gen)
    w0 = fake_quantize(torch.randn(8, 16, generator=gen), bits=8, fmt="int")

    def run(make) -> torch.Tensor:
        p = torch.nn.Parameter(w0.clone())
        opt = make([p])
        for _ in range(200):
            p.grad = p.detach() - target
            opt.step()
        return p.detach()

    master = run(lambda ps: torch.optim.AdamW(ps, lr=1e-3, weight_decay=0.0))
    for rounding in ("nearest", "stochastic"):
        eco = run(lambda ps: ECO(ps, lr=1e-3, weight_decay=0.0, rounding=rounding))
        naive = run(lambda ps: ECO(ps, lr=1e-3, weight_decay=0.0, rounding=rounding, error_feedback=False))
        assert (eco - master).norm() < 0.5 * (naive - master).norm()


def test_fp32_vectors_are_plain_adamw_bit_for_bit() -> None:
    """Q is the identity for fp32 0-/1-D parameters: ECO equals torch AdamW (same eps placement, decay)."""
    gen = torch.Generator().manual_seed(4)
    a = torch.nn.Parameter(torch.randn(7, generator=gen))
    b = torch.nn.Parameter(a.detach().clone())
    eco = ECO([a], lr=1e-2, weight_decay=0.1, foreach=False)
    ref = torch.optim.AdamW([b], lr=1e-2, weight_decay=0.1, eps=1e-8, foreach=False)
    for _ in range(4):
        g = torch.randn(7, generator=gen)
        a.grad, b.grad = g.clone(), g.clone()
        eco.step()
        ref.step()
    assert torch.equal(a, b)


def test_stochastic_rounding_is_unbiased_and_picks_neighbours() -> None:
    gen = torch.Generator().manual_seed(5)
    n = 10_000
    for fmt, x in (("int8", 0.3), ("fp8_e4m3", 0.3)):
        # one row: the first entry fixes the scale (absmax), the rest are x
        row = torch.full((1, n), x, dtype=torch.float64)
        row[0, 0] = 1.0
        noise = torch.rand(1, 1, n, generator=gen, dtype=torch.float64)
        values, scale = grid_quantize(row, fmt, None, noise)
        nearest, _ = grid_quantize(row, fmt, None, None)
        rest = values[0, 1:]
        assert len(set(rest.tolist())) == 2  # the two neighbours of x
        low, high = sorted(set(rest.tolist()))
        assert low < x < high and nearest[0, 1].item() in (low, high)
        assert abs(rest.mean().item() - x) < 4 * (high - low) / math.sqrt(n)  # unbiased (4 sigma)


def test_paths_agree_bit_for_bit_and_seeds_are_reproducible() -> None:
    gen = torch.Generator().manual_seed(6)
    shapes = [(6, 5), (5,), (3, 2, 4)]
    init = [torch.randn(s, generator=gen) for s in shapes] + [torch.randn(4, 3, generator=gen).bfloat16()]
    grads = [[torch.randn_like(t) for t in init] for _ in range(4)]

    def run(foreach: bool, fmt: str) -> list[torch.Tensor]:
        ps = [torch.nn.Parameter(t.clone()) for t in init]
        opt = ECO([{"params": ps[:2]}, {"params": ps[2:], "group_size": 3}], lr=0.03, weight_format=fmt, foreach=foreach)
        for gs in grads:
            for p, g in zip(ps, gs):
                p.grad = g.clone()
            opt.step()
        return [p.detach().clone() for p in ps] + [opt.state[ps[0]]["exp_avg"].clone()]

    for fmt in ("int8", "fp8_e4m3"):
        a, b, c = run(False, fmt), run(True, fmt), run(False, fmt)
        assert all(torch.equal(x, y) for x, y in zip(a, b))
        assert all(torch.equal(x, y) for x, y in zip(a, c))  # seeded from (step, index): the same draws


def test_state_dict_resume_is_bit_exact() -> None:
    gen = torch.Generator().manual_seed(7)
    init = [torch.randn(5, 4, generator=gen), torch.randn(4, generator=gen).half()]
    grads = [[torch.randn(t.shape, generator=gen).to(t.dtype) for t in init] for _ in range(6)]

    def steps(ps, opt, gs) -> None:
        for g in gs:
            for p, gi in zip(ps, g):
                p.grad = gi.clone()
            opt.step()

    ps = [torch.nn.Parameter(t.clone()) for t in init]
    opt = ECO(ps, weight_format="fp8_e4m3", group_size=2)
    steps(ps, opt, grads[:3])
    saved = copy.deepcopy((opt.state_dict(), [p.detach() for p in ps]))
    steps(ps, opt, grads[3:])
    resumed = [torch.nn.Parameter(w.clone()) for w in saved[1]]
    opt2 = ECO(resumed, weight_format="fp8_e4m3", group_size=2)
    opt2.load_state_dict(saved[0])
    steps(resumed, opt2, grads[3:])
    assert all(torch.equal(a, b) for a, b in zip(ps, resumed))
    s1, s2 = opt.state_dict()["state"], opt2.state_dict()["state"]
    assert all(torch.equal(s1[i][k], s2[i][k]) for i in s1 for k in s1[i])


def test_huge_finite_values_stay_finite() -> None:
    w = torch.nn.Parameter(torch.tensor([[3.0e38, -1.0, 0.5], [0.0, 0.0, 0.0]]))
    opt = ECO([w], lr=1e-3, weight_format="int8")
    for g in (torch.tensor([[1e20, 1e-30, -1e30], [0.0, 0.0, 1e20]]), torch.ones(2, 3)):
        w.grad = g
        opt.step()
        assert torch.isfinite(w).all() and torch.isfinite(opt.state[w]["weight_scale"]).all()
        assert torch.isfinite(opt.state[w]["exp_avg"]).all()
    assert opt.state[w]["weight_scale"][0].item() == pytest.approx(3.0e38 / 127, rel=1e-3)


def test_nan_gradient_entry_spoils_only_its_weight() -> None:
    w = torch.nn.Parameter(torch.randn(3, 4, generator=torch.Generator().manual_seed(8)))
    opt = ECO([w])
    g = torch.ones(3, 4)
    g[1, 2] = math.nan
    w.grad = g
    opt.step()
    bad = ~torch.isfinite(w.detach())
    assert bad.sum() == 1 and bad[1, 2]


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"weight_format": "int3"}, "weight_format"),
        ({"rounding": "up"}, "rounding"),
        ({"group_size": 0}, "group_size"),
        ({"error_feedback": "yes"}, "error_feedback"),
        ({"betas": (0.0, 0.999)}, "betas"),
        ({"lr": math.nan}, "lr"),
    ],
)
def test_validation_names_the_argument(kwargs: dict, name: str) -> None:
    with pytest.raises(ValueError, match=name):
        ECO([torch.nn.Parameter(torch.zeros(2, 2))], **kwargs)


def test_beta1_zero_is_allowed_without_feedback() -> None:
    ECO([torch.nn.Parameter(torch.zeros(2, 2))], betas=(0.0, 0.999), error_feedback=False)


def test_memory_accounting() -> None:
    w = torch.nn.Parameter(torch.randn(16, 64))
    opt = ECO([w], group_size=32)
    w.grad = torch.randn(16, 64)
    opt.step()
    # m, v fp32 + one fp32 scale per 32 entries + the CPU step counter
    assert state_bytes(opt) == 2 * 4 * 16 * 64 + 4 * 16 * 2 + 4
    assert opt.quantized_weight(w).nbytes == 16 * 64 + 4 * 16 * 2


class _QuantRegression(Regression):
    def __init__(self) -> None:
        super().__init__(lambda p: ECO(p, lr=1e-2, weight_format="int8"))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def test_trains_with_qat_and_quant_monitor(tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    module = _QuantRegression()
    logger = TensorBoardLogger(tmp_path, name="tb", version=0)
    qat = QuantizationAwareTraining(bits=8, fmt="int", group_size=128, start_step=0)
    monitor = QuantizationMonitor(bits=8, every_n_steps=5, max_rows=4)
    fit(module, [qat, monitor], max_steps=10, logger=logger, log_every_n_steps=5)
    events = EventAccumulator(str(tmp_path / "tb" / "version_0"))
    events.Reload()
    tags = events.Tags()["scalars"]
    assert any(t.startswith("quant/layer_error/") for t in tags) and any(t.startswith("quant/mmr/") for t in tags)
    opt = module.trainer.optimizers[0]
    for layer in (module.net[0], module.net[3]):  # the same grid: QAT's forward sees the stored weight
        w = layer.weight.detach()
        _on_grid(layer.weight, opt)
        torch.testing.assert_close(fake_quantize(w, 8, "int", 128), w, rtol=1e-6, atol=0)
