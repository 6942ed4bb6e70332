import json
import pickle
from collections import Counter

import pytest
import webdataset as wds
from data_helpers import pieces_of, png_bytes, record, tiny_processor, write_source

from mllm_safety.data.conversation import SampleError
from mllm_safety.data.manifest import Manifest, ShardSetWriter
from mllm_safety.data.rejection import RejectionConfig, RejectionSwap
from mllm_safety.data.shards import (
    ShardSlice,
    decode_sample,
    expand_shards,
    iter_conversations,
    manifest_entries,
    read_slice,
)
from mllm_safety.data.streaming import SampleStream, ShardStream


class WritesAFile:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def conversation_json(sample_id, image=True):
    return json.dumps(record(sample_id, image)).encode()


def test_pickle_members_are_never_unpickled(tmp_path):
    planted = tmp_path / "pwned"
    shard = str(tmp_path / "evil-000000.tar")
    with wds.TarWriter(shard, encoder=False) as sink:
        sink.write(
            {
                "__key__": "a",
                "json": conversation_json("a"),
                "png": png_bytes(),
                "pyd": pickle.dumps(WritesAFile(str(planted))),
                "pickle": pickle.dumps(WritesAFile(str(planted))),
            }
        )
    (conversation,) = list(iter_conversations(shard))
    assert conversation.id == "a" and conversation.image.size == (32, 32)
    assert not planted.exists(), "a pickle member was unpickled"


def test_training_stream_never_unpickles_members(tmp_path, tokenizer):
    planted = tmp_path / "pwned"
    payload = pickle.dumps(WritesAFile(str(planted)))
    with ShardSetWriter(tmp_path, "evil", shard_size=10) as writer:
        for k in range(4):
            writer.write(f"e{k}", record(f"e{k}"), ("png", png_bytes()))
    Manifest(writer.entries).write(tmp_path)
    shard = str(tmp_path / writer.entries[0].name)
    members = list(wds.DataPipeline(wds.SimpleShardList([shard]), wds.tarfile_to_samples()))
    with wds.TarWriter(shard, encoder=False) as sink:  # every extension webdataset's default decoders unpickle
        for member in members:
            del member["__url__"]
            sink.write(member | {"pyd": payload, "pickle": payload, "pth": payload})
    stream = ShardStream(
        pieces_of(tmp_path), tiny_processor(tokenizer), RejectionSwap(0.0, RejectionConfig()), batch_size=2
    )
    assert sorted(i for batch in stream for i in batch.ids) == ["e0", "e1", "e2", "e3"]
    assert not planted.exists(), "a pickle member was unpickled"


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        ({"__key__": "k", "json": b"{not json"}, "bad_json"),
        ({"__key__": "k", "png": png_bytes()}, "bad_json"),
        ({"__key__": "k", "json": conversation_json("k"), "png": b"\x89PNG broken"}, "bad_image"),
        ({"__key__": "k", "json": conversation_json("k")}, "bad_image"),
    ],
)
def test_bad_members_are_reported_with_the_sample_and_shard(raw, reason):
    with pytest.raises(SampleError, match="k in shard-7.tar") as error:
        decode_sample(raw | {"__url__": "shard-7.tar"})
    assert error.value.reason == reason


def test_stream_skips_and_counts_bad_samples_or_raises():
    raws = [
        {"__key__": "good", "json": conversation_json("good", image=False)},
        {"__key__": "bad", "json": b"[]"},
        {"__key__": "bad2", "json": conversation_json("bad2")},  # placeholder without image
    ]

    class Echo:
        def stream_sample(self, conversation):
            return conversation.id

    swap = RejectionSwap(0.0, RejectionConfig())
    stream = SampleStream(Echo(), swap, skip_bad_samples=True)
    assert list(stream(iter(raws))) == ["good"]
    assert stream.skipped == {"bad_json": 1, "bad_image": 1}
    with pytest.raises(SampleError, match="'bad"):
        list(SampleStream(Echo(), swap, skip_bad_samples=False)(iter(raws)))


def test_a_shard_that_does_not_match_its_manifest_stops_the_run():
    raw = {"__key__": "00000000", "__url__": "s.tar", "__id__": "listed", "json": conversation_json("stored", False)}
    with pytest.raises(ValueError, match="holds sample 'stored' where its manifest lists 'listed'"):
        SampleStream(lambda c: c, RejectionSwap(0.0, RejectionConfig()), True).process(raw)


def test_shard_patterns_expand_and_missing_ones_are_named(tmp_path):
    for i in range(3):
        (tmp_path / f"train-{i:03d}.tar").touch()
    assert len(expand_shards(str(tmp_path / "train-{000..002}.tar"))) == 3
    assert len(expand_shards([str(tmp_path / "*.tar")])) == 3
    with pytest.raises(FileNotFoundError, match="train-003.tar"):
        expand_shards(str(tmp_path / "train-{000..005}.tar"))


def test_slices_read_only_their_positions(tmp_path):
    write_source(tmp_path, "a", [10])
    (whole,) = pieces_of(tmp_path)
    piece = ShardSlice(whole.path, whole.positions[3:6], whole.ids[3:6])
    raws = list(read_slice(piece, Counter()))
    assert [raw["__id__"] for raw in raws] == ["a-3", "a-4", "a-5"]
    assert [json.loads(raw["json"])["id"] for raw in raws] == ["a-3", "a-4", "a-5"]


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_a_damaged_shard_loses_only_its_unreadable_samples_and_counts_them(tmp_path, damage):
    write_source(tmp_path, "a", [6, 6])
    first = tmp_path / "a-000000.tar"
    data = bytearray(first.read_bytes())
    middle = len(data) // 2
    if damage == "truncate":
        data = data[:middle]
    else:
        data[middle : middle + 2048] = b"\xff" * 2048
    first.write_bytes(bytes(data))
    skipped = Counter()
    ids = [json.loads(raw["json"])["id"] for piece in pieces_of(tmp_path) for raw in read_slice(piece, skipped)]
    assert ids[-6:] == [f"a-{k}" for k in range(6, 12)], "the next shard is read in full"
    assert ids[:-6] == [f"a-{k}" for k in range(len(ids) - 6)], "the damaged one up to the damage"
    assert skipped["corrupt_tar"] == 12 - len(ids) > 0


def test_manifests_of_several_folders_and_unlisted_shards(tmp_path):
    write_source(tmp_path / "x", "a", [2])
    write_source(tmp_path / "y", "b", [3])
    entries = manifest_entries(expand_shards([str(tmp_path / "x" / "*.tar"), str(tmp_path / "y" / "*.tar")]))
    assert [(entry.source, len(entry.ids)) for _, entry in entries] == [("a", 2), ("b", 3)]
    (tmp_path / "y" / "stray.tar").write_bytes(b"")
    with pytest.raises(ValueError, match="stray.tar.*not listed"):
        manifest_entries(expand_shards(str(tmp_path / "y" / "*.tar")))
    (tmp_path / "z").mkdir()
    (tmp_path / "z" / "c.tar").write_bytes(b"")
    assert manifest_entries([str(tmp_path / "z" / "c.tar")]) is None
    with pytest.raises(ValueError, match="no manifest.json"):
        manifest_entries([str(tmp_path / "x" / "a-000000.tar"), str(tmp_path / "z" / "c.tar")])
