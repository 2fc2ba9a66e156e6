"""Files -> tensors for zero-shot SBIR: dataset layout checks, image loading, training batches, query sketches.

    data = scan_dataset("data/demo")                 # checks the layout, lists every image
    train, val = split_seen(data, val_fraction=0.1)   # seeded hold-out of seen-class images
    pairs = PairedBatches(train, data.seen, image_size=32, batch_size=64, edge_maps=True, seed=0)
    for sketch, photo, labels in BatchLoader(pairs, workers=2, pin_memory=False).epoch(0): ...  # uint8
    sketch = load_sketch("my_drawing.png")            # any origin -> dark strokes on a white square

Layout: DATA/sketches/<class>/*, DATA/photos/<class>/*, DATA/train_labels.txt (seen classes),
DATA/test_labels.txt (unseen classes), optional DATA/train_embeddings.npy / test_embeddings.npy
(class-name vectors, rows aligned with the label files). This module knows nothing of models or of
the command line; every problem with the user's data raises DataError with a one-line message.
"""
import json
import math
import os
import re
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torch.utils.data import Dataset
from torchvision import transforms

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")
# Errors Pillow raises on files that are not (complete) images.
IMAGE_ERRORS = (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError)


class DataError(ValueError):
    """Something is wrong with the user's data; the message says what and what to do."""


# ----------------------------------------------------------------------------------- images

def to_rgb(im: Image.Image) -> Image.Image:
    """Any Pillow image -> 8-bit RGB. Transparency is composited onto white; 16-bit and
    32-bit grey levels are scaled to 0..255; CMYK and palettes are converted. An RGB image without
    transparency comes back as it is (no copy)."""
    if im.mode == "RGB" and "transparency" not in im.info:
        return im
    if im.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        arr = np.asarray(im, dtype=np.float64)
        top = 1.0 if im.mode == "F" and arr.max() <= 1.0 else (255.0 if arr.max() <= 255 else 65535.0)
        im = Image.fromarray(np.clip(arr / top * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
    if im.mode == "P" or (im.mode in ("L", "RGB") and "transparency" in im.info):
        im = im.convert("RGBA")
    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        im = Image.alpha_composite(white, rgba)
    return im.convert("RGB")


def open_image(path: str, upright: bool = False, draft: int = 0) -> Image.Image:
    """The one place an image file is decoded: any common format, in the mode it is stored in (raises
    IMAGE_ERRORS). With ``upright`` it is turned by its EXIF orientation (a phone's photo or sketch). With
    ``draft`` a JPEG is decoded at 1/2, 1/4 or 1/8 scale when that still covers draft x draft pixels
    (libjpeg's scaled decoding: most of a later resize for free)."""
    with Image.open(path) as im:
        if draft:
            im.draft(None, (draft, draft))  # a no-op for every format but JPEG
        im.load()
        return ImageOps.exif_transpose(im) if upright else im


def load_image(path: str) -> Image.Image:
    """Read an image file of any common format and mode as 8-bit RGB (raises IMAGE_ERRORS)."""
    return to_rgb(open_image(path))


def is_readable_image(path: str) -> bool:
    """Cheap integrity check: the header parses and Pillow's verify() finds no damage."""
    try:
        with Image.open(path) as im:
            im.verify()
        return True
    except IMAGE_ERRORS:
        return False


def build_transform(image_size: int) -> transforms.Compose:
    """PIL RGB -> float tensor (3, S, S) in [0, 1], resized to S x S (training augments on the device: augment).
    The model normalises its images itself, with the statistics its weights expect."""
    return transforms.Compose([transforms.Resize((image_size, image_size), antialias=True), transforms.ToTensor()])


# ----------------------------------------------------------------------------------- layout

@dataclass
class SBIRData:
    """Every usable image of a dataset, by domain and class."""
    root: str
    seen: list                      # seen (training) class names, in label-file order
    unseen: list                    # unseen (test) class names, in label-file order
    sketches: dict                  # class -> sorted list of sketch paths
    photos: dict                    # class -> sorted list of photo paths
    train_embeddings: np.ndarray | None = None   # (len(seen), E) class-name vectors
    test_embeddings: np.ndarray | None = None    # (len(unseen), E)
    skipped: list = field(default_factory=list)  # unreadable files that were left out


def read_labels(path: str) -> list:
    """Class names, one per line; blank lines ignored; duplicates and empty files rejected."""
    if not os.path.isfile(path):
        raise DataError(f"label file {path} not found; it must list one class per line "
                        "(bash download_data.sh demo writes an example)")
    with open(path, encoding="utf-8") as f:
        names = [line.strip() for line in f if line.strip()]
    if not names:
        raise DataError(f"label file {path} is empty; list one class name per line")
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise DataError(f"label file {path} lists {dupes[0]!r} more than once; keep one line per class")
    return names


def _read_embeddings(path: str, classes: list) -> np.ndarray | None:
    if not os.path.isfile(path):
        return None
    try:
        emb = np.load(path)
    except (OSError, ValueError) as e:
        raise DataError(f"cannot read class embeddings {path} ({e}); delete it or regenerate it") from None
    if emb.ndim != 2 or emb.shape[0] != len(classes):
        raise DataError(f"class embeddings {path} have shape {emb.shape}, expected ({len(classes)}, E) rows "
                        "aligned with the label file; regenerate them or delete the file")
    return emb.astype(np.float32)


def list_images(folder: str) -> list:
    """Image files directly inside a folder (extension in any case), sorted."""
    return sorted(os.path.join(folder, f) for f in os.listdir(folder)
                  if f.lower().endswith(IMAGE_EXTENSIONS) and not f.startswith("."))


def scan_dataset(root: str, check_images: bool = True, class_split: str = "") -> SBIRData:
    """Check the layout of a dataset folder and list its images; raises DataError on problems.

    The seen/unseen classes come from root/train_labels.txt and root/test_labels.txt, or with
    class_split from root/splits/<class_split>/. Unreadable image files are skipped and recorded
    in ``SBIRData.skipped``.
    """
    if not os.path.isdir(root):
        raise DataError(f"data folder {root} does not exist; create the demo data with "
                        "`bash download_data.sh demo` or pass --data_dir pointing at your dataset")
    labels = root
    if class_split:
        labels = os.path.join(root, "splits", class_split)
        if not os.path.isdir(labels):
            splits = os.path.join(root, "splits")
            have = sorted(os.listdir(splits)) if os.path.isdir(splits) else []
            raise DataError(f"unknown class split {class_split!r}: {labels} does not exist; "
                            + (f"choose one of {', '.join(have)}" if have else f"{root} has no splits/ folder"))
    seen = read_labels(os.path.join(labels, "train_labels.txt"))
    unseen = read_labels(os.path.join(labels, "test_labels.txt"))
    both = sorted(set(seen) & set(unseen))
    if both:
        raise DataError(f"class {both[0]!r} is in both train_labels.txt and test_labels.txt; "
                        "a zero-shot split needs disjoint seen and unseen classes")
    data = SBIRData(root, seen, unseen, {}, {},
                    _read_embeddings(os.path.join(labels, "train_embeddings.npy"), seen),
                    _read_embeddings(os.path.join(labels, "test_embeddings.npy"), unseen))
    for domain, table in (("sketches", data.sketches), ("photos", data.photos)):
        for c in seen + unseen:
            folder = os.path.join(root, domain, c)
            if not os.path.isdir(folder):
                raise DataError(f"class {c!r} is listed in a label file but {folder} does not exist; "
                                "add its images or remove it from the label file")
            paths = list_images(folder)
            if check_images:
                bad = [p for p in paths if not is_readable_image(p)]
                data.skipped += bad
                paths = [p for p in paths if p not in bad]
            if not paths:
                raise DataError(f"{folder} holds no readable image ({', '.join(IMAGE_EXTENSIONS)}); "
                                "add images or remove the class from the label file")
            table[c] = paths
    return data


VAL_SPLIT_SEED = 0  # the seen-class validation hold-out never changes with --seed


def split_seen(data: SBIRData, val_fraction: float, seed: int = VAL_SPLIT_SEED) -> tuple[dict, dict]:
    """Hold out a fixed, seeded fraction of the seen classes' sketches and of their photos.

    Returns ``train`` and ``val``, each {"sketches": {class: paths}, "photos": {class: paths}}.
    Per domain, round(val_fraction * N) of its N seen-class images are drawn from the whole pool, not
    class by class, so a dataset with two sketches per class gives a tenth of them to validation,
    not half; an image is only drawn while its class keeps at least one other for training.
    """
    rng = np.random.default_rng(seed)
    train, val = {"sketches": {}, "photos": {}}, {"sketches": {}, "photos": {}}
    for domain in ("sketches", "photos"):
        by_class = getattr(data, domain)
        pool = [(c, p) for c in data.seen for p in by_class[c]]
        left = {c: len(by_class[c]) for c in data.seen}
        held, want = set(), int(round(val_fraction * len(pool)))
        for k in rng.permutation(len(pool)):
            if len(held) >= want:
                break
            c, p = pool[k]
            if left[c] > 1:
                held.add(p)
                left[c] -= 1
        for c in data.seen:
            val[domain][c] = [p for p in by_class[c] if p in held]
            train[domain][c] = [p for p in by_class[c] if p not in held]
    return train, val


def flatten(by_class: dict, classes: list) -> tuple[list, list]:
    """{class: paths} -> (paths, integer labels by position in ``classes``)."""
    paths, labels = [], []
    for i, c in enumerate(classes):
        paths += by_class.get(c, [])
        labels += [i] * len(by_class.get(c, []))
    return paths, labels


# ----------------------------------------------------------------------------------- evaluation settings

def normalise_class_name(name: str) -> str:
    """The name that decides whether two datasets share a class: lower case, stripped, and every run of
    spaces, underscores and hyphens made one space ("Hot-Air_Balloon" -> "hot air balloon")."""
    return re.sub(r"[\s_\-]+", " ", name.strip().lower()).strip()


GZS_SEED = 0        # the seen-class images that join a generalised evaluation never change with --seed
GZS_FRACTION = 0.2  # SEM-PCYC src/test.py: perc = 0.2


def sample_seen(by_class: dict, seen: list, root: str, count: int, seed: int = GZS_SEED) -> tuple[list, list]:
    """``count`` seen-class images for generalised ZS-SBIR, drawn as SEM-PCYC's src/test.py draws them: from
    the sorted unique files of all seen classes together (not class by class), without replacement, the
    drawn positions sorted. Returns (paths, seen-class index of each). Our generator is numpy's
    default_rng(seed), not SEM-PCYC's global np.random.seed(0) stream, so the files drawn differ from theirs."""
    pool = sorted((os.path.relpath(p, root), p, seen.index(c)) for c in seen for p in by_class.get(c, []))
    if count > len(pool):
        raise DataError(f"generalised ZS-SBIR needs {count} seen-class images but the seen classes have "
                        f"{len(pool)}; use a smaller --gzs_fraction")
    picks = np.sort(np.random.default_rng(seed).choice(len(pool), size=count, replace=False))
    return [pool[i][1] for i in picks], [pool[i][2] for i in picks]


SKETCH_OF_PHOTO = re.compile(r"^(?P<photo>.+)-(?P<n>\d+)$")  # Sketchy: n02691156_58-3.png drawn from n02691156_58.jpg


def instance_pairs(sketches: dict, photos: dict, classes: list) -> tuple[dict, dict]:
    """Sketchy's pairing from file names: sketch ``<stem>-<j>.<ext>`` was drawn from the photo ``<stem>.<any
    image extension>`` of the same class folder. Returns ({class: [(sketch, photo), ...]} in sketch order,
    counts) with counts = {"sketches_without_photo", "photos_without_sketch"}: sketches whose name does not
    follow the pattern or whose photo is absent, and photos no sketch was drawn from (Sketchy's extended
    photos)."""
    pairs, lone_sketches, lone_photos = {}, 0, 0
    for c in classes:
        by_stem = {os.path.splitext(os.path.basename(p))[0]: p for p in photos.get(c, [])}
        used, pairs[c] = set(), []
        for s in sketches.get(c, []):
            m = SKETCH_OF_PHOTO.match(os.path.splitext(os.path.basename(s))[0])
            photo = by_stem.get(m.group("photo")) if m else None
            if photo is None:
                lone_sketches += 1
            else:
                pairs[c].append((s, photo))
                used.add(photo)
        lone_photos += len(by_stem) - len(used)
    return pairs, {"sketches_without_photo": lone_sketches, "photos_without_sketch": lone_photos}


# ----------------------------------------------------------------------------------- datasets

def negative_class_probs(num_classes: int, class_embeddings: np.ndarray | None, temperature: float) -> np.ndarray:
    """(C, C) matrix: row c is the distribution of the negative's class for an anchor of class c.

    Without embeddings: uniform over the other classes. With class-name embeddings e_c:
    p(c' | c) ∝ exp(cos(e_c, e_c') / temperature) for c' != c, so classes whose names are closer are
    drawn more often (harder negatives). The diagonal is always 0.
    """
    if class_embeddings is None:
        logits = np.zeros((num_classes, num_classes))
    else:
        e = class_embeddings / np.maximum(np.linalg.norm(class_embeddings, axis=1, keepdims=True), 1e-12)
        logits = (e @ e.T) / temperature
    np.fill_diagonal(logits, -np.inf)
    probs = np.exp(logits - logits.max(axis=1, keepdims=True))
    return probs / probs.sum(axis=1, keepdims=True)


# ----------------------------------------------------------------------------------- loading for training

def pad_to_square(im: Image.Image, size: int) -> Image.Image:
    """An RGB image scaled (bicubic, aspect kept) to fit size x size and centred on black, as Sketch_LVM's data
    code prepares its images (PIL's ImageOps.pad with its defaults, docs/sketch_lvm.md section 5.3)."""
    return ImageOps.pad(im, (size, size), method=Image.BICUBIC, color=(0, 0, 0))


def crop_to_strokes(im: Image.Image, size: int) -> Image.Image:
    """ZSE-SBIR's sketch preparation (their data_utils/utils.py:200-289, preprocess for sketches): the box of the
    pixels whose R + G + B is at most 300, widened by 10 px (ending before max + 10, as their slices end), scaled
    bilinearly so that its longer side is ``size`` (the other int(size * ratio)), then centred on a square filled
    with the crop's largest value (white for a sketch on white), the odd row or column on the right or bottom.
    Their cv2.resize does not antialias; Pillow's bilinear filter does. A blank image is scaled whole."""
    a = np.asarray(im.convert("RGB"))
    ys, xs = np.nonzero(a.astype(np.int32).sum(axis=2) <= 300)
    if len(ys):
        h, w = a.shape[:2]
        a = a[max(0, ys.min() - 10):min(h, ys.max() + 10), max(0, xs.min() - 10):min(w, xs.max() + 10)]
    h, w = a.shape[:2]
    new = (max(1, int(size / (h / w))), size) if h > w else (size, max(1, int(size * (h / w))))  # (width, height)
    a = np.asarray(Image.fromarray(a).resize(new, Image.BILINEAR))
    h, w = a.shape[:2]
    side, d = max(h, w), abs(h - w) // 2
    out = np.full((side, side, 3), a.max(), dtype=np.uint8)
    if h > w:
        out[:, d:d + w] = a
    else:
        out[d:d + h] = a
    return Image.fromarray(out)


FITS = ("resize", "pad", "strokes")  # how an image becomes a square: resized, padded black, cropped to its strokes


def read_resized(path: str, size: int, upright: bool = False, fit: str = "resize") -> Image.Image:
    """An image file as 8-bit RGB of exactly size x size (open_image, with a reduced JPEG decode and with
    ``upright`` its EXIF orientation; any mode, as load_image reads it), resized bilinearly; with ``fit`` "pad",
    pad_to_square instead (its aspect ratio kept), with "strokes" crop_to_strokes (FITS)."""
    im = open_image(path, upright, draft=size)
    if fit == "pad":
        return pad_to_square(to_rgb(im), size)
    if fit == "strokes":
        return crop_to_strokes(to_rgb(im), size)
    if im.mode in ("L", "RGB") and "transparency" not in im.info and im.size != (size, size):
        im = im.resize((size, size), Image.BILINEAR)  # grey sketches: a third of the work of resizing RGB
    im = to_rgb(im)
    return im if im.size == (size, size) else im.resize((size, size), Image.BILINEAR)


def edge_map(im: Image.Image) -> Image.Image:
    """A photo -> a sketch-like picture of its edges: dark lines on white, RGB.

    Sobel gradient magnitude of the grey image, scaled so that its 99th percentile is full ink; weak
    gradients (under 10% of that) are dropped, so flat colour areas stay white.
    """
    g = np.asarray(im.convert("L"), dtype=np.float32) / 255.0
    p = np.pad(g, 1, mode="edge")
    gx = (p[:-2, 2:] + 2 * p[1:-1, 2:] + p[2:, 2:]) - (p[:-2, :-2] + 2 * p[1:-1, :-2] + p[2:, :-2])
    gy = (p[2:, :-2] + 2 * p[2:, 1:-1] + p[2:, 2:]) - (p[:-2, :-2] + 2 * p[:-2, 1:-1] + p[:-2, 2:])
    mag = np.hypot(gx, gy)
    top = max(float(np.percentile(mag, 99)), 1e-3)
    ink = np.clip((mag / top - 0.1) / 0.9, 0.0, 1.0)
    return Image.fromarray(np.round(255 * (1 - ink)).astype(np.uint8), "L").convert("RGB")


def load_resized(path: str, image_size: int, edges: bool = False, fit: str = "resize") -> torch.Tensor:
    """An image file as uint8 (3, S, S), read by read_resized (as evaluation reads it, ``fit`` too); with ``edges``
    its edge_map, drawn at twice the size (at most the image's own, never below S) and then resized. Channels
    last in memory, as Pillow holds it: a view, not a transposed copy (the device makes the layout it wants)."""
    if edges:
        with Image.open(path) as f:  # the header only
            side = max(image_size, min(2 * image_size, *f.size))
        im = edge_map(read_resized(path, side)).resize((image_size, image_size), Image.BILINEAR)
    else:
        im = read_resized(path, image_size, fit=fit)
    return torch.from_numpy(np.array(im, dtype=np.uint8)).permute(2, 0, 1)  # (3, S, S), memory (S, S, 3)


# ----------------------------------------------------------------------------------- image store, disk cache

def cache_paths(cache_dir: str, image_size: int) -> tuple[str, str]:
    """The disk cache at one size: (images (N, S, S, 3) uint8 in a .npy file, its index .json)."""
    return os.path.join(cache_dir, f"{image_size}px.npy"), os.path.join(cache_dir, f"{image_size}px.json")


def cache_key(root: str, path: str, edges: bool, fit: str = "resize") -> str:
    """How the disk cache names an item: its path inside the dataset folder, '#edges' for its edge map, '#pad' or
    '#strokes' for another fit than resizing (FITS)."""
    suffix = "" if fit == "resize" else f"#{fit}"
    return os.path.relpath(path, root).replace(os.sep, "/") + ("#edges" if edges else "") + suffix


def file_stamp(path: str) -> list:
    """[size in bytes, modification time in ns]: a cached row is used only while its file keeps both."""
    st = os.stat(path)
    return [st.st_size, st.st_mtime_ns]


def read_cache_index(cache_dir: str, image_size: int) -> dict:
    """{key: (row, stamp)} of the disk cache at this size; {} when there is none or it is unreadable."""
    npy, index = cache_paths(cache_dir, image_size)
    try:
        with open(index, encoding="utf-8") as f:
            meta = json.load(f)
        rows = np.load(npy, mmap_mode="r").shape[0]
    except (OSError, ValueError):
        return {}
    if meta.get("image_size") != image_size or meta.get("layout") != "NHWC" or len(meta.get("keys", [])) != rows:
        return {}
    return {k: (i, s) for i, (k, s) in enumerate(zip(meta["keys"], meta["stamps"]))}


def write_disk_cache(root: str, items: list, image_size: int, cache_dir: str, workers: int = 0,
                     fits: list | None = None) -> tuple[int, int]:
    """Make the disk cache at ``image_size`` hold every (path, edges) item (made square as ``fits`` says, one per
    item: FITS; None: resized): rows already there and still current are kept, the others are decoded (by
    ``workers`` processes) and added. The new .npy and .json replace the old ones atomically, so a stopped write
    leaves the previous cache intact. Returns (rows decoded now, rows kept)."""
    old = read_cache_index(cache_dir, image_size)
    fits = fits or ["resize"] * len(items)
    keyed = [(cache_key(root, p, e, f), (p, e), f) for (p, e), f in zip(items, fits)]
    keys = list(dict.fromkeys(k for k, _, _ in keyed))
    by_key, fit_of = {k: item for k, item, _ in keyed}, {k: f for k, _, f in keyed}
    stamps = {k: file_stamp(by_key[k][0]) for k in keys}
    keep = [k for k, (_, s) in old.items() if k in by_key and s == stamps[k]]
    todo = [k for k in keys if k not in set(keep)]
    if not todo:
        return 0, len(keep)
    os.makedirs(cache_dir, exist_ok=True)
    npy, index = cache_paths(cache_dir, image_size)
    order = keep + todo
    tmp = npy + ".tmp.npy"
    out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=(len(order), image_size, image_size, 3))
    if keep:
        previous = np.load(npy, mmap_mode="r")
        for j, k in enumerate(keep):
            out[j] = previous[old[k][0]]
        del previous
    # A store of the new items only, with no cache: it decodes their files, giving rows (n, S, S, 3) as stored.
    todo_store = ImageStore([by_key[k] for k in todo], image_size, fits=[fit_of[k] for k in todo])
    loader = torch.utils.data.DataLoader(todo_store, batch_size=64, num_workers=workers)
    from tqdm import tqdm
    row = len(keep)
    for batch in tqdm(loader, desc=f"disk cache {image_size}px", leave=False, disable=None):
        out[row:row + len(batch)] = batch.numpy()  # (n, S, S, 3)
        row += len(batch)
    out.flush()
    del out
    os.replace(tmp, npy)
    tmp_index = index + ".tmp"
    with open(tmp_index, "w", encoding="utf-8") as f:
        json.dump({"image_size": image_size, "layout": "NHWC", "keys": order, "stamps": [stamps[k] for k in order]}, f)
    os.replace(tmp_index, index)
    return len(todo), len(keep)


class ImageStore:
    """The uint8 (3, S, S) images of a fixed list of (path, edges) items, by item number. Each image comes
    from the first of: memory (load_memory), the disk cache (open_disk_cache: rows of a memory-mapped .npy,
    copied, never decoded), its file (decoded and resized by load_resized). Images are held channels last,
    (S, S, 3) as decoded: batches are (n, 3, S, S) views of (n, S, S, 3) memory, never transposed here.
    ``fits``: how each item is made square (FITS), as a method's encoders want them; None: resized. A training
    source (StepBatches) makes its store without, and its user sets ``store.fits`` before any image is read."""

    def __init__(self, items: list, image_size: int, root: str = "", fits: list | None = None):
        self.items, self.image_size, self.root, self.fits = items, image_size, root, fits
        self.rows = np.full(len(items), -1, dtype=np.int64)   # row in the disk cache, -1: not there
        self.cache_file, self._mm, self.memory = "", None, None

    def fit(self, i: int) -> str:
        """How item ``i`` is made square (FITS)."""
        return self.fits[i] if self.fits else "resize"

    def __len__(self) -> int:
        return len(self.items)

    def __getstate__(self):  # worker processes open the memory map themselves
        return {**self.__dict__, "_mm": None}

    def open_disk_cache(self, cache_dir: str) -> int:
        """Use the disk cache at this store's size for the items it holds (current files only); returns how many."""
        index = read_cache_index(cache_dir, self.image_size)
        self.rows[:] = -1
        for i, (path, edges) in enumerate(self.items):
            hit = index.get(cache_key(self.root, path, edges, self.fit(i)))
            if hit is not None and hit[1] == file_stamp(path):
                self.rows[i] = hit[0]
        self.cache_file, self._mm = (cache_paths(cache_dir, self.image_size)[0] if index else ""), None
        return int((self.rows >= 0).sum())

    def bytes(self) -> int:
        return len(self.items) * 3 * self.image_size ** 2

    def __getitem__(self, index: int) -> torch.Tensor:
        """Image ``index`` as stored: uint8 (S, S, 3)."""
        return self._rows(np.array([index]))[0]

    def load_memory(self, workers: int = 0) -> None:
        """Hold every image in memory (one pass over the disk cache or the files, by ``workers`` processes)."""
        if self.memory is not None:
            return
        loader = torch.utils.data.DataLoader(self, batch_size=64, num_workers=workers)
        from tqdm import tqdm
        batches = tqdm(loader, desc="images to memory", leave=False, disable=None)
        self.memory = torch.cat([b for b in batches])  # (N, S, S, 3)

    def get(self, idx: np.ndarray) -> torch.Tensor:
        """uint8 (n, 3, S, S) images of the items ``idx`` (channels last in memory)."""
        return self._rows(idx).permute(0, 3, 1, 2)

    def _rows(self, idx: np.ndarray) -> torch.Tensor:
        """uint8 (n, S, S, 3) images of the items ``idx``."""
        if self.memory is not None:
            return self.memory[torch.from_numpy(np.asarray(idx, dtype=np.int64))]
        out = torch.empty(len(idx), self.image_size, self.image_size, 3, dtype=torch.uint8)
        rows = self.rows[idx]
        hit = np.nonzero(rows >= 0)[0]
        if len(hit):
            if self._mm is None:
                self._mm = np.load(self.cache_file, mmap_mode="r")
            out[torch.from_numpy(hit)] = torch.from_numpy(self._mm[rows[hit]])
        for j in np.nonzero(rows < 0)[0]:
            path, edges = self.items[idx[j]]
            out[j] = load_resized(path, self.image_size, edges, self.fit(idx[j])).permute(1, 2, 0)
        return out


# ----------------------------------------------------------------------------------- training batches

class StepBatches(Dataset):
    """A training source, indexed by (epoch, step): item (e, s) is this process's rows of step s of epoch e,
    as uint8 images (B/N, 3, S, S) from ``self.store`` and integer labels (B/N,). A subclass plans each
    epoch as a function of (seed, epoch) alone, so a resumed run meets the same batches at any step, with
    any number of loader workers; under torchrun process r of N takes rows [r B/N, (r+1) B/N), which the
    subclasses' ``shard=(r, N)`` gives. Their ``root``, the dataset folder, names images in the disk cache."""

    def __init__(self, store: ImageStore, batch_size: int, seed: int, rank: int = 0, world: int = 1):
        self.store, self.batch_size, self.seed, self.rank, self.world = store, batch_size, seed, rank, world
        self._planned = (None, None)

    def plan(self, epoch: int) -> tuple[list, list]:
        """([item numbers (steps, B) per image group], [labels (steps, B) per label group])."""
        raise NotImplementedError

    def __getitem__(self, key: tuple) -> tuple:
        epoch, step = key
        if self._planned[0] != epoch:
            self._planned = (epoch, self.plan(epoch))
        images, labels = self._planned[1]
        b = self.batch_size // self.world
        rows = slice(self.rank * b, (self.rank + 1) * b)
        flat = self.store.get(np.concatenate([g[step, rows] for g in images]))  # (groups * b, 3, S, S)
        return (*flat.split(b), *(torch.from_numpy(np.ascontiguousarray(g[step, rows])) for g in labels))


class TripletBatches(StepBatches):
    """Batches of (anchor sketch, positive photo of its class, negative photo of another seen class, anchor
    class, negative class). One epoch visits every training sketch once as the anchor, in a seeded order
    (the last partial batch dropped). The negative's class is drawn from row c of ``negatives`` for an anchor
    of class c (negative_class_probs; None: uniform over the other classes). ``root`` and ``shard`` as in
    StepBatches."""

    def __init__(self, split: dict, classes: list, image_size: int, batch_size: int,
                 negatives: np.ndarray | None = None, seed: int = 0, root: str = "", shard: tuple = (0, 1)):
        self.sketches, labels = flatten(split["sketches"], classes)
        self.photos, photo_labels = flatten(split["photos"], classes)
        self.labels = np.array(labels, dtype=np.int64)
        self.photo_start = np.searchsorted(np.array(photo_labels), np.arange(len(classes) + 1))  # (C + 1,)
        probs = negative_class_probs(len(classes), None, 1.0) if negatives is None else negatives  # (C, C)
        self.neg_cdf = np.cumsum(probs, axis=1)
        items = [(p, False) for p in self.sketches + self.photos]
        self.sketch_items = len(self.sketches)  # the store's first items are sketch-domain
        super().__init__(ImageStore(items, image_size, root), batch_size, seed, *shard)

    def __len__(self) -> int:
        return len(self.sketches) // self.batch_size

    def plan(self, epoch: int) -> tuple[list, list]:
        rng = np.random.default_rng((self.seed, epoch))
        steps, c_max = len(self), len(self.neg_cdf) - 1
        anchors = rng.permutation(len(self.sketches))[:steps * self.batch_size]
        c = self.labels[anchors]
        u = rng.random((len(anchors), 3))
        n = np.minimum((self.neg_cdf[c] <= u[:, 1:2]).sum(axis=1), c_max)   # inverse CDF of the negative class
        start, size = self.photo_start[:-1], np.diff(self.photo_start)
        pos = start[c] + (u[:, 0] * size[c]).astype(np.int64)
        neg = start[n] + (u[:, 2] * size[n]).astype(np.int64)
        off = len(self.sketches)  # photos follow the sketches in the store
        return ([x.reshape(steps, -1) for x in (anchors, off + pos, off + neg)],
                [c.reshape(steps, -1), n.reshape(steps, -1)])


class PairedBatches(StepBatches):
    """Batches of (B sketch-domain images, B photos, labels), photo i of sketch i's class.

    One epoch is one pass over the training photos in a seeded order (the last partial batch dropped).
    Each photo's partner is drawn uniformly from its class's sketch-domain pool: the real sketches and,
    with ``edge_maps``, the edge maps of the class's training photos (extra sketch-like samples). ``root`` and
    ``shard`` as in StepBatches.
    """

    def __init__(self, split: dict, classes: list, image_size: int, batch_size: int, edge_maps: bool, seed: int,
                 root: str = "", shard: tuple = (0, 1)):
        self.photos, labels = flatten(split["photos"], classes)       # photo j: path, class
        self.labels = np.array(labels, dtype=np.int64)
        sketches, sketch_labels = flatten(split["sketches"], classes)
        # The sketch-domain pool: real sketches first, then the edge maps (one per training photo).
        self.pool = [(p, False) for p in sketches] + ([(p, True) for p in self.photos] if edge_maps else [])
        pool_labels = np.array(sketch_labels + (labels if edge_maps else []), dtype=np.int64)
        self.pool_order = np.argsort(pool_labels, kind="stable")
        self.pool_start = np.searchsorted(pool_labels[self.pool_order], np.arange(len(classes) + 1))  # (C + 1,)
        items = self.pool + [(p, False) for p in self.photos]   # the store: the pool, then the photos
        self.sketch_items = len(self.pool)
        super().__init__(ImageStore(items, image_size, root), batch_size, seed, *shard)

    def __len__(self) -> int:
        return len(self.photos) // self.batch_size

    def plan(self, epoch: int) -> tuple[list, list]:
        rng = np.random.default_rng((self.seed, epoch))
        steps = len(self)
        photos = rng.permutation(len(self.photos))[:steps * self.batch_size]
        c = self.labels[photos]
        size = self.pool_start[c + 1] - self.pool_start[c]
        partners = self.pool_order[self.pool_start[c] + (rng.random(len(photos)) * size).astype(np.int64)]
        return ([partners.reshape(steps, -1), len(self.pool) + photos.reshape(steps, -1)],
                [c.reshape(steps, -1)])


class QuadrupletBatches(StepBatches):
    """ZSE-SBIR's batches (their data_utils/dataset.py TrainSet): B of (sketch, another sketch of its class, photo of
    its class, photo of another class, class, other class). Each draws its class and the other class uniformly
    (3 distinct classes drawn, the first and the last used, as theirs), then each image uniformly within its class.
    An epoch is ``per_epoch`` of them (theirs: --datasetLen 10,000), the last partial batch dropped; seeded by
    (seed, epoch) as every StepBatches. ``root`` and ``shard`` as in StepBatches."""

    def __init__(self, split: dict, classes: list, image_size: int, batch_size: int, per_epoch: int, seed: int,
                 root: str = "", shard: tuple = (0, 1)):
        self.sketches, sketch_labels = flatten(split["sketches"], classes)
        self.photos, photo_labels = flatten(split["photos"], classes)
        self.per_epoch, self.classes = per_epoch, len(classes)
        self.sketch_start = np.searchsorted(np.array(sketch_labels), np.arange(len(classes) + 1))  # (C + 1,)
        self.photo_start = np.searchsorted(np.array(photo_labels), np.arange(len(classes) + 1))
        items = [(p, False) for p in self.sketches + self.photos]
        self.sketch_items = len(self.sketches)
        super().__init__(ImageStore(items, image_size, root), batch_size, seed, *shard)

    def __len__(self) -> int:
        return self.per_epoch // self.batch_size

    def plan(self, epoch: int) -> tuple[list, list]:
        rng = np.random.default_rng((self.seed, epoch))
        steps = len(self)
        n = steps * self.batch_size
        drawn = np.argsort(rng.random((n, self.classes)), axis=1)[:, :3]  # 3 distinct classes, uniformly
        c, other = drawn[:, 0], drawn[:, 2]
        u = rng.random((n, 4))

        def pick(start, cls, col):  # an index within the class, uniformly
            return start[cls] + (u[:, col] * (start[cls + 1] - start[cls])).astype(np.int64)
        off = len(self.sketches)  # photos follow the sketches in the store
        groups = [pick(self.sketch_start, c, 0), pick(self.sketch_start, c, 1), off + pick(self.photo_start, c, 2),
                  off + pick(self.photo_start, other, 3)]
        return [g.reshape(steps, -1) for g in groups], [c.reshape(steps, -1), other.reshape(steps, -1)]


class _StepSampler(torch.utils.data.Sampler):
    """The keys (epoch, step) of one epoch from a given step on; it runs in the main process, so persistent
    workers follow it from epoch to epoch."""

    def __init__(self, steps: int):
        self.steps, self.epoch, self.start = steps, 0, 0

    def __iter__(self):
        return iter([(self.epoch, s) for s in range(self.start, self.steps)])

    def __len__(self) -> int:
        return self.steps - self.start


class BatchLoader:
    """Epoch after epoch of a StepBatches' batches, loaded ahead of the model: ``workers`` processes that
    persist across epochs, each assembling whole batches, ``prefetch`` batches each in flight, pinned for
    an asynchronous copy to the GPU. With ``memory``, prepare() first reads every image into memory; the
    workers then gather batches from it (forked, they share it), or without pinning (on the CPU, where the
    model needs every core) this process does."""

    def __init__(self, source: StepBatches, workers: int, pin_memory: bool, memory: bool = False, prefetch: int = 2):
        self.source, self.workers, self.pin_memory, self.prefetch = source, workers, pin_memory, prefetch
        self.memory, self.sampler, self.loader = memory, _StepSampler(len(source)), None

    def __len__(self) -> int:
        return len(self.source)

    def prepare(self) -> None:
        if self.memory:
            self.source.store.load_memory(self.workers)

    def epoch(self, epoch: int, start: int = 0):
        """An iterator over the batches of steps start, start + 1, ... of this epoch."""
        if self.loader is None:
            workers = 0 if self.source.store.memory is not None and not self.pin_memory else self.workers
            self.loader = torch.utils.data.DataLoader(
                self.source, batch_size=None, sampler=self.sampler, num_workers=workers,
                persistent_workers=workers > 0, prefetch_factor=self.prefetch if workers else None,
                pin_memory=self.pin_memory)
        self.sampler.epoch, self.sampler.start = epoch, start
        return iter(self.loader)


def _to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A small CPU tensor on ``device`` without making the host wait for the GPU: through pinned memory
    and an asynchronous copy (a blocking copy would first wait for all the work queued on the GPU)."""
    return t if device.type == "cpu" else t.pin_memory().to(device, non_blocking=True)


def augment(images: torch.Tensor, generator: torch.Generator, scale: tuple = (0.5, 1.0),
            ratio: tuple = (3 / 4, 4 / 3), thicken: float = 0.0) -> torch.Tensor:
    """uint8 images (B, 3, S, S) on any device -> float (B, 3, S, S) in [0, 1], augmented on that device
    in one pass: a random resized crop (area fraction in ``scale``, aspect ratio in ``ratio``) and a
    random horizontal flip per image, sampled by one affine grid; with ``thicken`` > 0, that fraction
    of the images has its dark strokes thickened by a 3x3 minimum filter. The random numbers come from
    ``generator`` (on the CPU), so a seeded generator gives the same batch on any device; nothing here
    waits for the device."""
    b = images.shape[0]
    u = torch.rand(b, 5, generator=generator)                     # (B, 5) on the CPU
    area = scale[0] + (scale[1] - scale[0]) * u[:, 0]
    log_r = math.log(ratio[0]) + (math.log(ratio[1]) - math.log(ratio[0])) * u[:, 1]
    w = torch.sqrt(area * torch.exp(log_r)).clamp(max=1.0)        # crop width and height, fractions of the side
    h = torch.sqrt(area / torch.exp(log_r)).clamp(max=1.0)
    tx, ty = (1 - w) * (2 * u[:, 2] - 1), (1 - h) * (2 * u[:, 3] - 1)  # crop centre in [-1, 1] coordinates
    flip = torch.where(u[:, 4] < 0.5, -1.0, 1.0)
    theta = torch.zeros(b, 2, 3)
    theta[:, 0, 0], theta[:, 0, 2], theta[:, 1, 1], theta[:, 1, 2] = w * flip, tx, h, ty
    # One copy to the device: the affine matrices and which images to thicken.
    pick = (torch.rand(b, generator=generator) < thicken).float() if thicken > 0 else torch.zeros(b)
    small = _to_device(torch.cat([theta.flatten(), pick]), images.device)
    theta, pick = small[:6 * b].view(b, 2, 3), small[6 * b:]
    x = images.float() / 255.0
    grid = torch.nn.functional.affine_grid(theta, list(x.shape), align_corners=False)
    x = torch.nn.functional.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    if thicken > 0:
        x = torch.where(pick[:, None, None, None] > 0, -torch.nn.functional.max_pool2d(-x, 3, 1, 1), x)
    return x


# ----------------------------------------------------------------------------------- user images

SKETCH_MARGIN = 0.1     # white margin around a query drawing, as a fraction of its longer extent
SKETCH_MAX_SIDE = 1024  # larger query images are first shrunk to this (the model sees 64-224 px)


def _flatten_background(grey: np.ndarray) -> np.ndarray:
    """Divide a grey image (H, W) float by its local paper brightness, so uneven lighting turns white.

    The paper level of each cell (1/16 of the longer side) is its 90th percentile, raised to the
    brightest of the 3 x 3 neighbouring cells (so cells full of strokes take the paper around them)
    and to half the whole image's level (so a large dark fill stays dark), then bilinearly
    interpolated. A white background has level 255 everywhere and leaves the image unchanged.
    """
    h, w = grey.shape
    cell = max(1, max(h, w) // 16)
    rows, cols = -(-h // cell), -(-w // cell)
    padded = np.pad(grey, ((0, rows * cell - h), (0, cols * cell - w)), mode="edge")
    blocks = padded.reshape(rows, cell, cols, cell).transpose(0, 2, 1, 3).reshape(rows, cols, -1)
    level = np.percentile(blocks, 90, axis=2)                                  # (rows, cols)
    ring = np.pad(level, 1, mode="edge")
    level = np.max([ring[i:i + rows, j:j + cols] for i in range(3) for j in range(3)], axis=0)
    level = np.maximum(level, 0.5 * np.percentile(grey, 90))
    paper = Image.fromarray(level.astype(np.float32), "F").resize((cols * cell, rows * cell), Image.BILINEAR)
    paper = np.asarray(paper)[:h, :w]                                          # (H, W)
    return np.clip(grey / np.maximum(paper, 1.0) * 255.0, 0.0, 255.0)


def prepare_sketch(im: Image.Image) -> Image.Image:
    """A query sketch from anywhere -> dark strokes on a white square (RGB), like the training sketches.

    1. Transparency: strokes on a transparent background are composited onto white, or onto black
       when the strokes themselves are light (step 2 then inverts them).
    2. Grey levels, the longer side shrunk to at most SKETCH_MAX_SIDE; a dark image (median below
       mid-grey: light strokes on black) is inverted.
    3. Photos of paper: uneven paper brightness is flattened to white (_flatten_background) and
       the darkest 0.5 % of pixels are stretched to black.
    4. Crop to the strokes (pixels darker than mid-grey) plus a margin of SKETCH_MARGIN of their
       longer extent, and pad to a square with white: any aspect ratio, never stretched.
    A clean black-on-white drawing passes steps 1 to 3 unchanged. ``im`` itself is not modified.
    """
    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La", "P") or "transparency" in im.info:
        rgba = im.convert("RGBA")
        pixels = np.asarray(rgba, dtype=np.float64)                            # (H, W, 4)
        alpha, luma = pixels[..., 3], pixels[..., :3] @ np.array([0.299, 0.587, 0.114])
        light_strokes = alpha.sum() > 0 and (luma * alpha).sum() / alpha.sum() > 127.5
        im = Image.alpha_composite(Image.new("RGBA", im.size, (0, 0, 0, 255) if light_strokes else (255,) * 4), rgba)
    grey = to_rgb(im).convert("L")
    if max(grey.size) > SKETCH_MAX_SIDE:
        grey.thumbnail((SKETCH_MAX_SIDE, SKETCH_MAX_SIDE), Image.BOX)
    g = np.asarray(grey, dtype=np.float64)                                     # (H, W)
    if np.median(g) < 127.5:
        g = 255.0 - g
    g = _flatten_background(g)
    dark = np.percentile(g, 0.5)
    if dark < 250:
        g = np.clip((g - dark) / (255.0 - dark) * 255.0, 0.0, 255.0)
    grey = Image.fromarray(np.rint(g).astype(np.uint8), "L")

    ys, xs = np.nonzero(np.asarray(grey) < 128)
    if len(ys):
        x0, y0, x1, y1 = xs.min(), ys.min(), xs.max() + 1, ys.max() + 1
        margin = int(round(SKETCH_MARGIN * max(x1 - x0, y1 - y0)))
    else:  # a blank page: keep it whole
        x0, y0, x1, y1, margin = 0, 0, grey.width, grey.height, 0
    side = int(max(x1 - x0, y1 - y0) + 2 * margin)
    left, top = int(x0 + x1 - side) // 2, int(y0 + y1 - side) // 2            # the square, in image coordinates
    box = (max(left, 0), max(top, 0), min(left + side, grey.width), min(top + side, grey.height))
    square = Image.new("L", (side, side), 255)
    square.paste(grey.crop(box), (box[0] - left, box[1] - top))
    return square.convert("RGB")


def load_sketch(path: str) -> Image.Image:
    """Read a query sketch file of any origin, ready for the sketch encoder (see prepare_sketch)."""
    return prepare_sketch(open_image(path, upright=True))


class ImageFilesDataset(Dataset):
    """The one dataset of image paths for embedding (validation, evaluate.py, retrieve.py): returns
    (image (3, S, S) in [0, 1], readable), read by read_resized as training reads its images.

    With ``upright`` (a user's photos) each image is first turned by its EXIF orientation. With
    ``tolerant`` a file Pillow cannot read gives a zero image and readable=False instead of an error,
    so one bad file does not stop a large collection; a benchmark's files were checked by scan_dataset.
    ``fit``: how each image is made square (FITS), as its encoder asks (utils.image_fit).
    """

    def __init__(self, paths: list, image_size: int, upright: bool = True, tolerant: bool = True, fit: str = "resize"):
        self.paths, self.image_size, self.upright, self.tolerant, self.fit = paths, image_size, upright, tolerant, fit
        self.transform = build_transform(image_size)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int):
        try:
            return self.transform(read_resized(self.paths[index], self.image_size, self.upright, self.fit)), True
        except IMAGE_ERRORS:
            if not self.tolerant:
                raise
            return torch.zeros(3, self.image_size, self.image_size), False
