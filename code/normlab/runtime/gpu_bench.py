"""GPU benchmark of batch norm: composed ops, eager F.batch_norm, torch.compile and normlab.kernels.

Run on a CUDA GPU (``make bench``)::

    PYTHONPATH=code python -m normlab.runtime.gpu_bench --out code/normlab/runtime/results/

It times ``train_fwd``, ``train_bwd`` and ``eval`` on ResNet-50's BN shapes (the anchor
(256, 256, 28, 28) first), NCHW and channels_last, float32 and bfloat16, with
``triton.testing.do_bench`` (median, L2 flushed before every run), measures the device's copy
bandwidth in the same run, and writes ``<out>/<gpu-name>.json`` after every shape, so a run cut
short still leaves its rows. It refuses to write anything without a CUDA device: results are
measured, never typed. Effective bandwidth counts the ideal bytes (``ideal_bytes``).
"""

from __future__ import annotations

import argparse
import datetime
import json
import re
import time
from pathlib import Path

import torch

from normlab import kernels  # first: it decides whether triton runs interpreted

__all__ = [
    "LAYOUTS", "OPS", "PROVIDERS", "RESULTS_DIR", "SHAPES", "ideal_bytes", "load_results", "results_path", "validate",
    "write_results",
]

OPS = ("train_fwd", "train_bwd", "eval")
PROVIDERS = ("composed", "eager", "compile", "normlab")
LAYOUTS = ("nchw", "channels_last")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
ANCHOR = (256, 256, 28, 28)
# ResNet-50's BatchNorm2d inputs (C, H, W) at 224x224 (torchvision, stride in the 3x3 conv), anchor first.
RESNET50 = [(256, 28, 28), (64, 112, 112), (64, 56, 56), (256, 56, 56), (128, 56, 56), (128, 28, 28),
            (512, 28, 28), (256, 14, 14), (1024, 14, 14), (512, 14, 14), (512, 7, 7), (2048, 7, 7)]
SHAPES = {
    "anchor": [ANCHOR],
    "default": [ANCHOR, (32, 256, 28, 28), (256, 64, 112, 112), (256, 1024, 14, 14), (256, 2048, 7, 7)],
    "resnet50": [(n, c, h, w) for n in (256, 32) for c, h, w in RESNET50],
}
TOP_KEYS = {"device": str, "torch": str, "triton": str, "date": str, "copy_gbps": (int, float), "rows": list}
ROW_KEYS = {"op": str, "shape": list, "dtype": str, "layout": str, "provider": str, "ms": (int, float),
            "gbps": (int, float), "pct_of_copy": (int, float)}


def ideal_bytes(op, shape, dtype):
    """Return the fewest bytes op must move: 2S for train_fwd and eval, 3S for train_bwd.

    S is the size of one activation tensor of ``shape`` in ``dtype`` (torch dtype or its name);
    the per-channel vectors are negligible and not counted.
    """
    if op not in OPS:
        raise ValueError(f"op {op!r}, expected one of {OPS}")
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ValueError(f"dtype {dtype!r}, expected one of {tuple(DTYPES)}")
        dtype = DTYPES[dtype]
    if not shape or any(int(d) < 1 for d in shape):
        raise ValueError(f"shape {shape} must be a non-empty tuple of positive sizes")
    S = torch.tensor([], dtype=dtype).element_size()
    for d in shape:
        S *= int(d)
    return (3 if op == "train_bwd" else 2) * S


def validate(results):
    """Raise ValueError naming the first problem when ``results`` does not follow the results schema."""
    if not isinstance(results, dict):
        raise ValueError(f"results must be a dict, got {type(results).__name__}")
    for key, kind in TOP_KEYS.items():
        if key not in results:
            raise ValueError(f"results has no {key!r}")
        if not isinstance(results[key], kind):
            raise ValueError(f"results[{key!r}] has type {type(results[key]).__name__}")
    allowed = {"op": OPS, "provider": PROVIDERS, "layout": LAYOUTS, "dtype": tuple(DTYPES)}
    for i, row in enumerate(results["rows"]):
        for key, kind in ROW_KEYS.items():
            if key not in row:
                raise ValueError(f"row {i} has no {key!r}")
            if not isinstance(row[key], kind):
                raise ValueError(f"row {i}: {key!r} has type {type(row[key]).__name__}")
        for key, values in allowed.items():
            if row[key] not in values:
                raise ValueError(f"row {i}: {key}={row[key]!r}, expected one of {values}")
        if not row["ms"] > 0:
            raise ValueError(f"row {i}: ms={row['ms']} must be positive")
    return results


def results_path(out_dir, device_name):
    """Return out_dir/<device name, lower case, non-alphanumerics as dashes>.json."""
    slug = re.sub(r"[^a-z0-9]+", "-", device_name.lower()).strip("-")
    if not slug:
        raise ValueError(f"device name {device_name!r} gives an empty file name")
    return Path(out_dir) / f"{slug}.json"


def write_results(results, out_dir):
    """Validate results and write them to results_path(out_dir, results["device"]); needs a CUDA device."""
    if not torch.cuda.is_available():
        raise RuntimeError("no CUDA device: benchmark results are written only from real GPU runs")
    validate(results)
    path = results_path(out_dir, results["device"])
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=1) + "\n")
    return path


# Recorded results ship inside the package (normlab/runtime/results/), so a notebook opened alone, in
# Colab or anywhere normlab is installed, finds them.
RESULTS_DIR = Path(__file__).resolve().parent / "results"


def load_results(results_dir=RESULTS_DIR):
    """Return {file stem: results} for every valid results file in results_dir (none: {}).

    The default is the folder shipped with the package, where ``make bench`` writes.
    """
    found = {}
    for path in sorted(Path(results_dir).glob("*.json")):
        found[path.stem] = validate(json.loads(path.read_text()))
    return found


# --- the providers -------------------------------------------------------------------------------


def composed(x, running_mean, running_var, weight, bias, training, momentum=0.1, eps=1e-5):
    """Batch norm as separate torch ops (mean, var, normalize, scale, shift), fp32 statistics."""
    dims = [0] + list(range(2, x.dim()))
    shape = (1, -1) + (1,) * (x.dim() - 2)
    xf = x.float()
    if training:
        mean = xf.mean(dims)
        var = xf.var(dims, correction=0)
        with torch.no_grad():
            n = x.numel() // x.shape[1]
            running_mean.mul_(1 - momentum).add_(mean.detach(), alpha=momentum)
            running_var.mul_(1 - momentum).add_(var.detach() * n / (n - 1), alpha=momentum)
    else:
        mean, var = running_mean, running_var
    y = (xf - mean.view(shape)) / torch.sqrt(var.view(shape) + eps)
    return (y * weight.view(shape) + bias.view(shape)).to(x.dtype)


def _eager(x, running_mean, running_var, weight, bias, training):
    return torch.nn.functional.batch_norm(x, running_mean, running_var, weight, bias, training=training)


def _providers():
    import torch._dynamo

    # One static compilation per shape, layout, dtype and mode: far more than dynamo's default limit.
    for name in ("cache_size_limit", "recompile_limit"):
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, 1024)
    return {
        "composed": composed,
        "eager": _eager,
        "compile": torch.compile(_eager, dynamic=False),
        "normlab": kernels.batch_norm,
    }


def _inputs(shape, dtype, layout, device="cuda"):
    C = shape[1]
    x = torch.randn(shape, device=device, dtype=dtype)
    if layout == "channels_last" and x.dim() == 4:
        x = x.to(memory_format=torch.channels_last)
    w = torch.rand(C, device=device) + 0.5
    b = torch.randn(C, device=device)
    return x, w, b, torch.zeros(C, device=device), torch.ones(C, device=device)


def _bench(fn):
    """Median milliseconds of fn, L2 flushed before each run (triton.testing.do_bench)."""
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))


def _time_op(provider, op, shape, dtype, layout):
    x, w, b, rm, rv = _inputs(shape, dtype, layout)
    if op == "eval":
        return _bench(lambda: provider(x, rm, rv, w, b, training=False))
    if op == "train_fwd":
        return _bench(lambda: provider(x, rm, rv, w, b, training=True))
    # train_bwd: one forward that keeps its graph, then time the backward alone.
    xs, ws, bs = (t.detach().requires_grad_() for t in (x, w, b))
    out = provider(xs, rm, rv, ws, bs, training=True)
    dy = torch.randn_like(out)
    try:
        return _bench(lambda: torch.autograd.grad(out, (xs, ws, bs), dy, retain_graph=True))
    except RuntimeError:  # a backward that cannot run twice: time forward + backward, subtract the forward
        def step():
            o = provider(xs, rm, rv, ws, bs, training=True)
            torch.autograd.grad(o, (xs, ws, bs), dy)

        return max(_bench(step) - _bench(lambda: provider(x, rm, rv, w, b, training=True)), 1e-6)


def copy_gbps(nbytes=2**30):
    """Measure the device's copy bandwidth (read + write bytes / time) in GB/s."""
    src = torch.empty(nbytes // 4, device="cuda", dtype=torch.float32)
    dst = torch.empty_like(src)
    ms = _bench(lambda: dst.copy_(src))
    return 2 * src.numel() * 4 / (ms * 1e-3) / 1e9


def row(op, shape, dtype, layout, provider, ms, copy):
    """Return one results row: time, effective bandwidth on the ideal bytes, % of copy bandwidth."""
    gbps = ideal_bytes(op, shape, dtype) / (ms * 1e-3) / 1e9
    return {"op": op, "shape": list(shape), "dtype": dtype, "layout": layout, "provider": provider,
            "ms": round(ms, 5), "gbps": round(gbps, 1), "pct_of_copy": round(100 * gbps / copy, 1)}


def run(out_dir, shapes="default", budget_s=420.0, sweep=True):
    """Benchmark every (shape, layout, dtype, op, provider); write results after each shape."""
    import triton

    if not torch.cuda.is_available():
        raise RuntimeError("no CUDA device: the benchmark runs only on a GPU")
    start = time.time()
    providers = _providers()
    copy = copy_gbps()
    results = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
               "date": datetime.date.today().isoformat(), "copy_gbps": round(copy, 1), "rows": [],
               "config": vars(kernels.CONFIG).copy(), "incomplete": True}
    print(f"{results['device']}: copy bandwidth {copy:.0f} GB/s", flush=True)
    skipped = [d for d, dtype in DTYPES.items() if not kernels.dtype_supported(dtype)]
    if skipped:
        results["skipped"] = {"normlab": skipped, "why": "compute capability below 8.0"}
        print(f"normlab skips {', '.join(skipped)}: this GPU is older than sm_80 (Ampere)", flush=True)
    for shape in SHAPES[shapes]:
        if time.time() - start > budget_s:
            print(f"time budget of {budget_s:.0f} s spent: stopping before {shape}", flush=True)
            break
        for layout in LAYOUTS:
            for dname, dtype in DTYPES.items():
                for op in OPS:
                    for pname, fn in providers.items():
                        if pname == "normlab" and not kernels.dtype_supported(dtype):
                            continue  # e.g. bfloat16 on a T4 (sm_75): said once, below
                        try:
                            ms = _time_op(fn, op, shape, dtype, layout)
                        except Exception as exc:  # report a provider that fails, keep measuring the others
                            print(f"FAILED {pname} {op} {shape} {dname} {layout}: {exc!r}", flush=True)
                            continue
                        r = row(op, shape, dname, layout, pname, ms, copy)
                        results["rows"].append(r)
                        print(f"{op:9s} {str(shape):20s} {dname:8s} {layout:13s} {pname:8s} {ms:8.4f} ms "
                              f"{r['gbps']:7.0f} GB/s {r['pct_of_copy']:5.1f}%", flush=True)
        write_results(results, out_dir)
    if sweep and time.time() - start < budget_s:
        results["sweep"] = group_sweep(copy)
    results["incomplete"] = len({tuple(r["shape"]) for r in results["rows"]}) < len(SHAPES[shapes])
    path = write_results(results, out_dir)
    print(f"wrote {path} in {time.time() - start:.0f} s", flush=True)
    return path


def group_sweep(copy, group_mb=(0, 8, 16, 24, 32, 48)):
    """normlab on the anchor, NCHW, with channel groups of several sizes (0: all channels in one group)."""
    saved = kernels.CONFIG.group_bytes
    rows = []
    try:
        for mb in group_mb:
            kernels.CONFIG.group_bytes = mb * 2**20
            for dname, dtype in DTYPES.items():
                if not kernels.dtype_supported(dtype):
                    continue
                for op in ("train_fwd", "train_bwd"):
                    ms = _time_op(kernels.batch_norm, op, ANCHOR, dtype, "nchw")
                    rows.append({"group_mb": mb, **row(op, ANCHOR, dname, "nchw", "normlab", ms, copy)})
                    print(f"group {mb:3d} MB {op:9s} {dname:8s} {ms:8.4f} ms {rows[-1]['pct_of_copy']:5.1f}%",
                          flush=True)
    finally:
        kernels.CONFIG.group_bytes = saved
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(RESULTS_DIR), help="folder for <gpu-name>.json")
    parser.add_argument("--shapes", default="default", choices=sorted(SHAPES))
    parser.add_argument("--budget-s", type=float, default=420.0, help="start no new shape after this many seconds")
    parser.add_argument("--no-sweep", action="store_true", help="skip the channel-group sweep")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        parser.exit(2, "gpu_bench: no CUDA device; results are written only from real GPU runs\n")
    run(args.out, args.shapes, args.budget_s, sweep=not args.no_sweep)


if __name__ == "__main__":
    main()
