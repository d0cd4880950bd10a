"""Algorithms = gradient oracle x local optimizer x communication rule.

Each component is one file of this package that registers itself and declares its
parameters (bench/spec.py states the contract); a named algorithm is a preset of the
three choices, registered next to its rule (`dsgdbench list algorithms`). Any other
combination works through flags, e.g. --algo dsgd --grad sam is decentralized SAM.
"""

from algorithms.base import KINDS, ORACLES, OPTIMIZERS, PRESETS, RULES, StepContext  # noqa: F401
from bench.registry import import_submodules, load_plugins

import_submodules("algorithms")
load_plugins()  # DSGDBENCH_PLUGINS: components and presets outside the package
