import io
import json
import pickle

import pytest
import webdataset as wds
from PIL import Image

from mllm_safety.data.conversation import SampleError
from mllm_safety.data.datamodule import SampleStream
from mllm_safety.data.rejection import RejectionConfig, RejectionSwap
from mllm_safety.data.shards import decode_sample, expand_shards, iter_conversations


class WritesAFile:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def png_bytes(colour="red"):
    buffer = io.BytesIO()
    Image.new("RGB", (32, 32), colour).save(buffer, format="PNG")
    return buffer.getvalue()


def conversation_json(sample_id, image=True):
    prompt = "<image>\nWhat colour?" if image else "What colour?"
    return json.dumps(
        {"id": sample_id, "conversations": [{"from": "human", "value": prompt}, {"from": "gpt", "value": "Red."}]}
    ).encode()


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
        def __call__(self, conversation):
            return conversation.id

    swap = RejectionSwap(0.0, RejectionConfig())
    stream = SampleStream(Echo(), swap, skip_bad_samples=True)
    assert list(stream(iter(raws))) == ["good"]
    assert stream.skipped == {"bad_json": 1, "bad_image": 1}
    with pytest.raises(SampleError, match="'bad"):
        list(SampleStream(Echo(), swap, skip_bad_samples=False)(iter(raws)))


def test_shard_patterns_expand_and_missing_ones_are_named(tmp_path):
    for i in range(3):
        (tmp_path / f"train-{i:03d}.tar").touch()
    assert len(expand_shards(str(tmp_path / "train-{000..002}.tar"))) == 3
    assert len(expand_shards([str(tmp_path / "*.tar")])) == 3
    with pytest.raises(FileNotFoundError, match="train-003.tar"):
        expand_shards(str(tmp_path / "train-{000..005}.tar"))
