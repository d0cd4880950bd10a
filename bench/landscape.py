"""Loss landscapes along filter-normalised random directions (Li et al. 2018).

A direction d has the shape of the parameters. It is drawn from N(0, 1) and each
filter d_(i,j) (slice j along dim 0 of a parameter i with ndim >= 2: a conv output
channel, a row of a linear layer) is rescaled to the norm of the matching filter of
the weights, d_(i,j) <- d_(i,j) / ||d_(i,j)|| * ||w_(i,j)||. Parameters with ndim <= 1
(biases, BatchNorm scales and shifts) get d = 0, Li et al.'s "ignore biasbn". This
removes the scale invariance of ReLU/BatchNorm networks, so curves of different
models can share one axis.

The loss is the one of the sharpness protocol (bench.hessian): the model in eval mode
(running BatchNorm statistics, which are not changed), mean cross-entropy without
weight decay, on a fixed training subset (hessian_subset). Curves of several runs
use the same seed, so the same Gaussian draw before normalisation.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from bench.errors import UserError
from bench.hessian import hessian_subset

ALPHA_LABEL = "alpha (filter-normalised direction)"
BETA_LABEL = "beta (filter-normalised direction)"
LOSS_LABEL = "training loss"


def _trainable(module: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p for n, p in module.named_parameters() if p.requires_grad}


def random_direction(module: nn.Module, seed: int) -> dict[str, torch.Tensor]:
    """A filter-normalised Gaussian direction {name: tensor}, drawn on the CPU (device-independent)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, p in _trainable(module).items():
        w = p.detach()
        d = torch.randn(w.shape, generator=g, dtype=torch.float64)
        if w.dim() <= 1:
            d.zero_()
        else:
            w64 = w.to("cpu", torch.float64).reshape(w.shape[0], -1)
            df = d.view(w.shape[0], -1)
            df.mul_(w64.norm(dim=1, keepdim=True) / (df.norm(dim=1, keepdim=True) + 1e-10))
        out[name] = d.to(w.device, w.dtype)
    return out


@torch.no_grad()
def _mean_loss(module: nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = 1024) -> float:
    total = 0.0
    for s in range(0, len(y), batch):
        total += F.cross_entropy(module(x[s:s + batch]).float(), y[s:s + batch], reduction="sum").item()
    return total / len(y)


def _inputs(module: nn.Module, data, idx: torch.Tensor):
    p = next(module.parameters())
    idx = idx.to(data.x_train.device)
    x = data.prepare(data.x_train[idx]).to(p.device)
    return x.to(p.dtype) if x.is_floating_point() else x, data.y_train[idx].to(p.device)


def _scan(module: nn.Module, data, idx: torch.Tensor, dirs: list[dict], grid: list[tuple]) -> np.ndarray:
    """Loss at w + sum_k c_k d_k for each coefficient tuple c in grid; restores w and the mode."""
    x, y = _inputs(module, data, idx)
    params = _trainable(module)
    saved = {n: p.detach().clone() for n, p in params.items()}
    was_training = module.training
    module.eval()
    losses = []
    try:
        with torch.no_grad():
            for coeffs in grid:
                for n, p in params.items():
                    p.copy_(saved[n])
                    for c, d in zip(coeffs, dirs):
                        if c != 0:
                            p.add_(d[n], alpha=float(c))
                losses.append(_mean_loss(module, x, y))
    finally:
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(saved[n])
        module.train(was_training)
    return np.asarray(losses)


def loss_curve(module: nn.Module, data, idx: torch.Tensor, direction: dict, alphas: Sequence[float]) -> np.ndarray:
    """Losses at w + alpha d for each alpha."""
    return _scan(module, data, idx, [direction], [(float(a),) for a in alphas])


def loss_surface(module: nn.Module, data, idx: torch.Tensor, d1: dict, d2: dict, alphas: Sequence[float],
                 betas: Sequence[float]) -> np.ndarray:
    """Losses at w + alpha d1 + beta d2; array [len(alphas), len(betas)], Z[i, j] at (alphas[i], betas[j])."""
    grid = [(float(a), float(b)) for a in alphas for b in betas]
    return _scan(module, data, idx, [d1, d2], grid).reshape(len(alphas), len(betas))


def _axis(points: int, span: float) -> np.ndarray:
    """points values from -span to span; the middle one is exactly 0 (points is odd)."""
    half = (points - 1) // 2
    return span * np.arange(-half, half + 1, dtype=np.float64) / half


def plot_landscape(runs: list, dim: int = 1, points: int = 25, span: float = 1.0, seed: int = 0,
                   out: Optional[str] = None) -> dict:
    """Plot the loss landscape of runs [(label, module, data, idx), ...] and save a PNG to `out`.

    dim=1: one curve per run along its own filter-normalised direction (same seed).
    dim=2: a contour plot of the first run over two directions (seeds seed and seed + 1).
    points is rounded up to an odd number so that alpha = 0 (the model itself) is sampled.
    Returns what was plotted: {"alphas", "labels", "losses"} or {"alphas", "betas", "label", "surface"}.
    """
    if not runs:
        raise UserError("no runs to plot; pass at least one run directory")
    if dim not in (1, 2):
        raise UserError(f"--dim must be 1 or 2; got {dim}")
    if points < 3:
        raise UserError(f"--points must be >= 3; got {points}")
    if not span > 0:
        raise UserError(f"--span must be > 0; got {span}")
    points += 1 - points % 2
    alphas = _axis(points, span)

    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 4.8), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    if dim == 1:
        labels, curves = [], []
        for label, module, data, idx in runs:
            d = random_direction(module, seed)
            losses = loss_curve(module, data, idx, d, alphas)
            labels.append(label)
            curves.append(losses)
            ax.plot(alphas, losses, label=label, marker="o", markersize=2.5)
        ax.set_xlabel(ALPHA_LABEL)
        ax.set_ylabel(LOSS_LABEL)
        ax.set_title(f"Loss along a random filter-normalised direction (seed {seed})")
        ax.axvline(0.0, color="0.7", linewidth=0.8, zorder=0)
        ax.legend()
        result = {"alphas": alphas, "labels": labels, "losses": curves}
    else:
        label, module, data, idx = runs[0]
        d1, d2 = random_direction(module, seed), random_direction(module, seed + 1)
        betas = alphas.copy()
        z = loss_surface(module, data, idx, d1, d2, alphas, betas)
        A, B = np.meshgrid(alphas, betas, indexing="ij")
        filled = ax.contourf(A, B, z, levels=20, cmap="viridis")
        ax.contour(A, B, z, levels=20, colors="k", linewidths=0.4)
        fig.colorbar(filled, ax=ax, label=LOSS_LABEL)
        ax.plot([0.0], [0.0], marker="*", color="red", markersize=10, linestyle="none", label=label)
        ax.set_xlabel(ALPHA_LABEL)
        ax.set_ylabel(BETA_LABEL)
        ax.set_title(f"Training loss around {label} (seeds {seed}, {seed + 1})")
        ax.legend(loc="upper right")
        result = {"alphas": alphas, "betas": betas, "label": label, "surface": z}
    fig.tight_layout()
    if out is not None:
        path = Path(out)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fig.savefig(path, format="png")
        except OSError as e:
            raise UserError(f"cannot write {path}: {e.strerror or e}; pass --out to a writable file") from None
        result["out"] = str(path)
    return result


def load_run_model(run_dir, samples: Optional[int] = None, device="cpu"):
    """(module, data, idx) of a finished run: its averaged model, its data set and the Hessian subset.

    samples: size of the subset (None: the run's hessian_samples, 0: the default rule).
    """
    from bench.data import load_dataset
    from bench.models import build_model

    run_dir = Path(run_dir)
    cfg_path, model_path = run_dir / "config.json", run_dir / "model.pt"
    if not run_dir.is_dir():
        raise UserError(f"run directory {run_dir} does not exist; pass a folder under results/ that holds config.json")
    if not cfg_path.is_file():
        raise UserError(f"{run_dir} is not a run directory (no config.json)")
    try:
        cfg = json.loads(cfg_path.read_text())
        if not isinstance(cfg, dict):
            raise ValueError("not a JSON object")
        dataset, model_name = cfg["dataset"], cfg.get("model")
        val_fraction = float(cfg.get("val_fraction") or 0.0)
    except (ValueError, KeyError, TypeError) as e:
        raise UserError(f"{cfg_path} is corrupt ({type(e).__name__}: {e}); re-run the configuration") from None
    if not model_path.is_file():
        raise UserError(f"{run_dir} has no model.pt (the run diverged or has not finished); pick a completed run")
    data = load_dataset(dataset, cfg.get("data_dir"))
    if val_fraction > 0:
        data = data.split_validation(val_fraction)
    data = data.to(device)
    with torch.random.fork_rng(devices=[]):  # building the model must not move the caller's random stream
        module = build_model(model_name or data.default_model, data.input_shape, data.num_classes)
    try:
        state = torch.load(model_path, map_location="cpu", weights_only=True)
        module.load_state_dict(state)
    except Exception as e:  # a truncated file, a pickle error, or weights of another architecture
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"{model_path} could not be loaded ({msg}); re-run the configuration") from None
    module.to(device).eval()
    if samples is None:
        samples = int(cfg.get("hessian_samples") or 0)
    idx = hessian_subset(len(data.y_train), samples).to(device)
    return module, data, idx
