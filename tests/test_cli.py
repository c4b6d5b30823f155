"""LightningCLI: every example config fits in a subprocess and logs its training loss to TensorBoard; short
optimizer names, YAML param groups and the console entry points."""

from __future__ import annotations

import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import lightning_optim
from lightning_optim.cli import LightningOptimCLI, main

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "examples" / "configs").glob("*.yaml"))
BORING = [
    "--model", "lightning.pytorch.demos.boring_classes.BoringModel",
    "--data", "lightning.pytorch.demos.boring_classes.BoringDataModule",
    "--trainer.logger", "false", "--trainer.enable_checkpointing", "false",
]


def _cli_command() -> list[str]:
    script = shutil.which("lightning-optim")
    return [script] if script else [sys.executable, "-m", "lightning_optim"]


def _scalars(log_dir: Path, tag: str) -> list[float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    values = []
    for event_file in log_dir.rglob("events.out.tfevents.*"):
        acc = EventAccumulator(str(event_file.parent))
        acc.Reload()
        if tag in acc.Tags()["scalars"]:
            values += [e.value for e in acc.Scalars(tag)]
    return values


@pytest.mark.parametrize("config", CONFIGS, ids=[c.stem for c in CONFIGS])
def test_example_config_fits_and_logs_training_loss(
    config: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each config trains a few steps through the CLI's own entry point, in this process (a subprocess per
    config would pay Lightning's import each time; the console script itself is tested below)."""
    max_steps = "10" if "lr_safety" in config.stem else "4"
    monkeypatch.chdir(tmp_path)
    main([
        "fit", "--config", str(config),
        "--trainer.max_steps", max_steps, "--trainer.max_epochs", "-1", "--trainer.log_every_n_steps", "1",
        "--trainer.limit_val_batches", "2", "--trainer.val_check_interval", "null",
        "--trainer.enable_progress_bar", "false", "--trainer.enable_checkpointing", "false",
        "--trainer.enable_model_summary", "false", "--trainer.logger.init_args.save_dir", str(tmp_path / "logs"),
    ])
    losses = _scalars(tmp_path / "logs", "train/loss")
    assert len(losses) >= 3 and all(math.isfinite(x) for x in losses), losses
    if "stability" in config.stem:  # the callbacks came from YAML and log under stability/
        for tag in ("stability/grad_norm", "stability/spikes", "stability/beta1", "stability/clipped_fraction"):
            assert len(_scalars(tmp_path / "logs", tag)) >= 3, tag
    if "lr_safety" in config.stem:  # logged every every_n_steps = 10 optimizer steps
        for tag in ("stability/lr_safety_ratio", "stability/lr_safety_radius", "stability/lr_scale"):
            assert len(_scalars(tmp_path / "logs", tag)) == 1, tag


def test_short_optimizer_name_resolves() -> None:
    cli = LightningOptimCLI(args=[*BORING, "--optimizer", "SPAM", "--optimizer.lr", "4e-4"], run=False)
    optimizer = cli.model.configure_optimizers()
    optimizer = optimizer[0][0] if isinstance(optimizer, tuple) else optimizer
    assert isinstance(optimizer, lightning_optim.SPAM) and optimizer.defaults["lr"] == 4e-4


def test_short_name_stays_ours_when_another_package_has_the_same_class_name(tmp_path: Path) -> None:
    """pytorch_optimizer also defines ``SPAM``: jsonargparse alone would call ``--optimizer SPAM`` ambiguous,
    in YAML too; our registered names and aliases resolve to our classes."""
    import pytorch_optimizer

    assert pytorch_optimizer.SPAM.__name__ == "SPAM"
    cli = LightningOptimCLI(args=[*BORING, "--optimizer", "SPAM", "--optimizer.lr", "4e-4"], run=False)
    optimizer = cli.model.configure_optimizers()
    optimizer = optimizer[0][0] if isinstance(optimizer, tuple) else optimizer
    assert type(optimizer) is lightning_optim.SPAM
    config = tmp_path / "short.yaml"
    config.write_text("optimizer:\n  class_path: SPAM\n  init_args: {lr: 3.0e-4}\n")
    cli = LightningOptimCLI(args=[*BORING, "--config", str(config)], run=False)
    optimizer = cli.model.configure_optimizers()
    optimizer = optimizer[0][0] if isinstance(optimizer, tuple) else optimizer
    assert type(optimizer) is lightning_optim.SPAM and optimizer.defaults["lr"] == 3e-4


def test_yaml_param_groups_rebuild_any_optimizer(tmp_path: Path) -> None:
    config = tmp_path / "groups.yaml"
    config.write_text(
        "optimizer:\n  class_path: torch.optim.AdamW\n  init_args: {lr: 0.01, weight_decay: 0.1}\n"
        "lr_scheduler:\n  class_path: torch.optim.lr_scheduler.StepLR\n  init_args: {step_size: 5}\n"
        "param_groups:\n  no_weight_decay: [bias]\n  groups:\n    - {params: 'layer.weight', lr: 0.5}\n"
    )
    cli = LightningOptimCLI(args=[*BORING, "--config", str(config)], run=False)
    optimizers, schedulers = cli.model.configure_optimizers()
    optimizer = optimizers[0]
    assert isinstance(optimizer, torch.optim.AdamW)
    groups = {(g["lr"], g["weight_decay"]): g["params"] for g in optimizer.param_groups}
    assert groups.keys() == {(0.5, 0.1), (0.01, 0.0)}
    assert groups[(0.5, 0.1)] == [cli.model.layer.weight] and groups[(0.01, 0.0)] == [cli.model.layer.bias]
    assert schedulers[0].optimizer is optimizer  # the scheduler follows the rebuilt optimizer


def test_param_groups_without_optimizer_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="param_groups needs an `optimizer:`"):
        LightningOptimCLI(args=[*BORING, "--param_groups.no_weight_decay", "[bias]"], run=False)


def test_module_entry_point_lists_subcommands() -> None:
    proc = subprocess.run([sys.executable, "-m", "lightning_optim", "--help"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    for sub in ("fit", "validate", "test"):
        assert sub in proc.stdout


def test_qat_config_instantiates_and_trains(tmp_path: Path) -> None:
    """gpt_adamw_qat.yaml: the callback comes typed from YAML; activated at step 1 it resets the moments once,
    logs quant/ tags per block, and leaves the plain Linear classes behind."""
    from torch import nn

    from lightning_optim.callbacks import QuantizationAwareTraining

    config = next(c for c in CONFIGS if c.stem == "gpt_adamw_qat")
    cli = LightningOptimCLI(
        args=[
            "--config", str(config), "--data.init_args.max_bytes", "1000000",
            "--trainer.max_steps", "4", "--trainer.log_every_n_steps", "2", "--trainer.val_check_interval", "null",
            "--trainer.limit_val_batches", "0", "--trainer.enable_progress_bar", "false",
            "--trainer.enable_checkpointing", "false", "--trainer.logger.init_args.save_dir", str(tmp_path / "logs"),
        ],
        run=False,
    )
    qat = next(cb for cb in cli.trainer.callbacks if isinstance(cb, QuantizationAwareTraining))
    assert qat.spec == (8, "int", 32, False) and qat.start_step == 100 and qat.reset_warmup_steps == 150
    qat.start_step = 1
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    assert qat.active and qat.activation_step == 1 and qat._reset_at == {0: 2}
    assert all(type(m) is nn.Linear for m in cli.model.modules() if isinstance(m, nn.Linear))
    for tag in ("quant/layer_error/blocks.0", "quant/layer_error_b/lm_head", "quant/mmr/blocks.1", "quant/kurtosis/lm_head/act"):
        assert len(_scalars(tmp_path / "logs", tag)) == 2, tag
    assert _scalars(tmp_path / "logs", "stability/momentum_resets")[-1] == 1.0


# --- start-up, help and errors (issue 16) ----------------------------------------------------------------
DIGITS_SPAM = next(c for c in CONFIGS if c.stem == "digits_spam")


def test_help_is_ours_and_imports_no_lightning() -> None:
    """``lightning-optim --help`` names the tool, its subcommands, examples and the param_groups options,
    and imports neither Lightning nor the optional heavy modules (it starts in the time torch takes)."""
    code = (
        "import sys, io, contextlib\n"
        "from lightning_optim.cli import main\n"
        "out = io.StringIO()\n"
        "with contextlib.redirect_stdout(out): main(['--help'])\n"
        "heavy = [m for m in ('lightning', 'bitsandbytes', 'matplotlib', 'sklearn', 'lightning_optim.examples') if m in sys.modules]\n"
        "print(repr(heavy)); print(out.getvalue())\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    first, help_text = proc.stdout.split("\n", 1)
    assert first == "[]", f"--help imported {first}"
    for text in ("lightning-optim", "fit", "optimizers", "compare", "report", "examples/configs", "param_groups",
                 "no_weight_decay", "groups", "python examples/gpt.py"):
        assert text in help_text, text


def _usage_error(argv: list[str], capsys: pytest.CaptureFixture) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) <= 3, err
    return err


def test_misspelt_optimizer_name_suggests_the_registered_one(capsys: pytest.CaptureFixture) -> None:
    err = _usage_error([*["fit"], *BORING, "--optimizer", "SPAMM"], capsys)
    assert "Unknown optimizer 'SPAMM'" in err and "Did you mean 'SPAM'?" in err
    assert all(info.name in err for info in lightning_optim.optimizers())


def test_misspelt_argument_suggests_the_right_one(capsys: pytest.CaptureFixture) -> None:
    err = _usage_error(["fit", *BORING, "--optimizer", "SPAM", "--optimizer.treshold", "3"], capsys)
    assert "SPAM has no argument 'treshold'" in err and "Did you mean 'threshold'?" in err


def test_bad_hyper_parameter_is_one_message_before_training(capsys: pytest.CaptureFixture) -> None:
    err = _usage_error(["fit", *BORING, "--optimizer", "SPAM", "--optimizer.lr", "-1"], capsys)
    assert "Invalid lr: -1.0" in err


def test_optimizer_over_another_configs_optimizer_starts_from_its_own_defaults(capsys: pytest.CaptureFixture) -> None:
    """digits_spam.yaml sets SPAM's lr, reset_interval 200, warmup_steps 20, clip_delay 10: ``--optimizer
    StableSPAM`` keeps only what the command line sets and names what it dropped."""
    cli = LightningOptimCLI(
        args=["--config", str(DIGITS_SPAM), "--optimizer", "StableSPAM", "--optimizer.eta_min", "0.25",
              "--trainer.logger", "false", "--trainer.callbacks", "[]"],
        run=False,
    )
    optimizer = cli.model.configure_optimizers()
    optimizer = optimizer[0][0] if isinstance(optimizer, tuple) else optimizer
    assert isinstance(optimizer, lightning_optim.StableSPAM)
    defaults = lightning_optim.registry.get("StableSPAM").defaults
    assert optimizer.defaults["reset_interval"] == defaults["reset_interval"] != 200
    assert optimizer.defaults["lr"] == defaults["lr"] and optimizer.defaults["eta_min"] == 0.25
    err = capsys.readouterr().err
    assert "replaces the config's SPAM" in err
    assert "reset_interval=200" in err and "clip_delay=10" in err and "eta_min" not in err


def test_same_optimizer_on_the_command_line_keeps_the_config_settings() -> None:
    cli = LightningOptimCLI(
        args=["--config", str(DIGITS_SPAM), "--optimizer", "SPAM", "--trainer.logger", "false",
              "--trainer.callbacks", "[]"],
        run=False,
    )
    optimizer = cli.model.configure_optimizers()
    optimizer = optimizer[0][0] if isinstance(optimizer, tuple) else optimizer
    assert optimizer.defaults["reset_interval"] == 200
