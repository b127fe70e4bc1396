"""Sparsity schedule given by a user function of the epoch."""

from __future__ import annotations

import types
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from .base_scheduler import BaseScheduler, _check_sparsifier

if TYPE_CHECKING:  # pragma: no cover - typing only
    from fx_sparsity.sparsifier.base_sparsifier import BaseSparsifier


__all__ = ["LambdaSL"]

# Callables whose state cannot (and need not) be saved: their behaviour is
# code, which is re-supplied when the scheduler is re-created.
_CODE_ONLY = (
    types.FunctionType,
    types.MethodType,
    types.BuiltinFunctionType,
    types.BuiltinMethodType,
)


class LambdaSL(BaseScheduler):
    """Set each group's level to its target times ``sl_lambda(epoch)``.

    The target is the group's ``sparsity_level`` when the scheduler is
    created.  With the default ``last_epoch=-1`` the first level set (in the
    constructor) is ``target * sl_lambda(0)``.

    Args:
        sparsifier: prepared fx_sparsity sparsifier.
        sl_lambda: function of the integer epoch returning a multiplicative
            factor, or a list/tuple with one such function per group.
        last_epoch: index of the last epoch (``-1`` to start from scratch).
        verbose: print every level change.

    Example::

        >>> scheduler = LambdaSL(sparsifier, [lambda e: min(1.0, e / 30),
        ...                                   lambda e: 0.95 ** e])
        >>> for epoch in range(100):
        ...     train(...)
        ...     sparsifier.step()
        ...     scheduler.step()

    ``state_dict()`` does not contain the functions themselves (lambdas and
    local functions cannot be pickled); for callable *objects* their
    ``__dict__`` is saved and restored, like
    ``torch.optim.lr_scheduler.LambdaLR``.
    """

    def __init__(
        self,
        sparsifier: BaseSparsifier,
        sl_lambda: Callable[[int], float] | list[Callable[[int], float]],
        last_epoch: int = -1,
        verbose: bool = False,
    ) -> None:
        _check_sparsifier(sparsifier)
        self.sparsifier = sparsifier

        n = len(sparsifier.groups)
        if isinstance(sl_lambda, (list, tuple)):
            if len(sl_lambda) != n:
                # Message kept identical to torch.ao (including "lr_lambdas").
                raise ValueError(f"Expected {n} lr_lambdas, but got {len(sl_lambda)}")
            self.sl_lambdas = list(sl_lambda)
        else:
            self.sl_lambdas = [sl_lambda] * n
        super().__init__(sparsifier, last_epoch, verbose)

    def state_dict(self) -> dict[str, Any]:
        """Scheduler state without the sparsifier and without the functions.

        ``sl_lambdas`` holds, per group, ``None`` for a plain function or
        method and a copy of ``__dict__`` for a callable object.
        """
        state = super().state_dict()
        saved: list[dict[str, Any] | None] = []
        for fn in self.sl_lambdas:
            attrs = None if isinstance(fn, _CODE_ONLY) else getattr(fn, "__dict__", None)
            saved.append(None if attrs is None else dict(attrs))
        state["sl_lambdas"] = saved
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore a state from :meth:`state_dict`; keeps this scheduler's functions.

        The functions given to the constructor stay in place; callable objects
        get their saved ``__dict__`` back.
        """
        state = dict(state_dict)
        saved = state.pop("sl_lambdas", None)
        super().load_state_dict(state)
        if saved is None:
            return
        if len(saved) != len(self.sl_lambdas):
            raise ValueError(
                f"state_dict has {len(saved)} sl_lambdas entries, but this "
                f"scheduler has {len(self.sl_lambdas)}"
            )
        for fn, attrs in zip(self.sl_lambdas, saved):
            if isinstance(attrs, dict):
                fn.__dict__.update(attrs)

    def get_sl(self) -> list[Any]:
        self._warn_if_called_directly()
        return [
            base_sl * fn(self.last_epoch)
            for fn, base_sl in zip(self.sl_lambdas, self.base_sl)
        ]
