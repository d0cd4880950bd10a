"""On-device data augmentation for image batches: random crop (zero padding 4) and horizontal flip.

The standard CIFAR recipe (torchvision RandomCrop(32, padding=4) + RandomHorizontalFlip,
He et al. 2016), applied to the whole [n, B, C, H, W] batch of all local workers at once
by index arithmetic and one gather: no Python loop over samples, no per-sample F.pad.

Output pixel (h, w) of a sample with crop offsets (oy, ox) in [0, 2*pad] and flip f is

    w' = W - 1 - w if f else w                    (the flip is applied after the crop)
    out[c, h, w] = x[c, h + oy - pad, w' + ox - pad], or 0 outside the image

i.e. the image shifted by (pad - oy, pad - ox) in [-pad, pad]^2 with zero fill, then optionally
mirrored. The runner (Trainer.batch) augments the gathered batch as stored - uint8 for CIFAR,
so the gather moves one byte per pixel and the fill is black, as torchvision pads - and then
applies the data set's normalisation (Dataset.prepare: uint8 -> float, mean/std). For a data
set stored as normalised floats (digits) the fill is 0 in those units.

Randomness is a counter-based hash, not a generator: the offsets and the flip of sample j
of worker i's batch at step t are a pure function of (seed, i, t, j), computed in int64
integer arithmetic that never overflows, so they are bit-identical on CPU and CUDA, do not
depend on which other workers are in the batch (a distributed rank holding workers [4, 8)
gets exactly rows 4..7 of the simulator's batch) and not on the algorithm (every algorithm
of a comparison sees the same augmented batches, as it sees the same indices).
"""

from __future__ import annotations

from typing import Sequence, Union

import torch

MASK32 = 0xFFFFFFFF
PAD = 4
# Stream tags: different uses of the hash for the same (seed, worker, step) never collide.
_STREAM_AUGMENT = 0x41554721  # "AUG!"


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """(x * c) mod 2^32 for int64 x in [0, 2^32) and a 32-bit constant c, without int64 overflow.

    Split c into 16-bit halves: x * lo < 2^48 and (x * hi) mod 2^16, shifted, < 2^32.
    """
    lo, hi = c & 0xFFFF, c >> 16
    return (x * lo + (((x * hi) & 0xFFFF) << 16)) & MASK32


def hash32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer mixer (Wellons' "lowbias32"; full avalanche) on int64 values in [0, 2^32)."""
    x = x & MASK32
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def counter_hash(seed: int, workers: torch.Tensor, step: int, batch: int, stream: int = _STREAM_AUGMENT):
    """[len(workers), batch] int64 in [0, 2^32): hash of (stream, seed, worker, step, sample position).

    Each component is folded in by h <- hash32(h + component mod 2^32), so the result is a
    pure function of the five counters and of nothing else (device, batch composition).
    """
    dev = workers.device
    h = hash32(torch.tensor(stream & MASK32, dtype=torch.int64, device=dev))
    h = hash32(h + (seed & MASK32))
    h = hash32(h.view(1, 1) + (workers.to(torch.int64).view(-1, 1) & MASK32))
    h = hash32(h + (step & MASK32))
    h = hash32(h ^ ((step >> 32) & MASK32))  # steps beyond 2^32 still differ
    j = torch.arange(batch, dtype=torch.int64, device=dev).view(1, -1)
    return hash32(h + j)


def crop_flip_params(seed: int, workers: Union[Sequence[int], torch.Tensor], step: int, batch: int,
                     pad: int = PAD, device=None):
    """Crop offsets oy, ox in [0, 2*pad] and flips in {0, 1}, each [len(workers), batch] int64."""
    if not isinstance(workers, torch.Tensor):
        workers = torch.as_tensor(list(workers), dtype=torch.int64, device=device)
    h = counter_hash(seed, workers, step, batch)
    k = 2 * pad + 1
    oy = h % k
    ox = (h // k) % k
    flip = (h >> 31) & 1  # the top bit: independent of the low digits used above
    return oy, ox, flip


def crop_flip(x: torch.Tensor, oy: torch.Tensor, ox: torch.Tensor, flip: torch.Tensor, pad: int = PAD):
    """Apply crop offsets and flips to images x [..., C, H, W]; oy, ox, flip have shape x.shape[:-3].

    Same dtype and shape out; one gather over H*W per sample and channel.
    """
    *lead, C, H, W = x.shape
    S = 1
    for s in lead:
        S *= s
    dev = x.device
    oy, ox, flip = (t.reshape(S, 1).to(dev) for t in (oy, ox, flip))
    hh = torch.arange(H, device=dev).view(1, H)
    ww = torch.arange(W, device=dev).view(1, W)
    rows = hh + oy - pad  # [S, H] source row of each output row
    cols = torch.where(flip.bool(), W - 1 - ww, ww) + ox - pad  # [S, W] source column
    valid = ((rows >= 0) & (rows < H)).unsqueeze(2) & ((cols >= 0) & (cols < W)).unsqueeze(1)  # [S, H, W]
    src = rows.clamp(0, H - 1).unsqueeze(2) * W + cols.clamp(0, W - 1).unsqueeze(1)  # [S, H, W]
    flat = x.reshape(S, C, H * W)
    out = flat.gather(2, src.view(S, 1, H * W).expand(S, C, H * W))
    out = out * valid.view(S, 1, H * W).to(out.dtype)
    return out.view(*lead, C, H, W)


def augment_batch(x: torch.Tensor, seed: int, workers: Union[Sequence[int], torch.Tensor], step: int,
                  pad: int = PAD) -> torch.Tensor:
    """Random crop (zero padding `pad`) + horizontal flip of x [n, B, C, H, W] (worker i = workers[i]).

    Returns the same dtype (uint8 stays uint8: normalisation follows, as without augmentation).
    """
    n, B = x.shape[:2]
    if isinstance(workers, range) or not isinstance(workers, torch.Tensor):
        workers = torch.as_tensor(list(workers), dtype=torch.int64, device=x.device)
    if len(workers) != n:
        raise ValueError(f"{len(workers)} worker ids for a batch of {n} workers")
    oy, ox, flip = crop_flip_params(seed, workers.to(x.device), step, B, pad)
    return crop_flip(x, oy, ox, flip, pad)

