"""param_groups(): selectors, rules, errors, and the LightningCLI `param_groups` section."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import nn

from lightning_optim import SPAM, ParamGroups, param_groups


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


def no_embedding() -> nn.Module:
    """Biases and a norm, but no embedding."""
    return nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4))


def decay_split(model: nn.Module, groups: list[dict]) -> tuple[set[str], set[str]]:
    """Names of the parameters with and without weight decay."""
    decay = {n for g in groups if "weight_decay" not in g for n in names(model, g)}
    no_decay = {n for g in groups if g.get("weight_decay") == 0.0 for n in names(model, g)}
    return decay, no_decay


@pytest.mark.parametrize(
    ("model", "kwargs", "match"),
    [
        (no_embedding, {"no_weight_decay": ["embedding"]}, r"'embedding' in no_weight_decay.*nn\.Embedding"),
        (no_embedding, {"no_weight_decay": ["bias", "norm", "1d", "embedding"]}, r"'embedding' in no_weight_decay"),
        (lambda: nn.Linear(4, 4, bias=False), {"no_weight_decay": ["bias", "norm"]}, r"'bias' in no_weight_decay"),
        (
            lambda: nn.Sequential(nn.Embedding(5, 4), nn.Linear(4, 4)),
            {"groups": [{"params": "norm", "lr": 1e-4}]},
            r"'norm' in groups\[0\]\.params.*normalization layers",
        ),
        (
            no_embedding,
            {"groups": [{"params": "1d", "lr": 1.0}, {"params": ["0.*", "embedding"], "lr": 2.0}]},
            r"'embedding' in groups\[1\]\.params",
        ),
    ],
    ids=["embedding", "embedding_among_others", "bias", "norm_in_rule", "embedding_in_second_rule"],
)
def test_named_selector_matching_nothing_is_an_error(
    model: Callable[[], nn.Module], kwargs: dict, match: str
) -> None:
    with pytest.raises(ValueError, match=match):
        param_groups(model(), **kwargs)


def test_named_selector_matching_only_frozen_parameters_is_an_error() -> None:
    model = nn.Sequential(nn.Embedding(5, 4), nn.Linear(4, 4))
    model[0].requires_grad_(False)
    with pytest.raises(ValueError, match="'embedding' in no_weight_decay: it matches no trainable parameter"):
        param_groups(model, no_weight_decay=["embedding"])


def test_default_selectors_apply_if_present() -> None:
    model = no_embedding()
    expected = ({"0.weight"}, {"0.bias", "1.weight", "1.bias"})
    assert decay_split(model, param_groups(model)) == expected
    # the default spelled out (the only way to ask for it in YAML), in any order, is still "if present"
    assert decay_split(model, param_groups(model, no_weight_decay=["embedding", "norm", "bias"])) == expected
    assert decay_split(model, ParamGroups(no_weight_decay=["bias", "norm", "embedding"]).build(model)) == expected
    bare = nn.Linear(4, 4, bias=False)  # none of bias, norm, embedding
    assert [names(bare, g) for g in param_groups(bare)] == [{"weight"}]
    assert "weight_decay" not in param_groups(bare)[0]


def test_shadowed_rule_is_an_error() -> None:
    with pytest.raises(
        ValueError, match=r"groups\[1\] \(params 'lm_head\.\*'\): it is shadowed by groups\[0\] \(params '\*'\)"
    ):
        param_groups(Tiny(), groups=[{"params": "*", "lr": 1}, {"params": "lm_head.*", "lr": 2}])
    # one dead selector in a rule with several is named too
    with pytest.raises(ValueError, match=r"groups\[1\] \(params \['bias', 'lm_head\.\*'\]\).*groups\[0\].*'bias'"):
        param_groups(Tiny(), groups=[{"params": "1d", "lr": 1}, {"params": ["bias", "lm_head.*"], "lr": 2}])
    # shadowed by several earlier rules together
    rules = [{"params": "proj.weight", "lr": 1}, {"params": "lm_head.*", "lr": 2}, {"params": "[pl]*.weight", "lr": 3}]
    by_both = r"groups\[2\].*shadowed by groups\[0\] \(params 'proj\.weight'\), groups\[1\] "
    with pytest.raises(ValueError, match=by_both):
        param_groups(Tiny(), no_weight_decay=[], groups=rules)


def test_overlapping_rules_that_still_match_are_fine() -> None:
    model = Tiny()
    rules = [{"params": "lm_head.*", "lr": 2}, {"params": "*", "lr": 1}]  # a catch-all last still matches
    groups = param_groups(model, no_weight_decay=[], groups=rules)
    assert {frozenset(names(model, g)): g["lr"] for g in groups}[frozenset({"lm_head.weight"})] == 2
    assert sorted(g["lr"] for g in groups) == [1, 2]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"groups": [{"params": 5}]}, r"groups\[0\]\.params: 5\. Expected a selector string .* list or tuple"),
        ({"groups": [{"params": ["bias", 3]}]}, r"groups\[0\]\.params: \['bias', 3\]\. Expected"),
        ({"groups": [{"params": "bias"}, {"params": None}]}, r"groups\[1\]\.params: None\. Expected"),
        ({"groups": {"params": "bias"}}, r"Invalid groups: \{'params': 'bias'\}\. Expected a list or tuple of rules"),
        ({"groups": "bias"}, r"Invalid groups: 'bias'\. Expected a list or tuple"),
        ({"groups": ["bias"]}, r"Invalid groups\[0\]: 'bias'\. Each rule must be a mapping"),
        ({"groups": [{"params": "bias", 1: 0.1}]}, r"groups\[0\]: option keys must be strings .* got \[1\]"),
        ({"no_weight_decay": 5}, r"Invalid no_weight_decay: 5\. Expected a selector string"),
        ({"no_weight_decay": ["bias", 1]}, r"Invalid no_weight_decay: \['bias', 1\]\. Expected"),
        ({"no_weight_decay": None}, r"Invalid no_weight_decay: None\. Expected"),
    ],
    ids=["params_int", "params_list_with_int", "params_none", "groups_mapping", "groups_str", "rule_str",
         "option_key_int", "nwd_int", "nwd_list_with_int", "nwd_none"],
)
def test_wrong_types_are_errors_that_name_the_entry(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        param_groups(Tiny(), **kwargs)


def test_bare_string_is_one_selector() -> None:
    model = Tiny()
    as_list = decay_split(model, param_groups(model, no_weight_decay=["bias"]))
    assert decay_split(model, param_groups(model, no_weight_decay="bias")) == as_list
    assert decay_split(model, ParamGroups(no_weight_decay="bias").build(model)) == as_list
    assert as_list[1] == {"proj.bias", "norm.bias", "bn.bias"}
    with pytest.raises(ValueError, match="'biass' in no_weight_decay"):  # the whole string, not 'b'
        param_groups(model, no_weight_decay="biass")
    groups = param_groups(model, no_weight_decay=[], groups=[{"params": "lm_head.*", "lr": 2}])
    assert [names(model, g) for g in groups if g.get("lr") == 2] == [{"lm_head.weight"}]


def test_yaml_bare_string_no_weight_decay() -> None:
    from lightning_optim.cli import LightningOptimCLI

    boring = [
        "--model", "lightning.pytorch.demos.boring_classes.BoringModel",
        "--data", "lightning.pytorch.demos.boring_classes.BoringDataModule",
        "--trainer.logger", "false", "--trainer.enable_checkpointing", "false",
        "--optimizer", "torch.optim.AdamW", "--optimizer.weight_decay", "0.1",
    ]
    cli = LightningOptimCLI(args=[*boring, "--param_groups.no_weight_decay", "bias"], run=False)
    optimizer = cli.model.configure_optimizers()
    optimizer = optimizer[0][0] if isinstance(optimizer, tuple) else optimizer
    by_decay = {g["weight_decay"]: g["params"] for g in optimizer.param_groups}
    assert by_decay == {0.1: [cli.model.layer.weight], 0.0: [cli.model.layer.bias]}
