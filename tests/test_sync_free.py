"""CPU proxy for "no host-device sync inside step()": every call that reads a tensor's value on the host
(item, bool, float, tolist, nonzero, boolean indexing, .cpu()) may only touch the CPU step counters.

On a GPU the same property is checked with ``torch.cuda.set_sync_debug_mode("error")`` (tests/test_gpu.py).
"""

from __future__ import annotations

import pytest
import torch
from torch.overrides import TorchFunctionMode

from conftest import make_mlp
from test_optimizers_common import FACTORIES

_HOST_READS = {
    torch.Tensor.item,
    torch.Tensor.__bool__,
    torch.Tensor.__float__,
    torch.Tensor.__int__,
    torch.Tensor.__index__,
    torch.Tensor.tolist,
    torch.Tensor.cpu,
    torch.Tensor.numpy,
    torch.Tensor.nonzero,
    torch.nonzero,
    torch.masked_select,
    torch.Tensor.masked_select,
    torch.Tensor.__getitem__,
}


class HostReadRecorder(TorchFunctionMode):
    def __init__(self) -> None:
        super().__init__()
        self.reads: list[tuple[str, torch.Tensor]] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[override]
        if func in _HOST_READS and args and isinstance(args[0], torch.Tensor):
            index = args[1] if len(args) > 1 else None
            # indexing with ints/slices is free; indexing with a tensor mask is a sync
            if func is not torch.Tensor.__getitem__ or isinstance(index, torch.Tensor):
                self.reads.append((getattr(func, "__name__", str(func)), args[0]))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("name", FACTORIES)
@pytest.mark.parametrize("foreach", [False, True])
def test_step_reads_only_cpu_counters_on_the_host(name: str, foreach: bool) -> None:
    model = make_mlp(torch.float32)
    opt = FACTORIES[name](model.parameters(), foreach=foreach)
    x, y = torch.randn(8, 6), torch.randn(8, 3)
    for step in range(25):  # crosses resets, warm-ups and clipping
        opt.zero_grad()
        (torch.nn.functional.mse_loss(model(x), y) * (1e4 if step == 12 else 1.0)).backward()
        recorder = HostReadRecorder()
        with recorder:
            opt.step()
        counters = {
            id(v) for s in opt.state.values() for k, v in s.items() if k in ("step", "stat_step")
        }
        offending = [(fn, tuple(t.shape)) for fn, t in recorder.reads if id(t) not in counters]
        assert not offending, f"host reads of non-counter tensors in step(): {offending}"


def test_recorder_catches_host_reads() -> None:
    x = torch.randn(4)
    recorder = HostReadRecorder()
    with recorder:
        x.sum().item()
        _ = x[x > 0]
        bool(x.max() > 0)
        _ = x[1:3]  # plain slicing is not a read
    assert [fn for fn, _ in recorder.reads] == ["item", "__getitem__", "__bool__"]
