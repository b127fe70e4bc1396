"""Running passes: torch.fx's ``PassManager``, which recompiles and lints the graph after each one."""
from __future__ import annotations

from torch import fx
from torch.fx.passes.infra.pass_base import PassBase
from torch.fx.passes.infra.pass_manager import PassManager

__all__ = ["run_passes"]


def run_passes(gm: fx.GraphModule, *passes: PassBase) -> fx.GraphModule:
    """Run ``passes`` on ``gm`` in order, in place; recompile and ``graph.lint()`` after each.

    Passes change ``gm.graph`` only; recompiling is left to this runner. An error in a
    pass is raised as itself (``PassManager`` wraps it in a bare ``Exception``).
    """
    try:
        PassManager(list(passes), run_checks_after_each_pass=True)(gm)
    except Exception as e:
        cause = e.__cause__
        if type(e) is Exception and isinstance(cause, BaseException):
            raise cause.with_traceback(cause.__traceback__) from None
        raise
    finally:
        _keep_graph_module_call(gm)
    return gm


def _keep_graph_module_call(gm: fx.GraphModule) -> None:
    # recompile() gives type(gm) its own call wrapper when it has none; on the subclass FSDP2's
    # fully_shard swaps in, that wrapper would call itself forever: keep the GraphModule class's.
    cls = type(gm)
    if "_wrapped_call" in vars(cls) and any("_wrapped_call" in vars(base) for base in cls.__mro__[1:]):
        delattr(cls, "_wrapped_call")
