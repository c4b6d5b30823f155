"""AdaptiveBatchSize: AdAdaGrad's norm test on micro-batch gradients, growing accumulate_grad_batches.

Checked on real tiny Lightning fits: the statistic against a hand computation from per-sample gradients
(the authors' ``norm_test`` formula, timlautk/AdAdaGrad tests.py), a noisy problem grows and a noiseless
one does not, a grown accumulation really changes the micro-batches per optimizer step (with the right
gradient: no window mixes with another), resume restores the accumulation, and DDP ranks agree.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader, TensorDataset

from callback_models import fit
from lightning_optim.callbacks.adaptive_batch_size import AdaptiveBatchSize, norm_test_statistic
from lightning_optim.monitors import tags


class Probe(pl.LightningModule):
    """Linear regression that records, for every optimizer step, the micro-batch gradients of its window
    (computed independently with autograd.grad) and the gradient the optimizer received."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, batch_size: int = 4, lr: float = 0.05) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.lin = torch.nn.Linear(x.shape[1], 1)
        self.x, self.y, self.batch_size, self.lr = x, y, batch_size, lr
        self.window: list[torch.Tensor] = []
        self.windows: list[tuple[int, torch.Tensor, torch.Tensor]] = []  # (micro-batches, expected, got)

    def _flat_grad(self, loss: torch.Tensor) -> torch.Tensor:
        grads = torch.autograd.grad(loss, list(self.parameters()), retain_graph=True)
        return torch.cat([g.reshape(-1) for g in grads])

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = torch.nn.functional.mse_loss(self.lin(x), y)
        self.window.append(self._flat_grad(loss).detach())
        return loss

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        got = torch.cat([p.grad.reshape(-1) for p in self.parameters()]).clone()
        expected = torch.stack(self.window).sum(0) / self.trainer.accumulate_grad_batches
        self.windows.append((len(self.window), expected, got))
        self.window = []

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(TensorDataset(self.x, self.y), batch_size=self.batch_size, shuffle=False)


def _noisy(n: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return torch.randn(n, 3, generator=gen), 5.0 * torch.randn(n, 1, generator=gen)  # labels: pure noise


def _noiseless(n: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.tensor([[1.0, -2.0, 0.5]]).repeat(n, 1)  # every sample the same: identical micro-batch gradients
    return x, torch.full((n, 1), 3.0)


def _assert_windows_consistent(module: Probe) -> None:
    """The optimizer got exactly the mean of its window's micro-batch gradients (no stale or mixed ones)."""
    for i, (_, expected, got) in enumerate(module.windows):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6, msg=lambda m, i=i: f"window {i}: {m}")


# --- the statistic ------------------------------------------------------------------------------------------
def test_statistic_closed_form() -> None:
    # estimates (1, 0), (3, 0): mean (2, 0), Σ‖G‖² = 10, s² = (10 − 2·4)/1 = 2, Var(mean) = 1, T = 1/(η²·4)
    t, variance = norm_test_statistic(10.0, 4.0, 2, eta=0.5)
    assert variance == pytest.approx(1.0) and t == pytest.approx(1.0)
    assert norm_test_statistic(8.0, 4.0, 2, eta=0.5)[0] == 0.0  # identical estimates
    assert math.isnan(norm_test_statistic(8.0, 4.0, 1, eta=0.5)[0])  # one estimate: no variance
    assert math.isnan(norm_test_statistic(1.0, 0.0, 4, eta=0.5)[0])  # zero mean gradient
    assert math.isnan(norm_test_statistic(math.inf, 4.0, 4, eta=0.5)[0])


def test_statistic_matches_the_authors_norm_test_on_per_sample_gradients() -> None:
    """Micro-batches of one sample: our T·b is the authors' new batch size, variance_one_norm/(η²‖ḡ‖²)
    with torch.var(per_sample_grads, dim=0, correction=1) summed over coordinates."""
    a, eta = 6, 0.3
    x, y = _noisy(64)
    module = Probe(x, y, batch_size=1)
    callback = AdaptiveBatchSize(eta=eta, check_every_n_steps=1, min_accumulation=a, max_accumulation=1000)
    fit(module, [callback], max_steps=1)
    per_sample = torch.stack(_per_sample_grads(x[:a], y[:a]))
    batch_grad = per_sample.mean(0)
    variance_one_norm = per_sample.var(0, correction=1).sum()
    authors_new_batch = variance_one_norm / (eta**2 * batch_grad.square().sum())
    assert callback.checks == 1
    assert callback.norm_test * a == pytest.approx(float(authors_new_batch), rel=1e-4)
    assert callback.grad_norm_sq == pytest.approx(float(batch_grad.square().sum()), rel=1e-5)


def _per_sample_grads(x: torch.Tensor, y: torch.Tensor) -> list[torch.Tensor]:
    torch.manual_seed(0)
    lin = torch.nn.Linear(x.shape[1], 1)  # the Probe's initial weights (same seed)
    out = []
    for i in range(len(x)):
        loss = torch.nn.functional.mse_loss(lin(x[i : i + 1]), y[i : i + 1])
        grads = torch.autograd.grad(loss, list(lin.parameters()))
        out.append(torch.cat([g.reshape(-1) for g in grads]))
    return out


# --- growing on a real fit ------------------------------------------------------------------------------------
def test_noisy_problem_grows_and_windows_follow() -> None:
    module = Probe(*_noisy())
    callback = AdaptiveBatchSize(eta=0.5, check_every_n_steps=2, max_accumulation=16)
    trainer = fit(module, [callback], max_steps=12)
    counts = [n for n, _, _ in module.windows]
    assert counts[0] == 2  # min_accumulation: the run starts at 2 micro-batches per step
    assert callback.increases >= 1 and callback.accumulation > 2
    assert trainer.accumulate_grad_batches == callback.accumulation
    assert max(counts) == callback.accumulation <= 16
    assert callback.norm_test > 1.0  # pure-noise labels: the test keeps failing
    grown = counts.index(max(counts))
    assert all(c == counts[-1] for c in counts[grown:])  # Lightning took A' micro-batches per step from then on
    assert sorted(counts) == counts  # monotone: never shrinks
    _assert_windows_consistent(module)


def test_noiseless_problem_does_not_grow() -> None:
    module = Probe(*_noiseless())
    callback = AdaptiveBatchSize(eta=0.1, check_every_n_steps=1)
    fit(module, [callback], max_steps=8)
    assert callback.checks == 8 and callback.increases == 0 and callback.pending == 0
    assert [n for n, _, _ in module.windows] == [2] * 8
    assert callback.norm_test == pytest.approx(0.0, abs=1e-6)


def test_growth_waits_for_an_aligned_window() -> None:
    """From A = 2, a decision for A' = 6 waits for a window starting at a batch index divisible by 6."""
    module = Probe(*_noisy())
    callback = AdaptiveBatchSize(eta=0.5, check_every_n_steps=1, max_accumulation=6)
    fit(module, [callback], max_steps=8)
    counts = [n for n, _, _ in module.windows]
    # decided after step 1 (batches 0-1); batches 2 and 4 are no multiples of 6, so two more windows of 2
    assert counts[:3] == [2, 2, 2]
    assert counts[3:] == [6] * (len(counts) - 3)  # from batch 6 on
    boundaries = [sum(counts[:i]) for i in range(len(counts))]
    assert all(b % c == 0 for b, c in zip(boundaries, counts))
    _assert_windows_consistent(module)


def test_max_accumulation_caps_and_stops_measuring() -> None:
    module = Probe(*_noisy())
    callback = AdaptiveBatchSize(eta=0.01, check_every_n_steps=1, max_accumulation=4)
    fit(module, [callback], max_steps=6)
    assert callback.accumulation == 4 and callback.increases == 1
    checks_at_cap = callback.checks
    assert checks_at_cap < 6  # at the cap no window is measured any more
    assert [n for n, _, _ in module.windows] == [2, 2] + [4] * 4


def test_logs_under_stability(tmp_path: Path) -> None:
    from lightning.pytorch.loggers import CSVLogger

    module = Probe(*_noisy())
    callback = AdaptiveBatchSize(eta=0.5, check_every_n_steps=1, max_accumulation=8)
    fit(module, [callback], max_steps=6, logger=CSVLogger(str(tmp_path), name="logs"), log_every_n_steps=1)
    text = next(tmp_path.rglob("metrics.csv")).read_text()
    header = text.splitlines()[0].split(",")
    for tag in (tags.ACCUMULATE_GRAD_BATCHES, tags.BATCH_SIZE_MULTIPLIER, tags.NORM_TEST):
        assert tag in header, header


# --- checkpoints ----------------------------------------------------------------------------------------------
def test_resume_restores_the_accumulation(tmp_path: Path) -> None:
    ckpt = ModelCheckpoint(dirpath=str(tmp_path), every_n_train_steps=6, save_top_k=-1)
    module = Probe(*_noisy())
    callback = AdaptiveBatchSize(eta=0.5, check_every_n_steps=2, max_accumulation=16)
    fit(module, [callback, ckpt], max_steps=6, enable_checkpointing=True, root=tmp_path)
    saved = torch.load(next(tmp_path.glob("*step=6.ckpt")), weights_only=False)
    state = next(v for k, v in saved["callbacks"].items() if k.startswith("AdaptiveBatchSize"))
    assert state["accumulation"] == callback.accumulation > 2
    assert state["norm_test"] == callback.norm_test

    resumed_module = Probe(*_noisy())
    resumed = AdaptiveBatchSize(eta=0.5, check_every_n_steps=2, max_accumulation=16)
    trainer = fit(resumed_module, [resumed], max_steps=9, ckpt_path=str(next(tmp_path.glob("*step=6.ckpt"))))
    assert resumed.start_accumulation == 2 and resumed.checks >= state["checks"]
    first = resumed_module.windows[0][0]
    assert first in (state["accumulation"], state["pending"])  # continues with the saved size
    assert trainer.accumulate_grad_batches == resumed.accumulation >= state["accumulation"]
    _assert_windows_consistent(resumed_module)


# --- arguments and requirements --------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "name,value",
    [("eta", 0.0), ("eta", math.nan), ("check_every_n_steps", 0), ("min_accumulation", 0), ("max_accumulation", 1)],
)
def test_bad_arguments_are_named(name: str, value: Any) -> None:
    with pytest.raises(ValueError, match=name):
        AdaptiveBatchSize(**{name: value})


def test_single_device_needs_two_micro_batches() -> None:
    with pytest.raises(ValueError, match="min_accumulation"):
        fit(Probe(*_noisy()), [AdaptiveBatchSize(min_accumulation=1)], max_steps=1)


# --- DDP --------------------------------------------------------------------------------------------------------
_DDP_SCRIPT = '''
import sys
from pathlib import Path
import lightning.pytorch as pl
import torch
sys.path.insert(0, {tests!r})
from test_adaptive_batch_size import Probe, _noisy
from lightning_optim.callbacks.adaptive_batch_size import AdaptiveBatchSize

class Sampled(Probe):
    def train_dataloader(self):
        return torch.utils.data.DataLoader(
            torch.utils.data.TensorDataset(self.x, self.y), batch_size=4,
            sampler=torch.utils.data.distributed.DistributedSampler(
                torch.utils.data.TensorDataset(self.x, self.y), shuffle=False))

class Save(pl.Callback):
    def on_train_end(self, trainer, pl_module):
        cb = next(c for c in trainer.callbacks if isinstance(c, AdaptiveBatchSize))
        torch.save({{"state": cb.state_dict(), "counts": [n for n, _, _ in pl_module.windows],
                    "params": torch.cat([p.detach().reshape(-1) for p in pl_module.parameters()])}},
                   Path(sys.argv[1]) / f"rank{{trainer.global_rank}}.pt")

if __name__ == "__main__":
    x, y = _noisy()
    if int(__import__("os").environ.get("LOCAL_RANK", "0")) == 1:
        y = y * 3  # the ranks see different noise levels; the decision must still agree
    module = Sampled(x, y)
    trainer = pl.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_steps=8, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         use_distributed_sampler=False,
                         callbacks=[AdaptiveBatchSize(eta=0.5, check_every_n_steps=2, min_accumulation=1,
                                                      max_accumulation=4), Save()])
    trainer.fit(module)
'''


@pytest.mark.slow
def test_ddp_ranks_take_the_same_decision(tmp_path: Path) -> None:
    script = tmp_path / "ddp_adaptive_batch_size.py"
    script.write_text(textwrap.dedent(_DDP_SCRIPT.format(tests=str(Path(__file__).parent))))
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, str(script), str(tmp_path)], capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    other = rank1["state"]
    same = {k: v == other[k] or (v != v and other[k] != other[k]) for k, v in rank0["state"].items()}  # NaN: both
    assert all(same.values()), (rank0["state"], other)
    assert rank0["counts"] == rank1["counts"]
    assert rank0["counts"][0] == 1  # min_accumulation=1 suffices with two ranks
    # T > 1 at step 2 (pure-noise labels): A' = 4 from batch 4, the first index divisible by 4
    assert rank0["state"]["increases"] == 1 and rank0["counts"] == [1, 1, 1, 1, 4, 4, 4, 4]
    assert torch.equal(rank0["params"], rank1["params"])
