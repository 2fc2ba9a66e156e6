"""Speed of app.py: the server's time per query over 1k, 10k and 100k photos, and the time from the end of a
stroke to the results shown in a browser; optionally the README's screenshot.

    python bench/bench_app.py                                               # untrained demo-sized model
    python bench/bench_app.py --model runs/demo/best.pth --gallery data/demo/photos --threads 2  # two threads
    python bench/bench_app.py --model runs/demo/best.pth --gallery data/demo/photos --screenshot docs/app_screenshot.png

Prints (1) the server-side time of one query (app.Searcher.search: the drawing prepared by
dataset.prepare_sketch from a 512 x 512 canvas image, embedded by the sketch encoder, ranked by one
matrix product and top-k against the gallery's cached embeddings, exact) over seeded random unit
embeddings of --sizes photos, p50 and p90 of --repeats queries after a warm-up, with --threads torch
threads (app.py's --query_threads, 1 by default); (2) with playwright, Debian's chromium
(/usr/bin/chromium) and --gallery: app.py started on a free port over that folder, a triangle drawn
in one mouse stroke --strokes times (the canvas cleared between), and the time from the mouse-up to
the results' message on the page, p50 and p90 (the page's own work, the upload of the canvas, the
query and the results' thumbnails); with --screenshot, the page after the last drawing, written as a
PNG. Target (issue 23): p50 under 100 ms at 100k photos on 2 CPU cores. The model is --model's, or an
untrained resnet18 of the demo's shape (32 px, 512-d).
"""
import argparse
import math
import os
import socket
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch
from PIL import Image, ImageDraw

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import app  # noqa: E402
import gallery  # noqa: E402
import utils  # noqa: E402
from model import ZSSBIRModel  # noqa: E402


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", type=str, default="", help="checkpoint; empty: an untrained resnet18, 32 px, 512-d")
    p.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000, 100000], help="gallery sizes")
    p.add_argument("--repeats", type=int, default=50, help="queries timed per size")
    p.add_argument("--threads", type=int, default=1, help="torch threads for the queries (app.py's --query_threads)")
    p.add_argument("--gallery", type=str, default="", help="photo folder for the browser part; empty: skip it")
    p.add_argument("--strokes", type=int, default=10, help="drawings timed in the browser")
    p.add_argument("--screenshot", type=str, default="", help="write the page after a drawing to this PNG")
    return p


def percentiles(seconds: list) -> str:
    ms = np.array(seconds) * 1000
    return f"p50 {np.percentile(ms, 50):7.1f} ms  p90 {np.percentile(ms, 90):7.1f} ms"


def canvas_triangle() -> Image.Image:
    """A triangle as the canvas sends it: 512 x 512, black strokes of the brush's width on white."""
    im = Image.new("RGB", (app.CANVAS, app.CANVAS), "white")
    c, r = app.CANVAS / 2, app.CANVAS * 0.35
    pts = [(c + r * math.cos(a), c - r * math.sin(a)) for a in (math.pi / 2, math.pi * 7 / 6, math.pi * 11 / 6)]
    ImageDraw.Draw(im).line(pts + [pts[0]], fill="black", width=app.BRUSH_WIDTH, joint="curve")
    return im


def server_side(args) -> None:
    if args.model:
        ckpt = utils.load_checkpoint(args.model)
        model, cfg = utils.build_model(ckpt, args.model, trained=True), utils.checkpoint_model(ckpt)
    else:
        utils.seed_everything(0)
        model = ZSSBIRModel("resnet18", 512, pretrained=False)
        cfg = type("Config", (), {"image_size": 32, "embedding_dim": 512, "backbone": "resnet18"})()
    model.eval()
    dim = cfg.embedding_dim
    opts = app.get_args_parser().parse_args(["--model", args.model or "-", "--gallery", "-", "--device", "cpu"])
    drawing = canvas_triangle()
    print(f"server side: {cfg.backbone}, {cfg.image_size} px, {dim}-d; {torch.get_num_threads()} torch threads; "
          f"drawing prepared, embedded and ranked (exact top {opts.topk}); {args.repeats} queries per size")
    for n in args.sizes:
        g = torch.nn.functional.normalize(torch.randn(n, dim, generator=torch.Generator().manual_seed(n)), dim=1)
        settings = gallery.EmbedSettings(cfg.image_size, opts.batch_size, 0, torch.device("cpu"), opts.amp)
        searcher = app.Searcher(model, opts, gallery.GallerySource("-", "/", "", [], [], [], None), "", settings)
        searcher.embeddings, searcher.paths, searcher.ready = g, [f"c{i % 50}/{i}.jpg" for i in range(n)], True
        searcher.layout = True
        times = []
        for i in range(args.repeats + 3):
            start = time.perf_counter()
            sketch = app.drawing_to_sketch({"composite": drawing})
            searcher.search(sketch)
            if i >= 3:  # warm-up
                times.append(time.perf_counter() - start)
        print(f"  {n:>9,} photos  {percentiles(times)}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def browser_side(args) -> None:
    from playwright.sync_api import sync_playwright

    port, log = free_port(), tempfile.NamedTemporaryFile("w", suffix=".log", delete=False)
    model = args.model
    if not model:
        print("browser: needs --model (a trained checkpoint)")
        return
    with tempfile.TemporaryDirectory() as tmp:
        proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "app.py"), "--model", model, "--gallery",
                                 args.gallery, "--port", str(port), "--device", "cpu", "--index",
                                 os.path.join(tmp, "index.pt")], stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
        try:
            deadline = time.monotonic() + 300
            while True:
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=1).close()
                    break
                except OSError:
                    if proc.poll() is not None or time.monotonic() > deadline:
                        raise SystemExit(f"app.py did not start; its log: {log.name}") from None
                    time.sleep(0.1)
            with sync_playwright() as p:
                browser = p.chromium.launch(executable_path="/usr/bin/chromium",
                                            args=["--no-sandbox"] if os.geteuid() == 0 else [])
                page = browser.new_page(viewport={"width": 1400, "height": 1000})
                page.goto(f"http://127.0.0.1:{port}")
                page.wait_for_function("() => (document.querySelector('#status') || {}).innerText"
                                       "?.startsWith('Gallery:')", timeout=300000)
                times = []
                for i in range(args.strokes):
                    if i:
                        page.locator("#sketch button[aria-label='Clear canvas']").click()
                        page.wait_for_function("() => document.querySelector('#message').innerText"
                                               ".includes('empty')")
                    times.append(draw_and_wait(page))
                print(f"browser: stroke end to results shown, {args.strokes} triangles drawn in one stroke on "
                      f"{args.gallery}: {percentiles(times)}")
                if args.screenshot:
                    page.wait_for_function("() => [...document.querySelectorAll('#results img')]"
                                           ".every(im => im.complete)")  # the thumbnails have loaded
                    page.screenshot(path=args.screenshot, full_page=True)
                    print(f"wrote {args.screenshot}")
                browser.close()
        finally:
            proc.terminate()
            proc.wait(10)


def draw_and_wait(page) -> float:
    """On an empty canvas (the message says so), draw a triangle in one stroke; the seconds from its mouse-up until
    the message reports the results and the results' images are on the page."""
    box = page.locator("#sketch canvas").first.bounding_box()
    cx, cy, r = box["x"] + box["width"] / 2, box["y"] + box["height"] / 2, 150
    pts = [(cx + r * math.cos(a), cy - r * math.sin(a)) for a in (math.pi / 2, math.pi * 7 / 6, math.pi * 11 / 6)]
    page.mouse.move(*pts[0])
    page.mouse.down()
    for p in pts[1:] + pts[:1]:
        page.mouse.move(*p, steps=8)
    start = time.perf_counter()
    page.mouse.up()
    page.wait_for_function("() => document.querySelector('#message').innerText.includes('for the drawing')"
                           " && document.querySelectorAll('#results img').length > 0", timeout=60000)
    return time.perf_counter() - start


def main(args) -> None:
    torch.set_num_threads(args.threads)
    server_side(args)
    if args.gallery:
        browser_side(args)


if __name__ == "__main__":
    main(get_args_parser().parse_args())
