"""Shared fixtures: the repository's paths, its book config and its notebooks."""

import json
from pathlib import Path

import pytest
import torch
import yaml

from normlab import course

ROOT = Path(__file__).resolve().parents[1]


def notebook_paths():
    return sorted(p for p in (ROOT / "chapters").rglob("*.ipynb") if ".ipynb_checkpoints" not in p.parts)


def toc_files():
    """Every file named in _toc.yml, as a path relative to the root without its extension."""
    return course.toc_files(ROOT)


def load_notebook(path):
    return json.loads(Path(path).read_text(encoding="utf-8"))


def cell_source(cell):
    return "".join(cell["source"]) if isinstance(cell["source"], list) else cell["source"]


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
