"""Data sets as tensors on the device, per-worker shards, deterministic batches.

A data set is loaded once into memory (small sets as float32, image sets as
uint8 and normalised when a batch is gathered) and moved to the device. No
DataLoader takes part in the step loop: a batch is an index tensor.

The batch of worker i at step t is a pure function of (seed, i, t):
`Sampler.indices(worker, step)`. It does not depend on the algorithm, the
runner or the backend, so every algorithm of a comparison sees the same data
in the same order, and the distributed runner gives each rank exactly the
batches the simulation gives its workers.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
import torch

from bench.errors import UserError
from bench.registry import Registry


@dataclass
class Dataset:
    name: str
    x_train: torch.Tensor  # [N, *input_shape], float32 or uint8
    y_train: torch.Tensor  # [N] int64
    x_test: torch.Tensor
    y_test: torch.Tensor
    num_classes: int
    default_model: str
    # Applied to a gathered batch (e.g. uint8 -> normalised float32); None = identity.
    transform: Optional[Callable[[torch.Tensor], torch.Tensor]] = None
    # Validation split held out of the training set (--val-fraction); None when there is none.
    x_val: Optional[torch.Tensor] = None
    y_val: Optional[torch.Tensor] = None

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.x_train.shape[1:])

    @property
    def in_channels(self) -> int:
        return self.input_shape[0]

    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        return self.transform(x) if self.transform is not None else x

    def to(self, device) -> "Dataset":
        def mv(t):
            return None if t is None else t.to(device)

        return Dataset(self.name, mv(self.x_train), mv(self.y_train), mv(self.x_test), mv(self.y_test),
                       self.num_classes, self.default_model, self.transform, mv(self.x_val), mv(self.y_val))

    def split_validation(self, fraction: float, seed: int = 0) -> "Dataset":
        """Hold out a fraction of the training set (seeded, the same for every run) as a validation split.

        The test split is untouched: tuning picks on validation accuracy, the table reports test metrics.
        """
        n = len(self.y_train)
        k = int(round(fraction * n))
        if not 0 < k < n:
            raise UserError(f"--val-fraction {fraction} leaves no training or no validation samples (N={n})")
        perm = torch.from_numpy(np.random.default_rng([seed, 7]).permutation(n)).to(self.y_train.device)
        val, tr = perm[:k], perm[k:]
        return Dataset(self.name, self.x_train[tr], self.y_train[tr], self.x_test, self.y_test,
                       self.num_classes, self.default_model, self.transform, self.x_train[val], self.y_train[val])


@dataclass(frozen=True)
class DataInfo:
    """What planning needs to know of a data set without loading it."""

    n_train: int
    n_test: int
    input_shape: tuple
    num_classes: int
    default_model: str


@dataclass(frozen=True)
class DataSource:
    """A registered data set: `load(arg, data_dir, download) -> Dataset` and its facts `info(arg)`.

    arg is what follows the colon of a spec ("mnist1d:60000" -> "60000"), None without one.
    available(data_dir, download) raises a one-line UserError when its files are needed and absent.
    """

    load: Callable[..., Dataset]
    info: Callable[[Optional[str]], DataInfo]
    available: Callable[[Optional[str], bool], None] = lambda data_dir, download: None


DATASETS: Registry[DataSource] = Registry("dataset")


def parse_spec(spec: str) -> tuple[str, Optional[str]]:
    name, _, arg = str(spec).partition(":")
    return name, (arg or None)


def dataset_info(spec: str) -> DataInfo:
    """Sizes, shape, classes and default model of a data set spec (nothing is loaded)."""
    name, arg = parse_spec(spec)
    return DATASETS.get(name).info(arg)


def check_available(spec: str, data_dir: Optional[str] = None, download: bool = False) -> None:
    """A one-line UserError if the data set's files are needed and not there (nothing is loaded)."""
    DATASETS.get(parse_spec(spec)[0]).available(data_dir, download)


# ----------------------------------------------------------------------------------------------
# MNIST-1D (Greydanus 2020), generated offline at any size

MNIST1D_DEFAULT = 5000  # the published set: 4000 train / 1000 test


def _mnist1d_size(arg: Optional[str]) -> int:
    if arg is None:
        return MNIST1D_DEFAULT
    try:
        n = int(arg)
    except ValueError:
        n = 0
    if n < 100:
        raise UserError(f"dataset mnist1d:{arg}: give the number of samples, an integer >= 100 "
                        f"(e.g. mnist1d:60000 = 48000 train / 12000 test)")
    return n


def _mnist1d_info(arg: Optional[str]) -> DataInfo:
    n = (_mnist1d_size(arg) // 10) * 10  # make_dataset draws num_samples // 10 per class
    n_train = int(n * 0.8)  # its train_split
    return DataInfo(n_train, n - n_train, (1, 40), 10, "cnn1d")


def cache_dir() -> Optional[str]:
    """Where generated data sets are kept: $DSGDBENCH_CACHE, else ~/.cache/dsgdbench (None: no cache)."""
    d = os.environ.get("DSGDBENCH_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "dsgdbench")
    return d if d.lower() not in ("0", "off", "none") else None


@functools.lru_cache(maxsize=4)
def _mnist1d_arrays(num_samples: int = MNIST1D_DEFAULT):
    """x, y, x_test, y_test of mnist1d's make_dataset with the published arguments and num_samples.

    Generated locally (get_dataset() would download) and kept in cache_dir() as an .npz of plain
    arrays, keyed by the arguments (read back with allow_pickle=False): 50,000 samples take ~10 s
    to generate and ~0.1 s to read.
    """
    from mnist1d.data import get_dataset_args, make_dataset

    args = get_dataset_args(as_dict=True)
    args["num_samples"] = num_samples
    key = hashlib.sha1(json.dumps({k: v for k, v in args.items() if k != "url"}, sort_keys=True).encode())
    folder = cache_dir()
    path = os.path.join(folder, f"mnist1d-{num_samples}-{key.hexdigest()[:12]}.npz") if folder else None
    names = ("x", "y", "x_test", "y_test")
    if path and os.path.isfile(path):
        try:
            with np.load(path, allow_pickle=False) as f:
                return tuple(f[k] for k in names)
        except (OSError, ValueError, KeyError):
            pass  # unreadable: generate again
    from mnist1d.data import ObjectView

    d = make_dataset(ObjectView(args))
    out = tuple(d[k] for k in names)
    if path:
        try:
            os.makedirs(folder, exist_ok=True)
            tmp = f"{path}.{os.getpid()}.tmp.npz"
            np.savez(tmp, **dict(zip(names, out)))
            os.replace(tmp, path)
        except OSError:
            pass  # a read-only home: no cache, the data set is still right
    return out


def load_mnist1d(arg: Optional[str] = None, data_dir: Optional[str] = None, download: bool = False) -> Dataset:
    x, y, xt, yt = _mnist1d_arrays(_mnist1d_size(arg))
    f = lambda a: torch.tensor(a, dtype=torch.float32).unsqueeze(1)  # noqa: E731
    g = lambda a: torch.tensor(a, dtype=torch.int64)  # noqa: E731
    return Dataset("mnist1d" if arg is None else f"mnist1d:{arg}", f(x), g(y), f(xt), g(yt), 10, "cnn1d")


DATASETS.register("mnist1d", "MNIST-1D, generated offline: 4000 train / 1000 test, 1x40 signals, 10 classes; "
                             "mnist1d:N generates N samples (80/20 split)")(DataSource(load_mnist1d, _mnist1d_info))


def _no_arg(name: str, arg: Optional[str]) -> None:
    if arg is not None:
        raise UserError(f"dataset {name!r} takes no argument; got '{name}:{arg}' (use '{name}')")


def load_digits(arg: Optional[str] = None, data_dir: Optional[str] = None, download: bool = False) -> Dataset:
    from sklearn.datasets import load_digits as sk_digits

    _no_arg("digits", arg)
    d = sk_digits()
    x = torch.tensor(d.data, dtype=torch.float32).reshape(-1, 1, 8, 8) / 16.0
    x = (x - 0.3) / 0.4
    y = torch.tensor(d.target, dtype=torch.int64)
    perm = torch.from_numpy(np.random.default_rng(0).permutation(len(y)))
    tr, te = perm[:1437], perm[1437:]
    return Dataset("digits", x[tr], y[tr], x[te], y[te], 10, "cnn")


DATASETS.register("digits", "scikit-learn digits: 1437 train / 360 test, 1x8x8 images, 10 classes")(
    DataSource(load_digits, lambda arg: (_no_arg("digits", arg), DataInfo(1437, 360, (1, 8, 8), 10, "cnn"))[1]))


def load_synthetic(arg: Optional[str] = None, data_dir: Optional[str] = None, download: bool = False) -> Dataset:
    _no_arg("synthetic", arg)
    g = torch.Generator().manual_seed(1234)
    k, length = 4, 16
    centers = torch.randn(k, length, generator=g)

    def draw(m):
        y = torch.randint(0, k, (m,), generator=g)
        x = centers[y] + 0.8 * torch.randn(m, length, generator=g)
        return x.unsqueeze(1), y

    x, y = draw(512)
    xt, yt = draw(256)
    return Dataset("synthetic", x, y, xt, yt, k, "mlp")


DATASETS.register("synthetic", "tiny Gaussian-mixture signals for tests: 512 train / 256 test, 1x16, 4 classes")(
    DataSource(load_synthetic, lambda arg: (_no_arg("synthetic", arg), DataInfo(512, 256, (1, 16), 4, "mlp"))[1]))


_CIFAR_STATS = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
}
_CIFAR_FOLDERS = {"cifar10": "cifar-10-batches-py", "cifar100": "cifar-100-python"}


_CIFAR_FILES = {
    "cifar10": (["data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5"], ["test_batch"],
                "labels"),
    "cifar100": (["train"], ["test"], "fine_labels"),
}


def _read_cifar_pickles(name: str, folder: str, files: list[str], label_key: str):
    """The python version of CIFAR: pickled dicts with 'data' (uint8 [N, 3072]) and labels.

    Read with bench.safe_pickle, which accepts only what the format holds (numpy arrays, lists,
    strings, ints): a crafted file is refused before anything in it runs.
    """
    import pickle

    from bench import safe_pickle

    xs, ys = [], []
    for file in files:
        path = os.path.join(folder, file)
        try:
            d = safe_pickle.load(path)
            xs.append(np.asarray(d["data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
            ys.append(np.asarray(d[label_key], dtype=np.int64))
        except FileNotFoundError:
            raise UserError(f"{name}: {path} is missing; the folder must hold the python version of the data set "
                            f"(pass --data-dir, or --download)") from None
        except safe_pickle.UnsafePickleError as e:
            raise UserError(f"{name}: {path} is not a CIFAR batch file, nothing in it was run ({e}); "
                            f"re-extract the archive from its source") from None
        except (OSError, pickle.UnpicklingError, KeyError, ValueError, TypeError) as e:
            raise UserError(f"{name}: {path} could not be read ({type(e).__name__}); re-extract the archive") from None
    return torch.from_numpy(np.concatenate(xs)), torch.from_numpy(np.concatenate(ys))


def _load_cifar(name: str, data_dir: Optional[str], download: bool) -> Dataset:
    """CIFAR from the local folder, read directly (no checksum pass over 170 MB at every load).

    torchvision is used only to download, and only when the user asks (--download).
    """
    root, folder = _cifar_folder(name, data_dir)
    if not os.path.isdir(folder):
        _cifar_available(name, data_dir, download)
        import torchvision

        cls = torchvision.datasets.CIFAR10 if name == "cifar10" else torchvision.datasets.CIFAR100
        try:
            cls(root, train=True, download=True)
        except (OSError, RuntimeError) as e:  # URLError is an OSError
            raise UserError(f"downloading {name} into {root} failed ({type(e).__name__}: {e}); "
                            f"place the extracted data set in --data-dir instead") from None
    train_files, test_files, label_key = _CIFAR_FILES[name]
    x, y = _read_cifar_pickles(name, folder, train_files, label_key)
    xt, yt = _read_cifar_pickles(name, folder, test_files, label_key)
    mean, std = _CIFAR_STATS[name]

    def normalise(batch: torch.Tensor) -> torch.Tensor:
        m = torch.tensor(mean, device=batch.device).view(1, 3, 1, 1)
        s = torch.tensor(std, device=batch.device).view(1, 3, 1, 1)
        return (batch.float().div_(255.0) - m) / s

    return Dataset(name, x, y, xt, yt, 10 if name == "cifar10" else 100, "resnet18", normalise)


def _cifar_folder(name: str, data_dir: Optional[str]) -> tuple[str, str]:
    root = data_dir or os.environ.get("DSGDBENCH_DATA", "data")
    return root, os.path.join(root, _CIFAR_FOLDERS[name])


def _cifar_available(name: str, data_dir: Optional[str], download: bool) -> None:
    folder = _cifar_folder(name, data_dir)[1]
    if not os.path.isdir(folder) and not download:
        raise UserError(f"{name} not found: expected {folder}/ (the python version of the data set); "
                        f"pass --data-dir DIR that contains it, or --download to fetch it")


def _cifar_source(name: str) -> DataSource:
    classes = 10 if name == "cifar10" else 100

    def load(arg=None, data_dir=None, download=False):
        _no_arg(name, arg)
        return _load_cifar(name, data_dir, download)

    return DataSource(load, lambda arg: (_no_arg(name, arg), DataInfo(50000, 10000, (3, 32, 32), classes,
                                                                       "resnet18"))[1],
                      lambda data_dir, download: _cifar_available(name, data_dir, download))


DATASETS.register("cifar10", "CIFAR-10 from a local folder (--data-dir), 32x32 RGB, 10 classes")(
    _cifar_source("cifar10"))
DATASETS.register("cifar100", "CIFAR-100 from a local folder (--data-dir), 32x32 RGB, 100 classes")(
    _cifar_source("cifar100"))


def load_dataset(spec: str, data_dir: Optional[str] = None, download: bool = False) -> Dataset:
    name, arg = parse_spec(spec)
    return DATASETS.get(name).load(arg, data_dir=data_dir, download=download)


# ----------------------------------------------------------------------------------------------
# Shards and batches


def make_shards(y: torch.Tensor, n: int, partition: str, seed: int, min_size: int = 1) -> list[np.ndarray]:
    """Split training indices among n workers.

    iid: a seeded permutation cut into n equal parts (the remainder is dropped, so every
    worker has the same number of samples). dirichlet:ALPHA: for every class, the class's
    samples are split among workers by proportions drawn from Dir(ALPHA) (smaller ALPHA is
    more skewed; Hsu et al. 2019); the whole draw is repeated (the generator continues) until
    every worker holds at least min_size samples (a batch), at most MAX_DRAWS times.
    """
    labels = y.cpu().numpy()
    N = len(labels)
    rng = np.random.default_rng([seed, 1])
    if partition == "iid":
        perm = rng.permutation(N)
        per = N // n
        return [np.sort(perm[i * per:(i + 1) * per]) for i in range(n)]
    alpha = parse_dirichlet(partition)
    for _ in range(MAX_DRAWS):
        shards: list[list[int]] = [[] for _ in range(n)]
        for c in np.unique(labels):
            idx = rng.permutation(np.flatnonzero(labels == c))
            p = rng.dirichlet(alpha * np.ones(n))
            cuts = (np.cumsum(p)[:-1] * len(idx)).astype(int)
            for i, part in enumerate(np.split(idx, cuts)):
                shards[i].extend(part.tolist())
        if min(len(s) for s in shards) >= min_size:
            return [np.sort(np.array(s, dtype=np.int64)) for s in shards]
    raise UserError(f"partition {partition!r}: in {MAX_DRAWS} draws some of the {n} workers always got fewer than "
                    f"{min_size} samples (a batch); use a larger ALPHA, fewer workers or a smaller --batch")


MAX_DRAWS = 100


def parse_dirichlet(partition: str) -> float:
    name, _, arg = partition.partition(":")
    if name != "dirichlet" or not arg:
        raise UserError(f"unknown partition {partition!r}; valid: iid, dirichlet:ALPHA (e.g. dirichlet:0.5)")
    try:
        alpha = float(arg)
    except ValueError:
        raise UserError(f"partition {partition!r}: ALPHA must be a number, e.g. dirichlet:0.5") from None
    if not alpha > 0:
        raise UserError(f"partition {partition!r}: ALPHA must be > 0")
    return alpha


class Sampler:
    """Batch indices of every worker at every step, a pure function of (seed, worker, step).

    Worker i walks through its own shard in epochs; epoch e of worker i is the permutation
    drawn from numpy's generator seeded with [seed, i, e]. A batch never straddles two
    epochs: the tail of an epoch shorter than a batch is dropped.
    """

    def __init__(self, shards: list[np.ndarray], batch: int, seed: int, device="cpu"):
        smallest = min(len(s) for s in shards)
        if batch > smallest:
            raise UserError(f"--batch {batch} is larger than a worker's shard ({smallest} samples with "
                            f"{len(shards)} workers); use --batch <= {smallest} or fewer workers")
        self.shards = shards
        self.batch = batch
        self.seed = seed
        self.device = device
        self.steps_per_epoch = [len(s) // batch for s in shards]
        self._cache: dict[tuple[int, int], np.ndarray] = {}

    def _epoch(self, worker: int, epoch: int) -> np.ndarray:
        key = (worker, epoch)
        order = self._cache.get(key)
        if order is None:
            if len(self._cache) > 4 * len(self.shards):
                self._cache.clear()
            shard = self.shards[worker]
            order = shard[np.random.default_rng([self.seed, worker, epoch]).permutation(len(shard))]
            self._cache[key] = order
        return order

    def worker_indices(self, worker: int, step: int) -> np.ndarray:
        spe = self.steps_per_epoch[worker]
        epoch, pos = divmod(step, spe)
        return self._epoch(worker, epoch)[pos * self.batch:(pos + 1) * self.batch]

    def indices(self, workers: range, step: int) -> torch.Tensor:
        """[len(workers), batch] int64 indices into the training set, on the device."""
        idx = np.stack([self.worker_indices(w, step) for w in workers])
        return torch.from_numpy(idx).to(self.device, non_blocking=True)


def epoch_steps(n_train: int, total_batch: int) -> float:
    """Steps in one epoch, N / B: one pass over the training set at the total batch size (not rounded:
    at N = 3600 and B = 2048 an epoch is 1.76 steps, not 1)."""
    return n_train / total_batch
