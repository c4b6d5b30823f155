"""PerpendicularGrad: the ⊥Grad transform (Prieto et al. 2025) as a pipeline stage, and its foreach kernel.

Expected values are derived from the equations g⊥ = g − (⟨w,g⟩/⟨w,w⟩)·w, g ← g⊥·‖g‖/‖g⊥‖ (the authors'
``orthograd.py``) in the tests themselves; the multi-tensor kernel is checked against the per-tensor
reference ``monitors.perpendicular_grad_`` and against a float64 evaluation of the same equations.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from lightning.pytorch.loggers import CSVLogger

from callback_models import GradientSpike, Regression, fit, flat_params
from lightning_optim.callbacks import SpikeAwareClipping, SpikeGuard
from lightning_optim.callbacks.perpendicular_grad import PerpendicularGrad
from lightning_optim.monitors import tags
from lightning_optim.monitors.numerics import nlm_cosine, perpendicular_grad_, perpendicular_grads_


@pytest.fixture(autouse=True)
def _single_thread(one_thread):
    yield


def _param(w, g, dtype=torch.float32) -> torch.nn.Parameter:
    p = torch.nn.Parameter(torch.tensor(w, dtype=dtype))
    p.grad = torch.tensor(g, dtype=dtype)
    return p


def _reference(w: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """The two equations in float64, straight from their definition."""
    w, g = w.double().flatten(), g.double().flatten()
    perp = g - (w @ g) / (w @ w) * w
    return perp * (g.norm() / perp.norm())


# --- the kernel ---------------------------------------------------------------------------------------------
def test_hand_computed_steps() -> None:
    # w = (3, 4), g = (1, 2): <w,g> = 11, <w,w> = 25, g⊥ = (1 - 33/25, 2 - 44/25) = (-0.32, 0.24), ‖g⊥‖ = 0.4,
    # ‖g‖ = √5, so g ← (-0.32, 0.24)·√5/0.4 = (-0.8·√5, 0.6·√5)
    p = _param([3.0, 4.0], [1.0, 2.0])
    perpendicular_grads_([p])
    torch.testing.assert_close(p.grad, torch.tensor([-0.8 * math.sqrt(5), 0.6 * math.sqrt(5)]))
    assert abs(float(p.grad @ p.detach())) < 1e-6
    assert float(p.grad.norm()) == pytest.approx(math.sqrt(5), rel=1e-6)
    # w = (1, 0), g = (1, 1): the w-component is dropped and the rest rescaled to √2
    q = _param([1.0, 0.0], [1.0, 1.0])
    perpendicular_grads_([q])
    torch.testing.assert_close(q.grad, torch.tensor([0.0, math.sqrt(2)]))


def test_parallel_zero_and_non_finite_cases() -> None:
    parallel = _param([3.0, 4.0], [6.0, 8.0])
    zero_w = _param([0.0, 0.0], [1.0, 2.0])
    zero_g = _param([1.0, 2.0], [0.0, 0.0])
    nan_g = _param([1.0, 2.0], [math.nan, 1.0])
    perpendicular_grads_([parallel, zero_w, zero_g, nan_g])  # must not raise
    assert parallel.grad.tolist() == [0.0, 0.0]  # g ∥ w: nothing orthogonal is left, and no NaN
    assert zero_w.grad.tolist() == [1.0, 2.0]  # no direction to remove
    assert zero_g.grad.tolist() == [0.0, 0.0]
    assert torch.isnan(nan_g.grad).any()  # non-finite stays non-finite (SpikeGuard's job)


def test_foreach_kernel_matches_the_per_tensor_reference_and_float64_math() -> None:
    gen = torch.Generator().manual_seed(0)
    shapes = [(5, 7), (7,), (3, 2, 4), (1,)]
    ws = [torch.randn(s, generator=gen) for s in shapes]
    gs = [torch.randn(s, generator=gen) for s in shapes]
    ours = [_param(w.tolist(), g.tolist()) for w, g in zip(ws, gs)]
    theirs = [_param(w.tolist(), g.tolist()) for w, g in zip(ws, gs)]
    perpendicular_grads_(ours)
    perpendicular_grad_(theirs)
    for a, b, w, g in zip(ours, theirs, ws, gs):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-6)
        expected = _reference(w, g).reshape(w.shape).float() if w.numel() > 1 else torch.zeros_like(w)
        torch.testing.assert_close(a.grad, expected, rtol=1e-5, atol=1e-6)


def test_entry_whose_square_overflows_stays_finite_orthogonal_and_of_the_same_norm() -> None:
    p = _param([0.1, 0.2, 0.3], [1e20, 1.0, 2.0])
    old = _param([0.1, 0.2, 0.3], [1e20, 1.0, 2.0])
    perpendicular_grad_([old])
    assert torch.isnan(old.grad).all()  # the plain formula: ‖g‖² = inf, inf/inf
    perpendicular_grads_([p])
    assert torch.isfinite(p.grad).all()
    expected = _reference(torch.tensor([0.1, 0.2, 0.3]), torch.tensor([1e20, 1.0, 2.0]))
    torch.testing.assert_close(p.grad.double(), expected, rtol=1e-5, atol=0.0)
    assert float(p.grad.double().norm()) == pytest.approx(1e20, rel=1e-6)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_is_computed_in_float32_and_clamped_to_its_range(dtype: torch.dtype) -> None:
    p = _param([1.0, 2.0, -1.0], [0.5, -0.25, 2.0], dtype)
    perpendicular_grads_([p])
    assert p.grad.dtype == dtype
    expected = _reference(torch.tensor([1.0, 2.0, -1.0], dtype=dtype), torch.tensor([0.5, -0.25, 2.0], dtype=dtype))
    torch.testing.assert_close(p.grad.double(), expected, rtol=1e-2, atol=1e-2)
    # ‖g‖ beyond float16's range: the rescaled entry is clamped, never inf
    big = _param([1.0, 2.0], [60000.0, -60000.0], torch.float16)
    perpendicular_grads_([big])
    assert torch.isfinite(big.grad).all()


def test_alignment_is_nlm_cosine_and_measuring_changes_nothing() -> None:
    gen = torch.Generator().manual_seed(1)
    params = [
        _param(torch.randn(4, 3, generator=gen).tolist(), torch.randn(4, 3, generator=gen).tolist()) for _ in range(3)
    ]
    params.append(_param([1.0, 2.0], [2.0, 4.0]))
    before = [p.grad.clone() for p in params]
    cosine = perpendicular_grads_(params, apply=False, alignment=True)
    assert all(torch.equal(p.grad, b) for p, b in zip(params, before))
    torch.testing.assert_close(cosine, nlm_cosine(params))
    # w = g gives 1; an overflowing entry still gives a finite cosine (≈ its direction: w_0/‖w‖)
    same = _param([1.0, 2.0, 3.0], [1.0, 2.0, 3.0])
    assert float(perpendicular_grads_([same], apply=False, alignment=True)) == pytest.approx(1.0, rel=1e-6)
    spike = _param([0.1, 0.2, 0.3], [1e20, 1.0, 2.0])
    c = float(perpendicular_grads_([spike], apply=False, alignment=True))
    assert c == pytest.approx(0.1 / math.sqrt(0.14), rel=1e-5)


def test_agrees_with_pytorch_optimizer_orthograd_over_several_steps() -> None:
    """Second opinion: pytorch_optimizer's OrthoGrad wrapper around the same SGD, in float64.

    Mapping: OrthoGrad(SGD(params, lr, momentum)) == our transform, then SGD.step. Known deviation of theirs
    (not hit here): they zero g⊥ when ‖g⊥‖ <= 4·eps·‖g‖ (nearly parallel), the authors and we only when it
    is exactly 0; and their norms overflow to NaN for an entry of 1e20 in float32, ours do not.
    """
    pytorch_optimizer = pytest.importorskip("pytorch_optimizer")
    from conftest import make_mlp

    gen = torch.Generator().manual_seed(2)
    x = torch.randn(16, 6, generator=gen, dtype=torch.float64)
    y = torch.randn(16, 3, generator=gen, dtype=torch.float64)
    ours, theirs = make_mlp(seed=3), make_mlp(seed=3)
    sgd = torch.optim.SGD(ours.parameters(), lr=0.1, momentum=0.9)
    wrapped = pytorch_optimizer.OrthoGrad(torch.optim.SGD(theirs.parameters(), lr=0.1, momentum=0.9))
    for _ in range(5):
        for model, optimizer in ((ours, sgd), (theirs, wrapped)):
            optimizer.zero_grad()
            torch.nn.functional.mse_loss(model(x), y).backward()
            if model is ours:
                perpendicular_grads_(list(model.parameters()))
            optimizer.step()
    for a, b in zip(ours.parameters(), theirs.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    assert not torch.equal(flat_params(ours), flat_params(make_mlp(seed=3)))


def test_invalid_arguments_are_named() -> None:
    with pytest.raises(ValueError, match="start_step"):
        PerpendicularGrad(start_step=-1)
    with pytest.raises(ValueError, match="skip_1d"):
        PerpendicularGrad(skip_1d="yes")  # type: ignore[arg-type]


# --- the callback on real runs --------------------------------------------------------------------------------
class _Small(Regression):
    """Regression on 64 samples (8 steps per epoch) with AdamW."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__(lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.01), seed=seed)

    def train_dataloader(self):
        gen = torch.Generator().manual_seed(0)
        data = torch.utils.data.TensorDataset(torch.randn(64, 6, generator=gen), torch.randn(64, 3, generator=gen))
        return torch.utils.data.DataLoader(data, batch_size=8)


class _GradientProbe(torch.nn.Module):
    """Records the raw gradients (after backward) and the ones the optimizer consumes (its step post-hook:
    Lightning runs the closure inside ``step``, so a pre-hook would come before the backward)."""

    def __init__(self) -> None:
        super().__init__()
        self.raw: list[list[torch.Tensor]] = []
        self.used: list[list[torch.Tensor]] = []
        self.weights: list[list[torch.Tensor]] = []


def _probed(module: _Small, probe: _GradientProbe) -> _Small:
    def on_after_backward() -> None:
        probe.raw.append([p.grad.clone() for p in module.parameters()])
        probe.weights.append([p.detach().clone() for p in module.parameters()])

    module.on_after_backward = on_after_backward

    def configure_optimizers():
        optimizer = torch.optim.AdamW(module.parameters(), lr=1e-2, weight_decay=0.01)
        optimizer.register_step_post_hook(
            lambda opt, a, k: probe.used.append([p.grad.clone() for p in module.parameters()])
        )
        return optimizer

    module.configure_optimizers = configure_optimizers
    return module


def test_gradient_the_optimizer_uses_is_the_transform_of_the_raw_one_from_start_step() -> None:
    probe = _GradientProbe()
    module = _probed(_Small(), probe)
    fit(module, [PerpendicularGrad(start_step=3, skip_1d=True)], max_steps=6)
    assert len(probe.used) == 6
    for step, (raw, used, weights) in enumerate(zip(probe.raw, probe.used, probe.weights)):
        for p, g, u, w in zip(module.parameters(), raw, used, weights):
            if step < 3 or p.ndim < 2:  # before start_step, and 1-D tensors with skip_1d: untouched
                assert torch.equal(u, g)
            else:
                torch.testing.assert_close(u.double(), _reference(w, g).reshape(g.shape), rtol=1e-5, atol=1e-7)
                assert abs(float((u * w).sum())) < 1e-5 * float(u.norm() * w.norm())


def test_logs_the_incoming_alignment_on_logging_steps(tmp_path: Path) -> None:
    probe = _GradientProbe()
    module = _probed(_Small(), probe)
    callback = PerpendicularGrad()
    fit(module, [callback], max_steps=4, logger=CSVLogger(str(tmp_path)), log_every_n_steps=2)
    # the last logged value is the cosine of step 4's raw gradient (global step 3), not of the projected one
    raw, weights = probe.raw[3], probe.weights[3]
    dot = sum(float((g.double() * w.double()).sum()) for g, w in zip(raw, weights))
    norms = math.sqrt(sum(float(w.double().square().sum()) for w in weights)) * math.sqrt(
        sum(float(g.double().square().sum()) for g in raw)
    )
    logged = callback.metrics(module.trainer.optimizers[0]._lightning_optim_pipeline)[tags.NLM_COSINE]
    assert float(logged) == pytest.approx(dot / norms, rel=1e-4)
    assert tags.NLM_COSINE in (tmp_path / "lightning_logs" / "version_0" / "metrics.csv").read_text()


def _spiky_run(order: str) -> tuple[torch.Tensor, SpikeGuard]:
    perp = PerpendicularGrad()
    guard = SpikeGuard(warmup_steps=3, action="clip")
    clip = SpikeAwareClipping(clip_delay=2, threshold=2.0)
    stages = {"perp_first": [perp, guard, clip], "guard_first": [guard, clip, perp], "no_perp": [guard, clip]}[order]
    module = _Small()
    fit(module, [GradientSpike({6}, 1e4), *stages], max_steps=10)
    return flat_params(module), guard


def test_composition_with_spike_guard_does_not_depend_on_the_list_order() -> None:
    (a, guard), (b, _) = _spiky_run("perp_first"), _spiky_run("guard_first")
    assert torch.equal(a, b)
    assert torch.isfinite(a).all()
    assert float(guard._states[0].counters[0]) >= 1  # the guard did act on the injected spike
    assert not torch.equal(a, _spiky_run("no_perp")[0])  # and ⊥Grad did change the run


def test_resume_continues_bit_for_bit(tmp_path: Path) -> None:
    callbacks = lambda: [PerpendicularGrad(start_step=5), SpikeGuard(warmup_steps=3)]  # noqa: E731
    full = _Small()
    fit(full, callbacks(), max_epochs=2, max_steps=-1)
    first = _Small()
    trainer = fit(first, callbacks(), max_epochs=1, max_steps=-1)
    trainer.save_checkpoint(tmp_path / "half.ckpt")
    resumed = _Small()
    again = callbacks()
    fit(resumed, again, max_epochs=2, max_steps=-1, ckpt_path=str(tmp_path / "half.ckpt"))
    assert torch.equal(flat_params(resumed), flat_params(full))
    assert again[0].applied_from == 5


@pytest.mark.gpu
def test_kernel_is_sync_free_on_cuda() -> None:
    """No host sync in the transform or the alignment (fp32, bf16, an overflowing entry). Needs CUDA."""
    params = [torch.nn.Parameter(torch.randn(shape, device="cuda")) for shape in ((64, 32), (32,), (8, 4, 4))]
    params.append(torch.nn.Parameter(torch.randn(16, 16, device="cuda", dtype=torch.bfloat16)))
    for p in params:
        p.grad = torch.randn_like(p)
    params[0].grad[0, 0] = 1e20
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        perpendicular_grads_(params, apply=False, alignment=True)
        cosine = perpendicular_grads_(params, alignment=True)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert torch.isfinite(cosine) and all(torch.isfinite(p.grad).all() for p in params)
