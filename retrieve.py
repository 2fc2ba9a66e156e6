"""Search your own photos with sketches: rank every photo in a folder by its similarity to each query sketch.

    python retrieve.py --model runs/demo/best.pth --gallery data/demo/photos --query my_sketch.png
    python retrieve.py --model ckpt/best.pth --gallery ~/Pictures --query a.png b.jpg --topk 20 --json > hits.json
    python retrieve.py --model ckpt/best.pth --gallery ~/Pictures --query a.png --index ~/pictures.pt --faiss

The photos' embeddings are computed once and kept in an index file (--index, by default
OUTPUT_DIR/gallery_index.pt) with the model's identity, their precision and each file's path, size
and modification time; later runs embed only new or changed files and drop deleted ones, and a
different model or precision rebuilds it. Query sketches may have any size and aspect ratio, dark
strokes on white, light strokes on black, a transparent background, or be photos of a drawing on
paper (dataset.prepare_sketch); blank ones (no strokes: gallery.blank_reason) are refused, named in
one line. Search is exact, in chunks of the gallery (a million photos within bounded memory), or
approximate with --faiss. Prints each query's ranked photos (--json: one JSON
document on stdout, everything else on stderr) and writes a grid PNG per query and results.json
to --output_dir, replacing those of the previous run there.
"""
import argparse
import contextlib
import json
import os
import sys
import time

import torch

import dataset
import gallery
import utils
from model import PretrainedWeightsUnavailable


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                parents=[utils.common_parser(64, "images per embedding batch")],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", type=str, required=True, help="checkpoint written by train.py (best.pth / last.pth)")
    p.add_argument("--gallery", type=str, required=True, help="folder of photos to search (sub-folders included)")
    p.add_argument("--query", type=str, nargs="+", required=True, help="query sketch image(s)")
    p.add_argument("--topk", type=int, default=10, help="photos returned per query")
    p.add_argument("--output_dir", "--output", type=str, default="",
                   help="folder for the grids, results.json and the index; empty: retrieval/ beside the model "
                        "(--output is its older name)")
    p.add_argument("--index", type=str, default="",
                   help=f"gallery index file, reused and updated across runs; empty: OUTPUT_DIR/{gallery.INDEX_NAME}")
    p.add_argument("--faiss", action=argparse.BooleanOptionalAction, default=False,
                   help="approximate search with a faiss index (needs: pip install faiss-cpu)")
    p.add_argument("--nprobe", type=int, default=32, help="with --faiss: inverted lists visited per query")
    p.add_argument("--chunk", type=int, default=65536, help="gallery rows scored at once by exact search")
    p.add_argument("--json", action=argparse.BooleanOptionalAction, default=False,
                   help="print one JSON document on stdout (all other messages go to stderr)")
    p.add_argument("--grids", action=argparse.BooleanOptionalAction, default=True,
                   help="write a PNG per query: the prepared sketch, then its top photos with their scores")
    return p


def check_args(args) -> None:
    for name in ("topk", "batch_size", "chunk", "nprobe"):
        if getattr(args, name) < 1:
            raise utils.UserError(f"--{name} must be at least 1, got {getattr(args, name)}")
    args.workers = utils.resolve_workers(args.workers)


# ----------------------------------------------------------------------------------- inputs

def read_queries(paths: list) -> list:
    """Every query sketch, prepared (gallery.load_query); a missing or unreadable file is a UserError, and so are
    blank ones (gallery.blank_reason), all of them named in one line."""
    sketches, blanks = [], []
    for path in paths:
        if not os.path.isfile(path):
            raise utils.UserError(f"query sketch {path} not found; pass image files (PNG, JPEG, ...) to --query")
        try:
            sketch, blank = gallery.load_query(path)
        except dataset.IMAGE_ERRORS as e:
            raise utils.UserError(f"cannot read query sketch {path} as an image ({type(e).__name__}); "
                                  f"pass a PNG, JPEG or other image file") from None
        sketches.append(sketch)
        if blank:
            blanks.append((f"query sketch {path}" if len(paths) == 1 else path, blank))
    if blanks:
        raise utils.UserError(gallery.blank_message(blanks, len(paths)))
    return sketches


def gallery_files(folder: str, root: str, out_dir: str) -> tuple[list, list, list]:
    """scan_gallery of the --gallery folder (``root``: its real path), leaving out the output folder; a gallery
    that is the output folder or holds no image file is a UserError."""
    if os.path.realpath(out_dir) == root:
        raise utils.UserError(f"--output_dir {out_dir} is the gallery folder; its grids would be searched next "
                              "time, so choose another folder")
    files, others, outputs = gallery.scan_gallery(root, exclude=os.path.realpath(out_dir))
    if not files:
        raise utils.UserError(f"gallery {folder} holds no image files ({', '.join(dataset.IMAGE_EXTENSIONS)}); "
                              "pass the folder that holds your photos")
    return files, others, outputs


# ----------------------------------------------------------------------------------- output

def grid_name(i: int, query_path: str) -> str:
    stem = os.path.splitext(os.path.basename(query_path))[0]
    return f"grid_{i + 1:02d}_{''.join(c if c.isalnum() or c in '-_' else '_' for c in stem)[:40]}.png"


def clear_previous_results(out_dir: str) -> None:
    """Delete what an earlier run wrote in the output folder: its results.json first, then its grids
    (grid_NN_*.png, those of an interrupted run too), so the folder never holds two runs' results at once."""
    removed = utils.remove_outputs(out_dir, (gallery.RESULTS_NAME,))
    had_results = os.path.join(out_dir, gallery.RESULTS_NAME) in removed
    grids = removed[1:] if had_results else removed
    if removed:
        print(f"removed an earlier run's {'results.json and ' if had_results else ''}{len(grids)} grid(s) from "
              f"{out_dir}")


def report_queries(args, sketches: list, paths: list, scores: torch.Tensor, rows: torch.Tensor,
                   out_dir: str) -> list:
    """Print each query's ranked photos (gallery ``paths`` at ``rows``, (Q, k)) and write its grid; returns
    the queries' entries of results.json."""
    results = []
    for i, query in enumerate(args.query):
        hits = [(os.path.join(args.gallery, paths[r]), s)
                for s, r in zip(scores[i].tolist(), rows[i].tolist()) if r >= 0]
        grid = os.path.join(out_dir, grid_name(i, query)) if args.grids else None
        if grid:
            utils.save_retrieval_grid(sketches[i], f"query\n{os.path.basename(query)[:24]}",
                                      [(p, f"{r + 1}. {s:.3f}\n{os.path.basename(p)[:22]}", None)
                                       for r, (p, s) in enumerate(hits)], grid, per_row=5)
        results.append({"query": query, "grid": grid, "results": [{"rank": r + 1, "path": p, "score": s}
                                                                  for r, (p, s) in enumerate(hits)]})
        print(f"\nquery {i + 1}/{len(args.query)}: {query}" + (f"  (grid: {grid})" if grid else ""))
        print(f"{'rank':>4}  {'score':>6}  photo")
        for r, (path, score) in enumerate(hits):
            print(f"{r + 1:>4}  {score:6.3f}  {path}")
    return results


# ----------------------------------------------------------------------------------- main

def main(args) -> None:
    check_args(args)
    stdout = sys.stdout
    with contextlib.redirect_stdout(sys.stderr if args.json else sys.stdout):
        doc = run(args)
    if args.json:
        print(json.dumps(doc, indent=2), file=stdout)


def run(args) -> dict:
    """Everything but the JSON document: checks, index, gallery.search, printed ranking, grids, results.json."""
    # The inputs are checked before anything is written: the index first (its check is the quickest).
    out_dir = args.output_dir or os.path.join(os.path.dirname(os.path.abspath(args.model)), "retrieval")
    index_path = args.index or os.path.join(out_dir, gallery.INDEX_NAME)
    old_index = gallery.load_index(index_path)
    ckpt = utils.load_checkpoint(args.model)
    if not os.path.isdir(args.gallery):
        what = "is not a folder" if os.path.exists(args.gallery) else "does not exist"
        raise utils.UserError(f"gallery {args.gallery} {what}; pass the folder that holds your photos")
    sketches = read_queries(args.query)
    faiss = gallery.import_faiss() if args.faiss else None
    root = os.path.realpath(args.gallery)
    source = gallery.GallerySource(args.gallery, root, index_path, *gallery_files(args.gallery, root, out_dir),
                                   old_index)
    device = utils.get_device(args.device)
    # weights that do not fit: an error, nothing written
    model = utils.build_model(ckpt, args.model, trained=True).to(device)
    utils.ensure_dir(out_dir, "output folder")
    utils.ensure_dir(os.path.dirname(os.path.abspath(index_path)), "index folder")
    info = utils.print_banner("retrieve.py", args)

    cfg = utils.checkpoint_model(ckpt)
    settings = gallery.EmbedSettings(cfg.image_size, args.batch_size, args.workers, device, args.amp)
    fingerprint = utils.model_fingerprint(ckpt)
    print(gallery.describe_model(args.model, ckpt, settings, fingerprint))
    index, counts, skipped = gallery.build_index(source, gallery.model_identity(ckpt), settings, model.photo_encoder,
                                                 args.model)
    queries = gallery.embed_sketches(model.sketch_encoder, sketches, cfg.image_size, args.batch_size, device,
                                     args.amp)  # (Q, D)
    scores, rows, seconds = search_index(args, faiss, index, queries, index_path)

    clear_previous_results(out_dir)
    results = report_queries(args, sketches, index["paths"], scores, rows, out_dir)
    doc = {"format": gallery.RESULTS_FORMAT, "model": args.model, "model_fingerprint": fingerprint,
           "model_epoch": ckpt["epoch"], "model_step": ckpt["step"], "precision": settings.precision,
           "gallery": args.gallery, "index": index_path, "commit": info["commit"],
           "search": "faiss" if faiss is not None else "exact", "search_seconds": seconds,
           "index_counts": counts, "skipped_files": skipped, "skipped_folders": source.outputs, "queries": results,
           "args": vars(args)}
    utils.write_json(os.path.join(out_dir, gallery.RESULTS_NAME), doc)
    print(f"\nwrote results.json{' and the grids' if args.grids else ''} to {out_dir}")
    return doc


def search_index(args, faiss, index: dict, queries: torch.Tensor, index_path: str) -> tuple:
    """Rank the index's photos for the queries (Q, D), exactly or with faiss: (scores (Q, k), rows (Q, k), seconds)."""
    start = time.perf_counter()
    if faiss is not None:
        built = gallery.cached_faiss_index(faiss, index, os.path.splitext(index_path)[0] + ".faiss")
        scores, rows = gallery.faiss_search(built, queries, args.topk, args.nprobe)
    else:
        scores, rows = gallery.search(queries, index["embeddings"], args.topk, args.chunk)
    seconds = time.perf_counter() - start
    print(f"searched {len(index['paths'])} photos for {len(queries)} sketch(es) in {seconds:.3f} s "
          f"({'faiss, approximate' if faiss is not None else 'exact'})")
    return scores, rows, seconds


if __name__ == "__main__":
    utils.run_cli(main, get_args_parser(), (dataset.DataError, PretrainedWeightsUnavailable))
