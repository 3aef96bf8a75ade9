"""The experiments whose results the chapters show and assert: one module per chapter.

Seeds. A notebook run at ``NORMLAB_SEED=seed`` trains its networks at the seeds
``seeds_for(seed, n)`` (``100 * seed + k``). One network's seed ``s`` starts several random
streams, each its own ``torch.Generator``: the initialization at ``s`` itself, the order of the
mini-batches at ``s + BATCH_ORDER``. Chapter 3's noisy BN draws its injected noise for all the
networks of a run at the run's first seed ``+ NOISE_STREAM``. Both offsets exceed the spread of
one run's seeds, so within a run no network's stream replays another's. Every chapter numbers its
seeds this way, Chapter 1's lab included (it calls ``seeds_for`` without another experiment); a lab
that tunes on seeds of its own takes them after its training seeds: ``seeds_for(seed, n + m)[n:]``.
"""

from normlab._validate import check_positive_int, is_int

BATCH_ORDER = 7919  # the offset of a network's mini-batch order stream from its seed
NOISE_STREAM = 104729  # the offset of Chapter 3's injected-noise stream from the first seed


def seeds_for(seed, n):
    """Return the n seeds a notebook run with ``NORMLAB_SEED=seed`` uses: seed * 100 + k for k < n.

    Different notebook seeds give disjoint lists as long as n <= 100.
    """
    check_positive_int("n", n)
    if not is_int(seed) or seed < 0:
        raise ValueError(f"seed must be an int >= 0, got {seed!r}")
    return [100 * seed + k for k in range(n)]
