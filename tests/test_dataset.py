"""dataset.py: image modes, layout checks, the seen-class hold-out, training batches, the image store and disk cache."""
import os
from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image

import dataset as D
from conftest import make_tiny_dataset

RED = (255, 0, 0)


def _red_square(mode: str) -> Image.Image:
    """A 16x16 image in ``mode``: a red (or dark) square in the middle of a white background."""
    rgb = Image.new("RGB", (16, 16), "white")
    rgb.paste(RED, (4, 4, 12, 12))
    return rgb.convert(mode)


@pytest.mark.parametrize("mode,ext", [("RGB", ".png"), ("RGB", ".JPEG"), ("L", ".png"), ("P", ".png"),
                                      ("P", ".gif"), ("CMYK", ".jpg"), ("RGB", ".Jpg"), ("RGB", ".bmp"),
                                      ("RGB", ".webp"), ("1", ".png"), ("L", ".tif")])
def test_load_image_any_mode_gives_the_same_rgb(tmp_path, mode, ext):
    path = str(tmp_path / f"img{ext}")
    im = _red_square(mode)
    lossy = ext.lower() in (".jpg", ".jpeg")
    im.save(path, **({"quality": 100} if lossy else {"lossless": True} if ext == ".webp" else {}))
    out = D.load_image(path)
    assert out.mode == "RGB" and out.size == (16, 16)
    arr = np.asarray(out).astype(int)
    expected = np.asarray(im.convert("RGB")).astype(int)
    if lossy:  # compare away from the square's edges, where JPEG's chroma subsampling blurs
        assert np.abs(arr[7:9, 7:9] - expected[7:9, 7:9]).max() <= 40
        assert np.abs(arr[0:2, 0:2] - expected[0:2, 0:2]).max() <= 12
    else:
        assert np.array_equal(arr, expected)
    assert arr[0, 0].min() >= 240  # white background stays white


@pytest.mark.parametrize("mode", ["RGBA", "LA"])
def test_transparency_is_composited_onto_white(tmp_path, mode):
    rgba = Image.new("RGBA", (16, 16), (0, 0, 0, 0))  # transparent black everywhere ...
    rgba.paste((20, 20, 20, 255), (4, 4, 12, 12))     # ... but an opaque dark square
    path = str(tmp_path / "t.png")
    rgba.convert(mode).save(path)
    arr = np.asarray(D.load_image(path)).astype(int)
    assert (arr[0, 0] == 255).all()          # transparent -> white, not black
    assert arr[8, 8].max() <= 30             # opaque stroke kept


def test_palette_with_transparent_index_and_16_bit_grey(tmp_path):
    p = Image.new("P", (8, 8), 0)
    p.putpalette([0, 0, 0, 200, 0, 0] + [0] * 762)
    p.paste(1, (2, 2, 6, 6))
    p.save(tmp_path / "p.png", transparency=0)
    arr = np.asarray(D.load_image(str(tmp_path / "p.png"))).astype(int)
    assert tuple(arr[0, 0]) == (255, 255, 255) and tuple(arr[4, 4]) == (200, 0, 0)

    grey16 = np.full((8, 8), 65535, dtype=np.uint16)
    grey16[2:6, 2:6] = 32768
    Image.fromarray(grey16).save(tmp_path / "g16.png")
    with Image.open(tmp_path / "g16.png") as im:
        assert im.mode.startswith("I")  # really a 16-bit file
    arr = np.asarray(D.load_image(str(tmp_path / "g16.png"))).astype(int)
    assert tuple(arr[0, 0]) == (255, 255, 255) and abs(int(arr[4, 4, 0]) - 128) <= 1


def test_scan_lists_images_case_insensitively_and_ignores_other_files(tiny_data):
    folder = os.path.join(tiny_data, "photos", "tri")
    _red_square("RGB").save(os.path.join(folder, "upper.JPEG"))
    open(os.path.join(folder, "notes.txt"), "w").write("not an image")
    data = D.scan_dataset(tiny_data)
    assert data.seen == ["tri", "square", "pent", "hexa"] and data.unseen == ["circle", "star"]
    assert os.path.join(folder, "upper.JPEG") in data.photos["tri"]
    assert len(data.photos["tri"]) == 7 and len(data.sketches["tri"]) == 6
    assert data.skipped == [] and data.train_embeddings is None


def _message(excinfo) -> str:
    msg = str(excinfo.value)
    assert "\n" not in msg
    return msg


def test_missing_data_folder(tmp_path):
    with pytest.raises(D.DataError) as e:
        D.scan_dataset(str(tmp_path / "nope"))
    assert "does not exist" in _message(e) and "download_data.sh" in _message(e)


def test_missing_label_file(tiny_data):
    os.remove(os.path.join(tiny_data, "test_labels.txt"))
    with pytest.raises(D.DataError) as e:
        D.scan_dataset(tiny_data)
    assert "test_labels.txt not found" in _message(e)


def test_class_in_label_file_without_folder(tiny_data):
    with open(os.path.join(tiny_data, "test_labels.txt"), "a") as f:
        f.write("zebra\n")
    with pytest.raises(D.DataError) as e:
        D.scan_dataset(tiny_data)
    assert "'zebra'" in _message(e) and "does not exist" in _message(e)


def test_class_in_both_label_files(tiny_data):
    with open(os.path.join(tiny_data, "test_labels.txt"), "a") as f:
        f.write("tri\n")
    with pytest.raises(D.DataError) as e:
        D.scan_dataset(tiny_data)
    assert "'tri' is in both" in _message(e)


def test_empty_class_folder(tiny_data):
    folder = os.path.join(tiny_data, "sketches", "star")
    for f in os.listdir(folder):
        os.remove(os.path.join(folder, f))
    with pytest.raises(D.DataError) as e:
        D.scan_dataset(tiny_data)
    assert "holds no readable image" in _message(e)


def test_corrupt_images_are_skipped_and_recorded(tiny_data):
    bad = os.path.join(tiny_data, "photos", "hexa", "broken.png")
    with open(bad, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n garbage")
    truncated = os.path.join(tiny_data, "sketches", "tri", "truncated.png")
    good = open(os.path.join(tiny_data, "sketches", "tri", "tri_0.png"), "rb").read()
    with open(truncated, "wb") as f:
        f.write(good[: len(good) // 2])
    data = D.scan_dataset(tiny_data)
    assert sorted(data.skipped) == sorted([bad, truncated])
    assert bad not in data.photos["hexa"] and len(data.photos["hexa"]) == 6


def test_class_embeddings_must_align_with_labels(tiny_data):
    np.save(os.path.join(tiny_data, "train_embeddings.npy"), np.ones((4, 5), np.float32))
    assert D.scan_dataset(tiny_data).train_embeddings.shape == (4, 5)
    np.save(os.path.join(tiny_data, "train_embeddings.npy"), np.ones((3, 5), np.float32))
    with pytest.raises(D.DataError) as e:
        D.scan_dataset(tiny_data)
    assert "(4, E)" in _message(e)


def test_split_seen_is_seeded_disjoint_and_keeps_training_images(tiny_data):
    data = D.scan_dataset(tiny_data)
    train, val = D.split_seen(data, 0.34, seed=0)
    train2, val2 = D.split_seen(data, 0.34, seed=0)
    assert train == train2 and val == val2
    for domain in ("sketches", "photos"):
        everything = sum(len(getattr(data, domain)[c]) for c in data.seen)
        assert sum(map(len, val[domain].values())) == round(0.34 * everything)  # a fraction of the pool
        for c in data.seen:
            assert len(train[domain][c]) >= 1
            assert set(val[domain][c]).isdisjoint(train[domain][c])
            assert sorted(val[domain][c] + train[domain][c]) == getattr(data, domain)[c]
        assert set(val[domain]) == set(data.seen)  # unseen classes never enter the hold-out
    _, none = D.split_seen(data, 0.0)
    assert all(len(v) == 0 for v in none["sketches"].values())


def test_split_seen_holds_out_a_fraction_of_small_classes_and_never_their_last_image(tmp_path):
    """Two images per class: a tenth of the pool is held out (not one per class), never a class's only image."""
    root = make_tiny_dataset(str(tmp_path / "d"), seen=tuple("abcdefghij"), per_class=2)
    data = D.scan_dataset(root)
    train, val = D.split_seen(data, 0.1)
    assert sum(map(len, val["sketches"].values())) == 2  # round(0.1 * 20)
    assert all(len(v) >= 1 for v in train["sketches"].values())
    train, val = D.split_seen(data, 0.9)  # asks for 18 of 20, but every class keeps one: 10
    assert all(len(v) == 1 for v in train["photos"].values()) and sum(map(len, val["photos"].values())) == 10


def _triplets(ds, epochs=40):
    """(sketch path, positive path, negative path, class, negative class) of every triplet of these epochs."""
    out = []
    for e in range(epochs):
        (anchors, pos, neg), (c, n) = ds.plan(e)
        out += [(ds.store.items[a][0], ds.store.items[p][0], ds.store.items[q][0], ci, ni)
                for a, p, q, ci, ni in zip(anchors.ravel(), pos.ravel(), neg.ravel(), c.ravel(), n.ravel())]
    return out


def test_triplet_batches_positive_same_class_negative_other_class_balanced(tmp_path):
    root = make_tiny_dataset(str(tmp_path / "d"), seen=("a", "b", "c", "d", "e"), per_class=4)
    data = D.scan_dataset(root)
    train, _ = D.split_seen(data, 0.0)
    ds = D.TripletBatches(train, data.seen, image_size=32, batch_size=4, seed=1)
    assert len(ds) == 5 and len({t[0] for t in _triplets(ds, epochs=1)}) == 20  # every sketch once per epoch
    triplets = _triplets(ds)
    cls_of = {p: c for c in data.seen for p in data.photos[c]}
    neg_counts = Counter()
    for sketch, pos, neg, c, n in triplets:
        assert os.path.basename(os.path.dirname(sketch)) == data.seen[c]
        assert cls_of[pos] == data.seen[c]          # positive: a photo of the anchor's class
        assert cls_of[neg] == data.seen[n] != data.seen[c]  # negative: a photo of another class
        neg_counts[(c, n)] += 1
    # uniform over the 4 other classes: each (anchor class, negative class) pair ~ 1/4 of 160 draws
    for c in range(5):
        counts = np.array([neg_counts[(c, n)] for n in range(5) if n != c])
        expected = counts.sum() / 4
        chi2 = ((counts - expected) ** 2 / expected).sum()
        assert chi2 < 16.3, counts  # chi-square, 3 dof, p = 0.001
    # every photo of a class is used as a positive
    assert {pos for _, pos, _, _, _ in triplets} == set(cls_of)


def test_semantic_negatives_prefer_closer_classes(tmp_path):
    root = make_tiny_dataset(str(tmp_path / "d"), seen=("a", "b", "c"), per_class=4)
    data = D.scan_dataset(root)
    train, _ = D.split_seen(data, 0.0)
    emb = np.array([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0]])  # a is close to b, far from c
    probs = D.negative_class_probs(3, emb, temperature=0.2)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0)
    assert np.all(np.diag(probs) == 0) and probs[0, 1] > 0.9
    ds = D.TripletBatches(train, data.seen, 32, 4, negatives=probs)
    negs = Counter(n for _, _, _, c, n in _triplets(ds, epochs=50) if c == 0)
    assert negs[1] > 5 * negs[2]


def test_triplet_batches_depend_on_seed_and_epoch_only_and_split_rows_between_processes(tiny_data):
    data = D.scan_dataset(tiny_data)
    train, _ = D.split_seen(data, 0.0)
    a = D.TripletBatches(train, data.seen, 32, 4, seed=3)
    b = D.TripletBatches(train, data.seen, 32, 4, seed=3)
    b[(1, 0)]
    assert _triplets(a, 2) == _triplets(b, 2)
    assert _triplets(a, 1) != _triplets(a, 2)[len(_triplets(a, 1)):]  # epoch 1 differs from epoch 0
    s, p, n, c, k = b[(0, 1)]
    assert s.shape == p.shape == n.shape == (4, 3, 32, 32) and s.dtype == torch.uint8 and (c != k).all()
    half = D.TripletBatches(train, data.seen, 32, 4, seed=3, shard=(1, 2))
    assert all(torch.equal(x, y[2:]) for x, y in zip(half[(0, 1)], b[(0, 1)]))


# ----------------------------------------------------------------------------------- paired batches

def test_edge_map_draws_the_outline_of_a_filled_shape():
    im = Image.new("RGB", (32, 32), "white")
    im.paste((200, 30, 30), (8, 8, 24, 24))
    edges = np.asarray(D.edge_map(im).convert("L"))
    assert edges[16, 16] == 255 and edges[2, 2] == 255          # flat areas stay white
    assert edges[16, 8] < 128 and edges[8, 16] < 128             # the square's border is dark ink
    assert np.asarray(D.edge_map(Image.new("RGB", (8, 8), "white"))).min() == 255  # no edge, no ink


def test_paired_batches_are_one_pass_over_the_photos_with_partners_of_the_same_class(tmp_path):
    root = make_tiny_dataset(str(tmp_path / "d"), seen=("a", "b", "c", "d", "e"), per_class=4)
    data = D.scan_dataset(root)
    train, _ = D.split_seen(data, 0.0)
    pb = D.PairedBatches(train, data.seen, 32, batch_size=5, edge_maps=True, seed=3)
    (partners, photos), (labels,) = pb.plan(0)
    photos = photos - len(pb.pool)  # the store holds the pool, then the photos
    assert photos.shape == (4, 5) and len(set(photos.ravel())) == 20  # every photo once per epoch
    assert np.array_equal(labels, pb.labels[photos])
    for ph, pa in zip(photos.ravel(), partners.ravel()):
        path, edges = pb.pool[pa]
        cls = os.path.basename(os.path.dirname(path))
        assert cls == data.seen[pb.labels[ph]]                     # the partner is of the photo's class
    kinds = Counter(pb.pool[k][1] for e in range(30) for k in pb.plan(e)[0][0].ravel())
    assert 0.35 < kinds[True] / sum(kinds.values()) < 0.65        # 4 sketches + 4 edge maps per class: half each
    assert np.array_equal(pb.plan(0)[0][1], photos + len(pb.pool))
    assert not np.array_equal(pb.plan(1)[0][1], pb.plan(0)[0][1])
    s, p, y = pb[(2, 1)]
    assert s.shape == p.shape == (5, 3, 32, 32) and s.dtype == torch.uint8
    assert torch.equal(y, torch.from_numpy(pb.plan(2)[1][0][1]))
    assert torch.equal(p[0], D.load_resized(pb.photos[pb.plan(2)[0][1][1, 0] - len(pb.pool)], 32))
    half = D.PairedBatches(train, data.seen, 32, 4, True, 3, shard=(1, 2))
    full = D.PairedBatches(train, data.seen, 32, 4, True, 3)
    assert all(torch.equal(x, y[2:]) for x, y in zip(half[(0, 0)], full[(0, 0)]))


def test_the_store_gives_the_same_images_from_files_memory_and_the_disk_cache(tmp_path):
    root = make_tiny_dataset(str(tmp_path / "d"), seen=("a", "b", "c"), per_class=3)
    data = D.scan_dataset(root)
    train, _ = D.split_seen(data, 0.0)
    pb = D.PairedBatches(train, data.seen, 32, 3, edge_maps=True, seed=0, root=root)
    keys = [(e, s) for e in range(2) for s in range(len(pb))]
    from_files = [pb[k] for k in keys]
    cache = str(tmp_path / "cache")
    assert D.write_disk_cache(root, pb.store.items, 32, cache) == (len(pb.store), 0)
    assert D.write_disk_cache(root, pb.store.items, 32, cache) == (0, len(pb.store))  # nothing new to write
    assert pb.store.open_disk_cache(cache) == len(pb.store)
    pb.store.items = [("/nonexistent/" + os.path.basename(p), e) for p, e in pb.store.items]  # files are not read
    pb.store.root = "/nonexistent"
    assert all(all(torch.equal(x, y) for x, y in zip(pb[k], f)) for k, f in zip(keys, from_files))
    pb.store.load_memory()
    assert all(all(torch.equal(x, y) for x, y in zip(pb[k], f)) for k, f in zip(keys, from_files))
    npy, index = D.cache_paths(cache, 32)
    assert os.path.getsize(npy) >= len(pb.store) * 3 * 32 * 32
    assert sorted(os.listdir(cache)) == ["32px.json", "32px.npy"]


def test_the_disk_cache_drops_a_changed_file_and_adds_new_items(tmp_path):
    root = make_tiny_dataset(str(tmp_path / "d"), seen=("a", "b"), per_class=2)
    data = D.scan_dataset(root)
    photos = [(p, False) for c in data.seen for p in data.photos[c]]
    cache = str(tmp_path / "cache")
    D.write_disk_cache(root, photos, 32, cache)
    changed = photos[0][0]
    Image.new("RGB", (40, 40), (10, 200, 30)).save(changed)  # another size: the stamp no longer matches
    store = D.ImageStore(photos + [(photos[1][0], True)], 32, root)
    assert store.open_disk_cache(cache) == len(photos) - 1  # neither the changed one nor the edge map

    def image(i):
        return store.get(np.array([i]))[0]

    assert torch.equal(image(0), D.load_resized(changed, 32)) and image(0)[1, 16, 16] == 200  # read from its file
    assert D.write_disk_cache(root, store.items, 32, cache) == (2, len(photos) - 1)
    assert store.open_disk_cache(cache) == len(store)
    assert torch.equal(image(0), D.load_resized(changed, 32))
    assert torch.equal(image(len(photos)), D.load_resized(photos[1][0], 32, True))


def test_the_batch_loader_follows_the_epochs_with_persistent_workers_from_any_step(tiny_data):
    data = D.scan_dataset(tiny_data)
    train, _ = D.split_seen(data, 0.0)
    source = D.TripletBatches(train, data.seen, 32, 4, seed=5)
    loader = D.BatchLoader(source, workers=1, pin_memory=False)
    for epoch, start in ((0, 0), (1, 2), (0, 4)):
        got = list(loader.epoch(epoch, start))
        assert len(got) == len(source) - start
        for s, batch in enumerate(got, start=start):
            assert all(torch.equal(x, y) for x, y in zip(batch, source[(epoch, s)])), (epoch, s)
    first = loader.loader._iterator._workers[0].pid
    next(loader.epoch(1))
    assert loader.loader._iterator._workers[0].pid == first  # the same worker process, epoch after epoch


def test_read_resized_decodes_a_large_jpeg_at_a_reduced_scale(tmp_path):
    im = Image.new("RGB", (256, 200), "white")
    im.paste((0, 0, 0), (0, 0, 128, 200))  # left half black
    im.save(tmp_path / "big.jpg", quality=95)
    with Image.open(tmp_path / "big.jpg") as f:
        assert f.draft(None, (32, 32)) is not None and f.size == (64, 50)  # libjpeg decodes it at 1/4
    out = D.read_resized(str(tmp_path / "big.jpg"), 32)
    arr = np.asarray(out).astype(int)
    assert out.size == (32, 32) and out.mode == "RGB"
    assert arr[:, :14].max() < 40 and arr[:, 18:].min() > 215  # the halves survive, the edge is where it was
    Image.new("L", (20, 60), 0).save(tmp_path / "small.png")  # no reduced decoding; upscaled
    assert D.read_resized(str(tmp_path / "small.png"), 32).size == (32, 32)


def test_augment_without_a_crop_is_the_image_in_0_1_or_its_mirror():
    images = torch.randint(0, 256, (16, 3, 8, 8), dtype=torch.uint8)
    out = D.augment(images, torch.Generator().manual_seed(0), scale=(1.0, 1.0), ratio=(1.0, 1.0))
    plain = images.float() / 255  # the model normalises with its weights' statistics (model.Normalize)
    same = [torch.allclose(o, x, atol=1e-5) for o, x in zip(out, plain)]
    mirrored = [torch.allclose(o, x.flip(-1), atol=1e-5) for o, x in zip(out, plain)]
    assert all(a or b for a, b in zip(same, mirrored)) and any(same) and any(mirrored)
    again = D.augment(images, torch.Generator().manual_seed(0))
    assert torch.equal(again, D.augment(images, torch.Generator().manual_seed(0)))  # seeded: repeatable
    white = torch.full((2, 3, 8, 8), 255, dtype=torch.uint8)
    white[:, :, 3:5, 3:5] = 0
    thick = D.augment(white, torch.Generator().manual_seed(0), (1.0, 1.0), (1.0, 1.0), thicken=1.0)
    thin = D.augment(white, torch.Generator().manual_seed(0), (1.0, 1.0), (1.0, 1.0))
    assert (thick < 0.5).sum() > (thin < 0.5).sum()
