"""lightning-optim: a training-stability toolkit for PyTorch Lightning.

Optimizers (usable from ``configure_optimizers`` and from LightningCLI by ``class_path`` or short name):
:class:`SPAM`, :class:`StableSPAM`, :class:`AdaptiveMomentumSGD`, :class:`AdaptiveMomentumAdamW`, the Adam
family (:class:`AdaBelief`, :class:`AdamP`, :class:`EXAdam`, :class:`DualAdam`, :class:`LAMB`, :class:`Lion`,
:class:`SGDSaI`, ...), second-order (:class:`AdaHessian`, :class:`SophiaH`, :class:`SophiaG`), the matrix
family (:class:`Muon`, :class:`NAMO`, :class:`SOAP`, :class:`Conda`, :class:`SCALE`, ...), low-rank and
low-bit state (:class:`GaLore`, :class:`Fira`, :class:`APOLLO`, :class:`FRUGAL`, :class:`ECO`) and
communication-compressed :class:`OneBitAdam` (``state_bits=8`` stores the moments of the elementwise ones
block-wise in 8 bits, see :mod:`lightning_optim.lowbit`).
The registry of optimizers and their capabilities: :func:`optimizers` (``lightning-optim optimizers`` prints
it); the shared math: :mod:`lightning_optim.functional`; validators: :mod:`lightning_optim.validation`.
Parameter groups for any optimizer: :func:`param_groups`. Callbacks live in ``lightning_optim.callbacks``,
pure-torch statistics in ``lightning_optim.monitors``.
"""

from lightning_optim import functional, lowbit, registry, validation
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
from lightning_optim.lowbit import dequantize_blockwise, dynamic_map, quantize_blockwise
from lightning_optim.matrix import matrix_param_groups, split_params
from lightning_optim.muon import Muon
from lightning_optim.namo import NAMO, NAMOD
from lightning_optim.natural_galore import NaturalGaLore
from lightning_optim.onebit_adam import OneBitAdam
from lightning_optim.param_groups import ParamGroups, param_groups
from lightning_optim.polargrad import PolarGrad
from lightning_optim.registry import OptimizerInfo, optimizers
from lightning_optim.scale import SCALE
from lightning_optim.sgd_sai import SGDSaI
from lightning_optim.sinkgd import SinkGD
from lightning_optim.soap import SOAP
from lightning_optim.sophia import SophiaG, SophiaH
from lightning_optim.spam import SPAM
from lightning_optim.stable_spam import StableSPAM
from lightning_optim.state_adapters import StateAdapter, register_state_adapter, state_adapter
from lightning_optim.swan import SWAN

__version__ = "0.1.0"

__all__ = [
    "SPAM",
    "StableSPAM",
    "AdaptiveMomentumSGD",
    "AdaptiveMomentumAdamW",
    "AdaBelief",
    "Lion",
    "LAMB",
    "AdamP",
    "SGDP",
    "EXAdam",
    "DualAdam",
    "SGDSaI",
    "GaLore",
    "SOAP",
    "AdaHessian",
    "SophiaH",
    "SophiaG",
    "Muon",
    "NAMO",
    "NAMOD",
    "SinkGD",
    "AuON",
    "PolarGrad",
    "SWAN",
    "Conda",
    "SCALE",
    "DropMuon",
    "FISMO",
    "NaturalGaLore",
    "Fira",
    "APOLLO",
    "APOLLOMini",
    "FRUGAL",
    "ECO",
    "OneBitAdam",
    "split_params",
    "matrix_param_groups",
    "OptimizerInfo",
    "optimizers",
    "functional",
    "registry",
    "validation",
    "ParamGroups",
    "param_groups",
    "StateAdapter",
    "state_adapter",
    "register_state_adapter",
    "lowbit",
    "dynamic_map",
    "quantize_blockwise",
    "dequantize_blockwise",
    "__version__",
]
