"""Windows of token ids cut from a split: random ones to train on, evenly spaced ones to evaluate on.

Both return (x, y) pairs of int64 (B, T) tensors, y shifted one token ahead of x: the model reads x and is scored on
predicting y. The random starts come from a torch.Generator alone, so the same generator state gives the same batch
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
    starts = np.linspace(0, len(tokens) - block_size - 1, n_windows).round().astype(np.int64)  # (n,)
    for b in range(0, n_windows, batch_size):
        windows = np.stack([tokens[i : i + block_size + 1] for i in starts[b : b + batch_size]])
        windows = torch.from_numpy(windows.astype(np.int64))  # (b, T+1)
        yield windows[:, :-1], windows[:, 1:]


def _check_windows(tokens: np.ndarray, batch_size: int, block_size: int) -> None:
    """Raise ValueError unless a (batch_size, block_size) window batch can be cut from `tokens`."""
    if batch_size < 1 or block_size < 1:
        raise ValueError(f"batch_size={batch_size} and block_size={block_size} must both be at least 1.")
    if len(tokens) < block_size + 1:
        raise ValueError(f"the split has {len(tokens)} tokens, too few for block_size={block_size} (needs at "
                         f"least {block_size + 1}); use a smaller block_size or more text.")
