"""CPU proxy for "no host-device sync inside step()".

A TorchDispatchMode records every ATen op that reads tensor data on the host: ``_local_scalar_dense``
(``.item()``, ``bool()``, ``float()``, and a 0-dim tensor silently converted to a C++ ``Scalar`` argument),
``nonzero``, ``masked_select``, ``is_nonzero`` and boolean-mask indexing. Inside ``step()`` such reads
may only touch the CPU step counters. On a GPU the same property is checked with
``torch.cuda.set_sync_debug_mode("error")`` (tests/test_gpu.py).
"""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import lightning_optim
from conftest import make_mlp
from test_optimizers_common import FACTORIES

aten = torch.ops.aten
_HOST_READS = {
    aten._local_scalar_dense.default,
    aten.nonzero.default,
    aten.masked_select.default,
    aten.is_nonzero.default,
}


class HostReadRecorder(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.reads: list[tuple[str, torch.Tensor]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[override]
        if func in _HOST_READS:
            self.reads.append((func.__name__, args[0]))
        elif func is aten.index.Tensor and any(
            isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in args[1]
        ):
            self.reads.append((func.__name__, args[0]))
        return func(*args, **(kwargs or {}))


# the small-interval settings of test_optimizers_common where it has them (resets and warm-ups within the
# 25 steps), the registry defaults otherwise
_BY_CLASS = {type(FACTORIES[name]([torch.nn.Parameter(torch.zeros(1))])): FACTORIES[name] for name in FACTORIES}


def _build(info, params, foreach: bool):
    if info.cls in _BY_CLASS:
        return _BY_CLASS[info.cls](params, foreach=foreach)
    overrides = {info.total_steps_arg: 25} if info.total_steps_arg else {}
    return info.build(params, foreach=foreach, **overrides)


@pytest.mark.parametrize("info", lightning_optim.optimizers(ours=True), ids=lambda e: e.name)
@pytest.mark.parametrize("foreach", [False, True])
def test_step_reads_only_cpu_counters_on_the_host(info, foreach: bool) -> None:
    model = make_mlp(torch.float32)
    opt = _build(info, model.parameters(), foreach)
    counter_keys = set(info.cls.state_spec.counters)
    x, y = torch.randn(8, 6), torch.randn(8, 3)
    for step in range(25):  # crosses resets, warm-ups and clipping
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y) * (1e4 if step == 12 else 1.0)
        loss.backward(create_graph=info.needs_hvp)
        recorder = HostReadRecorder()
        with recorder:
            opt.step()
        counters = {id(v) for s in opt.state.values() for k, v in s.items() if k in counter_keys}
        offending = [(fn, tuple(t.shape)) for fn, t in recorder.reads if id(t) not in counters]
        assert not offending, f"host reads of non-counter tensors in step(): {offending}"


@pytest.mark.parametrize(
    "read,expected",
    [
        (lambda x: x.sum().item(), ["_local_scalar_dense.default"]),
        (lambda x: x[x > 0], ["index.Tensor"]),
        (lambda x: bool(x.max() > 0), ["_local_scalar_dense.default"]),
        (lambda x: torch._foreach_lerp_([x], [x], torch.tensor(0.5)), ["_local_scalar_dense.default"]),
        (lambda x: x[1:3], []),  # plain slicing reads nothing
    ],
    ids=["item", "bool-mask", "bool", "tensor-as-scalar", "slice"],
)
def test_recorder_catches_host_reads(read, expected: list[str]) -> None:
    recorder = HostReadRecorder()
    with recorder:
        read(torch.randn(4))
    assert [fn for fn, _ in recorder.reads] == expected


@pytest.mark.parametrize("mode", ["monitor", "control"])
@pytest.mark.parametrize("method", ["jvp", "finite_difference"])
def test_lr_safety_probe_reads_nothing_on_the_host(mode: str, method: str) -> None:
    """A probe step of LRSafetyRadius (snapshot, JVP/FD, radius, controller scale, rescale) never reads
    a tensor on the host: r and s stay on the device until a logging step."""
    import types

    from lightning.pytorch.strategies import SingleDeviceStrategy

    from callback_models import Regression
    from lightning_optim.callbacks import LRSafetyRadius

    module = Regression(lambda p: torch.optim.AdamW(p, lr=1.0))
    opt = module.configure_optimizers()
    callback = LRSafetyRadius(mode=mode, every_n_steps=1, target_ratio=0.01, method=method)
    trainer = types.SimpleNamespace(strategy=SingleDeviceStrategy(torch.device("cpu")), optimizers=[opt])
    callback.on_fit_start(trainer, module)
    x, y = torch.randn(8, 6), torch.randn(8, 3)
    callback.on_train_batch_start(trainer, module, (x, y), 0)
    for _ in range(3):
        opt.zero_grad()
        torch.nn.functional.mse_loss(module(x), y).backward()
        recorder = HostReadRecorder()
        with recorder:
            opt.step()
        step_counters = {id(s["step"]) for s in opt.state.values()}
        offending = [(fn, tuple(t.shape)) for fn, t in recorder.reads if id(t) not in step_counters]
        assert not offending, f"host reads in a probe step: {offending}"
    assert callback.completed == 3 and float(callback.ratio) > 0
    if mode == "control":
        assert float(callback.scale) < 1
