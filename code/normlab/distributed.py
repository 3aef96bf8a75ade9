"""Run a function in several processes that talk through ``torch.distributed`` (Chapter 9).

``launch(fn, world_size, *args)`` starts ``world_size`` fresh Python processes on this machine,
joins them into one process group with the gloo backend (CPU; on GPUs the same code runs with
NCCL), calls ``fn(rank, world_size, *args)`` in each and returns the ranks' results, in rank
order. It never hangs: every collective has a time limit, the whole launch has a deadline, the
first rank that raises stops the launch with that rank's traceback, and no process outlives the
call.

``fn`` must be importable (defined in a module, not in a notebook cell): the processes are
*spawned*, and a spawned process finds ``fn`` by importing it.

``merge_moments`` is the statistics step of synchronized batch norm: it merges per-rank
(count, mean, M2) into the moments of the union with Chan et al.'s formula. ``chan_merge`` is the
same formula for two summaries, one merge after another (``precise_bn``, Chapter 8's float32 demo).
"""

from __future__ import annotations

import multiprocessing as mp
import pickle
import queue as queue_module
import socket
import time
import traceback
from datetime import timedelta

import torch

from normlab._validate import check_positive_int

__all__ = ["DistributedError", "chan_merge", "free_port", "launch", "merge_moments"]


class DistributedError(RuntimeError):
    """A rank raised, died or ran out of time; the message says which and why."""


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that is free right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def chan_merge(a, b):
    """Merge two (count, mean, M2) summaries with Chan's formula; return the union's (count, mean, M2).

    ``delta = mean_b - mean_a; mean = mean_a + delta * (n_b / n); M2 = M2_a + M2_b + delta**2 * (n_a * n_b / n)``.
    Only arithmetic operators: the values may be Python or NumPy scalars (the result keeps their
    dtype, e.g. float32) or tensors of per-channel values. Two empty summaries (n = 0) give ``a``.
    """
    n_a, mean_a, m2_a = a
    n_b, mean_b, m2_b = b
    n = n_a + n_b
    if n == 0:
        return a
    delta = mean_b - mean_a
    return n, mean_a + delta * (n_b / n), m2_a + m2_b + delta * delta * (n_a * n_b / n)


def merge_moments(counts, means, m2s):
    """Merge per-group moments into those of the union (Chan, Golub and LeVeque's formula).

    counts: (G,) values per channel in each group; means, m2s: (G, C) each group's per-channel mean
    and sum of squared deviations M2. Returns (count, mean (C,), m2 (C,)) of all values together.
    Groups with count 0 are allowed and change nothing. For two groups this is
    ``delta = mean_b - mean_a; mean = mean_a + delta * n_b / n; M2 = M2_a + M2_b + delta**2 * n_a * n_b / n``;
    for G groups, the same identity summed: ``M2 = sum M2_g + sum n_g (mean_g - mean)**2``.
    (Computed so, in one vectorized step, it rounds differently from G - 1 ``chan_merge`` calls.)
    """
    counts = torch.as_tensor(counts, dtype=means.dtype, device=means.device)
    if means.dim() != 2 or m2s.shape != means.shape or counts.shape != means.shape[:1]:
        raise ValueError(
            f"expected counts (G,), means and m2s (G, C); got {tuple(counts.shape)}, {tuple(means.shape)}, "
            f"{tuple(m2s.shape)}"
        )
    if (counts < 0).any():
        raise ValueError(f"counts must be >= 0, got {counts.tolist()}")
    total = counts.sum()
    if total <= 0:
        raise ValueError("all groups are empty: the union has no values")
    w = (counts / total).unsqueeze(1)  # (G, 1): each group's share of the values
    mean = (w * means).sum(0)  # (C,)
    m2 = m2s.sum(0) + (counts.unsqueeze(1) * (means - mean) ** 2).sum(0)  # within + between groups
    return total, mean, m2


def _worker(fn, rank, world_size, port, timeout, threads, results, args):
    """Body of one spawned process: join the group, run fn, report (rank, ok, payload)."""
    import torch.distributed as dist

    torch.set_num_threads(threads)  # several processes share few cores
    try:
        dist.init_process_group(
            "gloo",
            init_method=f"tcp://127.0.0.1:{port}",
            rank=rank,
            world_size=world_size,
            timeout=timedelta(seconds=timeout),  # the limit on every collective
        )
        out = fn(rank, world_size, *args)
        # Plain pickle to bytes: tensors travel by value, not through shared memory that would
        # vanish with this process.
        results.put((rank, True, pickle.dumps(out)))
    except BaseException:  # noqa: BLE001 - every failure goes back to the caller, with its traceback
        results.put((rank, False, traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _stop(procs):
    """Join every process briefly, then terminate, then kill what is left."""
    for p in procs:
        p.join(timeout=2)
    for p in procs:
        if p.is_alive():
            p.terminate()
            p.join(timeout=2)
        if p.is_alive():
            p.kill()
            p.join()


def launch(fn, world_size: int, *args, timeout: float = 120.0, threads: int = 1):
    """Run ``fn(rank, world_size, *args)`` in ``world_size`` gloo processes; return their results.

    Returns a list of each rank's return value (rank order). ``timeout`` (seconds) limits every
    collective and the whole launch; ``threads`` is each process's ``torch.set_num_threads``.
    Raises ``DistributedError`` with the traceback of the first rank that raised, or when a
    process dies without reporting or the deadline passes. No process is left running.
    """
    check_positive_int("world_size", world_size)
    if not callable(fn):
        raise ValueError(f"fn must be callable, got {fn!r}")
    if getattr(fn, "__module__", None) == "__main__" or "<locals>" in getattr(fn, "__qualname__", ""):
        raise ValueError(
            f"fn {getattr(fn, '__qualname__', fn)!r} must be importable (a module-level function in a module): "
            "spawned processes cannot find functions defined in a notebook or a script's __main__"
        )
    if not (isinstance(timeout, (int, float)) and timeout > 0):
        raise ValueError(f"timeout must be a positive number of seconds, got {timeout!r}")
    check_positive_int("threads", threads)
    context = mp.get_context("spawn")
    results = context.Queue()
    port = free_port()
    procs = [
        context.Process(
            target=_worker, args=(fn, rank, world_size, port, timeout, threads, results, args), daemon=True
        )
        for rank in range(world_size)
    ]
    deadline = time.monotonic() + timeout
    out = {}
    try:
        for p in procs:
            p.start()
        while len(out) < world_size:
            try:
                rank, ok, payload = results.get(timeout=0.2)
            except queue_module.Empty:
                dead = [r for r, p in enumerate(procs) if r not in out and p.exitcode is not None]
                if dead:
                    time.sleep(0.5)  # a report may still be in the pipe
                    if results.empty():
                        codes = {r: procs[r].exitcode for r in dead}
                        raise DistributedError(f"rank(s) {dead} exited without a result (exit codes {codes})") from None
                if time.monotonic() > deadline:
                    missing = [r for r in range(world_size) if r not in out]
                    raise DistributedError(
                        f"timed out after {timeout:g} s waiting for rank(s) {missing} of {world_size}"
                    ) from None
                continue
            if not ok:
                raise DistributedError(f"rank {rank} of {world_size} raised:\n{payload}")
            out[rank] = pickle.loads(payload)
    finally:
        _stop(procs)
        results.close()
        results.join_thread()
    return [out[r] for r in range(world_size)]

