"""Draw a sketch in the browser and see the photos of a folder that it finds: a local web page over the gallery
index that retrieve.py keeps (gallery.py).

    python app.py --model runs/demo/best.pth --gallery data/demo/photos        # what `make app` runs
    python app.py --model ckpt/best.pth --gallery ~/Pictures --port 8080 --topk 48
    python app.py --model ckpt/best.pth --gallery ~/Pictures --index ~/pictures_index.pt --faiss

The page is served on 127.0.0.1 (this machine only; --host and --port change that) and nothing is shared
publicly unless --share is given. It has a drawing canvas (brush, eraser, undo, clear), an upload box for a
sketch file and example sketches; the top --topk photos update when a stroke ends, with their scores, file
names and, when the gallery follows the dataset layout (photos/<class>/<file>), their classes. A blank drawing,
upload or example is refused with retrieve.py's words (gallery.blank_reason). The photos' embeddings are kept
in an index file (--index, by default GALLERYNAME_index.pt beside the gallery folder), built and updated as
retrieve.py does: only new or changed photos are embedded, and another model or precision rebuilds it.
Only files under --gallery are served. Needs gradio (pip install -r requirements.txt).
"""
import argparse
import collections
import functools
import logging
import os
import sys
import threading
import time
import traceback

import torch
from PIL import Image

import dataset
import gallery
import utils
from model import PretrainedWeightsUnavailable

# The canvas and the brush are drawn at the scale of the training sketches. demo_data.py draws its sketches'
# strokes 1.0 to 2.0 px wide (1.5 on average) on a 64 px image, the shape spanning 0.6 to 0.9 of it; a drawing
# that fills the canvas as much has strokes 1.5 / 64 of its side wide: 12 px on 512 px. (prepare_sketch then
# crops the drawing to its strokes, as it does for every query, and the model sees it at its own input size.)
CANVAS = 512
BRUSH_WIDTH = round(CANVAS * 1.5 / 64)
# Uploads over --max_upload_mb are refused with a message on the page and a line in the log; Gradio itself refuses
# (in the browser, before sending) those over UPLOAD_CAP times that, so that no huge file reaches the server.
UPLOAD_CAP = 4
MAX_SKETCH_PIXELS = 50_000_000  # an upload with more pixels is refused before it is decoded (a decompression bomb)
# Selects the canvas's brush when the page loads and after the canvas is cleared: as built, Gradio's sketchpad
# starts (and clears) with no tool selected ("select the draw tool to start"). The brush is clicked only while that
# hint shows, as a click on a selected brush would deselect it.
SELECT_BRUSH_JS = """() => {
  const pick = (tries) => {
    const pad = document.querySelector('#sketch');
    const brush = pad && pad.querySelector('button[aria-label="Brush"]');
    if (brush && pad.innerText.includes('select the draw tool')) { brush.click(); }
    else if (tries > 0) { setTimeout(() => pick(tries - 1), 100); }
  };
  pick(100);
  document.addEventListener('click', (e) => {
    if (e.target.closest && e.target.closest('#sketch button[aria-label="Clear canvas"]')) { pick(20); }
  }, true);
}"""


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                parents=[utils.common_parser(64, "images per embedding batch (gallery index)")],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", type=str, required=True, help="checkpoint written by train.py (best.pth / last.pth)")
    p.add_argument("--gallery", type=str, required=True, help="folder of photos to search (sub-folders included)")
    p.add_argument("--index", type=str, default="",
                   help="gallery index file, reused and updated across runs (retrieve.py's format); empty: "
                        "GALLERYNAME_index.pt beside the gallery folder")
    p.add_argument("--topk", type=int, default=24, help="photos shown per query")
    p.add_argument("--examples", type=str, default="",
                   help="folder of example sketches (class sub-folders: one per class, the classes of a "
                        "test_labels.txt beside it first); empty: the dataset's sketches/ beside the gallery, if any")
    p.add_argument("--num_examples", type=int, default=10, help="example sketches shown (0: none)")
    p.add_argument("--host", type=str, default="127.0.0.1",
                   help="address to serve on (127.0.0.1: this machine only; 0.0.0.0: every network interface)")
    p.add_argument("--port", type=int, default=7860, help="port to serve on")
    p.add_argument("--share", action=argparse.BooleanOptionalAction, default=False,
                   help="also publish the page through a public gradio.live link (off: nothing leaves this machine)")
    p.add_argument("--max_upload_mb", type=float, default=10.0, help="largest sketch file accepted, in MB")
    p.add_argument("--faiss", action=argparse.BooleanOptionalAction, default=False,
                   help="approximate search with a faiss index (needs: pip install faiss-cpu)")
    p.add_argument("--nprobe", type=int, default=32, help="with --faiss: inverted lists visited per query")
    p.add_argument("--query_threads", type=int, default=1,
                   help="torch CPU threads for queries, once the index is built (which uses torch's default); one "
                        "sketch gains little from more, and on a busy machine more threads wait on each other")
    return p


def check_args(args) -> None:
    for name in ("topk", "batch_size", "nprobe", "query_threads"):
        if getattr(args, name) < 1:
            raise utils.UserError(f"--{name} must be at least 1, got {getattr(args, name)}")
    if args.num_examples < 0:
        raise utils.UserError(f"--num_examples must be at least 0, got {args.num_examples}")
    if not 0 <= args.port <= 65535:
        raise utils.UserError(f"--port must be in 0..65535, got {args.port}")
    if args.max_upload_mb <= 0:
        raise utils.UserError(f"--max_upload_mb must be positive, got {args.max_upload_mb}")
    args.workers = utils.resolve_workers(args.workers)


def import_gradio():
    """The gradio module, imported only here (no other script needs it)."""
    try:
        import gradio
    except ImportError:
        raise utils.UserError("app.py needs the gradio package: pip install -r requirements.txt "
                              "(or pip install gradio==6.31.0)") from None
    return gradio


def log(message: str) -> None:
    """One line in the terminal (stderr), for whoever runs the server."""
    print(f"app.py {time.strftime('%H:%M:%S')} {message}", file=sys.stderr, flush=True)


class BrowserLeft(logging.Filter):
    """uvicorn logs a browser that goes away during an upload (a page closed or reloaded mid-request: starlette's
    ClientDisconnect) as "Exception in ASGI application" with a stack trace; it is not an error of the server, so
    the terminal gets one line instead. Every other record passes unchanged."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if type(exc).__name__ == "ClientDisconnect":
            log("a browser left during a request (the page was closed or reloaded); nothing of it was kept")
            return False
        return True


# ----------------------------------------------------------------------------------- pure pieces

def default_index_path(root: str) -> str:
    """The index beside the gallery folder ``root`` (a real path): data/demo/photos -> data/demo/photos_index.pt.
    Outside the gallery, so it is never one of its files, and kept with the photos it describes."""
    return os.path.join(os.path.dirname(root), os.path.basename(root) + "_index.pt")


def is_inside(root: str, path: str) -> bool:
    """Whether ``path`` is ``root`` or lies below it once links are resolved (what may be served)."""
    root, path = os.path.realpath(root), os.path.realpath(path)
    return os.path.commonpath([root, path]) == root


def photo_class(rel: str, dataset_layout: bool) -> str:
    """The class of a gallery photo at relative path ``rel``: its folder, in the dataset layout (class/file)."""
    return rel.replace(os.sep, "/").split("/")[0] if dataset_layout else ""


def follows_dataset_layout(paths: list) -> bool:
    """Whether every relative path is class/file (photos/<class>/<file>, the layout train.py reads)."""
    return bool(paths) and all(len(p.replace(os.sep, "/").split("/")) == 2 for p in paths)


def drawing_to_sketch(value) -> Image.Image | None:
    """The sketchpad's value (a dict whose "composite" is the drawing, PIL) -> the query sketch, prepared and
    checked as retrieve.py prepares and checks a sketch file (gallery.prepare_query); None when there is no
    drawing at all, and a blank canvas (gallery.blank_reason) is a UserError saying so."""
    composite = value.get("composite") if isinstance(value, dict) else value
    if composite is None:
        return None
    sketch, blank = gallery.prepare_query(composite)
    if blank:
        raise utils.UserError(gallery.blank_message([("the canvas", blank)]))
    return sketch


def not_an_image(name: str, error: Exception) -> utils.UserError:
    return utils.UserError(f"{name} is not an image this app can read ({type(error).__name__}); upload a PNG, "
                           "JPEG or other image file")


def read_sketch_file(path: str) -> Image.Image:
    """A sketch file (an upload or an example), prepared (gallery.load_query); one that is not an image or is
    blank is a UserError saying so, as retrieve.py says it of a query file."""
    name = os.path.basename(path)
    try:
        sketch, blank = gallery.load_query(path)
    except dataset.IMAGE_ERRORS as e:
        raise not_an_image(name, e) from None
    if blank:
        raise utils.UserError(gallery.blank_message([(name, blank)]))
    return sketch


def read_upload(path: str, max_bytes: int, max_pixels: int = MAX_SKETCH_PIXELS) -> Image.Image:
    """An uploaded sketch file, prepared (read_sketch_file); a file of more than ``max_bytes`` bytes, one that
    is not an image, an image of more than ``max_pixels`` pixels or a blank one is a UserError saying so."""
    name = os.path.basename(path)
    size = os.path.getsize(path)
    if size > max_bytes:
        raise utils.UserError(f"{name} is {size / 1e6:.2f} MB, more than the {max_bytes / 1e6:g} MB a sketch file "
                              "may have (--max_upload_mb); upload a smaller file")
    try:
        with Image.open(path) as im:  # reads the header only
            width, height = im.size
    except dataset.IMAGE_ERRORS as e:
        raise not_an_image(name, e) from None
    if width * height > max_pixels:
        raise utils.UserError(f"{name} is {width} x {height} pixels, more than the {max_pixels:,} a sketch "
                              "may have; upload a smaller image")
    return read_sketch_file(path)


def pick_examples(folder: str, count: int) -> list:
    """Up to ``count`` example sketch files of ``folder``: with class sub-folders, the first sketch (by name) of
    each class, the classes of a test_labels.txt beside the folder (a dataset's unseen classes) first; without,
    its first image files."""
    if count == 0 or not os.path.isdir(folder):
        return []
    classes = sorted(d for d in os.listdir(folder) if os.path.isdir(os.path.join(folder, d)) and d[0] != ".")
    if not classes:
        return [os.path.join(folder, f) for f in dataset.list_images(folder)][:count]
    labels = os.path.join(os.path.dirname(os.path.abspath(folder)), "test_labels.txt")
    first = dataset.read_labels(labels) if os.path.isfile(labels) else []
    ordered = [c for c in first if c in classes] + [c for c in classes if c not in first]
    picked = []
    for c in ordered:
        images = dataset.list_images(os.path.join(folder, c))
        if images:
            picked.append(os.path.join(folder, c, images[0]))
        if len(picked) == count:
            break
    return picked


# ----------------------------------------------------------------------------------- the search

class Searcher:
    """The model and the gallery index behind the page. The index is built in a background thread
    (build(), which the page's status follows); queries are answered once it is ready."""

    def __init__(self, model, args, source: gallery.GallerySource, identity: str, settings: gallery.EmbedSettings,
                 faiss=None):
        self.model, self.args, self.source, self.identity, self.settings = model, args, source, identity, settings
        self.root, self.index_path, self.faiss = source.root, source.index_path, faiss
        self.done, self.total = 0, len(source.files)
        self.ready, self.error = False, ""
        self.embeddings, self.paths, self.layout, self.built = None, [], False, None
        self.lock = threading.Lock()  # one query at a time on the model

    def progress(self, done: int, total: int) -> None:
        """embed_files' callback: the page's status reads it; the log gets a line at every tenth (tqdm's bar
        shows only in a terminal)."""
        if done * 10 // max(total, 1) > self.done * 10 // max(total, 1):
            log(f"gallery index: {done:,} of {total:,} photos embedded")
        self.done, self.total = done, total

    def build(self) -> None:
        """Bring the index up to date (embedding new photos), then keep its embeddings in memory."""
        try:
            index, _, _ = gallery.build_index(self.source, self.identity, self.settings, self.model.photo_encoder,
                                              self.args.model, progress=self.progress)
            if self.faiss is not None:
                self.built = gallery.cached_faiss_index(self.faiss, index,
                                                        os.path.splitext(self.index_path)[0] + ".faiss")
            self.embeddings = index["embeddings"].float().clone()  # (N, D), in memory: the index file is mmapped
            self.paths = index["paths"]
            self.layout = follows_dataset_layout(self.paths)
            torch.set_num_threads(self.args.query_threads)
            self.ready = True
            log(f"ready: {len(self.paths)} photos, serving queries")
        except utils.UserError as e:
            self.error = str(e)
            log(f"error: {e}")
        except Exception as e:  # noqa: BLE001 - the page says so; the terminal gets the traceback
            self.error = f"building the gallery index failed ({type(e).__name__}: {e})"
            log(self.error + "\n" + traceback.format_exc())

    def status(self) -> str:
        if self.error:
            return f"**Gallery index: error.** {self.error}"
        if not self.ready:
            return (f"Building the gallery index {self.index_path}: {self.done:,} of {self.total:,} photos "
                    "embedded; results come once it is done.")
        return (f"Gallery: {len(self.paths):,} photos of {self.args.gallery} (index {self.index_path}), searched "
                f"with the model {self.args.model}.")

    def search(self, sketch: Image.Image) -> tuple[list, float]:
        """A prepared sketch -> [(photo path, rank, score, class, relative path)] of the top k, and the
        seconds the query took (embedding and ranking)."""
        start = time.perf_counter()
        with self.lock:
            s = self.settings
            q = gallery.embed_sketches(self.model.sketch_encoder, [sketch], s.image_size, 1, s.device, s.amp,
                                       show=False)  # (1, D)
        if self.built is not None:
            scores, rows = gallery.faiss_search(self.built, q, self.args.topk, self.args.nprobe)
        else:
            scores, rows = gallery.search(q, self.embeddings, self.args.topk)
        seconds = time.perf_counter() - start
        hits = []
        for rank, (s, r) in enumerate(zip(scores[0].tolist(), rows[0].tolist())):
            if r < 0:
                continue
            rel = self.paths[r]
            path = os.path.join(self.root, rel)
            if not is_inside(self.root, path):  # a link out of the gallery: never served
                log(f"left out {rel}: it links outside the gallery")
                continue
            hits.append((path, rank + 1, s, photo_class(rel, self.layout), rel))
        return hits, seconds


def caption(rank: int, score: float, cls: str, rel: str) -> str:
    name = os.path.basename(rel)
    return f"{rank}. {score:.3f}  {cls} · {name}" if cls else f"{rank}. {score:.3f}  {name}"


# ----------------------------------------------------------------------------------- the page

def answer(searcher: Searcher, sketch: Image.Image, what: str) -> tuple:
    """(results, message, the sketch as the model sees it) for a prepared sketch; ``what`` names it (the log,
    the message)."""
    if not searcher.ready:
        log(f"query ({what}) before the index is ready")
        return [], searcher.status(), sketch
    hits, seconds = searcher.search(sketch)
    classes = [c for _, _, _, c, _ in hits if c]
    summary = ""
    if classes:
        top, count = collections.Counter(classes).most_common(1)[0]  # a tie: the class ranked first
        summary = f" Most frequent class: {top} ({count} of {len(hits)})."
    log(f"query ({what}): {len(hits)} photos in {seconds * 1000:.0f} ms")
    return ([(p, caption(rank, s, c, rel)) for p, rank, s, c, rel in hits],
            f"Top {len(hits)} of {len(searcher.paths):,} photos for the {what} "
            f"({seconds * 1000:.0f} ms).{summary}", sketch)


def guarded(gr, handler):
    """A handler run so that a user's mistake is a message (a warning, the message line, a log line) and anything
    else a message and a traceback in the log: the page never shows a stack trace and the server keeps serving."""
    def refuse(message: str):
        log(f"refused ({handler.__name__}): {message}")
        gr.Warning(message)
        return [], f"**{message}**", None

    @functools.wraps(handler)  # keeps the signature, from which Gradio passes event data (gr.SelectData)
    def run(*values):
        try:
            return handler(*values)
        except utils.UserError as e:
            return refuse(str(e))
        except Exception as e:  # noqa: BLE001
            log(f"error in {handler.__name__}: {type(e).__name__}: {e}\n{traceback.format_exc()}")
            gr.Warning("something went wrong; the terminal running app.py has the details")
            return [], "**Something went wrong with this query; the terminal running app.py has the details.**", None
    return run


def page_handlers(gr, searcher: Searcher, examples: list) -> dict:
    """The page's event handlers by event, each guarded: a stroke, the Search button, an upload, an example."""
    def stroke(value):
        """A stroke ended (or the canvas was cleared, undone, erased): search, or say why the canvas cannot be."""
        try:
            sketch = drawing_to_sketch(value)
        except utils.UserError as e:  # blank: said on the page, without a warning (clearing the canvas is no mistake)
            log("canvas blank: results cleared")
            return [], f"{str(e)[0].upper()}{str(e)[1:]}.", None
        if sketch is None:
            log("canvas empty: results cleared")
            return [], "The canvas is empty: draw a sketch (or upload one) to search.", None
        return answer(searcher, sketch, "drawing")

    def search_drawing(value):
        """The Search button: as a stroke, and a blank or empty canvas is a warning too."""
        sketch = drawing_to_sketch(value)
        if sketch is None:
            raise utils.UserError("the canvas is empty: draw a sketch (or upload one) to search")
        return answer(searcher, sketch, "drawing")

    def upload(path):
        if not path:  # the upload box was cleared: leave the page as it is
            return gr.skip(), gr.skip(), gr.skip()
        return answer(searcher, read_upload(path, int(searcher.args.max_upload_mb * 1e6)),
                      f"file {os.path.basename(path)}")

    def example(evt: gr.SelectData):
        path = examples[evt.index]
        return answer(searcher, read_sketch_file(path), f"example {os.path.basename(path)}")

    return {name: guarded(gr, h) for name, h in (("stroke", stroke), ("search", search_drawing), ("upload", upload),
                                                  ("example", example))}


def build_page(gr, searcher: Searcher, examples: list):
    """The Blocks of the page: canvas, upload box, examples, results, status lines."""
    handlers = page_handlers(gr, searcher, examples)

    def tick():
        done = searcher.ready or bool(searcher.error)
        return searcher.status(), gr.Timer(active=not done)

    with gr.Blocks(title="Sketch search") as page:
        gr.Markdown("## Sketch-based photo search\nDraw an object (results update when a stroke ends), "
                    "upload a sketch, or pick an example.")
        status = gr.Markdown(searcher.status(), elem_id="status")
        with gr.Row():
            with gr.Column(scale=2):
                sketchpad = gr.Sketchpad(
                    type="pil", image_mode="RGB", canvas_size=(CANVAS, CANVAS), height=CANVAS + 110,
                    brush=gr.Brush(default_size=BRUSH_WIDTH // 2, colors=["#000000"], color_mode="fixed"),
                    eraser=gr.Eraser(default_size=BRUSH_WIDTH), layers=False, transforms=(), label="Draw here",
                    elem_id="sketch")
                search_button = gr.Button("Search", variant="primary", elem_id="search")
                upload_box = gr.File(label="…or upload a sketch", file_types=["image"], type="filepath",
                                     elem_id="upload")
                example_box = gr.Gallery(value=[(p, os.path.basename(os.path.dirname(p))) for p in examples],
                                         label="Example sketches (click one to search with it)", columns=4,
                                         height=360, object_fit="contain", allow_preview=False,
                                         elem_id="examples", buttons=[],
                                         visible=bool(examples))
            with gr.Column(scale=3):
                message = gr.Markdown("", elem_id="message")
                results = gr.Gallery(label="Top photos (rank, score, class · file)", columns=6, height="auto",
                                     object_fit="contain", elem_id="results", buttons=[])
                prepared = gr.Image(label="The sketch as the model sees it", type="pil", height=160,
                                    interactive=False, elem_id="prepared", buttons=[])
        outputs = [results, message, prepared]
        sketchpad.change(handlers["stroke"], sketchpad, outputs, show_progress="hidden", trigger_mode="always_last")
        search_button.click(handlers["search"], sketchpad, outputs)
        upload_box.change(handlers["upload"], upload_box, outputs)
        example_box.select(handlers["example"], None, outputs)
        timer = gr.Timer(0.5)
        timer.tick(tick, None, [status, timer], show_progress="hidden")
    return page


# ----------------------------------------------------------------------------------- main

def main(args) -> None:
    check_args(args)
    gr = import_gradio()
    if not os.path.isdir(args.gallery):
        what = "is not a folder" if os.path.exists(args.gallery) else "does not exist"
        raise utils.UserError(f"gallery {args.gallery} {what}; pass the folder that holds your photos")
    root = os.path.realpath(args.gallery)
    index_path = os.path.abspath(args.index or default_index_path(root))
    if is_inside(root, index_path):
        raise utils.UserError(f"--index {index_path} is inside the gallery folder, whose files the page serves; "
                              "put it elsewhere")
    old_index = gallery.load_index(index_path)
    ckpt = utils.load_checkpoint(args.model)
    faiss = gallery.import_faiss() if args.faiss else None
    source = gallery.GallerySource(args.gallery, root, index_path, *gallery.scan_gallery(root, exclude=""), old_index)
    if not source.files:
        raise utils.UserError(f"gallery {args.gallery} holds no image files ({', '.join(dataset.IMAGE_EXTENSIONS)}); "
                              "pass the folder that holds your photos")
    device = utils.get_device(args.device)
    model = utils.build_model(ckpt, args.model, trained=True).to(device).eval()
    utils.ensure_dir(os.path.dirname(index_path), "index folder (choose one with --index)")
    utils.print_banner("app.py", args)
    settings = gallery.EmbedSettings(utils.checkpoint_model(ckpt).image_size, args.batch_size, args.workers, device,
                                     args.amp)
    print(gallery.describe_model(args.model, ckpt, settings, utils.model_fingerprint(ckpt)))

    examples_dir = args.examples or os.path.join(os.path.dirname(root), "sketches")
    if args.examples and not os.path.isdir(args.examples):
        raise utils.UserError(f"--examples {args.examples} is not a folder; pass a folder of sketches")
    examples = pick_examples(examples_dir, args.num_examples)
    searcher = Searcher(model, args, source, gallery.model_identity(ckpt), settings, faiss)
    page = build_page(gr, searcher, examples)
    threading.Thread(target=searcher.build, daemon=True, name="gallery-index").start()
    blocked = [os.path.abspath(args.model), index_path, os.path.splitext(index_path)[0] + ".faiss"]
    print(f"serving on http://{args.host}:{args.port} (Ctrl-C stops)" + ("; --share: also on a public link"
                                                                         if args.share else ""))
    logging.getLogger("uvicorn.error").addFilter(BrowserLeft())
    page.queue(default_concurrency_limit=1).launch(
        server_name=args.host, server_port=args.port, share=args.share, allowed_paths=[root], blocked_paths=blocked,
        max_file_size=int(UPLOAD_CAP * args.max_upload_mb * 1e6), show_error=False, js=SELECT_BRUSH_JS, quiet=True)


if __name__ == "__main__":
    utils.run_cli(main, get_args_parser(), (dataset.DataError, PretrainedWeightsUnavailable))
