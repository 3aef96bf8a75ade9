"""normlab.runtime.data.grouped_batches: the non-i.i.d. batch sampler of Chapter 5."""

import pytest
import torch

from normlab.runtime.data import grouped_batches

LABELS = torch.arange(10).repeat_interleave(torch.tensor([37, 40, 41, 29, 50, 33, 38, 45, 30, 36]))


@pytest.mark.parametrize("k", [1, 2, 3])
@pytest.mark.parametrize("batch_size", [8, 32])
def test_every_batch_holds_at_most_k_classes_and_every_example_once(k, batch_size):
    batches = grouped_batches(LABELS, batch_size, k, seed=0)
    assert all(len(torch.unique(LABELS[b])) <= k for b in batches)
    assert all(1 <= len(b) <= batch_size for b in batches)
    everything = torch.cat(batches)
    assert len(everything) == len(LABELS)
    assert torch.equal(everything.sort().values, torch.arange(len(LABELS)))


def test_most_batches_are_full_and_hold_exactly_k_classes():
    batches = grouped_batches(LABELS, 16, 2, seed=0)
    full = [b for b in batches if len(b) == 16]
    assert len(full) >= 0.8 * len(batches)
    assert sum(len(torch.unique(LABELS[b])) == 2 for b in full) >= 0.8 * len(full)


def test_drop_last_keeps_only_full_batches():
    batches = grouped_batches(LABELS, 16, 1, seed=0, drop_last=True)
    assert batches and all(len(b) == 16 for b in batches)
    assert len(torch.unique(torch.cat(batches))) == sum(len(b) for b in batches)  # still no repeats


def test_the_seed_decides_everything():
    a, b, c = (grouped_batches(LABELS, 16, 1, seed=s) for s in (3, 3, 4))
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not all(torch.equal(x, y) for x, y in zip(a, c))


def test_batches_come_in_random_class_order():
    first_classes = [int(LABELS[grouped_batches(LABELS, 16, 1, seed=s)[0][0]]) for s in range(20)]
    assert len(set(first_classes)) >= 4


def test_bad_arguments_raise_value_error():
    with pytest.raises(ValueError, match="batch_size"):
        grouped_batches(LABELS, 0, 1, seed=0)
    with pytest.raises(ValueError, match="classes_per_batch"):
        grouped_batches(LABELS, 8, 0, seed=0)
    with pytest.raises(ValueError, match="classes_per_batch"):
        grouped_batches(LABELS, 4, 5, seed=0)
    with pytest.raises(ValueError, match="only 2 classes"):
        grouped_batches(torch.tensor([0, 1, 0, 1]), 4, 3, seed=0)
    with pytest.raises(ValueError, match="labels"):
        grouped_batches(torch.rand(10), 4, 1, seed=0)
