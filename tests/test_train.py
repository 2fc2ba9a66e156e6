"""train.py and evaluate.py end to end on tiny data: outputs, resume, and bad input."""
import json
import math
import os
import re
import shutil
import signal

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import evaluate
import methods
import train
import utils
from conftest import make_tiny_dataset, run_main

# A small trunk: 1.9M weights in the two branches, 24 MB checkpoints with AdamW's moments (resnet18's: 270 MB).
TINY = ["--recipe", "original", "--backbone", "mobilenet_v3_small", "--no-pretrained", "--image_size", "32",
        "--embedding_dim", "16", "--batch_size", "4", "--workers", "0", "--device", "cpu", "--print_every", "2",
        "--lr", "1e-3"]


def train_args(data, ckpt, *extra):
    """The original recipe's arguments on tiny data, resolved as train.main resolves them."""
    args = train.get_args_parser().parse_args(["--data_dir", data, "--checkpoint_dir", ckpt, *TINY, *extra])
    train.apply_recipe(args)
    return args


def eval_args(model, data, *extra):
    return evaluate.get_args_parser().parse_args(["--model", model, "--data", data, "--workers", "0", "--device", "cpu",
                                                  *extra])


def assert_one_line_error(proc, *fragments):
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One tiny 2-epoch training run shared by the tests that only read its outputs."""
    root = tmp_path_factory.mktemp("run")
    data = make_tiny_dataset(str(root / "data"))
    ckpt = str(root / "ckpt")
    train.main(train_args(data, ckpt, "--epochs", "2", "--grl_threshold_epoch", "1"))
    return data, ckpt


def test_training_writes_checkpoints_logs_and_curves(trained):
    data, ckpt = trained
    for name in ("best.pth", "last.pth", "log.jsonl", "curves.png", "args.json"):
        assert os.path.getsize(os.path.join(ckpt, name)) > 0, name
    last = utils.load_checkpoint(os.path.join(ckpt, "last.pth"))
    assert last["epoch"] == 2 and last["step"] == 2 * 5  # 20 training sketches / batch 4 = 5 steps
    assert last["args"]["backbone"] == "mobilenet_v3_small" and set(last["models"]) == {
        "sketch_encoder", "photo_encoder", "domain_classifier"}
    records = utils.read_jsonl(os.path.join(ckpt, "log.jsonl"))
    steps = [r for r in records if r["kind"] == "step"]
    epochs = [r for r in records if r["kind"] == "epoch"]
    assert [r["step"] for r in steps] == [2, 4, 6, 8, 10] and len(epochs) == 2
    assert all(r["lambda"] == 0.0 for r in steps if r["step"] <= 5)  # before --grl_threshold_epoch 1
    assert steps[-1]["lambda"] > 0.9
    assert all(0 <= r["val_map"] <= 1 for r in epochs)
    assert {"triplet", "domain", "domain_acc", "lr"} <= set(steps[0])
    # The work done, in units that travel: 10 steps of 4 triplets (3 images each); every step has one shape,
    # so the FLOPs are 10 times one step's, which is what FlopCounterMode counts around the same step here.
    assert last["work"]["steps"] == 10 and last["work"]["images"] == 10 * 4 * 3
    assert [r["images"] for r in steps] == [2 * 12, 4 * 12, 6 * 12, 8 * 12, 10 * 12]
    model = utils.build_model(last, "last.pth", trained=True).train()
    args = train_args(data, ckpt)
    batch = [torch.rand(4, 3, 32, 32) for _ in range(3)] + [torch.tensor([0, 1, 2, 3]), torch.tensor([1, 2, 3, 0])]
    optimizer = torch.optim.AdamW(model.parameters())
    with FlopCounterMode(display=False) as counter:
        train.train_step(train.TrainingLosses(model), optimizer, torch.amp.GradScaler("cpu", enabled=False), batch,
                         0.5, 1e-3, args, None)
    assert last["work"]["flops"] == 10 * counter.get_total_flops() > 0
    assert [r["flops"] for r in epochs] == [5 * counter.get_total_flops(), 10 * counter.get_total_flops()]
    assert not [f for f in os.listdir(ckpt) if f.endswith(".tmp")]  # no temp file left behind


def test_work_counts_each_batch_shape_once_and_flops_as_the_arithmetic_gives():
    """A linear layer y = x W^T of (B, 8) -> (B, 4): forward 2 B 8 4 FLOPs, backward as many again for the
    weight's gradient (the input needs none), so a step is 4 B 32; a shape seen before is not counted again."""
    layer = torch.nn.Linear(8, 4, bias=False)
    counted = []

    def run(x):
        counted.append(len(x))
        layer(x).sum().backward()
        return {}
    work = train.Work()
    for b in (5, 5, 3, 5):
        x = torch.rand(b, 8)
        work.step(lambda: run(x), [x, torch.zeros(b, dtype=torch.long)])
    assert work.to_dict() == {"steps": 4, "images": 18, "flops": 4 * 32 * (5 + 5 + 3 + 5)}
    assert set(work.flops_by_shape) == {((5, 8),), ((3, 8),)} and counted == [5, 5, 3, 5]
    assert [utils.flops_text(f) for f in (2304, 7.861e12, 7.24e16)] == ["2,304 FLOP", "7.86 TFLOP", "72.4 PFLOP"]


def test_evaluate_end_to_end(trained, tmp_path):
    data, ckpt = trained
    out = str(tmp_path / "eval")
    evaluate.main(eval_args(os.path.join(ckpt, "best.pth"), data, "--output_dir", out, "--num_sketches", "3",
                            "--num_images", "4", "--compare_untrained"))
    res = json.load(open(os.path.join(out, "results.json")))
    for key in ("map_all", "p@100", "map@200", "p@200", "chance_map_all"):
        assert 0 <= res[key] <= 1, key
    assert set(res["per_class_ap"]) == {"circle", "star"}
    assert res["num_queries"] == 12 and res["num_gallery"] == 12
    assert res["untrained"]["map_all"] != res["map_all"]
    assert len(res["grids"]) == 3 and all(os.path.getsize(g) > 1000 for g in res["grids"])


def test_untrained_baseline_is_the_training_initialisation(trained, tmp_path):
    """evaluate --compare_untrained rebuilds exactly the network train.py started from."""
    data, _ = trained
    ckpt = str(tmp_path / "ck")
    args = train_args(data, ckpt, "--epochs", "1", "--lr", "1e-12", "--weight_decay", "0", "--val_fraction", "0",
                      "--class_loss_ratio", "1")
    train.main(args)
    saved = utils.load_checkpoint(os.path.join(ckpt, "last.pth"))
    rebuilt = utils.build_model(saved, "x", trained=False)
    # Adam moves a weight by at most lr (1 - beta1) / sqrt(1 - beta2) a step (Kingma & Ba 2015, section
    # 2.1), and rounding the result to float32 at most doubles that: the only difference allowed.
    beta1, beta2 = saved["optimizers"]["adamw"]["param_groups"][0]["betas"]
    moved = 2 * saved["step"] * 1e-12 * max(1.0, (1 - beta1) / math.sqrt(1 - beta2))
    for name, module in rebuilt.named_children():
        for key, value in module.state_dict().items():
            if value.is_floating_point() and "running" not in key:
                torch.testing.assert_close(value, saved["models"][name][key], atol=moved, rtol=0)


def test_resume_continues_at_the_right_epoch_with_the_optimizer_state(trained, tmp_path):
    """The shared 2-epoch run, continued to 3 epochs in a copy of its folder."""
    data, ckpt = trained
    resumed = str(tmp_path / "resumed")
    shutil.copytree(ckpt, resumed)
    common = ["--grl_threshold_epoch", "1"]
    first = utils.load_checkpoint(os.path.join(resumed, "last.pth"))
    train.main(train_args(data, resumed, *common, "--epochs", "3", "--resume", os.path.join(resumed, "last.pth")))
    b = utils.load_checkpoint(os.path.join(resumed, "last.pth"))
    assert first["epoch"] == 2 and first["step"] == 10
    assert b["epoch"] == 3 and b["step"] == 15
    # AdamW's per-parameter step counter and moments carried over: a fresh optimizer would be at 5 steps
    assert {float(s["step"]) for s in b["optimizers"]["adamw"]["state"].values()} == {15.0}
    epochs = [r["epoch"] for r in utils.read_jsonl(os.path.join(resumed, "log.jsonl")) if r["kind"] == "epoch"]
    assert epochs == [1, 2, 3]
    # resuming a finished run trains nothing and leaves its checkpoint alone
    before = os.path.getmtime(os.path.join(resumed, "last.pth"))
    train.main(train_args(data, resumed, *common, "--epochs", "3", "--resume", os.path.join(resumed, "last.pth")))
    assert os.path.getmtime(os.path.join(resumed, "last.pth")) == before


def train_with_sigterm_in_step_3(monkeypatch, data: str, ckpt: str, *extra: str, args_of=None) -> None:
    """train.main with SIGTERM arriving while step 2 (0-based) is being prepared (its learning rate looked up)."""
    real = methods.SBIR.lr_at
    calls = [0]

    def lr_at_then_sigterm(*a):
        calls[0] += 1
        if calls[0] == 3:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(*a)
    monkeypatch.setattr(methods.SBIR, "lr_at", lr_at_then_sigterm)
    try:
        train.main((args_of or train_args)(data, ckpt, *extra))
    finally:
        monkeypatch.setattr(methods.SBIR, "lr_at", real)


@pytest.mark.parametrize("workers", ["0", "1"])
def test_sigterm_mid_epoch_then_resume_matches_a_straight_run(trained, tmp_path, monkeypatch, workers):
    """SIGTERM in the middle of epoch 1 saves last.pth at that step; --resume continues exactly. The straight
    run is the shared one (these arguments with --workers 0; a loader process changes no bit, as
    test_the_disk_cache_and_the_loader_processes_train_exactly_as_decoding_in_this_process checks)."""
    tiny_data, straight = trained
    common = ["--epochs", "2", "--grl_threshold_epoch", "1", "--workers", workers]
    stopped = str(tmp_path / "stopped")

    train_with_sigterm_in_step_3(monkeypatch, tiny_data, stopped, *common)
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handler is gone after the run
    mid = utils.load_checkpoint(os.path.join(stopped, "last.pth"))
    assert (mid["epoch"], mid["epoch_step"], mid["step"]) == (0, 3, 3)  # finished the step, then stopped
    assert not os.path.exists(os.path.join(stopped, "best.pth"))  # no epoch was validated yet

    train.main(train_args(tiny_data, stopped, *common, "--resume", os.path.join(stopped, "last.pth")))
    a = utils.load_checkpoint(os.path.join(straight, "last.pth"))
    b = utils.load_checkpoint(os.path.join(stopped, "last.pth"))
    # the same arithmetic in the same order on the same machine: the same bits
    assert (b["epoch"], b["step"], b["epoch_step"]) == (2, 10, 0) and b["best"] == a["best"]
    for name, state in a["models"].items():
        for key, value in state.items():
            if value.is_floating_point():
                assert torch.equal(b["models"][name][key], value), f"{name}.{key}"
    epochs = [r for r in utils.read_jsonl(os.path.join(stopped, "log.jsonl")) if r["kind"] == "epoch"]
    reference = [r for r in utils.read_jsonl(os.path.join(straight, "log.jsonl")) if r["kind"] == "epoch"]
    assert [r["triplet"] for r in epochs] == [r["triplet"] for r in reference]
    assert b["work"] == a["work"] and b["work"]["steps"] == 10  # the work done carries over too


# ----------------------------------------------------------------------------------- bad input

def test_cli_missing_data_folder(tmp_path):
    proc = run_main("train.py", "--data_dir", str(tmp_path / "missing"), "--checkpoint_dir", str(tmp_path / "c"), *TINY)
    assert_one_line_error(proc, "does not exist", "download_data.sh")


def test_cli_missing_label_file(tmp_path):
    data = make_tiny_dataset(str(tmp_path / "data"))
    os.remove(os.path.join(data, "train_labels.txt"))
    proc = run_main("train.py", "--data_dir", data, "--checkpoint_dir", str(tmp_path / "c"), *TINY)
    assert_one_line_error(proc, "train_labels.txt not found")


def test_cli_class_without_folder(tmp_path):
    data = make_tiny_dataset(str(tmp_path / "data"))
    with open(os.path.join(data, "train_labels.txt"), "a") as f:
        f.write("unicorn\n")
    proc = run_main("train.py", "--data_dir", data, "--checkpoint_dir", str(tmp_path / "c"), *TINY)
    assert_one_line_error(proc, "'unicorn'", "does not exist")


def test_cli_class_in_both_label_files(tmp_path):
    data = make_tiny_dataset(str(tmp_path / "data"))
    with open(os.path.join(data, "test_labels.txt"), "a") as f:
        f.write("square\n")
    proc = run_main("evaluate.py", "--model", "whatever.pth", "--data", data)
    assert_one_line_error(proc, "checkpoint whatever.pth not found")  # the model is checked first
    proc = run_main("train.py", "--data_dir", data, "--checkpoint_dir", str(tmp_path / "c"), *TINY)
    assert_one_line_error(proc, "'square' is in both")


def test_cli_empty_class_folder(tmp_path):
    data = make_tiny_dataset(str(tmp_path / "data"))
    folder = os.path.join(data, "photos", "pent")
    for f in os.listdir(folder):
        os.remove(os.path.join(folder, f))
    proc = run_main("train.py", "--data_dir", data, "--checkpoint_dir", str(tmp_path / "c"), *TINY)
    assert_one_line_error(proc, "photos/pent holds no readable image")


@pytest.mark.parametrize("flag,value,fragment", [("--epochs", "0", "--epochs must be at least 1"),
                                                 ("--batch_size", "-4", "--batch_size must be at least 1")])
def test_cli_bad_numbers(tmp_path, flag, value, fragment):
    proc = run_main("train.py", "--data_dir", str(tmp_path), "--checkpoint_dir", str(tmp_path / "c"), *TINY,
                    flag, value)
    assert_one_line_error(proc, fragment)
    assert not os.path.exists(tmp_path / "c")  # nothing was created


def test_cli_corrupt_image_is_skipped_with_a_warning(trained, tmp_path):
    _, ckpt = trained
    data = make_tiny_dataset(str(tmp_path / "data"))
    with open(os.path.join(data, "photos", "circle", "corrupt.jpg"), "wb") as f:
        f.write(b"\xff\xd8\xff\xe0 this is not really a jpeg")
    proc = run_main("evaluate.py", "--model", os.path.join(ckpt, "last.pth"), "--data", data, "--workers", "0",
                    "--device", "cpu", "--num_sketches", "1", "--output_dir", str(tmp_path / "e"))
    assert proc.returncode == 0, proc.stderr
    assert "warning: skipped 1 unreadable image file(s)" in proc.stdout and "corrupt.jpg" in proc.stdout
    assert "12 gallery photos" in proc.stdout


def test_cli_checkpoint_of_another_backbone(trained, tmp_path):
    data, ckpt = trained
    last = os.path.join(ckpt, "last.pth")
    args = [a if a != "mobilenet_v3_small" else "shufflenet_v2_x1_0" for a in TINY]
    proc = run_main("train.py", "--data_dir", data, "--checkpoint_dir", str(tmp_path / "c"), *args,
                    "--epochs", "3", "--resume", last)
    assert_one_line_error(proc, "--backbone mobilenet_v3_small", "--backbone shufflenet_v2_x1_0")
    # a checkpoint whose weights do not fit the backbone its arguments name
    bad = utils.load_checkpoint(last)
    bad["model"]["backbone"] = "resnet34"  # the model entry describes the network (its format 1)
    utils.save_checkpoint(bad, str(tmp_path / "bad.pth"))
    proc = run_main("evaluate.py", "--model", str(tmp_path / "bad.pth"), "--data", data)
    assert_one_line_error(proc, "do not fit a resnet34 model")


def test_cli_file_that_is_not_a_checkpoint(trained, tmp_path):
    data, _ = trained
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"definitely not a torch file")
    proc = run_main("evaluate.py", "--model", str(junk), "--data", data)
    assert_one_line_error(proc, "is not a readable checkpoint")
    torch.save({"weights": torch.ones(2)}, tmp_path / "other.pth")
    proc = run_main("evaluate.py", "--model", str(tmp_path / "other.pth"), "--data", data)
    assert_one_line_error(proc, "is not a checkpoint written by train.py")


def test_a_failed_save_keeps_the_previous_checkpoint(tmp_path):
    path = str(tmp_path / "last.pth")
    utils.save_checkpoint({"good": torch.ones(3)}, path)

    class Boom:
        def __reduce__(self):
            raise RuntimeError("disk full")
    with pytest.raises(RuntimeError):
        utils.save_checkpoint({"bad": Boom()}, path)
    assert torch.equal(torch.load(path)["good"], torch.ones(3))
    assert os.listdir(tmp_path) == ["last.pth"]


@pytest.mark.parametrize("links", [True, False])
def test_best_pth_is_the_epochs_checkpoint_linked_and_keeps_it_when_last_pth_moves_on(tmp_path, monkeypatch, links):
    """train.py writes an improving epoch's checkpoint once, as last.pth, and links best.pth to it (a copy where
    the file system has no hard links); last.pth's next write leaves best.pth as it was."""
    if not links:
        monkeypatch.setattr(os, "link", lambda *a: (_ for _ in ()).throw(OSError("no hard links here")))
    last, best = str(tmp_path / "last.pth"), str(tmp_path / "best.pth")
    utils.save_checkpoint({"epoch": 1}, best)
    utils.save_checkpoint({"epoch": 2}, last)
    utils.atomic_link(last, best)
    assert os.path.samefile(last, best) is links and torch.load(best)["epoch"] == 2
    utils.save_checkpoint({"epoch": 3}, last)
    assert torch.load(best)["epoch"] == 2 and torch.load(last)["epoch"] == 3
    assert sorted(os.listdir(tmp_path)) == ["best.pth", "last.pth"]


# ----------------------------------------------------------------------------------- data pipeline and loop

def test_the_disk_cache_and_the_loader_processes_train_exactly_as_decoding_in_this_process(tiny_data, tmp_path):
    """The same uint8 images, whether decoded here, by a worker or read from the disk cache: the same weights.
    Batches of 10: the epoch's 20 triplets in 2 steps."""
    plain = str(tmp_path / "plain")
    train.main(train_args(tiny_data, plain, "--epochs", "1", "--cache_gb", "0", "--batch_size", "10"))
    cached, cache = str(tmp_path / "cached"), str(tmp_path / "cache")
    proc = run_main("train.py", "--data_dir", tiny_data, "--checkpoint_dir", cached, *TINY, "--epochs", "1",
                    "--cache_gb", "0", "--disk_cache", "--cache_dir", cache, "--workers", "1", "--batch_size", "10")
    assert proc.returncode == 0, proc.stderr
    n = int(re.search(r"images: (\d+) at 32px", proc.stdout).group(1))
    assert f"{n} images added, 0 kept" in proc.stdout and f"{n} from the disk cache, 1 loader processes" in proc.stdout
    a, b = (utils.load_checkpoint(os.path.join(d, "last.pth")) for d in (plain, cached))
    for name in a["models"]:
        for k, v in a["models"][name].items():
            assert torch.equal(v, b["models"][name][k]), (name, k)
    again = run_main("train.py", "--data_dir", tiny_data, "--checkpoint_dir", str(tmp_path / "again"), *TINY,
                     "--epochs", "1", "--disk_cache", "--cache_dir", cache, "--batch_size", "10")
    assert f"0 images added, {n} kept" in again.stdout and "held in memory" in again.stdout


def test_validation_every_n_epochs_and_after_the_last(tiny_data, tmp_path):
    ckpt = str(tmp_path / "ckpt")
    train.main(train_args(tiny_data, ckpt, "--epochs", "3", "--val_every", "2", "--batch_size", "10"))  # 2 steps each
    epochs = [r for r in utils.read_jsonl(os.path.join(ckpt, "log.jsonl")) if r["kind"] == "epoch"]
    assert [r["val_map"] is None for r in epochs] == [True, False, False]
    assert utils.load_checkpoint(os.path.join(ckpt, "best.pth"))["epoch"] in (2, 3)
    assert os.path.isfile(os.path.join(ckpt, "curves.png"))


def test_defaults_resolved_for_this_machine(tiny_data, tmp_path):
    """--workers defaults to the CPUs this process may use; channels_last is off on the CPU."""
    ckpt = str(tmp_path / "ckpt")
    args = train.get_args_parser().parse_args(["--data_dir", tiny_data, "--checkpoint_dir", ckpt, "--epochs", "1",
                                               "--no-pretrained", "--batch_size", "8", "--device", "cpu"])
    train.main(args)
    saved = json.load(open(os.path.join(ckpt, "args.json")))["args"]
    assert saved["workers"] == utils.available_cpus() and saved["channels_last"] is False


def test_a_diverging_run_stops_with_one_line_at_the_next_read(tiny_data, tmp_path):
    proc = run_main("train.py", "--data_dir", tiny_data, "--checkpoint_dir", str(tmp_path / "c"), *TINY,
                    "--epochs", "1", "--lr", "1e30", "--grad_clip", "0")
    assert_one_line_error(proc, "the loss became", "between steps", "lower --lr")
    assert not os.path.exists(tmp_path / "c" / "last.pth")


# ----------------------------------------------------------------------------------- one run, one folder

def copy_run(ckpt: str, dest) -> str:
    shutil.copytree(ckpt, str(dest))
    return str(dest)


def test_resume_continues_with_the_runs_own_flags_and_refuses_other_values(trained, tmp_path):
    """--resume alone (no recipe flags) continues the run as it was configured; a flag given with another value
    than the run's is one line; a new length is allowed and said."""
    data, ckpt = trained
    resumed = copy_run(ckpt, tmp_path / "resumed")
    last = os.path.join(resumed, "last.pth")
    proc = run_main("train.py", "--data_dir", data, "--resume", last, "--device", "cpu", "--workers", "0",
                    "--epochs", "3")  # no --checkpoint_dir: the resumed file's folder
    assert proc.returncode == 0, proc.stderr
    assert "resume: the run's own values of flags left out" in proc.stdout
    assert "--backbone mobilenet_v3_small" in proc.stdout and "--lr 0.001" in proc.stdout
    assert "planned for --epochs 2; continuing with --epochs 3" in proc.stdout
    b = utils.load_checkpoint(last)
    assert (b["epoch"], b["step"]) == (3, 15) and b["args"]["lr"] == 1e-3 and b["args"]["batch_size"] == 4
    assert b["args"]["run_id"] == utils.load_checkpoint(os.path.join(ckpt, "last.pth"))["args"]["run_id"]
    # the recipe's flags are the run's own: another --recipe (or the same file under another path) changes nothing
    proc = run_main("train.py", "--data_dir", data, "--resume", last, "--device", "cpu", "--workers", "0",
                    "--epochs", "3", "--recipe", "scratch")
    assert proc.returncode == 0 and "note: --recipe scratch is not used" in proc.stdout, proc.stderr
    for flag, value, saved in (("--lr", "0.01", "--lr 0.001"), ("--batch_size", "8", "--batch_size 4"),
                               ("--seed", "1", "--seed 0"), ("--pretrained", None, "--no-pretrained")):
        proc = run_main("train.py", "--data_dir", data, "--resume", last, "--device", "cpu", "--epochs", "4",
                        *([flag] if value is None else [flag, value]))
        assert_one_line_error(proc, saved, f"this run gives {flag}" + (f" {value}" if value else ""),
                              "leave it out")


def test_resume_refuses_other_data(trained, tmp_path):
    """Another dataset with as many seen classes (once: proxies silently reassigned), and the same classes with
    other files, are refused before any training."""
    data, ckpt = trained
    last = os.path.join(copy_run(ckpt, tmp_path / "r"), "last.pth")
    other = make_tiny_dataset(str(tmp_path / "other"), seen=("a", "b", "c", "d"), unseen=("circle", "star"))
    proc = run_main("train.py", "--data_dir", other, "--resume", last, "--device", "cpu", "--epochs", "3")
    assert_one_line_error(proc, "trained on 4 seen classes (tri, square, pent, hexa", "this data has 4 (a, b, c, d",
                          "resume on the data the run started with")
    more = make_tiny_dataset(str(tmp_path / "more"), per_class=7)
    proc = run_main("train.py", "--data_dir", more, "--resume", last, "--device", "cpu", "--epochs", "3")
    assert_one_line_error(proc, "trained and validated on other files of these classes", "train_sketches")
    moved = shutil.copytree(data, str(tmp_path / "moved"))  # the same data in another folder resumes
    proc = run_main("train.py", "--data_dir", moved, "--resume", last, "--device", "cpu", "--epochs", "3")
    assert proc.returncode == 0, proc.stderr


def test_a_new_run_is_refused_a_folder_that_holds_a_run_unless_overwrite(trained, tmp_path):
    data, ckpt = trained
    folder = copy_run(ckpt, tmp_path / "r")
    proc = run_main("train.py", "--data_dir", data, "--checkpoint_dir", folder, *TINY, "--epochs", "1")
    assert_one_line_error(proc, "already holds a run (best.pth, last.pth, log.jsonl, args.json, curves.png)",
                          f"--resume {os.path.join(folder, 'last.pth')}", "--overwrite")
    proc = run_main("train.py", "--data_dir", data, "--checkpoint_dir", folder, *TINY, "--epochs", "1", "--overwrite")
    assert proc.returncode == 0, proc.stderr
    assert f"--overwrite: deleted the run that was in {folder}" in proc.stdout
    records = utils.read_jsonl(os.path.join(folder, "log.jsonl"))
    assert [r["epoch"] for r in records if r["kind"] == "epoch"] == [1]  # one run's log, not two mixed
    assert utils.load_checkpoint(os.path.join(folder, "last.pth"))["epoch"] == 1


def test_resume_is_refused_a_folder_of_another_run_or_one_that_went_further(trained, tmp_path):
    data, ckpt = trained
    folder = copy_run(ckpt, tmp_path / "r")
    early = utils.load_checkpoint(os.path.join(folder, "last.pth"))
    early.update(epoch=1, step=5)
    utils.save_checkpoint(early, str(tmp_path / "early.pth"))
    proc = run_main("train.py", "--data_dir", data, "--resume", str(tmp_path / "early.pth"), "--checkpoint_dir",
                    folder, "--device", "cpu")
    assert_one_line_error(proc, "last.pth is at step 10, past", "step 5", "branch off at step 5")
    utils.write_json(os.path.join(folder, "args.json"), {"args": {"run_id": "someoneelse"}})
    proc = run_main("train.py", "--data_dir", data, "--resume", os.path.join(ckpt, "last.pth"), "--checkpoint_dir",
                    folder, "--device", "cpu", "--epochs", "3")
    assert_one_line_error(proc, "holds another run (run someoneelse)")


def test_resume_drops_the_log_records_past_its_checkpoint(trained, tmp_path):
    """A run killed after its last checkpoint logged steps that the resumed run trains again: they are dropped,
    so that log.jsonl and curves.png describe one run."""
    data, ckpt = trained
    folder = copy_run(ckpt, tmp_path / "r")
    utils.append_jsonl(os.path.join(folder, "log.jsonl"), {"kind": "step", "epoch": 3, "step": 12, "class": 1.0})
    proc = run_main("train.py", "--data_dir", data, "--resume", os.path.join(folder, "last.pth"), "--device", "cpu",
                    "--workers", "0", "--epochs", "3")
    assert proc.returncode == 0, proc.stderr
    assert "dropped 1 record(s) past step 10" in proc.stdout
    steps = [r["step"] for r in utils.read_jsonl(os.path.join(folder, "log.jsonl"))]
    assert steps == sorted(steps) and steps[-1] == 15


def test_without_a_validation_set_the_log_is_strict_json(tiny_data, tmp_path):
    ckpt = str(tmp_path / "c")
    proc = run_main("train.py", "--data_dir", tiny_data, "--checkpoint_dir", ckpt, *TINY, "--epochs", "1",
                    "--val_fraction", "0")
    assert proc.returncode == 0, proc.stderr
    assert "no validation set (--val_fraction 0): best.pth is the last epoch" in proc.stdout
    with open(os.path.join(ckpt, "log.jsonl")) as f:
        records = [json.loads(line, parse_constant=lambda c: pytest.fail(f"{c} in log.jsonl")) for line in f]
    assert [r["val_map"] for r in records if r["kind"] == "epoch"] == [None]
    proc = run_main("evaluate.py", "--model", os.path.join(ckpt, "best.pth"), "--data", tiny_data, "--workers", "0",
                    "--device", "cpu", "--num_sketches", "0", "--output_dir", str(tmp_path / "e"))
    assert proc.returncode == 0 and "no seen-class validation" in proc.stdout, proc.stderr
