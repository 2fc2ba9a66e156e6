"""Does the data pipeline keep up with the model? Loader throughput vs training throughput, in one run.

    python bench/bench_train.py                                   # the demo's settings (make demo first)
    python bench/bench_train.py --backbone resnet50 --image_size 224 --batch_size 64 --workers 8 --device cuda

Prints (1) the data loader alone: triplets/s from disk to batched tensors, as train.py loads them
(train split, random augmentation, --workers processes); (2) the model alone on synthetic tensors:
training triplets/s of train.py's own step (forward, triplet + domain loss, backward, clipping,
AdamW step) in fp32, and on CUDA with --amp, each also with channels_last; (3) loader / model. Above 1 the model never waits for
data; issue 5 asks for at least 3 at the demo's settings with train.py's default --workers.
"""
import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import dataset  # noqa: E402
import train  # noqa: E402
import utils  # noqa: E402
from model import BACKBONES, ZSSBIRModel  # noqa: E402


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data_dir", type=str, default="data/demo", help="dataset folder (the demo's by default)")
    p.add_argument("--backbone", type=str, default="shufflenet_v2_x1_0", choices=sorted(BACKBONES))
    p.add_argument("--image_size", type=int, default=64, help="input side in pixels")
    p.add_argument("--embedding_dim", type=int, default=128, help="size of the shared embedding")
    p.add_argument("--batch_size", type=int, default=64, help="triplets per step")
    p.add_argument("--workers", type=int, default=4, help="data loader processes (train.py's default)")
    p.add_argument("--batches", type=int, default=30, help="timed loader batches and model steps")
    p.add_argument("--device", type=str, default="auto", help="auto, cpu, cuda or cuda:N")
    return p


def loader_throughput(args) -> float:
    data = dataset.scan_dataset(args.data_dir, check_images=False)
    train, _ = dataset.split_seen(data, 0.1)
    triplets = dataset.TripletDataset(train, data.seen, args.image_size)
    loader = torch.utils.data.DataLoader(triplets, batch_size=args.batch_size, shuffle=True, drop_last=True,
                                         num_workers=args.workers, worker_init_fn=utils.seed_worker,
                                         persistent_workers=args.workers > 0)
    timed = min(args.batches, len(loader) - 3)
    if timed < 1:
        raise utils.UserError(f"{args.data_dir} has only {len(loader)} batches of {args.batch_size}; lower --batch_size")
    it, count = iter(loader), 0
    for _ in range(3):  # warm-up: workers start and fill their queues
        next(it)
    start = time.perf_counter()
    for _ in range(timed):
        count += next(it)[0].shape[0]
    return count / (time.perf_counter() - start)


def model_throughput(args, device, amp: bool, channels_last: bool) -> tuple[float, float]:
    """Training triplets/s on synthetic batches, and peak GPU memory in MiB (0 on the CPU)."""
    torch.manual_seed(0)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model = ZSSBIRModel(args.backbone, args.embedding_dim, False).to(device, memory_format=fmt)
    net = train.TrainingLosses(model)
    train_args = train.get_args_parser().parse_args(["--data_dir", args.data_dir])  # train.py's default losses
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    dtype = utils.amp_dtype(device, amp)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    batch = [torch.randn(args.batch_size, 3, args.image_size, args.image_size, device=device)
             .contiguous(memory_format=fmt) for _ in range(3)]
    batch += [torch.zeros(args.batch_size, dtype=torch.long, device=device),
              torch.ones(args.batch_size, dtype=torch.long, device=device)]
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()

    def step():
        train.train_step(net, opt, scaler, batch, lambd=0.5, lr=1e-4, args=train_args, dtype=dtype)

    for _ in range(3):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(args.batches):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    mem = torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else 0.0
    return args.batches * args.batch_size / (time.perf_counter() - start), mem


def main(args) -> None:
    device = utils.get_device(args.device)
    if not os.path.isdir(args.data_dir):
        raise utils.UserError(f"{args.data_dir} does not exist; run `make demo` or `bash download_data.sh demo` "
                              "first, or pass --data_dir")
    print(f"torch {torch.__version__}, device {device}, {torch.get_num_threads()} CPU threads, {os.cpu_count()} "
          f"CPUs; {args.backbone} at {args.image_size}px, batch {args.batch_size} triplets, {args.workers} workers")
    loader = loader_throughput(args)
    print(f"(1) data loader alone:           {loader:9.1f} triplets/s  ({3 * loader:.0f} images/s)")
    variants = [("fp32", False, False), ("fp32 + channels_last", False, True)]
    if device.type == "cuda":
        variants += [("--amp", True, False), ("--amp + channels_last", True, True)]
    results = {}
    for name, amp, cl in variants:
        rate, mem = model_throughput(args, device, amp, cl)
        results[name] = rate
        extra = f", peak GPU memory {mem:.0f} MiB" if device.type == "cuda" else ""
        print(f"(2) model alone, {name:<22} {rate:9.1f} triplets/s  ({3 * rate:.0f} images/s{extra})")
    if device.type != "cuda":
        print("    (--amp applies to CUDA only: train.py ignores it on the CPU)")
    used = results["--amp" if device.type == "cuda" else "fp32"]
    print(f"(3) loader / model ({'--amp' if device.type == 'cuda' else 'fp32'}): {loader / used:.2f}  "
          f"(target >= 3: {'met' if loader / used >= 3 else 'NOT met'})")


if __name__ == "__main__":
    utils.run_cli(main, get_args_parser())
