"""The component registries, the presets, and how a run's components and hyperparameters are resolved.

One training step of worker block X [n_local, d] (x <- ... - lr * U):

    losses, G = oracle(workers, X, batch, ctx)     # gradient(s) at the rows of X
    X_next    = rule.step(X, G, optimizer, ctx)     # communication + local update

The interfaces are stated in bench/spec.py. A run uses one gradient oracle (--grad), one local
optimizer (--opt) and one communication rule (--comm); a preset (--algo) names the three and
may set some of their parameters. A component-valued parameter (Param(registry=...)) brings in
the component it names, with its own parameters.

Hyperparameter resolution, for the active components (lowest precedence first):
    the component's defaults < the preset's values < the user's short names ("rho")
    < the user's full names ("sam.rho")
A short name sets the parameter in every active component that declares it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any, Iterable

import torch

from bench.errors import UserError
from bench.registry import Registry, unknown_name
from bench.spec import Active, BuildContext

ORACLES: Registry = Registry("gradient oracle")
OPTIMIZERS: Registry = Registry("local optimizer")
RULES: Registry = Registry("communication rule")
PRESETS: Registry = Registry("algorithm")
KINDS = {"grad": ORACLES, "opt": OPTIMIZERS, "comm": RULES}  # the three choices of a run (its config fields)


@dataclass(frozen=True)
class Preset:
    grad: str
    opt: str
    comm: str
    params: dict = field(default_factory=dict)  # parameter values of this preset (short or full names)

    def __str__(self) -> str:
        extra = "".join(f", {k}={v}" for k, v in self.params.items())
        return f"grad={self.grad}, opt={self.opt}, comm={self.comm}{extra}"


def preset(name: str, grad: str, opt: str, comm: str, help: str, **params) -> None:
    PRESETS.register(name, help)(Preset(grad, opt, comm, {k.replace("__", "."): v for k, v in params.items()}))


@dataclass
class StepContext:
    step: int
    lr: float
    lr_max: float
    comm: Any  # bench.comm backend: allreduce_mean, mix, mean, sum; .workers = global ids of local rows
    seed: int


# ----------------------------------------------------------------------------------------------
# parameter names


def registries() -> Iterable[Registry]:
    """Every registry whose components declare parameters (the three kinds, and those they name)."""
    seen, todo = [], list(KINDS.values())
    while todo:
        reg = todo.pop(0)
        if any(reg is r for r in seen):
            continue
        seen.append(reg)
        for name in reg:
            todo += [p.registry for p in reg.get(name).params if p.registry is not None]
    return seen


def all_components() -> list[type]:
    return [reg.get(name) for reg in registries() for name in reg]


def declared(key: str) -> list[tuple[type, Any]]:
    """(component class, Param) pairs a parameter key names: "sam.rho" one, "rho" every declaring component."""
    comp, dot, name = key.rpartition(".")
    out = []
    for cls in all_components():
        if dot and cls.name != comp:
            continue
        out += [(cls, p) for p in cls.params if p.name == name]
    return out


def normalize_key(key: str) -> str:
    comp, dot, name = key.strip().rpartition(".")
    return f"{comp}{dot}{name.replace('-', '_')}"


def check_key(key: str, where: str = "option") -> str:
    """The normalized key, or a one-line UserError if no registered component declares it."""
    k = normalize_key(key)
    if declared(k):
        return k
    comp, dot, name = k.rpartition(".")
    if dot:
        comps = [c for c in all_components() if c.name == comp]
        if not comps:
            raise UserError(unknown_name(f"{where} {key!r}: component", comp, sorted({c.name for c in all_components()})))
        raise UserError(unknown_name(f"{where} {key!r}: parameter of {comp}", name, [p.name for p in comps[0].params])
                        if comps[0].params else f"{where} {key!r}: {comp} has no parameters")
    names = sorted({p.name for c in all_components() for p in c.params})
    raise UserError(unknown_name(where, key, names))


# ----------------------------------------------------------------------------------------------
# resolution


@dataclass
class Resolved:
    active: list[Active]
    values: dict  # full name -> value, every parameter of every active component
    unused: list[str]  # the user's keys that no active component declares


def resolve(grad: str, opt: str, comm: str, preset_params: dict, user: Iterable[tuple[str, Any]]) -> Resolved:
    """The active components and their parameter values (see the module docstring).

    Values are coerced to each parameter's type; ranges are checked by validate().
    """
    user = [(check_key(k), v) for k, v in user]
    layers = [[(check_key(k, "preset parameter"), v) for k, v in preset_params.items()], user]
    active = [Active(kind, name, reg.get(name)) for kind, reg, name in
              (("grad", ORACLES, grad), ("opt", OPTIMIZERS, opt), ("comm", RULES, comm))]
    values: dict = {}
    i = 0
    while i < len(active):  # component-valued parameters add components as they are resolved
        a = active[i]
        for p in a.cls.params:
            full = f"{a.name}.{p.name}"
            v = p.default
            for layer in layers:
                for specific in (False, True):
                    for k, val in layer:
                        if ("." in k) == specific and k in (p.name, full):
                            v = p.coerce(val, f"--{p.name.replace('_', '-')} ({full})")
            values[full] = v
            if p.registry is not None:
                active.append(Active(full, v, p.registry.get(v)))
        i += 1
    names = {a.name for a in active}
    unused = [k for k, _ in user if not any(c.name in names for c, _ in declared(k))]
    return Resolved(active, values, unused)


def own(a: Active, values: dict) -> SimpleNamespace:
    return SimpleNamespace(**{p.name: values[f"{a.name}.{p.name}"] for p in a.cls.params})


def validate(r: Resolved) -> None:
    """Each active component's parameters: their own checks, the component's cross-checks, then the
    checks against the other components (a rule's needs of the optimizer, Component.check_run)."""
    for a in r.active:
        for p in a.cls.params:
            full = f"{a.name}.{p.name}"
            p.validate(r.values[full], f"--{p.name.replace('_', '-')} ({full})")
        a.cls.check(own(a, r.values))
    kinds = {a.kind: a for a in r.active}
    rule, opt = kinds["comm"], kinds["opt"]
    missing = [m for m in getattr(rule.cls, "needs", ()) if not hasattr(opt.cls, m)]
    if missing:
        able = [n for n in OPTIMIZERS if all(hasattr(OPTIMIZERS.get(n), m) for m in rule.cls.needs)]
        raise UserError(f"--comm {rule.name} needs a local optimizer whose weight decay and momentum it can apply "
                        f"itself ({', '.join(missing)}); {opt.name} has not: use --opt {' or '.join(able)}")
    for a in r.active:
        a.cls.check_run(r.values)


@dataclass
class Algorithm:
    oracle: Any
    optimizer: Any
    rule: Any
    parts: dict = field(default_factory=dict)  # every built component by its kind (for checkpoints)

    def step(self, workers, X: torch.Tensor, x: torch.Tensor, y: torch.Tensor, ctx: StepContext):
        P = self.rule.query(X)  # where the gradients are taken: X itself, or push-sum's x / w
        losses, G = self.oracle(workers, P, x, y, ctx)
        return losses, self.rule.step(X, G, self.optimizer, ctx)

    def state_dict(self) -> dict:
        return {kind: c.state_dict() for kind, c in self.parts.items()}

    def load_state_dict(self, state: dict) -> None:
        for kind, c in self.parts.items():
            c.load_state_dict(state[kind])


def build(r: Resolved, ctx: BuildContext) -> Algorithm:
    """Instantiate the active components, those named by a parameter first (their instance is then
    the value of that parameter in its owner's hp)."""
    built: dict = {}
    for a in reversed(r.active):
        hp = own(a, r.values)
        for p in a.cls.params:
            if p.registry is not None:
                setattr(hp, p.name, built[f"{a.name}.{p.name}"])
        built[a.kind] = a.cls(hp, ctx)
    return Algorithm(built["grad"], built["opt"], built["comm"], built)
