"""Semantic IDs: residual k-means, dedup, RQ-VAE, foreign-index import, the `gti.sids` stage."""

from __future__ import annotations

import json

import numpy as np
import pytest

from gti.core.config import DataConfig, SidsConfig, load_config
from gti.core.errors import ConfigError, DataError
from gti.data.dataset import dataset_file, write_dataset
from gti.data.sid_index import analyze_index
from gti.indexing.build import codebooks_path, codevecs_path, run
from gti.indexing.quantize import dedup_level, repair_index, rq_kmeans, to_tokens, usage_report
from gti.sids import main

GENRES = ["Comedy", "Drama", "Horror", "Sci-Fi", "Western"]


def make_dataset(root, name="toy", n_items=60, dup_of: dict[int, int] | None = None, emb: np.ndarray | None = None):
    """n_items movies; dup_of maps item -> earlier item whose text (and embedding row) it copies."""
    items = {i: {"title": f"Movie {i} ({1950 + i})", "description": GENRES[i % 5]} for i in range(n_items)}
    for i, j in (dup_of or {}).items():
        items[i] = dict(items[j])
    inter = {u: [(u + k) % n_items for k in range(5)] for u in range(10)}
    write_dataset(root, name, inter, items)
    if emb is not None:
        np.save(dataset_file(root, name, "emb-minilm"), emb.astype(np.float32))
    return items


def clustered(n: int, d: int = 16, centers: int = 6, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    mu = rng.normal(size=(centers, d)) * 3
    return (mu[rng.integers(centers, size=n)] + rng.normal(size=(n, d))).astype(np.float32)


def cfg_for(root, **kw) -> SidsConfig:
    return SidsConfig(data=DataConfig(name=kw.pop("name", "toy"), root=str(root)), **{"levels": 2, "codes": 4, **kw})


# ----------------------------------------------------------------------------------------- pure functions
def test_rq_kmeans_is_deterministic_for_a_seed():
    X = clustered(300)
    a, books_a = rq_kmeans(X, 3, 8, iters=20, seed=7, progress=False)
    b, books_b = rq_kmeans(X, 3, 8, iters=20, seed=7, progress=False)
    assert a.shape == (300, 3) and a.dtype == np.int64 and a.max() < 8
    assert np.array_equal(a, b) and all(np.array_equal(x, y) for x, y in zip(books_a, books_b, strict=True))
    assert [cb.shape for cb in books_a] == [(8, 16)] * 3
    plain, _ = rq_kmeans(X, 3, 8, iters=20, seed=7, balanced=False, progress=False)
    assert not np.array_equal(plain, a)  # the option changes the result (and is hashed by gti.sids)


def test_rq_kmeans_fewer_items_than_codes_and_duplicates():
    X = np.repeat(clustered(3), 4, axis=0)  # 12 rows, 3 distinct
    codes, books = rq_kmeans(X, 2, 16, iters=5, seed=0, progress=False)
    assert codes.shape == (12, 2) and books[0].shape == (16, 16)
    assert len(np.unique(codes[:, 0])) == 3  # one code per distinct row; the other 13 stay unused
    assert (codes[0::4] == codes[1::4]).all()  # identical rows, identical codes


def test_dedup_level_hand_computed():
    codes = np.array([[0, 1], [0, 1], [2, 3], [0, 1], [2, 3], [5, 5]])
    full, stats = dedup_level(codes)
    assert full[:, 2].tolist() == [0, 1, 0, 2, 1, 0]
    assert stats["collisions_before"] == 3 and stats["colliding_items"] == 5
    assert stats["colliding_prefixes"] == 2 and stats["max_bucket"] == 3 and stats["largest_bucket"] == [0, 1, 3]
    assert len({tuple(r) for r in full.tolist()}) == 6
    assert to_tokens(full[:1]) == [["<a_0>", "<b_1>", "<c_0>"]]


def test_usage_report_hand_computed():
    u = usage_report(np.array([[0, 0], [0, 1], [1, 2], [1, 2]]), [2, None])
    assert u[0] == {"level": 0, "letter": "a", "used": 2, "codes": 2, "entropy_bits": 1.0, "max_bucket": 2, "max_entropy_bits": 1.0}
    assert u[1]["used"] == 3 and u[1]["codes"] == 3 and u[1]["entropy_bits"] == 1.5 and u[1]["max_bucket"] == 2


def test_rqvae_reconstruction_loss_falls():
    from gti.indexing.rqvae import rq_vae

    X = clustered(256, d=24)
    codes, books, history = rq_vae(X, 2, 8, code_dim=8, hidden=32, epochs=20, batch_size=64, lr=1e-2, progress=False)
    assert codes.shape == (256, 2) and codes.max() < 8 and [b.shape for b in books] == [(8, 8)] * 2
    assert len(history) == 20 and all(np.isfinite(h["loss"]) for h in history)
    assert history[-1]["recon"] < 0.7 * history[0]["recon"]


def test_analyze_and_repair_a_colliding_one_based_index():
    index = {0: ["<a_1>", "<b_1>"], 1: ["<a_1>", "<b_1>"], 2: ["<a_1>", "<b_1>"], 3: ["<a_2>", "<b_1>"], 4: ["<a_2>", "<b_2>"]}
    rep = analyze_index(index)
    assert (rep["collisions"], rep["colliding_items"], rep["colliding_sids"], rep["max_bucket"]) == (2, 3, 1, 3)
    assert rep["code_base"] == 1 and rep["examples"][0] == {"sid": "<a_1><b_1>", "items": [0, 1, 2], "size": 3}
    fixed, rep2 = repair_index(index)
    assert rep2["repaired"] and rep2["dedup_prefix"] == "c"
    assert [fixed[i][-1] for i in range(5)] == ["<c_1>", "<c_2>", "<c_3>", "<c_1>", "<c_1>"]
    assert analyze_index(fixed)["collisions"] == 0


def test_repair_keeps_the_letter_case_and_cures_prefix_conflicts():
    index = {0: ["<A_0>", "<B_3>"], 1: ["<A_0>"], 2: ["<A_1>", "<B_3>"]}
    rep = analyze_index(index)
    assert rep["collisions"] == 0 and rep["prefix_conflicts"] == 1 and rep["lengths"] == {"1": 1, "2": 2}
    fixed, rep2 = repair_index(index)
    assert rep2["dedup_prefix"] == "C" and fixed[1] == ["<A_0>", "<C_0>"]
    assert analyze_index(fixed)["prefix_conflicts"] == 0
    same, rep3 = repair_index({0: ["<x_1>"], 1: ["<x_2>"]})
    assert not rep3["repaired"] and same == {0: ["<x_1>"], 1: ["<x_2>"]}


# ----------------------------------------------------------------------------------------- the stage
def test_build_writes_collision_free_index_on_duplicates(tmp_path):
    dup = {i: i - 30 for i in range(30, 40)}  # items 30..39 copy items 0..9
    X = clustered(60)
    X[30:40] = X[0:10]
    make_dataset(tmp_path, dup_of=dup, emb=X)
    report = run(cfg_for(tmp_path, kmeans_iters=10))
    index = json.loads(dataset_file(tmp_path, "toy", "index").read_text())
    assert len(index) == 60 and len({tuple(v) for v in index.values()}) == 60
    assert all(len(v) == 3 and v[2].startswith("<c_") for v in index.values())
    for i, j in dup.items():
        assert index[str(i)][:2] == index[str(j)][:2]  # same text, same prefix ...
        assert index[str(i)][2] != index[str(j)][2]  # ... told apart by the dedup level
    assert report["collisions_before_dedup"] >= 10 and report["collisions_after_dedup"] == 0
    assert report["embedding"]["cached"] and report["embedding"]["dim"] == 16
    assert set(report["wall_time_s"]) >= {"load", "embed", "quantize", "write", "total"}
    assert [u["letter"] for u in report["usage"]] == ["a", "b", "c"]
    cv, cb = np.load(codevecs_path(tmp_path, "toy")), np.load(codebooks_path(tmp_path, "toy"))
    assert cv.shape == (60, 16) and cb.shape == (2, 4, 16)
    first = {int(k): int(v[0][3:-1]) for k, v in index.items()}
    second = {int(k): int(v[1][3:-1]) for k, v in index.items()}
    np.testing.assert_allclose(cv[5], cb[0, first[5]] + cb[1, second[5]], rtol=1e-5, atol=1e-6)


def test_same_seed_same_index_and_skip_when_unchanged(tmp_path, capsys):
    make_dataset(tmp_path, emb=clustered(60))
    first = run(cfg_for(tmp_path))
    index_path = dataset_file(tmp_path, "toy", "index")
    text, mtime = index_path.read_text(), index_path.stat().st_mtime_ns
    again = run(cfg_for(tmp_path))
    assert again["skipped"] and not first["skipped"] and again["input_hash"] == first["input_hash"]
    assert index_path.stat().st_mtime_ns == mtime and "skipped" in capsys.readouterr().out
    forced = run(cfg_for(tmp_path, force=True))
    assert not forced["skipped"] and index_path.read_text() == text  # same seed -> same index
    changed = run(cfg_for(tmp_path, codes=5, force=True))  # other settings: force=true (tests/test_sid_settings.py)
    assert not changed["skipped"] and changed["input_hash"] != first["input_hash"]


def test_import_colliding_index_reports_and_repairs(tmp_path):
    make_dataset(tmp_path, n_items=5)
    src = tmp_path / "foreign.index.json"
    src.write_text(json.dumps({"0": ["<a_1>", "<b_1>"], "1": ["<a_1>", "<b_1>"], "2": ["<a_1>", "<b_1>"], "3": ["<a_2>", "<b_1>"], "4": ["<a_2>", "<b_2>"]}))
    with pytest.raises(DataError, match=r"foreign.index.json: 2 items share a SID.*<a_1><b_1> -> items 0, 1, 2.*repair=true"):
        run(cfg_for(tmp_path, import_index=str(src), repair=False))
    report = run(cfg_for(tmp_path, import_index=str(src), repair=True))
    assert report["collisions"] == 2 and report["max_bucket"] == 3 and report["repaired"]
    written = json.loads(dataset_file(tmp_path, "toy", "index").read_text())
    assert written["2"] == ["<a_1>", "<b_1>", "<c_3>"] and written["4"] == ["<a_2>", "<b_2>", "<c_1>"]
    again = run(cfg_for(tmp_path))  # a plain build does not overwrite an imported index
    assert again["skipped"] and again["quantizer"] == "imported"


@pytest.mark.parametrize(
    "content, pattern",
    [
        ({"0": ["<a_1>"], "1": ["a_1"], "2": ["<a_2>"]}, r"bad.json: item '1': token 'a_1'"),
        ({"0": ["<a_1>"], "1": "<a_1>", "2": ["<a_2>"]}, r"bad.json: item '1': expected a non-empty list"),
        ({"0": ["<a_1>"], "x": ["<a_1>"]}, r"bad.json: key 'x' is not an integer"),
        ({"0": ["<a_1>"], "1": ["<a_2>"], "2": ["<a_3>"], "7": ["<a_4>"]}, r"bad.json: key '7' is not an item of .*toy.item.json"),
        ({"0": ["<a_1>"], "2": ["<a_3>"]}, r"bad.json: 1 items of .*toy.item.json have no SID, e.g. items 1"),
    ],
)
def test_malformed_index_names_file_and_key(tmp_path, content, pattern):
    make_dataset(tmp_path, n_items=3)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(content))
    with pytest.raises(DataError, match=pattern):
        run(cfg_for(tmp_path, import_index=str(bad)))


def test_bad_config_reports_every_problem(tmp_path):
    with pytest.raises(ConfigError) as e:
        run(cfg_for(tmp_path, quantizer="pq", codes=1, kmeans_iters=0))
    assert all(k in str(e.value) for k in ("quantizer='pq'", "codes=1", "kmeans_iters=0"))
    with pytest.raises(ConfigError, match=r"nope.inter.json not found; run `python -m gti.prepare`"):
        run(cfg_for(tmp_path, name="nope"))
    with pytest.raises(SystemExit) as exit_:
        main([f"data.root={tmp_path}", "codez=3"])
    assert exit_.value.code == 2


def test_sids_configs_load():
    assert load_config(SidsConfig, ["configs/sids.yaml"]).quantizer == "rqkmeans"
    assert load_config(SidsConfig, ["configs/sids-rqvae.yaml"]).quantizer == "rqvae"


def test_backbone_embedding_is_padding_invariant(tiny_model_dir):
    from gti.indexing.embed import embed_backbone

    texts = ["Toy Story (1995). Animation", "Heat (1995). Action, Crime, Thriller and a much longer tail of words", "Up"]
    batched = embed_backbone(texts, tiny_model_dir, batch_size=3, max_length=32, progress=False)
    alone = np.stack([embed_backbone([t], tiny_model_dir, batch_size=1, max_length=32, progress=False)[0] for t in texts])
    assert batched.shape == (3, 64)
    np.testing.assert_allclose(batched, alone, atol=1e-4)


@pytest.mark.slow
def test_real_minilm_on_twenty_items(tmp_path):
    titles = ["Toy Story (1995)", "Toy Story 2 (1999)", "Heat (1995)", "Alien (1979)", "Aliens (1986)", "Fargo (1996)",
              "Babe (1995)", "Casino (1995)", "Clueless (1995)", "Sabrina (1995)", "Jumanji (1995)", "Balto (1995)",
              "Nixon (1995)", "Othello (1995)", "Persuasion (1995)", "Twister (1996)", "Scream (1996)",
              "Titanic (1997)", "Contact (1997)", "Gattaca (1997)"]  # fmt: skip
    items = {i: {"title": t, "description": GENRES[i % 5]} for i, t in enumerate(titles)}
    write_dataset(tmp_path, "toy", {0: [0, 1, 2, 3]}, items)
    report = run(cfg_for(tmp_path, encoder="minilm", levels=2, codes=4))
    X = np.load(dataset_file(tmp_path, "toy", "emb-minilm"))
    assert X.shape == (20, 384) and not report["embedding"]["cached"]
    cos = X @ X.T / np.outer(np.linalg.norm(X, axis=1), np.linalg.norm(X, axis=1))
    assert cos[0, 1] > cos[0, 2] and cos[3, 4] > cos[3, 5]  # sequels are neighbours
    assert report["collisions_after_dedup"] == 0
