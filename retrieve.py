"""Search your own photos with sketches: rank every photo in a folder by its similarity to each query sketch.

    python retrieve.py --model runs/demo/best.pth --gallery data/demo/photos --query my_sketch.png
    python retrieve.py --model ckpt/best.pth --gallery ~/Pictures --query a.png b.jpg --topk 20 --json > hits.json
    python retrieve.py --model ckpt/best.pth --gallery ~/Pictures --query a.png --index ~/pictures.pt --faiss

The photos' embeddings are computed once and kept in an index file (--index, by default
OUTPUT_DIR/gallery_index.pt) with the model's identity and each file's path, size and modification
time; later runs embed only new or changed files and drop deleted ones, and a different model
rebuilds it. Query sketches may have any size and aspect ratio, dark strokes on white, light
strokes on black, a transparent background, or be photos of a drawing on paper
(dataset.prepare_sketch). Search is exact, in chunks of the gallery (a million photos within
bounded memory), or approximate with --faiss. Prints each query's ranked photos (--json: one JSON
document on stdout, everything else on stderr) and writes a grid PNG per query and results.json
to --output_dir.
"""
import argparse
import contextlib
import hashlib
import json
import os
import stat
import sys
import time
import uuid

import numpy as np
import torch

import dataset
import metrics
import utils
from model import PretrainedWeightsUnavailable

INDEX_FORMAT = "zs-sbir-gallery-index/1"
INDEX_NAME = "gallery_index.pt"
QUERY_BLOCK = 256         # queries scored at once by exact search
FAISS_FLAT_BELOW = 50000  # smaller galleries get faiss's exact inner-product index, larger ones IVF lists


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
                   help=f"gallery index file, reused and updated across runs; empty: OUTPUT_DIR/{INDEX_NAME}")
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


def import_faiss():
    """The faiss module, imported only when --faiss asks for it."""
    try:
        import faiss
    except ImportError:
        raise utils.UserError("--faiss needs the faiss package (pip install faiss-cpu)") from None
    return faiss


# ----------------------------------------------------------------------------------- inputs

def read_queries(paths: list) -> list:
    """Every query sketch, prepared (dataset.prepare_sketch); a missing or unreadable file is a UserError."""
    sketches = []
    for path in paths:
        if not os.path.isfile(path):
            raise utils.UserError(f"query sketch {path} not found; pass image files (PNG, JPEG, ...) to --query")
        try:
            sketches.append(dataset.load_sketch(path))
        except dataset.IMAGE_ERRORS as e:
            raise utils.UserError(f"cannot read query sketch {path} as an image ({type(e).__name__}); "
                                  f"pass a PNG, JPEG or other image file") from None
    return sketches


def scan_gallery(root: str, exclude: str) -> tuple[list, list]:
    """Image files below ``root`` as sorted (relative path, size, mtime_ns), and the other files' paths.

    Hidden files and folders are left out, and so is the folder ``exclude`` (retrieve.py's output,
    whose grids would otherwise be searched on the next run).
    """
    files, others = [], []
    for folder, subfolders, names in os.walk(root):
        subfolders[:] = sorted(d for d in subfolders if not d.startswith(".")
                               and os.path.realpath(os.path.join(folder, d)) != exclude)
        for name in names:
            if name.startswith("."):
                continue
            path = os.path.join(folder, name)
            rel = os.path.relpath(path, root)
            try:
                st = os.stat(path)
            except OSError:  # a dangling link
                others.append(rel)
                continue
            if not stat.S_ISREG(st.st_mode):
                continue
            if name.lower().endswith(dataset.IMAGE_EXTENSIONS):
                files.append((rel, st.st_size, st.st_mtime_ns))
            else:
                others.append(rel)
    return sorted(files), sorted(others)


# ----------------------------------------------------------------------------------- the index

def model_identity(ckpt: dict) -> str:
    """sha256 of what a photo's embedding depends on: the photo encoder's weights, the backbone,
    the embedding size, the input size and the index format (the file's name and date do not count)."""
    cfg = utils.checkpoint_model(ckpt)
    h = hashlib.sha256(f"{INDEX_FORMAT}|{cfg.backbone}|{cfg.embedding_dim}|{cfg.image_size}".encode())
    photo = "photo_encoder" if "photo_encoder" in ckpt["models"] else "encoder"  # two branches or one shared trunk
    for name, t in sorted(ckpt["models"][photo].items()):
        h.update(f"|{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def load_index(path: str) -> dict | None:
    """The index at ``path``, None when there is none; any other file there is a UserError (never overwritten)."""
    if not os.path.exists(path):
        return None
    hint = "pass another --index (or delete the file to build a new index there)"
    index = utils.load_user_file(path, "gallery index", hint, mmap=True)
    def long_vector(v):
        return isinstance(v, torch.Tensor) and v.ndim == 1 and v.dtype == torch.long

    if not isinstance(index, dict) or index.get("format") != INDEX_FORMAT or utils.wrong_fields(index, {
            "model": lambda v: isinstance(v, str), "root": lambda v: isinstance(v, str),
            "revision": lambda v: isinstance(v, str), "paths": utils.is_str_list, "sizes": long_vector,
            "mtimes": long_vector, "embeddings": utils.is_tensor(2, floating=True),
            "skipped": lambda d: isinstance(d, dict) and all(
                isinstance(k, str) and isinstance(v, list) and len(v) == 2 and all(map(utils.is_int, v))
                for k, v in d.items())}):
        raise utils.UserError(f"{path} is not a gallery index written by retrieve.py; {hint}")
    n = len(index["paths"])
    if not (index["embeddings"].shape[0] == index["sizes"].numel() == index["mtimes"].numel() == n):
        raise utils.UserError(f"gallery index {path} is damaged ({n} paths, {index['embeddings'].shape[0]} "
                              "embeddings); delete it to rebuild it")
    return index


def embed_files(encoder, paths: list, image_size: int, args, device) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """Embed photo files: (n, D) embeddings, (n,) readable flags, and whether Ctrl-C stopped it
    early (then n < len(paths): the first n files are done, and the caller keeps them)."""
    loader = torch.utils.data.DataLoader(dataset.ImageFilesDataset(paths, image_size), batch_size=args.batch_size,
                                         num_workers=args.workers, pin_memory=device.type == "cuda",
                                         worker_init_fn=utils.seed_worker)
    out, readable, interrupted = [], [], False
    try:
        for emb, ok in utils.embed_batches(encoder, loader, device, args.amp, desc="embed gallery"):
            out.append(emb)
            readable.append(ok)
    except KeyboardInterrupt:
        interrupted = True
    if not out:
        return torch.empty(0, 0), torch.zeros(0, dtype=torch.bool), interrupted
    emb, readable = torch.cat(out), torch.cat(readable)
    if not torch.isfinite(emb[readable]).all():
        raise utils.UserError(f"the model gives non-finite embeddings for the photos; its checkpoint "
                              f"{args.model} is damaged or its training diverged")
    return emb, readable, interrupted


def update_index(old: dict | None, path: str, root: str, files: list, identity: str, embed) -> tuple[dict, dict]:
    """Bring the index ``old`` (load_index(path)) up to date with the gallery's ``files`` (scan_gallery)
    and save it to ``path``.

    Unchanged files (same relative path, size and mtime_ns) keep their embedding, new and changed
    ones are embedded by ``embed(paths) -> (embeddings (n, D), readable (n,), interrupted)``, deleted
    ones are dropped; unreadable files are remembered and retried only once they change. An index of
    another model or gallery folder is rebuilt. Returns the index and the counts of what was done.
    """
    if old is not None and old["model"] != identity:
        print(f"index {path} was built with another model; rebuilding")
        old = None
    elif old is not None and old["root"] != root:
        print(f"index {path} was built for the gallery {old['root']}; rebuilding for {root}")
        old = None
    before = {} if old is None else {p: (i, s, m) for i, (p, s, m) in enumerate(
        zip(old["paths"], old["sizes"].tolist(), old["mtimes"].tolist()))}
    skipped_before = {} if old is None else old["skipped"]
    kept, todo, skipped = [], [], {}
    for rel, size, mtime in files:
        if rel in before and before[rel][1:] == (size, mtime):
            kept.append((rel, size, mtime, False, before[rel][0]))
        elif skipped_before.get(rel) == [size, mtime]:
            skipped[rel] = [size, mtime]
        else:
            todo.append((rel, size, mtime))
    new_emb, readable, interrupted = embed([os.path.join(root, rel) for rel, _, _ in todo]) if todo else \
        (torch.empty(0, 0), torch.zeros(0, dtype=torch.bool), False)
    done = list(zip(todo, readable.tolist()))
    added = [(rel, size, mtime, True, j) for j, ((rel, size, mtime), ok) in enumerate(done) if ok]
    skipped.update({rel: [size, mtime] for (rel, size, mtime), ok in done if not ok})

    entries = sorted(kept + added)  # gallery order: by relative path
    current = {rel for rel, _, _ in files}
    counts = {"images": len(entries), "embedded": len(added), "unchanged": len(kept),
              "deleted": sum(p not in current for p in before), "unreadable": len(skipped)}
    if old is not None and not todo and counts["deleted"] == 0 and skipped == skipped_before:
        return old, counts
    is_new = torch.tensor([e[3] for e in entries], dtype=torch.bool)
    rows = torch.tensor([e[4] for e in entries], dtype=torch.long)
    emb = torch.empty(len(entries), new_emb.shape[1] if old is None else old["embeddings"].shape[1])  # (N, D)
    if added:
        emb[is_new] = new_emb[rows[is_new]]
    if kept:
        emb[~is_new] = old["embeddings"][rows[~is_new]]
    index = {"format": INDEX_FORMAT, "model": identity, "root": root, "revision": uuid.uuid4().hex,
             "paths": [e[0] for e in entries], "sizes": torch.tensor([e[1] for e in entries], dtype=torch.long),
             "mtimes": torch.tensor([e[2] for e in entries], dtype=torch.long), "embeddings": emb,
             "skipped": skipped}
    utils.atomic_write(path, lambda f: torch.save(index, f))
    if interrupted:
        print(f"interrupted: saved the {len(done)} embeddings done of {len(todo)} to {path}; run again to "
              "embed the rest", file=sys.stderr)
        raise KeyboardInterrupt
    return index, counts


# ----------------------------------------------------------------------------------- search

def _order_keys(scores: torch.Tensor, first_row: int) -> torch.Tensor:
    """float32 scores (q, c) of gallery rows first_row.. -> int64 keys in the same order; equal
    scores are ordered by row, the lower row first. (Order-preserving float bits in the top 32 bits,
    2^32 - 1 - row in the low 32 bits, so one topk of the keys ranks by score and breaks ties.)"""
    ordered = metrics.float_order((scores + 0.0).view(torch.int32)).long()  # + 0.0 turns -0.0 into +0.0
    rows = torch.arange(first_row, first_row + scores.shape[1])
    return ordered * 2**32 + (2**32 - 1 - rows)


def _decode_keys(keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The inverse of _order_keys: (scores float32, rows int64)."""
    ordered = torch.div(keys, 2**32, rounding_mode="floor")
    rows = 2**32 - 1 - (keys - ordered * 2**32)
    return metrics.float_order(ordered.int()).view(torch.float32), rows


def search(queries: torch.Tensor, gallery: torch.Tensor, k: int,
           chunk: int = 65536) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact top-k by inner product (cosine similarity for unit vectors, as metrics.similarity).

    queries (Q, D) and gallery (N, D) -> scores (Q, k') descending and gallery rows (Q, k'), with
    k' = min(k, N); equal scores rank the lower row first, as a stable sort would. At most
    QUERY_BLOCK queries x ``chunk`` gallery rows are scored at once, and each block keeps only its
    running top k, so memory beyond the two inputs stays bounded for any N.
    """
    k = min(k, gallery.shape[0])
    scores, rows = [], []
    for q0 in range(0, queries.shape[0], QUERY_BLOCK):
        q = queries[q0:q0 + QUERY_BLOCK].float()
        best = torch.empty(q.shape[0], 0, dtype=torch.long)                         # (q, <= k) keys
        for g0 in range(0, gallery.shape[0], chunk):
            keys = _order_keys((gallery[g0:g0 + chunk].float() @ q.T).T, g0)         # (q, c); faster than q @ g.T
            best = torch.cat([best, keys.topk(min(k, keys.shape[1]), dim=1).values], dim=1)
            best = best.topk(min(k, best.shape[1]), dim=1).values                  # sorted, descending
        s, r = _decode_keys(best)
        scores.append(s)
        rows.append(r)
    if not scores:
        return torch.empty(0, k), torch.empty(0, k, dtype=torch.long)
    return torch.cat(scores), torch.cat(rows)


def faiss_index(faiss, gallery: torch.Tensor, seed: int = 0):
    """A faiss inner-product index of the gallery (N, D): exact (IndexFlatIP) below FAISS_FLAT_BELOW
    rows, else IndexIVFFlat with sqrt(N) lists trained by k-means on a seeded sample of 64 rows per list."""
    x = np.ascontiguousarray(gallery.numpy(), dtype=np.float32)
    n, d = x.shape
    if n < FAISS_FLAT_BELOW:
        index = faiss.IndexFlatIP(d)
    else:
        lists = int(round(n ** 0.5))
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(d), d, lists, faiss.METRIC_INNER_PRODUCT)
        sample = np.random.default_rng(seed).choice(n, size=min(n, 64 * lists), replace=False)
        index.train(x[np.sort(sample)])
    index.add(x)
    return index


def cached_faiss_index(faiss, index: dict, path: str):
    """The faiss index of a gallery index, kept in ``path`` beside it and rebuilt when the gallery
    index has changed (the file starts with the gallery index's revision)."""
    tag = (index["revision"] + "\n").encode()
    if os.path.isfile(path):
        with open(path, "rb") as f:
            if f.read(len(tag)) == tag:
                return faiss.deserialize_index(np.frombuffer(f.read(), dtype=np.uint8))
    start = time.perf_counter()
    built = faiss_index(faiss, index["embeddings"])
    blob = faiss.serialize_index(built)  # (bytes,) uint8

    def write(f):
        f.write(tag)
        f.write(blob.tobytes())
    utils.atomic_write(path, write)
    print(f"built the faiss index {path} ({type(built).__name__}) in {time.perf_counter() - start:.1f} s")
    return built


def faiss_search(built, queries: torch.Tensor, k: int, nprobe: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Approximate top-k: (Q, k') scores and rows like search(); a row is -1 where an IVF index found
    fewer than k' photos in the lists it visited."""
    if hasattr(built, "nprobe"):
        built.nprobe = nprobe
    scores, rows = built.search(np.ascontiguousarray(queries.numpy(), dtype=np.float32), min(k, built.ntotal))
    return torch.from_numpy(scores), torch.from_numpy(rows).long()


# ----------------------------------------------------------------------------------- output

def embed_sketches(encoder, sketches: list, image_size: int, args, device) -> torch.Tensor:
    """Prepared query sketches (PIL) -> unit embeddings (Q, D) on the CPU."""
    transform = dataset.build_transform(image_size)
    batches = ((torch.stack([transform(s) for s in sketches[i:i + args.batch_size]]),)  # (B, 3, S, S)
               for i in range(0, len(sketches), args.batch_size))
    return torch.cat([emb for emb, in utils.embed_batches(encoder, batches, device, args.amp, desc="embed queries")])


def grid_name(i: int, query_path: str) -> str:
    stem = os.path.splitext(os.path.basename(query_path))[0]
    return f"grid_{i + 1:02d}_{''.join(c if c.isalnum() or c in '-_' else '_' for c in stem)[:40]}.png"


# ----------------------------------------------------------------------------------- main

def main(args) -> None:
    check_args(args)
    stdout = sys.stdout
    with contextlib.redirect_stdout(sys.stderr if args.json else sys.stdout):
        doc = run(args)
    if args.json:
        print(json.dumps(doc, indent=2), file=stdout)


def run(args) -> dict:
    """Everything but the JSON document: checks, index, search, printed ranking, grids, results.json."""
    # The inputs are checked before anything is written: the index first (its check is the quickest).
    out_dir = args.output_dir or os.path.join(os.path.dirname(os.path.abspath(args.model)), "retrieval")
    index_path = args.index or os.path.join(out_dir, INDEX_NAME)
    old_index = load_index(index_path)
    ckpt = utils.load_checkpoint(args.model)
    if not os.path.isdir(args.gallery):
        what = "is not a folder" if os.path.exists(args.gallery) else "does not exist"
        raise utils.UserError(f"gallery {args.gallery} {what}; pass the folder that holds your photos")
    sketches = read_queries(args.query)
    faiss = import_faiss() if args.faiss else None
    root = os.path.realpath(args.gallery)
    files, others = gallery_files(args.gallery, root, out_dir)
    device = utils.get_device(args.device)
    # weights that do not fit: an error, nothing written
    model = utils.build_model(ckpt, args.model, trained=True).to(device)
    utils.ensure_dir(out_dir, "output folder")
    utils.ensure_dir(os.path.dirname(os.path.abspath(index_path)), "index folder")
    info = utils.print_banner("retrieve.py", args)

    cfg = utils.checkpoint_model(ckpt)
    print(f"model {args.model}: {cfg.backbone}, {cfg.embedding_dim}-d, {cfg.image_size}px")
    start = time.perf_counter()
    index, counts = update_index(
        old_index, index_path, root, files, model_identity(ckpt),
        lambda paths: embed_files(model.photo_encoder, paths, cfg.image_size, args, device))
    skipped = report_gallery(args.gallery, index_path, index, counts, files, others, time.perf_counter() - start)

    queries = embed_sketches(model.sketch_encoder, sketches, cfg.image_size, args, device)  # (Q, D)
    start = time.perf_counter()
    if faiss is not None:
        built = cached_faiss_index(faiss, index, os.path.splitext(index_path)[0] + ".faiss")
        scores, rows = faiss_search(built, queries, args.topk, args.nprobe)
    else:
        scores, rows = search(queries, index["embeddings"], args.topk, args.chunk)
    seconds = time.perf_counter() - start
    print(f"searched {counts['images']} photos for {len(sketches)} sketch(es) in {seconds:.3f} s "
          f"({'faiss, approximate' if faiss is not None else 'exact'})")

    results = report_queries(args, sketches, index["paths"], scores, rows, out_dir)
    doc = {"model": args.model, "gallery": args.gallery, "index": index_path, "commit": info["commit"],
           "search": "faiss" if faiss is not None else "exact", "search_seconds": seconds,
           "index_counts": counts, "skipped_files": skipped, "queries": results, "args": vars(args)}
    utils.write_json(os.path.join(out_dir, "results.json"), doc)
    print(f"\nwrote results.json{' and the grids' if args.grids else ''} to {out_dir}")
    return doc


def gallery_files(gallery: str, root: str, out_dir: str) -> tuple[list, list]:
    """scan_gallery of the --gallery folder (``root``: its real path), leaving out the output folder; a gallery
    that is the output folder or holds no image file is a UserError."""
    if os.path.realpath(out_dir) == root:
        raise utils.UserError(f"--output_dir {out_dir} is the gallery folder; its grids would be searched next "
                              "time, so choose another folder")
    files, others = scan_gallery(root, exclude=os.path.realpath(out_dir))
    if not files:
        raise utils.UserError(f"gallery {gallery} holds no image files ({', '.join(dataset.IMAGE_EXTENSIONS)}); "
                              "pass the folder that holds your photos")
    return files, others


def report_gallery(gallery: str, index_path: str, index: dict, counts: dict, files: list, others: list,
                   seconds: float) -> list:
    """Print what update_index did and which files were skipped, and return those files' relative paths; a
    gallery with no readable image is a UserError."""
    print(f"gallery {gallery}: {counts['images']} photos in {index_path} ({counts['embedded']} embedded, "
          f"{counts['unchanged']} unchanged, {counts['deleted']} deleted since the last run) in {seconds:.1f} s")
    unreadable = [rel for rel, _, _ in files if rel in index["skipped"]]
    if others or unreadable:
        examples = ", ".join((others + unreadable)[:3])
        print(f"skipped {len(others) + len(unreadable)} file(s) of the gallery: {len(others)} not an image, "
              f"{len(unreadable)} unreadable image(s) (e.g. {examples})")
    if counts["images"] == 0:
        raise utils.UserError(f"gallery {gallery} holds no readable image; pass the folder that holds your photos")
    return others + unreadable


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


if __name__ == "__main__":
    utils.run_cli(main, get_args_parser(), (dataset.DataError, PretrainedWeightsUnavailable))
