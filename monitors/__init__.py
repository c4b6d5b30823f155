"""Pure-torch stability statistics (``lightning_optim.monitors``); imports torch only, never Lightning.

Here live the sync-free spike statistic :class:`ZScore` and :func:`global_grad_norm` that the spike
callbacks feed every step, the numerical-stability helpers (softmax collapse fraction, the ⊥Grad transform
and its alignment :func:`nlm_cosine`, StableMax and its cross-entropy, the opposing-signals
:func:`loss_delta_stats`) and, in :mod:`~lightning_optim.monitors.tags`, the TensorBoard tag convention:
every scalar is logged under ``stability/...`` (e.g. ``stability/grad_norm_z``) or ``quant/...``
(e.g. ``quant/mmr/blocks.3``), with ``/opt<i>`` appended for optimizer ``i >= 1``. Values stay on the
device; callbacks copy them to the host once per logging step (docs/monitors.md).
"""

from __future__ import annotations

from lightning_optim.monitors import tags
from lightning_optim.monitors.grad_norm import global_grad_norm
from lightning_optim.monitors.numerics import (
    loss_delta_stats,
    nlm_cosine,
    perpendicular_grad_,
    perpendicular_grads_,
    softmax_collapse_fraction,
    stablemax,
    stablemax_cross_entropy,
)
from lightning_optim.monitors.quant import (
    LayerError,
    QuantizedTensor,
    dequantize_groups,
    fake_quantize,
    fake_quantize_ste,
    kurtosis,
    layer_error_decomposition,
    linear_modules,
    mmr,
    quantize_groups,
)
from lightning_optim.monitors.safety_radius import (
    SafetyRadius,
    binary_exact_radius,
    controller_scale,
    logit_slope_spread,
    safety_radius,
)
from lightning_optim.monitors.tags import layer_group, tag_for
from lightning_optim.monitors.zscore import ZScore

__all__ = [
    "ZScore",
    "global_grad_norm",
    "softmax_collapse_fraction",
    "perpendicular_grad_",
    "perpendicular_grads_",
    "nlm_cosine",
    "stablemax",
    "stablemax_cross_entropy",
    "loss_delta_stats",
    "SafetyRadius",
    "safety_radius",
    "logit_slope_spread",
    "binary_exact_radius",
    "controller_scale",
    "LayerError",
    "QuantizedTensor",
    "quantize_groups",
    "dequantize_groups",
    "fake_quantize",
    "fake_quantize_ste",
    "mmr",
    "kurtosis",
    "linear_modules",
    "layer_error_decomposition",
    "tags",
    "tag_for",
    "layer_group",
]
