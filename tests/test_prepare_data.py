"""download_data.sh / prepare_data.py against fake archives served from 127.0.0.1 (no internet).

Every fake archive copies the layout of the real one: the folder names, file-name patterns and
extra files. The source each layout comes from is noted above the code that builds it. Only the
images are tiny, and there are fewer of them. The published MD5s cannot match the fakes, so the
tests pass the fakes' own checksums through ZSSBIR_MD5_FILE, which is the file a repackaged mirror
would provide.
"""
import hashlib
import http.server
import io
import os
import random
import signal
import subprocess
import sys
import threading
import time
import zipfile

import numpy as np
import pytest
from PIL import Image

import prepare_data
from conftest import ROOT, make_tiny_dataset

PNG, JPG = io.BytesIO(), io.BytesIO()
Image.new("RGB", (8, 8), "white").save(PNG, format="PNG")
Image.new("RGB", (8, 8), "red").save(JPG, format="JPEG")
PNG, JPG = PNG.getvalue(), JPG.getvalue()
PADDING = random.Random(0).randbytes(1_500_000)  # incompressible: makes a download long enough to interrupt
SKETCHY_TX_PHOTO = ("tx_000000000000", "tx_000100000000")
SKETCHY_TX_SKETCH = ("tx_000000000000", "tx_000100000000", "tx_000000000010", "tx_000000000110",
                     "tx_000000001010", "tx_000000001110")
MD5_FILE = "MD5SUMS"


def classes(name):
    with open(os.path.join(ROOT, "splits", name, "classes.txt")) as f:
        return [line.strip() for line in f if line.strip()]


def write_zip(path, files):
    with zipfile.ZipFile(path, "w") as z:
        for name, data in files.items():
            z.writestr(name, data)


def write_7z(path, files):
    import py7zr
    with py7zr.SevenZipFile(path, "w") as z:
        for name, data in files.items():
            z.writestr(data, name)


def wnid(i: int) -> str:
    """A WordNet-id-like photo stem prefix for class i, as Sketchy and ImageNet name their photos."""
    return f"n{2000000 + i:08d}"


# Sketchy's invalid-sketch lists (info-06-04.7z): bare sketch ids, CRLF line ends (sources below).
INVALID = {"invalid-error.txt": [f"{wnid(0)}_1-2"],                  # airplane: present, left out
           "invalid-pose.txt": [f"{wnid(1)}_2-1", f"{wnid(1)}_2-2"],  # alarm_clock: both present, left out
           "invalid-ambiguous.txt": ["n09999999_1-1"],                # no such sketch: nothing to leave out
           "invalid-context.txt": []}


def make_archives(folder):
    """Fake archives of all three datasets in their real layouts, with MD5SUMS for the checked ones."""
    os.makedirs(folder, exist_ok=True)
    make_sketchy_archives(folder)
    make_tuberlin_archives(folder)
    make_quickdraw_archives(folder)
    with open(os.path.join(folder, MD5_FILE), "w") as f:
        for name in prepare_data.MD5:
            f.write(f"{hashlib.md5(open(os.path.join(folder, name), 'rb').read()).hexdigest()}  {name}\n")
    make_failing_sources(folder)


def make_sketchy_archives(folder):
    """rendered_256x256.7z, info-06-04.7z and EXTEND_image_sketchy.zip."""
    sketchy = classes("sketchy")

    # rendered_256x256.7z: README.txt beside 256x256/{photo,sketch}/tx_*/<class>/; photos <wnid>_<k>.jpg,
    # sketches <wnid>_<k>-<j>.png. Sources: sem-pcyc download_datasets.sh (7z x; rm README.txt; mv 256x256),
    # janesjanes/sketchy#7 (the tx_* folders: 2 photo renderings, 6 sketch renderings), SAKE's
    # dataset/Sketchy/zeroshot1 file lists (names such as car_(sedan)/n02958343_10047-1.png).
    files = {"README.txt": b"Sketchy Database, rendered 256x256\n" + PADDING}
    for i, c in enumerate(sketchy):
        for k in (1, 2):
            for tx in SKETCHY_TX_PHOTO:
                files[f"256x256/photo/{tx}/{c}/{wnid(i)}_{k}.jpg"] = JPG
            for tx in SKETCHY_TX_SKETCH if i < 3 else SKETCHY_TX_SKETCH[:2]:  # every rendering for a few classes
                for j in (1, 2):
                    files[f"256x256/sketch/{tx}/{c}/{wnid(i)}_{k}-{j}.png"] = PNG
    write_7z(os.path.join(folder, "rendered_256x256.7z"), files)

    # info-06-04.7z: info/{invalid-*.txt, README.txt, stats.csv, testset.txt}; a line is a bare sketch id
    # such as n02691156_10151-1. Sources: torchsketch (the archive and its MD5), the DLI-Net README (the
    # tree of info/), the peers' loaders (x + ".png" compared with a sketch's file name). The archive's top
    # folder is inferred from peers that extract it and then read <root>/info/; no listing was found.
    info = {f"info/{name}": "".join(f"{line}\r\n" for line in lines).encode() for name, lines in INVALID.items()}
    info["info/README.txt"] = b"invalid-*.txt: a listing of all sketches that were deemed invalid\r\n"
    info["info/stats.csv"] = b"ImageNetID,SketchID,Category,CategoryID,Difficulty,Stroke_Count\r\n"
    info["info/testset.txt"] = f"airplane/{wnid(0)}_1.jpg\r\n".encode()
    write_7z(os.path.join(folder, "info-06-04.7z"), info)

    # EXTEND_image_sketchy.zip: EXTEND_image_sketchy/<class>/ext_<N>.jpg plus the Sketchy originals
    # <wnid>_<k>.jpg; camel also holds c.jpg and lacks one original. Sources: sem-pcyc (the folder name),
    # SAKE's EXTEND_image_sketchy_ready list (73,002 files: 60,502 ext_*, 12,499 originals, camel/c.jpg).
    ext = {}
    for i, c in enumerate(sketchy):
        ext[f"EXTEND_image_sketchy/{c}/ext_1.jpg"] = ext[f"EXTEND_image_sketchy/{c}/ext_2.jpg"] = JPG
        for k in (1, 2):
            if not (c == "camel" and k == 2):
                ext[f"EXTEND_image_sketchy/{c}/{wnid(i)}_{k}.jpg"] = JPG
    ext["EXTEND_image_sketchy/camel/c.jpg"] = JPG
    write_zip(os.path.join(folder, "EXTEND_image_sketchy.zip"), ext)


def make_tuberlin_archives(folder):
    """sketches_png.zip and ImageResized.zip."""
    # sketches_png.zip: png/<class as spelled by TU-Berlin, with spaces, hyphens, parentheses>/<N>.png,
    # N numbered across the whole set in class order, and png/filelist.txt of "<class>/<N>.png" lines.
    # Sources: sem-pcyc download_datasets.sh (unzip; mv png sketches; renames such as 'mouse (animal)'),
    # dm_nevis sketch.py (the class list; it skips filelist.txt), SAKE's png_ready_filelist (airplane/1.png,
    # alarm clock/81.png).
    sk, listed, n = {}, [], 0
    for c in classes("tuberlin"):
        for _ in range(2):
            n += 1
            sk[f"png/{c}/{n}.png"] = PNG
            listed.append(f"{c}/{n}.png")
    sk["png/filelist.txt"] = "\n".join(listed).encode()
    write_zip(os.path.join(folder, "sketches_png.zip"), sk)

    # ImageResized.zip: ImageResized/<class without spaces, hyphens or parentheses>/<wnid>_<id>.JPEG, seven
    # folders misspelled, and mouse/ and pipe/ for 'mouse (animal)' and 'pipe (for smoking)'. Sources:
    # sem-pcyc download_datasets.sh (mv images/mouse images/mouse_(animal), images/pipe ..., the seven
    # misspellings, rename *.JPEG), SAKE's ImageResized_ready lists (banana/n07753592_7382.JPEG).
    upstream = {prepare_data.match_key(v): k for k, v in prepare_data.FOLDER_ALIASES["tuberlin"].items()}
    ph = {}
    for i, c in enumerate(classes("tuberlin")):
        key = prepare_data.match_key(c)
        ph[f"ImageResized/{upstream.get(key, key)}/{wnid(i)}_1.JPEG"] = JPG
        ph[f"ImageResized/{upstream.get(key, key)}/{wnid(i)}_2.JPEG"] = JPG
    write_zip(os.path.join(folder, "ImageResized.zip"), ph)


def make_quickdraw_archives(folder):
    """QuickDraw_sketches_final.zip and QuickDraw_images_final.zip."""
    # QuickDraw_{sketches,images}_final.zip: QuickDraw_sketches_final/<class>/<key id>.png and
    # QuickDraw_images_final/<class>/image_<N>.jpg, a few free-form .jpeg names; class names mix
    # spaces, underscores and hyphens (cruise ship, fire_hydrant, hot-air_balloon). Sources: doodle2search
    # (quickdraw_extended.py top folders, quick_draw_class_labels.txt), ZSE-SBIR's QuickDraw lists
    # (bat/5147947173937152.png, image_01353.jpg, cow/304. cow-calf-cattle-stock-51311.jpeg).
    sk, ph = {}, {}
    for i, c in enumerate(classes("quickdraw")):
        sk[f"QuickDraw_sketches_final/{c}/{5147947173937152 + 2 * i}.png"] = PNG
        sk[f"QuickDraw_sketches_final/{c}/{5147947173937153 + 2 * i}.png"] = PNG
        ph[f"QuickDraw_images_final/{c}/image_{i:05d}.jpg"] = JPG
    ph["QuickDraw_images_final/cow/304. cow-calf-cattle-stock-51311.jpeg"] = JPG
    write_zip(os.path.join(folder, "QuickDraw_sketches_final.zip"), sk)
    write_zip(os.path.join(folder, "QuickDraw_images_final.zip"), ph)


def make_failing_sources(folder):
    """Sources that fail, beside the archives in ``folder``: html/, a web page where an archive should be
    (Drive's quota page), and bad/, the archives with changed bytes."""
    for sub, change in (("html", lambda name, raw: b"<!DOCTYPE html><html><head><title>Google Drive - Quota "
                                                    b"exceeded</title></head><body>Too many users</body></html>"),
                        ("bad", lambda name, raw: raw[:-1] + bytes([raw[-1] ^ 0xFF]))):
        os.makedirs(os.path.join(folder, sub))
        for name in os.listdir(folder):
            path = os.path.join(folder, name)
            if os.path.isfile(path) and name != MD5_FILE:
                with open(path, "rb") as f:
                    raw = f.read()
                with open(os.path.join(folder, sub, name), "wb") as f:
                    f.write(change(name, raw))


class Server:
    """A static file server on 127.0.0.1 that honours Range requests and can stall one download."""

    def __init__(self, folder):
        self.folder, self.ranges, self.stall, self.honour_ranges = folder, [], None, True
        self.release = threading.Event()
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                path = os.path.join(outer.folder, self.path.lstrip("/"))
                if not os.path.isfile(path):
                    self.send_error(404)
                    return
                data = open(path, "rb").read()
                start = 0
                rng = self.headers.get("Range")
                outer.ranges.append((os.path.basename(path), rng))
                if rng and outer.honour_ranges:
                    start = int(rng.split("=")[1].split("-")[0])
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                else:
                    self.send_response(200)
                self.send_header("Content-Length", str(len(data) - start))
                self.send_header("Accept-Ranges", "bytes")
                self.end_headers()
                if outer.stall == os.path.basename(path):
                    outer.stall = None
                    self.wfile.write(data[start:start + 1_000_000])
                    self.wfile.flush()
                    outer.release.wait(120)  # the test kills the client meanwhile
                    return
                self.wfile.write(data[start:])

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.release.set()
        self.httpd.shutdown()
        self.httpd.server_close()  # its listening socket, else a ResourceWarning whenever it is collected


@pytest.fixture(scope="module")
def archives(tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("archives"))
    make_archives(folder)
    return folder


@pytest.fixture
def server(archives):
    s = Server(archives)
    yield s
    s.close()


def download_env(server, archives, *bases: str) -> dict:
    """The environment of a download from the fake server: its bases (default: the good archives), tried
    in turn, and the fakes' checksums."""
    urls = " ".join(f"{server.url}/{b}".rstrip("/") for b in (bases or ("",)))
    return dict(os.environ, ZSSBIR_DATA_URL=urls, ZSSBIR_MD5_FILE=os.path.join(archives, MD5_FILE),
                PYTHON=sys.executable)


def run_download(server, *args, bases=(), **popen):
    return subprocess.run(["bash", os.path.join(ROOT, "download_data.sh"), *args],
                          env=download_env(server, server.folder, *bases), capture_output=True, text=True,
                          timeout=600, **popen)


def listing(root, domain):
    return {c: sorted(os.listdir(os.path.join(root, domain, c))) for c in os.listdir(os.path.join(root, domain))}


def test_preparing_data_lists_the_images_training_reads_without_importing_torch():
    import dataset
    assert prepare_data.IMAGE_EXTENSIONS == dataset.IMAGE_EXTENSIONS
    proc = subprocess.run([sys.executable, "-c", "import sys, prepare_data; print('torch' in sys.modules)"],
                          cwd=ROOT, capture_output=True, text=True)
    assert proc.stdout.strip() == "False", proc.stderr


def test_split_lists_match_the_class_lists_and_never_overlap():
    for name, splits in prepare_data.SPLITS.items():
        all_classes = prepare_data.dataset_classes(name)
        assert len(set(all_classes)) == len(all_classes) == {"sketchy": 125, "tuberlin": 250, "quickdraw": 110}[name]
        for split, (seen, unseen) in prepare_data.split_lists(name).items():
            size = int("".join(ch for ch in split if ch.isdigit()))
            assert len(unseen) == size, (name, split)
            assert not set(seen) & set(unseen) and sorted(seen + unseen) == sorted(all_classes), (name, split)
    canon = prepare_data.canonical
    assert [canon(c) for c in ("hot-air_balloon", "jack-o-lantern", "car_(sedan)", "wrist-watch")] == [
        "hot_air_balloon", "jack_o_lantern", "car_sedan", "wrist_watch"]
    assert prepare_data.match_key("alarm clock") == prepare_data.match_key("alarm_clock") == "alarmclock"


def test_all_three_datasets_prepared_with_every_split(server, tmp_path):
    dest = str(tmp_path / "data")
    proc = run_download(server, "all", dest, "--exclude_invalid")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "sketchy: 125 classes, 497 sketches, 501 photos" in proc.stdout  # 3 invalid sketches left out
    assert "tuberlin: 250 classes, 500 sketches, 500 photos" in proc.stdout
    assert "quickdraw: 110 classes, 220 sketches, 111 photos" in proc.stdout
    for name, archives in prepare_data.ARCHIVES.items():
        for archive in archives:
            assert f"{archive}: source 1 of 1 worked" in proc.stdout, archive

    sketchy = os.path.join(dest, "sketchy")
    sk, ph = listing(sketchy, "sketches"), listing(sketchy, "photos")
    assert {"hot_air_balloon", "jack_o_lantern", "car_sedan"} <= set(sk) and set(sk) == set(ph)
    car = prepare_data.dataset_classes("sketchy").index("car_sedan")
    assert ph["car_sedan"] == ["ext_1.jpg", "ext_2.jpg", f"{wnid(car)}_1.jpg", f"{wnid(car)}_2.jpg"]  # each once
    camel = prepare_data.dataset_classes("sketchy").index("camel")
    assert ph["camel"] == ["c.jpg", "ext_1.jpg", "ext_2.jpg", f"{wnid(camel)}_1.jpg", f"{wnid(camel)}_2.jpg"]
    assert len(sk["car_sedan"]) == 4  # only tx_000000000000: the other renderings are augmentations
    photo = os.path.join(sketchy, "photos", "car_sedan", "ext_1.jpg")
    assert os.stat(photo).st_nlink == 2  # linked from raw/, not copied
    tub = os.path.join(dest, "tuberlin")
    assert {"alarm_clock", "trombone", "space_shuttle", "wrist_watch", "chandelier"} <= set(listing(tub, "photos"))
    trombone = prepare_data.dataset_classes("tuberlin").index("trombone")
    assert listing(tub, "photos")["trombone"] == [f"{wnid(trombone)}_1.JPEG", f"{wnid(trombone)}_2.JPEG"]  # tromobone/
    assert "filelist.txt" not in os.listdir(os.path.join(tub, "sketches"))
    qd = listing(os.path.join(dest, "quickdraw"), "photos")
    assert qd["cow"][0] == "304. cow-calf-cattle-stock-51311.jpeg" and len(qd["cow"]) == 2

    for name, splits in prepare_data.SPLITS.items():
        root = os.path.join(dest, name)
        for split in splits:
            for f in ("train_labels.txt", "test_labels.txt"):
                assert os.path.isfile(os.path.join(root, "splits", split, f)), (name, split, f)
        for f in ("train_labels.txt", "test_labels.txt"):  # the default split at the dataset root
            assert open(os.path.join(root, f)).read() == open(os.path.join(root, "splits", splits[0], f)).read()
    import dataset
    data = dataset.scan_dataset(sketchy, class_split="sempcyc25")
    assert len(data.unseen) == 25 and len(data.seen) == 100 and len(data.photos["car_sedan"]) == 4

    # The fakes are small: every count below the documented one is a warning with the numbers.
    assert "warning: sketchy has 497 sketches where 75,468 are documented" in proc.stdout  # 75,471 less 3 left out
    assert "warning: sketchy has 501 photos where 73,002 are documented" in proc.stdout
    assert "warning: tuberlin has 500 sketches where 20,000 are documented" in proc.stdout
    assert "warning: quickdraw has 220 sketches where 330,000 are documented" in proc.stdout
    assert "classes where" not in proc.stdout  # every class is there

    again = run_download(server, "all", dest, "--exclude_invalid")  # everything is complete: nothing is fetched
    assert again.returncode == 0 and again.stdout.count("already prepared") == 3
    assert len(server.ranges) == 7


def test_tuberlin_real_folder_names_prepare_all_250_classes(server, tmp_path):
    """ImageResized/mouse and /pipe hold 'mouse (animal)' and 'pipe (for smoking)' (sem-pcyc renames them);
    seven folders are misspelled; the rest drop spaces, hyphens and parentheses."""
    dest = str(tmp_path / "data")
    proc = run_download(server, "tuberlin", dest)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "tuberlin: 250 classes, 500 sketches, 500 photos" in proc.stdout
    names = prepare_data.dataset_classes("tuberlin")
    photos = listing(os.path.join(dest, "tuberlin"), "photos")
    assert len(photos) == 250 and all(len(files) == 2 for files in photos.values())
    for cls in ("mouse_animal", "pipe_for_smoking", "computer_mouse", "bear_animal", "wrist_watch", "space_shuttle"):
        assert photos[cls] == [f"{wnid(names.index(cls))}_1.JPEG", f"{wnid(names.index(cls))}_2.JPEG"], cls
    raw = os.path.join(dest, "tuberlin", "raw", "ImageResized.zip.d", "ImageResized")
    assert os.path.samefile(os.path.join(dest, "tuberlin", "photos", "mouse_animal", photos["mouse_animal"][0]),
                            os.path.join(raw, "mouse", photos["mouse_animal"][0]))


def test_exclude_invalid_removes_exactly_the_listed_sketches(server, tmp_path):
    dest = str(tmp_path / "data")
    plain = run_download(server, "sketchy", str(tmp_path / "plain"))
    assert plain.returncode == 0, plain.stderr[-2000:]
    assert "info-06-04.7z" not in plain.stdout  # fetched only for --exclude_invalid
    proc = run_download(server, "sketchy", dest, "--exclude_invalid")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "left out the 3 sketches listed in info/invalid-*.txt (4 listed" in proc.stdout
    listed_present = {f"{wnid(0)}_1-2", f"{wnid(1)}_2-1", f"{wnid(1)}_2-2"}
    excluded = open(os.path.join(dest, "sketchy", prepare_data.EXCLUDED)).read().split()
    assert set(excluded) == listed_present
    before = {c: set(files) for c, files in listing(str(tmp_path / "plain" / "sketchy"), "sketches").items()}
    after = {c: set(files) for c, files in listing(os.path.join(dest, "sketchy"), "sketches").items()}
    removed = {f for c in before for f in before[c] - after[c]}
    assert removed == {stem + ".png" for stem in listed_present}  # exactly those, nothing else
    assert all(after[c] <= before[c] for c in before)


def test_dead_first_source_then_a_working_one(server, tmp_path):
    dest = str(tmp_path / "data")
    proc = run_download(server, "tuberlin", dest, bases=("gone", ""))
    assert proc.returncode == 0, proc.stderr[-2000:]
    for archive in ("sketches_png.zip", "ImageResized.zip"):
        assert f"{archive}: source 1 ({server.url}/gone/{archive}) failed" in proc.stdout
        assert f"{archive}: source 2 of 2 worked ({server.url}/{archive})" in proc.stdout
    assert "tuberlin: 250 classes" in proc.stdout


def test_a_web_page_instead_of_the_archive_is_explained_and_set_aside(server, tmp_path):
    dest = str(tmp_path / "data")
    proc = run_download(server, "quickdraw", dest, bases=("html",))
    one_error_line(proc, "could not download QuickDraw_sketches_final.zip", "is a web page", "quota",
                   "--from FOLDER")
    downloads = os.path.join(dest, "quickdraw", "downloads")
    assert os.listdir(downloads) == ["QuickDraw_sketches_final.zip.unverified.source1.rejected"]  # kept aside
    assert not os.path.exists(os.path.join(dest, "quickdraw", "raw", "QuickDraw_sketches_final.zip.d"))


def test_a_checksum_mismatch_is_one_line_and_the_file_is_never_used(server, tmp_path):
    dest = str(tmp_path / "data")
    proc = run_download(server, "tuberlin", dest, bases=("bad",))
    one_error_line(proc, "could not download sketches_png.zip", "has MD5", "not the expected")
    downloads = os.path.join(dest, "tuberlin", "downloads")
    assert os.listdir(downloads) == ["sketches_png.zip.unverified.source1.rejected"]
    assert not os.path.exists(os.path.join(dest, "tuberlin", "raw", "sketches_png.zip.d"))
    # a bad source first, then a good one: the good one is used, the bad file stays aside
    proc = run_download(server, "tuberlin", dest, bases=("bad", ""))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "sketches_png.zip: source 2 of 2 worked" in proc.stdout
    assert sorted(os.listdir(downloads)) == ["ImageResized.zip", "sketches_png.zip",
                                             "sketches_png.zip.unverified.source1.rejected"]


def test_archives_fetched_by_hand_with_from(server, archives, tmp_path, monkeypatch):
    env = download_env(server, archives, "gone")  # every download would fail: --from must not download
    dest = str(tmp_path / "data")
    proc = subprocess.run(["bash", os.path.join(ROOT, "download_data.sh"), "tuberlin", dest, "--from", archives],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"sketches_png.zip: using {os.path.join(archives, 'sketches_png.zip')}" in proc.stdout
    assert "tuberlin: 250 classes, 500 sketches, 500 photos" in proc.stdout
    proc = subprocess.run(["bash", os.path.join(ROOT, "download_data.sh"), "tuberlin", str(tmp_path / "d2"),
                           "--from", os.path.join(archives, "bad")], env=env, capture_output=True, text=True,
                          timeout=600)
    one_error_line(proc, "--from:", "bad/sketches_png.zip has MD5", "it was not used")
    proc = subprocess.run(["bash", os.path.join(ROOT, "download_data.sh"), "quickdraw", str(tmp_path / "d3"),
                           "--from", str(tmp_path)], env=env, capture_output=True, text=True, timeout=600)
    one_error_line(proc, "QuickDraw_sketches_final.zip is not there", "docs/datasets.md")


def test_from_without_dest_as_the_hint_writes_it(server, archives, tmp_path):
    # The hint's form, `bash download_data.sh NAME --from FOLDER`: DEST stays data/ (here under the working folder);
    # --from is not taken for DEST.
    env = download_env(server, archives, "gone")
    proc = subprocess.run(["bash", os.path.join(ROOT, "download_data.sh"), "tuberlin", "--from", archives],
                          env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "tuberlin: 250 classes, 500 sketches, 500 photos" in proc.stdout
    assert os.path.isdir(tmp_path / "data" / "tuberlin" / "sketches")
    proc = subprocess.run(["bash", os.path.join(ROOT, "download_data.sh"), "demo", "--from", archives],
                          env=env, capture_output=True, text=True, timeout=60, cwd=tmp_path)
    one_error_line(proc, "the demo dataset takes no options", "bash download_data.sh demo [DEST]")


def test_a_class_without_a_folder_names_what_was_looked_for_and_the_closest(archives, tmp_path, monkeypatch):
    """The line names every class still without a folder, the folder looked for and the closest names."""
    raw = tmp_path / "raw"
    for c in classes("tuberlin"):
        (raw / "png" / c).mkdir(parents=True)
        (raw / "png" / c / "1.png").write_bytes(PNG)
        key = prepare_data.match_key(c)
        name = {"giraffe": "giraf", "mouseanimal": "mice"}.get(key, key)  # two folders an archive got wrong
        (raw / "ImageResized" / name).mkdir(parents=True, exist_ok=True)
        (raw / "ImageResized" / name / "a.JPEG").write_bytes(JPG)
    with pytest.raises(prepare_data.PrepareError) as e:
        prepare_data.prepare_tuberlin(str(raw), str(tmp_path / "out"), prepare_data.dataset_classes("tuberlin"),
                                      False)
    line = str(e.value)
    assert "\n" not in line and line.startswith("2 photos class(es) have no folder in")
    assert "'giraffe' (looked for a folder named 'giraffe' in any spelling; closest: giraf" in line
    assert "'mouse_animal' (looked for a folder named 'mouseanimal' in any spelling; closest:" in line


@pytest.mark.parametrize("ranges", [True, False], ids=["resumed", "restarted"])
def test_killed_download_resumes_and_ends_with_a_correct_dataset(server, tmp_path, ranges):
    dest = str(tmp_path / "data")
    server.stall = "rendered_256x256.7z"
    env = download_env(server, server.folder)
    proc = subprocess.Popen(["bash", os.path.join(ROOT, "download_data.sh"), "sketchy", dest], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    downloads = os.path.join(dest, "sketchy", "downloads")
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:  # wait until part of the archive is on disk
        parts = [f for f in os.listdir(downloads) if f.endswith(".part")] if os.path.isdir(downloads) else []
        if parts and os.path.getsize(os.path.join(downloads, parts[0])) >= 512 * 1024:
            break
        time.sleep(0.05)
    else:
        pytest.fail("the download never started")
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    server.release.set()
    server.honour_ranges = ranges  # a server without Range support makes the download start again
    assert not os.path.exists(os.path.join(downloads, "rendered_256x256.7z"))  # only the .part file

    done = run_download(server, "sketchy", dest)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "sketchy: 125 classes, 500 sketches, 501 photos" in done.stdout
    resumed = [r for name, r in server.ranges if name == "rendered_256x256.7z" and r]
    assert resumed and int(resumed[0].split("=")[1].split("-")[0]) >= 512 * 1024  # asked to continue
    assert ("starting it again" in done.stdout) == (not ranges)
    assert not [f for f in os.listdir(downloads) if f.endswith(".part")]


# ----------------------------------------------------------------------------------- bad input

def one_error_line(proc, *fragments):
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip() and line.startswith("error: ")]
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def test_unknown_dataset_and_unwritable_dest(server, tmp_path):
    one_error_line(run_download(server, "imagenet", str(tmp_path)), "unknown dataset 'imagenet'")
    blocker = tmp_path / "file"
    blocker.write_text("the user's file")
    one_error_line(run_download(server, "quickdraw", str(blocker / "data")), "cannot create", "DEST")
    assert blocker.read_text() == "the user's file"


def test_corrupt_archive(server, archives, tmp_path):
    good = os.path.join(archives, "ImageResized.zip")
    os.rename(good, good + ".bak")
    try:
        with open(good, "wb") as f:
            f.write(b"PK\x03\x04 this is not a zip archive at all" * 100)
        dest = str(tmp_path / "data")
        one_error_line(run_download(server, "tuberlin", dest), "ImageResized.zip", "corrupt", "again")
        assert not os.path.exists(os.path.join(dest, "tuberlin", "downloads", "ImageResized.zip"))  # removed
    finally:
        os.replace(good + ".bak", good)


def test_not_enough_disk(server, tmp_path, monkeypatch):
    monkeypatch.setenv("ZSSBIR_DATA_URL", server.url)
    outside = tmp_path / "keep.txt"
    outside.write_text("mine")
    real = prepare_data.shutil.disk_usage
    monkeypatch.setattr(prepare_data.shutil, "disk_usage", lambda p: real(p)._replace(free=1000))
    with pytest.raises(prepare_data.PrepareError, match="needs .* GiB but only .* GiB is free"):
        prepare_data.main(prepare_data.get_args_parser().parse_args(["quickdraw", "--dest", str(tmp_path / "d")]))
    assert outside.read_text() == "mine" and sorted(os.listdir(tmp_path)) == ["d", "keep.txt"]


def test_unknown_class_split(tmp_path):
    from conftest import make_tiny_dataset, run_main
    from test_train import TINY, assert_one_line_error
    data = make_tiny_dataset(str(tmp_path / "data"))
    proc = run_main("train.py", "--data_dir", data, "--checkpoint_dir", str(tmp_path / "c"), *TINY,
                    "--class_split", "sake25")
    assert_one_line_error(proc, "unknown class split 'sake25'", "no splits/ folder")
    os.makedirs(os.path.join(data, "splits", "mine"))
    proc = run_main("train.py", "--data_dir", data, "--checkpoint_dir", str(tmp_path / "c"), *TINY,
                    "--class_split", "nope")
    assert_one_line_error(proc, "unknown class split 'nope'", "choose one of mine")
    proc = run_main("evaluate.py", "--model", os.path.join(ROOT, "missing.pth"), "--data", data, "--split", "a")
    assert_one_line_error(proc, "--split takes test or val", "--class_split a")


def test_class_name_word_vectors(server, tmp_path):
    """--with_embeddings: phrases when the file has them, else the mean of the words; zeros when unknown."""
    import numpy as np
    words = {w for c in classes("quickdraw") for w in c.replace("-", " ").replace("_", " ").split()}
    words.discard("zebra")  # one class the file does not know at all
    rng = np.random.default_rng(0)
    vec = {w: rng.standard_normal(4).round(3) for w in sorted(words)}
    vec["teddy_bear"] = np.array([9.0, 9.0, 9.0, 9.0])  # a word2vec-style phrase
    glove = tmp_path / "vectors.txt"
    glove.write_text(f"{len(vec)} 4\n" + "".join(f"{w} {' '.join(map(str, v))}\n" for w, v in vec.items()))
    dest = str(tmp_path / "data")
    proc = run_download(server, "quickdraw", dest, "--with_embeddings", str(glove))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "no word vector for 1 class(es) (zebra)" in proc.stdout
    root = os.path.join(dest, "quickdraw")
    for folder in (root, os.path.join(root, "splits", "qd30")):
        train = np.load(os.path.join(folder, "train_embeddings.npy"))
        test = np.load(os.path.join(folder, "test_embeddings.npy"))
        labels = [line.strip() for line in open(os.path.join(folder, "train_labels.txt"))]
        assert train.shape == (80, 4) and test.shape == (30, 4)
        unseen = [line.strip() for line in open(os.path.join(folder, "test_labels.txt"))]
        row = dict(zip(labels, train)) | dict(zip(unseen, test))
        np.testing.assert_allclose(row["alarm_clock"], (vec["alarm"] + vec["clock"]) / 2, rtol=1e-6)
        np.testing.assert_allclose(row["teddy_bear"], vec["teddy_bear"])
        np.testing.assert_allclose(row["hot_air_balloon"], (vec["hot"] + vec["air"] + vec["balloon"]) / 3, rtol=1e-6)
        assert not row["zebra"].any()
    import dataset
    data = dataset.scan_dataset(root, check_images=False)
    assert data.train_embeddings.shape == (80, 4) and data.test_embeddings.shape == (30, 4)
    missing = run_download(server, "quickdraw", dest, "--with_embeddings", str(tmp_path / "none.txt"))
    one_error_line(missing, "none.txt not found")


def test_the_disk_cache_written_after_preparation_covers_what_train_py_reads(tmp_path, capsys):
    import dataset

    root = make_tiny_dataset(str(tmp_path / "d"))
    prepare_data.write_caches(root, [32], edge_maps=True)
    assert "disk cache" in capsys.readouterr().out
    data = dataset.scan_dataset(root)
    train, _ = dataset.split_seen(data, 0.1)
    pairs = dataset.PairedBatches(train, data.seen, 32, 4, edge_maps=True, seed=0, root=root)
    assert pairs.store.open_disk_cache(os.path.join(root, "cache")) == len(pairs.store)
    every = sum(len(v) for v in list(data.sketches.values()) + list(data.photos.values()))
    assert np.load(dataset.cache_paths(os.path.join(root, "cache"), 32)[0]).shape == (
        every + sum(map(len, data.photos.values())), 32, 32, 3)  # every image and every photo's edge map, channels last


def test_output_dir_and_its_older_name_dest_are_one_flag():
    parser = prepare_data.get_args_parser()
    assert parser.parse_args(["sketchy"]).output_dir == "data"
    assert parser.parse_args(["sketchy", "--output_dir", "o1"]).output_dir == "o1"
    assert parser.parse_args(["sketchy", "--dest", "o2"]).output_dir == "o2"
    assert not hasattr(parser.parse_args(["sketchy", "--dest", "o2"]), "dest")  # one setting, not two
    assert "--output_dir DEST, --dest DEST" in parser.format_help()
