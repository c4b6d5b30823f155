"""Global gradient L2 norm without host syncs (docs/monitors.md, section 1)."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable

import torch
from torch import Tensor

__all__ = ["global_grad_norm"]

_LOW_PRECISION = (torch.float16, torch.bfloat16)


@torch.no_grad()
def global_grad_norm(params: Iterable[Tensor]) -> Tensor:
    r"""L2 norm :math:`\sqrt{\sum_p \lVert g_p \rVert_2^2}` over every ``p.grad`` that is not ``None``.

    One ``torch._foreach_norm`` per (device, dtype) group, then one norm of the stacked per-tensor norms,
    as ``torch.nn.utils.clip_grad_norm_`` does. Half-precision gradients are reduced in float32. The
    result is a float32 0-dim tensor on the first gradient's device (a CPU zero when there are no
    gradients). Non-finite gradients give a non-finite norm: nothing is sanitised, so the spike
    statistic sees them. Call it after AMP unscaling and before clipping.
    """
    groups: dict[tuple[torch.device, torch.dtype], list[Tensor]] = defaultdict(list)
    for p in params:
        if p.grad is not None:
            groups[(p.grad.device, p.grad.dtype)].append(p.grad)
    if not groups:
        return torch.zeros((), dtype=torch.float32)
    first = next(iter(groups))[0]
    # A non-blocking copy into host memory could be read before it lands; only device targets use it.
    non_blocking = first.type != "cpu"
    norms = []
    for (_, dtype), grads in groups.items():
        group = torch._foreach_norm(grads, 2.0, dtype=torch.float32 if dtype in _LOW_PRECISION else None)
        norms.append(torch.stack(group).to(device=first, dtype=torch.float32, non_blocking=non_blocking))
    return torch.linalg.vector_norm(torch.cat(norms), 2.0)
