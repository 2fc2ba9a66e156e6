"""Agreement of metrics.py with the peers' own code, run on the same embeddings (issue 22).

    python bench/bench_peers.py --sem_pcyc /tmp/sem-pcyc --sketch_lvm /tmp/sketch_lvm   # synthetic, 64-d
    python bench/bench_peers.py --sem_pcyc /tmp/sem-pcyc --embeddings emb.pt            # evaluate.py --save_embeddings

--sem_pcyc is a checkout of AnjanDutta/sem-pcyc (e.g. `git archive HEAD | tar -x`); its src/itq.py and
src/utils.py are imported from there at run time, never copied here. --sketch_lvm is a checkout of
aneeshan95/Sketch_LVM at commit 432c504 (the last one with the fine-grained branch); without it that row is
skipped. Each row runs their function and ours on the same arrays and prints the largest |difference|:

  hashing   their compressITQ codes vs metrics.itq_codes(variant="sem-pcyc") (differing bits, bits = D), on the
            embeddings in float64 and in float32 (what their model gives compressITQ); the share of bits that the
            precision alone changes in their code vs metrics.itq_stability; then their apsak / precak on
            exp(-Hamming fraction) of their (float64) codes vs metrics.retrieval_metrics(..., score="hamming",
            protocols=("sem-pcyc",)) on the same codes, packed. Their argsort breaks the ties at place K in some
            order; beside P@K the bench prints the range [min, max] of P@K over every order of the tied photos
            (tie_range, exact) and checks that ours, the mean over those orders, and theirs lie in it.
  float     their apsak / precak on exp(-euclidean) vs retrieval_metrics(..., protocols=("sem-pcyc",)).
  fg        Sketch_LVM's Model.validation_epoch_end (instance_level branch) vs metrics.fine_grained_accuracy.

Shims, all inside this process: numpy >= 1.24 removed np.float, which their apsak uses, so np.float = float
when absent; joblib runs their Parallel(n_jobs=cpu_count) loops with the sequential backend (same calls, one
process). For Sketch_LVM, the modules its model file imports at the top but the instance-level branch does not
use are stubbed in sys.modules: pytorch_lightning (LightningModule = nn.Module that records self.log),
torchmetrics.functional, src.clip (clip.load returns an nn.Identity: no CLIP weights) and experiments.options
(which parses sys.argv at import; replaced by opts with instance_level=True). Their scores are one inline line
each of SEM-PCYC's src/test.py main() (sim = np.exp(-cdist(...))), transcribed here and labelled so.
Embeddings are unit-normalised in float64 for both sides, so that exp(-euclidean) and the cosine rank alike
(a float32 unit vector's norm is 1 only to about 1e-7, enough to reorder near-ties).
"""
import argparse
import contextlib
import importlib.util
import os
import sys
import types

import joblib
import numpy as np
import torch
from scipy.spatial.distance import cdist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import metrics  # noqa: E402
from bench_metrics import make_problem  # noqa: E402  (bench/, this script's folder, is on sys.path)

KS = (100, 200)


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--sem_pcyc", type=str, required=True, help="checkout of AnjanDutta/sem-pcyc (holds src/itq.py)")
    p.add_argument("--sketch_lvm", type=str, default="",
                   help="checkout of aneeshan95/Sketch_LVM at 432c504 (holds src/model_LN_prompt.py); '' skips fg")
    p.add_argument("--embeddings", type=str, default="", help="evaluate.py --save_embeddings file instead of synthetic")
    p.add_argument("--queries", type=int, default=500, help="synthetic query sketches")
    p.add_argument("--gallery", type=int, default=2000, help="synthetic gallery photos")
    p.add_argument("--classes", type=int, default=10, help="synthetic classes")
    p.add_argument("--dim", type=int, default=64, help="synthetic embedding size (= ITQ bits: theirs has none)")
    p.add_argument("--structure", type=float, default=0.3, help="synthetic class-centre strength")
    p.add_argument("--fg_photos", type=int, default=300, help="synthetic fine-grained photos (1-3 sketches each)")
    p.add_argument("--seed", type=int, default=0, help="seed of the synthetic embeddings")
    return p


def load_module(name: str, path: str):
    """Import the file at path as module `name` (their utils.py must not shadow this project's utils.py)."""
    if not os.path.isfile(path):
        sys.exit(f"error: {path} not found; pass the folder of a checkout of the peer's repository")
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def unit64(x) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def synthetic(args):
    """Seeded unit embeddings with class structure (bench_metrics.make_problem's), and fine-grained pairs drawn
    after them from the same generator."""
    gen = torch.Generator().manual_seed(args.seed)
    q, ql, g, gl = make_problem(args, torch.device("cpu"), gen)
    photos = torch.randn(args.fg_photos, args.dim, generator=gen)
    drawn = torch.randint(1, 4, (args.fg_photos,), generator=gen)  # sketches per photo
    target = torch.repeat_interleave(torch.arange(args.fg_photos), drawn)  # (Q_fg,) photo of each sketch
    sketches = photos[target] + torch.randn(len(target), args.dim, generator=gen) * 3.0
    return (unit64(q), ql.numpy(), unit64(g), gl.numpy(),
            torch.nn.functional.normalize(sketches, dim=1), torch.nn.functional.normalize(photos, dim=1)[target])


def from_file(path: str):
    run = torch.load(path, map_location="cpu", weights_only=True)
    q, g = run["queries"].double(), run["gallery"].double()
    fg = None
    if "query_targets" in run:  # Sketch_LVM's gallery: one row per sketch, its own paired photo
        fg = (run["queries"].float(), torch.nn.functional.normalize(run["gallery"].float(), dim=1)
              [run["query_targets"]])
    return unit64(q), run["query_labels"].numpy(), unit64(g), run["gallery_labels"].numpy(), *(fg or (None, None))


def tie_range(dist: np.ndarray, rel: np.ndarray, k: int):
    """Per query (Q,): the relevant items among the first k places (k <= N) that the orders of the tied items
    allow, fewest and most, and their mean over those orders; and whether place k cuts a tie group holding
    relevant items. The tie group at the k-th smallest distance gets the places of the first k that the
    items strictly closer leave, `slots` of its m; of its r relevant items at least slots - (m - r) and at
    most min(r, slots) land there, and slots * r / m on average over its orders."""
    d_k = np.partition(dist, k - 1, axis=1)[:, k - 1:k]  # (Q, 1) k-th smallest distance
    below, at = dist < d_k, dist == d_k
    slots, m, r = k - below.sum(1), at.sum(1), (at & rel).sum(1)  # slots == m when the group fits
    ahead = (below & rel).sum(1)
    lo, hi = ahead + np.maximum(0, slots - (m - r)), ahead + np.minimum(r, slots)
    return lo, hi, ahead + slots * r / m, (slots < m) & (r > 0)


def ours_cat(q, ql, g, gl, score: str):
    res = metrics.retrieval_metrics(torch.as_tensor(q), torch.as_tensor(ql), torch.as_tensor(g), torch.as_tensor(gl),
                                    ks=KS, protocols=("sem-pcyc",), score=score)
    return res["protocols"]["sem-pcyc"]


def theirs_cat(sp_utils, sim, str_sim) -> dict:
    with joblib.parallel_config(backend="sequential"):
        out = {"ap": sp_utils.apsak(sim, str_sim), "ap@200": sp_utils.apsak(sim, str_sim, k=200)}
        for k in KS:
            out[f"p@{k}"] = sp_utils.precak(sim, str_sim, k=k)[0]
    return out


def compare_cat(rows, setting: str, ours: dict, theirs: dict, tie_note: dict | None = None) -> None:
    """Rows of (setting, ours, theirs, largest |diff|, note) for mAP@all, mAP@200 (per query) and P@K (means)."""
    for name, ok, tk, tf in (("mAP@all", "ap", "ap", "apsak(k=None)"), ("mAP@200", "per_query_ap@200", "ap@200",
                                                                        "apsak(k=200)")):
        diff = np.abs(ours[ok].numpy() - theirs[tk])
        note = f"per query; means {ours[ok].mean().item():.6f} vs {theirs[tk].mean():.6f}"
        if tie_note and name == "mAP@200":
            note += tie_note["ap@200"](diff)
        rows.append((setting + " " + name, f"retrieval_metrics {ok}", f"src/utils.py:{tf}", diff.max(), note))
    for k in KS:
        diff = abs(ours[f"p@{k}"] - theirs[f"p@{k}"])
        note = f"means {ours[f'p@{k}']:.6f} vs {theirs[f'p@{k}']:.6f}"
        if tie_note:
            note += tie_note[k](theirs[f"p@{k}"])
        rows.append((f"{setting} P@{k}", f"retrieval_metrics p@{k}", f"src/utils.py:precak(k={k})", diff, note))


def hashing_rows(rows, sp_itq, sp_utils, q, ql, g, gl) -> None:
    bits = q.shape[1]
    if bits % 8:
        rows.append(("64-bit hashing", "-", "-", float("nan"), f"skipped: D = {bits} is not a multiple of 8"))
        return
    their_q, their_g = sp_itq.compressITQ(q, g)  # (Q, D), (N, D) bool: their bits = D
    packed_q, packed_g = np.packbits(their_q, axis=1), np.packbits(their_g, axis=1)
    stability_rows(rows, sp_itq, q, g, (their_q, their_g))
    sim = np.exp(-cdist(their_q, their_g, metric="hamming"))  # src/test.py main(), transcribed
    str_sim = (ql[:, None] == gl[None, :]) * 1  # src/test.py main(), transcribed
    theirs = theirs_cat(sp_utils, sim, str_sim)
    ours = ours_cat(torch.from_numpy(packed_q), ql, torch.from_numpy(packed_g), gl, score="hamming")
    dist = metrics.hamming_distance(torch.from_numpy(packed_q), torch.from_numpy(packed_g)).numpy()
    rel = str_sim.astype(bool)
    n = dist.shape[1]
    ties = {k: tie_range(dist, rel, min(k, n)) for k in (*KS, 200)}

    def p_note(k):
        valid = rel.any(1)  # ours averages the queries with R > 0; precak all of them, R = 0 ones as 0

        def note(their_p):
            lo, hi, mean = (x[valid].mean() / min(k, n) for x in ties[k][:3])  # P@K = hits / min(K, N), as prec's
            slack = 1e-12  # float64 means of at most a few thousand ratios: far below the 1/(Q K) steps of P@K
            span = [lo, hi] if valid.all() else [x.mean() / min(k, n) for x in ties[k][:2]]
            text = (f"; any order of the ties allows [{lo:.6f}, {hi:.6f}]: ours "
                    f"{'within' if lo - slack <= ours[f'p@{k}'] <= hi + slack else 'OUTSIDE'} (the mean over the "
                    f"orders, {mean:.6f}: {'yes' if abs(ours[f'p@{k}'] - mean) <= slack else 'NO'}), theirs "
                    f"{'within' if span[0] - slack <= their_p <= span[1] + slack else 'OUTSIDE'}")
            if not valid.all():
                skipped = int((~valid).sum())
                text += (f" [{span[0]:.6f}, {span[1]:.6f}] (their mean also counts the {skipped} "
                         f"quer{'y' if skipped == 1 else 'ies'} without a relevant photo, as 0)")
            return text + f"; {int(ties[k][3].sum())} queries cut a tie group holding relevant items at {k}"
        return note

    def ap_note(diff):
        cut = ties[200][3]
        off = diff > 1e-12
        return (f"; {int(off.sum())} queries differ, all among the {int(cut.sum())} whose top 200 cuts a tie group"
                f" holding relevant items: {'yes' if not (off & ~cut).any() else 'NO'}")

    compare_cat(rows, f"{bits}-bit Hamming", ours, theirs, {"ap@200": ap_note, **{k: p_note(k) for k in KS}})


def differing_bits(a: tuple, b: tuple) -> int:
    """Bits that differ between two (queries, gallery) code pairs, each (n, bits) bool or (n, bits / 8) packed."""
    def unpacked(x):
        x = np.asarray(x)
        return np.unpackbits(x, axis=1).astype(bool) if x.dtype == np.uint8 else x.astype(bool)
    return int(sum((unpacked(x) != unpacked(y)).sum() for x, y in zip(a, b)))


def stability_rows(rows, sp_itq, q, g, their64) -> None:
    """Their codes against ours in float64 (what the rows below rank) and in float32 (what their model feeds
    compressITQ in src/test.py), and how many bits the precision alone changes, in their code and by
    metrics.itq_stability."""
    bits, total = q.shape[1], (len(q) + len(g)) * q.shape[1]
    q32, g32 = q.astype(np.float32), g.astype(np.float32)
    for name, (a, b), theirs in (("", (q, g), their64), (", float32", (q32, g32), sp_itq.compressITQ(q32, g32))):
        ours = metrics.itq_codes(torch.from_numpy(a), torch.from_numpy(b), bits=bits, variant="sem-pcyc")
        rows.append((f"{bits}-bit codes{name}", "itq_codes(variant='sem-pcyc')", "src/itq.py:compressITQ",
                     differing_bits(theirs, tuple(x.numpy() for x in ours)),
                     f"differing bits of {total}; embeddings in {a.dtype}"))
        if name:
            their_from64 = sp_itq.compressITQ(q32.astype(np.float64), g32.astype(np.float64))
            theirs_changed = differing_bits(theirs, their_from64) / total
            ours_changed = metrics.itq_stability(torch.from_numpy(a), torch.from_numpy(b), bits, "sem-pcyc")
            rows.append((f"{bits}-bit code stability", "itq_stability(variant='sem-pcyc')",
                         "compressITQ on float32 vs float64", abs(ours_changed - theirs_changed),
                         f"bits changed by the embeddings' precision alone: {ours_changed:.6f} vs "
                         f"{theirs_changed:.6f} of {total}; metrics.ITQ_UNSTABLE = {metrics.ITQ_UNSTABLE}"))


def fine_grained_rows(rows, lvm_dir: str, sketches: torch.Tensor, gallery_all: torch.Tensor) -> None:
    """Sketch_LVM's instance-level rank, by calling their Model.validation_epoch_end on stubs of its imports."""
    path = os.path.join(lvm_dir, "src", "model_LN_prompt.py")
    logged = {}

    class LightningModule(torch.nn.Module):
        device = torch.device("cpu")

        def log(self, name, value):
            logged[name] = float(value)

    stubs = {"pytorch_lightning": types.SimpleNamespace(LightningModule=LightningModule),
             "torchmetrics": types.ModuleType("torchmetrics"),
             "torchmetrics.functional": types.SimpleNamespace(retrieval_average_precision=None),
             "src": types.ModuleType("src"),
             "src.clip": types.SimpleNamespace(clip=types.SimpleNamespace(
                 load=lambda name, device=None: (torch.nn.Identity(), None))),
             "experiments": types.ModuleType("experiments"),
             "experiments.options": types.SimpleNamespace(opts=types.SimpleNamespace(
                 instance_level=True, n_prompts=3, prompt_dim=768))}
    saved = {name: sys.modules.get(name) for name in stubs}
    sys.modules.update(stubs)
    try:
        model = load_module("sketch_lvm_model_LN_prompt", path).Model()
    finally:
        for name, module in saved.items():
            if module is None:
                sys.modules.pop(name)
            else:
                sys.modules[name] = module
    batch = 32  # their DataLoader's default batch size; the method concatenates the batches
    outputs = [(sketches[s:s + batch], gallery_all[s:s + batch], ["c"] * len(sketches[s:s + batch]))
               for s in range(0, len(sketches), batch)]
    with torch.no_grad(), contextlib.redirect_stdout(open(os.devnull, "w")):
        model.validation_epoch_end(outputs)
    ours = metrics.fine_grained_accuracy(sketches, gallery_all, torch.arange(len(sketches)), ks=(1, 10))
    n = len(sketches)
    for key, theirs_key in (("acc@1", "top1"), ("acc@10", "top10"), ("mean_rank", "meanK")):
        what = "rank sum" if key == "mean_rank" else "queries"  # their float32 mean times n, rounded: an integer
        rows.append((f"fine-grained {key}", f"fine_grained_accuracy {key}",
                     f"src/model_LN_prompt.py:Model.validation_epoch_end {theirs_key}",
                     abs(ours[key] - logged[theirs_key]),
                     f"{ours[key]:.6f} vs {logged[theirs_key]:.6f} (theirs a float32 mean); {what} "
                     f"{round(ours[key] * n)} vs {round(logged[theirs_key] * n)}; {n} sketches, gallery one "
                     "paired photo per sketch (duplicates as theirs)"))


def main(args) -> None:
    if not hasattr(np, "float"):
        np.float = float  # shim: their apsak allocates with np.float, removed in numpy 1.24
    sp_itq = load_module("sem_pcyc_itq", os.path.join(args.sem_pcyc, "src", "itq.py"))
    sp_utils = load_module("sem_pcyc_utils", os.path.join(args.sem_pcyc, "src", "utils.py"))
    if args.embeddings:
        q, ql, g, gl, fg_q, fg_g = from_file(args.embeddings)
        source = f"{args.embeddings}"
    else:
        q, ql, g, gl, fg_q, fg_g = synthetic(args)
        source = f"synthetic, seed {args.seed}"
    print(f"numpy {np.__version__}, torch {torch.__version__}; {source}: {len(q)} queries x {len(g)} gallery, "
          f"{q.shape[1]}-d, {len(np.unique(ql))} query classes")
    rows = []
    hashing_rows(rows, sp_itq, sp_utils, q, ql, g, gl)
    sim = np.exp(-cdist(q, g, metric="euclidean"))  # src/test.py main(), transcribed
    str_sim = (ql[:, None] == gl[None, :]) * 1
    compare_cat(rows, "float", ours_cat(q, ql, g, gl, score="cosine"), theirs_cat(sp_utils, sim, str_sim))
    rows.append(("GZS composition", "dataset.sample_seen", "src/test.py:main (inline)", float("nan"),
                 "not run: inline in main(), needs their data folders and config.ini; same rule (int(0.2 * n) "
                 "sorted unique seen files, choice without replacement, sorted), other generator"))
    if args.sketch_lvm and fg_q is not None:
        fine_grained_rows(rows, args.sketch_lvm, fg_q, fg_g)
    else:
        rows.append(("fine-grained", "fine_grained_accuracy", "src/model_LN_prompt.py", float("nan"),
                     "skipped: " + ("no --sketch_lvm" if not args.sketch_lvm else "the file has no query_targets")))
    widths = [max(len(str(r[i])) for r in rows) for i in range(3)]
    print(f"{'setting':<{widths[0]}} | {'ours (metrics.py)':<{widths[1]}} | {'theirs (file:function)':<{widths[2]}}"
          " | largest |diff| | note")
    for setting, ours, theirs, diff, note in rows:
        shown = "-" if np.isnan(diff) else f"{diff:.3g}"
        print(f"{setting:<{widths[0]}} | {ours:<{widths[1]}} | {theirs:<{widths[2]}} | {shown:>14} | {note}")


if __name__ == "__main__":
    main(get_args_parser().parse_args())
