"""The contract between the core and its plug-ins.

A plug-in is one file: a class registered in one of the registries (algorithms.ORACLES,
OPTIMIZERS, RULES, topologies.TOPOLOGIES) that declares everything the core may ask of it.
Nothing about a plug-in is written anywhere else: its command-line flags, its TOML keys, its
lines in `dsgdbench list components`, its part of a run's identity and the generic tests all
come from these declarations.

Parameters. A component declares `params`, a tuple of Param: name, default (whose type is the
parameter's type: bool, int, float, str or a tuple of floats), one-line help, and the check
its value must pass. A parameter's full name is `<component>.<name>` ("sam.rho"); the short
name ("rho", the flag --rho) sets it in every component of a run that declares it. Every
float must be finite. A component may add cross-parameter checks in `check(hp)`.

    @ORACLES.register("sam", "gradient at x + rho g/||g|| (2 gradients/step)")
    class SAM(Component):
        params = (Param("rho", 0.05, "SAM radius", check=positive),
                  Param("adaptive", False, "ASAM: scale the perturbation by |x|"))

        def __init__(self, hp, ctx):      # hp.rho, hp.adaptive: validated values
            ...

Construction. Every component is built as cls(hp, ctx): hp holds its own parameters as
attributes, ctx is a BuildContext (the model's parameter layout, the local worker count,
the device, the run's length and schedule, the topology if there is one).

State. `state_keys` names the attributes that change during training (momentum buffers,
step counters); state_dict()/load_state_dict() save and restore exactly those.

The interfaces (typing.Protocol, checked by the generic tests):

  Oracle          grad_evals: gradient evaluations per worker per step
                  __call__(workers, X, x, y, ctx) -> (losses [n], G [n, d]); G at the rows of X
  LocalOptimizer  direction(X, G) -> U [n, d]: the step is x <- x - lr U
  Rule            needs_topology: whether it mixes over a graph (else the run has none)
                  topology_kind: "doubly" (W doubly stochastic) or "column" (column-stochastic W
                  of a directed graph is enough: push-sum)
                  needs: methods the local optimizer must have ("decayed", "momentum": SGD's
                  weight decay and momentum taken apart, for rules that track or rebuild them)
                  query(X) -> the points where gradients are taken (X; push-sum: x / w)
                  step(X, G, optimizer, ctx) -> X_next: communication and the local update
                  sends_per_step(n, topology) -> model-sized messages one worker sends per step,
                  averaged over the run; bytes_per_step(n, topology, d, element_size) -> bytes
                  log(ctx) -> {name: float}: per-step quantities recorded in metrics.csv
  Topology        a family's factory (n, arg) -> topologies.Topology; supports(n) says which
                  worker counts it can form (None) or why not (a message)
  Comm            allreduce_mean(G), mix(X, t), mean(X), sum(v); workers, n, rank, world_size;
                  mix_payload(payload, decode, t) = W(t) decode(payload) for messages that are not
                  the rows themselves (compressed: values and indices), bytes counted as sent
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any, Callable, Optional, Protocol, runtime_checkable

import torch

from bench.errors import UserError

# ----------------------------------------------------------------------------------------------
# parameters


@dataclass(frozen=True)
class Check:
    """A predicate on a value and the phrase that says what it requires ("must be > 0")."""

    ok: Callable[[Any], bool]
    requires: str

    def __call__(self, v) -> bool:
        return bool(self.ok(v))


def between(lo: float | None = None, hi: float | None = None, lo_open: bool = False, hi_open: bool = False) -> Check:
    """lo <(=) v <(=) hi; None is an open end."""
    def ok(v):
        return ((lo is None or (v > lo if lo_open else v >= lo)) and
                (hi is None or (v < hi if hi_open else v <= hi)))

    if hi is None:
        text = f"must be {'>' if lo_open else '>='} {lo:g}"
    elif lo is None:
        text = f"must be {'<' if hi_open else '<='} {hi:g}"
    else:
        text = f"must be in {'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}"
    return Check(ok, text)


positive = between(0, lo_open=True)
non_negative = between(0)
unit_interval = between(0, 1)
probability_open = between(0, 1, hi_open=True)  # [0, 1): momentum, betas


@dataclass(frozen=True)
class Param:
    """One hyperparameter of a component. Its type is the type of its default."""

    name: str
    default: Any
    help: str
    check: Optional[Check] = None
    choices: tuple = ()
    length: int = 0  # tuples: the number of values (0 = any)
    registry: Any = None  # a component-valued parameter: the name of a component of this registry

    @property
    def type(self) -> type:
        return tuple if isinstance(self.default, tuple) else type(self.default)

    def describe_type(self) -> str:
        if self.choices:
            return "|".join(map(str, self.choices))
        if self.type is tuple:
            return f"{self.length or 'N'} numbers"
        return self.type.__name__

    def coerce(self, v: Any, where: str) -> Any:
        """A value from Python / TOML / JSON as this parameter's type (no range check)."""
        t = self.type
        bad = UserError(f"{where}: expected {self.describe_type()}, got {v!r}")
        if t is bool:
            if not isinstance(v, bool):
                raise bad
            return v
        if isinstance(v, bool):
            raise bad
        if t is int:
            if isinstance(v, float) and v.is_integer():
                v = int(v)
            if not isinstance(v, int):
                raise bad
            return v
        if t is float:
            if not isinstance(v, (int, float)):
                raise bad
            return float(v)
        if t is str:
            if isinstance(v, (int, float)):  # e.g. a fraction written as a TOML number
                return str(v)
            if not isinstance(v, str):
                raise bad
            return v
        if t is tuple:
            if not isinstance(v, (list, tuple)) or not all(isinstance(x, (int, float)) and not isinstance(x, bool)
                                                           for x in v):
                raise bad
            return tuple(float(x) for x in v)
        return v

    def parse(self, text: str, where: str) -> Any:
        """A value from command-line text."""
        t, s = self.type, text.strip()
        try:
            if t is bool:
                if s.lower() in ("true", "1", "yes", "on"):
                    return True
                if s.lower() in ("false", "0", "no", "off"):
                    return False
                raise ValueError
            if t is int:
                return int(s)
            if t is float:
                return float(s)
            if t is tuple:
                return tuple(float(x) for x in s.split(",") if x.strip())
        except ValueError:
            raise UserError(f"{where}: expected {self.describe_type()}, got {text!r}") from None
        return s

    def validate(self, v: Any, where: str) -> None:
        """Raise a one-line UserError unless v is a valid value."""
        floats = [v] if isinstance(v, float) else list(v) if isinstance(v, tuple) else []
        if any(not math.isfinite(x) for x in floats):
            raise UserError(f"{where} must be finite (got {_show(v)})")
        if self.choices and v not in self.choices:
            raise UserError(f"{where} {v!r}: valid: {', '.join(map(str, self.choices))}")
        if self.length and len(v) != self.length:
            raise UserError(f"{where}: give exactly {self.length} numbers (got {_show(v)})")
        if self.check is not None and not all(self.check(x) for x in (v if isinstance(v, tuple) else [v])):
            raise UserError(f"{where} {self.check.requires} (got {_show(v)})")
        if self.registry is not None:
            self.registry.get(v)


def _show(v) -> str:
    return ",".join(f"{x:g}" for x in v) if isinstance(v, tuple) else f"{v:g}" if isinstance(v, float) else repr(v)


# ----------------------------------------------------------------------------------------------
# components


@dataclass
class BuildContext:
    """What a component may know when it is built (the same on every rank)."""

    layout: Any  # bench.workers.ParamLayout of the model
    n_local: int  # workers on this process
    n: int  # workers in all
    device: torch.device
    dtype: torch.dtype
    total_steps: int
    epoch_len: float  # steps per epoch, N / B
    warmup: int
    lr_at: Callable[[int], float]  # the learning-rate schedule, step -> lr
    seed: int
    topology: Any = None


class Component:
    """Base class of every plug-in: declared parameters, validation, state."""

    name: str = ""  # set by the registry
    params: tuple = ()
    state_keys: tuple = ()

    @classmethod
    def param(cls, name: str) -> Param:
        for p in cls.params:
            if p.name == name:
                return p
        raise KeyError(name)

    @classmethod
    def defaults(cls) -> dict:
        return {p.name: p.default for p in cls.params}

    @classmethod
    def check(cls, hp: SimpleNamespace) -> None:
        """Cross-parameter checks (raise UserError); each parameter's own check has passed."""

    @classmethod
    def check_run(cls, values: dict) -> None:
        """Checks against the other components of the run: values holds every active parameter by full name."""

    def state_dict(self) -> dict:
        return {k: getattr(self, k) for k in self.state_keys}

    def load_state_dict(self, state: dict) -> None:
        for k in self.state_keys:
            v = state[k]
            cur = getattr(self, k, None)
            if isinstance(v, torch.Tensor) and isinstance(cur, torch.Tensor):
                cur.copy_(v)
            else:
                setattr(self, k, v.clone() if isinstance(v, torch.Tensor) else v)


class RuleBase(Component, ABC):
    """Defaults of a communication rule (see Rule below); a rule states what it sends per step."""

    needs_topology = False
    topology_kind = "doubly"
    needs: tuple = ()

    def query(self, X: torch.Tensor) -> torch.Tensor:
        return X

    def log(self, ctx) -> dict:
        return {}

    @abstractmethod
    def sends_per_step(self, n: int, topology) -> float:
        """Model-sized messages one worker sends per step (averaged over the run)."""

    def bytes_per_step(self, n: int, topology, d: int, element_size: int) -> float:
        return self.sends_per_step(n, topology) * d * element_size


# ----------------------------------------------------------------------------------------------
# the interfaces


@runtime_checkable
class Oracle(Protocol):
    grad_evals: int

    def __call__(self, workers, X: torch.Tensor, x: torch.Tensor, y: torch.Tensor, ctx) -> tuple: ...


@runtime_checkable
class LocalOptimizer(Protocol):
    def direction(self, X: torch.Tensor, G: torch.Tensor) -> torch.Tensor: ...


@runtime_checkable
class Rule(Protocol):
    needs_topology: bool
    topology_kind: str
    needs: tuple

    def query(self, X: torch.Tensor) -> torch.Tensor: ...

    def step(self, X: torch.Tensor, G: torch.Tensor, optimizer, ctx) -> torch.Tensor: ...

    def sends_per_step(self, n: int, topology) -> float: ...

    def bytes_per_step(self, n: int, topology, d: int, element_size: int) -> float: ...

    def log(self, ctx) -> dict: ...


@runtime_checkable
class Comm(Protocol):
    n: int
    rank: int
    world_size: int
    workers: range

    def allreduce_mean(self, G: torch.Tensor) -> torch.Tensor: ...

    def mix(self, X: torch.Tensor, t: int) -> torch.Tensor: ...

    def mix_payload(self, payload: dict, decode: Callable, t: int) -> torch.Tensor: ...

    def mean(self, X: torch.Tensor) -> torch.Tensor: ...

    def sum(self, v: torch.Tensor) -> torch.Tensor: ...


class TopologyFamily(Protocol):
    def __call__(self, n: int, arg: Optional[str]): ...

    def supports(self, n: int) -> Optional[str]: ...


@dataclass(frozen=True)
class Active:
    """One component a run uses: its kind (grad, opt, comm, or the parameter that chose it), name, class."""

    kind: str
    name: str
    cls: type = field(compare=False)
