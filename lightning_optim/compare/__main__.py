"""``python -m lightning_optim.compare --config ... --optimizers ... --budget-steps ...``."""

import sys

from lightning_optim.compare import main

sys.exit(main())
