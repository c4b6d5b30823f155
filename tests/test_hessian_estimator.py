"""The diagonal-Hessian estimators (lightning_optim/hessian.py) and the HessianEstimator callback.

Math: Hutchinson is exact for a diagonal H with Rademacher probes and unbiased otherwise; Gauss-Newton-
Bartlett's expectation is the Gauss-Newton diagonal of the mean cross-entropy. Lightning: the callback in
automatic optimization gives the same weights as a hand-written create_graph=True loop; gradient
accumulation, a GradScaler's scale, the refresh schedule and DDP (2 CPU ranks) compose.
"""

from __future__ import annotations

import os
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from callback_models import Regression
from lightning_optim.adahessian import AdaHessian
from lightning_optim.callbacks.hessian_estimator import _GNB_SALT, HessianEstimator
from lightning_optim.hessian import draw_probe, hutchinson_diagonal, mix_seed, sample_labels, spatial_average_abs
from lightning_optim.sophia import SophiaG, SophiaH

pytestmark = pytest.mark.filterwarnings(
    "ignore:Using backward\\(\\) with create_graph=True", "ignore:.*does not have many workers", "ignore:.*LeafSpec"
)


# -- Hutchinson ---------------------------------------------------------------------------------------------
def _grads_with_graph(loss: torch.Tensor, params: list[torch.Tensor]) -> list[torch.Tensor]:
    return list(torch.autograd.grad(loss, params, create_graph=True))


def test_hutchinson_is_exact_for_a_diagonal_hessian_with_rademacher_probes() -> None:
    """L = ½ Σ a ⊙ x² + Σ c ⊙ y (linear in y): D = a for x (one probe), exactly 0 for y (no graph)."""
    a = torch.tensor([[0.5, 2.0, -3.0], [4.0, 1e-3, 7.0]], dtype=torch.float64)
    x = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
    y = torch.randn(4, dtype=torch.float64, requires_grad=True)
    loss = 0.5 * (a * x * x).sum() + (torch.arange(4.0, dtype=torch.float64) * y).sum()
    grads = _grads_with_graph(loss, [x, y])
    assert not grads[1].requires_grad  # the gradient of a linear term does not depend on any parameter
    d = hutchinson_diagonal(grads, [x, y], [0, 1], seed=3, step=7, n_samples=1, probe="rademacher")
    assert torch.equal(d[0], a)
    assert torch.equal(d[1], torch.zeros(4, dtype=torch.float64))


def test_hutchinson_is_unbiased_for_a_dense_hessian() -> None:
    """L = ½ xᵀ A x with a dense symmetric A: one probe is off (the off-diagonal terms), the mean of many
    converges to diag(A) (standard error ~ ‖offdiag row‖/√n), for both probe kinds."""
    gen = torch.Generator().manual_seed(0)
    b = torch.randn(6, 6, generator=gen, dtype=torch.float64)
    a = b + b.T
    x = torch.randn(6, generator=gen, dtype=torch.float64, requires_grad=True)
    grads = _grads_with_graph(0.5 * x @ a @ x, [x])
    one = hutchinson_diagonal(grads, [x], [0], seed=0, step=1, n_samples=1)[0]
    assert (one - a.diag()).abs().max() > 0.5
    n = 1000
    offdiag = ((a * a).sum(1) - a.diag() ** 2).sqrt()
    for probe, factor in (("rademacher", 1.0), ("gaussian", 2.0)):
        mean = hutchinson_diagonal(grads, [x], [0], seed=0, step=1, n_samples=n, probe=probe)[0]
        bound = 5 * factor * offdiag / n**0.5 + (2.0 * a.diag().abs() / n**0.5 if probe == "gaussian" else 0)
        assert ((mean - a.diag()).abs() <= bound).all(), (probe, mean, a.diag())


def test_probes_depend_on_seed_step_and_index_only() -> None:
    p = torch.zeros(3, 5)
    z = draw_probe(p, seed=1, step=4, sample=0, index=2, probe="rademacher")
    assert set(z.unique().tolist()) <= {-1.0, 1.0}
    assert torch.equal(z, draw_probe(p.clone(), seed=1, step=4, sample=0, index=2, probe="rademacher"))
    for changed in (dict(seed=2), dict(step=5), dict(sample=1), dict(index=3)):
        kw = dict(seed=1, step=4, sample=0, index=2) | changed
        assert not torch.equal(z, draw_probe(p, probe="rademacher", **kw)), changed
    g = draw_probe(torch.zeros(20000), seed=0, step=1, sample=0, index=0, probe="gaussian")
    assert abs(float(g.mean())) < 0.05 and abs(float(g.var()) - 1) < 0.05
    assert mix_seed(0, 1) != mix_seed(1, 0) and 0 <= mix_seed(2**70, 5) < 2**63


def test_spatial_average_of_conv_kernels() -> None:
    """4-D kernels: |D| averaged over dims 2, 3 and broadcast back (the authors' rule); other shapes |D|."""
    d = torch.randn(4, 3, 3, 3, dtype=torch.float64)
    out = spatial_average_abs(d)
    expected = d.abs().mean(dim=(2, 3), keepdim=True).expand(4, 3, 3, 3)
    assert out.shape == d.shape and torch.equal(out, expected)
    assert not torch.equal(out, d.abs())
    assert torch.equal(spatial_average_abs(d, spatial_average=False), d.abs())
    m = torch.randn(5, 7)
    assert torch.equal(spatial_average_abs(m), m.abs())


# -- Gauss-Newton-Bartlett -----------------------------------------------------------------------------------
def test_gnb_expectation_is_the_gauss_newton_diagonal() -> None:
    """Linear softmax regression, mean CE over B inputs: E_ŷ[B·ĝ⊙ĝ] = (1/B) Σ_b p_bc (1 − p_bc) x_bj², the
    diagonal of the Hessian (= Gauss-Newton) of the mean loss. The average of 20000 seeded draws is within
    5 standard errors (estimated from the draws) of it, entry by entry; and it is not the gradient² of the
    loss on the true labels (so the test can tell the two apart)."""
    gen = torch.Generator().manual_seed(0)
    b_size, dim, classes = 6, 3, 4
    x = torch.randn(b_size, dim, generator=gen, dtype=torch.float64)
    w = torch.nn.Parameter(torch.randn(classes, dim, generator=gen, dtype=torch.float64))
    logits = x @ w.T
    p = logits.softmax(-1).detach()
    gauss_newton = (p * (1 - p)).T @ (x * x) / b_size  # (classes, dim)
    draws_n = 20000
    labels = sample_labels(logits.expand(draws_n, b_size, classes), torch.Generator().manual_seed(mix_seed(5)))
    # ĝ of each draw in closed form, (1/B) Σ_b (p_b − e_ŷb) x_bᵀ, checked against autograd on a few draws
    residual = p - F.one_hot(labels, classes).double()  # (draws, B, classes)
    g_all = torch.einsum("sbc,bj->scj", residual, x) / b_size
    for s in (0, 1, draws_n - 1):
        (g,) = torch.autograd.grad(F.cross_entropy(logits, labels[s]), [w], retain_graph=True)
        torch.testing.assert_close(g_all[s], g, rtol=1e-10, atol=1e-12)
    draws = b_size * g_all * g_all
    mean, stderr = draws.mean(0), draws.std(0) / len(draws) ** 0.5
    assert ((mean - gauss_newton).abs() <= 5 * stderr + 1e-12).all()
    true_labels = torch.randint(0, classes, (b_size,), generator=gen)
    (g_true,) = torch.autograd.grad(F.cross_entropy(logits, true_labels), [w])
    assert not torch.allclose(b_size * g_true * g_true, gauss_newton, rtol=0.2)


def test_sample_labels_follow_the_softmax() -> None:
    logits = torch.tensor([[0.0, 1.0, 2.0]]).expand(20000, 3)
    labels = sample_labels(logits, torch.Generator().manual_seed(1))
    freq = torch.bincount(labels, minlength=3).double() / len(labels)
    torch.testing.assert_close(freq, torch.tensor([0.0, 1.0, 2.0]).softmax(0).double(), atol=0.015, rtol=0)


# -- Lightning: fixtures --------------------------------------------------------------------------------------
def _trainer(callbacks: list[pl.Callback], max_steps: int, **kwargs: Any) -> pl.Trainer:
    return pl.Trainer(
        accelerator="cpu", max_steps=max_steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, callbacks=callbacks, **kwargs,
    )


def _flat(module: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in module.parameters()])


def _closure_run(make_optimizer, steps: int, batch_size: int = 8) -> torch.Tensor:
    """The authors' loop: loss.backward(create_graph=True), then step, on Regression's batches."""
    module = Regression(make_optimizer)
    optimizer = module.configure_optimizers()
    data = module.train_dataloader().dataset
    for i in range(steps):
        x, y = data[i * batch_size : (i + 1) * batch_size]

        def closure() -> torch.Tensor:
            optimizer.zero_grad()
            loss = F.mse_loss(module.net(x), y)
            loss.backward(create_graph=True)
            return loss

        optimizer.step(closure)
    return _flat(module)


class Classifier(pl.LightningModule):
    """A tiny softmax classifier; ``hook``: logits come from ``hessian_logits`` (a dict batch)."""

    def __init__(self, make_optimizer, hook: bool = False) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.Tanh(), torch.nn.Linear(8, 4))
        self.make_optimizer = make_optimizer
        self.hook = hook
        gen = torch.Generator().manual_seed(1)
        self.x, self.y = torch.randn(64, 5, generator=gen), torch.randint(0, 4, (64,), generator=gen)

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = (batch["x"], batch["y"]) if self.hook else batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return self.make_optimizer(self.parameters())

    def train_dataloader(self):
        data = TensorDataset(self.x, self.y)
        if self.hook:
            return DataLoader([{"x": a, "y": b} for a, b in data], batch_size=8)
        return DataLoader(data, batch_size=8)


class HookedClassifier(Classifier):
    """Defines the protocol method: the logits of a dict batch."""

    def hessian_logits(self, batch):
        return self(batch["x"])


# -- Lightning: Hutchinson ---------------------------------------------------------------------------------------
def test_callback_gives_the_weights_of_the_create_graph_loop() -> None:
    """AdaHessian with HessianEstimator in automatic optimization = the authors' create_graph=True loop, bit
    for bit (same probes: they depend on (seed, step, parameter) only)."""
    make = lambda p: AdaHessian(p, lr=0.05, weight_decay=0.01)  # noqa: E731
    module = Regression(make)
    _trainer([HessianEstimator()], 5).fit(module)
    assert torch.equal(_flat(module), _closure_run(make, 5))
    state = module.trainer.optimizers[0].state[module.net[0].weight]
    assert float(state["hessian_step"]) == 5 and float(state["exp_hessian_diag_sq"].abs().sum()) > 0


def test_sophia_h_refresh_schedule_through_the_callback() -> None:
    """SophiaH(update_every=3) over 7 steps: two refreshes (after steps 3 and 6), as the closure loop."""
    make = lambda p: SophiaH(p, lr=0.02, update_every=3, probe="rademacher")  # noqa: E731
    module = Regression(make)
    _trainer([HessianEstimator()], 7).fit(module)
    assert torch.equal(_flat(module), _closure_run(make, 7))
    state = module.trainer.optimizers[0].state[module.net[3].weight]
    assert float(state["hessian_step"]) == 2 and float(state["step"]) == 7


def test_gradient_accumulation_equals_the_large_batch() -> None:
    """accumulate_grad_batches=2 of 8 = one batch of 16: Lightning averages the micro-batch losses, the
    callback sums their H z with the same probes, so the estimate is that of the 16-sample loss."""
    make = lambda p: AdaHessian(p, lr=0.05)  # noqa: E731
    module = Regression(make)
    _trainer([HessianEstimator()], 4, accumulate_grad_batches=2).fit(module)
    torch.testing.assert_close(_flat(module), _closure_run(make, 4, batch_size=16), rtol=1e-5, atol=1e-6)


def _fp16_run(scale: float, steps: int = 3) -> Regression:
    from lightning.pytorch.plugins.precision import MixedPrecision

    scaler = torch.amp.GradScaler("cpu", init_scale=scale, growth_interval=10**6)
    module = Regression(lambda p: AdaHessian(p, lr=0.05))
    _trainer([HessianEstimator()], steps, plugins=[MixedPrecision("16-mixed", "cpu", scaler=scaler)]).fit(module)
    return module


def test_grad_scaler_scale_is_divided_out() -> None:
    """16-mixed with a GradScaler of scale 16 vs 1 (no growth): the same weights and v, up to fp16 rounding
    (a scale left in the estimate would multiply v by 256 and shrink every update 16-fold)."""
    results = []
    for scale in (16.0, 1.0):
        module = _fp16_run(scale)
        v = module.trainer.optimizers[0].state[module.net[0].weight]["exp_hessian_diag_sq"]
        results.append((_flat(module), v.clone()))
    torch.testing.assert_close(results[0][1], results[1][1], rtol=2e-2, atol=1e-9)
    torch.testing.assert_close(results[0][0], results[1][0], rtol=0, atol=5e-3)


def test_an_overflowed_fp16_estimate_is_dropped() -> None:
    """Scale 2^24: H z of the scaled loss overflows fp16 on every step, so every estimate is dropped (as the
    GradScaler drops overflowed gradients): AdaHessian waits for a first estimate, nothing turns non-finite."""
    module = _fp16_run(2.0**24)
    optimizer = module.trainer.optimizers[0]
    start = Regression(lambda p: None)
    assert torch.equal(_flat(module), _flat(start))
    for state in optimizer.state.values():
        assert float(state["hessian_step"]) == 0 and float(state["step"]) > 0
        assert torch.isfinite(state["exp_avg"]).all() and not state["exp_hessian_diag_sq"].any()


def test_without_the_callback_the_error_names_the_fix() -> None:
    module = Regression(lambda p: AdaHessian(p))
    with pytest.raises(RuntimeError, match="HessianEstimator") as error:
        _trainer([], 2).fit(module)
    assert "create_graph=True" in str(error.value)


def test_callback_refuses_a_first_order_optimizer() -> None:
    module = Regression(lambda p: torch.optim.AdamW(p))
    with pytest.raises(ValueError, match="AdaHessian, SophiaH and SophiaG"):
        _trainer([HessianEstimator()], 1).fit(module)
    with pytest.raises(ValueError, match="clip_gnb_gradient"):
        HessianEstimator(clip_gnb_gradient=1)  # type: ignore[arg-type]


# -- Lightning: Gauss-Newton-Bartlett ------------------------------------------------------------------------------
def _expected_gnb(module: Classifier, step: int, batch: tuple[torch.Tensor, torch.Tensor], seed: int = 0) -> dict:
    """B·ĝ⊙ĝ recomputed by hand for the module's current weights (the callback's seeds)."""
    params = list(module.parameters())
    logits = module(batch[0])
    gen = torch.Generator().manual_seed(mix_seed(seed, step, 0, _GNB_SALT))
    labels = torch.multinomial(logits.detach().softmax(-1), 1, generator=gen).squeeze(-1)
    grads = torch.autograd.grad(F.cross_entropy(logits, labels), params)
    return {p: len(labels) * g * g for p, g in zip(params, grads)}


@pytest.mark.parametrize("hooked", [False, True])
def test_sophia_g_refresh_after_every_kth_step(hooked: bool) -> None:
    """SophiaG(update_every=2), 2 steps: h is refreshed once, after step 2, from the step-2 batch at the
    weights after step 2, with labels sampled from the model: h = (1 − β2)·B·ĝ⊙ĝ. The logits come from
    forward(batch[0]) or from the module's hessian_logits(batch)."""
    beta2 = 0.99
    module = (HookedClassifier if hooked else Classifier)(lambda p: SophiaG(p, lr=0.01, update_every=2), hook=hooked)
    _trainer([HessianEstimator()], 2).fit(module)
    optimizer = module.trainer.optimizers[0]
    expected = _expected_gnb(module, 2, (module.x[8:16], module.y[8:16]))
    for p in module.parameters():
        state = optimizer.state[p]
        assert float(state["hessian_step"]) == 1 and float(state["step"]) == 2
        torch.testing.assert_close(state["hessian"], (1 - beta2) * expected[p], rtol=1e-5, atol=1e-12)


def test_sophia_g_estimate_is_clipped_like_the_gradients() -> None:
    """gradient_clip_val: ĝ is clipped to that global norm before squaring, as in the authors' loop."""
    module = Classifier(lambda p: SophiaG(p, lr=0.01, update_every=1))
    _trainer([HessianEstimator()], 1, gradient_clip_val=1e-3).fit(module)
    optimizer = module.trainer.optimizers[0]
    expected = _expected_gnb(module, 1, (module.x[:8], module.y[:8]))
    b = 8
    norm = sum(float((e / b).sum()) for e in expected.values()) ** 0.5  # ‖ĝ‖ from B·ĝ²
    coef = min(1.0, 1e-3 / (norm + 1e-6))
    assert coef < 1
    for p in module.parameters():
        torch.testing.assert_close(optimizer.state[p]["hessian"], 0.01 * coef**2 * expected[p], rtol=1e-4, atol=1e-15)


def test_gnb_needs_logits() -> None:
    class NoLogits(Regression):
        def forward(self, x):
            return self.net(x).sum()

    with pytest.raises(TypeError, match="hessian_logits"):
        _trainer([HessianEstimator()], 1).fit(NoLogits(lambda p: SophiaG(p, update_every=1)))


def test_sophia_g_without_estimate_warns_once() -> None:
    p = torch.nn.Parameter(torch.ones(3))
    optimizer = SophiaG([p], update_every=2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(8):
            p.grad = torch.ones(3)
            optimizer.step()
    assert sum("without a curvature estimate" in str(w.message) for w in caught) == 1


# -- DDP ------------------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_ddp_two_ranks_keep_identical_state(tmp_path: Path) -> None:
    """2 CPU ranks (gloo), different data per rank: the callback averages each estimate across ranks, so
    weights and optimizer state (m, v/h, counters) are bit-identical on both, and the estimates were used."""
    from ddp_hessian_script import NAMES

    script = Path(__file__).with_name("ddp_hessian_script.py")
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, str(script), str(tmp_path)], capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    assert set(rank0) == set(NAMES)
    for name in NAMES:
        a, b = rank0[name], rank1[name]
        assert torch.isfinite(a["params"]).all(), name
        assert not torch.equal(a["params"], a["initial"]), name
        assert torch.equal(a["params"], b["params"]), name
        assert a["state"].keys() == b["state"].keys()
        for key in a["state"]:
            assert torch.equal(a["state"][key], b["state"][key]), (name, key)
        assert float(a["state"]["curvature"].abs().sum()) > 0, name
        refreshes = 7 if name == "AdaHessian" else 2  # 7 steps; Sophia's update_every=3 refreshes after 3 and 6
        assert a["state"]["counters"][0].tolist() == [7.0, float(refreshes)], name
        assert a["first_loss"] != b["first_loss"], name  # different data: the local estimates differ


# -- faults through Lightning ---------------------------------------------------------------------------------------
class _FaultyRegression(Regression):
    """One bad gradient entry at global step 5 (after backward), as the callback fault contract injects it."""

    def __init__(self, make_optimizer, value: float) -> None:
        super().__init__(make_optimizer)
        self.value = value

    def on_after_backward(self) -> None:
        if self.trainer.global_step == 5:
            with torch.no_grad():
                self.net[0].weight.grad[0, 0] = self.value


@pytest.mark.parametrize("value", [float("nan"), float("inf"), 1e20], ids=["nan", "inf", "1e20"])
@pytest.mark.parametrize(
    "make", [lambda p: AdaHessian(p), lambda p: SophiaH(p, update_every=4)], ids=["AdaHessian", "SophiaH"]
)
def test_spike_guard_reset_with_the_callback_keeps_everything_finite(make, value: float) -> None:
    """The callback contract's SpikeGuard(action="reset") case for the Hessian-vector optimizers, which need
    the HessianEstimator next to the guard: no NaN/Inf in the weights or the optimizer state."""
    from lightning_optim.callbacks import SpikeGuard

    module = _FaultyRegression(make, value)
    _trainer([SpikeGuard(action="reset", warmup_steps=3), HessianEstimator()], 12).fit(module)
    assert all(torch.isfinite(p).all() for p in module.parameters())
    for state in module.trainer.optimizers[0].state.values():
        for key, t in state.items():
            assert torch.isfinite(t).all(), key
