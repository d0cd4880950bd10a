"""RunConfig: one training run, frozen, validated, hashable.

Built from CLI flags or a dict (TOML). `resolve()` fills what depends on other
fields (the model from the data set, the preset's components, steps from
epochs, the linearly scaled learning rate); the resolved configuration is what
gets written to config.json and hashed into the run id.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, fields
from typing import Any, Optional

from bench.errors import UserError
from bench.registry import unknown_name

SCHEDULES = ("constant", "multistep", "cosine")
ORDERS = ("cta", "atc")
DEVICES = ("cpu", "cuda")

# Fields that do not change what a run computes: left out of the run id and of grouping.
NON_SEMANTIC = ("results", "data_dir", "download", "device", "executor", "force", "backend", "procs",
                "dist_timeout", "channels_last", "compile")
PRECISIONS = ("fp32", "bf16", "fp64")
EXECUTORS = ("auto", "native", "vmap", "loop")


@dataclass(frozen=True)
class RunConfig:
    # what is compared
    algo: str = "dsgd"
    topology: str = "ring"
    workers: int = 16
    dataset: str = "mnist1d"
    model: Optional[str] = None  # None: the data set's default
    partition: str = "iid"
    seed: int = 0
    init: Optional[str] = None  # state_dict file (torch.save) to start every worker from
    augment: bool = False  # random crop (pad 4) + horizontal flip per sample, on the device (image data)
    precision: str = "fp32"  # fp32 | bf16 (autocast for forward/backward; parameters and mixing in fp32) | fp64 (everything)
    # components (None: the preset's)
    grad: Optional[str] = None
    opt: Optional[str] = None
    comm: Optional[str] = None
    order: str = "cta"
    # training length and batch
    batch: int = 32  # per worker; total batch = workers * batch
    steps: Optional[int] = None
    epochs: float = 150.0  # used when steps is None; one epoch = N_train // total_batch steps
    # learning rate
    lr: float = 0.2
    lr_scaling: str = "none"  # none | linear (lr * total_batch / ref_batch)
    ref_batch: int = 128
    schedule: str = "cosine"
    milestones: tuple[float, ...] = (0.5, 0.75)
    warmup: int = 0
    # local optimizer
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 5e-4
    wd_1d: bool = True  # weight decay on 1-D parameters (biases, norm scales)
    betas: tuple[float, float] = (0.9, 0.999)  # LAMB
    eps: float = 1e-6  # LAMB
    clip: float = 0.0  # LAMB: global gradient-norm clipping, 0 = off
    # DSGD-AC
    p: float = 3.0
    ac_start: str = "0"  # fraction of training ("0.1") or an epoch ("10ep"); never before warmup ends
    gamma_min: float = 0.0
    # SAM / AD-SAM
    rho: float = 0.05
    adaptive: bool = False
    sigma: float = 0.01
    sigma_mode: str = "filter"  # filter (sigma * ||filter||) | absolute
    samples: int = 1
    # evaluation
    eval_every: int = 0  # 0: about 10 evaluations per run; always at the end
    eval_train_samples: int = 2048
    val_fraction: float = 0.0
    hessian: bool = True
    hessian_method: str = "lanczos"
    hessian_samples: int = 0  # 0: whole training set if <= 5000 samples, else 2048
    hessian_trace: bool = False
    # where and how (not part of the run id)
    device: str = "cpu"
    executor: str = "auto"
    channels_last: bool = False  # NHWC memory format for image models
    compile: bool = False  # torch.compile the per-worker forward where it helps
    results: str = "results"
    data_dir: Optional[str] = None
    download: bool = False
    backend: str = "simulated"
    procs: int = 1
    dist_timeout: float = 120.0

    # ------------------------------------------------------------------
    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "RunConfig":
        names = {f.name for f in fields(cls)}
        for k in d:
            if k not in names:
                raise UserError(unknown_name("option", k, sorted(names)))
        kw = dict(d)
        for f in fields(cls):
            if f.name in kw:
                kw[f.name] = _coerce(f.name, f.type, kw[f.name])
        return cls(**kw)

    def replace(self, **kw) -> "RunConfig":
        return dataclasses.replace(self, **kw)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        for k in ("milestones", "betas"):
            d[k] = list(d[k])
        return d

    def semantic_dict(self, with_seed: bool = True) -> dict[str, Any]:
        d = {k: v for k, v in self.to_dict().items() if k not in NON_SEMANTIC}
        if not with_seed:
            d.pop("seed")
        return d

    def config_id(self) -> str:
        """Hash of everything that defines the experiment except the seed (groups seeds together)."""
        return _hash(self.semantic_dict(with_seed=False))

    def run_id(self) -> str:
        topo = self.topology.replace("/", "_").replace(":", "-")[:24]
        return f"{self.algo}-{topo}-n{self.workers}-b{self.batch}-s{self.seed}-{_hash(self.semantic_dict())[:8]}"

    @property
    def total_batch(self) -> int:
        return self.workers * self.batch

    # ------------------------------------------------------------------
    def validate(self) -> "RunConfig":
        """Check names and ranges; raise UserError with one line on the first problem."""
        import algorithms
        import topologies
        from bench.data import DATASETS, parse_dirichlet
        from bench.models import MODELS

        algorithms.PRESETS.get(self.algo)
        for reg, v in ((algorithms.ORACLES, self.grad), (algorithms.OPTIMIZERS, self.opt), (algorithms.RULES, self.comm)):
            if v is not None:
                reg.get(v)
        topologies.TOPOLOGIES.get(self.topology.split(":", 1)[0])
        DATASETS.get(self.dataset)
        if self.model is not None and not self.model.startswith("timm:"):
            MODELS.get(self.model)
        if self.partition != "iid":
            parse_dirichlet(self.partition)
        _choice("schedule", self.schedule, SCHEDULES)
        _choice("order", self.order, ORDERS)
        _choice("lr-scaling", self.lr_scaling, ("none", "linear"))
        _choice("device", self.device, DEVICES)
        _choice("hessian-method", self.hessian_method, ("lanczos", "power"))
        _choice("sigma-mode", self.sigma_mode, ("filter", "absolute"))
        _choice("executor", self.executor, EXECUTORS)
        _choice("precision", self.precision, PRECISIONS)
        if self.init is not None:
            import os

            if not os.path.isfile(self.init):
                raise UserError(f"--init {self.init!r}: no such file")
        if not isinstance(self.seed, int) or not 0 <= self.seed < 2**32:
            raise UserError(f"--seed must be an integer in [0, 2^32) (got {self.seed})")
        _positive_int("workers", self.workers)
        _positive_int("batch", self.batch)
        _positive_int("ref-batch", self.ref_batch)
        _positive_int("samples", self.samples)
        if self.steps is not None:
            _positive_int("steps", self.steps)
        elif not self.epochs > 0:
            raise UserError(f"--epochs must be > 0 (got {self.epochs})")
        if not self.lr > 0:
            raise UserError(f"--lr must be > 0 (got {self.lr})")
        if not 0 <= self.momentum < 1:
            raise UserError(f"--momentum must be in [0, 1) (got {self.momentum})")
        if self.weight_decay < 0:
            raise UserError(f"--weight-decay must be >= 0 (got {self.weight_decay})")
        if self.warmup < 0:
            raise UserError(f"--warmup must be >= 0 (got {self.warmup})")
        if any(not 0 < m < 1 for m in self.milestones):
            raise UserError(f"--milestones are fractions of training in (0, 1) (got {list(self.milestones)})")
        if any(not 0 <= b < 1 for b in self.betas):
            raise UserError(f"--betas must be in [0, 1) (got {list(self.betas)})")
        if not self.eps > 0:
            raise UserError(f"--eps must be > 0 (got {self.eps})")
        if self.clip < 0:
            raise UserError(f"--clip must be >= 0 (got {self.clip})")
        if not self.rho > 0:
            raise UserError(f"--rho must be > 0 (got {self.rho})")
        if self.sigma < 0:
            raise UserError(f"--sigma must be >= 0 (got {self.sigma})")
        if self.p < 0:
            raise UserError(f"--p must be >= 0 (got {self.p}); DSGD-AC uses p >= 2 (default 3)")
        if not 0 <= self.gamma_min <= 1:
            raise UserError(f"--gamma-min must be in [0, 1] (got {self.gamma_min})")
        self.ac_start_value()
        if not isinstance(self.hessian_samples, int) or self.hessian_samples < 0:
            raise UserError(f"--hessian-samples must be an integer >= 0 (got {self.hessian_samples}); 0 = the default rule")
        if len(self.betas) != 2:
            raise UserError(f"--betas: give exactly 2 numbers (got {list(self.betas)})")
        if self.eval_every < 0:
            raise UserError(f"--eval-every must be >= 0 (got {self.eval_every})")
        if not 0 <= self.val_fraction < 1:
            raise UserError(f"--val-fraction must be in [0, 1) (got {self.val_fraction})")
        return self

    def ac_start_value(self) -> tuple[str, float]:
        s = str(self.ac_start).strip()
        try:
            if s.endswith("ep"):
                v = float(s[:-2])
                if v < 0:
                    raise ValueError
                return "epoch", v
            v = float(s)
            if not 0 <= v <= 1:
                raise ValueError
            return "fraction", v
        except ValueError:
            raise UserError(f"--ac-start {s!r}: give a fraction of training in [0, 1] (e.g. 0.1) "
                            f"or an epoch (e.g. 10ep)") from None

    def resolve(self, n_train: int, default_model: str) -> "RunConfig":
        """Fill the fields that depend on the data set and the preset."""
        from algorithms import PRESETS
        from bench.data import epoch_steps

        preset = PRESETS.get(self.algo)
        kw: dict[str, Any] = {}
        if self.model is None:
            kw["model"] = default_model
        for k in ("grad", "opt", "comm"):
            if getattr(self, k) is None:
                kw[k] = preset[k]
        if kw.get("comm", self.comm) == "allreduce":
            # One model: the topology and the gossip order play no part (and must not split groups).
            kw["topology"], kw["order"] = "allreduce", "cta"
        if self.steps is None:
            kw["steps"] = max(1, round(self.epochs * epoch_steps(n_train, self.total_batch)))
        if self.lr_scaling == "linear":
            kw["lr"] = self.lr * self.total_batch / self.ref_batch
            kw["lr_scaling"] = "none"  # the resolved lr is final
        return self.replace(**kw)


def _coerce(name: str, typ: str, v: Any) -> Any:
    """Check a value from a dict/TOML against the field's annotated type (a string here)."""
    opt = typ.startswith("Optional[")
    if v is None and opt:
        return None
    base = typ[9:-1] if opt else typ
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
        if name == "ac_start" and isinstance(v, (int, float)) and not isinstance(v, bool):
            return str(v)  # a fraction of training may be written as a TOML number
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
    if not isinstance(v, int) or v < 1:
        raise UserError(f"--{name} must be a positive integer (got {v})")


def _hash(d: dict) -> str:
    return hashlib.sha1(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()


def parse_seeds(value, where: str = "--seeds") -> list[int]:
    """Seeds from the command line ('0,1,2' or '0-4') or a TOML file (the same strings, an int or a list)."""
    if isinstance(value, int) and not isinstance(value, bool):
        value = [value]
    if isinstance(value, list):
        if not value or not all(isinstance(s, int) and not isinstance(s, bool) and 0 <= s < 2**32 for s in value):
            raise UserError(f"{where}: seeds must be a non-empty list of integers in [0, 2^32), e.g. [0, 1, 2] "
                            f"(got {value!r})")
        return list(value)
    if not isinstance(value, str):
        raise UserError(f"{where} {value!r}: use a list like 0,1,2 or a range like 0-4")
    out: list[int] = []
    try:
        for part in value.split(","):
            part = part.strip()
            if "-" in part[1:]:
                a, b = part.split("-", 1)
                out.extend(range(int(a), int(b) + 1))
            elif part:
                out.append(int(part))
    except ValueError:
        raise UserError(f"{where} {value!r}: use a list like 0,1,2 or a range like 0-4") from None
    if not out:
        raise UserError(f"{where} is empty")
    if any(not 0 <= s < 2**32 for s in out):
        raise UserError(f"{where} {value!r}: seeds are integers in [0, 2^32)")
    return out
