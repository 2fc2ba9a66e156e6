"""The recipe ablation: train each variant for N seeds with a fixed amount of work, print one table.

    python bench/bench_recipes.py --data_dir data/demo --budget_tflops 4
    python bench/bench_recipes.py --data_dir /tmp/emoji-dev --budget_tflops 73 --variants default domain_loss
    python bench/bench_recipes.py --data_dir /tmp/emoji-dev --budget_minutes 4 --variants default no_edge_maps:1

A variant written NAME:N runs N seeds instead of --seeds.

Each run is `train.py --epochs E --seed S <variant flags>` (or --budget_tflops T: the same training compute for
every variant, the fair comparison; or --budget_minutes M: a wall-clock budget, whose figures hold only on the
machine that ran them) then `evaluate.py` on the unseen classes (standard convention); its results are kept
under --output_dir/<dataset>/<e{E}, t{T} or m{M}>/<variant>/seed<S>/ and reused by later calls
(delete them, or pass --rerun, to train again), so a long ablation can be built up in pieces. The table gives
mean +/- standard deviation over the seeds (sample std, n - 1) of unseen mAP@all, P@100 and P@200, beside
chance, the untrained network (the first variant's seed 0 at its initialisation) and a training-free
edge-matching baseline computed here, and the work behind each row: training steps, images and FLOPs
(train.py's counts, in last.pth), with the minutes it took on this machine beside them.
"""
import argparse
import concurrent.futures
import json
import os
import statistics
import subprocess
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import dataset  # noqa: E402
import metrics  # noqa: E402
import utils  # noqa: E402

# issue 33's steps: the scratch recipe before it (resnet18 at 32 px), resnet18_w32 at the same input size, and its
# first recipe (resnet18_w16 at 64 px with flips, lr 2e-3), the bases of its variants
RESNET18_32PX = ["--backbone", "resnet18", "--image_size", "32", "--no-test_flip", "--test_shift", "0", "--lr", "0.002"]
W32_32PX = ["--backbone", "resnet18_w32", "--image_size", "32", "--test_shift", "0", "--lr", "0.002"]
W16 = ["--backbone", "resnet18_w16"]  # the default below 48 TFLOP (configs/scratch.yaml's --backbone_from_tflops)
W16_64PX = [*W16, "--test_shift", "0", "--lr", "0.002"]

# variant name -> train.py flags added to the defaults (--no-pretrained: the from-scratch recipe)
VARIANTS = {
    "default": [],
    # issue 33's ablation (docs/results.md): the scratch recipe before it, the steps from it to today's
    # (resnet18_w16 at 64 px with flips and shifts, lr 8e-3), and the ideas measured that it did not keep
    "resnet18_32px": RESNET18_32PX,
    "test_flip": [*RESNET18_32PX, "--test_flip"],
    "lr_0.004": [*RESNET18_32PX, "--lr", "0.004"],
    "batch_32": [*RESNET18_32PX, "--batch_size", "32"],
    "resnet18_w32": W32_32PX,
    "resnet18_w32_no_flip": [*W32_32PX, "--no-test_flip"],
    "resnet18_w16": [*W16_64PX, "--image_size", "32"],
    "resnet18_w16_no_flip": [*W16_64PX, "--image_size", "32", "--no-test_flip"],
    "resnet18_w32_wd_0.05": [*W32_32PX, "--weight_decay", "0.05"],
    "resnet18_w32_aug": [*W32_32PX, "--crop_scale", "0.25", "--thicken", "0.5"],
    "resnet18_w16_128px": [*W16_64PX, "--image_size", "128"],
    "resnet18_w16_64px": W16_64PX,
    "w16_96px": [*W16_64PX, "--image_size", "96"],
    "w16_batch_32": [*W16_64PX, "--batch_size", "32"],
    "w16_lr_0.004": [*W16_64PX, "--lr", "0.004"],
    "w16_lr_0.004_warmup_0.1": [*W16_64PX, "--lr", "0.004", "--warmup", "0.1"],
    "w16_lr_0.004_batch_32": [*W16_64PX, "--lr", "0.004", "--batch_size", "32"],
    "w16_lr_0.008": [*W16, "--test_shift", "0"],
    "w16_lr_0.008_batch_32": [*W16, "--test_shift", "0", "--batch_size", "32"],
    "w16_batch_32_shift_2": [*W16, "--batch_size", "32"],  # today's recipe below 48 TFLOP with batches of 32
    "w16_lr_0.016": [*W16, "--test_shift", "0", "--lr", "0.016"],
    "w16_wd_0.05": [*W16, "--weight_decay", "0.05"],  # today's recipe below 48 TFLOP with AdamW's decay at 0.05
    "wd_0.05": ["--weight_decay", "0.05"],  # today's recipe at any budget with AdamW's decay at 0.05
    "w16_shift_2": [*W16, "--lr", "0.002"],
    # the third step's candidates: more network for the budget at today's lr and shifts
    "w32_64px": ["--backbone", "resnet18_w32"],
    "w16": W16,
    "w16_128px_shift_4": [*W16, "--image_size", "128", "--test_shift", "4"],
    # the recipe's parts and earlier ablations
    "domain_loss": ["--domain_loss_ratio", "0.1", "--domain_label_smoothing", "0.2"],
    "domain_loss_plain": ["--domain_loss_ratio", "0.1"],
    "no_edge_maps": ["--no-edge_maps"],
    "two_branches": ["--no-shared_trunk"],
    "domain_bn": ["--domain_bn"],
    "triplet": ["--triplet_loss_ratio", "1"],
    "thicken": ["--thicken", "0.5"],
    # the paper's preset with what this machine forces: no ImageNet weights, so resnet18, at 32 px
    "original": ["--recipe", "original", "--backbone", "resnet18", "--image_size", "32"],
}


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data_dir", type=str, default="data/demo", help="dataset folder")
    p.add_argument("--variants", type=str, nargs="+", default=list(VARIANTS),
                   help="variants to train, NAME or NAME:SEEDS (names: " + ", ".join(VARIANTS) + ")")
    p.add_argument("--seeds", type=int, default=3, help="runs per variant, seeds 0 .. N-1")
    p.add_argument("--epochs", type=int, default=0, help="train.py --epochs of every run")
    p.add_argument("--budget_tflops", type=float, default=0.0,
                   help="train.py --budget_tflops of every run instead of --epochs (equal compute for every variant)")
    p.add_argument("--budget_minutes", type=float, default=0.0,
                   help="train.py --budget_minutes of every run instead of --epochs (a figure of this machine only)")
    p.add_argument("--output_dir", "--out_dir", type=str, default="runs/bench_recipes",
                   help="runs and results go here (--out_dir is its older name)")
    p.add_argument("--train_args", type=str, default="", help="extra train.py flags for every run, one string")
    p.add_argument("--workers", type=int, default=2, help="train.py and evaluate.py --workers")
    p.add_argument("--device", type=str, default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--rerun", action="store_true", help="train again even where results exist")
    p.add_argument("--jobs", type=int, default=1,
                   help="runs at once, each with an equal share of the CPU threads (another thread count may sum "
                        "in another order, within the seed spread; the minutes then say little)")
    return p


def amount(args) -> list:
    """The train.py flag and value of every run's work: --epochs, --budget_tflops or --budget_minutes."""
    for name in ("epochs", "budget_tflops", "budget_minutes"):
        if getattr(args, name):
            return [f"--{name}", f"{getattr(args, name):g}"]
    return []


def run(cmd: list, log: str, threads: int = 0) -> None:
    """Run ``cmd`` with its output in ``log``; ``threads`` > 0 caps its CPU threads (OMP_NUM_THREADS)."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)} if threads else None
    with open(log, "w") as f:
        proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env)
    if proc.returncode:
        sys.exit(f"error: {' '.join(cmd[:2])} failed (exit {proc.returncode}); see {log}")


def results_dir(args) -> str:
    """Where the runs of one dataset and one amount of work live: OUTPUT_DIR/<dataset>/e<epochs>, t<TFLOP> or
    m<minutes>."""
    flag, value = amount(args)
    work = {"--epochs": "e", "--budget_tflops": "t", "--budget_minutes": "m"}[flag] + value
    return os.path.join(args.output_dir, os.path.basename(os.path.normpath(args.data_dir)), work)


def threads(args) -> int:
    """CPU threads per run: all of them for one run at a time (0: torch's default), else an equal share."""
    return 0 if args.jobs == 1 else max(1, (os.cpu_count() or 1) // args.jobs)


def unfinished(last: dict, args) -> str:
    """Why a run's last.pth fell short of the work asked (train.py stopped early, e.g. by SIGTERM, also exits 0
    with a checkpoint), or "" when it did all of it."""
    flag, value = amount(args)
    if flag == "--budget_tflops" and last["work"]["flops"] < args.budget_tflops * 1e12:
        return f"{utils.flops_text(last['work']['flops'])} of {flag} {value}"
    if flag == "--epochs" and last["epoch"] < args.epochs:
        return f"{last['epoch']} of {flag} {value}"
    if flag == "--budget_minutes" and last["seconds"] < args.budget_minutes * 60:
        return f"{last['seconds'] / 60:.1f} of {flag} {value}"
    return ""


def train_and_evaluate(args, variant: str, seed: int, untrained: bool) -> dict:
    """results.json of one run (trained now unless it exists)."""
    folder = os.path.join(results_dir(args), variant, f"seed{seed}")
    result = os.path.join(folder, "eval", "results.json")
    if os.path.isfile(result) and not args.rerun:
        return json.load(open(result))
    if os.path.isfile(os.path.join(folder, "args.json")) and not args.rerun:
        sys.exit(f"error: {folder} holds a run without results (running, stopped or failed): delete the folder, "
                 "or pass --rerun to train it anew")
    os.makedirs(folder, exist_ok=True)
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    common = ["--workers", str(args.workers), "--device", args.device]
    run([sys.executable, os.path.join(here, "train.py"), "--data_dir", args.data_dir, "--checkpoint_dir", folder,
         "--no-pretrained", *amount(args), "--seed", str(seed), "--print_every", "50", "--overwrite",
         *common, *VARIANTS[variant], *args.train_args.split()], os.path.join(folder, "train.log"), threads(args))
    last = torch.load(os.path.join(folder, "last.pth"), map_location="cpu", weights_only=False)
    short = unfinished(last, args)
    if short:
        sys.exit(f"error: {folder} stopped after {short}, so its figure would not be this work's: rerun it "
                 "(--rerun)")
    run([sys.executable, os.path.join(here, "evaluate.py"), "--model", os.path.join(folder, "best.pth"),
         "--data_dir", args.data_dir, "--output_dir", os.path.join(folder, "eval"), "--num_sketches", "0",
         "--protocol", "standard", *(["--compare_untrained"] if untrained else []), *common],
        os.path.join(folder, "eval.log"), threads(args))
    doc = json.load(open(result))
    doc["training"] = {**last["work"], "minutes": last["seconds"] / 60}  # the whole run's work, and its time here
    utils.write_json(result, doc)
    print(f"  {variant} seed {seed}: mAP@all {doc['map_all']:.4f}  ({last['work']['steps']} steps, "
          f"{last['seconds'] / 60:.1f} min)", flush=True)
    return doc


def edge_vector(path: str, edges: bool) -> np.ndarray:
    """A training-free descriptor: the grey image (or the photo's edge map) at 32x32, ink as signal,
    zero mean and unit norm."""
    im = dataset.load_image(path)
    if edges:
        im = dataset.edge_map(im.resize((64, 64)))
    a = 255.0 - np.asarray(im.convert("L").resize((32, 32)), dtype=np.float32).ravel()
    a -= a.mean()
    return a / (np.linalg.norm(a) + 1e-8)


def edge_baseline(data_dir: str) -> dict:
    """Unseen-class mAP@all, P@100 and P@200 of ranking photos by the cosine of their edge maps to the sketch."""
    data = dataset.scan_dataset(data_dir, check_images=False)
    sk, sl = dataset.flatten(data.sketches, data.unseen)
    ph, pl = dataset.flatten(data.photos, data.unseen)
    q = torch.tensor(np.stack([edge_vector(p, False) for p in sk]))
    g = torch.tensor(np.stack([edge_vector(p, True) for p in ph]))
    res = metrics.retrieval_metrics(q, torch.tensor(sl), g, torch.tensor(pl), ks=(100, 200))
    return {k: res["protocols"]["standard"][k] for k in ("map_all", "p@100", "p@200")}


def mean_std(values: list) -> str:
    if len(values) == 1 or len(set(values)) == 1:
        return f"{values[0]:.4f}"
    return f"{statistics.mean(values):.4f} +/- {statistics.stdev(values):.4f}"


def main(args) -> None:
    if not os.path.isdir(args.data_dir):
        sys.exit(f"error: {args.data_dir} does not exist; build it first (make demo, or emoji-dev's build.sh)")
    if sum(x > 0 for x in (args.epochs, args.budget_tflops, args.budget_minutes)) != 1:
        sys.exit("error: give the work of every run as --epochs E, --budget_tflops T or --budget_minutes M (one)")
    plan = {}
    for item in args.variants:
        name, _, n = item.partition(":")
        if name not in VARIANTS or (n and not n.isdigit()):
            sys.exit(f"error: unknown variant {item!r}; write NAME or NAME:SEEDS with NAME one of "
                     f"{', '.join(VARIANTS)}")
        plan[name] = int(n) if n else args.seeds
    print(f"bench_recipes: {args.data_dir}, {' '.join(amount(args))} per run, "
          + ", ".join(f"{v} x {n} seed(s)" for v, n in plan.items()), flush=True)
    first_name = next(iter(plan))
    runs = [(v, s) for v, n in plan.items() for s in range(n)]
    with concurrent.futures.ThreadPoolExecutor(args.jobs) as pool:  # each run is its own processes
        done = dict(zip(runs, pool.map(lambda r: train_and_evaluate(args, *r, untrained=r == (first_name, 0)), runs)))
    rows = {v: [done[(v, s)] for s in range(n)] for v, n in plan.items()}
    first = rows[first_name][0]
    keys = ("map_all", "p@100", "p@200")
    table = {"chance": {"map_all": [first["chance_map_all"]]}}
    if "untrained" in first:
        table["untrained network (seed 0)"] = {k: [first["untrained"][k]] for k in keys}
    edges = edge_baseline(args.data_dir)
    table["edge matching, training-free"] = {k: [edges[k]] for k in keys}
    work = ("steps", "images", "flops", "minutes")
    for v, results in rows.items():
        table[v] = {k: [r[k] for r in results] for k in keys}
        table[v].update({k: [r["training"][k] for r in results] for k in work if "training" in results[0]})
    print(f"\n{'variant':30s} {'runs':>4s} " + " ".join(f"{k:>17s}" for k in ("unseen mAP@all", "P@100", "P@200"))
          + f" {'steps':>7s} {'images':>10s} {'TFLOP':>7s} {'minutes':>7s}  flags")
    for name, r in table.items():
        done = (f" {statistics.mean(r['steps']):7.0f} {statistics.mean(r['images']):10,.0f} "
                f"{statistics.mean(r['flops']) / 1e12:7.2f} {statistics.mean(r['minutes']):7.2f}" if "steps" in r
                else " " * 36)
        print(f"{name:30s} {len(r['map_all']):4d} " + " ".join(f"{mean_std(r[k]) if k in r else '':>17s}" for k in keys)
              + done + "  " + " ".join(VARIANTS.get(name, [])))
    print("(steps, images and TFLOP: train.py's counts, the mean over a row's runs; minutes: on this machine)")
    out = os.path.join(results_dir(args), "table.json")
    with open(out, "w") as f:
        json.dump({"epochs": args.epochs, "budget_tflops": args.budget_tflops, "budget_minutes": args.budget_minutes,
                   "seeds": args.seeds,
                   "torch_threads": torch.get_num_threads(), "table": table}, f, indent=1)
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main(get_args_parser().parse_args())
