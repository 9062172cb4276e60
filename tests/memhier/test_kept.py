"""KeptSlots on hand-made inputs: the slots a policy keeps, the blocks that die with them, the padded view."""

import torch

from memhier.kept import KeptSlots


def slot_values(B: int, H_kv: int, N: int) -> torch.Tensor:
    """(B, H_kv, N, 1) tensor whose value at slot n is n: a gathered view shows which slots it holds."""
    return torch.arange(N, dtype=torch.float32).view(1, 1, N, 1).expand(B, H_kv, N, 1).clone()


def test_a_block_dies_when_no_head_keeps_a_slot_of_it_and_later_slots_move_down():
    kept = KeptSlots(block_tokens=4)
    K = slot_values(1, 2, 12)  # blocks 0 (slots 0..3) and 1 (4..7) sealed, 8..11 open
    assert kept.view(K, K, 12)[0] is K  # nothing evicted yet: no gather
    idx = torch.tensor([[[1, 9, 10], [9, 10, 11]]])  # head 0 keeps a slot of block 0, nobody one of block 1
    assert kept.keep(idx, n_blocks=2) == [1]
    assert kept.slots.tolist() == [[[1, 5, 6], [5, 6, 7]]]  # 9, 10, 11 moved down by one block
    K_next = slot_values(1, 2, 9)  # block 0 (0..3), then the open block (4..7), then one new token (8)
    view, _ = kept.view(K_next, K_next, 1)
    assert view[..., 0].tolist() == [[[1, 5, 6, 8], [5, 6, 7, 8]]]
    assert kept.stored(1, 2, n_slots=9) == 8


def test_ragged_rows_are_padded_like_a_ragged_store():
    kept = KeptSlots(block_tokens=4)
    K = slot_values(1, 2, 6)
    kept.view(K, K, 6)
    mask = torch.tensor([[[True, False, True, True, False, True], [False, True, False, False, False, True]]])
    assert kept.keep(mask, n_blocks=1) == []
    assert kept.pad.tolist() == [[[False] * 4, [False, False, True, True]]]
    view, _ = kept.view(slot_values(1, 2, 7), slot_values(1, 2, 7), 1)  # one new token, slot 6
    assert view[..., 0].tolist() == [[[0, 2, 3, 5, 6], [1, 5, 0, 0, 6]]]  # [kept | zeros at padding | new]
    assert kept.padding().tolist() == [[[False] * 5, [False, False, True, True, False]]]
    assert kept.stored(1, 2, n_slots=7) == 5 + 3
