"""Geometry of a new-token matrix E (n x d): why one initialisation works better than another (design.md §8).

Plain torch/scipy; `gti.diagnose` applies it to run folders.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import torch
import torch.nn.functional as F

SID = re.compile(r"^<([a-zA-Z])_(\d+)>$")


def level_of(token: str) -> int:
    """`<a_12>` -> 0, `<c_3>` -> 2; any other token -> -1."""
    m = SID.match(token)
    return ord(m.group(1).lower()) - ord("a") if m else -1


def spectrum(E: torch.Tensor, centered: bool = False) -> torch.Tensor:
    X = E.double()
    if centered:
        X = X - X.mean(0, keepdim=True)
    return torch.linalg.svdvals(X)


def effective_rank(s: torch.Tensor) -> float:
    """exp(entropy of s / sum(s)) (Roy & Vetterli 2007): n for a flat spectrum, 1 for rank one."""
    s = s[s > 1e-12 * s.max()] if s.numel() and s.max() > 0 else s[:0]
    if s.numel() == 0:
        return 0.0
    p = s / s.sum()
    return float(torch.exp(-(p * p.log()).sum()))


def participation_ratio(s: torch.Tensor) -> float:
    """(sum lambda)^2 / sum lambda^2 with lambda = s^2 (variance per direction)."""
    lam = s.double() ** 2
    return float(lam.sum() ** 2 / (lam**2).sum()) if lam.sum() > 0 else 0.0


def cosine_matrix(E: torch.Tensor) -> torch.Tensor:
    X = F.normalize(E.double(), dim=-1)
    return X @ X.T


def mean_cosine(E: torch.Tensor) -> float:
    """Mean off-diagonal pairwise cosine: 1.0 when every row points the same way (mean init)."""
    n = E.shape[0]
    if n < 2:
        return float("nan")
    C = cosine_matrix(E)
    return float((C.sum() - C.diagonal().sum()) / (n * (n - 1)))


def level_cosines(E: torch.Tensor, levels: list[int]) -> dict[str, float]:
    lv = torch.tensor(levels)
    C = cosine_matrix(E)
    same = lv.unsqueeze(0) == lv.unsqueeze(1)
    off = ~torch.eye(len(levels), dtype=torch.bool)
    within, across = C[same & off], C[~same]
    return {
        "within": float(within.mean()) if within.numel() else float("nan"),
        "across": float(across.mean()) if across.numel() else float("nan"),
    }


def rsa(E: torch.Tensor, C: torch.Tensor) -> dict[str, float]:
    """Representational similarity: Pearson and Spearman between the upper triangles of cos(E) and cos(C)."""
    from scipy.stats import pearsonr, spearmanr

    iu = torch.triu_indices(E.shape[0], E.shape[0], offset=1)
    a = cosine_matrix(E)[iu[0], iu[1]].numpy()
    b = cosine_matrix(torch.as_tensor(C))[iu[0], iu[1]].numpy()
    if a.std() < 1e-12 or b.std() < 1e-12:  # a collapsed matrix (mean init) has no structure to correlate
        return {"pearson": 0.0, "spearman": 0.0}
    return {"pearson": float(pearsonr(a, b)[0]), "spearman": float(spearmanr(a, b)[0])}


def nearest_tokens(rows: torch.Tensor, old_rows: torch.Tensor, tokenizer, k: int = 5) -> list[list[str]]:
    """The k old-vocabulary tokens closest (cosine) to each row, decoded to readable strings."""
    sims = F.normalize(rows.float(), dim=-1) @ F.normalize(old_rows.float(), dim=-1).T
    top = sims.topk(k, dim=-1).indices
    return [[tokenizer.decode([int(i)]) for i in row] for row in top]


def summarize(E, levels=None, code_vectors=None, old_rows=None, tokenizer=None, token_names=None, sample: int = 3) -> dict:
    E = E.detach().float().cpu()
    s_u, s_c = spectrum(E), spectrum(E, centered=True)
    out: dict = {
        "n": E.shape[0],
        "dim": E.shape[1],
        "singular_values": [round(float(x), 5) for x in s_u[:64]],
        "singular_values_centered": [round(float(x), 5) for x in s_c[:64]],
        "effective_rank": effective_rank(s_u),
        "effective_rank_centered": effective_rank(s_c),
        "participation_ratio": participation_ratio(s_c),
        "mean_cosine": mean_cosine(E),
        "mean_norm": float(E.norm(dim=-1).mean()),
    }
    if levels is not None and len(set(levels)) > 1:
        out["level_cosine"] = level_cosines(E, levels)
    if code_vectors is not None:
        out["rsa"] = rsa(E, torch.as_tensor(code_vectors).float())
    if old_rows is not None and tokenizer is not None and sample > 0:
        n = E.shape[0]
        pick = sorted({round(j * (n - 1) / max(sample - 1, 1)) for j in range(sample)})  # spread over levels
        names = token_names or [str(i) for i in range(n)]
        near = nearest_tokens(E[pick], old_rows, tokenizer)
        out["nearest_tokens"] = {names[i]: near[j] for j, i in enumerate(pick)}
    return out


# ----------------------------------------------------------------------------------------- plots
def _save(fig, path: str | os.PathLike) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp.png")
    fig.savefig(tmp, dpi=110)
    os.replace(tmp, path)


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_spectrum(matrices: dict[str, torch.Tensor], path) -> None:
    """Normalised singular values (centred) of several matrices on one log-scale plot."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, E in matrices.items():
        s = spectrum(E.float().cpu(), centered=True)
        s = s / s.max() if s.max() > 0 else s
        ax.semilogy(range(1, len(s) + 1), s.clamp(min=1e-12).numpy(), label=f"{name} (erank {effective_rank(s):.1f})")
    ax.set_xlabel("index")
    ax.set_ylabel("singular value / max (centred)")
    ax.set_title("spectrum of the new-token rows")
    ax.legend(fontsize=8)
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)


def _heatmap(ax, E: torch.Tensor, order: list[int], title: str):
    C = cosine_matrix(E.float().cpu())[order][:, order].numpy()
    im = ax.imshow(C, vmin=-1, vmax=1, cmap="RdBu_r", interpolation="nearest")
    ax.set_title(title, fontsize=9)
    ax.set_xticks([])
    ax.set_yticks([])
    return im


def plot_cosine_map(E: torch.Tensor, order: list[int], path, title: str = "cosine") -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5, 4.4))
    im = _heatmap(ax, E, order, title)
    fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)


def plot_cosine_maps(matrices: dict[str, torch.Tensor], path, order: list[int] | None = None) -> None:
    plt = _plt()
    n = len(matrices)
    fig, axes = plt.subplots(1, n, figsize=(3.2 * n, 3.4), squeeze=False)
    im = None
    for ax, (name, E) in zip(axes[0], matrices.items()):
        im = _heatmap(ax, E, order or list(range(E.shape[0])), name)
    fig.colorbar(im, ax=axes[0].tolist(), fraction=0.02)
    _save(fig, path)
    plt.close(fig)
