"""Base class for sparsity-level schedulers.

A scheduler owns a prepared :class:`fx_sparsity.BaseSparsifier` and, every
time :meth:`BaseScheduler.step` is called, writes a new ``sparsity_level``
into each of the sparsifier's groups.  The public behaviour (warnings, their
text, verbose output, ``state_dict`` contents, the call to ``step()`` during
construction) follows ``torch.ao.pruning.scheduler.BaseScheduler`` so that
code written for torch.ao can switch over unchanged.
"""

from __future__ import annotations

import copy
import functools
import warnings
import weakref
from typing import Any

from ..sparsifier.base_sparsifier import BaseSparsifier

__all__ = ["BaseScheduler"]


# Marker attribute put on the counting wrapper around ``sparsifier.step``.
# The name is shared with torch.ao so that tooling looking for it keeps working.
_COUNTER_FLAG = "_with_counter"

_GET_SL_WARNING = (
    "To get the last sparsity level computed by the scheduler, "
    "please use `get_last_sl()`."
)
_OVERRIDDEN_WARNING = (
    "Seems like `sparsifier.step()` has been overridden after sparsity scheduler "
    "initialization. Please, make sure to call `sparsifier.step()` before "
    "`scheduler.step()`."
)
_ORDER_WARNING = (
    "Detected call of `scheduler.step()` before `sparsifier.step()`. "
    "You have to make sure you run the sparsifier.step() BEFORE any "
    "calls to the scheduler.step()."
)


def _check_sparsifier(sparsifier: Any) -> None:
    """Validate the sparsifier handed to a scheduler.

    Raises ``TypeError`` for anything that is not an ``fx_sparsity``
    sparsifier (including torch.ao.pruning sparsifiers) and ``ValueError``
    for a sparsifier without any groups (i.e. not prepared yet).
    """
    if not isinstance(sparsifier, BaseSparsifier):
        cls = type(sparsifier)
        hint = ""
        if cls.__module__.startswith("torch.ao."):
            hint = (
                " (a torch.ao.pruning sparsifier cannot be driven by an "
                "fx_sparsity scheduler; use the fx_sparsity sparsifier of the "
                "same name instead)"
            )
        raise TypeError(
            f"{cls.__name__} is not an instance of fx_sparsity.BaseSparsifier; "
            f"expected an fx_sparsity sparsifier, got {cls.__module__}."
            f"{cls.__qualname__}{hint}"
        )
    if getattr(sparsifier, "model", None) is None:
        raise ValueError(
            "sparsifier is not prepared: call prepare_fx_sparse / "
            "sparsifier.prepare first (it has no groups to schedule)"
        )


def _counting_step(sparsifier: Any, step: Any) -> Any:
    """Return ``step`` wrapped so each call bumps ``sparsifier._step_count``.

    The wrapper only holds a weak reference to the sparsifier, so attaching
    it to the sparsifier as an instance attribute creates no reference cycle.
    An already-wrapped ``step`` is returned unchanged (no double counting
    when several schedulers share a sparsifier).
    """
    if getattr(step, _COUNTER_FLAG, False):
        return step

    owner_ref = weakref.ref(sparsifier)
    bound_to_owner = getattr(step, "__self__", None) is sparsifier and hasattr(
        step, "__func__"
    )
    if bound_to_owner:
        # Keep the plain function, re-bind on every call: a bound method
        # would hold a strong reference to the sparsifier.
        target = step.__func__
        del step

        @functools.wraps(target)
        def counted(*args: Any, **kwargs: Any) -> Any:
            owner = owner_ref()
            if owner is None:
                raise ReferenceError("the sparsifier this step() belonged to is gone")
            owner._step_count += 1
            return target.__get__(owner, type(owner))(*args, **kwargs)

    else:
        # Some other callable was installed as ``sparsifier.step``; count its
        # calls all the same.
        target = step
        del step

        @functools.wraps(target)
        def counted(*args: Any, **kwargs: Any) -> Any:
            owner = owner_ref()
            if owner is not None:
                owner._step_count += 1
            return target(*args, **kwargs)

    setattr(counted, _COUNTER_FLAG, True)
    return counted


class _InsideStep:
    """Context manager flagging that ``get_sl`` is being called by ``step``."""

    __slots__ = ("_scheduler",)

    def __init__(self, scheduler: BaseScheduler) -> None:
        self._scheduler = scheduler

    def __enter__(self) -> _InsideStep:
        self._scheduler._get_sl_called_within_step = True
        return self

    def __exit__(self, *exc: Any) -> None:
        self._scheduler._get_sl_called_within_step = False


class BaseScheduler:
    """Base class of sparsity-level schedulers.

    Args:
        sparsifier: a prepared ``fx_sparsity`` sparsifier.  The current
            ``sparsity_level`` of each of its groups becomes that group's
            ``base_sl`` (the target level for the subclasses).
        last_epoch: index of the last epoch; ``-1`` starts from scratch.
            The first ``step()`` (done in the constructor) increments it.
        verbose: print a line per group each time a level is set.

    Subclasses implement :meth:`get_sl`, returning one level per group for
    epoch ``self.last_epoch``.
    """

    def __init__(
        self,
        sparsifier: BaseSparsifier,
        last_epoch: int = -1,
        verbose: bool = False,
    ) -> None:
        _check_sparsifier(sparsifier)
        self.sparsifier = sparsifier

        missing = [g["tensor_fqn"] for g in sparsifier.groups if "sparsity_level" not in g]
        if missing:  # (NearlyDiagonalSparsifier has no level: torch.ao raises a bare KeyError here)
            raise KeyError(f"a sparsity scheduler drives each group's 'sparsity_level', and the groups of {missing} "
                           f"have none ({type(sparsifier).__name__} does not use one); give each config entry a "
                           f"'sparsity_level' or leave out the scheduler")
        self.base_sl: list[Any] = [g["sparsity_level"] for g in sparsifier.groups]
        self.last_epoch = last_epoch

        # Count sparsifier.step() calls so that step() can tell whether the
        # user runs the scheduler before the sparsifier.
        sparsifier.step = _counting_step(sparsifier, sparsifier.step)  # type: ignore[method-assign]
        sparsifier._step_count = 0
        self._step_count: int = 0
        self.verbose = verbose

        self._get_sl_called_within_step: bool = False

        self.step()

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """Return the scheduler's state: every attribute but the sparsifier.

        List values are shallow-copied so that the returned dict does not
        alias the scheduler's own lists.
        """
        return {
            key: (copy.copy(value) if isinstance(value, list) else value)
            for key, value in self.__dict__.items()
            if key != "sparsifier"
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore a state returned by :meth:`state_dict`.

        The sparsifier is left untouched: its groups get the scheduled level
        at the next :meth:`step` (restore the sparsifier's own state
        separately if the levels are needed before that).
        """
        self.__dict__.update(
            {
                key: (copy.copy(value) if isinstance(value, list) else value)
                for key, value in state_dict.items()
                if key != "sparsifier"
            }
        )

    # ---------------------------------------------------------------- levels
    def get_last_sl(self) -> list[Any]:
        """Return the levels set by the most recent :meth:`step`."""
        return self._last_sl

    def _warn_if_called_directly(self) -> None:
        if not self._get_sl_called_within_step:
            # stacklevel 3: point at whoever called get_sl().
            warnings.warn(_GET_SL_WARNING, stacklevel=3)

    def get_sl(self) -> list[Any]:
        """Compute the levels for ``self.last_epoch`` (one per group).

        Only meant to be called by :meth:`step`; use :meth:`get_last_sl` to
        read the current levels.
        """
        self._warn_if_called_directly()
        raise NotImplementedError

    def print_sl(
        self, is_verbose: bool, group: int, sl: float, epoch: int | None = None
    ) -> None:
        """Print the new level of ``group`` when ``is_verbose`` is true."""
        if not is_verbose:
            return
        if epoch is None:
            print(f"Adjusting sparsity level of group {group} to {sl:.4e}.")
        else:
            print(
                f"Epoch {epoch:5d}: adjusting sparsity level of group "
                f"{group} to {sl:.4e}."
            )

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__} (\n"
            f"Sparsifier {self.sparsifier}\n"
            f"    base_sl: {self.base_sl}\n"
            ")"
        )

    # ------------------------------------------------------------------ step
    def _check_call_order(self) -> None:
        # Only the first user call (the constructor made the first one) is
        # checked, as torch.ao does.
        if self._step_count != 1:
            return
        if not hasattr(self.sparsifier.step, _COUNTER_FLAG):
            warnings.warn(_OVERRIDDEN_WARNING, UserWarning, stacklevel=3)
        elif self.sparsifier._step_count < 1:
            warnings.warn(_ORDER_WARNING, UserWarning, stacklevel=3)

    def step(self, epoch: int | None = None) -> None:
        """Advance one epoch and write the new levels into the groups.

        ``epoch`` is only used in the verbose message; the scheduler always
        advances ``last_epoch`` by one (as in torch.ao).
        """
        self._check_call_order()
        self._step_count += 1

        with _InsideStep(self):
            self.last_epoch += 1
            levels = self.get_sl()

        groups = self.sparsifier.groups
        for index, (group, level) in enumerate(zip(groups, levels)):
            group["sparsity_level"] = level
            self.print_sl(self.verbose, index, level, epoch)

        self._last_sl = [group["sparsity_level"] for group in groups]
        self.sparsifier.enable_mask_update = True

    # --------------------------------------------------------------- helpers
    def _make_sure_a_list(self, var: Any) -> list[Any]:
        """Broadcast a scalar to one value per group, or check a list's length."""
        n = len(self.sparsifier.groups)
        if isinstance(var, (list, tuple)):
            if len(var) != n:
                raise ValueError(f"Expected variable of length {n}, but got {len(var)}")
            return list(var)
        return [var] * n
