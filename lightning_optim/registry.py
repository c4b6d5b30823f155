"""The one list of optimizers, with their capabilities (modelled on timm's optimizer registry).

Everything that needs "which optimizers exist and what can each do" reads this module: the LightningCLI
short names, ``examples/_script.py --optimizer``, ``bench/optimizer_step.py``, the fault-contract tests
(parametrized over :func:`optimizers`), the ``lightning-optim optimizers`` table and the callbacks'
capability checks. Adding an optimizer means its module plus one :func:`register` call below.

Each entry (:class:`OptimizerInfo`) names the class, the paper and the family, and declares what the
class supports: a multi-tensor path (``foreach``), a ``torch.compile``'d step (``compile``), 8-bit state
(``state_bits_8``), whether ``step`` needs a closure or a Hessian-vector product, whether it only
handles matrices, and the facts the callbacks need: the first-moment key, whether the second moment is
the raw EMA of g² (comparable to ``grad ** 2``, so SpikeAwareClipping may clip against it) and whether the
first moment is Adam's EMA m ← β1·m + (1 − β1)·g with β1 = ``betas[0]`` (so AdaptiveMomentum may pre-mix
it). For our optimizers the state facts come from the class's :class:`~lightning_optim._base.StateSpec`;
defaults come from the constructor's signature, so they are never written twice. The shared base class
``StepCountedOptimizer`` and the matrix optimizers' ``MatrixOptimizer`` (lightning_optim/matrix.py) are abstract
and not registered; every concrete optimizer built on them is. A flag is written only where it differs
from :class:`OptimizerInfo`'s default.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.optim import Optimizer

from lightning_optim.adabelief import AdaBelief
from lightning_optim.adahessian import AdaHessian
from lightning_optim.adamp import SGDP, AdamP
from lightning_optim.adaptive_momentum import AdaptiveMomentumAdamW, AdaptiveMomentumSGD
from lightning_optim.apollo import APOLLO, APOLLOMini
from lightning_optim.auon import AuON
from lightning_optim.conda import Conda
from lightning_optim.drop_muon import DropMuon
from lightning_optim.dual_adam import DualAdam
from lightning_optim.eco import ECO
from lightning_optim.exadam import EXAdam
from lightning_optim.fira import Fira
from lightning_optim.fismo import FISMO
from lightning_optim.frugal import FRUGAL
from lightning_optim.galore import GaLore
from lightning_optim.lamb import LAMB
from lightning_optim.lion import Lion
from lightning_optim.lowbit import BLOCK_SIZE
from lightning_optim.muon import Muon
from lightning_optim.namo import NAMO, NAMOD
from lightning_optim.natural_galore import NaturalGaLore
from lightning_optim.onebit_adam import OneBitAdam
from lightning_optim.polargrad import PolarGrad
from lightning_optim.scale import SCALE
from lightning_optim.sgd_sai import SGDSaI
from lightning_optim.sinkgd import SinkGD
from lightning_optim.soap import SOAP
from lightning_optim.sophia import SophiaG, SophiaH
from lightning_optim.spam import SPAM
from lightning_optim.stable_spam import StableSPAM
from lightning_optim.swan import SWAN

__all__ = ["OptimizerInfo", "build", "get", "info_for", "optimizers", "register", "table"]


@dataclass(frozen=True)
class OptimizerInfo:
    """One registered optimizer and its capabilities.

    Args:
        name: the public name (the class name for ours, e.g. ``"StableSPAM"``).
        cls: the optimizer class.
        paper: citation of the method.
        family: ``"adam"``, ``"sgd"``, ``"sign"``, ``"matrix"``, ``"second-order"``, ``"low-rank"``, ...
        aliases: further lower-case names accepted by :func:`get` (e.g. ``"stable_spam"``).
        ours: implemented in this package (the fault contract covers exactly these); False for
            reference baselines such as ``torch.optim.AdamW``.
        foreach: offers the multi-tensor path (``foreach=True``).
        compile: offers ``compile=True``.
        state_bits_8: offers ``state_bits=8``.
        needs_closure: ``step`` must be given a closure.
        needs_hvp: ``step`` needs Hessian-vector products (``create_graph=True`` backward).
        matrix_only: only handles 2-D parameters (others need a second optimizer).
        first_moment: state key of the first moment (None: none).
        second_moment_like_grad_sq: the second moment is the raw EMA of g² (SpikeAwareClipping may use it).
        adam_first_moment: the first moment is m ← β1·m + (1 − β1)·g with β1 = ``betas[0]``.
        moments: number of parameter-sized moment tensors (for the state-memory formula).
        weight_decay_matters: a sweep should tune weight decay too.
        total_steps_arg: constructor argument that must be set to the run's length (None: none).
        lr_sweep_center: the learning rate a sweep centres on (the constructor default unless given).
        accepts_inf: constructor arguments to which ``inf`` is a documented, valid value (SPAM's
            ``threshold=inf`` disables clipping); every other numeric argument rejects inf and NaN.
    """

    name: str
    cls: type[Optimizer]
    paper: str
    family: str
    aliases: tuple[str, ...] = ()
    ours: bool = True
    foreach: bool = True
    compile: bool = False
    state_bits_8: bool = False
    needs_closure: bool = False
    needs_hvp: bool = False
    matrix_only: bool = False
    first_moment: str | None = None
    second_moment_like_grad_sq: bool = False
    adam_first_moment: bool = False
    moments: int = 0
    weight_decay_matters: bool = True
    total_steps_arg: str | None = None
    lr_sweep_center: float | None = None
    accepts_inf: tuple[str, ...] = ()
    defaults: dict[str, Any] = field(default_factory=dict)

    @property
    def default_lr(self) -> float:
        """The constructor's default learning rate (or the sweep centre when the class has none)."""
        return self.lr_sweep_center if self.lr_sweep_center is not None else float(self.defaults["lr"])

    def state_bytes_per_param(self, state_bits: int = 32, numel: int = 1 << 20) -> float:
        """Optimizer-state bytes per parameter for a tensor of ``numel`` elements with fp32/bf16 weights.

        fp32 moments: 4 bytes each. 8-bit moments (tensors of >= 4096 elements): 1 byte per entry plus one
        fp32 absmax per 256-entry block, i.e. 1 + 4/256 = 1.016 bytes per moment. Per-tensor counters and
        scalars are left out (a few bytes per tensor).
        """
        if state_bits == 8 and self.state_bits_8 and numel >= 4096:
            return self.moments * (1 + 4 / BLOCK_SIZE)
        return self.moments * 4.0

    def build(self, params: Iterable[Any], **overrides: Any) -> Optimizer:
        """An instance over ``params`` with the registered defaults and ``overrides``."""
        return self.cls(params, **overrides)


_REGISTRY: dict[str, OptimizerInfo] = {}


def _signature_defaults(cls: type) -> dict[str, Any]:
    params = inspect.signature(cls.__init__).parameters.values()
    return {p.name: p.default for p in params if p.default is not inspect.Parameter.empty}


def register(cls: type[Optimizer], **info: Any) -> OptimizerInfo:
    """Add ``cls`` to the registry; state facts come from its ``state_spec`` when it has one.

    Args:
        cls: the optimizer class.
        **info: the :class:`OptimizerInfo` fields other than ``cls`` and ``defaults`` (``name`` defaults
            to the class name).
    """
    spec = getattr(cls, "state_spec", None)
    if spec is not None:
        info.setdefault("first_moment", spec.first_moment)
        info.setdefault("second_moment_like_grad_sq", spec.second_moment is not None and spec.second_moment_like_grad_sq)
        info.setdefault("moments", len(spec.moments))
    entry = OptimizerInfo(cls=cls, defaults=_signature_defaults(cls), **{"name": cls.__name__, **info})
    for key in (entry.name.lower(), *entry.aliases):
        if key in _REGISTRY and _REGISTRY[key].cls is not cls:
            raise ValueError(f"Optimizer name {key!r} is already registered for {_REGISTRY[key].cls.__qualname__}.")
        _REGISTRY[key] = entry
    return entry


def optimizers(ours: bool | None = None) -> list[OptimizerInfo]:
    """Every registered optimizer once, in registration order (``ours=True``: only this package's)."""
    seen: dict[str, OptimizerInfo] = {}
    for entry in _REGISTRY.values():
        seen.setdefault(entry.name, entry)
    return [e for e in seen.values() if ours is None or e.ours == ours]


def get(name: str) -> OptimizerInfo:
    """The entry for a name or alias, case-insensitive (``"StableSPAM"``, ``"stable_spam"``).

    Raises:
        ValueError: an unknown name; the message lists the registered ones.
    """
    entry = _REGISTRY.get(str(name).lower())
    if entry is None:
        names = ", ".join(e.name for e in optimizers())
        raise ValueError(f"Unknown optimizer {name!r}; registered optimizers: {names}.")
    return entry


def info_for(optimizer: Optimizer | type) -> OptimizerInfo | None:
    """The entry of an optimizer instance or class, looked up along its MRO (subclasses inherit it)."""
    cls = optimizer if isinstance(optimizer, type) else type(optimizer)
    by_class = {e.cls: e for e in optimizers()}
    for klass in cls.__mro__:
        if klass in by_class:
            return by_class[klass]
    return None


def build(name: str, params: Iterable[Any], total_steps: int | None = None, **overrides: Any) -> Optimizer:
    """Build optimizer ``name`` over ``params``; ``total_steps`` goes to the argument that needs it.

    Args:
        name: a registered name or alias.
        params: parameters or param groups.
        total_steps: the run's number of optimizer steps (used by optimizers with ``total_steps_arg``).
        **overrides: constructor arguments.
    """
    entry = get(name)
    if entry.total_steps_arg is not None and total_steps is not None:
        overrides.setdefault(entry.total_steps_arg, total_steps)
    return entry.build(params, **overrides)


def table() -> str:
    """The registry as a Markdown table (what ``lightning-optim optimizers`` prints)."""
    rows = [
        "| name | family | lr | state B/param (32 / 8-bit) | foreach | compile | 8-bit | closure | paper |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for e in optimizers():
        eight = f"{e.state_bytes_per_param(8):.2f}" if e.state_bits_8 else "-"
        flags = ["yes" if f else "-" for f in (e.foreach, e.compile, e.state_bits_8, e.needs_closure)]
        name = e.name if e.ours else f"{e.name} (baseline: {e.cls.__module__}.{e.cls.__qualname__})"
        rows.append(
            f"| {name} | {e.family} | {e.default_lr:g} | {e.state_bytes_per_param():g} / {eight} | "
            f"{' | '.join(flags)} | {e.paper} |"
        )
    return "\n".join(rows)


# -- the registry ----------------------------------------------------------------------------------------
# Adam family
register(
    SPAM,
    paper="Huang et al., SPAM: Spike-Aware Adam with Momentum Reset, ICLR 2025 (arXiv 2501.06842)",
    family="adam",
    compile=True,
    state_bits_8=True,
    adam_first_moment=True,
    accepts_inf=("threshold",),
)
register(
    StableSPAM,
    aliases=("stable_spam",),
    paper="Huang et al., Stable-SPAM: How to Train in 4-Bit More Stably than 16-Bit Adam (arXiv 2502.17055)",
    family="adam",
    compile=True,
    state_bits_8=True,
    total_steps_arg="total_steps",
)
register(
    AdaptiveMomentumAdamW,
    aliases=("am_adamw",),
    paper="Topollai & Choromanska, Adaptive Memory Momentum (arXiv 2510.04988)",
    family="adam",
    compile=True,
    state_bits_8=True,
)
register(
    LAMB,
    paper="You et al., Large Batch Optimization for Deep Learning: Training BERT in 76 minutes, ICLR 2020 (arXiv 1904.00962)",
    family="adam",
    aliases=(),  # "lamb" is the name itself
    compile=True,
    state_bits_8=True,
    adam_first_moment=True,  # m <- b1*m + (1-b1)*g with b1 = betas[0] (of the clipped g when max_grad_norm is set)
)
register(
    AdaBelief,
    aliases=("ada_belief",),
    paper="Zhuang et al., AdaBelief Optimizer: Adapting Stepsizes by the Belief in Observed Gradients, NeurIPS 2020 (arXiv 2010.07468)",
    family="adam",
    compile=True,
    state_bits_8=True,
    # m is Adam's EMA, but AdaptiveMomentum's metric reads exp_avg_sq (AdaBelief keeps s = EMA((g - m)^2) instead)
    adam_first_moment=False,  # (the default, kept explicit: see above)
    moments=2,  # exp_avg, exp_avg_var; max_exp_avg_var (a third) only with amsgrad=True
)
register(
    AdamP,
    paper="Heo et al., AdamP: Slowing Down the Slowdown for Momentum Optimizers on Scale-invariant Weights, ICLR 2021 (arXiv 2006.08217)",
    family="adam",
    compile=True,
    state_bits_8=True,
    adam_first_moment=True,  # m <- b1*m + (1-b1)*g with b1 = betas[0]; the projection acts on m/D, not on m
)
register(
    EXAdam,
    paper="Adly, EXAdam: The Power of Adaptive Cross-Moments (arXiv 2412.20302)",
    family="adam",
    aliases=(),  # the snake name "exadam" is the lower-case name itself
    compile=True,
    state_bits_8=True,
    adam_first_moment=True,  # m <- b1*m + (1-b1)*g with b1 = betas[0]; v is the raw EMA of g^2
)
register(
    DualAdam,
    aliases=("dual_adam",),
    paper="Shi, Chen, Jin and Zhou, Combining Adam and its Inverse Counterpart to Enhance Generalization of Deep Learning Optimizers (arXiv 2603.07122)",
    family="adam",
    compile=True,
    state_bits_8=True,
    adam_first_moment=True,  # m <- b1*m + (1-b1)*g with b1 = betas[0]; v is the raw EMA of g^2
)
# sign methods
register(
    Lion,
    paper="Chen et al., Symbolic Discovery of Optimization Algorithms, NeurIPS 2023 (arXiv 2302.06675)",
    family="sign",
    aliases=(),  # "lion" is the name itself
    compile=True,
    state_bits_8=True,
    adam_first_moment=False,  # m is an EMA with beta2 = betas[1]; betas[0] only weights the signed interpolation
    weight_decay_matters=True,  # the authors tune lr and weight decay together (3-10x AdamW's decay)
)
# SGD family
register(
    AdaptiveMomentumSGD,
    aliases=("am_sgd",),
    paper="Topollai & Choromanska, Adaptive Memory Momentum (arXiv 2510.04988)",
    family="sgd",
    state_bits_8=True,
    weight_decay_matters=False,
)
register(
    SGDP,
    paper="Heo et al., AdamP: Slowing Down the Slowdown for Momentum Optimizers on Scale-invariant Weights, ICLR 2021 (arXiv 2006.08217)",
    family="sgd",
    compile=True,
    state_bits_8=True,
)
register(
    SGDSaI,
    aliases=("sgd_sai",),
    paper="Xu, Xiang, Cai and Wen, No More Adam: Learning Rate Scaling at Initialization is All You Need (arXiv 2412.11768)",
    family="sgd",
    compile=True,
    state_bits_8=True,
    adam_first_moment=False,  # m <- mu*m + (1-mu)*g with mu = momentum (no betas), first m = g
)
# second-order (Hessian estimates)
register(
    AdaHessian,
    aliases=("ada_hessian",),
    paper="Yao et al., ADAHESSIAN: An Adaptive Second Order Optimizer for Machine Learning, AAAI 2021 (arXiv 2006.00719)",
    family="second-order",
    compile=False,  # a step is dominated by the Hessian-vector product; the update stays eager
    state_bits_8=True,
    needs_hvp=True,  # H z from a create_graph=True backward, or the HessianEstimator callback
    adam_first_moment=True,  # m <- b1*m + (1-b1)*g with b1 = betas[0]; v is the EMA of D^2, not of g^2
)
register(
    SophiaH,
    aliases=("sophia_h",),
    paper="Liu et al., Sophia: A Scalable Stochastic Second-order Optimizer for Language Model Pre-training, ICLR 2024 (arXiv 2305.14342)",
    family="second-order",
    compile=True,
    state_bits_8=True,
    needs_hvp=True,  # every update_every-th step: H z from a create_graph=True backward, or HessianEstimator
    adam_first_moment=True,  # m <- b1*m + (1-b1)*g with b1 = betas[0]
)
register(
    SophiaG,
    aliases=("sophia_g", "sophia"),
    paper="Liu et al., Sophia: A Scalable Stochastic Second-order Optimizer for Language Model Pre-training, ICLR 2024 (arXiv 2305.14342)",
    family="second-order",
    compile=True,
    state_bits_8=True,
    needs_hvp=False,  # its estimate is an extra forward/backward on sampled labels (HessianEstimator), no HVP
    adam_first_moment=True,  # m <- b1*m + (1-b1)*g with b1 = betas[0]
)
# matrix optimizers (a matrix rule plus an AdamW rule for the rest)
register(
    Muon,
    paper="Jordan et al., Muon: An optimizer for hidden layers in neural networks (2024, kellerjordan.github.io/posts/muon)",
    family="matrix",
    aliases=(),  # "muon" is the name itself
    compile=False,  # eager only: the Newton-Schulz matmuls dominate; no compiled step is offered
    matrix_only=False,  # 0-/1-D tensors (and use_muon=False groups) take the built-in AdamW rule
    adam_first_moment=False,  # momentum_buffer is an EMA with mu = momentum (no betas) for the matrices
    moments=1,  # matrices keep momentum_buffer (4 B/param); AdamW-rule tensors keep exp_avg + exp_avg_sq
)
register(
    NAMO,
    paper="Zhang, Liu & Schaeffer, Adam Improves Muon: Adaptive Moment Estimation with Orthogonalized Momentum (arXiv 2602.17080, 2026)",
    family="matrix",
    aliases=(),  # "namo" is the name itself
    compile=False,  # eager only: the Newton-Schulz matmuls dominate
    matrix_only=False,  # 0-/1-D tensors (and use_muon=False groups) take the built-in AdamW rule
    # momentum_buffer is an EMA with betas[0] for the matrices, but the AdamW-rule tensors keep exp_avg instead
    adam_first_moment=False,  # (the default, kept explicit: see above)
    moments=1,  # matrices: momentum_buffer (4 B/param) + one fp32 per matrix; AdamW-rule tensors: 2 moments
)
register(
    NAMOD,
    name="NAMO-D",
    paper="Zhang, Liu & Schaeffer, Adam Improves Muon: Adaptive Moment Estimation with Orthogonalized Momentum (arXiv 2602.17080, 2026), column-wise variant",
    family="matrix",
    aliases=("namo_d", "namod"),
    compile=False,  # eager only: the Newton-Schulz matmuls dominate
    matrix_only=False,  # 0-/1-D tensors (and use_muon=False groups) take the built-in AdamW rule
    adam_first_moment=False,  # as NAMO: the AdamW-rule tensors have no momentum_buffer
    moments=1,  # matrices: momentum_buffer (4 B/param) + one fp32 per column; AdamW-rule tensors: 2 moments
)
register(
    SinkGD,
    paper="Scetbon, Ma, Gong & Meeds, Gradient Multi-Normalization for Stateless and Scalable LLM Training (arXiv 2502.06742, 2025)",
    family="matrix",
    aliases=("sink_gd",),
    compile=False,  # eager only
    matrix_only=False,  # 0-/1-D tensors (and use_muon=False groups) take the built-in AdamW rule
    adam_first_moment=False,  # the matrices are stateless; exp_avg exists only for the AdamW-rule tensors
    moments=0,  # matrices: no state (0 B/param); AdamW-rule tensors keep exp_avg + exp_avg_sq
    weight_decay_matters=False,  # the paper trains without weight decay
)
register(
    SOAP,
    paper="Vyas et al., SOAP: Improving and Stabilizing Shampoo using Adam, ICLR 2025 (arXiv 2409.11321)",
    family="matrix",
    aliases=(),  # "soap" is the name itself
    foreach=True,  # element-wise stages multi-tensor; projections and refreshes per tensor
    matrix_only=False,  # 1-D and 0-dim tensors are plain Adam inside SOAP
    adam_first_moment=False,  # exp_avg is Adam's EMA of g, but the Adam metric (exp_avg_sq) lives in the eigenbasis
)
register(
    AuON,
    paper="Maity, AuON: A Linear-time Alternative to Semi-Orthogonal Momentum Updates (arXiv 2509.24320, 2025)",
    family="matrix",
    aliases=(),  # "auon" is the name itself
    compile=False,  # eager only
    matrix_only=False,  # 0-/1-D tensors (and use_muon=False groups) take the built-in AdamW rule
    adam_first_moment=False,  # momentum_buffer is an EMA with mu = momentum (no betas); AdamW tensors keep exp_avg
    moments=1,  # matrices: momentum_buffer (4 B/param); AdamW-rule tensors: exp_avg + exp_avg_sq
)
register(
    PolarGrad,
    paper="Lau, Long & Su, PolarGrad: A Class of Matrix-Gradient Optimizers from a Unifying Preconditioning Perspective (arXiv 2505.21799, 2025)",
    family="matrix",
    aliases=("polar_grad",),
    compile=False,  # eager only: QR/Cholesky (QDWH) dominate
    matrix_only=False,  # 0-/1-D tensors (and use_muon=False groups) take the built-in AdamW rule
    adam_first_moment=False,  # momentum_buffer is an EMA with mu = momentum (no betas)
    moments=1,  # matrices: momentum_buffer (4 B/param); AdamW-rule tensors: exp_avg + exp_avg_sq
)
register(
    SWAN,
    paper="Ma, Gong, Scetbon & Meeds, SWAN: SGD with Normalization and Whitening Enables Stateless LLM Training, ICML 2025 (arXiv 2412.13148)",
    family="matrix",
    aliases=(),  # "swan" is the name itself
    compile=False,  # eager only
    matrix_only=False,  # 0-/1-D tensors (and use_muon=False groups) take the built-in AdamW rule
    adam_first_moment=False,  # the matrices are stateless; exp_avg exists only for the AdamW-rule tensors
    moments=0,  # matrices: no state (0 B/param); AdamW-rule tensors keep exp_avg + exp_avg_sq
    weight_decay_matters=False,  # the paper trains without weight decay
)
register(
    Conda,
    paper="Wang et al., Conda: Column-Normalized Adam for Training Large Language Models Faster (arXiv 2509.24218, 2025)",
    family="matrix",
    aliases=(),  # "conda" is the name itself
    compile=False,  # eager only: the per-matrix SVD refresh and rotations dominate
    matrix_only=False,  # 0-/1-D tensors (and use_muon=False groups) take the built-in AdamW rule
    # exp_avg is Adam's EMA of g (betas[0]) in the parameter's own basis for matrices and AdamW tensors alike
    adam_first_moment=True,
    # matrices: exp_avg + exp_avg_sq (parameter-sized) + a k x k projector, k = min(m, n); AdamW tensors: 2 moments
    moments=2,
)
register(
    SCALE,
    paper="Glentis, Li, Han & Hong, A Minimalist Optimizer Design for LLM Pretraining (arXiv 2506.16659, 2025)",
    family="matrix",
    aliases=(),  # "scale" is the name itself
    compile=False,  # eager only
    matrix_only=False,  # 0-/1-D tensors (and use_muon=False groups) take the built-in AdamW rule
    adam_first_moment=False,  # momentum_buffer (last layer only) is an EMA with `momentum` (no betas)
    moments=0,  # matrices: none, except the last layer's momentum_buffer (4 B/param); AdamW tensors: 2 moments
    weight_decay_matters=False,  # the authors train without weight decay
)
register(
    DropMuon,
    paper="Gruntkowska, Maziane, Qu & Richtárik, Drop-Muon: Update Less, Converge Faster (arXiv 2510.02239, 2025)",
    family="matrix",
    aliases=("drop_muon",),
    compile=False,  # eager only: Muon's Newton-Schulz matmuls dominate
    matrix_only=False,  # 0-/1-D tensors (and use_muon=False groups) take the built-in AdamW rule
    adam_first_moment=False,  # momentum_buffer is an EMA with mu = momentum (no betas) for the matrices
    moments=1,  # matrices keep momentum_buffer (4 B/param); AdamW-rule tensors keep exp_avg + exp_avg_sq
)
register(
    FISMO,
    paper="Xu, Yan & Zhang, FISMO: Fisher-Structured Momentum-Orthogonalized Optimizer (arXiv 2601.21750, 2026)",
    family="matrix",
    aliases=(),  # "fismo" is the name itself
    compile=False,  # eager only: eigendecompositions and Newton-Schulz per step
    matrix_only=False,  # 0-/1-D tensors (and use_muon=False groups) take the built-in AdamW rule
    adam_first_moment=False,  # momentum_buffer is an EMA (with momentum) of the whitened gradient
    moments=1,  # matrices: momentum_buffer (4 B/param) + factors P (m x m), Q (n x n); AdamW-rule tensors: 2 moments
)
# low-rank projected state
register(
    GaLore,
    paper="Zhao et al., GaLore: Memory-Efficient LLM Training by Gradient Low-Rank Projection, ICML 2024 (arXiv 2403.03507)",
    family="low-rank",
    aliases=(),  # "galore" is the name itself
    compile=False,  # eager only: the per-matrix projections and the SVD refresh dominate
    # exp_avg is Adam's EMA, but of the projected R (r x n or m x r), not in the parameter's shape
    adam_first_moment=False,  # (the default, kept explicit: see above)
    # AdamW fallback's 2 parameter-sized moments; a projected m x n matrix keeps 2*r*n + m*r floats (left)
    # or 2*m*r + n*r (right), r = min(rank, m, n) (GaLore docstring)
    moments=2,
)
register(
    NaturalGaLore,
    paper="Das, Natural GaLore: Accelerating GaLore for memory-efficient LLM Training and Fine-tuning, 2024 (arXiv 2410.16029)",
    family="low-rank",
    aliases=("natural_galore",),
    compile=False,  # eager only: per-matrix projections, the SVD refresh and an s x s Cholesky per matrix
    adam_first_moment=False,  # exp_avg is the EMA of the natural gradient of R, in R's shape
    # AdamW fallback's 2 moments; a projected m x n matrix keeps (2 + s)*r*n + m*r floats (left) or
    # (2 + s)*m*r + n*r (right), r = min(rank, m, n), s = natural_history (NaturalGaLore docstring)
    moments=2,
)
register(
    Fira,
    paper="Chen et al., Fira: Can We Achieve Full-rank Training of LLMs Under Low-rank Constraint?, 2024 (arXiv 2410.01623)",
    family="low-rank",
    aliases=(),  # "fira" is the name itself
    compile=False,  # eager only: per-matrix projections and the SVD refresh dominate
    adam_first_moment=False,  # exp_avg is Adam's EMA of the projected R, not in the parameter's shape
    # AdamW fallback's 2 moments; a projected m x n matrix keeps 2*r*n + m*r + 1 floats (left) or
    # 2*m*r + n*r + 1 (right), r = min(rank, m, n) (Fira docstring)
    moments=2,
)
register(
    APOLLO,
    paper="Zhu et al., APOLLO: SGD-like Memory, AdamW-level Performance, MLSys 2025 (arXiv 2412.05270)",
    family="low-rank",
    aliases=(),  # "apollo" is the name itself
    compile=False,  # eager only: per-matrix projections and norms dominate
    adam_first_moment=False,  # exp_avg is Adam's EMA of the projected R (m x r or r x n), not of g
    # AdamW fallback's 2 parameter-sized moments; a projected m x n matrix keeps 2*m*r + n*r + 1 floats
    # (right) or 2*r*n + m*r + 1 (left), r = min(rank, m, n) (APOLLO docstring)
    moments=2,
)
register(
    APOLLOMini,
    name="APOLLO-Mini",
    paper="Zhu et al., APOLLO: SGD-like Memory, AdamW-level Performance, MLSys 2025 (arXiv 2412.05270), rank-1 tensor-wise variant",
    family="low-rank",
    aliases=("apollo_mini", "apollomini"),
    compile=False,  # eager only
    adam_first_moment=False,  # as APOLLO: exp_avg is the EMA of the rank-1 projection
    # AdamW fallback's 2 moments; a projected m x n matrix keeps 2*m + n + 1 floats (right) or 2*n + m + 1 (left)
    moments=2,
)
register(
    FRUGAL,
    paper="Zmushko et al., FRUGAL: Memory-Efficient Optimization by Reducing State Overhead for Scalable Training, ICML 2025 (arXiv 2411.07837)",
    family="low-rank",
    aliases=(),  # "frugal" is the name itself
    compile=False,  # eager only: per-matrix subspace steps
    adam_first_moment=False,  # exp_avg exists only for the state-full part (full shape for an active block)
    # AdamW fallback's 2 moments; a 2-D matrix keeps 2 moments only in its state-full part: on average
    # 8*density bytes/entry (block, columns) or 4*(2*m*r + n*r) bytes, r = round(density*n) (svd/random, right)
    moments=2,
)
# low-bit weights (no full-precision master copy)
register(
    ECO,
    paper="Nikdan, Zandieh, Alistarh & Mirrokni, ECO: Quantized Training without Full-Precision Master Weights (arXiv 2601.22101, 2026)",
    family="low-bit",  # new family: weights kept on an int8/int4/fp8 grid, error fed back into the momentum
    aliases=("eco_adamw",),  # "eco" is the name itself
    compile=False,  # eager only: the per-row quantization and its seeded rounding draws run per tensor
    state_bits_8=False,  # the moments stay fp32 (the paper's); the weights are what is low-bit
    # exp_avg is Adam's EMA plus the injected quantization error (b1/lr)(1 - 1/b1) D e: not the plain EMA
    adam_first_moment=False,
)
# communication-compressed (DDP)
register(
    OneBitAdam,
    paper="Tang et al., 1-bit Adam: Communication Efficient Large-Scale Training with Adam's Convergence Speed, ICML 2021 (arXiv 2102.02888)",
    family="adam",
    aliases=("onebit_adam", "one_bit_adam", "1bit_adam"),
    compile=False,  # (the default) eager only: after the warm-up the step is a compressed all-reduce
    # m is Adam's EMA during the warm-up only; afterwards exp_avg is replaced by the all-gathered
    # decompressed average, not this rank's EMA of g
    adam_first_moment=False,  # (the default, kept explicit: see above)
    moments=2,  # exp_avg + exp_avg_sq; after freeze_step also worker_error (n) + server_error (n/W) floats
)
# Reference baselines (not ours: the fault contract does not cover them, the bench and examples use them).
register(
    torch.optim.AdamW,
    paper="Loshchilov & Hutter, Decoupled Weight Decay Regularization, ICLR 2019",
    family="adam",
    ours=False,
    first_moment="exp_avg",
    second_moment_like_grad_sq=True,
    adam_first_moment=True,
    moments=2,
)
