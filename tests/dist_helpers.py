"""Two-process gloo groups for the distributed tests (``test_sync_batchnorm``, ``test_train_ddp``)."""

from __future__ import annotations

import datetime
import gc
import os
import socket
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

WORLD = 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank: int, port: int, fn, args: tuple, errors, group_timeout: float) -> None:
    # What torchrun gives each process; the group is started here once so that one process can run several
    # scenarios (mnet_ext.train uses a group it finds and leaves it alone).
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(WORLD), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)  # OpenMP spinning on a loaded 2-core machine (see tests/test_train.py)
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=group_timeout))
    try:
        fn(rank, *args)
    except BaseException as exc:  # report any failure to the parent test
        errors.put(f"rank {rank}: {type(exc).__name__}: {exc}")
        raise
    finally:
        # A process group still held by a garbage cycle is torn down at interpreter exit, where gloo can abort the
        # process ("terminate called without an active exception") after the scenario passed: collect it first.
        # (fuse's own cycles are gone, test_fused_model_is_freed_by_reference_counting; this guards the rest.)
        gc.collect()
        dist.destroy_process_group()


def spawn(fn, *args, timeout: float = 120) -> None:
    """Run ``fn(rank, *args)`` (a module-level function) on WORLD spawned gloo ranks; fail, and end them, if any
    raises or still runs after ``timeout`` seconds."""
    ctx = mp.get_context("spawn")
    errors = ctx.Queue()
    port = _free_port()
    # The group's own timeout is longer than the deadline, so a collective left waiting shows up as a hang here.
    procs = [ctx.Process(target=_rank_main, args=(r, port, fn, args, errors, 2 * timeout)) for r in range(WORLD)]
    for p in procs:
        p.start()
    deadline = time.monotonic() + timeout
    for p in procs:
        p.join(timeout=max(0.0, deadline - time.monotonic()))
    hung = [r for r, p in enumerate(procs) if p.is_alive()]
    for r in hung:
        procs[r].kill()
        procs[r].join()
    messages = [errors.get() for _ in range(errors.qsize())] if not errors.empty() else []
    assert not hung, f"ranks {hung} still running after {timeout} s (a collective left waiting?); {messages}"
    assert not messages and all(p.exitcode == 0 for p in procs), messages or [p.exitcode for p in procs]
