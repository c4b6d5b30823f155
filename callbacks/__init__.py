"""Lightning callbacks for training stability that work with the optimizer you already use.

- :class:`SpikeAwareClipping`: SPAM's element-wise clip of g against the optimizer's own second moment.
- :class:`MomentumReset`: SPAM's periodic moment reset with a cosine learning-rate warm-up.
- :class:`SpikeGuard`: z-score spike detection (gradient norm and/or loss) acting on the spiking step:
  reset, skip, clip or stop.
- :class:`AdaptiveMomentum`: the adaptive-memory-momentum coefficient for SGD/Adam-type optimizers.
- :class:`QuantizationAwareTraining`: fake-quant QAT of the Linear weights (int8/int4/fp8, STE) from any
  step, with a moment reset and warm-up at its start; :class:`QuantizationMonitor`: per-layer quantization
  error, MMR and kurtosis under ``quant/``.
- Numerical-stability monitors: :class:`SoftmaxCollapseMonitor` (softmax collapse share, optional
  StableMax/⊥Grad switch), :class:`PerpendicularGrad` (the ⊥Grad transform as a pipeline stage),
  :class:`OpposingSignals` (groups of samples whose losses move in opposite directions),
  :class:`TrainingRegime` (chaotic/transition/stable from activation cosines).
- :class:`HessianEstimator`: the Hessian-vector products (AdaHessian, SophiaH) or the Gauss-Newton-Bartlett
  estimate (SophiaG) on the steps the optimizer asks for, inside Lightning's automatic optimization.
- :class:`AdaptiveBatchSize`: AdAdaGrad's norm test on the micro-batch gradients grows the effective batch
  through ``accumulate_grad_batches``.
- :class:`OneBitAdamDDP`: installs :class:`lightning_optim.OneBitAdam`'s DDP communication hook, so only
  its 1-bit momentum exchange is communicated after the warm-up.
- :class:`LRSafetyRadius`: the softmax safety ratio r = τ/ρ_a of each update (monitor) and a controller
  that shrinks updates with r > target (control), for any optimizer.

The spike, reset, momentum and QAT callbacks share one per-optimizer pipeline, so their combined effect
does not depend on their order in ``Trainer(callbacks=[...])``. All of them keep decisions on the device
(no host sync per step), take the same decision on every rank, save their state in checkpoints and log
under ``stability/`` (``quant/``) on logging steps only. :class:`StabilityDashboard` (added by any of them
when a TensorBoardLogger is attached) writes TensorBoard's custom-scalars page for their tags. Moments are read and reset through :mod:`lightning_optim.state_adapters`.
"""

from lightning_optim.callbacks.adaptive_batch_size import AdaptiveBatchSize
from lightning_optim.callbacks.adaptive_momentum import AdaptiveMomentum
from lightning_optim.callbacks.dashboard import StabilityDashboard
from lightning_optim.callbacks.hessian_estimator import HessianEstimator
from lightning_optim.callbacks.lr_safety import LRSafetyRadius
from lightning_optim.callbacks.momentum_reset import MomentumReset
from lightning_optim.callbacks.onebit_ddp import OneBitAdamDDP
from lightning_optim.callbacks.opposing_signals import OpposingSignals
from lightning_optim.callbacks.perpendicular_grad import PerpendicularGrad
from lightning_optim.callbacks.qat import QuantizationAwareTraining
from lightning_optim.callbacks.quant_monitor import QuantizationMonitor
from lightning_optim.callbacks.softmax_collapse import SoftmaxCollapseMonitor
from lightning_optim.callbacks.spike_clipping import SpikeAwareClipping
from lightning_optim.callbacks.spike_guard import SpikeGuard
from lightning_optim.callbacks.training_regime import TrainingRegime

__all__ = [
    "AdaptiveBatchSize",
    "AdaptiveMomentum",
    "HessianEstimator",
    "LRSafetyRadius",
    "MomentumReset",
    "OneBitAdamDDP",
    "OpposingSignals",
    "PerpendicularGrad",
    "QuantizationAwareTraining",
    "QuantizationMonitor",
    "SoftmaxCollapseMonitor",
    "SpikeAwareClipping",
    "SpikeGuard",
    "StabilityDashboard",
    "TrainingRegime",
]
