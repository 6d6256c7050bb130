"""Philox4x32-10 in vectorised PyTorch: the one definition of cadk's gate randomness.

Every backend (this file, the C++ CPU kernels, the CUDA kernels and the Triton kernels) computes
the same 32-bit words for the same (seed, counter) and turns them into uniforms with the same rule,
so gates are bit-identical across backends and a backward pass can regenerate them instead of
storing a mask.

    words   = philox4x32_10(counter=(c, 0, 0, 0), key=(seed & 0xffffffff, seed >> 32))   4 words
    gate of example n, unit j (of C units in the gate):  c = (n // 4) * C + j,  word = words[n % 4]
    uniform = (word >> 8) * 2**-24                  in [0, 1), exactly representable in fp32
    gate    = uniform < theta[j]

The words are those of Triton's `tl.randint4x(seed, c)`; the uniform rule is cadk's own because
Triton's int-to-float conversion has changed between versions. Four consecutive examples share a
counter and take its four words, so a CPU draws four gates per Philox evaluation whatever the alive
set (one word per counter, as `tl.randint` gives, would cost four times as much).
"""
from __future__ import annotations

import torch

MASK32 = 0xFFFFFFFF
ROUND_A = 0xD2511F53
ROUND_B = 0xCD9E8D57
KEY_A = 0x9E3779B9
KEY_B = 0xBB67AE85
N_ROUNDS = 10
MAX_OFFSET = 2**31 - 1  # batch * units must stay below it: counters are int32 in every backend


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


def philox4(seed: torch.Tensor | int, counter: torch.Tensor) -> torch.Tensor:
    """The four 32-bit words of Philox4x32-10 at each counter, as int64 in [0, 2^32): shape [..., 4]."""
    seed = torch.as_tensor(seed, dtype=torch.int64, device=counter.device)
    k0 = seed & MASK32
    k1 = (seed >> 32) & MASK32
    c0 = counter.to(torch.int64) & MASK32
    c1 = torch.zeros_like(c0)
    c2 = torch.zeros_like(c0)
    c3 = torch.zeros_like(c0)
    for _ in range(N_ROUNDS):
        hi_b, lo_b = _mulhilo(ROUND_B, c2)
        hi_a, lo_a = _mulhilo(ROUND_A, c0)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0 = (k0 + KEY_A) & MASK32
        k1 = (k1 + KEY_B) & MASK32
    return torch.stack([c0, c1, c2, c3], dim=-1)


def uniform(seed: torch.Tensor | int, counter: torch.Tensor, lane: torch.Tensor | int = 0) -> torch.Tensor:
    """float32 uniforms in [0, 1) from word `lane` (0..3) of `philox4`: (word >> 8) * 2^-24."""
    words = philox4(seed, counter)
    lane = torch.as_tensor(lane, dtype=torch.int64, device=counter.device).broadcast_to(counter.shape)
    word = words.gather(-1, lane.unsqueeze(-1)).squeeze(-1)
    return (word >> 8).to(torch.float32) * (2.0**-24)


def gate_counters(n: int, alive: torch.Tensor, num_units: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Counters (n // 4) * C + j, shape [n, len(alive)], and word lanes n % 4, shape [n, 1], of the gates
    of examples 0..n-1 and the alive units j."""
    if n * num_units > MAX_OFFSET:  # a RuntimeError, as the kernels' checks raise
        raise RuntimeError(
            f"cadk gates: batch {n} x {num_units} units exceeds the 2^31 Philox counter range; "
            "split the batch")
    examples = torch.arange(n, device=alive.device, dtype=torch.int64)
    counter = (examples // 4 * num_units)[:, None] + alive.to(torch.int64)[None, :]
    return counter, (examples % 4)[:, None]


def sample_gates(seed: torch.Tensor | int, n: int, theta: torch.Tensor, alive: torch.Tensor) -> torch.Tensor:
    """0/1 gates xi[n, j'] = uniform(seed, n's counter and lane for alive[j']) < theta[alive[j']], dtype
    of theta."""
    u = uniform(seed, *gate_counters(n, alive, theta.numel()))
    return (u < theta.detach().float()[alive][None, :]).to(theta.dtype)
