"""evaluate.py: every convention, saved embeddings, the val split, plots, and bad input."""
import importlib.util
import json
import math
import os
import shutil

import pytest
import torch

import evaluate
import metrics
import train
from conftest import ROOT, make_tiny_dataset, run_main
from test_train import TINY, assert_one_line_error


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A tiny trained model, and its evaluation with the embeddings saved."""
    root = tmp_path_factory.mktemp("evalrun")
    data = make_tiny_dataset(str(root / "data"), per_class=8)
    ckpt = str(root / "ckpt")
    train.main(train.get_args_parser().parse_args(["--data_dir", data, "--checkpoint_dir", ckpt, *TINY,
                                                   "--epochs", "1", "--val_fraction", "0.25"]))
    model, emb, out = os.path.join(ckpt, "best.pth"), str(root / "emb.pt"), str(root / "eval")
    proc = run_main("evaluate.py", "--model", model, "--data_dir", data, "--workers", "0", "--device", "cpu",
                    "--num_sketches", "2", "--save_embeddings", emb, "--output_dir", out)
    assert proc.returncode == 0, proc.stderr
    return {"data": data, "model": model, "emb": emb, "out": out, "stdout": proc.stdout, "root": root}


def results(folder):
    with open(os.path.join(folder, "results.json")) as f:
        return json.load(f)


def no_nan(obj) -> bool:
    if isinstance(obj, float):
        return not math.isnan(obj)
    if isinstance(obj, dict):
        return all(no_nan(v) for v in obj.values())
    if isinstance(obj, list):
        return all(no_nan(v) for v in obj)
    return True


def test_all_protocols_table_results_and_plots(run):
    out = results(run["out"])
    assert list(out["protocols"]) == list(metrics.PROTOCOLS)
    for name, res in out["protocols"].items():
        assert 0 < res["map_all"] <= 1 and 0 < res["p@100"] <= 1, name
        assert set(res["per_class_ap"]) == {"circle", "star"}, name
        assert ("map@200" in res) == (name != "doodle2search"), name
    # The table has a row per convention, "-" where a convention defines no mAP@200.
    lines = run["stdout"].splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("protocol"))
    rows = {line.split()[0]: line.split()[1:] for line in lines[header + 1:header + 6]}
    assert list(rows) == list(metrics.PROTOCOLS)
    assert rows["doodle2search"][2] == "-"
    assert float(rows["standard"][0]) == pytest.approx(out["protocols"]["standard"]["map_all"], abs=5e-5)
    assert out["map_all"] == out["protocols"]["standard"]["map_all"]  # headline numbers: standard
    # With at most 8 photos per class, P@100 under doodle2search (divided by min(R, K) = R) is recall: 1.
    assert out["protocols"]["doodle2search"]["p@100"] == pytest.approx(1.0)
    assert out["throughput_images_per_s"] > 0 and out["num_queries"] == 16 and out["num_gallery"] == 16
    curve = out["pr_curve"]
    assert len(curve["recall"]) == 101 and curve["recall"][0] == 0 and curve["recall"][-1] == 1
    assert all(a >= b - 1e-12 for a, b in zip(curve["precision"], curve["precision"][1:]))  # interpolated
    for png in ("pr_curve.png", "per_class_ap.png"):
        with open(os.path.join(run["out"], png), "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n", png
    assert len(out["grids"]) == 2


def test_saved_embeddings_reproduce_the_metrics_exactly(run, tmp_path):
    proc = run_main("evaluate.py", "--embeddings", run["emb"], "--data", run["data"], "--model", run["model"],
                    "--output_dir", str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    a, b = results(run["out"]), results(str(tmp_path))
    assert a["protocols"] == b["protocols"] and a["pr_curve"] == b["pr_curve"]
    assert a["chance_map_all"] == b["chance_map_all"] and a["throughput_images_per_s"] == b["throughput_images_per_s"]
    proc = run_main("evaluate.py", "--embeddings", run["emb"], "--protocol", "zse-sbir", "--output_dir",
                      str(tmp_path / "one"))  # no model, no data: just the file
    assert proc.returncode == 0, proc.stderr
    c = results(str(tmp_path / "one"))
    assert list(c["protocols"]) == ["zse-sbir"] and c["protocols"]["zse-sbir"] == a["protocols"]["zse-sbir"]
    saved = torch.load(run["emb"], weights_only=True)
    assert saved["classes"] == ["circle", "star"] and saved["queries"].shape == (16, 16)
    assert all(not os.path.isabs(p) for p in saved["query_paths"] + saved["gallery_paths"])


def test_val_split_uses_the_seen_class_hold_out(run, tmp_path):
    evaluate.main(evaluate.get_args_parser().parse_args([
        "--model", run["model"], "--data", run["data"], "--split", "val", "--workers", "0", "--device", "cpu",
        "--protocol", "standard", "--num_sketches", "0", "--output_dir", str(tmp_path)]))
    out = results(str(tmp_path))
    assert out["split"] == "val" and set(out["per_class_ap"]) == {"tri", "square", "pent", "hexa"}
    assert out["num_queries"] == 8 and out["num_gallery"] == 8  # 25% of 8 images per seen class and domain
    assert list(out["protocols"]) == ["standard"]


# ----------------------------------------------------------------------------------- bad input

def test_cli_unknown_protocol(run):
    proc = run_main("evaluate.py", "--embeddings", run["emb"], "--protocol", "voc")
    assert_one_line_error(proc, "unknown --protocol 'voc'", "standard, sake, sem-pcyc, doodle2search, zse-sbir")


def test_cli_embeddings_of_another_dataset(run, tmp_path):
    other = make_tiny_dataset(str(tmp_path / "other"), unseen=("circle", "moon"))
    proc = run_main("evaluate.py", "--embeddings", run["emb"], "--data", other)
    assert_one_line_error(proc, "another dataset or split", "--save_embeddings")
    proc = run_main("evaluate.py", "--embeddings", run["emb"], "--split", "val")
    assert_one_line_error(proc, "holds the test split, not --split val")


def test_cli_embeddings_of_another_model_or_with_mismatched_dimensions(run, tmp_path):
    saved = torch.load(run["emb"], weights_only=True)
    saved["model"]["embedding_dim"] = 32
    torch.save(saved, tmp_path / "dim.pt")
    proc = run_main("evaluate.py", "--embeddings", str(tmp_path / "dim.pt"), "--model", run["model"])
    assert_one_line_error(proc, "32-d", "16-d")
    saved = torch.load(run["emb"], weights_only=True)
    saved["gallery"] = saved["gallery"][:, :8]
    torch.save(saved, tmp_path / "cut.pt")
    proc = run_main("evaluate.py", "--embeddings", str(tmp_path / "cut.pt"))
    assert_one_line_error(proc, "(16, 16)", "(16, 8)", "same dimension")
    (tmp_path / "junk.pt").write_bytes(b"not a torch file")
    proc = run_main("evaluate.py", "--embeddings", str(tmp_path / "junk.pt"))
    assert_one_line_error(proc, "is not a readable embeddings file")


def test_cli_empty_gallery(run, tmp_path):
    saved = torch.load(run["emb"], weights_only=True)
    saved.update(gallery=saved["gallery"][:0], gallery_labels=saved["gallery_labels"][:0], gallery_paths=[])
    torch.save(saved, tmp_path / "empty.pt")
    proc = run_main("evaluate.py", "--embeddings", str(tmp_path / "empty.pt"), "--output_dir", str(tmp_path / "o"))
    assert_one_line_error(proc, "the gallery is empty")


def test_query_class_without_photos_is_reported_and_left_out(run, tmp_path):
    saved = torch.load(run["emb"], weights_only=True)
    keep = saved["gallery_labels"] != 1  # no photo of "star"
    saved.update(gallery=saved["gallery"][keep], gallery_labels=saved["gallery_labels"][keep],
                 gallery_paths=[p for p, k in zip(saved["gallery_paths"], keep.tolist()) if k])
    torch.save(saved, tmp_path / "nostar.pt")
    proc = run_main("evaluate.py", "--embeddings", str(tmp_path / "nostar.pt"), "--output_dir", str(tmp_path / "o"))
    assert proc.returncode == 0, proc.stderr
    assert "warning: 8 query sketch(es) of 1 class(es) with no photo in the gallery (star)" in proc.stdout
    out = results(str(tmp_path / "o"))
    assert out["classes_without_photos"] == ["star"] and out["num_queries_without_relevant"] == 8
    assert out["num_queries"] == 8 and no_nan(out)
    for res in out["protocols"].values():
        assert set(res["per_class_ap"]) == {"circle"}
        assert res["map_all"] == pytest.approx(1.0)  # only circles are left in the gallery
    with open(os.path.join(tmp_path / "o", "results.json")) as f:
        assert "NaN" not in f.read()


def test_cli_needs_a_model_or_embeddings(tmp_path):
    proc = run_main("evaluate.py", "--data_dir", str(tmp_path))
    assert_one_line_error(proc, "pass --model and --data_dir")
    proc = run_main("evaluate.py", "--embeddings", str(tmp_path / "none.pt"))
    assert_one_line_error(proc, "none.pt not found")


def write_split(data: str, name: str, train: list, test: list) -> None:
    """DATA/splits/NAME with these training and test classes."""
    folder = os.path.join(data, "splits", name)
    os.makedirs(folder, exist_ok=True)
    for file, classes in (("train_labels.txt", train), ("test_labels.txt", test)):
        with open(os.path.join(folder, file), "w") as f:
            f.write("\n".join(classes) + "\n")


def test_class_split_selects_a_named_split_and_split_means_which_images(run, tmp_path):
    write_split(run["data"], "alt", ["tri", "square", "pent", "hexa", "circle"], ["star"])
    evaluate.main(evaluate.get_args_parser().parse_args([
        "--model", run["model"], "--data", run["data"], "--class_split", "alt", "--workers", "0", "--device", "cpu",
        "--protocol", "standard", "--num_sketches", "0", "--output_dir", str(tmp_path)]))
    out = results(str(tmp_path))
    assert out["split"] == "test" and out["class_split"] == "alt" and out["num_queries"] == 8
    assert set(out["per_class_ap"]) == {"star"}
    proc = run_main("evaluate.py", "--model", run["model"], "--data", run["data"], "--split", "alt")
    assert_one_line_error(proc, "--split takes test or val", "--class_split alt")


def test_a_class_split_whose_test_classes_the_model_trained_on_is_refused(run, tmp_path):
    """Zero-shot leakage: a named split (or edited label files) whose test classes are among the checkpoint's
    training classes would be scored as unseen classes without a word."""
    write_split(run["data"], "leaky", ["pent", "hexa", "circle", "star"], ["tri", "square"])
    for task in ("zs", "gzs", "fg"):
        proc = run_main("evaluate.py", "--model", run["model"], "--data", run["data"], "--class_split", "leaky",
                        "--task", task, "--device", "cpu", "--output_dir", str(tmp_path / task))
        assert_one_line_error(proc, "2 of the 2 test classes of --class_split leaky are classes", "(tri, square)",
                              "would not be zero-shot", "(no --class_split)")
        assert not os.path.exists(tmp_path / task / "results.json")


def test_embeddings_are_credited_only_to_the_model_that_made_them(run, tmp_path):
    """--embeddings A with --model B once wrote B into results.json for A's numbers."""
    other = torch.load(run["model"], weights_only=False, map_location="cpu")
    name, state = next(iter(other["models"].items()))
    key = next(k for k, v in state.items() if v.is_floating_point())
    state[key] = state[key] + 1e-3  # another model of the same network, epoch and step
    torch.save(other, tmp_path / "other.pth")
    proc = run_main("evaluate.py", "--embeddings", run["emb"], "--model", str(tmp_path / "other.pth"),
                    "--output_dir", str(tmp_path / "o"))
    assert_one_line_error(proc, f"was embedded by {os.path.abspath(run['model'])}", "other weights",
                          "credited to the wrong model", "leave out --model")
    assert not os.path.exists(tmp_path / "o" / "results.json")
    shutil.copy(run["model"], tmp_path / "copy.pth")  # the same weights under another name are the same model
    proc = run_main("evaluate.py", "--embeddings", run["emb"], "--model", str(tmp_path / "copy.pth"),
                    "--output_dir", str(tmp_path / "c"))
    assert proc.returncode == 0, proc.stderr
    assert results(str(tmp_path / "c"))["model"] == str(tmp_path / "copy.pth")


def test_an_earlier_evaluations_grids_do_not_stay_beside_a_new_one(run, tmp_path):
    out = str(tmp_path / "o")
    shutil.copytree(run["out"], out)
    assert len(results(out)["grids"]) == 2
    proc = run_main("evaluate.py", "--embeddings", run["emb"], "--output_dir", out)
    assert proc.returncode == 0, proc.stderr
    assert f"removed an earlier evaluation's 5 output file(s) from {out}" in proc.stdout  # 3 files and 2 grids
    assert results(out)["grids"] == [] and not [f for f in os.listdir(out) if f.startswith("grid_")]
    # several settings, then one: the first run's setting folders do not stay beside the second's results
    proc = run_main("evaluate.py", "--embeddings", run["emb"], "--hash_bits", "0", "16", "--output_dir", out)
    assert proc.returncode == 0 and os.path.isfile(os.path.join(out, "zs_16bit", "results.json")), proc.stderr
    proc = run_main("evaluate.py", "--embeddings", run["emb"], "--output_dir", out)
    assert proc.returncode == 0 and "(setting folders zs, zs_16bit)" in proc.stdout, proc.stderr
    assert sorted(os.listdir(out)) == ["per_class_ap.png", "pr_curve.png", "results.json"]
    # a run refused before it writes leaves the earlier outputs alone
    proc = run_main("evaluate.py", "--embeddings", run["emb"], "--output_dir", out, "--split", "val")
    assert proc.returncode == 2 and sorted(os.listdir(out)) == ["per_class_ap.png", "pr_curve.png", "results.json"]


def test_data_dir_and_its_older_name_data_are_one_flag():
    parser = evaluate.get_args_parser()
    assert parser.parse_args(["--data_dir", "d1"]).data_dir == "d1"
    assert parser.parse_args(["--data", "d2"]).data_dir == "d2"
    assert not hasattr(parser.parse_args(["--data", "d2"]), "data")  # one setting, not two
    assert "--data_dir DATA_DIR, --data DATA_DIR" in parser.format_help()


def bench_module(name: str):
    """bench/<name>.py as a module (the bench scripts are not a package)."""
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "bench", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def bench_parser(name: str):
    """The argument parser of bench/<name>.py."""
    return bench_module(name).get_args_parser()


def test_bench_recipes_reports_no_figure_for_a_run_that_stopped_short_or_is_not_its_own(tmp_path):
    """A train.py stopped by SIGTERM exits 0 with a checkpoint; its model must not be evaluated as the work asked
    for. A folder holding a run without results (another bench's, running or stopped) is refused before its log
    is touched."""
    bench = bench_module("bench_recipes")
    parse = bench.get_args_parser().parse_args
    budget = parse(["--budget_tflops", "73"])
    assert bench.unfinished({"work": {"flops": 73.001e12}, "epoch": 99, "seconds": 60.0}, budget) == ""
    assert bench.unfinished({"work": {"flops": 12.8e12}, "epoch": 8, "seconds": 60.0}, budget).endswith(
        "of --budget_tflops 73")
    assert bench.unfinished({"work": {"flops": 1e12}, "epoch": 8, "seconds": 60.0}, parse(["--epochs", "9"]))
    assert not bench.unfinished({"work": {"flops": 1e12}, "epoch": 9, "seconds": 60.0}, parse(["--epochs", "9"]))
    args = parse(["--budget_tflops", "73", "--output_dir", str(tmp_path), "--data_dir", "data/demo"])
    folder = tmp_path / "demo" / "t73" / "default" / "seed0"
    folder.mkdir(parents=True)
    (folder / "args.json").write_text("{}")
    (folder / "train.log").write_text("the other run's log")
    with pytest.raises(SystemExit, match="holds a run without results"):
        bench.train_and_evaluate(args, "default", 0, untrained=False)
    assert (folder / "train.log").read_text() == "the other run's log"


def test_bench_recipes_output_dir_and_its_older_name_out_dir_are_one_flag():
    parser = bench_parser("bench_recipes")
    assert parser.parse_args(["--output_dir", "o1"]).output_dir == "o1"
    assert parser.parse_args(["--out_dir", "o2"]).output_dir == "o2"
    assert not hasattr(parser.parse_args(["--out_dir", "o2"]), "out_dir")  # one setting, not two
    assert "--output_dir OUTPUT_DIR, --out_dir OUTPUT_DIR" in parser.format_help()
