"""Tests for demo_data.py on a tiny dataset (3 sketches + 3 photos per class, 32 px)."""
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import dataset
import demo_data

TINY = ["--sketches_per_class", "3", "--photos_per_class", "3", "--image_size", "32"]


def generate(out, *extra):
    args = demo_data.get_args_parser().parse_args(["--output_dir", str(out), *TINY, *extra])
    demo_data.main(args)
    return Path(out)


def digests(root):
    """{relative path: sha1} of every image, label and embedding file (not the marker)."""
    return {str(p.relative_to(root)): hashlib.sha1(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and p.name != demo_data.MARKER}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return generate(tmp_path_factory.mktemp("data") / "demo", "--workers", "1")


def read_labels(path):
    return path.read_text().splitlines()


def test_output_dir_and_its_older_name_out_are_one_flag():
    parser = demo_data.get_args_parser()
    assert parser.parse_args(["--output_dir", "o1"]).output_dir == "o1"
    assert parser.parse_args(["--out", "o2"]).output_dir == "o2"
    assert not hasattr(parser.parse_args(["--out", "o2"]), "out")  # one setting, not two
    assert "--output_dir OUTPUT_DIR, --out OUTPUT_DIR" in parser.format_help()


def test_defaults_match_usage():
    args = demo_data.get_args_parser().parse_args(["--out", "x"])
    assert (args.seed, args.image_size, args.sketches_per_class, args.photos_per_class,
            args.workers) == (0, 64, 60, 60, 2)


def test_layout_and_counts(tiny):
    train, test = read_labels(tiny / "train_labels.txt"), read_labels(tiny / "test_labels.txt")
    classes = sorted(train + test)
    for domain, ext, mode in (("sketches", "png", "L"), ("photos", "jpg", "RGB")):
        assert sorted(p.name for p in (tiny / domain).iterdir()) == classes
        for c in classes:
            files = sorted(p.name for p in (tiny / domain / c).iterdir())
            suffix = "-1" if domain == "sketches" else ""  # sketch <c>_0000-1.png pairs with photo <c>_0000.jpg
            assert files == [f"{c}_{i:04d}{suffix}.{ext}" for i in range(3)]
        with Image.open(tiny / domain / classes[0] / f"{classes[0]}_0000{suffix}.{ext}") as im:
            assert (im.mode, im.size) == (mode, (32, 32))
    marker = json.loads((tiny / demo_data.MARKER).read_text())
    assert marker["image_size"] == 32 and marker["seed"] == 0
    assert not [p for p in tiny.parent.iterdir() if p.name.startswith(".demo.")]


def test_labels_split(tiny):
    train, test = read_labels(tiny / "train_labels.txt"), read_labels(tiny / "test_labels.txt")
    assert train == sorted(train) and test == sorted(test)
    assert not set(train) & set(test)
    assert len(train) + len(test) >= 40 and len(test) >= 10
    assert test == sorted(demo_data.UNSEEN)
    assert sorted(train + test) == demo_data.class_names()


def test_embeddings_aligned_and_normalised(tiny):
    dims = set()
    for split in ("train", "test"):
        emb = np.load(tiny / f"{split}_embeddings.npy")
        labels = read_labels(tiny / f"{split}_labels.txt")
        assert emb.dtype == np.float32 and emb.shape[0] == len(labels)
        # normalised in float32: the norm of D terms is within (D + 2) u32 of 1
        np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1, rtol=0, atol=(emb.shape[1] + 2) * 2.0 ** -24)
        np.testing.assert_array_equal(emb, demo_data.class_embeddings(labels))
        dims.add(emb.shape[1])
    assert len(dims) == 1


def test_embeddings_reflect_shape_similarity():
    names = demo_data.class_names()
    emb = demo_data.class_embeddings(names)
    sim = emb @ emb.T
    assert sim[np.triu_indices(len(names), 1)].max() < 0.9999  # every class distinct

    def s(a, b):
        return sim[names.index(a), names.index(b)]

    assert s("hexagon", "pentagon") > s("hexagon", "arrow_thin")
    assert s("hexagon", "pentagon") > s("hexagon", "star6")
    assert s("star5", "star4") > s("star5", "letter_l")
    assert s("ellipse", "circle") > s("ellipse", "square")
    for c in demo_data.UNSEEN:  # each unseen class has a seen class of its own family
        family = demo_data.class_table()[c][0]
        assert any(demo_data.class_table()[o][0] == family for o in names
                   if o not in demo_data.UNSEEN)


def test_deterministic_across_workers_and_seed_sensitive(tiny, tmp_path):
    reference = digests(tiny)
    again = generate(tmp_path / "again", "--workers", "2")
    assert digests(again) == reference
    other = digests(generate(tmp_path / "other", "--seed", "1", "--workers", "1"))
    images = [k for k in other if k.endswith((".png", ".jpg"))]
    assert len(images) == 2 * 3 * len(demo_data.class_names())
    assert all(other[k] != reference[k] for k in images)
    assert other["train_embeddings.npy"] == reference["train_embeddings.npy"]


def test_domains_look_different(tiny):
    sketches = [np.asarray(Image.open(p), np.float32) for p in tiny.glob("sketches/*/*.png")]
    photos = [np.asarray(Image.open(p), np.float32) for p in tiny.glob("photos/*/*.jpg")]
    assert all(s.mean() > 200 for s in sketches)  # mostly white ...
    assert all(s.min() < 150 for s in sketches)  # ... with dark strokes
    colour = [p.std(axis=2).mean() for p in photos]  # spread of R, G, B at each pixel
    assert np.mean(colour) > 15 and min(colour) > 3
    assert np.mean([p.mean() for p in photos]) < 180


def test_refuses_foreign_folder(tmp_path, capsys):
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(SystemExit) as exc:
        generate(foreign)
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert "not a demo dataset" in err and len(err.splitlines()) == 1
    assert [p.name for p in foreign.iterdir()] == ["notes.txt"]
    assert (foreign / "notes.txt").read_text() == "keep me"
    assert [p.name for p in tmp_path.iterdir()] == ["mine"]


def test_bad_argument_exits_2(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        generate(tmp_path / "x", "--image_size", "8")
    assert exc.value.code == 2 and "--image_size" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_replaces_previous_demo_dataset(tmp_path, capsys):
    out = generate(tmp_path / "demo", "--workers", "1")
    (out / "sketches" / "circle" / "stray.png").write_bytes(b"old")
    capsys.readouterr()
    args = demo_data.get_args_parser().parse_args(
        ["--out", str(out), "--sketches_per_class", "2", "--photos_per_class", "1",  # --output_dir's older name
         "--image_size", "32", "--workers", "1"])
    demo_data.main(args)
    assert sorted(p.name for p in (out / "sketches" / "circle").iterdir()) == [
        "circle_0000-1.png", "circle_0000-2.png"]  # two sketches drawn from the one photo circle_0000.jpg
    assert len(list(out.glob("photos/*/*.jpg"))) == len(demo_data.class_names())
    assert [p.name for p in tmp_path.iterdir()] == ["demo"]  # no temp folders left behind
    n = len(demo_data.class_names())
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 1 and f"{n} classes (" in lines[0]
    assert f"{2 * n} sketches, {n} photos" in lines[0]


def test_sketches_are_named_after_their_photos_the_way_sketchy_is(tiny):
    """Every sketch pairs with one photo by evaluate.py --task fg's rule (dataset.instance_pairs)."""
    classes = read_labels(tiny / "test_labels.txt")
    by = {d: {c: sorted(str(p) for p in (tiny / d / c).iterdir()) for c in classes} for d in ("sketches", "photos")}
    pairs, counts = dataset.instance_pairs(by["sketches"], by["photos"], classes)
    assert counts == {"sketches_without_photo": 0, "photos_without_sketch": 0}
    assert [(Path(s).name, Path(p).name) for s, p in pairs[classes[0]]] == [
        (f"{classes[0]}_{i:04d}-1.png", f"{classes[0]}_{i:04d}.jpg") for i in range(3)]
    # More sketches than photos: ceil(S / P) a photo, in file-name order; fewer: photos without a sketch.
    assert [demo_data.sketch_file_name("c", i, 5, 2) for i in range(5)] == [
        "c_0000-1.png", "c_0000-2.png", "c_0000-3.png", "c_0001-1.png", "c_0001-2.png"]
    assert [demo_data.sketch_file_name("c", i, 2, 5) for i in range(2)] == ["c_0000-1.png", "c_0001-1.png"]


def test_traced_pairs_draw_each_sketch_in_its_photos_pose(tiny, tmp_path):
    """--traced_pairs (the default) draws each sketch's strokes on its photo's silhouette; --no-traced_pairs keeps
    every photo and draws each sketch in a pose of its own."""
    traced, untraced = tiny, generate(tmp_path / "untraced", "--workers", "1", "--no-traced_pairs")
    a, b = digests(untraced), digests(traced)
    assert {k: v for k, v in a.items() if k.startswith("photos/")} == {k: v for k, v in b.items()
                                                                        if k.startswith("photos/")}
    assert all(a[k] != b[k] for k in a if k.startswith("sketches/"))
    size, gaps = 32, {"untraced": [], "traced": []}
    for c in demo_data.class_names():
        for i in range(3):
            pose = demo_data.photo_pose(c, demo_data.image_rng(0, c, demo_data.PHOTO, i), size)
            outline = np.concatenate([pose(p) for p, _ in demo_data.canonical_shape(c)]) / demo_data.SUPERSAMPLE
            centre = (outline.min(0) + outline.max(0)) / 2  # the photo's silhouette box, in output pixels
            for name, root in (("untraced", untraced), ("traced", traced)):
                ink = np.asarray(Image.open(root / "sketches" / c / f"{c}_{i:04d}-1.png")) < 128
                ys, xs = np.nonzero(ink)
                box = np.array([(xs.min() + xs.max() + 1) / 2, (ys.min() + ys.max() + 1) / 2])
                gaps[name].append(np.abs(box - centre).max())
    # Traced strokes sit on the photo's silhouette (within stroke width and wobble); untraced ones wander.
    assert np.median(gaps["traced"]) < 1.5 < np.median(gaps["untraced"])


def test_cross_dataset_holds_the_unseen_classes_and_ten_seen_ones_named_and_drawn_anew(tiny, tmp_path):
    """--cross_dataset: the demo's 10 unseen classes and 10 of its seen ones, in Title Case; by normalised name
    10 classes are the demo's seen ones (a demo model leaves them out), and no image is one of the demo's."""
    cross = generate(tmp_path / "cross", "--workers", "1", "--cross_dataset")
    names = read_labels(cross / "train_labels.txt") + read_labels(cross / "test_labels.txt")
    assert len(names) == 20 and "Arrow Thin" in names and "Star5" in names
    seen, unseen = demo_data.seen_unseen()
    normal = {dataset.normalise_class_name(c): c for c in names}
    assert {dataset.normalise_class_name(c) for c in unseen} <= set(normal)
    assert len(set(normal) & {dataset.normalise_class_name(c) for c in seen}) == 10
    assert sorted(p.name for p in (cross / "sketches").iterdir()) == sorted(names)
    demo = set(digests(tiny).values())
    images = {k: v for k, v in digests(cross).items() if k.endswith((".png", ".jpg"))}
    assert len(images) == 2 * 3 * 20 and not demo & set(images.values())
