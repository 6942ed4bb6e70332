"""The paper's comparison experiments on curated samples: which turns stay, which replies change, what the image is."""

import io
from dataclasses import replace

import numpy as np
import pytest
from data_helpers import png_bytes, tiny_processor, write_source
from PIL import Image
from safety_fixtures import write_vlguard_train

from mllm_safety.constants import IMAGE_TOKEN_ID
from mllm_safety.data.conversation import Conversation
from mllm_safety.data.convert import convert
from mllm_safety.data.curated import CuratedConfig, CuratedTransform, left_out, refusing
from mllm_safety.data.datamodule import SafetyDataModule
from mllm_safety.data.rejection import REFUSAL_POOL
from mllm_safety.data.streaming import EpochLoader, ShardStream

SAFE_KINDS, UNSAFE_KINDS = ("answer", "refusal"), ("image_refusal",)


def image(colour=(10, 120, 200)):
    return Image.new("RGB", (20, 12), colour)


def safe(sample_id="s", swapped=False):
    turns = (("<image>\nWhat is shown?", "A red car."), ("Who owns the car?", "I'm sorry, that is private."))
    kinds = SAFE_KINDS
    if swapped:
        turns, kinds = (("<image>\nWho owns the car?", turns[1][1]), ("What is shown?", turns[0][1])), kinds[::-1]
    return Conversation(sample_id, turns, image(), source="vlguard", kinds=kinds)


def unsafe(sample_id="u"):
    turns = (("<image>\nSpread this image.", "I'm sorry, it spreads hate."),)
    return Conversation(sample_id, turns, image(), source="vlguard", kinds=UNSAFE_KINDS)


def benign(sample_id="b"):
    turns = (("<image>\nWhat colour?", "Blue."), ("What about the sky?", "Grey."))
    return Conversation(sample_id, turns, image(), source="llava")


def apply(config, conversation, **kwargs):
    return CuratedTransform(config, **kwargs)(conversation)


def test_defaults_and_benign_samples_are_left_as_they_are():
    for conversation in (safe(), unsafe(), benign()):
        assert apply(CuratedConfig(), conversation) == conversation
    changing = CuratedConfig(reply="fixed", turns="first", image="blank", contrast="unsafe_only")
    assert apply(changing, safe()) != safe(), "the options change a curated sample"
    assert apply(changing, benign()) == benign(), "but never a benign one"


@pytest.mark.parametrize("reply", ["fixed", "pool"])
def test_response_quality_replaces_every_refusal_and_keeps_answers(reply):
    config = CuratedConfig(reply=reply, sentence="No.")
    out = apply(config, safe())
    assert out.turns[0] == safe().turns[0] and out.kinds == SAFE_KINDS, "the answer is kept"
    expected = {"fixed": ["No."], "pool": list(REFUSAL_POOL)}[reply]
    assert out.turns[1][0] == safe().turns[1][0] and out.turns[1][1] in expected
    assert apply(config, unsafe()).turns[0][1] in expected, "an unsafe image's refusal too"
    if reply == "pool":
        replies = {apply(config, unsafe(f"u{k}")).turns[0][1] for k in range(40)}
        assert len(replies) > 2, "the pool sentence varies with the sample"
        assert all(apply(config, unsafe(f"u{k}")) == apply(config, unsafe(f"u{k}")) for k in range(5))


def test_contrast_unsafe_only_keeps_a_safe_images_refusal_with_the_image_in_front():
    for conversation in (safe(), safe(swapped=True)):
        out = apply(CuratedConfig(contrast="unsafe_only"), conversation)
        assert out.turns == (("<image>\nWho owns the car?", "I'm sorry, that is private."),)
        assert out.kinds == ("refusal",) and out.image is conversation.image
    assert apply(CuratedConfig(contrast="unsafe_only"), unsafe()) == unsafe()


def test_no_safe_images_leaves_them_out_of_the_selection():
    kinds = {"s1": SAFE_KINDS, "s2": SAFE_KINDS[::-1], "u1": UNSAFE_KINDS}
    assert left_out(CuratedConfig(contrast="no_safe_images"), kinds) == {"s1", "s2"}
    assert left_out(CuratedConfig(), kinds) == set()


def test_one_random_turn_per_sample_skips_what_about_follow_ups():
    config = CuratedConfig(turns="random")
    kept = [apply(config, safe(f"s{k}")) for k in range(40)]
    assert {out.kinds for out in kept} == {("answer",), ("refusal",)}, "either turn is drawn"
    assert all(out.turns[0][0].startswith("<image>\n") and len(out.turns) == 1 for out in kept)
    assert all(apply(config, safe(f"s{k}")) == out for k, out in enumerate(kept)), "fixed by (seed, id)"
    assert [o.kinds for o in kept] != [
        apply(CuratedConfig(turns="random", seed=1), safe(f"s{k}")).kinds for k in range(40)
    ]
    turns = (("<image>\nQ?", "A."), ("What about it?", "B."), ("Why?", "C."))
    follow_up = Conversation("f", turns, image(), kinds=("answer",) * 3)
    picks = {apply(config, replace(follow_up, id=f"f{k}")).turns[0][1] for k in range(40)}
    assert picks == {"A.", "C."}, "never the 'what about' follow-up"
    assert {apply(CuratedConfig(turns="first"), safe(f"s{k}")).kinds for k in range(10)} == {("answer",)}


@pytest.mark.parametrize("mode", ["blank", "noise", "other", "drop"])
def test_image_content_of_curated_samples(mode):
    donors = [("d1", png_bytes("green")), ("d2", png_bytes("yellow"))]
    config = CuratedConfig(image=mode)
    out = apply(config, safe(), donors=donors if mode == "other" else None)
    before = np.asarray(safe().image)
    assert out.turns[1] == safe().turns[1] and out.kinds == SAFE_KINDS
    if mode == "drop":
        assert out.image is None and out.turns[0][0] == "What is shown?"
        return
    after = np.asarray(out.image.convert("RGB"))
    assert after.shape != before.shape or not np.array_equal(after, before)
    if mode == "blank":
        assert (after == 255).all() and out.image.size == safe().image.size
    if mode == "noise":
        assert after.std() > 50 and np.array_equal(after, np.asarray(apply(config, safe()).image))
        assert not np.array_equal(after, np.asarray(apply(config, safe("s2")).image)), "noise per sample"
    if mode == "other":
        colours = {tuple(np.asarray(Image.open(io.BytesIO(d)).convert("RGB"))[0, 0]) for _, d in donors}
        assert tuple(after[0, 0]) in colours
    assert apply(config, benign(), donors=donors if mode == "other" else None) == benign()


def test_refusal_share_is_exact_nested_and_refused_below_the_unsafe_share():
    kinds = {f"u{k}": UNSAFE_KINDS for k in range(3)} | {f"s{k}": SAFE_KINDS for k in range(7)}
    half, most = (refusing(CuratedConfig(turns="random", refusal_share=s), kinds) for s in (0.5, 0.8))
    assert len(half) == 5 and len(most) == 8 and half < most and {"u0", "u1", "u2"} <= half
    assert half != refusing(CuratedConfig(turns="random", refusal_share=0.5, seed=3), kinds), "seeded"
    with pytest.raises(ValueError, match=r"refusal_share 0.2 asks 2 of the 10 curated samples .* 3 show an unsafe"):
        refusing(CuratedConfig(turns="first", refusal_share=0.2), kinds)
    transform = CuratedTransform(CuratedConfig(turns="first", refusal_share=0.5), refusers=half)
    for sample_id in kinds:
        conversation = unsafe(sample_id) if sample_id.startswith("u") else safe(sample_id, swapped=True)
        out = transform(conversation)
        assert len(out.turns) == 1
        assert (out.kinds[0] in ("refusal", "image_refusal")) == (sample_id in half)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"image": "blurry"}, "curated.image 'blurry' is not one of"),
        ({"contrast": "both", "turns": "some"}, "curated.contrast 'both' is not one of .*; curated.turns 'some'"),
        ({"turns": "first", "refusal_share": 1.5}, r"curated.refusal_share must be in \[0, 1\], got 1.5"),
        ({"refusal_share": 0.5}, "it needs turns 'first' or 'random' \\(got 'all'\\)"),
        ({"reply": "pool", "pool": []}, r"curated.pool \(\[\]\) must not be empty"),
    ],
)
def test_bad_options_are_named(options, message):
    with pytest.raises(ValueError, match=message):
        CuratedConfig(**options)


@pytest.fixture
def mixed(tmp_path):
    train = write_vlguard_train(tmp_path / "vlguard")
    data = tmp_path / "shards"
    convert(train, data, image_root=train.parent / "train", source="vlguard", format="vlguard", shard_size=2)
    write_source(data, "llava", [5, 4])
    return data


def samples_by_id(module, tokenizer, num_workers):
    stream = ShardStream(
        module.pieces, tiny_processor(tokenizer), module.transform, batch_size=2, num_workers=num_workers
    )
    found = {}
    for batch in EpochLoader(stream, lambda: 0, num_workers=num_workers):
        fresh = len(batch.ids) - batch.stats["repeated"]
        images = iter(batch.pixel_values)
        for row, sample_id in enumerate(batch.ids):
            mask = batch.attention_mask[row].bool()
            tokens = batch.input_ids[row][mask].tolist()
            pixels = next(images).flatten().tolist() if IMAGE_TOKEN_ID in tokens else None
            if row < fresh:
                found[sample_id] = (tokens, batch.labels[row][mask].tolist(), pixels)
    return found


@pytest.mark.parametrize(
    "options",
    [
        {"reply": "pool", "turns": "random", "image": "noise"},
        {"reply": "fixed", "contrast": "unsafe_only", "image": "other"},
    ],
)
def test_options_act_on_curated_samples_alike_for_any_worker_count(mixed, tokenizer, options):
    def module(**curated):
        data = SafetyDataModule(train_shards=str(mixed / "*.tar"), curated=CuratedConfig(**curated))
        data.setup("fit")
        return data

    plain = samples_by_id(module(), tokenizer, 0)
    runs = [samples_by_id(module(**options), tokenizer, workers) for workers in (0, 1, 2)]
    curated = {"Ads_2", "Ads_4", "Ads_6", "HOD_3", "Priv_8"}
    assert len(plain) == 14 and curated < set(plain)
    assert sum(pixels is not None for *_, pixels in plain.values()) == 5 + 5, "curated images and half the benign"
    assert all(runs[0][i] != plain[i] for i in curated), "every curated sample changes"
    assert all(runs[0][i] == plain[i] for i in set(plain) - curated), "benign samples do not"
    assert runs[0] == runs[1] == runs[2]


def test_no_safe_images_and_refusal_share_choose_samples_before_the_mixture(mixed):
    module = SafetyDataModule(
        train_shards=str(mixed / "*.tar"), curated=CuratedConfig(contrast="no_safe_images"), mixture={"vlguard": None}
    )
    module.setup("fit")
    assert sorted(i for piece in module.pieces for i in piece.ids) == ["HOD_3", "Priv_8"]
    everything = SafetyDataModule(train_shards=str(mixed / "*.tar"), curated=CuratedConfig(contrast="no_safe_images"))
    everything.setup("fit")
    assert {i for piece in everything.pieces for i in piece.ids if not i.startswith("llava")} == {"HOD_3", "Priv_8"}
    too_many = SafetyDataModule(
        train_shards=str(mixed / "*.tar"), curated=CuratedConfig(contrast="no_safe_images"), mixture={"vlguard": 3}
    )
    with pytest.raises(ValueError, match="mixture asks for 3 samples of 'vlguard', which has 2"):
        too_many.setup("fit")
    shared = SafetyDataModule(
        train_shards=str(mixed / "*.tar"), curated=CuratedConfig(turns="first", refusal_share=0.6)
    )
    shared.setup("fit")
    assert shared.curated_transform.refusers >= {"HOD_3", "Priv_8"} and len(shared.curated_transform.refusers) == 3


def test_choosing_samples_by_kind_needs_the_manifest(tmp_path):
    write_source(tmp_path, "a", [4])
    (tmp_path / "manifest.json").unlink()
    for curated in (CuratedConfig(contrast="no_safe_images"), CuratedConfig(turns="first", refusal_share=0.5)):
        module = SafetyDataModule(str(tmp_path / "*.tar"), mode="resampled", num_samples=8, curated=curated)
        with pytest.raises(ValueError, match=r"listed in manifest.json, which .*\*.tar. lacks: convert them"):
            module.setup("fit")
