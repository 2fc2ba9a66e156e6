"""The training recipes: defaults by recipe, the paired-batch path end to end, the time budget, exact resume."""
import os

import pytest
import torch

import evaluate
import methods
import train
import utils
from conftest import make_tiny_dataset, run_main
from test_train import train_with_sigterm_in_step_3

# The from-scratch recipe (no --recipe: chosen by --no-pretrained), shrunk to tiny CPU data and a small trunk.
TINY = ["--no-pretrained", "--backbone", "shufflenet_v2_x1_0", "--image_size", "32", "--embedding_dim", "16",
        "--batch_size", "4", "--workers", "0", "--device", "cpu", "--print_every", "1"]


def train_args(data, ckpt, *extra):
    args = train.get_args_parser().parse_args(["--data_dir", data, "--checkpoint_dir", ckpt, *TINY, *extra])
    return args


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_dataset(str(tmp_path_factory.mktemp("data")))


def recipe(name: str) -> dict:
    """The values of configs/NAME.yaml."""
    return train.read_config(os.path.join(train.CONFIG_DIR, name + ".yaml"), train.get_args_parser())[1]


def test_recipe_follows_pretrained_and_explicit_flags_win():
    def resolved(*argv):
        args = train.get_args_parser().parse_args(["--data_dir", "x", *argv])
        train.apply_recipe(args)
        return args
    scratch = resolved("--no-pretrained")
    assert scratch.recipe == "scratch" and scratch.recipe_source == "from --no-pretrained"
    assert {k: getattr(scratch, k) for k in recipe("scratch")} == recipe("scratch")
    assert resolved().recipe == "finetune" and resolved().lr == recipe("finetune")["lr"]
    original = resolved("--recipe", "original", "--no-pretrained", "--lr", "0.5", "--no-shared_trunk")
    assert original.recipe_source == "given" and original.lr == 0.5 and original.sampling == "triplets"
    assert original.backbone == "vgg16" and original.domain_loss_ratio == 0.5 and original.epochs == 30
    mixed = resolved("--no-pretrained", "--shared_trunk", "--domain_bn", "--epochs", "3")
    assert mixed.domain_bn is True and mixed.epochs == 3
    assert resolved("--no-pretrained", "--budget_minutes", "2").epochs is None  # the budget alone ends training
    assert resolved("--recipe", "original", "--warmup_epochs", "3").warmup == pytest.approx(3 / 30)


def test_lr_schedule_is_warm_up_then_cosine_to_one_percent():
    base, w = 2e-3, 0.3
    assert methods.one_cycle_lr(0.0, w, base) == pytest.approx(0.01 * base)
    assert methods.one_cycle_lr(w / 2, w, base) == pytest.approx(base * (0.01 + 0.99 * 0.5))
    assert methods.one_cycle_lr(w, w, base) == pytest.approx(base)
    assert methods.one_cycle_lr(w + (1 - w) / 2, w, base) == pytest.approx(base * (0.01 + 0.99 * 0.5))
    assert methods.one_cycle_lr(1.0, w, base) == pytest.approx(0.01 * base)
    assert methods.one_cycle_lr(7.0, w, base) == methods.one_cycle_lr(1.0, w, base)  # progress clipped
    values = [methods.one_cycle_lr(p / 100, w, base) for p in range(101)]
    peak = values.index(max(values))
    assert peak == 30 and values[:peak + 1] == sorted(values[:peak + 1])
    assert values[peak:] == sorted(values[peak:])[::-1]
    assert methods.one_cycle_lr(0.5, 0.0, base) == pytest.approx(base * (0.01 + 0.99 * 0.5))  # no warm-up


def test_scratch_recipe_trains_one_shared_trunk_and_evaluates(tiny, tmp_path):
    ckpt = str(tmp_path / "ck")
    # resnet18, the recipe's own trunk: its class loss falls within these 10 steps (TINY's smaller trunk does
    # not learn in so few steps on every seed)
    train.main(train_args(tiny, ckpt, "--epochs", "2", "--backbone", "resnet18"))
    last = utils.load_checkpoint(os.path.join(ckpt, "last.pth"))
    assert set(last["models"]) == {"encoder", "domain_classifier", "class_proxies"}  # one trunk, saved once
    assert last["args"]["recipe"] == "scratch" and last["args"]["shared_trunk"] is True
    # 4 seen classes x 6 photos, a tenth (2) held out: 22 training photos, 5 steps of 4 per epoch
    assert last["epoch"] == 2 and last["step"] == 10
    steps = [r for r in utils.read_jsonl(os.path.join(ckpt, "log.jsonl")) if r["kind"] == "step"]
    assert {"class", "triplet", "domain", "lr", "seconds"} <= set(steps[0])
    assert steps[0]["class"] > steps[-1]["class"]  # the class loss goes down
    out = str(tmp_path / "eval")
    evaluate.main(evaluate.get_args_parser().parse_args(
        ["--model", os.path.join(ckpt, "best.pth"), "--data", tiny, "--workers", "0", "--device", "cpu",
         "--output_dir", out, "--num_sketches", "1", "--compare_untrained"]))
    assert os.path.isfile(os.path.join(out, "results.json"))


def test_budget_ends_training_with_a_checkpoint_and_a_finished_run_is_not_trained_again(tiny, tmp_path, monkeypatch,
                                                                                        capsys):
    """--budget_minutes: progress and the end follow the clock. A fake clock moves 1 s per call, so the
    run stops after a known number of steps whatever the machine's speed."""
    now = [1000.0]

    def tick():
        now[0] += 1.0
        return now[0]
    monkeypatch.setattr(train.time, "time", tick)
    ckpt = str(tmp_path / "ck")
    train.main(train_args(tiny, ckpt, "--budget_minutes", "0.5"))  # 30 fake seconds
    last = utils.load_checkpoint(os.path.join(ckpt, "last.pth"))
    assert last["finished"] is True and last["seconds"] >= 30
    # The banner says how far the run got, against the work behind the recipe's published figures.
    done = last["work"]["steps"]
    demo = train.MEASURED_STEPS["scratch"]["the demo"]
    out = capsys.readouterr().out
    assert f"budget 0.5 min spent after {done} steps" in out
    assert f"{demo:,} steps on the demo (this run did {done / demo:.0%} of that)" in out
    steps = [r for r in utils.read_jsonl(os.path.join(ckpt, "log.jsonl")) if r["kind"] == "step"]
    assert all(r["seconds"] < 30 for r in steps[:-1]) and steps[-1]["seconds"] >= 30  # stopped at the budget
    assert steps[-1]["lr"] < steps[len(steps) // 2]["lr"]  # the schedule spans the budget
    assert os.path.isfile(os.path.join(ckpt, "best.pth"))
    mtime = os.path.getmtime(os.path.join(ckpt, "last.pth"))
    train.main(train_args(tiny, ckpt, "--budget_minutes", "0.5", "--resume", os.path.join(ckpt, "last.pth")))
    assert os.path.getmtime(os.path.join(ckpt, "last.pth")) == mtime


def test_compute_budget_plans_the_schedule_ends_training_and_resumes_exactly(tiny, tmp_path, monkeypatch, capsys):
    """--budget_tflops: the schedule spans the budget in training FLOPs (planned from the first step's count),
    training stops at the first step that reaches it, and a stop inside it resumes exactly as the straight run."""
    probe = str(tmp_path / "probe")
    train.main(train_args(tiny, probe, "--epochs", "1", "--domain_loss_ratio", "0.1"))
    work = utils.load_checkpoint(os.path.join(probe, "last.pth"))["work"]
    per_step = work["flops"] / work["steps"]  # every step of this run has one batch shape
    budget = f"{7.5 * per_step / 1e12:.12g}"  # 7.5 steps: the 8th reaches it
    common = ["--budget_tflops", budget, "--domain_loss_ratio", "0.1", "--grl_threshold_epoch", "1"]
    straight, stopped = str(tmp_path / "straight"), str(tmp_path / "stopped")
    capsys.readouterr()
    train.main(train_args(tiny, straight, *common))
    out = capsys.readouterr().out
    assert f": 8 steps of {per_step / 1e9:.2f} GFLOP" in out and "TFLOP spent after 8 steps" in out
    a = utils.load_checkpoint(os.path.join(straight, "last.pth"))
    assert a["finished"] is True and a["step"] == 8 and a["work"]["flops"] == 8 * per_step
    steps = [r for r in utils.read_jsonl(os.path.join(straight, "log.jsonl")) if r["kind"] == "step"]
    lrs = [r["lr"] for r in steps]
    assert lrs.index(max(lrs)) in (2, 3) and lrs[-1] < 0.2 * max(lrs)  # warm-up 0.3 of 7.5 steps, then the decay
    assert steps[-1]["lambda"] > 0 and steps[0]["lambda"] == 0  # the ramp starts at epoch 2's first FLOP
    train_with_sigterm_in_step_3(monkeypatch, tiny, stopped, *common, args_of=train_args)
    train.main(train_args(tiny, stopped, *common, "--resume", os.path.join(stopped, "last.pth")))
    b = utils.load_checkpoint(os.path.join(stopped, "last.pth"))
    assert b["step"] == 8 and b["work"] == a["work"]
    for name in a["models"]:
        for key, value in a["models"][name].items():
            torch.testing.assert_close(b["models"][name][key], value, rtol=0, atol=0, msg=f"{name}.{key}")
    capsys.readouterr()
    train.main(train_args(tiny, stopped, *common, "--resume", os.path.join(stopped, "last.pth")))
    assert "nothing to do" in capsys.readouterr().out


def test_sigterm_mid_epoch_then_resume_matches_a_straight_run_with_pairs(tiny, tmp_path, monkeypatch):
    """The paired batches and their augmentation depend only on (seed, epoch, step): resuming at a stop
    inside an epoch continues exactly as the straight run did."""
    common = ["--epochs", "2", "--domain_loss_ratio", "0.1", "--triplet_loss_ratio", "1", "--thicken", "0.5"]
    straight, stopped = str(tmp_path / "straight"), str(tmp_path / "stopped")
    train.main(train_args(tiny, straight, *common))
    train_with_sigterm_in_step_3(monkeypatch, tiny, stopped, *common, args_of=train_args)
    mid = utils.load_checkpoint(os.path.join(stopped, "last.pth"))
    assert mid["epoch"] == 0 and mid["epoch_step"] == 3
    train.main(train_args(tiny, stopped, *common, "--resume", os.path.join(stopped, "last.pth")))
    a = utils.load_checkpoint(os.path.join(straight, "last.pth"))
    b = utils.load_checkpoint(os.path.join(stopped, "last.pth"))
    assert b["step"] == a["step"] == 10
    for name in a["models"]:
        for key, value in a["models"][name].items():
            torch.testing.assert_close(b["models"][name][key], value, rtol=0, atol=0, msg=f"{name}.{key}")


@pytest.mark.parametrize("flags, fragment", [
    (["--domain_bn", "--no-shared_trunk"], "--domain_bn splits the batch norms of a shared trunk"),
    (["--recipe", "original", "--edge_maps"], "--edge_maps and --thicken need --sampling pairs"),
    (["--class_loss_ratio", "0"], "learns nothing"),
    (["--warmup", "1.5"], "--warmup must be in [0, 1]"),
    (["--budget_minutes", "1", "--warmup_epochs", "1"], "with --budget_minutes give --warmup"),
    (["--budget_tflops", "1", "--warmup_epochs", "1"], "with --budget_tflops give --warmup"),
    (["--budget_tflops", "1", "--budget_minutes", "1"], "give one budget"),
    (["--pretrained", "--backbone", "resnet18_w32"], "has no published weights (imagenet asked)"),
    (["--batch_size", "64"], "larger than the 22 training photos"),
])
def test_cli_recipe_mistakes_get_one_line(tiny, tmp_path, flags, fragment):
    proc = run_main("train.py", "--data_dir", tiny, "--checkpoint_dir", str(tmp_path / "c"), *TINY, *flags)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and fragment in lines[0], proc.stderr
    assert not os.path.exists(str(tmp_path / "c"))
