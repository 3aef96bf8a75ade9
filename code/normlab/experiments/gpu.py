"""Chapter 8 (gpu): the numbers the chapter derives or demonstrates on any machine.

- ``variance_methods``: one-pass E[x^2] - E[x]^2 against two-pass, Welford and Chan in float32;
- ``limits``: the fewest bytes a BN pass moves, and the time that takes at a given bandwidth;
- ``roofline_points``: arithmetic intensity of each BN op (approximate flop counts, stated below);
- ``anchor_summary``: the anchor-shape figures from a recorded results file.
"""

from __future__ import annotations

import numpy as np

from normlab.distributed import chan_merge

__all__ = ["DEVICES", "anchor_summary", "chan_merge", "limits", "roofline_points", "variance_methods", "welford"]

ANCHOR = (256, 256, 28, 28)
# Datasheet figures (memory bandwidth in GB/s, fp32 non-tensor TFLOP/s, L2 in MB); see the chapter's citations.
DEVICES = {
    "H100 SXM": {"gbps": 3350.0, "tflops": 67.0, "l2_mb": 50},
    "T4": {"gbps": 320.0, "tflops": 8.1, "l2_mb": 4},
}
# Approximate fp32 operations per element (the order of magnitude is what matters for the roofline):
# train_fwd: Welford update (5) + normalize and affine (2); train_bwd: two sums (3) + dx (5); eval: one fma (2).
FLOPS_PER_ELEMENT = {"train_fwd": 7, "train_bwd": 8, "eval": 2}
IDEAL_TENSORS = {"train_fwd": 2, "train_bwd": 3, "eval": 2}


def welford(x):
    """Return (count, mean, M2) of x by Welford's update, in x's dtype, one element at a time."""
    x = np.asarray(x)
    one = x.dtype.type(1)
    n, mean, m2 = x.dtype.type(0), x.dtype.type(0), x.dtype.type(0)
    for v in x:
        n += one
        d = v - mean
        mean += d / n
        m2 += d * (v - mean)
    return n, mean, m2


def variance_methods(mean, std, n, seed=0, chunks=256, kernel=None):
    """Return {method: variance} for float32 samples mean + std * N(0, 1), and the exact value.

    "exact" is the float64 variance of the same float32 numbers. One-pass sums run left to right
    (np.cumsum) and pairwise (np.sum); two-pass, Welford and a Chan merge of ``chunks`` two-pass
    summaries run in float32. kernel: optional function x -> variance (e.g. the Triton kernel).
    """
    if n < 2 or chunks < 1:
        raise ValueError(f"need n >= 2 and chunks >= 1, got n={n}, chunks={chunks}")
    rng = np.random.default_rng(seed)
    x = (mean + std * rng.standard_normal(n)).astype(np.float32)
    f = np.float32
    out = {"exact": float(x.astype(np.float64).var())}
    s, s2 = np.cumsum(x, dtype=f)[-1], np.cumsum(x * x, dtype=f)[-1]
    out["one-pass, left to right"] = float(s2 / f(n) - (s / f(n)) ** 2)
    out["one-pass, pairwise"] = float(np.sum(x * x, dtype=f) / f(n) - (np.sum(x, dtype=f) / f(n)) ** 2)
    m = np.sum(x, dtype=f) / f(n)
    out["two-pass"] = float(np.sum((x - m) ** 2, dtype=f) / f(n))
    c, wm, wm2 = welford(x)
    out["Welford"] = float(wm2 / c)
    summary = (f(0), f(0), f(0))
    for part in np.array_split(x, chunks):
        pm = np.sum(part, dtype=f) / f(len(part))
        summary = chan_merge(summary, (f(len(part)), pm, np.sum((part - pm) ** 2, dtype=f)))
    out[f"Chan merge of {chunks} chunks"] = float(summary[2] / summary[0])
    if kernel is not None:
        out["normlab.kernels (fp32)"] = float(kernel(x))
    return out


def limits(shape=ANCHOR, itemsize=4, gbps=3000.0):
    """Return S (bytes of one activation) and the microseconds 2S, 3S and 5S take at ``gbps`` GB/s."""
    if gbps <= 0:
        raise ValueError(f"bandwidth must be positive, got {gbps}")
    S = int(np.prod(shape)) * itemsize
    return {"S_bytes": S, **{f"{k}S_us": k * S / (gbps * 1e9) * 1e6 for k in (2, 3, 5)}}


def roofline_points(itemsize=4):
    """Return {op: flop per byte of ideal traffic} for BN's three ops."""
    return {op: FLOPS_PER_ELEMENT[op] / (IDEAL_TENSORS[op] * itemsize) for op in FLOPS_PER_ELEMENT}


def anchor_summary(results):
    """Return rows for the anchor shape, NCHW: per (dtype, op), each provider's ms, % of copy, and ratios.

    ratio_vs_<provider> is that provider's time over normlab's (above 1: normlab is faster); the
    "train" op is train_fwd + train_bwd.
    """
    rows = [r for r in results["rows"] if tuple(r["shape"]) == ANCHOR and r["layout"] == "nchw"]
    table = {}
    for r in rows:
        table.setdefault((r["dtype"], r["op"]), {})[r["provider"]] = r
    for dtype in {d for d, _ in table}:
        fwd, bwd = table.get((dtype, "train_fwd"), {}), table.get((dtype, "train_bwd"), {})
        both = set(fwd) & set(bwd)
        table[(dtype, "train")] = {p: {"ms": fwd[p]["ms"] + bwd[p]["ms"]} for p in both}
    summary = []
    for (dtype, op), by in sorted(table.items()):
        if "normlab" not in by:
            continue
        entry = {"dtype": dtype, "op": op, "ms": by["normlab"]["ms"], "gbps": by["normlab"].get("gbps"),
                 "pct_of_copy": by["normlab"].get("pct_of_copy")}
        for p in ("eager", "compile", "composed"):
            entry[f"ratio_vs_{p}"] = by[p]["ms"] / by["normlab"]["ms"] if p in by else None
        summary.append(entry)
    return summary
