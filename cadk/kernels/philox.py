"""Philox4x32-10 in vectorised PyTorch: the one definition of cadk's gate randomness.

Every backend (this file, the C++ CPU kernels, the CUDA kernels and the Triton kernels) computes
the same 32-bit word for the same (seed, offset) and turns it into a uniform with the same rule,
so gates are bit-identical across backends and a backward pass can regenerate them instead of
storing a mask.

    word    = philox4x32_10(counter=(offset, 0, 0, 0), key=(seed & 0xffffffff, seed >> 32))[0]
    uniform = (word >> 8) * 2**-24                  in [0, 1), exactly representable in fp32
    gate    = uniform < theta[j],   offset = n * C + j   (n: example, j: unit, C: units in the gate)

This is the first word of Triton's `tl.randint(seed, offset)` for int32 offsets; the uniform rule is
cadk's own because Triton's int-to-float conversion has changed between versions.
"""
from __future__ import annotations

import torch

MASK32 = 0xFFFFFFFF
ROUND_A = 0xD2511F53
ROUND_B = 0xCD9E8D57
KEY_A = 0x9E3779B9
KEY_B = 0xBB67AE85
N_ROUNDS = 10
MAX_OFFSET = 2**31 - 1  # offsets are int32 in every backend


def _mulhilo(a: int, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(hi, lo) 32-bit halves of the 64-bit product a*b, a a 32-bit constant, b int64 in [0, 2^32).

    int64 cannot hold the full product, so it is assembled from 16-bit limbs."""
    ah, al = a >> 16, a & 0xFFFF
    bh, bl = b >> 16, b & 0xFFFF
    p = al * bl
    mid = ah * bl + al * bh + (p >> 16)
    hi = ah * bh + (mid >> 16)
    lo = ((mid & 0xFFFF) << 16) | (p & 0xFFFF)
    return hi & MASK32, lo


def philox_word(seed: torch.Tensor | int, offset: torch.Tensor) -> torch.Tensor:
    """First 32-bit word of Philox4x32-10 for each offset, as int64 in [0, 2^32)."""
    seed = torch.as_tensor(seed, dtype=torch.int64, device=offset.device)
    k0 = seed & MASK32
    k1 = (seed >> 32) & MASK32
    c0 = offset.to(torch.int64) & MASK32
    c1 = torch.zeros_like(c0)
    c2 = torch.zeros_like(c0)
    c3 = torch.zeros_like(c0)
    for _ in range(N_ROUNDS):
        hi_b, lo_b = _mulhilo(ROUND_B, c2)
        hi_a, lo_a = _mulhilo(ROUND_A, c0)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0 = (k0 + KEY_A) & MASK32
        k1 = (k1 + KEY_B) & MASK32
    return c0


def uniform(seed: torch.Tensor | int, offset: torch.Tensor) -> torch.Tensor:
    """float32 uniforms in [0, 1) from `philox_word`: (word >> 8) * 2^-24."""
    return (philox_word(seed, offset) >> 8).to(torch.float32) * (2.0**-24)


def gate_offsets(n: int, alive: torch.Tensor, num_units: int) -> torch.Tensor:
    """Offsets n*C + j for examples 0..n-1 and the alive units j, shape [n, len(alive)]."""
    if n * num_units > MAX_OFFSET:
        raise ValueError(
            f"cadk gates: batch {n} x {num_units} units exceeds the 2^31 Philox offset range; "
            "split the batch")
    rows = torch.arange(n, device=alive.device, dtype=torch.int64) * num_units
    return rows[:, None] + alive.to(torch.int64)[None, :]


def sample_gates(seed: torch.Tensor | int, n: int, theta: torch.Tensor, alive: torch.Tensor) -> torch.Tensor:
    """0/1 gates xi[n, j'] = uniform(seed, n*C + alive[j']) < theta[alive[j']], dtype of theta."""
    u = uniform(seed, gate_offsets(n, alive, theta.numel()))
    return (u < theta.detach().float()[alive][None, :]).to(theta.dtype)
