"""What the benchmarks share, so that each script holds only its claim.

Side-by-side timing: every side runs once per round, in an order that flips each round, so a machine that slows
down mid-run slows every side alike; report medians over the rounds. Then the verdict against a target (PASS /
MISS), the model a benchmark runs (a checkpoint's with its held-out text, or seeded random weights), the machine
it ran on, and the JSON it leaves in bench/results/. Also the one error measure the kernel benchmarks print beside
their timings, the competing processes of the contention sections, and the machine's read bandwidth that decode
figures are held against.
"""

import argparse
import json
import statistics
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np
import torch

from corpus.splits import validation_tokens
from toymodel.checkpoint import read_meta, resolve_checkpoint
from toymodel.config import ModelConfig
from toymodel.export_hf import load_kvlab_model
from toymodel.model import Transformer
from tracking.machine import machine  # noqa: F401  (the benchmarks import it from here)


# ----------------------------------------------------------------------------------------- rounds and medians

def serving_parser(prog: str, doc: str) -> argparse.ArgumentParser:
    """The options every serving benchmark takes: how many requests, and how many alternating rounds."""
    parser = argparse.ArgumentParser(prog=prog, description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3, help="alternating rounds (median)")
    return parser


def alternate(rounds: int, sides: dict[str, Callable[[], object]]) -> dict[str, list]:
    """Call each side's function once per round, flipping the order every round; collect the results per side."""
    out: dict[str, list] = {name: [] for name in sides}
    for r in range(rounds):
        for name in list(sides) if r % 2 == 0 else reversed(list(sides)):
            out[name].append(sides[name]())
    return out


def medians(rows: list[dict], keys: Iterable[str] | None = None) -> dict[str, float]:
    """Key by key median of `rows` (one dict of numbers per round), over `keys` (default: the first row's)."""
    return {k: statistics.median(r[k] for r in rows) for k in (rows[0] if keys is None else keys)}


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    """max |x - ref| / max |ref|: one number per tensor, insensitive to the tensor's scale."""
    return ((x.float() - ref.float()).abs().max() / ref.float().abs().max()).item()


def verdict(value: float, target: float, *, at_most: bool = False, percent: bool = False) -> tuple[bool, str]:
    """Whether `value` meets `target` (value >= target, or value <= target with at_most), and the words the tables
    print after it: "target 0.9x: PASS", "target <= 1.2x: MISS", or with percent "target 70%: PASS"."""
    ok = value <= target if at_most else value >= target
    goal = f"{target:.0%}" if percent else f"{target:g}x"
    return ok, f"target {'<= ' if at_most else ''}{goal}: {'PASS' if ok else 'MISS'}"


# ------------------------------------------------------------------------------------- a busy machine, bandwidth

LOADS = (0, 1, 2)  # competing busy processes in the contention sections: idle, one, two


@contextmanager
def busy_processes(n: int) -> Iterator[None]:
    """`n` other processes, each spinning on one core (as `yes > /dev/null` does), while the block runs."""
    procs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(n)]
    try:
        time.sleep(0.3 if n else 0.0)  # let them start spinning
        yield
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()


def load_rounds(rounds: int, measure: Callable[[int], dict]) -> dict[int, list[dict]]:
    """measure(load) under each load of LOADS, once per round, the loads' order flipping every round."""
    out: dict[int, list[dict]] = {load: [] for load in LOADS}
    for r in range(rounds):
        for load in LOADS if r % 2 == 0 else LOADS[::-1]:
            with busy_processes(load):
                out[load].append(measure(load))
    return out


def read_bandwidth(megabytes: int = 256, repeats: int = 5) -> float:
    """Bytes per second at which this process reads memory with all its threads: the best of `repeats` sums of a
    buffer far larger than the caches. A decode step must read its weights and its KV cache once, so bytes per step
    / this is its floor."""
    x = torch.ones(megabytes * 2**20 // 4)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        x.sum()
        best = min(best, time.perf_counter() - start)
    return x.numel() * 4 / best


# -------------------------------------------------------------------------------------------- what runs where

def seeded_model(config: ModelConfig, seed: int = 0) -> Transformer:
    """A model of `config` with the random weights `seed` gives: every run of a benchmark times the same model."""
    torch.manual_seed(seed)
    return Transformer(config)


def load_model(ckpt: str | None, random_config: ModelConfig) -> tuple[Transformer, np.ndarray | None]:
    """The model a benchmark runs, in eval mode on the CPU (not packed for decode), and the held-out tokens.

    With a checkpoint (run or checkpoint folder): its weights, and the validation split of its run's data config.
    With ckpt None: seeded random weights of `random_config`, and no held-out text (None).
    """
    if ckpt is None:
        return seeded_model(random_config).eval(), None
    data = read_meta(resolve_checkpoint(ckpt)).get("run", {}).get("data")
    return load_kvlab_model(ckpt), validation_tokens(data)


def write_json(path: str | Path, report: dict) -> Path:
    """Write `report` (plain numbers, strings, lists and dicts) to `path` as indented JSON, making its folder if
    needed; say so, and return the path."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(f"wrote {out}")
    return out
