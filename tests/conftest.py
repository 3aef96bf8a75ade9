"""Shared fixtures: the repository's paths, its book config and its notebooks."""

import json
from pathlib import Path

import pytest
import torch
import yaml

from coursekit import course

ROOT = Path(__file__).resolve().parents[1]


def notebook_paths():
    return sorted(p for p in (ROOT / "chapters").rglob("*.ipynb") if ".ipynb_checkpoints" not in p.parts)


def toc_files():
    """Every file named in _toc.yml, as a path relative to the root without its extension."""
    return course.toc_files(ROOT)


def assert_no_cycle(graph):
    """Fail naming the cycle if the directed graph {node: set of nodes it points to} has one."""
    done, path = set(), []

    def visit(n):
        assert n not in path, "import cycle: " + " -> ".join(path[path.index(n):] + [n])
        if n not in done:
            path.append(n)
            for m in sorted(graph[n]):
                visit(m)
            path.pop()
            done.add(n)

    for n in sorted(graph):
        visit(n)


def load_notebook(path):
    return json.loads(Path(path).read_text(encoding="utf-8"))


def cell_source(cell):
    return "".join(cell["source"]) if isinstance(cell["source"], list) else cell["source"]


def blob_split(classes, features, n, n_train):
    """A Split of n examples around ``classes`` random centers in ``features`` dimensions (seed 0).

    Example i has class i % classes; the first n_train examples train, the rest test.
    """
    from normlab.runtime.data import Split

    gen = torch.Generator().manual_seed(0)
    centers = torch.randn(classes, features, generator=gen) * 2
    y = torch.arange(n) % classes
    x = centers[y] + torch.randn(n, features, generator=gen)
    return Split(x[:n_train], y[:n_train], x[n_train:], y[n_train:], name="blobs")


@pytest.fixture(scope="session")
def config():
    return yaml.safe_load((ROOT / "_config.yml").read_text())


@pytest.fixture
def float64():
    """Run a test with float64 as torch's default dtype (exact comparisons), then restore it."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


@pytest.fixture
def one_thread():
    """Run a test on one torch thread: tiny tensors run faster, and unaffected by a busy CPU."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


# The device the experiments' device tests pass: the CPU under a name of its own ("cpu:0"), so
# that a call which ignores its device argument (and moves nothing, or moves to plain "cpu") is
# told apart from one that honours it. On a machine with a GPU, "cuda" runs the same tests.
DEVICES = [torch.device("cpu:0"),
           pytest.param(torch.device("cuda"), marks=pytest.mark.skipif(not torch.cuda.is_available(),
                                                                       reason="no CUDA GPU on this machine"))]


@pytest.fixture
def device_spy(monkeypatch):
    """Record the devices that ``Split.to`` and ``nn.Module.to`` are asked for while a test runs.

    ``device_spy.moved(device)`` says whether some split and some model were both moved there:
    what an experiment that honours its ``device`` argument does.
    """
    from normlab.runtime.data import Split

    split_to, module_to = Split.to, torch.nn.Module.to

    class Spy:
        splits, modules = [], []

        def moved(self, device):
            device = torch.device(device)
            return device in self.splits and device in self.modules

    spy = Spy()
    spy.splits, spy.modules = [], []

    def split(self, device):
        spy.splits.append(torch.device(device))
        return split_to(self, device)

    def module(self, *args, **kwargs):
        target = kwargs.get("device", args[0] if args else None)
        if isinstance(target, (str, torch.device)):
            spy.modules.append(torch.device(target))
        return module_to(self, *args, **kwargs)

    monkeypatch.setattr(Split, "to", split)
    monkeypatch.setattr(torch.nn.Module, "to", module)
    return spy
