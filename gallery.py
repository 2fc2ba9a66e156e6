"""The gallery index and its search, shared by retrieve.py and app.py: which files of a photo folder are
images (scan_gallery), their embeddings kept in an index file checked against the model and brought up to
date incrementally (load_index, update_index, build_index), exact (search) or approximate (faiss) top-k
ranking of query embeddings against it, and the query sketches, prepared and checked for strokes
(prepare_query, load_query). Nothing here reads the command line: the scripts pass what it needs.
"""
import dataclasses
import hashlib
import os
import stat
import sys
import time
import uuid

import numpy as np
import torch
from PIL import Image

import dataset
import metrics
import utils

INDEX_FORMAT = "zs-sbir-gallery-index/1"
INDEX_NAME = "gallery_index.pt"
RESULTS_NAME = "results.json"                 # retrieve.py's document, in its output folder
RESULTS_FORMAT = "zs-sbir-retrieval-results/1"
QUERY_BLOCK = 256         # queries scored at once by exact search
FAISS_FLAT_BELOW = 50000  # smaller galleries get faiss's exact inner-product index, larger ones IVF lists


def import_faiss():
    """The faiss module, imported only when --faiss asks for it."""
    try:
        import faiss
    except ImportError:
        raise utils.UserError("--faiss needs the faiss package (pip install faiss-cpu)") from None
    return faiss


@dataclasses.dataclass(frozen=True)
class EmbedSettings:
    """How a run embeds images: the model's input size (its checkpoint's) and the run's batch size, data loader
    workers, device and --amp."""
    image_size: int
    batch_size: int
    workers: int
    device: torch.device
    amp: bool

    @property
    def precision(self) -> str:
        """The number format the encoders compute in: "float32", or --amp's autocast dtype on a GPU ("bfloat16",
        "float16"). Recorded in the index: embeddings of two precisions are not mixed in one ranking."""
        dtype = utils.amp_dtype(self.device, self.amp)
        return "float32" if dtype is None else str(dtype).removeprefix("torch.")


@dataclasses.dataclass
class GallerySource:
    """A gallery folder as scanned (scan_gallery) and its index file (load_index): what build_index starts from."""
    folder: str               # --gallery, as the user wrote it (in messages)
    root: str                 # its real path (stored in the index)
    index_path: str
    files: list               # image files: (relative path, size, mtime_ns)
    others: list              # relative paths of the files that are not images
    outputs: list             # relative paths of retrieve.py output folders left out
    old_index: dict | None


# ----------------------------------------------------------------------------------- files

def is_results_folder(folder: str) -> bool:
    """Whether ``folder`` holds a results.json written by retrieve.py (its format, or the keys it had before it
    named its format): a folder of grids, each showing a query sketch and other photos, not photos to search."""
    path = os.path.join(folder, RESULTS_NAME)
    doc = utils.read_json(path) if os.path.isfile(path) else None
    return isinstance(doc, dict) and (doc.get("format") == RESULTS_FORMAT
                                      or {"model", "gallery", "index", "queries"} <= doc.keys())


def scan_gallery(root: str, exclude: str) -> tuple[list, list, list]:
    """Image files below ``root`` as sorted (relative path, size, mtime_ns), the other files' paths, and the
    relative paths of the folders left out as retrieve.py's output.

    Hidden files and folders are left out, and so are the folder ``exclude`` (this run's output folder) and
    every sub-folder holding a retrieve.py results.json (an earlier run's output), whose grids would otherwise
    be searched as photos.
    """
    files, others, outputs = [], [], []
    for folder, subfolders, names in os.walk(root):
        kept = []
        for d in sorted(subfolders):
            path = os.path.join(folder, d)
            if d.startswith(".") or os.path.realpath(path) == exclude:
                continue
            if is_results_folder(path):
                outputs.append(os.path.relpath(path, root))
                continue
            kept.append(d)
        subfolders[:] = kept
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
    return sorted(files), sorted(others), sorted(outputs)


# ----------------------------------------------------------------------------------- the index

def model_identity(ckpt: dict) -> str:
    """sha256 of what a photo's embedding depends on: the photo encoder's weights, the backbone,
    the embedding size, the input size and the index format (the file's name and date do not count)."""
    cfg = utils.checkpoint_model(ckpt)
    h = hashlib.sha256(f"{INDEX_FORMAT}|{cfg.backbone}|{cfg.embedding_dim}|{cfg.image_size}".encode())
    if cfg.method != "sbir":  # another method's network: all of it (Sketch_LVM's photos pass its one tower)
        h.update(f"|{cfg.method}|{cfg.mean}|{cfg.std}|".encode())
        for net, state in sorted(ckpt["models"].items()):
            utils.hash_tensors(h, state, prefix=net + ".")
        return h.hexdigest()
    photo = "photo_encoder" if "photo_encoder" in ckpt["models"] else "encoder"  # two branches or one shared trunk
    utils.hash_tensors(h, ckpt["models"][photo])
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
                for k, v in d.items())}, {"precision": lambda v: isinstance(v, str)}):
        raise utils.UserError(f"{path} is not a gallery index written by retrieve.py; {hint}")
    n = len(index["paths"])
    if not (index["embeddings"].shape[0] == index["sizes"].numel() == index["mtimes"].numel() == n):
        raise utils.UserError(f"gallery index {path} is damaged ({n} paths, {index['embeddings'].shape[0]} "
                              "embeddings); delete it to rebuild it")
    return index


def embed_files(encoder, paths: list, settings: EmbedSettings, model_path: str,
                progress=None) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """Embed photo files (with the checkpoint ``model_path``'s photo encoder): (n, D) embeddings, (n,) readable
    flags, and whether Ctrl-C stopped it early (then n < len(paths): the first n files are done, and the caller
    keeps them). ``progress(done, total)``, when given, is called after each batch (app.py's page shows it;
    the terminal gets tqdm's bar either way)."""
    s = settings
    files = dataset.ImageFilesDataset(paths, s.image_size, fit=utils.image_fit(encoder))
    loader = torch.utils.data.DataLoader(files, batch_size=s.batch_size, num_workers=s.workers,
                                         pin_memory=s.device.type == "cuda", worker_init_fn=utils.seed_worker)
    out, readable, interrupted = [], [], False
    try:
        for emb, ok in utils.embed_batches(encoder, loader, s.device, s.amp, desc="embed gallery"):
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


def stale_reason(old: dict | None, identity: str, precision: str, root: str) -> str:
    """Why the index ``old`` cannot be extended by this run (the words after "index PATH"), "" when it can."""
    if old is None:
        return ""
    if old["model"] != identity:
        return "was built with another model"
    if "precision" not in old:
        return "does not record the precision of its embeddings (an index written before it did)"
    if old["precision"] != precision:
        return f"holds {old['precision']} embeddings and this run computes in {precision} (--amp on a GPU or not)"
    if old["root"] != root:
        return f"was built for the gallery {old['root']}, not {root}"
    return ""


def update_index(old: dict | None, path: str, root: str, files: list, identity: str, precision: str,
                 embed) -> tuple[dict, dict]:
    """Bring the index ``old`` (load_index(path)) up to date with the gallery's ``files`` (scan_gallery)
    and save it to ``path``.

    Unchanged files (same relative path, size and mtime_ns) keep their embedding, new and changed
    ones are embedded by ``embed(paths) -> (embeddings (n, D), readable (n,), interrupted)``, computed in
    ``precision`` (EmbedSettings.precision), deleted ones are dropped; unreadable files are remembered and
    retried only once they change. An index of another model (``identity``: model_identity), precision or
    gallery folder is rebuilt, never extended. Returns the index and the counts of what was done.
    """
    why = stale_reason(old, identity, precision, root)
    if why:
        print(f"index {path} {why}; rebuilding")
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
    index = {"format": INDEX_FORMAT, "model": identity, "precision": precision, "root": root,
             "revision": uuid.uuid4().hex,
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


# ----------------------------------------------------------------------------------- building it

def describe_model(path: str, ckpt: dict, settings: EmbedSettings, fingerprint: str) -> str:
    """The line naming the model a run searches with: its file, network, training and fingerprint
    (utils.model_fingerprint), and the precision it embeds in."""
    cfg = utils.checkpoint_model(ckpt)
    return (f"model {path}: {utils.network_text(cfg)}, {cfg.embedding_dim}-d, {cfg.image_size}px, trained "
            f"{ckpt['epoch']} epoch(s), fingerprint {fingerprint[:12]}; embeddings in {settings.precision}")


def build_index(source: GallerySource, identity: str, settings: EmbedSettings, encoder, model_path: str,
                progress=None) -> tuple[dict, dict, list]:
    """update_index for retrieve.py and app.py alike: the gallery ``source``'s index brought up to date, its
    new photos embedded by ``encoder`` (the photo encoder of the checkpoint ``model_path``, whose
    model_identity is ``identity``) with ``settings``, then reported (report_gallery). Returns the index, the
    counts of what was done and the relative paths of the files skipped."""
    start = time.perf_counter()
    index, counts = update_index(
        source.old_index, source.index_path, source.root, source.files, identity, settings.precision,
        lambda paths: embed_files(encoder, paths, settings, model_path, progress=progress))
    return index, counts, report_gallery(source, index, counts, time.perf_counter() - start)


def report_gallery(source: GallerySource, index: dict, counts: dict, seconds: float) -> list:
    """Print what update_index did and which files and folders were skipped, and return the files' relative
    paths; a gallery with no readable image is a UserError."""
    print(f"gallery {source.folder}: {counts['images']} photos in {source.index_path} ({counts['embedded']} "
          f"embedded, {counts['unchanged']} unchanged, {counts['deleted']} deleted since the last run) in "
          f"{seconds:.1f} s")
    others = source.others
    unreadable = [rel for rel, _, _ in source.files if rel in index["skipped"]]
    if others or unreadable:
        examples = ", ".join((others + unreadable)[:3])
        print(f"skipped {len(others) + len(unreadable)} file(s) of the gallery: {len(others)} not an image, "
              f"{len(unreadable)} unreadable image(s) (e.g. {examples})")
    if source.outputs:
        print(f"left out {len(source.outputs)} folder(s) of retrieve.py results inside the gallery (their grids are "
              f"not photos): {', '.join(source.outputs[:3])}")
    if counts["images"] == 0:
        raise utils.UserError(f"gallery {source.folder} holds no readable image; pass the folder that holds your "
                              "photos")
    return others + unreadable


# ----------------------------------------------------------------------------------- queries

# A query is blank, refused by retrieve.py and app.py alike, when it gives the model nothing to match: its grey
# levels (transparency composited onto white, and apart onto black) span fewer than BLANK_CONTRAST of 255 (one
# colour, or nearly: a white page saved as a JPEG, faint noise on even paper), or the sketch prepare_sketch makes
# of it has no stroke (no pixel darker than mid-grey: lines too faint) or nothing but stroke (a dot a few pixels
# wide, which the crop to the strokes turns into one black square).
BLANK_CONTRAST = 32
BLANK_TODO = "use a sketch with dark strokes on a light background (or light strokes on a dark one)"


def grey_span(im: Image.Image) -> int:
    """The darkest to the lightest grey level of an image as loaded (0..255); with transparency, the larger span
    of its composites onto white and onto black (prepare_sketch uses the one that shows its strokes)."""
    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La", "P") or "transparency" in im.info:
        rgba = im.convert("RGBA")
        greys = [Image.alpha_composite(Image.new("RGBA", im.size, (v, v, v, 255)), rgba).convert("L")
                 for v in (255, 0)]
    else:
        greys = [dataset.to_rgb(im).convert("L")]
    return max(int(lo_hi[1]) - int(lo_hi[0]) for lo_hi in (g.getextrema() for g in greys))


def blank_reason(im: Image.Image, sketch: Image.Image) -> str:
    """Why a query image ``im`` (as loaded) with its prepared ``sketch`` is blank (see BLANK_CONTRAST); "" when
    it has strokes."""
    span = grey_span(im)
    if span < BLANK_CONTRAST:
        return "a single colour" if span == 0 else \
            f"nearly one colour: its grey levels span {span} of 255, fewer than {BLANK_CONTRAST}"
    strokes = np.asarray(sketch.convert("L")) < 128
    if not strokes.any():
        return "its lines are too faint: none is darker than mid-grey once the background is evened out"
    if strokes.all():
        return "only a dot: cropped to its strokes, it is one black square"
    return ""


def prepare_query(im: Image.Image) -> tuple[Image.Image, str]:
    """A query image as loaded -> (the sketch the model sees, dataset.prepare_sketch(im); why it is blank, or "")."""
    sketch = dataset.prepare_sketch(im)
    return sketch, blank_reason(im, sketch)


def load_query(path: str) -> tuple[Image.Image, str]:
    """A query sketch file -> prepare_query of it, turned upright by its EXIF orientation (as dataset.load_sketch
    loads it); raises dataset.IMAGE_ERRORS."""
    return prepare_query(dataset.open_image(path, upright=True))


def blank_message(blanks: list, total: int = 1) -> str:
    """The one line refusing blank queries ``blanks`` [(name, reason)] of ``total`` queries."""
    if total == 1:
        (name, reason), = blanks
        return f"{name} is blank ({reason}); {BLANK_TODO}"
    listed = ", ".join(f"{name} ({reason})" for name, reason in blanks)
    verb = "is" if len(blanks) == 1 else "are"
    return f"{len(blanks)} of the {total} query sketches {verb} blank: {listed}; {BLANK_TODO}, or leave them out"


def embed_sketches(encoder, sketches: list, image_size: int, batch_size: int, device, amp: bool,
                   show: bool = True) -> torch.Tensor:
    """Prepared query sketches (PIL) -> unit embeddings (Q, D) on the CPU; ``show``: tqdm's bar in a terminal."""
    resize = dataset.build_transform(image_size)
    fit = utils.image_fit(encoder)

    def transform(sketch):  # a prepared sketch is square (prepare_sketch): a fit only resamples it as training did
        if fit == "pad":
            return resize(dataset.pad_to_square(sketch, image_size))
        return resize(dataset.crop_to_strokes(sketch, image_size) if fit == "strokes" else sketch)
    batches = ((torch.stack([transform(s) for s in sketches[i:i + batch_size]]),)  # (B, 3, S, S)
               for i in range(0, len(sketches), batch_size))
    return torch.cat([emb for emb, in utils.embed_batches(encoder, batches, device, amp, desc="embed queries",
                                                                show=show)])
