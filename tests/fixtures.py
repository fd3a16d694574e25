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
