"""Adjacency-based Similarity Graph Embedding (ASGE, paper section 3.1): label embeddings whose cosines match the
label co-occurrence graph.

    python -m model.asge --train DATA/train --out label_emb.pt [--num-classes 3862] [--alpha 0.1]

Label graph (Eq. 1). With c_ij the number of training videos carrying both labels i and j (c_jj: videos with j),
A_ij = P(v_i | v_j) = c_ij / c_jj and A' = (A + A^T) / 2, so A'_ii = 1 and A' lies in [0, 1]. A class that never
occurs in training has c_jj = 0: its row and column of A' are 0 and its diagonal is 1, i.e. it is a node with only
a self loop, and Eq. 3 asks its embedding to be orthogonal to every other one (with the relaxation, merely below
alpha). Nothing is NaN.

Network (Eq. 2). Phi = three fully connected layers, each followed by BN and ReLU, from one-hot labels to C_e = 256.
The first layer on a one-hot input is a row lookup, so it is an ``nn.Embedding``. Every step feeds all N classes as
one batch, so BN uses batch statistics always (no running averages: the batch is always the same set).
With a final ReLU (one reading of the paper's wording, ``final_activation=True``) every embedding is non-negative
and every cosine lies in [0, 1], the range of A'. That makes the fit hard: unlinked classes can only reach cosine 0
through disjoint supports. On a synthetic 3862-class graph (50k videos, topic structure), 150 default steps gave
an edge-ranking AUC of 0.52 with the final ReLU and 0.93 without it (``final_activation=False``,
the default); section 4.1's "three hidden layers and label embeddings" also reads as a linear output layer, which
is the reading we default to (``--final-relu`` restores the other).

Loss (Eq. 3-5). L = sum_ij sigma_ij (cos(e_i, e_j) - A'_ij)^2 with sigma_ij = 0 when A'_ij < alpha and
cos(e_i, e_j) < alpha. The paper writes A_ij in Eq. 5; the symmetric A' is used so that sigma is symmetric like the
rest of the loss. alpha = None (or 0) disables the relaxation (paper: 0.1 for video, none for images).
``fit_asge`` minimizes L / N (the paper's sum, divided by the number of classes, so the paper's SGD step size
lr = 0.01 moves each embedding by the same amount whatever N is); ``history`` holds that per-class value.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import scipy.sparse as sp
import torch
import torch.nn as nn
import torch.nn.functional as F

from pipeline.errors import Yt8mError

EMBED_DIM = 256
HIDDEN_DIM = 256
DEFAULT_LR = 0.01
DEFAULT_MOMENTUM = 0.9
DEFAULT_ALPHA = 0.1
# Full-batch steps; ~1-2 min for 3862 classes on a 2-core CPU (one N x N x 256 product forward, one backward).
DEFAULT_EPOCHS = 150


class ASGEError(Yt8mError):
    """Bad training labels (none, or ids outside the vocabulary), a bad hyperparameter, or a bad embedding file."""


@dataclass
class LabelSets:
    """The label sets of many videos in compressed-row form: video v has labels ``indices[indptr[v]:indptr[v+1]]``.

    A plain list of arrays costs about 100 bytes of Python object per video (400 MB for YouTube-8M train); this is
    two int arrays. Iterating yields one int array per video, so it passes wherever a list of arrays does.
    """

    indptr: np.ndarray
    indices: np.ndarray

    @classmethod
    def from_lists(cls, label_lists: Iterable[Sequence[int]]) -> "LabelSets":
        arrays = [np.asarray(x, dtype=np.int64).ravel() for x in label_lists]
        indptr = np.zeros(len(arrays) + 1, dtype=np.int64)
        np.cumsum([a.size for a in arrays], out=indptr[1:])
        indices = np.concatenate(arrays) if arrays else np.zeros(0, dtype=np.int64)
        return cls(indptr, indices.astype(np.int64, copy=False))

    def __len__(self) -> int:
        return len(self.indptr) - 1

    def __getitem__(self, v: int) -> np.ndarray:
        return self.indices[self.indptr[v]:self.indptr[v + 1]]

    def __iter__(self):
        for v in range(len(self)):
            yield self[v]


def as_label_sets(label_lists: "LabelSets | Iterable[Sequence[int]]") -> LabelSets:
    return label_lists if isinstance(label_lists, LabelSets) else LabelSets.from_lists(label_lists)


def video_label_matrix(label_lists: "LabelSets | Iterable[Sequence[int]]", num_classes: int) -> sp.csr_matrix:
    """(V, N) 0/1 sparse matrix of which video carries which label; a label repeated within a video counts once.

    Raises:
        ASGEError: a label id outside [0, num_classes).
    """
    sets = as_label_sets(label_lists)
    idx = sets.indices
    if idx.size and (idx.min() < 0 or idx.max() >= num_classes):
        bad = idx[(idx < 0) | (idx >= num_classes)]
        raise ASGEError(f"{bad.size} label id(s) outside [0, {num_classes}), e.g. {int(bad[0])}; "
                        f"is --num-classes right?")
    data = np.ones(idx.size, dtype=np.int64)
    x = sp.csr_matrix((data, idx, sets.indptr), shape=(len(sets), num_classes))
    x.sum_duplicates()
    x.data[:] = 1
    return x


def build_label_graph(label_lists: "LabelSets | Iterable[Sequence[int]]",
                      num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Eq. 1: the symmetrized conditional-probability graph of the training labels.

    Args:
        label_lists: one int array of label ids per training video (or a ``LabelSets``).
        num_classes: N.
    Returns:
        A_sym: (N, N) float32, A'_ij = (P(i|j) + P(j|i)) / 2; diagonal 1; rows/columns of unseen classes 0.
        counts: (N,) int64, the number of training videos carrying each class.
    Raises:
        ASGEError: no video, or a label id outside [0, num_classes).
    """
    x = video_label_matrix(label_lists, num_classes)
    if x.shape[0] == 0:
        raise ASGEError("no training videos: the label graph needs at least one labelled video")
    co = (x.T @ x).toarray().astype(np.float64)  # (N, N) c_ij
    counts = np.diag(co).astype(np.int64).copy()
    # A_ij = c_ij / c_jj divides column j; an unseen j has an all-zero column (c_ij <= c_jj = 0).
    cond = co / np.maximum(counts, 1)[None, :]
    a_sym = (cond + cond.T) * 0.5
    np.fill_diagonal(a_sym, 1.0)
    return a_sym.astype(np.float32), counts


class ASGE(nn.Module):
    """Phi of Eq. 2: one-hot label -> (Linear -> BN -> ReLU) x 3 -> embedding.

    Args:
        num_classes: N.
        dim: embedding dimension C_e (paper: 256).
        hidden: width of the two hidden layers (paper: 256).
        final_activation: ReLU after the last BN too. Without it (default) embeddings and cosines can be negative.
    """

    def __init__(self, num_classes: int, dim: int = EMBED_DIM, hidden: int = HIDDEN_DIM,
                 final_activation: bool = False):
        super().__init__()
        self.num_classes = num_classes
        self.embed = nn.Embedding(num_classes, hidden)  # Linear on one-hot rows; its bias would be cancelled by BN
        # Initialized as nn.Linear(num_classes, hidden) would be. Scale matters despite the BN after it: BN makes
        # the output invariant to this table's scale, so its gradient shrinks as 1/scale and its effective step
        # size as 1/scale^2; nn.Embedding's N(0, 1) init is ~sqrt(3 N) times larger and trains more slowly.
        bound = 1.0 / math.sqrt(num_classes)
        nn.init.uniform_(self.embed.weight, -bound, bound)
        self.bn1 = nn.BatchNorm1d(hidden, track_running_stats=False)
        self.fc2 = nn.Linear(hidden, hidden, bias=False)
        self.bn2 = nn.BatchNorm1d(hidden, track_running_stats=False)
        self.fc3 = nn.Linear(hidden, dim, bias=False)
        self.bn3 = nn.BatchNorm1d(dim, track_running_stats=False)
        self.final_activation = final_activation

    def forward(self) -> torch.Tensor:
        """Embeddings of all N classes, (N, dim)."""
        x = F.relu(self.bn1(self.embed.weight))  # (N, hidden)
        x = F.relu(self.bn2(self.fc2(x)))  # (N, hidden)
        x = self.bn3(self.fc3(x))  # (N, dim)
        return F.relu(x) if self.final_activation else x


def cosine_matrix(emb: torch.Tensor) -> torch.Tensor:
    """(N, N) cosines; a zero embedding has cosine 0 with everything (itself included)."""
    e = F.normalize(emb, dim=-1)
    return e @ e.t()


class _RelaxedGramLoss(torch.autograd.Function):
    """sum_ij sigma_ij (u_i . u_j - A_ij)^2 for row-normalized u, with a hand-written backward.

    Autograd through ``u @ u.T`` would run two N x N x C products backwards (one per operand) and keep several
    N x N intermediates; the residual r is symmetric, so the gradient is 4 r u: one product and one saved matrix.
    sigma is piecewise constant and is treated as such (its boundary has measure zero).
    """

    @staticmethod
    def forward(ctx, u: torch.Tensor, A: torch.Tensor, alpha: float | None) -> torch.Tensor:
        r = u @ u.t()  # (N, N) cosines, then residuals in place
        keep = ((r >= alpha) | (A >= alpha)) if alpha else None
        r.sub_(A)
        if keep is not None:
            r.mul_(keep)
        ctx.save_for_backward(u, r)
        flat = r.view(-1)
        return torch.dot(flat, flat)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        u, r = ctx.saved_tensors
        return (4.0 * grad_out) * (r @ u), None, None


def asge_loss(emb: torch.Tensor, A_sym: torch.Tensor | np.ndarray, alpha: float | None = None,
              reduction: str = "sum") -> torch.Tensor:
    """Eq. 3 (alpha None) or Eq. 4-5 (relaxed): sum_ij sigma_ij (cos(e_i, e_j) - A'_ij)^2.

    Args:
        emb: (N, C_e) embeddings.
        A_sym: (N, N) symmetric graph A'.
        alpha: relaxation threshold; pairs with A'_ij < alpha and cos < alpha are skipped. None or 0: no relaxation.
        reduction: 'sum' (the paper's), 'per_class' (sum / N), or 'mean' (sum / N^2).
    """
    if reduction not in ("sum", "per_class", "mean"):
        raise ValueError(f"reduction must be 'sum', 'per_class' or 'mean', got {reduction!r}")
    A = torch.as_tensor(A_sym, dtype=emb.dtype, device=emb.device)
    N = emb.shape[0]
    total = _RelaxedGramLoss.apply(F.normalize(emb, dim=-1), A, alpha)
    if reduction == "per_class":
        return total / N
    if reduction == "mean":
        return total / (N * N)
    return total


def fit_asge(A_sym: torch.Tensor | np.ndarray, epochs: int = DEFAULT_EPOCHS, lr: float = DEFAULT_LR,
             momentum: float = DEFAULT_MOMENTUM, alpha: float | None = DEFAULT_ALPHA, seed: int = 0,
             device: str | torch.device = "cpu", dim: int = EMBED_DIM, hidden: int = HIDDEN_DIM,
             final_activation: bool = False) -> tuple[torch.Tensor, list[float]]:
    """Fit ASGE to a label graph with full-batch SGD (one step per epoch).

    Args:
        A_sym: (N, N) graph from ``build_label_graph``.
        epochs: number of full-batch steps.
        lr, momentum: SGD settings (paper: 0.01, 0.9).
        alpha: relaxation (paper, video: 0.1); None or 0 disables it.
        seed: seeds the network initialization.
        device: where to fit ('auto' picks CUDA when present).
        dim, hidden, final_activation: see ``ASGE``.
    Returns:
        embeddings (N, dim) float32 on the CPU, and the per-class loss (Eq. 4 / N) before each step plus the
        final one (epochs + 1 values).
    """
    if epochs < 0:
        raise ASGEError(f"epochs must be >= 0, got {epochs}")
    if alpha is not None and not 0.0 <= alpha <= 1.0:
        raise ASGEError(f"alpha must be in [0, 1], got {alpha}")
    device = _device(device)
    A = torch.as_tensor(np.asarray(A_sym) if not torch.is_tensor(A_sym) else A_sym, dtype=torch.float32)
    N = A.shape[0]
    if A.ndim != 2 or A.shape[1] != N:
        raise ASGEError(f"A_sym must be square, got {tuple(A.shape)}")
    A = A.to(device)
    gen_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    model = ASGE(N, dim, hidden, final_activation).to(device)
    torch.random.set_rng_state(gen_state)  # leave the caller's random stream untouched
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
    history = []
    for _ in range(epochs):
        loss = asge_loss(model(), A, alpha, reduction="per_class")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        history.append(loss.item())
    with torch.no_grad():
        emb = model()
        history.append(asge_loss(emb, A, alpha, reduction="per_class").item())
    return emb.detach().float().cpu(), history


def fit_asge_seen(A_sym: np.ndarray, counts: np.ndarray, seed: int = 0, **fit_kw) -> tuple[torch.Tensor, list[float]]:
    """Fit ASGE on the sub-graph of the classes that occur in training; unseen classes get random directions.

    An unseen class's row of A' is zero off the diagonal. Fitted together with the seen ones, thousands of such
    isolated nodes dominate Eq. 3 (on the sample data 3815 of 3862 classes never occur) and the structure among
    the seen classes is barely fitted. A seeded Gaussian vector in 256 dims is already near-orthogonal to every
    other (|cos| ~ 1/16), which is what those rows ask for, so only the seen classes are optimized.

    Args:
        A_sym: (N, N) symmetrized graph from ``build_label_graph``.
        counts: (N,) training videos per class from ``build_label_graph``.
        seed: seeds the fit and the unseen classes' vectors.
        **fit_kw: passed to ``fit_asge`` (epochs, lr, momentum, alpha, device, dim, hidden, final_activation).
    Returns:
        (N, dim) embeddings on the CPU and the fit's loss history.
    """
    seen = np.flatnonzero(np.asarray(counts) > 0)
    if seen.size < 2:
        raise ASGEError(f"ASGE needs at least 2 classes that occur in training, found {seen.size}")
    emb_seen, history = fit_asge(np.asarray(A_sym)[np.ix_(seen, seen)], seed=seed, **fit_kw)
    emb_seen = emb_seen.detach().cpu()
    g = torch.Generator().manual_seed(seed)
    emb = torch.randn(len(counts), emb_seen.shape[1], generator=g) * emb_seen.norm(dim=1).mean()
    emb[torch.as_tensor(seen)] = emb_seen
    return emb, history


def embedding_graph_correlation(emb: torch.Tensor, A_sym: torch.Tensor | np.ndarray,
                                classes: np.ndarray | None = None) -> float:
    """Pearson correlation between cos(e_i, e_j) and A'_ij over pairs i != j.

    Args:
        emb: (N, C_e) embeddings.
        A_sym: (N, N) graph.
        classes: restrict to pairs among these class ids (e.g. classes seen in training); default: all classes.
    Returns:
        the correlation, or NaN when either side is constant (e.g. a graph without any edge).
    """
    with torch.no_grad():
        emb = torch.as_tensor(emb, dtype=torch.float32)
        A = torch.as_tensor(np.asarray(A_sym) if not torch.is_tensor(A_sym) else A_sym, dtype=torch.float32)
        A = A.to(emb.device)
        if classes is not None:
            idx = torch.as_tensor(np.asarray(classes), dtype=torch.long, device=emb.device)
            emb, A = emb[idx], A[idx][:, idx]
        N = emb.shape[0]
        off = ~torch.eye(N, dtype=torch.bool, device=emb.device)
        x = cosine_matrix(emb)[off].double()
        y = A[off].double()
        x, y = x - x.mean(), y - y.mean()
        denom = (x.pow(2).sum() * y.pow(2).sum()).sqrt()
        if denom.item() == 0.0:
            return float("nan")
        return (x * y).sum().div(denom).item()


def edge_ranking_auc(emb: torch.Tensor, A_sym: torch.Tensor | np.ndarray, threshold: float = DEFAULT_ALPHA,
                     classes: np.ndarray | None = None) -> float:
    """How well cosines rank edges: the probability that a pair with A'_ij >= threshold has a higher cosine than
    a pair with A'_ij = 0 (ties count half), over pairs i != j. Unlike the correlation it is not capped by the
    relaxation, which leaves the cosines of unlinked pairs anywhere below alpha.

    Returns:
        the AUC in [0, 1], or NaN when there is no linked or no unlinked pair.
    """
    from sklearn.metrics import roc_auc_score

    with torch.no_grad():
        emb = torch.as_tensor(emb, dtype=torch.float32).cpu()
        A = torch.as_tensor(np.asarray(A_sym) if not torch.is_tensor(A_sym) else A_sym, dtype=torch.float32).cpu()
        if classes is not None:
            idx = torch.as_tensor(np.asarray(classes), dtype=torch.long)
            emb, A = emb[idx], A[idx][:, idx]
        off = ~torch.eye(emb.shape[0], dtype=torch.bool)
        cos, a = cosine_matrix(emb)[off].numpy(), A[off].numpy()
    keep = (a >= threshold) | (a == 0)
    y = a[keep] >= threshold
    if y.all() or not y.any():
        return float("nan")
    return float(roc_auc_score(y, cos[keep]))


def _device(spec: str | torch.device) -> torch.device:
    if isinstance(spec, torch.device):
        return spec
    from model.engine.device import resolve_device
    return resolve_device(spec)


def read_training_labels(path: str | os.PathLike) -> LabelSets:
    """The label sets of every video in Parquet shards (a preprocess output dir, a glob, a file, gs://...),
    reading only the ``labels`` column. Raises ``pipeline.shards.NoShardsFound`` when nothing matches."""
    import pyarrow as pa

    from pipeline.shards import iter_batches, list_shards

    indptr_parts, index_parts, offset = [np.zeros(1, dtype=np.int64)], [], 0
    for shard in list_shards(path):
        for batch in iter_batches(shard, features=(), columns=["labels"]):
            col = batch.column("labels")
            if not isinstance(col, pa.ListArray):
                col = col.cast(pa.list_(pa.int32()))
            offsets = col.offsets.to_numpy().astype(np.int64)  # (rows + 1,) into col.values
            values = col.values.to_numpy(zero_copy_only=False).astype(np.int64)
            index_parts.append(values[offsets[0]:offsets[-1]])
            indptr_parts.append(offsets[1:] - offsets[0] + offset)
            offset += int(offsets[-1] - offsets[0])
    indices = np.concatenate(index_parts) if index_parts else np.zeros(0, dtype=np.int64)
    return LabelSets(np.concatenate(indptr_parts), indices)


def save_embeddings(path: str | os.PathLike, embeddings: torch.Tensor, *, graph_correlation: float | None = None,
                    final_loss: float | None = None, alpha: float | None = None,
                    class_counts: np.ndarray | torch.Tensor | None = None, config: dict | None = None) -> None:
    """Write the embeddings atomically (temp file in the same directory, then ``os.replace``) as a plain dict
    loadable with ``torch.load(weights_only=True)``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    emb = torch.as_tensor(embeddings).detach().float().cpu().contiguous()
    state = {
        "embeddings": emb,
        "num_classes": int(emb.shape[0]),
        "alpha": None if alpha is None else float(alpha),
        "final_loss": None if final_loss is None else float(final_loss),
        "correlation": None if graph_correlation is None else float(graph_correlation),
        "class_counts": None if class_counts is None else torch.as_tensor(np.asarray(class_counts), dtype=torch.int64),
        "config": dict(config or {}),
    }
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            torch.save(state, fh)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def load_embeddings(path: str | os.PathLike) -> torch.Tensor:
    """The (N, C_e) embeddings saved by ``save_embeddings`` (or ``python -m model.asge``).

    Raises:
        ASGEError: the file is not an embedding file.
        FileNotFoundError: no such file.
    """
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as e:  # pickle/zip errors of a file that is not a torch save
        raise ASGEError(f"{path} is not a readable embedding file: {str(e).splitlines()[0]}") from None
    emb = state.get("embeddings") if isinstance(state, dict) else None
    if not torch.is_tensor(emb) or emb.ndim != 2:
        raise ASGEError(f"{path} holds no (N, C_e) 'embeddings' tensor")
    return emb.float()


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--train", required=True, help="training shards: a preprocess output dir, glob, file or gs:// path")
    p.add_argument("--out", required=True, help="embedding file to write (.pt); its config goes to <out>.config.json")
    p.add_argument("--num-classes", type=int, default=3862)
    p.add_argument("--alpha", type=float, default=DEFAULT_ALPHA, help="relaxation (paper, video: 0.1); 0 disables")
    p.add_argument("--epochs", type=int, default=DEFAULT_EPOCHS, help="full-batch SGD steps")
    p.add_argument("--lr", type=float, default=DEFAULT_LR)
    p.add_argument("--momentum", type=float, default=DEFAULT_MOMENTUM)
    p.add_argument("--dim", type=int, default=EMBED_DIM)
    p.add_argument("--hidden", type=int, default=HIDDEN_DIM)
    p.add_argument("--final-relu", dest="final_activation", action="store_true",
                   help="ReLU after the last BN too (non-negative embeddings; fits large graphs poorly)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda, cuda:N")
    return p


def config_path(out: str | os.PathLike) -> Path:
    out = Path(out)
    return out.with_name(out.stem + ".config.json")


def main(args: argparse.Namespace) -> dict:
    if args.num_classes < 1:
        raise ASGEError(f"--num-classes must be >= 1, got {args.num_classes}")
    if not 0.0 <= args.alpha <= 1.0:
        raise ASGEError(f"--alpha must be in [0, 1], got {args.alpha}")
    if args.epochs < 0:
        raise ASGEError(f"--epochs must be >= 0, got {args.epochs}")
    t0 = time.perf_counter()
    labels = read_training_labels(args.train)
    graph, counts = build_label_graph(labels, args.num_classes)
    device = _device(args.device)
    emb, history = fit_asge_seen(graph, counts, epochs=args.epochs, lr=args.lr, momentum=args.momentum,
                                 alpha=args.alpha, seed=args.seed, device=device, dim=args.dim, hidden=args.hidden,
                                 final_activation=args.final_activation)
    seen = np.flatnonzero(counts)
    corr = embedding_graph_correlation(emb, graph, classes=seen)
    auc = edge_ranking_auc(emb, graph, threshold=args.alpha or DEFAULT_ALPHA, classes=seen)
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in sorted(vars(args).items())}
    config["device"] = str(device)
    save_embeddings(args.out, emb, graph_correlation=corr, final_loss=history[-1], alpha=args.alpha,
                    class_counts=counts, config=config)
    summary = {"videos": len(labels), "classes_seen": int(seen.size),
               "classes_unseen": int(args.num_classes - seen.size),
               "final_loss": history[-1], "initial_loss": history[0], "correlation": corr, "edge_auc": auc,
               "seconds": round(time.perf_counter() - t0, 2)}
    cfg = config_path(args.out)
    tmp = cfg.with_name(cfg.name + ".tmp")
    tmp.write_text(json.dumps({"config": config, "result": summary}, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, cfg)
    print(f"ASGE: {summary['videos']} videos, {summary['classes_seen']} of {args.num_classes} classes seen; "
          f"loss (Eq. 4 / N) {history[0]:.4f} -> {history[-1]:.4f}; "
          f"over seen classes: corr(cos, A') {corr:.4f}, edge AUC {auc:.4f}; wrote {args.out} and {cfg}")
    return summary

