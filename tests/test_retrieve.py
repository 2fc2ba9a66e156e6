"""retrieve.py: exact search against a brute-force ranking, the reusable index, query sketches of any
form, faiss (when installed) and bad input."""
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

import dataset
import gallery
import metrics
import retrieve
import utils
from conftest import U32, make_tiny_dataset, run_main
from model import ZSSBIRModel
from test_evaluate import bench_parser
from test_train import assert_one_line_error

try:
    import faiss
except ImportError:
    faiss = None
needs_faiss = pytest.mark.skipif(faiss is None, reason="faiss is not installed (optional: pip install faiss-cpu)")


def save_tiny_checkpoint(path: str, seed: int = 0, backbone: str = "resnet18") -> str:
    """A checkpoint in train.py's format of an untrained, seeded 16-d network at 32 px (no training needed:
    these tests check retrieval, not the model)."""
    args = {"backbone": backbone, "embedding_dim": 16, "image_size": 32, "seed": seed, "pretrained": False,
            "val_fraction": 0.1}
    utils.seed_everything(seed)
    model = ZSSBIRModel(backbone, 16, pretrained=False)
    utils.save_checkpoint({"models": {name: m.state_dict() for name, m in model.named_children()},
                           "optimizers": {}, "scaler": {}, "epoch": 0, "step": 0, "args": args, "best": 0.0}, path)
    return path


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("retrieve")
    data = make_tiny_dataset(str(root / "data"), per_class=3)
    return {"root": root, "data": data, "sketch": os.path.join(data, "sketches", "star", "star_0.png"),
            "model": save_tiny_checkpoint(str(root / "model.pth")),
            "other_model": save_tiny_checkpoint(str(root / "other.pth"), seed=1)}


@pytest.fixture
def photos(setup, tmp_path):
    """A fresh copy of the tiny dataset's 18 photos (6 classes x 3), in class sub-folders."""
    folder = tmp_path / "gallery"
    for c in sorted(os.listdir(os.path.join(setup["data"], "photos"))):
        (folder / c).mkdir(parents=True)
        for name in sorted(os.listdir(os.path.join(setup["data"], "photos", c))):
            Image.open(os.path.join(setup["data"], "photos", c, name)).save(folder / c / name)
    return str(folder)


def retrieve_json(capsys, model, photos, queries, out, *extra, grids: bool = False) -> dict:
    """Run retrieve.main with --json in this process; return the parsed document (stdout holds nothing else)
    with the messages of stderr under "stderr"."""
    stdout, stderr = retrieve_text(capsys, model, photos, queries, out, "--json", "--grids" if grids else "--no-grids",
                                   *extra)
    return {**json.loads(stdout), "stderr": stderr}


def retrieve_text(capsys, model, photos, queries, out, *extra) -> tuple[str, str]:
    """Run retrieve.main in this process (no data loader workers); return what it printed (stdout, stderr)."""
    capsys.readouterr()
    retrieve.main(retrieve.get_args_parser().parse_args(
        ["--model", model, "--gallery", photos, "--query", *queries, "--output_dir", out, "--workers", "0",
         "--device", "cpu", *extra]))
    captured = capsys.readouterr()
    return captured.out, captured.err


def ranking(doc: dict, i: int = 0) -> list:
    return [(hit["path"], hit["score"]) for hit in doc["queries"][i]["results"]]


def assert_ranked_alike(hits: list, ref: list, bound: float, what: str = "") -> None:
    """Two rankings [(photo, score)] of one gallery whose scores of a photo differ by at most ``bound`` (one dot
    product summed in two orders): distinct photos, the scores within bound position by position (sorting moves
    no score further than the scores moved) and photo by photo. So two photos trade places only where their
    scores are within 2 bound of each other; elsewhere the order is the same."""
    assert len(hits) == len(ref) == len({p for p, _ in hits}), what
    assert all(abs(s - t) <= bound for (_, s), (_, t) in zip(hits, ref)), what
    ref_score = dict(ref)
    assert all(abs(s - ref_score[p]) <= bound for p, s in hits if p in ref_score), what


def assert_top_k_within(scores: torch.Tensor, rows: torch.Tensor, ref: torch.Tensor, bound: float) -> None:
    """A top-k search's (scores, rows) (Q, k) against reference scores ref (Q, N) that differ from the search's
    by at most ``bound``: distinct rows, each score within bound of its row's reference score and of the
    reference's k best, position by position (as assert_ranked_alike)."""
    k = rows.shape[1]
    assert all(len(set(r)) == k for r in rows.tolist())
    scores = scores.to(ref.dtype)
    assert torch.allclose(scores, torch.gather(ref, 1, rows), rtol=0, atol=bound)
    assert torch.allclose(scores, ref.sort(dim=1, descending=True).values[:, :k], rtol=0, atol=bound)


# ----------------------------------------------------------------------------------- search

def brute_force(q: torch.Tensor, g: torch.Tensor, k: int) -> list:
    """Per query: every gallery row by descending score, equal scores by row, cut at k (the written definition)."""
    scores = (q.double() @ g.double().T).tolist()
    return [sorted(range(len(row)), key=lambda j: (-row[j], j))[:k] for row in scores]


def test_search_equals_brute_force_ranking_with_ties():
    gen = torch.Generator().manual_seed(0)
    # Small integers: every score is exact in float32, so ties are real ties; duplicated rows make more.
    g = torch.randint(-3, 4, (50, 6), generator=gen).float()
    g[30:40] = g[0:10]
    q = torch.randint(-3, 4, (7, 6), generator=gen).float()
    for k, chunk in ((5, 7), (12, 3), (50, 64), (80, 16)):
        scores, rows = gallery.search(q, g, k, chunk=chunk)
        assert rows.tolist() == brute_force(q, g, k), (k, chunk)
        assert torch.equal(scores, torch.gather(q @ g.T, 1, rows)), (k, chunk)
    assert gallery.search(q, g[:0], 3)[1].shape == (7, 0)


def test_search_of_unit_vectors_scores_as_metrics_similarity(monkeypatch):
    monkeypatch.setattr(gallery, "QUERY_BLOCK", 4)  # several query blocks
    gen = torch.Generator().manual_seed(1)
    g = torch.nn.functional.normalize(torch.randn(1000, 32, generator=gen), dim=1)
    q = torch.nn.functional.normalize(torch.randn(10, 32, generator=gen), dim=1)
    scores, rows = gallery.search(q, g, 20, chunk=128)
    sim = metrics.similarity(q, g)  # (10, 1000)
    # float32 dot products of D = 32 terms of unit vectors, each within D u32 of the exact score, and
    # similarity normalises the (already unit) rows again, moving each by at most D u32 more. The two are
    # other matrix products (other shapes: other kernels), so near-ties may rank either way.
    assert_top_k_within(scores, rows, sim, 4 * 32 * U32)
    assert (scores[:, :-1] >= scores[:, 1:]).all()


def test_order_keys_round_trip_and_order():
    s = torch.tensor([[-2.5, -0.0, 0.0, 1e-30, -1e-30, 3.0, 3.0, float("inf"), -float("inf")]])
    keys = gallery._order_keys(s, first_row=10)
    scores, rows = gallery._decode_keys(keys)
    assert torch.equal(scores, s + 0.0) and rows.tolist() == [list(range(10, 19))]
    order = keys.argsort(dim=1, descending=True)[0].tolist()
    assert order == [7, 5, 6, 3, 1, 2, 4, 0, 8]  # by score, equal scores (3.0; -0.0 and 0.0) by row


# ----------------------------------------------------------------------------------- query sketches

def drawing(size=(120, 80), ink=0, paper=255) -> Image.Image:
    im = Image.new("L", size, paper)
    draw = ImageDraw.Draw(im)
    draw.polygon([(20, 15), (95, 25), (60, 70)], outline=ink, width=3)
    draw.ellipse((50, 30, 70, 45), outline=ink, width=2)
    return im


def transparent(im: Image.Image, colour) -> Image.Image:
    """The strokes of a black-on-white drawing in ``colour`` on a fully transparent background."""
    out = Image.new("RGBA", im.size, colour + (0,))
    out.putalpha(Image.eval(im, lambda v: 255 - v))
    return out


def test_prepare_sketch_forms_give_the_same_image():
    clean = dataset.prepare_sketch(drawing())
    a = np.asarray(clean)
    wide = Image.new("L", (500, 90), 255)
    wide.paste(drawing(), (300, 5))
    assert clean.mode == "RGB" and clean.width == clean.height
    for name, im in (("white on black", drawing(ink=255, paper=0)),
                     ("black on transparent", transparent(drawing(), (0, 0, 0))),
                     ("white on transparent", transparent(drawing(), (255, 255, 255))),
                     ("palette", drawing().convert("P")),
                     ("RGB", drawing().convert("RGB")),
                     ("wide canvas", wide)):
        assert np.array_equal(np.asarray(dataset.prepare_sketch(im)), a), name


def test_prepare_sketch_crops_to_the_strokes_and_pads_without_stretching():
    im = Image.new("L", (300, 100), 255)
    ImageDraw.Draw(im).ellipse((200, 20, 260, 80), outline=0, width=3)  # a 61 px circle, right of centre
    before = np.asarray(im).copy()
    out = dataset.prepare_sketch(im)
    assert np.array_equal(np.asarray(im), before)  # the input is left alone
    assert out.size == (61 + 2 * 6, 61 + 2 * 6)  # the circle plus a 10 % margin on each side
    ys, xs = np.nonzero(np.asarray(out.convert("L")) < 128)
    assert (xs.min(), xs.max(), ys.min(), ys.max()) == (6, 66, 6, 66)  # still round: same extent both ways
    assert dataset.prepare_sketch(Image.new("L", (40, 10), 255)).size == (40, 40)  # blank: padded whole


def test_prepare_sketch_cleans_a_photo_of_paper():
    clean = np.asarray(drawing(), dtype=np.float64)
    yy, xx = np.mgrid[0:80, 0:120]
    light = 140 + 90 * xx / 120 + 10 * np.sin(yy / 10)  # uneven lighting, darker on the left
    photo = clean / 255 * light + (1 - clean / 255) * 70 + np.random.default_rng(0).normal(0, 3, clean.shape)
    out = np.asarray(dataset.prepare_sketch(Image.fromarray(np.clip(photo, 0, 255).astype(np.uint8)).convert("RGB")))
    ref = np.asarray(dataset.prepare_sketch(drawing()))
    assert out.shape == ref.shape
    strokes = ref[..., 0] < 128
    assert out[..., 0][strokes].mean() < 40 and out[..., 0][~strokes].mean() > 230  # black ink, white paper
    assert ((out[..., 0] < 128) == strokes).mean() > 0.97


def span_reason(im: Image.Image) -> str:
    """The reason blank_reason gives an opaque image whose grey levels span less than BLANK_CONTRAST, from the
    span numpy measures."""
    span = int(np.ptp(np.asarray(im.convert("L"), dtype=np.int64)))
    assert span < gallery.BLANK_CONTRAST
    return "a single colour" if span == 0 else \
        f"nearly one colour: its grey levels span {span} of 255, fewer than {gallery.BLANK_CONTRAST}"


def dot(side: int) -> Image.Image:
    """A black square dot ``side`` pixels wide on a white 512 px canvas."""
    im = Image.new("L", (512, 512), 255)
    ImageDraw.Draw(im).rectangle((100, 100, 99 + side, 99 + side), fill=0)
    return im


def blank_and_not_blank(tmp_path) -> tuple[dict, dict]:
    """Query images that must be refused, with their reason, and images with strokes that must not be."""
    jpeg = tmp_path / "white.jpg"
    Image.new("RGB", (300, 200), "white").save(jpeg, quality=70)
    rng = np.random.default_rng(0)
    noisy = Image.fromarray(np.clip(200 + rng.normal(0, 3, (120, 160)), 0, 255).astype(np.uint8))
    faint = Image.new("L", (512, 512), 255)
    ImageDraw.Draw(faint).line((100, 100, 400, 300), fill=200, width=1)  # 301 px of a 262,144 px page
    single = "a single colour"
    blank = {"white": (Image.new("RGB", (200, 100), "white"), single),
             "black": (Image.new("L", (64, 64), 0), single),
             "uniform grey": (Image.new("RGB", (64, 64), (128, 128, 128)), single),
             "uniform red": (Image.new("RGB", (64, 64), (200, 30, 30)), single),
             "transparent, no strokes": (Image.new("RGBA", (64, 64), (0, 0, 0, 0)), single),
             "transparent white, no strokes": (Image.new("RGBA", (64, 64), (255, 255, 255, 0)), single),
             "noise on grey paper": (noisy, span_reason(noisy)),
             "white page as a JPEG": (Image.open(jpeg), span_reason(Image.open(jpeg))),
             "one-pixel dot": (dot(1), "only a dot: cropped to its strokes, it is one black square"),
             "five-pixel dot": (dot(5), "only a dot: cropped to its strokes, it is one black square"),
             "faint line": (faint, "its lines are too faint: none is darker than mid-grey once the background is "
                                   "evened out")}
    thin = Image.new("L", (512, 512), 255)
    ImageDraw.Draw(thin).line((100, 100, 130, 100), fill=0, width=1)  # one pixel wide, 31 long
    strokes = {"thin line": thin, "six-pixel dot": dot(6), "drawing": drawing(),
               "white on black": drawing(ink=255, paper=0),
               "white on transparent": transparent(drawing(), (255, 255, 255)),  # blank once composited on white
               "photo of paper": Image.fromarray(np.clip(np.asarray(drawing(), dtype=np.float64) * 0.6 + 60, 0, 255)
                                                 .astype(np.uint8))}
    return blank, strokes


def test_blank_queries_are_told_apart_from_thin_strokes(setup, tmp_path):
    blank, strokes = blank_and_not_blank(tmp_path)
    for name, (im, reason) in blank.items():
        sketch, why = gallery.prepare_query(im)
        assert why == reason, name
        assert np.array_equal(np.asarray(sketch), np.asarray(dataset.prepare_sketch(im))), name  # what the model sees
    for name, im in strokes.items():
        assert gallery.prepare_query(im)[1] == "", name
    assert gallery.load_query(setup["sketch"])[1] == ""  # a 32 px dataset sketch, 2 px strokes
    assert gallery.blank_message([("a.png", "a single colour")]) == (
        "a.png is blank (a single colour); use a sketch with dark strokes on a light background (or light strokes "
        "on a dark one)")


def test_cli_refuses_blank_queries_naming_each(setup, photos, tmp_path):
    blank, _ = blank_and_not_blank(tmp_path)
    paths = {}
    for name in ("white", "transparent, no strokes", "one-pixel dot"):
        paths[name] = str(tmp_path / (name.replace(" ", "_").replace(",", "") + ".png"))
        blank[name][0].save(paths[name])
    out = tmp_path / "out"
    common = ["--model", setup["model"], "--gallery", photos, "--output_dir", str(out), "--workers", "0",
              "--device", "cpu"]
    alone, several = run_cli_cases(
        [*common, "--query", paths["white"]],
        [*common, "--query", setup["sketch"], paths["transparent, no strokes"], paths["one-pixel dot"]])
    assert_one_line_error(alone, f"error: query sketch {paths['white']} is blank (a single colour); use a sketch "
                                 "with dark strokes on a light background")
    assert_one_line_error(several, f"error: 2 of the 3 query sketches are blank: {paths['transparent, no strokes']} "
                                   f"(a single colour), {paths['one-pixel dot']} (only a dot: ",
                          "or leave them out")
    assert setup["sketch"] not in several.stderr
    assert not out.exists()  # refused before anything is written


def test_phone_photos_are_turned_upright_by_their_exif_orientation(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: the camera was turned; show the stored image rotated 90 degrees clockwise
    Image.new("RGB", (40, 20), "white").save(tmp_path / "phone.jpg", exif=exif)
    assert dataset.open_image(str(tmp_path / "phone.jpg"), upright=True).size == (20, 40)
    image, readable = dataset.ImageFilesDataset([str(tmp_path / "phone.jpg")], 32)[0]
    assert readable and image.shape == (3, 32, 32)
    (tmp_path / "bad.jpg").write_bytes(b"not a jpeg")
    image, readable = dataset.ImageFilesDataset([str(tmp_path / "bad.jpg")], 32)[0]
    assert not readable and not image.any()


def test_pipeline_ranks_the_same_for_every_form_of_a_sketch(setup, photos, tmp_path, capsys):
    sketch = Image.open(setup["sketch"]).convert("L")  # a tiny dataset sketch, black outline on white
    forms = {"plain.png": sketch, "inverted.png": Image.eval(sketch, lambda v: 255 - v),
             "transparent.png": transparent(sketch, (0, 0, 0)),
             "light_on_transparent.png": transparent(sketch, (255, 255, 255))}
    wide = Image.new("L", (150, 32), 255)
    wide.paste(sketch, (90, 0))
    forms["wide.png"] = wide
    for name, im in forms.items():
        im.save(tmp_path / name)
    paths = [str(tmp_path / n) for n in forms]
    doc = retrieve_json(capsys, setup["model"], photos, paths, str(tmp_path / "out"), "--topk", "18",
                        "--batch_size", "1")
    # Each form is prepared to the same image and embedded alone (--batch_size 1), as retrieve.py does: the same
    # input tensor through the same kernels, so the same embedding, bit for bit.
    sketches = retrieve.read_queries(paths)
    for name, s in zip(forms, sketches):
        assert np.array_equal(np.asarray(s), np.asarray(sketches[0])), name
    model = utils.build_model(utils.load_checkpoint(setup["model"]), setup["model"], trained=True)
    emb = gallery.embed_sketches(model.sketch_encoder, sketches, 32, 1, torch.device("cpu"), False)  # (5, D)
    for name, e in zip(forms, emb):
        assert torch.equal(e, emb[0]), name
    # Their scores need not be: search scores the 5 queries in one matrix product, and a BLAS may compute a
    # query's row with another kernel (another summation order) by its position in the batch (the 5th of 5,
    # wide.png, with MKL's SSE4.2/AVX kernels). Each score, a float32 dot product of two D-dim unit vectors,
    # is within about D u32 of the exact one, so two forms' scores of a photo differ by at most 2 D u32.
    first = ranking(doc, 0)
    assert len(first) == 18 and len({p for p, _ in first}) == 18
    for i, name in enumerate(forms):
        assert_ranked_alike(ranking(doc, i), first, 2 * emb.shape[1] * U32, name)


# ----------------------------------------------------------------------------------- the index

ALONE = ("--batch_size", "1")  # each photo in a batch of its own, whichever others are embedded with it


def index_of(path: str) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def test_index_is_reused_and_updated_file_by_file(setup, photos, tmp_path, capsys):
    out, query = str(tmp_path / "out"), [setup["sketch"]]
    first = retrieve_json(capsys, setup["model"], photos, query, out, "--topk", "18", *ALONE)
    assert first["index_counts"] == {"images": 18, "embedded": 18, "unchanged": 0, "deleted": 0, "unreadable": 0}
    index_file = os.path.join(out, "gallery_index.pt")
    assert first["index"] == index_file
    saved = index_of(index_file)
    assert saved["root"] == os.path.realpath(photos) and len(saved["paths"]) == 18
    assert not any(os.path.isabs(p) for p in saved["paths"]) and saved["embeddings"].shape == (18, 16)

    again = retrieve_json(capsys, setup["model"], photos, query, out, "--topk", "18", *ALONE)
    assert again["index_counts"] == {"images": 18, "embedded": 0, "unchanged": 18, "deleted": 0, "unreadable": 0}
    assert index_of(index_file)["revision"] == saved["revision"]  # not rewritten
    assert ranking(again) == ranking(first)

    # One photo added, one modified (new content and date), one deleted.
    Image.open(os.path.join(photos, "star", "star_0.png")).rotate(90).save(os.path.join(photos, "star", "new.png"))
    modified = os.path.join(photos, "circle", "circle_1.png")
    Image.open(modified).transpose(Image.FLIP_LEFT_RIGHT).save(modified)
    os.utime(modified, ns=(1_000_000_000, 1_000_000_000))
    os.remove(os.path.join(photos, "tri", "tri_2.png"))
    third = retrieve_json(capsys, setup["model"], photos, query, out, "--topk", "18", *ALONE)
    assert third["index_counts"] == {"images": 18, "embedded": 2, "unchanged": 16, "deleted": 1, "unreadable": 0}

    # The updated index holds exactly what a fresh build holds.
    fresh = retrieve_json(capsys, setup["model"], photos, query, str(tmp_path / "fresh"), "--topk", "18", *ALONE)
    assert fresh["index_counts"]["embedded"] == 18
    a, b = index_of(index_file), index_of(os.path.join(tmp_path, "fresh", "gallery_index.pt"))
    assert a["paths"] == b["paths"] and torch.equal(a["sizes"], b["sizes"]) and torch.equal(a["mtimes"], b["mtimes"])
    assert torch.equal(a["embeddings"], b["embeddings"])  # every photo embedded alone: the same bits
    assert [p for p, _ in ranking(third)] == [p for p, _ in ranking(fresh)]


def test_another_model_rebuilds_the_index_with_one_line(setup, photos, tmp_path, capsys):
    index_file = str(tmp_path / "idx" / "photos.pt")
    retrieve_json(capsys, setup["model"], photos, [setup["sketch"]], str(tmp_path / "a"), "--index", index_file)
    doc = retrieve_json(capsys, setup["other_model"], photos, [setup["sketch"]], str(tmp_path / "b"),
                        "--index", index_file)
    assert f"index {index_file} was built with another model; rebuilding" in doc["stderr"]
    assert doc["index_counts"]["embedded"] == 18 and doc["index"] == index_file


def test_gallery_embeddings_match_evaluate(setup, photos, tmp_path, capsys):
    retrieve_json(capsys, setup["model"], photos, [setup["sketch"]], str(tmp_path / "out"), "--batch_size", "8")
    saved = index_of(str(tmp_path / "out" / "gallery_index.pt"))
    ckpt = utils.load_checkpoint(setup["model"])
    model = utils.build_model(ckpt, setup["model"], trained=True)
    ref = utils.embed_images(model.photo_encoder, [os.path.join(photos, p) for p in saved["paths"]], 32, 8, 0,
                             torch.device("cpu"), True)
    assert torch.equal(saved["embeddings"], ref)  # the same images in the same batches: the same bits
    assert gallery.model_identity(ckpt) == saved["model"] != gallery.model_identity(
        utils.load_checkpoint(setup["other_model"]))


def test_interrupted_build_keeps_what_was_embedded(tmp_path):
    files = [(f"{i}.png", 10, 1) for i in range(5)]
    calls = []

    def embed_two_then_stop(paths):
        calls.append(len(paths))
        return torch.ones(2, 4), torch.tensor([True, False]), True  # Ctrl-C after two files, one unreadable

    path = str(tmp_path / "index.pt")
    with pytest.raises(KeyboardInterrupt):
        gallery.update_index(None, path, str(tmp_path), files, "model-a", "float32", embed_two_then_stop)
    saved = index_of(path)
    assert saved["paths"] == ["0.png"] and saved["skipped"] == {"1.png": [10, 1]}
    def embed_all(paths):
        return torch.zeros(len(paths), 4), torch.ones(len(paths), dtype=torch.bool), False

    index, counts = gallery.update_index(gallery.load_index(path), path, str(tmp_path), files, "model-a", "float32",
                                         embed_all)
    assert counts == {"images": 4, "embedded": 3, "unchanged": 1, "deleted": 0, "unreadable": 1}
    assert index["paths"] == ["0.png", "2.png", "3.png", "4.png"] and index["embeddings"][0].tolist() == [1.0] * 4
    assert calls == [5]


def test_non_images_are_skipped_counted_and_remembered(setup, photos, tmp_path, capsys):
    with open(os.path.join(photos, "notes.txt"), "w") as f:
        f.write("not a photo")
    broken = os.path.join(photos, "star", "broken.jpg")
    with open(broken, "wb") as f:
        f.write(b"\xff\xd8 this is no JPEG")
    out = str(tmp_path / "out")
    stdout, _ = retrieve_text(capsys, setup["model"], photos, [setup["sketch"]], out, "--topk", "3")
    assert "skipped 2 file(s) of the gallery: 1 not an image, 1 unreadable image(s)" in stdout
    assert "18 photos in" in stdout and "(18 embedded," in stdout
    lines = stdout.splitlines()
    table = lines[lines.index("rank   score  photo") + 1:][:3]
    assert [line.split()[0] for line in table] == ["1", "2", "3"] and all(photos in line for line in table)
    with open(os.path.join(out, "grid_01_star_0.png"), "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    # The broken file is not retried until it changes; grids written inside the gallery are not searched.
    in_gallery, index = os.path.join(photos, "results"), os.path.join(out, "gallery_index.pt")
    for _ in range(2):
        doc = retrieve_json(capsys, setup["model"], photos, [setup["sketch"]], in_gallery, "--index", index,
                            grids=True)
        assert doc["index_counts"] == {"images": 18, "embedded": 0, "unchanged": 18, "deleted": 0, "unreadable": 1}
        assert doc["skipped_files"] == ["notes.txt", os.path.join("star", "broken.jpg")]
    assert os.path.isfile(os.path.join(in_gallery, "grid_01_star_0.png"))
    Image.new("RGB", (32, 32), "white").save(broken, format="JPEG")
    doc = retrieve_json(capsys, setup["model"], photos, [setup["sketch"]], in_gallery, "--index", index)
    assert doc["index_counts"] == {"images": 19, "embedded": 1, "unchanged": 18, "deleted": 0, "unreadable": 0}


# ----------------------------------------------------------------------------------- one run's results, one model's

def test_a_new_run_replaces_the_grids_and_results_of_the_last_one(setup, photos, tmp_path, capsys):
    out = tmp_path / "out"
    two = [setup["sketch"], os.path.join(setup["data"], "sketches", "circle", "circle_1.png")]
    retrieve_json(capsys, setup["model"], photos, two, str(out), grids=True)
    assert sorted(os.listdir(out)) == ["gallery_index.pt", "grid_01_star_0.png", "grid_02_circle_1.png",
                                       "results.json"]
    Image.new("RGB", (8, 8)).save(out / "grid_03_interrupted.png")  # a grid of a run stopped before results.json
    (out / "notes.txt").write_text("mine")
    (out / "grid.png").write_bytes(b"not one of retrieve.py's names")
    doc = retrieve_json(capsys, setup["other_model"], photos, [setup["sketch"]], str(out))  # --no-grids
    assert f"removed an earlier run's results.json and 3 grid(s) from {out}" in doc["stderr"]
    assert sorted(os.listdir(out)) == ["gallery_index.pt", "grid.png", "notes.txt", "results.json"]
    with open(out / "results.json") as f:
        saved = json.load(f)
    assert saved["model"] == setup["other_model"] and [q["query"] for q in saved["queries"]] == [setup["sketch"]]
    doc = retrieve_json(capsys, setup["model"], photos, [setup["sketch"]], str(out), grids=True)
    assert "removed an earlier run's results.json and 0 grid(s)" in doc["stderr"]
    assert doc["queries"][0]["grid"] == str(out / "grid_01_star_0.png") and (out / "grid_01_star_0.png").is_file()


def test_results_name_the_model_by_its_weights(setup, photos, tmp_path, capsys):
    docs = {name: retrieve_json(capsys, setup[name], photos, [setup["sketch"]], str(tmp_path / name))
            for name in ("model", "other_model")}
    for name, doc in docs.items():
        ckpt = utils.load_checkpoint(setup[name])
        fingerprint = utils.model_fingerprint(ckpt)
        assert doc["format"] == gallery.RESULTS_FORMAT and doc["model"] == setup[name]
        assert (doc["model_fingerprint"], doc["model_epoch"], doc["model_step"]) == (fingerprint, 0, 0)
        assert doc["precision"] == "float32"  # the CPU computes in float32, --amp or not
        assert f"model {setup[name]}: resnet18, 16-d, 32px, trained 0 epoch(s), fingerprint {fingerprint[:12]}; " \
               "embeddings in float32" in doc["stderr"]
    assert docs["model"]["model_fingerprint"] != docs["other_model"]["model_fingerprint"]  # seeds 0 and 1


def test_an_index_of_another_precision_is_rebuilt_not_extended(tmp_path, monkeypatch, capsys):
    assert gallery.EmbedSettings(32, 8, 0, torch.device("cpu"), True).precision == "float32"
    monkeypatch.setattr(utils, "amp_dtype", lambda device, amp: torch.bfloat16 if amp else None)
    assert gallery.EmbedSettings(32, 8, 0, torch.device("cpu"), True).precision == "bfloat16"
    files = [(f"{i}.png", 10, 1) for i in range(3)]
    path, root = str(tmp_path / "index.pt"), str(tmp_path)

    def embed(paths):
        return torch.ones(len(paths), 4), torch.ones(len(paths), dtype=torch.bool), False

    gallery.update_index(None, path, root, files, "model-a", "bfloat16", embed)
    more = files + [("3.png", 10, 1)]
    capsys.readouterr()
    index, counts = gallery.update_index(gallery.load_index(path), path, root, more, "model-a", "float32", embed)
    assert f"index {path} holds bfloat16 embeddings and this run computes in float32 (--amp on a GPU or not); " \
           "rebuilding" in capsys.readouterr().out
    assert (counts["embedded"], counts["unchanged"]) == (4, 0) and index_of(path)["precision"] == "float32"
    index, counts = gallery.update_index(gallery.load_index(path), path, root, more, "model-a", "float32", embed)
    assert (counts["embedded"], counts["unchanged"]) == (0, 4)
    older = index_of(path)
    del older["precision"]  # an index written before the precision was recorded
    torch.save(older, path)
    index, counts = gallery.update_index(gallery.load_index(path), path, root, more, "model-a", "float32", embed)
    assert "does not record the precision of its embeddings" in capsys.readouterr().out and counts["embedded"] == 4


def test_earlier_results_inside_the_gallery_are_not_searched(setup, photos, tmp_path, capsys):
    index = str(tmp_path / "index.pt")
    retrieve_json(capsys, setup["model"], photos, [setup["sketch"]], os.path.join(photos, "run_a"), "--index", index,
                  grids=True)
    legacy = os.path.join(photos, "cat", "old_run")  # results.json as retrieve.py wrote it before it had "format"
    os.makedirs(legacy)
    Image.new("RGB", (32, 32), "white").save(os.path.join(legacy, "grid_01_x.png"))
    with open(os.path.join(legacy, "results.json"), "w") as f:
        json.dump({"model": "m.pth", "gallery": photos, "index": index, "queries": []}, f)
    own = os.path.join(photos, "cat", "scores")  # someone else's results.json: a folder of photos like any other
    os.makedirs(own)
    Image.new("RGB", (32, 32), "white").save(os.path.join(own, "photo.png"))
    with open(os.path.join(own, "results.json"), "w") as f:
        json.dump({"accuracy": 0.5}, f)
    doc = retrieve_json(capsys, setup["model"], photos, [setup["sketch"]], os.path.join(photos, "run_b"),
                        "--index", index, "--topk", "30", grids=True)
    assert "left out 2 folder(s) of retrieve.py results inside the gallery (their grids are not photos): " \
           f"{os.path.join('cat', 'old_run')}, run_a" in doc["stderr"]
    assert doc["skipped_folders"] == [os.path.join("cat", "old_run"), "run_a"]
    assert doc["index_counts"]["images"] == 19  # 18 photos and scores/photo.png
    assert not any("run_" in hit["path"] or "old_run" in hit["path"] for hit in doc["queries"][0]["results"])


# ----------------------------------------------------------------------------------- faiss

@needs_faiss
def test_faiss_ivf_visiting_every_list_is_exact(monkeypatch):
    monkeypatch.setattr(retrieve, "FAISS_FLAT_BELOW", 100)
    gen = torch.Generator().manual_seed(0)
    g = torch.nn.functional.normalize(torch.randn(2500, 16, generator=gen), dim=1)
    q = torch.nn.functional.normalize(torch.randn(5, 16, generator=gen), dim=1)
    built = gallery.faiss_index(faiss, g)
    assert isinstance(built, faiss.IndexIVFFlat) and built.nlist == 50
    scores, rows = gallery.faiss_search(built, q, 10, nprobe=50)
    ref_scores, _ = gallery.search(q, g, 10)
    # both are float32 inner products of D = 16 terms of unit vectors, each within D u32 of the exact one, in
    # other summation orders (faiss's kernels, torch's BLAS): the exact top 10, near-ties in either order
    assert torch.allclose(scores, ref_scores, rtol=0, atol=2 * 16 * U32)
    assert_top_k_within(scores, rows, q.double() @ g.double().T, 16 * U32)


@needs_faiss
def test_cli_faiss_ranks_like_exact_and_caches_its_index(setup, photos, tmp_path, capsys):
    exact = retrieve_json(capsys, setup["model"], photos, [setup["sketch"]], str(tmp_path / "out"))
    approx = retrieve_json(capsys, setup["model"], photos, [setup["sketch"]], str(tmp_path / "out"), "--faiss")
    assert "built the faiss index" in approx["stderr"] and approx["search"] == "faiss"
    # small gallery: flat, exact; faiss and torch sum each 16-d unit dot product in other orders (D u32 each)
    assert_ranked_alike(ranking(approx), ranking(exact), 2 * 16 * U32)
    again = retrieve_json(capsys, setup["model"], photos, [setup["sketch"]], str(tmp_path / "out"), "--faiss")
    assert "built the faiss index" not in again["stderr"] and ranking(again) == ranking(approx)


# ----------------------------------------------------------------------------------- bad input

def run_cli_cases(*cases) -> list:
    """Run retrieve.py's command line (its __main__ block, argument parsing and exit code) once per argument list."""
    return [run_main("retrieve.py", *argv) for argv in cases]


def test_cli_bad_input_one_line_each(setup, photos, tmp_path):
    (tmp_path / "sketch.png").write_text("this is text")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.txt").write_text("no photos here")
    (tmp_path / "model.pth").write_bytes(b"\x00" * 100)
    (tmp_path / "precious.pt").write_bytes(b"user data")
    good = {"--model": setup["model"], "--gallery": photos, "--query": setup["sketch"], "--workers": "0",
            "--device": "cpu", "--output": str(tmp_path / "out")}  # the older name of --output_dir
    expected = [  # (changed arguments, fragments of the one error line)
        ({"--query": str(tmp_path / "none.png")}, ("query sketch", "none.png not found")),
        ({"--query": str(tmp_path / "sketch.png")}, ("cannot read query sketch", "sketch.png")),
        ({"--gallery": str(tmp_path / "empty")}, ("empty holds no image files",)),
        ({"--gallery": str(tmp_path / "empty" / "readme.txt")}, ("readme.txt is not a folder",)),
        ({"--gallery": str(tmp_path / "nowhere")}, ("nowhere does not exist",)),
        ({"--model": str(tmp_path / "model.pth")}, ("model.pth is not a readable checkpoint",)),
        ({"--model": str(tmp_path / "none.pth")}, ("none.pth not found",)),
        ({"--index": str(tmp_path / "precious.pt")}, ("precious.pt is not a readable gallery index",)),
        ({"--topk": "0"}, ("--topk must be at least 1",)),
        ({"--output": photos}, ("is the gallery folder",)),
    ]
    if faiss is None:
        expected.append(({"--faiss": None}, ("--faiss needs the faiss package (pip install faiss-cpu)",)))
    cases = [[x for key, value in {**good, **change}.items() for x in ((key,) if value is None else (key, value))]
             for change, _ in expected]
    for (change, fragments), proc in zip(expected, run_cli_cases(*cases)):
        assert_one_line_error(proc, *fragments)
    assert (tmp_path / "precious.pt").read_bytes() == b"user data"  # never overwritten
    assert not (tmp_path / "out").exists()  # the inputs are checked before anything is written


def test_output_dir_and_its_older_name_output_are_one_flag():
    parser = retrieve.get_args_parser()
    required = ["--model", "m", "--gallery", "g", "--query", "q"]
    assert parser.parse_args([*required, "--output_dir", "o1"]).output_dir == "o1"
    assert parser.parse_args([*required, "--output", "o2"]).output_dir == "o2"
    assert not hasattr(parser.parse_args([*required, "--output", "o2"]), "output")  # one setting, not two
    assert "--output_dir OUTPUT_DIR, --output OUTPUT_DIR" in parser.format_help()


def test_bench_retrieve_data_dir_and_its_older_name_data_are_one_flag():
    parser = bench_parser("bench_retrieve")
    assert parser.parse_args(["--data_dir", "d1"]).data_dir == "d1"
    assert parser.parse_args(["--data", "d2"]).data_dir == "d2"
    assert not hasattr(parser.parse_args(["--data", "d2"]), "data")  # one setting, not two
    assert "--data_dir DATA_DIR, --data DATA_DIR" in parser.format_help()


def test_a_retrieval_grid_shows_the_query_and_each_hit_framed_by_its_truth(tmp_path):
    """save_retrieval_grid: the query, then the hits in rows of per_row, each photo in its square inside a frame of
    its colour (green right, red wrong, none without a truth); a photo gone since it was ranked is "unreadable"."""
    red, blue = str(tmp_path / "red.png"), str(tmp_path / "blue.png")
    Image.new("RGB", (40, 20), (200, 0, 0)).save(red)
    Image.new("RGB", (20, 20), (0, 0, 200)).save(blue)
    hits = [(red, "1. a\n0.9", "green"), (blue, "2. b\n0.8", "red"), (str(tmp_path / "gone.png"), "3. c", None)]
    out = str(tmp_path / "grid.png")
    utils.save_retrieval_grid(Image.new("RGB", (30, 30), "black"), "query: a", hits, out, per_row=2)
    grid = np.asarray(Image.open(out).convert("RGB")).astype(int)
    tile, gap = utils.GRID_TILE, utils.GRID_GAP
    rows, cols = utils.GRID_TEXT * 2 + 14 + tile + gap, tile + gap  # two rows of two squares beside the query
    assert grid.shape == (2 * rows + gap, tile + 4 * gap + 2 * cols + gap, 3)

    def square(row, col):  # a hit's square: its top-left corner (x0, y0)
        return tile + 4 * gap + col * cols, gap + row * rows + rows - tile - gap

    for (row, col), frame, inside in (((0, 0), (0, 128, 0), (200, 0, 0)), ((0, 1), (255, 0, 0), (0, 0, 200))):
        x, y = square(row, col)
        assert tuple(grid[y + 1, x + tile // 2]) == frame and tuple(grid[y + tile - 2, x + 2]) == frame
        assert tuple(grid[y + tile // 2, x + tile // 2]) == inside
    x, y = square(1, 0)  # no frame, no photo: white but for the word "unreadable" in the middle
    middle = grid[y + tile // 2 - 8:y + tile // 2 + 8, x:x + tile]
    assert (grid[y:y + 3, x:x + tile] == 255).all() and (middle < 128).any() and (middle[:, :20] == 255).all()
    title = rows - tile - gap  # the query: black, scaled up to a square, centred beside the rows below its title
    top = (grid.shape[0] - tile - title) // 2 + title
    assert (grid[top:top + tile, gap:gap + tile] == 0).all() and (grid[top - 1, gap:gap + tile] != 0).any()
