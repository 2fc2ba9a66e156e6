"""Tests of metrics.py against plain per-query loops that follow docs/metrics.md word for word."""
import itertools
import math

import pytest
import torch
from sklearn.metrics import average_precision_score

import metrics

GALLERY_CLASS_SIZES = (1, 2, 5, 20, 60, 100)  # R from 1 to 100, N = 188
KS = (1, 3, 10, 50, 150, 1000)  # K above some R, and K = 1000 above N


def dyadic_embeddings(n: int, gen: torch.Generator, dim: int = 16) -> torch.Tensor:
    """Rows with 1, 4 or 16 non-zeros of magnitude 1, 1/2 or 1/4 (unit norm), scaled by 2^{-1..2}.

    Every cosine score is then a multiple of 1/16, computed exactly in float32 whatever the
    summation order, so many scores tie and the ties are identical on any device or chunking.
    """
    emb = torch.zeros(n, dim)
    for i in range(n):
        nnz = (1, 4, 16)[int(torch.randint(3, (1,), generator=gen))]
        cols = torch.randperm(dim, generator=gen)[:nnz]
        signs = torch.randint(2, (nnz,), generator=gen).float() * 2 - 1
        emb[i, cols] = signs / math.sqrt(nnz)
    scale = 2.0 ** torch.randint(-1, 3, (n, 1), generator=gen).float()
    return emb * scale  # (n, dim)


def make_data(seed: int, num_queries_per_class: int = 8):
    gen = torch.Generator().manual_seed(seed)
    gallery_labels = torch.cat([torch.full((size,), c) for c, size in enumerate(GALLERY_CLASS_SIZES)])
    query_labels = torch.arange(len(GALLERY_CLASS_SIZES)).repeat_interleave(num_queries_per_class)
    query_emb = dyadic_embeddings(len(query_labels), gen)
    gallery_emb = dyadic_embeddings(len(gallery_labels), gen)
    return query_emb, query_labels, gallery_emb, gallery_labels


def reference_query(scores: list, rel: list, ks) -> dict:
    """One query, by the written definitions: tie groups in decreasing score, each group ranked at
    its last position."""
    n, r = len(scores), sum(rel)
    groups = {}
    for s, is_rel in zip(scores, rel):
        groups.setdefault(s, []).append(is_rel)
    rank, hits = {}, {}
    seen = seen_rel = 0
    for s in sorted(groups, reverse=True):
        seen += len(groups[s])
        seen_rel += sum(groups[s])
        rank[s], hits[s] = seen, seen_rel
    out = {"ap": sum(hits[s] / rank[s] for s, is_rel in zip(scores, rel) if is_rel) / r}
    for k in ks:
        top = [s for s, is_rel in zip(scores, rel) if is_rel and rank[s] <= k]
        out[f"p@{k}"] = len(top) / min(k, n)
        out[f"ap@{k}"] = sum(hits[s] / rank[s] for s in top) / min(r, k)
    return out


def reference_metrics(query_emb, query_labels, gallery_emb, gallery_labels, ks) -> dict:
    scores = metrics.similarity(query_emb, gallery_emb).tolist()
    per_query, per_class, skipped = [], {}, 0
    for q, label in enumerate(query_labels.tolist()):
        rel = [g == label for g in gallery_labels.tolist()]
        if not any(rel):
            skipped += 1
            continue
        result = reference_query(scores[q], rel, ks)
        per_query.append((q, result))
        per_class.setdefault(label, []).append(result["ap"])
    mean = lambda key: sum(res[key] for _, res in per_query) / len(per_query)
    out = {"map_all": mean("ap"), "num_queries": len(per_query), "num_queries_without_relevant": skipped,
           "per_class_ap": {c: sum(v) / len(v) for c, v in per_class.items()}, "per_query": per_query}
    for k in ks:
        out[f"p@{k}"], out[f"map@{k}"] = mean(f"p@{k}"), mean(f"ap@{k}")
    return out


def assert_matches_reference(got: dict, ref: dict, ks) -> None:
    assert got["num_queries"] == ref["num_queries"]
    assert got["num_queries_without_relevant"] == ref["num_queries_without_relevant"]
    assert got["map_all"] == pytest.approx(ref["map_all"], abs=1e-9)
    for k in ks:
        assert got[f"p@{k}"] == pytest.approx(ref[f"p@{k}"], abs=1e-9)
        assert got[f"map@{k}"] == pytest.approx(ref[f"map@{k}"], abs=1e-9)
    for q, res in ref["per_query"]:
        assert got["ap"][q].item() == pytest.approx(res["ap"], abs=1e-9)
        for k in ks:
            assert got[f"per_query_p@{k}"][q].item() == pytest.approx(res[f"p@{k}"], abs=1e-9)
            assert got[f"per_query_ap@{k}"][q].item() == pytest.approx(res[f"ap@{k}"], abs=1e-9)
    assert got["per_class_ap"].keys() == ref["per_class_ap"].keys()
    for c, value in ref["per_class_ap"].items():
        assert got["per_class_ap"][c] == pytest.approx(value, abs=1e-9)


def assert_same_results(a: dict, b: dict, atol: float = 0.0) -> None:
    """Equal keys and values; atol > 0 allows float64 rounding from a different summation order."""
    assert a.keys() == b.keys()
    for key, value in a.items():
        if isinstance(value, torch.Tensor):
            assert value.dtype == b[key].dtype and torch.allclose(value, b[key], rtol=0.0, atol=atol), key
        elif isinstance(value, float):
            assert value == pytest.approx(b[key], rel=0.0, abs=atol), key
        elif isinstance(value, dict):
            assert value.keys() == b[key].keys(), key
            assert list(value.values()) == pytest.approx(list(b[key].values()), rel=0.0, abs=atol), key
        else:
            assert value == b[key], key


@pytest.mark.parametrize("seed", [0, 1])
def test_matches_reference_loop_on_tied_scores(seed):
    data = make_data(seed)
    scores = metrics.similarity(data[0], data[2])  # (Q, N)
    distinct = torch.tensor([len(set(row)) for row in scores.tolist()], dtype=torch.float)
    assert distinct.mean() < scores.shape[1] / 5  # the data really is full of ties
    got = metrics.retrieval_metrics(*data, ks=KS, chunk_size=5)
    assert_matches_reference(got, reference_metrics(*data, ks=KS), KS)


def test_matches_reference_loop_on_continuous_scores_with_duplicate_rows():
    gen = torch.Generator().manual_seed(2)
    _, query_labels, _, gallery_labels = make_data(2)
    query_emb = torch.randn(len(query_labels), 8, generator=gen, dtype=torch.float64)
    gallery_emb = torch.randn(len(gallery_labels), 8, generator=gen, dtype=torch.float64)
    gallery_emb[1::3] = gallery_emb[0:-1:3]  # every third row repeats its predecessor: exact ties
    gallery_emb[5] *= 3.0  # a multiple of a row ties with it under cosine
    query_emb[1] = query_emb[0]
    got = metrics.retrieval_metrics(query_emb, query_labels, gallery_emb, gallery_labels, ks=KS)
    ref = reference_metrics(query_emb, query_labels, gallery_emb, gallery_labels, ks=KS)
    assert_matches_reference(got, ref, KS)


def test_ap_matches_sklearn_with_ties():
    query_emb, query_labels, gallery_emb, gallery_labels = make_data(3)
    got = metrics.retrieval_metrics(query_emb, query_labels, gallery_emb, gallery_labels)
    scores = metrics.similarity(query_emb, gallery_emb)  # (Q, N)
    for q in range(len(query_labels)):
        rel = (gallery_labels == query_labels[q]).numpy()
        expected = average_precision_score(rel, scores[q].numpy())
        assert got["ap"][q].item() == pytest.approx(expected, abs=1e-9)


def test_chunk_size_does_not_change_results():
    data = make_data(4)
    results = [metrics.retrieval_metrics(*data, ks=KS, chunk_size=c) for c in (1, 7, 10000)]
    assert_same_results(results[0], results[1])
    assert_same_results(results[0], results[2])


def test_gallery_order_does_not_change_results():
    query_emb, query_labels, gallery_emb, gallery_labels = make_data(5)
    perm = torch.randperm(len(gallery_labels), generator=torch.Generator().manual_seed(0))
    a = metrics.retrieval_metrics(query_emb, query_labels, gallery_emb, gallery_labels, ks=KS)
    b = metrics.retrieval_metrics(query_emb, query_labels, gallery_emb[perm], gallery_labels[perm], ks=KS)
    assert_same_results(a, b, atol=1e-12)  # ranks and hits are exact; only float64 sums may reorder


def test_query_class_missing_from_gallery_is_excluded_and_counted():
    query_emb, query_labels, gallery_emb, gallery_labels = make_data(6)
    extra = dyadic_embeddings(3, torch.Generator().manual_seed(1))
    all_emb = torch.cat([query_emb, extra])
    all_labels = torch.cat([query_labels, torch.full((3,), 99)])
    got = metrics.retrieval_metrics(all_emb, all_labels, gallery_emb, gallery_labels, ks=KS)
    kept = metrics.retrieval_metrics(query_emb, query_labels, gallery_emb, gallery_labels, ks=KS)
    assert got["num_queries_without_relevant"] == 3
    assert got["num_queries"] == len(query_labels)
    assert 99 not in got["per_class_ap"]
    assert got["num_relevant"][-3:].tolist() == [0, 0, 0]
    for key, value in got.items():
        if isinstance(value, torch.Tensor):
            assert not value.double().isnan().any(), key
            if key != "num_relevant":
                assert value[-3:].tolist() == [0.0, 0.0, 0.0], key
                assert torch.equal(value[:-3], kept[key]), key
        elif isinstance(value, float):
            assert value == kept[key], key
    assert_matches_reference(got, reference_metrics(all_emb, all_labels, gallery_emb, gallery_labels, KS), KS)


def test_perfect_and_reversed_rankings():
    num_classes = len(GALLERY_CLASS_SIZES)
    gallery_labels = torch.cat([torch.full((size,), c) for c, size in enumerate(GALLERY_CLASS_SIZES)])
    query_labels = torch.arange(num_classes)
    n, ks = len(gallery_labels), (10, 50, 1000)
    one_hot = torch.eye(num_classes)[gallery_labels] * 2.0  # (N, C), the class, unnormalised
    distinct = torch.arange(n, dtype=torch.float)[:, None] / n  # (N, 1) a different tilt per item
    gallery_emb = torch.cat([one_hot, distinct], dim=1)  # relevant scores all distinct and > 0
    queries = torch.cat([torch.eye(num_classes), torch.zeros(num_classes, 1)], dim=1)  # (C, C + 1)
    perfect = metrics.retrieval_metrics(queries, query_labels, gallery_emb, gallery_labels, ks=ks)
    assert perfect["map_all"] == pytest.approx(1.0, abs=1e-15)
    for k in ks:
        expected = [min(r, k) / min(k, n) for r in GALLERY_CLASS_SIZES]
        assert perfect[f"per_query_p@{k}"].tolist() == pytest.approx(expected, abs=1e-12)
        assert perfect[f"map@{k}"] == pytest.approx(1.0, abs=1e-15)
    assert perfect["p@1000"] == pytest.approx(1 / num_classes)  # K > N: R / N, averaged

    tied_gallery = torch.cat([one_hot, torch.zeros(n, 1)], dim=1)  # relevant items form one tie group
    tied = metrics.retrieval_metrics(queries, query_labels, tied_gallery, gallery_labels, ks=ks)
    assert tied["map_all"] == 1.0
    small_r = [r <= 10 for r in GALLERY_CLASS_SIZES]  # a tie group straddling K counts as outside
    assert tied["per_query_p@10"].tolist() == [r / 10 if s else 0.0 for r, s in zip(GALLERY_CLASS_SIZES, small_r)]
    assert tied["per_query_ap@10"].tolist() == [1.0 if s else 0.0 for s in small_r]

    reversed_ = metrics.retrieval_metrics(-queries, query_labels, gallery_emb, gallery_labels, ks=ks)
    reversed_tied = metrics.retrieval_metrics(-queries, query_labels, tied_gallery, gallery_labels, ks=ks)
    for q, r in enumerate(GALLERY_CLASS_SIZES):  # the R relevant items come last, after one tie group
        expected = sum(i / (n - r + i) for i in range(1, r + 1)) / r
        assert reversed_["ap"][q].item() == pytest.approx(expected, abs=1e-12)
        assert reversed_tied["ap"][q].item() == pytest.approx(r / n, abs=1e-15)  # all at rank N
    assert reversed_["map_all"] < metrics.chance_map(query_labels, gallery_labels)
    assert reversed_["p@10"] == 0.0


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


def test_bad_inputs_raise():
    query_emb, query_labels, gallery_emb, gallery_labels = make_data(7)
    with pytest.raises(ValueError, match="no query"):
        metrics.retrieval_metrics(query_emb, query_labels + 100, gallery_emb, gallery_labels)
    query_emb[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        metrics.retrieval_metrics(query_emb, query_labels, gallery_emb, gallery_labels)


def test_similarity_is_cosine():
    query_emb, gallery_emb = torch.tensor([[3.0, 4.0]]), torch.tensor([[1.0, 0.0], [0.0, -2.0], [6.0, 8.0]])
    assert metrics.similarity(query_emb, gallery_emb)[0].tolist() == pytest.approx([0.6, -0.8, 1.0])
    assert metrics.similarity(query_emb.half(), gallery_emb.half()).dtype == torch.float32


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_cuda_matches_cpu():
    data = make_data(8)
    cpu = metrics.retrieval_metrics(*data, ks=KS, chunk_size=16)
    cuda = metrics.retrieval_metrics(*(t.cuda() for t in data), ks=KS, chunk_size=16)
    assert_same_results(cpu, cuda, atol=1e-12)
