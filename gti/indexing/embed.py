"""Item text -> one vector per item, cached beside the dataset: a sentence encoder (MiniLM by default) or the
backbone LM's mean-pooled last hidden states. `gti.indexing.build` quantises these vectors into SIDs."""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np

from gti.core.config import SidsConfig
from gti.core.io import save_npy, text_sha256
from gti.core.log import get_logger
from gti.data.dataset import dataset_file

log = get_logger("sids")


def encoder_tag(cfg: SidsConfig) -> str:
    """File-name-safe encoder name: minilm | backbone-<model> | <folder name>-<hash of the path>."""

    def clean(s: str) -> str:
        return re.sub(r"[^A-Za-z0-9._-]+", "_", s).strip("._-") or "encoder"

    def short(s: str) -> str:
        return clean(Path(s).name) + "-" + text_sha256(s)[:8] if "/" in s or os.sep in s else clean(s)

    return f"backbone-{short(cfg.model)}" if cfg.encoder == "backbone" else short(cfg.encoder)


def embed_sentence_transformer(texts: list[str], encoder: str, batch_size: int, progress: bool = True) -> np.ndarray:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from sentence_transformers import SentenceTransformer

    from gti.core.assets import resolve_encoder

    model = SentenceTransformer(resolve_encoder(encoder), device="cpu")
    X = model.encode(texts, batch_size=batch_size, show_progress_bar=progress, convert_to_numpy=True)
    return np.asarray(X, dtype=np.float32)


def embed_backbone(texts: list[str], model_name: str, batch_size: int, max_length: int, progress: bool = True) -> np.ndarray:
    """Mean of the LM's last hidden states over the non-pad tokens of each text."""
    import torch
    from tqdm.auto import tqdm
    from transformers import AutoModel, AutoTokenizer

    from gti.core.assets import resolve_model

    path = resolve_model(model_name)
    tok = AutoTokenizer.from_pretrained(path)
    tok.padding_side = "right"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model = AutoModel.from_pretrained(path, dtype=torch.float32).eval()
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))  # similar lengths per batch: less padding
    out = np.zeros((len(texts), model.config.hidden_size), dtype=np.float32)
    with torch.inference_mode():
        for start in tqdm(range(0, len(texts), batch_size), desc="embed (backbone)", disable=not progress):
            idx = order[start : start + batch_size]
            enc = tok([texts[i] for i in idx], padding=True, truncation=True, max_length=max_length, return_tensors="pt")
            h = model(**enc).last_hidden_state  # (B, T, d)
            mask = enc["attention_mask"].unsqueeze(-1).to(h.dtype)  # (B, T, 1)
            out[idx] = ((h * mask).sum(1) / mask.sum(1).clamp_min(1)).float().numpy()
    return out


def embeddings(cfg: SidsConfig, texts: list[str], key: str, old: dict | None) -> tuple[np.ndarray, bool]:
    """Cached (n, d) matrix, else embed and cache. A cache is used when it has one row per item and
    the last report does not record other inputs for it (a user-supplied file has no record)."""
    path = dataset_file(cfg.data.root, cfg.data.name, f"emb-{encoder_tag(cfg)}")
    recorded = (old or {}).get("embedding", {})
    if path.is_file() and (recorded.get("file") != path.name or recorded.get("key") == key):
        X = np.load(path, allow_pickle=False)
        if X.ndim == 2 and X.shape[0] == len(texts):
            log.info(f"using cached embeddings {path} {X.shape}")
            return X.astype(np.float32, copy=False), True
        log.info(f"{path} has shape {X.shape}, expected ({len(texts)}, d): re-embedding")
    if cfg.encoder == "backbone":
        X = embed_backbone(texts, cfg.model, cfg.embed_batch_size, cfg.embed_max_length)
    else:
        X = embed_sentence_transformer(texts, cfg.encoder, cfg.embed_batch_size)
    save_npy(path, X)
    return X, False
