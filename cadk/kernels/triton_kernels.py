"""Triton kernels of cadk's ops (launched from triton_backend.py, which holds the shapes and checks).

Activations are seen as [N, A, S] views (example, alive channel, position) with explicit strides,
so one set of channel-wise kernels serves linear layers (S = 1), convolutions and BatchNorm in NCHW
or channels_last layout. A channel-wise program owns a [BLOCK_A, BLOCK_S] tile for a chunk of
consecutive examples, BLOCK_R at a time (several when A * S is small: linear layers, late conv
stages); reductions over (n, s) write one partial row per program into a [P, A] buffer that the
host sums, which keeps them deterministic (no atomics).

Gates follow cadk/kernels/philox.py bit for bit: word = tl.randint4x(seed, (n // 4) * C + j)[n % 4]
(Philox4x32-10), uniform = (word >> 8) * 2^-24, gate = uniform < theta[j]; in eval the gate is theta[j].
Values are computed in fp32 and rounded to the storage dtype exactly where the reference rounds
(pre before gating, the eval gate before the product), so bf16 results match it closely.
"""
from __future__ import annotations

import triton
import triton.language as tl

TWO_POW_M24 = tl.constexpr(2.0**-24)  # uniform = (word >> 8) * 2^-24, exact in fp32


@triton.jit
def _uniform(seed, counter, lane):
    """cadk's uniform in [0, 1) from word `lane` (0..3) of Philox at int32 counters: the shift is on
    uint32, so no sign extension."""
    r0, r1, r2, r3 = tl.randint4x(seed, counter)
    word = tl.where(lane == 0, r0, tl.where(lane == 1, r1, tl.where(lane == 2, r2, r3)))
    return (word.to(tl.uint32, bitcast=True) >> 8).to(tl.float32) * TWO_POW_M24


@triton.jit
def _gate(seed, n, C, j, theta_j, TRAINING: tl.constexpr):
    """xi for example n and full-range units j ([BLOCK] int32), fp32 0/1 (training) or theta_j (eval)."""
    if TRAINING:
        xi = (_uniform(seed, (n // 4) * C + j, n % 4) < theta_j).to(tl.float32)
    else:
        xi = theta_j
    return xi


@triton.jit
def _relu(x):
    """max(x, 0) keeping NaN, as torch.relu and clamp_min do (tl.maximum would return 0 for NaN)."""
    return tl.where(x < 0.0, 0.0, x)


@triton.jit
def _cast(x, ty: tl.constexpr):
    """fp32 x to the storage dtype ty, rounding to nearest even. Compiled code does that by itself;
    the interpreter truncates fp32 -> bf16, so there the rounding is done on the bits first."""
    if INTERPRETER_ROUNDING:
        if ty == tl.bfloat16:
            bits = x.to(tl.uint32, bitcast=True)
            bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
            x = tl.where(x == x, bits.to(tl.float32, bitcast=True), x)  # NaN stays NaN
    return x.to(ty)


@triton.jit
def philox_uniform_kernel(seed_ptr, counter_ptr, lane_ptr, out_ptr, numel, BLOCK: tl.constexpr):
    """out[i] = uniform(seed, counter[i], lane[i]): exposes _uniform so tests can compare it with philox.py."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    counter = tl.load(counter_ptr + offs, mask=mask, other=0).to(tl.int32)
    lane = tl.load(lane_ptr + offs, mask=mask, other=0).to(tl.int32)
    tl.store(out_ptr + offs, _uniform(tl.load(seed_ptr), counter, lane), mask=mask)


@triton.jit
def _tile(pid_s, pid_a, A, S, BLOCK_A: tl.constexpr, BLOCK_S: tl.constexpr):
    """Channel and position offsets of this program's tile, shaped to broadcast as [1, A, S]."""
    offs_a = pid_a * BLOCK_A + tl.arange(0, BLOCK_A)
    offs_s = pid_s * BLOCK_S + tl.arange(0, BLOCK_S)
    mask_a = offs_a < A
    return offs_a, mask_a, offs_a[None, :, None], offs_s[None, None, :], mask_a[None, :, None] & \
        (offs_s < S)[None, None, :]


@triton.jit
def _rows(r, r_end, BLOCK_R: tl.constexpr):
    """Example indices (int32, [BLOCK_R]) of one row block, their int64 copy for addressing ([R, 1, 1])
    and mask."""
    n = r + tl.arange(0, BLOCK_R)
    return n, n.to(tl.int64)[:, None, None], (n < r_end)[:, None, None]


@triton.jit
def _gate_params(theta_ptr, alive_ptr, offs_a, mask_a):
    """Full-range unit index j (int32) and theta[j] (fp32) of the tile's channels."""
    j = tl.load(alive_ptr + offs_a, mask=mask_a, other=0).to(tl.int32)
    return j, tl.load(theta_ptr + j, mask=mask_a, other=0.0).to(tl.float32)


@triton.jit
def _channel_vec(ptr, offs_a, mask_a):
    """A per-channel fp32 vector, shaped [1, BLOCK_A, 1]."""
    return tl.load(ptr + offs_a, mask=mask_a, other=0.0).to(tl.float32)[None, :, None]


# Channel-wise kernels. Grid: (position tiles, row chunks, channel tiles); a program owns a
# [BLOCK_A, BLOCK_S] tile for `rows` consecutive examples, BLOCK_R of them per step. Row and
# position strides are in elements; row offsets are int64, example indices stay int32 for gates.

@triton.jit
def channel_fwd_kernel(
    z_ptr, y_ptr, pre_ptr,
    mean_ptr, scale_ptr, shift_ptr,
    theta_ptr, alive_ptr, seed_ptr,
    N, A, S, C, rows,
    szn, sza, szs, syn, sya, sys,
    HAS_NORM: tl.constexpr, HAS_SHIFT: tl.constexpr, RELU: tl.constexpr,
    HAS_GATE: tl.constexpr, TRAINING: tl.constexpr, STORE_PRE: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_A: tl.constexpr, BLOCK_S: tl.constexpr,
):
    """pre = act((z - mean) * scale + shift), y = xi * pre, per channel a of the [N, A, S] view.

    pre is stored if STORE_PRE (only useful with a gate: without one y is pre); it shares y's strides."""
    pid_s, pid_r, pid_a = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    offs_a, mask_a, a3, s3, mask_as = _tile(pid_s, pid_a, A, S, BLOCK_A, BLOCK_S)
    if HAS_GATE:
        j, theta_j = _gate_params(theta_ptr, alive_ptr, offs_a, mask_a)
        seed = tl.load(seed_ptr)
    if HAS_NORM:
        mean = _channel_vec(mean_ptr, offs_a, mask_a)
        scale = _channel_vec(scale_ptr, offs_a, mask_a)
    if HAS_SHIFT:
        shift = _channel_vec(shift_ptr, offs_a, mask_a)
    out_ty = y_ptr.dtype.element_ty
    z_as = a3 * sza + s3 * szs
    y_as = a3 * sya + s3 * sys
    r0 = pid_r * rows
    r_end = tl.minimum(r0 + rows, N)
    for r in range(r0, r_end, BLOCK_R):
        n, n3, mask_r = _rows(r, r_end, BLOCK_R)
        mask = mask_r & mask_as
        z = tl.load(z_ptr + n3 * szn + z_as, mask=mask, other=0.0).to(tl.float32)
        if HAS_NORM:
            z = (z - mean) * scale
        if HAS_SHIFT:
            z = z + shift
        if RELU:
            z = _relu(z)
        pre = _cast(z, out_ty)
        y_off = n3 * syn + y_as
        if HAS_GATE:
            xi = _gate(seed, n[:, None], C, j[None, :], theta_j[None, :], TRAINING)
            xi = _cast(xi, out_ty).to(tl.float32)[:, :, None]
            if STORE_PRE:
                tl.store(pre_ptr + y_off, pre, mask=mask)
            tl.store(y_ptr + y_off, _cast(pre.to(tl.float32) * xi, out_ty), mask=mask)
        else:
            tl.store(y_ptr + y_off, pre, mask=mask)


@triton.jit
def _channel_sum(acc):
    return tl.sum(tl.sum(acc, axis=2), axis=0)


@triton.jit
def channel_bwd_kernel(
    gy_ptr, pre_ptr, x_ptr, g_ptr, part_ptr,
    mean_ptr, var_ptr, eps, theta_ptr, alive_ptr, seed_ptr,
    N, A, S, C, rows, P,
    sgyn, sgya, sgys, spn, spa, sps, sxn, sxa, sxs, sgn, sga, sgs,
    RELU: tl.constexpr, HAS_GATE: tl.constexpr, TRAINING: tl.constexpr,
    HAS_NORM: tl.constexpr, STORE_G: tl.constexpr, SUM_G: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_A: tl.constexpr, BLOCK_S: tl.constexpr,
):
    """Backward through gate and activation: g = dy * xi * act'(pre), stored if STORE_G.

    Per-channel partial sums of this program's rows land in part[k, p, a] (p = this program):
    k=0 sum(g) (SUM_G: bias / BN shift), k=1 sum(dy * pre) (HAS_GATE: theta),
    k=2 sum(g * (x - mean) * rstd) with rstd = rsqrt(var + eps) (HAS_NORM: BN scale). pre is the
    pre-gate output, or y when there is no gate (then y = pre)."""
    pid_s, pid_r, pid_a = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    offs_a, mask_a, a3, s3, mask_as = _tile(pid_s, pid_a, A, S, BLOCK_A, BLOCK_S)
    if HAS_GATE:
        j, theta_j = _gate_params(theta_ptr, alive_ptr, offs_a, mask_a)
        seed = tl.load(seed_ptr)
    if HAS_NORM:
        mean = _channel_vec(mean_ptr, offs_a, mask_a)
        rstd = tl.rsqrt(_channel_vec(var_ptr, offs_a, mask_a) + eps)
    g_ty = g_ptr.dtype.element_ty
    gy_as = a3 * sgya + s3 * sgys
    p_as = a3 * spa + s3 * sps
    x_as = a3 * sxa + s3 * sxs
    g_as = a3 * sga + s3 * sgs
    sum_g = tl.zeros([BLOCK_R, BLOCK_A, BLOCK_S], dtype=tl.float32)
    sum_theta = tl.zeros([BLOCK_R, BLOCK_A, BLOCK_S], dtype=tl.float32)
    sum_norm = tl.zeros([BLOCK_R, BLOCK_A, BLOCK_S], dtype=tl.float32)
    r0 = pid_r * rows
    r_end = tl.minimum(r0 + rows, N)
    for r in range(r0, r_end, BLOCK_R):
        n, n3, mask_r = _rows(r, r_end, BLOCK_R)
        mask = mask_r & mask_as
        dy = tl.load(gy_ptr + n3 * sgyn + gy_as, mask=mask, other=0.0).to(tl.float32)
        if HAS_GATE or RELU:
            pre = tl.load(pre_ptr + n3 * spn + p_as, mask=mask, other=0.0).to(tl.float32)
        g = dy
        if HAS_GATE:
            sum_theta += dy * pre
            xi = _gate(seed, n[:, None], C, j[None, :], theta_j[None, :], TRAINING)
            g = _cast(g * _cast(xi, g_ty).to(tl.float32)[:, :, None], g_ty).to(tl.float32)
        if RELU:
            g = tl.where(pre <= 0.0, 0.0, g)  # NaN passes, as threshold_backward
        if SUM_G:
            sum_g += g
        if HAS_NORM:
            x = tl.load(x_ptr + n3 * sxn + x_as, mask=mask, other=0.0).to(tl.float32)
            sum_norm += g * (x - mean) * rstd  # g is 0 off the mask
        if STORE_G:
            tl.store(g_ptr + n3 * sgn + g_as, _cast(g, g_ty), mask=mask)
    p = pid_r * tl.num_programs(0) + pid_s
    if SUM_G:
        tl.store(part_ptr + p * A + offs_a, _channel_sum(sum_g), mask=mask_a)
    if HAS_GATE:
        tl.store(part_ptr + (P + p) * A + offs_a, _channel_sum(sum_theta), mask=mask_a)
    if HAS_NORM:
        tl.store(part_ptr + (2 * P + p) * A + offs_a, _channel_sum(sum_norm), mask=mask_a)


@triton.jit
def channel_stats_kernel(
    x_ptr, part_ptr, N, A, S, rows, P, sxn, sxa, sxs,
    BLOCK_R: tl.constexpr, BLOCK_A: tl.constexpr, BLOCK_S: tl.constexpr,
):
    """Partial sums of d and d^2 with d = x - x[0, a, 0] per channel (shifted data: a sample of the
    channel as the shift keeps E[d^2] - E[d]^2 well conditioned in fp32). part[0|1, p, a]."""
    pid_s, pid_r, pid_a = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    offs_a, mask_a, a3, s3, mask_as = _tile(pid_s, pid_a, A, S, BLOCK_A, BLOCK_S)
    shift = tl.load(x_ptr + offs_a * sxa, mask=mask_a, other=0.0).to(tl.float32)[None, :, None]
    x_as = a3 * sxa + s3 * sxs
    s1 = tl.zeros([BLOCK_R, BLOCK_A, BLOCK_S], dtype=tl.float32)
    s2 = tl.zeros([BLOCK_R, BLOCK_A, BLOCK_S], dtype=tl.float32)
    r0 = pid_r * rows
    r_end = tl.minimum(r0 + rows, N)
    for r in range(r0, r_end, BLOCK_R):
        _, n3, mask_r = _rows(r, r_end, BLOCK_R)
        mask = mask_r & mask_as
        x = tl.load(x_ptr + n3 * sxn + x_as, mask=mask, other=0.0).to(tl.float32)
        d = tl.where(mask, x - shift, 0.0)
        s1 += d
        s2 += d * d
    p = pid_r * tl.num_programs(0) + pid_s
    tl.store(part_ptr + p * A + offs_a, _channel_sum(s1), mask=mask_a)
    tl.store(part_ptr + (P + p) * A + offs_a, _channel_sum(s2), mask=mask_a)


@triton.jit
def bn_grad_input_kernel(
    g_ptr, x_ptr, dx_ptr, w_ptr, alive_ptr, mean_ptr, var_ptr, sums_ptr, eps, count,
    N, A, S, rows,
    sgn, sga, sgs, sxn, sxa, sxs, sdn, sda, sds,
    TRAINING: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_A: tl.constexpr, BLOCK_S: tl.constexpr,
):
    """BatchNorm input gradient from g = dL/d(BN output): training dx = scale * (g - mean_g) -
    (x - mean) * coef_x, eval dx = scale * g, per channel, with rstd = rsqrt(var + eps),
    scale = weight * rstd, mean_g = sum(g) / count, coef_x = scale * rstd * sum(g * xhat) / count
    (sums[0] and sums[2] of channel_bwd_kernel, summed over programs). count (values per channel,
    N * S) is an int: the host passes torch.compile's symbolic size through instead of a float of it."""
    pid_s, pid_r, pid_a = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    offs_a, mask_a, a3, s3, mask_as = _tile(pid_s, pid_a, A, S, BLOCK_A, BLOCK_S)
    unit = tl.load(alive_ptr + offs_a, mask=mask_a, other=0)
    rstd = tl.rsqrt(_channel_vec(var_ptr, offs_a, mask_a) + eps)
    scale = _channel_vec(w_ptr, unit, mask_a) * rstd
    if TRAINING:
        mean_g = _channel_vec(sums_ptr, offs_a, mask_a) / count
        mean = _channel_vec(mean_ptr, offs_a, mask_a)
        coef_x = scale * rstd * _channel_vec(sums_ptr + 2 * A, offs_a, mask_a) / count
    g_as = a3 * sga + s3 * sgs
    x_as = a3 * sxa + s3 * sxs
    d_as = a3 * sda + s3 * sds
    r0 = pid_r * rows
    r_end = tl.minimum(r0 + rows, N)
    for r in range(r0, r_end, BLOCK_R):
        _, n3, mask_r = _rows(r, r_end, BLOCK_R)
        mask = mask_r & mask_as
        g = tl.load(g_ptr + n3 * sgn + g_as, mask=mask, other=0.0).to(tl.float32)
        if TRAINING:
            x = tl.load(x_ptr + n3 * sxn + x_as, mask=mask, other=0.0).to(tl.float32)
            dx = scale * (g - mean_g) - (x - mean) * coef_x
        else:
            dx = scale * g
        tl.store(dx_ptr + n3 * sdn + d_as, _cast(dx, dx_ptr.dtype.element_ty), mask=mask)


@triton.jit
def bn_coefficients_kernel(
    part_ptr, x_ptr, sxa, P, count, rm_ptr, rv_ptr, srm, srv, w_ptr, b_ptr, alive_ptr, eps,
    mean_ptr, var_ptr, scale_ptr, shift_ptr, A,
    TRAINING: tl.constexpr, BLOCK: tl.constexpr,
):
    """Per alive channel a (unit alive[a]): mean and biased variance from channel_stats_kernel's
    partial sums (training) or the running statistics (eval), then the BN-apply coefficients
    scale = weight * rsqrt(var + eps) and shift = bias, all fp32. weight and bias are contiguous; the
    running statistics have strides srm and srv."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < A
    unit = tl.load(alive_ptr + offs, mask=mask, other=0)
    if TRAINING:
        s1 = tl.zeros([BLOCK], dtype=tl.float32)
        s2 = tl.zeros([BLOCK], dtype=tl.float32)
        for p in range(P):
            s1 += tl.load(part_ptr + p * A + offs, mask=mask, other=0.0)
            s2 += tl.load(part_ptr + (P + p) * A + offs, mask=mask, other=0.0)
        s1 = s1 / count
        s2 = s2 / count
        mean = tl.load(x_ptr + offs * sxa, mask=mask, other=0.0).to(tl.float32) + s1  # shifted data
        var = _relu(s2 - s1 * s1)
    else:
        mean = tl.load(rm_ptr + unit * srm, mask=mask, other=0.0).to(tl.float32)
        var = tl.load(rv_ptr + unit * srv, mask=mask, other=0.0).to(tl.float32)
    tl.store(mean_ptr + offs, mean, mask=mask)
    tl.store(var_ptr + offs, var, mask=mask)
    tl.store(scale_ptr + offs, tl.load(w_ptr + unit, mask=mask, other=0.0).to(tl.float32) * tl.rsqrt(var + eps),
             mask=mask)
    tl.store(shift_ptr + offs, tl.load(b_ptr + unit, mask=mask, other=0.0).to(tl.float32), mask=mask)


@triton.jit
def bn_running_stats_kernel(rm_ptr, rv_ptr, srm, srv, alive_ptr, mean_ptr, var_ptr, A, momentum, unbias,
                            BLOCK: tl.constexpr):
    """nn.BatchNorm2d's running-statistics update (unbiased variance) at the alive units only:
    running = running * (1 - momentum) + batch * momentum, in the running statistics' dtype (strides
    srm and srv)."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < A
    unit = tl.load(alive_ptr + offs, mask=mask, other=0)
    mean = tl.load(mean_ptr + offs, mask=mask, other=0.0)
    var = tl.load(var_ptr + offs, mask=mask, other=0.0) * unbias
    old_mean = tl.load(rm_ptr + unit * srm, mask=mask, other=0.0).to(tl.float32)
    old_var = tl.load(rv_ptr + unit * srv, mask=mask, other=0.0).to(tl.float32)
    new_mean = old_mean * (1.0 - momentum) + mean * momentum
    new_var = old_var * (1.0 - momentum) + var * momentum
    tl.store(rm_ptr + unit * srm, _cast(new_mean, rm_ptr.dtype.element_ty), mask=mask)
    tl.store(rv_ptr + unit * srv, _cast(new_var, rv_ptr.dtype.element_ty), mask=mask)


@triton.jit
def gated_linear_fwd_kernel(
    x_ptr, w_ptr, b_ptr, y_ptr, pre_ptr,
    theta_ptr, alive_out_ptr, seed_ptr,
    N, A, K, C,
    sxn, sxk, swo, swk, syn, sya,
    GATHER_OUT: tl.constexpr, HAS_BIAS: tl.constexpr, RELU: tl.constexpr,
    HAS_GATE: tl.constexpr, TRAINING: tl.constexpr,
    ALLOW_TF32: tl.constexpr, UPCAST_DOT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """y[n, a] = xi * act(sum_k x[n, k] W[alive_out[a], k] + b[alive_out[a]]), fp32 accumulation.

    x is compact [N, K]; W's alive input columns are already gathered ([C_out, K]); its output rows
    are gathered here through alive_out (rows are the strided dimension, so loads stay coalesced
    along k). pre (the pre-gate output) is stored only with a gate and shares y's strides."""
    pid_m, pid_n = tl.program_id(0), tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    mask_m = offs_m < N
    mask_n = offs_n < A
    if GATHER_OUT:
        rows = tl.load(alive_out_ptr + offs_n, mask=mask_n, other=0)
    else:
        rows = offs_n
    x_ptrs = x_ptr + offs_m.to(tl.int64)[:, None] * sxn + offs_k[None, :] * sxk
    w_ptrs = w_ptr + rows.to(tl.int64)[None, :] * swo + offs_k[:, None] * swk
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        mask_k = offs_k < K - k0
        a = tl.load(x_ptrs, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        b = tl.load(w_ptrs, mask=mask_k[:, None] & mask_n[None, :], other=0.0)
        if UPCAST_DOT:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        if ALLOW_TF32:
            acc = tl.dot(a, b, acc, input_precision="tf32")
        else:
            acc = tl.dot(a, b, acc, input_precision="ieee")
        x_ptrs += BLOCK_K * sxk
        w_ptrs += BLOCK_K * swk
    if HAS_BIAS:
        acc += tl.load(b_ptr + rows, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    if RELU:
        acc = _relu(acc)
    out_ty = y_ptr.dtype.element_ty
    pre = _cast(acc, out_ty)
    mask = mask_m[:, None] & mask_n[None, :]
    y_off = offs_m.to(tl.int64)[:, None] * syn + offs_n[None, :] * sya
    if HAS_GATE:
        theta_j = tl.load(theta_ptr + rows, mask=mask_n, other=0.0).to(tl.float32)
        xi = _gate(tl.load(seed_ptr), offs_m[:, None], C, rows.to(tl.int32)[None, :], theta_j[None, :], TRAINING)
        xi = _cast(xi, out_ty).to(tl.float32)
        tl.store(pre_ptr + y_off, pre, mask=mask)
        tl.store(y_ptr + y_off, _cast(pre.to(tl.float32) * xi, out_ty), mask=mask)
    else:
        tl.store(y_ptr + y_off, pre, mask=mask)


@triton.jit
def _store_sum(out_ptr, sums_ptr, k, A, pos, c, found, in_range):
    """out[c] = sums[k, pos] where found, else 0, in out's dtype."""
    value = tl.load(sums_ptr + k * A + pos, mask=found, other=0.0)
    tl.store(out_ptr + c, _cast(value, out_ptr.dtype.element_ty), mask=in_range)


@triton.jit
def scatter_sums_kernel(
    sums_ptr, alive_ptr, out0_ptr, out1_ptr, out2_ptr, k0, k1, k2, A, C, steps,
    OUTS: tl.constexpr, BLOCK: tl.constexpr,
):
    """Full-size per-unit vectors from compact per-channel sums: out_i[c] = sums[k_i, a] where
    alive[a] == c, else 0, for every unit c < C (1 to 3 outputs, each in its own dtype). The position
    of c in the sorted alive list comes from a binary search of `steps` halvings, so one launch writes
    whole outputs with no zero-fill pass first."""
    c = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    lo = tl.zeros([BLOCK], dtype=tl.int32)
    hi = lo + A
    for _ in range(steps):
        active = lo < hi
        mid = (lo + hi) // 2
        below = tl.load(alive_ptr + mid, mask=active, other=0) < c
        lo = tl.where(active & below, mid + 1, lo)
        hi = tl.where(active & (below == 0), mid, hi)
    in_range = c < C
    found = in_range & (lo < A)
    found = found & (tl.load(alive_ptr + lo, mask=found, other=-1) == c)
    _store_sum(out0_ptr, sums_ptr, k0, A, lo, c, found, in_range)
    if OUTS > 1:
        _store_sum(out1_ptr, sums_ptr, k1, A, lo, c, found, in_range)
    if OUTS > 2:
        _store_sum(out2_ptr, sums_ptr, k2, A, lo, c, found, in_range)


# Residual block output over examples as rows of one dense run of M values ([N, 1, M] views, each
# example's run contiguous; grid and row steps as the channel-wise kernels with A = 1).

@triton.jit
def _block_gate(theta_ptr, alive_ptr, seed_ptr, n, C, ty: tl.constexpr, TRAINING: tl.constexpr):
    """xi[n] of the block gate (unit alive[0] of theta's C), rounded to ty, fp32 [BLOCK_R, 1]."""
    j = tl.load(alive_ptr).to(tl.int32)
    xi = _gate(tl.load(seed_ptr), n, C, j, tl.load(theta_ptr + j).to(tl.float32), TRAINING)
    return _cast(xi + tl.zeros(n.shape, tl.float32), ty).to(tl.float32)[:, None]  # eval: theta, broadcast


@triton.jit
def _run_rows(r, r_end, offs, M, theta_ptr, alive_ptr, seed_ptr, C, ty: tl.constexpr, TRAINING: tl.constexpr,
              BLOCK_R: tl.constexpr):
    """Offsets into the [N, M] runs, mask and gates xi ([BLOCK_R, 1]) of the examples r.. of one row step."""
    n = r + tl.arange(0, BLOCK_R)
    mask = (n < r_end)[:, None] & (offs < M)[None, :]
    off = n.to(tl.int64)[:, None] * M + offs[None, :]
    return off, mask, _block_gate(theta_ptr, alive_ptr, seed_ptr, n, C, ty, TRAINING)


@triton.jit
def residual_fwd_kernel(
    s_ptr, b_ptr, y_ptr, theta_ptr, alive_ptr, seed_ptr, N, M, C, rows,
    TRAINING: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_S: tl.constexpr,
):
    """y = relu(shortcut + xi[n] * branch), rounded as the reference: xi * branch, the sum, relu."""
    pid_s, pid_r = tl.program_id(0), tl.program_id(1)
    offs = pid_s * BLOCK_S + tl.arange(0, BLOCK_S)
    ty = y_ptr.dtype.element_ty
    r0 = pid_r * rows
    r_end = tl.minimum(r0 + rows, N)
    for r in range(r0, r_end, BLOCK_R):
        off, mask, xi = _run_rows(r, r_end, offs, M, theta_ptr, alive_ptr, seed_ptr, C, ty, TRAINING, BLOCK_R)
        shortcut = tl.load(s_ptr + off, mask=mask, other=0.0).to(tl.float32)
        gated = _cast(tl.load(b_ptr + off, mask=mask, other=0.0).to(tl.float32) * xi, ty).to(tl.float32)
        tl.store(y_ptr + off, _cast(_relu(shortcut + gated), ty), mask=mask)


@triton.jit
def residual_bwd_kernel(
    gy_ptr, y_ptr, b_ptr, gs_ptr, gb_ptr, part_ptr, theta_ptr, alive_ptr, seed_ptr, N, M, C, rows,
    TRAINING: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_S: tl.constexpr,
):
    """grad_shortcut = dy where y > 0 (NaN passes, as threshold_backward), grad_branch = that * xi[n];
    this program's sum of grad_shortcut * branch (the block gate's theta gradient) goes to part[p]."""
    pid_s, pid_r = tl.program_id(0), tl.program_id(1)
    offs = pid_s * BLOCK_S + tl.arange(0, BLOCK_S)
    ty = gs_ptr.dtype.element_ty
    acc = tl.zeros([BLOCK_R, BLOCK_S], dtype=tl.float32)
    r0 = pid_r * rows
    r_end = tl.minimum(r0 + rows, N)
    for r in range(r0, r_end, BLOCK_R):
        off, mask, xi = _run_rows(r, r_end, offs, M, theta_ptr, alive_ptr, seed_ptr, C, ty, TRAINING, BLOCK_R)
        dy = tl.load(gy_ptr + off, mask=mask, other=0.0).to(tl.float32)
        y = tl.load(y_ptr + off, mask=mask, other=0.0).to(tl.float32)
        d = tl.where(y <= 0.0, 0.0, dy)
        tl.store(gs_ptr + off, _cast(d, ty), mask=mask)
        tl.store(gb_ptr + off, _cast(d * xi, ty), mask=mask)
        acc += d * tl.load(b_ptr + off, mask=mask, other=0.0).to(tl.float32)  # d is 0 off the mask
    tl.store(part_ptr + pid_r * tl.num_programs(0) + pid_s, tl.sum(tl.sum(acc, axis=1), axis=0))


# True when TRITON_INTERPRET=1 made @triton.jit build interpreter functions (see _cast).
INTERPRETER_ROUNDING = tl.constexpr(not isinstance(_cast, triton.runtime.JITFunction))
