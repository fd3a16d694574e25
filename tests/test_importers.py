"""Each importer on a small fixture written here in that exact format (gzip where the real one is).

The catalogue below is 5-core as it stands: 6 users x 6 items minus the diagonal (every user 5
items, every item 5 users, 30 interactions). Each fixture adds noise the importer must remove.
"""

import csv
import gzip
import json

import pytest

from gti.core.config import PrepareConfig
from gti.core.errors import ConfigError, DataError
from gti.data.convert import run
from gti.data.importers.files import clean_text, parse_record
from gti.data.importers.minionerec import chain_windows

USERS = [f"U{u}" for u in range(6)]
ASINS = [f"B000{i}" for i in range(6)]
GRID = [(u, i) for u in range(6) for i in range(6) if u != i]  # (user index, item index)


def grid_time(u: int, i: int) -> int:
    return 1_400_000_000 + 1000 * u + 10 * ((i - u) % 6)  # user u's order: u+1, u+2, ... (mod 6)


def expected_seq(u: int) -> list[int]:
    return [(u + k) % 6 for k in range(1, 6)]


def write_lines(path, lines, gz):
    text = "".join(line + "\n" for line in lines)
    if gz:
        with gzip.open(path, "wt", encoding="utf-8") as f:
            f.write(text)
    else:
        path.write_text(text, encoding="utf-8")


def load(out, name):
    inter = json.loads((out / f"{name}.inter.json").read_text())
    items = json.loads((out / f"{name}.item.json").read_text())
    return inter, items, sum(len(s) for s in inter.values())


# ----------------------------------------------------------------------------------------- fixtures
def write_amazon2014(folder, cat="Beauty"):
    folder.mkdir(parents=True, exist_ok=True)
    reviews = [
        {"reviewerID": USERS[u], "asin": ASINS[i], "overall": 5.0, "unixReviewTime": grid_time(u, i)} for u, i in GRID
    ]
    reviews.reverse()  # file order is not time order
    reviews.append(dict(reviews[0]))  # a repeated review: deduplicated
    reviews += [
        {"reviewerID": "U9", "asin": ASINS[0], "unixReviewTime": 5},
        {"reviewerID": "U9", "asin": "B0009", "unixReviewTime": 6},
    ]
    reviews += [{"reviewerID": USERS[u], "asin": "B0008", "unixReviewTime": 7} for u in range(6)]  # untitled item
    write_lines(folder / f"reviews_{cat}_5.json.gz", [json.dumps(r) for r in reviews], gz=True)
    meta = [
        "{'asin': 'B0000', 'title': 'Rose &amp; Honey  Soap', 'description': 'A <b>gentle</b>\\n soap.', "
        "'brand': 'Acme', 'categories': [['Beauty', 'Skin Care'], ['Beauty', 'Bath']], 'price': 3.5}",
        "{'asin': 'B0001', 'title': \"Men's Razor\", 'categories': [['Beauty']]}",
        *[f"{{'asin': '{a}', 'title': 'Item {a}', 'description': 'About {a}.'}}" for a in ASINS[2:]],
        "{'asin': 'B0008', 'description': 'no title here'}",
        "{'asin': 'B0009', 'title': 'Lonely'}",
    ]
    write_lines(folder / f"meta_{cat}.json.gz", meta, gz=True)
    return folder


def write_amazon2018(folder, cat="Musical_Instruments", ratings_csv=False):
    folder.mkdir(parents=True, exist_ok=True)
    if ratings_csv:
        lines = [f"{ASINS[i]},{USERS[u]},5.0,{grid_time(u, i)}" for u, i in GRID]
        write_lines(folder / f"{cat}.csv", lines, gz=False)
    else:
        reviews = [
            {"overall": 4.0, "reviewerID": USERS[u], "asin": ASINS[i], "unixReviewTime": grid_time(u, i)}
            for u, i in GRID
        ]
        write_lines(folder / f"{cat}_5.json.gz", [json.dumps(r) for r in reviews], gz=True)
    meta = [
        {"asin": "B0000", "title": "Guitar Strings", "description": ["Bright tone.", "<br>Pack of 6."],
         "brand": "by\n    Fender", "category": ["Musical Instruments", "Strings"]},
        {"asin": "B0001", "title": '<span id="parentalGuidance">junk</span>'},  # scraping debris: dropped
        *[{"asin": a, "title": f"Item {a}", "description": []} for a in ASINS[2:]],
        {"asin": "B0002", "title": "A later duplicate record"},  # first titled record wins
    ]  # fmt: skip
    write_lines(folder / f"meta_{cat}.json.gz", [json.dumps(m) for m in meta], gz=True)
    return folder


def write_amazon2023(folder, cat="All_Beauty"):
    folder.mkdir(parents=True, exist_ok=True)
    reviews = [
        {"rating": 5.0, "title": "review title", "asin": f"C{i}", "parent_asin": ASINS[i], "user_id": USERS[u],
         "timestamp": grid_time(u, i) * 1000 + 7}
        for u, i in GRID
    ]  # fmt: skip
    write_lines(folder / f"{cat}.jsonl", [json.dumps(r) for r in reviews], gz=False)
    meta = [
        {"parent_asin": "B0000", "title": "Lip Balm", "description": ["Soft.", "Lasts all day."],
         "features": ["Vegan"], "store": "Balmy", "categories": ["Beauty", "Lips"]},
        {"parent_asin": "B0001", "title": "Hand Cream", "description": [], "features": ["Unscented", "50 ml"]},
        *[{"parent_asin": a, "title": f"Item {a}", "description": [], "features": []} for a in ASINS[2:]],
    ]  # fmt: skip
    write_lines(folder / f"meta_{cat}.jsonl.gz", [json.dumps(m) for m in meta], gz=True)
    return folder


def write_lcrec(folder, stem="Instruments", collide=True):
    folder.mkdir(parents=True, exist_ok=True)
    inter = {str(u): expected_seq(u) for u in range(6)}
    inter["6"] = [0, 1]  # short user: kept as-is (no k-core)
    items = {str(i): {"title": f"Item {i}", "description": f"About {i}.", "brand": "B"} for i in range(6)}
    index = {str(i): [f"<a_{i % 3}>", f"<b_{i}>", "<c_0>"] for i in range(6)}
    if collide:
        index["5"] = list(index["4"])  # two items, one SID
    (folder / f"{stem}.inter.json").write_text(json.dumps(inter))
    (folder / f"{stem}.item.json").write_text(json.dumps(items))
    (folder / f"{stem}.index.json").write_text(json.dumps(index))
    return folder


# ----------------------------------------------------------------------------------------- Amazon
def test_amazon2014(tmp_path, capsys):
    src = write_amazon2014(tmp_path / "raw")
    out = run(PrepareConfig(dataset="amazon2014", source=str(src), category="Beauty", root=str(tmp_path / "data")))
    assert out.name == "amazon2014-Beauty"
    inter, items, n = load(out, "amazon2014-Beauty")
    assert (len(inter), len(items), n) == (6, 6, 30)  # U9, B0008 (no title), B0009 gone; duplicate merged
    assert items["0"] == {
        "title": "Rose & Honey Soap",
        "description": "A gentle soap.",
        "brand": "Acme",
        "categories": ["Beauty", "Skin Care", "Bath"],
    }
    assert items["1"]["title"] == "Men's Razor"
    assert all(inter[str(u)] == expected_seq(u) for u in range(6))  # time order, not file order
    assert "dropped 1 without a title" in capsys.readouterr().out
    report = json.loads((out / "amazon2014-Beauty.prepare_report.json").read_text())
    assert report["rows_in"] == 30 + 1 + 2 + 6 and report["rows_dedup"] == 30 + 2  # + U9's two titled rows


@pytest.mark.parametrize("ratings_csv", [False, True], ids=["reviews-json", "ratings-csv"])
def test_amazon2018(tmp_path, ratings_csv):
    src = write_amazon2018(tmp_path / "raw", ratings_csv=ratings_csv)
    cfg = PrepareConfig(
        dataset="amazon2018",
        source=str(src),
        category="Musical_Instruments",
        name="Instruments",
        root=str(tmp_path / "d"),
        kcore=4,
    )
    inter, items, n = load(run(cfg), "Instruments")
    # B0001 has no usable title: its 5 rows go, and 4-core still holds for everything else
    assert (len(inter), len(items), n) == (6, 5, 25)
    assert items["0"] == {
        "title": "Guitar Strings",
        "description": "Bright tone. Pack of 6.",
        "brand": "Fender",
        "categories": ["Musical Instruments", "Strings"],
    }
    assert items["1"]["title"] == "Item B0002"


def test_amazon2023_millisecond_timestamps(tmp_path):
    src = write_amazon2023(tmp_path / "raw")
    out = run(PrepareConfig(dataset="amazon2023", source=str(src), category="All_Beauty", root=str(tmp_path / "d")))
    inter, items, n = load(out, "amazon2023-All_Beauty")
    assert (len(inter), len(items), n) == (6, 6, 30)
    assert items["0"] == {
        "title": "Lip Balm",
        "description": "Soft. Lasts all day.",
        "brand": "Balmy",
        "categories": ["Beauty", "Lips"],
    }
    assert items["1"]["description"] == "Unscented 50 ml"  # features stand in for an empty description
    assert all(inter[str(u)] == expected_seq(u) for u in range(6))


def test_missing_files_and_category_are_named(tmp_path):
    src = write_amazon2014(tmp_path / "raw")
    (src / "meta_Beauty.json.gz").unlink()
    with pytest.raises(DataError, match="meta_Beauty.json.gz: file not found"):
        run(PrepareConfig(dataset="amazon2014", source=str(src), category="Beauty", root=str(tmp_path / "d")))
    with pytest.raises(ConfigError, match="needs category="):
        run(PrepareConfig(dataset="amazon2014", source=str(src), root=str(tmp_path / "d")))
    with pytest.raises(ConfigError, match="needs source="):
        run(PrepareConfig(dataset="amazon2018", category="Beauty", root=str(tmp_path / "d")))
    with pytest.raises(DataError, match=r"Toys_5.json.gz: file not found \(nor Toys.csv\)"):
        run(PrepareConfig(dataset="amazon2018", source=str(src), category="Toys", root=str(tmp_path / "d")))


def test_python_literal_metadata_line():
    rec = parse_record(
        "{'asin': 'B01', 'title': \"Men's \\\"Best\\\" Razor\", 'related': {'also_bought': ['X']}, 'price': 9.5}",
        "meta: line 1",
    )
    assert rec == {"asin": "B01", "title": 'Men\'s "Best" Razor', "related": {"also_bought": ["X"]}, "price": 9.5}
    with pytest.raises(DataError, match="not a JSON object or Python literal"):
        parse_record("__import__('os').system('echo pwned')", "meta: line 2")  # code is never run
    assert clean_text(["a &amp; b", "<p>c\n\td</p>"]) == "a & b c d"


def test_malformed_line_names_file_and_line(tmp_path):
    src = write_amazon2014(tmp_path / "raw")
    lines = gzip.open(src / "meta_Beauty.json.gz", "rt").read().splitlines()
    lines[2] = "{'asin': 'B0002', 'title': 'unterminated"
    write_lines(src / "meta_Beauty.json.gz", lines, gz=True)
    with pytest.raises(DataError, match=r"meta_Beauty.json.gz: line 3: not a JSON object or Python literal"):
        run(PrepareConfig(dataset="amazon2014", source=str(src), category="Beauty", root=str(tmp_path / "d")))
    write_lines(
        src / "reviews_Beauty_5.json.gz",
        ['{"reviewerID": "U0", "asin": "B0000", "unixReviewTime": 1}', '{"reviewerID": "U0"}'],
        gz=True,
    )
    with pytest.raises(DataError, match=r"reviews_Beauty_5.json.gz: line 2: missing key 'asin'"):
        run(PrepareConfig(dataset="amazon2014", source=str(src), category="Beauty", root=str(tmp_path / "d")))


# ----------------------------------------------------------------------------------------- P5
def write_p5(folder, meta=False):
    folder.mkdir(parents=True, exist_ok=True)
    lines = [" ".join([str(u + 1), *(str(i + 1) for i in expected_seq(u))]) for u in range(6)]
    (folder / "sequential_data.txt").write_text("\n".join(lines) + "\n")
    maps = {
        "user2id": {USERS[u]: str(u + 1) for u in range(6)},
        "item2id": {ASINS[i]: str(i + 1) for i in range(6)},
        "id2user": {str(u + 1): USERS[u] for u in range(6)},
        "id2item": {str(i + 1): ASINS[i] for i in range(6)},
    }
    (folder / "datamaps.json").write_text(json.dumps(maps))
    if meta:
        lines = ["{'asin': 'B0000', 'title': 'Rose Soap', 'description': 'Gentle.'}", "{'asin': 'B0003', 'title': ''}"]
        write_lines(folder / "meta_Beauty.json.gz", lines, gz=True)
    return folder


def test_p5_without_meta_uses_asins(tmp_path):
    out = run(PrepareConfig(dataset="p5", source=str(write_p5(tmp_path / "beauty")), root=str(tmp_path / "d")))
    inter, items, n = load(out, "p5")
    assert (len(inter), len(items), n) == (6, 6, 30)
    assert items["0"] == {"title": "B0000", "description": ""}
    assert inter == {str(u): expected_seq(u) for u in range(6)}  # line order kept


def test_p5_with_amazon2014_meta(tmp_path, capsys):
    src = write_p5(tmp_path / "beauty", meta=True)
    out = run(
        PrepareConfig(dataset="p5", source=str(src), category="Beauty", name="p5-beauty", root=str(tmp_path / "d"))
    )
    inter, items, n = load(out, "p5-beauty")
    assert (len(inter), len(items), n) == (6, 6, 30)
    assert items["0"] == {"title": "Rose Soap", "description": "Gentle."}
    assert items["3"]["title"] == "B0003"  # empty title in the meta: the asin stands in
    assert "5 items keep their asin as title" in capsys.readouterr().out
    (src / "sequential_data.txt").write_text("1 2 3\n2 x 4\n")
    with pytest.raises(DataError, match=r"sequential_data.txt: line 2"):
        run(PrepareConfig(dataset="p5", source=str(src), name="p5-bad", root=str(tmp_path / "d")))


# ----------------------------------------------------------------------------------------- MiniOneRec
def write_minionerec(folder, cat="Industrial_and_Scientific", cap=3, info=True):
    """convert_dataset.py's layout: sliding windows (history capped at `cap`), Python-list cells."""
    name = f"{cat}_5_2016-10-2018-11"
    header = [
        "user_id",
        "history_item_title",
        "item_title",
        "history_item_id",
        "item_id",
        "history_item_sid",
        "item_sid",
    ]
    splits = {"train": [], "valid": [], "test": []}
    for u in range(6):
        seq = expected_seq(u)
        for t in range(1, len(seq)):
            hist = seq[max(0, t - cap) : t]
            split = "test" if t == len(seq) - 1 else "valid" if t == len(seq) - 2 else "train"
            splits[split].append([f"A{u}", str([f"Title {i}" for i in hist]), f"Title {seq[t]}", str(hist), seq[t],
                                  str([f"<a_{i}><b_0>" for i in hist]), f"<a_{seq[t]}><b_0>"])  # fmt: skip
    for split, rows in splits.items():
        (folder / split).mkdir(parents=True, exist_ok=True)
        with open(folder / split / f"{name}.csv", "w", newline="", encoding="utf-8") as f:
            w = csv.writer(f)
            w.writerow(header)
            w.writerows(rows)
    if info:
        (folder / "info").mkdir(exist_ok=True)
        lines = [f"<a_{i}><b_0>\tInfo title {i}\t{i}" for i in range(6)]
        (folder / "info" / f"{name}.txt").write_text("\n".join(lines) + "\n")
    return folder


@pytest.mark.parametrize("info", [True, False], ids=["info-file", "csv-titles"])
def test_minionerec(tmp_path, info):
    src = write_minionerec(tmp_path / "mor", info=info)
    cfg = PrepareConfig(
        dataset="minionerec",
        source=str(src),
        category="Industrial_and_Scientific",
        name="ind",
        root=str(tmp_path / "d"),
    )
    inter, items, n = load(run(cfg), "ind")
    assert (len(inter), len(items), n) == (6, 6, 30)
    assert inter == {str(u): expected_seq(u) for u in range(6)}  # whole sequences rebuilt from capped windows
    assert items["2"] == {"title": "Info title 2" if info else "Title 2", "description": ""}


def test_minionerec_chaining_and_errors(tmp_path):
    assert chain_windows([(["a"], "b"), (["a", "b"], "c"), (["b", "c"], "d")]) == ["a", "b", "c", "d"]
    assert chain_windows([(["a"], "b"), (["c", "d"], "e")]) == ["a", "b", "c", "d", "e"]  # a missing row: gap filled
    assert chain_windows([(["a"], "a"), (["a", "a"], "b")]) == ["a", "a", "b"]  # repeats are kept
    with pytest.raises(DataError, match=r"train/Toys\*.csv: file not found"):
        run(PrepareConfig(dataset="minionerec", source=str(tmp_path), category="Toys", root=str(tmp_path / "d")))
    src = write_minionerec(tmp_path / "mor")
    path = src / "valid" / "Industrial_and_Scientific_5_2016-10-2018-11.csv"
    path.write_text(path.read_text().replace("[", "(", 1))
    with pytest.raises(DataError, match=r"valid/Industrial_and_Scientific_5_2016-10-2018-11.csv: line 2"):
        run(PrepareConfig(dataset="minionerec", source=str(src), root=str(tmp_path / "d")))


# ----------------------------------------------------------------------------------------- LC-Rec folder
def test_lcrec_copied_as_is_with_collision_report(tmp_path, capsys):
    src = write_lcrec(tmp_path / "Instruments")
    out = run(PrepareConfig(dataset="lcrec", source=str(src), root=str(tmp_path / "d")))
    assert out == tmp_path / "d" / "Instruments"
    for kind in ("inter", "item", "index"):  # byte-identical copies
        assert (out / f"Instruments.{kind}.json").read_bytes() == (src / f"Instruments.{kind}.json").read_bytes()
    inter, items, n = load(out, "Instruments")
    assert (len(inter), len(items), n) == (7, 6, 32)  # the 2-item user stays: no k-core
    report = json.loads((out / "Instruments.prepare_report.json").read_text())
    assert report["sids"]["collisions"] == 1 and report["sids"]["unique_sids"] == 5
    assert "1 collisions" in capsys.readouterr().out
    assert not any(p.name.endswith(".tmp") for p in (tmp_path / "d").iterdir())


def test_lcrec_invalid_folder(tmp_path):
    src = write_lcrec(tmp_path / "Arts", stem="Arts", collide=False)
    (src / "Arts.inter.json").write_text(json.dumps({"0": [0, 9]}))
    with pytest.raises(DataError, match="item 9 is not in item.json"):
        run(PrepareConfig(dataset="lcrec", source=str(src), root=str(tmp_path / "d")))
    assert not (tmp_path / "d" / "Arts").exists()
    (src / "Arts.item.json").unlink()
    with pytest.raises(DataError, match=r"Arts.item.json: file not found"):
        run(PrepareConfig(dataset="lcrec", source=str(src), root=str(tmp_path / "d")))
