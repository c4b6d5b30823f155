"""``python -m lightning_optim fit|validate|test|predict --config ...``."""

from lightning_optim.cli import main

main()
