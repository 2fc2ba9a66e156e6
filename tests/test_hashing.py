"""Tests of metrics.py's hashing (ITQ codes, Hamming ranking) and fine-grained acc@k.

Each function is checked against a plain reimplementation written out here: textbook ITQ with
scipy's orthogonal Procrustes solver, SEM-PCYC's ITQ as a line-by-line numpy port of the update
described in metrics.itq_codes, Hamming distances by looping over bits, retrieval metrics on codes
by the per-query reference of test_metrics.py, and acc@k by a per-query loop. No peer code runs.
"""
import numpy as np
import pytest
import scipy.linalg
import torch
from sklearn.metrics import average_precision_score

import metrics
from test_metrics import (PROTOCOLS, assert_expected_over_tie_orders, assert_matches_reference, dyadic_embeddings,
                          reference_query)

EPS = np.finfo(np.float64).eps


def make_embeddings(seed: int, q: int = 40, n: int = 50, dim: int = 16):
    """float32 embeddings with a few strong directions, so PCA's eigenvalues are well apart."""
    gen = torch.Generator().manual_seed(seed)
    scale = torch.linspace(3.0, 0.5, dim)  # (D,)
    return (torch.randn(q, dim, generator=gen) * scale, torch.randn(n, dim, generator=gen) * scale + 0.3)


def unpack(codes: torch.Tensor) -> np.ndarray:
    """(n, C) uint8 -> (n, 8 C) bool, in numpy.packbits' bit order."""
    return np.unpackbits(codes.numpy(), axis=1).astype(bool)


def assert_clear_of_zero(projected: np.ndarray, margin: float = 1e-8) -> None:
    """The reference's projections V R are far from 0 relative to float64 rounding (~1e-15 of them), so
    two computations of their signs must agree: the premise of comparing codes exactly."""
    assert np.abs(projected).min() > margin * np.abs(projected).max()


# ------------------------------------------------------------------------------------ textbook ITQ


def reference_textbook_itq(xq: np.ndarray, xg: np.ndarray, bits: int, iterations: int, seed: int,
                           margin: float = 1e-8):
    """itq_codes(variant="textbook") from its docstring, with scipy's orthogonal Procrustes solver
    (argmin_R ||V R - B||_F over orthogonal R) for the rotation; every projection whose sign it takes lies
    at least `margin` of the largest from 0 (assert_clear_of_zero)."""
    xq, xg = xq - xq.mean(axis=0), xg - xg.mean(axis=0)  # each side on its own mean
    vals, vecs = np.linalg.eigh(np.cov(xq, rowvar=False))  # fitted on the queries
    pcs = vecs[:, np.argsort(vals)[::-1][:bits]]
    for j in range(bits):  # largest-magnitude entry positive
        if pcs[np.argmax(np.abs(pcs[:, j])), j] < 0:
            pcs[:, j] = -pcs[:, j]
    gen = torch.Generator().manual_seed(seed)
    rot = torch.linalg.qr(torch.randn(bits, bits, generator=gen, dtype=torch.float64)).Q.numpy()
    v = xq @ pcs
    for _ in range(iterations):
        projected = v @ rot
        assert_clear_of_zero(projected, margin)
        b = np.where(projected >= 0, 1.0, -1.0)
        rot = scipy.linalg.orthogonal_procrustes(v, b)[0]
    q_proj, g_proj = xq @ pcs @ rot, xg @ pcs @ rot
    assert_clear_of_zero(np.concatenate([q_proj, g_proj]), margin)
    return q_proj >= 0, g_proj >= 0, rot, v


@pytest.mark.parametrize("bits,iterations,seed", [(8, 50, 0), (16, 50, 3), (8, 0, 1), (16, 5, 2)])
def test_textbook_itq_matches_procrustes_reference(bits, iterations, seed):
    q, g = make_embeddings(seed)
    q_codes, g_codes = metrics.itq_codes(q, g, bits=bits, iterations=iterations, seed=seed)
    assert q_codes.dtype == torch.uint8 and q_codes.shape == (40, bits // 8) and g_codes.shape == (50, bits // 8)
    ref_q, ref_g, _, _ = reference_textbook_itq(q.double().numpy(), g.double().numpy(), bits, iterations, seed)
    assert np.array_equal(unpack(q_codes), ref_q)
    assert np.array_equal(unpack(g_codes), ref_g)


def test_textbook_rotation_is_the_procrustes_optimum():
    q, g = make_embeddings(5)
    _, _, ref_rot, v = reference_textbook_itq(q.double().numpy(), g.double().numpy(), 16, 50, 0)
    rot0 = torch.linalg.qr(torch.randn(16, 16, generator=torch.Generator().manual_seed(0),
                                       dtype=torch.float64)).Q
    rot = metrics._itq_rotation(torch.from_numpy(v), rot0, 50).numpy()
    # Both solve the same Procrustes problem for the same last B (the codes agree: the reference asserts
    # every sign is clear of rounding). The polar factor of C = B^T V moves by at most about
    # eps * ||C|| / sigma_min(C) per unit of perturbation; both sides compute C with c-term sums and an
    # SVD, each with backward error a small multiple of c * eps * ||C||, hence the bound below.
    b = np.where(v @ ref_rot >= 0, 1.0, -1.0)
    s = np.linalg.svd(b.T @ v, compute_uv=False)
    tol = 10 * 16 * EPS * s[0] / s[-1]
    assert np.abs(rot - ref_rot).max() <= tol
    assert np.abs(rot.T @ rot - np.eye(16)).max() <= 16 * 16 * EPS


def test_textbook_quantisation_loss_never_increases():
    """Each round minimises the loss over B, then over R, so ||sgn(V R) - V R||^2 cannot go up."""
    q, g = make_embeddings(6)
    _, _, _, v = reference_textbook_itq(q.double().numpy(), g.double().numpy(), 16, 0, 0)
    v = torch.from_numpy(v)
    rot = torch.linalg.qr(torch.randn(16, 16, generator=torch.Generator().manual_seed(0),
                                      dtype=torch.float64)).Q
    losses = []
    for _ in range(20):
        projected = v @ rot
        losses.append(float(((torch.where(projected >= 0, 1.0, -1.0).double() - projected) ** 2).sum()))
        rot = metrics._itq_rotation(v, rot, 1)
    # The loss is a sum of n * c squared terms, each computed with relative error of a few eps.
    slack = 4 * v.numel() * EPS * losses[0]
    assert all(b <= a + slack for a, b in zip(losses, losses[1:]))
    assert losses[-1] < losses[0]


# ---------------------------------------------------------------------------------- SEM-PCYC's ITQ


def reference_sem_pcyc_itq(xq: np.ndarray, xg: np.ndarray, bits: int, n_iter: int):
    """The SEM-PCYC procedure described in metrics.itq_codes, written out with their names and steps on the
    arrays as given (float32 from their model: numpy centres in float32, np.cov and the products with the
    float64 components promote to float64), seeding numpy's global generator as they do (its state is
    restored afterwards). bits < D keeps the leading components, which their code (bits = D) has no need to."""
    xtrain = xq - np.mean(xq, axis=0, keepdims=True)
    xtest = xg - np.mean(xg, axis=0, keepdims=True)
    c = np.cov(xtrain, rowvar=False)
    lam, pc = np.linalg.eigh(c, "U")
    pc = pc[:, lam.argsort()[::-1]][:, :bits]
    xxtrain, xxtest = xtrain @ pc, xtest @ pc
    state = np.random.get_state()
    try:
        np.random.seed(n_iter)
        r = np.random.randn(bits, bits)
    finally:
        np.random.set_state(state)
    u11, _, _ = np.linalg.svd(r)
    r = u11[:, :bits]
    for _ in range(n_iter):
        z = xxtrain @ r
        ux = np.ones(z.shape) * -1
        ux[z >= 0] = 1
        c = ux.T @ xxtrain
        ub, _, ua = np.linalg.svd(c)
        r = ua @ ub.T
    return xxtrain @ r > 0, xxtest @ r > 0, xxtrain @ r, xxtest @ r


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("bits,iterations", [(16, 50), (8, 50), (16, 7)])
def test_sem_pcyc_itq_matches_numpy_port(bits, iterations, dtype):
    """Bit for bit, in the embeddings' own precision: the same numpy calls on the same arrays (float32 is what
    their model gives their compressITQ), so no tolerance and no margin from 0 is needed."""
    q, g = (x.to(dtype) for x in make_embeddings(10 + bits))
    q_codes, g_codes = metrics.itq_codes(q, g, bits=bits, variant="sem-pcyc", iterations=iterations)
    ref_q, ref_g, _, _ = reference_sem_pcyc_itq(q.numpy(), g.numpy(), bits, iterations)
    assert np.array_equal(unpack(q_codes), ref_q)
    assert np.array_equal(unpack(g_codes), ref_g)


def test_sem_pcyc_update_is_not_the_procrustes_optimum():
    """For one B and V, R = UA UB^T (numpy's UA = W_C^T) reaches a lower tr(B^T V R) than Procrustes, and a
    higher quantisation loss ||B - V R||^2 = ||B||^2 + ||V||^2 - 2 tr(B^T V R)."""
    v = np.random.default_rng(0).standard_normal((60, 8))
    b = np.where(v >= 0, 1.0, -1.0)
    ub, s, ua = np.linalg.svd(b.T @ v)
    sem_pcyc, textbook = ua @ ub.T, ua.T @ ub.T
    assert np.allclose(sem_pcyc.T @ sem_pcyc, np.eye(8))  # still a rotation
    best = np.trace(b.T @ v @ textbook)
    assert best == pytest.approx(s.sum(), rel=64 * EPS)
    assert np.trace(b.T @ v @ sem_pcyc) < best - 1e-3 * s.sum()


@pytest.mark.parametrize("variant", ["textbook", "sem-pcyc"])
def test_both_variants_fit_on_the_queries_only(variant):
    q, g = make_embeddings(20)
    q_codes, g_codes = metrics.itq_codes(q, g, bits=16, variant=variant)
    q_codes_other_gallery, g_codes_shifted = metrics.itq_codes(q, g + 1, bits=16, variant=variant)
    assert torch.equal(q_codes, q_codes_other_gallery)  # the gallery plays no part in the fit
    assert torch.equal(g_codes, g_codes_shifted)  # and is centred on its own mean


# ------------------------------------------------------------------------------------ stability


def test_itq_stability_counts_the_bits_that_the_precision_changes():
    """sem-pcyc centres in the embeddings' own precision, so its stability is the share of bits that differ
    between its codes of float32 embeddings and of the same values in float64 (an ill-conditioned case, so
    that some do: 32 bits from 20 queries, whose covariance has rank 19)."""
    q, g = make_embeddings(50, q=20, n=30, dim=32)
    a, b = metrics.itq_codes(q, g, bits=32, variant="sem-pcyc"), metrics.itq_codes(q.double(), g.double(), bits=32,
                                                                                     variant="sem-pcyc")
    changed = sum(int((unpack(x) != unpack(y)).sum()) for x, y in zip(a, b))
    stability = metrics.itq_stability(q, g, bits=32, variant="sem-pcyc")
    assert changed > 0 and stability == changed / ((20 + 30) * 32)
    assert metrics.itq_stability(q.double(), g.double(), bits=32, variant="sem-pcyc") == stability  # symmetric


@pytest.mark.parametrize("variant", ["textbook", "sem-pcyc"])
def test_itq_stability_is_zero_when_well_conditioned(variant):
    """16-d embeddings with per-dimension scales 3 .. 0.5 and 40 queries: the covariance's eigenvalues are well
    apart. Centring in the other precision moves each centred value by one float32 rounding, about 6e-8 of it,
    and a projection (16 terms) by about 1e-6 of the largest at most; the fit's projections lie at least 1e-5 of
    the largest from 0 (the textbook reference checks those of every round, the sem-pcyc one those of the
    codes), so no sign changes."""
    q, g = make_embeddings(62)
    for bits in (8, 16):
        if variant == "sem-pcyc":
            *_, q_proj, g_proj = reference_sem_pcyc_itq(q.double().numpy(), g.double().numpy(), bits, 50)
            assert_clear_of_zero(np.concatenate([q_proj, g_proj]), margin=1e-5)
        else:
            reference_textbook_itq(q.double().numpy(), g.double().numpy(), bits, 50, 0, margin=1e-5)
        assert metrics.itq_stability(q, g, bits=bits, variant=variant) == 0.0


@pytest.mark.parametrize("variant", ["textbook", "sem-pcyc"])
def test_itq_stability_is_large_when_ill_conditioned(variant):
    """32 bits of 32-d embeddings from 20 queries: their covariance has rank at most 19, so 13 of the 32
    components are eigenvectors of eigenvalues that are 0 up to rounding, which the rounding picks; the
    gallery's bits along them follow. The caller's warning fires."""
    q, g = make_embeddings(70, q=20, n=30, dim=32)
    stability = metrics.itq_stability(q, g, bits=32, variant=variant)
    assert metrics.ITQ_UNSTABLE < stability <= 1.0


# ------------------------------------------------------------------------------ bits and errors


@pytest.mark.parametrize("bits", [0, 4, 12, 24, -8, 8.0, True])
def test_bad_bit_counts_raise(bits):
    q, g = make_embeddings(0, dim=16)
    with pytest.raises(ValueError, match="positive multiple of 8 and at most the embedding size 16"):
        metrics.itq_codes(q, g, bits=bits)


def test_other_bad_itq_inputs_raise():
    q, g = make_embeddings(0)
    with pytest.raises(ValueError, match="unknown ITQ variant 'matlab'"):
        metrics.itq_codes(q, g, bits=8, variant="matlab")
    with pytest.raises(ValueError, match="expected"):
        metrics.itq_codes(q, g[:, :8], bits=8)
    with pytest.raises(ValueError, match="at least 2 queries"):
        metrics.itq_codes(q[:1], g, bits=8)
    with pytest.raises(ValueError, match="NaN"):
        metrics.itq_codes(q.clone().fill_(float("nan")), g, bits=8)


def test_bits_equal_to_the_embedding_size_and_packing_order():
    q, g = make_embeddings(1, dim=16)
    q_codes, g_codes = metrics.itq_codes(q, g, bits=16)
    assert q_codes.shape == (40, 2) and g_codes.shape == (50, 2)
    flags = torch.rand(5, 24, generator=torch.Generator().manual_seed(0)) > 0.5
    assert np.array_equal(metrics._pack_bits(flags).numpy(), np.packbits(flags.numpy(), axis=1))


# ---------------------------------------------------------------------------------------- Hamming


def bit_loop_hamming(qc: torch.Tensor, gc: torch.Tensor) -> list:
    """Differing bits of every pair of packed codes, bit by bit."""
    out = []
    for a in qc.tolist():
        row = []
        for b in gc.tolist():
            row.append(sum(((x >> bit) & 1) != ((y >> bit) & 1) for x, y in zip(a, b) for bit in range(8)))
        out.append(row)
    return out


@pytest.mark.parametrize("block", [1, 50, 1 << 22])
@pytest.mark.parametrize("num_bytes", [3, 4])  # odd C: a zero byte pads the last 16-bit word
def test_hamming_matches_bit_loop(monkeypatch, block, num_bytes):
    monkeypatch.setattr(metrics, "_HAMMING_LOOKUPS", block)  # blocks of 1 row, of a few rows, one block
    gen = torch.Generator().manual_seed(num_bytes)
    qc = torch.randint(0, 256, (9, num_bytes), generator=gen, dtype=torch.uint8)
    gc = torch.randint(0, 256, (13, num_bytes), generator=gen, dtype=torch.uint8)
    gc[0] = qc[0]  # distance 0
    gc[1] = ~qc[0]  # every bit differs
    d = metrics.hamming_distance(qc, gc)
    assert d.dtype == torch.int32 and d.shape == (9, 13)
    assert d.tolist() == bit_loop_hamming(qc, gc)
    assert d[0, 0] == 0 and d[0, 1] == 8 * num_bytes


def test_popcount_table_counts_bits():
    table = metrics._popcount_table("cpu")
    assert table.shape == (65536,) and table.tolist() == [bin(i).count("1") for i in range(65536)]


def test_hamming_rejects_float_codes():
    with pytest.raises(ValueError, match="uint8 codes"):
        metrics.hamming_distance(torch.zeros(2, 3), torch.zeros(2, 3, dtype=torch.uint8))


# ------------------------------------------------------------------------ metrics on hashed codes


def reference_hamming_metrics(qc, q_labels, gc, g_labels, ks, pr_points):
    """test_metrics' per-query reference, fed with -Hamming distances from the bit loop."""
    scores = [[-d for d in row] for row in bit_loop_hamming(qc, gc)]
    per_query, num_relevant, skipped = {}, [], []
    for q, label in enumerate(q_labels.tolist()):
        rel = [c == label for c in g_labels.tolist()]
        num_relevant.append(sum(rel))
        if any(rel):
            per_query[q] = reference_query(scores[q], rel, ks, pr_points)
        else:
            skipped.append(q)
    out = {"num_queries": len(per_query), "num_queries_without_relevant": len(skipped),
           "num_relevant": num_relevant, "protocols": {}}
    for name in PROTOCOLS:
        values = {q: res[name] for q, res in per_query.items()}
        means = {key: sum(v[key] for v in values.values()) / len(values) for key in next(iter(values.values()))}
        per_class = {}
        for q, v in values.items():
            per_class.setdefault(q_labels[q].item(), []).append(v["ap"])
        out["protocols"][name] = {"per_query": values, "map_all": means["ap"],
                                  **{f"p@{k}": means[f"p@{k}"] for k in ks},
                                  **{f"map@{k}": means[f"ap@{k}"] for k in ks if name != "doodle2search"},
                                  "per_class_ap": {c: sum(v) / len(v) for c, v in per_class.items()}}
    out["pr_curve"] = [sum(r["pr"][i] for r in per_query.values()) / len(per_query) for i in range(pr_points)]
    return out


@pytest.mark.parametrize("num_bytes,chunk_size", [(1, 512), (1, 3), (2, 7)])
def test_every_protocol_on_codes_matches_reference(monkeypatch, num_bytes, chunk_size):
    monkeypatch.setattr(metrics, "CHUNK_SIZE", chunk_size)
    gen = torch.Generator().manual_seed(num_bytes * 100 + chunk_size)
    g_labels = torch.arange(4).repeat_interleave(torch.tensor([2, 5, 12, 21]))  # N = 40, R from 2 to 21
    q_labels = torch.arange(5).repeat_interleave(3)  # class 4 has no photo: excluded, counted
    class_code = torch.randint(0, 256, (5, num_bytes), generator=gen, dtype=torch.uint8)
    flips = torch.rand(len(g_labels), num_bytes * 8, generator=gen) < 0.25  # noisy copies: many ties
    gc = class_code[g_labels] ^ metrics._pack_bits(flips)
    qc = class_code[q_labels] ^ metrics._pack_bits(torch.rand(len(q_labels), num_bytes * 8, generator=gen) < 0.25)
    ks = (1, 4, 10, 21, 50)
    got = metrics.retrieval_metrics(qc, q_labels, gc, g_labels, ks=ks, protocols=PROTOCOLS, pr_points=11,
                                    score="hamming")
    ref = reference_hamming_metrics(qc, q_labels, gc, g_labels, ks, 11)
    assert got["num_queries_without_relevant"] == 3
    # Ranks are exact integers on either side. A per-query value is at most (3 R + 8) u from its exact value
    # here (test_metrics.assert_expected_over_tie_orders derives it) and (R + 8) u in the reference (a rounding
    # per weight, precision, product and sum term, and the mix of the interpolations), R <= 21; a mean over
    # the Q = 15 queries adds Q u on each side (u = EPS / 2; Higham 2002, section 4.2).
    assert_matches_reference(got, ref, ks, tol=(4 * 21 + 16 + 2 * 15) * EPS / 2)


def test_ranks_from_distance_histograms_match_the_score_counting():
    """The Hamming path's histogram ranks equal the float path's counting on s = -d, ties included."""
    gen = torch.Generator().manual_seed(3)
    dist = torch.randint(0, 9, (6, 40), generator=gen, dtype=torch.int32)  # 9 levels: ties everywhere
    for start, stop in ((0, 1), (5, 17), (0, 40)):
        got = metrics._ranks_of_relevant_distances(dist, start, stop, 9)
        want = metrics._ranks_of_relevant(-dist.float(), start, stop)
        assert all(a.dtype == torch.int64 and torch.equal(a, b) for a, b in zip(got, want))
    rank, hits, before = metrics._ranks_of_relevant_distances(torch.tensor([[2, 0, 2, 1]]), 2, 4, 3)
    assert rank.tolist() == [[2, 4]] and hits.tolist() == [[1, 2]]  # by hand: d = 1 then d = 2 (tied with col 0)
    assert before.tolist() == [[1, 2]]  # ahead of d = 1: the d = 0 item; of d = 2: d = 0 and d = 1


def test_hamming_ties_take_the_last_position():
    """Query 0x00; gallery at distances 1 (relevant), 1, 2 (relevant), 0. The distance-1 group holds
    ranks 2-3 and takes rank 3 for AP; place 2 cuts it, and half its orders put its relevant photo there."""
    qc = torch.tensor([[0x00]], dtype=torch.uint8)
    gc = torch.tensor([[0x01], [0x02], [0x03], [0x00]], dtype=torch.uint8)
    q_labels, g_labels = torch.tensor([1]), torch.tensor([1, 0, 1, 0])
    res = metrics.retrieval_metrics(qc, q_labels, gc, g_labels, ks=(2, 3), protocols=PROTOCOLS, score="hamming")
    std = res["protocols"]["standard"]
    assert std["map_all"] == pytest.approx((1 / 3 + 2 / 4) / 2, abs=1e-15)
    assert std["map_all"] == pytest.approx(average_precision_score([1, 0, 1, 0], [-1, -1, -2, 0]), abs=1e-15)
    assert std["p@2"] == 0.25  # E[hits@2] = 0 + (2 - 1) * 1 / 2 relevant photos, over K = 2 places
    assert std["map@2"] == (1 / 3) / 2 / 2  # P = 1/3, counted with chance 1/2, over min(R, K) = 2
    assert std["p@3"] == pytest.approx(1 / 3, abs=1e-15)
    for order in ([3, 2, 1, 0], [1, 0, 3, 2]):  # the gallery's order does not matter
        again = metrics.retrieval_metrics(qc, q_labels, gc[order], g_labels[order], ks=(2, 3),
                                          protocols=PROTOCOLS, score="hamming")
        for name in PROTOCOLS:
            a, b = res["protocols"][name], again["protocols"][name]
            assert [a[k] for k in ("map_all", "p@2", "p@3")] == [b[k] for k in ("map_all", "p@2", "p@3")]


def test_tie_orders_hamming_mean_over_every_order():
    """Codes that differ in 2 of 8 bits (distances 0 to 2 from the query: large tie groups) on galleries of 6
    and 7: every protocol's P@K and AP@K against the mean over all orders of the tied photos, at every K."""
    gen = torch.Generator().manual_seed(12)
    straddling = 0
    for n in (6, 7, 6, 7):
        qc = torch.randint(0, 4, (3, 1), generator=gen, dtype=torch.uint8)
        gc = torch.randint(0, 4, (n, 1), generator=gen, dtype=torch.uint8)
        q_labels, g_labels = [0, 1, 2], torch.randint(0, 2, (n,), generator=gen).tolist()
        ks = tuple(range(1, n + 2))
        got = metrics.retrieval_metrics(qc, torch.tensor(q_labels), gc, torch.tensor(g_labels), ks=ks,
                                        protocols=PROTOCOLS, score="hamming")
        scores = [[-d for d in row] for row in bit_loop_hamming(qc, gc)]
        straddling += assert_expected_over_tie_orders(got, scores, q_labels, g_labels, ks)
    assert straddling >= 10


def test_itq_codes_feed_retrieval_metrics():
    q, g = make_embeddings(30, dim=16)
    q_labels, g_labels = torch.arange(40) % 4, torch.arange(50) % 4
    qc, gc = metrics.itq_codes(q, g, bits=16)
    got = metrics.retrieval_metrics(qc, q_labels, gc, g_labels, ks=(5,), protocols=("standard",), score="hamming")
    d = (unpack(qc)[:, None, :] != unpack(gc)[None, :, :]).sum(2)  # (Q, N) Hamming of the unpacked bits
    ap = [average_precision_score(g_labels.numpy() == q_labels[i].item(), -d[i]) for i in range(40)]
    assert got["protocols"]["standard"]["map_all"] == pytest.approx(np.mean(ap), abs=2 * 50 * EPS)


def test_score_and_input_kinds_must_agree():
    q, q_labels, g, g_labels = torch.randn(4, 8), torch.zeros(4), torch.randn(5, 8), torch.zeros(5)
    with pytest.raises(ValueError, match="needs packed uint8 codes"):
        metrics.retrieval_metrics(q, q_labels, g, g_labels, score="hamming")
    codes = torch.zeros(4, 1, dtype=torch.uint8)
    with pytest.raises(ValueError, match="pass score='hamming'"):
        metrics.retrieval_metrics(codes, q_labels, codes, q_labels)
    with pytest.raises(ValueError, match="unknown score 'l2'"):
        metrics.retrieval_metrics(q, q_labels, g, g_labels, score="l2")


# -------------------------------------------------------------------------------- fine-grained acc@k


def loop_accuracy(scores: list, target: list, ks) -> tuple[dict, list]:
    """Per query: rank = gallery items scoring at least the target's score (the target included)."""
    ranks = [sum(1 for s in row if s >= row[t]) for row, t in zip(scores, target)]
    return {f"acc@{k}": sum(r <= k for r in ranks) / len(ranks) for k in ks}, ranks


@pytest.mark.parametrize("chunk_size", [1, 4, 512])
def test_fine_grained_accuracy_matches_loop(chunk_size):
    gen = torch.Generator().manual_seed(chunk_size)
    q = dyadic_embeddings(30, gen)  # every cosine a multiple of 1/16, exact in float32 and float64
    g = dyadic_embeddings(25, gen)
    g[20:] = g[:5]  # exact duplicates: ties with their originals
    target = torch.randint(0, 25, (30,), generator=gen)
    qd = q.double() / q.double().norm(dim=1, keepdim=True)
    gd = g.double() / g.double().norm(dim=1, keepdim=True)
    ks = (1, 5, 10)
    want, ranks = loop_accuracy((qd @ gd.T).tolist(), target.tolist(), ks)
    got = metrics.fine_grained_accuracy(q, g, target, ks=ks, chunk_size=chunk_size)
    assert got["rank"].dtype == torch.int64 and got["rank"].tolist() == ranks
    for key, value in want.items():
        assert got[key] == pytest.approx(value, abs=1e-15)
    assert got["mean_rank"] == pytest.approx(sum(ranks) / len(ranks), abs=1e-12)


def test_fine_grained_accuracy_on_codes_matches_loop():
    gen = torch.Generator().manual_seed(7)
    qc = torch.randint(0, 256, (12, 1), generator=gen, dtype=torch.uint8)
    gc = torch.randint(0, 256, (30, 1), generator=gen, dtype=torch.uint8)
    target = torch.randint(0, 30, (12,), generator=gen)
    scores = [[-d for d in row] for row in bit_loop_hamming(qc, gc)]
    want, ranks = loop_accuracy(scores, target.tolist(), (1, 5))
    got = metrics.fine_grained_accuracy(qc, gc, target, score="hamming", chunk_size=5)
    assert got["rank"].tolist() == ranks
    assert got["acc@1"] == want["acc@1"] and got["acc@5"] == want["acc@5"]


def test_fine_grained_ties_count_against_the_target():
    q = torch.tensor([[1.0, 0.0]])
    g = torch.tensor([[0.0, 1.0], [2.0, 0.0], [3.0, 0.0]])  # rows 1 and 2: the same cosine 1
    for target in (1, 2):
        got = metrics.fine_grained_accuracy(q, g, torch.tensor([target]), ks=(1, 2))
        assert got["rank"].tolist() == [2] and got["acc@1"] == 0.0 and got["acc@2"] == 1.0


def test_fine_grained_bad_inputs_raise():
    q, g = torch.randn(3, 4), torch.randn(5, 4)
    with pytest.raises(ValueError, match=r"must lie in \[0, 5\)"):
        metrics.fine_grained_accuracy(q, g, torch.tensor([0, 1, 5]))
    with pytest.raises(ValueError, match="one integer gallery row per query"):
        metrics.fine_grained_accuracy(q, g, torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="one integer gallery row per query"):
        metrics.fine_grained_accuracy(q, g, torch.tensor([0.0, 1.0, 2.0]))
    with pytest.raises(ValueError, match="expected"):
        metrics.fine_grained_accuracy(q, g[:, :3], torch.tensor([0, 1, 2]))


# ------------------------------------------------------------------------------------------ CUDA


@pytest.mark.gpu
def test_hashing_on_cuda_matches_cpu():
    q, g = make_embeddings(40, q=300, n=400, dim=64)
    q_labels, g_labels = torch.arange(300) % 7, torch.arange(400) % 7
    for variant in metrics.ITQ_VARIANTS:
        qc, gc = metrics.itq_codes(q, g, bits=64, variant=variant)
        qc_cuda, gc_cuda = metrics.itq_codes(q.cuda(), g.cuda(), bits=64, variant=variant)
        assert qc_cuda.is_cuda and torch.equal(qc, qc_cuda.cpu()) and torch.equal(gc, gc_cuda.cpu())
        assert torch.equal(metrics.hamming_distance(qc, gc), metrics.hamming_distance(qc_cuda, gc_cuda).cpu())
        cpu = metrics.retrieval_metrics(qc, q_labels, gc, g_labels, protocols=PROTOCOLS, score="hamming")
        cuda = metrics.retrieval_metrics(qc_cuda, q_labels.cuda(), gc_cuda, g_labels.cuda(), protocols=PROTOCOLS,
                                         score="hamming")
        for name in PROTOCOLS:  # exact integer ranks; float64 sums of at most N terms in another order
            for key in ("map_all", "p@100", "map@200"):
                a, b = cpu["protocols"][name].get(key), cuda["protocols"][name].get(key)
                assert (a is None and b is None) or abs(a - b) <= 2 * (400 + 300) * EPS
