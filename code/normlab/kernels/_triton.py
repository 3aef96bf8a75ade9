"""The Triton kernels behind ``normlab.kernels``; imported on first use (it needs triton).

Every kernel sees its tensor as a 3-D view (N, C, M) with element strides (s_n, s_c, s_m), M being
every axis after the channel. Two layouts cover the cases that matter, chosen by ``C_CONTIG``:

- planes (NCHW, (N, C, L)): s_m == 1, a channel's M values are contiguous for each n;
- rows (channels_last, (N, C)): s_c == 1, the wrapper folds N into M (N = 1, M = N*H*W, s_m = C).

Work is cut into tiles of (BLOCK_C channels) x (BLOCK_M positions). Program (pid_c, pid_s) owns
one block of channels and a contiguous range of tiles ("items") along (n, M): the statistics pass
and the normalize pass use the same assignment, so a program rereads what it just read.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _chan_combine(mean_a, m2_a, n_a, mean_b, m2_b, n_b):
    """Merge two (mean, M2, count) summaries with Chan's formula; empty summaries are allowed."""
    n = n_a + n_b
    w_b = tl.where(n > 0, n_b / tl.maximum(n, 1.0), 0.0)  # n_b / n, and 0 when both are empty
    delta = mean_b - mean_a
    return mean_a + delta * w_b, m2_a + m2_b + delta * delta * n_a * w_b, n


@triton.jit
def _channel_block(c_start, c_end, BLOCK_C: tl.constexpr):
    """Return this program's channels c (BLOCK_C,), block program_id(0) after c_start, and c's mask."""
    c = c_start + tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    return c, c < c_end


@triton.jit
def _item_range(items_per_prog, n_items):
    """Return [start, end): the items (tiles along (n, M)) that program_id(1) owns."""
    start = tl.program_id(1) * items_per_prog
    return start, tl.minimum(start + items_per_prog, n_items)


@triton.jit
def _partials(part_ptr, s0, split, C, c, c_mask, BLOCK_S: tl.constexpr):
    """Return (pointers, mask), (BLOCK_S, BLOCK_C): the first partials plane at programs s0.. and channels c."""
    s = s0 + tl.arange(0, BLOCK_S)
    return part_ptr + s[:, None] * C + c[None, :], (s < split)[:, None] & c_mask[None, :]


@triton.jit
def _tile_offsets(i, m_blocks, c, M, s_n, s_c, s_m, c_mask, C_CONTIG: tl.constexpr, BLOCK_M: tl.constexpr):
    """Return (offsets, mask) of item i: sample n = i // m_blocks, positions of its m-block."""
    n = i // m_blocks
    m = (i - n * m_blocks) * BLOCK_M + tl.arange(0, BLOCK_M)
    base = n.to(tl.int64) * s_n  # 64-bit: large activations overflow int32 offsets
    if C_CONTIG:
        offs = base + c[:, None] + m[None, :].to(tl.int64) * s_m  # rows: channels contiguous
    else:
        offs = base + c[:, None].to(tl.int64) * s_c + m[None, :]  # planes: positions contiguous
    return offs, c_mask[:, None] & (m < M)[None, :]


@triton.jit
def stats_kernel(
    x_ptr, part_ptr, counter_ptr, mean_ptr, invstd_ptr, rmean_ptr, rvar_ptr,
    C, c_start, c_end, M, s_n, s_c, s_m, n_items, items_per_prog, m_blocks, split, split_max,
    eps, momentum,
    C_CONTIG: tl.constexpr, UPDATE_RUNNING: tl.constexpr, ACC: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_S: tl.constexpr,
):
    """Training forward, pass 1: per-channel mean and inverse std by a split Welford reduction.

    Each program writes its (mean, M2, count) per channel to the partials buffer (3, split_max, C);
    the program that finishes last for a block of channels merges them (Chan), writes mean and
    invstd, and updates the running statistics in place.
    """
    c, c_mask = _channel_block(c_start, c_end, BLOCK_C)
    # 1. Welford per lane over this program's tiles, accumulated in ACC (fp32, or fp64 for fp64 input).
    mean = tl.zeros((BLOCK_C, BLOCK_M), ACC)
    m2 = tl.zeros((BLOCK_C, BLOCK_M), ACC)
    cnt = tl.zeros((BLOCK_C, BLOCK_M), ACC)
    start, end = _item_range(items_per_prog, n_items)
    for i in range(start, end):
        offs, mask = _tile_offsets(i, m_blocks, c, M, s_n, s_c, s_m, c_mask, C_CONTIG, BLOCK_M)
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(ACC)
        cnt += mask.to(ACC)
        delta = x - mean
        mean += tl.where(mask, delta / tl.maximum(cnt, 1.0), 0.0)
        m2 += tl.where(mask, delta * (x - mean), 0.0)
    # 2. Merge the lanes of each channel (Chan), store this program's partial summary.
    mean_c, m2_c, cnt_c = tl.reduce((mean, m2, cnt), 1, _chan_combine)
    plane = split_max * C
    p = part_ptr + tl.program_id(1) * C + c
    tl.store(p, mean_c, mask=c_mask)
    tl.store(p + plane, m2_c, mask=c_mask)
    tl.store(p + 2 * plane, cnt_c, mask=c_mask)
    # 3. Take a ticket; the last program of this channel block merges all partials.
    tl.debug_barrier()  # every thread's partial stores are issued before the release below
    ticket = tl.atomic_add(counter_ptr + c_start // BLOCK_C + tl.program_id(0), 1, sem="acq_rel", scope="gpu")
    if ticket == split - 1:
        acc_mean = tl.zeros((BLOCK_C,), ACC)
        acc_m2 = tl.zeros((BLOCK_C,), ACC)
        acc_n = tl.zeros((BLOCK_C,), ACC)
        for s0 in range(0, split, BLOCK_S):
            q, qm = _partials(part_ptr, s0, split, C, c, c_mask, BLOCK_S)
            pm = tl.load(q, mask=qm, other=0.0, cache_modifier=".cg")  # .cg: skip L1, read what others wrote
            pm2 = tl.load(q + plane, mask=qm, other=0.0, cache_modifier=".cg")
            pn = tl.load(q + 2 * plane, mask=qm, other=0.0, cache_modifier=".cg")
            bm, bm2, bn = tl.reduce((pm, pm2, pn), 0, _chan_combine)
            acc_mean, acc_m2, acc_n = _chan_combine(acc_mean, acc_m2, acc_n, bm, bm2, bn)
        var = acc_m2 / tl.maximum(acc_n, 1.0)  # biased: the variance that normalizes the batch
        tl.store(mean_ptr + c, acc_mean, mask=c_mask)
        tl.store(invstd_ptr + c, 1.0 / tl.sqrt(var + eps), mask=c_mask)
        if UPDATE_RUNNING:
            # PyTorch's convention: running = (1 - momentum) * running + momentum * batch, unbiased var.
            rm = tl.load(rmean_ptr + c, mask=c_mask).to(ACC)
            rv = tl.load(rvar_ptr + c, mask=c_mask).to(ACC)
            tl.store(rmean_ptr + c, (1.0 - momentum) * rm + momentum * acc_mean, mask=c_mask)
            unbiased = acc_m2 / tl.maximum(acc_n - 1.0, 1.0)
            tl.store(rvar_ptr + c, (1.0 - momentum) * rv + momentum * unbiased, mask=c_mask)


@triton.jit
def affine_kernel(
    x_ptr, out_ptr, a_ptr, m_ptr, w_ptr, b_ptr,
    C, c_start, c_end, M, s_n, s_c, s_m, n_items, items_per_prog, m_blocks, eps,
    C_CONTIG: tl.constexpr, A_IS_VAR: tl.constexpr, HAS_M: tl.constexpr, HAS_W: tl.constexpr,
    HAS_B: tl.constexpr, ACC: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_M: tl.constexpr,
):
    """out = a * (x - m) + b per channel, with a = w * invstd, or w * rsqrt(var + eps) when A_IS_VAR.

    Training forward pass 2 (a = invstd, m = batch mean), eval forward (running statistics) and
    the eval backward's dx (x = dy, no m, no b): one read, one write.
    """
    c, c_mask = _channel_block(c_start, c_end, BLOCK_C)
    # 1. Per-channel coefficients, in ACC.
    a = tl.load(a_ptr + c, mask=c_mask, other=1.0).to(ACC)
    if A_IS_VAR:
        a = 1.0 / tl.sqrt(a + eps)
    if HAS_W:
        a = a * tl.load(w_ptr + c, mask=c_mask, other=0.0).to(ACC)
    m = tl.zeros((BLOCK_C,), ACC)
    if HAS_M:
        m = tl.load(m_ptr + c, mask=c_mask, other=0.0).to(ACC)
    b = tl.zeros((BLOCK_C,), ACC)
    if HAS_B:
        b = tl.load(b_ptr + c, mask=c_mask, other=0.0).to(ACC)
    # 2. One pass over this program's tiles; centring before scaling keeps large offsets exact.
    start, end = _item_range(items_per_prog, n_items)
    for i in range(start, end):
        offs, mask = _tile_offsets(i, m_blocks, c, M, s_n, s_c, s_m, c_mask, C_CONTIG, BLOCK_M)
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(ACC)
        y = (x - m[:, None]) * a[:, None] + b[:, None]
        tl.store(out_ptr + offs, y.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def grad_sums_kernel(
    x_ptr, dy_ptr, mean_ptr, invstd_ptr, part_ptr, counter_ptr, sum_dy_ptr, sum_dyxh_ptr,
    C, c_start, c_end, M, s_n, s_c, s_m, n_items, items_per_prog, m_blocks, split, split_max,
    C_CONTIG: tl.constexpr, ACC: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_S: tl.constexpr,
):
    """Training backward, pass 1: per channel, sum(dy) and sum(dy * x_hat), x_hat from x, mean, invstd.

    Split like ``stats_kernel``: partial sums (2, split_max, C), the last program per channel
    block adds them up and writes the two (C,) sums (they are also dbias and dweight).
    """
    c, c_mask = _channel_block(c_start, c_end, BLOCK_C)
    mu = tl.load(mean_ptr + c, mask=c_mask, other=0.0).to(ACC)
    rs = tl.load(invstd_ptr + c, mask=c_mask, other=0.0).to(ACC)
    # 1. Per-lane sums over this program's tiles.
    s_dy = tl.zeros((BLOCK_C, BLOCK_M), ACC)
    s_dyxh = tl.zeros((BLOCK_C, BLOCK_M), ACC)
    start, end = _item_range(items_per_prog, n_items)
    for i in range(start, end):
        offs, mask = _tile_offsets(i, m_blocks, c, M, s_n, s_c, s_m, c_mask, C_CONTIG, BLOCK_M)
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(ACC)
        dy = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(ACC)
        x_hat = tl.where(mask, (x - mu[:, None]) * rs[:, None], 0.0)
        s_dy += dy
        s_dyxh += dy * x_hat
    # 2. Reduce the lanes, store the partials.
    plane = split_max * C
    p = part_ptr + tl.program_id(1) * C + c
    tl.store(p, tl.sum(s_dy, axis=1), mask=c_mask)
    tl.store(p + plane, tl.sum(s_dyxh, axis=1), mask=c_mask)
    # 3. The last program of this channel block adds the partials.
    tl.debug_barrier()
    ticket = tl.atomic_add(counter_ptr + c_start // BLOCK_C + tl.program_id(0), 1, sem="acq_rel", scope="gpu")
    if ticket == split - 1:
        acc_dy = tl.zeros((BLOCK_C,), ACC)
        acc_dyxh = tl.zeros((BLOCK_C,), ACC)
        for s0 in range(0, split, BLOCK_S):
            q, qm = _partials(part_ptr, s0, split, C, c, c_mask, BLOCK_S)
            acc_dy += tl.sum(tl.load(q, mask=qm, other=0.0, cache_modifier=".cg"), axis=0)
            acc_dyxh += tl.sum(tl.load(q + plane, mask=qm, other=0.0, cache_modifier=".cg"), axis=0)
        tl.store(sum_dy_ptr + c, acc_dy, mask=c_mask)
        tl.store(sum_dyxh_ptr + c, acc_dyxh, mask=c_mask)


@triton.jit
def dx_kernel(
    x_ptr, dy_ptr, dx_ptr, mean_ptr, invstd_ptr, w_ptr, sum_dy_ptr, sum_dyxh_ptr, count,
    C, c_start, c_end, M, s_n, s_c, s_m, n_items, items_per_prog, m_blocks,
    C_CONTIG: tl.constexpr, HAS_W: tl.constexpr, ACC: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_M: tl.constexpr,
):
    """Training backward, pass 2: dx = w * invstd * (dy - sum(dy) / n - x_hat * sum(dy x_hat) / n)."""
    c, c_mask = _channel_block(c_start, c_end, BLOCK_C)
    # 1. Per-channel coefficients.
    mu = tl.load(mean_ptr + c, mask=c_mask, other=0.0).to(ACC)
    rs = tl.load(invstd_ptr + c, mask=c_mask, other=0.0).to(ACC)
    k = rs
    if HAS_W:
        k = k * tl.load(w_ptr + c, mask=c_mask, other=0.0).to(ACC)
    mean_dy = tl.load(sum_dy_ptr + c, mask=c_mask, other=0.0).to(ACC) / count
    mean_dyxh = tl.load(sum_dyxh_ptr + c, mask=c_mask, other=0.0).to(ACC) / count
    # 2. One pass: read x and dy, write dx.
    start, end = _item_range(items_per_prog, n_items)
    for i in range(start, end):
        offs, mask = _tile_offsets(i, m_blocks, c, M, s_n, s_c, s_m, c_mask, C_CONTIG, BLOCK_M)
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(ACC)
        dy = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(ACC)
        x_hat = (x - mu[:, None]) * rs[:, None]
        dx = k[:, None] * (dy - mean_dy[:, None] - x_hat * mean_dyxh[:, None])
        tl.store(dx_ptr + offs, dx.to(dx_ptr.dtype.element_ty), mask=mask)
