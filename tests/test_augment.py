"""On-device augmentation (bench/augment.py): random crop with zero padding 4 + horizontal flip.

The reference here is written independently, sample by sample with F.pad, slicing and
torch.flip; the code under test does the whole [n, B] batch with one gather. Randomness
is a counter-based hash of (seed, worker, step, position): deterministic, independent of
the other workers in the batch, and integer-exact (so the same on every device).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

from bench.augment import PAD, augment_batch, counter_hash, crop_flip, crop_flip_params, hash32
from bench.config import RunConfig
from bench.data import Dataset
from bench.errors import UserError
from bench.runner import Trainer

N, B, C, H, W = 4, 16, 3, 12, 10


def pattern(n=N, b=B, c=C, h=H, w=W) -> torch.Tensor:
    """Images whose every pixel value is unique and non-zero (so a shift/flip is identifiable)."""
    base = torch.arange(1, c * h * w + 1, dtype=torch.float32).view(c, h, w)
    return base.expand(n, b, c, h, w).clone() + 1000 * torch.arange(n * b, dtype=torch.float32).view(n, b, 1, 1, 1)


def reference(img: torch.Tensor, oy: int, ox: int, flip: int, pad: int = PAD) -> torch.Tensor:
    """torchvision's RandomCrop(padding=pad) with offsets (oy, ox), then RandomHorizontalFlip."""
    h, w = img.shape[-2:]
    out = F.pad(img, (pad, pad, pad, pad))[..., oy:oy + h, ox:ox + w]
    return torch.flip(out, dims=[-1]) if flip else out


# ----------------------------------------------------------------------------------------------
# the hash


def test_hash32_is_exact_32_bit_arithmetic():
    """hash32 on int64 equals the same mixer written with Python's unbounded integers."""
    def ref(x):
        x &= 0xFFFFFFFF
        x ^= x >> 16
        x = (x * 0x7FEB352D) & 0xFFFFFFFF
        x ^= x >> 15
        x = (x * 0x846CA68B) & 0xFFFFFFFF
        return x ^ (x >> 16)

    vals = [0, 1, 2, 12345, 2**31 - 1, 2**31, 2**32 - 1, 0xDEADBEEF]
    got = hash32(torch.tensor(vals, dtype=torch.int64)).tolist()
    assert got == [ref(v) for v in vals]
    assert all(0 <= g < 2**32 for g in got)


def test_params_deterministic_and_distinct():
    a = crop_flip_params(7, range(N), 3, B)
    b = crop_flip_params(7, range(N), 3, B)
    for u, v in zip(a, b):
        assert torch.equal(u, v)
    h = counter_hash(7, torch.arange(N), 3, B)
    assert not torch.equal(h, counter_hash(7, torch.arange(N), 4, B))  # another step
    assert not torch.equal(h, counter_hash(8, torch.arange(N), 3, B))  # another seed
    assert not torch.equal(h[1], h[2])  # workers differ from each other
    assert len(set(h.reshape(-1).tolist())) == N * B  # no collisions in a batch
    # far steps (beyond 2^32) still differ
    assert not torch.equal(counter_hash(0, torch.arange(2), 5, 8), counter_hash(0, torch.arange(2), 5 + 2**32, 8))


def test_params_ranges_and_roughly_uniform():
    oy, ox, flip = crop_flip_params(0, range(64), 11, 256)
    assert oy.dtype == ox.dtype == flip.dtype == torch.int64
    assert oy.min() == 0 and oy.max() == 2 * PAD and ox.min() == 0 and ox.max() == 2 * PAD
    assert set(flip.unique().tolist()) == {0, 1}
    total = oy.numel()
    for t, k in ((oy, 9), (ox, 9), (flip, 2)):
        counts = torch.bincount(t.reshape(-1), minlength=k).double()
        assert (counts - total / k).abs().max() < 0.06 * total / k + 4 * (total / k) ** 0.5
    # the two offsets and the flip are not tied to each other
    joint = torch.bincount((oy * 9 + ox).reshape(-1), minlength=81)
    assert (joint > 0).all()
    assert 0.45 < flip[oy == 4].double().mean() < 0.55


# ----------------------------------------------------------------------------------------------
# the transform


def test_output_is_a_shift_with_zero_fill_optionally_mirrored():
    x = pattern()
    seed, step = 3, 17
    out = augment_batch(x, seed, range(N), step)
    assert out.shape == x.shape and out.dtype == x.dtype
    oy, ox, flip = crop_flip_params(seed, range(N), step, B)
    seen_flip, seen_shift = set(), set()
    for i in range(N):
        for j in range(B):
            want = reference(x[i, j], int(oy[i, j]), int(ox[i, j]), int(flip[i, j]))
            assert torch.equal(out[i, j], want), (i, j)
            # and it is one of the 81 x 2 candidate transforms, and no other
            matches = [(dy, dx, f) for dy in range(9) for dx in range(9) for f in (0, 1)
                       if torch.equal(out[i, j], reference(x[i, j], dy, dx, f))]
            assert matches == [(int(oy[i, j]), int(ox[i, j]), int(flip[i, j]))]
            seen_flip.add(int(flip[i, j]))
            seen_shift.add((int(oy[i, j]) - PAD, int(ox[i, j]) - PAD))
            # values come from the sample itself, or are zero fill
            vals = set(out[i, j].unique().tolist()) - {0.0}
            assert vals <= set(x[i, j].unique().tolist())
    assert seen_flip == {0, 1}
    assert any(s != (0, 0) for s in seen_shift)
    assert all(-PAD <= a <= PAD and -PAD <= b <= PAD for a, b in seen_shift)


def test_uint8_batch_stays_uint8_and_zero_padded():
    g = torch.Generator().manual_seed(0)
    x = torch.randint(1, 256, (N, B, 3, 32, 32), dtype=torch.uint8, generator=g)  # no zero pixel in the input
    out = augment_batch(x, 0, range(N), 0)
    assert out.dtype == torch.uint8 and out.shape == x.shape
    oy, ox, flip = crop_flip_params(0, range(N), 0, B)
    zeros = (out == 0).all(2).flatten(2).sum(-1)  # zero pixels (all channels) per sample
    expect = 32 * 32 - (32 - (oy - PAD).abs()) * (32 - (ox - PAD).abs())
    assert torch.equal(zeros, expect)
    assert (zeros > 0).any()


def test_block_of_workers_equals_rows_of_all_workers():
    """A rank holding workers [2, 3] gets exactly rows 2, 3 of the full batch (distributed == simulated)."""
    x = pattern()
    full = augment_batch(x, 5, range(N), 9)
    block = augment_batch(x[2:4], 5, range(2, 4), 9)
    assert torch.equal(block, full[2:4])
    alone = augment_batch(x[3:4], 5, [3], 9)
    assert torch.equal(alone, full[3:4])


def test_different_steps_and_workers_augment_differently():
    x = pattern(n=1, b=B).expand(2, B, C, H, W).clone()  # two workers, the same images
    a = augment_batch(x, 0, [0, 1], 0)
    assert not torch.equal(a[0], a[1])
    assert not torch.equal(augment_batch(x, 0, [0, 1], 1), a)
    assert torch.equal(augment_batch(x, 0, [0, 1], 0), a)


def test_crop_flip_with_explicit_params():
    x = pattern(n=1, b=3)
    oy = torch.tensor([[4, 0, 8]])
    ox = torch.tensor([[4, 8, 0]])
    flip = torch.tensor([[0, 1, 0]])
    out = crop_flip(x, oy, ox, flip)
    assert torch.equal(out[0, 0], x[0, 0])  # centre crop, no flip: identity
    assert torch.equal(out[0, 1], reference(x[0, 1], 0, 8, 1))
    assert (out[0, 1][:, :4, :] == 0).all()  # shifted down by 4: the top rows are fill
    assert torch.equal(out[0, 2], reference(x[0, 2], 8, 0, 0))


# ----------------------------------------------------------------------------------------------
# in the runner


def tiny_images(n_train=256, n_test=64) -> Dataset:
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (n_train, 3, 8, 8), dtype=torch.uint8, generator=g)
    xt = torch.randint(0, 256, (n_test, 3, 8, 8), dtype=torch.uint8, generator=g)
    y = torch.randint(0, 4, (n_train,), generator=g)
    yt = torch.randint(0, 4, (n_test,), generator=g)
    return Dataset("synthetic", x, y, xt, yt, 4, "cnn", lambda b: (b.float() / 255.0 - 0.5) / 0.25)


def trainer(data, tmp_path, **kw) -> Trainer:
    cfg = RunConfig(dataset="synthetic", model="cnn", workers=4, batch=4, steps=3, lr=0.05, hessian=False,
                    results=str(tmp_path), **kw).resolve(len(data.y_train), "cnn")
    return Trainer(cfg, data, torch.device("cpu"), tmp_path / "run")


def test_trainer_batch_augments_with_seed_worker_step(tmp_path):
    data = tiny_images()
    plain = trainer(data, tmp_path)
    aug = trainer(data, tmp_path, augment=True)
    for t in (0, 5):
        x0, y0 = plain.batch(t)
        x1, y1 = aug.batch(t)
        assert torch.equal(y0, y1)  # the same samples, in the same order
        assert x1.dtype == torch.float32 and x1.shape == x0.shape
        assert not torch.equal(x0, x1)
        idx = plain.sampler.indices(range(4), t)
        raw = data.x_train[idx.reshape(-1)].view(4, 4, 3, 8, 8)
        want = data.prepare(augment_batch(raw, 0, range(4), t).reshape(-1, 3, 8, 8)).view_as(x1)
        torch.testing.assert_close(x1, want, rtol=0, atol=0)
    # a run with augmentation trains and evaluates (evaluation reads the test set unaugmented)
    aug.run_dir.mkdir()
    s = aug.train()
    assert s["status"] in ("completed", "collapsed") and s["test_acc"] is not None  # a few steps may be at chance


def test_augment_on_non_image_data_is_a_user_error(tmp_path, synthetic):
    cfg = RunConfig(dataset="synthetic", model="mlp", workers=2, batch=4, steps=1, hessian=False,
                    augment=True, results=str(tmp_path)).resolve(len(synthetic.y_train), "mlp")
    with pytest.raises(UserError, match="--augment"):
        Trainer(cfg, synthetic, torch.device("cpu"), tmp_path / "run")


def test_cli_augment_on_mnist1d_exits_2(tmp_path):
    from dsgdbench import app

    res = CliRunner(env={"COLUMNS": "250"}).invoke(
        app, ["run", "--dataset", "mnist1d", "--augment", "--steps", "1", "--no-hessian", "--results",
              str(tmp_path / "r")])
    assert res.exit_code == 2, res.output
    err = res.stderr if hasattr(res, "stderr") else res.output
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and "--augment" in lines[0]
    assert "Traceback" not in res.output
    assert not (tmp_path / "r").exists() or not any((tmp_path / "r").iterdir())


def test_distributed_run_sees_the_simulators_augmented_batches(tmp_path):
    """Two gloo ranks (2 workers each) with --augment train exactly what the simulator trains."""
    from bench.distributed import launch
    from bench.runner import run

    # float64: the two backends differ only by the order of all-reduce sums (~1e-15 relative; see
    # tests/test_distributed.py), so 1e-10 is tight yet machine-independent
    base = dict(dataset="digits", model="cnn", augment=True, workers=4, batch=8, steps=4, lr=0.05, hessian=False,
                eval_every=4, device="cpu", dist_timeout=60.0, precision="fp64")
    dist = launch(RunConfig(results=str(tmp_path / "dist"), **base), 2, progress=False)
    sim = run(RunConfig(results=str(tmp_path / "sim"), **base))
    assert dist["world_size"] == 2 and sim["backend"] == "simulated"
    assert dist["test_loss"] == pytest.approx(sim["test_loss"], rel=1e-10)
    assert dist["consensus_distance"] == pytest.approx(sim["consensus_distance"], rel=1e-6)
