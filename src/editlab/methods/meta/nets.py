"""Editor networks shared by MEND and MALMEN: a running standardiser of the gradient factors and the
residual low-rank network that rewrites them.

`FactorNet` (MEND's "combine" mode): z = [u; delta] standardised, then `n_blocks` residual blocks, with
U zero-initialised (so the untrained editor is the identity: its edit is a plain, standardised gradient
step) and (s_m, o_m) one pair per module sharing the net (modules of equal shape share U, V, b). Two
block layouts (`block`):

- "paper": z <- z + clamp(s_m * (U V z + b) + o_m, min=0), V ~ N(0, 1), b on the D-dimensional output:
  MEND's paper and code (`nn.py`, `LRLinear`; the clamp passes gradient at 0, so a zero U still trains);
- "residual": z <- z + s_m * (U relu(V z + b)) + o_m, V ~ N(0, 1/D), b on the rank-r hidden layer:
  editlab's earlier layout, kept for its trained checkpoints; MALMEN's net uses it (MALMEN's code has a
  third: z + s_m * clamp(U V z + b, 0) + o_m, docs/methods.md).

With the paper's unscaled V the same Adam lr moves the output about sqrt(D) times faster (docs/methods.md,
MEND)."""

from __future__ import annotations

import math

import torch
from torch import nn

from .hparams import BLOCKS


class RunningNorm(nn.Module):
    """Running mean and variance (Chan et al.'s parallel update) of feature vectors; updated only while
    training and only when `update` is called, frozen otherwise (the card's pitfall: statistics must not
    move on validation or test edits)."""

    def __init__(self, dim: int, eps: float = 1e-8) -> None:
        super().__init__()
        self.eps = eps
        self.register_buffer("count", torch.zeros((), dtype=torch.float64))
        self.register_buffer("mean", torch.zeros(dim, dtype=torch.float64))
        self.register_buffer("m2", torch.zeros(dim, dtype=torch.float64))

    @torch.no_grad()
    def update(self, x: torch.Tensor) -> None:
        x = x.detach().double().reshape(-1, x.shape[-1])
        n = x.shape[0]
        if n == 0:
            return
        mean_b = x.mean(0)
        m2_b = ((x - mean_b) ** 2).sum(0)
        total = self.count + n
        d = mean_b - self.mean
        self.mean += d * (n / total)
        self.m2 += m2_b + d * d * (self.count * n / total)
        self.count.fill_(total)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if float(self.count) < 2:
            return x
        std = (self.m2 / (self.count - 1)).clamp(min=0).sqrt().to(x.dtype)
        return (x - self.mean.to(x.dtype)) / (std + self.eps)


class FactorNet(nn.Module):
    """Rewrites standardised factors z = [u; delta] of one matrix shape; see the module docstring."""

    def __init__(self, d_in: int, d_out: int, rank: int, n_blocks: int, n_modes: int, seed: int = 0,
                 block: str = "residual") -> None:
        super().__init__()
        if block not in BLOCKS:
            raise ValueError(f"block must be one of {BLOCKS}, got {block!r}")
        self.d_in, self.d_out, self.block = d_in, d_out, block
        dim = d_in + d_out
        r = min(rank, dim)
        gen = torch.Generator().manual_seed(seed)
        v_std = 1.0 if block == "paper" else 1.0 / math.sqrt(dim)
        self.V = nn.ParameterList(nn.Parameter(torch.randn(r, dim, generator=gen) * v_std) for _ in range(n_blocks))
        self.b = nn.ParameterList(nn.Parameter(torch.zeros(dim if block == "paper" else r)) for _ in range(n_blocks))
        self.U = nn.ParameterList(nn.Parameter(torch.zeros(dim, r)) for _ in range(n_blocks))
        self.scale = nn.ParameterList(nn.Parameter(torch.ones(n_modes, dim)) for _ in range(n_blocks))
        self.shift = nn.ParameterList(nn.Parameter(torch.zeros(n_modes, dim)) for _ in range(n_blocks))

    def forward(self, u: torch.Tensor, delta: torch.Tensor, mode: int) -> tuple[torch.Tensor, torch.Tensor]:
        z = torch.cat([u, delta], -1)
        for V, b, U, s, o in zip(self.V, self.b, self.U, self.scale, self.shift):
            if self.block == "paper":
                z = z + torch.clamp(s[mode] * ((z @ V.T) @ U.T + b) + o[mode], min=0)
            else:
                z = z + s[mode] * (torch.relu(z @ V.T + b) @ U.T) + o[mode]
        return z[..., : self.d_in], z[..., self.d_in :]


def shape_key(d_out: int, d_in: int) -> str:
    return f"{d_in}x{d_out}"


def safe_name(path: str) -> str:
    """A module path as a ModuleDict/ParameterDict key (dots are not allowed there)."""
    return path.replace(".", "__")
