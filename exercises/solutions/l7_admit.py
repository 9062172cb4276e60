"""Lesson 7, exercise: the scheduler's admission rule. The reference solution."""


def admitted(waiting: list[int], running: list[int], free_blocks: int, block_tokens: int, heads: int,
             max_batch: int, max_prefill_tokens: int) -> int:
    """See exercises/l7_admit.py."""
    blocks = lambda tokens: heads * -(-tokens // block_tokens)  # noqa: E731  blocks for `tokens` stored tokens
    need = heads * sum((n - 1) % block_tokens == 0 for n in running)  # the next decode step: full blocks grow
    tokens, count = 0, 0
    for n in waiting:
        if len(running) + count >= max_batch:
            break
        if (count and tokens + n > max_prefill_tokens) or need + blocks(n + 1) > free_blocks:
            break
        tokens, need, count = tokens + n, need + blocks(n + 1), count + 1
    return count
