"""Mixing matrices W(t) for decentralized SGD, one module per graph family.

Importing this package registers every family in TOPOLOGIES; build one with
``get_topology("torus:4x8", n=32)``.
"""

from bench.registry import import_submodules
from topologies.base import (
    TOPOLOGIES,
    Topology,
    get_topology,
    is_connected,
    metropolis_hastings,
    parse_spec,
    supports,
    validate_matrix,
)

import_submodules("topologies")

__all__ = [
    "TOPOLOGIES",
    "Topology",
    "get_topology",
    "is_connected",
    "metropolis_hastings",
    "parse_spec",
    "supports",
    "validate_matrix",
]
