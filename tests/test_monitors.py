"""Numeric checks for lightning_optim.monitors (docs/monitors.md, "Checks" 1-7 and 9)."""

from __future__ import annotations

import io
import math
import subprocess
import sys

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from lightning_optim.monitors import (
    ZScore,
    global_grad_norm,
    layer_group,
    loss_delta_stats,
    nlm_cosine,
    perpendicular_grad_,
    softmax_collapse_fraction,
    stablemax,
    stablemax_cross_entropy,
    tag_for,
    tags,
)

aten = torch.ops.aten


def feed(zs: ZScore, values: list[float], dtype: torch.dtype = torch.float32) -> list[tuple[float, bool]]:
    return [tuple(t.item() for t in zs.update(torch.tensor(v, dtype=dtype))) for v in values]


# --------------------------------------------------------------------------- 1. ZScore EMA
def test_zscore_ema_reference_values() -> None:
    zs = ZScore(alpha=0.97, threshold=2.5, warmup=4)
    for v in (1.0, 3.0, 1.0):
        z, spike = zs.update(torch.tensor(v))
        assert z.item() == 0.0 and not spike.item() and not zs.ready.item()
    z, spike = zs.update(torch.tensor(3.0))  # the W-th value: still no decision
    assert z.item() == 0.0 and not spike.item() and zs.ready.item()
    assert zs.mean.item() == 2.0 and zs.var.item() == 1.0

    z, spike = zs.update(torch.tensor(5.0))
    assert z.item() == 3.0 and spike.item()  # updated with the winsorised 2 + 2.5 * 1 = 4.5
    assert zs.mean.item() == pytest.approx(2.075, rel=1e-6)
    assert zs.var.item() == pytest.approx(1.151875, rel=1e-6)

    z, spike = zs.update(torch.tensor(4.0))
    assert z.item() == pytest.approx(1.7936102, rel=1e-6) and not spike.item()
    assert zs.mean.item() == pytest.approx(2.13275, rel=1e-6)
    assert zs.var.item() == pytest.approx(1.2251524, rel=1e-6)
    assert z.shape == () and spike.shape == () and spike.dtype == torch.bool


def test_zscore_ema_constant_series_and_nan() -> None:
    zs = ZScore(warmup=4)
    out = feed(zs, [1.0] * 20)
    assert all(z == 0.0 and not s for z, s in out)
    mean, var = zs.mean.item(), zs.var.item()
    z, spike = zs.update(torch.tensor(float("nan")))
    assert z.item() == math.inf and spike.item()
    assert zs.mean.item() == mean and zs.var.item() == var  # NaN never enters the statistics
    assert feed(zs, [1.0]) == [(0.0, False)]


def test_zscore_non_finite_during_warmup_is_a_spike_and_not_counted() -> None:
    zs = ZScore(warmup=3)
    out = feed(zs, [1.0, float("inf"), 3.0, float("nan"), float("-inf")])
    assert out == [(0.0, False), (math.inf, True), (0.0, False), (math.inf, True), (math.inf, True)]
    assert not zs.ready.item()
    assert zs.mean.item() == 2.0  # running value during warm-up: mean of the finite values so far
    feed(zs, [2.0])
    assert zs.ready.item() and zs.mean.item() == 2.0
    assert zs.var.item() == pytest.approx(2.0 / 3.0, rel=1e-6)


def test_zscore_dtypes() -> None:
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        zs = ZScore(warmup=2)
        z, _ = zs.update(torch.tensor(1.0, dtype=dtype))
        assert z.dtype == torch.float32 and zs.mean.dtype == torch.float32
    zs = ZScore(warmup=2)
    z, _ = zs.update(torch.tensor(1.0, dtype=torch.float64))
    assert z.dtype == torch.float64


# ------------------------------------------------------------------------ 2. ZScore window
def test_zscore_window_reference_values() -> None:
    zs = ZScore(mode="window", threshold=6.0, window=128, min_count=64)
    out = feed(zs, [1e6 * (i + 1) for i in range(64)])  # no decision for the first values, however large
    assert all(z == 0.0 and not s for z, s in out)
    assert zs.ready.item()

    zs = ZScore(mode="window", threshold=6.0, window=128, min_count=64)
    assert all(z == 0.0 and not s for z, s in feed(zs, [1.0, 3.0] * 32))
    out = feed(zs, [1.0, 3.0] * 32)  # buffer holds >= 64 values: decisions, none of them spikes
    assert all(not s for _, s in out) and out[-1][0] != 0.0
    assert zs.mean.item() == 2.0 and zs.var.item() == 1.0  # 128 values alternating 1, 3

    z, spike = zs.update(torch.tensor(8.01))
    assert spike.item() and z.item() == pytest.approx(6.01, rel=1e-6)
    assert zs.mean.item() == 2.0  # spikes are not inserted
    z, spike = zs.update(torch.tensor(7.99))
    assert not spike.item() and z.item() == pytest.approx(5.99, rel=1e-6)
    assert zs.mean.item() == pytest.approx((2.0 * 128 - 1.0 + 7.99) / 128, rel=1e-6)  # replaced the oldest 1

    z, spike = zs.update(torch.tensor(float("nan")))
    assert z.item() == math.inf and spike.item()


def test_zscore_window_ring_keeps_last_values() -> None:
    zs = ZScore(mode="window", threshold=6.0, window=4, min_count=2)
    feed(zs, [1.0, 2.0, 3.0, 4.0, 5.0, 6.0])
    assert zs.mean.item() == 4.5  # 3, 4, 5, 6
    assert zs.var.item() == 1.25


def _poisoned_warmup_then_spike(zs: ZScore, warmup: int) -> tuple[list[tuple[float, bool]], list[tuple[float, bool]]]:
    """Warm-up values around 1.0 with one 1e30 (float32), 20 normal values, then a 100x spike."""
    gen = torch.Generator().manual_seed(0)
    normal = (1.0 + 0.1 * torch.randn(warmup + 20, generator=gen)).tolist()
    values = normal[:3] + [1e30] + normal[3:] + [100.0]
    out = feed(zs, values, torch.float32)
    return out[3:4], out[4:]


@pytest.mark.parametrize("mode", ["ema", "window"])
def test_zscore_one_huge_warmup_value_does_not_blind_the_statistic(mode: str) -> None:
    """1e30 squared overflows float32: it must not make σ² infinite (z = 0 for everything after it)."""
    zs = ZScore(mode, threshold=6.0, warmup=10, window=64, min_count=10)
    (huge,), rest = _poisoned_warmup_then_spike(zs, 10)
    normal, (z_spike, spike) = rest[:-1], rest[-1]
    assert spike and math.isfinite(z_spike) and z_spike > 100.0
    assert all(math.isfinite(z) and abs(z) < 6.0 and not s for z, s in normal)
    assert math.isfinite(zs.var.item()) and zs.mean.item() == pytest.approx(1.0, abs=0.2)
    assert huge == (math.inf, True)  # beyond what the float32 statistic can hold: treated as non-finite


def test_zscore_values_at_the_overflow_bound_keep_the_statistics_finite() -> None:
    """The largest accepted values, alternating in sign, still give a finite mean and variance."""
    for mode in ("ema", "window"):
        zs = ZScore(mode, warmup=4, window=4, min_count=4)
        bound = math.sqrt(torch.finfo(torch.float32).max / (8 * 4))
        feed(zs, [bound * 0.999, -bound * 0.999] * 6)
        assert math.isfinite(zs.mean.item()) and math.isfinite(zs.var.item()) and zs.var.item() > 0, mode


# ------------------------------------------------------------------------------ 3. resume
@pytest.mark.parametrize("mode", ["ema", "window"])
def test_zscore_resume_is_bit_identical(mode: str) -> None:
    gen = torch.Generator().manual_seed(0)
    values = torch.randn(200, generator=gen).abs() + 1.0
    values[[30, 95, 140]] *= 20.0  # spikes before and after the checkpoint
    values[120] = float("nan")
    kwargs = {"warmup": 25} if mode == "ema" else {"threshold": 3.0, "window": 32, "min_count": 16}

    reference = ZScore(mode, **kwargs)
    expected = [reference.update(v) for v in values]

    first = ZScore(mode, **kwargs)
    got = [first.update(v) for v in values[:90]]
    blob = io.BytesIO()
    torch.save(first.state_dict(), blob)
    blob.seek(0)
    resumed = ZScore(mode, **kwargs)
    resumed.load_state_dict(torch.load(blob, weights_only=True))
    got += [resumed.update(v) for v in values[90:]]

    z_exp, s_exp = torch.stack([z for z, _ in expected]), torch.stack([s for _, s in expected])
    z_got, s_got = torch.stack([z for z, _ in got]), torch.stack([s for _, s in got])
    assert torch.equal(s_got, s_exp) and s_exp.sum() >= 3
    assert torch.equal(z_got.nan_to_num(posinf=-1.0), z_exp.nan_to_num(posinf=-1.0))
    assert torch.equal(resumed.mean, reference.mean) and torch.equal(resumed.var, reference.var)


def test_zscore_state_dict_before_first_update_and_mismatch() -> None:
    fresh = ZScore()
    state = fresh.state_dict()
    assert state["count"] is None
    fresh.load_state_dict(state)
    fresh.update(torch.tensor(1.0))
    with pytest.raises(ValueError, match="mode"):
        ZScore(mode="window").load_state_dict(state)


# ------------------------------------------------------------------------ constructor checks
@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"mode": "median"}, "mode"),
        ({"alpha": 1.0}, "alpha"),
        ({"alpha": 0.0}, "alpha"),
        ({"threshold": 0.0}, "threshold"),
        ({"warmup": 0}, "warmup"),
        ({"window": 0}, "window"),
        ({"min_count": 0}, "min_count"),
        ({"window": 8, "min_count": 9}, "min_count"),
    ],
)
def test_zscore_validates_arguments(kwargs: dict, name: str) -> None:
    with pytest.raises(ValueError, match=name):
        ZScore(**kwargs)


# ------------------------------------------------------------------------ no host reads
class HostReadRecorder(TorchDispatchMode):
    """Records ATen ops that read tensor data on the host (what .item(), bool(t), float(t) dispatch to)."""

    READS = {
        aten._local_scalar_dense.default,
        aten.nonzero.default,
        aten.masked_select.default,
        aten.is_nonzero.default,
    }

    def __init__(self) -> None:
        super().__init__()
        self.reads: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[override]
        bool_index = func is aten.index.Tensor and any(
            isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in args[1]
        )
        if func in self.READS or bool_index:
            self.reads.append(func.__name__)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("mode", ["ema", "window"])
def test_zscore_update_reads_nothing_on_the_host(mode: str) -> None:
    zs = ZScore(mode, warmup=5, window=8, min_count=4)
    values = [1.0, 2.0, float("nan"), 1.5, 2.5, 1.0, 50.0, float("inf"), 2.0, 1.0] * 3
    recorder = HostReadRecorder()
    with recorder:
        for v in torch.tensor(values):
            zs.update(v)
        zs.mean, zs.var, zs.ready
    assert recorder.reads == []


def test_global_grad_norm_reads_nothing_on_the_host() -> None:
    params = [torch.nn.Parameter(torch.randn(5, 3, dtype=dt)) for dt in (torch.float32, torch.bfloat16, torch.float64)]
    for p in params:
        p.grad = torch.randn_like(p)
    recorder = HostReadRecorder()
    with recorder:
        global_grad_norm(params)
    assert recorder.reads == []


# ------------------------------------------------------------------------ global_grad_norm
def test_global_grad_norm() -> None:
    a = torch.nn.Parameter(torch.zeros(2))
    b = torch.nn.Parameter(torch.zeros(3, dtype=torch.float64))
    c = torch.nn.Parameter(torch.zeros(1, dtype=torch.bfloat16))
    d = torch.nn.Parameter(torch.zeros(4))  # no gradient: ignored
    a.grad = torch.tensor([3.0, 4.0])
    b.grad = torch.tensor([0.0, 12.0, 0.0], dtype=torch.float64)
    c.grad = torch.tensor([84.0], dtype=torch.bfloat16)
    norm = global_grad_norm([a, b, c, d])
    assert norm.dtype == torch.float32 and norm.shape == ()
    assert norm.item() == 85.0  # sqrt(9 + 16 + 144 + 7056)
    assert global_grad_norm(iter([a, d])).item() == 5.0
    empty = global_grad_norm([d])
    assert empty.item() == 0.0 and empty.shape == () and empty.device.type == "cpu"
    a.grad = torch.tensor([float("inf"), 1.0])
    assert not torch.isfinite(global_grad_norm([a, b]))
    a.grad = torch.tensor([float("nan"), 1.0])
    assert torch.isnan(global_grad_norm([a, b]))


# -------------------------------------------------------------------- 4. softmax collapse
@pytest.mark.parametrize(
    "dtype, below, above",
    [
        (torch.float32, 16.63, 16.64),
        (torch.float64, 36.73, 36.74),
        (torch.float16, 7.62, 7.63),
        (torch.bfloat16, 5.5, 5.6),
    ],
)
def test_softmax_collapse_two_logit_thresholds(dtype: torch.dtype, below: float, above: float) -> None:
    def logits(d: float) -> torch.Tensor:
        return torch.tensor([0.0, -d], dtype=dtype)

    assert softmax_collapse_fraction(logits(below)).item() == 0.0
    assert softmax_collapse_fraction(logits(above)).item() == 1.0
    if dtype == torch.bfloat16:
        assert logits(5.6)[1].item() == -5.59375


def test_softmax_collapse_fraction_over_a_batch_with_mask() -> None:
    rows = [(0.0, -16.63), (0.0, -16.64), (3.0, 2.0), (-20.0, 0.0)]  # collapsed: rows 1 and 3
    logits = torch.tensor(rows)
    assert softmax_collapse_fraction(logits).item() == 0.5
    assert softmax_collapse_fraction(logits.view(2, 2, 2)).item() == 0.5  # every leading position is a sample
    mask = torch.tensor([True, True, False, False])
    assert softmax_collapse_fraction(logits, mask).item() == 0.5
    assert softmax_collapse_fraction(logits, torch.tensor([False, True, False, True])).item() == 1.0
    assert softmax_collapse_fraction(logits, torch.tensor([True, False, True, False])).item() == 0.0
    assert softmax_collapse_fraction(logits, torch.zeros(4, dtype=torch.bool)).item() == 0.0


# ------------------------------------------------------------------------------- 5. ⊥Grad
def _param(w: list[float], g: list[float], dtype: torch.dtype = torch.float32) -> torch.nn.Parameter:
    p = torch.nn.Parameter(torch.tensor(w, dtype=dtype))
    p.grad = torch.tensor(g, dtype=dtype)
    return p


def test_perpendicular_grad_reference_values() -> None:
    p = _param([1.0, 0.0], [1.0, 1.0])
    perpendicular_grad_([p])
    torch.testing.assert_close(p.grad, torch.tensor([0.0, 1.4142136]))

    w, g = torch.tensor([3.0, 4.0]), torch.tensor([1.0, 2.0])
    raw = g - (w @ g) / (w @ w + 1e-30) * w
    torch.testing.assert_close(raw, torch.tensor([-0.32, 0.24]))
    p = _param([3.0, 4.0], [1.0, 2.0])
    perpendicular_grad_([p])
    torch.testing.assert_close(p.grad, torch.tensor([-1.7888544, 1.3416408]))
    assert p.grad.norm().item() == pytest.approx(2.2360680, rel=1e-6)
    assert g.norm().item() == pytest.approx(2.2360680, rel=1e-6)
    # <w, g_perp> = 0 to 1e-6: in float64 directly; in float32 (terms of size |w| |g_perp| = 11.2, rounding
    # of the projection coefficient alone is ~1e-6 there) relative to |w| |g_perp|.
    assert abs(torch.dot(p.detach(), p.grad).item()) < 1e-6 * 5.0 * 2.2360680
    p64 = _param([3.0, 4.0], [1.0, 2.0], torch.float64)
    perpendicular_grad_([p64])
    assert abs(torch.dot(p64.detach(), p64.grad).item()) < 1e-6
    torch.testing.assert_close(p64.grad, torch.tensor([-1.7888544, 1.3416408], dtype=torch.float64))


def test_perpendicular_grad_parallel_and_zero_weight() -> None:
    parallel = _param([1.0, 2.0], [2.0, 4.0])
    no_grad = torch.nn.Parameter(torch.ones(2))
    zero_weight = _param([0.0, 0.0], [1.0, 2.0])  # nothing to project out: g unchanged
    matrix = _param([[1.0, 0.0], [0.0, 0.0]], [[1.0, 1.0], [0.0, 0.0]])  # flattened per tensor
    perpendicular_grad_([parallel, no_grad, zero_weight, matrix])
    assert torch.equal(parallel.grad, torch.zeros(2))
    assert no_grad.grad is None
    torch.testing.assert_close(zero_weight.grad, torch.tensor([1.0, 2.0]))
    torch.testing.assert_close(matrix.grad, torch.tensor([[0.0, 1.4142136], [0.0, 0.0]]))


def test_nlm_cosine() -> None:
    gen = torch.Generator().manual_seed(0)
    w1, w2 = torch.randn(5, 3, generator=gen), torch.randn(7, generator=gen)
    params = [_param(w1.tolist(), w1.tolist()), _param(w2.tolist(), w2.tolist())]
    assert nlm_cosine(params).item() == pytest.approx(1.0, abs=1e-6)
    assert nlm_cosine([_param([1.0, 0.0], [0.0, 1.0])]).item() == 0.0
    # sum over tensors, not a mean of per-tensor cosines: (1*1 + 0) / sqrt((1 + 1) * (1 + 1))
    assert nlm_cosine([_param([1.0], [1.0]), _param([1.0], [-0.0]), _param([0.0], [1.0])]).item() == pytest.approx(0.5)
    p = _param([1.0, 0.0], [1.0, 1.0])
    perpendicular_grad_([p])
    assert nlm_cosine([p]).item() == pytest.approx(0.0, abs=1e-7)


# ----------------------------------------------------------------------------- 6. StableMax
def test_stablemax_reference_values() -> None:
    torch.testing.assert_close(
        stablemax(torch.tensor([0.0, 1.0, -1.0])), torch.tensor([0.2857143, 0.5714286, 0.1428571])
    )
    torch.testing.assert_close(stablemax(torch.tensor([1.0, 2.0, 0.0])), torch.tensor([0.3333333, 0.5, 0.1666667]))
    # s(0) = 1, s(1) = 2, s(-1) = 0.5, read off as StableMax(x, 0)_0 / StableMax(x, 0)_1 = s(x) / s(0)
    pairs = stablemax(torch.tensor([[0.0, 0.0], [1.0, 0.0], [-1.0, 0.0]]))
    torch.testing.assert_close(pairs[:, 0] / pairs[:, 1], torch.tensor([1.0, 2.0, 0.5]))
    torch.testing.assert_close(
        stablemax(torch.tensor([[1.0, 2.0], [0.0, 1.0]]), dim=0), torch.tensor([[2 / 3, 0.6], [1 / 3, 0.4]])
    )


def test_stablemax_gradcheck_and_extremes() -> None:
    z = torch.tensor([[0.7, -1.3, 2.1], [-0.4, -2.2, 0.9]], dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(stablemax, (z,))
    target = torch.tensor([2, 0])
    assert torch.autograd.gradcheck(lambda x: stablemax_cross_entropy(x, target), (z,))

    big = torch.tensor(
        [[1e30, -1e30, 0.0], [-1e30, -1e30, -1e30], [1e30, 1e30, 3.0]], dtype=torch.float64, requires_grad=True
    )
    out = stablemax(big)
    loss = stablemax_cross_entropy(big, torch.tensor([1, 0, 2]), reduction="sum")
    loss.backward()
    assert torch.isfinite(out).all() and torch.isfinite(loss) and torch.isfinite(big.grad).all()


def test_stablemax_cross_entropy_matches_definition() -> None:
    z = torch.tensor([[0.0, 1.0, -1.0], [1.0, 2.0, 0.0]], dtype=torch.float64)
    target = torch.tensor([1, 2])
    expected = -torch.log(stablemax(z).gather(1, target[:, None])).squeeze(1)
    torch.testing.assert_close(stablemax_cross_entropy(z, target, reduction="none"), expected)
    torch.testing.assert_close(stablemax_cross_entropy(z, target), expected.mean())
    torch.testing.assert_close(stablemax_cross_entropy(z, target, reduction="sum"), expected.sum())
    with pytest.raises(ValueError, match="reduction"):
        stablemax_cross_entropy(z, target, reduction="max")  # type: ignore[arg-type]


# --------------------------------------------------------------------- 7. loss_delta_stats
def test_loss_delta_stats_reference_values() -> None:
    before = torch.tensor([1.0, 2.0, 0.5, 1.5, 3.0])
    delta = torch.tensor([1.0, -1.0, 2.0, -0.5, 0.0])
    stats = loss_delta_stats(before, before + delta, top_k=3)
    assert stats["max"].item() == 2.0 and stats["min"].item() == -1.0
    assert stats["mean"].item() == pytest.approx(0.3)
    assert stats["opposing_mass"].item() == pytest.approx(1.5 / 4.5) == pytest.approx(0.3333333)
    assert stats["abs_p99"].item() == pytest.approx(torch.quantile(delta.abs(), 0.99).item())
    assert stats["flip_fraction"].item() == 0.0
    assert stats["top_increase"].tolist() == [2, 0, 4]
    assert stats["top_decrease"].tolist() == [1, 3, 4]
    top = sorted(zip(stats["top_abs"].tolist(), stats["top_abs_sign"].tolist()))
    assert top == [(0, 1.0), (1, -1.0), (2, 1.0)]
    assert all(stats[k].shape == () for k in ("mean", "max", "min", "abs_p99", "opposing_mass", "flip_fraction"))

    # Next probe: sample 2 reversed (+ -> -), sample 0 kept its sign, sample 1 did not move (no flip).
    after = before + torch.tensor([0.5, 0.0, -3.0, 0.0, 0.0])
    nxt = loss_delta_stats(before, after, top_k=3, previous_top=(stats["top_abs"], stats["top_abs_sign"]))
    assert nxt["flip_fraction"].item() == pytest.approx(1 / 3)
    assert nxt["opposing_mass"].item() == pytest.approx(0.5 / 3.5)

    same = loss_delta_stats(before, before, top_k=10)
    assert same["opposing_mass"].item() == 0.0 and same["top_abs"].numel() == 5


# ----------------------------------------------------------------------------------- tags
def test_tags() -> None:
    assert tags.GRAD_NORM == "stability/grad_norm" and tags.GRAD_NORM_Z == "stability/grad_norm_z"
    names = [v for k, v in vars(tags).items() if k.isupper() and isinstance(v, str)]
    assert all(v.split("/")[0] in ("stability", "quant") for v in names)
    assert tag_for(tags.BETA1, 0) == "stability/beta1"
    assert tag_for(tags.BETA1, 2) == "stability/beta1/opt2"
    assert layer_group("blocks.3.attn.qkv") == "blocks.3"
    assert layer_group("lm_head") == "lm_head"
    assert layer_group("blocks.3.attn.qkv", None) == "blocks.3.attn.qkv"
    assert layer_group("blocks.3.attn.qkv", 1) == "blocks"
    assert tags.layer_tag(tags.QUANT_MMR, "blocks.3.attn.qkv") == "quant/mmr/blocks.3"
    with pytest.raises(ValueError, match="optimizer_index"):
        tag_for(tags.BETA1, -1)
    with pytest.raises(ValueError, match="group_depth"):
        layer_group("a.b", 0)


def test_monitors_import_torch_only() -> None:
    code = "import sys, lightning_optim.monitors; print(any(m.split('.')[0] == 'lightning' for m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


# ------------------------------------------------------------------------------------ GPU
@pytest.mark.gpu
def test_zscore_and_grad_norm_are_sync_free_on_cuda() -> None:
    params = [
        torch.nn.Parameter(torch.randn(s, device="cuda", dtype=dt))
        for s, dt in [((64, 32), torch.float32), ((128,), torch.bfloat16)]
    ]
    trackers = [ZScore(warmup=10), ZScore(mode="window", threshold=6.0, window=32, min_count=16)]
    for tracker in trackers:
        tracker.update(torch.tensor(float("nan"), device="cuda"))  # allocates; NaN never enters the statistics
    results = []
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for step in range(100):
            for p in params:
                p.grad = torch.randn_like(p) * (1e3 if step == 60 else 1.0)
            norm = global_grad_norm(params)
            results.append([t.update(norm) for t in trackers])
            for tracker in trackers:
                tracker.mean, tracker.var, tracker.ready
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert results[60][0][1].item() and results[60][1][1].item()
