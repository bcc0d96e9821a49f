"""real_token_cosine: the cosine to the float output over the tokens that count (issue 22: the
CLI printed 0.937 over padded positions where the real tokens gave 0.996)."""
from __future__ import annotations

import pytest
import torch

from qfx.runtime.agreement import real_token_cosine


def test_padded_positions_do_not_count():
    ref = torch.randn(2, 5, 4, dtype=torch.float64)
    got = ref.clone()
    got[1, 3:] = -ref[1, 3:]  # garbage where sequence 1 is padding
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    cos = real_token_cosine(ref, got, mask)
    assert torch.allclose(cos, torch.ones(2, dtype=torch.float64))
    # over every position, sequence 1 would look far off: what the old check printed
    assert torch.nn.functional.cosine_similarity(ref[1].flatten(), got[1].flatten(), dim=0) < 0.9


def test_per_sequence_outputs_are_taken_whole_and_real_tokens_are_closed_form():
    ref, got = torch.tensor([[1.0, 0.0]]), torch.tensor([[1.0, 1.0]])
    assert real_token_cosine(ref, got, torch.ones(1, 7)).item() == pytest.approx(2 ** -0.5)  # logits [batch, classes]
    ref3 = torch.tensor([[[3.0, 0.0], [0.0, 1.0]]])
    got3 = torch.tensor([[[3.0, 4.0], [5.0, 5.0]]])
    assert real_token_cosine(ref3, got3, torch.tensor([[1, 0]])).item() == pytest.approx(3 / 5)


def test_mismatched_shapes_are_an_error_naming_both():
    with pytest.raises(ValueError, match=r"ref has shape \(2, 3\) but got has \(2, 4\)"):
        real_token_cosine(torch.zeros(2, 3), torch.zeros(2, 4), None)
