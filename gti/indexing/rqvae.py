"""RQ-VAE quantiser (docs/data.md; TIGER, Rajput et al. 2023, as used by the GTI paper).

An MLP encoder maps an item embedding to a `code_dim` vector z; L residual levels each pick the
nearest of K codes for what the previous levels left over; an MLP decoder rebuilds the embedding
from the sum of the chosen codes (straight-through gradient). Loss per batch:

    recon    = MSE(decoder(z_q), x)                                  (x standardised per feature)
    commit   = sum_l ||sg[r_l] - e_l||² + beta * ||r_l - sg[e_l]||²   (VQ-VAE codebook + commitment)
    balance  = sum_l KL(mean_batch softmax(-dist_l / tau) || uniform) (balanced code usage)
    loss     = recon + commit + balance_weight * balance

`dist_l` is divided by its per-row mean before the softmax, so the soft assignment has the same
sharpness whatever the scale of the code space. Codebooks start from residual k-means on the initial
encoder outputs; a code no batch picked during an epoch is reset to a residual of the last batch.
The model is plain torch (`RQVAE`, `rqvae_loss`); `RQVAEModule` is the thin Lightning wrapper.
"""

from __future__ import annotations

import logging
import warnings

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from gti.indexing.quantize import rq_kmeans

TAU = 0.1  # soft-assignment temperature (on mean-normalised distances) of the balance term


def _mlp(sizes: list[int]) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


class RQVAE(nn.Module):
    def __init__(self, in_dim: int, hidden: int, code_dim: int, levels: int, codes: int):
        super().__init__()
        self.encoder = _mlp([in_dim, hidden, hidden // 2, code_dim])
        self.decoder = _mlp([code_dim, hidden // 2, hidden, in_dim])
        self.codebooks = nn.Parameter(torch.randn(levels, codes, code_dim) * 0.1)  # (L, K, c)

    def quantize(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
        """z (B, c) -> codes (B, L), z_q (B, c), residuals r_l (B, c) and distances (B, K) per level."""
        r, zq = z, torch.zeros_like(z)
        codes, residuals, dists = [], [], []
        for C in self.codebooks:  # (K, c)
            d = (r * r).sum(1, keepdim=True) - 2 * r @ C.T + (C * C).sum(1)  # (B, K)
            idx = d.argmin(1)
            e = C[idx]
            codes.append(idx)
            residuals.append(r)
            dists.append(d)
            zq = zq + e
            r = r - e.detach()
        return torch.stack(codes, 1), zq, residuals, dists


def rqvae_loss(model: RQVAE, x: torch.Tensor, beta: float, balance: float) -> tuple[torch.Tensor, dict, torch.Tensor, list]:
    """x (B, d) standardised -> (loss, parts, codes (B, L), residuals per level)."""
    z = model.encoder(x)
    codes, zq, residuals, dists = model.quantize(z)
    commit = x.new_zeros(())
    bal = x.new_zeros(())
    K = model.codebooks.shape[1]
    for level, (r, d) in enumerate(zip(residuals, dists, strict=True)):
        e = model.codebooks[level][codes[:, level]]
        commit = commit + F.mse_loss(e, r.detach()) + beta * F.mse_loss(r, e.detach())
        p = torch.softmax(-d / (TAU * d.detach().mean(1, keepdim=True).clamp_min(1e-8)), dim=1)  # (B, K)
        pbar = p.mean(0)
        bal = bal + (pbar * (pbar.clamp_min(1e-12) * K).log()).sum()  # KL(pbar || uniform)
    x_hat = model.decoder(z + (zq - z).detach())  # straight-through estimator
    recon = F.mse_loss(x_hat, x)
    loss = recon + commit + balance * bal
    return loss, {"recon": recon.detach(), "commit": commit.detach(), "balance": bal.detach()}, codes, residuals


class RQVAEModule(L.LightningModule):
    def __init__(self, model: RQVAE, data: torch.Tensor, lr: float, beta: float, balance: float, kmeans_iters: int, seed: int):
        super().__init__()
        self.model, self.data = model, data
        self.lr, self.beta, self.balance, self.kmeans_iters, self.seed = lr, beta, balance, kmeans_iters, seed
        L_, K = model.codebooks.shape[:2]
        self.register_buffer("usage", torch.zeros(L_, K, dtype=torch.long))
        self.gen = torch.Generator().manual_seed(seed + 1)
        self.history: list[dict] = []
        self._sums: dict[str, float] = {}
        self._steps = 0
        self._last_residuals: list[torch.Tensor] = []

    @torch.no_grad()
    def on_fit_start(self) -> None:
        # k-means initialisation of the codebooks on the untrained encoder's outputs (TIGER)
        z = torch.cat([self.model.encoder(b.to(self.device)).cpu() for b in self.data.split(8192)])
        _, books = rq_kmeans(z.numpy(), *self.model.codebooks.shape[:2], iters=self.kmeans_iters, seed=self.seed, progress=False)
        self.model.codebooks.copy_(torch.as_tensor(np.stack(books)))

    def training_step(self, batch, batch_idx):
        (x,) = batch
        loss, parts, codes, residuals = rqvae_loss(self.model, x, self.beta, self.balance)
        for level in range(codes.shape[1]):
            self.usage[level] += torch.bincount(codes[:, level], minlength=self.usage.shape[1])
        self._last_residuals = [r.detach() for r in residuals]
        for k, v in {"loss": loss.detach(), **parts}.items():
            self._sums[k] = self._sums.get(k, 0.0) + float(v)
        self._steps += 1
        self.log("loss", loss, prog_bar=True)
        self.log("recon", parts["recon"], prog_bar=True)
        return loss

    @torch.no_grad()
    def on_train_epoch_end(self) -> None:
        dead_total = 0
        for level, res in enumerate(self._last_residuals):
            dead = torch.nonzero(self.usage[level] == 0).squeeze(1)
            if len(dead):
                pick = torch.randint(len(res), (len(dead),), generator=self.gen).to(res.device)
                self.model.codebooks[level, dead] = res[pick]
                dead_total += len(dead)
        self.history.append({"epoch": len(self.history), **{k: v / self._steps for k, v in self._sums.items()}, "dead_reset": dead_total})
        self.usage.zero_()
        self._sums, self._steps = {}, 0

    def configure_optimizers(self):
        return torch.optim.Adam(self.model.parameters(), lr=self.lr)


def rq_vae(
    X: np.ndarray,
    levels: int,
    codes: int,
    *,
    code_dim: int = 32,
    hidden: int = 256,
    epochs: int = 100,
    lr: float = 1e-3,
    batch_size: int = 256,
    beta: float = 0.25,
    balance: float = 0.1,
    seed: int = 0,
    kmeans_iters: int = 20,
    accelerator: str = "cpu",
    progress: bool = True,
) -> tuple[np.ndarray, list[np.ndarray], list[dict]]:
    """Train an RQ-VAE on X (n, d) -> (codes (n, L) int64, L codebooks (K, code_dim) in code space,
    per-epoch loss history [{epoch, loss, recon, commit, balance, dead_reset}])."""
    x = torch.as_tensor(np.asarray(X, dtype=np.float32))
    x = (x - x.mean(0)) / x.std(0).clamp_min(1e-6)  # per-feature standardisation: recon loss ~ O(1)
    torch.manual_seed(seed)  # model init; the loader has its own seeded generator
    model = RQVAE(x.shape[1], hidden, code_dim, levels, codes)
    module = RQVAEModule(model, x, lr, beta, balance, kmeans_iters, seed)
    loader = DataLoader(TensorDataset(x), batch_size=batch_size, shuffle=True, generator=torch.Generator().manual_seed(seed))
    quiet = logging.getLogger("lightning.pytorch")
    level = quiet.level
    quiet.setLevel(logging.WARNING)  # no "GPU available: ..." banner for a sub-step
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*does not have many workers.*")
            warnings.filterwarnings("ignore", message=".*LeafSpec.*")
            trainer = L.Trainer(
                max_epochs=epochs,
                accelerator=accelerator,
                devices=1,
                logger=False,
                enable_checkpointing=False,
                enable_model_summary=False,
                enable_progress_bar=progress,
                log_every_n_steps=1,
            )
            trainer.fit(module, loader)
    finally:
        quiet.setLevel(level)
    model = module.model.cpu().eval()
    with torch.no_grad():
        out = torch.cat([model.quantize(model.encoder(b))[0] for b in x.split(8192)])
    books = [c.detach().cpu().numpy().copy() for c in model.codebooks]
    return out.numpy().astype(np.int64), books, module.history
