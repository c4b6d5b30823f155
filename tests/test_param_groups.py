"""param_groups(): selectors, rules, errors, and the LightningCLI `param_groups` section."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_optim import SPAM, param_groups


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 8)
        self.proj = nn.Linear(8, 8)
        self.norm = nn.LayerNorm(8)
        self.bn = nn.BatchNorm1d(8)
        self.lm_head = nn.Linear(8, 10, bias=False)
        self.frozen = nn.Linear(2, 2)
        self.frozen.requires_grad_(False)


def names(model: nn.Module, group: dict) -> set[str]:
    lookup = {id(p): n for n, p in model.named_parameters()}
    return {lookup[id(p)] for p in group["params"]}


def test_default_selectors_keep_decay_off_bias_norm_embedding() -> None:
    model = Tiny()
    groups = param_groups(model)
    assert len(groups) == 2
    decay, no_decay = groups if "weight_decay" not in groups[0] else groups[::-1]
    assert names(model, decay) == {"proj.weight", "lm_head.weight"}
    assert names(model, no_decay) == {"embed.weight", "proj.bias", "norm.weight", "norm.bias", "bn.weight", "bn.bias"}
    assert no_decay["weight_decay"] == 0.0 and "weight_decay" not in decay
    # frozen parameters are left out; every trainable parameter appears exactly once
    listed = [n for g in groups for n in names(model, g)]
    assert sorted(listed) == sorted(n for n, p in model.named_parameters() if p.requires_grad)


def test_rules_globs_and_merging() -> None:
    model = Tiny()
    groups = param_groups(model, no_weight_decay=["1d"], groups=[{"params": ["lm_head.*", "embed.*"], "lr": 1e-4}])
    by_names = {frozenset(names(model, g)): {k: v for k, v in g.items() if k != "params"} for g in groups}
    assert by_names[frozenset({"lm_head.weight", "embed.weight"})] == {"lr": 1e-4}
    assert by_names[frozenset({"proj.weight"})] == {}
    assert by_names[frozenset({"proj.bias", "norm.weight", "norm.bias", "bn.weight", "bn.bias"})] == {"weight_decay": 0.0}


def test_groups_work_with_any_optimizer() -> None:
    model = Tiny()
    for opt in (torch.optim.AdamW(param_groups(model), lr=1e-3, weight_decay=0.1), SPAM(param_groups(model), weight_decay=0.1)):
        assert sorted(g["weight_decay"] for g in opt.param_groups) == [0.0, 0.1]


def test_errors_name_the_problem() -> None:
    with pytest.raises(ValueError, match="'head.*'"):
        param_groups(Tiny(), groups=[{"params": "head.*", "lr": 1.0}])
    with pytest.raises(ValueError, match="needs a 'params'"):
        param_groups(Tiny(), groups=[{"lr": 1.0}])
