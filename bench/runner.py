"""The runner: seeding, the step loop, the clock, evaluation, checkpoints and result files.

    data  -> per-worker shards -> Sampler (batch = f(seed, worker, step))
    model -> Workers (X [n_local, d] + BN buffers) -> Algorithm (oracle, optimizer, rule)
    for t in steps:  X <- algorithm.step(X, batch_t)      (timed; evaluation is not)
    every eval_every steps and at the end: evaluate x_bar = mean_i x_i

Failures are results, recorded and never averaged in:
  diverged   a non-finite loss or parameter: the run ends at that step.
  collapsed  the averaged model predicts no better than a constant: at an evaluation after
             the warmup, its loss on the fixed training subset is >= H - 0.05 (H = the entropy of
             that subset's labels, the loss of the best constant predictor), or its accuracy there
             is <= 100 (p + 3 sqrt(p (1 - p) / N)) (p = the largest class frequency, chance for a
             constant predictor; N = the subset size: 3 binomial standard deviations above
             chance). Two consecutive collapsed evaluations end the run early (--no-stop-on-collapse
             keeps training); the final evaluation decides the status. The thresholds are in the summary.

Checkpoints. Every checkpoint_every steps (0: about every 10% of the run) and after every
CHECKPOINT_SECONDS of training, each rank writes its shard (X, BatchNorm buffers, every
component's state, the metric rows, timers, the torch RNG state) to checkpoint.r<rank>.pt,
keeping the previous one as .prev. A rerun of an unfinished run resumes from the latest step
that every rank holds and ends bit-identical to an uninterrupted run: batches, noise and
augmentation are pure functions of (seed, worker, step). The checkpoints go once the summary
is written (--keep-checkpoint keeps the last).

One trainer per run: the process that trains a run holds its lock (bench.results.RunLock);
another process waits for it (run) or moves on to the next run (suite). --force retrains a
finished run in .<run_id>.rerun/ and replaces the old folder only when the new one is finished.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

from algorithms import StepContext
from algorithms.base import build as build_algorithm
from bench import metrics, results
from bench.augment import augment_batch
from bench.comm import SimulatedComm
from bench.config import RunConfig
from bench.data import Sampler, epoch_steps, load_dataset, make_shards
from bench.errors import UserError
from bench.models import build_model, load_init
from bench.schedule import lr_at
from bench.spec import BuildContext
from bench.workers import Workers, keep_freed_memory

Progress = Callable[[int, int, dict], None]
CHECKPOINT_SECONDS = 300.0  # a checkpoint after at most this much training time (and every checkpoint_every steps)
COLLAPSE_MARGIN = 0.05  # nats below the label entropy
COLLAPSE_SDS = 3.0  # binomial standard deviations above chance

# Recorded in every summary beside top_eig (bench/hessian.py states it in full).
HESSIAN_PROTOCOL = ("x_bar after BatchNorm recalibration, eval mode; mean cross-entropy without weight decay; "
                    "all trainable parameters; fixed training subset (all samples if N <= 5000, else 2048; "
                    "seed 0), no augmentation; start vector seed 0")


def bar_progress(bar, task) -> Progress:
    """A progress callback showing the step, the loss and the latest test accuracy on a rich progress task."""
    def update(step: int, total: int, info: dict) -> None:
        if step == 1 or step % 10 == 0 or step == total:
            acc = f"  test {info['test_acc']:.1f}%" if info.get("test_acc") is not None else ""
            bar.update(task, completed=step, total=total, info=f"loss {info['loss']:.3f}{acc}")

    return update


def summary_line(s: dict) -> str:
    """One line (rich markup) for a finished run, shared by `run` and `suite`."""
    head = f"{s['algo']} {s['topology']} n{s['workers']} b{s['batch']} lr {s['lr']:g} seed {s['seed']}"
    if s.get("skipped"):
        return f"[dim]skipped (already {s['status']}; --force reruns): {head} -> {s['run_dir']}[/dim]"
    if s["status"] != "completed":
        step = s.get(f"{s['status']}_step")
        return f"{head}: [red]{s['status']}[/red] at step {step}  -> {s['run_dir']}"
    eig = f"  top-1 eig {s['top_eig']:.2f}" if s.get("top_eig") is not None else ""
    return (f"{head}: test acc {s['test_acc']:.2f}%  loss {s['test_loss']:.3f}  consensus "
            f"{s['consensus_distance']:.2e}{eig}  train {s['train_seconds']:.1f}s  -> {s['run_dir']}")


def device_of(cfg: RunConfig) -> torch.device:
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device is available here; use --device cpu")
    return torch.device(cfg.device)


def prepare(cfg: RunConfig):
    """Validate, load the data set and resolve the configuration (no training)."""
    cfg.validate()
    if cfg.deterministic:  # cuBLAS is deterministic only with a fixed workspace, set before its first use
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    device = device_of(cfg)
    data = load_dataset(cfg.dataset, cfg.data_dir, cfg.download)
    if cfg.val_fraction > 0:
        data = data.split_validation(cfg.val_fraction)
    data = data.to(device)
    resolved = cfg.resolve(len(data.y_train), data.default_model)
    shard = len(data.y_train) // resolved.workers
    if resolved.workers > len(data.y_train):  # before any n x n structure is built
        raise UserError(f"--workers {resolved.workers} is more than the {len(data.y_train)} training samples of "
                        f"{resolved.dataset}; every worker needs a shard of at least one batch")
    if resolved.partition == "iid" and resolved.batch > shard:
        raise UserError(f"--batch {resolved.batch} is larger than a worker's shard ({shard} samples with "
                        f"{resolved.workers} workers); use --batch <= {max(1, shard)} or fewer workers")
    return resolved, data, device


def run(cfg: RunConfig, progress: Optional[Progress] = None, force: bool = False, comm=None,
        wait: bool = True, on_wait: Optional[Callable[[str], None]] = None) -> Optional[dict]:
    """Train one configuration (one seed); write and return its summary.

    A finished run is skipped (its summary is returned with "skipped": True) unless force is
    set. An unfinished one resumes from its checkpoint. When another process trains the same
    run: wait for it (then it is finished: skipped) or, with wait=False, return None.
    """
    cfg, data, device = prepare(cfg)
    root = results.prepare_results_dir(cfg.results)
    run_dir = root / cfg.run_id()

    def skipped():
        s = results.read_summary(run_dir)
        s["skipped"] = True
        s["run_dir"] = str(run_dir)
        return s

    if not force and results.is_finished(run_dir):
        return skipped()
    trainer = Trainer(cfg, data, device, run_dir, comm)  # may still reject the input: no folder, no lock before
    lock = results.RunLock(root, cfg.run_id()) if trainer.writer and comm is None else None
    if lock is not None and not lock.acquire(wait=False):
        if not wait:
            return None
        if on_wait:
            on_wait(f"waiting: {run_dir.name} is being trained by {lock.holder()}")
        lock.acquire(wait=True)
    finished = False
    try:
        if not force and results.is_finished(run_dir):  # finished while we waited
            finished = True
            return skipped()
        if force and results.is_finished(run_dir):  # retrain beside the finished run, replace it at the end
            trainer.run_dir = root / f".{run_dir.name}.rerun"
            if trainer.writer and trainer.run_dir.exists():
                import shutil

                shutil.rmtree(trainer.run_dir)
        if trainer.writer:
            w = trainer.workers  # two checkpoint generations, the model, the metrics: before any folder
            results.check_free_space(root, 4 * w.layout.d * w.X.element_size() * w.n + (1 << 20), cfg.run_id())
            trainer.run_dir.mkdir(exist_ok=True)
        summary = trainer.train(progress)
        if trainer.run_dir != run_dir and trainer.writer:
            results.replace_dir(trainer.run_dir, run_dir)
            summary["run_dir"] = str(run_dir)
        finished = True
        return summary
    finally:
        if lock is not None:
            lock.release(remove=finished)


@dataclass
class TrainState:
    """Everything of the loop that a checkpoint must carry besides the model and the algorithm."""

    step: int = 0  # steps done
    rows: list = field(default_factory=list)  # metrics.csv
    train_s: float = 0.0
    eval_s: float = 0.0
    loss_acc: float = 0.0
    loss_cnt: int = 0
    last: dict = field(default_factory=dict)  # the latest evaluation
    collapsed_evals: int = 0  # consecutive collapsed evaluations
    status: str = "completed"
    failed_step: Optional[int] = None


class Trainer:
    def __init__(self, cfg: RunConfig, data, device, run_dir: Path, comm=None):
        self.cfg, self.data, self.device, self.run_dir = cfg, data, device, run_dir
        keep_freed_memory()  # the step's [n, d] buffers are reused, not mapped afresh (bench/workers.py)
        n = cfg.workers
        self.topology = cfg.build_topology()
        self.comm = comm or SimulatedComm(n, self.topology, device)
        torch.manual_seed(cfg.seed)
        np.random.seed(cfg.seed)
        module = build_model(cfg.model, data.input_shape, data.num_classes)
        self.init_info = load_init(module, cfg.init) if cfg.init else {}
        if cfg.augment and len(data.input_shape) != 3:
            raise UserError(f"--augment (random crop + flip) needs image data (C x H x W); {cfg.dataset} has inputs "
                            f"of shape {'x'.join(map(str, data.input_shape))}; drop --augment or use cifar10/cifar100")
        self.workers = Workers(module, len(self.comm.workers), cfg.executor, device, precision=cfg.precision,
                               channels_last=cfg.channels_last, compile=cfg.compile)
        self.epoch_len = epoch_steps(len(data.y_train), cfg.total_batch)
        ctx = BuildContext(layout=self.workers.layout, n_local=self.workers.n, n=n, device=device,
                           dtype=self.workers.dtype, total_steps=cfg.steps, epoch_len=self.epoch_len,
                           warmup=cfg.warmup, lr_at=self.lr, seed=cfg.seed, topology=self.topology)
        self.algo = build_algorithm(cfg.hyper(), ctx)
        shards = make_shards(data.y_train, n, cfg.partition, cfg.seed, min_size=cfg.batch)
        self.sampler = Sampler(shards, cfg.batch, cfg.seed, device)
        # Fixed subsets (the same for every algorithm and seed of a comparison).
        g = np.random.default_rng(0)
        k = min(len(data.y_train), cfg.eval_train_samples)
        self.train_subset = torch.from_numpy(np.sort(g.permutation(len(data.y_train))[:k])).to(device)
        self.bytes_per_step = self.algo.rule.bytes_per_step(n, self.topology, self.workers.layout.d,
                                                            self.workers.X.element_size())
        self.writer = self.comm.rank == 0  # only one process writes results
        self.collapse = collapse_thresholds(data.y_train[self.train_subset], data.num_classes)
        if cfg.deterministic:
            torch.use_deterministic_algorithms(True)
            torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False

    def lr(self, t: int) -> float:
        c = self.cfg
        return lr_at(t, c.lr, c.steps, c.schedule, c.warmup, c.milestones)

    def batch(self, t: int):
        idx = self.sampler.indices(self.comm.workers, t)  # [n_local, B]
        n, B = idx.shape
        flat = idx.reshape(-1)
        x = self.data.x_train[flat]
        if self.cfg.augment:  # crop + flip of (seed, worker, step, position): the same on every backend
            x = augment_batch(x.view(n, B, *x.shape[1:]), self.cfg.seed, self.comm.workers, t).view_as(x)
        x = self.data.prepare(x)
        return x.view(n, B, *x.shape[1:]), self.data.y_train[flat].view(n, B)

    def evaluate(self) -> dict:
        w, d = self.workers, self.data
        xbar = self.comm.mean(w.X)
        module = w.load_average(xbar)
        if metrics.has_batchnorm(module):
            metrics.recalibrate_bn(module, d, self.train_subset, self.cfg.batch)
        test_acc, test_loss = metrics.evaluate(module, d, d.x_test, d.y_test)
        train_acc, train_loss = metrics.evaluate(module, d, d.x_train[self.train_subset], d.y_train[self.train_subset])
        out = {"test_acc": test_acc, "test_loss": test_loss, "train_acc": train_acc, "train_loss": train_loss}
        if d.y_val is not None:
            out["val_acc"], out["val_loss"] = metrics.evaluate(module, d, d.x_val, d.y_val)
        out["consensus_distance"] = metrics.consensus_distance(self.algo.rule.query(w.X), xbar, self.comm)
        return out

    def collapsed(self, last: dict, step: int) -> bool:
        """The module docstring's rule, at an evaluation after the warmup."""
        c = self.collapse
        return step > self.cfg.warmup and (last["train_loss"] >= c["loss_threshold"]
                                           or last["train_acc"] <= c["acc_threshold"])

    def sharpness(self) -> dict:
        """Top Hessian eigenvalue of x_bar under the protocol of bench/hessian.py.

        eval_module holds x_bar with recalibrated BatchNorm from the final evaluation.
        """
        from bench.hessian import hessian_subset, measure_sharpness

        cfg = self.cfg
        idx = hessian_subset(len(self.data.y_train), cfg.hessian_samples, seed=0)
        out = measure_sharpness(self.workers.eval_module, self.data, idx, cfg.hessian_method, cfg.hessian_trace)
        out["hessian_protocol"] = HESSIAN_PROTOCOL
        return out

    def _sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    # ------------------------------------------------------------------ checkpoints
    def _ckpt(self, prev: bool = False) -> Path:
        return self.run_dir / f"checkpoint.r{self.comm.rank}{'.prev' if prev else ''}.pt"

    def save_checkpoint(self, st: TrainState) -> None:
        cur = self._ckpt()
        if cur.exists():
            os.replace(cur, self._ckpt(prev=True))
        results.save_torch(cur, {
            "run_id": self.cfg.run_id(), "world_size": self.comm.world_size, "step": st.step,
            "X": self.workers.X, "buffers": self.workers.buffers, "algorithm": self.algo.state_dict(),
            "state": asdict(st), "rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state() if self.device.type == "cuda" else None,
            "comm": {k: getattr(self.comm, k) for k in ("bytes_sent", "logical_bytes", "comm_calls")
                     if hasattr(self.comm, k)},
        })

    def _load(self, path: Path) -> Optional[dict]:
        try:
            ck = results.load_torch(path)
        except Exception:  # a checkpoint that cannot be read is no checkpoint: train from the start
            return None
        ok = isinstance(ck, dict) and ck.get("run_id") == self.cfg.run_id() and ck.get("world_size") == \
            self.comm.world_size
        return ck if ok else None

    def resume(self) -> Optional[TrainState]:
        """Restore the latest checkpoint every rank holds; None (train from step 0) if there is none."""
        found = {}
        for prev in (False, True):
            p = self._ckpt(prev)
            ck = self._load(p) if p.exists() else None
            if ck is not None:
                found[ck["step"]] = ck
        step = max(found, default=-1)
        if self.comm.world_size > 1:
            # Ranks checkpoint at the same steps, but one may have died between its write and the
            # others': take the newest step all hold (each keeps its newest and the one before).
            step = self._min_over_ranks(step)
            step = step if step in found else -1
            if self._min_over_ranks(step) < 0:
                return None
        if step < 0:
            return None
        ck = found[step]
        w = self.workers
        w.X = ck["X"].to(self.device, w.X.dtype)
        for k, v in ck["buffers"].items():
            w.buffers[k].copy_(v)
        self.algo.load_state_dict(_to_device(ck["algorithm"], self.device))
        torch.set_rng_state(ck["rng"])
        if ck.get("cuda_rng") is not None and self.device.type == "cuda":
            torch.cuda.set_rng_state(ck["cuda_rng"])
        for k, v in ck["comm"].items():
            setattr(self.comm, k, v)
        return TrainState(**ck["state"])

    def _min_over_ranks(self, v: int) -> int:
        t = torch.zeros(self.comm.world_size, dtype=torch.float64, device=self.device)
        t[self.comm.rank] = float(v)
        return int(self.comm.sum(t).min().item())

    def clear_checkpoints(self) -> None:
        for prev in (True, False):
            p = self._ckpt(prev)
            if p.exists() and (prev or not self.cfg.keep_checkpoint):
                p.unlink()

    # ------------------------------------------------------------------ the loop
    def train(self, progress: Optional[Progress] = None) -> dict:
        cfg, w = self.cfg, self.workers
        started = time.perf_counter()
        if self.writer:
            results.write_json(self.run_dir / "config.json", cfg.to_dict())
        st = self.resume() or TrainState()
        resumed_at = st.step
        x0, y0 = self.batch(0)
        flops = metrics.flops_per_grad(w.eval_module, x0[0], y0[0]) * self.algo.oracle.grad_evals
        eval_every = cfg.eval_every or max(1, cfg.steps // 10)
        ckpt_every = cfg.checkpoint_every or max(1, cfg.steps // 10)
        since_ckpt = 0.0
        t = st.step
        while t < cfg.steps and st.status == "completed":
            self._sync()
            t0 = time.perf_counter()
            lr = self.lr(t)
            ctx = StepContext(t, lr, cfg.lr, self.comm, cfg.seed)
            x, y = self.batch(t)
            losses, X_next = self.algo.step(w, w.X, x, y, ctx)
            # One reduction for all three: the workers' loss sum, the count of non-finite parameters,
            # and whether any rank has trained CHECKPOINT_SECONDS since its last checkpoint.
            stat = self.comm.sum(torch.stack([losses.sum().double(), (~torch.isfinite(X_next)).sum().double(),
                                              torch.tensor(float(since_ckpt > CHECKPOINT_SECONDS),
                                                           dtype=torch.float64, device=losses.device)]))
            mean_loss, nonfinite, overdue = stat[0].item() / cfg.workers, stat[1].item(), stat[2].item() > 0
            dt = time.perf_counter() - t0
            st.train_s += dt
            since_ckpt += dt
            if not math.isfinite(mean_loss) or nonfinite > 0:
                st.status, st.failed_step = "diverged", t
                break
            w.X = X_next
            t = st.step = t + 1
            st.loss_acc += mean_loss
            st.loss_cnt += 1
            if t % eval_every == 0 or t == cfg.steps:
                t1 = time.perf_counter()
                st.last = self.evaluate()
                st.eval_s += time.perf_counter() - t1
                st.rows.append({"step": t, "epoch": t / self.epoch_len, "lr": lr, **self.algo.rule.log(ctx),
                                "train_loss_running": st.loss_acc / max(1, st.loss_cnt),
                                **st.last, "train_seconds": st.train_s})
                st.loss_acc, st.loss_cnt = 0.0, 0
                st.collapsed_evals = st.collapsed_evals + 1 if self.collapsed(st.last, t) else 0
                if st.collapsed_evals and (t == cfg.steps or (cfg.stop_on_collapse and st.collapsed_evals >= 2)):
                    st.status, st.failed_step = "collapsed", t
                if self.writer:
                    results.write_csv(self.run_dir / "metrics.csv", st.rows)
            if (t % ckpt_every == 0 or overdue) and t < cfg.steps and st.status == "completed":
                self.save_checkpoint(st)
                since_ckpt = 0.0
            if progress:
                progress(t, cfg.steps, {"loss": mean_loss, **st.last})
        last = dict(st.last)
        if st.status == "diverged":
            last = {k: None for k in ("test_acc", "test_loss", "train_acc", "train_loss", "val_acc", "val_loss",
                                      "consensus_distance")}
        # Every rank computes it (same x_bar, same result): a rank that skipped it would
        # wait in the next collective and could reach dist_timeout.
        if st.status == "completed" and cfg.hessian:
            last = {**last, **self.sharpness()}
        summary = self.summary(st.status, st.failed_step, last, st.train_s, st.eval_s, flops, st.step)
        summary["resumed_from_step"] = resumed_at
        summary["wall_seconds"] = time.perf_counter() - started
        if self.writer:
            try:
                results.write_csv(self.run_dir / "metrics.csv", st.rows)
                results.write_json(self.run_dir / "summary.json", summary)  # finished from here on
            except OSError as e:
                raise UserError(f"{self.run_dir}: cannot write the results ({e.strerror}); the checkpoint is kept: "
                                f"free space and run the same command again to finish") from None
            if st.status != "diverged":
                try:
                    results.save_model(self.run_dir / "model.pt", w.eval_module.state_dict())
                except OSError as e:
                    print(f"warning: {self.run_dir}/model.pt not written ({e.strerror}); the results are complete",
                          file=__import__("sys").stderr)
        self.clear_checkpoints()
        summary["run_dir"] = str(self.run_dir)
        return summary

    def summary(self, status, failed_step, last, train_s, eval_s, flops, steps_done) -> dict:
        cfg = self.cfg
        props = self.topology.properties() if self.topology is not None else None
        per_process = getattr(self.comm, "bytes_sent_per_process_step", None)  # the dist backend's own traffic
        return {
            "run_id": cfg.run_id(), "config_id": cfg.config_id(),
            "algo": cfg.algo, "grad": cfg.grad, "opt": cfg.opt, "comm": cfg.comm,
            "topology": cfg.topology,
            "workers": cfg.workers, "dataset": cfg.dataset, "model": cfg.model, "seed": cfg.seed,
            "batch": cfg.batch, "total_batch": cfg.total_batch, "lr": cfg.lr, "steps": cfg.steps,
            "epochs": cfg.steps / self.epoch_len,
            "status": status, "diverged_step": failed_step if status == "diverged" else None,
            "collapsed_step": failed_step if status == "collapsed" else None, "collapse_rule": self.collapse,
            "steps_done": steps_done,
            **last, **self.init_info,
            "spectral_gap": props["spectral_gap"] if props else 1.0,
            "params": self.workers.layout.d,
            "grad_evals_per_step": self.algo.oracle.grad_evals,
            "flops_per_step": flops,
            "bytes_per_step": self.bytes_per_step,
            "bytes_sent_per_worker_step": self.comm.bytes_sent_per_worker_step(steps_done),
            "bytes_sent_per_process_step": per_process(steps_done) if per_process else None,
            "train_seconds": train_s, "eval_seconds": eval_s,
            "backend": self.comm.backend, "world_size": self.comm.world_size,
            "device": str(self.device), "executor": self.workers.executor,
            "deterministic": cfg.deterministic, "machine_load": _load_average(), "threads": torch.get_num_threads(),
            "versions": results.versions(),
        }


def collapse_thresholds(y: torch.Tensor, num_classes: int) -> dict:
    """The collapse rule's thresholds on the fixed training subset y (module docstring)."""
    p = torch.bincount(y.cpu(), minlength=num_classes).double() / len(y)
    entropy = float(-(p[p > 0] * p[p > 0].log()).sum())
    chance = float(p.max())
    sd = math.sqrt(chance * (1 - chance) / len(y))
    return {"label_entropy": entropy, "chance": chance, "samples": len(y),
            "loss_threshold": entropy - COLLAPSE_MARGIN, "acc_threshold": 100.0 * (chance + COLLAPSE_SDS * sd),
            "rule": f"after warmup, train_loss >= label entropy - {COLLAPSE_MARGIN} or train_acc <= chance + "
                    f"{COLLAPSE_SDS:g} binomial sd; 2 consecutive end the run; the final evaluation decides"}


def _load_average() -> Optional[float]:
    """The 1-minute load average over the core count (timings made under a load above 1 are inflated)."""
    try:
        return os.getloadavg()[0] / (os.cpu_count() or 1)
    except OSError:
        return None


def _to_device(obj, device):
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, dict):
        return {k: _to_device(v, device) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_to_device(v, device) for v in obj]
    return obj
