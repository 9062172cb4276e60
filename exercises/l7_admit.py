"""Lesson 7, exercise: the scheduler's admission rule (about 20 minutes).

Each step the serving engine's scheduler admits waiting sequences, oldest first, while three things hold: the
running batch has room (at most `max_batch` sequences), the admitted prompts fit the step's token budget
(`max_prefill_tokens`; the first admitted always does), and the blocks the admitted prompts need, plus the blocks
the next decode step of everyone needs, fit the free blocks. Write that rule (the Scheduler's own, with no
headroom: the engine's headroom then keeps the running batch's next steps of growth free too). Read "Counting in
blocks" in docs/07_serving.md first, then fill in `admitted` and run `pytest exercises/test_l7_admit.py`.
"""


def admitted(waiting: list[int], running: list[int], free_blocks: int, block_tokens: int, heads: int,
             max_batch: int, max_prefill_tokens: int) -> int:
    """How many of the waiting sequences the scheduler admits now (they are admitted in order, oldest first).

    Args:
        waiting: each waiting sequence's tokens (its prompt, and after a preemption its output so far), oldest
            first. Admitted, a sequence of n tokens stores n at its prefill and one more at its first decode step.
        running: each running sequence's tokens; it stores all but the last (sampled, stored by the next step).
        free_blocks: the pool's free blocks.
        block_tokens: tokens per block.
        heads: block tables per sequence (n_layer * n_kv_head): a sequence storing t tokens holds
            heads * ceil(t / block_tokens) blocks.
        max_batch: the most sequences running at once, the admitted ones included.
        max_prefill_tokens: the most prompt tokens admitted in one step (the first admitted may exceed it).

    Returns:
        The number admitted, from 0 to len(waiting).
    """
    raise NotImplementedError("write admitted(): count the next decode step's blocks, then admit while all fits")
