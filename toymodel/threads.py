"""How many threads a step runs on: whichever of one thread and all of them is faster right now, measured as the work
runs. Decode loops (serving/generate.py) and the training loop (training/loop.py) hand each step's time to a
ThreadGovernor, which sets torch's thread count (and so the C kernels', which are handed torch.get_num_threads()).

Why a policy, not a number. torch and kvlab's C kernels run each parallel piece of work as an OpenMP region: the
threads split it, and the region ends at a barrier where every thread waits for the slowest. A decode step of the
bench model is ~25 regions of 10-100 us each. On an idle 2-core machine, two threads decode 1.2-1.6x faster than
one. When another process keeps one core busy, the OS runs our second thread only now and then, for a time slice
of milliseconds, and every barrier waits for it: two threads fall to a fifth or a third of their idle speed, while
one thread, which never waits for anyone, keeps 0.7-0.9x (`python -m bench.decode --sections contention`). No
fixed count is right on both machines, and which one wins can change while a process runs, so the governor
measures:

    probe     run `probe_steps` steps on each candidate (one thread, and all), after one warm-up step each
    settle    keep the faster (lower mean seconds per step) for `period` steps
    re-probe  when the period ends (a load may have gone), or at once when `alarm` steps in a row take more than
              `slowdown` x the settled pace (a load has come). The pace is a moving average of settled steps, so a
              step that grows slowly (a growing KV cache) is not mistaken for a load. Each time the same count wins
              again, the period doubles (up to `max_period`): on a steady machine, probing costs less and less.

A probe costs the steps it spends on the loser, and on a busy machine all threads lose badly: a step that waits for
a thread the OS has put aside took 80 ms instead of 2 beside one busy process, often the first step after the
switch, when that thread must be woken. So the governor avoids probes it can tell will lose:

  - it tries all threads only when enough cores are free: other processes' CPU time since its last look (all CPUs'
    busy time in /proc/stat, the hypervisor's steal included, minus this process's own, every quarter second at
    most) must leave a core for each thread. The same look re-probes at once when a load comes while all threads
    run, and when the cores are free again after a probe skipped all threads for want of them: the step times of
    one thread cannot tell that the other process has gone. Off Linux it cannot look, and probes anyway;
  - the first probe tries one thread first (it never collapses); a probe at the end of a period tries the settled
    count first, after an alarm the other one first (the settled count has just proved slow);
  - the count tried second stops as soon as a step of it, its warm-up included, is `slowdown` x slower than the
    first count's mean.

Changing the count mid-generation changes no result: every kernel of a decode step splits its work over outputs,
never over a sum (toymodel/kernels/cpu_matmul.c, cache/kernels/cpu_decode.c; SDPA at one query per sequence does
not, which is why the caches hand decode steps to the C kernel). Training's products are torch's and may round
differently on one thread than on two; that is not a bug but a fact of float sums, as on every GPU.

Why not wait passively (OMP_WAIT_POLICY=passive, set before torch is imported)? Waiting threads then sleep at once
instead of spinning, which frees the core for the other process, but every region pays a wake-up. Measured on the
2-core development machine (bench model, batch 1, `full`): idle, two threads fell from 611 to 290 tokens/s; beside
one busy process they rose from 132 to 420, still below one spinning thread's 496. The governor gets both.
"""

import os
import time
from contextlib import contextmanager
from statistics import fmean
from typing import Callable, Iterator

import torch


class OtherCores:
    """Cores that other processes kept busy, from /proc/stat: all CPUs' busy time (user, nice, system, irq, softirq
    and the hypervisor's steal) minus this process's CPU time, over the wall time since the last look. A look comes
    at most every `min_seconds` (at 100 ticks a second, shorter windows are noise); between looks a call returns the
    last estimate. None when it cannot tell: no /proc/stat (not Linux), or no window measured yet."""

    def __init__(self, min_seconds: float = 0.25):
        self.min_seconds, self.tick = min_seconds, os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
        self.last, self.value = self._read(), None

    def _read(self) -> tuple[float, float, float] | None:
        try:
            with open("/proc/stat") as f:
                cpu = [int(x) for x in f.readline().split()[1:9]]  # the "cpu" line: jiffies summed over all CPUs
        except (OSError, ValueError):
            return None
        user, nice, system, idle, iowait, irq, softirq, steal = cpu
        busy = (user + nice + system + irq + softirq + steal) / self.tick
        return busy, time.process_time(), time.monotonic()

    def __call__(self) -> float | None:
        if self.last is None or time.monotonic() - self.last[2] < self.min_seconds:
            return self.value
        now = self._read()
        if now is None:
            return self.value
        (busy, ours, wall), (busy0, ours0, wall0) = now, self.last
        self.last, self.value = now, max(0.0, (busy - busy0 - (ours - ours0)) / (wall - wall0))
        return self.value


class ThreadGovernor:
    """Picks torch's thread count for the next step from the times of the steps before it.

    Use: `with governor.step(): work()`, or set `governor.threads` yourself, run a step, and `governor.record(its
    seconds)`: record applies the next step's count. The choice reads only the seconds it is given and what
    `other_cores` says, so tests drive it with made-up timings and loads.

    Args:
        max_threads: the "all threads" candidate (default: torch.get_num_threads() when the governor is made).
        probe_steps: timed steps per candidate in a probe (after one untimed warm-up step each).
        period, max_period: settled steps before the next probe; doubles while the same count keeps winning.
        slowdown, alarm: re-probe at once after `alarm` steps in a row slower than `slowdown` x the settled pace.
        set_threads: what applies a count (torch.set_num_threads).
        other_cores: cores other processes used since its last call, None when unknown (default: OtherCores()).
        cores: the machine's cores (default: os.cpu_count()).
    """

    def __init__(self, max_threads: int | None = None, probe_steps: int = 2, period: int = 32,
                 max_period: int = 1024, slowdown: float = 1.5, alarm: int = 3,
                 set_threads: Callable[[int], None] = torch.set_num_threads,
                 other_cores: Callable[[], float | None] | None = None, cores: int | None = None):
        max_threads = torch.get_num_threads() if max_threads is None else max_threads
        if max_threads < 1 or probe_steps < 1 or not 1 <= period <= max_period or slowdown <= 1 or alarm < 1:
            raise ValueError(f"ThreadGovernor needs max_threads >= 1, probe_steps >= 1, 1 <= period <= max_period, "
                             f"slowdown > 1 and alarm >= 1; got {max_threads}, {probe_steps}, {period}, "
                             f"{max_period}, {slowdown}, {alarm}")
        self.candidates = [1, max_threads] if max_threads > 1 else [1]  # one thread first: it never collapses
        self.probe_steps, self.base_period, self.max_period = probe_steps, period, max_period
        self.slowdown, self.alarm, self.set_threads = slowdown, alarm, set_threads
        self.other_cores = OtherCores() if other_cores is None else other_cores
        self.cores = cores or os.cpu_count() or max_threads
        self.period = period
        self.choice: int | None = None  # the settled count; None until the first probe ends
        self.pace = 0.0  # moving average of settled step seconds
        self.probes = 0  # probes started, for reports
        self._plan: list[int] = []  # counts of the probe steps still to run, the next one first
        self._times: dict[int, list[float]] = {}  # per count probed: its warm-up step, then its timed steps
        self._left = self._slow = 0
        self._no_room = False  # the last probe skipped all threads: other processes held the cores
        self._start_probe(self.candidates)

    @property
    def threads(self) -> int:
        """The count the next step runs on."""
        return self._plan[0] if self._plan else self.choice

    @contextmanager
    def step(self) -> Iterator[None]:
        """Run the enclosed step on `self.threads`, time it and record it. Work outside steps (a prefill, an
        evaluation) runs on whatever count the last step left."""
        self.set_threads(self.threads)
        start = time.perf_counter()
        yield
        self.record(time.perf_counter() - start)

    def record(self, seconds: float) -> None:
        """Take the time of the step just run on `self.threads`, and apply the count for the next one."""
        if self._plan:
            self._record_probe(seconds)
        else:
            self._slow = self._slow + 1 if seconds > self.slowdown * self.pace else 0
            self.pace += 0.1 * (seconds - self.pace)
            self._left -= 1
            others = [n for n in self.candidates if n != self.choice]
            if self._slow >= self.alarm or self._room_changed():  # the machine changed: the other count first
                self.period = self.base_period
                self._start_probe(others + [self.choice])
            elif self._left == 0:
                self._start_probe([self.choice] + others)
        self.set_threads(self.threads)

    def _room_changed(self) -> bool:
        """Other processes now leave too few cores for all threads while we run them, or leave enough again after a
        probe skipped them for want of room."""
        busy = self.other_cores()
        if busy is None:
            return False
        room = round(self.cores - busy) >= self.candidates[-1]
        return (self.choice == self.candidates[-1] and not room) or (self._no_room and room)

    def _start_probe(self, order: list[int]) -> None:
        """Queue a warm-up step plus probe_steps timed steps for each count of `order`, in that order."""
        self._plan = [n for n in order for _ in range(self.probe_steps + 1)]
        self._times, self._no_room = {}, False
        self.probes += 1
        self._skip_without_room()

    def _skip_without_room(self) -> None:
        """Before the first step of a count of several threads: drop its steps when other processes leave fewer
        free cores than it has threads, unless no other count is left to measure."""
        n = self._plan[0]
        if n == 1 or n in self._times:
            return
        busy = self.other_cores()
        rest = [m for m in self._plan if m != n]
        if busy is not None and n > round(self.cores - busy) and (rest or self._times):
            self._plan, self._no_room = rest, True

    def _record_probe(self, seconds: float) -> None:
        n = self._plan.pop(0)
        times = self._times.setdefault(n, [])
        times.append(seconds)
        first = next(iter(self._times))
        if n != first and seconds > self.slowdown * fmean(self._times[first][1:]):  # far slower already: stop
            self._plan = [m for m in self._plan if m != n]
            if len(times) == 1:  # it lost in its warm-up and has no timed step: it is out of this choice
                del self._times[n]
        if self._plan:
            self._skip_without_room()
        if not self._plan:
            self._settle()

    def _settle(self) -> None:
        means = {n: fmean(t[1:]) for n, t in self._times.items()}  # t[0]: the warm-up step after a switch
        best = min(means, key=means.get)
        self.period = min(2 * self.period, self.max_period) if best == self.choice else self.base_period
        self.choice, self.pace, self._left, self._slow = best, means[best], self.period, 0


@contextmanager
def governed_step(governor: ThreadGovernor | None) -> Iterator[None]:
    """`with governed_step(governor):` around a step: governor.step() when there is a governor, nothing otherwise."""
    if governor is None:
        yield
        return
    with governor.step():
        yield


def thread_policy(threads: int, device: torch.device) -> ThreadGovernor | None:
    """What `threads=` means to train.py and infer.py: 0 (the default) lets a ThreadGovernor choose per step on a CPU
    (on a GPU the host threads only launch kernels: no governor); n > 0 pins torch to n threads. Returns the
    governor, or None when the count is fixed."""
    if threads > 0:
        torch.set_num_threads(threads)
        return None
    return ThreadGovernor() if device.type == "cpu" else None
