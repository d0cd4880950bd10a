"""Model registry: mlp, cnn1d, cnn, resnet18 (CIFAR stem), CIFAR WideResNets and timm:<name>.

Every model is an ordinary nn.Module: that module is what gets evaluated (the
averaged model x_bar), saved and measured (Hessian). The small models also have
`batched_forward`, which runs all n workers at once from parameters of shape
[n, *shape]: linear layers as batched matrix products, convolutions as grouped
convolutions (groups = n) and BatchNorm over n*C channels, so that each worker
keeps its own batch statistics and running buffers exactly as its own module
would. Tests hold batched_forward equal to n separate module calls.

BatchNorm modes of a forward pass:
  "train"  - batch statistics, running buffers updated (a normal training step)
  "frozen" - batch statistics, running buffers left alone (SAM's perturbed pass)
  "eval"   - running statistics
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from bench.errors import UserError
from bench.registry import Registry

MODELS: Registry[Callable[[tuple, int], nn.Module]] = Registry("model")


def _blinear(h: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """h [n, B, in], w [n, out, in], b [n, out] -> [n, B, out]."""
    return torch.baddbmm(b.unsqueeze(1), h, w.transpose(1, 2))


def _bnorm(h: torch.Tensor, p: dict, buf: dict, name: str, mode: str, bn: nn.BatchNorm2d) -> torch.Tensor:
    """Per-worker BatchNorm on h [B, n*C, ...] with buffers [n, C]."""
    n = p[name + ".weight"].shape[0]
    weight = p[name + ".weight"].reshape(-1)
    bias = p[name + ".bias"].reshape(-1)
    if mode == "eval":
        return F.batch_norm(h, buf[name + ".running_mean"].view(-1), buf[name + ".running_var"].view(-1),
                            weight, bias, False, 0.0, bn.eps)
    if mode == "frozen":
        return F.batch_norm(h, None, None, weight, bias, True, 0.0, bn.eps)
    assert buf[name + ".running_mean"].is_contiguous() and buf[name + ".running_mean"].shape[0] == n
    return F.batch_norm(h, buf[name + ".running_mean"].view(-1), buf[name + ".running_var"].view(-1),
                        weight, bias, True, bn.momentum, bn.eps)


class MLP(nn.Module):
    """Two hidden layers of 128 ReLU units on the flattened input."""

    def __init__(self, input_shape: tuple, num_classes: int, width: int = 128):
        super().__init__()
        d = math.prod(input_shape)
        self.fc1 = nn.Linear(d, width)
        self.fc2 = nn.Linear(width, width)
        self.fc3 = nn.Linear(width, num_classes)

    def forward(self, x):
        h = F.relu(self.fc1(x.flatten(1)))
        h = F.relu(self.fc2(h))
        return self.fc3(h)

    def batched_forward(self, p: dict, buf: dict, x: torch.Tensor, mode: str) -> torch.Tensor:
        h = x.flatten(2)
        h = F.relu(_blinear(h, p["fc1.weight"], p["fc1.bias"]))
        h = F.relu(_blinear(h, p["fc2.weight"], p["fc2.bias"]))
        return _blinear(h, p["fc3.weight"], p["fc3.bias"])


class CNN1d(nn.Module):
    """Three 1-D convolutions (32 channels; the last two stride 2) and a linear head.

    Sized for MNIST-1D (1x40): about 10k parameters, ~94% test accuracy when trained well.
    """

    def __init__(self, input_shape: tuple, num_classes: int, width: int = 32):
        super().__init__()
        c, length = input_shape[0], input_shape[-1]
        self.conv1 = nn.Conv1d(c, width, 5, padding=2)
        self.conv2 = nn.Conv1d(width, width, 3, stride=2, padding=1)
        self.conv3 = nn.Conv1d(width, width, 3, stride=2, padding=1)
        out_len = (length + 1) // 2
        out_len = (out_len + 1) // 2
        self.fc = nn.Linear(width * out_len, num_classes)

    def forward(self, x):
        h = F.relu(self.conv1(x))
        h = F.relu(self.conv2(h))
        h = F.relu(self.conv3(h))
        return self.fc(h.flatten(1))

    def batched_forward(self, p: dict, buf: dict, x: torch.Tensor, mode: str) -> torch.Tensor:
        n, B = x.shape[:2]
        h = x.transpose(0, 1).reshape(B, -1, x.shape[-1])  # [B, n*C, L]: worker-major channels
        for name in ("conv1", "conv2", "conv3"):
            conv = getattr(self, name)
            w = p[name + ".weight"]
            h = F.conv1d(h, w.reshape(-1, *w.shape[2:]), p[name + ".bias"].reshape(-1),
                         stride=conv.stride, padding=conv.padding, groups=n)
            h = F.relu(h)
        h = h.reshape(B, n, -1).transpose(0, 1)  # [n, B, C*L], same flatten order as the module
        return _blinear(h, p["fc.weight"], p["fc.bias"])


class CNN(nn.Module):
    """Small 2-D CNN with BatchNorm: 32-64-64 channels (strides 1, 2, 2), global pooling, linear head."""

    def __init__(self, input_shape: tuple, num_classes: int):
        super().__init__()
        c = input_shape[0]
        self.conv1 = nn.Conv2d(c, 32, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(32)
        self.conv2 = nn.Conv2d(32, 64, 3, stride=2, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(64)
        self.conv3 = nn.Conv2d(64, 64, 3, stride=2, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(64)
        self.fc = nn.Linear(64, num_classes)

    def forward(self, x):
        h = F.relu(self.bn1(self.conv1(x)))
        h = F.relu(self.bn2(self.conv2(h)))
        h = F.relu(self.bn3(self.conv3(h)))
        return self.fc(h.mean((2, 3)))

    def batched_forward(self, p: dict, buf: dict, x: torch.Tensor, mode: str) -> torch.Tensor:
        n, B = x.shape[:2]
        h = x.transpose(0, 1).reshape(B, -1, *x.shape[-2:])  # [B, n*C, H, W]
        for i in (1, 2, 3):
            conv = getattr(self, f"conv{i}")
            w = p[f"conv{i}.weight"]
            h = F.conv2d(h, w.reshape(-1, *w.shape[2:]), None, stride=conv.stride, padding=conv.padding, groups=n)
            h = F.relu(_bnorm(h, p, buf, f"bn{i}", mode, getattr(self, f"bn{i}")))
        h = h.mean((2, 3)).reshape(B, n, -1).transpose(0, 1)
        return _blinear(h, p["fc.weight"], p["fc.bias"])


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        h = F.relu(self.bn1(self.conv1(x)))
        h = self.bn2(self.conv2(h))
        return F.relu(h + self.shortcut(x))


class ResNet18(nn.Module):
    """ResNet-18 with the CIFAR stem (3x3 convolution, stride 1, no max-pool; He et al. 2016)."""

    def __init__(self, input_shape: tuple, num_classes: int):
        super().__init__()
        self.conv1 = nn.Conv2d(input_shape[0], 64, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        layers, cin = [], 64
        for cout, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
            layers += [BasicBlock(cin, cout, stride), BasicBlock(cout, cout, 1)]
            cin = cout
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(512, num_classes)

    def forward(self, x):
        h = F.relu(self.bn1(self.conv1(x)))
        h = self.layers(h)
        return self.fc(F.adaptive_avg_pool2d(h, 1).flatten(1))


class WideBlock(nn.Module):
    """Pre-activation wide residual block: BN-ReLU-conv3x3-(dropout)-BN-ReLU-conv3x3, plus a shortcut."""

    def __init__(self, cin: int, cout: int, stride: int, dropout: float):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.dropout = dropout
        self.shortcut = None
        if stride != 1 or cin != cout:
            self.shortcut = nn.Conv2d(cin, cout, 1, stride, bias=False)

    def forward(self, x):
        a = F.relu(self.bn1(x))
        h = self.conv1(a)
        h = F.relu(self.bn2(h))
        if self.dropout > 0:
            h = F.dropout(h, self.dropout, self.training)
        h = self.conv2(h)
        # The projection shortcut sees the pre-activated input (Zagoruyko & Komodakis 2016).
        return h + (x if self.shortcut is None else self.shortcut(a))


class WideResNet(nn.Module):
    """CIFAR WideResNet-depth-k (Zagoruyko & Komodakis 2016): 3 groups of (depth-4)/6 blocks, widths 16k-32k-64k."""

    def __init__(self, input_shape: tuple, num_classes: int, depth: int = 28, k: int = 10, dropout: float = 0.0):
        super().__init__()
        if (depth - 4) % 6:
            raise ValueError("WideResNet depth must be 6m + 4")
        m = (depth - 4) // 6
        widths = (16, 16 * k, 32 * k, 64 * k)
        self.conv1 = nn.Conv2d(input_shape[0], widths[0], 3, 1, 1, bias=False)
        blocks, cin = [], widths[0]
        for cout, stride in zip(widths[1:], (1, 2, 2)):
            for j in range(m):
                blocks.append(WideBlock(cin, cout, stride if j == 0 else 1, dropout))
                cin = cout
        self.blocks = nn.Sequential(*blocks)
        self.bn = nn.BatchNorm2d(cin)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x):
        h = self.blocks(self.conv1(x))
        h = F.relu(self.bn(h))
        return self.fc(F.adaptive_avg_pool2d(h, 1).flatten(1))


MODELS.register("mlp", "MLP, 2 hidden layers of 128 (any input)")(MLP)
MODELS.register("cnn1d", "1-D CNN, 3 conv layers of 32 channels (default for mnist1d)")(CNN1d)
MODELS.register("cnn", "2-D CNN with BatchNorm, 32-64-64 channels (images)")(CNN)
MODELS.register("resnet18", "ResNet-18, CIFAR stem (images)")(ResNet18)
MODELS.register("wrn28_10", "WideResNet-28-10, CIFAR (images; 36.5M parameters)")(WideResNet)
MODELS.register("wrn16_4", "WideResNet-16-4, CIFAR (images; 2.7M parameters)")(
    lambda input_shape, num_classes: WideResNet(input_shape, num_classes, depth=16, k=4))


def build_model(name: str, input_shape: tuple, num_classes: int) -> nn.Module:
    """Build a model by registry name or as timm:<name>. The caller seeds torch first."""
    if name.startswith("timm:"):
        import timm

        arch = name[5:]
        if arch not in timm.list_models():
            raise UserError(f"unknown timm model {arch!r}; `python -c \"import timm; print(timm.list_models('*res*'))\"` "
                            f"lists them")
        return timm.create_model(arch, pretrained=False, num_classes=num_classes, in_chans=input_shape[0])
    factory = MODELS.get(name)
    needs_image = name in ("cnn", "resnet18", "wrn28_10", "wrn16_4")
    if needs_image and len(input_shape) != 3:
        raise UserError(f"model {name!r} needs images (C x H x W); this data set has inputs of shape "
                        f"{'x'.join(map(str, input_shape))}; use mlp or cnn1d")
    if name == "cnn1d" and len(input_shape) != 2:
        raise UserError("model 'cnn1d' needs 1-D signals (C x L); use cnn or mlp for images")
    return factory(input_shape, num_classes)


def model_names() -> list[str]:
    return MODELS.names() + ["timm:<name>"]


def load_init(module: nn.Module, path: str) -> dict:
    """Start from the weights in `path` (a state_dict saved with torch.save, or {"state_dict": ...}).

    Tensors whose name and shape match are copied; the rest (e.g. a 1000-class ImageNet head
    when training on 10 classes) keep their fresh initialisation. Returns counts of both.
    """
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a file that is not a torch checkpoint
        raise UserError(f"--init {path!r}: not a readable state_dict ({type(e).__name__})") from None
    if isinstance(sd, dict) and isinstance(sd.get("state_dict"), dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict):
        raise UserError(f"--init {path!r}: expected a state_dict (name -> tensor)")
    own = module.state_dict()
    matched = {k: v for k, v in sd.items() if k in own and hasattr(v, "shape") and v.shape == own[k].shape}
    if not matched:
        raise UserError(f"--init {path!r}: no tensor matches the model's names and shapes")
    own.update({k: v.to(own[k].dtype) for k, v in matched.items()})
    module.load_state_dict(own)
    return {"init_loaded": len(matched), "init_skipped": len(own) - len(matched)}
