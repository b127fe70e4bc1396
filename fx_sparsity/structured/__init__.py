"""Structured pruning: channel groups found in the graph, masked, then cut out of the model.

``ChannelRule`` (with ``register_channel_rule``) teaches the channel analysis a layer or op of your own.
"""
from __future__ import annotations

from typing import Any

from torch import fx

from ..passes.channels import (
    ChannelAnalysis,
    ChannelGroup,
    ChannelRule,
    ChannelRuleError,
    register_channel_rule,
    unregister_channel_rule,
)
from ..pipeline.channels import analyse
from .pruner import BaseStructuredSparsifier, FPGMPruner, SaliencyPruner

__all__ = ["ChannelGroup", "ChannelAnalysis", "find_channel_groups", "BaseStructuredSparsifier", "SaliencyPruner",
           "FPGMPruner", "ChannelRule", "ChannelRuleError", "register_channel_rule", "unregister_channel_rule"]


def find_channel_groups(gm: fx.GraphModule, example_inputs: Any) -> list[ChannelGroup]:
    """The channel groups of a traced model, followed on ``example_inputs`` (a tuple or a dict of keyword inputs):
    what a structured pruner would find (``prunable``, ``problem`` and ``normalized`` say what it may cut)."""
    return analyse(gm, example_inputs).groups
