"""Geometry of a new-token matrix E (n x d): why one initialisation works better than another (docs/evaluation.md).

Plain torch/scipy/matplotlib (Agg, no pyplot state); `gti.diagnose` applies it to run folders.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from gti.core.io import save_figure
from gti.data.dataset import parse_sid_token


def level_of(token: str) -> int:
    """`<a_12>` -> 0, `<c_3>` -> 2 (letter - 'a', either case); any other token -> -1."""
    sid = parse_sid_token(token)
    return ord(sid[0].lower()) - ord("a") if sid and len(sid[0]) == 1 else -1


def level_order(tokens: list[str]) -> list[int]:
    """Row order for heatmaps: SID tokens by level then code, other tokens last (in their order)."""

    def key(i: int):
        level = level_of(tokens[i])
        return (0, level, parse_sid_token(tokens[i])[1], i) if level >= 0 else (1, 0, 0, i)

    return sorted(range(len(tokens)), key=key)


# ----------------------------------------------------------------------------------------- numbers
def spectrum(E: torch.Tensor, centered: bool = False) -> torch.Tensor:
    """Singular values of E (n, d), descending, float64; centred: of E minus its row mean."""
    X = E.detach().double().cpu()
    if centered:
        X = X - X.mean(0, keepdim=True)
    return torch.linalg.svdvals(X)


def effective_rank(s: torch.Tensor) -> float:
    """exp(entropy of s / sum(s)) (Roy & Vetterli 2007): k for k equal values, 1 for rank one, 0 for E = 0."""
    s = s.double()
    if s.numel() == 0 or s.max() <= 0:
        return 0.0
    s = s[s > 1e-12 * s.max()]  # numerical zeros carry no mass; 0 * log 0 = 0
    p = s / s.sum()
    return float(torch.exp(-(p * p.log()).sum()))


def participation_ratio(s: torch.Tensor) -> float:
    """(sum lambda)^2 / sum lambda^2 with lambda = s^2, the variance along each principal direction."""
    lam = s.double() ** 2
    return float(lam.sum() ** 2 / (lam**2).sum()) if lam.sum() > 0 else 0.0


def cosine_matrix(E: torch.Tensor) -> torch.Tensor:
    """(n, n) pairwise cosines in float64 (a zero row has cosine 0 with everything)."""
    X = F.normalize(E.detach().double().cpu(), dim=-1)
    return X @ X.T


def mean_cosine(E: torch.Tensor) -> float:
    """Mean off-diagonal pairwise cosine: 1.0 when every row points the same way (mean init); nan if n < 2."""
    n = E.shape[0]
    if n < 2:
        return float("nan")
    C = cosine_matrix(E)
    return float((C.sum() - C.diagonal().sum()) / (n * (n - 1)))


def level_cosines(E: torch.Tensor, levels: list[int]) -> dict[str, float]:
    """Mean cosine of pairs in the same SID level vs pairs in different levels.

    Rows with level < 0 (tokens that are not SID codes) are left out: they form no level.
    """
    if len(levels) != E.shape[0]:
        raise ValueError(f"level_cosines: {len(levels)} levels for {E.shape[0]} rows")
    lv = torch.tensor(levels)
    keep = lv >= 0
    C = cosine_matrix(E)[keep][:, keep]
    lv = lv[keep]
    same = lv.unsqueeze(0) == lv.unsqueeze(1)  # (m, m)
    off = ~torch.eye(len(lv), dtype=torch.bool)
    within, across = C[same & off], C[~same]
    return {
        "within": float(within.mean()) if within.numel() else float("nan"),
        "across": float(across.mean()) if across.numel() else float("nan"),
    }


def rsa(E: torch.Tensor, C: torch.Tensor) -> dict[str, float]:
    """Representational similarity: Pearson and Spearman between the upper triangles of cos(E) and cos(C).

    C: the quantiser's code vectors for the same rows, in the same order (any width). A matrix whose
    cosines are all equal (mean init: one point) has no structure to correlate: both are 0.
    """
    from scipy.stats import pearsonr, spearmanr

    C = torch.as_tensor(C)
    if C.shape[0] != E.shape[0]:
        raise ValueError(f"rsa: {E.shape[0]} rows in E but {C.shape[0]} code vectors")
    n = E.shape[0]
    if n < 3:
        return {"pearson": float("nan"), "spearman": float("nan")}
    iu = torch.triu_indices(n, n, offset=1)
    a = cosine_matrix(E)[iu[0], iu[1]].numpy()  # (n(n-1)/2,)
    b = cosine_matrix(C)[iu[0], iu[1]].numpy()
    if a.std() < 1e-12 or b.std() < 1e-12:
        return {"pearson": 0.0, "spearman": 0.0}
    return {"pearson": float(pearsonr(a, b)[0]), "spearman": float(spearmanr(a, b)[0])}


def nearest_tokens(rows: torch.Tensor, old_rows: torch.Tensor, tokenizer, k: int = 5) -> list[list[str]]:
    """For each row of `rows` (m, d): the k old-vocabulary tokens of highest cosine, decoded one by one."""
    sims = F.normalize(rows.detach().float().cpu(), dim=-1) @ F.normalize(old_rows.detach().float().cpu(), dim=-1).T
    top = sims.topk(min(k, sims.shape[1]), dim=-1).indices  # (m, k)
    return [[tokenizer.decode([int(i)]) for i in row] for row in top]


def movement(start: torch.Tensor, E: torch.Tensor) -> dict[str, float]:
    """How far training moved each row from where it started (both (n, d), row i the same token): the table's
    relative change ||E - start|| / ||start|| (Frobenius), each row's cosine with its own start, averaged, and the
    ratio of mean row norms; all null from an all-zero start. Rank and pairwise cosines can stay put while every
    row moves: random rows that move to other random-looking places keep both."""
    start, E = start.detach().double().cpu(), E.detach().double().cpu()
    base = start.norm()
    return _finite({
        "relative_change": float((E - start).norm() / base) if base > 0 else float("nan"),
        "cosine_to_start": float(F.cosine_similarity(E, start, dim=-1).mean()) if base > 0 else float("nan"),
        "norm_ratio": float(E.norm(dim=-1).mean() / start.norm(dim=-1).mean()) if base > 0 else float("nan"),
    })  # fmt: skip


def _finite(x):
    """JSON has no NaN: undefined numbers (a single row, no level pair) become null."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_finite(v) for v in x]
    return x


def summarize(
    E: torch.Tensor,
    levels: list[int] | None = None,
    code_vectors=None,
    old_rows: torch.Tensor | None = None,
    tokenizer=None,
    token_names: list[str] | None = None,
    sample: int = 3,
) -> dict:
    """All the geometry numbers (docs/evaluation.md) for E (n, d) as a JSON-serialisable dict (NaN -> null)."""
    E = E.detach().float().cpu()
    s_u, s_c = spectrum(E), spectrum(E, centered=True)
    out: dict = {
        "n": E.shape[0],
        "dim": E.shape[1],
        "singular_values": [round(float(x), 5) for x in s_u[:64]],
        "singular_values_centered": [round(float(x), 5) for x in s_c[:64]],
        "effective_rank": effective_rank(s_u),
        "effective_rank_centered": effective_rank(s_c),
        "participation_ratio": participation_ratio(s_c),  # of the centred rows: the spread's dimension
        "participation_ratio_uncentered": participation_ratio(s_u),
        "mean_cosine": mean_cosine(E),
        "mean_norm": float(E.norm(dim=-1).mean()) if E.shape[0] else float("nan"),
    }
    if levels is not None and len({lv for lv in levels if lv >= 0}) > 1:
        out["level_cosine"] = level_cosines(E, levels)
    if code_vectors is not None:
        out["rsa"] = rsa(E, torch.as_tensor(code_vectors).float())
    if old_rows is not None and tokenizer is not None and sample > 0 and E.shape[0] > 0:
        n = E.shape[0]
        pick = sorted({round(j * (n - 1) / max(sample - 1, 1)) for j in range(min(sample, n))})  # spread over levels
        names = token_names or [str(i) for i in range(n)]
        near = nearest_tokens(E[pick], old_rows, tokenizer)
        out["nearest_tokens"] = {names[i]: near[j] for j, i in enumerate(pick)}
    return _finite(out)


# ----------------------------------------------------------------------------------------- plots
def new_figure(figsize):
    """A bare Figure on an Agg canvas: no pyplot global state, no GUI backend, safe in any thread."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize)
    FigureCanvasAgg(fig)
    return fig


def plot_spectrum(matrices: dict[str, torch.Tensor], path) -> None:
    """Centred singular values / largest, one line per matrix, log scale.

    A collapsed matrix (mean init: every row equal) has a centred spectrum of zeros; it is drawn at
    the 1e-12 floor, not normalised into a flat line.
    """
    fig = new_figure((6, 4))
    ax = fig.add_subplot()
    for name, E in matrices.items():
        s_u, s = spectrum(E), spectrum(E, centered=True)
        collapsed = s.numel() == 0 or s.max() <= 1e-9 * max(float(s_u.max()) if s_u.numel() else 0.0, 1e-30)
        s = torch.zeros_like(s) if collapsed else s / s.max()
        label = f"{name} (collapsed)" if collapsed else f"{name} (erank {effective_rank(s):.1f})"
        ax.semilogy(range(1, len(s) + 1), s.clamp(min=1e-12).numpy(), label=label)
    ax.set_xlabel("index")
    ax.set_ylabel("singular value / max (centred)")
    ax.set_title("spectrum of the new-token rows")
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)


def _heatmap(ax, E: torch.Tensor, order: list[int], title: str):
    C = cosine_matrix(E)[order][:, order].numpy()
    im = ax.imshow(C, vmin=-1, vmax=1, cmap="RdBu_r", interpolation="nearest")
    ax.set_title(title, fontsize=9)
    ax.set_xticks([])
    ax.set_yticks([])
    return im


def plot_cosine_map(E: torch.Tensor, order: list[int], path, title: str = "cosine") -> None:
    """Cosine heatmap of the rows of E in `order` (e.g. `level_order(tokens)`: level, then code)."""
    fig = new_figure((5, 4.4))
    ax = fig.add_subplot()
    im = _heatmap(ax, E, order, title)
    fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    save_figure(fig, path)


def plot_cosine_maps(matrices: dict[str, torch.Tensor], path, order: list[int] | None = None) -> None:
    """Several cosine heatmaps side by side (same row order for all, identity by default)."""
    n = len(matrices)
    fig = new_figure((3.2 * n + 0.6, 3.4))
    axes = fig.subplots(1, n, squeeze=False)[0]
    im = None
    for ax, (name, E) in zip(axes, matrices.items()):
        im = _heatmap(ax, E, order if order is not None else list(range(E.shape[0])), name)
    if im is not None:
        fig.colorbar(im, ax=list(axes), fraction=0.02)
    save_figure(fig, path)
