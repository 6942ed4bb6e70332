import io
import json

import pytest
from data_helpers import pieces_of
from PIL import Image

from mllm_safety.data.convert import convert, main
from mllm_safety.data.manifest import Manifest
from mllm_safety.data.shards import decode_sample, read_slice


def image_file(path, fmt="JPEG", colour="green"):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (24, 16), colour).save(path, format=fmt)
    return path


def llava(sample_id, image=None, question="<image>\nWhat is shown?", answer="A field."):
    rec = {"id": sample_id, "conversations": [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]}
    if image is not None:
        rec["image"] = image
    return rec


def samples_in(folder):
    """id -> (record, image member extension, image bytes) of every sample in the set."""
    found = {}
    for piece in pieces_of(folder):
        for raw in read_slice(piece, counter := {}):
            record = json.loads(raw["json"])
            ext = next((e for e in ("jpg", "png", "webp") if e in raw), None)
            found[record["id"]] = (record, ext, raw.get(ext))
            decode_sample(raw)  # every written sample decodes
        assert not counter
    return found


@pytest.fixture
def llava_data(tmp_path):
    root = tmp_path / "images"
    image_file(root / "coco" / "a.jpg")
    image_file(root / "vg" / "b.png", "PNG", "blue")
    image_file(root / "odd" / "c.bmp", "BMP", "red")
    (root / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    records = [
        llava("a", "coco/a.jpg"),
        llava("b", "vg/b.png", question="Where is it?\n<image>"),
        llava("c", "odd/c.bmp"),
        llava("text-1", question="What is 2+2?", answer="4."),
        llava("gone", "coco/missing.jpg"),
        llava("broken", "broken.jpg"),
        llava("no-placeholder", "coco/a.jpg", question="What is shown?"),
        {"id": "one-sided", "conversations": [{"from": "gpt", "value": "Hi"}]},
        "not an object",
    ]
    path = tmp_path / "data.json"
    path.write_text(json.dumps(records))
    return path, root


def test_llava_json_becomes_shards_with_embedded_images_and_a_manifest(tmp_path, llava_data):
    path, root = llava_data
    manifest = convert(json=path, output=tmp_path / "out", image_root=root, source="mix", shard_size=2)
    assert manifest.sources == {"mix": 4} and len(manifest.shards) == 2
    assert Manifest.read(tmp_path / "out").to_json() == manifest.to_json()
    samples = samples_in(tmp_path / "out")
    assert set(samples) == {"a", "b", "c", "text-1"}
    assert samples["a"][1:] == ("jpg", (root / "coco" / "a.jpg").read_bytes()), "JPEG bytes are stored as they are"
    assert samples["b"][1:] == ("png", (root / "vg" / "b.png").read_bytes())
    assert samples["c"][1] == "png" and Image.open(io.BytesIO(samples["c"][2])).getpixel((0, 0)) == (255, 0, 0)
    assert samples["text-1"][1] is None
    assert samples["a"][0] == llava("a", "coco/a.jpg") | {"source": "mix"}
    skipped = {s.id: s.reason for s in manifest.skipped}
    assert skipped == {
        "gone": "missing_image",
        "broken": "bad_image",
        "no-placeholder": "bad_image",
        "one-sided": "bad_conversation",
        "mix[8]": "bad_json",
    }
    assert manifest.to_json()["skipped_counts"] == {
        "mix/bad_conversation": 1,
        "mix/bad_image": 2,
        "mix/bad_json": 1,
        "mix/missing_image": 1,
    }
    assert "coco/missing.jpg" in next(s.detail for s in manifest.skipped if s.id == "gone")


def test_sharegpt_layout(tmp_path):
    image_file(tmp_path / "img" / "x.jpg")
    records = [
        {
            "messages": [{"role": "user", "content": "<image>Describe."}, {"role": "assistant", "content": "Green."}],
            "images": ["x.jpg"],
        },
        {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}], "images": []},
        {
            "messages": [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello."},
            ]
        },
        {
            "messages": [{"role": "user", "content": "<image>a"}, {"role": "assistant", "content": "b"}],
            "images": ["x.jpg", "x.jpg"],
        },
    ]
    (tmp_path / "sg.json").write_text(json.dumps(records))
    manifest = convert(json=tmp_path / "sg.json", output=tmp_path / "out", image_root=tmp_path / "img")
    samples = samples_in(tmp_path / "out")
    assert manifest.sources == {"sg": 2}
    assert samples["sg-00000000"][0]["conversations"] == [
        {"from": "human", "value": "<image>Describe."},
        {"from": "gpt", "value": "Green."},
    ]
    assert samples["sg-00000000"][1] == "jpg" and samples["sg-00000001"][1] is None
    assert {s.id: s.reason for s in manifest.skipped} == {"sg-00000002": "bad_conversation", "sg-00000003": "bad_image"}


def test_sources_share_a_folder_and_reconverting_one_replaces_it(tmp_path):
    (tmp_path / "a.json").write_text(json.dumps([llava(f"s{k}", question="q", answer="a") for k in range(5)]))
    (tmp_path / "b.json").write_text(json.dumps([llava(f"s{k}", question="q", answer="b") for k in range(3)]))
    out = tmp_path / "out"
    convert(json=tmp_path / "a.json", output=out, source="llava", shard_size=2)
    manifest = convert(json=tmp_path / "b.json", output=out, source="med", shard_size=2)
    assert manifest.sources == {"llava": 5, "med": 3}
    samples = samples_in(out)
    assert {i for i, (r, _, _) in samples.items() if r["source"] == "med"} == {"s0#2", "s1#2", "s2#2"}
    assert manifest.params["med"]["renamed_ids"] == [["s0", "s0#2"], ["s1", "s1#2"], ["s2", "s2#2"]]
    (tmp_path / "a.json").write_text(json.dumps([llava("s0", question="q", answer="a")]))
    manifest = convert(json=tmp_path / "a.json", output=out, source="llava", shard_size=2)
    assert manifest.sources == {"med": 3, "llava": 1}
    assert sorted(p.name for p in out.glob("*.tar")) == sorted(e.name for e in manifest.shards)
    assert not list(out.glob(".*")), "no temporary files are left behind"


def test_parallel_image_reading_writes_the_same_shards(tmp_path, llava_data):
    path, root = llava_data
    convert(json=path, output=tmp_path / "one", image_root=root, shard_size=3)
    convert(json=path, output=tmp_path / "two", image_root=root, shard_size=3, workers=2)
    for name in ("data-000000.tar", "data-000001.tar"):
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes()


def test_command_line(tmp_path, llava_data, capsys):
    path, root = llava_data
    main(["--json", str(path), "--image_root", str(root), "--output", str(tmp_path / "out"), "--shard_size", "3"])
    assert "data: 4 samples in 2 shards" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["--help"])
    usage = capsys.readouterr().out
    assert "--image_root" in usage and "Samples per shard" in usage
    with pytest.raises(ValueError, match="source 'has.dot' must use only letters"):
        main(["--json", str(path), "--output", str(tmp_path / "bad"), "--source", "has.dot"])
    assert not (tmp_path / "bad").exists()
