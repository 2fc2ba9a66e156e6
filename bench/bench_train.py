"""Does the data pipeline keep up with the model, and does train.py's loop run at the model's speed? In one run.

    python bench/bench_train.py                                   # the demo's data at the demo's settings
    python bench/bench_train.py --data_dir data/demo256 --image_size 224 --workers 1 --skip_model  # loader at 224 px
    python bench/bench_train.py --data_dir data/sketchy --recipe original --image_size 224 --batch_size 64 --device cuda

Prints, for the recipe's sampling (--recipe: triplets for original, pairs for scratch):
(1) the data loader alone, images/s and images/s per worker process: "before" is the loader train.py had until
    issue 14 (each worker decodes, crops, flips and normalises with PIL and torchvision, batches travel as float32);
    "after" is train.py's BatchLoader (uint8 batches, JPEGs decoded at a reduced scale, crop/flip/normalisation
    left to the device); "after + disk cache" reads the same images from the disk cache (written to a temporary
    folder first, not timed).
(2) the model alone on synthetic tensors already on the device: training steps/s of train.py's train_step
    (forward, losses, backward, clipping, AdamW) in fp32 and with channels_last, and on CUDA with --amp.
(3) train.py's own loop (fit) over synthetic epochs of --steps steps: uint8 batches held in memory, so
    it times the copy to the device, the augmentation there, the schedule, the step and the logging, and not the
    loader; with train.py's defaults (--amp and channels_last on CUDA, fp32 on the CPU). Its second epoch is timed.
(4) the ratios the issue sets targets for: loader / model (>= 1.5) and loop / model (>= 0.9).
(5) validation: images/s of train.py's validation (embedding the held-out images from their files), and from
    it and (3) the share of an epoch that validation would take at Sketchy Extended's size (target <= 10%).
"""
import argparse
import contextlib
import io
import os
import sys
import tempfile
import time
from types import SimpleNamespace

import torch
from torchvision import transforms

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import dataset  # noqa: E402
import train  # noqa: E402
import utils  # noqa: E402
from model import BACKBONES, backbone_stats  # noqa: E402


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data_dir", type=str, default="data/demo", help="dataset folder (the demo's by default)")
    p.add_argument("--recipe", type=str, default="scratch", choices=train.recipe_names(),
                   help="train.py's recipe: its sampling, losses and model")
    p.add_argument("--backbone", type=str, default=None, choices=sorted(BACKBONES), help="default: the recipe's")
    p.add_argument("--image_size", type=int, default=None, help="input side in pixels (default: the recipe's)")
    p.add_argument("--batch_size", type=int, default=None, help="triplets or pairs per step (default: the recipe's)")
    p.add_argument("--workers", type=int, default=-1, help="loader processes (-1: train.py's default, all CPUs)")
    p.add_argument("--batches", type=int, default=30, help="timed loader batches and model steps")
    p.add_argument("--steps", type=int, default=200, help="steps of each synthetic epoch of train.py's loop")
    p.add_argument("--skip_model", action="store_true", help="time the loader only (no parts 2 to 4)")
    p.add_argument("--device", type=str, default="auto", help="auto, cpu, cuda or cuda:N")
    return p


def train_args(args, device, *extra) -> argparse.Namespace:
    """train.py's arguments for this benchmark, with its recipe and defaults resolved as train.py does."""
    flags = ["--data_dir", args.data_dir, "--recipe", args.recipe, "--no-pretrained", "--device", str(device), *extra]
    for name in ("backbone", "image_size", "batch_size"):
        if getattr(args, name) is not None:
            flags += [f"--{name}", str(getattr(args, name))]
    targs = train.get_args_parser().parse_args(flags)
    train.check_args(targs)
    if targs.channels_last is None:
        targs.channels_last = device.type == "cuda" and targs.amp
    return targs


class LegacyBatches(torch.utils.data.Dataset):
    """train.py's loader before issue 14, for the "before" figure: row i of the first epoch's plan, each image
    decoded in full by load_image (an edge map drawn from it), then RandomResizedCrop, flip, ToTensor and
    Normalize in the worker; the batches are float32."""

    def __init__(self, source: dataset.StepBatches, image_size: int):
        images, _ = source.plan(0)
        self.groups, self.items = [g.ravel() for g in images], source.store.items
        self.transform = transforms.Compose([
            transforms.RandomResizedCrop(image_size, scale=(0.7, 1.0), ratio=(0.85, 1.18), antialias=True),
            transforms.RandomHorizontalFlip(), transforms.ToTensor(),
            transforms.Normalize(*backbone_stats("resnet18"))])  # ImageNet's statistics, as that loader did

    def __len__(self) -> int:
        return len(self.groups[0])

    def __getitem__(self, i: int):
        out = []
        for g in self.groups:
            path, edges = self.items[g[i]]
            im = dataset.load_image(path)
            out.append(self.transform(dataset.edge_map(im) if edges else im))
        return tuple(out)


def images_per_second(batches, n: int) -> float:
    """Images/s over n batches of an endless iterator, after 3 batches of warm-up (workers start, queues fill)."""
    for _ in range(3):
        next(batches)
    start, count = time.perf_counter(), 0
    for _ in range(n):
        count += sum(x.shape[0] for x in next(batches) if x.ndim == 4)
    return count / (time.perf_counter() - start)


def endless(make_epoch):
    epoch = 0
    while True:
        yield from make_epoch(epoch)
        epoch += 1


def loader_rates(args, targs, device) -> dict:
    data = dataset.scan_dataset(args.data_dir, check_images=False)
    split, _ = dataset.split_seen(data, targs.val_fraction, seed=dataset.VAL_SPLIT_SEED)
    if targs.sampling == "pairs":
        source = dataset.PairedBatches(split, data.seen, targs.image_size, targs.batch_size, targs.edge_maps, 0,
                                       root=args.data_dir)
    else:
        source = dataset.TripletBatches(split, data.seen, targs.image_size, targs.batch_size, seed=0,
                                        root=args.data_dir)
    legacy = LegacyBatches(source, targs.image_size)
    if len(source) < 1:
        raise utils.UserError(f"{args.data_dir} has too few training images for --batch_size {targs.batch_size}")
    pin = device.type == "cuda"
    before = torch.utils.data.DataLoader(legacy, batch_size=targs.batch_size, shuffle=True, drop_last=True,
                                         num_workers=targs.workers, persistent_workers=targs.workers > 0,
                                         pin_memory=pin, worker_init_fn=utils.seed_worker)
    rates = {"before": images_per_second(endless(lambda e, loader=before: iter(loader)), args.batches)}
    del before
    after = dataset.BatchLoader(source, targs.workers, pin)
    rates["after"] = images_per_second(endless(after.epoch), args.batches)
    del after
    with tempfile.TemporaryDirectory() as cache_dir:
        t0 = time.perf_counter()
        dataset.write_disk_cache(args.data_dir, source.store.items, targs.image_size, cache_dir, targs.workers)
        write_s = time.perf_counter() - t0
        source.store.open_disk_cache(cache_dir)
        size = os.path.getsize(dataset.cache_paths(cache_dir, targs.image_size)[0])
        cached = dataset.BatchLoader(source, targs.workers, pin)
        rates["after + disk cache"] = images_per_second(endless(cached.epoch), args.batches)
        del cached
    print(f"    (the disk cache of these {len(source.store)} images took {write_s:.1f}s to write and holds "
          f"{size / 2 ** 20:.1f} MiB: 3 x {targs.image_size}^2 bytes per image)")
    return rates


def synthetic_batch(targs, device, uint8: bool) -> list:
    """One batch of random images (uint8 on the CPU, as the loader gives them, or normalised floats on the
    device, as the step takes them) and labels."""
    g = torch.Generator().manual_seed(0)
    b, s = targs.batch_size, targs.image_size
    n_images = 2 if targs.sampling == "pairs" else 3
    labels = [torch.randint(0, 4, (b,), generator=g)]
    if n_images == 3:
        labels.append((labels[0] + 1) % 4)
    if uint8:
        return [torch.randint(0, 256, (b, 3, s, s), generator=g, dtype=torch.uint8) for _ in range(n_images)] + labels
    fmt = torch.channels_last if targs.channels_last else torch.contiguous_format
    return ([torch.randn(b, 3, s, s, generator=g).to(device).contiguous(memory_format=fmt) for _ in range(n_images)]
            + [x.to(device) for x in labels])


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def model_rate(args, targs, device) -> tuple[float, float]:
    """Steps/s of train_step on a batch already on the device, and peak GPU memory in MiB (0 on the CPU)."""
    torch.manual_seed(0)
    model, optimizer = train.build_model_and_optimizer(targs, 4, device)
    net = train.TrainingLosses(model)
    dtype = utils.amp_dtype(device, targs.amp)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    batch = synthetic_batch(targs, device, uint8=False)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for _ in range(3):
        train.train_step(net, optimizer, scaler, batch, 0.5, targs.lr, targs, dtype)
    sync(device)
    start = time.perf_counter()
    for _ in range(args.batches):
        train.train_step(net, optimizer, scaler, batch, 0.5, targs.lr, targs, dtype)
    sync(device)
    mem = torch.cuda.max_memory_allocated() / 2 ** 20 if device.type == "cuda" else 0.0
    return args.batches / (time.perf_counter() - start), mem


class SyntheticLoader:
    """What train.fit needs of a BatchLoader, with one uint8 batch in (pinned) memory served --steps times."""

    def __init__(self, batch: list, steps: int, pin: bool):
        self.batch = [x.pin_memory() for x in batch] if pin else batch
        self.steps = steps

    def __len__(self) -> int:
        return self.steps

    def prepare(self) -> None:
        pass

    def epoch(self, epoch: int, start: int = 0):
        return (self.batch for _ in range(start, self.steps))


def loop_rate(args, targs, device) -> float:
    """Steps/s of train.py's loop (fit) over its second synthetic epoch (the first warms up)."""
    torch.manual_seed(0)
    targs.epochs, targs.print_every = 2, 100
    model, optimizer = train.build_model_and_optimizer(targs, 4, device)
    net = train.TrainingLosses(model)
    dtype = utils.amp_dtype(device, targs.amp)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    loader = SyntheticLoader(synthetic_batch(targs, device, uint8=True), args.steps, device.type == "cuda")
    no_val = {"sketches": {}, "photos": {}}
    with tempfile.TemporaryDirectory() as ckpt:
        targs.checkpoint_dir = ckpt
        with contextlib.redirect_stdout(io.StringIO()):  # its log lines; the figure comes from log.jsonl
            trainer = train.Trainer(targs, model, net, optimizer, scaler, device, dtype, {}, {})
            train.fit(trainer, loader, no_val, list("abcd"), train.TrainState.start(targs, len(loader)),
                      SimpleNamespace(signal=None))
        epochs = [r for r in utils.read_jsonl(os.path.join(ckpt, "log.jsonl")) if r["kind"] == "epoch"]
    return args.steps / epochs[-1]["train_seconds"]


# Sketchy Extended (docs/datasets.md): 75,471 sketches and 73,002 photos of 125 classes, 100 of them seen.
SKETCHY = {"sketches": 75471, "photos": 73002, "classes": 125, "seen": 100}


def validation_rate(args, targs, device) -> float:
    """Images/s of train.py's validation embedding: the held-out images read from their files, forward only."""
    data = dataset.scan_dataset(args.data_dir, check_images=False)
    _, val = dataset.split_seen(data, targs.val_fraction, seed=dataset.VAL_SPLIT_SEED)
    paths = dataset.flatten(val["sketches"], data.seen)[0] + dataset.flatten(val["photos"], data.seen)[0]
    model, _ = train.build_model_and_optimizer(targs, 4, device)
    start = time.perf_counter()
    utils.embed_images(model.sketch_encoder, paths, targs.image_size, 2 * targs.batch_size, targs.workers, device,
                       targs.amp)
    return len(paths) / (time.perf_counter() - start)


def sketchy_validation_share(targs, val_rate: float, loop_steps_rate: float) -> float:
    """Validation time / epoch time at Sketchy Extended's size with --val_fraction, from the measured rates."""
    seen = SKETCHY["seen"] / SKETCHY["classes"]
    val_images = targs.val_fraction * seen * (SKETCHY["sketches"] + SKETCHY["photos"])
    anchors = SKETCHY["photos"] if targs.sampling == "pairs" else SKETCHY["sketches"]
    steps = int((1 - targs.val_fraction) * seen * anchors) // targs.batch_size
    return (val_images / val_rate) / (steps / loop_steps_rate)


def main(args) -> None:
    device = utils.get_device(args.device)
    if not os.path.isdir(args.data_dir):
        raise utils.UserError(f"{args.data_dir} does not exist; run `make demo` or `bash download_data.sh demo` "
                              "first, or pass --data_dir")
    targs = train_args(args, device, "--workers", str(args.workers))
    if targs.workers == -1:
        targs.workers = utils.available_cpus()
    unit, per_step = targs.sampling, (2 if targs.sampling == "pairs" else 3) * targs.batch_size
    print(f"torch {torch.__version__}, device {device}, {torch.get_num_threads()} CPU threads, {os.cpu_count()} CPUs; "
          f"recipe {targs.recipe}: {targs.backbone} at {targs.image_size}px, batch {targs.batch_size} {unit} "
          f"({per_step} images), {targs.workers} loader workers; data {args.data_dir}")
    rates = loader_rates(args, targs, device)
    for name, rate in rates.items():
        print(f"(1) loader, {name:<20} {rate:9.1f} images/s  {rate / max(1, targs.workers):9.1f} per worker  "
              f"({rate / per_step * targs.batch_size:.1f} {unit}/s)")
    print(f"    after / before: {rates['after'] / rates['before']:.2f}x;  after + disk cache / before: "
          f"{rates['after + disk cache'] / rates['before']:.2f}x")
    if args.skip_model:
        return
    variants = [("fp32", False, False), ("fp32 + channels_last", False, True)]
    if device.type == "cuda":
        variants += [("--amp", True, False), ("--amp + channels_last", True, True)]
    model = {}
    for name, amp, cl in variants:
        vargs = train_args(args, device, "--amp" if amp else "--no-amp",
                           "--channels_last" if cl else "--no-channels_last")
        steps, mem = model_rate(args, vargs, device)
        model[(amp, cl)] = steps
        extra = f", peak GPU memory {mem:.0f} MiB" if device.type == "cuda" else ""
        print(f"(2) model alone, {name:<22} {steps * targs.batch_size:9.1f} {unit}/s  "
              f"({steps * per_step:.0f} images/s{extra})")
    default = (targs.amp and device.type == "cuda", targs.channels_last)
    loop = loop_rate(args, train_args(args, device), device)
    print(f"(3) train.py's loop, {args.steps}-step synthetic epoch: {loop * targs.batch_size:9.1f} {unit}/s  "
          f"({loop * per_step:.0f} images/s; train.py's defaults here: amp {default[0]}, channels_last {default[1]})")
    print(f"(4) loader (after) / model alone (defaults): {rates['after'] / (model[default] * per_step):.2f}  "
          f"(with the disk cache {rates['after + disk cache'] / (model[default] * per_step):.2f}; target >= 1.5)")
    print(f"    loop / model alone (defaults): {loop / model[default]:.2f}  (target >= 0.9)")
    val_rate = validation_rate(args, train_args(args, device, "--workers", str(targs.workers)), device)
    share = sketchy_validation_share(targs, val_rate, loop)
    print(f"(5) validation: {val_rate:.1f} images/s; at Sketchy Extended's size an epoch would take "
          f"{share:.1%} more for validation (target <= 10%)")


if __name__ == "__main__":
    utils.run_cli(main, get_args_parser())
