"""Lesson 5, exercise: how many bytes a decode step must read (about 20 minutes).

A decode step multiplies one row per sequence by every weight, and attends over every cached key and value: at
batch 1 it is bound by memory, so its time is about these bytes over the machine's read bandwidth (what
`python -m bench.decode` calls the floor). Count them from the model's shape alone. Read "Why a decode step takes
the time it does" in docs/05_inference.md first, then fill in `step_bytes` and run
`pytest exercises/test_l5_step_bytes.py`.
"""

from toymodel.config import ModelConfig


def step_bytes(config: ModelConfig, batch: int, tokens: int, bits_per_element: float) -> int:
    """Bytes one decode step reads: every float32 weight of the model once (the token embedding and the output head
    are one shared matrix), plus the K and V of `tokens` cached tokens of each of `batch` sequences, in every layer
    and KV head, at `bits_per_element` (32 for a float32 cache; 5 for int4 with a float16 scale and zero per 32
    channels). Look at toymodel/model.py for every matrix and gain vector; round the cache's bytes down."""
    raise NotImplementedError("write step_bytes(): the weights (count them per layer), then the K and V cached")
