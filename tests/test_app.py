"""app.py: its pure pieces (the drawing prepared as a query, uploads, paths, classes, examples, ranking) without a
browser, and the page itself in headless Chromium: strokes drawn with the mouse, an upload, the examples, an
empty canvas, bad uploads and files that must not be served, against app.py started on a free 127.0.0.1 port.

The browser tests need playwright (requirements.txt) and Debian's chromium at /usr/bin/chromium (.ci/run
installs it); they are skipped, saying which is missing, where either is absent. With `make demo`'s model and
data present (runs/demo/best.pth, data/demo), one more test draws a shape and checks that its class ranks above
chance on the demo's photos: .ci/run runs `make demo` first so that CI always runs it. (A model the suite could
train in its time is too weak for that check: 100 steps on a smaller demo put 2 triangles in the top 24.)"""
import math
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

import app
import dataset
import gallery
import utils
from conftest import ROOT, make_tiny_dataset, run_main
from test_retrieve import save_tiny_checkpoint
from test_train import assert_one_line_error

CHROMIUM = "/usr/bin/chromium"
WAIT_MS = 60000  # the longest wait for the page, in ms (a query takes about 1.5 s from a stroke here, on 2 cores)
DEMO_MODEL, DEMO_PHOTOS = os.path.join(ROOT, "runs", "demo", "best.pth"), os.path.join(ROOT, "data", "demo", "photos")
DEMO_INDEX = os.path.join(ROOT, "runs", "demo", "retrieval", "gallery_index.pt")  # make demo's retrieve.py writes it


def browser_missing() -> str:
    """Why the browser tests cannot run here ("" when they can)."""
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "playwright is not installed (pip install -r requirements.txt)"
    if not os.access(CHROMIUM, os.X_OK):
        return f"Debian's chromium is not at {CHROMIUM} (apt-get install chromium; .ci/run does it as root)"
    return ""


needs_browser = pytest.mark.skipif(bool(browser_missing()), reason=browser_missing() or "-")


# ----------------------------------------------------------------------------------- pure pieces

def square_drawing(size=512, width=app.BRUSH_WIDTH, mode="RGB") -> Image.Image:
    im = Image.new(mode, (size, size), "white")
    ImageDraw.Draw(im).rectangle((120, 150, 380, 400), outline="black", width=width)
    return im


def test_drawing_is_prepared_as_a_query_file_and_blank_is_refused():
    im = square_drawing()
    sketch = app.drawing_to_sketch({"background": im, "layers": [], "composite": im})
    assert np.array_equal(np.asarray(sketch), np.asarray(dataset.prepare_sketch(im)))  # retrieve.py's preparation
    assert sketch.size == (261 + 2 * 26,) * 2  # cropped to the square's 261 px plus a 10 % margin each side
    with pytest.raises(utils.UserError) as refused:
        app.drawing_to_sketch({"composite": Image.new("RGB", (512, 512), "white")})
    assert str(refused.value) == gallery.blank_message([("the canvas", "a single colour")])
    assert app.drawing_to_sketch({"composite": None}) is None and app.drawing_to_sketch(None) is None
    # strokes on a transparent layer (an RGBA composite) are the same drawing
    rgba = Image.new("RGBA", (512, 512), (0, 0, 0, 0))
    ImageDraw.Draw(rgba).rectangle((120, 150, 380, 400), outline=(0, 0, 0, 255), width=app.BRUSH_WIDTH)
    assert np.array_equal(np.asarray(app.drawing_to_sketch({"composite": rgba})), np.asarray(sketch))


def test_brush_matches_the_training_sketches_stroke_scale():
    # demo_data.py: strokes 1.0-2.0 px (mean 1.5) on 64 px images; the canvas's brush is that fraction of its side
    assert app.BRUSH_WIDTH == 12 and app.CANVAS == 512
    assert abs(app.BRUSH_WIDTH / app.CANVAS - 1.5 / 64) < 0.5 / app.CANVAS


def test_read_upload_refuses_non_images_and_too_many_pixels(tmp_path):
    good = tmp_path / "sketch.png"
    square_drawing().save(good)
    assert np.array_equal(np.asarray(app.read_upload(str(good), 10**6)), np.asarray(dataset.load_sketch(str(good))))
    (tmp_path / "notes.png").write_text("not an image")
    with pytest.raises(utils.UserError, match="notes.png is not an image this app can read"):
        app.read_upload(str(tmp_path / "notes.png"), 10**6)
    with pytest.raises(utils.UserError, match=r"512 x 512 pixels, more than the 1,000 a sketch may have"):
        app.read_upload(str(good), 10**6, max_pixels=1000)
    size = good.stat().st_size
    with pytest.raises(utils.UserError, match=rf"sketch.png is {size / 1e6:.2f} MB, more than the 0.001 MB"):
        app.read_upload(str(good), 1000)


def test_blank_files_get_retrieve_pys_message(tmp_path):
    """A blank upload or example is refused with the line retrieve.py prints for a blank query file (one check,
    gallery.blank_reason): the same words after the file's name."""
    model = save_tiny_checkpoint(str(tmp_path / "model.pth"))
    white, dot = tmp_path / "white.png", tmp_path / "dot.png"
    Image.new("RGB", (200, 100), "white").save(white)
    im = Image.new("L", (512, 512), 255)
    im.putpixel((100, 100), 0)
    im.save(dot)
    for path in (white, dot):
        reason = gallery.load_query(str(path))[1]
        assert reason
        with pytest.raises(utils.UserError) as refused:
            app.read_upload(str(path), 10**6)
        assert str(refused.value) == gallery.blank_message([(path.name, reason)])
        proc = run_main("retrieve.py", "--model", model, "--gallery", str(tmp_path), "--query", str(path))
        assert_one_line_error(proc, f"query sketch {path}" + str(refused.value).removeprefix(path.name))
        with pytest.raises(utils.UserError) as example:
            app.read_sketch_file(str(path))  # an example sketch
        assert str(example.value) == str(refused.value)


def test_paths_classes_and_the_index_location(tmp_path):
    root = tmp_path / "photos"
    (root / "cat").mkdir(parents=True)
    (root / "cat" / "a.jpg").write_bytes(b"x")
    (tmp_path / "secret.pth").write_bytes(b"x")
    os.symlink(tmp_path / "secret.pth", root / "cat" / "link.jpg")
    assert app.is_inside(str(root), str(root / "cat" / "a.jpg"))
    assert not app.is_inside(str(root), str(root / "cat" / "link.jpg"))  # a link out of the gallery
    assert not app.is_inside(str(root), str(root / ".." / "secret.pth"))
    assert not app.is_inside(str(root), str(tmp_path / "photos2" / "a.jpg"))  # a sibling with the same prefix
    assert app.default_index_path(str(root)) == str(tmp_path / "photos_index.pt")
    assert app.follows_dataset_layout(["cat/a.jpg", "dog/b.jpg"])
    assert not app.follows_dataset_layout(["cat/a.jpg", "b.jpg"]) and not app.follows_dataset_layout([])
    assert not app.follows_dataset_layout(["2024/cat/a.jpg"])
    assert app.photo_class("cat/a.jpg", True) == "cat" and app.photo_class("cat/a.jpg", False) == ""
    assert app.caption(3, 0.51234, "cat", "cat/a.jpg") == "3. 0.512  cat · a.jpg"
    assert app.caption(3, 0.51234, "", "x/y/a.jpg") == "3. 0.512  a.jpg"


def test_examples_one_per_class_test_classes_first(tmp_path):
    data = make_tiny_dataset(str(tmp_path / "data"), per_class=2)
    picked = app.pick_examples(os.path.join(data, "sketches"), 3)
    # test_labels.txt lists circle and star (the unseen classes): they come first, then the others by name
    assert [os.path.relpath(p, data) for p in picked] == [
        os.path.join("sketches", "circle", "circle_0.png"), os.path.join("sketches", "star", "star_0.png"),
        os.path.join("sketches", "hexa", "hexa_0.png")]
    assert app.pick_examples(os.path.join(data, "sketches", "star"), 5) == [
        os.path.join(data, "sketches", "star", f"star_{i}.png") for i in range(2)]  # a flat folder
    assert app.pick_examples(os.path.join(data, "sketches"), 0) == [] == app.pick_examples(str(tmp_path / "no"), 3)


def test_searcher_ranks_as_retrieve_does(tmp_path):
    """The app's query (prepare, embed, rank on the cached embeddings) gives retrieve.py's ranking."""
    data = make_tiny_dataset(str(tmp_path / "data"), per_class=3)
    model_path = save_tiny_checkpoint(str(tmp_path / "model.pth"))
    root = os.path.realpath(os.path.join(data, "photos"))
    args = app.get_args_parser().parse_args(["--model", model_path, "--gallery", root, "--workers", "0",
                                             "--device", "cpu", "--topk", "5"])
    ckpt = utils.load_checkpoint(model_path)
    model = utils.build_model(ckpt, model_path, trained=True).eval()
    index_path = app.default_index_path(root)
    source = gallery.GallerySource(root, root, index_path, *gallery.scan_gallery(root, exclude=""), None)
    settings = gallery.EmbedSettings(32, args.batch_size, 0, torch.device("cpu"), args.amp)
    searcher = app.Searcher(model, args, source, gallery.model_identity(ckpt), settings)
    assert "0 of 18 photos" in searcher.status()
    searcher.build()
    assert searcher.ready and searcher.layout and os.path.isfile(index_path)
    assert (searcher.done, searcher.total) == (18, 18)  # the progress the page shows while it builds
    assert searcher.status() == f"Gallery: 18 photos of {root} (index {index_path}), searched with the model " \
                                f"{model_path}."
    sketch = dataset.load_sketch(os.path.join(data, "sketches", "star", "star_0.png"))
    hits, seconds = searcher.search(sketch)
    q = gallery.embed_sketches(model.sketch_encoder, [sketch], 32, 1, torch.device("cpu"), False)
    index = gallery.load_index(index_path)
    scores, rows = gallery.search(q, index["embeddings"], 5)
    assert [h[4] for h in hits] == [index["paths"][r] for r in rows[0].tolist()]
    assert [h[2] for h in hits] == scores[0].tolist() and [h[1] for h in hits] == [1, 2, 3, 4, 5]
    assert all(h[3] == h[4].split("/")[0] for h in hits) and seconds > 0


def test_cli_bad_input_one_line_each(tmp_path):
    data = make_tiny_dataset(str(tmp_path / "data"), per_class=1)
    model_path = save_tiny_checkpoint(str(tmp_path / "model.pth"))
    photos = os.path.join(data, "photos")
    for extra, fragment in (
            (["--gallery", str(tmp_path / "nowhere")], "nowhere does not exist"),
            (["--gallery", photos, "--topk", "0"], "--topk must be at least 1"),
            (["--gallery", photos, "--port", "70000"], "--port must be in 0..65535"),
            (["--gallery", photos, "--index", os.path.join(photos, "i.pt")], "is inside the gallery folder"),
            (["--gallery", photos, "--examples", str(tmp_path / "none")], "--examples"),
            (["--gallery", str(tmp_path / "data" / "sketches" / "star" / "star_0.png")], "is not a folder")):
        proc = run_main("app.py", "--model", model_path, "--device", "cpu", *extra)
        assert_one_line_error(proc, fragment)
    proc = run_main("app.py", "--model", str(tmp_path / "missing.pth"), "--gallery", photos)
    assert_one_line_error(proc, "missing.pth not found")


# ----------------------------------------------------------------------------------- the page in a browser

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_app(model: str, photos: str, log_path: str, *extra: str, timeout: float = 120.0):
    """app.py as a subprocess on a free port; returns (process, url) once the port accepts connections (a bounded
    poll: the process must not have exited, and at most ``timeout`` seconds pass)."""
    port = free_port()
    log = open(log_path, "w")
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "app.py"), "--model", model, "--gallery", photos,
                             "--port", str(port), "--device", "cpu", "--workers", "0", *extra],
                            cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            log.close()
            raise AssertionError(f"app.py exited with {proc.returncode}:\n{open(log_path).read()}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return proc, f"http://127.0.0.1:{port}"
        except OSError:
            if time.monotonic() > deadline:
                proc.kill()
                raise AssertionError(f"app.py did not open port {port} in {timeout} s") from None
            time.sleep(0.1)


def stop_app(proc) -> None:
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"] if os.geteuid() == 0 else [])
        yield b
        b.close()


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """app.py on the tiny dataset's photos (6 classes x 4) with an untrained tiny model, one unreadable photo
    and a file beside the gallery that must not be served."""
    root = tmp_path_factory.mktemp("app")
    data = make_tiny_dataset(str(root / "data"), per_class=4)
    photos = os.path.join(data, "photos")
    with open(os.path.join(photos, "star", "broken.png"), "wb") as f:
        f.write(b"\x89PNG not really")
    model = save_tiny_checkpoint(str(root / "model.pth"))
    log_path = str(root / "app.log")
    proc, url = start_app(model, photos, log_path, "--max_upload_mb", "0.05")
    yield {"url": url, "model": model, "data": data, "photos": photos, "log": log_path, "proc": proc}
    stop_app(proc)


def open_page(browser, url: str):
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    page.set_default_timeout(WAIT_MS)
    page.goto(url)
    page.wait_for_function("() => (document.querySelector('#status') || {}).innerText?.startsWith('Gallery:')",
                           timeout=WAIT_MS)
    page.wait_for_selector("#sketch canvas")
    return page


def stroke(page, points) -> float:
    """One mouse stroke through ``points``, one mouse move per point (the canvas joins them with straight lines; a
    move cost headless Chromium about 0.2 s on 2 cores); returns the perf_counter time of its mouse-up."""
    page.mouse.move(*points[0])
    page.mouse.down()
    for p in points[1:]:
        page.mouse.move(*p)
    end = time.perf_counter()
    page.mouse.up()
    return end


def canvas_centre(page) -> tuple:
    """The drawing canvas's centre, in page coordinates."""
    box = page.locator("#sketch canvas").first.bounding_box()
    return box["x"] + box["width"] / 2, box["y"] + box["height"] / 2


def triangle_corners(page, radius: float = 150) -> list:
    """The corners of a triangle, point up, around the canvas's centre (page coordinates)."""
    cx, cy = canvas_centre(page)
    return [(cx + radius * math.cos(a), cy - radius * math.sin(a))
            for a in (math.pi / 2, math.pi / 2 + 2 * math.pi / 3, math.pi / 2 + 4 * math.pi / 3)]


def draw_triangle(page) -> None:
    """A triangle in one stroke on an empty canvas: one query."""
    corners = triangle_corners(page)
    stroke(page, corners + corners[:1])


def wait_message(page, fragment: str, timeout: float = WAIT_MS) -> str:
    page.wait_for_function(f"() => document.querySelector('#message').innerText.includes({fragment!r})",
                           timeout=timeout)
    return page.inner_text("#message")


def result_captions(page) -> list:
    """The results' captions as (rank, score, class, file name)."""
    page.wait_for_function("() => document.querySelectorAll('#results img').length > 0", timeout=WAIT_MS)
    out = []
    for text in page.locator("#results .caption-label").all_inner_texts():
        m = re.fullmatch(r"(\d+)\. (-?\d\.\d{3})\s+(?:(.+) · )?(.+)", text.strip())
        assert m, text
        out.append((int(m[1]), float(m[2]), m[3] or "", m[4]))
    return out


def log_text(served) -> str:
    with open(served["log"]) as f:
        return f.read()


@needs_browser
def test_page_draw_upload_examples_and_bad_input(served, browser, tmp_path):
    page = open_page(browser, served["url"])
    assert "select the draw tool" not in page.inner_text("#sketch")  # the brush is selected at load
    assert "1 unreadable image(s)" in log_text(served)  # broken.png: skipped, counted, the page still serves

    corners = triangle_corners(page)
    end = stroke(page, corners[:2])  # the first side: results come when a stroke ends
    captions = result_captions(page)
    print(f"\nresults shown {time.perf_counter() - end:.2f} s after the first stroke's mouse-up")
    for i in (1, 2):  # the other two sides: a query each
        stroke(page, [corners[i], corners[(i + 1) % 3]])
    deadline = time.monotonic() + WAIT_MS / 1000
    while log_text(served).count("query (drawing)") < 3 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert log_text(served).count("query (drawing)") == 3
    message = wait_message(page, "for the drawing")
    assert "Top 24 of 24 photos" in message  # 6 classes x 4 photos, broken.png left out
    captions = result_captions(page)
    assert [c[0] for c in captions] == list(range(1, 25))
    assert all(os.path.isfile(os.path.join(served["photos"], cls, name)) for _, _, cls, name in captions)
    assert all(a[1] >= b[1] for a, b in zip(captions, captions[1:]))  # by descending score

    page.locator("#sketch button[aria-label='Clear canvas']").click()  # the sketchpad then sends no drawing at all
    wait_message(page, "The canvas is empty")
    page.click("#search")  # an empty canvas sent: a message, no results, no trace
    wait_message(page, "the canvas is empty")
    assert page.locator("#results img").count() == 0
    draw_triangle(page)  # the brush is selected again after a clear
    wait_message(page, "for the drawing")

    sketch = os.path.join(served["data"], "sketches", "star", "star_1.png")
    page.set_input_files("#upload input[type=file]", sketch)
    wait_message(page, "for the file star_1.png")
    assert len(result_captions(page)) == 24

    page.locator("#examples img").first.click()  # circle_0.png: test_labels.txt's first class
    wait_message(page, "for the example circle_0.png")
    page.reload()
    blank = tmp_path / "blank.png"
    Image.new("RGBA", (300, 300), (0, 0, 0, 0)).save(blank)  # a transparent page with no strokes
    page.wait_for_selector("#upload input[type=file]", state="attached")
    page.set_input_files("#upload input[type=file]", str(blank))
    assert wait_message(page, "blank.png is blank") == gallery.blank_message([("blank.png", "a single colour")])
    assert "refused (upload): blank.png is blank (a single colour)" in log_text(served)

    page.reload()
    (tmp_path / "notes.png").write_text("not an image")
    page.wait_for_selector("#upload input[type=file]", state="attached")
    page.set_input_files("#upload input[type=file]", str(tmp_path / "notes.png"))
    assert "notes.png is not an image this app can read" in wait_message(page, "not an image")
    for side, seen in ((200, "app"), (600, "gradio")):  # 80 kB and 240 kB of noise: over 0.05 MB, and 4 times that
        page.reload()
        big = tmp_path / f"big{side}.png"
        Image.fromarray(np.random.default_rng(0).integers(0, 255, (side, 400), dtype=np.uint8)).save(big)
        assert (50_000 < big.stat().st_size < 200_000) if seen == "app" else big.stat().st_size > 200_000
        page.wait_for_selector("#upload input[type=file]", state="attached")
        page.set_input_files("#upload input[type=file]", str(big))
        if seen == "app":  # the app's message and log line
            assert "more than the 0.05 MB a sketch file may have" in wait_message(page, "MB")
            assert "refused (upload): big200.png is 0.08 MB" in log_text(served)
        else:  # Gradio refuses it in the browser: its own message, nothing sent
            page.wait_for_function("() => /too large|exceed|maximum/i.test(document.body.innerText)", timeout=WAIT_MS)
        text = page.inner_text("body")
        assert "Traceback" not in text and "File \"" not in text
    assert "refused (upload): notes.png" in log_text(served) and "Traceback" not in log_text(served)
    assert served["proc"].poll() is None  # still serving
    page.locator("#examples img").nth(1).click()
    wait_message(page, "for the example star_0.png")
    page.close()


@needs_browser
def test_only_gallery_files_are_served(served):
    base = served["url"] + "/gradio_api/file="

    def status(path: str) -> int:
        try:
            with urllib.request.urlopen(base + path, timeout=10) as r:
                return r.status
        except urllib.error.HTTPError as e:
            return e.code

    assert status(os.path.join(served["photos"], "star", "star_0.png")) == 200
    for outside in ("/etc/passwd", served["model"], os.path.join(served["data"], "train_labels.txt"),
                    os.path.join(served["photos"], "..", "train_labels.txt"), os.path.join(ROOT, "app.py"),
                    app.default_index_path(os.path.realpath(served["photos"]))):
        assert status(outside) in (403, 404), outside


@needs_browser
def test_a_browser_leaving_mid_upload_is_one_log_line(served):
    """A page closed or reloaded while it uploads (as a reload under a slow CPU did in this test file): the request's
    body ends early. uvicorn would log a stack trace; the terminal gets one line and the server keeps serving."""
    host, port = served["url"].removeprefix("http://").split(":")
    body = b"--b\r\nContent-Disposition: form-data; name=\"files\"; filename=\"s.png\"\r\n\r\n" + b"x" * 100
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(b"POST /gradio_api/upload HTTP/1.1\r\nHost: " + host.encode() + b"\r\n"
                     b"Content-Type: multipart/form-data; boundary=b\r\nContent-Length: 100000\r\n\r\n" + body)
        time.sleep(0.5)  # the server is reading the body when the connection closes
    deadline = time.monotonic() + 30
    while "a browser left during a request" not in log_text(served) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert "a browser left during a request" in log_text(served)
    assert "Traceback" not in log_text(served) and served["proc"].poll() is None
    with urllib.request.urlopen(served["url"], timeout=10) as r:
        assert r.status == 200


@needs_browser
@pytest.mark.skipif(not (os.path.isfile(DEMO_MODEL) and os.path.isdir(DEMO_PHOTOS)),
                    reason="needs make demo's model and data (runs/demo/best.pth, data/demo/photos)")
def test_drawn_triangle_and_ellipse_find_their_classes_above_chance_on_the_demo(browser, tmp_path):
    """Shapes drawn with the mouse on the demo's 2,820 photos (47 classes x 60): each drawn class's share of the top
    24 against chance, 60 / 2,820 = 0.021. A triangle (a seen class: the model trained on its sketches) in one
    stroke, then, on the cleared canvas, an ellipse (one of the 10 unseen classes, the zero-shot case) in one. The
    index goes to tmp_path: nothing of data/ changes. It starts from a copy of make demo's retrieval index where
    there is one: the app keeps its rows if the same model embedded the same photos (or embeds them all anew),
    half of this test's time under a 4x CPU cap."""
    index = str(tmp_path / "i.pt")
    if os.path.isfile(DEMO_INDEX):
        shutil.copyfile(DEMO_INDEX, index)
    proc, url = start_app(DEMO_MODEL, DEMO_PHOTOS, str(tmp_path / "app.log"), "--index", index)
    found = {}
    try:
        page = open_page(browser, url)
        draw_triangle(page)
        wait_message(page, "for the drawing")
        found["triangle"] = [cls for _, _, cls, _ in result_captions(page)]
        page.locator("#sketch button[aria-label='Clear canvas']").click()
        wait_message(page, "The canvas is empty")
        cx, cy = canvas_centre(page)
        ellipse = [(cx + 150 * math.cos(t), cy - 90 * math.sin(t)) for t in np.linspace(0, 2 * math.pi, 25)]
        stroke(page, ellipse)  # a 24-gon
        wait_message(page, "for the drawing")
        found["ellipse"] = [cls for _, _, cls, _ in result_captions(page)]
    finally:
        stop_app(proc)
    chance = 60 / 2820
    for shape, classes in found.items():
        print(f"\ndrawn {shape} on the demo: {classes.count(shape)} of the top {len(classes)} photos are "
              f"{shape}s (chance share {chance:.3f}, {chance * len(classes):.1f} expected); top 5: {classes[:5]}")
    # A random ranking puts 5 or more of a class in the top 24 with probability 1.3e-4 (binomial, p = 60 / 2,820).
    for shape, classes in found.items():
        assert len(classes) == 24 and classes.count(shape) >= 5, (shape, classes)


def test_gradio_is_imported_by_app_only():
    for script in ("train.py", "evaluate.py", "retrieve.py", "gallery.py", "utils.py", "dataset.py", "model.py"):
        with open(os.path.join(ROOT, script)) as f:
            assert "gradio" not in f.read(), script
