"""Windows of token ids cut from a split: random ones to train on, evenly spaced ones to evaluate on.

The batches are (x, y) pairs of int64 (B, T) tensors, y shifted one token ahead of x: the model reads x and is scored
on predicting y. Perplexity through a cache takes the evenly spaced windows whole, (B, T+1), and feeds them one token
at a time. The random starts come from a torch.Generator alone, so the same generator state gives the same batch
(that is what makes resuming a run exact).
"""

from typing import Iterator

import numpy as np
import torch


def sample_batch(
    tokens: np.ndarray, batch_size: int, block_size: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random training windows: x = tokens[i : i+T], y = tokens[i+1 : i+T+1] for B random starts i.

    The starts come from `generator` alone, so the same generator state gives the same batch (exact resume).

    Returns:
        x, y: int64 tensors of shape (B, T), y shifted one token ahead of x.
    """
    _check_windows(tokens, batch_size, block_size)
    starts = torch.randint(len(tokens) - block_size, (batch_size,), generator=generator)  # (B,)
    windows = np.stack([tokens[i : i + block_size + 1] for i in starts.tolist()])  # (B, T+1)
    windows = torch.from_numpy(windows.astype(np.int64))
    return windows[:, :-1], windows[:, 1:]  # (B, T), (B, T)


def eval_batches(
    tokens: np.ndarray, batch_size: int, block_size: int, max_batches: int
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Deterministic validation windows, evenly spaced from the start to the end of the split.

    Uses as many windows as fit without overlap ((N-1) // T), capped at `max_batches * batch_size`, and
    yields them in batches of `batch_size` (the last may be smaller). Same inputs, same batches.

    Yields:
        x, y: int64 tensors of shape (b, T) with b <= B, y shifted one token ahead of x.
    """
    _check_windows(tokens, batch_size, block_size)
    if max_batches < 1:
        raise ValueError(f"max_batches={max_batches} must be at least 1.")
    n_windows = min((len(tokens) - 1) // block_size, max_batches * batch_size)
    windows = evenly_spaced_windows(tokens, n_windows, block_size)  # (n, T+1)
    for b in range(0, n_windows, batch_size):
        yield windows[b : b + batch_size, :-1], windows[b : b + batch_size, 1:]  # (b, T), (b, T)


def evenly_spaced_windows(tokens: np.ndarray, n_windows: int, length: int, name: str = "length") -> torch.Tensor:
    """`n_windows` windows of `length` + 1 tokens, the first at the start of the split, the last at its end, the
    others evenly spaced between (overlapping when they do not fit side by side). Same inputs, same windows.

    `name` is how the caller's user sets `length` (e.g. "ppl.length"), so that the error names the right knob.

    Returns:
        int64 tensor of shape (B, T+1), B = n_windows, T = length: row b is tokens[s_b : s_b + T + 1].

    Raises:
        ValueError: n_windows or length below 1, or a split shorter than length + 1 tokens.
    """
    if n_windows < 1:
        raise ValueError(f"n_windows={n_windows} must be at least 1.")
    _check_length(tokens, length, name)
    starts = np.linspace(0, len(tokens) - length - 1, n_windows).round().astype(np.int64)  # (B,)
    windows = np.stack([tokens[s : s + length + 1] for s in starts])  # (B, T+1)
    return torch.from_numpy(windows.astype(np.int64))


def _check_windows(tokens: np.ndarray, batch_size: int, block_size: int) -> None:
    """Raise ValueError unless a (batch_size, block_size) window batch can be cut from `tokens`."""
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be at least 1.")
    _check_length(tokens, block_size, "block_size")


def _check_length(tokens: np.ndarray, length: int, name: str) -> None:
    """Raise ValueError unless a window of `length` + 1 tokens (length >= 1) fits in `tokens`."""
    if length < 1:
        raise ValueError(f"{name}={length} must be at least 1.")
    if len(tokens) < length + 1:
        raise ValueError(f"the split has {len(tokens)} tokens, too few for {name}={length} (needs at least "
                         f"{length + 1}); use {name}<={len(tokens) - 1} or more text.")
