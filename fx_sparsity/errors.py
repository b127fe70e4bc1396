"""Exceptions raised by fx_sparsity; each message names the problem and the fix."""


class SparsityConfigError(ValueError, AssertionError):
    """A bad sparsity config or argument.

    A ``ValueError``; also an ``AssertionError`` because torch.ao.pruning raises that for
    the same config mistakes, and code written against it may catch it.
    """


class TraceError(RuntimeError):
    """The model could not be turned into an FX graph."""
