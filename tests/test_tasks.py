"""evaluate.py --task gzs / fg and cross-dataset runs: the image sets each setting builds, acc@k, bad input."""
import json
import os
import shutil
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import dataset
import evaluate
import train
import utils
from conftest import U32, U64, make_tiny_dataset, reordering_rtol, run_main
from test_train import TINY, assert_one_line_error


def pair_by_name(root: str) -> str:
    """Rename the tiny dataset's sketches <c>_<i>.png to Sketchy's <c>_<i>-1.png: drawn from photo <c>_<i>.png."""
    for c in os.listdir(os.path.join(root, "sketches")):
        folder = os.path.join(root, "sketches", c)
        for f in os.listdir(folder):
            stem, ext = os.path.splitext(f)
            os.replace(os.path.join(folder, f), os.path.join(folder, f"{stem}-1{ext}"))
    return root


def results(folder):
    with open(os.path.join(folder, "results.json")) as f:
        return json.load(f)


# ----------------------------------------------------------------------------------- pure parts

def test_normalised_class_names():
    n = dataset.normalise_class_name
    assert n("Hot-Air_Balloon") == n("hot air balloon") == n(" hot  air-balloon ") == "hot air balloon"
    assert n("car_(sedan)") == "car (sedan)" and n("teddy-bear") == "teddy bear"
    assert n("airplane") != n("airplanes")  # plurals are different names


def test_cross_dataset_classes_excludes_the_trained_names():
    data = SimpleNamespace(seen=["Teddy-Bear", "cow"], unseen=["hot_air_balloon", "zebra"])
    unseen, excluded = evaluate.cross_dataset_classes(data, ["teddy_bear", "hot air balloon", "horse"])
    assert unseen == ["cow", "zebra"] and excluded == ["Teddy-Bear", "hot_air_balloon"]


def test_instance_pairs_follow_sketchy_file_names(tmp_path):
    for rel in ("sketches/a/n1_7-1.png", "sketches/a/n1_7-2.png", "sketches/a/n1_8-1.png", "sketches/a/loose.png",
                "sketches/b/x-1-3.png", "photos/a/n1_7.jpg", "photos/a/n1_9.jpg", "photos/b/x-1.JPEG"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"")
    sk = {c: dataset.list_images(str(tmp_path / "sketches" / c)) for c in ("a", "b")}
    ph = {c: dataset.list_images(str(tmp_path / "photos" / c)) for c in ("a", "b")}
    pairs, counts = dataset.instance_pairs(sk, ph, ["a", "b"])
    name = os.path.basename
    assert [(name(s), name(p)) for s, p in pairs["a"]] == [("n1_7-1.png", "n1_7.jpg"), ("n1_7-2.png", "n1_7.jpg")]
    assert [(name(s), name(p)) for s, p in pairs["b"]] == [("x-1-3.png", "x-1.JPEG")]
    # n1_8-1's photo is absent and loose.png is not named after a photo; n1_9 has no sketch (an extended photo).
    assert counts == {"sketches_without_photo": 2, "photos_without_sketch": 1}


def test_gzs_composition_written_out(tmp_path):
    """6 classes x 6 images: 12 unseen sketches and photos; fraction 0.5 adds int(0.5 * 12) = 6 seen-class
    training images per side, drawn from the 18 the 0.25 validation hold-out leaves, seen items first."""
    root = make_tiny_dataset(str(tmp_path / "d"), per_class=6)
    data = dataset.scan_dataset(root, check_images=False)
    args = SimpleNamespace(task="gzs", split="test", gzs_fraction=0.5, gzs_seed=3)
    got = evaluate.task_images(data, args, 0.25, None)
    assert got.classes == ["circle", "star", "tri", "square", "pent", "hexa"]  # unseen first, then seen
    train_part, val_part = dataset.split_seen(data, 0.25)
    for side, (paths, labels), domain in (("sketches", got.sketches, data.sketches),
                                          ("photos", got.photos, data.photos)):
        pool = sorted(os.path.relpath(p, root) for c in data.seen for p in train_part[side][c])
        assert len(pool) == 18
        picks = sorted(np.random.default_rng(3).choice(18, size=6, replace=False))
        expected_seen = [os.path.join(root, pool[i]) for i in picks]
        unseen = domain["circle"] + domain["star"]
        assert paths == expected_seen + unseen
        assert labels[6:] == [0] * 6 + [1] * 6
        assert labels[:6] == [got.classes.index(os.path.basename(os.path.dirname(p))) for p in expected_seen]
        held = {p for c in data.seen for p in val_part[side][c]}
        assert not held & set(paths)  # the validation hold-out never joins
    assert got.info["gzs"] == {"fraction": 0.5, "seed": 3, "seen_sketches": 6, "unseen_sketches": 12,
                               "seen_photos": 6, "unseen_photos": 12,
                               "seen_drawn_from": "seen-class training images (the validation hold-out left out)"}


def fg_loop(scores: torch.Tensor, target: torch.Tensor, k: int) -> float:
    """acc@k by its definition, one query at a time: the own photo's rank among the gallery items is the
    number of them scoring at least as high as it (itself included: a tie counts against it, as Sketch_LVM's
    rank = dist.le(target_dist).sum())."""
    hits = 0
    for i in range(scores.shape[0]):
        own = float(scores[i, target[i]])
        cols = range(scores.shape[1])
        rank = sum(1 for j in cols if float(scores[i, j]) >= own)
        hits += rank <= k
    return hits / scores.shape[0]


def test_fine_grained_accuracy_matches_a_per_query_loop():
    g = torch.Generator().manual_seed(0)
    q = torch.randint(-2, 3, (40, 4), generator=g).float()      # small integers: many exact ties
    gal = torch.randint(-2, 3, (25, 4), generator=g).float()
    q[0] = gal[3]                                                # a query equal to its target
    target = torch.randint(0, 25, (40,), generator=g)
    target[0] = 3
    scores = evaluate.metrics.similarity(q, gal)
    got = evaluate.fine_grained_accuracy(q, gal, target, ks=(1, 5, 25))  # one chunk: the scores the loop reads
    for k in (1, 5, 25):
        assert got[f"acc@{k}"] == pytest.approx(fg_loop(scores, target, k), abs=1e-12)
    assert got["acc@25"] == 1.0
    # Within each query's class: only that class's gallery items compete.
    q_labels, g_labels = torch.arange(40) % 3, torch.arange(25) % 3
    target = torch.stack([torch.nonzero(g_labels == c).flatten()[i % 8] for i, c in enumerate(q_labels.tolist())])
    own = evaluate.fine_grained_within_class(q, q_labels, gal, g_labels, target, ks=(1, 5))
    for k in (1, 5):
        # the loop reads the class-restricted similarity, computed on the same rows and columns
        hits = 0
        for c in range(3):
            rows, cols = torch.nonzero(q_labels == c).flatten(), torch.nonzero(g_labels == c).flatten()
            sub = evaluate.metrics.similarity(q[rows], gal[cols])
            pos = {int(j): n for n, j in enumerate(cols)}
            hits += fg_loop(sub, torch.tensor([pos[int(target[r])] for r in rows]), k) * rows.numel()
        assert own[f"acc@{k}"] == pytest.approx(hits / 40, abs=1e-12)
    # Chunks of queries give the same counts (Gaussian embeddings: no score within float error of another).
    qn, gn = torch.randn(40, 8, generator=g), torch.randn(25, 8, generator=g)
    chunked = evaluate.fine_grained_accuracy(qn, gn, target, chunk_size=7)
    assert chunked == evaluate.fine_grained_accuracy(qn, gn, target)


# ----------------------------------------------------------------------------------- through evaluate.py

@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A tiny model trained on a dataset whose sketches are named after their photos (Sketchy's way)."""
    root = tmp_path_factory.mktemp("tasks")
    data = pair_by_name(make_tiny_dataset(str(root / "data"), per_class=6))
    ckpt = str(root / "ckpt")
    train.main(train.get_args_parser().parse_args(["--data_dir", data, "--checkpoint_dir", ckpt, *TINY,
                                                   "--epochs", "1", "--val_fraction", "0.25"]))
    return {"data": data, "model": os.path.join(ckpt, "best.pth"), "root": root}


def evaluate_run(run, out, *extra, model: str = "", data: str = ""):
    """evaluate.py on the CPU without grids: the trained model on its data, or the given ones."""
    return run_main("evaluate.py", "--model", model or run["model"], "--data_dir", data or run["data"], "--workers",
                    "0", "--device", "cpu", "--num_sketches", "0", "--output_dir", str(out), *extra)


def test_gzs_from_the_model_and_from_its_saved_embeddings(run, tmp_path):
    emb = str(tmp_path / "gzs.pt")
    proc = evaluate_run(run, tmp_path / "a", "--task", "gzs", "--save_embeddings", emb)
    assert proc.returncode == 0, proc.stderr
    a = results(str(tmp_path / "a"))
    assert a["task"] == "gzs" and a["num_queries"] == 12 + 2 and a["num_gallery"] == 12 + 2  # int(0.2 * 12) = 2
    assert a["gzs"]["seen_sketches"] == 2 and a["gzs"]["unseen_photos"] == 12
    assert "gzs: 2 seen-class sketches join the 12 unseen ones" in proc.stdout
    proc = run_main("evaluate.py", "--embeddings", emb, "--task", "gzs", "--data_dir", run["data"],
                    "--output_dir", str(tmp_path / "b"))
    assert proc.returncode == 0, proc.stderr
    b = results(str(tmp_path / "b"))
    assert a["protocols"] == b["protocols"] and a["gzs"] == b["gzs"]
    proc = run_main("evaluate.py", "--embeddings", emb, "--output_dir", str(tmp_path / "c"))  # --task zs
    assert_one_line_error(proc, "--task gzs", "not --task zs")


def test_fg_from_the_model_and_from_its_saved_embeddings(run, tmp_path):
    emb = str(tmp_path / "fg.pt")
    proc = evaluate_run(run, tmp_path / "a", "--task", "fg", "--save_embeddings", emb, "--compare_untrained")
    assert proc.returncode == 0, proc.stderr
    a = results(str(tmp_path / "a"))
    assert a["task"] == "fg" and a["num_queries"] == 12 and a["num_gallery"] == 12
    assert a["fg"] == {"pairs": 12, "gallery_photos": 12, "sketches_without_photo": 0, "photos_without_sketch": 0}
    for gallery in ("gallery_all", "gallery_class"):
        assert set(a[gallery]) == {"acc@1", "acc@5"} and 0 <= a[gallery]["acc@1"] <= a[gallery]["acc@5"] <= 1
    assert a["gallery_all"]["acc@1"] <= a["gallery_class"]["acc@1"]  # fewer photos compete within the class
    assert a["chance"]["all"] == pytest.approx({"acc@1": 1 / 12, "acc@5": 5 / 12})
    assert a["chance"]["class"] == pytest.approx({"acc@1": 1 / 6, "acc@5": 5 / 6})  # 6 photos a class
    assert "all paired photos" in proc.stdout and "the query's class only" in proc.stdout
    assert set(a["untrained"]) == {"gallery_all", "gallery_class"} and "untrained network acc@1" in proc.stdout
    proc = run_main("evaluate.py", "--embeddings", emb, "--task", "fg", "--data_dir", run["data"],
                    "--output_dir", str(tmp_path / "b"))
    assert proc.returncode == 0, proc.stderr
    b = results(str(tmp_path / "b"))
    assert (a["gallery_all"], a["gallery_class"], a["fg"]) == (b["gallery_all"], b["gallery_class"], b["fg"])


def test_several_settings_in_one_call_give_each_single_calls_numbers(run, tmp_path):
    """--task zs gzs fg --hash_bits 0 16: six settings, each in its own sub-folder with the numbers a call of its
    own gives, a table of all six printed and in results.json, and one embeddings file per task. Each image is
    embedded once: gzs and fg take the unseen-class images zs embedded, so their embeddings come from other
    batches than a call of their own makes; they agree with that call's to the reordering bound, and the
    settings' numbers are those of their own embeddings files."""
    proc = evaluate_run(run, tmp_path / "all", "--task", "zs", "gzs", "fg", "--hash_bits", "0", "16",
                        "--save_embeddings", str(tmp_path / "emb.pt"))
    assert proc.returncode == 0, proc.stderr
    names = ["zs", "zs_16bit", "gzs", "gzs_16bit", "fg", "fg_16bit"]
    table = results(str(tmp_path / "all"))
    assert list(table["settings"]) == names and table["tasks"] == ["zs", "gzs", "fg"]
    for name in names:
        task, _, bits = name.partition("_")
        alone, hashing = tmp_path / f"alone_{name}", (["--hash_bits", bits[:-3]] if bits else [])
        one = (evaluate_run(run, alone, "--task", task, *hashing) if task == "zs" else
               run_main("evaluate.py", "--embeddings", str(tmp_path / f"emb_{task}.pt"), "--task", task, *hashing,
                        "--output_dir", str(alone)))
        assert one.returncode == 0, one.stderr
        a, b = results(str(tmp_path / "all" / name)), results(str(alone))
        keys = ("gallery_all", "gallery_class") if task == "fg" else ("protocols",)
        assert [a[k] for k in keys] == [b[k] for k in keys], name
        row = table["settings"][name]
        assert row["results"] == os.path.join(name, "results.json") and row["num_queries"] == a["num_queries"]
        assert row["acc@1" if task == "fg" else "map_all"] == (a["gallery_all"]["acc@1"] if task == "fg"
                                                                else a["protocols"]["standard"]["map_all"])
        line = next(x for x in proc.stdout.splitlines() if x.startswith(f"{name} "))
        assert f"{row['acc@1' if task == 'fg' else 'map_all']:9.4f}" in line
    assert_each_image_embedded_once(run, tmp_path, proc.stdout)
    for task in ("zs", "gzs", "fg"):  # each task's file evaluates again on its own
        again = run_main("evaluate.py", "--embeddings", str(tmp_path / f"emb_{task}.pt"), "--task", task,
                         "--output_dir", str(tmp_path / f"again_{task}"))
        assert again.returncode == 0, again.stderr
    proc = run_main("evaluate.py", "--embeddings", str(tmp_path / "emb_zs.pt"), "--task", "zs", "gzs")
    assert_one_line_error(proc, "an --embeddings file holds the images of one task", "not zs gzs")


def assert_each_image_embedded_once(run, tmp_path, stdout: str) -> None:
    """gzs and fg of one call reuse zs's rows (the same tensors) and say so; a call of their own embeds the same
    rows to within float32 reordering (other batches: other sums)."""
    saved = {t: torch.load(tmp_path / f"emb_{t}.pt", weights_only=False) for t in ("zs", "gzs", "fg")}
    row_of = {(side, p): e for side in ("query", "gallery")
              for p, e in zip(saved["zs"][f"{side}_paths"], saved["zs"]["queries" if side == "query" else "gallery"])}
    ckpt = torch.load(run["model"], map_location="cpu", weights_only=False)
    atol = reordering_rtol(utils.build_model(ckpt, run["model"], trained=True), 0) * U32 / U64
    for task in ("gzs", "fg"):
        mine = saved[task]
        shared = [(side, i, p) for side in ("query", "gallery") for i, p in enumerate(mine[f"{side}_paths"])
                  if (side, p) in row_of]
        assert shared and f"({len(shared)} of them embedded for an earlier --task)" in stdout, task
        for side, i, p in shared:
            assert torch.equal(mine["queries" if side == "query" else "gallery"][i], row_of[side, p])
        one = evaluate_run(run, tmp_path / f"own_{task}", "--task", task, "--save_embeddings",
                           str(tmp_path / f"own_{task}.pt"))
        assert one.returncode == 0, one.stderr
        own = torch.load(tmp_path / f"own_{task}.pt", weights_only=False)
        for key in ("queries", "gallery"):
            torch.testing.assert_close(mine[key], own[key], rtol=0, atol=atol)


def test_fg_on_a_dataset_without_pairs_is_one_line(run, tmp_path):
    plain = make_tiny_dataset(str(tmp_path / "plain"), per_class=3)
    proc = run_main("evaluate.py", "--model", run["model"], "--data_dir", plain, "--workers", "0", "--device",
                    "cpu", "--task", "fg", "--trained_labels", os.path.join(run["data"], "train_labels.txt"),
                    "--output_dir", str(tmp_path / "o"))
    assert_one_line_error(proc, "--task fg needs sketch-photo pairs", "none of its 6 evaluated sketches")


def test_cross_dataset_leaves_out_the_trained_classes(run, tmp_path):
    other = make_tiny_dataset(str(tmp_path / "other"), seen=("TRI", "hexa"), unseen=("circle", "star"),
                              per_class=3)
    emb = str(tmp_path / "cross.pt")
    proc = evaluate_run(run, tmp_path / "o", "--save_embeddings", emb, data=other)
    assert proc.returncode == 0, proc.stderr
    assert "cross-dataset: 2 class(es) share a name" in proc.stdout and "(TRI, hexa)" in proc.stdout
    out = results(str(tmp_path / "o"))
    assert out["cross_dataset"]["excluded"] == ["TRI", "hexa"] and out["cross_dataset"]["unseen"] == 2
    assert set(out["protocols"]["standard"]["per_class_ap"]) == {"circle", "star"}
    assert out["num_queries"] == 6
    # The saved file carries the training classes, so it is checked against the data and reproduces the run.
    proc = run_main("evaluate.py", "--embeddings", emb, "--data_dir", other, "--output_dir", str(tmp_path / "again"))
    assert proc.returncode == 0, proc.stderr
    assert "(TRI, hexa)" in proc.stdout
    again = results(str(tmp_path / "again"))
    assert (again["protocols"], again["cross_dataset"]) == (out["protocols"], out["cross_dataset"])


def test_the_training_dataset_under_another_path_is_an_ordinary_run(run, tmp_path):
    """A copy of the training data (moved, copied, or its relative path read from another folder) trains on the
    checkpoint's own classes: the classes decide, not the path, so it is evaluated as the original is."""
    copy = shutil.copytree(run["data"], str(tmp_path / "copy"))
    outs = []
    for data, out in ((run["data"], tmp_path / "a"), (copy, tmp_path / "b")):
        proc = evaluate_run(run, out, data=data)
        assert proc.returncode == 0, proc.stderr
        assert "cross-dataset" not in proc.stdout and "note:" not in proc.stdout
        outs.append(results(str(out)))
    assert "cross_dataset" not in outs[1] and outs[0]["protocols"] == outs[1]["protocols"]


def test_cross_dataset_bad_input_is_one_line(run, tmp_path):
    none_left = make_tiny_dataset(str(tmp_path / "none"), seen=("tri",), unseen=("Square",), per_class=2)
    proc = run_main("evaluate.py", "--model", run["model"], "--data_dir", none_left, "--workers", "0",
                    "--device", "cpu", "--output_dir", str(tmp_path / "o"))
    assert_one_line_error(proc, "no unseen class is left")
    # A checkpoint whose training data is gone cannot tell its classes: the data is taken for its own (moved)
    # dataset, said in one line, unless --trained_labels names the classes.
    ckpt = torch.load(run["model"], map_location="cpu", weights_only=False)
    ckpt["args"]["data_dir"] = str(tmp_path / "gone")
    del ckpt["classes"]  # as checkpoints written before train.py recorded them
    moved = str(tmp_path / "moved.pth")
    torch.save(ckpt, moved)
    other = make_tiny_dataset(str(tmp_path / "other"), seen=("TRI", "hexa"), unseen=("circle", "star"), per_class=2)
    proc = evaluate_run(run, tmp_path / "o2", model=moved, data=other)
    assert proc.returncode == 0, proc.stderr
    assert [line for line in proc.stdout.splitlines() if line.startswith("note:")] == [
        f"note: {other} is not the folder {moved} was trained on ({tmp_path / 'gone'}), whose classes the "
        f"checkpoint does not record and {tmp_path / 'gone' / 'train_labels.txt'} cannot tell: evaluating "
        f"{other}'s own unseen classes; for a cross-dataset run pass --trained_labels FILE (the classes it trained on)"]
    assert "cross_dataset" not in results(str(tmp_path / "o2"))
    proc = evaluate_run(run, tmp_path / "o3", "--trained_labels", os.path.join(run["data"], "train_labels.txt"),
                        model=moved, data=other)
    assert proc.returncode == 0, proc.stderr
    assert results(str(tmp_path / "o3"))["cross_dataset"]["excluded"] == ["TRI", "hexa"]
    shutil.rmtree(other)


def test_checkpoints_name_their_classes_so_a_moved_dataset_needs_no_trained_labels(run, tmp_path):
    """train.py records the seen classes it trained on; a cross-dataset run reads them from the checkpoint even
    when the training folder (and so its train_labels.txt) is gone; a wrong entry is one line."""
    ckpt = torch.load(run["model"], map_location="cpu", weights_only=False)
    assert ckpt["classes"] == ["tri", "square", "pent", "hexa"]  # make_tiny_dataset's seen classes, in order
    assert torch.load(os.path.join(os.path.dirname(run["model"]), "last.pth"), map_location="cpu",
                      weights_only=False)["classes"] == ckpt["classes"]
    ckpt["args"]["data_dir"] = str(tmp_path / "gone")
    moved = str(tmp_path / "moved.pth")
    torch.save(ckpt, moved)
    other = make_tiny_dataset(str(tmp_path / "other"), seen=("TRI", "hexa"), unseen=("circle", "star"), per_class=2)
    proc = evaluate_run(run, tmp_path / "o", model=moved, data=other)
    assert proc.returncode == 0, proc.stderr
    assert "note:" not in proc.stdout and "(TRI, hexa)" in proc.stdout
    out = results(str(tmp_path / "o"))
    assert out["cross_dataset"]["excluded"] == ["TRI", "hexa"] and out["cross_dataset"]["trained_classes"] == 4
    ckpt["classes"] = ["tri", 3]
    torch.save(ckpt, moved)
    proc = run_main("evaluate.py", "--model", moved, "--data_dir", other, "--workers", "0", "--device", "cpu",
                    "--output_dir", str(tmp_path / "o2"))
    assert_one_line_error(proc, f"{moved} is not a checkpoint written by train.py (wrong classes)")


@pytest.mark.parametrize("argv, fragments", [
    (["--task", "kfg"], ["unknown --task 'kfg'", "zs, gzs, fg"]),
    (["--task", "gzs", "--split", "val"], ["--task gzs evaluates the test split", "drop --split val"]),
    (["--task", "gzs", "--gzs_fraction", "0"], ["--gzs_fraction must be in (0, 1]"]),
    (["--task", "zs", "fg", "--split", "val"], ["--task fg evaluates the test split", "drop --split val"]),
    (["--hash_bits", "0", "12"], ["--hash_bits must be 0 (off) or a positive multiple of 8", "got 12"]),
])
def test_bad_task_arguments_are_one_line(argv, fragments, tmp_path):
    proc = run_main("evaluate.py", "--model", "m.pth", "--data_dir", str(tmp_path), *argv)
    assert_one_line_error(proc, *fragments)
