"""Pure-torch stability statistics (``lightning_optim.monitors``); imports torch only, never Lightning."""

__all__: list[str] = []
