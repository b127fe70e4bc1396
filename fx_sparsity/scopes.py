"""What becomes a graph: the whole model, each layer that owns a configured tensor, or each block of a type.

A scope is decoded once, by :func:`as_scope`, from what the user passed (``"model"``,
``"layers"``, an ``nn.Module`` subclass or tuple of them, or one of the objects below); the
pipeline below asks the object for its units and never looks at the shorthand again.

- :class:`ModelScope`: one GraphModule for the whole model (no units);
- :class:`LayersScope`: the user's model, each submodule that owns a configured tensor a GraphModule;
- :class:`BlockScope`: the user's model, each outermost block of the given types a GraphModule, and,
  as with layers, each owner of a configured tensor outside them.

A new kind of scope subclasses :class:`Scope` and implements :meth:`Scope.units`.
"""
from __future__ import annotations

from torch import nn

from .errors import SparsityConfigError

__all__ = ["Scope", "ModelScope", "LayersScope", "BlockScope", "as_scope"]


def _inside(fqn: str, prefix: str) -> bool:
    return fqn == prefix or fqn.startswith(prefix + ".")


class Scope:
    """Base class: which submodules of a model are traced, each alone, and put back in its place."""

    #: The block types (empty for layers); ``None`` for the whole model.
    block_types: tuple[type[nn.Module], ...] | None = ()

    @property
    def whole_model(self) -> bool:
        """One graph for the whole model (no units)."""
        return self.block_types is None

    def units(self, model: nn.Module, owners: list[str]) -> list[str]:
        """The fqns of the submodules to trace, in ``named_modules`` order, given the ``owners`` of the tensors
        to sparsify: the outermost blocks, then owners outside them."""
        blocks: list[str] = []
        types = self.block_types or ()
        for name, module in model.named_modules():
            if types and isinstance(module, types) and not any(_inside(name, b) for b in blocks):
                blocks.append(name)
        if "" in blocks:
            raise SparsityConfigError(
                f"scope={self!r}: the model itself is a {type(model).__name__}; a block scope replaces "
                f"submodules, so use scope=\"model\" to trace the whole model")
        found = set(blocks) | {o for o in owners if not any(_inside(o, b) for b in blocks)}
        if "" in found:
            raise SparsityConfigError(
                f"scope=\"layers\": the model itself ({type(model).__name__}) owns configured tensors; a scoped "
                f"prepare replaces submodules, so use scope=\"model\" for it")
        order = {name: i for i, (name, _) in enumerate(model.named_modules())}
        return sorted(found, key=order.__getitem__)

    def blocks(self, model: nn.Module) -> list[str]:
        """The outermost blocks of this scope's types in ``model`` (none for model and layers scopes)."""
        return self.units(model, []) if self.block_types else []

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and other.block_types == self.block_types  # type: ignore[attr-defined]

    def __hash__(self) -> int:
        return hash((type(self), self.block_types))


class ModelScope(Scope):
    """The whole model as one GraphModule (``scope="model"``, the default)."""

    block_types = None

    def units(self, model: nn.Module, owners: list[str]) -> list[str]:
        return []

    def __repr__(self) -> str:
        return "ModelScope()"


class LayersScope(Scope):
    """The user's model kept; each submodule that owns a configured tensor becomes a GraphModule
    (``scope="layers"``)."""

    block_types = ()

    def __repr__(self) -> str:
        return "LayersScope()"


class BlockScope(Scope):
    """The user's model kept; each outermost block of ``module_types`` becomes one GraphModule, and each owner of a
    configured tensor outside them one of its own (``scope=LlamaDecoderLayer`` or a tuple of classes)."""

    def __init__(self, *module_types: type[nn.Module]):
        if len(module_types) == 1 and isinstance(module_types[0], tuple):
            module_types = module_types[0]
        _check_types(module_types)
        self.block_types: tuple[type[nn.Module], ...] = tuple(module_types)

    def __repr__(self) -> str:
        return f"BlockScope({', '.join(t.__name__ for t in self.block_types)})"


def _check_types(types: tuple) -> None:
    if types and all(isinstance(t, type) and issubclass(t, nn.Module) for t in types):
        return
    instance = next((t for t in types if isinstance(t, nn.Module)), None)
    if instance is not None:
        raise SparsityConfigError(f"scope is a module ({type(instance).__name__}), not a class: pass its class, "
                                  f"scope={type(instance).__name__} (scope=type(block))")
    raise SparsityConfigError(
        f"scope={types[0] if len(types) == 1 else types!r}: use \"model\" (one graph), \"layers\" (each layer that "
        f"owns a configured tensor), an nn.Module subclass / tuple of them (each block of that type, e.g. "
        f"scope=LlamaDecoderLayer), or ModelScope() / LayersScope() / BlockScope(*types)")


def as_scope(scope: object) -> Scope:
    """The :class:`Scope` a user's ``scope=`` argument means; ``SparsityConfigError`` for anything else."""
    if isinstance(scope, Scope):
        return scope
    if isinstance(scope, str):
        if scope == "model":
            return ModelScope()
        if scope == "layers":
            return LayersScope()
    return BlockScope(*(scope if isinstance(scope, tuple) else (scope,)))
