"""RunConfig: one training run, frozen, validated, hashable.

A run's configuration is
  - the core fields below, each declared once with its help text, its role and its flags
    (the command line, TOML suites and `--config` files are generated from them):
      workload    what is trained on what: data, model, partition, workers, batch, length, seed
      algorithm   which preset and components, the topology, the learning-rate schedule
      evaluation  what is measured and how often
      numerics    the floating-point precision
      execution   where and how it runs (device, executor, backend, folders): never part of
                  the run's identity
  - `params`: the hyperparameters of its components, declared by the components themselves
    (bench/spec.py). Given as short ("rho") or full ("sam.rho") names; after resolve() it
    holds the full name and value of every parameter of every active component.

`resolve()` fills what depends on the data set and the preset (the model, the components,
steps from epochs, the linearly scaled lr, the parameters, the content hashes of the files
the run reads); the resolved configuration is what config.json holds.

Identity. `run_id()` and `config_id()` hash `identity()`: the semantic core fields and active
parameters whose values differ from their declared defaults, plus the SHA-256 of every file
the run reads (an `--init` state_dict, a `file:` topology) in place of its path. So adding a
component, or a parameter with a default, changes no existing id; a C-SGD run does not depend
on SAM's rho; overwriting W.npy with other weights is a new run. Fields that a resolved run
no longer uses are left out: epochs (steps counts), lr_scaling and ref_batch (the lr is
final), milestones unless the schedule is multistep. The declared defaults are pinned, with
a fixed set of ids, by tests/test_identity.py.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
from dataclasses import dataclass, field, fields
from typing import Any, Optional

from bench.errors import UserError
from bench.registry import unknown_name

WORKLOAD, ALGORITHM, EVALUATION, NUMERICS, EXECUTION = "workload", "algorithm", "evaluation", "numerics", "execution"
SEMANTIC_ROLES = (WORKLOAD, ALGORITHM, EVALUATION, NUMERICS)

SCHEDULES = ("constant", "multistep", "cosine")
DEVICES = ("cpu", "cuda")
PRECISIONS = ("fp32", "bf16", "fp64")
EXECUTORS = ("auto", "native", "vmap", "loop")
BACKENDS = ("simulated", "dist")
FORMAT = 2  # config.json layout: core fields, "params" (full names), "files" (content hashes)
MAX_SEEDS = 10000  # a --seeds range longer than this is a typo, not an experiment
# Names users reach for that are spelled otherwise here (the did-you-mean of an unknown option).
ALIASES = {"learning_rate": "lr", "lr_schedule": "schedule", "batch_size": "batch", "num_workers": "workers",
           "n_workers": "workers", "n": "workers", "num_steps": "steps", "iterations": "steps", "wd": "weight_decay",
           "topo": "topology", "algorithm": "algo", "optimizer": "opt"}


def core_field(default, help: str, role: str, flags: tuple = ()):
    """A core field: its default, one-line help, role and command-line flags (default --name)."""
    return field(default=default, metadata={"help": help, "role": role, "flags": flags})


@dataclass(frozen=True)
class RunConfig:
    # what is compared
    algo: str = core_field("dsgd", "Algorithm preset (dsgdbench list algorithms).", ALGORITHM)
    topology: str = core_field("ring", "Topology of the rules that mix over a graph, e.g. ring, torus:4x4, random:p=0.3, "
                                "file:W.npy.", ALGORITHM)
    workers: int = core_field(16, "Number of workers n.", WORKLOAD, ("--workers", "-n"))
    dataset: str = core_field("mnist1d", "Data set (dsgdbench list datasets).", WORKLOAD)
    model: Optional[str] = core_field(None, "Model (default: the data set's), or timm:<name>.", WORKLOAD)
    partition: str = core_field("iid", "iid or dirichlet:ALPHA (non-IID shards).", WORKLOAD)
    seed: int = core_field(0, "Seed (data order, initialisation, noise).", WORKLOAD)
    init: Optional[str] = core_field(None, "Start every worker from this state_dict file (matching tensors).", WORKLOAD)
    augment: bool = core_field(False, "Random crop (pad 4) + horizontal flip on the device (images).", WORKLOAD)
    precision: str = core_field("fp32", "fp32, bf16 (autocast; parameters and mixing stay fp32) or fp64 (everything).",
                         NUMERICS)
    # components (None: the preset's)
    grad: Optional[str] = core_field(None, "Gradient oracle override (dsgdbench list components).", ALGORITHM)
    opt: Optional[str] = core_field(None, "Local optimizer override.", ALGORITHM)
    comm: Optional[str] = core_field(None, "Communication rule override.", ALGORITHM)
    # training length and batch
    batch: int = core_field(32, "Batch per worker (total batch = workers x batch).", WORKLOAD)
    steps: Optional[int] = core_field(None, "Training steps (overrides --epochs).", WORKLOAD)
    epochs: float = core_field(150.0, "Epochs: passes over the training set at the total batch.", WORKLOAD)
    # learning rate
    lr: float = core_field(0.2, "Peak learning rate.", ALGORITHM)
    lr_scaling: str = core_field("none", "none or linear (lr x total_batch / ref_batch).", ALGORITHM)
    ref_batch: int = core_field(128, "Reference batch for --lr-scaling linear.", ALGORITHM)
    schedule: str = core_field("cosine", "constant, multistep or cosine.", ALGORITHM)
    milestones: tuple = core_field((0.5, 0.75), "multistep: fractions of training, e.g. 0.5,0.75.", ALGORITHM)
    warmup: int = core_field(0, "Linear warmup steps.", ALGORITHM)
    # evaluation
    eval_every: int = core_field(0, "Evaluate every N steps (0: ~10 times); always at the end.", EVALUATION)
    eval_train_samples: int = core_field(2048, "Training samples of the fixed subset for train loss/accuracy.", EVALUATION)
    val_fraction: float = core_field(0.0, "Hold out this fraction of the training set for validation "
                                   "(compare --tune picks on it).", WORKLOAD)
    hessian: bool = core_field(True, "Top Hessian eigenvalues (plain and adaptive) at the end.", EVALUATION)
    hessian_method: str = core_field("lanczos", "lanczos or power.", EVALUATION)
    hessian_samples: int = core_field(0, "Training samples of the Hessian (0: all if <= 5000, else 2048).", EVALUATION)
    hessian_trace: bool = core_field(False, "Also the Hutchinson trace.", EVALUATION)
    stop_on_collapse: bool = core_field(True, "End a run after two consecutive evaluations at chance (status "
                                              "collapsed; bench/runner.py states the rule).", EVALUATION)
    # where and how (not part of the run id)
    device: str = core_field("cpu", "cpu or cuda.", EXECUTION)
    executor: str = core_field("auto", "auto, native (packed batched model), vmap (torch.func) or loop.", EXECUTION)
    channels_last: bool = core_field(False, "NHWC memory format (image models).", EXECUTION)
    compile: bool = core_field(False, "torch.compile the forward where it helps.", EXECUTION)
    results: str = core_field("results", "Results folder.", EXECUTION)
    data_dir: Optional[str] = core_field(None, "Folder holding image data sets (CIFAR).", EXECUTION)
    download: bool = core_field(False, "Allow downloading CIFAR into --data-dir.", EXECUTION)
    backend: str = core_field("simulated", "simulated (all workers in this process) or dist (torch.distributed).",
                       EXECUTION)
    procs: int = core_field(1, "--backend dist: start P local processes (P must divide --workers).", EXECUTION)
    dist_timeout: float = core_field(120.0, "--backend dist: seconds before a stalled collective fails.", EXECUTION)
    checkpoint_every: int = core_field(0, "Checkpoint every N steps (0: about every 10% of the run); also after "
                                          "every 5 minutes of training.", EXECUTION)
    keep_checkpoint: bool = core_field(False, "Keep the last checkpoint when the run finishes.", EXECUTION)
    deterministic: bool = core_field(False, "torch deterministic algorithms (and the cuDNN settings they need).",
                                     EXECUTION)
    # component hyperparameters and file hashes (see the module docstring)
    params: tuple = field(default=(), metadata={"role": "params"})
    files: tuple = field(default=(), metadata={"role": "files"})
    resolved: bool = field(default=False, metadata={"role": "state"}, compare=False)

    # ------------------------------------------------------------------ building
    @classmethod
    def core(cls, role: str | None = None) -> list[dataclasses.Field]:
        """The core fields (optionally of one role), in declaration order."""
        return [f for f in fields(cls) if f.metadata.get("role") in (SEMANTIC_ROLES + (EXECUTION,))
                and (role is None or f.metadata["role"] == role)]

    @classmethod
    def core_names(cls) -> set[str]:
        return {f.name for f in cls.core()}

    @classmethod
    def of(cls, **kw) -> "RunConfig":
        """RunConfig(**core fields) with any other keyword as a component parameter (rho=0.1, **{"sam.rho": 0.1})."""
        return cls().replace(**kw)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "RunConfig":
        """From TOML / JSON: core fields (type-checked), component parameters by short or full name,
        a nested table per component ([base.sam] rho = 0.1, or sam.rho = 0.1), config.json's
        "params" and "files"."""
        from algorithms.base import check_key

        core = {f.name: f for f in cls.core()}
        kw, params = {}, []
        for k, v in d.items():
            key = k.replace("-", "_")
            if key in ("format", "resolved"):
                continue
            if key in core:
                kw[key] = _coerce(key, core[key].type, v)
            elif key == "params" and isinstance(v, dict):
                params += list(v.items())
            elif key == "files" and isinstance(v, dict):
                kw["files"] = tuple(sorted(v.items()))
            elif isinstance(v, dict):  # a table of one component's parameters
                params += [(f"{k}.{name}", val) for name, val in v.items()]
            else:
                if "." not in key and not _is_param(key):
                    hint = f" (did you mean {ALIASES[key]!r}?)" if key in ALIASES else ""
                    raise UserError(unknown_name("option", k, sorted(core) + _param_names()) + hint
                                    if not hint else f"unknown option {k!r}{hint}")
                params.append((k, v))
        for k, _ in params:
            check_key(k)
        if "params" in d:
            kw["resolved"] = bool(d.get("resolved", False))
        return cls(**kw).with_params(params)

    def with_params(self, items) -> "RunConfig":
        """These parameter values added (a key given again replaces the earlier value), each checked
        to name a declared parameter and coerced to its type."""
        merged = dict(self.params)
        for k, v in items:
            key, value = _param_value(k, v)
            merged[key] = value
        return dataclasses.replace(self, params=tuple(merged.items()))

    def replace(self, **kw) -> "RunConfig":
        """A copy with these fields; keywords that are not core fields are component parameters.

        Changing anything but an execution field of a resolved configuration un-resolves it.
        """
        core = self.core_names() | {"params", "files", "resolved"}
        params = [(k, v) for k, v in kw.items() if k not in core]
        fields_kw = {k: v for k, v in kw.items() if k in core}
        execution = {f.name for f in self.core(EXECUTION)}
        if self.resolved and "resolved" not in kw and (params or set(fields_kw) - execution):
            fields_kw["resolved"] = False
        cfg = dataclasses.replace(self, **fields_kw)
        return cfg.with_params(params) if params else cfg

    def to_dict(self) -> dict[str, Any]:
        d = {f.name: list(getattr(self, f.name)) if isinstance(getattr(self, f.name), tuple) else getattr(self, f.name)
             for f in self.core()}
        d["params"] = {k: list(v) if isinstance(v, tuple) else v for k, v in self.params}
        d["files"] = dict(self.files)
        d["format"] = FORMAT
        d["resolved"] = self.resolved
        return d

    # ------------------------------------------------------------------ components
    @property
    def preset(self):
        from algorithms import PRESETS

        return PRESETS.get(self.algo)

    def component(self, kind: str) -> str:
        """The name of the grad, opt or comm component this run uses (its own, else the preset's)."""
        return getattr(self, kind) or getattr(self.preset, kind)

    def hyper(self):
        """algorithms.base.Resolved: the active components and every parameter value."""
        from algorithms.base import resolve

        return resolve(self.component("grad"), self.component("opt"), self.component("comm"),
                       self.preset.params, self.params)

    def needs_topology(self) -> bool:
        from algorithms import RULES

        return RULES.get(self.component("comm")).needs_topology

    def build_topology(self):
        """The validated Topology of this run (None when its rule mixes over no graph)."""
        import topologies
        from algorithms import RULES

        if not self.needs_topology():
            return None
        return topologies.get_topology(self.topology, self.workers, RULES.get(self.component("comm")).topology_kind)

    def param(self, key: str):
        """A resolved parameter by full name, or by short name if exactly one active component has it."""
        values = dict(self.params) if self.resolved else self.hyper().values
        if key in values:
            return values[key]
        hits = [v for k, v in values.items() if k.rpartition(".")[2] == key]
        if len(hits) != 1:
            raise KeyError(f"{key!r}: {len(hits)} active parameters of that name")
        return hits[0]

    @property
    def total_batch(self) -> int:
        return self.workers * self.batch

    # ------------------------------------------------------------------ validation
    def validate(self) -> "RunConfig":
        """Check names and ranges; raise UserError with one line on the first problem."""
        import algorithms
        import topologies
        from algorithms.base import validate as validate_params
        from bench.data import dataset_info, parse_dirichlet
        from bench.models import MODELS

        for f in self.core():
            v = getattr(self, f.name)
            floats = [v] if isinstance(v, float) else list(v) if isinstance(v, tuple) else []
            if any(not math.isfinite(x) for x in floats):
                raise UserError(f"{_flag(f.name)} must be finite (got {v})")
        algorithms.PRESETS.get(self.algo)
        for kind, reg in algorithms.KINDS.items():
            if getattr(self, kind) is not None:
                reg.get(getattr(self, kind))
        if not self.resolved:
            for k, v in self.params:
                _check_given(k, v)
        validate_params(self.hyper())
        if not (self.topology == "allreduce" and not self.needs_topology()):  # a resolved config.json of C-SGD
            topologies.TOPOLOGIES.get(topologies.parse_spec(self.topology)[0])
        dataset_info(self.dataset)
        if self.model is not None and not self.model.startswith("timm:"):
            MODELS.get(self.model)
        if self.partition != "iid":
            parse_dirichlet(self.partition)
        _choice("schedule", self.schedule, SCHEDULES)
        _choice("lr-scaling", self.lr_scaling, ("none", "linear"))
        _choice("device", self.device, DEVICES)
        _choice("hessian-method", self.hessian_method, ("lanczos", "power"))
        _choice("executor", self.executor, EXECUTORS)
        _choice("precision", self.precision, PRECISIONS)
        _choice("backend", self.backend, BACKENDS)
        if self.init is not None and not os.path.isfile(self.init):
            raise UserError(f"--init {self.init!r}: " + ("is a folder; give a state_dict file" if os.path.isdir(self.init)
                                                          else "no such file"))
        if not isinstance(self.seed, int) or not 0 <= self.seed < 2**32:
            raise UserError(f"--seed must be an integer in [0, 2^32) (got {self.seed})")
        for name in ("workers", "batch", "ref_batch", "procs", "eval_train_samples"):
            _positive_int(name, getattr(self, name))
        if self.steps is not None:
            _positive_int("steps", self.steps)
        elif not self.epochs > 0:
            raise UserError(f"--epochs must be > 0 (got {self.epochs})")
        if not self.lr > 0:
            raise UserError(f"--lr must be > 0 (got {self.lr})")
        if self.warmup < 0:
            raise UserError(f"--warmup must be >= 0 (got {self.warmup})")
        if any(not 0 < m < 1 for m in self.milestones):
            raise UserError(f"--milestones are fractions of training in (0, 1) (got {list(self.milestones)})")
        if not isinstance(self.hessian_samples, int) or self.hessian_samples < 0:
            raise UserError(f"--hessian-samples must be an integer >= 0 (got {self.hessian_samples}); "
                            f"0 = the default rule")
        if self.eval_every < 0:
            raise UserError(f"--eval-every must be >= 0 (got {self.eval_every})")
        if isinstance(self.checkpoint_every, bool) or not isinstance(self.checkpoint_every, int) \
                or self.checkpoint_every < 0:
            raise UserError(f"--checkpoint-every must be an integer >= 0 (got {self.checkpoint_every}); 0 = automatic")
        if not 0 <= self.val_fraction < 1:
            raise UserError(f"--val-fraction must be in [0, 1) (got {self.val_fraction})")
        if not self.dist_timeout > 0:
            raise UserError(f"--dist-timeout must be > 0 seconds (got {self.dist_timeout})")
        if not str(self.results).strip():
            raise UserError("--results is empty; give a folder, e.g. --results results")
        return self

    # ------------------------------------------------------------------ resolution
    def resolve(self, n_train: int, default_model: str) -> "RunConfig":
        """Fill the fields that depend on the data set and the preset (see the module docstring)."""
        from bench.data import epoch_steps

        if self.resolved:
            return self
        r = self.hyper()
        kw: dict[str, Any] = {"resolved": True, "params": tuple(sorted(r.values.items()))}
        if self.model is None:
            kw["model"] = default_model
        for kind in ("grad", "opt", "comm"):
            kw[kind] = self.component(kind)
        if not self.needs_topology():
            kw["topology"] = "allreduce"  # one model: no graph, and it must not split groups
        if self.steps is None:
            kw["steps"] = max(1, round(self.epochs * epoch_steps(n_train, self.total_batch)))
        if self.lr_scaling == "linear":
            kw["lr"] = self.lr * self.total_batch / self.ref_batch
            kw["lr_scaling"] = "none"  # the resolved lr is final
        files = {}
        if self.init is not None:
            files["init"] = file_sha256(self.init, "--init")
        topo = kw.get("topology", self.topology)
        if topo.startswith("file:"):
            files["topology"] = file_sha256(os.path.expanduser(topo[5:]), "topology file")
        kw["files"] = tuple(sorted(files.items()))
        return dataclasses.replace(self, **kw)

    # ------------------------------------------------------------------ identity
    def identity(self, with_seed: bool = True) -> dict[str, Any]:
        """What the run computes (module docstring): non-default semantic fields and parameters, file hashes."""
        if not self.resolved:
            raise ValueError("identity() of an unresolved RunConfig; resolve() it first")
        from algorithms.base import declared

        default = RunConfig()
        out: dict[str, Any] = {}
        for f in self.core():
            if f.metadata["role"] == EXECUTION or f.name in ("epochs", "init", "lr_scaling", "ref_batch"):
                continue
            if f.name == "milestones" and self.schedule != "multistep":
                continue
            if f.name == "seed" and not with_seed:
                continue
            v = getattr(self, f.name)
            if f.name == "topology" and v.startswith("file:"):
                v = "file"  # the content hash stands for it
            if v != getattr(default, f.name) or f.name == "seed":
                out[f.name] = list(v) if isinstance(v, tuple) else v
        for k, v in self.params:
            decl = [p for c, p in declared(k) if f"{c.name}.{p.name}" == k]
            if not decl or v != decl[0].default:
                out[k] = list(v) if isinstance(v, tuple) else v
        for k, h in self.files:
            out[f"file:{k}"] = h
        return out

    def config_id(self) -> str:
        """Hash of everything that defines the experiment except the seed (groups seeds together)."""
        return _hash(self.identity(with_seed=False))

    def run_id(self) -> str:
        topo = self.topology.replace("/", "_").replace(":", "-")[:24]
        return f"{self.algo}-{topo}-n{self.workers}-b{self.batch}-s{self.seed}-{_hash(self.identity())[:8]}"


_dataclass_init = RunConfig.__init__
_FIELD_NAMES = frozenset(f.name for f in fields(RunConfig))


def _init(self, **kw):
    """RunConfig(**fields): any keyword that is not a field is a component parameter, by short or
    full name (RunConfig(algo="sam", rho=0.1), RunConfig(**{"sam.rho": 0.1}))."""
    extra = [_param_value(k, v) for k, v in kw.items() if k not in _FIELD_NAMES]
    _dataclass_init(self, **{k: v for k, v in kw.items() if k in _FIELD_NAMES})
    if extra:
        object.__setattr__(self, "params", tuple({**dict(self.params), **dict(extra)}.items()))


RunConfig.__init__ = _init


def file_sha256(path: str, what: str = "file") -> str:
    if not os.path.isfile(path):
        raise UserError(f"{what} {path!r} does not exist" if not os.path.exists(path) else
                        f"{what} {path!r} is not a regular file")
    h = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    except OSError as e:
        raise UserError(f"cannot read {path!r} ({e.strerror})") from None
    return h.hexdigest()


def _param_value(key: str, v: Any) -> tuple[str, Any]:
    """(normalized key, value coerced to the parameter's type); a short name declared with several
    types takes the first type that accepts the value."""
    from algorithms.base import check_key, declared

    k = check_key(key)
    first = None
    for c, p in declared(k):
        try:
            return k, p.coerce(v, f"--{p.name.replace('_', '-')} ({c.name}.{p.name})")
        except UserError as e:
            first = first or e
    raise first


def _check_given(key: str, v: Any) -> None:
    """A value given for a parameter must be valid for at least one component declaring it,
    also when this run does not use it (a typo in a shared --config file is still a typo)."""
    from algorithms.base import declared

    first = None
    for c, p in declared(key):
        try:
            p.validate(p.coerce(v, key), f"--{p.name.replace('_', '-')} ({c.name}.{p.name})")
            return
        except UserError as e:
            first = first or e
    raise first


def _is_param(key: str) -> bool:
    from algorithms.base import declared, normalize_key

    return bool(declared(normalize_key(key)))


def _param_names() -> list[str]:
    from algorithms.base import all_components

    return sorted({p.name for c in all_components() for p in c.params})


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _coerce(name: str, typ: str, v: Any) -> Any:
    """Check a value from a dict/TOML against the field's annotated type (a string here)."""
    opt_ = typ.startswith("Optional[")
    if v is None and opt_:
        return None
    base = typ[9:-1] if opt_ else typ
    bad = UserError(f"option {name!r}: expected {base}, got {v!r}")
    if base == "bool":
        if not isinstance(v, bool):
            raise bad
        return v
    if base == "int":
        if isinstance(v, bool) or not isinstance(v, int):
            raise bad
        return v
    if base == "float":
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise bad
        return float(v)
    if base == "str":
        if not isinstance(v, str):
            raise bad
        return v
    if base.startswith("tuple"):
        if not isinstance(v, (list, tuple)) or not all(isinstance(x, (int, float)) and not isinstance(x, bool)
                                                       for x in v):
            raise bad
        return tuple(float(x) for x in v)
    return v


def _choice(name: str, value: str, valid) -> None:
    if value not in valid:
        raise UserError(unknown_name(f"--{name} value", value, valid))


def _positive_int(name: str, v: int) -> None:
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise UserError(f"{_flag(name)} must be a positive integer (got {v})")


def _hash(d: dict) -> str:
    return hashlib.sha1(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()


def parse_seeds(value, where: str = "--seeds", limit: int | None = None) -> list[int]:
    """Seeds from the command line ('0,1,2' or '0-4') or a TOML file (the same strings, an int or a list).

    limit: at most this many seeds (a one-line error above it, before any list is built).
    """
    if isinstance(value, int) and not isinstance(value, bool):
        value = [value]
    if isinstance(value, list):
        if not value or not all(isinstance(s, int) and not isinstance(s, bool) and 0 <= s < 2**32 for s in value):
            raise UserError(f"{where}: seeds must be a non-empty list of integers in [0, 2^32), e.g. [0, 1, 2] "
                            f"(got {value!r})")
        out = list(value)
    elif not isinstance(value, str):
        raise UserError(f"{where} {value!r}: use a list like 0,1,2 or a range like 0-4")
    else:
        out = []
        try:
            for part in value.split(","):
                part = part.strip()
                if "-" in part[1:]:
                    a, b = (int(x) for x in part.split("-", 1))
                    if b < a:
                        raise UserError(f"{where} {value!r}: the range {part} runs backwards; write {b}-{a}")
                    if b - a + 1 > (limit or MAX_SEEDS):
                        raise UserError(f"{where} {value!r}: {b - a + 1} seeds; at most {limit or MAX_SEEDS}")
                    out.extend(range(a, b + 1))
                elif part:
                    out.append(int(part))
        except ValueError:
            raise UserError(f"{where} {value!r}: use a list like 0,1,2 or a range like 0-4") from None
        if not out:
            raise UserError(f"{where} is empty")
        if any(not 0 <= s < 2**32 for s in out):
            raise UserError(f"{where} {value!r}: seeds are integers in [0, 2^32)")
    if limit is not None and len(out) > limit:
        raise UserError(f"{where}: {len(out)} seeds; at most {limit}")
    return out
