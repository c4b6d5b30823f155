"""Parameter groups for any optimizer, from Python or LightningCLI YAML.

The usual need is to keep weight decay off biases, normalization weights and embeddings; LightningCLI only
passes ``model.parameters()`` to the optimizer (Lightning issue 20743). :func:`param_groups` builds torch
param-group dicts from short selectors, so it works with every ``torch.optim.Optimizer`` (ours, torch's,
bitsandbytes', ...) that accepts per-group options.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

__all__ = ["param_groups", "ParamGroups", "SELECTORS"]

_NORM_TYPES: tuple[type[nn.Module], ...] = (
    nn.modules.batchnorm._NormBase,
    nn.GroupNorm,
    nn.LayerNorm,
    nn.LocalResponseNorm,
    nn.RMSNorm,
)

#: Named selectors; any other string is a glob over qualified parameter names (``fnmatch``).
SELECTORS: dict[str, str] = {
    "bias": "parameters named 'bias'",
    "norm": "parameters of normalization layers (BatchNorm, LayerNorm, GroupNorm, RMSNorm, or any module "
    "whose class name ends in 'Norm')",
    "embedding": "parameters of nn.Embedding / nn.EmbeddingBag",
    "1d": "parameters with at most one dimension (biases, norm scales, scalars)",
}


def _owners(module: nn.Module) -> dict[str, nn.Module]:
    """Map each qualified parameter name to the module that owns it."""
    return {
        f"{prefix}.{name}" if prefix else name: mod
        for prefix, mod in module.named_modules()
        for name, _ in mod.named_parameters(recurse=False)
    }


def _matches(selector: str, name: str, param: torch.Tensor, owner: nn.Module) -> bool:
    if selector == "bias":
        return name.rsplit(".", 1)[-1] == "bias"
    if selector == "norm":
        return isinstance(owner, _NORM_TYPES) or type(owner).__name__.endswith("Norm")
    if selector == "embedding":
        return isinstance(owner, (nn.Embedding, nn.EmbeddingBag))
    if selector == "1d":
        return param.ndim <= 1
    return fnmatch.fnmatchcase(name, selector)


def param_groups(
    module: nn.Module,
    no_weight_decay: Sequence[str] = ("bias", "norm", "embedding"),
    groups: Sequence[Mapping[str, Any]] = (),
) -> list[dict[str, Any]]:
    """Split ``module``'s trainable parameters into torch param groups.

    Args:
        module: the model (a LightningModule or any ``nn.Module``).
        no_weight_decay: selectors of parameters that get ``weight_decay=0.0``. Named selectors are listed
            in :data:`SELECTORS` (``bias``, ``norm``, ``embedding``, ``1d``); any other string is a glob over
            qualified parameter names, e.g. ``"lm_head.*"``.
        groups: extra rules, each a mapping with ``params`` (a selector or a list of selectors) and the
            options for those parameters, e.g. ``{"params": "lm_head.*", "lr": 1e-4}``. The first rule
            that matches a parameter wins; options not given fall back to the optimizer's defaults.

    Returns:
        Param-group dicts in a deterministic order; parameters with identical options share a group.
        Parameters with ``requires_grad=False`` are left out.

    Raises:
        ValueError: a rule without ``params``, or a glob selector that matches no trainable parameter.
    """
    owners = _owners(module)
    named = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
    rules = []
    for i, rule in enumerate(groups):
        if "params" not in rule:
            raise ValueError(f"Invalid groups[{i}]: {dict(rule)!r}; each rule needs a 'params' selector.")
        selectors = [rule["params"]] if isinstance(rule["params"], str) else list(rule["params"])
        rules.append((selectors, {k: v for k, v in rule.items() if k != "params"}))
    every_selector = list(no_weight_decay) + [s for selectors, _ in rules for s in selectors]
    for selector in every_selector:
        if selector not in SELECTORS and not any(fnmatch.fnmatchcase(n, selector) for n, _ in named):
            raise ValueError(
                f"Invalid param-group selector {selector!r}: it matches no trainable parameter. Named selectors: "
                f"{sorted(SELECTORS)}; other strings are globs over names such as {[n for n, _ in named[:4]]}."
            )

    buckets: dict[tuple, dict[str, Any]] = {}
    for name, param in named:
        owner = owners[name]
        options: dict[str, Any] = {}
        for selectors, rule_options in rules:
            if any(_matches(s, name, param, owner) for s in selectors):
                options = dict(rule_options)
                break
        if any(_matches(s, name, param, owner) for s in no_weight_decay):
            options["weight_decay"] = 0.0
        key = tuple(sorted((k, repr(v)) for k, v in options.items()))
        buckets.setdefault(key, {"params": [], **options})["params"].append(param)
    return list(buckets.values())


@dataclass
class ParamGroups:
    """LightningCLI section ``param_groups``: how to split the model's parameters for the optimizer.

    Example (YAML)::

        param_groups:
          no_weight_decay: [bias, norm, embedding]
          groups:
            - {params: "lm_head.*", lr: 1.0e-4}

    Leaving both fields empty keeps Lightning's default, ``model.parameters()`` in one group.
    """

    no_weight_decay: list[str] = field(default_factory=list)
    groups: list[dict[str, Any]] = field(default_factory=list)

    @property
    def enabled(self) -> bool:
        return bool(self.no_weight_decay or self.groups)

    def build(self, module: nn.Module) -> list[dict[str, Any]]:
        return param_groups(module, self.no_weight_decay, self.groups)
