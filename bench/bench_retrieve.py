"""Speed of retrieve.py: search time per query over 100,000 and 1,000,000 photos, and index build time.

    python bench/bench_retrieve.py                         # exact (and faiss, if installed), 1e5 and 1e6 photos
    python bench/bench_retrieve.py --sizes 100000 --build_images 200 --no-prep_check

Prints (1) exact search (gallery.search) over seeded random unit 512-d float32 gallery embeddings:
seconds per query for one query alone and within a batch of --queries, best of --repeats, and the
process's peak memory during the search beyond the gallery itself; (2) when faiss is importable,
gallery.faiss_index's build time, and for each --nprobe the seconds per query and the recall@k of
its top k against the exact one (random vectors have no clusters: the worst case for inverted lists);
(3) the time to build a gallery index (gallery.update_index: scan, embed, save) per 1,000 photos
at the demo's size (64 px JPEGs drawn by demo_data.py into a temporary folder; shufflenet_v2_x1_0,
128-d, untrained weights, retrieve.py's default --batch_size and --workers), and to reuse it;
(4) with --prep_check and the demo's model and data present: how many of the demo's unseen-class sketches
gallery.blank_reason calls blank (none should be), and their mAP@all as drawn, through prepare_sketch,
inverted, on a 3:1 canvas and small on a large canvas.
Target (issue 6): exact search of 1,000,000 embeddings in under 1 s per query on 2 CPU cores.
"""
import argparse
import functools
import os
import resource
import sys
import tempfile
import time

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import dataset  # noqa: E402
import demo_data  # noqa: E402
import gallery  # noqa: E402
import retrieve  # noqa: E402
import utils  # noqa: E402
from model import ZSSBIRModel  # noqa: E402


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[100000, 1000000], help="gallery sizes")
    p.add_argument("--dim", type=int, default=512, help="embedding size")
    p.add_argument("--queries", type=int, default=10, help="queries in the batched timing")
    p.add_argument("--topk", type=int, default=10, help="photos returned per query")
    p.add_argument("--repeats", type=int, default=3, help="timed runs; the best is reported")
    p.add_argument("--faiss", action=argparse.BooleanOptionalAction, default=True,
                   help="also time faiss when it is importable")
    p.add_argument("--nprobe", type=int, nargs="+", default=[8, 32, 128, 512],
                   help="faiss inverted lists visited per query, each timed")
    p.add_argument("--build_images", type=int, default=1000, help="photos in the index build timing (0: skip)")
    p.add_argument("--prep_check", action=argparse.BooleanOptionalAction, default=True,
                   help="(4): needs --model and --data_dir")
    p.add_argument("--model", type=str, default="runs/demo/best.pth", help="checkpoint for (4)")
    p.add_argument("--data_dir", "--data", type=str, default="data/demo",
                   help="dataset for (4) (--data is its older name)")
    p.add_argument("--seed", type=int, default=0, help="seed of the synthetic embeddings and photos")
    return p


def peak_rss_reset() -> bool:
    """Reset the kernel's peak-RSS mark of this process (Linux); False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_mib() -> float:
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def current_rss_mib() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024


def unit_rows(n: int, dim: int, gen: torch.Generator) -> torch.Tensor:
    """n seeded random unit vectors (n, dim) float32, made in slices (no second full-size temporary)."""
    out = torch.empty(n, dim)
    for s in range(0, n, 65536):
        out[s:s + 65536] = torch.nn.functional.normalize(torch.randn(min(65536, n - s), dim, generator=gen), dim=1)
    return out


def recall(rows: torch.Tensor, ref_rows: torch.Tensor) -> float:
    """Mean over queries of the fraction of the exact top k that the approximate top k holds."""
    return float(np.mean([len(set(a) & set(b)) / len(b) for a, b in zip(rows.tolist(), ref_rows.tolist())]))


def best_of(fn, repeats: int) -> tuple[float, object]:
    best, out = float("inf"), None
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t)
    return best, out


def bench_search(args, faiss) -> dict:
    """(1) and (2) for every gallery size; returns {size: exact seconds per single query}."""
    single = {}
    for n in args.sizes:
        gen = torch.Generator().manual_seed(args.seed)
        g = unit_rows(n, args.dim, gen)          # (N, D)
        q = unit_rows(args.queries, args.dim, gen)  # (Q, D)
        print(f"\ngallery {n:,} x {args.dim}-d float32 ({g.numel() * 4 / 2**20:.0f} MiB), top {args.topk}")
        exact = functools.partial(gallery.search, gallery=g, k=args.topk)
        reset = peak_rss_reset()
        base = current_rss_mib()
        t1, _ = best_of(lambda: exact(q[:1]), args.repeats)
        tq, (ref_scores, ref_rows) = best_of(lambda: exact(q), args.repeats)
        extra = f"peak memory {peak_rss_mib() - base:.0f} MiB above the process's {base:.0f} MiB" if reset else \
            f"peak RSS of the process {peak_rss_mib():.0f} MiB"
        single[n] = t1
        print(f"  exact  1 query      {t1:8.4f} s/query")
        print(f"  exact  {args.queries} queries   {tq / args.queries:8.4f} s/query  "
              f"({tq:.3f} s for the batch; {extra})")
        if faiss is not None:
            t_build, built = best_of(functools.partial(gallery.faiss_index, faiss, g, args.seed), 1)
            kind = type(built).__name__ + (f", {built.nlist} lists" if hasattr(built, "nlist") else "")
            print(f"  faiss  build        {t_build:8.2f} s  ({kind})")
            default = retrieve.get_args_parser().get_default("nprobe")
            for nprobe in args.nprobe if hasattr(built, "nlist") else [default]:
                f1, _ = best_of(lambda: gallery.faiss_search(built, q[:1], args.topk, nprobe), args.repeats)
                fq, (_, rows) = best_of(lambda: gallery.faiss_search(built, q, args.topk, nprobe), args.repeats)
                print(f"  faiss  nprobe {nprobe:<4}  {f1:8.4f} s/query alone, {fq / args.queries:8.4f} s/query in the "
                      f"batch; recall@{args.topk} vs exact {recall(rows, ref_rows):.3f}"
                      + ("  (retrieve.py's default)" if nprobe == default else ""))
        del g
    return single


def bench_build(args) -> None:
    """(3): build a gallery index of --build_images demo-sized photos, then reuse it."""
    defaults = retrieve.get_args_parser().parse_args(["--model", "m", "--gallery", "g", "--query", "q"])
    retrieve.check_args(defaults)  # --workers -1 -> the number retrieve.py uses
    with tempfile.TemporaryDirectory() as tmp:
        names = demo_data.class_names()
        rng = np.random.default_rng(args.seed)
        t = time.perf_counter()
        for i in range(args.build_images):
            folder = os.path.join(tmp, "photos", names[i % len(names)])
            os.makedirs(folder, exist_ok=True)
            photo = demo_data.render_photo(names[i % len(names)], rng, 64)
            photo.save(os.path.join(folder, f"{i:05d}.jpg"), quality=90)  # as demo_data.py writes them
        print(f"\nindex build: {args.build_images} generated 64 px photos "
              f"({time.perf_counter() - t:.1f} s to draw them); "
              f"shufflenet_v2_x1_0, 128-d, batch {defaults.batch_size}, {defaults.workers} loader workers, "
              f"{torch.get_num_threads()} torch threads")
        utils.seed_everything(args.seed)
        model = ZSSBIRModel("shufflenet_v2_x1_0", 128, pretrained=False)
        ckpt = {"models": {k: m.state_dict() for k, m in model.named_children()},
                "args": {"backbone": "shufflenet_v2_x1_0", "embedding_dim": 128, "image_size": 64,
                         "pretrained": False}}
        root, path = os.path.join(tmp, "photos"), os.path.join(tmp, "index.pt")
        device = torch.device("cpu")
        settings = gallery.EmbedSettings(64, defaults.batch_size, defaults.workers, device, defaults.amp)

        def embed(paths):
            return gallery.embed_files(model.photo_encoder, paths, settings, "")

        for what in ("build", "reuse"):
            t = time.perf_counter()
            files, _, _ = gallery.scan_gallery(root, exclude="")
            _, counts = gallery.update_index(gallery.load_index(path), path, root, files,
                                              gallery.model_identity(ckpt), settings.precision, embed)
            seconds = time.perf_counter() - t
            print(f"  {what:<6} {seconds:7.2f} s  = {seconds / args.build_images * 1000:6.2f} s per 1,000 photos  "
                  f"({counts['embedded']} embedded, {counts['unchanged']} unchanged)")


def prep_check(args) -> None:
    """(4): does prepare_sketch keep the demo model's accuracy, and rescue badly framed sketches?"""
    import metrics

    ckpt = utils.load_checkpoint(args.model)
    model = utils.build_model(ckpt, args.model, trained=True).eval()
    size = ckpt["args"]["image_size"]
    data = dataset.scan_dataset(args.data_dir, check_images=False, class_split=ckpt["args"].get("class_split", ""))
    sketches, s_labels = dataset.flatten(data.sketches, data.unseen)
    photos, p_labels = dataset.flatten(data.photos, data.unseen)
    g = utils.embed_images(model.photo_encoder, photos, size, 128, 0, torch.device("cpu"), False)
    defaults = retrieve.get_args_parser().parse_args(["--model", args.model, "--gallery", "g", "--query", "q",
                                                      "--batch_size", "128"])

    def framed(im, canvas, at):
        out = Image.new("RGB", canvas, "white")
        out.paste(im, at)
        return out

    forms = {  # name -> image of a dataset sketch (RGB, black on white)
        "as drawn (what evaluate.py feeds)": lambda im: im,
        "prepare_sketch": dataset.prepare_sketch,
        "inverted, then prepare_sketch": lambda im: dataset.prepare_sketch(Image.eval(im, lambda v: 255 - v)),
        "3:1 canvas, stretched": lambda im: framed(im, (3 * im.width, im.height), (im.width, 0)),
        "3:1 canvas, prepare_sketch": lambda im: dataset.prepare_sketch(
            framed(im, (3 * im.width, im.height), (im.width, 0))),
        "small in a 4x canvas, as is": lambda im: framed(im, (4 * im.width,) * 2, (im.width // 3, 2 * im.height)),
        "small in a 4x canvas, prepare_sketch": lambda im: dataset.prepare_sketch(
            framed(im, (4 * im.width,) * 2, (im.width // 3, 2 * im.height))),
    }
    print(f"\nquery preparation: {len(sketches)} unseen-class sketches of {args.data_dir} against its {len(photos)} "
          f"unseen-class photos, model {args.model}")
    blank = [p for p in sketches if gallery.load_query(p)[1]]
    print(f"  blank by gallery.blank_reason (refused by retrieve.py and app.py): {len(blank)} of {len(sketches)}"
          + (f" (e.g. {blank[0]})" if blank else ""))
    for name, form in forms.items():
        q = gallery.embed_sketches(model.sketch_encoder, [form(dataset.load_image(p)) for p in sketches], size,
                                   defaults.batch_size, torch.device("cpu"), defaults.amp)
        res = metrics.retrieval_metrics(q, torch.tensor(s_labels), g, torch.tensor(p_labels), ks=(100,),
                                        protocols=("standard",))
        print(f"  {name:<38} mAP@all {res['protocols']['standard']['map_all']:.4f}")


def main(args) -> None:
    faiss = None
    if args.faiss:
        try:
            import faiss
        except ImportError:
            print("faiss is not installed (pip install faiss-cpu): timing exact search only")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads"
          + (f", faiss {faiss.__version__}" if faiss is not None else ""))
    single = bench_search(args, faiss)
    if args.build_images > 0:
        bench_build(args)
    if args.prep_check:
        if os.path.isfile(args.model) and os.path.isdir(args.data_dir):
            prep_check(args)
        else:
            print(f"\nquery preparation check skipped: {args.model} or {args.data_dir} is missing "
                  "(make demo writes both)")
    if 1000000 in single:
        t = single[1000000]
        print(f"\nexact search of 1,000,000 embeddings: {t:.3f} s per query "
              f"(target < 1 s: {'met' if t < 1 else 'NOT met'})")


if __name__ == "__main__":
    utils.run_cli(main, get_args_parser(), (dataset.DataError,))
