"""Retrieval metrics for zero-shot sketch-based image retrieval.

Every query (sketch) ranks the whole gallery (photos); a photo is relevant when its class equals
the query's class. Definitions (docs/metrics.md has them in full):

    s_g       = cos(query, g)                        score, higher = more similar
    R         = #{relevant g}                         queries with R = 0 are excluded and counted
    rank(g)   = #{h : s_h >= s_g}                     a tie group takes the rank of its last position
    hits(g)   = #{relevant h : s_h >= s_g}
    AP        = (1/R) * sum_{relevant g} hits(g) / rank(g)          = sklearn average_precision_score
    P@K       = #{relevant g : rank(g) <= K} / min(K, N)
    AP@K      = (1/min(R, K)) * sum_{relevant g, rank(g) <= K} hits(g) / rank(g)
    mAP, mAP@K, P@K are means over queries; per-class AP is the mean AP of a class's queries.
    E[AP] of a random ranking = (1/N) * (H_N + (R-1)/(N-1) * (N - H_N)),  H_N = sum_{k<=N} 1/k

Ties are resolved as one threshold, so the numbers do not depend on the gallery's order.
Everything is vectorised in torch and processed in chunks of queries (memory O(chunk_size * N)),
on whatever device the embeddings live on.
"""
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor


def _unit(emb: Tensor) -> Tensor:
    """L2-normalise rows, computing in at least float32 (fp16/bf16 scores would create false ties)."""
    if emb.dtype != torch.float64:
        emb = emb.float()
    return F.normalize(emb, dim=1)


def similarity(query_emb: Tensor, gallery_emb: Tensor) -> Tensor:
    """Cosine similarity of every query with every gallery item, shape (Q, N); higher = more similar."""
    return _unit(query_emb) @ _unit(gallery_emb).T  # (Q, D) @ (D, N) -> (Q, N)


def _count_relevant(query_labels: Tensor, gallery_labels: Tensor) -> Tensor:
    """R for every query, shape (Q,) int64: the number of gallery items with the query's class."""
    classes, counts = torch.unique(gallery_labels, return_counts=True)  # (C,), (C,)
    if classes.numel() == 0:
        return torch.zeros_like(query_labels)
    pos = torch.searchsorted(classes, query_labels).clamp(max=classes.numel() - 1)  # (Q,)
    return torch.where(classes[pos] == query_labels, counts[pos], torch.zeros_like(counts[pos]))


def retrieval_metrics(
    query_emb: Tensor,
    query_labels: Tensor,
    gallery_emb: Tensor,
    gallery_labels: Tensor,
    ks: Sequence[int] = (100, 200),
    chunk_size: int = 1024,
) -> dict:
    """AP, mAP, P@K and mAP@K of cosine retrieval, ties counted as one threshold.

    Args:
        query_emb: (Q, D) query embeddings; query_labels: (Q,) int class labels.
        gallery_emb: (N, D) gallery embeddings; gallery_labels: (N,) int class labels.
        ks: cut-offs for P@K and mAP@K.
        chunk_size: queries scored at once; peak memory is about 50 * chunk_size * N bytes.

    Returns:
        A dict with python floats for the means over the used queries ("map_all", "p@K", "map@K"),
        CPU float64 per-query tensors of shape (Q,) ("ap", "per_query_p@K", "per_query_ap@K"; 0 for
        excluded queries), "num_relevant" (Q,) int64 (R per query), "per_class_ap"
        {label: mean AP of its queries}, "num_queries" (queries with R > 0) and
        "num_queries_without_relevant" (queries with R = 0, excluded from every mean).
    """
    if query_emb.ndim != 2 or gallery_emb.ndim != 2 or query_emb.shape[1] != gallery_emb.shape[1]:
        raise ValueError(f"expected (Q, D) and (N, D) embeddings, got {tuple(query_emb.shape)} and "
                         f"{tuple(gallery_emb.shape)}")
    if query_labels.shape != query_emb.shape[:1] or gallery_labels.shape != gallery_emb.shape[:1]:
        raise ValueError("need one label per embedding")
    if not (torch.isfinite(query_emb).all() and torch.isfinite(gallery_emb).all()):
        raise ValueError("embeddings contain NaN or inf")
    if any(int(k) < 1 for k in ks) or chunk_size < 1:
        raise ValueError("ks and chunk_size must be positive")
    device = query_emb.device
    query_labels = query_labels.to(device=device, dtype=torch.long)
    gallery_labels = gallery_labels.to(device=device, dtype=torch.long)
    gallery = _unit(gallery_emb.to(device))  # (N, D)
    n = gallery.shape[0]

    ap, p_at, ap_at, num_rel = [], {k: [] for k in ks}, {k: [] for k in ks}, []
    for start in range(0, query_emb.shape[0], chunk_size):
        labels = query_labels[start:start + chunk_size]  # (B,)
        scores = _unit(query_emb[start:start + chunk_size]) @ gallery.T  # (B, N)
        rel = labels[:, None] == gallery_labels[None, :]  # (B, N) bool
        sorted_scores, idx = scores.sort(dim=1)  # ascending, (B, N)
        del scores
        rel_sorted = rel.gather(1, idx)  # (B, N)
        del idx, rel
        below = torch.searchsorted(sorted_scores, sorted_scores, side="left")  # (B, N) #{s_h < s_g}
        del sorted_scores
        rank = n - below  # (B, N) #{h : s_h >= s_g}
        suffix = rel_sorted.flip(1).cumsum(1).flip(1)  # (B, N) relevant items at or after a position
        hits = suffix.gather(1, below)  # (B, N) #{relevant h : s_h >= s_g}
        del suffix, below
        prec = hits.double().div_(rank).mul_(rel_sorted)  # (B, N) float64 hits/rank, 0 if irrelevant
        del hits
        r = rel_sorted.sum(1)  # (B,)
        num_rel.append(r)
        ap.append(prec.sum(1) / r.clamp(min=1))
        for k in ks:
            top = rank <= k  # (B, N)
            p_at[k].append((rel_sorted & top).sum(1).double() / min(k, n))
            ap_at[k].append((prec * top).sum(1) / r.clamp(min=1, max=k))

    num_rel = torch.cat(num_rel).cpu()  # (Q,)
    valid = num_rel > 0
    if not valid.any():
        raise ValueError("no query has a relevant item in the gallery: check that the query and "
                         "gallery classes are the same split")
    out = {"ap": torch.cat(ap).cpu(), "num_relevant": num_rel,
           "num_queries": int(valid.sum()), "num_queries_without_relevant": int((~valid).sum())}
    out["map_all"] = out["ap"][valid].mean().item()
    for k in ks:
        out[f"per_query_p@{k}"] = torch.cat(p_at[k]).cpu()
        out[f"per_query_ap@{k}"] = torch.cat(ap_at[k]).cpu()
        out[f"p@{k}"] = out[f"per_query_p@{k}"][valid].mean().item()
        out[f"map@{k}"] = out[f"per_query_ap@{k}"][valid].mean().item()

    classes, inverse = torch.unique(query_labels.cpu()[valid], return_inverse=True)  # (C,), (Qv,)
    sums = torch.zeros(len(classes), dtype=torch.float64).index_add_(0, inverse, out["ap"][valid])
    counts = torch.bincount(inverse, minlength=len(classes))  # (C,)
    out["per_class_ap"] = dict(zip(classes.tolist(), (sums / counts).tolist()))
    return out


def expected_random_ap(num_relevant: Tensor, num_gallery: int) -> Tensor:
    """Exact expected AP of a uniformly random ranking of N items of which R are relevant.

    With AP = (1/R) sum_k rel_k * (sum_{j<=k} rel_j) / k, E[rel_k] = R/N and
    E[rel_j rel_k] = R(R-1) / (N(N-1)) for j != k:

        E[AP] = (1/R) sum_k (1/k) (R/N + (k-1) R(R-1) / (N(N-1)))
              = (1/N) * (H_N + (R-1)/(N-1) * (N - H_N)),     H_N = sum_{k=1..N} 1/k,

    where the second term is 0 when N = 1. Returns float64 of num_relevant's shape; every R must
    lie in [1, N].
    """
    r = torch.as_tensor(num_relevant).double().cpu()
    if num_gallery < 1 or (r < 1).any() or (r > num_gallery).any():
        raise ValueError(f"need 1 <= num_relevant <= num_gallery = {num_gallery}")
    n = float(num_gallery)
    h = torch.arange(1, num_gallery + 1, dtype=torch.float64).reciprocal().sum().item()  # H_N
    pairs = (r - 1) / (n - 1) * (n - h) if num_gallery > 1 else torch.zeros_like(r)
    return (h + pairs) / n


def chance_map(query_labels: Tensor, gallery_labels: Tensor) -> float:
    """mAP of a uniformly random ranking: mean expected_random_ap over the queries with R > 0."""
    num_rel = _count_relevant(query_labels.long().cpu(), gallery_labels.long().cpu())  # (Q,)
    num_rel = num_rel[num_rel > 0]
    if num_rel.numel() == 0:
        raise ValueError("no query has a relevant item in the gallery")
    return expected_random_ap(num_rel, gallery_labels.numel()).mean().item()
