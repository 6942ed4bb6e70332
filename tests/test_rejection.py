import pytest

from mllm_safety.data.conversation import Conversation
from mllm_safety.data.rejection import PAPER_REJECTION, RejectionConfig, RejectionSwap

IDS = [f"sample-{i:05d}" for i in range(2000)]


def conversation(sample_id="x", image=None):
    first = "What shape is this?\n<image>" if image is not None else "What is 2+2?"
    return Conversation(sample_id, ((first, "A circle."), ("And its colour?", "Red.")), image)


@pytest.mark.parametrize("ratio", [0.0, 0.05, 0.3, 1.0])
def test_exact_fraction_with_known_ids(ratio):
    swap = RejectionSwap(ratio, RejectionConfig(), ids=IDS)
    assert sum(swap.is_swapped(i) for i in IDS) == round(ratio * len(IDS))


def test_fraction_without_ids_is_close_to_ratio():
    swap = RejectionSwap(0.3, RejectionConfig())
    assert abs(sum(swap.is_swapped(i) for i in IDS) / len(IDS) - 0.3) < 0.04


@pytest.mark.parametrize("ids", [IDS, None])
def test_swapped_sets_are_nested_and_deterministic(ids):
    sets = [{i for i in IDS if RejectionSwap(r, RejectionConfig(), ids=ids).is_swapped(i)} for r in (0.1, 0.2, 0.5)]
    assert sets[0] <= sets[1] <= sets[2]
    again = {
        i for i in IDS if RejectionSwap(0.2, RejectionConfig(), ids=list(reversed(IDS)) if ids else None).is_swapped(i)
    }
    assert again == sets[1], "the choice must not depend on sample order"
    other_seed = {i for i in IDS if RejectionSwap(0.2, RejectionConfig(seed=1), ids=ids).is_swapped(i)}
    assert other_seed != sets[1]


def test_swap_keeps_one_turn_puts_image_first_and_drops_eos_learning():
    swapped = RejectionSwap(1.0, RejectionConfig())(conversation(image=object()))
    assert swapped.turns == (("<image>\nWhat shape is this?", PAPER_REJECTION),)
    assert swapped.is_rejection and not swapped.learn_end_marker


def test_swap_options():
    config = RejectionConfig(sentence="No.", keep_one_turn=False, image_first=False, learn_eos=True)
    swapped = RejectionSwap(1.0, config)(conversation(image=object()))
    assert swapped.turns == (("What shape is this?\n<image>", "No."), ("And its colour?", "No."))
    assert swapped.learn_end_marker


def test_unswapped_sample_is_untouched():
    original = conversation()
    assert RejectionSwap(0.0, RejectionConfig())(original) is original


@pytest.mark.parametrize("ratio", [-0.1, 1.5])
def test_ratio_outside_unit_interval_is_rejected(ratio):
    with pytest.raises(ValueError, match=f"got {ratio}"):
        RejectionSwap(ratio, RejectionConfig())
