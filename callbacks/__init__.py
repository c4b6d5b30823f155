"""Lightning callbacks for training stability that work with the optimizer you already use.

- :class:`SpikeAwareClipping`: SPAM's element-wise clip of g against the optimizer's own second moment.
- :class:`MomentumReset`: SPAM's periodic moment reset with a cosine learning-rate warm-up.
- :class:`SpikeGuard`: z-score spike detection (gradient norm and/or loss) acting on the spiking step:
  reset, skip, clip or stop.
- :class:`AdaptiveMomentum`: the adaptive-memory-momentum coefficient for SGD/Adam-type optimizers.

They share one per-optimizer pipeline, so their combined effect does not depend on their order in
``Trainer(callbacks=[...])``; decisions stay on the device (no host sync per step), they take the same
decision on every rank, save their state in checkpoints and log under ``stability/`` every
``log_every_n_steps``. Moments are read and reset through :mod:`lightning_optim.state_adapters`.
"""

from lightning_optim.callbacks.adaptive_momentum import AdaptiveMomentum
from lightning_optim.callbacks.momentum_reset import MomentumReset
from lightning_optim.callbacks.spike_clipping import SpikeAwareClipping
from lightning_optim.callbacks.spike_guard import SpikeGuard

__all__ = ["AdaptiveMomentum", "MomentumReset", "SpikeAwareClipping", "SpikeGuard"]
