"""SASRec, the ID-based reference recommender: model, data, LightningModule, full-catalogue ranking.

SASRec (Kang & McAuley, ICDM 2018): item embeddings (scaled by sqrt(d)) + learned absolute positions, causal
self-attention blocks, a final LayerNorm; an item's score is the dot product of the last hidden state with its
(shared) embedding. The blocks are pre-LN (x + Attn(LN(x)), x + FFN(LN(x))): the original normalises the query
side only, later PyTorch ports and most re-implementations normalise both; that is the one difference here.
Trained as SASRec+ (Klenitskiy & Vasilev, RecSys 2023): full-softmax cross-entropy over the whole catalogue at
every position, Adam. Ranking scores every item (docs/evaluation.md): nothing is filtered, history items
included, as the LM stages' beam search may return them too.

Item ids are shifted by one inside the model: 0 is padding, item i is row i + 1 of the embedding table.
Sequences are left-padded to `max_len`, so the last item always sits at position max_len - 1, in training
as in ranking.
"""

from __future__ import annotations

import math

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn

from gti.core.config import DataConfig, SasrecConfig
from gti.data.dataset import Dataset, Example
from gti.rank.metrics import RankingMetrics


# ----------------------------------------------------------------------------------------- model
class CausalBlock(nn.Module):
    """Pre-LN: x + Dropout(Attn(LN(x))), then x + Dropout(FFN(LN(x))); the FFN is d -> d -> d with ReLU, as in the paper."""

    def __init__(self, hidden: int, heads: int, dropout: float):
        super().__init__()
        self.heads, self.dropout = heads, dropout
        self.ln1, self.ln2 = nn.LayerNorm(hidden), nn.LayerNorm(hidden)
        self.qkv, self.out = nn.Linear(hidden, 3 * hidden), nn.Linear(hidden, hidden)
        self.ffn = nn.Sequential(nn.Linear(hidden, hidden), nn.ReLU(), nn.Dropout(dropout), nn.Linear(hidden, hidden))
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
        B, T, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(B, T, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)  # 3 x (B, H, T, d/H)
        p = self.dropout if self.training else 0.0
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, dropout_p=p)  # (B, H, T, d/H)
        x = x + self.drop(self.out(a.transpose(1, 2).reshape(B, T, d)))
        return x + self.drop(self.ffn(self.ln2(x)))


class SasrecModel(nn.Module):
    def __init__(self, num_items: int, hidden: int = 64, blocks: int = 2, heads: int = 1, dropout: float = 0.2, max_len: int = 50):
        super().__init__()
        self.config = dict(num_items=num_items, hidden=hidden, blocks=blocks, heads=heads, dropout=dropout, max_len=max_len)
        self.items = nn.Embedding(num_items + 1, hidden, padding_idx=0)  # row 0: padding
        self.positions = nn.Embedding(max_len, hidden)
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(CausalBlock(hidden, heads, dropout) for _ in range(blocks))
        self.ln = nn.LayerNorm(hidden)
        for emb in (self.items, self.positions):  # Xavier-normal embeddings, as the widely used SASRec.pytorch port
            nn.init.xavier_normal_(emb.weight)
        with torch.no_grad():
            self.items.weight[0].zero_()

    def forward(self, seq: torch.Tensor) -> torch.Tensor:
        """seq (B, T) of shifted ids, 0 = padding -> hidden states (B, T, d); position t sees items 0..t only."""
        B, T = seq.shape
        x = self.items(seq) * math.sqrt(self.items.embedding_dim) + self.positions(torch.arange(T, device=seq.device))
        real = seq > 0  # (B, T)
        x = self.drop(x) * real.unsqueeze(-1)
        causal = torch.ones(T, T, dtype=torch.bool, device=seq.device).tril()
        # real positions attend to earlier real ones; a padding position only to itself (a row with no key is NaN)
        allowed = (causal & real[:, None, :]) | torch.eye(T, dtype=torch.bool, device=seq.device)  # (B, T, T)
        for block in self.blocks:
            x = block(x, allowed.unsqueeze(1)) * real.unsqueeze(-1)
        return self.ln(x)

    def scores(self, hidden: torch.Tensor) -> torch.Tensor:
        """(..., d) -> (..., num_items): every catalogue item's score, item i in column i (padding row left out)."""
        return hidden @ self.items.weight[1:].T


def catalogue_ranking(scores: torch.Tensor, targets: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """scores (B, N) over the whole catalogue -> (0-based rank of each target among all N items (B,), top-k items (B, k)).

    One stable descending sort, so the rank and the top-k list agree; exact ties go to the smaller item id."""
    order = torch.argsort(scores, dim=1, descending=True, stable=True)  # (B, N)
    ranks = (order == targets[:, None]).int().argmax(dim=1)
    return ranks, order[:, :k]


# ----------------------------------------------------------------------------------------- data
def load_data(data: DataConfig) -> Dataset:
    """data/NAME as the LM stages see it (MovieLens prepared on demand), without SIDs: SASRec needs none."""
    from gti.data.convert import ensure_prepared
    from gti.data.dataset import load_dataset
    from gti.data.slices import subset

    ensure_prepared(data.name, data.root)
    return subset(load_dataset(data.root, data.name), data.max_users, data.max_items)


def train_windows(inter: dict[int, list[int]], max_len: int) -> list[list[int]]:
    """Each user's training part seq[:-2] (leave_one_out: the last two are valid and test) cut from the end into
    windows of max_len + 1 items that share one item: every training target of the LM stages' split is predicted
    once, from at most max_len items before it."""
    windows = []
    for user in sorted(inter):
        train = inter[user][:-2]
        for end in range(len(train), 1, -max_len):
            windows.append(train[max(0, end - max_len - 1) : end])
    return windows


def _left_pad(seqs: list, max_len: int, fill: int) -> torch.Tensor:
    out = torch.full((len(seqs), max_len), fill, dtype=torch.long)
    for row, s in enumerate(seqs):
        if s:
            out[row, -len(s) :] = torch.as_tensor(s[-max_len:])
    return out


def collate_train(windows: list[list[int]], max_len: int) -> dict:
    """Position t reads item t and predicts item t + 1: inputs (B, T) shifted ids, targets (B, T) item ids, -100 at
    padding. The loss also needs where the real targets are: target_positions of the batch."""
    return {
        "seq": _left_pad([[i + 1 for i in w[:-1]] for w in windows], max_len, 0),
        "target": _left_pad([w[1:] for w in windows], max_len, -100),
    }


def target_positions(batch: dict) -> dict:
    """Adds `rows`, `cols`: the (row, position) of every real target. Found here, on the host, by the loader: on
    the device the same `nonzero` would make the host wait for the previous step to finish."""
    batch["rows"], batch["cols"] = (batch["target"] >= 0).nonzero(as_tuple=True)
    return batch


class Padded(torch.utils.data.Dataset):
    """Equal-length columns padded once (collate_train of every window): example i is row i of each, and a batch is
    one index into each column (the loader calls __getitems__), not a Python loop padding lists at every step."""

    def __init__(self, columns: dict[str, torch.Tensor]):
        self.columns = columns

    def __len__(self) -> int:
        return len(next(iter(self.columns.values())))

    def __getitem__(self, i: int) -> dict:
        return {k: v[i] for k, v in self.columns.items()}

    def __getitems__(self, indices: list[int]) -> dict:
        rows = torch.as_tensor(indices)
        return {k: v[rows] for k, v in self.columns.items()}


def unseen_scores(scores: torch.Tensor, seen: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """scores (B, N) with every item of the user's history (`seen` (B, L) item ids, -1 padding) set to -inf, the
    held-out item excepted: the ranking most published SASRec figures report ("filter seen")."""
    B, N = scores.shape
    mask = torch.zeros(B, N + 1, dtype=torch.bool, device=scores.device)  # column N: where the padding lands
    mask.scatter_(1, seen.masked_fill(seen < 0, N), True)
    mask = mask[:, :N]
    mask[torch.arange(B, device=scores.device), targets] = False
    return scores.masked_fill(mask, float("-inf"))


def collate_eval(examples: list[Example], max_len: int) -> dict:
    """The model reads the last max_len history items; `seen` holds the whole history (-1 padded), for the
    seen-filtered ranking."""
    longest = max((len(ex.history) for ex in examples), default=0)
    return {
        "seq": _left_pad([[i + 1 for i in ex.history] for ex in examples], max_len, 0),
        "seen": _left_pad([list(ex.history) for ex in examples], max(longest, 1), -1),
        "target": torch.tensor([ex.target for ex in examples]),
        "index": torch.tensor([ex.index for ex in examples]),
        "user": torch.tensor([ex.user for ex in examples]),
    }


def eval_batches(examples: list[Example], max_len: int, batch_size: int) -> list[dict]:
    """collate_eval of every `batch_size` examples, in order: built once, the same batches every epoch."""
    return [collate_eval(examples[i : i + batch_size], max_len) for i in range(0, len(examples), batch_size)]


# ----------------------------------------------------------------------------------------- LightningModule
class SasrecModule(L.LightningModule):
    """Full-softmax cross-entropy at every real position; validation and test rank the whole catalogue twice: as
    the LM stages do (history items kept: `val/`, `test_metrics`), and with the user's history removed
    (`val_unseen/`, `test_unseen`), as published SASRec figures are."""

    def __init__(self, model: SasrecModel, cfg: SasrecConfig):
        super().__init__()
        self.model, self.cfg = model, cfg
        ks = tuple(cfg.eval.ks)
        self.val_metrics, self.test_metrics = RankingMetrics(ks), RankingMetrics(ks)
        self.val_unseen, self.test_unseen = RankingMetrics(ks), RankingMetrics(ks)
        self.predictions: list[dict] = []
        self.history: list[dict] = []  # per fitted epoch: {"epoch" (1-based), "loss", validation metrics}
        self._losses: list[torch.Tensor] = []

    def loss(self, batch: dict) -> torch.Tensor:
        rows, cols = batch["rows"], batch["cols"]  # (M,): the real targets' places (target_positions)
        hidden = self.model(batch["seq"])[rows, cols]  # (M, d), not (B, T, d): logits only where a target is read
        return F.cross_entropy(self.model.scores(hidden).float(), batch["target"][rows, cols])

    def training_step(self, batch, batch_idx):
        loss = self.loss(batch)
        self._losses.append(loss.detach())
        self.log("train/loss", loss, prog_bar=True, batch_size=batch["seq"].shape[0])
        return loss

    def _rank(self, batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(ranks (B,), top-k (B, k), ranks with the history removed (B,))."""
        scores = self.model.scores(self.model(batch["seq"])[:, -1])  # (B, N): the last position, every item
        k = max(self.cfg.eval.ks)
        ranks, top = catalogue_ranking(scores, batch["target"], k)
        unseen, _ = catalogue_ranking(unseen_scores(scores, batch["seen"], batch["target"]), batch["target"], k)
        return ranks, top, unseen

    def validation_step(self, batch, batch_idx):
        ranks, _, unseen = self._rank(batch)
        self.val_metrics.update(batch["index"], ranks)
        self.val_unseen.update(batch["index"], unseen)

    def on_validation_epoch_end(self):
        result, unseen = self.val_metrics.compute(), self.val_unseen.compute()
        self.val_metrics.reset(), self.val_unseen.reset()
        for prefix, values in (("val", result), ("val_unseen", unseen)):
            for k, v in values.items():
                self.log(f"{prefix}/{k}", float(v), sync_dist=True)  # already synced: every rank holds the same value
        if self.trainer.state.fn == "fit" and not self.trainer.sanity_checking:
            loss = float(torch.stack(self._losses).mean()) if self._losses else float("nan")
            self._losses.clear()
            self.history.append({"epoch": self.current_epoch + 1, "loss": round(loss, 4), **result})
            self.say_epoch()

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["sasrec_history"] = self.history  # a resumed run reports and picks its best epoch from all of them

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        if self.trainer.state.fn == "fit":  # not when validate/test restore the best epoch: the history stays whole
            self.history = list(checkpoint.get("sasrec_history", []))

    def say_epoch(self) -> None:
        from gti.core.log import get_logger

        now, m = self.history[-1], self.cfg.monitor
        best = max(self.history, key=lambda h: h[m])  # the first of equals, as ModelCheckpoint keeps it
        get_logger("sasrec").info(
            f"epoch {now['epoch']}: train loss {now['loss']:.4f}, valid "
            + ", ".join(f"{k} {now[k]:.4f}" for k in now if "@" in k)
            + f" (best {m} {best[m]:.4f} at epoch {best['epoch']})"
        )

    def test_step(self, batch, batch_idx):
        ranks, top, unseen = self._rank(batch)
        self.test_metrics.update(batch["index"], ranks)
        self.test_unseen.update(batch["index"], unseen)
        rows = zip(batch["index"].tolist(), batch["user"].tolist(), batch["target"].tolist(), ranks.tolist(), top.tolist())
        self.predictions += [{"index": i, "user": u, "target": t, "rank": r, "items": its} for i, u, t, r, its in rows]

    def configure_optimizers(self):
        o = self.cfg.optim  # betas as the paper's Adam (0.9, 0.98)
        return torch.optim.Adam(self.model.parameters(), lr=o.lr, betas=(0.9, 0.98), weight_decay=o.weight_decay)


class EpochCheckpoint(L.Callback):
    """The whole training state at the end of every epoch, validation and early-stopping state included, written to
    a temporary name and renamed: a run killed at any moment leaves the last finished epoch's checkpoint intact."""

    def __init__(self, path):
        from pathlib import Path

        self.path = Path(path)

    def on_train_epoch_end(self, trainer, module):  # after the epoch's validation, so its result is in the state
        tmp = self.path.with_name(self.path.name + ".tmp")
        trainer.save_checkpoint(tmp)  # collective under DDP; rank 0 writes
        if trainer.is_global_zero:
            tmp.replace(self.path)


# ----------------------------------------------------------------------------------------- saving
def save_model(model: SasrecModel, folder) -> None:
    """model/config.json (the constructor's arguments) + model.safetensors: `load_model(folder)` rebuilds it."""
    from pathlib import Path

    from safetensors.torch import save_file

    from gti.core.io import write_json

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    write_json(folder / "config.json", {"model_type": "sasrec", **model.config})
    save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, str(folder / "model.safetensors"))


def load_model(folder) -> SasrecModel:
    import json
    from pathlib import Path

    from safetensors.torch import load_file

    config = json.loads((Path(folder) / "config.json").read_text())
    config.pop("model_type", None)
    model = SasrecModel(**config)
    model.load_state_dict(load_file(str(Path(folder) / "model.safetensors")))
    return model.eval()


def config_problems(cfg: SasrecConfig) -> list[str]:
    """What is wrong with a SASRec config, all at once, before any compute."""
    problems = []
    if cfg.data.max_history < 1:
        problems.append(f"data.max_history={cfg.data.max_history}: SASRec needs a sequence length >= 1")
    if cfg.hidden < 1 or cfg.heads < 1 or cfg.hidden % max(cfg.heads, 1):
        problems.append(f"hidden={cfg.hidden}, heads={cfg.heads}: hidden must be a positive multiple of heads")
    if cfg.blocks < 1:
        problems.append(f"blocks={cfg.blocks}: needs at least one self-attention block")
    if not 0 <= cfg.dropout < 1:
        problems.append(f"dropout={cfg.dropout}: must be in [0, 1)")
    if not cfg.eval.ks or min(cfg.eval.ks) < 1:
        problems.append(f"eval.ks={list(cfg.eval.ks)}: needs one or more cut-offs >= 1")
    elif cfg.monitor not in {f"{m}@{k}" for m in ("recall", "ndcg") for k in cfg.eval.ks}:
        problems.append(f"monitor={cfg.monitor!r}: must be recall@K or ndcg@K with K in eval.ks={list(cfg.eval.ks)}")
    if cfg.patience < 1:
        problems.append(f"patience={cfg.patience}: must be >= 1 epoch")
    return problems
