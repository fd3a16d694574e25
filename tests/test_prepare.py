import json

import pytest

from gti.core.config import PrepareConfig
from gti.data.convert import run
from gti.data.importers.movielens import packaged_dir


def independent_kcore(path, k=5):
    """A second implementation (sets of pairs, no timestamps) to check the counts of gti.prepare."""
    pairs = set()
    with open(path, encoding="utf-8") as f:
        next(f)
        for line in f:
            u, i, *_ = line.rstrip("\n").split("\t")
            pairs.add((u, i))
    while True:
        users, items = {}, {}
        for u, i in pairs:
            users[u] = users.get(u, 0) + 1
            items[i] = items.get(i, 0) + 1
        keep = {(u, i) for u, i in pairs if users[u] >= k and items[i] >= k}
        if keep == pairs:
            return len(users), len(items), len(pairs)
        pairs = keep


@pytest.mark.parametrize("name", ["ml-100k", "ml-1m"])
def test_movielens_counts_match_independent_computation(tmp_path, name):
    out = run(PrepareConfig(dataset=name, root=str(tmp_path)))
    inter = json.loads((out / f"{name}.inter.json").read_text())
    items = json.loads((out / f"{name}.item.json").read_text())
    n_inter = sum(len(v) for v in inter.values())
    assert (len(inter), len(items), n_inter) == independent_kcore(packaged_dir(name) / f"{name}.inter")
    if name == "ml-100k":
        assert (len(inter), len(items), n_inter) == (943, 1349, 99287)
        assert any(m["title"] == "Toy Story (1995)" and "Animation" in m["description"] for m in items.values())


def test_second_run_is_a_noop(tmp_path, capsys):
    run(PrepareConfig(dataset="ml-100k", root=str(tmp_path)))
    run(PrepareConfig(dataset="ml-100k", root=str(tmp_path)))
    assert "exists" in capsys.readouterr().out


def test_raw_grouplens_100k(tmp_path):
    src = tmp_path / "raw"
    src.mkdir()
    genres = ["0"] * 19
    lines = []
    for i in range(1, 4):
        g = list(genres)
        g[1 + i] = "1"  # Adventure, Animation, Children's
        lines.append(f"{i}|Movie {i} (199{i})|01-Jan-199{i}||http://x|" + "|".join(g))
    (src / "u.item").write_text("\n".join(lines) + "\n", encoding="latin-1")
    data = [f"{u}\t{i}\t4\t{1000 + 10 * u + i}" for u in range(1, 4) for i in range(1, 4)]
    (src / "u.data").write_text("\n".join(data) + "\n")
    out = run(PrepareConfig(dataset="ml-100k", source=str(src), root=str(tmp_path / "d"), kcore=3))
    items = json.loads((out / "ml-100k.item.json").read_text())
    assert items["0"] == {"title": "Movie 1 (1991)", "description": "Adventure", "genres": ["Adventure"]}
    assert json.loads((out / "ml-100k.inter.json").read_text()) == {"0": [0, 1, 2], "1": [0, 1, 2], "2": [0, 1, 2]}


def test_raw_grouplens_1m(tmp_path):
    src = tmp_path / "raw"
    src.mkdir()
    (src / "movies.dat").write_text("1::Toy Story (1995)::Animation|Children's|Comedy\n2::Heat (1995)::Action|Crime\n")
    (src / "ratings.dat").write_text("1::2::5::20\n1::1::4::10\n2::1::3::5\n2::2::3::6\n")
    out = run(PrepareConfig(dataset="ml-1m", source=str(src), root=str(tmp_path / "d"), kcore=2))
    items = json.loads((out / "ml-1m.item.json").read_text())
    assert items["0"]["title"] == "Toy Story (1995)" and items["0"]["description"] == "Animation, Children's, Comedy"
    assert json.loads((out / "ml-1m.inter.json").read_text()) == {"0": [0, 1], "1": [0, 1]}


def test_malformed_raw_line_names_file_and_line(tmp_path):
    from gti.core.errors import DataError

    src = tmp_path / "raw"
    src.mkdir()
    (src / "movies.dat").write_text("1::Toy Story (1995)::Animation\n")
    (src / "ratings.dat").write_text("1::1::5::20\n1::1::4\n")
    with pytest.raises(DataError, match=r"ratings.dat: line 2"):
        run(PrepareConfig(dataset="ml-1m", source=str(src), root=str(tmp_path / "d")))
