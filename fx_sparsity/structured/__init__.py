"""Structured pruning: channel groups found in the graph, masked, then cut out of the model."""
from .groups import ChannelGroup, find_channel_groups
from .pruner import BaseStructuredSparsifier, FPGMPruner, SaliencyPruner

__all__ = ["ChannelGroup", "find_channel_groups", "BaseStructuredSparsifier", "SaliencyPruner", "FPGMPruner"]
