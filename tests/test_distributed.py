"""Distributed training (torchrun / DDP) on the CPU with gloo: 2 processes against 1 over the same global batch."""
import json
import os
import socket
import subprocess
import sys

import pytest
import torch
import torch.multiprocessing as mp
from PIL import Image

import train
import utils
from conftest import ROOT, make_tiny_dataset
from model import ZSSBIRModel

WORLD, GLOBAL_BATCH, STEPS, SIZE = 2, 8, 3, 32
# The test network must treat every sample on its own, or no per-process split can match one
# process: vgg16 has no batch norm (gloo has no SyncBatchNorm), and dropout is switched off.
BACKBONE, DIM, CLASSES = "vgg16", 16, 4


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tiny_model(seed: int = 0) -> ZSSBIRModel:
    torch.manual_seed(seed)
    model = ZSSBIRModel(BACKBONE, DIM, pretrained=False, num_classes=CLASSES)
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    return model


def global_batches(seed: int = 1) -> list:
    g = torch.Generator().manual_seed(seed)
    return [[torch.randn(GLOBAL_BATCH, 3, SIZE, SIZE, generator=g) for _ in range(3)]
            + [torch.randint(0, CLASSES, (GLOBAL_BATCH,), generator=g) for _ in range(2)] for _ in range(STEPS)]


def run_steps(net, model, batches, args) -> list:
    """train.train_step over the batches; after each: (losses, all parameters as one vector).

    SGD, not train.py's AdamW: Adam divides each gradient element by its own running magnitude, so
    float rounding on a near-zero gradient (summed in another order across processes) can move that
    weight by up to lr. With SGD a weight moves by lr x its gradient, so comparing weights compares
    the averaged gradients with the global batch's."""
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    out = []
    for batch in batches:
        vals, _ = train.train_step(net, optimizer, scaler, batch, lambd=0.5, lr=args.lr, args=args, dtype=None)
        out.append((vals, torch.cat([p.detach().flatten() for p in model.parameters()]).clone()))
    return out


def step_args():
    return train.get_args_parser().parse_args(["--data_dir", "unused", "--lr", "0.05", "--class_loss_ratio", "1"])


def worker(rank: int, port: int, images: list, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(WORLD),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    rank, world, device = utils.init_distributed("cpu")
    model = tiny_model()
    net = torch.nn.parallel.DistributedDataParallel(train.TrainingLosses(model))
    share = GLOBAL_BATCH // world
    batches = [[x[rank * share:(rank + 1) * share] for x in batch] for batch in global_batches()]
    steps = run_steps(net, model, batches, step_args())
    emb = utils.embed_images(model.sketch_encoder, images, SIZE, batch_size=2, workers=0, device=device, amp=False)
    torch.save({"steps": steps, "emb": emb}, os.path.join(out_dir, f"rank{rank}.pt"))
    torch.distributed.destroy_process_group()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The same 3 steps run by 2 gloo processes (half the batch each) and by this process alone."""
    out = tmp_path_factory.mktemp("ddp")
    images = []
    for i in range(5):  # 5 images: the processes embed 3 and 2
        path = str(out / f"im{i}.png")
        Image.new("RGB", (SIZE, SIZE), (40 * i, 255 - 40 * i, 128)).save(path)
        images.append(path)
    mp.spawn(worker, args=(free_port(), images, str(out)), nprocs=WORLD, join=True)
    ranks = [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]
    torch.set_num_threads(1)
    model = tiny_model()
    alone = run_steps(train.TrainingLosses(model), model, global_batches(), step_args())
    emb = utils.embed_images(model.sketch_encoder, images, SIZE, batch_size=2, workers=0, device=torch.device("cpu"),
                             amp=False)
    return ranks, alone, emb


def test_the_processes_hold_identical_parameters_after_every_step(runs):
    ranks, _, _ = runs
    for step in range(STEPS):
        first = ranks[0]["steps"][step][1]
        assert all(torch.equal(r["steps"][step][1], first) for r in ranks[1:]), f"step {step + 1}"
    assert not torch.equal(ranks[0]["steps"][0][1], ranks[0]["steps"][-1][1])  # they did train


def test_the_loss_and_the_weights_match_one_process_over_the_global_batch(runs):
    ranks, alone, _ = runs
    for step in range(STEPS):
        vals, params = ranks[0]["steps"][step]
        ref_vals, ref_params = alone[step]
        assert set(vals) == set(ref_vals) == {"triplet", "domain", "domain_acc", "class"}
        for k in vals:  # losses of the global batch: the mean of the processes' losses
            assert vals[k] == pytest.approx(ref_vals[k], rel=1e-5, abs=1e-6), (step, k)
        # the processes' gradients are averaged, so each step lands where the global batch's gradient leads
        torch.testing.assert_close(params, ref_params, rtol=0, atol=1e-6)


def test_sharded_embedding_returns_every_row_in_order(runs):
    ranks, _, emb = runs
    # the embedder runs after the steps, which left the same weights on both sides (to 1e-6)
    for r in ranks:
        assert r["emb"].shape == emb.shape == (5, DIM)
        torch.testing.assert_close(r["emb"], emb, rtol=0, atol=1e-4)


def test_torchrun_trains_and_evaluates_with_two_processes_and_only_rank_0_writes(tmp_path):
    data = make_tiny_dataset(str(tmp_path / "data"))
    ckpt = tmp_path / "ckpt"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "train.py",
           "--data_dir", data, "--checkpoint_dir", str(ckpt), "--backbone", "resnet18", "--no-pretrained",
           "--image_size", "32", "--embedding_dim", "16", "--batch_size", "4", "--workers", "0",
           "--print_every", "2", "--epochs", "2"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "distributed: 2 processes (gloo), 2 triplets each per step" in proc.stdout
    assert proc.stdout.count("epoch 2/2:") == 1  # rank 1 prints nothing
    log = utils.read_jsonl(str(ckpt / "log.jsonl"))
    assert [r["epoch"] for r in log if r["kind"] == "epoch"] == [1, 2]  # one writer
    last = utils.load_checkpoint(str(ckpt / "last.pth"))
    assert (last["epoch"], last["step"], last["world_size"]) == (2, 10, 2)  # 20 sketches / 4 per step * 2 epochs
    # a distributed checkpoint resumes in a single process
    proc = subprocess.run([sys.executable, "train.py", *cmd[cmd.index("train.py") + 1:], "--epochs", "3",
                           "--resume", str(ckpt / "last.pth")], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "resumed from" in proc.stdout and "epoch 3/3:" in proc.stdout
    # evaluation embeds sharded across 2 processes and reports what one process reports
    results = []
    for launch in (["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"], []):
        out = tmp_path / f"eval{len(launch)}"
        proc = subprocess.run([sys.executable, *launch, "evaluate.py", "--model", str(ckpt / "best.pth"), "--data", data,
                               "--workers", "0", "--num_sketches", "1", "--output_dir", str(out)],
                              cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert proc.stdout.count("wrote results.json") == 1
        results.append(json.loads((out / "results.json").read_text()))
    for name, ref in results[1]["protocols"].items():
        assert results[0]["protocols"][name]["map_all"] == pytest.approx(ref["map_all"], abs=1e-6), name


def test_batch_size_not_divisible_by_the_processes(tmp_path):
    data = make_tiny_dataset(str(tmp_path / "data"))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "train.py",
           "--data_dir", data, "--checkpoint_dir", str(tmp_path / "ckpt"), "--backbone", "resnet18",
           "--no-pretrained", "--image_size", "32", "--batch_size", "5", "--workers", "0"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert proc.stderr.count("error: --batch_size 5 is not divisible by the 2 processes") == 1  # said once
    assert 'train.py", line' not in proc.stderr  # no traceback from the script (torchrun adds its own report)
