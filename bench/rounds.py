"""Side-by-side timing shared by the benchmarks: every side runs once per round, in an order that flips each round,
so a machine that slows down mid-run slows every side alike; report medians over the rounds."""


def alternate(rounds: int, sides: dict) -> dict[str, list]:
    """Call each side's function once per round, flipping the order every round; collect the results per side."""
    out: dict[str, list] = {name: [] for name in sides}
    for r in range(rounds):
        for name in list(sides) if r % 2 == 0 else reversed(list(sides)):
            out[name].append(sides[name]())
    return out
