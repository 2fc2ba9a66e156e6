"""Retrieval metrics for zero-shot sketch-based image retrieval, under the literature's conventions.

Every query (sketch) ranks the whole gallery (photos); a photo is relevant when its class equals
the query's class. docs/metrics.md defines everything in full; in short:

    s_g       = cos(query, g)                        score, higher = more similar
    R         = #{relevant g}                         queries with R = 0 are excluded and counted
    rank(g)   = #{h : s_h >= s_g}                     a tie group takes the rank of its last position
    hits(g)   = #{relevant h : s_h >= s_g}
    P(g)      = hits(g) / rank(g)                     precision at a relevant item
    Pint(g)   = max{P(i) : i relevant, s_i <= s_g}    VOC-interpolated precision
    a(g)      = #{h : s_h > s_g},  m(g) = rank(g) - a(g)      items before g's tie group; its size
    w_K(g)    = clamp((K - a(g)) / m(g), 0, 1)        chance that g lies in the first K places
    hits@K    = sum_{relevant g} w_K(g)

The first K places are a cut through the ranking, and a tie group straddling place K (a < K < a + m)
has no order of its own: every quantity at a cut-off K is its **expected value over the orders of
the tied items** (a uniformly random tie break, and the peers' unstable argsort, in expectation).
w_K(g) is the chance that such an order puts g among the first K; a tie group straddling K with r_g
relevant items adds (K - a) r_g / m to hits@K. The precision a relevant item counts with stays the
tie-group one, P(g), as in scikit-learn's average_precision_score; mAP@all has no cut-off.

    protocol       AP                  AP@K                                       P@K
    standard       (1/R) sum P         (1/min(R,K)) sum w_K P                     hits@K / min(K, N)
    sem-pcyc       (1/R) sum P         (sum w_K P) / hits@K  (0 if hits@K = 0)     hits@K / min(K, N)
    doodle2search  (1/R) sum P         -                                          hits@K / min(R, K)
    sake           (1/R) sum Pint      (1/min(R,K)) E[sum_{first K} Pint@K]       hits@K / min(K, N)
    zse-sbir       (1/R) sum Pint      (1/min(R,K)) E[sum_{first K} Pint@K]       hits@min(R,K) / min(R,K)

Pint@K interpolates within the first K places only, so whether any relevant item of the straddling
group S comes before K also raises the Pint@K of the items above it: with p0 the hypergeometric
chance that none does, E[sum Pint@K] = sum_{rank(g) <= K} ((1 - p0) max(Pin(g), P_S) + p0 Pin(g))
+ sum_{g in S} w_K(g) P_S, Pin the interpolation within rank <= K. sem-pcyc's AP@K is a ratio of
expectations, which lies between its values under the extreme orders. Every mean is over the
queries with R > 0. E[AP] of a random ranking = (1/N) * (H_N + (R-1)/(N-1) * (N - H_N)).

Speed: no row is ever sorted. Queries are processed class by class (all queries of a class share
the same relevant photos); for each chunk only the R relevant scores are sorted, and the rank of
each relevant item is found by counting how many gallery scores fall between consecutive
relevant scores (see _ranks_of_relevant). Memory is O(CHUNK_SIZE * N) on the embeddings' device.

Hashed retrieval: itq_codes fits ITQ (textbook, or SEM-PCYC's variant; docs/metrics.md, "Hashed
retrieval", gives every step) and returns packed uint8 codes; itq_stability says how many of those
bits are decided by rounding; hamming_distance compares codes by XOR and a popcount table;
retrieval_metrics(..., score="hamming") and fine_grained_accuracy(..., score="hamming") rank by
Hamming distance, with s_g = -hamming(query, g) and the same tie rules as above.
fine_grained_accuracy is instance-level acc@k (a query's one paired photo within the top k).
"""
import contextlib
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

PROTOCOLS = ("standard", "sake", "sem-pcyc", "doodle2search", "zse-sbir")
_VOC = {"sake", "zse-sbir"}  # VOC-interpolated AP
_RANK_ROWS = 64  # queries ranked at once inside a chunk
CHUNK_SIZE = 512  # queries retrieval_metrics scores at once: peak memory about 4 * CHUNK_SIZE * N bytes
SCORES = ("cosine", "hamming", "given")  # how a query scores a gallery item: cosine of embeddings, -Hamming of
# codes, or scores given as a (Q, N) matrix (score_matrix_metrics: e.g. a relation network's)
ITQ_VARIANTS = ("textbook", "sem-pcyc")
# itq_stability above this: the codes depend on rounding. A stable fit changes only bits whose projection lies
# within about 1e-7 of its scale of 0 (0 changed in every stable case measured); a fraction f moves a query-photo
# Hamming distance by about 2 f bits levels, one level at 512 bits for f = 0.001 (docs/metrics.md, "Stability").
ITQ_UNSTABLE = 0.001
_HAMMING_LOOKUPS = 1 << 22  # 16-bit table lookups (5 bytes of memory each) done at once by hamming_distance


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


def float_order(bits: Tensor) -> Tensor:
    """float32 bit patterns viewed as int32 -> int32 keys that sort as the floats do (and back: the map is its
    own inverse). A non-negative float's bits already sort as integers; a negative float's low 31 bits are
    reversed, so that more negative sorts lower. Integer sorts and top-k of the keys are faster than float ones."""
    return torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits)


def _sort_rows(x: Tensor) -> Tensor:
    """x sorted along dim 1, ascending. float32 is sorted as float_order keys (faster)."""
    if x.dtype != torch.float32:
        return x.sort(dim=1).values
    keys = float_order(x.contiguous().view(torch.int32)).sort(dim=1).values
    return float_order(keys).view(torch.float32)


def _ranks_of_relevant(scores: Tensor, start: int, stop: int, grid: float = 0.5) -> tuple[Tensor, Tensor, Tensor]:
    """rank(g), hits(g) and a(g) of the relevant items, which are the columns [start, stop) of scores.

    Args:
        scores: (B, N) scores of B queries that share their relevant columns.
        grid: bins per gallery item of the counting grid (a speed knob; results do not depend on it).
    Returns:
        rank, hits, before: (B, R) int64, relevant items in decreasing score order; before = a(g) =
        #{h : s_h > s_g}, the items ahead of g's tie group.

    With rel_0 <= ... <= rel_{R-1} a row's sorted relevant scores, hits(rel_j) = #{i : rel_i >= rel_j}
    and rank(rel_j) = hits(rel_j) + (N - R) - c_j, where c_j = #{irrelevant h : s_h < rel_j};
    a(rel_j) = (N - R - e_j) + #{i : rel_i > rel_j}, where e_j = #{irrelevant h : s_h <= rel_j}.
    A monotone map sends every score to one of L = grid * N equal-width bins over [rel_0, rel_{R-1}].
    An irrelevant item in a bin without relevant scores is below rel_j exactly when its bin is
    below rel_j's bin (it cannot equal rel_j), so those items are counted by a histogram of bins.
    An item sharing a bin with relevant scores is placed among them by comparison (usually with just
    one): p(h) = #{j : rel_j <= s_h} and q(h) = #{j : rel_j < s_h}; it is below rel_j exactly when
    p(h) <= j, and at most rel_j exactly when q(h) <= j.
    """
    b, n = scores.shape
    r = stop - start
    rel = _sort_rows(scores[:, start:stop])  # (B, R) ascending
    hits = _hits_of_sorted(rel)  # (B, R)
    num_bins = max(int(n * grid), 1)
    width = num_bins + 3  # per row: bins 0 .. L + 1, and bin L + 2 that parks the relevant items
    to_bins, offset = _bin_map(rel, num_bins, width)
    bins = to_bins(scores)  # (B, N)
    rel_bins = to_bins(rel)  # (B, R) the same values, so the same bins, in increasing order
    rel_count = torch.bincount(rel_bins.view(-1), minlength=b * width)  # (B * W,)
    occupied = rel_count > 0
    bins[:, start:stop] = offset.long() + width - 1  # the relevant items leave the count
    bins = bins.view(-1)
    c = e = _lone_below(bins, rel_bins, occupied, width)  # (B, R)
    shared = occupied.index_select(0, bins).nonzero().squeeze(1)  # (M,) items sharing a bin
    if shared.numel():
        below, at_most = _shared_below(scores, rel, hits, bins, rel_count, shared)
        c, e = c + below, e + at_most
    rank = (hits + (n - r) - c).flip(1)  # (B, R) decreasing scores from here
    before = ((n - r) - e).flip(1) + _group_start(rank)  # irrelevant items above, relevant items above
    return rank, hits.flip(1), before


def _ranks_of_relevant_distances(dist: Tensor, start: int, stop: int, levels: int) -> tuple[Tensor, Tensor, Tensor]:
    """_ranks_of_relevant for integer distances in [0, levels), lower = more similar (Hamming): with the
    score s = -d, rank(g) = #{h : d_h <= d_g}, hits(g) = #{relevant h : d_h <= d_g} and
    a(g) = #{h : d_h < d_g}, read from the cumulative histograms of each row's distances and of its
    relevant distances (columns [start, stop)).

    Returns rank, hits, before: (B, R) int64, relevant items in increasing distance (decreasing score) order.
    """
    b = dist.shape[0]
    flat = dist.long() + torch.arange(b, device=dist.device)[:, None] * levels  # (B, N) row-offset levels
    count = torch.bincount(flat.view(-1), minlength=b * levels).view(b, levels)  # (B, L) items at each distance
    at_most = count.cumsum(1)
    rel_at_most = torch.bincount(flat[:, start:stop].reshape(-1), minlength=b * levels).view(b, levels).cumsum(1)
    rel = dist[:, start:stop].long().sort(dim=1).values  # (B, R) ascending distances
    return at_most.gather(1, rel), rel_at_most.gather(1, rel), (at_most - count).gather(1, rel)


def _hits_of_sorted(rel: Tensor) -> Tensor:
    """(B, R) ascending relevant scores -> (B, R) int64 hits(rel_j) = #{i : rel_i >= rel_j} (ties count alike)."""
    r = rel.shape[1]
    tie_start = torch.ones_like(rel, dtype=torch.bool)
    tie_start[:, 1:] = rel[:, 1:] != rel[:, :-1]
    return r - (torch.arange(r, device=rel.device) * tie_start).cummax(1).values


def _bin_map(rel: Tensor, num_bins: int, width: int) -> tuple:
    """The monotone map of _ranks_of_relevant: (to_bins, offset (B, 1)). to_bins sends the rows' scores (B, K)
    to flat bin ids (B, K) int64, offset_b + 0 .. num_bins + 1 in row b: num_bins equal-width bins over
    [rel_0, rel_{R-1}] (rel (B, R) ascending), with the scores beyond them clamped into the end bins."""
    b = rel.shape[0]
    lo, hi = rel[:, :1], rel[:, -1:]  # (B, 1)
    inv = num_bins / (hi - lo)
    inv = torch.where(torch.isfinite(inv), inv, torch.zeros_like(inv))  # all relevant tied: one bin
    offset = (torch.arange(b, device=rel.device, dtype=rel.dtype) * width)[:, None]  # (B, 1)
    shift = (1.0 - lo * inv) + offset
    top = offset + num_bins + 1

    def to_bins(x: Tensor) -> Tensor:  # a separate multiply and add, each correctly rounded: one
        y = x * inv                    # monotone function of the score wherever it sits in the row
        y += shift
        return torch.clamp(y, min=offset, max=top).to(torch.int64)  # flat bin ids

    return to_bins, offset


def _lone_below(bins: Tensor, rel_bins: Tensor, occupied: Tensor, width: int) -> Tensor:
    """(B, R): for each rel_j, the irrelevant items below it in bins that hold no relevant score, counted
    from a histogram of the flat bin ids ``bins`` (B * N,) and ``rel_bins`` (B, R); the bins ``occupied``
    by relevant scores and each row's parking bin (its last) are left out of the histogram."""
    b = rel_bins.shape[0]
    lone = torch.bincount(bins, minlength=b * width).masked_fill_(occupied, 0)  # (B * W,)
    lone[width - 1::width] = 0
    lone_below = lone.view(b, width).cumsum(1).view(-1) - lone
    return lone_below.index_select(0, rel_bins.view(-1)).view(rel_bins.shape)


def _shared_below(scores: Tensor, rel: Tensor, hits: Tensor, bins: Tensor, rel_count: Tensor,
                  shared: Tensor) -> tuple[Tensor, Tensor]:
    """(B, R) twice: for each rel_j, the items ``shared`` (flat indices into scores (B, N)) that share a bin
    with relevant scores and lie below rel_j, #{h : p(h) <= j}, and those at most rel_j, #{h : q(h) <= j};
    p(h) = #{j : rel_j <= s_h} is found by comparison within h's bin (rel (B, R) ascending with hits (B, R)
    from _hits_of_sorted, rel_count (B * W,) relevant scores per flat bin), and q(h) = p(h) unless s_h
    equals rel_{p(h) - 1}, when it is the first index of that tie group, R - hits(rel_{p(h) - 1})."""
    b, r = rel.shape
    width = rel_count.numel() // b
    # Positions in a flat (B, R + 1) layout: that of rel padded with +inf and of the p histogram.
    first = (rel_count.view(b, width).cumsum(1) - rel_count.view(b, width)
             + torch.arange(b, device=rel.device)[:, None] * (r + 1)).view(-1)  # (B * W,)
    rel_pad = torch.cat([rel, rel.new_full((b, 1), float("inf"))], dim=1).view(-1)  # (B * (R + 1),)
    s = scores.reshape(-1).index_select(0, shared)  # (M,)
    bin_ = bins.index_select(0, shared)
    pos = first.index_select(0, bin_)  # the bin's lowest relevant score
    pos += rel_pad.index_select(0, pos) <= s  # settles every bin that holds one relevant score
    many = rel_count.index_select(0, bin_) > 1
    more = (many & (pos > first.index_select(0, bin_))).nonzero().squeeze(1)
    if more.numel():  # binary search among the bin's other relevant scores
        bin_m = bin_[more]
        end = first.index_select(0, bin_m) + rel_count.index_select(0, bin_m)  # past the bin's relevant scores
        pos[more] = _search_sorted(rel_pad, pos[more], end, s[more])
    p_hist = torch.bincount(pos, minlength=b * (r + 1)).view(b, r + 1)
    below = p_hist.cumsum(1)[:, :r]  # shared items with p(h) <= j
    last = (pos - 1).clamp(min=0)  # rel_{p(h) - 1}; at a row's start, the row before's +inf pad (or rel_0 > s_h)
    tied = (rel_pad.index_select(0, last) == s).nonzero().squeeze(1)  # (T,) items equal to a relevant score
    if not tied.numel():
        return below, below
    row_start = (torch.arange(b, device=rel.device) * (r + 1))[:, None]
    group_first = (torch.cat([r - hits, hits.new_zeros(b, 1)], dim=1) + row_start).view(-1)  # (B * (R + 1),)
    q_tied = group_first.index_select(0, last[tied])  # q(h) of the tied items; p(h) of the others
    moved = torch.bincount(q_tied, minlength=b * (r + 1)) - torch.bincount(pos[tied], minlength=b * (r + 1))
    return below, below + moved.view(b, r + 1).cumsum(1)[:, :r]  # and shared items with q(h) <= j


def _search_sorted(values: Tensor, lo: Tensor, hi: Tensor, x: Tensor) -> Tensor:
    """Binary search, one per element of x (M,): the first position in [lo, hi) of the flat, ascending
    stretch values[lo:hi] whose value exceeds x, or hi if none does."""
    for _ in range(int((hi - lo).max()).bit_length()):
        mid = (lo + hi) >> 1
        le = values.index_select(0, mid) <= x
        active = lo < hi
        lo = torch.where(active & le, mid + 1, lo)
        hi = torch.where(active & ~le, mid, hi)
    return lo


def _suffix_max(x: Tensor) -> Tensor:
    """max over positions >= t along dim 1."""
    return x.flip(1).cummax(1).values.flip(1)


def _group_start(rank: Tensor) -> Tensor:
    """(B, R) ranks of relevant items in decreasing score order -> (B, R) int64, the relevant items ahead of
    each item's tie group (the members of a group share their rank, and only they do)."""
    start = torch.ones_like(rank, dtype=torch.bool)
    start[:, 1:] = rank[:, 1:] != rank[:, :-1]
    return (torch.arange(rank.shape[1], device=rank.device) * start).cummax(1).values


def _expected_cut(k: int, rank: Tensor, before: Tensor, prec: Tensor, voc: bool) -> tuple:
    """The first k places, in expectation over the orders of the tied items: E[hits@k], E[sum of P over the
    relevant items there] and, if voc, E[sum of Pint@k there] (else None), each (B,) float64, from (B, R) rank,
    before (a(g)) and prec (P(g)) of B queries' relevant items in decreasing score order."""
    inside, straddle = rank <= k, (before < k) & (rank > k)
    if not straddle.any():  # no tie group holding relevant items straddles k (float scores, almost always)
        top = prec * inside
        return inside.sum(1).double(), top.sum(1), (_suffix_max(top) * inside).sum(1) if voc else None
    size = rank - before  # (B, R) m(g): g's tie group holds places a + 1 .. a + m
    ahead = (k - before).clamp(min=0)  # (B, R) of those, the ones within the first k (when < m)
    w = (ahead.double() / size).clamp(max=1.0)  # (B, R) w_k(g)
    if not voc:
        return w.sum(1), (w * prec).sum(1), None
    # p0: no relevant item of the straddling group S among the k - a places it gets, C(m - r_S, k - a) / C(m, k - a)
    # = prod_{i < r_S} (m - (k - a) - i) / (m - i): one factor for S's i-th relevant item.
    i = torch.arange(rank.shape[1], device=rank.device) - _group_start(rank)  # (B, R) g's index in its group
    factor = (size - ahead - i).clamp(min=0).double() / (size - i)
    p0 = torch.where(straddle, factor, 1.0).prod(1, keepdim=True)  # (B, 1), 1 when no group straddles k
    pin, pin_s = _suffix_max(prec * inside), _suffix_max(prec * (inside | straddle))  # without S, with all of S
    pint = (((1 - p0) * pin_s + p0 * pin) * inside).sum(1) + (w * prec * straddle).sum(1)
    return w.sum(1), (w * prec).sum(1), pint


def _chunk_values(rank: Tensor, hits: Tensor, before: Tensor, n: int, ks: Sequence[int], protocols,
                  pr_points: int) -> dict:
    """Per-query values of every protocol for B queries with the same R, from (B, R) rank, hits and before."""
    r = rank.shape[1]
    prec = hits.double() / rank  # (B, R) P(g), decreasing score order
    interp = _suffix_max(prec)  # (B, R) Pint(g)
    out = {}
    if pr_points:
        recall_hits = (torch.arange(pr_points, device=rank.device) * r + pr_points - 2) // (pr_points - 1)
        out["pr"] = interp[:, (recall_hits - 1).clamp(min=0)]  # (B, P) interpolated precision at recall i/(P-1)
    voc = any(name in _VOC for name in protocols)
    cutoffs = {*ks, *(min(r, k) for k in ks if "zse-sbir" in protocols)}  # zse-sbir's P cuts at min(R, K)
    cuts = {c: _expected_cut(c, rank, before, prec, voc) for c in cutoffs}  # shared by the protocols
    for name in protocols:
        vals = {"ap": (interp if name in _VOC else prec).sum(1) / r}
        for k in ks:
            hits_k, sum_p, sum_pint = cuts[k]
            if name == "standard":
                vals[f"ap@{k}"] = sum_p / min(r, k)
            elif name == "sem-pcyc":  # a ratio of expectations; sum_p = 0 where hits_k = 0
                vals[f"ap@{k}"] = sum_p / torch.where(hits_k > 0, hits_k, 1.0)
            elif name in _VOC:
                vals[f"ap@{k}"] = sum_pint / min(r, k)
            if name == "doodle2search":
                vals[f"p@{k}"] = hits_k / min(r, k)
            elif name == "zse-sbir":
                vals[f"p@{k}"] = cuts[min(r, k)][0] / min(r, k)
            else:
                vals[f"p@{k}"] = hits_k / min(k, n)
        out[name] = vals
    return out


def retrieval_metrics(query_emb: Tensor, query_labels: Tensor, gallery_emb: Tensor, gallery_labels: Tensor,
                      ks: Sequence[int] = (100, 200), protocols: Sequence[str] = ("standard",), pr_points: int = 0,
                      score: str = "cosine") -> dict:
    """AP, mAP, P@K and mAP@K of cosine (or Hamming) retrieval under each requested protocol.

    Args:
        query_emb: (Q, D) query embeddings; query_labels: (Q,) int class labels.
        gallery_emb: (N, D) gallery embeddings; gallery_labels: (N,) int class labels.
        ks: cut-offs for P@K and mAP@K (a tie group straddling K counts in expectation: module docstring).
        protocols: names from PROTOCOLS (docs/metrics.md defines each).
        pr_points: if > 1, also the mean interpolated precision at recall 0, 1/(P-1), ..., 1.
        score: "cosine" (embeddings) or "hamming": query_emb (Q, C) and gallery_emb (N, C) are then
            uint8 packed codes (itq_codes) and the score is -hamming_distance, so that every
            protocol ranks by Hamming distance, equal distances being ties; the ranks then come
            from histograms of the distances.
    CHUNK_SIZE queries are scored at once: peak memory is about 4 * CHUNK_SIZE * N bytes plus a fixed
    2.5 MB * N / 1000 for the counting.
    Returns:
        {"num_queries": queries with R > 0, "num_queries_without_relevant": queries with R = 0
        (excluded from every mean and per-class AP), "num_relevant": (Q,) int64 R per query,
        "protocols": {name: {"map_all", "p@K", "map@K" (python floats; no mAP@K for
        doodle2search), "ap", "per_query_p@K", "per_query_ap@K" ((Q,) float64 on the CPU, 0 for
        excluded queries), "per_class_ap": {label: mean AP of its queries}}},
        and with pr_points "pr_curve": {"recall": (P,), "precision": (P,)} float64}.
    """
    if score == "given":
        raise ValueError("score='given' is score_matrix_metrics'; pass the (Q, N) scores there")
    return _metrics(query_emb, query_labels, gallery_emb, gallery_labels, ks, protocols, pr_points, score)


def score_matrix_metrics(scores: Tensor, query_labels: Tensor, gallery_labels: Tensor,
                         ks: Sequence[int] = (100, 200), protocols: Sequence[str] = ("standard",),
                         pr_points: int = 0) -> dict:
    """retrieval_metrics of given scores (Q, N), higher = more similar (e.g. ZSE-SBIR's relation network scoring
    every query-gallery pair): the same ranks, tie rules, protocols and output; the scores are ranked as given,
    in at least float32, chunk by chunk on their device."""
    if scores.ndim != 2 or scores.shape[1] != len(gallery_labels):
        raise ValueError(f"expected (Q, N) scores for {len(gallery_labels)} gallery items, got {tuple(scores.shape)}")
    placeholder = scores.new_zeros(len(gallery_labels), scores.shape[1])[:, :0]  # (N, 0): no memory
    return _metrics(scores, query_labels, placeholder, gallery_labels, ks, protocols, pr_points, "given")


def _metrics(query_emb: Tensor, query_labels: Tensor, gallery_emb: Tensor, gallery_labels: Tensor,
             ks: Sequence[int], protocols: Sequence[str], pr_points: int, score: str) -> dict:
    """retrieval_metrics and score_matrix_metrics (score "given": query_emb is the (Q, N) scores, gallery_emb an
    (N, 0) placeholder)."""
    _check_inputs(query_emb if score != "given" else query_emb[:, :0], query_labels, gallery_emb, gallery_labels,
                  ks, protocols, pr_points)
    if score == "given" and not torch.isfinite(query_emb).all():
        raise ValueError("scores contain NaN or inf")
    _check_score(score, query_emb, gallery_emb)
    device = query_emb.device
    query_labels = query_labels.to(device=device, dtype=torch.long)
    gallery_labels = gallery_labels.to(device=device, dtype=torch.long)
    # Gallery sorted by class: every class's photos are one contiguous block of columns.
    gallery_labels, g_order = gallery_labels.sort(stable=True)
    gallery = gallery_emb.to(device)[g_order]  # (N, D), or (N, C) codes, or (N, 0)
    if score == "cosine":
        gallery = _unit(gallery)
    if score == "given":  # the columns follow the gallery's new order
        query_emb = query_emb[:, g_order.to(query_emb.device)]

    num_rel = _count_relevant(query_labels.cpu(), gallery_labels.cpu())  # (Q,)
    valid = num_rel > 0
    if not valid.any():
        raise ValueError("no query has a relevant item in the gallery: check that the query and "
                         "gallery classes are the same split")
    q_labels_cpu = query_labels.cpu()
    per_query, pr_sum = _per_query_values(query_emb, q_labels_cpu, gallery, gallery_labels, ks, protocols,
                                          pr_points, score)
    out = {"num_relevant": num_rel, "num_queries": int(valid.sum()),
           "num_queries_without_relevant": int((~valid).sum()),
           "protocols": {name: _summary(per_query[name], valid, q_labels_cpu, ks) for name in protocols}}
    if pr_points:
        out["pr_curve"] = {"recall": torch.linspace(0, 1, pr_points, dtype=torch.float64),
                           "precision": pr_sum / out["num_queries"]}
    return out


def _scores(query: Tensor, gallery: Tensor, score: str) -> Tensor:
    """(B, N) scores, higher = more similar: the cosine of query (B, D) with the unit-normalised gallery (N, D),
    or, for score "hamming", minus the Hamming distance of packed codes (B, C) and (N, C), as float32 (exact:
    every distance is an integer of at most 8 * C)."""
    if score == "hamming":
        return hamming_distance(query, gallery).neg_().float()
    if score == "given":  # the query rows are the scores
        return query if query.dtype == torch.float64 else query.float()
    return _unit(query) @ gallery.T  # (B, D) @ (D, N)


def _check_score(score: str, query_emb: Tensor, gallery_emb: Tensor) -> None:
    """A known score, uint8 codes for "hamming" and no uint8 codes for "cosine", or a ValueError."""
    if score not in SCORES:
        raise ValueError(f"unknown score {score!r}; choose from {', '.join(SCORES)}")
    codes = query_emb.dtype == torch.uint8 and gallery_emb.dtype == torch.uint8
    if score == "hamming" and not codes:
        raise ValueError("score='hamming' needs packed uint8 codes (from itq_codes), got "
                         f"{query_emb.dtype} and {gallery_emb.dtype}")
    if score == "given" and not query_emb.is_floating_point():
        raise ValueError(f"scores must be floating point, got {query_emb.dtype}")
    if score == "cosine" and torch.uint8 in (query_emb.dtype, gallery_emb.dtype):
        raise ValueError("got uint8 tensors, which look like packed codes: pass score='hamming' to rank them by "
                         "Hamming distance")


def _class_blocks(sorted_labels: Tensor) -> dict:
    """{class: (start, stop)}: the columns of each class in a gallery sorted by class."""
    g_classes, g_counts = torch.unique_consecutive(sorted_labels, return_counts=True)
    g_stop = g_counts.cumsum(0)
    return {c: (int(e - k), int(e)) for c, k, e in zip(g_classes.tolist(), g_counts.tolist(), g_stop.tolist())}


def _per_query_values(query_emb: Tensor, q_labels_cpu: Tensor, gallery: Tensor, gallery_labels: Tensor,
                      ks: Sequence[int], protocols: Sequence[str], pr_points: int, score: str) -> tuple[dict, Tensor]:
    """Every protocol's per-query values, {name: {key: (Q,) float64 on the CPU}} (0 for queries without a
    relevant item), and the sum over the queries of their (P,) interpolated precisions; the gallery (N, D)
    is unit-normalised (or (N, C) codes) and sorted by class (gallery_labels (N,))."""
    num_q, n = query_emb.shape[0], gallery.shape[0]
    keys = {name: ["ap"] + [f"p@{k}" for k in ks] + ([] if name == "doodle2search" else [f"ap@{k}" for k in ks])
            for name in protocols}
    per_query = {name: {key: torch.zeros(num_q, dtype=torch.float64) for key in keys[name]} for name in protocols}
    pr_sum = torch.zeros(max(pr_points, 0), dtype=torch.float64)
    for c, (start, stop) in _class_blocks(gallery_labels).items():
        idx = (q_labels_cpu == c).nonzero().squeeze(1)  # (Qc,) queries of this class
        for s in range(0, idx.numel(), CHUNK_SIZE):
            rows = idx[s:s + CHUNK_SIZE]
            q = query_emb[rows.to(query_emb.device)]
            if score == "hamming":  # (B, N) int32 distances, ranked from their histograms
                scores = hamming_distance(q, gallery)
            else:
                scores = _scores(q, gallery, score)  # (B, N): cosine, or as given in at least float32
            for t in range(0, rows.numel(), _RANK_ROWS):  # small blocks keep the counting in cache
                if score == "hamming":
                    ranked = _ranks_of_relevant_distances(scores[t:t + _RANK_ROWS], start, stop,
                                                          8 * gallery.shape[1] + 1)
                else:
                    ranked = _ranks_of_relevant(scores[t:t + _RANK_ROWS], start, stop)
                vals = _chunk_values(*ranked, n, ks, protocols, pr_points)
                if pr_points:
                    pr_sum += vals.pop("pr").sum(0).cpu()
                for name in protocols:
                    for key in keys[name]:
                        per_query[name][key][rows[t:t + _RANK_ROWS]] = vals[name][key].cpu()
            del scores
    return per_query, pr_sum


def _check_inputs(query_emb: Tensor, query_labels: Tensor, gallery_emb: Tensor, gallery_labels: Tensor,
                  ks: Sequence[int], protocols: Sequence[str], pr_points: int) -> None:
    """retrieval_metrics' arguments, or a ValueError that says which is wrong."""
    if query_emb.ndim != 2 or gallery_emb.ndim != 2 or query_emb.shape[1] != gallery_emb.shape[1]:
        raise ValueError(f"expected (Q, D) and (N, D) embeddings, got {tuple(query_emb.shape)} and "
                         f"{tuple(gallery_emb.shape)}")
    if query_labels.shape != query_emb.shape[:1] or gallery_labels.shape != gallery_emb.shape[:1]:
        raise ValueError("need one label per embedding")
    if gallery_emb.shape[0] == 0:
        raise ValueError("the gallery is empty")
    unknown = [p for p in protocols if p not in PROTOCOLS]
    if unknown:
        raise ValueError(f"unknown protocol {unknown[0]!r}; choose from {', '.join(PROTOCOLS)}")
    if not (torch.isfinite(query_emb).all() and torch.isfinite(gallery_emb).all()):
        raise ValueError("embeddings contain NaN or inf")
    if any(int(k) < 1 for k in ks) or pr_points == 1 or pr_points < 0:
        raise ValueError("ks must be positive and pr_points 0 or at least 2")


def _summary(per_query: dict, valid: Tensor, query_labels: Tensor, ks: Sequence[int]) -> dict:
    """One protocol's per-query values (Q,) -> their means over the queries with a relevant item, the
    per-query tensors, and the mean AP of each query class."""
    classes, inverse = torch.unique(query_labels[valid], return_inverse=True)  # (C,), (Qv,)
    counts = torch.bincount(inverse, minlength=len(classes))  # (C,)
    res = {"ap": per_query["ap"], "map_all": per_query["ap"][valid].mean().item()}
    for k in ks:
        res[f"per_query_p@{k}"] = per_query[f"p@{k}"]
        res[f"p@{k}"] = res[f"per_query_p@{k}"][valid].mean().item()
        if f"ap@{k}" in per_query:  # every protocol but doodle2search
            res[f"per_query_ap@{k}"] = per_query[f"ap@{k}"]
            res[f"map@{k}"] = res[f"per_query_ap@{k}"][valid].mean().item()
    sums = torch.zeros(len(classes), dtype=torch.float64).index_add_(0, inverse, res["ap"][valid])
    res["per_class_ap"] = dict(zip(classes.tolist(), (sums / counts).tolist()))
    return res


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


# ------------------------------------------------------------------------------------------ hashing


def itq_codes(query_emb: Tensor, gallery_emb: Tensor, bits: int = 64, variant: str = "textbook",
              iterations: int = 50, seed: int = 0) -> tuple[Tensor, Tensor]:
    """Binary codes of the queries and the gallery by Iterative Quantisation (ITQ), packed 8 bits a byte.

    ITQ (Gong and Lazebnik, CVPR 2011; TPAMI 2013) projects each side, centred on its own mean, onto the
    `bits` leading principal components W (D, c) of the centred **queries** (the test-set sketches, as
    SEM-PCYC fits), V = (X - mu) W, and looks for codes B in {-1, +1}^(n x c) and a rotation R (c, c)
    minimising ||B - V R||_F^2 on the queries, alternating `iterations` times

        B = sgn(V R)                                        sgn(0) = +1
        R = argmax_{R^T R = I} tr(B^T V R) = W_C U_C^T,     B^T V = U_C S W_C^T (SVD; orthogonal Procrustes)

    variant="textbook": exactly that, in float64 on the CPU; W's columns signed so that each one's
        largest-magnitude entry is positive; R starts at the Q of the QR of a (bits, bits) standard
        normal matrix from torch.Generator().manual_seed(seed); codes X W R >= 0.
    variant="sem-pcyc": AnjanDutta/sem-pcyc src/itq.py (compressITQ, ITQ) step by step, with numpy, in
        the embeddings' own precision as theirs (float32 from their model: centred in float32, then
        float64 where numpy promotes); eigh's signs; R starts at the U of the SVD of randn(bits, bits)
        after seeding numpy with `iterations`; their update R = W_C^T U_C^T (a port of MATLAB's
        [UB, S, UA] = svd(C); R = UA * UB', with numpy's transposed third factor: orthogonal, but not
        the Procrustes optimum); codes V R > 0.
    docs/metrics.md ("Hashed retrieval") gives every step and its source; itq_stability tells how many
    of the bits depend on rounding.

    Args:
        query_emb: (Q, D) float; gallery_emb: (N, D) float.
        bits: code length, a positive multiple of 8 and at most D.
        variant: one of ITQ_VARIANTS.
        iterations: alternations of the two updates (50 in both papers' code).
        seed: the textbook variant's initial rotation (SEM-PCYC's seed is `iterations`).
    Returns:
        (Q, bits // 8) and (N, bits // 8) uint8 on each input's device: code bit j is bit 7 - j % 8 of
        byte j // 8 (numpy.packbits' order); compare them with hamming_distance or
        retrieval_metrics(..., score="hamming").
    """
    _check_itq(query_emb, gallery_emb, bits, variant, iterations)
    q_bits, g_bits = _itq_bits(query_emb, gallery_emb, bits, variant, iterations, seed,
                               _own_precision(variant, query_emb))
    return _pack_bits(q_bits).to(query_emb.device), _pack_bits(g_bits).to(gallery_emb.device)


def itq_stability(query_emb: Tensor, gallery_emb: Tensor, bits: int = 64, variant: str = "textbook",
                  iterations: int = 50, seed: int = 0) -> float:
    """The fraction of all code bits, the queries' and the gallery's together, that change when itq_codes
    centres the embeddings in the other precision (float32 <-> float64), every later step unchanged.

    SEM-PCYC centres in the embeddings' own precision (float32 from their model), the textbook fit in
    float64, so the two results are the codes of embeddings that differ only by the rounding of one
    float32 subtraction (about 6e-8 of each value): 0 means rounding decides no bit. Above ITQ_UNSTABLE
    the codes, and every metric on them, depend on rounding rather than on the embeddings: an
    ill-conditioned fit, such as more bits than the queries' covariance has eigenvalues clear of 0 (fewer
    queries than dimensions), or SEM-PCYC's update at long codes (docs/metrics.md, "Stability", has
    measured figures). Costs two ITQ fits; the arguments are itq_codes'.
    """
    _check_itq(query_emb, gallery_emb, bits, variant, iterations)
    own = _own_precision(variant, query_emb)
    other = torch.float32 if own == torch.float64 else torch.float64
    a = _itq_bits(query_emb, gallery_emb, bits, variant, iterations, seed, own)
    b = _itq_bits(query_emb, gallery_emb, bits, variant, iterations, seed, other)
    changed = sum(int((x != y).sum()) for x, y in zip(a, b))
    return changed / ((query_emb.shape[0] + gallery_emb.shape[0]) * bits)


def _own_precision(variant: str, query_emb: Tensor) -> torch.dtype:
    """The precision a variant centres the embeddings in: textbook float64; sem-pcyc the embeddings' own, as
    their numpy code computes on the arrays it is given (float32 for anything narrower)."""
    if variant == "sem-pcyc" and query_emb.dtype != torch.float64:
        return torch.float32
    return torch.float64


def _itq_bits(query_emb: Tensor, gallery_emb: Tensor, bits: int, variant: str, iterations: int, seed: int,
              dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """itq_codes' (Q, bits) and (N, bits) bool codes on the CPU, with both sides centred in dtype (float32 or
    float64); the textbook fit then runs in float64, sem-pcyc's numpy promotes as theirs does."""
    xq = query_emb.detach().to("cpu", dtype)  # (Q, D)
    xg = gallery_emb.detach().to("cpu", dtype)  # (N, D)
    if variant == "sem-pcyc":
        q_bits, g_bits = _sem_pcyc_itq(xq.numpy(), xg.numpy(), bits, iterations)
        return torch.from_numpy(q_bits), torch.from_numpy(g_bits)
    xq, xg = (xq - xq.mean(0)).double(), (xg - xg.mean(0)).double()  # each side on its own mean, as SEM-PCYC
    with _one_thread():
        pcs = _leading_components(xq.T @ xq / (xq.shape[0] - 1), bits)  # (D, bits), fitted on the queries
        gen = torch.Generator().manual_seed(seed)
        r0 = torch.linalg.qr(torch.randn(bits, bits, generator=gen, dtype=torch.float64)).Q
        rot = _itq_rotation(xq @ pcs, r0, iterations)  # (bits, bits)
    return xq @ pcs @ rot >= 0, xg @ pcs @ rot >= 0  # (Q, bits), (N, bits)


def _check_itq(query_emb: Tensor, gallery_emb: Tensor, bits: int, variant: str, iterations: int) -> None:
    """itq_codes' arguments, or a ValueError that says which is wrong."""
    if query_emb.ndim != 2 or gallery_emb.ndim != 2 or query_emb.shape[1] != gallery_emb.shape[1]:
        raise ValueError(f"expected (Q, D) and (N, D) embeddings, got {tuple(query_emb.shape)} and "
                         f"{tuple(gallery_emb.shape)}")
    dim = query_emb.shape[1]
    if isinstance(bits, bool) or not isinstance(bits, int) or bits < 8 or bits % 8 or bits > dim:
        raise ValueError(f"hash codes need a bit count that is a positive multiple of 8 and at most the "
                         f"embedding size {dim}, got {bits!r}")
    if variant not in ITQ_VARIANTS:
        raise ValueError(f"unknown ITQ variant {variant!r}; choose from {', '.join(ITQ_VARIANTS)}")
    if iterations < 0:
        raise ValueError(f"iterations must be >= 0, got {iterations}")
    if query_emb.shape[0] < 2 or gallery_emb.shape[0] < 1:
        raise ValueError("ITQ needs at least 2 queries and 1 gallery item to fit a projection")
    if not (torch.isfinite(query_emb).all() and torch.isfinite(gallery_emb).all()):
        raise ValueError("embeddings contain NaN or inf")


@contextlib.contextmanager
def _one_thread():
    """torch on one thread inside the block. ITQ's small LAPACK calls (a (D, D) eigh, 50 (c, c) SVDs) need no
    parallelism, and on 2 threads of a busy or CPU-capped 2-core machine they ran 100x slower than on one (a
    512 x 512 eigh: 3.3 s against 0.03 s under the 4x cap), their threads waiting for each other."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _leading_components(cov: Tensor, bits: int) -> Tensor:
    """(D, D) covariance -> (D, bits) its eigenvectors of largest eigenvalue first, each signed so that its
    largest-magnitude entry (the first, if several) is positive."""
    _, vecs = torch.linalg.eigh(cov)  # eigenvalues ascending
    pcs = vecs.flip(1)[:, :bits]  # (D, bits) descending
    peak = pcs.abs().argmax(0)  # (bits,)
    return pcs * torch.sign(pcs[peak, torch.arange(bits)])


def _itq_rotation(v: Tensor, rot: Tensor, iterations: int) -> Tensor:
    """Textbook ITQ: `iterations` rounds of B = sgn(V R) (sgn(0) = +1) and the Procrustes optimum R = W_C U_C^T
    with B^T V = U_C S W_C^T, from R = rot (c, c); V (n, c) float64."""
    for _ in range(iterations):
        b = (v @ rot >= 0).to(v.dtype) * 2 - 1  # (n, c) in {-1, +1}
        u, _, wh = torch.linalg.svd(b.T @ v)  # (c, c) = U_C S W_C^T
        rot = wh.T @ u.T
    return rot


def _sem_pcyc_itq(xq: np.ndarray, xg: np.ndarray, bits: int, iterations: int) -> tuple[np.ndarray, np.ndarray]:
    """SEM-PCYC's compressITQ (see itq_codes) on float32 or float64 (Q, D) and (N, D) arrays -> (Q, bits),
    (N, bits) bool, with their promotions: they centre in the arrays' precision, np.cov computes in float64,
    and a float32 array times the float64 components is float64."""
    xq = xq - np.mean(xq, axis=0, keepdims=True)
    xg = xg - np.mean(xg, axis=0, keepdims=True)
    vals, vecs = np.linalg.eigh(np.cov(xq, rowvar=False), "U")
    pcs = vecs[:, np.argsort(vals)[::-1]][:, :bits]  # (D, bits) float64, largest eigenvalue first
    v = np.matmul(xq, pcs)  # (Q, bits) float64
    rot = np.linalg.svd(np.random.RandomState(iterations).randn(bits, bits))[0]  # their seed is n_iter
    for _ in range(iterations):
        b = np.where(v @ rot >= 0, 1.0, -1.0)
        ub, _, ua = np.linalg.svd(b.T @ v)  # ua is W_C^T: numpy's third factor is transposed
        rot = ua @ ub.T
    return v @ rot > 0, np.matmul(xg, pcs) @ rot > 0


def _pack_bits(code_bits: Tensor) -> Tensor:
    """(n, c) bool, c a multiple of 8 -> (n, c // 8) uint8, bit j in bit 7 - j % 8 of byte j // 8."""
    n, c = code_bits.shape
    weights = torch.tensor([128, 64, 32, 16, 8, 4, 2, 1], dtype=torch.int32, device=code_bits.device)
    return (code_bits.view(n, c // 8, 8).int() * weights).sum(2).to(torch.uint8)


def _popcount_table(device) -> Tensor:
    """(65536,) uint8: the number of set bits of every 16-bit value."""
    v = torch.arange(1 << 16, device=device)
    return sum((v >> k) & 1 for k in range(16)).to(torch.uint8)


def _words16(codes: Tensor) -> Tensor:
    """(n, C) uint8 packed codes -> (n, ceil(C / 2)) int32 16-bit words (an odd C gets a zero byte)."""
    if codes.shape[1] % 2:
        codes = torch.cat([codes, codes.new_zeros(codes.shape[0], 1)], dim=1)
    return (codes[:, 0::2].int() << 8) | codes[:, 1::2].int()


def hamming_distance(query_codes: Tensor, gallery_codes: Tensor) -> Tensor:
    """Hamming distance of every query code with every gallery code, (Q, N) int32 on the codes' device.

    Codes are packed uint8, (Q, C) and (N, C) (itq_codes). Byte pairs are read as 16-bit words; the
    words are XORed, each result is looked up in a 65,536-entry popcount table, and the counts are
    summed (half the lookups of a byte table; with the words formed once per call rather than each
    XORed byte widened to an index, it measured 8x faster on a 2-core CPU). The queries are taken
    in blocks of about 4M lookups, so the (block, N, C / 2) intermediates stay near 20 MB; callers
    that need bounded memory pass chunks of queries (retrieval_metrics does).
    """
    if (query_codes.dtype != torch.uint8 or gallery_codes.dtype != torch.uint8 or query_codes.ndim != 2
            or gallery_codes.ndim != 2 or query_codes.shape[1] != gallery_codes.shape[1]):
        raise ValueError(f"expected (Q, C) and (N, C) uint8 codes, got {tuple(query_codes.shape)} "
                         f"{query_codes.dtype} and {tuple(gallery_codes.shape)} {gallery_codes.dtype}")
    device = query_codes.device
    qw, gw = _words16(query_codes), _words16(gallery_codes.to(device))  # (Q, W), (N, W) int32
    q, w = qw.shape
    n = gw.shape[0]
    table = _popcount_table(device)
    out = torch.empty(q, n, dtype=torch.int32, device=device)
    rows = max(1, _HAMMING_LOOKUPS // max(n * w, 1))
    for s in range(0, q, rows):
        x = qw[s:s + rows, None, :] ^ gw[None]  # (b, N, W) differing bits
        out[s:s + rows] = table.index_select(0, x.view(-1)).view(x.shape).sum(2, dtype=torch.int32)
    return out


# ------------------------------------------------------------------------------------- fine-grained


def fine_grained_accuracy(query_emb: Tensor, gallery_emb: Tensor, target_index: Tensor,
                          ks: Sequence[int] = (1, 5), score: str = "cosine", chunk_size: int = 512) -> dict:
    """Instance-level acc@k: the share of queries whose paired gallery item, row target_index[i], ranks
    within the top k.

        rank_i  = #{g : s_ig >= s_i,target(i)}      the target counts itself, and every gallery item
                                                    scoring as high as the target (a tie) counts against it
        acc@k   = (1/Q) sum_i [rank_i <= k]

    Ties take the last position of their group (the rank Sketch_LVM computes, dist.le(trgt_dist).sum(), in
    its deleted instance-level branch; docs/metrics.md, "Fine-grained acc@k", gives the source and its
    gallery of one paired photo per sketch). The target's score is read from the same (chunk, N) score
    matrix as the others', so it ties with itself exactly. This function ranks whatever gallery it is given:
    to count each photo once, pass the unique photos and point target_index at each sketch's photo.

    Args:
        query_emb: (Q, D) float embeddings, or (Q, C) uint8 codes with score="hamming".
        gallery_emb: (N, D) float, or (N, C) uint8 codes.
        target_index: (Q,) integer, the gallery row of each query's paired item.
        ks: cut-offs k.
        score: "cosine" or "hamming" (s = -Hamming distance), as in retrieval_metrics, or "given": query_emb
            is then the (Q, N) scores themselves (e.g. relation scores) and gallery_emb an (N, 0) placeholder.
        chunk_size: queries scored at once (memory about 4 * chunk_size * N bytes).
    Returns:
        {"acc@k": float for each k, "mean_rank": float, "rank": (Q,) int64 on the CPU}.
    """
    target = _check_fine_grained(query_emb, gallery_emb, target_index, ks, score, chunk_size)
    device = query_emb.device
    gallery = gallery_emb.to(device)
    if score == "cosine":
        gallery = _unit(gallery)
    target = target.to(device=device, dtype=torch.long)
    rank = torch.empty(query_emb.shape[0], dtype=torch.long)
    for s in range(0, query_emb.shape[0], chunk_size):
        scores = _scores(query_emb[s:s + chunk_size], gallery, score)  # (B, N)
        own = scores.gather(1, target[s:s + chunk_size, None])  # (B, 1) the target's score
        rank[s:s + chunk_size] = (scores >= own).sum(1).cpu()
    out = {f"acc@{k}": (rank <= k).double().mean().item() for k in ks}
    out["mean_rank"] = rank.double().mean().item()
    out["rank"] = rank
    return out


def _check_fine_grained(query_emb: Tensor, gallery_emb: Tensor, target_index: Tensor, ks: Sequence[int],
                        score: str, chunk_size: int) -> Tensor:
    """fine_grained_accuracy's arguments -> target_index as a tensor, or a ValueError that says what is wrong."""
    width = gallery_emb.shape[0] if score == "given" else gallery_emb.shape[1]  # given: (Q, N) scores, (N, 0)
    if query_emb.ndim != 2 or gallery_emb.ndim != 2 or query_emb.shape[1] != width:
        raise ValueError(f"expected (Q, D) and (N, D) inputs, got {tuple(query_emb.shape)} and "
                         f"{tuple(gallery_emb.shape)}")
    _check_score(score, query_emb, gallery_emb)
    num_q, n = query_emb.shape[0], gallery_emb.shape[0]
    target = torch.as_tensor(target_index)
    if target.shape != (num_q,) or target.is_floating_point() or target.dtype == torch.bool:
        raise ValueError(f"target_index must hold one integer gallery row per query, shape ({num_q},), got "
                         f"{tuple(target.shape)} {target.dtype}")
    if num_q == 0 or n == 0:
        raise ValueError("need at least one query and one gallery item")
    if int(target.min()) < 0 or int(target.max()) >= n:
        raise ValueError(f"target_index must lie in [0, {n}), got values from {int(target.min())} to "
                         f"{int(target.max())}")
    if any(int(k) < 1 for k in ks) or chunk_size < 1:
        raise ValueError("ks and chunk_size must be positive")
    if score == "cosine" and not (torch.isfinite(query_emb).all() and torch.isfinite(gallery_emb).all()):
        raise ValueError("embeddings contain NaN or inf")
    return target
