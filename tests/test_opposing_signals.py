"""OpposingSignals (Rosenfeld & Risteski 2024) on the example digits MLP.

With AdamW at 10x the example's learning rate, every probe step moves single samples' losses by several
nats in both directions: the top-|Δloss| samples split into a rising and a falling group. The groups are
recomputed here independently, from copies of the weights taken before and after the probed step and the
dataset samples the callback names.
"""

from __future__ import annotations

import copy
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import TensorBoardLogger

from callback_models import fit, flat_params
from lightning_optim.callbacks.opposing_signals import OpposingSignals, ProbeSet, per_sample_losses
from lightning_optim.examples.digits import DigitsClassifier, DigitsDataModule
from lightning_optim.monitors import tags

pytest.importorskip("sklearn")

PROBE, EVERY, TOP_K, STEPS = 256, 5, 8, 20


@pytest.fixture(autouse=True)
def _single_thread(one_thread):
    yield


def _module(lr: float = 3e-2) -> DigitsClassifier:
    torch.manual_seed(0)
    return DigitsClassifier(hidden=64, lr=lr)


class Snapshots(pl.Callback):
    """Copies of the module just before and just after every probed step."""

    def __init__(self) -> None:
        self.before: dict[int, torch.nn.Module] = {}
        self.after: dict[int, torch.nn.Module] = {}

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if (trainer.global_step + 1) % EVERY == 0:
            self.before[trainer.global_step + 1] = copy.deepcopy(pl_module.net)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step % EVERY == 0:
            self.after[trainer.global_step] = copy.deepcopy(pl_module.net)


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the module-scoped run starts before the per-test one_thread fixture
    root = tmp_path_factory.mktemp("opposing")
    module, data = _module(), DigitsDataModule(batch_size=64)
    callback, snapshots = OpposingSignals(probe_size=PROBE, every_n_steps=EVERY, top_k=TOP_K), Snapshots()
    trainer = fit(
        module, [snapshots, callback], max_steps=STEPS, datamodule=data, limit_val_batches=0,
        logger=TensorBoardLogger(str(root), name="logs"),
    )
    torch.set_num_threads(threads)
    yield module, data, callback, snapshots, trainer


def test_large_learning_rate_run_has_opposing_groups(run) -> None:
    _, _, callback, _, _ = run
    assert [g["step"] for g in callback.history] == [5, 10, 15, 20]
    opposed = [g for g in callback.history if g["increase"] and g["decrease"]]
    assert len(opposed) >= 3
    for g in callback.history:
        assert len(g["increase"]) + len(g["decrease"]) == TOP_K
        assert all(d > 0 for d in g["delta_increase"]) and all(d < 0 for d in g["delta_decrease"])
    assert max(g["oscillation"] for g in opposed) > 1.0  # single samples move by nats in one step
    assert callback.groups is callback.history[-1]


def test_groups_are_the_top_k_loss_changes_of_the_probed_step(run) -> None:
    _, data, callback, snapshots, _ = run
    x, y = (torch.stack([data.train_set[i][k] for i in callback.probe.indices]) for k in (0, 1))
    for g in callback.history:
        step = g["step"]
        with torch.no_grad():
            before = F.cross_entropy(snapshots.before[step].eval()(x), y, reduction="none")
            after = F.cross_entropy(snapshots.after[step].eval()(x), y, reduction="none")
        delta = after - before
        top = delta.abs().topk(TOP_K).indices.tolist()
        rising = [callback.probe.indices[i] for i in top if delta[i] > 0]
        falling = [callback.probe.indices[i] for i in top if delta[i] < 0]
        assert sorted(g["increase"]) == sorted(rising) and sorted(g["decrease"]) == sorted(falling)
        expected = [float(delta[callback.probe.indices.index(i)]) for i in g["increase"]]
        assert g["delta_increase"] == pytest.approx(expected, rel=1e-4, abs=1e-6)


def test_probe_set_is_the_first_samples_of_the_train_loader_and_training_is_untouched(run) -> None:
    module, _, callback, _, _ = run
    fresh = DigitsDataModule(batch_size=64)
    fresh.setup()
    order = [int(i) for batch in fresh.train_dataloader().batch_sampler for i in batch][:PROBE]
    assert callback.probe.indices == order
    torch.testing.assert_close(callback.probe.batch[0], torch.stack([fresh.train_set[i][0] for i in order]))
    plain = _module()
    fit(plain, [], max_steps=STEPS, datamodule=DigitsDataModule(batch_size=64), limit_val_batches=0)
    assert torch.equal(flat_params(plain), flat_params(module))  # same batches, same RNG, same weights


def test_statistics_and_the_text_summary_are_logged(run) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _, _, callback, _, trainer = run
    events = EventAccumulator(trainer.logger.log_dir, size_guidance={"scalars": 0, "tensors": 0})
    events.Reload()
    for tag in (tags.OPPOSING_GROUP_SIZE, tags.OPPOSING_OSCILLATION, tags.OPPOSING_MASS, tags.OPPOSING_FLIP_FRACTION):
        assert [e.step for e in events.Scalars(tag)] == [5, 10, 15, 20]
    sizes = [e.value for e in events.Scalars(tags.OPPOSING_GROUP_SIZE)]
    assert sizes == [min(len(g["increase"]), len(g["decrease"])) for g in callback.history]
    assert all(0.0 <= e.value <= 0.5 for e in events.Scalars(tags.OPPOSING_MASS))
    assert all(0.0 <= e.value <= 1.0 for e in events.Scalars(tags.OPPOSING_FLIP_FRACTION))
    text = f"{tags.OPPOSING_SIGNALS}/groups/text_summary"
    assert text in events.Tags()["tensors"]
    last = events.Tensors(text)[-1]
    assert last.step == 20 and str(callback.groups["increase"][0]) in last.tensor_proto.string_val[0].decode()


def test_resume_keeps_the_probe_set_and_the_history(tmp_path: Path) -> None:
    data = DigitsDataModule(batch_size=64)
    first = OpposingSignals(probe_size=64, every_n_steps=EVERY, top_k=4)
    trainer = fit(_module(), [first], max_steps=10, datamodule=data, limit_val_batches=0)
    trainer.save_checkpoint(tmp_path / "ten.ckpt")
    again = OpposingSignals(probe_size=64, every_n_steps=EVERY, top_k=4)
    fit(_module(), [again], max_steps=15, datamodule=data, limit_val_batches=0, ckpt_path=str(tmp_path / "ten.ckpt"))
    assert again.probe.indices == first.probe.indices
    assert [g["step"] for g in again.history] == [5, 10, 15] and again.history[:2] == first.history
    assert again.probes == 3


def test_per_sample_losses_of_a_sequence_model_average_its_tokens() -> None:
    from lightning_optim.examples.gpt import GPT

    torch.manual_seed(0)
    gpt = GPT(n_layer=1, d_model=16, n_head=2, seq_len=8)
    x, y = torch.randint(0, 256, (3, 8)), torch.randint(0, 256, (3, 8))
    losses = per_sample_losses(gpt, (x, y), None, "test")
    expected = F.cross_entropy(gpt(x).flatten(0, 1), y.flatten(), reduction="none").view(3, 8).mean(dim=1)
    torch.testing.assert_close(losses, expected)
    gpt.loss = "stablemax"  # the module's own loss is used
    assert not torch.allclose(per_sample_losses(gpt, (x, y), None, "test"), expected)


def test_probe_set_round_trip_and_chunks() -> None:
    probe = ProbeSet((torch.arange(10.0), torch.arange(10)), list(range(100, 110)), 4)
    again = ProbeSet.from_state(probe.state_dict())
    chunks = again.chunks(torch.device("cpu"))
    assert [len(c[0]) for c in chunks] == [4, 4, 2] and again.indices == probe.indices


@pytest.mark.parametrize(
    "kwargs, name",
    [({"probe_size": 1}, "probe_size"), ({"every_n_steps": 0}, "every_n_steps"), ({"top_k": 1}, "top_k"),
     ({"loss_fn": "ce"}, "loss_fn")],
)
def test_invalid_arguments_are_named(kwargs: dict, name: str) -> None:
    with pytest.raises(ValueError, match=name):
        OpposingSignals(**kwargs)
