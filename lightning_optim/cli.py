"""``lightning-optim`` command line: LightningCLI with our optimizers, callbacks and YAML param groups.

    lightning-optim fit --config examples/configs/gpt_spam.yaml
    python -m lightning_optim fit --model lightning_optim.examples.digits.DigitsClassifier --optimizer SPAM

Every ``torch.optim.Optimizer`` works by ``class_path``; once this package is imported our optimizers and
callbacks also resolve by short name (``optimizer: SPAM``). The extra top-level section ``param_groups``
(:class:`~lightning_optim.param_groups.ParamGroups`) splits the model's parameters for any optimizer.
"""

from __future__ import annotations

import sys
from functools import partial, update_wrapper
from types import MethodType
from typing import Any

from lightning.pytorch.cli import ArgsType, LightningArgumentParser, LightningCLI, instantiate_class

import lightning_optim.callbacks  # noqa: F401  (imports the callbacks, so they resolve by short name)
from lightning_optim import registry
from lightning_optim.param_groups import ParamGroups

__all__ = ["LightningOptimCLI", "main"]


class LightningOptimCLI(LightningCLI):
    """LightningCLI with a ``param_groups`` section and defaults that suit experiments.

    Model and data are given by class path (``subclass_mode_model=True``, ``subclass_mode_data=True``) so one
    command serves every LightningModule, and the saved ``config.yaml`` may be overwritten on reruns. All
    other LightningCLI arguments pass through.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("subclass_mode_model", True)
        kwargs.setdefault("subclass_mode_data", True)
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        super().__init__(*args, **kwargs)

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_class_arguments(ParamGroups, "param_groups", instantiate=True)

    def _section(self, key: str) -> Any:
        config = self.config_init[self.subcommand] if self.subcommand else self.config_init
        return config.get(key)

    def instantiate_classes(self) -> None:
        super().instantiate_classes()
        groups: ParamGroups | None = self._section("param_groups")
        if groups is None or not groups.enabled:
            return
        optimizer_init = self._section("optimizer")
        if not optimizer_init:
            raise ValueError(
                "param_groups needs an `optimizer:` section in the config (e.g. `optimizer: {class_path: "
                "torch.optim.AdamW}`): it rebuilds that optimizer over the grouped parameters."
            )
        # LightningCLI built the optimizer over model.parameters(); rebuild it over the groups (it holds no
        # state yet, so nothing is lost).
        optimizer = instantiate_class(groups.build(self.model), optimizer_init)
        scheduler_init = self._section("lr_scheduler")
        scheduler = instantiate_class(optimizer, scheduler_init) if scheduler_init else None
        fn = partial(self.configure_optimizers, optimizer=optimizer, lr_scheduler=scheduler)
        update_wrapper(fn, self.configure_optimizers)  # Lightning's is_overridden looks at the wrapper
        self.model.configure_optimizers = MethodType(fn, self.model)


def main(args: ArgsType = None) -> None:
    """Entry point of the ``lightning-optim`` console script and ``python -m lightning_optim``.

    ``lightning-optim optimizers`` prints the registry (names, families, defaults, capabilities); every
    other subcommand goes to LightningCLI, where each registered optimizer resolves by its short name
    because the registry imported its class.
    """
    argv = list(sys.argv[1:] if args is None else args) if not isinstance(args, dict) else None
    if argv and argv[0] == "optimizers":
        print(registry.table())
        return
    LightningOptimCLI(args=args)


if __name__ == "__main__":
    main()
