"""Exceptions and warnings of fx_sparsity; each message names the problem and the fix."""
from __future__ import annotations

import contextlib
import linecache
import os
import sys
import types
import warnings

import torch

from .passes.errors import FxSparsityError

__all__ = ["FxSparsityError", "SparsityConfigError", "UnknownTensorError", "NotATensorError", "TraceError", "warn_user"]


class SparsityConfigError(FxSparsityError, ValueError, AssertionError):
    """A bad sparsity config or argument.

    A ``ValueError``; also an ``AssertionError`` because torch.ao.pruning raises that for
    the same config mistakes, and code written against it may catch it.
    """


class UnknownTensorError(SparsityConfigError, AttributeError):
    """A ``tensor_fqn`` that names no tensor of the model; an ``AttributeError`` too, as in torch.ao.pruning."""


class NotATensorError(SparsityConfigError, TypeError):
    """A ``tensor_fqn`` that names a module, not a tensor; a ``TypeError`` too, as in torch.ao.pruning."""


class TraceError(FxSparsityError, RuntimeError):
    """The model could not be turned into an FX graph."""


# Our own source folders: the pass library sits beside the package in a checkout, inside it when installed.
_HERE = os.path.dirname(os.path.abspath(__file__))
OUR_DIRS = (_HERE + os.sep, os.path.join(os.path.dirname(_HERE), "passes") + os.sep)


#: Where library code lives: frames there are not the user's.
_LIBRARY_DIRS = (*OUR_DIRS, os.path.dirname(torch.__file__) + os.sep, os.path.dirname(contextlib.__file__) + os.sep)


def first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else ""


def user_frame(e: BaseException) -> str:
    """`` (at file:line in func: `code`)`` for the innermost frame of the user's own code in ``e``'s traceback
    (not torch's, not ours, not generated code); empty when there is none."""
    found = ""
    tb = e.__traceback__
    while tb is not None:
        code = tb.tb_frame.f_code
        name = code.co_filename
        if not (name.startswith(_LIBRARY_DIRS) or name.startswith("<")):
            line = linecache.getline(name, tb.tb_lineno).strip()
            found = f" (at {name}:{tb.tb_lineno} in {code.co_name}{f': `{line}`' if line else ''})"
        tb = tb.tb_next
    return found



def warn_user(message: str, category: type[Warning] = UserWarning) -> None:
    """``warnings.warn`` pointed at the user's line: the first caller outside fx_sparsity."""
    level, frame = 2, sys._getframe(1)  # stacklevel 2: warn_user's caller
    frame_: types.FrameType | None = frame
    while frame_ is not None and frame_.f_code.co_filename.startswith(OUR_DIRS):
        frame_, level = frame_.f_back, level + 1
    warnings.warn(message, category, stacklevel=level)
