"""``lightning-optim compare``: the lr grid and its edge-widening, resume, the schedule, the report, bad
arguments (with a fake objective of the lr, no training), and a few real runs of a tiny digits MLP."""

from __future__ import annotations

import json
import math
import struct
import threading
import time
from pathlib import Path

import pytest
import torch

from lightning_optim.compare import main
from lightning_optim.compare.report import steps_to_reach
from lightning_optim.compare.runner import RunSpec, build_config, run_key, run_one, state_bytes
from lightning_optim.compare.schedule import WarmupCosine, lr_factor
from lightning_optim.compare.sweep import Sweep, lr_at

TINY = """\
seed_everything: 0
model:
  class_path: lightning_optim.examples.digits.DigitsClassifier
  init_args: {arch: mlp, hidden: 16}
data:
  class_path: lightning_optim.examples.digits.DigitsDataModule
  init_args: {batch_size: 32}
optimizer:
  class_path: torch.optim.AdamW
  init_args: {lr: 1.0e-3}
param_groups:
  no_weight_decay: [bias, norm]
  groups:
    - {params: "net.6.*", lr: 5.0e-4}
trainer:
  limit_val_batches: 2
  log_every_n_steps: 2
  callbacks:
    - class_path: lightning.pytorch.callbacks.LearningRateMonitor
      init_args: {logging_interval: step}
    - class_path: lightning.pytorch.callbacks.ModelCheckpoint
"""


@pytest.fixture
def tiny_config(tmp_path: Path) -> Path:
    path = tmp_path / "tiny.yaml"
    path.write_text(TINY)
    return path


class FakeObjective:
    """A runner whose final loss is a function of log10(lr) (and of the seed); records every call."""

    def __init__(self, best_lr: float, diverge_above: float = math.inf, seed_noise: float = 0.0) -> None:
        self.best_lr = best_lr
        self.diverge_above = diverge_above
        self.seed_noise = seed_noise
        self.calls: list[RunSpec] = []

    def loss(self, spec: RunSpec) -> float:
        wd = spec.weight_decay or 0.0
        return 1.0 + (math.log10(spec.lr / self.best_lr)) ** 2 + 0.01 * wd + self.seed_noise * spec.seed

    def __call__(self, spec: RunSpec) -> dict:
        self.calls.append(spec)
        if spec.lr > self.diverge_above:
            return {"status": "diverged", "reason": "fake divergence", "curve": [], "final_loss": None}
        final = self.loss(spec)
        steps = list(range(spec.val_every, spec.budget + 1, spec.val_every))
        # a curve falling linearly from final + 1 to final
        curve = [[s, final + 1.0 - s / spec.budget] for s in steps]
        return {"status": "ok", "final_loss": final, "curve": curve, "step_time_s": 0.001, "state_bytes": 64}


def fake_args(config: Path, out: Path, *extra: str, optimizers: str = "AdamW") -> list[str]:
    fixed = "--budget-steps 10 --val-every 2 --lr-grid-points 3 --no-tensorboard --no-plots".split()
    return ["--config", str(config), "--optimizers", optimizers, *fixed, "--out", str(out), *extra]


def lrs_of(objective: FakeObjective) -> list[float]:
    return [spec.lr for spec in objective.calls]


# ---------------------------------------------------------------------------------------------------------
# The grid and its widening (fake objective: deterministic and instant)


def test_lr_lattice_is_geometric_around_the_center() -> None:
    factor = 10**0.5
    assert [lr_at(1e-3, factor, 5, j) for j in range(5)] == [1e-4, 0.000316228, 1e-3, 0.00316228, 1e-2]
    assert lr_at(1e-3, factor, 5, -1) == pytest.approx(1e-3 * factor**-3, rel=1e-5)
    assert [lr_at(1.0, 2.0, 2, j) for j in range(2)] == [0.707107, 1.41421]  # even counts straddle the centre


def test_widening_follows_the_best_lr_off_the_high_edge(tiny_config: Path, tmp_path: Path) -> None:
    # grid 3.16e-4, 1e-3, 3.16e-3 (AdamW's default 1e-3); the optimum 3.16e-2 is two points past the edge
    objective = FakeObjective(best_lr=1e-3 * 10**1.5)
    assert main(fake_args(tiny_config, tmp_path / "out", "--max-widen", "5", "--no-wd-sweep"), runner=objective) == 0
    # 3 grid points, then 1e-2 (best again, on the edge), 3.16e-2 (best again), 1e-1 (worse): stop
    assert lrs_of(objective) == [0.000316228, 0.001, 0.00316228, 0.01, 0.0316228, 0.1]
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    (adamw,) = results["optimizers"]
    assert adamw["best"]["lr"] == 0.0316228 and adamw["edge"] is None
    assert [p["lr"] for p in adamw["sensitivity"]] == sorted(lrs_of(objective))


def test_widening_stops_at_max_widen_and_flags_the_edge(tiny_config: Path, tmp_path: Path) -> None:
    objective = FakeObjective(best_lr=1e-7)  # far below the grid
    assert main(fake_args(tiny_config, tmp_path / "out", "--max-widen", "2", "--no-wd-sweep"), runner=objective) == 0
    assert lrs_of(objective) == [0.000316228, 0.001, 0.00316228, 0.0001, 3.16228e-05]
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert results["optimizers"][0]["best"]["lr"] == 3.16228e-05 and results["optimizers"][0]["edge"] == "low"
    assert "low edge of the grid" in (tmp_path / "out" / "results.md").read_text()


def test_a_diverged_edge_point_is_not_best(tiny_config: Path, tmp_path: Path) -> None:
    # the loss keeps falling with the lr, but lr > 5e-3 diverges: 3.16e-3 (edge) -> try 1e-2 -> diverged -> stop
    objective = FakeObjective(best_lr=1.0, diverge_above=5e-3)
    assert main(fake_args(tiny_config, tmp_path / "out", "--max-widen", "3", "--no-wd-sweep"), runner=objective) == 0
    assert lrs_of(objective) == [0.000316228, 0.001, 0.00316228, 0.01]
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    adamw = results["optimizers"][0]
    assert adamw["best"]["lr"] == 0.00316228 and adamw["edge"] is None
    assert adamw["runs"] == {"ok": 3, "diverged": 1, "failed": 0, "pending": 0}
    assert [p["status"] for p in adamw["sensitivity"]] == ["ok", "ok", "ok", "diverged"]


def test_all_diverged_widens_downwards(tiny_config: Path, tmp_path: Path) -> None:
    objective = FakeObjective(best_lr=1e-3, diverge_above=1e-4)
    assert main(fake_args(tiny_config, tmp_path / "out", "--max-widen", "2", "--no-wd-sweep"), runner=objective) == 0
    # every grid lr diverges: grow downwards; 1e-4 is fine (and the best, on the edge): one more, which is worse
    assert lrs_of(objective) == [0.000316228, 0.001, 0.00316228, 0.0001, 3.16228e-05]
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert results["optimizers"][0]["best"]["lr"] == 0.0001 and results["optimizers"][0]["edge"] is None


def test_weight_decay_grid_only_where_it_matters(tiny_config: Path, tmp_path: Path) -> None:
    objective = FakeObjective(best_lr=1e-3)
    args = fake_args(tiny_config, tmp_path / "out", "--max-widen", "0", "--wd-grid", "0,0.1", optimizers="AdamW,am_sgd")
    assert main(args, runner=objective) == 0
    by_opt: dict[str, set] = {}
    for spec in objective.calls:
        by_opt.setdefault(spec.optimizer, set()).add(spec.weight_decay)
    # AdaptiveMomentumSGD's registry entry has weight_decay_matters=False: its default, not passed
    assert by_opt == {"AdamW": {0.0, 0.1}, "AdaptiveMomentumSGD": {None}}
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert results["optimizers"][0]["best"]["weight_decay"] == 0.0  # the fake objective prefers less wd


def test_budget_goes_to_total_steps_arg(tiny_config: Path, tmp_path: Path) -> None:
    objective = FakeObjective(best_lr=1e-3)
    args = fake_args(
        tiny_config, tmp_path / "out", "--max-widen", "0", "--no-wd-sweep", "--opt-arg", "StableSPAM.gamma1=0.8"
    )
    assert main(args, runner=objective) == 2  # --opt-arg names an optimizer that is not compared
    assert main(args[:-2] + ["--optimizers", "StableSPAM", "--opt-arg", "StableSPAM.gamma1=0.8"], runner=objective) == 0
    assert {json.dumps(s.init_args, sort_keys=True) for s in objective.calls} == {'{"gamma1": 0.8, "total_steps": 10}'}


# ---------------------------------------------------------------------------------------------------------
# Resume, seeds, the reference and speed-ups


def test_resume_runs_only_the_missing_runs(tiny_config: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "out"
    args = fake_args(tiny_config, out, "--max-widen", "0", "--seeds", "0,1", optimizers="AdamW,SPAM")
    first = FakeObjective(best_lr=1e-3)
    assert main([*args, "--max-runs", "5"], runner=first) == 0
    assert len(first.calls) == 5 and "rerun the same command" in capsys.readouterr().out
    assert "incomplete sweep" in (out / "results.md").read_text()
    second = FakeObjective(best_lr=1e-3)
    assert main(args, runner=second) == 0
    total = 2 * 3 * 2 * 2  # optimizers x lrs x weight decays x seeds
    assert len(second.calls) == total - 5
    assert {s.key for s in first.calls}.isdisjoint(s.key for s in second.calls)
    third = FakeObjective(best_lr=1e-3)
    assert main(args, runner=third) == 0 and third.calls == []
    assert len(list((out / "runs").glob("*.json"))) == total
    # a different budget is a different run (the key holds the budget): nothing is reused
    fourth = FakeObjective(best_lr=1e-3)
    assert main([*args[:4], "--budget-steps", "12", *args[6:]], runner=fourth) == 0 and len(fourth.calls) == total


def test_seed_spread_and_speedup_in_the_table(tiny_config: Path, tmp_path: Path) -> None:
    objective = FakeObjective(best_lr=1e-3, seed_noise=0.1)
    extra = "--max-widen 0 --no-wd-sweep --seeds 0,1,2 --lr-center SPAM=3.16228e-3".split()
    args = fake_args(tiny_config, tmp_path / "out", *extra, optimizers="SPAM,AdamW")
    assert main(args, runner=objective) == 0
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert results["reference"]["optimizer"] == "AdamW"  # AdamW is the reference when included
    by_name = {x["optimizer"]: x for x in results["optimizers"]}
    adamw, spam = by_name["AdamW"]["best"], by_name["SPAM"]["best"]
    assert adamw["lr"] == spam["lr"] == 0.001  # SPAM's grid centred on 3.16e-3 still finds 1e-3
    assert adamw["final_loss"] == pytest.approx(1.1)  # mean of 1.0, 1.1, 1.2
    assert (adamw["final_loss_min"], adamw["final_loss_max"]) == pytest.approx((1.0, 1.2))
    assert adamw["final_loss_std"] == pytest.approx(0.1)
    assert by_name["AdamW"]["speedup"] == pytest.approx(1.0)
    table = (tmp_path / "out" / "results.md").read_text()
    assert "| AdamW | 0.001 | default | 1.1000 | 1.0000 - 1.2000 (std 0.1000) |" in table
    assert "| SPAM | 0.001 (edge) |" in table  # the lowest point of SPAM's grid, no widening allowed


def test_reference_by_alias(tiny_config: Path, tmp_path: Path) -> None:
    objective = FakeObjective(best_lr=1e-3)
    extra = "--max-widen 0 --no-wd-sweep --reference stable_spam".split()
    assert main(fake_args(tiny_config, tmp_path / "out", *extra, optimizers="AdamW,StableSPAM"), runner=objective) == 0
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert results["reference"]["optimizer"] == "StableSPAM"
    assert "steps to StableSPAM's loss" in (tmp_path / "out" / "results.md").read_text()


def test_steps_to_reach_interpolates_between_logged_points() -> None:
    curve = [[10, 3.0], [20, 2.0], [30, 1.0]]
    assert steps_to_reach(curve, 2.5) == pytest.approx(15.0)
    assert steps_to_reach(curve, 1.0) == pytest.approx(30.0)
    assert steps_to_reach(curve, 3.5) == pytest.approx(10.0)
    assert steps_to_reach(curve, 0.5) is None
    assert steps_to_reach([[10, float("nan")], [20, 1.0]], 1.5) == pytest.approx(20.0)


def test_parallel_dispatch_runs_one_run_per_gpu(
    tiny_config: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Several GPUs: one worker process per run and device, never two on one device at once (the worker
    itself is replaced by a fake here)."""
    from lightning_optim.compare import _settings, build_parser

    busy: dict[int, int] = {}
    lock = threading.Lock()
    seen: list[int] = []

    def fake_subprocess(self: Sweep, spec: RunSpec, device: int | None, work: Path) -> dict:
        with lock:
            assert busy.get(device, 0) == 0, "two runs on one device"
            busy[device] = 1
            seen.append(device)
        time.sleep(0.01)
        with lock:
            busy[device] = 0
        return FakeObjective(best_lr=1e-3)(spec)

    monkeypatch.setattr(Sweep, "_subprocess", fake_subprocess)
    args = build_parser().parse_args(fake_args(tiny_config, tmp_path / "out", "--max-widen", "0", "--gpus", "0,1"))
    sweep = Sweep(_settings(args))
    assert sweep.devices() == [0, 1]
    assert sweep.run() is True
    assert sorted(set(seen)) == [0, 1] and len(seen) == 6  # 3 lrs x 2 weight decays


# ---------------------------------------------------------------------------------------------------------
# Bad arguments: exit status 2, a clear message, no traceback


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--optimizers", "AdamW,NoSuchOpt"], "Unknown optimizer 'NoSuchOpt'; registered optimizers: SPAM, StableSPAM"),
        (["--budget-steps", "0"], "--budget-steps: must be at least 1"),
        (["--lr-grid-points", "0"], "--lr-grid-points: must be at least 1"),
        (["--wd-grid", ","], "--wd-grid: the grid is empty"),
        (["--optimizers", ","], "--optimizers: expected a comma-separated list"),
        (["--lr-grid-factor", "1"], "--lr-grid-factor must be > 1"),
        (["--optimizers", "AdamW,adamw"], "listed twice: AdamW"),
        (["--reference", "SPAM"], "--reference SPAM is not in --optimizers"),
        (["--val-every", "50"], "--val-every 50 exceeds --budget-steps 10"),
        (["--optimizers", "torch.optim.NoSuch"], "Cannot import optimizer class 'torch.optim.NoSuch'"),
        (["--opt-arg", "AdamW.lr=0.1"], "lr is swept"),
        (["--opt-arg", "AdamW.eps=[1"], "--opt-arg AdamW.eps=[1: not a YAML value"),
        (["--lr-center", "AdamW=fast"], "--lr-center AdamW=fast: expected a number"),
        (["--lr-center", "AdamW=-1"], "the lr must be > 0"),
        (["--wd-grid", "0,-0.1"], "weight decays must be >= 0"),
        (["--seeds", "a"], "--seeds: expected comma-separated integers"),
    ],
)
def test_bad_arguments_exit_2_with_a_clear_message(
    tiny_config: Path, tmp_path: Path, capsys: pytest.CaptureFixture, extra: list[str], message: str
) -> None:
    objective = FakeObjective(best_lr=1e-3)
    assert main(fake_args(tiny_config, tmp_path / "out") + extra, runner=objective) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert objective.calls == []


def test_missing_or_broken_config_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(fake_args(tmp_path / "none.yaml", tmp_path / "out")) == 2
    assert "no such file" in capsys.readouterr().err
    bad = tmp_path / "bad.yaml"
    bad.write_text(TINY.replace("DigitsClassifier", "NoSuchModel"))
    assert main(fake_args(bad, tmp_path / "out", "--lr-grid-points", "1", "--max-widen", "0", "--no-wd-sweep")) == 2
    err = capsys.readouterr().err
    assert "the config cannot be built" in err and "NoSuchModel" in err and "Traceback" not in err


def test_dry_run_prints_the_plan(tiny_config: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(fake_args(tiny_config, tmp_path / "out", "--dry-run", optimizers="AdamW,am_sgd")) == 0
    out = capsys.readouterr().out
    assert "AdamW: lr 0.000316, 0.001, 0.00316 x wd 0, 0.1: 6 runs" in out
    assert "AdaptiveMomentumSGD: lr 0.00316, 0.01, 0.0316 x wd default: 3 runs" in out
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------------------
# The schedule, the run key, the per-run config


def test_lr_factor_warmup_then_cosine_by_hand() -> None:
    # 10 steps, 2 warm-up: steps 1, 2 use 1/2, 2/2; then cosine over 8 steps from 1 to 0.1
    assert lr_factor(0, 10, 2) == 0.5 and lr_factor(1, 10, 2) == 1.0
    assert lr_factor(2, 10, 2, final_lr_fraction=0.1) == pytest.approx(1.0)
    assert lr_factor(6, 10, 2, final_lr_fraction=0.1) == pytest.approx(
        0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 4 / 8))
    )
    assert lr_factor(10, 10, 2, final_lr_fraction=0.1) == pytest.approx(0.1)
    assert lr_factor(99, 10, 2) == pytest.approx(0.0)  # clamped past the end
    assert lr_factor(5, 10, 2, decay="linear") == pytest.approx(1 - 3 / 8)
    assert lr_factor(5, 10, 2, decay="constant") == 1.0


def test_warmup_cosine_scheduler_steps_every_group() -> None:
    weights = [torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(2))]
    optimizer = torch.optim.SGD([{"params": weights[:1], "lr": 1.0}, {"params": weights[1:], "lr": 0.5}])
    scheduler = WarmupCosine(optimizer, total_steps=6, warmup_steps=2, final_lr_fraction=0.2)
    seen = []
    for _ in range(6):
        seen.append([g["lr"] for g in optimizer.param_groups])
        optimizer.step()
        scheduler.step()
    expected = [lr_factor(t, 6, 2, "cosine", 0.2) for t in range(6)]
    assert [s[0] for s in seen] == pytest.approx(expected)
    assert [s[1] for s in seen] == pytest.approx([0.5 * e for e in expected])  # group ratio kept
    state = scheduler.state_dict()
    resumed = WarmupCosine(optimizer, total_steps=6, warmup_steps=2, final_lr_fraction=0.2)
    resumed.load_state_dict(state)
    assert resumed.last_epoch == 6


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"total_steps": 0}, "total_steps"),
        ({"warmup_steps": 20}, "warmup_steps"),
        ({"decay": "step"}, "decay"),
        ({"final_lr_fraction": float("nan")}, "final_lr_fraction"),
    ],
)
def test_warmup_cosine_validation_names_the_argument(kwargs: dict, name: str) -> None:
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    with pytest.raises(ValueError, match=f"Invalid {name}"):
        WarmupCosine(optimizer, **{"total_steps": 10, **kwargs})


def _spec(**overrides: object) -> RunSpec:
    base = dict(
        optimizer="AdamW",
        class_path="torch.optim.AdamW",
        lr=1e-3,
        weight_decay=0.1,
        seed=0,
        budget=10,
        config={"model": {}},
        config_hash="abc",
        val_every=5,
    )
    return RunSpec(**{**base, **overrides})


def test_run_key_covers_optimizer_lr_wd_seed_budget_config() -> None:
    key = _spec().key
    assert key == _spec().key == run_key(_spec(tb_dir="/elsewhere", threads=1))  # not part of the identity
    changed = [
        _spec(lr=2e-3),
        _spec(weight_decay=0.0),
        _spec(weight_decay=None),
        _spec(seed=1),
        _spec(budget=11),
        _spec(config_hash="abd"),
        _spec(optimizer="SPAM"),
        _spec(init_args={"eps": 1e-6}),
    ]
    keys = {s.key for s in changed}
    assert len(keys) == len(changed) and key not in keys


def test_build_config_overrides_and_keeps_the_users_sections(tmp_path: Path) -> None:
    import yaml

    spec = _spec(
        config=yaml.safe_load(TINY),
        lr=4e-3,
        budget=30,
        warmup_steps=3,
        tb_dir=str(tmp_path),
        tb_name="AdamW",
        tb_version="lr=0.004,wd=0.1",
    )
    config = build_config(spec)
    assert config["optimizer"] == {"class_path": "torch.optim.AdamW", "init_args": {"lr": 4e-3, "weight_decay": 0.1}}
    assert config["lr_scheduler"]["init_args"] == {
        "total_steps": 30,
        "warmup_steps": 3,
        "decay": "cosine",
        "final_lr_fraction": 0.0,
    }
    # the group lr keeps its ratio (1/2) to the base lr; no_weight_decay stays
    assert config["param_groups"] == {
        "no_weight_decay": ["bias", "norm"],
        "groups": [{"params": "net.6.*", "lr": 2e-3}],
    }
    trainer = config["trainer"]
    assert (trainer["max_steps"], trainer["max_epochs"], trainer["val_check_interval"]) == (30, -1, 5)
    assert trainer["limit_val_batches"] == 2 and trainer["enable_progress_bar"] is False
    assert [c["class_path"].rsplit(".", 1)[-1] for c in trainer["callbacks"]] == [
        "LearningRateMonitor"
    ]  # no checkpoints
    assert trainer["logger"]["init_args"]["version"] == "lr=0.004,wd=0.1"
    assert config["seed_everything"] == 0
    assert spec.config["param_groups"]["groups"][0]["lr"] == 5e-4  # the user's config is not modified


def test_state_bytes_counts_every_state_tensor() -> None:
    weight = torch.nn.Parameter(torch.ones(3, 4))
    optimizer = torch.optim.AdamW([weight], lr=0.1)
    weight.grad = torch.ones(3, 4)
    optimizer.step()
    # exp_avg + exp_avg_sq (12 fp32 each) + the step counter (a 0-d fp32 tensor)
    assert state_bytes(optimizer) == 2 * 12 * 4 + 4


# ---------------------------------------------------------------------------------------------------------
# Real runs of a tiny digits MLP (a few steps each)


def _png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def test_tiny_sweep_table_plots_tensorboard_and_resume(
    tiny_config: Path, tmp_path: Path, capsys: pytest.CaptureFixture, one_thread: None
) -> None:
    out = tmp_path / "out"
    args = ["--config", str(tiny_config), "--out", str(out)]
    args += "--optimizers AdamW,SPAM --budget-steps 7 --val-every 3 --lr-grid-points 3 --max-widen 0".split()
    args += "--wd-grid 0.1 --warmup-fraction 0.34 --final-lr-fraction 0.1".split()
    assert main([*args, "--max-runs", "4", "--no-plots"]) == 0
    assert capsys.readouterr().out.count("[run ") == 4
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert printed.count("[run ") == 2  # only the two missing runs
    assert "| AdamW |" in printed and "| SPAM |" in printed

    results = json.loads((out / "results.json").read_text())
    assert results["complete"] and len(results["runs"]) == 6
    for run in results["runs"]:
        # validated every 3 steps and at the last one (7, not a multiple of 3: validated after fit)
        assert run["status"] == "ok" and [s for s, _ in run["curve"]] == [3, 6, 7] and run["steps"] == 7
        assert run["final_loss"] == run["curve"][-1][1] and math.isfinite(run["final_loss"])
        assert run["step_time_s"] > 0 and run["optimizer_time_s"] > 0
        # AdamW and SPAM keep two fp32 moments per weight of the 16-hidden MLP (+ small counters)
        n = sum(g["params"] for g in run["param_groups"])
        assert 2 * 4 * n <= run["state_bytes"] <= 2 * 4 * n + 1024
        # param groups from the YAML: weight decay off biases/norms; the group lr kept at half the base
        # lr; all lrs at the schedule's end (0.1 x lr after 7 scheduler steps: it steps per optimizer step)
        lrs = sorted({round(g["lr"] / run["lr"], 6) for g in run["param_groups"]})
        assert lrs == [0.05, 0.1]
        assert {g["weight_decay"] for g in run["param_groups"]} == {0.0, 0.1}
        # fit's events, and those of the validation after fit (the last step is not a multiple of 3)
        assert len(list(Path(run["tensorboard"]).glob("events.out.tfevents.*"))) == 2
    assert (out / "tb" / "AdamW" / "lr=0.001,wd=0.1").is_dir()
    table = (out / "results.md").read_text()
    assert "| optimizer | best lr | wd | final val/loss |" in table and "## Learning-rate sensitivity" in table
    for name in ("loss_curves.png", "lr_sensitivity.png"):
        width, height = _png_size(out / name)
        assert (width, height) == (700, 450) and (out / name).stat().st_size > 10_000

    # same seed, same data order: a rerun of a deleted record reproduces it exactly
    record_path = next((out / "runs").glob("SPAM_lr=0.001_*.json"))
    old = json.loads(record_path.read_text())
    record_path.unlink()
    assert main([*args, "--no-plots"]) == 0
    assert capsys.readouterr().out.count("[run ") == 1
    new = json.loads(record_path.read_text())
    assert new["curve"] == old["curve"] and new["key"] == old["key"]


def test_huge_lr_is_marked_diverged_and_stopped_early(one_thread: None) -> None:
    import yaml

    spec = _spec(config=yaml.safe_load(TINY), lr=30.0, budget=200, val_every=100)
    record = run_one(spec)
    assert record["status"] == "diverged" and record["final_loss"] is None
    assert record["steps"] < 20, record
    assert "x the first loss" in record["reason"] or "non-finite" in record["reason"]


def test_optimizers_all_and_per_optimizer_wd_grid(
    tiny_config: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    from lightning_optim import registry

    assert (
        main(fake_args(tiny_config, tmp_path / "out", "--dry-run", "--wd-grid-for", "am_sgd=0,1e-4", optimizers="all"))
        == 0
    )
    out = capsys.readouterr().out
    plan = [line.strip() for line in out.splitlines() if line.startswith("  ") and not line.strip().startswith("total")]
    listed = [line.split(":")[0] for line in plan]
    expected = [e.name for e in registry.optimizers()]  # the second-order ones run with HessianEstimator
    assert listed[0] == "AdamW" and sorted(listed) == sorted(expected)
    # an explicit per-optimizer grid sweeps weight decay even where the registry says it does not matter
    assert "AdaptiveMomentumSGD: lr 0.00316, 0.01, 0.0316 x wd 0, 0.0001: 6 runs" in out


def test_worker_process_entry_point_round_trips_a_spec(tmp_path: Path) -> None:
    """``python -m lightning_optim.compare.runner SPEC RECORD`` (what each GPU's worker runs), in-process:
    the spec survives JSON, and a config that cannot be built comes back as a config error."""
    import yaml

    from lightning_optim.compare.runner import ConfigError, _worker

    spec = _spec(config=yaml.safe_load(TINY.replace("DigitsClassifier", "NoSuchModel")))
    spec_path, record_path = tmp_path / "spec.json", tmp_path / "record.json"
    spec_path.write_text(json.dumps(spec.to_json()))
    assert RunSpec.from_json(json.loads(spec_path.read_text())) == spec
    assert _worker([str(spec_path), str(record_path)]) == 0
    record = json.loads(record_path.read_text())
    assert record["status"] == "failed" and "NoSuchModel" in record["config_error"]
    sweep = Sweep.__new__(Sweep)
    with pytest.raises(ConfigError, match="NoSuchModel"):
        Sweep._finish(sweep, spec, record)


def test_second_order_runs_get_the_hessian_estimator() -> None:
    """AdaHessian / SophiaH / SophiaG runs get lightning_optim.callbacks.HessianEstimator (they train in
    Lightning with it); other optimizers' runs do not."""
    from lightning_optim.compare.runner import _needs_hessian_estimator

    assert _needs_hessian_estimator("lightning_optim.adahessian.AdaHessian")
    assert _needs_hessian_estimator("lightning_optim.sophia.SophiaG")
    assert not _needs_hessian_estimator("torch.optim.AdamW")
    assert not _needs_hessian_estimator("no.such.Thing")
