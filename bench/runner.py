"""The runner: seeding, the step loop, the clock, evaluation and result files.

    data  -> per-worker shards -> Sampler (batch = f(seed, worker, step))
    model -> Workers (X [n_local, d] + BN buffers) -> Algorithm (oracle, optimizer, rule)
    for t in steps:  X <- algorithm.step(X, batch_t)      (timed; evaluation is not)
    every eval_every steps and at the end: evaluate x_bar = mean_i x_i

Divergence (a non-finite loss) ends the run with status "diverged"; it is a result.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

import topologies
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
from bench.workers import Workers

Progress = Callable[[int, int, dict], None]

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
        step = s.get("diverged_step", s.get("failed_step"))
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
    device = device_of(cfg)
    data = load_dataset(cfg.dataset, cfg.data_dir, cfg.download)
    if cfg.val_fraction > 0:
        data = data.split_validation(cfg.val_fraction)
    data = data.to(device)
    resolved = cfg.resolve(len(data.y_train), data.default_model)
    return resolved, data, device


def run(cfg: RunConfig, progress: Optional[Progress] = None, force: bool = False, comm=None) -> dict:
    """Train one configuration (one seed); write and return its summary.

    A run whose summary already says completed/diverged is skipped (its summary is
    returned with "skipped": True) unless force is set.
    """
    cfg, data, device = prepare(cfg)
    root = results.prepare_results_dir(cfg.results)
    run_dir = root / cfg.run_id()
    if not force and results.is_finished(run_dir):
        s = results.read_summary(run_dir)
        s["skipped"] = True
        s["run_dir"] = str(run_dir)
        return s
    trainer = Trainer(cfg, data, device, run_dir, comm)  # may still reject the input: no folder before
    run_dir.mkdir(exist_ok=True)
    return trainer.train(progress)


class Trainer:
    def __init__(self, cfg: RunConfig, data, device, run_dir: Path, comm=None):
        self.cfg, self.data, self.device, self.run_dir = cfg, data, device, run_dir
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
        shards = make_shards(data.y_train, n, cfg.partition, cfg.seed)
        self.sampler = Sampler(shards, cfg.batch, cfg.seed, device)
        # Fixed subsets (the same for every algorithm and seed of a comparison).
        g = np.random.default_rng(0)
        k = min(len(data.y_train), cfg.eval_train_samples)
        self.train_subset = torch.from_numpy(np.sort(g.permutation(len(data.y_train))[:k])).to(device)
        self.bytes_per_step = self.algo.rule.bytes_per_step(n, self.topology, self.workers.layout.d,
                                                            self.workers.X.element_size())
        self.writer = self.comm.rank == 0  # only one process writes results

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
        out["consensus_distance"] = metrics.consensus_distance(w.X, xbar, self.comm)
        return out

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

    def train(self, progress: Optional[Progress] = None) -> dict:
        cfg, w = self.cfg, self.workers
        if self.writer:
            results.write_json(self.run_dir / "config.json", cfg.to_dict())
        x0, y0 = self.batch(0)
        flops = metrics.flops_per_grad(w.eval_module, x0[0], y0[0]) * self.algo.oracle.grad_evals
        eval_every = cfg.eval_every or max(1, cfg.steps // 10)
        rows, status, diverged_step = [], "completed", None
        train_s = eval_s = 0.0
        loss_acc, loss_cnt = 0.0, 0
        last = {}
        steps_done = 0
        for t in range(cfg.steps):
            self._sync()
            t0 = time.perf_counter()
            lr = self.lr(t)
            ctx = StepContext(t, lr, cfg.lr, self.comm, cfg.seed)
            x, y = self.batch(t)
            losses, X_next = self.algo.step(w, w.X, x, y, ctx)
            # One reduction for both: the workers' loss sum and the count of non-finite parameters.
            stat = self.comm.sum(torch.stack([losses.sum(), (~torch.isfinite(X_next)).sum().to(losses.dtype)]))
            mean_loss, nonfinite = stat[0].item() / cfg.workers, stat[1].item()
            train_s += time.perf_counter() - t0
            if not math.isfinite(mean_loss) or nonfinite > 0:
                status, diverged_step = "diverged", t
                break
            w.X = X_next
            steps_done = t + 1
            loss_acc += mean_loss
            loss_cnt += 1
            if (t + 1) % eval_every == 0 or t + 1 == cfg.steps:
                t1 = time.perf_counter()
                last = self.evaluate()
                eval_s += time.perf_counter() - t1
                rows.append({"step": t + 1, "epoch": (t + 1) / self.epoch_len, "lr": lr, **self.algo.rule.log(ctx),
                             "train_loss_running": loss_acc / max(1, loss_cnt),
                             **last, "train_seconds": train_s})
                loss_acc, loss_cnt = 0.0, 0
                if self.writer:
                    results.write_csv(self.run_dir / "metrics.csv", rows)
            if progress:
                progress(t + 1, cfg.steps, {"loss": mean_loss, **last})
        if status == "diverged":
            last = {k: None for k in ("test_acc", "test_loss", "train_acc", "train_loss", "val_acc", "val_loss",
                                      "consensus_distance")}
        # Every rank computes it (same x_bar, same result): a rank that skipped it would
        # wait in the next collective and could reach dist_timeout.
        if status == "completed" and cfg.hessian:
            last = {**last, **self.sharpness()}
        summary = self.summary(status, diverged_step, last, train_s, eval_s, flops, steps_done)
        if self.writer:
            if status == "diverged":
                results.write_csv(self.run_dir / "metrics.csv", rows)
            else:
                results.save_model(self.run_dir / "model.pt", w.eval_module.state_dict())
            results.write_json(self.run_dir / "summary.json", summary)
        summary["run_dir"] = str(self.run_dir)
        return summary

    def summary(self, status, diverged_step, last, train_s, eval_s, flops, steps_done) -> dict:
        cfg = self.cfg
        props = self.topology.properties() if self.topology is not None else None
        sent = getattr(self.comm, "bytes_sent_per_worker_step", None)  # measured by the dist backend
        return {
            "run_id": cfg.run_id(), "config_id": cfg.config_id(),
            "algo": cfg.algo, "grad": cfg.grad, "opt": cfg.opt, "comm": cfg.comm,
            "topology": cfg.topology,
            "workers": cfg.workers, "dataset": cfg.dataset, "model": cfg.model, "seed": cfg.seed,
            "batch": cfg.batch, "total_batch": cfg.total_batch, "lr": cfg.lr, "steps": cfg.steps,
            "epochs": cfg.steps / self.epoch_len,
            "status": status, "diverged_step": diverged_step,
            **last, **self.init_info,
            "spectral_gap": props["spectral_gap"] if props else 1.0,
            "params": self.workers.layout.d,
            "grad_evals_per_step": self.algo.oracle.grad_evals,
            "flops_per_step": flops,
            "bytes_per_step": self.bytes_per_step,
            "bytes_sent_per_worker_step": sent(steps_done) if sent else None,
            "train_seconds": train_s, "eval_seconds": eval_s,
            "backend": self.comm.backend, "world_size": self.comm.world_size,
            "device": str(self.device), "executor": self.workers.executor,
            "versions": results.versions(),
        }
