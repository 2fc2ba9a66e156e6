"""The gallery index and its search, shared by retrieve.py and app.py: which files of a photo folder are
images (scan_gallery), their embeddings kept in an index file checked against the model and brought up to
date incrementally (load_index, update_index), and exact (search) or approximate (faiss) top-k ranking of
query embeddings against it. Nothing here reads the command line: the scripts pass what it needs.
"""
import hashlib
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

INDEX_FORMAT = "zs-sbir-gallery-index/1"
INDEX_NAME = "gallery_index.pt"
QUERY_BLOCK = 256         # queries scored at once by exact search
FAISS_FLAT_BELOW = 50000  # smaller galleries get faiss's exact inner-product index, larger ones IVF lists


def import_faiss():
    """The faiss module, imported only when --faiss asks for it."""
    try:
        import faiss
    except ImportError:
        raise utils.UserError("--faiss needs the faiss package (pip install faiss-cpu)") from None
    return faiss


# ----------------------------------------------------------------------------------- files

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


def embed_files(encoder, paths: list, image_size: int, batch_size: int, workers: int, device, amp: bool,
                model_path: str, progress=None) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """Embed photo files (with the checkpoint ``model_path``'s photo encoder): (n, D) embeddings, (n,) readable
    flags, and whether Ctrl-C stopped it early (then n < len(paths): the first n files are done, and the caller
    keeps them). ``progress(done, total)``, when given, is called after each batch (app.py's page shows it;
    the terminal gets tqdm's bar either way)."""
    loader = torch.utils.data.DataLoader(dataset.ImageFilesDataset(paths, image_size), batch_size=batch_size,
                                         num_workers=workers, pin_memory=device.type == "cuda",
                                         worker_init_fn=utils.seed_worker)
    out, readable, interrupted = [], [], False
    try:
        for emb, ok in utils.embed_batches(encoder, loader, device, amp, desc="embed gallery"):
            out.append(emb)
            readable.append(ok)
            if progress is not None:
                progress(sum(len(e) for e in out), len(paths))
    except KeyboardInterrupt:
        interrupted = True
    if not out:
        return torch.empty(0, 0), torch.zeros(0, dtype=torch.bool), interrupted
    emb, readable = torch.cat(out), torch.cat(readable)
    if not torch.isfinite(emb[readable]).all():
        raise utils.UserError(f"the model gives non-finite embeddings for the photos; its checkpoint "
                              f"{model_path} is damaged or its training diverged")
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


# ----------------------------------------------------------------------------------- queries

def embed_sketches(encoder, sketches: list, image_size: int, batch_size: int, device, amp: bool,
                   show: bool = True) -> torch.Tensor:
    """Prepared query sketches (PIL) -> unit embeddings (Q, D) on the CPU; ``show``: tqdm's bar in a terminal."""
    transform = dataset.build_transform(image_size)
    batches = ((torch.stack([transform(s) for s in sketches[i:i + batch_size]]),)  # (B, 3, S, S)
               for i in range(0, len(sketches), batch_size))
    return torch.cat([emb for emb, in utils.embed_batches(encoder, batches, device, amp, desc="embed queries",
                                                                show=show)])


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
