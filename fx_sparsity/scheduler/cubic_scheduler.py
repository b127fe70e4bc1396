"""Cubic sparsity schedule (Zhu & Gupta, https://arxiv.org/abs/1710.01878)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .base_scheduler import BaseScheduler, _check_sparsifier

if TYPE_CHECKING:  # pragma: no cover - typing only
    from fx_sparsity.sparsifier.base_sparsifier import BaseSparsifier


__all__ = ["CubicSL"]


class CubicSL(BaseScheduler):
    r"""Ramp each group's sparsity from ``init_sl`` to its target along a cubic.

    The target (:math:`s_f`) is the group's ``sparsity_level`` when the
    scheduler is created.  At epoch :math:`t` the level is

    .. math::

        s_t = \operatorname{clamp}\Big(s_f + (s_0 - s_f)
              \big(1 - \tfrac{t - t_0}{\Delta t \cdot n}\big)^3,\ s_0,\ s_f\Big)

    i.e. it starts at :math:`s_0` at :math:`t_0` and reaches :math:`s_f`
    after :math:`\Delta t \cdot n` epochs, then stays there.  The curve is
    evaluated at every epoch: ``delta_t`` only stretches the ramp, it does
    not make the level change in steps of ``delta_t`` epochs.

    Args:
        sparsifier: prepared fx_sparsity sparsifier.
        init_sl: initial level :math:`s_0` (scalar or one per group).
        init_t: epoch :math:`t_0` at which the ramp starts (scalar or list).
        delta_t: :math:`\Delta t` (scalar or list).
        total_t: :math:`n`; the ramp lasts ``delta_t * total_t`` epochs.
        initially_zero: if true, the level is 0 before ``init_t`` instead of
            ``init_sl`` (scalar or list).
        last_epoch: index of the last epoch (``-1`` to start from scratch).
        verbose: print every level change.

    Lists must have one entry per sparsifier group (``ValueError``
    otherwise).  Note that the clamp is ``max(s_0, min(s_f, x))`` as in
    torch.ao, so when ``init_sl`` is larger than the target the level stays
    at ``init_sl``.
    """

    def __init__(
        self,
        sparsifier: BaseSparsifier,
        init_sl: float | list[float] = 0.0,
        init_t: int | list[int] = 0,
        delta_t: int | list[int] = 10,
        total_t: int | list[int] = 100,
        initially_zero: bool | list[bool] = False,
        last_epoch: int = -1,
        verbose: bool = False,
    ) -> None:
        _check_sparsifier(sparsifier)
        self.sparsifier = sparsifier

        self.init_sl = self._make_sure_a_list(init_sl)
        self.init_t = self._make_sure_a_list(init_t)
        self.delta_t = self._make_sure_a_list(delta_t)
        self.total_t = self._make_sure_a_list(total_t)
        self.initially_zero = self._make_sure_a_list(initially_zero)

        for index, (dt, n) in enumerate(zip(self.delta_t, self.total_t)):
            if dt * n == 0:
                raise ValueError(
                    f"delta_t * total_t must be non-zero (group {index}: "
                    f"delta_t={dt!r}, total_t={n!r})"
                )

        super().__init__(sparsifier, last_epoch, verbose)

    @staticmethod
    def sparsity_compute_fn(
        s_0: float,
        s_f: float,
        t: int,
        t_0: int,
        dt: int,
        n: int,
        initially_zero: bool = False,
    ) -> float:
        """Level at epoch ``t`` for one group (see the class docstring)."""
        if initially_zero and t < t_0:
            return 0.0
        remaining = 1.0 - (t - t_0) / (dt * n)
        level = s_f + (s_0 - s_f) * remaining**3
        # Same clamp as torch.ao: bounded below by s_0 first, then above by s_f.
        return max(s_0, min(s_f, level))

    def get_sl(self) -> list[Any]:
        self._warn_if_called_directly()
        t = self.last_epoch
        return [
            self.sparsity_compute_fn(s_0, s_f, t, t_0, dt, n, zero)
            for s_0, s_f, t_0, dt, n, zero in zip(
                self.init_sl,
                self.base_sl,
                self.init_t,
                self.delta_t,
                self.total_t,
                self.initially_zero,
            )
        ]
