"""Evaluate a trained model on the unseen classes: mAP@all, P@100, mAP@200, P@200, retrieval grids.

    python evaluate.py --model ckpt/best.pth --data data/sketchy --num_sketches 10 --num_images 5
    python evaluate.py --model ckpt/best.pth --data data/demo --compare_untrained --output_dir results

Every unseen-class sketch (DATA/test_labels.txt) queries the gallery of every unseen-class photo;
docs/metrics.md defines the metrics. Writes results.json and one PNG grid per random query sketch
(the sketch, then the top --num_images photos framed green when of the sketch's class, red if not).
"""
import argparse
import os

import numpy as np
import torch

import dataset
import metrics
import utils
from model import PretrainedWeightsUnavailable, ZSSBIRModel


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", type=str, required=True, help="checkpoint written by train.py (best.pth / last.pth)")
    p.add_argument("--data", type=str, required=True, help="dataset folder (see README: data layout)")
    p.add_argument("--num_images", type=int, default=5, help="photos shown per retrieval grid")
    p.add_argument("--num_sketches", type=int, default=10, help="random query sketches drawn as grids")
    p.add_argument("--batch_size", type=int, default=64, help="images per embedding batch")
    p.add_argument("--output_dir", type=str, default="", help="results folder (default: <model folder>/eval)")
    p.add_argument("--compare_untrained", action=argparse.BooleanOptionalAction, default=False,
                   help="also evaluate the same network at its (seeded) initialisation, as a baseline")
    p.add_argument("--workers", type=int, default=2, help="data loader processes")
    p.add_argument("--device", type=str, default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--amp", action=argparse.BooleanOptionalAction, default=True, help="autocast on CUDA")
    p.add_argument("--seed", type=int, default=0, help="seed for choosing the grid queries")
    return p


def check_args(args) -> None:
    for name in ("batch_size",):
        if getattr(args, name) < 1:
            raise utils.UserError(f"--{name} must be at least 1, got {getattr(args, name)}")
    for name in ("num_images", "num_sketches", "workers"):
        if getattr(args, name) < 0:
            raise utils.UserError(f"--{name} must not be negative, got {getattr(args, name)}")


def build_model(ckpt: dict, path: str, trained: bool) -> ZSSBIRModel:
    """The checkpoint's network: with its trained weights, or as initialised under its seed."""
    a = ckpt["args"]
    utils.seed_everything(a["seed"])
    model = ZSSBIRModel(a["backbone"], a["embedding_dim"], pretrained=a["pretrained"] and not trained)
    if trained:
        utils.load_model_state(model, ckpt, path)
    return model


def evaluate_model(model, sketches, photos, image_size: int, args, device) -> tuple[dict, torch.Tensor, torch.Tensor]:
    """Embed unseen sketches (queries) and photos (gallery); return metrics and both embeddings."""
    model.to(device)
    common = dict(image_size=image_size, batch_size=args.batch_size, workers=args.workers, device=device,
                  amp=args.amp)
    q = utils.embed_images(model.sketch_encoder, sketches[0], desc="embed sketches", **common)  # (Q, D)
    g = utils.embed_images(model.photo_encoder, photos[0], desc="embed photos", **common)      # (N, D)
    res = metrics.retrieval_metrics(q, torch.tensor(sketches[1]), g, torch.tensor(photos[1]), ks=(100, 200))
    return res, q, g


def summary(res: dict, classes: list) -> dict:
    """The JSON-able part of retrieval_metrics' output, per-class AP keyed by class name."""
    keys = ("map_all", "p@100", "map@100", "p@200", "map@200", "num_queries", "num_queries_without_relevant")
    out = {k: res[k] for k in keys if k in res}
    out["per_class_ap"] = {classes[c]: ap for c, ap in sorted(res["per_class_ap"].items())}
    return out


def save_grid(query_path: str, query_class: str, hits: list, out_path: str, image_size: int) -> None:
    """One row: the query sketch, then (path, class, score) photos framed green (right) or red (wrong)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(hits) + 1
    fig, axes = plt.subplots(1, n, figsize=(1.9 * n, 2.3))
    axes = np.atleast_1d(axes)
    panels = [(query_path, f"query: {query_class}", "black")]
    panels += [(p, f"{i + 1}. {c}\n{s:.3f}", "green" if c == query_class else "red")
               for i, (p, c, s) in enumerate(hits)]
    for ax, (path, title, colour) in zip(axes, panels):
        img = dataset.load_image(path).resize((max(image_size, 96),) * 2)
        ax.imshow(img)
        ax.set_title(title, fontsize=8, color=colour if colour != "black" else "black")
        ax.set_xticks([])
        ax.set_yticks([])
        for spine in ax.spines.values():
            spine.set_edgecolor(colour)
            spine.set_linewidth(4 if colour != "black" else 1)
    fig.tight_layout()
    utils.atomic_write(out_path, lambda f: fig.savefig(f, format="png", dpi=100))
    plt.close(fig)


def write_grids(q: torch.Tensor, g: torch.Tensor, sketches, photos, classes, args, image_size, out_dir) -> list:
    """Grids for --num_sketches seeded random queries; returns the PNG paths."""
    rng = np.random.default_rng(args.seed)
    picks = rng.choice(len(sketches[0]), size=min(args.num_sketches, len(sketches[0])), replace=False)
    k = min(args.num_images, len(photos[0]))
    scores = metrics.similarity(q[torch.as_tensor(picks)], g)  # (n, N)
    top = torch.topk(scores, k, dim=1)
    written = []
    for row, qi in enumerate(picks):
        hits = [(photos[0][j], classes[photos[1][j]], float(s)) for s, j in zip(top.values[row], top.indices[row])]
        name = f"grid_{row:02d}_{classes[sketches[1][qi]]}.png"
        save_grid(sketches[0][qi], classes[sketches[1][qi]], hits, os.path.join(out_dir, name), image_size)
        written.append(os.path.join(out_dir, name))
    return written


def main(args) -> None:
    check_args(args)
    ckpt = utils.load_checkpoint(args.model)
    out_dir = args.output_dir or os.path.join(os.path.dirname(os.path.abspath(args.model)), "eval")
    utils.ensure_dir(out_dir, "output folder")
    info = utils.print_banner("evaluate.py", args)
    device = utils.get_device(args.device)
    image_size = ckpt["args"]["image_size"]
    print(f"model {args.model}: {ckpt['args']['backbone']}, {ckpt['args']['embedding_dim']}-d, "
          f"{image_size}px, trained {ckpt['epoch']} epoch(s), seen-class val mAP@all {ckpt['best']:.4f}")

    data = dataset.scan_dataset(args.data)
    if data.skipped:
        print(f"warning: skipped {len(data.skipped)} unreadable image file(s), e.g. {data.skipped[0]}")
    sketches = dataset.flatten(data.sketches, data.unseen)  # (paths, labels)
    photos = dataset.flatten(data.photos, data.unseen)
    print(f"unseen classes: {len(data.unseen)}; {len(sketches[0])} query sketches, {len(photos[0])} gallery photos")

    res, q, g = evaluate_model(build_model(ckpt, args.model, trained=True), sketches, photos, image_size, args, device)
    chance = metrics.chance_map(torch.tensor(sketches[1]), torch.tensor(photos[1]))
    results = {"model": args.model, "data": args.data, "commit": info["commit"], "checkpoint_epoch": ckpt["epoch"],
               "num_gallery": len(photos[0]), "chance_map_all": chance, **summary(res, data.unseen)}
    print(f"unseen-class mAP@all {res['map_all']:.4f}   P@100 {res['p@100']:.4f}   "
          f"mAP@200 {res['map@200']:.4f}   P@200 {res['p@200']:.4f}")
    print(f"chance level mAP@all {chance:.4f}  (trained / chance = {res['map_all'] / chance:.2f}x)")
    if args.compare_untrained:
        base, _, _ = evaluate_model(build_model(ckpt, args.model, trained=False), sketches, photos, image_size,
                                    args, device)
        results["untrained"] = summary(base, data.unseen)
        print(f"untrained network mAP@all {base['map_all']:.4f}  (trained / untrained = "
              f"{res['map_all'] / base['map_all']:.2f}x)")
    results["grids"] = write_grids(q, g, sketches, photos, data.unseen, args, image_size, out_dir)
    utils.write_json(os.path.join(out_dir, "results.json"), results)
    worst = sorted(results["per_class_ap"].items(), key=lambda kv: kv[1])
    print("per-class AP: " + ", ".join(f"{c} {ap:.3f}" for c, ap in worst))
    print(f"wrote {os.path.join(out_dir, 'results.json')} and {len(results['grids'])} retrieval grid(s) to {out_dir}")


if __name__ == "__main__":
    utils.run_cli(main, get_args_parser(), (dataset.DataError, PretrainedWeightsUnavailable))
