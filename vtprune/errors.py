"""The one exception type vtprune raises for bad input, so callers can catch it precisely."""


class VTPruneError(ValueError):
    """Invalid pruner name, option, budget, model or input; the message says what and how to fix it."""
