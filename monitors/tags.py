"""TensorBoard tag names and naming rules (docs/monitors.md, "TensorBoard tags").

Every scalar the project logs lives under ``stability/`` or ``quant/``. With several optimizers the first
uses the bare tag and optimizer ``i >= 1`` appends ``/opt<i>`` (:func:`tag_for`); per-layer tags use the
module name truncated by :func:`layer_group`, e.g. ``quant/mmr/blocks.3``.
"""

from __future__ import annotations

__all__ = [
    "STABILITY",
    "QUANT",
    "GRAD_NORM",
    "GRAD_NORM_Z",
    "LOSS_Z",
    "SPIKES",
    "MOMENTUM_RESETS",
    "SKIPPED_STEPS",
    "CLIPPED_FRACTION",
    "BETA1",
    "BETA_STAR",
    "LR_SAFETY_RATIO",
    "LR_SAFETY_RADIUS",
    "LR_SCALED_STEPS",
    "LR_SCALE",
    "Z_THRESHOLD",
    "LR_SAFETY_RATIO_LIMIT",
    "LR_SAFETY_RATIO_TARGET",
    "SOFTMAX_COLLAPSE",
    "NLM_COSINE",
    "PROBE",
    "QUANT_LAYER_ERROR",
    "QUANT_LAYER_ERROR_A",
    "QUANT_LAYER_ERROR_B",
    "QUANT_LAYER_ERROR_C",
    "QUANT_MMR",
    "QUANT_KURTOSIS",
    "tag_for",
    "layer_group",
    "layer_tag",
]

STABILITY = "stability"
QUANT = "quant"

GRAD_NORM = "stability/grad_norm"  # global gradient L2 norm, unscaled, before clipping
GRAD_NORM_Z = "stability/grad_norm_z"  # its z-score
LOSS_Z = "stability/loss_z"  # z-score of the rank-averaged training loss
SPIKES = "stability/spikes"  # cumulative steps flagged as spikes (gradient or loss)
MOMENTUM_RESETS = "stability/momentum_resets"  # cumulative moment resets
SKIPPED_STEPS = "stability/skipped_steps"  # cumulative skipped optimizer steps
CLIPPED_FRACTION = "stability/clipped_fraction"  # share of gradient entries clipped at the last step
BETA1 = "stability/beta1"  # effective first-moment coefficient applied, beta_eff = (beta* + lambda)/(1 + lambda)
BETA_STAR = "stability/beta_star"  # the AM coefficient beta* in [0, beta_max] (beta1 exceeds beta_max by design)
LR_SAFETY_RATIO = "stability/lr_safety_ratio"  # r = tau / rho_a of the last probe
LR_SAFETY_RADIUS = "stability/lr_safety_radius"  # rho_a of the last probe (a step length in parameter space)
LR_SCALE = "stability/lr_scale"  # controller scale s (1 when not acting)
LR_SCALED_STEPS = "stability/lr_scaled_steps"  # cumulative steps the controller shrank (s < 1)
# constant reference series the dashboard logs (TensorBoard draws no horizontal lines)
Z_THRESHOLD = "stability/z_threshold"  # SpikeGuard's z_threshold: a spike is z above this line
LR_SAFETY_RATIO_LIMIT = "stability/lr_safety_ratio_limit"  # r = 1, the edge of the softmax's safe step
LR_SAFETY_RATIO_TARGET = "stability/lr_safety_ratio_target"  # LRSafetyRadius(mode="control")'s target (if != 1)
SOFTMAX_COLLAPSE = "stability/softmax_collapse"
NLM_COSINE = "stability/nlm_cosine"
PROBE = "stability/probe"  # prefix: stability/probe/<statistic>

# Per-layer prefixes: the full tag is f"{prefix}/{layer_group(name)}" (see layer_tag).
QUANT_LAYER_ERROR = "quant/layer_error"  # R = ||h~ - h|| / ||h||
QUANT_LAYER_ERROR_A = "quant/layer_error_a"
QUANT_LAYER_ERROR_B = "quant/layer_error_b"
QUANT_LAYER_ERROR_C = "quant/layer_error_c"
QUANT_MMR = "quant/mmr"  # weight outlier statistics; activation statistics add the suffix /act
QUANT_KURTOSIS = "quant/kurtosis"


def tag_for(tag: str, optimizer_index: int) -> str:
    """The tag for optimizer ``optimizer_index``: the bare ``tag`` for 0, ``f"{tag}/opt{i}"`` for i >= 1."""
    if optimizer_index < 0:
        raise ValueError(f"optimizer_index must be >= 0, got {optimizer_index}")
    return tag if optimizer_index == 0 else f"{tag}/opt{optimizer_index}"


def layer_group(name: str, group_depth: int | None = 2) -> str:
    """A module's qualified name truncated to its first ``group_depth`` dot-separated parts.

    ``"blocks.3.attn.qkv"`` -> ``"blocks.3"``; a shorter name such as ``"lm_head"`` stays as it is;
    ``group_depth=None`` keeps every name (one tag per module). Loggers take the maximum over a group.
    """
    if group_depth is None:
        return name
    if group_depth < 1:
        raise ValueError(f"group_depth must be >= 1 or None, got {group_depth}")
    return ".".join(name.split(".")[:group_depth])


def layer_tag(prefix: str, name: str, group_depth: int | None = 2) -> str:
    """``f"{prefix}/{layer_group(name, group_depth)}"``, e.g. ``layer_tag(QUANT_MMR, "blocks.3.attn.qkv")``
    -> ``"quant/mmr/blocks.3"``."""
    return f"{prefix}/{layer_group(name, group_depth)}"

# AdaptiveBatchSize (callbacks/adaptive_batch_size.py)
ACCUMULATE_GRAD_BATCHES = "stability/accumulate_grad_batches"  # current trainer.accumulate_grad_batches
BATCH_SIZE_MULTIPLIER = "stability/batch_size_multiplier"  # accumulation / accumulation at the start of the run
NORM_TEST = "stability/norm_test"  # T = Var(g_bar) / (eta^2 ||g_bar||^2) of the last checked window (passes iff <= 1)
__all__ += ["ACCUMULATE_GRAD_BATCHES", "BATCH_SIZE_MULTIPLIER", "NORM_TEST"]

# Numerical-stability monitor callbacks (callbacks/softmax_collapse.py, perpendicular_grad.py,
# opposing_signals.py, training_regime.py). SOFTMAX_COLLAPSE: share of samples whose softmax is exactly
# one-hot (SoftmaxCollapseMonitor); NLM_COSINE: gradient-weight alignment of the incoming gradient (PerpendicularGrad).
SOFTMAX_COLLAPSE_SWITCHED = "stability/softmax_collapse_switched"  # 1 from the step SoftmaxCollapseMonitor switched its remedy on
OPPOSING_SIGNALS = "stability/opposing_signals"  # prefix: stability/opposing_signals/<statistic> (OpposingSignals)
OPPOSING_GROUP_SIZE = "stability/opposing_signals/group_size"  # size of the smaller of the two opposing groups (0: none)
OPPOSING_OSCILLATION = "stability/opposing_signals/oscillation"  # mean dloss of the rising group - mean dloss of the falling one
OPPOSING_MASS = "stability/opposing_signals/opposing_mass"  # min(sum dloss>0, -sum dloss<0) / sum |dloss| over the probe set
OPPOSING_FLIP_FRACTION = "stability/opposing_signals/flip_fraction"  # share of the last probe's top-k whose dloss changed sign
REGIME_COSINE = "stability/regime_cosine"  # mean per-sample cosine of probe activations between consecutive probes (TrainingRegime)
REGIME = "stability/regime"  # 0 chaotic, 1 transition, 2 stable (TrainingRegime)
__all__ += [
    "SOFTMAX_COLLAPSE_SWITCHED", "OPPOSING_SIGNALS", "OPPOSING_GROUP_SIZE", "OPPOSING_OSCILLATION", "OPPOSING_MASS",
    "OPPOSING_FLIP_FRACTION", "REGIME_COSINE", "REGIME",
]
