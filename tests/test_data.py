import json

import pytest

from gti.core.errors import DataError
from gti.data.dataset import (
    build_sequences,
    leave_one_out,
    load_dataset,
    read_index,
    read_inter,
    read_items,
    write_dataset,
)


def test_leave_one_out_splits_and_truncation():
    inter = {0: [10, 11, 12, 13, 14], 1: [5, 6]}
    s = leave_one_out(inter, max_history=2)
    assert [(e.history, e.target) for e in s["train"]] == [((10,), 11), ((10, 11), 12)]
    assert [(e.history, e.target) for e in s["valid"]] == [((11, 12), 13)]
    assert [(e.history, e.target) for e in s["test"]] == [((12, 13), 14)]
    assert [e.index for e in s["train"]] == [0, 1]  # global indices per split


def test_build_sequences_kcore_dedup_and_stable_order():
    rows = []
    for u in range(3):
        for i in range(3):
            rows.append((f"u{u}", f"i{i}", 100 + i))
    rows.append(("u0", "i0", 500))  # repeated pair: dropped, earliest kept
    rows.append(("u9", "i0", 1))  # user with one interaction: removed by 2-core... then i0 still ok
    rows.append(("u1", "i5", 100))  # item with one interaction: removed
    rows.append(("u2", "i2", 0))  # earlier duplicate of u2-i2 wins
    meta = {f"i{i}": {"title": f"T{i}"} for i in range(6)}
    inter, items, stats = build_sequences(rows, meta, kcore=3)
    assert stats["users"] == 3 and stats["items"] == 3
    assert inter[2] == [2, 0, 1]  # u2: i2 at t=0 first
    assert inter[0] == [0, 1, 2]
    assert items[0]["title"] == "T0"


def test_build_sequences_ties_keep_row_order():
    rows = [("u", "b", 5), ("u", "a", 5), ("u", "c", 5)]
    inter, _, _ = build_sequences(rows, {k: {"title": k} for k in "abc"}, kcore=1)
    assert inter[0] == [1, 0, 2]  # b, a, c in file order; ids: a=0, b=1, c=2


def write(tmp_path, name, kind, obj):
    d = tmp_path / name
    d.mkdir(exist_ok=True)
    (d / f"{name}.{kind}.json").write_text(obj if isinstance(obj, str) else json.dumps(obj))


def test_roundtrip(tmp_path):
    write_dataset(tmp_path, "toy", {0: [0, 1, 2]}, {0: {"title": "a"}, 1: {"title": "b"}, 2: {"title": "c"}})
    ds = load_dataset(tmp_path, "toy")
    assert ds.inter == {0: [0, 1, 2]} and ds.items[1]["title"] == "b"


@pytest.mark.parametrize(
    "kind,content,match",
    [
        ("inter", '{"0": [0, 1,', r"toy.inter.json: malformed JSON at line 1"),
        ("inter", '{"x": [0]}', r"toy.inter.json: key 'x' is not an integer"),
        ("inter", '{"0": [0, 7]}', r"item 7 is not in item.json"),
        ("item", '{"0": {"description": "d"}, "1": {"title": "b"}}', r"toy.item.json: item '0': missing 'title'"),
        ("item", '{"0": {"title": " ", "description": ""}, "1": {"title": "b"}}', r"item '0': empty text"),
    ],
)
def test_bad_input_names_file_and_key(tmp_path, kind, content, match):
    write(tmp_path, "toy", "inter", {"0": [0, 1]})
    write(tmp_path, "toy", "item", {"0": {"title": "a"}, "1": {"title": "b"}})
    write(tmp_path, "toy", kind, content)
    with pytest.raises(DataError, match=match):
        load_dataset(tmp_path, "toy")


def test_index_reader_rejects_bad_entries(tmp_path):
    p = tmp_path / "x.index.json"
    p.write_text('{"0": ["<a_1>"], "1": []}')
    with pytest.raises(DataError, match=r"x.index.json: item '1'"):
        read_index(p)
    p.write_text('{"0": ["<a_1>"]}')
    assert read_index(p) == {0: ["<a_1>"]}
    assert read_inter is not None and read_items is not None


def test_last_per_user_keeps_the_latest_prefixes():
    from gti.testing import last_per_user

    train = leave_one_out({0: list(range(7)), 1: [5, 6, 7, 8]}, max_history=20)["train"]
    kept = last_per_user(train, 2)
    assert [(e.user, e.target) for e in kept] == [(0, 3), (0, 4), (1, 6)]


def test_last_per_user_with_stride_tiles_the_sequence():
    from gti.testing import last_per_user

    train = leave_one_out({0: list(range(12))}, max_history=3)["train"]
    kept = last_per_user(train, 3, stride=3)  # each window's target is the next window's first history item
    assert [(e.history, e.target) for e in kept] == [((0, 1, 2), 3), ((3, 4, 5), 6), ((6, 7, 8), 9)]
