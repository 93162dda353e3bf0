"""The errors that end a cepo-train run (the CLI maps them to exit codes)."""


class NaNLossError(RuntimeError):
    """Too many non-finite updates in a row, or a model whose outputs are no longer finite (exit code 3)."""


class RewardFunctionError(RuntimeError):
    """The reward function raised on every response of a step: nothing can be learned from it."""
