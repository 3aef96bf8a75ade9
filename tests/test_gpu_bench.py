"""Chapter 8's pure-Python parts: gpu_bench (ideal bytes, results schema, no results without CUDA),
the numerics demo and the limits of experiments.gpu, and the chapter's self-checks."""

import json
from pathlib import Path

import pytest
import torch

from normlab import checks
from normlab.experiments import gpu as eg
from normlab.runtime import gpu_bench as gb


def test_ideal_bytes_are_2s_forward_and_eval_3s_backward():
    S = 256 * 256 * 28 * 28 * 4  # the anchor in float32: 205.5 MB
    assert gb.ideal_bytes("train_fwd", (256, 256, 28, 28), "float32") == 2 * S
    assert gb.ideal_bytes("eval", (256, 256, 28, 28), torch.float32) == 2 * S
    assert gb.ideal_bytes("train_bwd", (256, 256, 28, 28), "float32") == 3 * S
    assert gb.ideal_bytes("train_fwd", (256, 256, 28, 28), "bfloat16") == S


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("sideways", (2, 3), "float32"), "op"),
        (("eval", (2, 3), "int8"), "dtype"),
        (("eval", (0, 3), "float32"), "shape"),
    ],
)
def test_ideal_bytes_rejects_bad_arguments(args, message):
    with pytest.raises(ValueError, match=message):
        gb.ideal_bytes(*args)


def test_a_row_reports_bandwidth_on_the_ideal_bytes():
    r = gb.row("train_fwd", (256, 256, 28, 28), "float32", "nchw", "normlab", ms=0.2055, copy=2500.0)
    assert r["gbps"] == pytest.approx(2 * 205.520896 / 0.2055, rel=1e-3)  # 411 MB in 0.2055 ms: 2000 GB/s
    assert r["pct_of_copy"] == pytest.approx(80.0, abs=0.1)


def example():
    return {"device": "NVIDIA H100 80GB HBM3", "torch": "2.11.0", "triton": "3.5.0", "date": "2026-01-01",
            "copy_gbps": 2900.0,
            "rows": [gb.row("eval", (4, 3, 2, 2), "bfloat16", "channels_last", "eager", 0.01, 2900.0)]}


def test_a_well_formed_result_validates_and_round_trips(tmp_path):
    (tmp_path / "gpu.json").write_text(json.dumps(example()))
    assert gb.load_results(tmp_path) == {"gpu": example()}
    assert gb.load_results(tmp_path / "missing") == {}


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda r: r.pop("device"), "no 'device'"),
        (lambda r: r.update(copy_gbps="fast"), "copy_gbps"),
        (lambda r: r["rows"][0].pop("ms"), "row 0 has no 'ms'"),
        (lambda r: r["rows"][0].update(provider="cudnn"), "provider='cudnn'"),
        (lambda r: r["rows"][0].update(layout="nhwc"), "layout='nhwc'"),
        (lambda r: r["rows"][0].update(ms=0.0), "positive"),
    ],
)
def test_validate_names_what_is_wrong(edit, message):
    results = example()
    edit(results)
    with pytest.raises(ValueError, match=message):
        gb.validate(results)


def test_results_file_is_named_for_the_device(tmp_path):
    assert gb.results_path(tmp_path, "NVIDIA H100 80GB HBM3").name == "nvidia-h100-80gb-hbm3.json"
    with pytest.raises(ValueError, match="empty file name"):
        gb.results_path(tmp_path, "???")


def test_refuses_to_write_results_without_cuda(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(RuntimeError, match="no CUDA device"):
        gb.write_results(example(), tmp_path)
    with pytest.raises(RuntimeError, match="no CUDA device"):
        gb.run(tmp_path)
    with pytest.raises(SystemExit):
        gb.main(["--out", str(tmp_path)])
    assert list(tmp_path.iterdir()) == []


def test_composed_ops_match_f_batch_norm():
    x = torch.randn(6, 3, 4, 4, dtype=torch.float64)
    w, b = torch.rand(3, dtype=torch.float64) + 0.5, torch.randn(3, dtype=torch.float64)
    rm, rv = torch.zeros(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64)
    rm2, rv2 = rm.clone(), rv.clone()
    got = gb.composed(x.float(), rm, rv, w.float(), b.float(), training=True)
    expected = torch.nn.functional.batch_norm(x, rm2, rv2, w, b, training=True)
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(rv, rv2, rtol=1e-5, atol=1e-6)


def test_one_pass_variance_cancels_where_two_pass_welford_and_chan_do_not():
    v = eg.variance_methods(1e4, 1.0, 65536, seed=0)
    rel = {k: abs(x - v["exact"]) / v["exact"] for k, x in v.items()}
    assert rel["one-pass, left to right"] > 1e3 and rel["one-pass, pairwise"] > 0.5
    assert rel["two-pass"] < 1e-3 and rel["Chan merge of 256 chunks"] < 1e-3 and rel["Welford"] < 1e-2


def test_limits_of_the_anchor_shape():
    lim = eg.limits(gbps=3000.0)
    assert lim["S_bytes"] == 205_520_896
    assert lim["2S_us"] == pytest.approx(137.0, abs=0.1) and lim["5S_us"] == pytest.approx(342.5, abs=0.1)
    with pytest.raises(ValueError, match="bandwidth"):
        eg.limits(gbps=0)


def test_anchor_summary_computes_ratios_from_rows():
    rows = [gb.row(op, eg.ANCHOR, "float32", "nchw", p, ms, 3000.0)
            for op, p, ms in [("train_fwd", "normlab", 0.2), ("train_fwd", "eager", 0.3), ("train_bwd", "normlab", 0.3),
                              ("train_bwd", "eager", 0.5), ("eval", "normlab", 0.15)]]
    summary = {(r["dtype"], r["op"]): r for r in eg.anchor_summary({"rows": rows})}
    assert summary[("float32", "train")]["ratio_vs_eager"] == pytest.approx(0.8 / 0.5)
    assert summary[("float32", "eval")]["ratio_vs_eager"] is None


def correct_chan(a, b):
    n = a[0] + b[0]
    if n == 0:
        return a
    d = b[1] - a[1]
    return n, a[1] + d * b[0] / n, a[2] + b[2] + d * d * a[0] * b[0] / n


def test_chan_check_passes_a_correct_merge_and_catches_a_missing_term(capsys):
    checks.check_chan_merge(correct_chan)
    assert "PASS" in capsys.readouterr().out

    def no_between_term(a, b):  # forgets the delta^2 n_a n_b / n term
        n, mean, _ = correct_chan(a, b)
        return n, mean, a[2] + b[2]

    with pytest.raises(AssertionError, match="M2"):
        checks.check_chan_merge(no_between_term)


def test_channel_sums_check_passes_a_correct_solution_and_catches_summing_over_the_batch_only(capsys):
    def sums(dy, x, mean, invstd):
        dims = [0] + list(range(2, x.dim()))
        shape = (1, -1) + (1,) * (x.dim() - 2)
        return dy.sum(dims), (dy * (x - mean.view(shape)) * invstd.view(shape)).sum(dims)

    checks.check_channel_sums(sums)
    assert "PASS" in capsys.readouterr().out

    def batch_axis_only(dy, x, mean, invstd):
        s, t = sums(dy, x, mean, invstd)
        return dy.sum(0).reshape(dy.shape[1], -1)[:, 0], t

    with pytest.raises(AssertionError, match="sum_dy"):
        checks.check_channel_sums(batch_axis_only)


def test_recorded_results_ship_inside_the_package(tmp_path):
    """A notebook opened alone (Colab) has only the installed package: the results folder is in the wheel."""
    import shutil
    import subprocess
    import sys
    import zipfile

    root = Path(__file__).resolve().parents[1]
    assert gb.RESULTS_DIR == root / "code" / "normlab" / "runtime" / "results"
    assert (gb.RESULTS_DIR / "README.md").is_file()
    # build from a copy: a build in place would leave code/build/ behind
    source = shutil.copytree(root / "code", tmp_path / "code", ignore=shutil.ignore_patterns("build", "*.egg-info"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(tmp_path / "wheel"), str(source)], check=True, capture_output=True)
    (wheel,) = (tmp_path / "wheel").glob("normlab-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "normlab/runtime/results/README.md" in names, names
    # what Colab installs is the library alone: the maintainers' tooling is tools/coursekit's package
    tooling = [n for n in names if n.startswith("coursekit/") or n in {
        f"normlab/{m}.py" for m in ("course", "student", "grade", "colab", "seedscan", "cells")}]
    assert not tooling, tooling
