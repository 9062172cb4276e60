"""Side-by-side timing shared by the benchmarks: every side runs once per round, in an order that flips each round,
so a machine that slows down mid-run slows every side alike; report medians over the rounds. Also the one error
measure the kernel benchmarks print beside their timings."""

import torch


def alternate(rounds: int, sides: dict) -> dict[str, list]:
    """Call each side's function once per round, flipping the order every round; collect the results per side."""
    out: dict[str, list] = {name: [] for name in sides}
    for r in range(rounds):
        for name in list(sides) if r % 2 == 0 else reversed(list(sides)):
            out[name].append(sides[name]())
    return out


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    """max |x - ref| / max |ref|: one number per tensor, insensitive to the tensor's scale."""
    return ((x.float() - ref.float()).abs().max() / ref.float().abs().max()).item()
