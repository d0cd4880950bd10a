"""Message compressors for compressed gossip (CHOCO-SGD): Q(v) per parameter tensor, as rows that travel.

Interface of a compressor (a Component built as cls(hp, ctx); ctx.layout.slots gives each parameter
tensor's [start, stop) in the flat vector, and every compressor works on each tensor separately, as
the reference does):

    encode(V [m, d], workers, step, seed) -> {name: tensor [m, ...]}   one row per local worker
    decode(payload) -> [k, d]        dense Q(v) rows, k = the rows of the payload's tensors
    message_bytes(d, element_size)   bytes of one worker's message = the sum over its payload
                                     rows of numel * element size (what DistComm counts as sent)

Random draws come from a generator seeded with (seed, global worker id, step) (compressor_seed),
so the simulator and every rank of a distributed run draw the same numbers. Floating-point parts
of a payload (values, norms, scales) have V's dtype, so element_size is that of the parameters
(float32 in the default precision: 4 bytes). The zero vector encodes and decodes to zero.

    identity   Q(v) = v                                          d floats
    top-k      the k_l entries of largest |v| of each tensor      k_l floats + k_l int64 indices
    random-k   k_l entries drawn uniformly without replacement    k_l floats + k_l int64 indices
               (unbiased: times d_l / k_l)
    qsgd       sign(v) ||v||_2 xi / s, xi in {0..s} stochastically rounded, s = 2^b - 1
               (scale: times 1 / (1 + min(d_l / s^2, sqrt(d_l) / s)))   d int8 codes + 1 float per tensor
    sign       (||v||_1 / d_l) sign(v)                            ceil(d / 8) bytes + 1 float per tensor

k_l = max(1, int(d_l * ratio)), ratio = the fraction KEPT. The reference's compress_ratio is the
fraction DROPPED (k = max(1, int(d_l (1 - compress_ratio)))); its example scripts use 0.9, i.e. ratio 0.1.

Reference: epfml/ChocoSGD dl_code/pcode/utils/sparsification.py (SparsificationCompressor.get_top_k,
get_random_k, QuantizationCompressor.get_qsgd, SignCompressor) and dl_code/pcode/optim/parallel_choco.py
(CHOCO*Compressor.compress: one call per parameter tensor). Differences, all in how the message is
written, not in Q: indices are global positions in the flat vector (the reference sends per-tensor
positions and adds offsets on receipt: the same 8 bytes); qsgd sends int8 codes and one norm per
tensor (the reference sends the dequantized floats and counts b bits per element); sign packs 8 signs
per uint8 (the reference: 32 per int32) and maps v = 0 to +1 (the packed bit has two states).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod

import torch

from bench.registry import Registry
from bench.spec import Component, Param, between

COMPRESSORS: Registry = Registry("compressor")

RATIO = Param("ratio", 0.1, "fraction of each tensor's entries kept: k_l = max(1, int(d_l ratio))",
              check=between(0, 1, lo_open=True))


def compressor_seed(seed: int, worker: int, step: int) -> int:
    """The seed of worker `worker`'s draws at step `step` (a mix distinct from AD-SAM's noise_seed)."""
    return (((seed * 1_000_037 + worker) * 1_000_039 + step) * 1_009 + 17) % (2**63 - 1)


def generator(seed: int, worker: int, step: int, device) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(compressor_seed(seed, worker, step))


class Compressor(Component):
    """Per-tensor layout shared by the compressors: slot bounds and each entry's tensor id."""

    def __init__(self, hp, ctx):
        self.bounds = [(s.start, s.stop) for s in ctx.layout.slots]
        self.d = ctx.layout.d
        self.sizes = [b - a for a, b in self.bounds]
        self.layer_of = torch.cat([torch.full((n,), i, dtype=torch.long) for i, n in enumerate(self.sizes)]
                                  ).to(ctx.device)  # [d]: the tensor each entry belongs to

    def per_entry(self, per_layer: torch.Tensor) -> torch.Tensor:
        """[k, L] -> [k, d]: each tensor's value on its entries."""
        return per_layer.index_select(1, self.layer_of.to(per_layer.device))

    def check_d(self, d: int) -> None:
        if d != self.d:
            raise ValueError(f"message of a {d}-vector for a layout of {self.d}")


@COMPRESSORS.register("identity", "no compression: send v itself")
class Identity(Compressor):
    def encode(self, V, workers, step, seed):
        return {"values": V}

    def decode(self, payload):
        return payload["values"]

    def message_bytes(self, d, element_size):
        return d * element_size


class Sparsifier(Compressor, ABC):
    """Keeps k_l entries of each tensor; payload: their values and int64 positions in the flat vector."""

    params = (RATIO,)

    def __init__(self, hp, ctx):
        super().__init__(hp, ctx)
        self.ks = [max(1, int(n * hp.ratio)) for n in self.sizes]

    @abstractmethod
    def indices(self, V, workers, step, seed) -> torch.Tensor:
        """The [rows, k] int64 positions each worker keeps."""

    def encode(self, V, workers, step, seed):
        idx = self.indices(V, workers, step, seed)
        return {"values": V.gather(1, idx), "indices": idx}

    def decode(self, payload):
        v, idx = payload["values"], payload["indices"]
        return torch.zeros(v.shape[0], self.d, dtype=v.dtype, device=v.device).scatter_(1, idx, v)

    def message_bytes(self, d, element_size):
        self.check_d(d)
        return sum(self.ks) * (element_size + 8)


@COMPRESSORS.register("top-k", "keep the k_l = ratio d_l entries of largest |v| per tensor")
class TopK(Sparsifier):
    """Q(v)_l = v_l on the k_l largest |v_l| (torch.topk), 0 elsewhere; values unscaled (get_top_k)."""

    def indices(self, V, workers, step, seed):
        return torch.cat([V[:, a:b].abs().topk(k, dim=1, sorted=False).indices + a
                          for (a, b), k in zip(self.bounds, self.ks)], dim=1)


@COMPRESSORS.register("random-k", "keep k_l = ratio d_l entries per tensor, drawn uniformly (seeded)")
class RandomK(Sparsifier):
    """Q(v)_l = v_l (times d_l / k_l if unbiased) on k_l positions drawn uniformly without replacement
    (torch.randperm from the worker's generator), 0 elsewhere. The reference DL code calls
    get_random_k without is_biased, so it never rescales: unbiased defaults to False."""

    params = Sparsifier.params + (
        Param("unbiased", False, "rescale the kept entries by d_l / k_l (unbiased random-k)"),)

    def __init__(self, hp, ctx):
        super().__init__(hp, ctx)
        self.unbiased = hp.unbiased
        self.gain = torch.cat([torch.full((k,), n / k, dtype=torch.float64) for n, k in zip(self.sizes, self.ks)])

    def indices(self, V, workers, step, seed):
        rows = []
        for w in workers:
            gen = generator(seed, w, step, V.device)
            rows.append(torch.cat([torch.randperm(b - a, generator=gen, device=V.device)[:k] + a
                                   for (a, b), k in zip(self.bounds, self.ks)]))
        return torch.stack(rows) if rows else torch.zeros(0, sum(self.ks), dtype=torch.long, device=V.device)

    def encode(self, V, workers, step, seed):
        p = super().encode(V, workers, step, seed)
        if self.unbiased:
            p["values"] = p["values"] * self.gain.to(V.device, V.dtype)
        return p


@COMPRESSORS.register("qsgd", "QSGD: per-tensor norm, b-bit stochastic rounding of |v|/norm (int8 codes)")
class QSGD(Compressor):
    """Q(v)_l = c ||v_l|| sign(v_l) xi / s, s = 2^b - 1, xi = floor(l) + [u < l - floor(l)], l = s |v_l| / ||v_l||,
    u ~ U[0, 1) (float32, seeded); c = 1 / (1 + min(d_l / s^2, sqrt(d_l) / s)) if scale else 1 (get_qsgd,
    is_biased). Payload: codes sign * xi (int8, b <= 7) and c ||v_l|| per tensor (V's dtype)."""

    params = (Param("bits", 4, "QSGD bits b: s = 2^b - 1 levels (b <= 7: int8 codes)", check=between(1, 7)),
              Param("scale", False, "multiply by 1 / (1 + min(d_l/s^2, sqrt(d_l)/s)): the reference's is_biased "
                                    "contraction (CHOCO needs it for small b)"))

    def __init__(self, hp, ctx):
        super().__init__(hp, ctx)
        self.s = 2 ** hp.bits - 1
        s = self.s
        self.c = [1.0 / (1.0 + min(n / s**2, math.sqrt(n) / s)) if hp.scale else 1.0 for n in self.sizes]

    def encode(self, V, workers, step, seed):
        u = torch.empty(V.shape, dtype=torch.float32, device=V.device)
        for r, w in enumerate(workers):
            u[r].uniform_(generator=generator(seed, w, step, V.device))
        codes = torch.empty(V.shape, dtype=torch.int8, device=V.device)
        norms = torch.empty(V.shape[0], len(self.bounds), dtype=V.dtype, device=V.device)
        for i, (a, b) in enumerate(self.bounds):
            v = V[:, a:b]
            norm = v.norm(dim=1, keepdim=True)
            level = v.abs() * torch.where(norm > 0, self.s / norm, torch.zeros_like(norm))
            low = level.floor()
            xi = (low + (u[:, a:b] < level - low).to(V.dtype)).clamp_(max=self.s)
            codes[:, a:b] = (torch.sign(v) * xi).to(torch.int8)
            norms[:, i] = self.c[i] * norm[:, 0]
        return {"codes": codes, "norms": norms}

    def decode(self, payload):
        norms = payload["norms"]
        return payload["codes"].to(norms.dtype) * self.per_entry(norms / self.s)

    def message_bytes(self, d, element_size):
        self.check_d(d)
        return d + len(self.bounds) * element_size


@COMPRESSORS.register("sign", "scaled sign: (||v_l||_1 / d_l) sign(v_l) per tensor, 1 bit per entry")
class Sign(Compressor):
    """Q(v)_l = (||v_l||_1 / d_l) sign(v_l), sign(0) = +1 (SignCompressor + CHOCOSignCompressor).
    Payload: the signs of the flat vector packed 8 per uint8, most significant bit first, zero-padded
    to a multiple of 8 (numpy.packbits), and the scale of each tensor (V's dtype)."""

    def __init__(self, hp, ctx):
        super().__init__(hp, ctx)
        self.bit = torch.tensor([128, 64, 32, 16, 8, 4, 2, 1], dtype=torch.uint8, device=ctx.device)

    def encode(self, V, workers, step, seed):
        m, pad = V.shape[0], -self.d % 8
        bits = torch.nn.functional.pad((V >= 0).to(torch.uint8), (0, pad))
        packed = (bits.view(m, -1, 8) * self.bit.to(V.device)).sum(-1).to(torch.uint8)
        scales = torch.stack([V[:, a:b].abs().sum(1) / (b - a) for a, b in self.bounds], dim=1)
        return {"signs": packed, "scales": scales.reshape(m, len(self.bounds))}

    def decode(self, payload):
        packed, scales = payload["signs"], payload["scales"]
        bits = packed.unsqueeze(-1).bitwise_and(self.bit.to(packed.device)).ne(0)
        sign = bits.reshape(packed.shape[0], -1)[:, :self.d].to(scales.dtype).mul_(2).sub_(1)
        return sign * self.per_entry(scales)

    def message_bytes(self, d, element_size):
        self.check_d(d)
        return -(-d // 8) + len(self.bounds) * element_size
