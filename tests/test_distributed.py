"""Distributed training (torchrun / DDP) on the CPU with gloo: 2 processes against 1 over the same global batch,
in float64 so that the only difference is the order of summation. One test starts train.py with torchrun itself,
as a user would; the others start their processes with the environment torchrun gives them (start_processes),
which is all the scripts read, without importing torch again in each."""
import copy
import json
import os
import shutil
import socket
import subprocess
import sys
from types import SimpleNamespace
from unittest import mock

import pytest
import torch
import torch.multiprocessing as mp
import torchvision
from PIL import Image

import model as M
import train
import utils
from conftest import ROOT, make_tiny_dataset, reordering_rtol, run_main
from model import ZSSBIRModel

WORLD, GLOBAL_BATCH, STEPS, SIZE = 2, 4, 3, 32
# The test network must treat every sample on its own, or no per-process split can match one
# process: vgg16 has no batch norm (gloo has no SyncBatchNorm), and dropout is switched off. It is a narrow
# vgg16: its 13 convolutions, ReLUs and 5 max pools at an eighth of the width (the full one's 2 x 15M float64
# weights, saved after every step by every process, cost more than all the rest of this module).
BACKBONE, DIM, CLASSES = "vgg16", 16, 4
NARROW_VGG16 = [8, 8, "M", 16, 16, "M", 32, 32, 32, "M", 64, 64, 64, "M", 64, 64, 64, "M"]
LR, MOMENTUM = 0.05, 0.9


class NarrowVGG16(torch.nn.Module):
    """vgg16's features (torchvision's make_layers of NARROW_VGG16): all that model.build_trunk takes of a vgg16."""

    def __init__(self):
        super().__init__()
        self.features = torchvision.models.vgg.make_layers(NARROW_VGG16)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tiny_models(seed: int = 0) -> tuple[ZSSBIRModel, ZSSBIRModel]:
    """The seeded test network in float64 (trained) and in float32 (embeds)."""
    torch.manual_seed(seed)
    with mock.patch.object(torchvision.models, "get_model", lambda name, weights=None: NarrowVGG16()), \
            mock.patch.dict(M.BACKBONES, {BACKBONE: (*M.BACKBONES[BACKBONE][:2], NARROW_VGG16[-2])}):
        model = ZSSBIRModel(BACKBONE, DIM, pretrained=False, num_classes=CLASSES)
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    return copy.deepcopy(model).double(), model


def global_batches(seed: int = 1) -> list:
    g = torch.Generator().manual_seed(seed)
    return [[torch.randn(GLOBAL_BATCH, 3, SIZE, SIZE, generator=g, dtype=torch.float64) for _ in range(3)]
            + [torch.randint(0, CLASSES, (GLOBAL_BATCH,), generator=g) for _ in range(2)] for _ in range(STEPS)]


def run_steps(net, model, batches, args) -> list:
    """train.train_step over the batches; after each: (losses, all parameters as one vector, largest |gradient|).

    SGD, not train.py's AdamW: Adam divides each gradient element by its own running magnitude, so a
    rounding difference on a near-zero gradient can move that weight by up to lr. With SGD a weight
    moves by lr x its (momentum-averaged) gradient, so comparing weights compares the averaged
    gradients with the global batch's."""
    optimizer = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    out = []
    for batch in batches:
        losses = train.train_step(net, optimizer, scaler, batch, lambd=0.5, lr=LR, args=args, dtype=None)
        vals = train.global_mean(losses)
        grad = max(p.grad.abs().max().item() for p in model.parameters() if p.grad is not None)
        out.append((vals, torch.cat([p.detach().flatten() for p in model.parameters()]).clone(), grad))
    return out


def step_args():
    args = train.get_args_parser().parse_args(["--data_dir", "unused", "--recipe", "original", "--lr", str(LR),
                                               "--class_loss_ratio", "1", "--grad_clip", "0", "--device", "cpu"])
    train.apply_recipe(args)
    return args


def start_processes(fn, args: tuple) -> None:
    """fn(rank, *args) in WORLD processes, each given the environment torchrun gives its processes, and waits
    for them. Forked where this process has not initialised CUDA (a fork starts at once; a spawned process
    imports torch and torchvision again, seconds each), else spawned."""
    method = "fork" if sys.platform == "linux" and not torch.cuda.is_initialized() else "spawn"
    mp.start_processes(as_torchrun, (free_port(), fn, args), nprocs=WORLD, join=True, start_method=method)


def as_torchrun(rank: int, port: int, fn, args: tuple) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(WORLD),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(WORLD))
    torch.set_num_threads(1)  # as torchrun sets OMP_NUM_THREADS=1
    fn(rank, *args)


def worker(rank: int, images: list, out_dir: str) -> None:
    rank, world, device = utils.init_distributed("cpu")
    model, model32 = tiny_models()
    net = torch.nn.parallel.DistributedDataParallel(train.TrainingLosses(model))
    share = GLOBAL_BATCH // world
    batches = [[x[rank * share:(rank + 1) * share] for x in batch] for batch in global_batches()]
    steps = run_steps(net, model, batches, step_args())
    # One image per batch: each image then meets the same float32 kernels as in a single process.
    emb = utils.embed_images(model32.sketch_encoder, images, SIZE, batch_size=1, workers=0, device=device, amp=False)
    torch.save({"steps": steps, "emb": emb}, os.path.join(out_dir, f"rank{rank}.pt"))
    torch.distributed.destroy_process_group()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The same 3 float64 steps run by 2 gloo processes (half the batch each) and by this process alone."""
    out = tmp_path_factory.mktemp("ddp")
    images = []
    for i in range(5):  # 5 images: the processes embed 3 and 2
        path = str(out / f"im{i}.png")
        Image.new("RGB", (SIZE, SIZE), (40 * i, 255 - 40 * i, 128)).save(path)
        images.append(path)
    start_processes(worker, (images, str(out)))
    ranks = [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]
    for r in range(WORLD):  # float64 weights after every step: not worth keeping on disk
        os.remove(out / f"rank{r}.pt")
    model, model32 = tiny_models()
    alone = run_steps(train.TrainingLosses(model), model, global_batches(), step_args())
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the workers: the embeddings are compared bit for bit
    try:
        emb = utils.embed_images(model32.sketch_encoder, images, SIZE, batch_size=1, workers=0,
                                 device=torch.device("cpu"), amp=False)
    finally:
        torch.set_num_threads(threads)
    return ranks, alone, emb, reordering_rtol(model, 3 * GLOBAL_BATCH * SIZE * SIZE)


def test_the_processes_hold_identical_parameters_after_every_step(runs):
    ranks = runs[0]
    for step in range(STEPS):
        first = ranks[0]["steps"][step][1]
        assert all(torch.equal(r["steps"][step][1], first) for r in ranks[1:]), f"step {step + 1}"
    assert not torch.equal(ranks[0]["steps"][0][1], ranks[0]["steps"][-1][1])  # they did train


def test_the_loss_and_the_weights_match_one_process_over_the_global_batch(runs):
    ranks, alone, _, rtol = runs
    assert rtol < 1e-9  # float64: far below any real difference, e.g. one half batch's gradient alone
    moved = 0.0
    for step in range(STEPS):
        vals, params, _ = ranks[0]["steps"][step]
        ref_vals, ref_params, _ = alone[step]
        assert params.dtype == ref_params.dtype == torch.float64
        assert set(vals) == set(ref_vals) == {"triplet", "domain", "domain_acc", "domain_logit", "class", "loss"}
        for k in vals:  # losses of the global batch: the mean of the processes' losses
            assert vals[k] == pytest.approx(ref_vals[k], rel=rtol, abs=0), (step, k)
        # Each step lands where the global batch's gradient leads. SGD moves a weight by lr times its
        # momentum buffer, a sum of past gradients weighted by at most 1 / (1 - momentum), so after
        # step + 1 steps two runs whose gradients agree to rtol x the largest gradient differ by at most:
        moved += LR / (1 - MOMENTUM) * rtol * max(g for _, _, g in alone[:step + 1])
        torch.testing.assert_close(params, ref_params, rtol=0, atol=moved)


def test_sharded_embedding_returns_every_row_in_order(runs):
    ranks, _, emb, _ = runs
    for r in ranks:  # the same weights, one image per batch: the same float32 arithmetic, bit for bit
        assert r["emb"].shape == emb.shape == (5, DIM)
        assert torch.equal(r["emb"], emb)


TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(WORLD)]


@pytest.fixture(scope="module")
def torchrun_training(tmp_path_factory):
    """2 epochs of train.py under torchrun with 2 CPU processes, as a user would start them (the scratch recipe:
    paired batches, each process taking its half of every global batch)."""
    root = tmp_path_factory.mktemp("torchrun")
    data, ckpt = make_tiny_dataset(str(root / "data")), root / "ckpt"
    args = ["train.py", "--data_dir", data, "--checkpoint_dir", str(ckpt), "--backbone", "shufflenet_v2_x1_0",
            "--no-pretrained", "--image_size", "32", "--embedding_dim", "16", "--batch_size", "4", "--workers", "0",
            "--print_every", "2", "--epochs", "2", "--device", "cpu"]
    proc = subprocess.run(TORCHRUN + args, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return root, data, ckpt, args, proc


def test_torchrun_trains_with_two_processes_and_only_rank_0_writes(torchrun_training, tmp_path):
    root, data, ckpt, args, proc = torchrun_training
    assert "distributed: 2 processes (gloo), 2 pairs each per step" in proc.stdout
    assert proc.stdout.count("epoch 2/2:") == 1  # rank 1 prints nothing
    log = utils.read_jsonl(str(ckpt / "log.jsonl"))
    assert [r["epoch"] for r in log if r["kind"] == "epoch"] == [1, 2]  # one writer
    last = utils.load_checkpoint(str(ckpt / "last.pth"))
    # 22 training photos / 4 per step = 5 steps, 2 epochs
    assert (last["epoch"], last["step"], last["world_size"]) == (2, 10, 2)
    # a distributed checkpoint resumes in a single process (this one)
    resumed = tmp_path / "resumed"
    shutil.copytree(ckpt, resumed)
    proc = run_main(*args, "--checkpoint_dir", str(resumed), "--epochs", "3", "--resume", str(resumed / "last.pth"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "resumed from" in proc.stdout and "epoch 3/3:" in proc.stdout


def script_worker(rank: int, script: str, argv: list, out_dir: str) -> None:
    """Run SCRIPT as one of torchrun's processes would (in this process, like conftest.run_main); its exit code,
    stdout and stderr go to out_dir/rank{rank}.json."""
    proc = run_main(script, *argv)
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(vars(proc), f)


def run_distributed(script: str, *argv: str, out_dir) -> list:
    """``torchrun --nproc_per_node WORLD SCRIPT ARGV...`` on the CPU, its processes started by start_processes:
    what each process returned and printed, by rank."""
    start_processes(script_worker, (script, list(argv), str(out_dir)))
    return [SimpleNamespace(**json.loads((out_dir / f"rank{r}.json").read_text())) for r in range(WORLD)]


def test_sharded_evaluation_computes_what_one_process_computes(torchrun_training):
    root, data, ckpt, _, _ = torchrun_training
    runs = []
    for sharded in (True, False):  # WORLD processes, then this one; each with one thread
        out = root / ("sharded" if sharded else "alone")
        out.mkdir()
        argv = ["--model", str(ckpt / "best.pth"), "--data", data, "--workers", "0", "--batch_size", "1",
                "--num_sketches", "1", "--output_dir", str(out), "--device", "cpu", "--save_embeddings",
                str(out / "emb.pt")]
        if sharded:
            procs = run_distributed("evaluate.py", *argv, out_dir=out)
            assert [p.returncode for p in procs] == [0] * WORLD, procs[0].stderr[-2000:] + procs[1].stderr[-2000:]
            assert procs[1].stdout == ""  # rank 1 prints nothing and writes nothing
            proc = procs[0]
        else:
            threads = torch.get_num_threads()
            torch.set_num_threads(1)
            try:
                proc = run_main("evaluate.py", *argv)
            finally:
                torch.set_num_threads(threads)
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert proc.stdout.count("wrote results.json") == 1
        runs.append((json.loads((out / "results.json").read_text()), torch.load(out / "emb.pt")))
    (sharded, sharded_emb), (alone, alone_emb) = runs
    # every image embedded alone with the same weights, kernels and one thread: the same bits, so the same metrics
    assert torch.equal(sharded_emb["queries"], alone_emb["queries"])
    assert torch.equal(sharded_emb["gallery"], alone_emb["gallery"])
    assert sharded["protocols"] == alone["protocols"]


def test_batch_size_not_divisible_by_the_processes(tiny_data, tmp_path):
    procs = run_distributed("train.py", "--data_dir", tiny_data, "--checkpoint_dir", str(tmp_path / "ckpt"),
                            "--backbone", "resnet18", "--no-pretrained", "--image_size", "32", "--batch_size", "5",
                            "--workers", "0", "--device", "cpu", out_dir=tmp_path)
    assert [p.returncode for p in procs] == [2] * WORLD  # every process stops
    stderr = "".join(p.stderr for p in procs)
    assert stderr.count("error: --batch_size 5 is not divisible by the 2 processes") == 1  # said once, by rank 0
    assert "Traceback" not in stderr
    assert not (tmp_path / "ckpt").exists()


def test_more_processes_than_gpus_is_one_clear_error_before_any_process_group(monkeypatch):
    """Every process checks before joining, so none waits for a partner that will never come."""
    monkeypatch.setenv("WORLD_SIZE", "3")
    monkeypatch.setenv("RANK", "2")
    monkeypatch.setenv("LOCAL_RANK", "2")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "3")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.distributed, "init_process_group", lambda *a, **k: pytest.fail("joined a group"))
    with pytest.raises(utils.UserError, match=r"3 processes per node but 2 GPU\(s\) visible; .* or pass --device cpu"):
        utils.init_distributed("auto")


@pytest.mark.gpu
def test_torchrun_with_more_processes_than_gpus_says_so_once(tmp_path):
    data = make_tiny_dataset(str(tmp_path / "data"))
    procs = torch.cuda.device_count() + 1
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(procs), "train.py",
           "--data_dir", data, "--checkpoint_dir", str(tmp_path / "ckpt"), "--backbone", "resnet18",
           "--no-pretrained", "--image_size", "32", "--batch_size", str(4 * procs), "--workers", "0"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert proc.stderr.count(f"error: {procs} processes per node but {procs - 1} GPU(s) visible") == 1
    assert not (tmp_path / "ckpt").exists()
