"""Evaluate a trained model: mAP@all, P@100, mAP@200, P@200 under the literature's conventions, plots, grids.

    python evaluate.py --model ckpt/best.pth --data_dir data/sketchy --num_sketches 10 --num_images 5
    python evaluate.py --model ckpt/best.pth --data_dir data/demo --protocol all --save_embeddings emb.pt
    python evaluate.py --embeddings emb.pt --protocol sake          # no model, no images: seconds
    python evaluate.py --model ckpt/best.pth --data_dir data/sketchy --task gzs   # or --task fg (acc@1, acc@5)
    python evaluate.py --model sketchy_ckpt/best.pth --data_dir data/tuberlin     # cross-dataset zero-shot
    python evaluate.py --embeddings emb.pt --hash_bits 64 --itq sem-pcyc   # 64-bit ITQ codes, Hamming ranking

The test split's sketches (unseen classes, DATA/test_labels.txt) query every photo of those classes;
--split val uses the seen-class validation hold-out that train.py selected best.pth on instead.
docs/metrics.md defines the conventions (standard, sake, sem-pcyc, doodle2search, zse-sbir). Writes
to --output_dir: results.json, pr_curve.png, per_class_ap.png and one retrieval grid per random
query sketch (the sketch, then its top --num_images photos, framed green when of the sketch's class).
--task picks the setting (docs/evaluation.md): zs, the above; gzs, generalised (seen-class images join the
queries and the gallery, as SEM-PCYC's src/test.py --gzs_sbir); fg, fine-grained (acc@k of each sketch's own
photo, Sketchy's file-name pairing). With --data_dir another dataset than the model's, the unseen classes
are that dataset's classes the model did not train on (cross-dataset). --hash_bits N scores any of these
on N-bit ITQ binary codes of the embeddings (fitted at evaluation time, --itq picks the variant), ranked
by Hamming distance, instead of on the float embeddings (docs/metrics.md, "Hashed retrieval").
"""
import argparse
import os
import re
import tempfile
import time
from dataclasses import dataclass, field, replace

import numpy as np
import torch
import torch.nn.functional as F

import dataset
import metrics
import utils
from model import PretrainedWeightsUnavailable

EMBEDDINGS_FORMAT = "zs-sbir-embeddings/1"
KS = (100, 200)
TASKS = ("zs", "gzs", "fg")
FG_KS = (1, 5)
SCORED_BY = ("embedding", "relation")  # --score: cosine of embeddings, or a relation network over every pair
RELATION_TOKENS = 256 * 197  # tokens of the sketch-photo pairs scored at once: 256 pairs at 224 px (memory bound)
RELATION_WIDTH = 768  # ZSE-SBIR's token width
ITQ_ITERATIONS, ITQ_SEED = 50, 0  # both papers' code alternates 50 times; the textbook variant's initial rotation


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                parents=[utils.common_parser(64, "images per embedding batch")],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", type=str, default="", help="checkpoint written by train.py (best.pth / last.pth)")
    p.add_argument("--data_dir", "--data", type=str, default="",
                   help="dataset folder (layout: docs/data.md); --data is its older name")
    p.add_argument("--class_split", type=str, default="",
                   help="named zero-shot split under DATA/splits/ (default: the one the model was trained on)")
    p.add_argument("--split", type=str, default="test",
                   help="which images: test, the unseen classes; val, the seen-class validation hold-out used "
                        "for model selection (the classes come from --class_split)")
    p.add_argument("--protocol", type=str, default="all",
                   help=f"metric convention: {', '.join(metrics.PROTOCOLS)}, or all (docs/metrics.md)")
    p.add_argument("--save_embeddings", type=str, default="",
                   help="also store the query and gallery embeddings, labels and paths in this file")
    p.add_argument("--embeddings", type=str, default="",
                   help="evaluate embeddings saved by --save_embeddings (no model or images are loaded)")
    p.add_argument("--num_images", type=int, default=5, help="photos shown per retrieval grid")
    p.add_argument("--num_sketches", type=int, default=10, help="random query sketches drawn as grids")
    p.add_argument("--output_dir", type=str, default="",
                   help="results folder (default: eval/ beside the model, or beside --embeddings)")
    p.add_argument("--compare_untrained", action=argparse.BooleanOptionalAction, default=False,
                   help="also evaluate the same network at its (seeded) initialisation, as a baseline")
    p.add_argument("--seed", type=int, default=0, help="seed for choosing the grid queries")
    p.add_argument("--task", type=str, nargs="+", default=["zs"],
                   help="evaluation setting(s): zs, unseen sketches query unseen photos; gzs, generalised: seen-class "
                        "training images join both sides (SEM-PCYC); fg, fine-grained: acc@1 and acc@5 of each "
                        "sketch's own photo (Sketchy's file-name pairs); several (e.g. zs gzs fg) are evaluated in "
                        "turn, each into its own sub-folder of --output_dir; docs/evaluation.md")
    p.add_argument("--gzs_fraction", type=float, default=dataset.GZS_FRACTION,
                   help="gzs: seen-class sketches (photos) added, as a fraction of the unseen sketches (photos)")
    p.add_argument("--gzs_seed", type=int, default=dataset.GZS_SEED, help="gzs: seed for drawing the seen images")
    p.add_argument("--hash_bits", type=int, nargs="+", default=[0],
                   help="score N-bit ITQ binary codes of the embeddings, ranked by Hamming distance, instead of the "
                        "float embeddings: 0 (off) or a multiple of 8 up to the embedding size (docs/metrics.md); "
                        "several (e.g. 0 64) score each task each way")
    p.add_argument("--itq", type=str, default="textbook",
                   help="--hash_bits' ITQ rotation, both fitted on the query sketches with each side centred on its "
                        "own mean: textbook (the Procrustes optimum) or sem-pcyc (SEM-PCYC's code, to compare with "
                        "its published numbers)")
    p.add_argument("--score", type=str, default="embedding", choices=SCORED_BY,
                   help="how a sketch scores a photo: embedding, the cosine of their embeddings (every model); "
                        "relation, the relation network over every sketch-photo pair (--method zse_sbir models: "
                        "their -r rn; docs/zse_sbir.md gives its cost)")
    p.add_argument("--trained_labels", type=str, default="",
                   help="label file of the classes the model trained on, for a cross-dataset run (default: the "
                        "checkpoint's training data's train_labels.txt)")
    return p


def check_args(args) -> None:
    if args.batch_size < 1:
        raise utils.UserError(f"--batch_size must be at least 1, got {args.batch_size}")
    for name in ("num_images", "num_sketches"):
        if getattr(args, name) < 0:
            raise utils.UserError(f"--{name} must not be negative, got {getattr(args, name)}")
    if args.protocol != "all" and args.protocol not in metrics.PROTOCOLS:
        raise utils.UserError(f"unknown --protocol {args.protocol!r}; choose one of "
                              f"{', '.join(metrics.PROTOCOLS)}, or all")
    args.task, args.hash_bits = list(dict.fromkeys(args.task)), list(dict.fromkeys(args.hash_bits))  # each once
    for task in args.task:
        if task not in TASKS:
            raise utils.UserError(f"unknown --task {task!r}; choose one of {', '.join(TASKS)}")
        if task != "zs" and args.split != "test":
            raise utils.UserError(f"--task {task} evaluates the test split's unseen classes; drop --split {args.split}")
    if args.itq not in metrics.ITQ_VARIANTS:
        raise utils.UserError(f"unknown --itq {args.itq!r}; choose one of {', '.join(metrics.ITQ_VARIANTS)}")
    for bits in args.hash_bits:
        if bits < 0 or bits % 8:
            raise utils.UserError(f"--hash_bits must be 0 (off) or a positive multiple of 8 (codes are packed 8 bits "
                                  f"a byte), got {bits}: pass e.g. --hash_bits 64")
    if not any(args.hash_bits) and args.itq != "textbook":
        raise utils.UserError(f"--itq {args.itq} picks how hash codes are fitted; pass --hash_bits N (e.g. 64) too")
    if not 0 < args.gzs_fraction <= 1:
        raise utils.UserError(f"--gzs_fraction must be in (0, 1], got {args.gzs_fraction}")
    if args.split not in ("test", "val"):  # one meaning in every script: which images, never which classes
        raise utils.UserError(f"--split takes test or val, not {args.split!r}; a named class split is chosen "
                              f"with --class_split {args.split}")
    if args.score == "relation" and (args.embeddings or any(args.hash_bits) or args.compare_untrained):
        raise utils.UserError("--score relation scores sketch-photo pairs with the model's relation network: pass "
                              "--model and --data_dir, without --embeddings, --hash_bits or --compare_untrained")
    if args.embeddings:
        if len(args.task) > 1:
            raise utils.UserError(f"an --embeddings file holds the images of one task; pass one --task, not "
                                  f"{' '.join(args.task)}")
        if args.save_embeddings:
            raise utils.UserError("--embeddings and --save_embeddings together would only copy the file")
        if args.compare_untrained:
            raise utils.UserError("--compare_untrained needs the network: pass --model and --data_dir "
                                  "instead of --embeddings")
    elif not (args.model and args.data_dir):
        raise utils.UserError("pass --model and --data_dir (or --embeddings FILE saved by --save_embeddings)")


# ----------------------------------------------------------------------------------- embeddings

@dataclass
class TaskImages:
    """The images one --task scores: query sketches and gallery photos with labels into ``classes``."""
    classes: list
    sketches: tuple                 # (paths, labels)
    photos: tuple                   # (paths, labels)
    info: dict                      # what results.json records of the setting
    targets: list | None = None     # fg: the gallery position of each query sketch's own photo


def cross_dataset_classes(data: dataset.SBIRData, trained: list) -> tuple[list, list]:
    """(unseen, excluded): the dataset's classes (seen and unseen lists together) whose normalised names
    (dataset.normalise_class_name) are not / are among the ``trained`` classes."""
    known = {dataset.normalise_class_name(c) for c in trained}
    every = data.seen + data.unseen
    return ([c for c in every if dataset.normalise_class_name(c) not in known],
            [c for c in every if dataset.normalise_class_name(c) in known])


def task_images(data: dataset.SBIRData, args, val_fraction: float, trained: list | None) -> TaskImages:
    """The query sketches and gallery photos of --task on --split; ``trained`` (the model's classes) makes it a
    cross-dataset run. Problems of the data's shape for the task are one UserError line."""
    info: dict = {"task": args.task}
    if trained is not None:
        classes, excluded = cross_dataset_classes(data, trained)
        info["cross_dataset"] = {"trained_classes": len(trained), "excluded": excluded, "unseen": len(classes),
                                 "rule": "class names compared lower-cased, runs of spaces/_/- as one space"}
        if not classes:
            raise utils.UserError(f"every class of {data.root} is among the {len(trained)} classes the model "
                                  "trained on: no unseen class is left for a cross-dataset evaluation; evaluate it "
                                  "with a model that did not train on its classes (or give --trained_labels, if "
                                  "the checkpoint's classes are not the ones it trained on)")
        sketches, photos = data.sketches, data.photos
    elif args.split == "test":
        classes, sketches, photos = data.unseen, data.sketches, data.photos
    else:
        classes = data.seen
        _, val = dataset.split_seen(data, val_fraction, seed=dataset.VAL_SPLIT_SEED)
        sketches, photos = val["sketches"], val["photos"]
    if args.task == "fg":
        return fine_grained_images(classes, sketches, photos, data.root, info)
    q, g = dataset.flatten(sketches, classes), dataset.flatten(photos, classes)
    if args.task == "gzs":
        if trained is not None:
            raise utils.UserError("--task gzs adds the model's own seen classes of the same dataset; it has no "
                                  "cross-dataset form: evaluate on the training dataset or use --task zs")
        train, _ = dataset.split_seen(data, val_fraction, seed=dataset.VAL_SPLIT_SEED)
        n_sk, n_ph = int(args.gzs_fraction * len(q[0])), int(args.gzs_fraction * len(g[0]))
        offset = len(classes)  # labels: the unseen classes first, then the seen ones
        sk, sk_labels = dataset.sample_seen(train["sketches"], data.seen, data.root, n_sk, args.gzs_seed)
        ph, ph_labels = dataset.sample_seen(train["photos"], data.seen, data.root, n_ph, args.gzs_seed)
        q = (sk + q[0], [offset + c for c in sk_labels] + q[1])  # seen items first, as SEM-PCYC concatenates
        g = (ph + g[0], [offset + c for c in ph_labels] + g[1])
        classes = list(classes) + list(data.seen)
        info["gzs"] = {"fraction": args.gzs_fraction, "seed": args.gzs_seed, "seen_sketches": n_sk,
                       "unseen_sketches": len(q[0]) - n_sk, "seen_photos": n_ph, "unseen_photos": len(g[0]) - n_ph,
                       "seen_drawn_from": "seen-class training images (the validation hold-out left out)"}
    return TaskImages(classes, q, g, info)


def fine_grained_images(classes: list, sketches: dict, photos: dict, root: str, info: dict) -> TaskImages:
    """Every paired sketch as a query; the gallery is every photo some evaluated sketch was drawn from."""
    pairs, counts = dataset.instance_pairs(sketches, photos, classes)
    n_sketches = sum(len(sketches.get(c, [])) for c in classes)
    if not any(pairs.values()):
        raise utils.UserError(f"--task fg needs sketch-photo pairs, and {root} has none: none of its {n_sketches} "
                              "evaluated sketches is named <photo>-<n> after a photo of its class, as Sketchy's "
                              "sketch n..._k-j.png is named after photo n..._k.jpg")
    q_paths, q_labels, g_paths, g_labels, targets = [], [], [], [], []
    for i, c in enumerate(classes):
        photo_index = {}
        for p in dict.fromkeys(photo for _, photo in pairs[c]):  # in the class's photo order, each once
            photo_index[p] = len(g_paths)
            g_paths.append(p)
            g_labels.append(i)
        for s, photo in pairs[c]:
            q_paths.append(s)
            q_labels.append(i)
            targets.append(photo_index[photo])
    info["fg"] = {"pairs": len(q_paths), "gallery_photos": len(g_paths), **counts}
    return TaskImages(list(classes), (q_paths, q_labels), (g_paths, g_labels), info, targets)


def task_lines(info: dict) -> list:
    """What the setting did to the image sets, as printed lines (from task_images' info)."""
    lines = []
    if "cross_dataset" in info:
        x = info["cross_dataset"]
        lines.append(f"cross-dataset: {len(x['excluded'])} class(es) share a name with the model's "
                     f"{x['trained_classes']} training classes and are left out"
                     + (f" ({', '.join(x['excluded'])})" if x["excluded"] else "") + f"; {x['unseen']} unseen remain")
    if "gzs" in info:
        z = info["gzs"]
        lines.append(f"gzs: {z['seen_sketches']} seen-class sketches join the {z['unseen_sketches']} unseen ones and "
                     f"{z['seen_photos']} seen-class photos the {z['unseen_photos']} unseen ones (fraction "
                     f"{z['fraction']} of each side, seed {z['seed']}, from the {z['seen_drawn_from']})")
    if "fg" in info:
        f = info["fg"]
        lines.append(f"fg: {f['pairs']} sketches paired with {f['gallery_photos']} photos by file name; "
                     f"{f['sketches_without_photo']} sketch(es) without a photo and {f['photos_without_sketch']} "
                     "photo(s) without a sketch are left out")
    return lines


def split_folder(data_dir: str, class_split: str) -> str:
    """The folder of a dataset's label files: DATA/splits/NAME for a named split it has, else DATA."""
    named = os.path.join(data_dir, "splits", class_split) if class_split else ""
    return named if named and os.path.isdir(named) else data_dir


def trained_classes(ckpt: dict, model_path: str, data_dir: str, trained_labels: str) -> list | None:
    """The classes the model trained on when --data_dir is another dataset than its training data (a
    cross-dataset run: another folder whose training classes are not the model's), else None. They come from
    --trained_labels, the checkpoint's own "classes" entry, or its training data's label file (train_labels.txt
    under its args' data_dir / class_split); when none can be read (older checkpoints whose data moved), one
    printed line says the run is an ordinary one."""
    if trained_labels:
        return dataset.read_labels(trained_labels)
    a = ckpt["args"]
    home = a.get("data_dir") or ""
    if home and os.path.realpath(home) == os.path.realpath(data_dir):
        return None
    trained, path = recorded_training_classes(ckpt)
    if trained is not None:
        # The same dataset under another path (moved, copied, or a relative path read from another folder)
        # trains on the same classes: an ordinary run.
        here = os.path.join(split_folder(data_dir, a.get("class_split", "")), "train_labels.txt")
        same = os.path.isfile(here) and sorted(map(dataset.normalise_class_name, dataset.read_labels(here))) \
            == sorted(map(dataset.normalise_class_name, trained))
        return None if same else trained
    # A dataset moved since training looks the same: evaluate its own unseen classes, and say so.
    print(f"note: {data_dir} is not the folder {model_path} was trained on ({home or 'not recorded'}), whose "
          f"classes the checkpoint does not record and {path} cannot tell: evaluating {data_dir}'s own unseen "
          "classes; for a cross-dataset run pass --trained_labels FILE (the classes it trained on)")
    return None


def recorded_training_classes(ckpt: dict) -> tuple[list | None, str]:
    """The seen classes the checkpoint's model trained on: its own "classes" entry, or for older checkpoints its
    training data's label file (train_labels.txt under its args' data_dir / class_split) where readable, else
    None; and that file's path."""
    a = ckpt["args"]
    home = a.get("data_dir") or ""
    path = os.path.join(split_folder(home, a.get("class_split", "")), "train_labels.txt")
    if utils.is_str_list(ckpt.get("classes")):
        return ckpt["classes"], path
    return (dataset.read_labels(path) if home and os.path.isfile(path) else None), path


def check_unseen(data: dataset.SBIRData, class_split: str, ckpt: dict, model_path: str) -> None:
    """The test split's "unseen" classes must be classes the model did not train on (recorded_training_classes):
    a --class_split other than the model's, or label files edited since, would score seen classes as zero-shot
    without a word."""
    trained, _ = recorded_training_classes(ckpt)
    if trained is None:
        return
    leaked = [c for c in cross_dataset_classes(data, trained)[1] if c in data.unseen]  # by normalised name
    if leaked:
        a = ckpt["args"]
        split = f"--class_split {class_split}" if class_split else f"{data.root}'s test_labels.txt"
        theirs = f"--class_split {a['class_split']}" if a.get("class_split") else "no --class_split"
        raise utils.UserError(
            f"{len(leaked)} of the {len(data.unseen)} test classes of {split} are classes {model_path} trained on "
            f"({', '.join(leaked[:5])}{', ...' if len(leaked) > 5 else ''}): the numbers would not be zero-shot; "
            f"evaluate with the split the model trained on ({theirs}), or train a model on {split}")


def fine_grained_accuracy(query_emb: torch.Tensor, gallery_emb: torch.Tensor, target_index: torch.Tensor,
                          ks=FG_KS, chunk_size: int = 512, score: str = "cosine") -> dict:
    """metrics.fine_grained_accuracy's acc@k, as results.json keeps them: the share of queries whose own gallery
    item (``target_index``, (Q,)) ranks within the first k, a tie counting against the target (Sketch_LVM's
    rank, dist.le(target).sum()); score "hamming" ranks packed codes by Hamming distance."""
    out = metrics.fine_grained_accuracy(query_emb, gallery_emb, target_index, ks=ks, score=score,
                                        chunk_size=chunk_size)
    return {f"acc@{k}": out[f"acc@{k}"] for k in ks}


def fine_grained_within_class(q, q_labels, g, g_labels, targets, ks=FG_KS, score: str = "cosine") -> dict:
    """acc@k when each query's gallery is only its own class's photos: fine_grained_accuracy class by class,
    pooled over all the queries (score "given": q holds the (Q, N) scores, g an (N, 0) placeholder)."""
    hits = torch.zeros(len(ks), dtype=torch.float64)
    for c in torch.unique(q_labels).tolist():
        rows, cols = torch.nonzero(q_labels == c).flatten(), torch.nonzero(g_labels == c).flatten()
        position = torch.full((g.shape[0],), -1, dtype=torch.int64)
        position[cols] = torch.arange(cols.numel())
        rows_q = q[rows][:, cols] if score == "given" else q[rows]  # given: the scores of the class's photos
        acc = fine_grained_accuracy(rows_q, g[cols], position[targets[rows]], ks, score=score)
        hits += torch.tensor([acc[f"acc@{k}"] * rows.numel() for k in ks], dtype=torch.float64)
    return {f"acc@{k}": float(h) / max(q.shape[0], 1) for k, h in zip(ks, hits)}


def check_hash_bits(bits: int, dim: int, source: str) -> None:
    """--hash_bits against the embedding size ``dim`` of ``source`` (a model or an embeddings file), before any
    embedding work: ITQ keeps at most one bit per dimension."""
    if bits > dim:
        raise utils.UserError(f"--hash_bits {bits} is more than the {dim} dimensions of {source}'s embeddings (ITQ "
                              f"codes have at most one bit per dimension); pass a multiple of 8 up to {dim}")


def hash_embeddings(emb: "Embedded", args) -> tuple["Embedded", dict]:
    """``emb`` with its queries and gallery (and the untrained network's, fitted on their own, the same way) as
    packed --hash_bits-bit ITQ codes of --itq's variant (metrics.itq_codes), and what results.json records."""
    start = time.perf_counter()
    try:
        fit = dict(bits=args.hash_bits, variant=args.itq, iterations=ITQ_ITERATIONS, seed=ITQ_SEED)
        q, g = metrics.itq_codes(emb.q, emb.g, **fit)  # (Q, bits/8), (N, bits/8) uint8
        untrained = metrics.itq_codes(*emb.untrained, **fit) if emb.untrained else ()
        changed = metrics.itq_stability(emb.q, emb.g, **fit)
    except ValueError as e:  # e.g. a single query, or NaN embeddings from a diverged model
        raise utils.UserError(f"cannot fit {args.hash_bits}-bit ITQ codes: {e}") from None
    info = {"bits": args.hash_bits, "itq": args.itq, "score": "hamming", "iterations": ITQ_ITERATIONS,
            "seed": ITQ_SEED if args.itq == "textbook" else ITQ_ITERATIONS,  # SEM-PCYC seeds numpy with n_iter
            "fitted_on": "the query sketches (each side centred on its own mean)",
            "seconds": time.perf_counter() - start,
            "distinct_codes": {"queries": len(torch.unique(q, dim=0)), "gallery": len(torch.unique(g, dim=0))},
            "stability": {"changed_bits": changed, "threshold": metrics.ITQ_UNSTABLE,
                          "measured_as": "the fraction of all code bits that change when the embeddings are "
                                         "centred in the other precision (float32 <-> float64)"}}
    if untrained:
        info["untrained"] = "the untrained network's embeddings get an ITQ of their own, fitted the same way"
    print(f"{args.hash_bits}-bit ITQ ({args.itq}) codes, ranked by Hamming distance (fitted on {info['fitted_on']}, "
          f"in {info['seconds']:.2f}s)")
    if changed > metrics.ITQ_UNSTABLE:
        print(f"warning: {changed:.1%} of the {args.hash_bits}-bit codes' bits change with the rounding of the "
              f"embeddings (float32 against float64; above {metrics.ITQ_UNSTABLE:.1%}), so these codes and their "
              "metrics are not meaningful; use fewer --hash_bits"
              + (" or --itq textbook (SEM-PCYC's rotation update is itself unstable)" if args.itq == "sem-pcyc" else "")
              + " (docs/metrics.md, \"Stability\")")
    distinct = info["distinct_codes"]
    same = [f"all {n} {what} have one code" for n, what, k in ((q.shape[0], "query sketches", distinct["queries"]),
                                                               (g.shape[0], "photos", distinct["gallery"])) if k == 1]
    if same:
        print(f"warning: {' and '.join(same)}, so every query ranks "
              + ("the photos as one tie" if distinct["gallery"] == 1 else "the photos alike")
              + " (docs/evaluation.md: a sketch-photo gap wider than the spread within each domain)")
    return replace(emb, q=q, g=g, untrained=untrained), info


@dataclass
class EmbeddingCache:
    """One network's embeddings in one evaluate.py run, by (side, path): a --task reuses what an earlier one
    embedded (zs, gzs and fg share the unseen-class images). Also how many images it embedded, in how long."""
    rows: dict = field(default_factory=dict)
    images: int = 0
    seconds: float = 0.0


def embed_split(model, sketches, photos, image_size: int, args, device,
                cache: EmbeddingCache | None = None) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Embed the query sketches (Q, D) and gallery photos (N, D), those not in the cache only; also the images
    per second of the cache's embedding so far."""
    model.to(device)
    cache = EmbeddingCache() if cache is None else cache
    common = dict(image_size=image_size, batch_size=args.batch_size, workers=args.workers, device=device,
                  amp=args.amp)
    rows, out = cache.rows, []
    for side, encoder, paths in (("sketches", model.sketch_encoder, sketches[0]),
                                 ("photos", model.photo_encoder, photos[0])):
        new = [p for p in dict.fromkeys(paths) if (side, p) not in rows]
        start = time.perf_counter()
        if new:
            rows.update(zip([(side, p) for p in new], utils.embed_images(encoder, new, desc=f"embed {side}", **common)))
        cache.seconds += time.perf_counter() - start
        cache.images += len(new)
        out.append(torch.stack([rows[side, p] for p in paths]) if paths else torch.empty(0, 0))
    return out[0], out[1], cache.images / max(cache.seconds, 1e-9)


def token_batches(encoder, paths: list, image_size: int, args, device, desc: str):
    """(B, L, W) self-attention tokens of the images at ``paths``, batch by batch (ZSESBIRNet.sketch_tokens or
    photo_tokens: each domain's images made square as the encoder says)."""
    files = dataset.ImageFilesDataset(paths, image_size, upright=False, tolerant=False, fit=utils.image_fit(encoder))
    loader = torch.utils.data.DataLoader(files, batch_size=args.batch_size, num_workers=args.workers,
                                         pin_memory=device.type == "cuda", worker_init_fn=utils.seed_worker)
    for emb, _ in utils.embed_batches(encoder, loader, device, args.amp, desc=desc):
        yield emb.view(emb.shape[0], -1, RELATION_WIDTH)


def relation_split(model, sketches, photos, image_size: int, args, device) -> tuple:
    """--score relation: every image's self-attention once; the photos' tokens in a file (a memory map of
    N x L x W float32 in the system's temporary folder: 0.6 MB a photo at 224 px), the sketches' one embedding
    batch (--batch_size) at a time, each batch scored against every photo by ZSESBIRNet.relation_scores, which reads
    the photos' tokens block by block. Memory holds a block of each, and the (Q, N) scores. Returns the retrieval
    tokens (Q, 768) and (N, 768) (what --save_embeddings keeps), the scores, and images per second."""
    if utils.rank_and_world()[1] > 1:
        raise utils.UserError("--score relation runs in one process: launch evaluate.py without torchrun")
    model.to(device).eval()
    length = model.relation.grid ** 2 + 1
    start, scoring = time.perf_counter(), 0.0
    with tempfile.TemporaryDirectory(prefix="relation_tokens_") as tmp:
        photo_tokens = np.lib.format.open_memmap(os.path.join(tmp, "photos.npy"), mode="w+", dtype=np.float32,
                                                 shape=(len(photos[0]), length, RELATION_WIDTH))
        row, g = 0, []
        for t in token_batches(model.photo_tokens, photos[0], image_size, args, device, "photo tokens"):
            photo_tokens[row:row + len(t)], row = t.numpy(), row + len(t)
            g.append(F.normalize(t[:, 0], dim=1))
        p = torch.from_numpy(photo_tokens)  # (N, L, W) on the file: read block by block
        q, rows = [], []
        for t in token_batches(model.sketch_tokens, sketches[0], image_size, args, device, "sketch tokens"):
            q.append(F.normalize(t[:, 0], dim=1))
            t0 = time.perf_counter()
            rows.append(relation_block(model, t, p, args, device))
            scoring += time.perf_counter() - t0
        del p, photo_tokens
    scores = torch.cat(rows)
    print(f"relation scores: {scores.numel():,} sketch-photo pairs in {scoring:.1f} s "
          f"({scores.numel() / max(scoring, 1e-9):.1f} pairs/s)")
    images = len(sketches[0]) + len(photos[0])
    return torch.cat(q), torch.cat(g), scores, images / max(time.perf_counter() - start - scoring, 1e-9)


def relation_block(model, sketch_tokens: torch.Tensor, photo_tokens: torch.Tensor, args, device) -> torch.Tensor:
    """The relation scores (B, N) of a batch of sketches' tokens against every photo's, under --amp's autocast,
    RELATION_TOKENS tokens of pairs at a time (the same memory at any image size)."""
    dtype = utils.amp_dtype(device, args.amp)
    with torch.no_grad(), torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
        pairs = max(1, RELATION_TOKENS // sketch_tokens.shape[1])
        return model.relation_scores(sketch_tokens.to(device), photo_tokens, pairs).float().cpu()


def save_embeddings(path: str, run: dict) -> None:
    """The embeddings, labels, relative paths and where they came from, as a torch file (atomic)."""
    utils.ensure_dir(os.path.dirname(os.path.abspath(path)), "embeddings folder")
    utils.atomic_write(path, lambda f: torch.save({"format": EMBEDDINGS_FORMAT, **run}, f))


def load_embeddings(path: str) -> dict:
    """Read and check a --save_embeddings file; every problem is one UserError line."""
    hint = "write one with evaluate.py --save_embeddings"
    run = utils.load_user_file(path, "embeddings file", hint)
    what = f"{path} is not an embeddings file written by evaluate.py --save_embeddings"
    if not isinstance(run, dict) or run.get("format") != EMBEDDINGS_FORMAT:
        raise utils.UserError(what)
    bad = utils.wrong_fields(run, {
        "queries": utils.is_tensor(2, floating=True), "gallery": utils.is_tensor(2, floating=True),
        "query_labels": utils.is_tensor(1, floating=False), "gallery_labels": utils.is_tensor(1, floating=False),
        "query_paths": utils.is_str_list, "gallery_paths": utils.is_str_list, "classes": utils.is_str_list,
        "split": lambda v: isinstance(v, str), "data": lambda v: isinstance(v, str), "throughput": utils.is_number,
        "model": lambda m: isinstance(m, dict) and not utils.wrong_fields(m, {
            "path": lambda v: isinstance(v, str), "backbone": lambda v: isinstance(v, str),
            "embedding_dim": utils.is_int, "val_fraction": utils.is_number}),
    }, {"class_split": lambda v: isinstance(v, str), "task": lambda v: v in TASKS,
        "task_info": lambda v: isinstance(v, dict), "query_targets": utils.is_tensor(1, floating=False),
        "trained_classes": utils.is_str_list})
    if not bad and run.get("task") == "fg" and "query_targets" not in run:
        bad = ["query_targets"]
    if bad:
        raise utils.UserError(f"{what} (wrong {', '.join(bad)}); the file is damaged; {hint}")
    q, g = run["queries"], run["gallery"]
    if run["model"]["embedding_dim"] != q.shape[1]:
        raise utils.UserError(f"{path} records {run['model']['embedding_dim']}-d embeddings of its model but holds "
                              f"{q.shape[1]}-d ones; the file is corrupt; {hint}")
    if q.shape[1] != g.shape[1]:
        raise utils.UserError(f"{path}: query embeddings {tuple(q.shape)} and gallery embeddings "
                              f"{tuple(g.shape)} do not have the same dimension; the file is corrupt")
    for emb, labels, paths, what in ((q, run["query_labels"], run["query_paths"], "query"),
                                     (g, run["gallery_labels"], run["gallery_paths"], "gallery")):
        if not (emb.shape[0] == labels.numel() == len(paths)):
            raise utils.UserError(f"{path}: {emb.shape[0]} {what} embeddings but {labels.numel()} labels and "
                                  f"{len(paths)} paths; the file is corrupt")
        if labels.numel() and not 0 <= int(labels.min()) <= int(labels.max()) < len(run["classes"]):
            raise utils.UserError(f"{path}: {what} labels outside the {len(run['classes'])} classes; the file "
                                  "is corrupt")
    t = run.get("query_targets")
    if t is not None and (t.numel() != q.shape[0]
                          or (t.numel() and not 0 <= int(t.min()) <= int(t.max()) < g.shape[0])):
        raise utils.UserError(f"{path}: the fine-grained targets do not index the gallery; the file is corrupt")
    return run


def check_same_model(run: dict, path: str, ckpt: dict, model_path: str) -> None:
    """The embeddings file must have been made by the --model checkpoint, or its numbers would be credited to
    another model: the same weights (utils.model_fingerprint) where the file records them; for files written
    before it did, the same network, epoch and step."""
    made, cfg = run["model"], utils.checkpoint_model(ckpt)
    by = f"{made['path']} ({made['embedding_dim']}-d {made['backbone']}"
    by += f", epoch {made['epoch']}, step {made['step']})" if "step" in made else ")"
    fingerprint = made.get("fingerprint")
    if fingerprint is not None:
        same = fingerprint == utils.model_fingerprint(ckpt)
    else:
        same = ((cfg.backbone, cfg.embedding_dim) == (made["backbone"], made["embedding_dim"])
                and (made.get("epoch"), made.get("step")) == (ckpt["epoch"], ckpt["step"]))
    if not same:
        other = ", other weights" if fingerprint else ""
        raise utils.UserError(f"{path} was embedded by {by}, not by {model_path} ({cfg.embedding_dim}-d "
                              f"{cfg.backbone}, epoch {ckpt['epoch']}, step {ckpt['step']}{other}): "
                              f"its numbers would be credited to the wrong model; leave out --model (the file names "
                              f"its own), or embed again with --model {model_path} --save_embeddings FILE")


def check_same_dataset(run: dict, path: str, classes: list, sketches, photos, root: str, split: str) -> None:
    """The embeddings file must describe exactly this dataset split (same classes and files, in order)."""
    def rel(paths):
        return [os.path.relpath(p, root) for p in paths]

    if run["split"] != split or run["classes"] != classes or \
            run["query_paths"] != rel(sketches[0]) or run["gallery_paths"] != rel(photos[0]):
        raise utils.UserError(
            f"{path} holds embeddings of another dataset or split ({run['split']} split of {run['data']}: "
            f"{len(run['classes'])} classes, {len(run['query_paths'])} sketches, {len(run['gallery_paths'])} "
            f"photos), not of {root}'s {split} split ({len(classes)} classes, {len(sketches[0])} sketches, "
            f"{len(photos[0])} photos); re-run evaluate.py --save_embeddings on this dataset")


# ----------------------------------------------------------------------------------- reporting

def summary(res: dict, name: str, classes: list) -> dict:
    """JSON-able results of one protocol, per-class AP keyed by class name."""
    p = res["protocols"][name]
    out = {k: p[k] for k in ("map_all", *(f"p@{k}" for k in KS), *(f"map@{k}" for k in KS)) if k in p}
    out["per_class_ap"] = {classes[c]: ap for c, ap in sorted(p["per_class_ap"].items())}
    return out


def print_table(results: dict, names: list) -> None:
    def cell(v):
        return f"{v:8.4f}" if v is not None else f"{'-':>8}"

    print(f"{'protocol':<15}{'mAP@all':>8}{'P@100':>8}{'mAP@200':>8}{'P@200':>8}")
    for name in names:
        r = results["protocols"][name]
        print(f"{name:<15}" + "".join(cell(r.get(k)) for k in ("map_all", "p@100", "map@200", "p@200")))


def plot_pr_curve(curve: dict, label: str, out_path: str) -> None:
    """Mean interpolated precision over the queries at each recall level."""
    plt = utils.pyplot()
    fig, ax = plt.subplots(figsize=(4.6, 4))
    ax.plot(curve["recall"], curve["precision"], lw=2, label=label)
    ax.set_xlabel("recall")
    ax.set_ylabel("interpolated precision (mean over queries)")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    utils.save_figure(fig, out_path)


def plot_per_class_ap(per_class: dict, chance: float, out_path: str) -> None:
    """Horizontal bars of every class's AP, best at the top, with the mAP and the chance level."""
    plt = utils.pyplot()
    items = sorted(per_class.items(), key=lambda kv: kv[1])
    fig, ax = plt.subplots(figsize=(6, 1.2 + 0.22 * len(items)))
    ax.barh(range(len(items)), [v for _, v in items], color="tab:blue")
    ax.set_yticks(range(len(items)), [c for c, _ in items], fontsize=8)
    mean = sum(v for _, v in items) / len(items)
    ax.axvline(mean, color="black", lw=1, label=f"mean of classes {mean:.3f}")
    ax.axvline(chance, color="grey", ls="--", lw=1, label=f"chance {chance:.3f}")
    ax.set_xlabel("AP (mean over the class's query sketches)")
    ax.set_xlim(0, 1)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    utils.save_figure(fig, out_path)


OUTPUT_FILES = ("results.json", "pr_curve.png", "per_class_ap.png")


def clear_earlier_outputs(out_dir: str) -> None:
    """Remove what an earlier evaluate.py run wrote into out_dir (OUTPUT_FILES, retrieval grids, and the setting
    sub-folders of a run of several settings), so that the folder holds one evaluation's outputs: an earlier
    one's grids or sub-folders beside new results would read as this run's. Nothing else is touched (saved
    embeddings stay); called just before the first new file is written."""
    setting = re.compile(r"(zs|gzs|fg)(_\d+bit)?")  # setting_name's names
    folders = [os.path.join(out_dir, d) for d in sorted(os.listdir(out_dir))
               if setting.fullmatch(d) and os.path.isfile(os.path.join(out_dir, d, "results.json"))]
    files = utils.remove_outputs(out_dir, OUTPUT_FILES)
    for folder in folders:
        files += utils.remove_outputs(folder, OUTPUT_FILES)
        if not os.listdir(folder):
            os.rmdir(folder)
    if files:
        print(f"removed an earlier evaluation's {len(files)} output file(s) from {out_dir}"
              + (f" (setting folders {', '.join(os.path.basename(d) for d in folders)})" if folders else ""))


def write_grids(q: torch.Tensor, g: torch.Tensor, sketches, photos, classes, args, out_dir,
                score: str = "cosine") -> list:
    """Grids for --num_sketches seeded random queries, ranked as the metrics rank them (score "hamming": packed
    codes, the smallest Hamming distance first, ties in gallery order); returns the PNG paths."""
    rng = np.random.default_rng(args.seed)
    picks = rng.choice(len(sketches[0]), size=min(args.num_sketches, len(sketches[0])), replace=False)
    k = min(args.num_images, len(photos[0]))
    if len(picks) == 0 or k == 0:
        return []
    if score == "given":  # q holds the (Q, N) scores
        top = torch.topk(q[torch.as_tensor(picks)], k, dim=1)
        order, captions = top.indices, [[f"relation {s:.3f}" for s in r] for r in top.values.tolist()]
    elif score == "hamming":
        dist = metrics.hamming_distance(q[torch.as_tensor(picks)], g)  # (n, N)
        order = dist.sort(dim=1, stable=True).indices[:, :k]  # (n, k)
        captions = [[f"{d} of {8 * g.shape[1]} bits differ" for d in r] for r in dist.gather(1, order).tolist()]
    else:
        top = torch.topk(metrics.similarity(q[torch.as_tensor(picks)], g), k, dim=1)  # of (n, N)
        order, captions = top.indices, [[f"{s:.3f}" for s in r] for r in top.values.tolist()]
    written = []
    for row, qi in enumerate(picks):
        hits = [(photos[0][j], classes[photos[1][j]], text) for j, text in zip(order[row].tolist(), captions[row])]
        query_class = classes[sketches[1][qi]]
        name = f"grid_{row:02d}_{query_class}.png"
        utils.save_retrieval_grid(dataset.load_image(sketches[0][qi]), f"query: {query_class}",
                                  [(p, f"{i + 1}. {c}\n{s}", "green" if c == query_class else "red")
                                   for i, (p, c, s) in enumerate(hits)], os.path.join(out_dir, name))
        written.append(os.path.join(out_dir, name))
    return written


# ----------------------------------------------------------------------------------- main

def main(args) -> None:
    check_args(args)
    rank, world, device = utils.init_distributed(args.device)
    try:
        args.workers = utils.resolve_workers(args.workers)
        run_evaluation(args, rank, device)
    finally:
        if world > 1:
            torch.distributed.destroy_process_group()


@dataclass
class Embedded:
    """What evaluation scores: query sketches and gallery photos as embeddings with labels, and their source."""
    classes: list
    q: torch.Tensor                 # (Q, D)
    q_labels: torch.Tensor          # (Q,)
    g: torch.Tensor                 # (G, D)
    g_labels: torch.Tensor          # (G,)
    throughput: float               # images/s of the embedding
    model: str                      # the checkpoint's path
    data: str
    class_split: str
    sketches: tuple = ()            # (paths, labels): from a model only, for the grids
    photos: tuple = ()
    untrained: tuple = ()           # (queries, gallery) of the untrained network, with --compare_untrained
    info: dict | None = None        # the setting's facts for results.json (task_images)
    targets: torch.Tensor | None = None  # fg: (Q,) gallery position of each query's own photo
    scores: torch.Tensor | None = None  # (Q, G) relation scores, with --score relation


def embeddings_from_file(args, run: dict, ckpt: dict | None) -> Embedded:
    """The embeddings --embeddings holds, checked against --split, --data_dir and --model where given."""
    if run["split"] != args.split:
        raise utils.UserError(f"{args.embeddings} holds the {run['split']} split, not --split {args.split}")
    task = run.get("task", "zs")  # files written before --task hold the zs setting
    if task != args.task:
        raise utils.UserError(f"{args.embeddings} holds the embeddings of --task {task}, not --task {args.task}; "
                              f"pass --task {task}, or save another file with --task {args.task} --save_embeddings")
    if args.data_dir:
        data = dataset.scan_dataset(args.data_dir, check_images=False,
                                    class_split=args.class_split or run.get("class_split", ""))
        want = task_images(data, args, run["model"]["val_fraction"], run.get("trained_classes"))
        check_same_dataset(run, args.embeddings, want.classes, want.sketches, want.photos, args.data_dir, args.split)
    if ckpt is not None:
        check_same_model(run, args.embeddings, ckpt, args.model)
    print(f"embeddings {args.embeddings}: {run['split']} split of {run['data']}, model {run['model']['path']} "
          f"({run['model']['backbone']}, {run['queries'].shape[1]}-d)")
    class_split = args.class_split or run.get("class_split") or (ckpt["args"].get("class_split", "") if ckpt else "")
    info = run.get("task_info") or {"task": task}
    for line in task_lines(info):
        print(line)
    return Embedded(run["classes"], run["queries"], run["query_labels"], run["gallery"], run["gallery_labels"],
                    run["throughput"], args.model or run["model"]["path"], args.data_dir or run["data"], class_split,
                    info=info, targets=run.get("query_targets"))


def embeddings_from_model(args, ckpt: dict, rank: int, device: torch.device, caches: dict) -> Embedded | None:
    """Embed the split's images with the checkpoint's network (under torchrun each process its share; only
    rank 0 gets the result, the others None), those the run's earlier tasks embedded taken from caches (an
    EmbeddingCache for "trained" and one for "untrained"); --save_embeddings keeps them."""
    a, cfg = ckpt["args"], utils.checkpoint_model(ckpt)  # how it was trained; the network it holds
    print(f"model {args.model}: {utils.network_text(cfg)}, {cfg.embedding_dim}-d, {cfg.image_size}px, trained "
          f"{ckpt['epoch']} epoch(s)" + (f" ({ckpt['work']['steps']:,} steps, {ckpt['work']['images']:,} images, "
                                         f"{utils.flops_text(ckpt['work']['flops'])})" if "work" in ckpt else "")
          + f", {utils.validation_text(ckpt['best'])}")
    trained = trained_classes(ckpt, args.model, args.data_dir, args.trained_labels)
    if trained is not None and args.split != "test":
        raise utils.UserError(f"{args.data_dir} is not {args.model}'s training dataset: a cross-dataset run evaluates "
                              "its unseen classes; drop --split val")
    # Another dataset has the split names of its own, not the model's.
    class_split = args.class_split or (a.get("class_split", "") if trained is None else "")
    data = dataset.scan_dataset(args.data_dir, class_split=class_split)
    if data.skipped:
        print(f"warning: skipped {len(data.skipped)} unreadable image file(s), e.g. {data.skipped[0]}")
    if trained is None and args.split == "test":
        check_unseen(data, class_split, ckpt, args.model)
    images = task_images(data, args, a["val_fraction"], trained)
    classes, sketches, photos = images.classes, images.sketches, images.photos
    for line in task_lines(images.info):
        print(line)
    if not sketches[0] or not photos[0]:
        raise utils.UserError(f"the {args.split} split of {args.data_dir} has {len(sketches[0])} sketches and "
                              f"{len(photos[0])} photos; it needs both (for --split val, train with "
                              "--val_fraction > 0)")
    model = utils.build_model(ckpt, args.model, trained=True)
    if args.score == "relation" and not hasattr(model, "relation_scores"):
        raise utils.UserError(f"--score relation needs a model with a relation network (--method zse_sbir); "
                              f"{args.model} is {utils.network_text(cfg)}: leave out --score")
    scores, reused = None, 0
    if args.score == "relation":
        q, g, scores, throughput = relation_split(model, sketches, photos, cfg.image_size, args, device)
    else:
        before = caches["trained"].images
        q, g, throughput = embed_split(model, sketches, photos, cfg.image_size, args, device, caches["trained"])
        reused = len(sketches[0]) + len(photos[0]) - (caches["trained"].images - before)
    untrained = ()
    if args.compare_untrained:  # embedded here, while every process still takes part
        untrained = embed_split(utils.build_model(ckpt, args.model, trained=False), sketches, photos, cfg.image_size,
                                args, device, caches["untrained"])[:2]
    if rank != 0:
        return None
    targets = None if images.targets is None else torch.tensor(images.targets, dtype=torch.int64)
    emb = Embedded(classes, q, torch.tensor(sketches[1], dtype=torch.int64), g,
                   torch.tensor(photos[1], dtype=torch.int64), throughput, args.model, args.data_dir, class_split,
                   sketches, photos, untrained, images.info, targets, scores)
    print(f"embedded {len(sketches[0]) + len(photos[0])} images at {throughput:.1f} images/s"
          + (f" ({reused} of them embedded for an earlier --task)" if reused else ""))
    if args.save_embeddings:
        save_embeddings(args.save_embeddings, embeddings_record(args, emb, ckpt, trained))
        print(f"saved embeddings to {args.save_embeddings}")
    return emb


def embeddings_record(args, emb: Embedded, ckpt: dict, trained: list | None) -> dict:
    """What --save_embeddings keeps of a model's embeddings: them, their labels and relative paths, the task, the
    data and the model's identity (load_embeddings and the checks of --embeddings read it)."""
    root, cfg = os.path.abspath(args.data_dir), utils.checkpoint_model(ckpt)
    return {"queries": emb.q, "query_labels": emb.q_labels,
            "query_paths": [os.path.relpath(p, root) for p in emb.sketches[0]],
            "gallery": emb.g, "gallery_labels": emb.g_labels,
            "gallery_paths": [os.path.relpath(p, root) for p in emb.photos[0]],
            "classes": list(emb.classes), "split": args.split, "data": root, "throughput": emb.throughput,
            "class_split": emb.class_split, "task": args.task, "task_info": emb.info,
            **({} if emb.targets is None else {"query_targets": emb.targets}),
            **({} if trained is None else {"trained_classes": list(trained)}),
            "model": {"path": os.path.abspath(args.model), "epoch": ckpt["epoch"], "step": ckpt["step"],
                      "fingerprint": utils.model_fingerprint(ckpt),
                      "backbone": cfg.backbone, "embedding_dim": cfg.embedding_dim, "image_size": cfg.image_size,
                      "val_fraction": ckpt["args"]["val_fraction"]}}


def classes_without_photos(emb: Embedded, split: str) -> list:
    """The query classes with no photo in the gallery (warned about, left out of every mean); an empty side
    or no class with photos is a UserError."""
    if emb.g.shape[0] == 0:
        raise utils.UserError(f"the gallery is empty: the {split} split has no photos to retrieve")
    if emb.q.shape[0] == 0:
        raise utils.UserError(f"there are no query sketches in the {split} split")
    missing = sorted(set(emb.q_labels.tolist()) - set(emb.g_labels.tolist()))
    if missing:
        num = int(torch.isin(emb.q_labels, torch.tensor(missing)).sum())
        print(f"warning: {num} query sketch(es) of {len(missing)} class(es) with no photo in the gallery "
              f"({', '.join(emb.classes[c] for c in missing[:5])}{', ...' if len(missing) > 5 else ''}) are left "
              "out of every mean")
        if len(missing) == len(set(emb.q_labels.tolist())):
            raise utils.UserError("no query sketch has a photo of its class in the gallery; check the dataset's "
                                  "photos folders")
    return missing


def run_evaluation(args, rank: int, device: torch.device) -> None:
    """Under torchrun every process embeds its share of the images; rank 0 alone computes and writes. Each --task
    is embedded once and scored once per --hash_bits value: one setting writes into --output_dir, several each
    into a sub-folder named after it (setting_name), with a table of all of them printed and in results.json."""
    anchor = args.embeddings or args.model
    # The inputs are checked before anything is written.
    run = load_embeddings(args.embeddings) if args.embeddings else None
    ckpt = utils.load_checkpoint(args.model) if args.model else None
    if any(args.hash_bits):
        dim = run["queries"].shape[1] if run is not None else utils.checkpoint_model(ckpt).embedding_dim
        check_hash_bits(max(args.hash_bits), dim, anchor)
    out_dir = args.output_dir or os.path.join(os.path.dirname(os.path.abspath(anchor)), "eval")
    utils.ensure_dir(out_dir, "output folder")
    info = utils.print_banner("evaluate.py", args)
    if args.embeddings and rank != 0:  # nothing to embed: the other processes have no work
        return
    several = len(args.task) * len(args.hash_bits) > 1
    settings, cleared = {}, False
    caches = {"trained": EmbeddingCache(), "untrained": EmbeddingCache()}  # each image embedded once a network
    for task in args.task:
        task_args = argparse.Namespace(**{**vars(args), "task": task, "hash_bits": 0,
                                          "save_embeddings": task_file(args.save_embeddings, task, len(args.task))})
        if several:
            print(f"\n=== --task {task}")
        if args.embeddings:
            emb = embeddings_from_file(task_args, run, ckpt)
        else:
            emb = embeddings_from_model(task_args, ckpt, rank, device, caches)
            if emb is None:
                continue
        if not cleared:  # every input of the first setting checked: only now is anything removed or written
            clear_earlier_outputs(out_dir)
            cleared = True
        for bits in args.hash_bits:
            name = setting_name(task, bits)
            where = os.path.join(out_dir, name) if several else out_dir
            if several:
                print(f"\n--- setting {name} (results in {where})")
                utils.ensure_dir(where, "output folder")
            settings[name] = score(emb, argparse.Namespace(**{**vars(task_args), "hash_bits": bits}), info["commit"],
                                   where)
    if several and settings:
        report_settings(settings, args, info["commit"], out_dir)


def setting_name(task: str, bits: int) -> str:
    """The name of one (task, hash bits) setting, as printed and as its sub-folder: zs, gzs_64bit, ..."""
    return task + (f"_{bits}bit" if bits else "")


def task_file(path: str, task: str, num_tasks: int) -> str:
    """--save_embeddings' file for one of ``num_tasks`` tasks: the path itself for one task, else the task's
    name before the extension (emb.pt -> emb_gzs.pt), a file per task as --embeddings reads them."""
    if not path or num_tasks == 1:
        return path
    stem, ext = os.path.splitext(path)
    return f"{stem}_{task}{ext}"


def headline(results: dict) -> dict:
    """A setting's numbers for the table of settings: the first protocol's four (zs, gzs) or the acc@k (fg)."""
    if results["task"] == "fg":
        return {"acc@1": results["gallery_all"]["acc@1"], "acc@5": results["gallery_all"]["acc@5"]}
    head = next(iter(results["protocols"]))
    return {"protocol": head, **{k: v for k, v in results["protocols"][head].items() if k != "per_class_ap"}}


def report_settings(settings: dict, args, commit: str, out_dir: str) -> None:
    """Print one row per evaluated setting and write them to out_dir/results.json."""
    columns = (("map_all", "mAP@all"), ("p@100", "P@100"), ("map@200", "mAP@200"), ("p@200", "P@200"),
               ("acc@1", "acc@1"), ("acc@5", "acc@5"))
    rows = {name: {"results": os.path.join(name, "results.json"), "num_queries": r["num_queries"],
                   "num_gallery": r["num_gallery"], **headline(r)} for name, r in settings.items()}
    print(f"\nevery setting ({os.path.join(out_dir, '<setting>', 'results.json')}; mAP and P under the "
          f"{next((r['protocol'] for r in rows.values() if 'protocol' in r), args.protocol)} protocol):")
    print(f"{'setting':<12}{'queries':>8}{'gallery':>8}" + "".join(f"{title:>9}" for _, title in columns))
    for name, r in rows.items():
        print(f"{name:<12}{r['num_queries']:>8}{r['num_gallery']:>8}"
              + "".join(f"{r[key]:9.4f}" if r.get(key) is not None else f"{'-':>9}" for key, _ in columns))
    first = next(iter(settings.values()))
    utils.write_json(os.path.join(out_dir, "results.json"), {
        "model": first["model"], "data": first["data"], "commit": commit, "tasks": args.task,
        "hash_bits": args.hash_bits, **({"itq": args.itq} if any(args.hash_bits) else {}), "settings": rows})


def score(emb: Embedded, args, commit: str, out_dir: str) -> dict:
    """The metrics of every protocol asked for, printed, with plots, grids (from a model) and results.json, whose
    content it returns."""
    if args.task == "fg":
        return score_fine_grained(emb, args, commit, out_dir)
    names = list(metrics.PROTOCOLS) if args.protocol == "all" else [args.protocol]
    missing = classes_without_photos(emb, args.split)
    emb, hashing = hash_embeddings(emb, args) if args.hash_bits else (emb, None)
    measure = "hamming" if hashing else ("given" if emb.scores is not None else "cosine")
    start = time.perf_counter()
    try:
        if emb.scores is not None:
            res = metrics.score_matrix_metrics(emb.scores, emb.q_labels, emb.g_labels, ks=KS, protocols=names,
                                               pr_points=101)
        else:
            res = metrics.retrieval_metrics(emb.q, emb.q_labels, emb.g, emb.g_labels, ks=KS, protocols=names,
                                            pr_points=101, score=measure)
    except ValueError as e:  # e.g. NaN embeddings from a diverged model
        raise utils.UserError(f"cannot compute the metrics: {e}") from None
    results = retrieval_record(emb, args, commit, res, names, time.perf_counter() - start)
    results["classes_without_photos"] = [emb.classes[c] for c in missing]
    if hashing:
        results["hashing"] = hashing
    head, chance = names[0], results["chance_map_all"]
    what = "unseen classes" if args.split == "test" else "seen-class validation hold-out"
    if args.task == "gzs":
        what = "unseen classes and drawn seen-class images"
    print(f"{args.split} split ({what}): {res['num_queries']} query sketches, {emb.g.shape[0]} gallery photos, "
          f"{len(emb.classes)} classes; metrics in {results['metrics_seconds']:.2f}s")
    print_table(results, names)
    top = results["protocols"][head]["map_all"]
    print(f"chance level mAP@all {chance:.4f}  ({head} / chance = {top / chance:.2f}x)")
    if emb.untrained:
        results["untrained"] = untrained_record(emb, names, measure)
        b = results["untrained"][head]["map_all"]
        print(f"untrained network mAP@all {b:.4f}  ({head}: trained / untrained = {top / b:.2f}x)")
    label = f"{head} mAP@all {top:.3f}" + (f", {args.hash_bits}-bit ITQ ({args.itq})" if hashing else "")
    plot_pr_curve(results["pr_curve"], label, os.path.join(out_dir, "pr_curve.png"))
    plot_per_class_ap(results["protocols"][head]["per_class_ap"], chance, os.path.join(out_dir, "per_class_ap.png"))
    if emb.sketches:
        q = emb.scores if measure == "given" else emb.q  # "given": the rows of the relation scores rank the photos
        results["grids"] = write_grids(q, emb.g, emb.sketches, emb.photos, emb.classes, args, out_dir, measure)
    else:
        results["grids"] = []
        print("no retrieval grids from --embeddings (they need the images)")
    utils.write_json(os.path.join(out_dir, "results.json"), results)
    worst = sorted(results["protocols"][head]["per_class_ap"].items(), key=lambda kv: kv[1])
    print("per-class AP: " + ", ".join(f"{c} {ap:.3f}" for c, ap in worst[:10]) + (" ..." if len(worst) > 10 else ""))
    print(f"wrote results.json, pr_curve.png, per_class_ap.png and {len(results['grids'])} retrieval grid(s) "
          f"to {out_dir}")
    return results


def retrieval_record(emb: Embedded, args, commit: str, res: dict, names: list, seconds: float) -> dict:
    """results.json of a zs or gzs setting: what was scored (model, data, split, setting) and every protocol's
    numbers, the standard protocol's also at the top level."""
    results = {"model": emb.model, "data": emb.data, "split": args.split, "class_split": emb.class_split or None,
               "embeddings": args.embeddings or None, "commit": commit, "task": args.task,
               "scored_by": "relation" if emb.scores is not None else "embedding",
               **{k: v for k, v in (emb.info or {}).items() if k != "task"},
               "num_queries": res["num_queries"], "num_gallery": int(emb.g.shape[0]), "num_classes": len(emb.classes),
               "num_queries_without_relevant": res["num_queries_without_relevant"],
               "throughput_images_per_s": emb.throughput, "metrics_seconds": seconds,
               "chance_map_all": metrics.chance_map(emb.q_labels, emb.g_labels),
               "protocols": {n: summary(res, n, emb.classes) for n in names},
               "pr_curve": {k: v.tolist() for k, v in res["pr_curve"].items()}}
    if "standard" in names:
        results.update(results["protocols"]["standard"])  # the headline numbers, also at the top level
    return results


def untrained_record(emb: Embedded, names: list, measure: str) -> dict:
    """The same protocols for the untrained network's embeddings (--compare_untrained)."""
    base = metrics.retrieval_metrics(emb.untrained[0], emb.q_labels, emb.untrained[1], emb.g_labels, ks=KS,
                                     protocols=names, score=measure)
    out = {n: summary(base, n, emb.classes) for n in names}
    if "standard" in names:
        out.update(out["standard"])
    return out


def score_fine_grained(emb: Embedded, args, commit: str, out_dir: str) -> dict:
    """acc@1 and acc@5 of each query sketch's own photo, over two galleries: every paired photo of the
    evaluated classes, and only the photos of the query's class; printed and written to results.json."""
    if emb.q.shape[0] == 0 or emb.targets is None:
        raise utils.UserError("there are no paired query sketches to evaluate")
    emb, hashing = hash_embeddings(emb, args) if args.hash_bits else (emb, None)
    measure = "hamming" if hashing else ("given" if emb.scores is not None else "cosine")
    start = time.perf_counter()
    q, g = (emb.scores, emb.g[:, :0]) if measure == "given" else (emb.q, emb.g)  # given: scores, (N, 0)
    mixed = fine_grained_accuracy(q, g, emb.targets, FG_KS, score=measure)
    own = fine_grained_within_class(q, emb.q_labels, g, emb.g_labels, emb.targets, FG_KS, score=measure)
    metric_seconds = time.perf_counter() - start
    per_class = torch.bincount(emb.g_labels, minlength=len(emb.classes))[emb.q_labels].double()  # (Q,) its photos
    chance = {"all": {f"acc@{k}": min(k / emb.g.shape[0], 1.0) for k in FG_KS},
              "class": {f"acc@{k}": float(torch.clamp(k / per_class, max=1.0).mean()) for k in FG_KS}}
    results = {"model": emb.model, "data": emb.data, "split": args.split, "class_split": emb.class_split or None,
               "embeddings": args.embeddings or None, "commit": commit, "task": "fg",
               "scored_by": "relation" if emb.scores is not None else "embedding",
               **{k: v for k, v in (emb.info or {}).items() if k != "task"},
               "num_queries": int(emb.q.shape[0]), "num_gallery": int(emb.g.shape[0]), "num_classes": len(emb.classes),
               "throughput_images_per_s": emb.throughput, "metrics_seconds": metric_seconds,
               "gallery_all": mixed, "gallery_class": own, "chance": chance,
               **({"hashing": hashing} if hashing else {})}
    print(f"fine-grained: {emb.q.shape[0]} query sketches, {emb.g.shape[0]} paired photos, {len(emb.classes)} "
          f"classes; metrics in {metric_seconds:.2f}s")
    print(f"{'gallery':<28}" + "".join(f"{'acc@' + str(k):>8}" for k in FG_KS) + "   chance acc@1")
    for name, res, key in (("all paired photos", mixed, "all"), ("the query's class only", own, "class")):
        print(f"{name:<28}" + "".join(f"{res[f'acc@{k}']:8.4f}" for k in FG_KS) + f"   {chance[key]['acc@1']:.4f}")
    if emb.untrained:
        uq, ug = emb.untrained
        results["untrained"] = {"gallery_all": fine_grained_accuracy(uq, ug, emb.targets, FG_KS, score=measure),
                                "gallery_class": fine_grained_within_class(uq, emb.q_labels, ug, emb.g_labels,
                                                                           emb.targets, FG_KS, score=measure)}
        print("untrained network acc@1: " + ", ".join(f"{r['acc@1']:.4f} ({g[8:]} gallery)"
                                                      for g, r in results["untrained"].items()))
    utils.write_json(os.path.join(out_dir, "results.json"), results)
    print(f"wrote results.json to {out_dir}")
    return results


if __name__ == "__main__":
    utils.run_cli(main, get_args_parser(), (dataset.DataError, PretrainedWeightsUnavailable))
