"""Tests of metrics.py against plain per-query loops that follow docs/metrics.md word for word.

The references below never call metrics internals: scores are cosines computed here in float64,
tie groups are built with a dict, and every protocol's AP, AP@K, P@K and the PR curve are written
out from their definitions. A second, more literal reference replays the peers' code (a sorted
list, cumsums and the VOC rule) on data without ties.
"""
import itertools
import math
from fractions import Fraction

import numpy as np
import pytest
import torch
from sklearn.metrics import average_precision_score

import metrics

PROTOCOLS = metrics.PROTOCOLS
VOC = ("sake", "zse-sbir")
GALLERY_CLASS_SIZES = (1, 2, 5, 20, 60, 100)  # R from 1 to 100, N = 188
KS = (1, 3, 10, 50, 100, 150, 1000)  # K = 1, K below some R, K = R = 100, K = 1000 above N
PR_POINTS = 11


def test_protocol_names():
    assert PROTOCOLS == ("standard", "sake", "sem-pcyc", "doodle2search", "zse-sbir")


# ----------------------------------------------------------------------------------------- data


def dyadic_embeddings(n: int, gen: torch.Generator, dim: int = 16) -> torch.Tensor:
    """Rows with 1, 4 or 16 non-zeros of magnitude 1, 1/2 or 1/4 (unit norm), scaled by 2^{-1..2}.

    Every cosine score is then a multiple of 1/16, computed exactly in float32 (and float64)
    whatever the summation order, so many scores tie and the ties are identical on any device,
    chunking or reference.
    """
    emb = torch.zeros(n, dim)
    for i in range(n):
        nnz = (1, 4, 16)[int(torch.randint(3, (1,), generator=gen))]
        cols = torch.randperm(dim, generator=gen)[:nnz]
        signs = torch.randint(2, (nnz,), generator=gen).float() * 2 - 1
        emb[i, cols] = signs / math.sqrt(nnz)
    scale = 2.0 ** torch.randint(-1, 3, (n, 1), generator=gen).float()
    return emb * scale  # (n, dim)


def class_labels(num_queries_per_class: int = 8):
    gallery_labels = torch.cat([torch.full((size,), c) for c, size in enumerate(GALLERY_CLASS_SIZES)])
    query_labels = torch.arange(len(GALLERY_CLASS_SIZES)).repeat_interleave(num_queries_per_class)
    return query_labels, gallery_labels


def make_data(seed: int, num_queries_per_class: int = 8):
    """Dyadic embeddings: scores full of ties. Classes of sizes GALLERY_CLASS_SIZES."""
    gen = torch.Generator().manual_seed(seed)
    query_labels, gallery_labels = class_labels(num_queries_per_class)
    query_emb = dyadic_embeddings(len(query_labels), gen)
    gallery_emb = dyadic_embeddings(len(gallery_labels), gen)
    return query_emb, query_labels, gallery_emb, gallery_labels


def make_continuous_data(seed: int, dim: int = 8, spread: float = 1.0):
    """float64 embeddings near a per-class centre, so APs spread over (0, 1]; no ties."""
    gen = torch.Generator().manual_seed(seed)
    query_labels, gallery_labels = class_labels()
    centres = torch.randn(len(GALLERY_CLASS_SIZES), dim, generator=gen, dtype=torch.float64)
    query_emb = centres[query_labels] + spread * torch.randn(len(query_labels), dim, generator=gen,
                                                             dtype=torch.float64)
    gallery_emb = centres[gallery_labels] + spread * torch.randn(len(gallery_labels), dim, generator=gen,
                                                                 dtype=torch.float64)
    return query_emb, query_labels, gallery_emb, gallery_labels


def cosine_scores(query_emb: torch.Tensor, gallery_emb: torch.Tensor) -> list:
    """Cosine of every query with every gallery item, in float64 numpy, as nested lists."""
    q = query_emb.double().numpy()
    g = gallery_emb.double().numpy()
    q = q / np.linalg.norm(q, axis=1, keepdims=True)
    g = g / np.linalg.norm(g, axis=1, keepdims=True)
    return (q @ g.T).tolist()


# ------------------------------------------------------------------ reference from the definitions


def reference_query(scores: list, rel: list, ks, pr_points: int = 0) -> dict:
    """One query with R > 0, by the written definitions, in plain Python.

    Tie groups in decreasing score order; every member of a group gets rank = items in this and
    all higher groups, hits = relevant items in this and all higher groups, ahead = items in the
    higher groups. At a cut-off K, a relevant item lies in the first K places with probability
    w = clamp((K - ahead) / size, 0, 1) over the orders of the tied items (size = rank - ahead), and
    every value at K is an expectation over those orders (test_tie_orders_* check these formulas
    against every order).
    """
    n, r = len(scores), sum(rel)
    assert r > 0
    groups = {}  # score -> relevance flags of its tie group (-0.0 and 0.0 are one key)
    for s, is_rel in zip(scores, rel):
        groups.setdefault(s, []).append(is_rel)
    rank, hits, ahead = {}, {}, {}
    seen = seen_rel = 0
    for s in sorted(groups, reverse=True):
        ahead[s] = seen
        seen += len(groups[s])
        seen_rel += sum(groups[s])
        rank[s], hits[s] = seen, seen_rel
    relevant = [s for s, is_rel in zip(scores, rel) if is_rel]  # one score per relevant item
    prec = {s: hits[s] / rank[s] for s in relevant}  # P(g)

    def interpolated(s, pool):  # max of P(i) over relevant i in pool with score <= s
        return max(prec[i] for i in pool if i <= s)

    def weight(s, k):  # the chance that an order of the ties puts this item in the first k places
        return min(max((k - ahead[s]) / (rank[s] - ahead[s]), 0.0), 1.0)

    ap = sum(prec[s] for s in relevant) / r
    ap_voc = sum(interpolated(s, relevant) for s in relevant) / r
    out = {"standard": {"ap": ap}, "sem-pcyc": {"ap": ap}, "doodle2search": {"ap": ap},
           "sake": {"ap": ap_voc}, "zse-sbir": {"ap": ap_voc}}
    for k in ks:
        m = min(r, k)
        hits_k = sum(weight(s, k) for s in relevant)  # E[hits@K]
        hits_m = sum(weight(s, m) for s in relevant)  # E[hits@min(R, K)]
        sum_p = sum(weight(s, k) * prec[s] for s in relevant)
        top = [s for s in relevant if rank[s] <= k]  # relevant items in the first K under every order
        cut = [s for s in relevant if ahead[s] < k < rank[s]]  # those of the tie group straddling K
        p_cut, p_none = (prec[cut[0]], 0.0) if cut else (0.0, 1.0)
        if cut:  # no relevant item of the straddling group among the k - ahead places it gets
            size, places = rank[cut[0]] - ahead[cut[0]], k - ahead[cut[0]]
            p_none = math.comb(size - len(cut), places) / math.comb(size, places)
        # Pint@K within the first K: the straddling group's P joins the max when one of its items is there.
        sum_pint = sum((1 - p_none) * max(interpolated(s, top), p_cut) + p_none * interpolated(s, top) for s in top)
        sum_pint += sum(weight(s, k) * p_cut for s in cut)
        out["standard"].update({f"ap@{k}": sum_p / m, f"p@{k}": hits_k / min(k, n)})
        out["sem-pcyc"].update({f"ap@{k}": sum_p / hits_k if hits_k else 0.0, f"p@{k}": hits_k / min(k, n)})
        out["doodle2search"].update({f"p@{k}": hits_k / m})
        out["sake"].update({f"ap@{k}": sum_pint / m, f"p@{k}": hits_k / min(k, n)})
        out["zse-sbir"].update({f"ap@{k}": sum_pint / m, f"p@{k}": hits_m / m})
    if pr_points:
        # Interpolated precision at recall i / (P - 1): max P(g) over relevant g with
        # hits(g) / R >= i / (P - 1), compared exactly in integers.
        out["pr"] = [max(prec[s] for s in relevant if hits[s] * (pr_points - 1) >= i * r)
                     for i in range(pr_points)]
    return out


def reference_metrics(query_emb, query_labels, gallery_emb, gallery_labels, ks, pr_points: int = 0) -> dict:
    """Every protocol for every query; means over queries with R > 0."""
    scores = cosine_scores(query_emb, gallery_emb)
    g_labels = gallery_labels.tolist()
    per_query, skipped, num_relevant = {}, [], []
    for q, label in enumerate(query_labels.tolist()):
        rel = [g == label for g in g_labels]
        num_relevant.append(sum(rel))
        if not any(rel):
            skipped.append(q)
            continue
        per_query[q] = reference_query(scores[q], rel, ks, pr_points)
    out = {"num_queries": len(per_query), "num_queries_without_relevant": len(skipped),
           "num_relevant": num_relevant, "skipped": skipped, "protocols": {}}
    q_labels = query_labels.tolist()
    for name in PROTOCOLS:
        values = {q: res[name] for q, res in per_query.items()}
        keys = next(iter(values.values())).keys()
        means = {key: sum(v[key] for v in values.values()) / len(values) for key in keys}
        per_class = {}
        for q, v in values.items():
            per_class.setdefault(q_labels[q], []).append(v["ap"])
        out["protocols"][name] = {
            "per_query": values,
            "map_all": means["ap"],
            **{f"p@{k}": means[f"p@{k}"] for k in ks},
            **{f"map@{k}": means[f"ap@{k}"] for k in ks if name != "doodle2search"},
            "per_class_ap": {c: sum(v) / len(v) for c, v in per_class.items()},
        }
    if pr_points:
        out["pr_curve"] = [sum(res["pr"][i] for res in per_query.values()) / len(per_query)
                           for i in range(pr_points)]
    return out


def expected_keys(name: str, ks) -> set:
    keys = {"map_all", "ap", "per_class_ap"} | {f"p@{k}" for k in ks} | {f"per_query_p@{k}" for k in ks}
    if name != "doodle2search":
        keys |= {f"map@{k}" for k in ks} | {f"per_query_ap@{k}" for k in ks}
    return keys


def assert_per_query(got: torch.Tensor, expected: dict, num_q: int, what: str, tol: float = 1e-9) -> None:
    """got: (Q,) float64 on the CPU; expected: {q: value} for the queries with R > 0, else 0."""
    assert got.shape == (num_q,) and got.dtype == torch.float64 and got.device.type == "cpu", what
    want = [expected.get(q, 0.0) for q in range(num_q)]
    for q, (a, b) in enumerate(zip(got.tolist(), want)):
        assert a == pytest.approx(b, abs=tol), f"{what}, query {q}: got {a}, expected {b}"


def assert_matches_reference(got: dict, ref: dict, ks, protocols=PROTOCOLS, tol: float = 1e-9) -> None:
    num_q = len(ref["num_relevant"])
    assert got["num_queries"] == ref["num_queries"]
    assert got["num_queries_without_relevant"] == ref["num_queries_without_relevant"]
    assert got["num_relevant"].dtype == torch.int64
    assert got["num_relevant"].tolist() == ref["num_relevant"]
    assert set(got["protocols"]) == set(protocols)
    for name in protocols:
        res, exp = got["protocols"][name], ref["protocols"][name]
        assert set(res) == expected_keys(name, ks), name
        pq = exp["per_query"]
        assert res["map_all"] == pytest.approx(exp["map_all"], abs=tol), name
        assert_per_query(res["ap"], {q: v["ap"] for q, v in pq.items()}, num_q, f"{name} ap", tol)
        for k in ks:
            assert res[f"p@{k}"] == pytest.approx(exp[f"p@{k}"], abs=tol), (name, k)
            assert_per_query(res[f"per_query_p@{k}"], {q: v[f"p@{k}"] for q, v in pq.items()}, num_q,
                             f"{name} p@{k}", tol)
            if name != "doodle2search":
                assert res[f"map@{k}"] == pytest.approx(exp[f"map@{k}"], abs=tol), (name, k)
                assert_per_query(res[f"per_query_ap@{k}"], {q: v[f"ap@{k}"] for q, v in pq.items()}, num_q,
                                 f"{name} ap@{k}", tol)
        assert res["per_class_ap"].keys() == exp["per_class_ap"].keys(), name
        for c, value in exp["per_class_ap"].items():
            assert res["per_class_ap"][c] == pytest.approx(value, abs=tol), (name, c)
    if "pr_curve" in ref:
        p = len(ref["pr_curve"])
        assert torch.equal(got["pr_curve"]["recall"], torch.linspace(0, 1, p, dtype=torch.float64))
        assert got["pr_curve"]["precision"].dtype == torch.float64
        assert got["pr_curve"]["precision"].tolist() == pytest.approx(ref["pr_curve"], abs=tol)
    else:
        assert "pr_curve" not in got


def assert_same_results(a, b, atol: float = 0.0, path: str = "") -> None:
    """Equal nested results; atol > 0 allows float64 rounding from a different summation order."""
    if isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), path
        for key in a:
            assert_same_results(a[key], b[key], atol, f"{path}/{key}")
    elif isinstance(a, torch.Tensor):
        b = b.cpu()
        assert a.dtype == b.dtype and a.shape == b.shape, path
        if a.is_floating_point():
            assert torch.allclose(a.cpu(), b, rtol=0.0, atol=atol), path
        else:
            assert torch.equal(a.cpu(), b), path
    elif isinstance(a, float):
        assert isinstance(b, float) and a == pytest.approx(b, rel=0.0, abs=atol), path
    else:
        assert a == b, path


# ------------------------------------------------------------------ 1, 2: against the reference


@pytest.mark.parametrize("seed", [0, 1])
def test_matches_reference_loop_on_tied_scores(monkeypatch, seed):
    data = make_data(seed)
    scores = torch.tensor(cosine_scores(data[0], data[2]))  # (Q, N)
    assert torch.equal(scores * 16, (scores * 16).round())  # exact multiples of 1/16
    distinct = torch.tensor([len(set(row)) for row in scores.tolist()], dtype=torch.float)
    assert distinct.mean() < scores.shape[1] / 5  # the data really is full of ties
    monkeypatch.setattr(metrics, "CHUNK_SIZE", 5)  # several chunks per class
    got = metrics.retrieval_metrics(*data, ks=KS, protocols=PROTOCOLS, pr_points=PR_POINTS)
    ref = reference_metrics(*data, ks=KS, pr_points=PR_POINTS)
    assert_matches_reference(got, ref, KS)
    # The protocols really differ on this data, so a mix-up of two of them would be caught.
    p = got["protocols"]
    assert not torch.allclose(p["standard"]["ap"], p["sake"]["ap"])
    assert not torch.allclose(p["standard"]["per_query_ap@50"], p["sem-pcyc"]["per_query_ap@50"])
    assert not torch.allclose(p["standard"]["per_query_ap@50"], p["sake"]["per_query_ap@50"])
    assert not torch.allclose(p["standard"]["per_query_p@50"], p["doodle2search"]["per_query_p@50"])
    assert not torch.allclose(p["doodle2search"]["per_query_p@50"], p["zse-sbir"]["per_query_p@50"])


@pytest.mark.parametrize("protocols", [("sake",), ("doodle2search", "standard")])
def test_subset_of_protocols(monkeypatch, protocols):
    data = make_data(9)
    monkeypatch.setattr(metrics, "CHUNK_SIZE", 3)
    got = metrics.retrieval_metrics(*data, ks=(1, 50), protocols=protocols)
    assert_matches_reference(got, reference_metrics(*data, ks=(1, 50)), (1, 50), protocols=protocols)
    default = metrics.retrieval_metrics(*data, ks=(1, 50))
    assert set(default["protocols"]) == {"standard"} and "pr_curve" not in default


@pytest.mark.parametrize("chunk_size", [5, 512])
def test_matches_reference_loop_on_continuous_scores_with_duplicate_rows(monkeypatch, chunk_size):
    monkeypatch.setattr(metrics, "CHUNK_SIZE", chunk_size)
    gen = torch.Generator().manual_seed(2)
    query_labels, gallery_labels = class_labels()
    query_emb = torch.randn(len(query_labels), 8, generator=gen, dtype=torch.float64)
    gallery_emb = torch.randn(len(gallery_labels), 8, generator=gen, dtype=torch.float64)
    gallery_emb[1::3] = gallery_emb[0:-1:3]  # every third row repeats its predecessor: exact ties
    gallery_emb[2] = 4.0 * gallery_emb[0]  # a power-of-2 multiple ties exactly under cosine
    query_emb[1] = query_emb[0]
    scores = cosine_scores(query_emb, gallery_emb)
    assert all(len(set(row)) < len(row) * 3 // 4 for row in scores)  # many exact ties in every row
    got = metrics.retrieval_metrics(query_emb, query_labels, gallery_emb, gallery_labels, ks=KS,
                                    protocols=PROTOCOLS, pr_points=7)
    ref = reference_metrics(query_emb, query_labels, gallery_emb, gallery_labels, ks=KS, pr_points=7)
    assert_matches_reference(got, ref, KS)


# ------------------------------------------------------- 3, 4: the peers' code, scikit-learn


def sorted_relevance(scores: list, rel: list) -> np.ndarray:
    """Relevance flags of the gallery ordered by decreasing score (the data has no ties)."""
    order = np.argsort(-np.asarray(scores), kind="stable")
    return np.asarray(rel, dtype=np.float64)[order]


def voc_ap_peer(rel_sorted: np.ndarray, tot_pos: int) -> float:
    """SAKE / ZSE-SBIR: cumsums over a sorted list, then the VOC rule."""
    tp = np.cumsum(rel_sorted)
    fp = np.cumsum(1.0 - rel_sorted)
    rec = tp / tot_pos
    prec = tp / np.maximum(tp + fp, np.finfo(np.float64).eps)
    mrec = np.concatenate(([0.0], rec, [1.0]))
    mpre = np.concatenate(([0.0], prec, [0.0]))
    for i in range(mpre.size - 1, 0, -1):
        mpre[i - 1] = np.maximum(mpre[i - 1], mpre[i])
    i = np.where(mrec[1:] != mrec[:-1])[0]
    return float(np.sum((mrec[i + 1] - mrec[i]) * mpre[i + 1]))


@pytest.mark.parametrize("seed,dim,spread", [(10, 8, 1.0), (11, 3, 0.5), (12, 16, 3.0)])
def test_matches_peer_code_on_tie_free_data(monkeypatch, seed, dim, spread):
    monkeypatch.setattr(metrics, "CHUNK_SIZE", 4)
    query_emb, query_labels, gallery_emb, gallery_labels = make_continuous_data(seed, dim, spread)
    scores = cosine_scores(query_emb, gallery_emb)
    n = len(gallery_labels)
    assert all(len(set(row)) == n for row in scores)  # no ties
    got = metrics.retrieval_metrics(query_emb, query_labels, gallery_emb, gallery_labels, ks=KS,
                                    protocols=PROTOCOLS)
    p = got["protocols"]
    aps = []
    for q, label in enumerate(query_labels.tolist()):
        rel = (gallery_labels == label).numpy()
        r = int(rel.sum())
        rel_sorted = sorted_relevance(scores[q], rel)
        ap_voc = voc_ap_peer(rel_sorted, r)
        ap_sk = average_precision_score(rel, np.asarray(scores[q]))
        aps.append(ap_sk)
        for name in VOC:
            assert p[name]["ap"][q].item() == pytest.approx(ap_voc, abs=1e-12), (name, q)
        for name in ("standard", "sem-pcyc", "doodle2search"):
            assert p[name]["ap"][q].item() == pytest.approx(ap_sk, abs=1e-12), (name, q)
        for k in KS:
            top_rel = rel_sorted[:k]  # the top L = K items (all N when K > N)
            ap_voc_k = voc_ap_peer(top_rel, min(k, r))
            for name in VOC:
                assert p[name][f"per_query_ap@{k}"][q].item() == pytest.approx(ap_voc_k, abs=1e-12), (name, q, k)
            order = np.argsort(-np.asarray(scores[q]), kind="stable")[:k]
            if rel[order].any():
                sem_k = average_precision_score(rel[order], np.asarray(scores[q])[order])
            else:
                sem_k = 0.0
            assert p["sem-pcyc"][f"per_query_ap@{k}"][q].item() == pytest.approx(sem_k, abs=1e-12), (q, k)
            hits_k = top_rel.sum()
            assert p["standard"][f"per_query_p@{k}"][q].item() == pytest.approx(hits_k / min(k, n), abs=1e-15)
            assert p["sake"][f"per_query_p@{k}"][q].item() == pytest.approx(hits_k / min(k, n), abs=1e-15)
            assert p["doodle2search"][f"per_query_p@{k}"][q].item() == pytest.approx(hits_k / min(r, k), abs=1e-15)
            assert p["zse-sbir"][f"per_query_p@{k}"][q].item() == pytest.approx(
                rel_sorted[:min(k, r)].mean(), abs=1e-15)
    assert 0.2 < np.mean(aps) < 0.95  # the rankings are neither random nor perfect


def test_ap_matches_sklearn_with_ties():
    query_emb, query_labels, gallery_emb, gallery_labels = make_data(3)
    got = metrics.retrieval_metrics(query_emb, query_labels, gallery_emb, gallery_labels,
                                    protocols=("standard", "sem-pcyc", "doodle2search"))
    scores = np.asarray(cosine_scores(query_emb, gallery_emb))  # (Q, N)
    for q in range(len(query_labels)):
        rel = (gallery_labels == query_labels[q]).numpy()
        expected = average_precision_score(rel, scores[q])
        for name in ("standard", "sem-pcyc", "doodle2search"):
            assert got["protocols"][name]["ap"][q].item() == pytest.approx(expected, abs=1e-12), (name, q)


# ------------------------------------------------------------------------- 5: _ranks_of_relevant


def brute_force_ranks(scores: torch.Tensor, start: int, stop: int):
    """rank = #{h : s_h >= s_j}, hits = #{relevant h : s_h >= s_j}, before = #{h : s_h > s_j}, sorted by
    decreasing score."""
    rel = scores[:, start:stop]  # (B, R)
    rank = (scores[:, None, :] >= rel[:, :, None]).sum(2)  # (B, R)
    hits = (rel[:, None, :] >= rel[:, :, None]).sum(2)  # (B, R)
    before = (scores[:, None, :] > rel[:, :, None]).sum(2)  # (B, R)
    order = rel.argsort(dim=1, descending=True, stable=True)
    return rank.gather(1, order), hits.gather(1, order), before.gather(1, order)


def random_scores(kind: str, b: int, n: int, dtype, gen: torch.Generator) -> torch.Tensor:
    if kind == "randn":
        return torch.randn(b, n, generator=gen, dtype=dtype)
    if kind == "integers":  # heavily tied
        hi = int(torch.randint(1, 6, (1,), generator=gen))
        return torch.randint(-hi, hi + 1, (b, n), generator=gen).to(dtype)
    if kind == "equal":  # every row one value
        return torch.randn(b, 1, generator=gen, dtype=dtype).expand(b, n).clone()
    if kind == "signed_zeros":  # -0.0 and 0.0 both present, and other values
        values = torch.tensor([-0.0, 0.0, 0.0, -0.0, 1.0, -1.0, 0.5], dtype=dtype)
        return values[torch.randint(len(values), (b, n), generator=gen)]
    if kind == "ulps":  # scores a few ulps apart: the counting grid cannot separate them
        ulp = 2.0 ** (-24 if dtype == torch.float32 else -53)
        return (0.75 + torch.randint(0, 5, (b, n), generator=gen).double() * ulp).to(dtype)
    if kind == "mixed":  # a row of each kind, and relevant block tied while the rest varies
        rows = [random_scores(k, 1, n, dtype, gen) for k in ("randn", "integers", "equal", "signed_zeros", "ulps")]
        return torch.cat(rows * (b // 5 + 1))[:b]
    raise ValueError(kind)


KINDS = ("randn", "integers", "equal", "signed_zeros", "ulps", "mixed")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("kind", KINDS)
def test_ranks_of_relevant_matches_brute_force(kind, dtype):
    gen = torch.Generator().manual_seed(KINDS.index(kind) + 100 * (dtype == torch.float64))
    shapes = [(1, 1, 0, 1), (3, 1, 0, 1), (2, 7, 0, 7), (2, 7, 6, 7), (5, 300, 0, 300), (70, 200, 150, 151)]
    for _ in range(20):  # (B, N, start, stop): N in [1, 300], R in [1, N], the block anywhere
        n = int(torch.randint(1, 301, (1,), generator=gen))
        r = int(torch.randint(1, n + 1, (1,), generator=gen))
        start = int(torch.randint(0, n - r + 1, (1,), generator=gen))
        b = int(torch.randint(1, 9, (1,), generator=gen))
        shapes.append((b, n, start, start + r))
    for b, n, start, stop in shapes:
        scores = random_scores(kind, b, n, dtype, gen)
        if kind == "mixed" and stop - start > 1:  # the relevant block of the first row ties
            scores[0, start:stop] = scores[0, start]
        want = brute_force_ranks(scores, start, stop)
        grids = [float(3.0 * (1.0 - torch.rand(1, generator=gen))), 3.0, 1e-3]  # in (0, 3]
        for grid in grids:
            got = metrics._ranks_of_relevant(scores, start, stop, grid=grid)
            case = f"kind={kind} dtype={dtype} B={b} N={n} start={start} stop={stop} grid={grid}"
            for what, a, b_ in zip(("rank", "hits", "before"), got, want):
                assert a.dtype == torch.int64 and a.shape == (b, stop - start), (what, case)
                assert torch.equal(a, b_), (what, case)
        default = metrics._ranks_of_relevant(scores, start, stop)
        assert all(torch.equal(a, b_) for a, b_ in zip(default, want))


def test_ranks_of_relevant_small_example():
    scores = torch.tensor([[0.9, 0.5, 0.5, 0.2, 0.5, 0.9, -0.0, 0.0]])
    rank, hits, before = metrics._ranks_of_relevant(scores, 1, 4)  # relevant: 0.5, 0.5, 0.2
    assert rank.tolist() == [[5, 5, 6]]  # 0.9, 0.9, then the group 0.5 x 3; then 0.2
    assert hits.tolist() == [[2, 2, 3]]
    assert before.tolist() == [[2, 2, 5]]  # ahead of the 0.5 group: 0.9 x 2; of 0.2: five items
    rank, hits, before = metrics._ranks_of_relevant(scores, 6, 8)  # relevant: -0.0 and 0.0 tie
    assert rank.tolist() == [[8, 8]] and hits.tolist() == [[2, 2]] and before.tolist() == [[6, 6]]


# ------------------------------------------------------------------------------- 6: PR curve


def test_pr_curve_shape_and_limits():
    data = make_data(13)
    for points in (2, 3, 11, 101):
        got = metrics.retrieval_metrics(*data, ks=(10,), pr_points=points)
        curve = got["pr_curve"]
        assert torch.equal(curve["recall"], torch.linspace(0, 1, points, dtype=torch.float64))
        prec = curve["precision"]
        assert prec.shape == (points,) and prec.dtype == torch.float64
        assert prec[0] >= prec[-1]
        assert (prec[:-1] >= prec[1:]).all()  # interpolated precision never rises with recall
        assert ((prec > 0) & (prec <= 1)).all()
        assert got["pr_curve"]["precision"].tolist() == pytest.approx(
            reference_metrics(*data, ks=(10,), pr_points=points)["pr_curve"], abs=1e-12)


def perfect_ranking_data(tilt: bool = True):
    """Query c is the one-hot of class c; gallery items are their class's one-hot (times 2), plus a
    tiny distinct tilt per item (tilt=True) or nothing (the relevant items then form one tie group)."""
    num_classes = len(GALLERY_CLASS_SIZES)
    query_labels, gallery_labels = class_labels(1)
    n = len(gallery_labels)
    one_hot = torch.eye(num_classes)[gallery_labels] * 2.0  # (N, C)
    extra = torch.arange(n, dtype=torch.float)[:, None] / n if tilt else torch.zeros(n, 1)
    gallery_emb = torch.cat([one_hot, extra], dim=1)
    queries = torch.cat([torch.eye(num_classes), torch.zeros(num_classes, 1)], dim=1)  # (C, C + 1)
    return queries, query_labels, gallery_emb, gallery_labels


@pytest.mark.parametrize("tilt", [True, False])
def test_pr_curve_of_perfect_ranking_is_one(tilt):
    got = metrics.retrieval_metrics(*perfect_ranking_data(tilt), ks=(10,), pr_points=21)
    assert got["pr_curve"]["precision"].tolist() == [1.0] * 21


# ---------------------------------------------------------------- 7: chunk size, gallery order


@pytest.mark.parametrize("queries_per_class,chunk_sizes", [(8, (1, 7, 10000)), (70, (64, 65, 10000))])
def test_chunk_size_does_not_change_results(monkeypatch, queries_per_class, chunk_sizes):
    data = make_data(4, num_queries_per_class=queries_per_class)  # 70: more than one rank block (64)
    results = []
    for c in chunk_sizes:
        monkeypatch.setattr(metrics, "CHUNK_SIZE", c)
        results.append(metrics.retrieval_metrics(*data, ks=KS, protocols=PROTOCOLS, pr_points=PR_POINTS))
    for other in results[1:]:
        assert_same_results(results[0], other, atol=1e-12)  # pr sums are added in chunk order
        for name in PROTOCOLS:  # per-query values are exact
            for key, value in results[0]["protocols"][name].items():
                if isinstance(value, torch.Tensor):
                    assert torch.equal(value, other["protocols"][name][key]), (name, key)


def test_gallery_order_does_not_change_results():
    query_emb, query_labels, gallery_emb, gallery_labels = make_data(5)
    perm = torch.randperm(len(gallery_labels), generator=torch.Generator().manual_seed(0))
    kw = dict(ks=KS, protocols=PROTOCOLS, pr_points=PR_POINTS)
    a = metrics.retrieval_metrics(query_emb, query_labels, gallery_emb, gallery_labels, **kw)
    b = metrics.retrieval_metrics(query_emb, query_labels, gallery_emb[perm], gallery_labels[perm], **kw)
    assert_same_results(a, b, atol=1e-12)  # ranks and hits are exact; only float64 sums may reorder


def test_query_order_permutes_per_query_results():
    query_emb, query_labels, gallery_emb, gallery_labels = make_data(14)
    perm = torch.randperm(len(query_labels), generator=torch.Generator().manual_seed(1))
    a = metrics.retrieval_metrics(query_emb, query_labels, gallery_emb, gallery_labels, ks=KS, protocols=PROTOCOLS)
    b = metrics.retrieval_metrics(query_emb[perm], query_labels[perm], gallery_emb, gallery_labels, ks=KS,
                                  protocols=PROTOCOLS)
    assert torch.equal(a["num_relevant"][perm], b["num_relevant"])
    for name in PROTOCOLS:
        for key, value in a["protocols"][name].items():
            if isinstance(value, torch.Tensor):
                assert torch.equal(value[perm], b["protocols"][name][key]), (name, key)
            else:
                assert_same_results(value, b["protocols"][name][key], atol=1e-12)


# ------------------------------------------------------------- 8: class missing from the gallery


def test_query_class_missing_from_gallery_is_excluded_and_counted():
    query_emb, query_labels, gallery_emb, gallery_labels = make_data(6)
    extra = dyadic_embeddings(3, torch.Generator().manual_seed(1))
    all_emb = torch.cat([query_emb, extra])
    all_labels = torch.cat([query_labels, torch.full((3,), 99)])
    kw = dict(ks=KS, protocols=PROTOCOLS, pr_points=PR_POINTS)
    got = metrics.retrieval_metrics(all_emb, all_labels, gallery_emb, gallery_labels, **kw)
    kept = metrics.retrieval_metrics(query_emb, query_labels, gallery_emb, gallery_labels, **kw)
    assert got["num_queries_without_relevant"] == 3 and kept["num_queries_without_relevant"] == 0
    assert got["num_queries"] == len(query_labels)
    assert got["num_relevant"][-3:].tolist() == [0, 0, 0]
    assert torch.equal(got["num_relevant"][:-3], kept["num_relevant"])
    for name in PROTOCOLS:
        res = got["protocols"][name]
        assert 99 not in res["per_class_ap"], name
        assert res["per_class_ap"] == kept["protocols"][name]["per_class_ap"], name
        for key, value in res.items():
            if isinstance(value, torch.Tensor):
                assert not value.isnan().any(), (name, key)
                assert value[-3:].tolist() == [0.0, 0.0, 0.0], (name, key)
                assert torch.equal(value[:-3], kept["protocols"][name][key]), (name, key)
            elif isinstance(value, float):
                assert not math.isnan(value), (name, key)
                assert value == kept["protocols"][name][key], (name, key)
            else:
                assert not any(math.isnan(v) for v in value.values()), (name, key)
    assert not got["pr_curve"]["precision"].isnan().any()
    assert torch.equal(got["pr_curve"]["precision"], kept["pr_curve"]["precision"])
    ref = reference_metrics(all_emb, all_labels, gallery_emb, gallery_labels, KS, pr_points=PR_POINTS)
    assert ref["skipped"] == [len(query_labels), len(query_labels) + 1, len(query_labels) + 2]
    assert_matches_reference(got, ref, KS)


# ----------------------------------------------------------------- perfect and reversed rankings


def test_perfect_and_reversed_rankings():
    queries, query_labels, gallery_emb, gallery_labels = perfect_ranking_data(tilt=True)
    _, _, tied_gallery, _ = perfect_ranking_data(tilt=False)
    num_classes = len(GALLERY_CLASS_SIZES)
    n, ks = len(gallery_labels), (10, 50, 1000)
    kw = dict(ks=ks, protocols=PROTOCOLS)
    perfect = metrics.retrieval_metrics(queries, query_labels, gallery_emb, gallery_labels, **kw)["protocols"]
    for name in PROTOCOLS:
        assert perfect[name]["map_all"] == pytest.approx(1.0, abs=1e-15), name
        for k in ks:
            if name in ("doodle2search", "zse-sbir"):
                expected = [1.0] * num_classes
            else:
                expected = [min(r, k) / min(k, n) for r in GALLERY_CLASS_SIZES]
            assert perfect[name][f"per_query_p@{k}"].tolist() == pytest.approx(expected, abs=1e-12), (name, k)
            if name != "doodle2search":
                assert perfect[name][f"map@{k}"] == pytest.approx(1.0, abs=1e-15), (name, k)
    assert perfect["standard"]["p@1000"] == pytest.approx(1 / num_classes)  # K > N: R / N, averaged

    tied = metrics.retrieval_metrics(queries, query_labels, tied_gallery, gallery_labels, **kw)["protocols"]
    # The R relevant items form the first tie group: every order of it fills the first 10 places with
    # relevant items when R > 10, so the expectation over the orders is a perfect score too.
    for name in PROTOCOLS:
        assert tied[name]["map_all"] == 1.0, name
        if name in ("doodle2search", "zse-sbir"):
            expected = [1.0] * num_classes
        else:
            expected = [min(r, 10) / 10 for r in GALLERY_CLASS_SIZES]
        assert tied[name]["per_query_p@10"].tolist() == expected, name
        if name != "doodle2search":
            assert tied[name]["per_query_ap@10"].tolist() == [1.0] * num_classes, name

    reversed_ = metrics.retrieval_metrics(-queries, query_labels, gallery_emb, gallery_labels, **kw)["protocols"]
    reversed_tied = metrics.retrieval_metrics(-queries, query_labels, tied_gallery, gallery_labels, **kw)["protocols"]
    for q, r in enumerate(GALLERY_CLASS_SIZES):  # the R relevant items come last, after one tie group
        expected = sum(i / (n - r + i) for i in range(1, r + 1)) / r
        for name in ("standard", "sem-pcyc", "doodle2search"):
            assert reversed_[name]["ap"][q].item() == pytest.approx(expected, abs=1e-12), (name, q)
        for name in VOC:  # P(g) rises towards the end, so every Pint(g) = P(last) = R / N
            assert reversed_[name]["ap"][q].item() == pytest.approx(r / n, abs=1e-12), (name, q)
        for name in PROTOCOLS:
            assert reversed_tied[name]["ap"][q].item() == pytest.approx(r / n, abs=1e-15), (name, q)
    chance = metrics.chance_map(query_labels, gallery_labels)
    for name in PROTOCOLS:
        assert reversed_[name]["map_all"] < chance, name
        assert reversed_[name]["p@10"] == 0.0, name
        if name != "doodle2search":
            assert reversed_[name]["map@10"] == 0.0, name


# ------------------------------------------------------- tie orders: every order of the tied items


def tie_orders(scores: list):
    """Every order of the gallery by decreasing score: the tie groups in turn, each in every order of its items."""
    levels = sorted(set(scores), reverse=True)
    groups = [[i for i, s in enumerate(scores) if s == v] for v in levels]
    for perms in itertools.product(*(itertools.permutations(g) for g in groups)):
        yield [i for p in perms for i in p]


def values_of_order(order: list, scores: list, rel: list, ks) -> dict:
    """Every protocol's values at each K under one order of the gallery, as exact fractions, by an explicit loop
    over the order's first K places. A relevant item there counts with its tie-group precision P(g) =
    hits(g) / rank(g), which no order changes (the AP convention stays); Pint@K is the largest P(i) over the
    relevant items i there that score at most as high."""
    n, r = len(scores), sum(rel)
    prec = {g: Fraction(sum(1 for h in range(n) if rel[h] and scores[h] >= scores[g]),
                        sum(1 for h in range(n) if scores[h] >= scores[g])) for g in range(n) if rel[g]}
    out = {name: {} for name in PROTOCOLS}
    for k in ks:
        m = min(r, k)
        first = [g for g in order[:k] if rel[g]]  # the relevant items in the first K places
        hits_k, hits_m = len(first), sum(1 for g in order[:m] if rel[g])
        sum_p = sum((prec[g] for g in first), Fraction(0))
        sum_pint = sum((max(prec[i] for i in first if scores[i] <= scores[g]) for g in first), Fraction(0))
        p_k = Fraction(hits_k, min(k, n))
        out["standard"].update({f"ap@{k}": sum_p / m, f"p@{k}": p_k})
        out["sem-pcyc"].update({f"ap@{k}": sum_p / hits_k if hits_k else Fraction(0), f"p@{k}": p_k})
        out["doodle2search"].update({f"p@{k}": Fraction(hits_k, m)})
        out["sake"].update({f"ap@{k}": sum_pint / m, f"p@{k}": p_k})
        out["zse-sbir"].update({f"ap@{k}": sum_pint / m, f"p@{k}": Fraction(hits_m, m)})
    return out


def assert_expected_over_tie_orders(got: dict, scores: list, query_labels: list, gallery_labels: list, ks) -> int:
    """retrieval_metrics' per-query values at each K against every order of the tied items: each is the mean
    over the orders, and lies within [min, max] over them; sem-pcyc's AP@K is the ratio of the means of its
    numerator and denominator. Returns the number of (query, K) whose K cuts a tie group holding relevant items.

    Tolerance: a value is (1/c) sum_j t_j over at most R relevant items, each t_j a product of at most R + 6
    correctly rounded operations on exact integers (the chance that no relevant item of the straddling group
    comes before K has one factor per such item; w, P, their product and the interpolation mix add a few),
    the sum adds R - 1 roundings and the division (for sem-pcyc, by a sum: R more) the rest, and
    sum_j |t_j| / c <= 1: |error| <= (3 R + 8) u, u = 2^-53 (first order; Higham 2002, sections 3.1 and 4.2).
    """
    n, straddling = len(gallery_labels), 0
    for q, label in enumerate(query_labels):
        rel = [int(c == label) for c in gallery_labels]
        r = sum(rel)
        if r == 0:
            continue
        tol = Fraction(3 * r + 8, 2 ** 53)
        per_order = [values_of_order(order, scores[q], rel, ks) for order in tie_orders(scores[q])]
        mean = {name: {key: sum((v[name][key] for v in per_order), Fraction(0)) / len(per_order)
                       for key in per_order[0][name]} for name in PROTOCOLS}
        for name in PROTOCOLS:
            for key, want in mean[name].items():
                ours = Fraction(got["protocols"][name][f"per_query_{key}"][q].item())
                values = [v[name][key] for v in per_order]
                assert min(values) - tol <= ours <= max(values) + tol, (name, key, q)
                if name == "sem-pcyc" and key.startswith("ap@"):  # E[sum of P] / E[hits@K]
                    k = int(key[3:])
                    expected_hits = mean["standard"][f"p@{k}"] * min(k, n)
                    want = mean["standard"][key] * min(r, k) / expected_hits if expected_hits else Fraction(0)
                assert abs(ours - want) <= tol, (name, key, q, float(ours), float(want))
        for k in ks:
            cut = [g for g in range(n) if rel[g] and sum(s > scores[q][g] for s in scores[q]) < k
                   < sum(s >= scores[q][g] for s in scores[q])]
            straddling += bool(cut)
    return straddling


def test_tie_orders_cosine_mean_over_every_order():
    """Dyadic embeddings (exact cosines, many ties) on galleries of 6 and 7: every protocol's P@K and AP@K
    against the mean over all orders of the tied items, at every K from 1 to N + 1; and a gallery that is
    one tie group (720 orders)."""
    cases, straddling = [], 0
    for seed in range(3):
        gen = torch.Generator().manual_seed(seed)
        gallery_labels = torch.tensor([0, 1, 0, 1, 1, 0, 2][:6 + seed % 2])
        query_labels = torch.tensor([0, 1, 2, 3])  # 3 (and 2 with 6 photos) has no photo: excluded
        query_emb, gallery_emb = dyadic_embeddings(4, gen), dyadic_embeddings(len(gallery_labels), gen)
        cases.append((query_emb, query_labels, gallery_emb, gallery_labels))
    flat = torch.tensor([[1.0, 0.0, 0.0, 0.0]])
    cases.append((flat, torch.tensor([1]), torch.tensor([[0.0, 1.0, 0.0, 0.0]]).repeat(6, 1),
                  torch.tensor([1, 0, 1, 0, 0, 1])))  # every score 0: one group of 6
    for query_emb, query_labels, gallery_emb, gallery_labels in cases:
        ks = tuple(range(1, len(gallery_labels) + 2))
        scores = cosine_scores(query_emb, gallery_emb)
        assert all(math.prod(math.factorial(row.count(s)) for s in set(row)) <= 720 for row in scores)
        got = metrics.retrieval_metrics(query_emb, query_labels, gallery_emb, gallery_labels, ks=ks,
                                        protocols=PROTOCOLS)
        straddling += assert_expected_over_tie_orders(got, scores, query_labels.tolist(), gallery_labels.tolist(),
                                                      ks)
    assert straddling >= 10  # the cases really cut tie groups that hold relevant items


# ----------------------------------------------------------------------------- chance level


def random_permutation_ap(rel: list) -> float:
    hits, total = 0, 0.0
    for k, is_rel in enumerate(rel, start=1):
        if is_rel:
            hits += 1
            total += hits / k
    return total / hits


def test_expected_random_ap_by_enumeration():
    values = [random_permutation_ap(p) for p in itertools.permutations([1, 1, 0, 0, 0])]
    expected = metrics.expected_random_ap(torch.tensor([2]), 5)
    assert expected.dtype == torch.float64
    assert expected.item() == pytest.approx(sum(values) / len(values), abs=1e-12)
    for n in range(1, 8):  # every placement of the R relevant items is equally likely
        for r in range(1, n + 1):
            aps = [random_permutation_ap([int(i in pos) for i in range(n)])
                   for pos in itertools.combinations(range(n), r)]
            got = metrics.expected_random_ap(torch.tensor([r]), n).item()
            assert got == pytest.approx(sum(aps) / len(aps), abs=1e-12), (n, r)


def test_expected_random_ap_by_monte_carlo():
    n, r, trials = 20, 5, 20000
    gen = torch.Generator().manual_seed(0)
    order = torch.rand(trials, n, generator=gen).argsort(dim=1)  # (T, N) random permutations
    rel = (order < r).double()  # (T, N): the first R items are the relevant ones
    ap = (rel * rel.cumsum(1) / torch.arange(1, n + 1)).sum(1) / r  # (T,)
    stderr = ap.std().item() / math.sqrt(trials)
    expected = metrics.expected_random_ap(torch.tensor([r]), n).item()
    assert abs(ap.mean().item() - expected) < 3 * stderr


def test_expected_random_ap_limits_and_errors():
    assert metrics.expected_random_ap(torch.tensor([1]), 1).item() == 1.0
    assert metrics.expected_random_ap(torch.tensor([7]), 7).item() == pytest.approx(1.0, abs=1e-12)
    with pytest.raises(ValueError):
        metrics.expected_random_ap(torch.tensor([0]), 5)
    with pytest.raises(ValueError):
        metrics.expected_random_ap(torch.tensor([6]), 5)


def test_chance_map_averages_over_queries_with_relevant_items():
    gallery_labels = torch.tensor([0, 0, 0, 1, 2, 2, 2, 2, 2, 2])
    query_labels = torch.tensor([2, 0, 0, 7, 1])
    expected = metrics.expected_random_ap(torch.tensor([6, 3, 3, 1]), 10).mean().item()
    assert metrics.chance_map(query_labels, gallery_labels) == pytest.approx(expected, abs=1e-15)
    with pytest.raises(ValueError):
        metrics.chance_map(torch.tensor([5]), gallery_labels)


# ------------------------------------------------------------------------------ 9: bad inputs


def test_bad_inputs_raise():
    query_emb, query_labels, gallery_emb, gallery_labels = make_data(7)
    data = (query_emb, query_labels, gallery_emb, gallery_labels)
    with pytest.raises(ValueError, match="'voc'") as err:
        metrics.retrieval_metrics(*data, protocols=("standard", "voc"))
    assert all(name in str(err.value) for name in PROTOCOLS)  # the message lists the valid names
    with pytest.raises(ValueError, match="empty"):
        metrics.retrieval_metrics(query_emb, query_labels, gallery_emb[:0], gallery_labels[:0])
    with pytest.raises(ValueError, match="no query"):
        metrics.retrieval_metrics(query_emb, query_labels + 100, gallery_emb, gallery_labels)
    with pytest.raises(ValueError):  # mismatched embedding dimensions
        metrics.retrieval_metrics(query_emb, query_labels, gallery_emb[:, :8], gallery_labels)
    with pytest.raises(ValueError):  # one label per embedding
        metrics.retrieval_metrics(query_emb, query_labels[:-1], gallery_emb, gallery_labels)
    for bad in (dict(ks=(0,)), dict(pr_points=1), dict(pr_points=-2)):
        with pytest.raises(ValueError):
            metrics.retrieval_metrics(*data, **bad)
    for which in (0, 2):
        broken = [t.clone() for t in data]
        broken[which][1, 3] = float("nan")
        with pytest.raises(ValueError, match="NaN"):
            metrics.retrieval_metrics(*broken)


def test_similarity_is_cosine():
    query_emb, gallery_emb = torch.tensor([[3.0, 4.0]]), torch.tensor([[1.0, 0.0], [0.0, -2.0], [6.0, 8.0]])
    assert metrics.similarity(query_emb, gallery_emb)[0].tolist() == pytest.approx([0.6, -0.8, 1.0])
    assert metrics.similarity(query_emb.half(), gallery_emb.half()).dtype == torch.float32
    data = make_data(15)
    assert metrics.similarity(data[0], data[2]).tolist() == cosine_scores(data[0], data[2])  # exact: dyadic


# ------------------------------------------------------------------------------------- 10: CUDA


@pytest.mark.gpu
def test_cuda_matches_cpu(monkeypatch):
    data = make_data(8, num_queries_per_class=70)
    monkeypatch.setattr(metrics, "CHUNK_SIZE", 100)
    kw = dict(ks=KS, protocols=PROTOCOLS, pr_points=PR_POINTS)
    cpu = metrics.retrieval_metrics(*data, **kw)
    cuda = metrics.retrieval_metrics(*(t.cuda() for t in data), **kw)
    # The dyadic scores and so the ranks are exact on either device; what may differ is the order in
    # which a float64 value sums its terms, each in [0, 1]: at most the N gallery items of one query,
    # then the Q queries of a mean. Two orders of a sum of n such terms differ by at most 2 n u
    # (u = 2^-53, Higham 2002, section 4.2).
    n_queries, n_gallery = len(data[1]), len(data[3])
    assert_same_results(cpu, cuda, atol=2 * (n_gallery + n_queries) * 2.0 ** -53)


def test_given_scores_rank_as_the_scores_they_are():
    """score_matrix_metrics (a relation network's scores, say) gives what retrieval_metrics gives for the same
    scores: -Hamming distances of packed codes, full of ties, given as a float matrix, under every protocol and
    cut-off, bit for bit; columns in any order; and a NaN, a wrong shape or integer scores are refused."""
    g = torch.Generator().manual_seed(0)
    q_codes = torch.randint(0, 256, (40, 2), generator=g, dtype=torch.uint8)
    g_codes = torch.randint(0, 256, (90, 2), generator=g, dtype=torch.uint8)
    q_labels, g_labels = torch.randint(0, 4, (40,), generator=g), torch.randint(0, 4, (90,), generator=g)
    kw = dict(ks=(5, 20), protocols=metrics.PROTOCOLS, pr_points=11)
    want = metrics.retrieval_metrics(q_codes, q_labels, g_codes, g_labels, score="hamming", **kw)
    scores = -metrics.hamming_distance(q_codes, g_codes).float()  # (40, 90)
    got = metrics.score_matrix_metrics(scores, q_labels, g_labels, **kw)
    perm = torch.randperm(90, generator=g)
    shuffled = metrics.score_matrix_metrics(scores[:, perm], q_labels, g_labels[perm], **kw)
    for out in (got, shuffled):
        for name in metrics.PROTOCOLS:
            for key, value in want["protocols"][name].items():
                if isinstance(value, torch.Tensor):
                    assert torch.equal(out["protocols"][name][key], value), (name, key)
                elif not isinstance(value, dict):
                    assert out["protocols"][name][key] == value, (name, key)
        assert torch.equal(out["pr_curve"]["precision"], want["pr_curve"]["precision"])
    with pytest.raises(ValueError, match="NaN or inf"):
        metrics.score_matrix_metrics(scores.masked_fill(scores == scores.min(), float("nan")), q_labels, g_labels)
    with pytest.raises(ValueError, match=r"expected \(Q, N\) scores for 90 gallery items"):
        metrics.score_matrix_metrics(scores[:, :80], q_labels, g_labels)
    with pytest.raises(ValueError, match="scores must be floating point"):
        metrics.score_matrix_metrics(scores.long(), q_labels, g_labels)
    with pytest.raises(ValueError, match="score_matrix_metrics"):
        metrics.retrieval_metrics(scores, q_labels, scores.T, g_labels, score="given")
