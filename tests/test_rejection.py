import numpy as np
import pytest
from data_helpers import png_bytes
from PIL import Image

from mllm_safety.data.conversation import Conversation
from mllm_safety.data.rejection import PAPER_REJECTION, REFUSAL_POOL, RejectionConfig, RejectionSwap

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


def swapped_set(ratio, ids, seed=0):
    swap = RejectionSwap(ratio, RejectionConfig(seed=seed), ids=ids)
    return {i for i in IDS if swap.is_swapped(i)}


@pytest.mark.parametrize("ids", [IDS, None])
def test_swapped_sets_are_nested_and_deterministic(ids):
    sets = [swapped_set(r, ids) for r in (0.1, 0.2, 0.5)]
    assert sets[0] < sets[1] < sets[2]
    assert swapped_set(0.2, list(reversed(IDS)) if ids else None) == sets[1], "the choice must not depend on order"
    assert swapped_set(0.2, ids, seed=1) != sets[1]


def test_swap_keeps_one_turn_puts_image_first_and_drops_eos_learning():
    swapped = RejectionSwap(1.0, RejectionConfig())(conversation(image=object()))
    assert swapped.turns == (("<image>\nWhat shape is this?", PAPER_REJECTION),)
    assert swapped.is_rejection and not swapped.learn_end_marker


def test_swap_options():
    config = RejectionConfig(sentence="No.", keep_one_turn=False, image_first=False, learn_eos=True)
    swapped = RejectionSwap(1.0, config)(conversation(image=object()))
    assert swapped.turns == (("What shape is this?\n<image>", "No."), ("And its colour?", "No."))
    assert swapped.learn_end_marker


def test_swap_keeps_a_random_turn_that_is_not_a_what_about_follow_up():
    def three_turns(sample_id):
        turns = (("<image>\nWhat shape?", "A circle."), ("What about the colour?", "Red."), ("How big?", "Small."))
        return Conversation(sample_id, turns, object())

    random_turn = RejectionSwap(1.0, RejectionConfig(kept_turn="random"))
    kept = [random_turn(three_turns(f"s{k}")).turns for k in range(40)]
    assert {turns[0][0] for turns in kept} == {"<image>\nWhat shape?", "<image>\nHow big?"}, "either, never turn 2"
    assert kept == [random_turn(three_turns(f"s{k}")).turns for k in range(40)], "fixed by (seed, id)"
    first = RejectionSwap(1.0, RejectionConfig())
    assert {first(three_turns(f"s{k}")).turns[0][0] for k in range(40)} == {"<image>\nWhat shape?"}
    with pytest.raises(ValueError, match="rejection.kept_turn 'last' is not one of"):
        RejectionConfig(kept_turn="last")


def test_unswapped_sample_is_untouched():
    original = conversation()
    assert RejectionSwap(0.0, RejectionConfig())(original) is original


@pytest.mark.parametrize("ratio", [-0.1, 1.5])
def test_ratio_outside_unit_interval_is_rejected(ratio):
    with pytest.raises(ValueError, match=f"got {ratio}"):
        RejectionSwap(ratio, RejectionConfig())


def image_conversation(sample_id="x", colour="red", size=(40, 30)):
    return Conversation(
        sample_id, (("<image>\nWhat is this?", "A box."), ("More?", "No.")), Image.new("RGB", size, colour)
    )


def test_reply_pool_is_sampled_per_sample_and_fixed_by_seed_and_id():
    config = RejectionConfig(reply="pool")
    replies = {RejectionSwap(1.0, config)(conversation(f"s{k}")).turns[0][1] for k in range(200)}
    assert replies == set(REFUSAL_POOL)
    assert RejectionSwap(1.0, config)(conversation("s7")).turns == RejectionSwap(1.0, config)(conversation("s7")).turns


def test_reply_with_a_short_reason():
    config = RejectionConfig(reply="reason", reasons=["It is unsafe.", "It could hurt someone."])
    replies = {RejectionSwap(1.0, config)(conversation(f"s{k}")).turns[0][1] for k in range(50)}
    assert replies == {f"{PAPER_REJECTION}. It is unsafe.", f"{PAPER_REJECTION}. It could hurt someone."}
    stated = RejectionConfig(reply="reason", sentence="No!", reasons=["It is unsafe."])
    assert stated.reply_for("a") == "No! It is unsafe.", "a sentence with its own end keeps it"


def test_the_default_sentence_is_the_papers_exactly():
    """The default ``--reply`` of the paper's ``utils/mix_rejection_data.py``, without a final period."""
    assert RejectionConfig().reply_for("a") == "I'm sorry, but I cannot assist with your request"


@pytest.mark.parametrize("mode", ["blank", "noise", "other", "drop"])
def test_image_ablations_change_only_swapped_samples(mode):
    donors = [(f"d{k}", png_bytes(colour)) for k, colour in enumerate(["blue", "green", "yellow"])]
    swap = RejectionSwap(0.5, RejectionConfig(image=mode), ids=[f"s{k}" for k in range(40)], donors=donors)
    for k in range(40):
        original = image_conversation(f"s{k}")
        result = swap(original)
        if not swap.is_swapped(original.id):
            assert result is original
            continue
        assert result.turns[0][1] == PAPER_REJECTION
        if mode == "drop":
            assert result.image is None and result.turns == (("What is this?", PAPER_REJECTION),)
            continue
        assert result.turns[0][0] == "<image>\nWhat is this?"
        pixels = np.asarray(result.image.convert("RGB"))
        if mode == "blank":
            assert result.image.size == (40, 30) and (pixels == 255).all()
        elif mode == "noise":
            assert result.image.size == (40, 30) and pixels.std() > 50
            assert np.array_equal(pixels, np.asarray(swap(image_conversation(f"s{k}")).image)), "fixed by (seed, id)"
        else:
            assert tuple(pixels[0, 0]) in {(0, 0, 255), (0, 128, 0), (255, 255, 0)}


def test_other_image_is_spread_over_donors_and_never_the_sample_own():
    donors = [(f"s{k}", png_bytes(colour)) for k, colour in enumerate(["blue", "green"])]
    swap = RejectionSwap(1.0, RejectionConfig(image="other"), donors=donors)
    seen = {tuple(np.asarray(swap(image_conversation(f"x{k}")).image)[0, 0]) for k in range(30)}
    assert seen == {(0, 0, 255), (0, 128, 0)}
    assert tuple(np.asarray(swap(image_conversation("s0")).image)[0, 0]) == (0, 128, 0), "not its own image"


def test_text_only_samples_keep_no_image_under_every_ablation():
    for mode in ("blank", "noise", "drop"):
        assert RejectionSwap(1.0, RejectionConfig(image=mode))(conversation("t")).image is None


def test_without_ids_only_named_sources_are_swapped():
    swap = RejectionSwap(1.0, RejectionConfig(sources=["med"]))
    assert not swap.is_swapped("a", "llava") and swap.is_swapped("a", "med")


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"sentence": " "}, "must not be empty"),
        ({"reply": "pool", "pool": []}, "rejection.pool must hold"),
        ({"reasons": ["fine", ""]}, "rejection.reasons must hold"),
        ({"sources": []}, "rejection.sources is empty"),
    ],
)
def test_bad_options_are_named(options, message):
    with pytest.raises(ValueError, match=message):
        RejectionConfig(**options)


def test_other_image_needs_donors():
    with pytest.raises(ValueError, match="needs at least two donor images"):
        RejectionSwap(0.5, RejectionConfig(image="other"), donors=[("a", png_bytes())])


def test_pool_sentences_are_fixed_by_seed_and_id_in_every_version():
    """A run's rejection replies must not change with the code: the same (seed, id) gives the same sentence."""
    chosen = [RejectionConfig(reply="pool").reply_for(f"s{k}") for k in range(8)]
    assert chosen == [REFUSAL_POOL[k] for k in (0, 4, 0, 4, 0, 0, 2, 3)]
    reseeded = [RejectionConfig(reply="pool", seed=1).reply_for(f"s{k}") for k in range(8)]
    assert reseeded == [REFUSAL_POOL[k] for k in (0, 3, 3, 1, 0, 1, 2, 3)]


def test_a_small_ratio_still_draws_every_pool_sentence_evenly():
    """The sentence is drawn apart from the swap: swapped samples all have small swap scores, and a sentence chosen
    by that score would be the pool's first one for all of them."""
    swap = RejectionSwap(0.1, RejectionConfig(reply="pool"), ids=IDS)
    replies = [swap(conversation(i)).turns[0][1] for i in IDS if swap.is_swapped(i)]
    shares = [replies.count(sentence) / len(replies) for sentence in REFUSAL_POOL]
    assert all(0.1 < share < 0.3 for share in shares), shares


def test_a_swapped_sample_keeps_its_image_placeholder_when_it_was_in_a_dropped_turn():
    image = Image.new("RGB", (8, 8))
    sample = Conversation("x", (("Hello.", "Hi."), ("<image>\nWhat is this?", "A box.")), image)
    swapped = RejectionSwap(1.0, RejectionConfig())(sample)
    assert swapped.turns == (("<image>\nHello.", PAPER_REJECTION),)


def test_image_first_moves_the_placeholder_and_leaves_other_turns_alone():
    config = RejectionConfig(keep_one_turn=False)
    swapped = RejectionSwap(1.0, config)(conversation(image=object()))
    assert swapped.turns == (("<image>\nWhat shape is this?", PAPER_REJECTION), ("And its colour?", PAPER_REJECTION))


def test_without_ids_a_swap_rewrites_only_samples_of_the_named_sources():
    swap = RejectionSwap(1.0, RejectionConfig(sources=["med"]))
    med = Conversation("a", (("Q?", "A."),), source="med")
    other = Conversation("a", (("Q?", "A."),), source="llava")
    assert swap(med).turns == (("Q?", PAPER_REJECTION),) and swap(other) is other


def test_a_zero_ratio_with_other_images_needs_no_donors():
    """Nothing is swapped, so nothing needs a replacement image (a sweep's ratio-0 baseline)."""
    swap = RejectionSwap(0.0, RejectionConfig(image="other"))
    assert swap(image_conversation()).image.getpixel((0, 0)) == (255, 0, 0)


def test_noise_images_depend_on_the_seed():
    pixels = [
        np.asarray(RejectionSwap(1.0, RejectionConfig(image="noise", seed=seed))(image_conversation()).image)
        for seed in (0, 1)
    ]
    assert not np.array_equal(*pixels)
