"""Data sets, shards and the deterministic per-worker batch sampler (bench/data.py).

CIFAR-10/100 are tested on small files written here in the real on-disk format of the
"python version" archives (Python 2 pickles: dicts with byte-string keys, as the CIFAR page's
`pickle.load(f, encoding="bytes")` shows). Fixtures live in this file on purpose.
"""

from __future__ import annotations

import io
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from bench.data import DATASETS, Dataset, Sampler, epoch_steps, load_dataset, make_shards, parse_dirichlet
from bench.errors import UserError
from helpers import Py2Pickler

CIFAR10_MEAN, CIFAR10_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
CIFAR100_MEAN, CIFAR100_STD = (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)


@pytest.fixture(scope="module")
def synth() -> Dataset:
    return load_dataset("synthetic")


@pytest.fixture(scope="module")
def labels10() -> torch.Tensor:
    """1000 labels, 10 balanced classes, shuffled."""
    y = np.repeat(np.arange(10), 100)
    return torch.from_numpy(np.random.default_rng(5).permutation(y)).long()


# ----------------------------------------------------------------------------------------------
# Sampler


def test_sampler_is_pure_function_of_seed_worker_step(synth):
    shards = make_shards(synth.y_train, 4, "iid", seed=0)
    a = Sampler(shards, 8, seed=3)
    b = Sampler(make_shards(synth.y_train, 4, "iid", seed=0), 8, seed=3)
    keys = [(w, t) for w in range(4) for t in range(0, 40)]
    # b is queried in a different order (and a's cache is warm): no hidden state may leak in
    got_a = {k: a.worker_indices(*k).copy() for k in keys}
    got_b = {k: b.worker_indices(*k).copy() for k in reversed(keys)}
    for k in keys:
        np.testing.assert_array_equal(got_a[k], got_b[k])
        assert len(got_a[k]) == 8
    # a fresh sampler asked for a late step first agrees too
    c = Sampler(shards, 8, seed=3)
    np.testing.assert_array_equal(c.worker_indices(2, 37), got_a[(2, 37)])
    # the batched form stacks the per-worker batches
    idx = a.indices(range(4), 5)
    assert isinstance(idx, torch.Tensor) and idx.dtype == torch.int64 and tuple(idx.shape) == (4, 8)
    for w in range(4):
        np.testing.assert_array_equal(idx[w].numpy(), got_a[(w, 5)])
    sub = a.indices(range(1, 3), 5)
    assert tuple(sub.shape) == (2, 8)
    np.testing.assert_array_equal(sub.numpy(), idx[1:3].numpy())


def test_sampler_seeds_differ(synth):
    shards = make_shards(synth.y_train, 4, "iid", seed=0)
    a, b = Sampler(shards, 8, seed=0), Sampler(shards, 8, seed=1)
    for w in range(4):
        assert not np.array_equal(a.worker_indices(w, 0), b.worker_indices(w, 0))
    # workers of one sampler walk differently, epochs differ
    assert not np.array_equal(a.worker_indices(0, 0), a.worker_indices(1, 0))
    spe = a.steps_per_epoch[0]
    assert not np.array_equal(a.worker_indices(0, 0), a.worker_indices(0, spe))


@pytest.mark.parametrize("batch", [8, 10, 128])
def test_sampler_epoch_is_disjoint_cover_of_own_shard(synth, batch):
    n = 4
    shards = make_shards(synth.y_train, n, "iid", seed=2)
    s = Sampler(shards, batch, seed=7)
    for w in range(n):
        shard = set(shards[w].tolist())
        spe = len(shards[w]) // batch
        assert s.steps_per_epoch[w] == spe
        for epoch in range(2):
            seen: list[int] = []
            for t in range(epoch * spe, (epoch + 1) * spe):
                b = s.worker_indices(w, t)
                assert len(b) == batch
                seen.extend(b.tolist())
            assert len(seen) == len(set(seen)) == spe * batch  # disjoint batches, floor(shard/B)*B samples
            assert set(seen) <= shard  # only its own shard
        # other workers' batches come from their own shards (disjoint under iid)
        for v in range(n):
            if v != w:
                assert not set(s.worker_indices(v, 0).tolist()) & shard


def test_sampler_batch_larger_than_shard(synth):
    shards = make_shards(synth.y_train, 4, "iid", seed=0)  # 128 each
    Sampler(shards, 128, seed=0)  # exactly a shard is fine
    with pytest.raises(UserError, match="--batch 129"):
        Sampler(shards, 129, seed=0)
    uneven = [np.arange(50), np.arange(50, 60)]
    with pytest.raises(UserError, match="10 samples"):
        Sampler(uneven, 11, seed=0)


def test_epoch_steps():
    assert epoch_steps(512, 32) == 16
    # N / B, not rounded: a total batch larger than the training set is a fraction of an epoch per step.
    assert epoch_steps(512, 1000) == 0.512
    assert epoch_steps(3600, 2048) == 3600 / 2048


# ----------------------------------------------------------------------------------------------
# Shards


@pytest.mark.parametrize("N,n", [(512, 4), (510, 4), (1000, 7), (16, 16)])
def test_iid_shards_equal_and_disjoint(N, n):
    y = torch.arange(N) % 3
    shards = make_shards(y, n, "iid", seed=0)
    assert len(shards) == n
    sizes = {len(s) for s in shards}
    assert sizes == {N // n}
    allidx = np.concatenate(shards)
    assert len(np.unique(allidx)) == len(allidx) == n * (N // n)
    assert allidx.min() >= 0 and allidx.max() < N
    again = make_shards(y, n, "iid", seed=0)
    assert all(np.array_equal(a, b) for a, b in zip(shards, again))
    if N > 100:
        other = make_shards(y, n, "iid", seed=1)
        assert not all(np.array_equal(a, b) for a, b in zip(shards, other))


def _skew(shards, labels: np.ndarray, k: int) -> float:
    """Sample-weighted total-variation distance of the shards' label distributions to the global one."""
    glob = np.bincount(labels, minlength=k) / len(labels)
    tot = 0.0
    for s in shards:
        if len(s):
            p = np.bincount(labels[s], minlength=k) / len(s)
            tot += len(s) * 0.5 * np.abs(p - glob).sum()
    return tot / sum(len(s) for s in shards)


def test_dirichlet_shards_skewed_and_complete(labels10):
    y = labels10.numpy()
    n = 8
    iid = make_shards(labels10, n, "iid", seed=0)
    dirichlet = make_shards(labels10, n, "dirichlet:0.1", seed=0)
    allidx = np.concatenate(dirichlet)
    np.testing.assert_array_equal(np.sort(allidx), np.arange(len(y)))  # every sample exactly once
    skew_iid, skew_dir = _skew(iid, y, 10), _skew(dirichlet, y, 10)
    assert skew_iid < 0.2
    assert skew_dir > 0.5
    assert skew_dir > 3 * skew_iid
    # a larger alpha is closer to iid
    mild = make_shards(labels10, n, "dirichlet:100", seed=0)
    assert _skew(mild, y, 10) < skew_dir
    # deterministic
    again = make_shards(labels10, n, "dirichlet:0.1", seed=0)
    assert all(np.array_equal(a, b) for a, b in zip(dirichlet, again))


@pytest.mark.parametrize("bad", ["foo", "IID", "dirichlet", "dirichlet:", "dirichlet:abc", "dirichlet:0",
                                 "dirichlet:-1", "dirichlet:nan", "dirich:0.5"])
def test_bad_partition(bad, labels10):
    with pytest.raises(UserError, match="partition"):
        make_shards(labels10, 4, bad, seed=0)


def test_parse_dirichlet():
    assert parse_dirichlet("dirichlet:0.5") == 0.5
    assert parse_dirichlet("dirichlet:1e-1") == pytest.approx(0.1)


# ----------------------------------------------------------------------------------------------
# Data sets


def test_registry_names():
    assert {"mnist1d", "digits", "synthetic", "cifar10", "cifar100"} <= set(DATASETS.names())
    with pytest.raises(UserError, match="did you mean 'mnist1d'"):
        load_dataset("mnist1e")


def test_mnist1d():
    d = load_dataset("mnist1d")
    assert tuple(d.x_train.shape) == (4000, 1, 40) and tuple(d.x_test.shape) == (1000, 1, 40)
    assert d.x_train.dtype == torch.float32 and d.x_test.dtype == torch.float32
    assert d.y_train.dtype == torch.int64 and tuple(d.y_train.shape) == (4000,) and tuple(d.y_test.shape) == (1000,)
    assert d.num_classes == 10
    assert set(d.y_train.unique().tolist()) == set(range(10)) == set(d.y_test.unique().tolist())
    assert d.input_shape == (1, 40) and d.in_channels == 1
    assert d.default_model == "cnn1d"
    assert d.prepare(d.x_train[:3]) is d.x_train[:3] or torch.equal(d.prepare(d.x_train[:3]), d.x_train[:3])
    assert torch.isfinite(d.x_train).all()
    d2 = load_dataset("mnist1d")
    assert torch.equal(d.x_train, d2.x_train) and torch.equal(d.y_test, d2.y_test)


def test_digits():
    d = load_dataset("digits")
    assert tuple(d.x_train.shape) == (1437, 1, 8, 8) and tuple(d.x_test.shape) == (360, 1, 8, 8)
    assert d.x_train.dtype == torch.float32 and d.y_train.dtype == torch.int64
    assert d.num_classes == 10 and d.default_model == "cnn"
    assert set(d.y_train.unique().tolist()) == set(range(10))
    # the 1797 images are split, none in both halves
    tr = {tuple(r) for r in d.x_train.reshape(len(d.x_train), -1).tolist()}
    te = [tuple(r) for r in d.x_test.reshape(len(d.x_test), -1).tolist()]
    assert sum(r in tr for r in te) < 10  # digits has a handful of duplicate images at most


def test_synthetic(synth):
    d = synth
    assert tuple(d.x_train.shape) == (512, 1, 16) and tuple(d.x_test.shape) == (256, 1, 16)
    assert d.x_train.dtype == torch.float32 and d.y_train.dtype == torch.int64
    assert d.num_classes == 4 and d.default_model == "mlp"
    assert set(d.y_train.unique().tolist()) == set(range(4))
    again = load_dataset("synthetic")
    assert torch.equal(d.x_train, again.x_train) and torch.equal(d.y_train, again.y_train)
    assert not torch.equal(d.x_train[:256], d.x_test)


def test_split_validation(synth):
    v = synth.split_validation(0.25, seed=0)
    assert len(v.y_val) == 128 and len(v.y_train) == 384
    assert torch.equal(v.x_test, synth.x_test) and torch.equal(v.y_test, synth.y_test)  # test split untouched
    rows = {tuple(r) for r in synth.x_train.reshape(512, -1).tolist()}
    assert all(tuple(r) in rows for r in v.x_val.reshape(128, -1).tolist())
    tr = {tuple(r) for r in v.x_train.reshape(384, -1).tolist()}
    assert not any(tuple(r) in tr for r in v.x_val.reshape(128, -1).tolist())
    assert synth.x_val is None and synth.to("cpu").x_val is None
    for bad in (0.0, 1.0, 0.0001):
        with pytest.raises(UserError, match="val-fraction"):
            synth.split_validation(bad)


# ----------------------------------------------------------------------------------------------
# CIFAR in the real on-disk format


def _dump_py2(obj, path: Path) -> None:
    buf = io.BytesIO()
    Py2Pickler(buf, protocol=2).dump(obj)
    path.write_bytes(buf.getvalue())


def _images(rng, n):
    return rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)


def write_cifar10(root: Path, per_batch: int = 6, n_test: int = 10, seed: int = 0):
    """cifar-10-batches-py/{data_batch_1..5, test_batch, batches.meta}; returns (x_train, y_train, x_test, y_test)."""
    rng = np.random.default_rng(seed)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    xs, ys = [], []
    for b in range(1, 6):
        x, y = _images(rng, per_batch), rng.integers(0, 10, per_batch).tolist()
        _dump_py2({b"batch_label": f"training batch {b} of 5".encode(), b"labels": y, b"data": x,
                   b"filenames": [f"img_{b}_{i}.png".encode() for i in range(per_batch)]}, folder / f"data_batch_{b}")
        xs.append(x)
        ys += y
    xt, yt = _images(rng, n_test), rng.integers(0, 10, n_test).tolist()
    _dump_py2({b"batch_label": b"testing batch 1 of 1", b"labels": yt, b"data": xt,
               b"filenames": [f"t_{i}.png".encode() for i in range(n_test)]}, folder / "test_batch")
    names = [b"airplane", b"automobile", b"bird", b"cat", b"deer", b"dog", b"frog", b"horse", b"ship", b"truck"]
    _dump_py2({b"num_cases_per_batch": per_batch, b"label_names": names, b"num_vis": 3072}, folder / "batches.meta")
    return np.concatenate(xs), np.array(ys), xt, np.array(yt)


def write_cifar100(root: Path, n_train: int = 24, n_test: int = 10, seed: int = 1):
    """cifar-100-python/{train, test, meta}; returns (x_train, fine_train, x_test, fine_test)."""
    rng = np.random.default_rng(seed)
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    out = []
    for name, n in (("train", n_train), ("test", n_test)):
        x, fine = _images(rng, n), rng.integers(0, 100, n).tolist()
        coarse = [f // 5 for f in fine]
        _dump_py2({b"filenames": [f"{name}_{i}.png".encode() for i in range(n)], b"batch_label": name.encode(),
                   b"fine_labels": fine, b"coarse_labels": coarse, b"data": x}, folder / name)
        out += [x, np.array(fine)]
    _dump_py2({b"fine_label_names": [f"fine{i}".encode() for i in range(100)],
               b"coarse_label_names": [f"coarse{i}".encode() for i in range(20)]}, folder / "meta")
    return tuple(out)


def test_cifar_test_files_have_the_real_format(tmp_path):
    """Guard for the writer above: read back the way the CIFAR page documents (encoding='bytes')."""
    x, y, _, _ = write_cifar10(tmp_path)
    with open(tmp_path / "cifar-10-batches-py" / "data_batch_1", "rb") as f:
        d = pickle.load(f, encoding="bytes")
    assert set(d) == {b"batch_label", b"labels", b"data", b"filenames"}
    assert d[b"data"].dtype == np.uint8 and d[b"data"].shape == (6, 3072)
    np.testing.assert_array_equal(d[b"data"], x[:6])
    assert d[b"labels"] == y[:6].tolist()
    with open(tmp_path / "cifar-10-batches-py" / "data_batch_1", "rb") as f:
        d = pickle.load(f, encoding="latin1")  # how torchvision reads it
    assert "data" in d and "labels" in d
    write_cifar100(tmp_path)
    with open(tmp_path / "cifar-100-python" / "train", "rb") as f:
        d = pickle.load(f, encoding="bytes")
    assert {b"data", b"fine_labels", b"coarse_labels"} <= set(d)


def _check_cifar(d: Dataset, name, files, mean, std, classes):
    x, y, xt, yt = files
    assert d.name == name and d.num_classes == classes and d.default_model == "resnet18"
    assert d.x_train.dtype == torch.uint8 and tuple(d.x_train.shape) == (len(x), 3, 32, 32)
    assert d.x_test.dtype == torch.uint8 and tuple(d.x_test.shape) == (len(xt), 3, 32, 32)
    assert d.input_shape == (3, 32, 32)
    # a row of the file is the R plane, then G, then B, each 32x32 row-major
    np.testing.assert_array_equal(d.x_train.numpy(), x.reshape(-1, 3, 32, 32))
    np.testing.assert_array_equal(d.x_test.numpy(), xt.reshape(-1, 3, 32, 32))
    assert d.y_train.dtype == torch.int64 and d.y_train.tolist() == y.tolist() and d.y_test.tolist() == yt.tolist()
    batch = d.x_train[:4]
    z = d.prepare(batch)
    assert z.dtype == torch.float32 and tuple(z.shape) == (4, 3, 32, 32)
    m = torch.tensor(mean).view(1, 3, 1, 1)
    s = torch.tensor(std).view(1, 3, 1, 1)
    # elementwise float32 arithmetic against the same formula in float64: within 2 float32 ulps of O(2) values
    torch.testing.assert_close(z, (batch.double() / 255.0 - m.double()).div(s.double()).float(), rtol=1e-5, atol=1e-5)
    assert torch.equal(d.x_train[:4], batch)  # prepare() must not modify the stored uint8 data


def test_cifar10_loads_real_format_files(tmp_path):
    files = write_cifar10(tmp_path)
    d = load_dataset("cifar10", data_dir=str(tmp_path))
    _check_cifar(d, "cifar10", files, CIFAR10_MEAN, CIFAR10_STD, 10)


def test_cifar100_loads_real_format_files(tmp_path):
    files = write_cifar100(tmp_path)
    d = load_dataset("cifar100", data_dir=str(tmp_path))
    _check_cifar(d, "cifar100", files, CIFAR100_MEAN, CIFAR100_STD, 100)


@pytest.mark.parametrize("name,folder", [("cifar10", "cifar-10-batches-py"), ("cifar100", "cifar-100-python")])
def test_cifar_missing_folder(tmp_path, monkeypatch, name, folder):
    monkeypatch.delenv("DSGDBENCH_DATA", raising=False)
    with pytest.raises(UserError) as e:
        load_dataset(name, data_dir=str(tmp_path))
    msg = str(e.value)
    assert "--data-dir" in msg and folder in msg and "\n" not in msg
    assert list(tmp_path.iterdir()) == []  # nothing downloaded or created


def test_cifar_download_failure_is_user_error(tmp_path, monkeypatch):
    import urllib.error

    import torchvision.datasets.cifar as tvc

    def offline(*a, **k):
        raise urllib.error.URLError("[Errno -2] Name or service not known")

    monkeypatch.setattr(tvc, "download_and_extract_archive", offline)  # never touch the network in a test
    with pytest.raises(UserError, match="cifar10"):
        load_dataset("cifar10", data_dir=str(tmp_path), download=True)


def test_cifar_env_data_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("DSGDBENCH_DATA", str(tmp_path / "envdir"))
    with pytest.raises(UserError, match="envdir"):
        load_dataset("cifar10")


def test_cifar_broken_folder_is_user_error(tmp_path):
    """The folder exists but its files are missing or truncated: one-line UserError, no traceback."""
    (tmp_path / "cifar-10-batches-py").mkdir()
    with pytest.raises(UserError, match="cifar10"):
        load_dataset("cifar10", data_dir=str(tmp_path))
    write_cifar100(tmp_path)
    (tmp_path / "cifar-100-python" / "train").write_bytes(b"\x80\x02truncated")
    with pytest.raises(UserError, match="cifar100"):
        load_dataset("cifar100", data_dir=str(tmp_path))


def test_dataset_to_keeps_transform(tmp_path):
    write_cifar10(tmp_path)
    d = load_dataset("cifar10", data_dir=str(tmp_path)).to("cpu")
    assert d.transform is not None and d.prepare(d.x_train[:1]).dtype == torch.float32
    v = d.split_validation(0.2)
    assert v.transform is d.transform and len(v.y_val) == 6


class _Payload:
    """Unpickling this runs os.system('touch <path>') under plain pickle.load."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


def test_crafted_cifar_batch_runs_nothing(tmp_path):
    """A data_batch_1 whose unpickling would create a file: one-line UserError, and no file."""
    write_cifar10(tmp_path)
    marker = tmp_path / "pwned"
    batch = tmp_path / "cifar-10-batches-py" / "data_batch_1"
    batch.write_bytes(pickle.dumps({"data": _Payload(marker), "labels": [0]}, protocol=2))
    with open(batch, "rb") as f:  # the payload is real: plain pickle would run it
        pickle.load(f, encoding="latin1")
    assert marker.exists()
    marker.unlink()
    with pytest.raises(UserError, match="nothing in it was run") as e:
        load_dataset("cifar10", str(tmp_path))
    assert "\n" not in str(e.value) and "system" in str(e.value)
    assert not marker.exists()
