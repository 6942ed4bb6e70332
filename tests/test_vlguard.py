"""VLGuard's training set as a source: VLGuard's own conversion, each reply's kind, categories, bad records listed."""

import json
import random

import pytest
from safety_fixtures import write_vlguard_train
from test_convert import samples_in

from mllm_safety.data.conversation import SampleError, parse_llava_record
from mllm_safety.data.convert import main
from mllm_safety.data.manifest import Manifest


def vlguard_script_order(records: list[dict]) -> dict[str, list[str]]:
    """The instruction keys of each record in the order VLGuard's ``convert_to_llava_format.py`` writes them."""
    random.seed(0)
    order = {}
    for record in records:
        pairs = list(record.get("instr-resp", []))
        if len(pairs) > 1:
            random.shuffle(pairs)
        order[record["id"]] = [next(key for key in pair if key != "response") for pair in pairs]
    return order


@pytest.fixture
def converted(tmp_path):
    train = write_vlguard_train(tmp_path / "vlguard")
    out = tmp_path / "shards"
    main(["--format", "vlguard", "--json", str(train), "--image_root", str(train.parent / "train")]
         + ["--output", str(out), "--source", "vlguard", "--shard_size", "2"])  # fmt: skip
    return json.loads(train.read_text()), out


def test_vlguard_records_convert_as_vlguard_does_with_kinds_and_categories(converted):
    records, out = converted
    samples = samples_in(out)
    assert sorted(samples) == ["Ads_2", "Ads_4", "Ads_6", "HOD_3", "Priv_8"]
    expected_order = vlguard_script_order(records)
    safe_orders = {expected_order[i][0] for i in ("Ads_2", "Ads_4", "Ads_6")}
    assert safe_orders == {"safe_instruction", "unsafe_instruction"}, "the fixture has both orders"
    by_id = {record["id"]: record for record in records}
    kind_of = {"safe_instruction": "answer", "unsafe_instruction": "refusal", "instruction": "image_refusal"}
    for sample_id, (record, extension, _) in samples.items():
        source = by_id[sample_id]
        keys = expected_order[sample_id]
        pairs = {next(k for k in pair if k != "response"): pair for pair in source["instr-resp"]}
        humans = [m["value"] for m in record["conversations"][::2]]
        assert humans == [f"<image>\n{pairs[keys[0]][keys[0]]}"] + [pairs[k][k] for k in keys[1:]]
        assert [m["value"] for m in record["conversations"][1::2]] == [pairs[k]["response"] for k in keys]
        assert [m["kind"] for m in record["conversations"][1::2]] == [kind_of[k] for k in keys]
        assert extension == "png" and record["safe"] == source["safe"] and record["source"] == "vlguard"
        for key in ("harmful_category", "harmful_subcategory"):
            assert record.get(key) == source.get(key)
    assert samples["HOD_3"][0]["harmful_subcategory"] == "violence", "categories kept"


def test_kinds_reach_the_conversation_and_the_manifest(converted):
    _, out = converted
    from data_helpers import pieces_of

    from mllm_safety.data.shards import decode_sample, read_slice

    conversations = {c.id: c for piece in pieces_of(out) for c in map(decode_sample, read_slice(piece, {}))}
    assert conversations["HOD_3"].kinds == ("image_refusal",) and not conversations["HOD_3"].shows_safe_image
    assert conversations["Ads_4"].kinds == ("refusal", "answer"), "VLGuard's third draw swaps the turns"
    assert conversations["Ads_2"].kinds == ("answer", "refusal") and conversations["Ads_2"].shows_safe_image
    manifest = Manifest.read(out)
    listed = {i: k for entry in manifest.shards for i, k in zip(entry.ids, entry.kinds, strict=True)}
    assert listed == {i: list(c.kinds) for i, c in conversations.items()}
    assert manifest.params["vlguard"]["format"] == "vlguard"


def test_bad_records_are_skipped_and_listed(converted):
    _, out = converted
    skipped = {s.id: (s.reason, s.detail) for s in Manifest.read(out).skipped}
    assert sorted(skipped) == ["Ads_1", "Ads_5", "Ads_7", "Ads_9"]
    assert skipped["Ads_1"][0] == "bad_record" and "unknown keys ['caption']" in skipped["Ads_1"][1]
    assert skipped["Ads_5"][0] == "bad_record" and "'instr-resp' must be a non-empty list" in skipped["Ads_5"][1]
    assert skipped["Ads_7"][0] == "missing_image" and "bad_ads/missing.png" in skipped["Ads_7"][1]
    assert skipped["Ads_9"][0] == "bad_record" and "an unsafe image carries ['instruction']" in skipped["Ads_9"][1]
    assert Manifest.read(out).to_json()["skipped_counts"] == {"vlguard/bad_record": 3, "vlguard/missing_image": 1}


def test_turn_kinds_are_all_set_or_all_unset():
    turns = [{"from": "human", "value": "Q?"}, {"from": "gpt", "value": "A.", "kind": "answer"}]
    assert parse_llava_record({"id": "x", "conversations": turns}, None).kinds == ("answer",)
    plain = [{"from": "human", "value": "Q?"}, {"from": "gpt", "value": "A."}]
    assert parse_llava_record({"id": "x", "conversations": plain}, None).kinds is None, "older shards read as before"
    with pytest.raises(SampleError, match=r"turn kinds \['answer', None\]"):
        parse_llava_record({"id": "x", "conversations": turns + plain}, None)
    with pytest.raises(SampleError, match=r"turn kinds \['rude'\]"):
        parse_llava_record({"id": "x", "conversations": [turns[0], turns[1] | {"kind": "rude"}]}, None)
