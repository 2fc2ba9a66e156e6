"""download_data.sh / prepare_data.py against fake archives served from 127.0.0.1 (no internet).

The fake archives reproduce the real ones' structure and pitfalls: Sketchy's augmentation folders
(tx_000000000001), original photos duplicated in the extended set, invalid-sketch lists, names like
hot-air_balloon and car_(sedan); TU-Berlin's spaced/hyphenated sketch folders and concatenated or
misspelled photo folders with .JPEG files; QuickDraw's mixed separators and stray non-image files.
"""
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

import pytest
from PIL import Image

import prepare_data
from conftest import ROOT

PNG, JPG = io.BytesIO(), io.BytesIO()
Image.new("RGB", (8, 8), "white").save(PNG, format="PNG")
Image.new("RGB", (8, 8), "red").save(JPG, format="JPEG")
PNG, JPG = PNG.getvalue(), JPG.getvalue()
PADDING = random.Random(0).randbytes(1_500_000)  # incompressible: makes a download long enough to interrupt


def classes(name):
    with open(os.path.join(ROOT, "splits", name, "classes.txt")) as f:
        return [line.strip() for line in f if line.strip()]


def write_zip(path, files):
    with zipfile.ZipFile(path, "w") as z:
        for name, data in files.items():
            z.writestr(name, data)


def make_archives(folder):
    """Fake archives of all three datasets; returns the expected counts per dataset."""
    import py7zr
    os.makedirs(folder, exist_ok=True)
    files, ext = {}, {}
    for i, c in enumerate(classes("sketchy")):  # file stems are unique across classes, as in Sketchy
        for tx in ("tx_000000000000", "tx_000000000001"):  # the second is an augmentation, to be ignored
            files[f"256x256/sketch/{tx}/{c}/n{i:03d}_1-1.png"] = PNG
            files[f"256x256/sketch/{tx}/{c}/n{i:03d}_1-2.png"] = PNG
            files[f"256x256/photo/{tx}/{c}/n{i:03d}_1.jpg"] = JPG
        ext[f"EXTEND_image_sketchy/{c}/n{i:03d}_1.jpg"] = JPG  # the original again: kept once
        ext[f"EXTEND_image_sketchy/{c}/ext_{i}_1.jpg"] = JPG
        ext[f"EXTEND_image_sketchy/{c}/ext_{i}_2.jpg"] = JPG
    files["info/invalid-error.txt"] = b"airplane/n000_1-2\n"  # with and without class and extension
    files["info/invalid-pose.txt"] = b"n001_1-1.png\n"
    files["info/padding.bin"] = PADDING
    with py7zr.SevenZipFile(os.path.join(folder, "rendered_256x256.7z"), "w") as z:
        for name, data in files.items():
            z.writestr(data, name)
    write_zip(os.path.join(folder, "EXTEND_image_sketchy.zip"), ext)

    misspelled = {v: k for k, v in prepare_data.ALIASES.items()}  # correct key -> upstream typo
    sk, ph = {"png/filelist.txt": b"stray"}, {}
    for c in classes("tuberlin"):
        sk[f"png/{c}/1.png"] = sk[f"png/{c}/2.png"] = PNG
        key = prepare_data.match_key(c)
        folder_name = misspelled.get(key, c.replace(" ", "") if " " in c else c)  # concatenated names
        ph[f"ImageResized/{folder_name}/a.JPEG"] = ph[f"ImageResized/{folder_name}/b.JPEG"] = JPG
        ph[f"ImageResized/{folder_name}/Thumbs.db"] = b"stray"
    write_zip(os.path.join(folder, "sketches_png.zip"), sk)
    write_zip(os.path.join(folder, "ImageResized.zip"), ph)

    sk, ph = {}, {}
    for i, c in enumerate(classes("quickdraw")):
        variant = c.replace("_", " ") if i % 3 == 0 else c.replace(" ", "-") if i % 3 == 1 else c
        sk[f"QuickDraw_sketches_final/{variant}/1.png"] = sk[f"QuickDraw_sketches_final/{variant}/2.png"] = PNG
        sk[f"QuickDraw_sketches_final/{variant}/.DS_Store"] = b"stray"
        ph[f"QuickDraw_images_final/{c}/1.jpg"] = JPG
        ph[f"QuickDraw_images_final/{c}/notes.txt"] = b"stray"
    write_zip(os.path.join(folder, "QuickDraw_sketches_final.zip"), sk)
    write_zip(os.path.join(folder, "QuickDraw_images_final.zip"), ph)


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


def run_download(server, *args, **popen):
    env = dict(os.environ, ZSSBIR_DATA_URL=server.url, PYTHON=sys.executable)
    return subprocess.run(["bash", os.path.join(ROOT, "download_data.sh"), *args], env=env, capture_output=True,
                          text=True, timeout=600, **popen)


def listing(root, domain):
    return {c: sorted(os.listdir(os.path.join(root, domain, c))) for c in os.listdir(os.path.join(root, domain))}


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
    assert prepare_data.match_key("wristwatching") == prepare_data.match_key("wrist-watch")


def test_all_three_datasets_prepared_with_every_split(server, tmp_path):
    dest = str(tmp_path / "data")
    proc = run_download(server, "all", dest, "--exclude_invalid")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "sketchy: 125 classes, 248 sketches, 375 photos" in proc.stdout  # two invalid sketches left out
    assert "tuberlin: 250 classes, 500 sketches, 500 photos" in proc.stdout
    assert "quickdraw: 110 classes, 220 sketches, 110 photos" in proc.stdout

    sketchy = os.path.join(dest, "sketchy")
    sk, ph = listing(sketchy, "sketches"), listing(sketchy, "photos")
    assert {"hot_air_balloon", "jack_o_lantern", "car_sedan"} <= set(sk) and set(sk) == set(ph)
    assert sk["airplane"] == ["n000_1-1.png"] and sk["alarm_clock"] == ["n001_1-2.png"]  # invalid ones left out
    car = prepare_data.dataset_classes("sketchy").index("car_sedan")
    assert ph["car_sedan"] == [f"ext_{car}_1.jpg", f"ext_{car}_2.jpg", f"n{car:03d}_1.jpg"]  # the original once
    photo = os.path.join(sketchy, "photos", "car_sedan", f"ext_{car}_1.jpg")
    assert os.stat(photo).st_nlink == 2  # linked from raw/, not copied
    tub = os.path.join(dest, "tuberlin")
    assert {"alarm_clock", "trombone", "space_shuttle", "wrist_watch", "chandelier"} <= set(listing(tub, "photos"))
    assert listing(tub, "photos")["trombone"] == ["a.JPEG", "b.JPEG"]  # from the misspelled tromobone/
    qd = listing(os.path.join(dest, "quickdraw"), "sketches")
    assert all(files == ["1.png", "2.png"] for files in qd.values())  # .DS_Store left out

    for name, splits in prepare_data.SPLITS.items():
        root = os.path.join(dest, name)
        for split in splits:
            for f in ("train_labels.txt", "test_labels.txt"):
                assert os.path.isfile(os.path.join(root, "splits", split, f)), (name, split, f)
        for f in ("train_labels.txt", "test_labels.txt"):  # the default split at the dataset root
            assert open(os.path.join(root, f)).read() == open(os.path.join(root, "splits", splits[0], f)).read()
    import dataset
    data = dataset.scan_dataset(sketchy, class_split="sempcyc25")
    assert len(data.unseen) == 25 and len(data.seen) == 100 and len(data.photos["car_sedan"]) == 3

    again = run_download(server, "all", dest, "--exclude_invalid")  # everything is complete: nothing is fetched
    assert again.returncode == 0 and again.stdout.count("already prepared") == 3
    assert len(server.ranges) == 6


@pytest.mark.parametrize("ranges", [True, False], ids=["resumed", "restarted"])
def test_killed_download_resumes_and_ends_with_a_correct_dataset(server, tmp_path, ranges):
    dest = str(tmp_path / "data")
    server.stall = "rendered_256x256.7z"
    env = dict(os.environ, ZSSBIR_DATA_URL=server.url, PYTHON=sys.executable)
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
    assert "sketchy: 125 classes, 250 sketches, 375 photos" in done.stdout
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
    proc = run_main("train.py", "--data_dir", data, "--checkpoint_dir", str(tmp_path / "c"), *TINY, "--split", "nope")
    assert_one_line_error(proc, "unknown class split 'nope'", "choose one of mine")
    proc = run_main("evaluate.py", "--model", os.path.join(ROOT, "missing.pth"), "--data", data, "--split", "a",
                    "--class_split", "b")
    assert_one_line_error(proc, "--split a and --class_split b disagree")


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
        row = dict(zip(labels, train)) | dict(zip([line.strip() for line in open(os.path.join(folder, "test_labels.txt"))], test))
        np.testing.assert_allclose(row["alarm_clock"], (vec["alarm"] + vec["clock"]) / 2, rtol=1e-6)
        np.testing.assert_allclose(row["teddy_bear"], vec["teddy_bear"])
        np.testing.assert_allclose(row["hot_air_balloon"], (vec["hot"] + vec["air"] + vec["balloon"]) / 3, rtol=1e-6)
        assert not row["zebra"].any()
    import dataset
    data = dataset.scan_dataset(root, check_images=False)
    assert data.train_embeddings.shape == (80, 4) and data.test_embeddings.shape == (30, 4)
    missing = run_download(server, "quickdraw", dest, "--with_embeddings", str(tmp_path / "none.txt"))
    one_error_line(missing, "none.txt not found")
