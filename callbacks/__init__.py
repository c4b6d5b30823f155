"""Lightning callbacks that add stability mechanics to any optimizer (``lightning_optim.callbacks``).

The spike-stability callbacks (SpikeAwareClipping, MomentumReset, SpikeGuard, AdaptiveMomentum) and the
learning-rate safety-radius callback are specified in ``shared/specs`` and land in follow-up issues.
"""

__all__: list[str] = []
