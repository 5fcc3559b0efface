"""The CNN feature pipeline's network: CNP stages (correlate, activate, pool), flatten, specs and files."""

from __future__ import annotations

from rmidl.network._archive import (
    load_network,
    network_from_parts,
    network_parts,
    resolve_network,
    save_network,
)
from rmidl.network._network import Network, NetworkSummary, StageSummary
from rmidl.network._spec import PRESETS, parse_spec
from rmidl.network._stage import ACTIVATION_NAMES, POOL_NAMES, Stage, StageShapes

__all__ = [
    "ACTIVATION_NAMES",
    "POOL_NAMES",
    "PRESETS",
    "Network",
    "NetworkSummary",
    "Stage",
    "StageShapes",
    "StageSummary",
    "load_network",
    "network_from_parts",
    "network_parts",
    "parse_spec",
    "resolve_network",
    "save_network",
]
