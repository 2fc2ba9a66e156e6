"""evaluate.py --hash_bits / --itq: every --task scored on ITQ binary codes ranked by Hamming distance, from a
model and from saved embeddings, checked against metrics.py on the same codes; bad bit counts are one line."""
import json
import os

import pytest
import torch

import evaluate
import metrics
import train
from conftest import make_tiny_dataset, run_main
from test_tasks import pair_by_name
from test_train import TINY, assert_one_line_error

TIMINGS = ("metrics_seconds", "throughput_images_per_s")  # the only entries two identical runs may differ in


def results(folder) -> dict:
    with open(os.path.join(folder, "results.json")) as f:
        return json.load(f)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A tiny 16-d model trained on sketches named after their photos (so --task fg has pairs), and its test
    split's float embeddings for --task zs and fg, saved once."""
    root = tmp_path_factory.mktemp("hashing")
    data = pair_by_name(make_tiny_dataset(str(root / "data"), per_class=6))
    ckpt = str(root / "ckpt")
    train.main(train.get_args_parser().parse_args(["--data_dir", data, "--checkpoint_dir", ckpt, *TINY,
                                                   "--epochs", "1", "--val_fraction", "0.25"]))
    out = {"data": data, "model": os.path.join(ckpt, "best.pth"), "root": root}
    for task in ("zs", "fg"):
        out[task] = str(root / f"{task}.pt")
        proc = evaluate_run(out, root / f"float_{task}", "--task", task, "--save_embeddings", out[task])
        assert proc.returncode == 0, proc.stderr
    return out


def evaluate_run(run, out, *extra):
    return run_main("evaluate.py", "--model", run["model"], "--data_dir", run["data"], "--workers", "0",
                    "--device", "cpu", "--num_sketches", "0", "--output_dir", str(out), *extra)


def saved(run, task):
    return torch.load(run[task], map_location="cpu", weights_only=False)


@pytest.mark.parametrize("variant", ["textbook", "sem-pcyc"])
def test_zs_on_codes_from_the_model_and_from_saved_embeddings(run, tmp_path, variant):
    proc = evaluate_run(run, tmp_path / "a", "--hash_bits", "16", "--itq", variant, "--num_sketches", "2")
    assert proc.returncode == 0, proc.stderr
    assert f"16-bit ITQ ({variant}) codes, ranked by Hamming distance" in proc.stdout
    a = results(str(tmp_path / "a"))
    assert {k: a["hashing"][k] for k in ("bits", "itq", "score", "iterations")} == {
        "bits": 16, "itq": variant, "score": "hamming", "iterations": 50}
    assert len(a["grids"]) == 2
    # The same numbers as metrics.py gives on codes fitted to the same float embeddings (saved by the fixture's
    # float run of the same model: the same kernels on the same images).
    emb = saved(run, "zs")
    q, g = metrics.itq_codes(emb["queries"], emb["gallery"], bits=16, variant=variant)
    ref = metrics.retrieval_metrics(q, emb["query_labels"], g, emb["gallery_labels"], ks=evaluate.KS,
                                    protocols=list(metrics.PROTOCOLS), score="hamming")
    for name in metrics.PROTOCOLS:
        assert a["protocols"][name] == evaluate.summary(ref, name, emb["classes"]), name
    assert a["map_all"] == ref["protocols"]["standard"]["map_all"]
    floats = results(str(run["root"] / "float_zs"))
    assert a["chance_map_all"] == floats["chance_map_all"] and "hashing" not in floats
    # From the saved float embeddings, hashed at evaluation time: the same results.
    proc = run_main("evaluate.py", "--embeddings", run["zs"], "--hash_bits", "16", "--itq", variant,
                    "--output_dir", str(tmp_path / "b"))
    assert proc.returncode == 0, proc.stderr
    assert f"16-bit ITQ ({variant}) codes, ranked by Hamming distance" in proc.stdout
    b = results(str(tmp_path / "b"))
    assert (b["protocols"], b["pr_curve"]) == (a["protocols"], a["pr_curve"])
    assert {k: v for k, v in b["hashing"].items() if k != "seconds"} == \
        {k: v for k, v in a["hashing"].items() if k != "seconds"}


def test_fg_on_codes_from_the_model_and_from_saved_embeddings(run, tmp_path):
    """sem-pcyc's fit: on this tiny model the textbook one, centred on the mean of both domains, gives every sketch
    one code and every photo its complement (the sketch-photo gap is the first principal component)."""
    hashing = ["--hash_bits", "16", "--itq", "sem-pcyc"]
    proc = evaluate_run(run, tmp_path / "a", "--task", "fg", *hashing, "--compare_untrained")
    assert proc.returncode == 0, proc.stderr
    assert "16-bit ITQ (sem-pcyc) codes, ranked by Hamming distance" in proc.stdout
    a = results(str(tmp_path / "a"))
    assert a["hashing"]["bits"] == 16 and a["hashing"]["itq"] == "sem-pcyc" and "untrained" in a["hashing"]
    assert set(a["untrained"]) == {"gallery_all", "gallery_class"} and "untrained network acc@1" in proc.stdout
    emb = saved(run, "fg")
    q, g = metrics.itq_codes(emb["queries"], emb["gallery"], bits=16, variant="sem-pcyc")
    assert metrics.hamming_distance(q, g).unique().numel() > 3  # codes that rank, not one tie
    targets = emb["query_targets"]
    assert a["gallery_all"] == evaluate.fine_grained_accuracy(q, g, targets, score="hamming")
    assert a["gallery_class"] == evaluate.fine_grained_within_class(q, emb["query_labels"], g, emb["gallery_labels"],
                                                                    targets, score="hamming")
    proc = run_main("evaluate.py", "--embeddings", run["fg"], "--task", "fg", *hashing,
                    "--output_dir", str(tmp_path / "b"))
    assert proc.returncode == 0, proc.stderr
    b = results(str(tmp_path / "b"))
    assert (b["gallery_all"], b["gallery_class"]) == (a["gallery_all"], a["gallery_class"])


@pytest.mark.parametrize("setting", ["gzs", "cross-dataset"])
def test_gzs_and_cross_dataset_runs_on_codes(run, tmp_path, setting):
    """The codes are fitted on whatever images the setting scores: seen-class images included (gzs), another
    dataset's unseen classes (cross-dataset)."""
    emb_path = str(tmp_path / "emb.pt")
    if setting == "gzs":
        extra = ["--task", "gzs"]
        proc = evaluate_run(run, tmp_path / "a", *extra, "--hash_bits", "16", "--save_embeddings", emb_path)
    else:
        other = make_tiny_dataset(str(tmp_path / "other"), seen=("TRI", "hexa"), unseen=("circle", "star"),
                                  per_class=3)
        extra = ["--data_dir", other]
        proc = run_main("evaluate.py", "--model", run["model"], "--data_dir", other, "--workers", "0", "--device",
                        "cpu", "--num_sketches", "0", "--output_dir", str(tmp_path / "a"), "--hash_bits", "16",
                        "--save_embeddings", emb_path)
    assert proc.returncode == 0, proc.stderr
    assert "16-bit ITQ (textbook) codes, ranked by Hamming distance" in proc.stdout
    a = results(str(tmp_path / "a"))
    assert a["hashing"]["bits"] == 16 and (setting == "gzs") == ("gzs" in a) and (setting == "gzs") != (
        "cross_dataset" in a)
    emb = torch.load(emb_path, map_location="cpu", weights_only=False)
    q, g = metrics.itq_codes(emb["queries"], emb["gallery"], bits=16)
    ref = metrics.retrieval_metrics(q, emb["query_labels"], g, emb["gallery_labels"], ks=evaluate.KS,
                                    protocols=["standard"], score="hamming")
    assert a["protocols"]["standard"] == evaluate.summary(ref, "standard", emb["classes"])
    proc = run_main("evaluate.py", "--embeddings", emb_path, *extra, "--hash_bits", "16",
                    "--output_dir", str(tmp_path / "b"))
    assert proc.returncode == 0, proc.stderr
    assert results(str(tmp_path / "b"))["protocols"] == a["protocols"]


def test_within_class_fine_grained_on_codes_matches_a_per_query_loop():
    """Each query's class's codes only: the own photo's rank is the number of them at most as far as it."""
    g = torch.Generator().manual_seed(0)
    q, gal = torch.randint(0, 256, (30, 1), generator=g, dtype=torch.uint8), \
        torch.randint(0, 256, (20, 1), generator=g, dtype=torch.uint8)  # 8-bit codes: many exact ties
    q_labels, g_labels = torch.arange(30) % 2, torch.arange(20) % 2
    target = torch.stack([torch.nonzero(g_labels == c).flatten()[i % 10] for i, c in enumerate(q_labels.tolist())])
    got = evaluate.fine_grained_within_class(q, q_labels, gal, g_labels, target, ks=(1, 3), score="hamming")
    dist = metrics.hamming_distance(q, gal)
    for k in (1, 3):
        hits = sum(int(sum(int(dist[i, j] <= dist[i, target[i]]) for j in range(20) if g_labels[j] == q_labels[i])
                       <= k) for i in range(30))
        assert got[f"acc@{k}"] == pytest.approx(hits / 30, abs=1e-12)


def test_the_untrained_network_is_hashed_by_an_itq_of_its_own():
    """--compare_untrained: the untrained embeddings are hashed the same way, with ITQ fitted on them alone."""
    g = torch.Generator().manual_seed(0)
    q, gal, uq, ug = (torch.randn(n, 16, generator=g) for n in (10, 12, 10, 12))
    emb = evaluate.Embedded(["a", "b"], q, torch.arange(10) % 2, gal, torch.arange(12) % 2, 1.0, "m", "d", "",
                            untrained=(uq, ug))
    args = type("Args", (), {"hash_bits": 16, "itq": "sem-pcyc"})()
    hashed, info = evaluate.hash_embeddings(emb, args)
    for got, want in zip((hashed.q, hashed.g, *hashed.untrained),
                         (*metrics.itq_codes(q, gal, 16, "sem-pcyc"), *metrics.itq_codes(uq, ug, 16, "sem-pcyc"))):
        assert torch.equal(got, want)
    assert info["bits"] == 16 and info["itq"] == "sem-pcyc" and info["seed"] == 50 and "untrained" in info


def test_hash_bits_0_changes_nothing(run, tmp_path):
    for task in ("zs", "fg"):
        proc = evaluate_run(run, tmp_path / task, "--task", task, "--hash_bits", "0")
        assert proc.returncode == 0, proc.stderr
        assert "ITQ" not in proc.stdout and "Hamming" not in proc.stdout
        got, floats = results(str(tmp_path / task)), results(str(run["root"] / f"float_{task}"))
        for r in (got, floats):
            for key in TIMINGS:
                r.pop(key)
        assert got == floats


@pytest.mark.parametrize("argv, fragments", [
    (["--hash_bits", "12"], ["--hash_bits must be 0 (off) or a positive multiple of 8", "got 12"]),
    (["--hash_bits", "-8"], ["--hash_bits must be 0 (off) or a positive multiple of 8", "got -8"]),
    (["--itq", "sempcyc", "--hash_bits", "8"], ["unknown --itq 'sempcyc'", "textbook, sem-pcyc"]),
    (["--itq", "sem-pcyc"], ["--itq sem-pcyc picks how hash codes are fitted", "pass --hash_bits N"]),
])
def test_bad_hashing_arguments_are_one_line(argv, fragments, tmp_path):
    proc = run_main("evaluate.py", "--model", "m.pth", "--data_dir", str(tmp_path), *argv)
    assert_one_line_error(proc, *fragments)


def test_more_bits_than_dimensions_is_one_line_before_any_embedding(run, tmp_path):
    proc = evaluate_run(run, tmp_path / "a", "--hash_bits", "24")
    assert_one_line_error(proc, f"--hash_bits 24 is more than the 16 dimensions of {run['model']}'s embeddings",
                          "pass a multiple of 8 up to 16")
    assert proc.stdout == "" and not os.path.exists(tmp_path / "a")  # nothing embedded, nothing written
    proc = run_main("evaluate.py", "--embeddings", run["zs"], "--hash_bits", "32", "--output_dir", str(tmp_path / "b"))
    assert_one_line_error(proc, f"--hash_bits 32 is more than the 16 dimensions of {run['zs']}'s embeddings")
    assert not os.path.exists(tmp_path / "b")


def test_codes_that_collapse_to_one_per_domain_are_warned_about(capsys):
    """Embeddings that do not vary within a domain give one code per domain: every ranking is one tie, and
    evaluate.py says so. A gap between the domains' means alone does not (each side is centred on its own mean):
    sketches and photos 10 apart along one axis, spread 0.1 within each, keep distinct codes in both variants."""
    g = torch.Generator().manual_seed(0)
    gap = torch.zeros(16)
    gap[0] = 5.0
    q, gal = gap + 0.1 * torch.randn(10, 16, generator=g), -gap + 0.1 * torch.randn(12, 16, generator=g)
    for itq in ("textbook", "sem-pcyc"):
        sketches, photos = gap.expand(10, 16).clone(), -gap.expand(12, 16).clone()  # no spread within a domain
        flat = evaluate.Embedded(["a", "b"], sketches, torch.arange(10) % 2, photos, torch.arange(12) % 2, 1.0,
                                 "m", "d", "")
        _, info = evaluate.hash_embeddings(flat, type("Args", (), {"hash_bits": 8, "itq": itq})())
        assert info["distinct_codes"] == {"queries": 1, "gallery": 1}
        assert "warning: all 10 query sketches have one code and all 12 photos have one code, so every query ranks " \
               "the photos as one tie" in capsys.readouterr().out
        emb = evaluate.Embedded(["a", "b"], q, torch.arange(10) % 2, gal, torch.arange(12) % 2, 1.0, "m", "d", "")
        _, info = evaluate.hash_embeddings(emb, type("Args", (), {"hash_bits": 8, "itq": itq})())
        assert min(info["distinct_codes"].values()) > 1 and "warning" not in capsys.readouterr().out


def test_code_stability_is_recorded_and_unstable_codes_are_warned_about(run, tmp_path):
    """results.json keeps metrics.itq_stability's figure; above metrics.ITQ_UNSTABLE one warning line says the
    codes depend on rounding. Well-conditioned: 200 query sketches whose 16 dimensions have distinct variances,
    8 bits. Ill-conditioned: 10 queries span at most 9 dimensions, so 16 bits fit directions of no variance,
    which rounding alone decides."""
    gen = torch.Generator().manual_seed(0)
    scale = torch.tensor([0.7 ** i for i in range(16)])
    for name, num_queries, bits, unstable in (("well", 200, 8, False), ("ill", 10, 16, True)):
        emb = saved(run, "zs")
        q, g = torch.randn(num_queries, 16, generator=gen) * scale, torch.randn(300, 16, generator=gen) * scale
        emb.update(queries=q, query_labels=torch.arange(num_queries) % 2, query_paths=[f"q{i}" for i in range(len(q))],
                   gallery=g, gallery_labels=torch.arange(300) % 2, gallery_paths=[f"g{i}" for i in range(len(g))])
        torch.save(emb, tmp_path / f"{name}.pt")
        proc = run_main("evaluate.py", "--embeddings", str(tmp_path / f"{name}.pt"), "--hash_bits", str(bits),
                        "--output_dir", str(tmp_path / name))
        assert proc.returncode == 0, proc.stderr
        stability = results(str(tmp_path / name))["hashing"]["stability"]
        assert stability["changed_bits"] == metrics.itq_stability(q, g, bits=bits)
        assert (stability["changed_bits"] > metrics.ITQ_UNSTABLE) == unstable, stability
        assert ("bits change with the rounding of the embeddings" in proc.stdout) == unstable, proc.stdout
