"""A small hand-written native dataset (LC-Rec family files) with a collision-free SID index."""

from __future__ import annotations

import json
from pathlib import Path

GENRES = ["Comedy", "Drama", "Horror", "Action"]


def write_toy_dataset(root: Path, name: str = "toy", users: int = 9, items: int = 12) -> Path:
    d = Path(root) / name
    d.mkdir(parents=True, exist_ok=True)
    item = {str(i): {"title": f"Movie {i} ({1990 + i})", "description": GENRES[i % 4]} for i in range(items)}
    # user u watches a window of 6 items starting at u (wrapping): every item is seen several times
    inter = {str(u): [(u + k) % items for k in range(6)] for u in range(users)}
    index = {str(i): [f"<a_{i % 4}>", f"<b_{i // 4}>", f"<c_{i % 2}>"] for i in range(items)}
    (d / f"{name}.item.json").write_text(json.dumps(item))
    (d / f"{name}.inter.json").write_text(json.dumps(inter))
    (d / f"{name}.index.json").write_text(json.dumps(index))
    return d


def add_callbacks(monkeypatch, *callbacks) -> None:
    """Every Trainer the stages build gets these callbacks too (the stages import make_trainer at call time)."""
    import gti.train.trainer

    real = gti.train.trainer.make_trainer

    def make_trainer(t, run_dir, max_steps, cbs=None, **kw):
        return real(t, run_dir, max_steps, [*(cbs or []), *callbacks], **kw)

    monkeypatch.setattr(gti.train.trainer, "make_trainer", make_trainer)


def spy_train_rows(monkeypatch) -> dict:
    """Record what gti.finetune.run really trains on: its rows (as Encoded) and the split examples behind them."""
    import gti.train.rows
    from gti.data.dataset import leave_one_out
    from gti.testing import last_per_user
    from gti.train.templates import Encoded

    seen: dict = {}
    real = gti.train.rows.rec_train_rows

    def rec_train_rows(ds, fmt, cfg, new, stage="gti.finetune"):
        rows = real(ds, fmt, cfg, new, stage)
        train = leave_one_out(ds.inter, cfg.data.max_history)["train"]
        if cfg.train_per_user > 0:
            train = last_per_user(train, cfg.train_per_user, max(cfg.data.max_history, 1) if cfg.history_loss else 1)
        rows_ = [Encoded(r["input_ids"], r["labels"]) for r in rows]
        seen.update(ds=ds, train=train, rows=rows_, new=new, tokenizer=fmt.tok)
        return rows

    monkeypatch.setattr(gti.train.rows, "rec_train_rows", rec_train_rows)
    return seen
