"""GPU integration tests (marked ``gpu``; skipped without CUDA, CI never has one).

- every optimizer's step is sync-free under ``torch.cuda.set_sync_debug_mode("error")``;
- the GPT example (~20M parameters, bf16-mixed, 300 steps on stdlib text) trains with each optimizer;
- the same with a Hugging Face ``LlamaForCausalLM`` built from a small config (random init, no download).
"""

from __future__ import annotations

import math

import lightning.pytorch as pl
import pytest
import torch

from lightning_optim import SPAM, AdaptiveMomentumAdamW, AdaptiveMomentumSGD, StableSPAM

pytestmark = pytest.mark.gpu

OPTIMIZERS = {
    "spam": lambda p: SPAM(p, lr=1e-3, weight_decay=0.1, reset_interval=100, warmup_steps=20, clip_delay=5),
    "spam_compiled": lambda p: SPAM(
        p, lr=1e-3, weight_decay=0.1, reset_interval=100, warmup_steps=20, clip_delay=5, compile=True
    ),
    "stable_spam": lambda p: StableSPAM(p, lr=1e-3, total_steps=300, reset_interval=100),
    "stable_spam_compiled": lambda p: StableSPAM(p, lr=1e-3, total_steps=300, reset_interval=100, compile=True),
    "am_adamw": lambda p: AdaptiveMomentumAdamW(p, lr=1e-3),
    "am_adamw_compiled": lambda p: AdaptiveMomentumAdamW(p, lr=1e-3, compile=True),
    "am_sgd": lambda p: AdaptiveMomentumSGD(p, lr=0.05),
}


@pytest.mark.parametrize("name", OPTIMIZERS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_step_is_sync_free(name: str, dtype: torch.dtype) -> None:
    shapes = [(256, 128), (128,), (4096,)]

    def run(check: bool) -> list[torch.nn.Parameter]:
        torch.manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(s, device="cuda", dtype=dtype)) for s in shapes]
        opt = OPTIMIZERS[name](params)
        for step in range(12):  # includes state creation, clipping and (for SPAM) a warm-up
            for p in params:
                p.grad = torch.randn_like(p) * (1e4 if step == 7 else 1.0)
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("error" if check else 0)
            try:
                opt.step()
            finally:
                torch.cuda.set_sync_debug_mode(0)
        return params

    run(check=False)  # compiles (for compile=True) outside the checked run; compiling may sync
    params = run(check=True)
    assert all(torch.isfinite(p).all() for p in params)


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_lightning_resume_move_keeps_steps_sync_free(name: str) -> None:
    from lightning.fabric.utilities.optimizer import _optimizer_to_device

    params = [torch.nn.Parameter(torch.randn(64, 32, device="cuda"))]
    opt = OPTIMIZERS[name](params)
    params[0].grad = torch.randn_like(params[0])
    opt.step()
    restored = OPTIMIZERS[name](params)
    restored.load_state_dict(opt.state_dict())
    _optimizer_to_device(restored, torch.device("cuda"))  # what Lightning does after loading a checkpoint
    restored.step()  # counters moved back to the CPU once here
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        restored.step()
    finally:
        torch.cuda.set_sync_debug_mode(0)


def _fit(model: "torch.nn.Module", datamodule, name: str, steps: int = 300) -> list[float]:
    import lightning.pytorch as pl

    losses: list[float] = []

    class Record(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            losses.append(float(outputs["loss"]))

    model.configure_optimizers = lambda: OPTIMIZERS[name](model.parameters())
    trainer = pl.Trainer(
        accelerator="gpu", devices=1, precision="bf16-mixed", max_steps=steps, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, limit_val_batches=0, callbacks=[Record()],
    )
    trainer.fit(model, datamodule=datamodule)
    return losses


def _assert_learns(losses: list[float]) -> None:
    assert all(math.isfinite(x) for x in losses)
    first, last = sum(losses[:20]) / 20, sum(losses[-20:]) / 20
    assert last < 0.8 * first, (first, last)


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_gpt_example_trains(name: str) -> None:
    from lightning_optim.examples.gpt import GPT, StdlibTextDataModule

    torch.manual_seed(0)
    model = GPT(size="20m", seq_len=256)
    _assert_learns(_fit(model, StdlibTextDataModule(seq_len=256, batch_size=16), name))


@pytest.mark.parametrize("name", ["spam", "stable_spam", "am_adamw"])
def test_hf_llama_trains(name: str) -> None:
    transformers = pytest.importorskip("transformers")
    import lightning.pytorch as pl

    from lightning_optim.examples.gpt import StdlibTextDataModule

    class HFLlama(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            config = transformers.LlamaConfig(
                vocab_size=256, hidden_size=384, intermediate_size=1024, num_hidden_layers=6,
                num_attention_heads=6, num_key_value_heads=6, max_position_embeddings=256,
            )
            self.model = transformers.LlamaForCausalLM(config)

        def training_step(self, batch, batch_idx):
            x, y = batch
            logits = self.model(input_ids=x).logits
            return torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), y.flatten())

    torch.manual_seed(0)
    _assert_learns(_fit(HFLlama(), StdlibTextDataModule(seq_len=256, batch_size=16), name))


class _SyncDebugBetweenLogs(pl.Callback):
    """Turns sync debugging to "error" for every step that is not a logging step (issue 3, §3)."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        torch.cuda.synchronize()
        logging = trainer._logger_connector.should_update_logs
        torch.cuda.set_sync_debug_mode(0 if logging or trainer.global_step < 2 else "error")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        torch.cuda.set_sync_debug_mode(0)


@pytest.mark.gpu
def test_stability_callbacks_are_sync_free_between_logging_steps() -> None:
    """A fit with all four callbacks (AdamW fused and foreach) raises nothing under set_sync_debug_mode("error")."""
    from lightning.pytorch.loggers import CSVLogger

    from lightning_optim.callbacks import AdaptiveMomentum, MomentumReset, SpikeAwareClipping, SpikeGuard
    from lightning_optim.examples.gpt import GPT, StdlibTextDataModule

    for fused in (False, True):
        model = GPT(size="small", seq_len=64)
        model.configure_optimizers = lambda m=model, f=fused: torch.optim.AdamW(m.parameters(), lr=1e-3, fused=f)
        callbacks = [
            SpikeGuard(warmup_steps=5), MomentumReset(interval=10, warmup_steps=4), SpikeAwareClipping(clip_delay=3),
            AdaptiveMomentum(), _SyncDebugBetweenLogs(),
        ]
        trainer = pl.Trainer(
            accelerator="gpu", devices=1, precision="bf16-mixed", max_steps=30, log_every_n_steps=10,
            logger=CSVLogger("/tmp/sync_debug_logs"), enable_checkpointing=False, enable_progress_bar=False,
            limit_val_batches=0, callbacks=callbacks,
        )
        trainer.fit(model, StdlibTextDataModule(seq_len=64, batch_size=8))
        assert torch.isfinite(torch.cat([p.detach().reshape(-1).float() for p in model.parameters()])).all()


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["monitor", "control"])
def test_lr_safety_radius_is_sync_free_between_logging_steps(mode: str) -> None:
    """Probe steps (every step in control mode, steps 5, 15, 25 in monitor mode) raise nothing under
    set_sync_debug_mode("error"); r and s reach the host only on logging steps."""
    from lightning.pytorch.loggers import CSVLogger

    from lightning_optim.callbacks import LRSafetyRadius
    from lightning_optim.examples.gpt import GPT, StdlibTextDataModule

    model = GPT(size="small", seq_len=64)
    model.configure_optimizers = lambda: torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
    # the debug switch first: its on_train_batch_end turns the mode off before LRSafetyRadius logs
    callbacks = [_SyncDebugBetweenLogs(), LRSafetyRadius(mode=mode, every_n_steps=5 if mode == "monitor" else 10)]
    trainer = pl.Trainer(
        accelerator="gpu", devices=1, precision="bf16-mixed", max_steps=30, log_every_n_steps=10,
        logger=CSVLogger("/tmp/sync_debug_logs"), enable_checkpointing=False, enable_progress_bar=False,
        limit_val_batches=0, callbacks=callbacks,
    )
    trainer.fit(model, StdlibTextDataModule(seq_len=64, batch_size=8))
    assert callbacks[1].method == "jvp" and math.isfinite(float(callbacks[1].ratio))


@pytest.mark.gpu
def test_safety_radius_jvp_runs_with_flash_attention_models_and_matches_fd() -> None:
    """JVP runs under the math SDPA backend (flash/cuDNN have no forward-mode rule) and agrees with FD."""
    from lightning_optim.examples.gpt import GPT
    from lightning_optim.monitors import safety_radius
    from lightning_optim.monitors.safety_radius import functional_logits

    torch.manual_seed(0)
    model = GPT(size="small", seq_len=128).cuda()
    x = torch.randint(0, 256, (2, 128), device="cuda")
    params = {k: v.detach() for k, v in model.named_parameters()}
    update = {k: 1e-3 * torch.randn_like(v) for k, v in params.items()}
    logits_fn = functional_logits(model, lambda m: m(x))
    jvp = safety_radius(logits_fn, params, update, method="jvp")
    fd = safety_radius(logits_fn, params, update, method="finite_difference")
    assert jvp.method == "jvp"
    assert fd.spread.item() == pytest.approx(jvp.spread.item(), rel=1e-3)


@pytest.mark.gpu
def test_lr_safety_controller_on_hf_llama() -> None:
    """An output object with ``.logits`` (transformers) works; the controller keeps a 1000x spike finite."""
    transformers = pytest.importorskip("transformers")
    from lightning_optim.callbacks import LRSafetyRadius
    from lightning_optim.examples.gpt import StdlibTextDataModule

    class HFLlama(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            config = transformers.LlamaConfig(
                vocab_size=256, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=128,
            )
            self.model = transformers.LlamaForCausalLM(config)

        def forward(self, x):
            return self.model(input_ids=x)

        def training_step(self, batch, batch_idx):
            x, y = batch
            return torch.nn.functional.cross_entropy(self(x).logits.flatten(0, 1).float(), y.flatten())

        def configure_optimizers(self):
            opt = torch.optim.AdamW(self.parameters(), lr=1e-3)
            spike = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1000.0 if step == 10 else 1.0)
            return {"optimizer": opt, "lr_scheduler": {"scheduler": spike, "interval": "step"}}

    torch.manual_seed(0)
    model = HFLlama()
    controller = LRSafetyRadius(mode="control", every_n_steps=5)
    trainer = pl.Trainer(
        accelerator="gpu", devices=1, precision="bf16-mixed", max_steps=20, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, limit_val_batches=0, callbacks=[controller],
    )
    trainer.fit(model, StdlibTextDataModule(seq_len=128, batch_size=8))
    assert controller.method == "jvp" and float(controller.scaled_steps) >= 1
    assert torch.isfinite(torch.cat([p.detach().reshape(-1).float() for p in model.parameters()])).all()
