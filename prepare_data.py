"""Download the ZS-SBIR benchmarks and prepare them in the project layout, with every standard split.

    python prepare_data.py sketchy --output_dir data           # what `bash download_data.sh sketchy` runs
    python prepare_data.py all --output_dir /big/disk --exclude_invalid
    python prepare_data.py tuberlin --output_dir data --from ~/Downloads   # archives fetched by hand

For each dataset: download its archives, trying each archive's known sources in turn (Google Drive
ids through gdown, which handles Drive's large-file confirmation; partial downloads resume), verify
them (the published MD5 where there is one; a web page where an archive was expected is recognised),
check free disk space, unpack into DEST/<dataset>/raw/, and hard-link every image into
DEST/<dataset>/{sketches,photos}/<class>/ under canonical class names. The split lists shipped in
splits/<dataset>/ become DEST/<dataset>/splits/<name>/{train,test}_labels.txt, and the default split
is copied to the dataset root. The class and image counts are compared with the documented ones.
Completed steps are skipped on a re-run. docs/datasets.md has the sources, checksums and pitfalls.
Set ZSSBIR_DATA_URL to one or more base URLs (separated by spaces) to fetch every archive as
<base>/<archive name> from them in turn instead (mirrors, tests), and ZSSBIR_MD5_FILE to a file of
"md5  name" lines (md5sum's format) that replaces the published checksums (repackaged mirrors, tests).
"""
import argparse
import difflib
import hashlib
import os
import re
import shutil
import sys
import tarfile
import zipfile

# dataset.IMAGE_EXTENSIONS, written again so that preparing data does not import torch (3 s a start);
# tests/test_prepare_data.py checks that the two are equal.
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")

HERE = os.path.dirname(os.path.abspath(__file__))

# name -> its known sources, tried in this order: the official page's link, the ids in the peers' download
# scripts, then ids posted later. A source is a Google Drive file id ("gdrive:<id>") or a URL.
ARCHIVES = {
    "sketchy": {
        # sketchy.eye.gatech.edu, also in sem-pcyc's and torchsketch's scripts; then the id the Sketchy author
        # posted in 2024 (janesjanes/sketchy#9), which other projects download as rendered_256x256.7z
        "rendered_256x256.7z": ["gdrive:0B7ISyeE8QtDdTjE1MG9Gcy1kSkE", "gdrive:1z4--ToTXYb0-2cLuUWPYM5m7ST7Ob3Ck"],
        # Liu et al. 2017 (sem-pcyc, doodle2search); reported unreachable since 2019, no official replacement
        "EXTEND_image_sketchy.zip": ["gdrive:0B2U-hnwRkpRrdGZKTzkwbkEwVkk"],
        # the lists of invalid sketches, only with --exclude_invalid (torchsketch; the 2024 id of janesjanes/sketchy#9)
        "info-06-04.7z": ["gdrive:0B7ISyeE8QtDdaFhqeTZiNVBYZjA", "gdrive:1x8n7qaMg1z2SC-1sT5yjIMmMIr0UcBVW"],
    },
    "tuberlin": {
        "sketches_png.zip": ["https://cybertron.cg.tu-berlin.de/eitz/projects/classifysketch/sketches_png.zip",
                             "http://cybertron.cg.tu-berlin.de/eitz/projects/classifysketch/sketches_png.zip"],
        "ImageResized.zip": ["gdrive:0B2U-hnwRkpRrMFVvTmFQa3dmSUk"],  # Zhang et al. 2016, via sem-pcyc's script
    },
    "quickdraw": {
        "QuickDraw_sketches_final.zip": ["https://datasets.cvc.uab.es/QuickDraw/QuickDraw_sketches_final.zip",
                                         "http://datasets.cvc.uab.es/QuickDraw/QuickDraw_sketches_final.zip"],
        "QuickDraw_images_final.zip": ["https://datasets.cvc.uab.es/QuickDraw/QuickDraw_images_final.zip",
                                       "http://datasets.cvc.uab.es/QuickDraw/QuickDraw_images_final.zip"],
    },
}
ONLY_FOR_EXCLUDE_INVALID = {"info-06-04.7z"}
EXCLUDED = "excluded_invalid_sketches.txt"  # written beside the layout by --exclude_invalid
# Published MD5s (torchsketch's md5sum_table.py; dm_nevis agrees on sketches_png.zip). The other archives
# have none published: they are checked by unpacking them.
MD5 = {"rendered_256x256.7z": "6a9dccbd07b48566c4754a7674087657",
       "info-06-04.7z": "f99274c883d073b323c87140bef7bdbf",
       "sketches_png.zip": "023123df86a928a5273e3ba11990d8fd"}
SPLITS = {"sketchy": ("sake25", "sempcyc25", "yelamarthi21"), "tuberlin": ("sake30", "sempcyc30"),
          "quickdraw": ("qd30",)}  # the first is the default
# Photo folders whose names no separator rule can match to their class (sem-pcyc's download_datasets.sh
# renames the same ones): misspelled upstream, or named without the sketch class's qualifier.
FOLDER_ALIASES = {"tuberlin": {"tromobone": "trombone", "chandeler": "chandelier", "griaffe": "giraffe",
                               "diamod": "diamond", "spidar": "spider", "spacesshuttle": "space shuttle",
                               "wristwatching": "wrist-watch", "mouse": "mouse (animal)",
                               "pipe": "pipe (for smoking)"}}
# Documented sizes, compared with what was prepared: a shortfall is a warning with the numbers.
COUNTS = {"sketchy": {"classes": (125, "Sangkloy et al. 2016"), "sketches": (75471, "Sangkloy et al. 2016"),
                      "photos": (73002, "Liu et al. 2017")},
          "tuberlin": {"classes": (250, "Eitz et al. 2012"), "sketches": (20000, "Eitz et al. 2012: 250 x 80")},
          "quickdraw": {"classes": (110, "Dey et al. 2019"), "sketches": (330000, "Dey et al. 2019"),
                        "photos": (204000, "Dey et al. 2019")}}


class PrepareError(Exception):
    """A problem the user can fix; printed as one line."""


def canonical(name: str) -> str:
    """The project's spelling of a class name: lower case, runs of other characters as one '_'."""
    return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")


def match_key(name: str) -> str:
    """What two spellings of one class share: letters and digits only."""
    return re.sub(r"[^a-z0-9]", "", name.lower())


def read_list(path: str) -> list:
    with open(path, encoding="utf-8") as f:
        return [line.strip() for line in f if line.strip()]


def dataset_classes(name: str) -> list:
    """Canonical class names of a dataset, from the list shipped in splits/<name>/classes.txt."""
    return [canonical(c) for c in read_list(os.path.join(HERE, "splits", name, "classes.txt"))]


def split_lists(name: str) -> dict:
    """{split name: (seen classes, unseen classes)}, canonical names, seen = all others."""
    classes = dataset_classes(name)
    by_key = {match_key(c): c for c in classes}
    out = {}
    for split in SPLITS[name]:
        unseen = []
        for c in read_list(os.path.join(HERE, "splits", name, f"{split}.txt")):
            if match_key(c) not in by_key:
                raise PrepareError(f"splits/{name}/{split}.txt lists {c!r}, which is not a {name} class")
            unseen.append(by_key[match_key(c)])
        out[split] = ([c for c in classes if c not in unseen], unseen)
    return out


# ----------------------------------------------------------------------------------- download

def sources(dataset: str, archive: str) -> list:
    """Where to fetch an archive, in order: ZSSBIR_DATA_URL's bases when set, else ARCHIVES."""
    bases = os.environ.get("ZSSBIR_DATA_URL", "").split()
    return [base.rstrip("/") + "/" + archive for base in bases] if bases else ARCHIVES[dataset][archive]


def checksums() -> dict:
    """{archive name: expected MD5}: MD5, or the "md5  name" lines of ZSSBIR_MD5_FILE when set."""
    path = os.environ.get("ZSSBIR_MD5_FILE", "")
    if not path:
        return MD5
    try:
        with open(path, encoding="utf-8") as f:
            return {name.strip().lstrip("*"): md5.lower() for md5, name in (line.split(None, 1) for line in f
                                                                              if line.strip())}
    except (OSError, ValueError) as e:
        raise PrepareError(f"cannot read ZSSBIR_MD5_FILE {path} ({type(e).__name__}); it holds lines of "
                           "'md5  archive name', as md5sum writes them") from None


def md5_of(path: str) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def looks_like_html(path: str) -> bool:
    """A web page saved where an archive was expected (Google Drive's quota or sign-in page, a dead link)."""
    with open(path, "rb") as f:
        head = f.read(512).lstrip().lower()
    return head.startswith((b"<!doctype html", b"<html", b"<head", b"<?xml")) or b"<html" in head


def problem_with(path: str, archive: str) -> str:
    """Why the file at path cannot be used as ``archive`` ('' when it can)."""
    if looks_like_html(path):
        return ("is a web page, not the archive: Google Drive's download quota for the file is used up "
                "(try again in a day) or the link is dead")
    expected = checksums().get(archive)
    if not expected:
        return ""
    got = md5_of(path)
    return f"has MD5 {got}, not the expected {expected}: a damaged or different file" if got != expected else ""


def set_aside(path: str, tag: str) -> str:
    """Move a file that must not be used out of the way (never deleted: it may be worth a look)."""
    aside = f"{path}.{tag}.rejected"
    os.replace(path, aside)
    return aside


def partial_files(path: str) -> list:
    """The partial downloads of path that gdown leaves beside it (<name>XXXXXXXX.part)."""
    folder, name = os.path.split(path)
    return [os.path.join(folder, f) for f in os.listdir(folder) if f.startswith(name) and f.endswith(".part")]


def download(url: str, path: str) -> None:
    """Fetch url to path; an interrupted download leaves a .part file that the next call resumes."""
    if os.path.isfile(path):
        return
    import gdown

    print(f"downloading {os.path.basename(path).removesuffix('.unverified')} from {url}", flush=True)
    kwargs = {"id": url.split(":", 1)[1]} if url.startswith("gdrive:") else {"url": url}
    try:
        got = gdown.download(output=path, resume=True, quiet=False, **kwargs)
    except Exception as e:  # noqa: BLE001
        if "byte range" not in str(e):
            raise
        print("the server cannot resume this download; starting it again", flush=True)
        for part in partial_files(path):
            os.remove(part)
        got = gdown.download(output=path, resume=True, quiet=False, **kwargs)
    if not got or not os.path.isfile(path):
        raise OSError("no file came")


def fetch(dataset: str, archive: str, path: str, from_dir: str) -> None:
    """Bring a verified ``archive`` to path: from --from DIR, or from its sources in turn.

    A source's file is first saved as path.unverified; only a file that passes problem_with becomes
    path (so a finished archive is never fetched or checked again). A file that fails is set aside
    and the next source is tried; when none works, one PrepareError says what each source gave and
    how to fetch the file by hand."""
    if os.path.isfile(path):
        return
    by_hand = (f"fetch {archive} by hand (docs/datasets.md lists where, and its checksum) into a folder "
               "and run again with --from FOLDER (bash download_data.sh NAME [DEST] --from FOLDER)")
    if from_dir:
        src = os.path.join(from_dir, archive)
        if not os.path.isfile(src):
            raise PrepareError(f"--from {from_dir}: {archive} is not there; {by_hand}")
        problem = problem_with(src, archive)
        if problem:
            raise PrepareError(f"--from: {src} {problem}; it was not used")
        link(src, path)
        print(f"{archive}: using {src}", flush=True)
        return
    unverified, failures = path + ".unverified", []
    urls = sources(dataset, archive)
    for i, url in enumerate(urls, 1):
        try:
            download(url, unverified)
        except Exception as e:  # noqa: BLE001 - network errors come in many types
            got = sum(map(os.path.getsize, partial_files(unverified)))
            if got:  # this source was alive and broke off: resume it rather than mix another source's bytes in
                raise PrepareError(f"downloading {archive} from {url} broke off after {got / 2**20:.0f} MiB "
                                   f"({type(e).__name__}); run the same command again to resume it (or delete "
                                   f"{unverified}*.part to start again)") from None
            failures.append(f"source {i} ({url}) failed: {type(e).__name__}"
                            + (f": {str(e).splitlines()[0][:120]}" if str(e).strip() else ""))
            print(f"{archive}: {failures[-1]}", flush=True)
            continue
        problem = problem_with(unverified, archive)
        if problem:
            aside = set_aside(unverified, f"source{i}")
            failures.append(f"source {i} ({url}) {problem} (kept aside as {os.path.basename(aside)})")
            print(f"{archive}: {failures[-1]}", flush=True)
            continue
        os.replace(unverified, path)
        print(f"{archive}: source {i} of {len(urls)} worked ({url})", flush=True)
        return
    raise PrepareError(f"could not download {archive}: {'; '.join(failures)}. Try again later, or {by_hand}")


def open_archive(path: str):
    """(kind, member names with sizes) of a zip, 7z or tar archive; PrepareError if unreadable."""
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as z:
                return "zip", [(i.filename, i.file_size) for i in z.infolist() if not i.is_dir()]
        with open(path, "rb") as f:
            magic = f.read(6)
        if magic == b"7z\xbc\xaf\x27\x1c":
            import py7zr
            with py7zr.SevenZipFile(path) as z:
                return "7z", [(i.filename, i.uncompressed) for i in z.list() if not i.is_directory]
        if tarfile.is_tarfile(path):
            with tarfile.open(path) as t:
                return "tar", [(m.name, m.size) for m in t.getmembers() if m.isfile()]
    except Exception as e:  # noqa: BLE001 - any failure to read is a corrupt archive
        raise PrepareError(f"{path} is corrupt ({type(e).__name__}); it was removed, run the command again "
                           "to download it anew") from None
    raise PrepareError(f"{path} is not a zip, 7z or tar archive; it was removed, run the command again "
                       "to download it anew")


def extract(path: str, out_dir: str) -> None:
    """Unpack path into out_dir (skipped when done before), after checking the free disk space."""
    done = out_dir + ".done"
    if os.path.isfile(done):
        return
    try:
        kind, members = open_archive(path)
    except PrepareError:
        os.remove(path)
        raise
    need = sum(size for _, size in members)
    free = shutil.disk_usage(os.path.dirname(out_dir)).free
    if need > free:
        raise PrepareError(f"unpacking {os.path.basename(path)} needs {need / 2**30:.1f} GiB but only "
                           f"{free / 2**30:.1f} GiB is free under {os.path.dirname(out_dir)}; free some space "
                           "or choose another DEST")
    for name, _ in members:
        target = os.path.realpath(os.path.join(out_dir, name))
        if not target.startswith(os.path.realpath(out_dir) + os.sep):
            raise PrepareError(f"{path} holds an unsafe member path {name!r}; not unpacking it")
    print(f"unpacking {os.path.basename(path)} ({len(members)} files, {need / 2**20:.0f} MiB)", flush=True)
    shutil.rmtree(out_dir, ignore_errors=True)  # a half-unpacked folder from an interrupted run
    try:
        if kind == "zip":
            with zipfile.ZipFile(path) as z:
                z.extractall(out_dir)
        elif kind == "7z":
            import py7zr
            with py7zr.SevenZipFile(path) as z:
                z.extractall(out_dir)
        else:
            with tarfile.open(path) as t:
                t.extractall(out_dir, filter="data")
    except Exception as e:  # noqa: BLE001
        shutil.rmtree(out_dir, ignore_errors=True)
        os.remove(path)
        raise PrepareError(f"{path} is corrupt ({type(e).__name__} while unpacking); it was removed, run the "
                           "command again to download it anew") from None
    open(done, "w").close()


# ----------------------------------------------------------------------------------- preparation

def find_dir(root: str, *parts: str, default: str = "") -> str:
    """The first folder under root whose path ends with parts (archives nest their top folder differently)."""
    for cur, dirs, _ in os.walk(root):
        dirs.sort()
        if tuple(os.path.normpath(cur).split(os.sep)[-len(parts):]) == parts:
            return cur
    if default:
        return default
    raise PrepareError(f"no folder {'/'.join(parts)} inside {root}; the archive does not have the expected "
                       "layout (see docs/datasets.md)")


def class_folders(folder: str, aliases: dict | None = None) -> dict:
    """{match key: [folder]} of the class folders inside folder (the form place() takes); ``aliases`` maps
    a folder's name to the class it holds where the names do not match (FOLDER_ALIASES)."""
    aliases = {match_key(k): v for k, v in (aliases or {}).items()}
    out = {}
    for entry in sorted(os.listdir(folder)):
        if os.path.isdir(os.path.join(folder, entry)):
            key = match_key(entry)
            out.setdefault(match_key(aliases.get(key, key)), [os.path.join(folder, entry)])
    return out


def images_in(folder: str) -> list:
    """Image files of a folder (stray non-image files such as .txt or Thumbs.db are left out)."""
    return sorted(f for f in os.listdir(folder) if f.lower().endswith(IMAGE_EXTENSIONS)
                  and not f.startswith(".") and os.path.isfile(os.path.join(folder, f)))


def link(src: str, dst: str) -> None:
    """Hard-link src at dst (no second copy on disk); a symbolic link where hard links are impossible."""
    try:
        os.link(src, dst)
    except OSError:
        os.symlink(os.path.abspath(src), dst)


def place(domain_dir: str, classes: list, sources: dict, name_filter=None) -> int:
    """Link the images of every class's source folders into domain_dir/<class>/; returns the count.

    sources: {match key: [folders]}. Files with the same name (stem) in several folders are
    linked once (the first folder wins), which drops duplicated photos."""
    missing = [c for c in classes if not sources.get(match_key(c))]
    if missing:
        found = {match_key(os.path.basename(f)): os.path.basename(f) for folders in sources.values() for f in folders}
        where = os.path.dirname(next(iter(sources.values()))[0]) if sources else "the archive"
        def closest(c):
            return [found[k] for k in difflib.get_close_matches(match_key(c), found, n=3, cutoff=0.5)]

        said = [f"{c!r} (looked for a folder named {match_key(c)!r} in any spelling; closest: "
                f"{', '.join(closest(c)) or 'none'})" for c in missing]
        raise PrepareError(f"{len(missing)} {os.path.basename(domain_dir)} class(es) have no folder in {where}: "
                           f"{'; '.join(said)}. The archive is incomplete or laid out differently; see "
                           "docs/datasets.md (delete DEST/<dataset>/raw and DEST/<dataset>/downloads to fetch it anew)")
    count = 0
    for c in classes:
        folders = sources[match_key(c)]
        out = os.path.join(domain_dir, c)
        os.makedirs(out, exist_ok=True)
        seen = set()
        for folder in folders:
            for f in images_in(folder):
                stem = os.path.splitext(f)[0]
                if stem in seen or (name_filter and not name_filter(c, stem)):
                    continue
                seen.add(stem)
                link(os.path.join(folder, f), os.path.join(out, f))
                count += 1
    return count


def invalid_sketches(raw: str) -> set:
    """Stems of the sketches Sketchy lists as invalid in info/invalid-*.txt (any nesting)."""
    stems = set()
    for cur, _, files in os.walk(raw):
        for f in files:
            if re.fullmatch(r"invalid-\w+\.txt", f):
                for line in read_list(os.path.join(cur, f)):
                    stems.add(os.path.splitext(line.replace("\\", "/").split("/")[-1])[0])
    return stems


def place_both(out: str, classes: list, sketches: dict, photos: dict, keep=None) -> None:
    place(os.path.join(out, "sketches"), classes, sketches, keep)
    place(os.path.join(out, "photos"), classes, photos)


def prepare_sketchy(raw: str, out: str, classes: list, exclude_invalid: bool) -> None:
    sketch_root = find_dir(raw, "sketch", "tx_000000000000")  # the other tx_* folders are augmentations
    photo_root = find_dir(raw, "photo", "tx_000000000000")
    extended = find_dir(raw, "EXTEND_image_sketchy")
    invalid = invalid_sketches(raw) if exclude_invalid else set()
    if exclude_invalid and not invalid:
        raise PrepareError("--exclude_invalid: no info/invalid-*.txt found in info-06-04.7z; delete "
                           "DEST/sketchy/raw/info-06-04.7z.d and DEST/sketchy/downloads/info-06-04.7z and run again")
    left_out = set()
    def keep(c, stem):
        if stem in invalid:
            left_out.add(stem)
            return False
        return True
    ext, orig = class_folders(extended), class_folders(photo_root)
    photos = {k: ext[k] + orig.get(k, []) for k in ext}  # an original only where the extended set lacks it
    place_both(out, classes, class_folders(sketch_root), photos, keep)
    if exclude_invalid:
        with open(os.path.join(out, EXCLUDED), "w", encoding="utf-8") as f:
            f.write("".join(stem + "\n" for stem in sorted(left_out)))
        print(f"sketchy: left out the {len(left_out)} sketches listed in info/invalid-*.txt ({len(invalid)} "
              f"listed; the ones left out are named in {os.path.join(out, EXCLUDED)})", flush=True)


def prepare_tuberlin(raw: str, out: str, classes: list, exclude_invalid: bool) -> None:
    place_both(out, classes, class_folders(find_dir(raw, "png")),
               class_folders(find_dir(raw, "ImageResized"), FOLDER_ALIASES["tuberlin"]))


def prepare_quickdraw(raw: str, out: str, classes: list, exclude_invalid: bool) -> None:
    roots = [find_dir(raw, name, default=os.path.join(raw, name + ".zip.d"))
             for name in ("QuickDraw_sketches_final", "QuickDraw_images_final")]
    place_both(out, classes, *map(class_folders, roots))


PREPARE = {"sketchy": prepare_sketchy, "tuberlin": prepare_tuberlin, "quickdraw": prepare_quickdraw}


def write_splits(out: str, name: str) -> None:
    for i, (split, (seen, unseen)) in enumerate(split_lists(name).items()):
        folders = [os.path.join(out, "splits", split)] + ([out] if i == 0 else [])
        for folder in folders:
            os.makedirs(folder, exist_ok=True)
            for fname, classes in (("train_labels.txt", seen), ("test_labels.txt", unseen)):
                with open(os.path.join(folder, fname), "w", encoding="utf-8") as f:
                    f.write("\n".join(classes) + "\n")


def read_word_vectors(path: str, wanted: set) -> dict:
    """{word: vector} for the wanted words of a GloVe / word2vec text file or a word2vec .bin(.gz) file."""
    import gzip

    import numpy as np

    if not os.path.isfile(path):
        raise PrepareError(f"word-vector file {path} not found; pass a GloVe .txt or word2vec .bin/.txt file")
    opener = gzip.open if path.endswith(".gz") else open
    found = {}
    try:
        with opener(path, "rb") as f:
            if ".bin" in os.path.basename(path):  # word2vec binary: "N D\n", then "word " + D float32 each
                n, dim = map(int, f.readline().split())
                for _ in range(n):
                    word = b""
                    while (ch := f.read(1)) not in (b" ", b""):
                        word += ch
                    vec = np.frombuffer(f.read(4 * dim), dtype=np.float32)
                    word = word.strip().decode("utf-8", "ignore")
                    if word in wanted:
                        found[word] = vec.copy()
            else:
                for line in f:
                    parts = line.rstrip().split(b" ")
                    if len(parts) < 3:
                        continue  # the "N D" header of word2vec text files
                    word = parts[0].decode("utf-8", "ignore")
                    if word in wanted:
                        found[word] = np.asarray(parts[1:], dtype=np.float32)
    except (OSError, ValueError) as e:
        raise PrepareError(f"cannot read word vectors from {path} ({type(e).__name__}); pass a GloVe .txt or "
                           "word2vec .bin/.txt file") from None
    return found


def class_vectors(classes: list, raw_names: dict, path: str):
    """(C, D) float32 class-name vectors: the whole name as one token if the file has it (word2vec has
    phrases such as hot_air_balloon), else the mean of its words, in the spellings the file knows;
    a name with no known word gets zeros (its negatives are then drawn uniformly) and a warning."""
    import numpy as np

    def forms(token):
        return [token, token.lower(), token.capitalize()]
    words = {c: [w for w in re.split(r"[^A-Za-z0-9]+", raw_names[c]) if w] for c in classes}
    wanted = {f for c in classes for f in forms("_".join(words[c]))} | \
             {f for c in classes for w in words[c] for f in forms(w)}
    vectors = read_word_vectors(path, wanted)
    if not vectors:
        raise PrepareError(f"{path} has no vector for any class-name word; is it a word-vector file?")
    dim = len(next(iter(vectors.values())))
    out, missing = np.zeros((len(classes), dim), dtype=np.float32), []
    for i, c in enumerate(classes):
        phrase = next((vectors[f] for f in forms("_".join(words[c])) if f in vectors), None)
        parts = [next(vectors[f] for f in forms(w) if f in vectors) for w in words[c]
                 if any(f in vectors for f in forms(w))]
        if phrase is not None and len(words[c]) > 1:
            out[i] = phrase
        elif parts:
            out[i] = np.mean(parts, axis=0)
        else:
            missing.append(c)
    if missing:
        print(f"warning: no word vector for {len(missing)} class(es) ({', '.join(missing[:5])}); they get zero "
              "vectors, so their negatives are drawn uniformly")
    return out


def write_embeddings(out: str, name: str, path: str) -> None:
    """train_embeddings.npy / test_embeddings.npy beside every split's label files."""
    import numpy as np

    raw_names = {canonical(c): c for c in read_list(os.path.join(HERE, "splits", name, "classes.txt"))}
    classes = dataset_classes(name)
    table = dict(zip(classes, class_vectors(classes, raw_names, path)))
    for i, (split, (seen, unseen)) in enumerate(split_lists(name).items()):
        for folder in [os.path.join(out, "splits", split)] + ([out] if i == 0 else []):
            for fname, names in (("train_embeddings.npy", seen), ("test_embeddings.npy", unseen)):
                np.save(os.path.join(folder, fname), np.stack([table[c] for c in names]))


def count_images(out: str) -> tuple[int, int, int]:
    classes = sorted(os.listdir(os.path.join(out, "sketches")))
    n = [sum(len(os.listdir(os.path.join(out, d, c))) for c in classes) for d in ("sketches", "photos")]
    return len(classes), n[0], n[1]


def count_shortfalls(name: str, out: str, counts: tuple) -> list:
    """Warnings for every count below the documented one (COUNTS); the invalid sketches that
    --exclude_invalid left out (listed in EXCLUDED) do not count as missing."""
    warnings = []
    excluded = len(read_list(os.path.join(out, EXCLUDED))) if os.path.isfile(os.path.join(out, EXCLUDED)) else 0
    for what, got in zip(("classes", "sketches", "photos"), counts):
        documented, source = COUNTS[name].get(what, (0, ""))
        less = excluded if what == "sketches" else 0
        if got < documented - less:
            note = f", less the {less:,} invalid ones left out" if less else ""
            warnings.append(f"warning: {name} has {got:,} {what} where {documented - less:,} are documented "
                            f"({source}{note}): {documented - less - got:,} missing; the archive may be incomplete "
                            "(see docs/datasets.md)")
    return warnings


def get_dataset(name: str, dest: str, exclude_invalid: bool, word_vectors: str = "",
                from_dir: str = "") -> tuple[int, int, int]:
    out = os.path.join(dest, name)
    raw = os.path.join(out, "raw")
    marker = os.path.join(out, ".prepared")
    state = f"exclude_invalid={exclude_invalid}"
    if os.path.isfile(marker) and open(marker).read() == state:
        print(f"{name}: already prepared in {out}")
        if word_vectors:
            write_embeddings(out, name, word_vectors)
        return count_images(out)
    os.makedirs(raw, exist_ok=True)
    for archive in ARCHIVES[name]:
        if archive in ONLY_FOR_EXCLUDE_INVALID and not exclude_invalid:
            continue
        path = os.path.join(out, "downloads", archive)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        fetch(name, archive, path, from_dir)
        extract(path, os.path.join(raw, archive + ".d"))
    for domain in ("sketches", "photos"):
        shutil.rmtree(os.path.join(out, domain), ignore_errors=True)  # links only: raw/ keeps the files
    if os.path.isfile(os.path.join(out, EXCLUDED)):
        os.remove(os.path.join(out, EXCLUDED))
    print(f"{name}: linking images into {out}/sketches and {out}/photos", flush=True)
    PREPARE[name](raw, out, dataset_classes(name), exclude_invalid)
    write_splits(out, name)
    if word_vectors:
        write_embeddings(out, name, word_vectors)
    with open(marker, "w") as f:
        f.write(state)
    return count_images(out)


def write_caches(root: str, sizes: list, edge_maps: bool) -> None:
    """Write (or complete) the disk cache of every image of a prepared dataset at each size."""
    if not sizes:
        return
    import dataset  # torch and torchvision: 3 s a start, for this alone
    import utils
    try:
        data = dataset.scan_dataset(root, check_images=False)
    except dataset.DataError as e:
        raise PrepareError(str(e)) from None
    classes = data.seen + data.unseen
    items = [(p, False) for table in (data.sketches, data.photos) for c in classes for p in table[c]]
    items += [(p, True) for c in classes for p in data.photos[c]] if edge_maps else []
    for size in sizes:
        added, kept = dataset.write_disk_cache(root, items, size, os.path.join(root, "cache"), utils.available_cpus())
        npy = dataset.cache_paths(os.path.join(root, "cache"), size)[0]
        print(f"disk cache {npy}: {added} images written, {kept} kept ({os.path.getsize(npy) / 2 ** 30:.2f} GiB)")


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("dataset", type=str, help="sketchy, tuberlin, quickdraw or all")
    p.add_argument("--output_dir", "--dest", type=str, default="data", metavar="DEST",
                   help="folder that receives DEST/<dataset>/ (--dest is its older name)")
    p.add_argument("--exclude_invalid", action=argparse.BooleanOptionalAction, default=False,
                   help="Sketchy: also fetch info-06-04.7z and leave out the sketches its info/invalid-*.txt list")
    p.add_argument("--from", type=str, default="", dest="from_dir",
                   help="take the archives from this folder (fetched by hand, e.g. from a mirror) instead of "
                        "downloading them; they are checked like downloads (docs/datasets.md lists names and MD5s)")
    p.add_argument("--cache_sizes", type=int, nargs="*", default=[],
                   help="also write the disk cache that train.py reads at these --image_size values (DEST/<dataset>/"
                        "cache/<S>px.npy, 3 S^2 bytes per image; docs/performance.md lists the sizes)")
    p.add_argument("--cache_edge_maps", action=argparse.BooleanOptionalAction, default=False,
                   help="the disk cache also holds the photos' edge maps (the scratch recipe's --edge_maps)")
    p.add_argument("--with_embeddings", type=str, default="",
                   help="a word-vector file (GloVe .txt, word2vec .bin or .txt, optionally .gz): also write "
                        "class-name vectors train_embeddings.npy / test_embeddings.npy for every split")
    return p


def main(args) -> None:
    names = list(ARCHIVES) if args.dataset == "all" else [args.dataset]
    dest = args.output_dir  # DEST: the folder that receives DEST/<dataset>/
    if any(n not in ARCHIVES for n in names):
        raise PrepareError(f"unknown dataset {args.dataset!r}; choose sketchy, tuberlin, quickdraw, all or demo")
    try:
        os.makedirs(dest, exist_ok=True)
    except OSError as e:
        raise PrepareError(f"cannot create {dest} ({e.strerror}); choose a DEST you can write to") from None
    if not os.access(dest, os.W_OK | os.X_OK):
        raise PrepareError(f"{dest} is not writable; choose a DEST you can write to")
    if args.with_embeddings and not os.path.isfile(args.with_embeddings):
        raise PrepareError(f"word-vector file {args.with_embeddings} not found; pass a GloVe .txt or "
                           "word2vec .bin/.txt file")
    if args.from_dir and not os.path.isdir(args.from_dir):
        raise PrepareError(f"--from {args.from_dir} is not a folder; pass the folder that holds the archives")
    if any(s < 32 for s in args.cache_sizes):
        raise PrepareError(f"--cache_sizes must be at least 32 pixels each, got {args.cache_sizes}")
    summary = {n: get_dataset(n, dest, args.exclude_invalid, args.with_embeddings, args.from_dir) for n in names}
    for n in names:
        write_caches(os.path.join(dest, n), args.cache_sizes, args.cache_edge_maps)
    for n, (c, s, p) in summary.items():
        splits = ", ".join(f"{s_}{' (default)' if i == 0 else ''}" for i, s_ in enumerate(SPLITS[n]))
        print(f"{n}: {c} classes, {s} sketches, {p} photos -> {os.path.join(dest, n)}; splits: {splits}")
        for warning in count_shortfalls(n, os.path.join(dest, n), (c, s, p)):
            print(warning)


if __name__ == "__main__":
    try:
        main(get_args_parser().parse_args())
    except PrepareError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted; run the same command again to resume", file=sys.stderr)
        sys.exit(130)
