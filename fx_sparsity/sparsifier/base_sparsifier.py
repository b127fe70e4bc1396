"""``BaseSparsifier``: groups of tensors to sparsify and the masks that guard them.

A sparsifier never walks a graph. It knows its groups (torch.ao.pruning's config dicts)
and, through ``self.model`` (the prepared GraphModule), the live mask buffer of each
group, which it overwrites in place. Preparing and squashing are the pipeline's
(:mod:`fx_sparsity.pipeline`); a sparsifier declares what it needs from it: ``defaults``,
``masks``, :meth:`validate_group`, ``observer_type`` / :meth:`make_observer`, :meth:`on_prepared`.
"""
from __future__ import annotations

import abc
import copy
from collections import defaultdict
from typing import Any, cast

import torch
from torch import fx, nn

from .. import pipeline
from ..distributed import whole_tensors
from ..fqn import get_arg_info_from_tensor_fqn
from ..lowering import convert_fx_sparse
from ..passes import mask_fqn_for, mask_or_none

__all__ = ["BaseSparsifier"]

# Group keys that refer to the model rather than describe the config (as torch.ao.pruning).
KEYS_NOT_IN_STATE_DICT = ["module", "module_fqn", "tensor_name"]


class BaseSparsifier(abc.ABC):
    """Base class of all sparsifiers; subclasses implement :meth:`update_mask`.

    Args:
        defaults: config values applied to every group unless its config entry overrides them.
    """

    _step_count: int  # calls of step(), counted by a scheduler's wrapper (as torch.ao)

    def __init__(self, defaults: dict[str, Any] | None = None):
        self.defaults: dict[str, Any] = defaults or {}
        self.state: dict[str, dict] = defaultdict(dict)
        self.groups: list[dict[str, Any]] = []
        self.enable_mask_update = True
        self.model: nn.Module | None = None
        self.config: list[dict] | None = None  # the config of the last prepare (set by the pipeline)

    # -- pickling: the scheduler's step wrapper is a closure; everything else travels.
    def __getstate__(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k != "step"}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)

    def __repr__(self) -> str:
        lines = [f"{type(self).__name__} ("]
        for i, group in enumerate(self.groups):
            lines.append(f"\tGroup {i}")
            lines.append(f"\t    module: {group.get('module')}")
            lines += [f"\t    {k}: {group[k]}" for k in sorted(group) if k != "module"]
        return "\n".join(lines) + "\n)"

    # -- preparing
    def prepare(self, model: nn.Module, config: list[dict] | None = None, *, scope: Any = "model",
                example_inputs: Any = None, tracer: str = "symbolic", inplace: bool = False) -> nn.Module:
        """Trace ``model`` and put a mask-multiply node in front of every use of each configured tensor.

        Same config semantics as ``torch.ao.pruning.BaseSparsifier.prepare``: each entry is a
        dict with a ``tensor_fqn`` plus overrides of the defaults; ``config=None`` means every
        ``nn.Linear`` weight (or, for a model prepared by torch.ao.pruning, every tensor
        carrying a ``FakeSparsity`` mask — those masks are imported). Unlike torch.ao, the
        input model is left as it was unless ``inplace=True``: use the returned module (also
        ``self.model``). A failure leaves the model and this sparsifier as they were.

        ``scope="model"`` returns one GraphModule for the whole model. ``scope="layers"`` returns
        the model itself (same class) with each submodule that owns a configured tensor replaced
        by a GraphModule traced from it; ``scope=<nn.Module subclass or tuple>`` replaces each
        outermost block of those types (and, as "layers", owners outside them). Mask buffers and
        state-dict keys are the same for every scope.
        """
        return pipeline.prepare(self, model, config, scope=scope, example_inputs=example_inputs, tracer=tracer,
                                inplace=inplace)

    def _publish(self) -> None:
        pipeline.publish(self._require_prepared("publish"), self.groups)

    def graph_modules(self) -> list[tuple[str, fx.GraphModule]]:
        """``[(fqn, graph module)]`` of the prepared model: one ``("", gm)`` for scope="model", else its units."""
        return pipeline.graph_modules(self._require_prepared("graph_modules"))

    def validate_group(self, group: dict[str, Any], tensor: torch.Tensor) -> None:
        """Check one merged group before anything is modified; raise ``SparsityConfigError`` on a bad config."""

    #: What the pipeline puts on the prepared model: one mask per tensor element ("elements") or one entry per
    #: channel class of a coupled group ("channels", the structured pruners).
    masks = "elements"
    #: Observers on the inputs of the linears whose weights are sparsified (Wanda's norms, SparseGPT's Gram
    #: matrices); ``None``: none.
    observer_type: type[nn.Module] | None = None

    def make_observer(self, num_channels: int) -> nn.Module:
        """The observer for one linear's input of ``num_channels`` features (``observer_type`` by default)."""
        assert self.observer_type is not None
        return self.observer_type(num_channels)

    def on_prepared(self, model: nn.Module) -> None:
        """Called once the masks (and observers) are in the graph; an exception here undoes the whole prepare."""

    # -- masks
    def _require_prepared(self, what: str) -> nn.Module:
        if self.model is None:
            raise RuntimeError(
                f"{type(self).__name__}.{what}() called before prepare: call "
                f"fx_sparsity.prepare_fx_sparse(model, sparsifier, config) (or sparsifier.prepare) first")
        return self.model

    def get_mask(self, tensor_fqn: str) -> torch.Tensor:
        """The live mask buffer of ``tensor_fqn`` in the prepared module.

        Looked up each time: ``.to()``/``.half()`` replace buffer objects, so a kept
        reference would go stale.
        """
        mask = mask_or_none(self._require_prepared("get_mask"), mask_fqn_for(tensor_fqn))
        if mask is None:
            raise RuntimeError(
                f"'{tensor_fqn}' has no mask in the prepared module (was squash_mask() called? masks are "
                f"folded into the weights then)")
        return mask

    def step(self, use_path: bool = True) -> None:
        """Recompute every group's mask, in place (a compiled module sees the new values)."""
        if not self.enable_mask_update:
            return
        model = self._require_prepared("step")
        with torch.no_grad(), whole_tensors(model, [group["tensor_fqn"] for group in self.groups]):
            self.plan_masks()
            for group in self.groups:
                mask = self.get_mask(group["tensor_fqn"])
                module = model.get_submodule(group["module_fqn"])
                self.update_mask(**{**group, "module": module, "mask": mask})

    def plan_masks(self) -> None:
        """Called by :meth:`step` before the groups' :meth:`update_mask`, with whole tensors (also under
        FSDP2): for sparsifiers that decide over all groups at once (a global threshold)."""

    @abc.abstractmethod
    def update_mask(self, module: nn.Module, tensor_name: str, mask: torch.Tensor, **kwargs) -> None:
        """Overwrite ``mask`` in place for ``getattr(module, tensor_name)`` (the dense tensor)."""

    def squash_mask(self, params_to_keep: tuple[str, ...] | None = None,
                    params_to_keep_per_layer: dict[str, tuple[str, ...]] | None = None,
                    *args, **kwargs) -> nn.Module:
        """Fold the masks into the tensors and remove the mask nodes and buffers.

        On a scoped model (``scope="layers"`` or a block type) the original modules are put
        back in place of their graph modules: the result is a plain model again.

        As in torch.ao.pruning, ``params_to_keep`` (for every group) and
        ``params_to_keep_per_layer`` (by module fqn) name group config keys to keep in a
        ``sparse_params`` dict on each owner module; lowering reads it.
        """
        model = self._require_prepared("squash_mask")
        if self.observer_type is not None:
            pipeline.remove_observers(model, self.observer_type)
        pipeline.squash_masks(model, self.groups)
        for group in self.groups:
            sparse_params = {}
            if params_to_keep is not None:
                sparse_params.update({k: group[k] for k in params_to_keep})
            if params_to_keep_per_layer is not None:
                keys = params_to_keep_per_layer.get(group["module_fqn"])
                if keys is not None:
                    sparse_params.update({k: group[k] for k in keys})
            if sparse_params:
                owner: Any = model.get_submodule(group["module_fqn"])
                owner.sparse_params = sparse_params  # torch.ao's convention; lowering reads it
        return model

    def convert(self, module: nn.Module, mapping: dict | None = None, inplace: bool = False,
                **kwargs) -> nn.Module:
        """Lower ``module`` (prepared or squashed); delegates to ``fx_sparsity.convert_fx_sparse``."""
        return convert_fx_sparse(cast(fx.GraphModule, module), mapping, inplace=inplace, **kwargs)

    # -- state
    def state_dict(self) -> dict[str, Any]:
        """``{"state": {tensor_fqn: {"mask": ..., **state}}, "groups": [...]}``, torch.ao.pruning's format.

        ``self.state`` holds what a sparsifier keeps per tensor (as in torch.ao, not the masks:
        they are buffers of the prepared module); the state dict adds each live mask, so it
        restores a sparsifier on its own.
        """
        groups = [{k: _plain(v) for k, v in g.items() if k not in KEYS_NOT_IN_STATE_DICT} for g in self.groups]
        # A plain dict, not torch.ao's defaultdict: torch.load's default weights_only=True refuses defaultdict.
        state = {}
        for fqn in dict.fromkeys([g["tensor_fqn"] for g in self.groups] + list(self.state)):
            entry = dict(self.state.get(fqn, {}))
            live = mask_or_none(self.model, mask_fqn_for(fqn))
            if live is not None:
                entry["mask"] = live
            if entry:
                state[fqn] = entry
        return {"state": state, "groups": groups}

    def load_state_dict(self, state_dict: dict[str, Any], strict: bool = True) -> None:
        """Load masks and groups (ours or a torch.ao.pruning sparsifier's) into the prepared module."""
        model = self._require_prepared("load_state_dict")
        check_sparsifier_state(state_dict, type(self).__name__)
        groups = copy.deepcopy(state_dict["groups"])
        needed = [k for k in self.defaults if k != "sparsity_level"]
        foreign = sorted({k for g in groups for k in needed if k not in g})
        if foreign:
            raise RuntimeError(f"Error loading into {type(self).__name__}: the saved groups have no {foreign} (a state "
                               f"dict of another sparsifier type?); load it into the sparsifier that saved it")
        state: defaultdict[str, dict] = defaultdict(dict)
        copies = []  # every entry is checked before any mask is written: a failed load changes nothing
        for fqn, s in state_dict["state"].items():
            kept = {k: v for k, v in s.items() if k != "mask"}
            if kept:
                state[fqn] = kept
            mask = s.get("mask")
            live = mask_or_none(model, mask_fqn_for(fqn))
            if live is None:
                if strict:
                    raise RuntimeError(
                        f"Error loading '{fqn}' into the model: it has no mask there (not in this prepared "
                        f"module's config, or squashed). Pass strict=False to skip it.")
                continue
            if mask is not None:
                mask = torch.as_tensor(mask)
                if mask.shape != live.shape:
                    raise RuntimeError(
                        f"Error loading '{fqn}': saved mask has shape {tuple(mask.shape)}, this model's "
                        f"tensor has {tuple(live.shape)} (a state dict from another model?)")
                copies.append((live, mask))
        for group in groups:
            info = get_arg_info_from_tensor_fqn(model, group["tensor_fqn"])
            if info["module"] is None and strict:
                raise RuntimeError(f"Error loading group '{group['tensor_fqn']}': no such tensor in the model")
            group.update(info)
        with torch.no_grad():
            for live, mask in copies:
                live.copy_(mask)
        self.groups, self.state = groups, state
        self._publish()  # the module's printed config follows the loaded groups


def _plain(value: Any) -> Any:
    """A numpy scalar (a level from ``np.linspace``) as the Python number it is: ``weights_only`` loads those."""
    return value.item() if type(value).__module__ == "numpy" and hasattr(value, "item") else value


def check_sparsifier_state(state_dict: Any, into: str) -> None:
    """A clear error for something that is not a sparsifier's ``state_dict()`` (the model's, a checkpoint)."""
    if not isinstance(state_dict, dict) or "state" not in state_dict or "groups" not in state_dict:
        keys = list(state_dict)[:4] if isinstance(state_dict, dict) else type(state_dict).__name__
        raise RuntimeError(f"{into}.load_state_dict expects a sparsifier's state_dict() (keys 'state' and 'groups'), "
                           f"got {keys}: the model's state_dict goes to the prepared model's load_state_dict")

