"""Checks exercises/l7_admit.py against the engine's own scheduler (serving/scheduler.py) on random queues: the
same waiting and running sequences, the same pool, and how many it admits."""

import random
from collections import deque
from types import SimpleNamespace

from conftest import load
from serving.scheduler import Scheduler

admitted = load("l7_admit").admitted


def scheduler_admits(waiting: list[int], running: list[int], free: int, bt: int, heads: int, max_batch: int,
                     max_prefill: int) -> int:
    """What Scheduler.admit does with sequences of those token counts over a pool with `free` free blocks."""
    pool = SimpleNamespace(n_free=free, n_blocks=10**6, block_tokens=bt)
    scheduler = Scheduler(pool, heads, 1, max_batch, max_prefill)
    scheduler.waiting = deque(SimpleNamespace(n_tokens=n, status=None) for n in waiting)
    scheduler.running = [SimpleNamespace(n_tokens=n, status=None, next_blocks=heads * ((n - 1) % bt == 0))
                         for n in running]  # the engine counts next_blocks in its cache: here, uncompressed
    return len(scheduler.admit())


def test_you_admit_what_the_scheduler_admits():
    rng = random.Random(0)
    for case in range(300):
        bt, heads = rng.choice([1, 4, 16]), rng.choice([1, 2, 6])
        waiting = [rng.randint(1, 60) for _ in range(rng.randint(0, 6))]
        running = [rng.randint(2, 60) for _ in range(rng.randint(0, 5))]
        args = (waiting, running, rng.randint(0, 80), bt, heads, rng.randint(1, 8), rng.choice([8, 40, 200]))
        want, got = scheduler_admits(*args), admitted(*args)
        assert got == want, (f"waiting {waiting}, running {running}, {args[2]} free blocks of {bt} tokens, "
                             f"{heads} tables a sequence, max_batch {args[5]}, max_prefill_tokens {args[6]}: "
                             f"the scheduler admits {want}, you admit {got}")


def test_the_edges():
    assert admitted([50], [], 100, 16, 1, 4, 10) == 1, "the first admitted may exceed max_prefill_tokens"
    assert admitted([16], [], 1, 16, 1, 4, 100) == 0, ("16 tokens and the first decode step's token need 2 "
                                                       "blocks of 16: one free block is not enough")
    assert admitted([4, 4], [17], 2, 16, 1, 8, 100) == 1, ("the running sequence stores 16 tokens, so its next "
                                                           "step takes a block: with the first waiting one's "
                                                           "block that is 2 of 2 free, no room for a second")
    assert admitted([1, 1, 1], [5, 5], 100, 16, 1, 3, 100) == 1, "max_batch counts the running sequences too"
