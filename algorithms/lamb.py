"""LAMB local optimizer (You et al. 2020), per worker, bias-corrected.

    g   = G * min(1, clip / ||G||)            (optional global gradient clipping, --clip; 0 = off)
    m   = b1 m + (1 - b1) g,   v = b2 v + (1 - b2) g^2
    r   = (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps)
    u   = r + wd * w
    phi = ||w|| / ||u|| per layer (1 when either norm is 0)
    U   = phi * u ;  x <- x - lr * U

Conventions (those of timm.optim.Lamb with 1-D parameters in a parameter group without
weight decay, and of the LAMB paper's BERT setup): 1-D parameters (biases, normalisation
scales) get neither weight decay nor the trust ratio (phi = 1). Moments stay local to
the worker (D-LAMB mixes parameters only).
"""

import torch

from algorithms.base import OPTIMIZERS
from bench.spec import Component, Param, non_negative, positive, probability_open


@OPTIMIZERS.register("lamb", "LAMB: Adam moments + per-layer trust ratio ||w||/||r + wd w||")
class LAMB(Component):
    params = (
        Param("betas", (0.9, 0.999), "LAMB moment decays b1,b2", check=probability_open, length=2),
        Param("eps", 1e-6, "LAMB epsilon (added to sqrt(v))", check=positive),
        Param("weight_decay", 5e-4, "decoupled weight decay wd in u = r + wd w", check=non_negative),
        Param("clip", 0.0, "global gradient-norm clipping before the moments (0 = off)", check=non_negative),
    )
    state_keys = ("t", "m", "v")

    def __init__(self, hp, ctx):
        self.b1, self.b2 = hp.betas
        self.eps = hp.eps
        self.wd = hp.weight_decay
        self.clip = hp.clip
        self.t = 0
        self.m = self.v = None
        layout, device = ctx.layout, ctx.device
        # Layers that adapt (trust ratio and weight decay): those with >= 2 dimensions.
        self.slot_ids = torch.cat([torch.full((s.stop - s.start,), k, dtype=torch.long)
                                   for k, s in enumerate(layout.slots)]).to(device)
        self.n_slots = len(layout.slots)
        self.adapt = torch.tensor([len(s.shape) >= 2 for s in layout.slots], device=device)
        self.adapt_entries = self.adapt.index_select(0, self.slot_ids)

    def _layer_norms(self, A: torch.Tensor) -> torch.Tensor:
        sq = torch.zeros(A.shape[0], self.n_slots, dtype=A.dtype, device=A.device)
        return sq.index_add_(1, self.slot_ids, A * A).sqrt()

    def direction(self, X: torch.Tensor, G: torch.Tensor) -> torch.Tensor:
        if self.clip > 0:
            G = G * (self.clip / G.norm(dim=1, keepdim=True).clamp_min(1e-12)).clamp(max=1.0)
        if self.m is None:
            self.m, self.v = torch.zeros_like(G), torch.zeros_like(G)
        self.t += 1
        self.m.mul_(self.b1).add_(G, alpha=1 - self.b1)
        self.v.mul_(self.b2).addcmul_(G, G, value=1 - self.b2)
        bc1, bc2 = 1 - self.b1 ** self.t, 1 - self.b2 ** self.t
        u = (self.m / bc1) / ((self.v / bc2).sqrt_().add_(self.eps))
        if self.wd:
            u = u + self.wd * X * self.adapt_entries
        wn, un = self._layer_norms(X), self._layer_norms(u)
        phi = torch.where((wn > 0) & (un > 0), wn / un.clamp_min(1e-30), torch.ones_like(wn))
        phi = torch.where(self.adapt, phi, torch.ones_like(phi))
        return u * phi.index_select(1, self.slot_ids)
