"""How many threads a step runs on: whichever of one thread and all of them is faster right now, measured as the work
runs. Decode loops (serving/generate.py) and the training loop (training/loop.py) hand each step's time to a
ThreadGovernor, which sets torch's thread count (and so the C kernels', which are handed torch.get_num_threads()).

Why a policy, not a number. torch and kvlab's C kernels run each parallel piece of work as an OpenMP region: the
threads split it, and the region ends at a barrier where every thread waits for the slowest. A decode step of the
bench model is ~25 regions of 10-100 us each. On an idle 2-core machine, two threads decode ~1.4x faster than one.
When another process keeps one core busy, the OS runs our second thread only now and then, for a time slice of a
few milliseconds, and every barrier waits for it: two threads fall to a fifth of their idle speed, while one
thread, which never waits for anyone, keeps ~0.7x (`python -m bench.decode --sections contention`). No fixed count
is right on both machines, and which one wins can change while a process runs, so the governor measures:

    probe     run `probe_steps` steps on each candidate (all threads, and one), after one warm-up step each
    settle    keep the faster (lower mean seconds per step) for `period` steps
    re-probe  when the period ends (a load may have gone), or at once when `alarm` steps in a row take more than
              `slowdown` x the settled pace (a load has come). The pace is a moving average of settled steps, so a
              step that grows slowly (a growing KV cache) is not mistaken for a load. Each time the same count wins
              again, the period doubles (up to `max_period`): on a steady machine, probing costs less and less.

Changing the count mid-generation changes no result: every kernel of a decode step splits its work over outputs,
never over a sum (toymodel/kernels/cpu_matmul.c, cache/kernels/cpu_decode.c; SDPA at one query per sequence does
not, which is why the caches hand decode steps to the C kernel). Training's products are torch's and may round
differently on one thread than on two; that is not a bug but a fact of float sums, as on every GPU.

Why not wait passively (OMP_WAIT_POLICY=passive, set before torch is imported)? Waiting threads then sleep at once
instead of spinning, which frees the core for the other process, but every region pays a wake-up. Measured on the
2-core development machine (bench model, batch 1, `full`): idle, two threads fell from 611 to 290 tokens/s; beside
one busy process they rose from 132 to 420, still below one spinning thread's 496. The governor gets both.
"""

import time
from contextlib import contextmanager
from statistics import fmean
from typing import Callable, Iterator

import torch


class ThreadGovernor:
    """Picks torch's thread count for the next step from the times of the steps before it.

    Use: `with governor.step(): work()`, or `governor.record(seconds)` after each step run on `governor.threads`.
    The choice logic reads only the seconds it is given, so tests drive it with made-up timings.

    Args:
        max_threads: the "all threads" candidate (default: torch.get_num_threads() when the governor is made).
        probe_steps: timed steps per candidate in a probe (after one untimed warm-up step each).
        period, max_period: settled steps before the next probe; doubles while the same count keeps winning.
        slowdown, alarm: re-probe at once after `alarm` steps in a row slower than `slowdown` x the settled pace.
        set_threads: what applies a count (torch.set_num_threads).
    """

    def __init__(self, max_threads: int | None = None, probe_steps: int = 3, period: int = 32,
                 max_period: int = 1024, slowdown: float = 1.5, alarm: int = 3,
                 set_threads: Callable[[int], None] = torch.set_num_threads):
        max_threads = torch.get_num_threads() if max_threads is None else max_threads
        if max_threads < 1 or probe_steps < 1 or not 1 <= period <= max_period or slowdown <= 1 or alarm < 1:
            raise ValueError(f"ThreadGovernor needs max_threads >= 1, probe_steps >= 1, 1 <= period <= max_period, "
                             f"slowdown > 1 and alarm >= 1; got {max_threads}, {probe_steps}, {period}, "
                             f"{max_period}, {slowdown}, {alarm}")
        self.candidates = [max_threads, 1] if max_threads > 1 else [1]
        self.probe_steps, self.base_period, self.max_period = probe_steps, period, max_period
        self.slowdown, self.alarm, self.set_threads = slowdown, alarm, set_threads
        self.period = period
        self.choice: int | None = None  # the settled count; None until the first probe ends
        self.pace = 0.0  # moving average of settled step seconds
        self.probes = 0  # probes started, for reports
        self._plan: list[int] = []  # counts of the probe steps still to run, the next one first
        self._times: dict[int, list[float]] = {}
        self._left = self._slow = 0
        self._start_probe()

    @property
    def threads(self) -> int:
        """The count the next step runs on (already applied)."""
        return self._plan[0] if self._plan else self.choice

    @contextmanager
    def step(self) -> Iterator[None]:
        """Time the enclosed step and record it."""
        start = time.perf_counter()
        yield
        self.record(time.perf_counter() - start)

    def record(self, seconds: float) -> None:
        """Take the time of the step just run on `self.threads`, and apply the count for the next one."""
        if self._plan:
            self._times.setdefault(self._plan.pop(0), []).append(seconds)
            if not self._plan:
                self._settle()
        else:
            self._slow = self._slow + 1 if seconds > self.slowdown * self.pace else 0
            self.pace += 0.1 * (seconds - self.pace)
            self._left -= 1
            if self._slow >= self.alarm:
                self.period = self.base_period  # the machine changed: look again soon after this probe too
                self._start_probe()
            elif self._left == 0:
                self._start_probe()
        self.set_threads(self.threads)

    def _start_probe(self) -> None:
        """Queue a warm-up plus probe_steps steps per candidate, alternating which candidate goes first."""
        order = self.candidates if self.probes % 2 == 0 else self.candidates[::-1]
        self._plan = [n for n in order for _ in range(self.probe_steps + 1)]
        self._times = {}
        self.probes += 1
        self.set_threads(self.threads)

    def _settle(self) -> None:
        means = {n: fmean(t[1:]) for n, t in self._times.items()}  # t[0]: the warm-up step after a switch
        best = min(means, key=means.get)
        self.period = min(2 * self.period, self.max_period) if best == self.choice else self.base_period
        self.choice, self.pace, self._left, self._slow = best, means[best], self.period, 0


def thread_policy(threads: int, device: torch.device) -> ThreadGovernor | None:
    """What `threads=` means to train.py and infer.py: 0 (the default) lets a ThreadGovernor choose per step on a CPU
    (on a GPU the host threads only launch kernels: no governor); n > 0 pins torch to n threads. Returns the
    governor, or None when the count is fixed."""
    if threads > 0:
        torch.set_num_threads(threads)
        return None
    return ThreadGovernor() if device.type == "cpu" else None
