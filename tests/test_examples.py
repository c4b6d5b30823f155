"""The examples: stdlib byte corpus and GPT (split, windows, shapes, causality, sizes, a few Lightning steps),
sklearn digits (data, both architectures, learning), and both scripts' ``main`` end to end. CPU, seconds."""

from __future__ import annotations

import math
import sysconfig
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch

from lightning_optim.examples.digits import DigitsClassifier, DigitsDataModule
from lightning_optim.examples.gpt import (
    GPT,
    ByteWindows,
    RandomWindowSampler,
    StdlibTextDataModule,
    is_validation_file,
)
from lightning_optim.examples._script import build_optimizer

SEQ_LEN = 32
SMALL_CORPUS = dict(seq_len=SEQ_LEN, batch_size=4, max_bytes=1_200_000)  # reaches the first validation files


def _trainer(max_steps: int, **kwargs) -> pl.Trainer:
    return pl.Trainer(
        accelerator="cpu", devices=1, max_steps=max_steps, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, **kwargs,
    )


class _Losses(pl.Callback):
    def __init__(self) -> None:
        self.values: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.values.append(float(outputs["loss"]))


# ---------------------------------------------------------------------------------------------- stdlib corpus


@pytest.fixture(scope="module")
def corpus() -> StdlibTextDataModule:
    dm = StdlibTextDataModule(**SMALL_CORPUS)
    dm.setup("fit")
    return dm


def test_split_is_deterministic_and_by_file(corpus: StdlibTextDataModule) -> None:
    again = StdlibTextDataModule(**SMALL_CORPUS)
    again.setup("fit")
    assert torch.equal(corpus.train_data, again.train_data) and torch.equal(corpus.val_data, again.val_data)
    assert corpus.train_data.dtype == torch.uint8
    assert corpus.train_files and corpus.val_files
    assert not set(corpus.train_files) & set(corpus.val_files)
    assert all(is_validation_file(f, 0.05) for f in corpus.val_files)
    assert not any(is_validation_file(f, 0.05) for f in corpus.train_files)
    assert len(corpus.train_data) + len(corpus.val_data) == SMALL_CORPUS["max_bytes"]
    assert not any(part in ("site-packages", "test", "tests") for f in corpus.train_files for part in f.split("/"))
    assert not any(f.startswith("_sysconfigdata") for f in corpus.train_files)  # build-specific content
    # the validation bytes start with the first validation file, as read from disk
    first = (Path(sysconfig.get_paths()["stdlib"]) / corpus.val_files[0]).read_bytes()[:1000]
    assert bytes(corpus.val_data[: len(first)].tolist()) == first


def test_train_windows_are_shifted_by_one(corpus: StdlibTextDataModule) -> None:
    x, y = next(iter(corpus.train_dataloader()))
    assert x.shape == y.shape == (4, SEQ_LEN) and x.dtype == y.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1])
    dataset = ByteWindows(corpus.train_data, SEQ_LEN)
    inputs, targets = dataset[123]
    assert torch.equal(inputs, corpus.train_data[123 : 123 + SEQ_LEN].long())
    assert torch.equal(targets, corpus.train_data[124 : 124 + SEQ_LEN].long())
    assert len(corpus.train_dataloader().sampler) == len(corpus.train_data) // SEQ_LEN


def test_window_sampler_is_reproducible_per_epoch() -> None:
    a, b = RandomWindowSampler(10_000, 50, seed=1), RandomWindowSampler(10_000, 50, seed=1)
    assert list(a) == list(b) and list(a) == list(a)
    first = list(a)
    a.set_epoch(1)
    assert list(a) != first and all(0 <= i < 10_000 for i in a)


def test_validation_windows_are_fixed_and_disjoint(corpus: StdlibTextDataModule) -> None:
    loader = corpus.val_dataloader()
    batches = list(loader)
    assert 0 < len(batches) <= StdlibTextDataModule.MAX_VAL_BATCHES
    assert batches[0][0].shape == (4, SEQ_LEN)
    starts = loader.dataset.indices
    assert all(b - a >= SEQ_LEN for a, b in zip(starts, starts[1:]))
    assert all(torch.equal(u, v) for (u, _), (v, _) in zip(batches, corpus.val_dataloader()))


# ------------------------------------------------------------------------------------------------------- GPT


def test_gpt_forward_shape() -> None:
    model = GPT(size="tiny", seq_len=SEQ_LEN)
    logits = model(torch.randint(256, (3, SEQ_LEN)))
    assert logits.shape == (3, SEQ_LEN, 256)
    assert 100_000 < model.num_parameters < 200_000


@pytest.mark.parametrize("positions", ["rope", "learned"])
def test_gpt_is_causal(positions: str) -> None:
    torch.manual_seed(0)
    model = GPT(size="tiny", seq_len=SEQ_LEN, positions=positions).eval()
    x = torch.randint(256, (2, SEQ_LEN))
    t = 17
    changed = x.clone()
    changed[:, t] = (changed[:, t] + 1) % 256
    with torch.no_grad():
        before, after = model(x), model(changed)
    torch.testing.assert_close(before[:, :t], after[:, :t])
    assert not torch.allclose(before[:, t], after[:, t])


def test_gpt_rejects_too_long_input() -> None:
    with pytest.raises(ValueError, match="seq_len"):
        GPT(size="tiny", seq_len=8)(torch.zeros(1, 9, dtype=torch.long))


@pytest.mark.parametrize(("size", "target"), [("20m", 20e6), ("60m", 60e6)])
def test_gpt_preset_sizes(size: str, target: float) -> None:
    with torch.device("meta"):  # no memory, no init cost
        model = GPT(size=size)
    assert 0.7 * target < model.num_parameters < 1.3 * target


def test_gpt_overrides_preset() -> None:
    with torch.device("meta"):
        model = GPT(size="60m", n_layer=1, d_model=32, n_head=2)
    assert len(model.blocks) == 1 and model.lm_head.in_features == 32


def test_gpt_trains_a_few_steps_with_lightning() -> None:
    torch.manual_seed(0)
    model = GPT(size="tiny", seq_len=SEQ_LEN)
    trainer = _trainer(5, limit_val_batches=2)
    trainer.fit(model, datamodule=StdlibTextDataModule(**SMALL_CORPUS))
    assert trainer.global_step == 5
    assert math.isfinite(float(trainer.callback_metrics["train/loss"]))


@pytest.mark.parametrize("name", ["spam", "stable_spam", "am_adamw", "am_sgd", "adamw"])
def test_build_optimizer(name: str) -> None:
    import lightning_optim

    expected = {
        "spam": lightning_optim.SPAM,
        "stable_spam": lightning_optim.StableSPAM,
        "am_adamw": lightning_optim.AdaptiveMomentumAdamW,
        "am_sgd": lightning_optim.AdaptiveMomentumSGD,
        "adamw": torch.optim.AdamW,
    }[name]
    optimizer = build_optimizer(name, [torch.nn.Parameter(torch.zeros(3))], lr=2e-3, total_steps=10)
    assert type(optimizer) is expected and optimizer.param_groups[0]["lr"] == 2e-3


# ---------------------------------------------------------------------------------------------------- digits


@pytest.fixture(scope="module")
def digits() -> DigitsDataModule:
    dm = DigitsDataModule(batch_size=32)
    dm.setup("fit")
    return dm


def test_digits_data(digits: DigitsDataModule) -> None:
    x, y = next(iter(digits.train_dataloader()))
    assert x.shape == (32, 1, 8, 8) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert len(digits.train_set) + len(digits.val_set) == 1797 and len(digits.val_set) == 360
    images = digits.train_set.tensors[0]
    assert images.min() >= 0.0 and images.max() <= 1.0 and images.max() == 1.0
    assert torch.bincount(digits.val_set.tensors[1], minlength=10).min() >= 30  # stratified: ~36 per class
    again = DigitsDataModule(batch_size=32)
    again.setup("fit")
    assert torch.equal(again.val_set.tensors[1], digits.val_set.tensors[1])


@pytest.mark.parametrize("arch", ["mlp", "cnn"])
def test_digits_forward(arch: str) -> None:
    assert DigitsClassifier(arch=arch)(torch.rand(5, 1, 8, 8)).shape == (5, 10)


def test_digits_mlp_learns() -> None:
    torch.manual_seed(0)
    losses = _Losses()
    trainer = _trainer(30, max_epochs=-1, callbacks=[losses], limit_val_batches=1)
    trainer.fit(DigitsClassifier(arch="mlp", lr=3e-3), datamodule=DigitsDataModule(batch_size=64))
    assert len(losses.values) == 30
    first, last = sum(losses.values[:5]) / 5, sum(losses.values[-5:]) / 5
    assert last < 0.5 * first, (first, last)
    assert 0.0 <= float(trainer.callback_metrics["val/acc"]) <= 1.0


# --------------------------------------------------------------------------------------------------- scripts


def test_gpt_script_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    from lightning_optim.examples import gpt

    monkeypatch.chdir(tmp_path)  # the script logs to ./lightning_logs
    gpt.main(["--max-steps", "3", "--seq-len", "32", "--batch-size", "4", "--accelerator", "cpu"])
    out = capsys.readouterr().out
    assert "train/loss first" in out and "val/loss" in out
    assert "LRSafetyRadius (monitor): " in out and "3 probes had r >= 1" in out  # the verdict ends the run
    assert list((tmp_path / "lightning_logs" / "gpt").rglob("events.out.tfevents.*"))


def test_digits_script_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    from lightning_optim.examples import digits

    monkeypatch.chdir(tmp_path)
    digits.main(["--max-steps", "3", "--accelerator", "cpu", "--optimizer", "am_adamw"])
    assert "val/acc" in capsys.readouterr().out
