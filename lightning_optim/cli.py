"""``lightning-optim`` command line: LightningCLI with our optimizers, callbacks and YAML param groups.

    lightning-optim fit --config examples/configs/gpt_spam.yaml
    python -m lightning_optim fit --model lightning_optim.examples.digits.DigitsClassifier --optimizer SPAM

Every ``torch.optim.Optimizer`` works by ``class_path``; once this package is imported our optimizers and
callbacks also resolve by short name (``optimizer: SPAM``). The extra top-level section ``param_groups``
(:class:`~lightning_optim.param_groups.ParamGroups`) splits the model's parameters for any optimizer.

Besides LightningCLI's subcommands there are our own tools (``optimizers``, ``compare``, ``report``); they
and ``lightning-optim --help`` never import Lightning, so they start at once. Mistakes in a command line or
a config (an unknown optimizer, a misspelt argument, a hyper-parameter out of range) are reported as one
message with a suggestion and exit code 2, not as a traceback.
"""

from __future__ import annotations

import difflib
import functools
import importlib
import inspect
import re
import sys
from collections.abc import Callable, Sequence
from typing import Any

from lightning_optim.quiet import quiet_lightning

__all__ = ["LightningOptimCLI", "UsageError", "main"]

#: our own subcommands: name -> (module, one-line help); each module has ``main(argv) -> int | None``
TOOLS: dict[str, tuple[str, str]] = {
    "optimizers": ("lightning_optim.cli", "print the registered optimizers: names, defaults, capabilities"),
    "compare": ("lightning_optim.compare", "a fair optimizer comparison (lr sweep, equal budget) on your model"),
    "report": ("lightning_optim.report", "a one-page stability report (PNG + HTML) from TensorBoard event files"),
}
LIGHTNING_SUBCOMMANDS = {
    "fit": "train a model (the usual one)",
    "validate": "one evaluation epoch over the validation set",
    "test": "one evaluation epoch over the test set",
    "predict": "run inference",
}

HELP = f"""usage: lightning-optim [-c CONFIG] {{{",".join([*LIGHTNING_SUBCOMMANDS, *TOOLS])}}} ...

lightning-optim: PyTorch Lightning's LightningCLI with spike-aware optimizers, stability callbacks and
parameter groups from YAML.

Lightning subcommands (`lightning-optim SUBCOMMAND --help` lists every trainer/model/data/optimizer option):
{chr(10).join(f"  {name:<11} {text}" for name, text in LIGHTNING_SUBCOMMANDS.items())}

lightning-optim tools:
{chr(10).join(f"  {name:<11} {text}" for name, (_, text) in TOOLS.items())}

options:
  -h, --help    show this help and exit
  -c, --config  a YAML config (see examples/configs/); later options override it

Optimizers by short name (`--optimizer StableSPAM`, `optimizer: SPAM` in YAML) or class path
(`torch.optim.AdamW`); `lightning-optim optimizers` lists them. Callbacks by class path, e.g.
`lightning_optim.callbacks.SpikeGuard`.

The `param_groups` section splits the model's parameters for any optimizer:
  no_weight_decay: [bias, norm, embedding]   selectors whose parameters get weight_decay 0 (named selectors:
                                             bias, norm, embedding, 1d; any other string is a glob over
                                             parameter names such as "lm_head.*")
  groups: [{{params: "lm_head.*", lr: 1.0e-4}}] extra groups: a selector (or list) plus the options they set

Examples:
  lightning-optim fit --config examples/configs/gpt_spam.yaml
  lightning-optim fit --config examples/configs/gpt_spam.yaml --optimizer StableSPAM --trainer.max_steps 600
  lightning-optim fit --model lightning_optim.examples.digits.DigitsClassifier \\
      --data lightning_optim.examples.digits.DigitsDataModule --optimizer SPAM --optimizer.lr 3e-3
  lightning-optim optimizers
  python examples/gpt.py --optimizer stable_spam     (the scripts: examples/gpt.py, examples/digits.py)
"""


class UsageError(ValueError):
    """A mistake in the command line or config: printed as one message, exit code 2."""


# -- error messages ---------------------------------------------------------------------------------------
def _registered_names() -> list[str]:
    from lightning_optim import registry

    return [e.name for e in registry.optimizers()]


def _suggest(word: str, candidates: Sequence[str]) -> str:
    """`` Did you mean 'X'?`` for the closest candidate (case-insensitive), or ``""``."""
    lowered = {c.lower(): c for c in candidates}
    close = difflib.get_close_matches(word.lower(), list(lowered), n=1, cutoff=0.6)
    return f" Did you mean {lowered[close[0]]!r}?" if close else ""


def _import_class(path: str) -> type | None:
    """The class a short name or dotted path names (None when it cannot be imported)."""
    from lightning_optim import registry

    try:
        return registry.get(path).cls
    except ValueError:
        pass
    module, _, name = path.rpartition(".")
    try:
        return getattr(importlib.import_module(module), name) if module else None
    except (ImportError, AttributeError, ValueError):
        return None


def _argument_names(cls: type) -> list[str]:
    return [n for n in inspect.signature(cls.__init__).parameters if n not in ("self", "params", "args", "kwargs")]


def condense_parser_error(message: str) -> str:
    """The jsonargparse error ``message`` (often 30-70 lines of union-type diagnostics) as a short message
    naming the argument, the allowed values and the closest registered name or argument."""
    bad_option = re.search(r"Problem with given class_path '([\w.]+)':\s*Option '(\w+)' is not accepted", message)
    if bad_option:
        class_path, option = bad_option.groups()
        cls = _import_class(class_path)
        names = _argument_names(cls) if cls is not None else []
        short = class_path.rsplit(".", 1)[-1]
        return f"{short} has no argument {option!r}.{_suggest(option, names)} Its arguments: {', '.join(names)}."
    key = re.search(r'Parser key "([\w.]+)"', message)
    bad_path = re.search(r"Expected a dot import path string: ([\w.]+)|Import path '?([\w.]+)'?", message)
    if key and key.group(1) == "optimizer" and bad_path:
        name = bad_path.group(1) or bad_path.group(2)
        names = _registered_names()
        return (
            f"Unknown optimizer {name!r} (--optimizer).{_suggest(name, names)} Registered short names: "
            f"{', '.join(names)}; any torch.optim.Optimizer also works by class path (e.g. torch.optim.AdamW)."
        )
    unknown = re.search(r"Unrecognized arguments: (.+)", message)
    if unknown:
        return f"Unrecognized arguments: {unknown.group(1).strip()}"
    # otherwise the first lines carry the key and the reason; the rest lists every union member tried
    lines = [line for line in message.strip().splitlines() if line.strip()]
    return "\n".join(lines[:4])


# -- the Lightning CLI ---------------------------------------------------------------------------------
@functools.cache
def _cli_class() -> type:
    """LightningOptimCLI, defined on first use so that importing this module does not import Lightning."""
    from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, instantiate_class

    import lightning_optim.callbacks  # noqa: F401  (imports the callbacks, so they resolve by short name)
    from lightning_optim.param_groups import ParamGroups

    import jsonargparse
    import yaml

    jsonargparse.set_loader(_PARSER_MODE, _yaml_with_full_optimizer_paths, (yaml.YAMLError,))

    class FriendlyParser(LightningArgumentParser):
        """Reports errors as one short message (see :func:`condense_parser_error`), and reads YAML with our
        optimizers' short names resolved to class paths (see :func:`full_optimizer_path`)."""

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            kwargs.setdefault("parser_mode", _PARSER_MODE)
            super().__init__(*args, **kwargs)

        def error(self, message: str, ex: Exception | None = None) -> Any:
            if not self.exit_on_error:  # a nested parse that handles the error itself
                return super().error(message, ex)
            # one message, without the 15-line usage block jsonargparse prints first
            prog = (getattr(ex, "subcommand_parser", None) or self).prog.replace(" [options]", "")
            sys.stderr.write(f"{prog}: error: {condense_parser_error(message)}\n  ({prog} --help lists every option)\n")
            self.exit(2)

    class LightningOptimCLI(LightningCLI):
        """LightningCLI with a ``param_groups`` section and defaults that suit experiments.

        Model and data are given by class path (``subclass_mode_model=True``, ``subclass_mode_data=True``) so
        one command serves every LightningModule, and the saved ``config.yaml`` may be overwritten on reruns.
        The optimizer is built once, right after the config is parsed, so a bad hyper-parameter is reported
        before training starts. ``--optimizer NAME`` over a config that names another optimizer starts from
        NAME's own defaults (plus the ``--optimizer.<arg>`` given) and says which settings it dropped.
        All other LightningCLI arguments pass through.
        """

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            kwargs.setdefault("parser_class", FriendlyParser)
            kwargs.setdefault("subclass_mode_model", True)
            kwargs.setdefault("subclass_mode_data", True)
            kwargs.setdefault("save_config_kwargs", {"overwrite": True})
            super().__init__(*args, **kwargs)

        def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
            parser.add_class_arguments(ParamGroups, "param_groups", instantiate=True)

        def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
            if isinstance(args, (list, tuple)):
                args = with_full_optimizer_paths(list(args))
            elif args is None and len(sys.argv) > 1:
                sys.argv[1:] = with_full_optimizer_paths(sys.argv[1:])
            super().parse_arguments(parser, args)
            argv = list(sys.argv[1:] if args is None else args) if not isinstance(args, dict) else []
            subcommand = self.config.get("subcommand")
            config = self.config[subcommand] if subcommand else self.config
            note = restart_replaced_optimizer(config, argv)
            if note:
                print(f"lightning-optim: {note}", file=sys.stderr)

        def _section(self, key: str) -> Any:
            config = self.config_init[self.subcommand] if self.subcommand else self.config_init
            return config.get(key)

        def instantiate_classes(self) -> None:
            try:
                super().instantiate_classes()
            except (ValueError, TypeError) as error:  # a callback's or the model's argument check
                raise UsageError(str(error)) from error
            groups: ParamGroups | None = self._section("param_groups")
            optimizer_init = self._section("optimizer")
            grouped = groups is not None and groups.enabled
            if grouped and not optimizer_init:
                raise UsageError(
                    "param_groups needs an `optimizer:` section in the config (e.g. `optimizer: {class_path: "
                    "torch.optim.AdamW}`): it rebuilds that optimizer over the grouped parameters."
                )
            params = groups.build(self.model) if grouped else list(self.model.parameters())
            if not optimizer_init or not params:  # no optimizer here, or parameters created in configure_model
                return
            # LightningCLI would build the optimizer inside fit; building it now (it holds no state yet)
            # reports a bad hyper-parameter before training starts, and applies the param groups.
            try:
                optimizer = instantiate_class(params, optimizer_init)
            except ValueError as error:
                raise UsageError(f"--optimizer ({optimizer_init['class_path']}): {error}") from error
            scheduler_init = self._section("lr_scheduler")
            scheduler = instantiate_class(optimizer, scheduler_init) if scheduler_init else None
            _install_configure_optimizers(self, optimizer, scheduler)

    return LightningOptimCLI


def _install_configure_optimizers(cli: Any, optimizer: Any, scheduler: Any) -> None:
    from functools import partial, update_wrapper
    from types import MethodType

    fn = partial(cli.configure_optimizers, optimizer=optimizer, lr_scheduler=scheduler)
    update_wrapper(fn, cli.configure_optimizers)  # Lightning's is_overridden looks at the wrapper
    cli.model.configure_optimizers = MethodType(fn, cli.model)


def __getattr__(name: str) -> Any:  # ``from lightning_optim.cli import LightningOptimCLI`` stays lazy
    if name == "LightningOptimCLI":
        return _cli_class()
    raise AttributeError(name)


# -- short optimizer names ---------------------------------------------------------------------------
# jsonargparse resolves a short name among every imported Optimizer subclass of that name, so `SPAM` turns
# ambiguous as soon as another package's SPAM is imported (pytorch_optimizer has one): our registered names
# and aliases are resolved to class paths before it sees them.
_PARSER_MODE = "lightning_optim_yaml"


def full_optimizer_path(name: Any) -> Any:
    """``"SPAM"`` / ``"stable_spam"`` -> ``"lightning_optim.spam.SPAM"``; anything else is returned as it is."""
    from lightning_optim import registry

    if not isinstance(name, str) or "." in name or not name:
        return name
    try:
        cls = registry.get(name).cls
    except ValueError:
        return name
    return f"{cls.__module__}.{cls.__qualname__}"


def with_full_optimizer_paths(argv: list[str]) -> list[str]:
    """``--optimizer NAME`` / ``--optimizer=NAME`` with NAME resolved by :func:`full_optimizer_path`."""
    out = list(argv)
    for i, token in enumerate(out):
        if token == "--optimizer" and i + 1 < len(out):
            out[i + 1] = full_optimizer_path(out[i + 1])
        elif token.startswith("--optimizer="):
            out[i] = "--optimizer=" + full_optimizer_path(token.partition("=")[2])
    return out


def _yaml_with_full_optimizer_paths(text: str) -> Any:
    """jsonargparse's YAML loading, with the config's ``optimizer: NAME`` / ``class_path: NAME`` resolved."""
    import yaml

    data = yaml.safe_load(text)
    if isinstance(data, dict):
        section = data.get("optimizer")
        if isinstance(section, str):
            data["optimizer"] = full_optimizer_path(section)
        elif isinstance(section, dict) and "class_path" in section:
            section["class_path"] = full_optimizer_path(section["class_path"])
        for sub in ("fit", "validate", "test", "predict"):  # a config given before the subcommand
            if isinstance(data.get(sub), dict):
                data[sub] = _yaml_with_full_optimizer_paths(yaml.safe_dump(data[sub]))
    return data


# -- --optimizer over a config's optimizer ----------------------------------------------------------
def _command_line_optimizer(argv: list[str]) -> tuple[str | None, set[str]]:
    """The ``--optimizer NAME`` given on the command line (last one wins) and the ``--optimizer.<arg>`` names."""
    name, explicit = None, set()
    for i, token in enumerate(argv):
        key, eq, value = token.partition("=")
        if key == "--optimizer":
            value = value if eq else (argv[i + 1] if i + 1 < len(argv) else "")
            if value and not value.lstrip().startswith(("{", "[")):
                name = value
        elif key.startswith("--optimizer."):
            explicit.add(key.removeprefix("--optimizer.").removeprefix("init_args."))
    return name, explicit


def _config_files(argv: list[str]) -> list[str]:
    files = []
    for i, token in enumerate(argv):
        key, eq, value = token.partition("=")
        if key in ("-c", "--config"):
            value = value if eq else (argv[i + 1] if i + 1 < len(argv) else "")
            if value:
                files.append(value)
    return files


def _config_optimizer(files: list[str]) -> tuple[str | None, dict[str, Any]]:
    """The optimizer (class path or name, init_args) the config files set, the last file winning."""
    import yaml

    class_path, init_args = None, {}
    for path in files:
        try:
            with open(path) as f:
                section = (yaml.safe_load(f) or {}).get("optimizer")
        except (OSError, yaml.YAMLError, AttributeError):
            continue
        if isinstance(section, str):
            class_path, init_args = section, {}
        elif isinstance(section, dict) and section.get("class_path"):
            class_path, init_args = section["class_path"], dict(section.get("init_args") or {})
    return class_path, init_args


def restart_replaced_optimizer(config: Any, argv: list[str]) -> str | None:
    """When ``--optimizer NAME`` replaces a different optimizer of the config, keep only the init args given
    on the command line (jsonargparse would keep every config setting the new class happens to accept, e.g.
    SPAM's ``reset_interval`` for StableSPAM, and drop the rest silently). Returns a note naming what was
    dropped (None when nothing was replaced)."""
    name, explicit = _command_line_optimizer(argv)
    old_path, old_args = _config_optimizer(_config_files(argv))
    section = config.get("optimizer") if config is not None else None
    if name is None or old_path is None or section is None:
        return None
    old_cls, new_cls = _import_class(old_path), _import_class(str(section.get("class_path")))
    if old_cls is None or new_cls is None or old_cls is new_cls:
        return None
    init_args = section.get("init_args")
    if init_args is not None:
        for key in list(vars(init_args)):
            if key not in explicit:
                delattr(init_args, key)
    dropped = {k: v for k, v in old_args.items() if k not in explicit}
    if not dropped:
        return None
    settings = ", ".join(f"{k}={v}" for k, v in dropped.items())
    return (
        f"--optimizer {name.rsplit('.', 1)[-1]} replaces the config's {old_path.rsplit('.', 1)[-1]}; its settings "
        f"were dropped ({settings}) and "
        f"{new_cls.__name__}'s own defaults apply. Pass --optimizer.<argument> to set any of them."
    )


# -- entry point ------------------------------------------------------------------------------------
def _optimizers_tool(argv: list[str]) -> int:
    """``lightning-optim optimizers``: the registry as a Markdown table."""
    from lightning_optim import registry

    if argv:
        print(f"lightning-optim optimizers: takes no arguments (got {' '.join(argv)})", file=sys.stderr)
        return 2
    print(registry.table())
    return 0


def _run_tool(name: str, argv: list[str]) -> int:
    if name == "optimizers":
        return _optimizers_tool(argv)
    module = importlib.import_module(TOOLS[name][0])
    tool: Callable[[list[str]], int | None] = module.main
    return int(tool(argv) or 0)


def main(args: Any = None) -> None:
    """Entry point of the ``lightning-optim`` console script and ``python -m lightning_optim``.

    ``lightning-optim optimizers`` prints the registry (names, families, defaults, capabilities),
    ``compare`` and ``report`` run our tools; every other subcommand goes to LightningCLI, where each
    registered optimizer resolves by its short name because the registry imported its class.
    """
    argv = list(sys.argv[1:] if args is None else args) if not isinstance(args, dict) else None
    if argv is not None:
        if not argv or argv[0] in ("-h", "--help"):
            print(HELP)
            return
        if argv[0] in TOOLS:
            code = _run_tool(argv[0], argv[1:])
            if code:
                sys.exit(code)
            return
    quiet_lightning()
    try:
        _cli_class()(args=args)
    except UsageError as error:
        print(f"lightning-optim: error: {error}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
