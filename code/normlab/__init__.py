"""normlab: the library of the open course on Batch Normalization.

Every notebook starts with ``ctx = normlab.setup()``: one call that seeds every random number
generator, reads the course's two environment variables and picks the device.

- ``NORMLAB_SEED`` (default 0): changes every random choice a notebook makes.
- ``NORMLAB_SCALE`` (default ``quick``): ``quick`` runs each notebook in under a minute on a
  2-core CPU (CI and the website); ``full`` runs the longer experiments (a GPU or Colab).

At quick scale ``setup`` also pins torch to one thread: the quick experiments' tensors are small,
and on a busy machine several torch threads per process slow a notebook down tenfold or more. A
lab whose seeds train together as one large ensemble asks for two threads itself, after setup,
with ``normlab.set_threads(2)``: never more than ``OMP_NUM_THREADS`` where that is set (``make
test`` runs two notebooks side by side with ``OMP_NUM_THREADS=1`` each, one per core).

Its folders show its layers, each importing only from those before it: the BN library (the
modules in this folder: ``scratch``, ``functional``, ``nn``, ``kernels``, ``stats``, ``fold``,
``adapt``, ``distributed``, ``normfree``); the notebook runtime (``normlab.runtime``: data,
training loops, diagnostics, figures, timing, evidence, claims, glue; ``setup`` here is its entry
point); the chapters (``normlab.experiments``, then ``normlab.checks``). ``code/README.md`` has the table.

This package is what a student installs (Colab: ``pip install normlab`` from ``code/``), so it holds
only what the notebooks use. The maintainers' tooling (the course map and timings, the student
and Colab editions, grading, the seed scan) is the separate package ``coursekit``, in
``tools/coursekit/``: it imports normlab, and normlab never imports it.
"""

from __future__ import annotations

import os
import platform
import random
from dataclasses import dataclass, field

from normlab._validate import check_positive_int, is_int

__version__ = "0.1.0"

SCALES = ("quick", "full")


@dataclass(frozen=True)
class Context:
    """What ``setup`` decided: the seed, the scale, the device and the versions in use."""

    seed: int
    scale: str
    device: str
    versions: dict = field(default_factory=dict)

    @property
    def quick(self) -> bool:
        return self.scale == "quick"

    @property
    def full(self) -> bool:
        return self.scale == "full"

    def __str__(self) -> str:
        versions = " ".join(f"{k} {v}" for k, v in self.versions.items())
        return f"normlab: device={self.device} scale={self.scale} seed={self.seed} | {versions}"


def _read_seed(seed):
    if seed is None:
        raw = os.environ.get("NORMLAB_SEED", "0")
        try:
            seed = int(raw)
        except ValueError:
            raise ValueError(f"NORMLAB_SEED={raw!r} is not an integer") from None
    if not is_int(seed):
        raise ValueError(f"seed must be an int, got {type(seed).__name__}")
    if not 0 <= seed < 2**32:
        raise ValueError(f"seed must be in [0, 2**32), got {seed}")
    return seed


def _read_scale(scale):
    if scale is None:
        scale = os.environ.get("NORMLAB_SCALE", "quick")
    scale = scale.strip().lower()
    if scale not in SCALES:
        raise ValueError(f"NORMLAB_SCALE={scale!r}, expected one of {SCALES}")
    return scale


def set_threads(n: int) -> None:
    """Let torch use ``n`` threads, or ``OMP_NUM_THREADS`` if that is set and smaller.

    ``OMP_NUM_THREADS`` is the standard cap that torch, NumPy's BLAS and OpenMP read at start-up; a
    later ``torch.set_num_threads`` would override it, so the labs call this instead.
    """
    import torch

    check_positive_int("n", n)
    cap = os.environ.get("OMP_NUM_THREADS", "").strip()
    if cap.isdigit() and int(cap) >= 1:
        n = min(n, int(cap))
    torch.set_num_threads(n)


def setup(seed: int | None = None, scale: str | None = None, verbose: bool = True) -> Context:
    """Seed python, numpy and torch, read the scale, pick the device, print one line.

    At quick scale, torch runs on one thread (the module docstring says why).

    seed: overrides ``NORMLAB_SEED``; scale: overrides ``NORMLAB_SCALE``.
    Returns a ``Context`` (seed, scale, device, versions).
    """
    import numpy as np
    import torch

    seed = _read_seed(seed)
    scale = _read_scale(scale)
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # seeds the CUDA generators too
    if scale == "quick":
        set_threads(1)  # small tensors: more threads only add contention
    device = "cuda" if torch.cuda.is_available() else "cpu"
    versions = {
        "python": platform.python_version(),
        "numpy": np.__version__,
        "torch": torch.__version__,
        "normlab": __version__,
    }
    ctx = Context(seed=seed, scale=scale, device=device, versions=versions)
    if verbose:
        print(ctx)
    return ctx


from normlab.stats import precise_bn  # noqa: E402  (the course's one top-level tool besides setup)

__all__ = ["Context", "SCALES", "precise_bn", "set_threads", "setup", "__version__"]
