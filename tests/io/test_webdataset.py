"""guardalign.io.webdataset: samples, sidecars, ids, and an error item for every kind of damage."""
from __future__ import annotations

import hashlib
import tarfile

import pytest

from guardalign.io.sources import count_items, iter_items
from guardalign.io.webdataset import index_tar, split_name, tar_items
from shards import good_shard, image_bytes, write_tar


def by_id(items):
    return {i.id: i for i in items}


def test_split_name_follows_webdataset():
    assert split_name("0001.jpg") == ("0001", "jpg")
    assert split_name("dir/0001.seg.png") == ("dir/0001", "seg.png")
    assert split_name("a.b/c.json") == ("a.b/c", "json")
    assert split_name("README") == ("README", "")


def test_good_shard_gives_one_item_per_sample_with_sidecars(tmp_path):
    shard = good_shard(tmp_path / "shard-0.tar", n=3)
    items = list(tar_items(shard, "shard-0.tar"))
    assert [i.id for i in items] == ["shard-0.tar#000000", "shard-0.tar#000001", "shard-0.tar#000002"]
    first = items[0]
    assert first.error is None and first.data == image_bytes(0)
    assert first.source == f"{shard}#000000.png"
    assert first.meta["json"] == {"caption": "sample 0", "k": 0} and first.meta["txt"] == "caption 0"
    assert first.meta["key"] == "000000" and first.meta["member"] == "000000.png"


def test_sources_take_a_tar_and_a_folder_of_tars(tmp_path):
    good_shard(tmp_path / "shards" / "a.tar", n=2)
    good_shard(tmp_path / "shards" / "sub" / "b.tar", n=1, start=10)
    single = list(iter_items([str(tmp_path / "shards" / "a.tar")]))
    assert [i.id for i in single] == ["a.tar#000000", "a.tar#000001"]
    folder = list(iter_items([str(tmp_path / "shards")]))
    assert [i.id for i in folder] == ["a.tar#000000", "a.tar#000001", "sub/b.tar#000010"]
    assert count_items([str(tmp_path / "shards")]) == 3
    # two shards with the same name: ids use the paths as given, so they stay distinct
    good_shard(tmp_path / "other" / "a.tar", n=1)
    both = [i.id for i in iter_items([str(tmp_path / "shards" / "a.tar"), str(tmp_path / "other" / "a.tar")])]
    assert len(set(both)) == 3 and both[-1] == f"{(tmp_path / 'other' / 'a.tar').as_posix()}#000000"


def test_unordered_and_duplicate_keys_become_error_items(tmp_path):
    png = image_bytes(1)
    shard = write_tar(tmp_path / "bad.tar", [
        ("a.png", png), ("b.png", png), ("a.json", b"{}"),  # a's members are not adjacent
        ("c.png", png), ("c.png", png),  # the same member twice
        ("d.png", png), ("d.jpg", image_bytes(2, "JPEG")),  # two images
        ("e.json", b"{}"),  # no image
        ("f.png", png),  # fine
    ])
    items = list(tar_items(shard, "bad.tar"))
    assert [i.id for i in items] == [f"bad.tar#{k}" for k in "abcdef"]  # every key exactly once
    got = by_id(items)
    assert "not grouped by key" in got["bad.tar#a"].error and got["bad.tar#a"].data is None
    assert got["bad.tar#b"].error is None
    assert "appears twice" in got["bad.tar#c"].error
    assert "two image fields" in got["bad.tar#d"].error
    assert "no image field" in got["bad.tar#e"].error
    assert got["bad.tar#f"].error is None and got["bad.tar#f"].data == png


def test_links_devices_and_escaping_names_are_errors(tmp_path):
    png = image_bytes(3)
    shard = write_tar(tmp_path / "evil.tar", [
        ("link.png", tarfile.SYMTYPE, "/etc/passwd"),
        ("hard.png", tarfile.LNKTYPE, "ok.png"),
        ("dev.png", tarfile.CHRTYPE, ""),
        ("fifo.png", tarfile.FIFOTYPE, ""),
        ("../up.png", png),
        ("/abs.png", png),
        ("ok.png", png),
        ("dir", tarfile.DIRTYPE, ""),  # directories are skipped, not samples
    ])
    got = by_id(tar_items(shard, "evil.tar"))
    assert set(got) == {f"evil.tar#{k}" for k in ("link", "hard", "dev", "fifo", "../up", "/abs", "ok")}
    assert "symbolic link" in got["evil.tar#link"].error
    assert "hard link" in got["evil.tar#hard"].error
    assert "character device" in got["evil.tar#dev"].error
    assert "FIFO" in got["evil.tar#fifo"].error
    assert "'..' part" in got["evil.tar#../up"].error and got["evil.tar#../up"].data is None
    assert "absolute path" in got["evil.tar#/abs"].error
    assert got["evil.tar#ok"].error is None


def test_bad_sidecars_are_errors_naming_the_member(tmp_path):
    shard = write_tar(tmp_path / "side.tar", [("a.png", image_bytes(0)), ("a.json", b"{not json"),
                                               ("b.png", image_bytes(1)), ("b.txt", b"\xff\xfe")])
    got = by_id(tar_items(shard, "side.tar"))
    assert "'a.json' is not valid JSON" in got["side.tar#a"].error
    assert "'b.txt' is not UTF-8" in got["side.tar#b"].error


@pytest.mark.parametrize("cut", ["mid-data", "mid-header", "no-end-marker"])
def test_a_truncated_shard_flags_the_last_sample_and_the_shard(tmp_path, cut):
    shard = good_shard(tmp_path / "t.tar", n=3, sidecars=False)
    with open(shard, "rb") as f:
        samples, _ = index_tar(f)
    last = samples[-1].members[0]
    raw = shard.read_bytes()
    end = {"mid-data": last.offset + 10, "mid-header": last.offset - 300,
           "no-end-marker": last.offset + ((last.size + 511) // 512) * 512}[cut]
    shard.write_bytes(raw[:end])
    items = list(tar_items(shard, "t.tar"))
    assert items[-1].id == "t.tar" and "tar shard" in items[-1].error
    errors = [i.id for i in items if i.error]
    ok = [i.id for i in items if not i.error]
    assert set(ok) | set(errors) >= {"t.tar#000000"} and len(ids := [i.id for i in items]) == len(set(ids))
    assert "t.tar#000000" in ok  # the sample before the damaged one is fine
    assert items[-2].error and "damaged right after this sample" in items[-2].error
    # the good samples' bytes are exact
    for i in items:
        if not i.error:
            assert hashlib.sha256(i.data).hexdigest() == hashlib.sha256(image_bytes(int(i.id[-1]))).hexdigest()


def test_not_a_tar_is_one_error_item(tmp_path):
    bad = tmp_path / "junk.tar"
    bad.write_bytes(b"this is not a tar file at all" * 40)
    items = list(tar_items(bad, "junk.tar"))
    assert len(items) == 1 and items[0].id == "junk.tar" and "tar" in items[0].error


def test_a_tga_member_decodes_as_the_same_tga_in_a_folder(tmp_path):
    """TGA has no magic bytes: a tar member is told by its name, as a folder's file is by its path."""
    from guardalign.io.images import decode_stream

    tga = image_bytes(3, "TGA", size=(40, 30))
    write_tar(tmp_path / "s.tar", [("a.png", image_bytes(1)), ("c.tga", tga)])
    (tmp_path / "dir").mkdir()
    (tmp_path / "dir" / "c.tga").write_bytes(tga)
    got = list(decode_stream(iter_items([str(tmp_path / "s.tar"), str(tmp_path / "dir")]), workers=1))
    assert [d.item.id for d in got[:2]] == ["s.tar#a", "s.tar#c"] and got[2].item.id.endswith("dir/c.tga")
    member, file = got[1], got[2]
    assert member.error is None and file.error is None
    assert member.info == file.info and (member.info.format, member.info.width, member.info.height) == ("TGA", 40, 30)
    assert member.image.tobytes() == file.image.tobytes()
