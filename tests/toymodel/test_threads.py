"""The thread policy (toymodel/threads.py) on made-up step timings and loads: it probes both counts (one thread
first), keeps the faster, cuts a challenger that is far slower (in its warm-up too), backs off while the same count
keeps winning, re-probes when its period ends or when steps suddenly slow down (the other count first), ignores a
slow growth of the step time, and does not try all threads while other processes hold the cores. Nothing here
times real work."""

import pytest

import torch

from toymodel.threads import OtherCores, ThreadGovernor, thread_policy


def governor(**kwargs) -> tuple[ThreadGovernor, list[int]]:
    """A governor of 1 or 2 threads on a 2-core machine whose load is unknown (unless other_cores says)."""
    applied = []
    defaults = {"max_threads": 2, "cores": 2, "set_threads": applied.append, "other_cores": lambda: None}
    return ThreadGovernor(**{**defaults, **kwargs}), applied


def run(gov: ThreadGovernor, seconds_on: dict[int, float], steps: int) -> list[int]:
    """Feed `steps` steps whose time depends on the count they ran on; return the counts used."""
    used = []
    for _ in range(steps):
        used.append(gov.threads)
        gov.record(seconds_on[gov.threads])
    return used


def test_it_probes_both_counts_then_keeps_the_faster():
    gov, applied = governor(probe_steps=3, period=8)
    used = run(gov, {2: 1.0, 1: 1.4}, 8)
    assert used == [1, 1, 1, 1, 2, 2, 2, 2]  # a warm-up and three timed steps each, one thread first
    assert gov.choice == 2 and gov.threads == 2 and applied[-1] == 2
    gov, _ = governor(probe_steps=3, period=8)
    used = run(gov, {2: 5.0, 1: 1.4}, 5)  # a busy machine: two threads wait at every barrier
    assert used == [1, 1, 1, 1, 2] and gov.choice == 1  # two threads are cut after their (slow) warm-up step


def test_a_challenger_that_stalls_in_its_warm_up_is_cut_at_once():
    gov, _ = governor(probe_steps=3)
    for seconds in (1.2, 1.2, 1.2, 1.2, 80.0):  # one thread, then a woken thread that waited for a core
        gov.record(seconds)
    assert gov.choice == 1 and gov.threads == 1


def test_all_threads_are_not_tried_while_other_processes_hold_the_cores():
    load = [1.0]  # cores other processes used since the governor last looked
    gov, applied = governor(probe_steps=2, period=64, other_cores=lambda: load[0])
    used = run(gov, {1: 1.5, 2: 1.0}, 3 + 20)
    assert used == [1] * 23 and 2 not in applied  # no room for a second thread: never switched to it
    load[0] = 0.1  # the other process is gone: one thread's steps cannot show it, the next look does
    used = run(gov, {1: 1.5, 2: 1.0}, 1 + 3 + 3)
    assert used == [1] + [2] * 3 + [1] * 3 and gov.choice == 2


def test_a_load_that_comes_while_all_threads_run_moves_to_one_at_the_next_look():
    load = [0.0]
    gov, applied = governor(probe_steps=2, period=64, other_cores=lambda: load[0])
    run(gov, {1: 1.5, 2: 1.0}, 6)
    assert gov.choice == 2
    load[0] = 1.0
    used = run(gov, {1: 1.5, 2: 1.0}, 1 + 3 + 5)  # the step times have not changed (yet): the look decides
    assert used == [2] + [1] * 8 and gov.choice == 1


def test_the_warm_up_step_after_a_switch_is_not_counted():
    gov, _ = governor(probe_steps=2)
    for seconds in (9.0, 1.2, 1.2, 1.5, 1.0, 1.0):  # each candidate's first step is slower: waking threads up
        gov.record(seconds)
    assert gov.choice == 2


def test_it_reprobes_when_the_period_ends_and_backs_off_while_the_winner_stays():
    gov, _ = governor(probe_steps=1, period=4, max_period=16)
    seen_periods = []
    for _ in range(5):
        run(gov, {2: 1.0, 1: 2.0}, 4)  # one probe: warm-up + 1 step on each count
        seen_periods.append(gov.period)
        run(gov, {2: 1.0, 1: 2.0}, gov.period)
    assert seen_periods == [4, 8, 16, 16, 16]
    assert gov.probes == 6  # the fifth period's end has started the sixth probe


def test_a_sudden_slowdown_reprobes_at_once_and_switches():
    gov, _ = governor(probe_steps=2, period=64, alarm=3)
    run(gov, {2: 1.0, 1: 1.4}, 6)
    assert gov.choice == 2
    probes = gov.probes
    busy = {2: 5.0, 1: 1.5}  # another process takes a core
    used = run(gov, busy, 3)
    assert used == [2, 2, 2] and gov.probes == probes + 1  # the third slow step in a row starts a probe
    used = run(gov, busy, 4)
    assert used == [1, 1, 1, 2]  # one thread first now, then two, cut after their slow warm-up
    assert gov.choice == 1 and gov.period == 64


def test_the_settled_count_goes_first_when_a_period_ends():
    gov, _ = governor(probe_steps=2, period=4)
    run(gov, {2: 1.0, 1: 1.4}, 6)
    used = run(gov, {2: 1.0, 1: 1.4}, 4 + 6)
    assert used == [2] * 4 + [2, 2, 2, 1, 1, 1]  # the period on two threads, then a probe that starts with them


def test_a_slowly_growing_step_is_not_a_load():
    gov, _ = governor(probe_steps=2, period=1024, max_period=1024)
    run(gov, {2: 1.0, 1: 1.4}, 6)
    probes = gov.probes
    seconds = 1.0
    for _ in range(500):  # a KV cache that grows: each step 0.2% slower than the last (2.7x over the run)
        seconds *= 1.002
        gov.record(seconds)
    assert gov.probes == probes and gov.choice == 2


def test_one_thread_is_all_there_is_to_choose():
    gov, applied = governor(max_threads=1)
    run(gov, {1: 1.0}, 20)
    assert set(applied) == {1} and gov.choice == 1


@pytest.mark.parametrize("kwargs", [{"max_threads": 0}, {"probe_steps": 0}, {"period": 0}, {"period": 8, "max_period": 4},
                                    {"slowdown": 1.0}, {"alarm": 0}])
def test_bad_settings_are_named(kwargs):
    with pytest.raises(ValueError, match="ThreadGovernor needs"):
        governor(**kwargs)


def test_step_times_the_enclosed_work():
    gov, _ = governor(probe_steps=1)
    for _ in range(2):  # the warm-up and the timed step on one thread
        with gov.step():
            pass
    assert gov.threads == 2


def test_threads_zero_means_the_governor_on_a_cpu_and_n_pins_n():
    before = torch.get_num_threads()
    try:
        assert thread_policy(1, torch.device("cpu")) is None and torch.get_num_threads() == 1
        assert isinstance(thread_policy(0, torch.device("cpu")), ThreadGovernor)
        assert thread_policy(0, torch.device("cuda")) is None  # host threads only launch GPU kernels
    finally:
        torch.set_num_threads(before)


def test_other_cores_waits_for_a_window_and_never_goes_negative():
    meter = OtherCores(min_seconds=3600.0)
    assert meter() is None  # no window measured yet: unknown, so the governor probes as off Linux
    meter = OtherCores(min_seconds=0.0)
    value = meter()
    assert value is None or value >= 0.0  # None where there is no /proc/stat
