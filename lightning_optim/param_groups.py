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

__all__ = ["param_groups", "ParamGroups", "SELECTORS", "DEFAULT_NO_WEIGHT_DECAY"]

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

#: The default ``no_weight_decay``; these selectors apply "if present" (see :func:`param_groups`).
DEFAULT_NO_WEIGHT_DECAY: tuple[str, ...] = ("bias", "norm", "embedding")


def _owners(module: nn.Module) -> dict[str, nn.Module]:
    """Map each qualified parameter name to the module that owns it."""
    return {
        f"{prefix}.{name}" if prefix else name: mod
        for prefix, mod in module.named_modules()
        for name, _ in mod.named_parameters(recurse=False)
    }


def _matches(selector: str, name: str, param: torch.Tensor, owner: nn.Module) -> bool:
    """Whether ``selector`` (a named selector or a glob) selects parameter ``name``, owned by ``owner``."""
    if selector == "bias":
        return name.rsplit(".", 1)[-1] == "bias"
    if selector == "norm":
        return isinstance(owner, _NORM_TYPES) or type(owner).__name__.endswith("Norm")
    if selector == "embedding":
        return isinstance(owner, (nn.Embedding, nn.EmbeddingBag))
    if selector == "1d":
        return param.ndim <= 1
    return fnmatch.fnmatchcase(name, selector)


@dataclass(frozen=True)
class _Rule:
    """One validated entry of ``groups``: its index, its selectors and the options it sets."""

    index: int
    selectors: tuple[str, ...]
    options: dict[str, Any]

    def describe(self) -> str:
        """``groups[i] (params ...)``, as the rule appears in error messages."""
        params = self.selectors[0] if len(self.selectors) == 1 else list(self.selectors)
        return f"groups[{self.index}] (params {params!r})"


def _is_sequence(value: Any) -> bool:
    """Whether ``value`` is a list, tuple or other sequence that is not a string."""
    return isinstance(value, Sequence) and not isinstance(value, (str, bytes))


def _as_selectors(value: Any, where: str) -> tuple[str, ...]:
    """Validate a selector or a sequence of selectors; a bare string is one selector, not its characters."""
    if isinstance(value, str):
        return (value,)
    if _is_sequence(value) and all(isinstance(s, str) for s in value):
        return tuple(value)
    raise ValueError(
        f"Invalid {where}: {value!r}. Expected a selector string (e.g. 'bias' or 'lm_head.*') or a list or "
        "tuple of selector strings (e.g. ['bias', 'norm'])."
    )


def _parse_rule(index: int, rule: Any) -> _Rule:
    """Validate ``groups[index]`` and split it into selectors and options."""
    if not isinstance(rule, Mapping):
        raise ValueError(
            f"Invalid groups[{index}]: {rule!r}. Each rule must be a mapping such as "
            "{'params': 'lm_head.*', 'lr': 1e-4}."
        )
    if "params" not in rule:
        raise ValueError(f"Invalid groups[{index}]: {dict(rule)!r}; each rule needs a 'params' selector.")
    selectors = _as_selectors(rule["params"], f"groups[{index}].params")
    options = {key: value for key, value in rule.items() if key != "params"}
    bad_keys = [key for key in options if not isinstance(key, str)]
    if bad_keys:
        raise ValueError(
            f"Invalid groups[{index}]: option keys must be strings (optimizer options such as 'lr'), "
            f"got {bad_keys!r}."
        )
    return _Rule(index, selectors, options)


def _parse_rules(groups: Any) -> list[_Rule]:
    """Validate ``groups`` (a sequence of mappings) and parse each rule."""
    if not _is_sequence(groups):
        raise ValueError(
            f"Invalid groups: {groups!r}. Expected a list or tuple of rules, each a mapping such as "
            "{'params': 'lm_head.*', 'lr': 1e-4}."
        )
    return [_parse_rule(i, rule) for i, rule in enumerate(groups)]


def _select(
    selectors: Sequence[str], named: Sequence[tuple[str, torch.Tensor]], owners: Mapping[str, nn.Module]
) -> dict[str, list[str]]:
    """Map each selector to the names of the trainable parameters it selects, in module order."""
    return {
        selector: [name for name, param in named if _matches(selector, name, param, owners[name])]
        for selector in selectors
    }


def _check_selects(
    selectors: Sequence[str], where: str, selected: Mapping[str, list[str]], examples: Sequence[str]
) -> None:
    """Raise if one of ``selectors`` (given in ``where``) selects no trainable parameter.

    ``examples`` are a few parameter names, quoted in the message to show what a glob runs over.
    """
    for selector in selectors:
        if selected[selector]:
            continue
        if selector in SELECTORS:
            hint = f"{selector!r} selects {SELECTORS[selector]}. Remove it if the model has none"
        else:
            hint = f"Named selectors: {sorted(SELECTORS)}; other strings are globs over names such as {list(examples)}"
        raise ValueError(
            f"Invalid param-group selector {selector!r} in {where}: it matches no trainable parameter. {hint}."
        )


def _first_rules(rules: Sequence[_Rule], selected: Mapping[str, list[str]]) -> dict[str, _Rule]:
    """Map each parameter name to the first rule that selects it (the first matching rule wins)."""
    first: dict[str, _Rule] = {}
    for rule in rules:
        for selector in rule.selectors:
            for name in selected[selector]:
                first.setdefault(name, rule)
    return first


def _check_shadowing(
    rules: Sequence[_Rule], selected: Mapping[str, list[str]], first: Mapping[str, _Rule]
) -> None:
    """Raise if a selector of a rule matches only parameters that earlier rules take."""
    for rule in rules:
        for selector in rule.selectors:
            names = selected[selector]
            if not names or any(first[name].index == rule.index for name in names):
                continue
            earlier = {first[name].index: first[name] for name in names}
            by = ", ".join(earlier[i].describe() for i in sorted(earlier))
            raise ValueError(
                f"Invalid {rule.describe()}: it is shadowed by {by}. Its selector {selector!r} matches "
                f"{len(names)} trainable parameter(s), e.g. {names[0]!r}, but earlier rules take all of them "
                f"(the first matching rule wins). Move groups[{rule.index}] up, or narrow the earlier rule."
            )


def _bucket(
    named: Sequence[tuple[str, torch.Tensor]], first: Mapping[str, _Rule], no_decay: set[str]
) -> list[dict[str, Any]]:
    """Group the parameters by their options: the first matching rule's, plus ``weight_decay=0.0``."""
    buckets: dict[tuple, dict[str, Any]] = {}
    for name, param in named:
        options = dict(first[name].options) if name in first else {}
        if name in no_decay:
            options["weight_decay"] = 0.0
        key = tuple(sorted((k, repr(v)) for k, v in options.items()))
        buckets.setdefault(key, {"params": [], **options})["params"].append(param)
    return list(buckets.values())


def param_groups(
    module: nn.Module,
    no_weight_decay: str | Sequence[str] = DEFAULT_NO_WEIGHT_DECAY,
    groups: Sequence[Mapping[str, Any]] = (),
) -> list[dict[str, Any]]:
    """Split ``module``'s trainable parameters into torch param groups.

    Every selector must match at least one trainable parameter, so a typo cannot silently leave weight decay
    on, with one exception: the default selectors ``bias``, ``norm`` and ``embedding`` apply "if present".
    This holds whenever ``no_weight_decay`` is exactly that set (in any order), whether it is left out or
    spelled out as in a LightningCLI YAML (which has no other way to ask for the default), so the default
    works for a model without, say, embeddings. Any other ``no_weight_decay``, e.g. ``["embedding"]`` or
    ``["bias", "norm"]``, is explicit and each of its selectors must match.

    Args:
        module: the model (a LightningModule or any ``nn.Module``).
        no_weight_decay: selectors of parameters that get ``weight_decay=0.0``: a list or tuple of selector
            strings, or one bare selector string (``"bias"`` means ``["bias"]``). Named selectors are listed
            in :data:`SELECTORS` (``bias``, ``norm``, ``embedding``, ``1d``); any other string is a glob over
            qualified parameter names, e.g. ``"lm_head.*"``. Defaults to
            :data:`DEFAULT_NO_WEIGHT_DECAY`, whose selectors need not match (see above).
        groups: extra rules, a list or tuple of mappings, each with ``params`` (a selector string or a list
            or tuple of them) and the options for those parameters (string keys), e.g.
            ``{"params": "lm_head.*", "lr": 1e-4}``. The first rule that matches a parameter wins; options
            not given fall back to the optimizer's defaults. ``no_weight_decay`` applies on top of the rules.

    Returns:
        Param-group dicts in a deterministic order; parameters with identical options share a group.
        Parameters with ``requires_grad=False`` are left out.

    Raises:
        ValueError: ``no_weight_decay``, ``groups``, a rule, its ``params`` or its option keys have the wrong
            type; a rule has no ``params``; a selector (named or glob) matches no trainable parameter,
            except the default selectors as described above; or a rule's selector is shadowed, i.e. every
            parameter it matches is taken by earlier rules. Each message names the offending entry.
    """
    no_decay_selectors = _as_selectors(no_weight_decay, "no_weight_decay")
    rules = _parse_rules(groups)
    owners = _owners(module)
    named = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
    rule_selectors = [s for rule in rules for s in rule.selectors]
    selected = _select(list(dict.fromkeys((*no_decay_selectors, *rule_selectors))), named, owners)

    examples = [name for name, _ in named[:4]]
    if set(no_decay_selectors) != set(DEFAULT_NO_WEIGHT_DECAY):
        _check_selects(no_decay_selectors, "no_weight_decay", selected, examples)
    for rule in rules:
        _check_selects(rule.selectors, f"groups[{rule.index}].params", selected, examples)
    first = _first_rules(rules, selected)
    _check_shadowing(rules, selected, first)

    no_decay = {name for selector in no_decay_selectors for name in selected[selector]}
    return _bucket(named, first, no_decay)


@dataclass
class ParamGroups:
    """LightningCLI section ``param_groups``: how to split the model's parameters for the optimizer.

    Example (YAML)::

        param_groups:
          no_weight_decay: [bias, norm, embedding]
          groups:
            - {params: "lm_head.*", lr: 1.0e-4}

    Leaving both fields empty keeps Lightning's default, ``model.parameters()`` in one group. Writing
    ``no_weight_decay: [bias, norm, embedding]`` asks for :func:`param_groups`' default, whose selectors
    apply "if present"; ``no_weight_decay: bias`` (a bare string) is one selector, like ``[bias]``.

    Args:
        no_weight_decay: selectors whose parameters get ``weight_decay: 0``: the named selectors ``bias``,
            ``norm`` (normalization layers), ``embedding``, ``1d`` (at most one dimension), or a glob over
            qualified parameter names such as ``"blocks.*.attn.*"``.
        groups: extra groups, each ``{params: <selector or list of selectors>, <option>: <value>, ...}``
            (e.g. ``{params: "lm_head.*", lr: 1.0e-4}``); a parameter goes to the first rule that selects it.
    """

    no_weight_decay: list[str] | str = field(default_factory=list)
    groups: list[dict[str, Any]] = field(default_factory=list)

    @property
    def enabled(self) -> bool:
        return bool(self.no_weight_decay or self.groups)

    def build(self, module: nn.Module) -> list[dict[str, Any]]:
        return param_groups(module, self.no_weight_decay, self.groups)
