"""Every backbone of model.py: its parameters and its CPU (or GPU) speed, in one run.

    python bench/bench_backbones.py                        # 224 px, this machine's CPU
    python bench/bench_backbones.py --image_size 64 --batches 5
    python bench/bench_backbones.py --device cuda --batch_size 64

For each backbone, with random weights: the parameters of one encoder (trunk + 512-d projection), and
images/s of embedding (eval mode, no gradients) and of training (forward and backward of a shared-trunk
model on sketch-photo pairs, train.py's scratch losses, AdamW), each over --batches timed batches after one
of warm-up. docs/backbones.md's table comes from this.
"""
import argparse
import functools
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import train  # noqa: E402
import utils  # noqa: E402
from model import BACKBONES, PATCH_SIZE, Encoder  # noqa: E402


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--image_size", type=int, default=224, help="input side in pixels")
    p.add_argument("--batch_size", type=int, default=8, help="images per embedding batch; pairs per training step")
    p.add_argument("--batches", type=int, default=3, help="timed batches of each kind")
    p.add_argument("--backbones", type=str, nargs="*", default=list(BACKBONES), choices=list(BACKBONES))
    p.add_argument("--device", type=str, default="auto", help="auto, cpu, cuda or cuda:N")
    return p


def timed(fn, batches: int, device) -> float:
    """Seconds per call of fn, over ``batches`` calls after one of warm-up."""
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(batches):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / batches


def main(args) -> None:
    device = utils.get_device(args.device)
    print(f"torch {torch.__version__}, device {device}, {torch.get_num_threads()} CPU threads; {args.image_size} px, "
          f"batch {args.batch_size}, {args.batches} timed batches")
    print(f"{'backbone':<20} {'parameters':>11} {'embed images/s':>15} {'train images/s':>15}")
    for name in args.backbones:
        size = args.image_size
        if name in PATCH_SIZE and size % PATCH_SIZE[name]:
            print(f"{name:<20} (skipped: {size} px is not a multiple of its {PATCH_SIZE[name]}-pixel patches)")
            continue
        torch.manual_seed(0)
        encoder = Encoder(name, 512, pretrained=False, image_size=size).to(device).eval()
        params = sum(p.numel() for p in encoder.parameters())
        x = torch.rand(args.batch_size, 3, size, size, device=device)
        with torch.no_grad():
            embed_s = timed(functools.partial(encoder, x), args.batches, device)
        del encoder
        targs = train.get_args_parser().parse_args(["--data_dir", "unused", "--no-pretrained", "--backbone", name,
                                                    "--image_size", str(size), "--batch_size", str(args.batch_size),
                                                    "--device", str(device), "--no-channels_last"])
        train.check_args(targs)
        model, optimizer = train.build_model_and_optimizer(targs, 4, device)
        net, scaler = train.TrainingLosses(model), torch.amp.GradScaler(device.type, enabled=False)
        batch = [x, x.flip(-1), torch.arange(args.batch_size, device=device) % 4]
        step = functools.partial(train.train_step, net, optimizer, scaler, batch, 0.0, 1e-4, targs, None)
        train_s = timed(step, args.batches, device)
        del model, optimizer, net, step
        print(f"{name:<20} {params / 1e6:10.1f}M {args.batch_size / embed_s:15.1f} "
              f"{2 * args.batch_size / train_s:15.1f}")


if __name__ == "__main__":
    utils.run_cli(main, get_args_parser())
