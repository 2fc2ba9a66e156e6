"""Agreement of metrics.py (issue 22) and of model.py's Sketch_LVM (issue 31) with the peers' own code, run on the
same embeddings / the same random weights.

    python bench/bench_peers.py --sem_pcyc /tmp/sem-pcyc --sketch_lvm /tmp/sketch_lvm   # synthetic, 64-d
    python bench/bench_peers.py --sem_pcyc /tmp/sem-pcyc --embeddings emb.pt            # evaluate.py --save_embeddings
    python bench/bench_peers.py --sketch_lvm_ca33be9 /tmp/slvm_ca                       # the model table only

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

--sketch_lvm_ca33be9 is a checkout of aneeshan95/Sketch_LVM at ca33be9 (`git archive ca33be9 src experiments`;
its src/clip/model.py must append the prompts, as from 0244c16 on). Their src/clip/model.py is imported by path;
their src/model_LN_prompt.py with the stubs above, except that clip.load builds their CLIP of ViT-B/32's shapes
with seeded random weights through their build_model and `.float()` (as clip.load on the CPU; no download), and
opts holds experiments/options.py's values at ca33be9. Their Model() is built (it freezes with
freeze_all_but_bn); ours is what train.py builds for configs/sketch_lvm_clip_vit_b32.yaml
(train.build_model_and_optimizer: model.SketchLVMNet frozen and grouped by methods.SketchLVM) with the same weights
(their clip.visual state, loaded strictly into open_clip's ViT-B-32-quickgelu tower; sk_prompt / img_prompt as
prompts[0] / prompts[1]). The model table compares: what trains (names and counts), the embeddings of a
sketch and a photo batch (float32 in training and eval mode, float64), the training loss on one batch
(their training_step against methods.SketchLVM.losses, as train.py's step calls it), the gradients after its
backward, the optimizer groups (their configure_optimizers against the optimizer train.py builds) and one Adam
step. Float32
differences come from kernels, not arithmetic: the float64 row agrees to rounding, and the train-mode row locates
the first difference (open_clip's batch_first attention sees another memory layout than theirs).
"""
import argparse
import contextlib
import importlib
import importlib.util
import os
import sys
import types

import joblib
import numpy as np
import torch
from scipy.spatial.distance import cdist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import methods  # noqa: E402
import metrics  # noqa: E402
import model as M  # noqa: E402
import train  # noqa: E402
from bench_metrics import make_problem  # noqa: E402  (bench/, this script's folder, is on sys.path)

KS = (100, 200)


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--sem_pcyc", type=str, default="",
                   help="checkout of AnjanDutta/sem-pcyc (holds src/itq.py); '' skips the metrics table")
    p.add_argument("--sketch_lvm", type=str, default="",
                   help="checkout of aneeshan95/Sketch_LVM at 432c504 (holds src/model_LN_prompt.py); '' skips fg")
    p.add_argument("--sketch_lvm_ca33be9", type=str, default="",
                   help="checkout of aneeshan95/Sketch_LVM at ca33be9 (src/clip/model.py appends the prompts): "
                        "their model beside model.PromptedCLIP; '' skips the model table")
    p.add_argument("--lvm_images", type=int, default=4, help="images per batch in the model table (224 px)")
    p.add_argument("--zse_sbir_88f87f7", type=str, default="",
                   help="checkout of buptLinfy/ZSE-SBIR at 88f87f7 (holds model/*.py, utils/loss.py): their model "
                        "beside model.ZSESBIRNet as train.py builds it; '' skips that table")
    p.add_argument("--zse_items", type=int, default=2, help="quadruplets (4 images each, 224 px) in the ZSE-SBIR table")
    p.add_argument("--embeddings", type=str, default="", help="evaluate.py --save_embeddings file instead of synthetic")
    p.add_argument("--queries", type=int, default=500, help="synthetic query sketches")
    p.add_argument("--gallery", type=int, default=2000, help="synthetic gallery photos")
    p.add_argument("--classes", type=int, default=10, help="synthetic classes")
    p.add_argument("--dim", type=int, default=64, help="synthetic embedding size (= ITQ bits: theirs has none)")
    p.add_argument("--structure", type=float, default=0.3, help="synthetic class-centre strength")
    p.add_argument("--fg_photos", type=int, default=300, help="synthetic fine-grained photos (1-3 sketches each)")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the synthetic embeddings, and of the model table's weights and images")
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


def import_with_stubs(name: str, path: str, stubs: dict):
    """Import the file at path as module `name` with `stubs` in sys.modules while it runs its imports; whatever
    those names were before is put back afterwards (a stub `src` would shadow any other package of that name)."""
    saved = {key: sys.modules.get(key) for key in stubs}
    sys.modules.update(stubs)
    try:
        return load_module(name, path)
    finally:
        for key, module in saved.items():
            if module is None:
                sys.modules.pop(key)
            else:
                sys.modules[key] = module


def lightning_stub(logged: dict):
    """pytorch_lightning with the three members Sketch_LVM's Model reads: LightningModule's device (cpu, as in its
    __init__ before Lightning moves it), log (recorded into `logged`) and global_step."""
    class LightningModule(torch.nn.Module):
        device = torch.device("cpu")
        global_step = 0

        def log(self, name, value, *args, **kwargs):
            logged[name] = float(value.detach() if torch.is_tensor(value) else value)

    return types.SimpleNamespace(LightningModule=LightningModule)


def lvm_stubs(logged: dict, load, opts: dict) -> dict:
    """sys.modules entries for the imports at the top of Sketch_LVM's src/model_LN_prompt.py: Lightning,
    torchmetrics.functional (only validation_epoch_end calls it), src.clip with `load` as clip.load, and
    experiments.options (which parses sys.argv at import) holding `opts`."""
    return {"pytorch_lightning": lightning_stub(logged),
            "torchmetrics": types.ModuleType("torchmetrics"),
            "torchmetrics.functional": types.SimpleNamespace(retrieval_average_precision=None),
            "src": types.ModuleType("src"),
            "src.clip": types.SimpleNamespace(clip=types.SimpleNamespace(load=load)),
            "experiments": types.ModuleType("experiments"),
            "experiments.options": types.SimpleNamespace(opts=types.SimpleNamespace(**opts))}


def fine_grained_rows(rows, lvm_dir: str, sketches: torch.Tensor, gallery_all: torch.Tensor) -> None:
    """Sketch_LVM's instance-level rank, by calling their Model.validation_epoch_end on stubs of its imports."""
    path = os.path.join(lvm_dir, "src", "model_LN_prompt.py")
    logged = {}
    stubs = lvm_stubs(logged, lambda name, device=None: (torch.nn.Identity(), None),
                      dict(instance_level=True, n_prompts=3, prompt_dim=768))
    model = import_with_stubs("sketch_lvm_model_LN_prompt", path, stubs).Model()
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


# Sketch_LVM at ca33be9, category level. Their CLIP(...) arguments for ViT-B/32 (OpenAI's shapes, which their
# build_model reads off the weights) and their experiments/options.py values at ca33be9 (lines 22, 23, 31, 32).
VIT_B32 = dict(embed_dim=512, image_resolution=224, vision_layers=12, vision_width=768, vision_patch_size=32,
               context_length=77, vocab_size=49408, transformer_width=512, transformer_heads=8, transformer_layers=12)
LVM_OPTS = dict(clip_LN_lr=1e-6, prompt_lr=1e-4, prompt_dim=768, n_prompts=3)
APPENDED = "torch.cat([x, prompt], dim=1)"  # src/clip/model.py:231 from 0244c16 on; before it, [prompt, x]
U32, U64 = 2.0 ** -24, 2.0 ** -53  # unit roundoffs
GRADS = ("prompts[0]", "prompts[1]", "visual.transformer.resblocks.0.ln_1.weight", "visual.proj",
         "visual.transformer.resblocks.0.attn.in_proj_weight", "visual.transformer.resblocks.11.attn.in_proj_weight")


def their_clip_load(clip_module, seed: int):
    """clip.load as their Model calls it, without the download: their CLIP of ViT-B/32's shapes with seeded random
    weights, noise on every image-tower weight (the init leaves layer norms at 1 and 0 and attention biases at 0,
    where a weight loaded into the wrong place would go unseen), through their build_model (half precision for the
    linear maps and proj, as OpenAI's archive holds them) and clip.py:140-141's `.float()` on the CPU."""
    def load(name, device="cpu"):
        assert name == "ViT-B/32", name
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            ref = clip_module.CLIP(**VIT_B32)
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in ref.visual.parameters():
                p.add_(0.05 * torch.randn(p.shape, generator=g))
        model = clip_module.build_model(ref.state_dict()).to(device)
        if str(device) == "cpu":
            model.float()
        return model, None
    return load


def sketch_lvm_pair(lvm_dir: str, seed: int):
    """Their Model() (ca33be9, on stubs of its imports) and ours with its weights: their clip.visual's state,
    loaded strictly into open_clip's ViT-B-32-quickgelu tower (model.build_clip_trunk), their sk_prompt /
    img_prompt as prompts[0] / prompts[1], frozen by model.freeze_as_sketch_lvm (theirs froze itself in
    __init__). Returns (their model module, their clip/model.py, their Model, ours, what they logged)."""
    clip_path = os.path.join(lvm_dir, "src", "clip", "model.py")
    clip_module = load_module("sketch_lvm_ca33be9_clip_model", clip_path)
    with open(clip_path, encoding="utf-8") as f:
        if APPENDED not in f.read():
            sys.exit(f"error: {clip_path} does not append the prompts ({APPENDED}): it is Sketch_LVM before "
                     "0244c16; pass a checkout at ca33be9")
    logged = {}
    stubs = lvm_stubs(logged, their_clip_load(clip_module, seed), LVM_OPTS)
    lvm = import_with_stubs("sketch_lvm_ca33be9_model_LN_prompt",
                            os.path.join(lvm_dir, "src", "model_LN_prompt.py"), stubs)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        theirs = lvm.Model()  # its prompts: torch.randn on the global generator
    net, optimizer, args = ours_as_train_builds_it()
    net.prompted.visual.load_state_dict(theirs.clip.visual.state_dict())  # strict: the same names and shapes
    with torch.no_grad():
        net.prompted.prompts[0].copy_(theirs.sk_prompt)
        net.prompted.prompts[1].copy_(theirs.img_prompt)
    net.normalize = torch.nn.Identity()  # the images here are random, already "normalised", for both
    return lvm, clip_module, theirs, Ours(net=net, optimizer=optimizer, args=args), logged


class Ours(types.SimpleNamespace):
    """Our side, as train.py builds it: the network (model.SketchLVMNet), its optimizer and the arguments."""


def ours_as_train_builds_it():
    """train.py's network and optimizer for configs/sketch_lvm_clip_vit_b32.yaml on random weights
    (train.build_model_and_optimizer: methods.SketchLVM freezes what their code freezes and builds the Adam groups)."""
    args = train.get_args_parser().parse_args(["--data_dir", "-", "--recipe", "sketch_lvm_clip_vit_b32",
                                               "--no-pretrained", "--device", "cpu"])
    train.check_args(args)
    assert args.lr == LVM_OPTS["clip_LN_lr"] and args.prompt_lr == LVM_OPTS["prompt_lr"], "the config's rates"
    net, optimizer = train.build_model_and_optimizer(args, 0, torch.device("cpu"))
    return net, optimizer, args


def their_named(theirs) -> dict:
    """Their image tower's parameters and prompts, under our names."""
    named = {f"visual.{n}": p for n, p in theirs.clip.visual.named_parameters()}
    named.update({"prompts[0]": theirs.sk_prompt, "prompts[1]": theirs.img_prompt})
    return named


def our_named(ours) -> dict:
    """Our parameters, the (domains, P, W) prompts split into one (P, W) view per domain."""
    named = {n: p for n, p in ours.named_parameters() if n != "prompts"}
    named.update({f"prompts[{d}]": ours.prompts[d] for d in range(len(ours.prompts))})
    return named


def trainable(named: dict) -> dict:
    return {n: p.numel() for n, p in named.items() if p.requires_grad}


def trainable_rows(rows, lvm, theirs, ours) -> None:
    """What trains on either side; their freeze function on our tower; the paper's wording's count."""
    ours = ours.net.prompted
    t, o = trainable(their_named(theirs)), trainable(our_named(ours))
    text = sum(p.numel() for n, p in theirs.clip.named_parameters() if p.requires_grad and not n.startswith("visual"))
    rows.append(("trainable parameters", "train.py's SketchLVM", "model_LN_prompt.py:27 + prompts",
                 len(set(t) ^ set(o)), f"names in one set only: {sorted(set(t) ^ set(o))[:4]}; tensors {len(o)} vs "
                 f"{len(t)}; values {sum(o.values()):,} vs {sum(t.values()):,} (expected 21,733,632 + 4,608 = "
                 f"21,738,240); their text tower keeps requires_grad on {text:,} more, which no loss reaches"))
    flags = [(p, p.requires_grad) for p in ours.parameters()]
    ours.requires_grad_(True)
    ours.visual.apply(lvm.freeze_all_but_bn)  # theirs: self.clip.apply(freeze_all_but_bn)
    their_rule = trainable(our_named(ours))
    ours.requires_grad_(True)
    M.freeze_all_but_layer_norms(ours.visual)
    norms = trainable(our_named(ours))
    for p, flag in flags:
        p.requires_grad_(flag)
    rows.append(("freeze rule, one tower", "freeze_as_sketch_lvm(PromptedCLIP)", "model_LN_prompt.py:14-19",
                 len(set(their_rule) ^ set(o)), f"their freeze_all_but_bn applied to our open_clip tower: "
                 f"{sum(their_rule.values()):,} vs ours {sum(o.values()):,}"))
    prompts = sum(v for n, v in norms.items() if n.startswith("prompts"))
    rows.append(("LayerNorm-only (paper's wording)", "freeze_all_but_layer_norms(visual)", "-", float("nan"),
                 f"{sum(norms.values()):,} = {sum(norms.values()) - prompts:,} in "
                 f"{sum(n.endswith('.weight') for n in norms)} layer norms + {prompts:,} prompts; their code trains "
                 f"{sum(t.values()):,}"))


def reordering_atol(h: torch.Tensor, proj: torch.Tensor, u: float, layers: int = 12, width: int = 768,
                    patch: int = 32, tokens: int = 53) -> float:
    """The largest difference between two computations of one ViT embedding h @ proj that sum in other orders
    (tests/test_clip.py's bound, for unit roundoff u): a sum of K terms in any order is within (K - 1) u of the
    exact one relative to the sum of its terms' magnitudes (Higham 2002, section 4.2), carried through layer norm,
    residuals and linear maps to first order, so 2 S K u max_j sum_i |h_i| |proj_ij|: K the longest sum (a patch's
    3 p^2 pixels, the MLP's 4 W units, the tokens), S the sums on a value's path (4 before the blocks, 13 in each,
    3 after)."""
    sums = 4 + 13 * layers + 3
    return 2 * sums * max(3 * patch ** 2, 4 * width, tokens) * u * (h.abs() @ proj.abs()).max().item()


def embeddings(theirs, ours, sk: torch.Tensor, img: torch.Tensor) -> dict:
    """Ours and theirs, (2B, E): the sketches with the sketch prompts, the photos with the photo prompts; their
    ln_post output h (2B, W), for the bound; and how often torch's fused attention kernel ran."""
    out, fused, native = {}, [0], torch._native_multi_head_attention

    def counted(*args, **kwargs):
        fused[0] += 1
        return native(*args, **kwargs)
    hook = theirs.clip.visual.ln_post.register_forward_hook(lambda m, i, o: out.setdefault("h", []).append(o))
    torch._native_multi_head_attention = counted
    try:
        with torch.no_grad():
            out["ours"] = torch.cat([ours(sk, 0), ours(img, 1)])
            out["fused_ours"], fused[0] = fused[0], 0
            out["theirs"] = torch.cat([theirs(sk, dtype="sketch"), theirs(img, dtype="image")])
            out["fused_theirs"] = fused[0]
    finally:
        torch._native_multi_head_attention = native
        hook.remove()
    out["h"] = torch.cat(out["h"])
    return out


def embedding_row(rows, setting: str, e: dict, proj: torch.Tensor, note: str) -> None:
    o, t = e["ours"], e["theirs"]
    diff, largest = (o - t).abs().max().item(), t.abs().max().item()
    u = U64 if o.dtype == torch.float64 else U32
    atol = reordering_atol(e["h"], proj.to(o.dtype), u)
    rows.append((setting, "PromptedCLIP(x, 0 | 1)", "Model.forward(x, 'sketch' | 'image')", diff,
                 f"{tuple(o.shape)} {o.dtype}; relative to the largest |value| {largest:.3g}: {diff / largest:.3g} "
                 f"= {diff / largest / u:.3g} u; within the reordering bound {atol:.3g}: "
                 f"{'yes' if diff <= atol else 'NO'}; fused attention calls {e['fused_ours']} vs "
                 f"{e['fused_theirs']}; {note}"))


def first_difference(theirs, ours, sk: torch.Tensor) -> str:
    """Where the two float32 forwards part, block 0 taken apart: ln_pre, ln_1, then attention on equal inputs."""
    seen = {}

    def keep(key, to_bld):
        return lambda m, i, o: seen.__setitem__(key, (o[0] if isinstance(o, tuple) else o).transpose(0, to_bld))
    hooks = []
    for side, v, to_bld in (("t", theirs.clip.visual, 1), ("o", ours.visual, 0)):  # theirs runs (L, B, D)
        for name, m in (("ln_pre", v.ln_pre), ("ln_1", v.transformer.resblocks[0].ln_1),
                        ("attn", v.transformer.resblocks[0].attn)):
            hooks.append(m.register_forward_hook(keep(side + name, to_bld if name != "ln_pre" else 0)))
    with torch.no_grad():
        ours(sk, 0), theirs(sk, dtype="sketch")
        for h in hooks:
            h.remove()
        x = seen["tln_1"].transpose(0, 1)  # their block-0 attention input, contiguous (L, B, D)
        moved = ours.visual.transformer.resblocks[0].attn(*(x.transpose(0, 1),) * 3, need_weights=False)[0]
    d = {k: (seen["o" + k] - seen["t" + k]).abs().max().item() for k in ("ln_pre", "ln_1", "attn")}
    return (f"block 0, ours - theirs: ln_pre {d['ln_pre']:.3g}, ln_1 {d['ln_1']:.3g}, attention {d['attn']:.3g}; our "
            f"attention module given their input's memory layout (contiguous (L, B, D)) instead of a (L, B, D) view "
            f"of (B, L, D) as open_clip's batch_first MHA makes: {(moved - seen['tattn']).abs().max().item():.3g}")


def embedding_rows(rows, clip_module, theirs, ours, sk: torch.Tensor, img: torch.Tensor) -> None:
    """Both in training mode (as Lightning's fit runs them; no dropout anywhere), then eval mode (evaluation),
    then float64. Their LayerNorm subclass computes in float32 for fp16 weights: in float64 its modules run as
    torch's LayerNorm, its base class, which is what it computes."""
    proj = theirs.clip.visual.proj.detach()
    theirs.train(), ours.train()
    embedding_row(rows, "embeddings, float32", embeddings(theirs, ours, sk, img), proj,
                  "train mode (as their fit); " + first_difference(theirs, ours, sk))
    theirs.eval(), ours.eval()
    embedding_row(rows, "embeddings, float32, eval", embeddings(theirs, ours, sk, img), proj,
                  "eval mode, no_grad: open_clip's batch_first attention takes torch's fused kernel, theirs "
                  "(not batch_first) cannot")
    swapped = [m for m in theirs.modules() if isinstance(m, clip_module.LayerNorm)]
    for m in swapped:
        m.__class__ = torch.nn.LayerNorm
    theirs.train().double(), ours.train().double()
    try:
        embedding_row(rows, "embeddings, float64", embeddings(theirs, ours, sk.double(), img.double()), proj,
                      "train mode: the same arithmetic, to float64's rounding")
    finally:  # float32 -> float64 -> float32 gives the same numbers back
        theirs.float(), ours.float()
        for m in swapped:
            m.__class__ = clip_module.LayerNorm


def grads(theirs, ours) -> tuple[dict, dict]:
    t = {n: p.grad for n, p in their_named(theirs).items() if p.grad is not None}
    o = {n: p.grad for n, p in ours.named_parameters() if n != "prompts" and p.grad is not None}
    o.update({f"prompts[{d}]": ours.prompts.grad[d] for d in range(len(ours.prompts))})
    return o, t


def training_rows(rows, theirs, our_side: Ours, batch: tuple, logged: dict) -> None:
    """One training step of each: the loss (ours: methods.SketchLVM.losses, as train.py's step calls it), its
    gradients, the optimizer groups and one Adam step."""
    sk, img, neg = batch
    ours = our_side.net.prompted
    theirs.train(), our_side.net.train()
    loss_t = theirs.training_step((sk, img, neg, ["c"] * len(sk)), 0)
    loss_o = methods.get("sketch_lvm").losses(our_side.net, M.Triplets(sk, img, neg), 0.0, our_side.args)["loss"]
    with torch.no_grad():
        a, p, n = ours(sk, 0), ours(img, 1), ours(neg, 1)
    active = int(((torch.cosine_similarity(a, n) - torch.cosine_similarity(a, p) + 0.2) > 0).sum())
    rows.append(("training loss", "methods.SketchLVM.losses (train.py's step)",
                 "Model.training_step", abs(loss_o.item() - loss_t.item()),
                 f"{loss_o.item():.9g} vs {loss_t.item():.9g} (logged train_loss {logged['train_loss']:.9g}); "
                 f"{active} of {len(sk)} triplets inside the margin"))
    same = theirs.loss_fn(a.detach(), p.detach(), n.detach()) - M.cosine_triplet_loss(a.detach(), p.detach(),
                                                                                       n.detach())
    rows.append(("loss function, same input", "cosine_triplet_loss(a, p, n)", "Model.loss_fn(a, p, n)",
                 abs(same.item()), f"on our embeddings above; in ulps of the float32 loss "
                 f"{abs(same.item()) / np.spacing(np.float32(loss_o.item())):.3g} (theirs adds margin + d_pos - "
                 "d_neg, ours d_pos - d_neg + margin)"))
    loss_t.backward()
    loss_o.backward()
    o, t = grads(theirs, ours)
    for name in GRADS:
        diff = (o[name] - t[name]).abs().max().item()
        rows.append((f"gradient {name}", "loss.backward()", "loss.backward()", diff,
                     f"relative to the largest |grad| {t[name].abs().max().item():.3g}: "
                     f"{diff / t[name].abs().max().item():.3g}"))
    common = [k for k in t if k in o]
    largest = max((o[k] - t[k]).abs().max().item() for k in common)
    worst = max((o[k] - t[k]).abs().max().item() / t[k].abs().max().item() for k in common)
    rows.append(("gradients, every tensor", "loss.backward()", "loss.backward()", largest,
                 f"tensors with a gradient {len(o)} vs {len(t)}, the same names: {set(o) == set(t)}; largest "
                 f"|diff| relative to the tensor's largest |grad|: {worst:.3g}"))
    optimizer_rows(rows, theirs, our_side)


def optimizer_rows(rows, theirs, our_side: Ours) -> None:
    """Their configure_optimizers() against the optimizer train.py builds (methods.SketchLVM.optimizer): each
    group's lr, its tensors, those that received a gradient, the other settings; then one step of each (ours at
    the rates train.py's step sets: lr_at times lr_mult), compared parameter by parameter."""
    ours, opt_o = our_side.net.prompted, our_side.optimizer
    for group in opt_o.param_groups:  # as train.train_step sets them
        group["lr"] = methods.get("sketch_lvm").lr_at(0.0, our_side.args) * group["lr_mult"]
    opt_t = theirs.configure_optimizers()
    for i, (gt, go) in enumerate(zip(opt_t.param_groups, opt_o.param_groups)):
        settings_t, settings_o = ({k: v for k, v in g.items() if k not in ("params", "name", "lr_mult")}
                                  for g in (gt, go))
        got_t, got_o = ([q for q in g["params"] if q.grad is not None] for g in (gt, go))
        rows.append((f"optimizer group {i} ({go['name']})", f"{type(opt_o).__name__} lr {go['lr']:g}",
                     f"configure_optimizers lr {gt['lr']:g}", abs(go["lr"] - gt["lr"]),
                     f"tensors {len(go['params'])} vs {len(gt['params'])}, of which with a gradient {len(got_o)} "
                     f"({sum(q.numel() for q in got_o):,} values) vs {len(got_t)} "
                     f"({sum(q.numel() for q in got_t):,}); {type(opt_o).__name__} vs {type(opt_t).__name__}, other "
                     f"settings the same: {settings_t == settings_o} (weight_decay {gt['weight_decay']}, betas "
                     f"{gt['betas']}, eps {gt['eps']})"))
    g_o, g_t = grads(theirs, ours)
    before = {k: v.detach().clone() for k, v in our_named(ours).items()}
    opt_t.step()
    opt_o.step()
    o, t = our_named(ours), their_named(theirs)
    frozen_moved = sum(not torch.equal(x[k], before[k]) for x in (o, t) for k in before if k not in g_o)
    diff, worst = 0.0, 0.0
    for k in g_o:  # the trainable tensors: each value's two steps against what their two gradients allow
        lr = LVM_OPTS["prompt_lr"] if k.startswith("prompts") else LVM_OPTS["clip_LN_lr"]
        d = (o[k] - t[k]).abs()
        bound = adam_first_step_bound(g_o[k], g_t[k], lr, opt_o.defaults["eps"]) + U32 * (2 * before[k].abs() + 18 * lr)
        diff, worst = max(diff, d.max().item()), max(worst, (d / bound).max().item())
    rows.append(("after one Adam step", "train.py's optimizer .step()", "configure_optimizers().step()", diff,
                 f"{len(g_o)} trained tensors; {diff / LVM_OPTS['clip_LN_lr']:.3g} CLIP lr; largest share of what "
                 f"their gradient differences allow (adam_first_step_bound): {worst:.3g} "
                 f"({'within' if worst <= 1 else 'OUTSIDE'}); frozen tensors that moved: {frozen_moved}"))


def adam_first_step_bound(g1: torch.Tensor, g2: torch.Tensor, lr: float, eps: float) -> torch.Tensor:
    """How far apart Adam's first steps from two gradients of one parameter can be. The first step is
    -lr g / (|g| + eps) (bias-corrected m = g, sqrt(v) = |g|), and g / (|g| + eps) has slope eps / (|g| + eps)^2:
    two gradients of one sign step within lr eps |g1 - g2| / (min |g| + eps)^2, of opposite signs (or zero)
    within 2 lr. Where |g| is near eps (1e-8), float32's differences in the gradients move the step by a good part
    of lr. The caller adds float32's rounding: about 8 roundings in each side's step (a share u of lr each) and one
    in each update (u |p|)."""
    same = (g1 * g2) > 0
    smooth = lr * eps * (g1 - g2).abs() / (torch.minimum(g1.abs(), g2.abs()) + eps) ** 2
    return torch.where(same, torch.minimum(smooth, torch.full_like(smooth, 2 * lr)), torch.full_like(smooth, 2 * lr))


def sketch_lvm_rows(lvm_dir: str, seed: int, images: int) -> list:
    lvm, clip_module, theirs, ours, logged = sketch_lvm_pair(lvm_dir, seed)
    g = torch.Generator().manual_seed(seed)
    sk, img, neg = torch.randn(3, images, 3, 224, 224, generator=g)  # already "normalised" images
    rows = []
    trainable_rows(rows, lvm, theirs, ours)
    embedding_rows(rows, clip_module, theirs, ours.net.prompted, sk, img)
    training_rows(rows, theirs, ours, (sk, img, neg), logged)
    return rows


ZSE_ARGS = dict(d_model=768, cls_number=100, pretrained=False, head=8, number=1, d_ff=1024, anchor_number=49)
ZSE_GRADS = ("vit.class_token", "stem.convs.0.weight", "vit.encoder.layers.encoder_layer_0.ln_1.weight",
             "sketch_side.attention.in_proj_weight", "photo_side.norm1.weight", "relation.conv.weight",
             "relation.mlp.0.weight")


def zse_sbir_pair(zse_dir: str, seed: int, items: int):
    """Their Model (88f87f7: model/*.py imported as a package under another name, options.py stubbed: model.py
    imports it and never uses it) with seeded random weights and noise on every parameter, their utils/loss.py, and
    ours as train.py builds it for configs/zse_sbir_vit_b16.yaml, given their weights (model.zse_sbir_state)."""
    pkg_dir = os.path.join(zse_dir, "model")
    if not os.path.isfile(os.path.join(pkg_dir, "model.py")):
        sys.exit(f"error: {pkg_dir}/model.py not found; pass a checkout of buptLinfy/ZSE-SBIR at 88f87f7")
    spec = importlib.util.spec_from_file_location("zse_sbir_model", os.path.join(pkg_dir, "__init__.py"),
                                                  submodule_search_locations=[pkg_dir])
    sys.modules["zse_sbir_model"] = importlib.util.module_from_spec(spec)
    # model.py's `from .sa import ...` resolves inside the package registered above
    their_model = import_with_stubs("zse_sbir_model.model", os.path.join(pkg_dir, "model.py"),
                                    {"options": types.SimpleNamespace(Option=object)})
    loss = load_module("zse_sbir_loss", os.path.join(zse_dir, "utils", "loss.py"))
    zargs = types.SimpleNamespace(**ZSE_ARGS, batch=items)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        theirs = their_model.Model(zargs)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in theirs.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=g))
    args = train.get_args_parser().parse_args(["--data_dir", "-", "--recipe", "zse_sbir_vit_b16", "--device", "cpu"])
    train.check_args(args)
    net, optimizer = train.build_model_and_optimizer(args, 0, torch.device("cpu"))
    state, unused = M.zse_sbir_state(theirs.state_dict())
    net.load_state_dict(state)  # strict: every one of ours is given
    net.normalize = torch.nn.Identity()  # the images here are random, already "normalised", for both
    return theirs, loss, zargs, Ours(net=net, optimizer=optimizer, args=args), unused


def zse_sbir_forward(theirs, ours: "Ours", images: list) -> dict:
    """Both forwards of a quadruplet batch [sketch, other sketch, photo, other photo], as their train.py:42-52 and
    ours (methods.ZSESBIR.losses) run it: class tokens after cross-attention (4B, 768) and relation scores (2B,)."""
    sk, sk_neg, im, im_neg = images
    cls_t, rn_t = theirs(torch.cat([sk, sk_neg]), torch.cat([im, im_neg]))
    b = len(sk)
    tokens = ours.net.tokens(torch.cat([sk, sk_neg, im, im_neg]))
    s, p, score = ours.net.pair(tokens[:2 * b], tokens[2 * b:])
    return {"cls_t": cls_t, "rn_t": rn_t.squeeze(1), "cls_o": torch.cat([s, p]), "rn_o": score}


def zse_sbir_rows(zse_dir: str, seed: int, items: int) -> list:
    theirs, loss, zargs, ours, unused = zse_sbir_pair(zse_dir, seed, items)
    g = torch.Generator().manual_seed(seed + 1)
    images = list(torch.randn(4, items, 3, 224, 224, generator=g))
    rows = [("weights", "model.zse_sbir_state", "Model.state_dict()", float("nan"),
             f"{sum(p.numel() for p in ours.net.parameters()):,} parameters given; theirs not used: "
             f"{len(unused)} tensors, all under ca.encoder.layers (built, never called): "
             f"{all(k.startswith('ca.encoder.layers.') for k in unused)}")]
    theirs.eval(), ours.net.eval()  # dropout off on both sides
    for dtype in (torch.float32, torch.float64):
        theirs.to(dtype), ours.net.to(dtype)
        with torch.no_grad():
            out = zse_sbir_forward(theirs, ours, [x.to(dtype) for x in images])
        for key, what in (("cls", "class tokens after cross-attention"), ("rn", "relation scores")):
            diff = (out[f"{key}_o"] - out[f"{key}_t"]).abs().max().item()
            top = out[f"{key}_t"].abs().max().item()
            u = U32 if dtype == torch.float32 else U64
            spread = f"; from {out[f'{key}_t'].min().item():.6g} to {out[f'{key}_t'].max().item():.6g}"
            rows.append((f"{what}, {str(dtype)[6:]}", "ZSESBIRNet.tokens + pair", "Model.forward(sk, im, 'train')",
                         diff, f"{tuple(out[f'{key}_t'].shape)}; relative to the largest |value| {top:.3g}: "
                               f"{diff / top:.3g} = {diff / top / u:.3g} u" + spread))
    theirs.float(), ours.net.float()
    zse_sbir_training_rows(rows, theirs, loss, zargs, ours, images)
    zse_sbir_metric_rows(rows, zse_dir, seed)
    return rows


def zse_sbir_training_rows(rows, theirs, loss, zargs, ours: "Ours", images: list) -> None:
    """The loss of one batch (theirs: train.py:47-57 with utils/loss.py; ours: methods.ZSESBIR.losses as train.py's
    step calls it) and the gradients after its backward, in float32 with dropout off."""
    sk, sk_neg, im, im_neg = images
    b = len(sk)
    cls_t, rn_t = theirs(torch.cat([sk, sk_neg]), torch.cat([im, im_neg]))
    target = torch.clamp(torch.cat([torch.ones(b), torch.zeros(b)]), 0.01, 0.99).unsqueeze(1)
    loss_t = loss.triplet_loss(cls_t, zargs) * 2 + loss.rn_loss(rn_t, target) * 4
    out = methods.get("zse_sbir").losses(ours.net, M.Quadruplets(sk, sk_neg, im, im_neg), 0.0, ours.args)
    rows.append(("training loss", "methods.ZSESBIR.losses (train.py's step)", "2 triplet_loss + 4 rn_loss",
                 abs(out["loss"].item() - loss_t.item()), f"{out['loss'].item():.9g} vs {loss_t.item():.9g} (triplet "
                 f"{out['triplet'].item():.6g}, relation {out['relation'].item():.6g})"))
    loss_t.backward()
    out["loss"].backward()
    theirs_g, _ = M.zse_sbir_state({n: p.grad for n, p in theirs.named_parameters() if p.grad is not None})
    ours_g = {n: p.grad for n, p in ours.net.named_parameters() if p.grad is not None}
    for name in ZSE_GRADS:
        diff = (ours_g[name] - theirs_g[name]).abs().max().item()
        top = theirs_g[name].abs().max().item()
        rows.append((f"gradient {name}", "loss.backward()", "loss.backward()", diff,
                     f"relative to the largest |grad| {top:.3g}: {diff / top:.3g}"))
    common = [k for k in theirs_g if k in ours_g]
    worst = max((ours_g[k] - theirs_g[k]).abs().max().item() / max(theirs_g[k].abs().max().item(), 1e-30)
                for k in common)
    rows.append(("gradients, every tensor", "loss.backward()", "loss.backward()",
                 max((ours_g[k] - theirs_g[k]).abs().max().item() for k in common),
                 f"tensors with a gradient {len(ours_g)} vs {len(theirs_g)}, the same names: "
                 f"{set(ours_g) == set(theirs_g)}; largest |diff| relative to the tensor's largest |grad|: "
                 f"{worst:.3g}"))


def zse_sbir_metric_rows(rows, zse_dir: str, seed: int) -> None:
    """Their utils/ap.py calculate (what their valid.py reports: mAP@all, mAP@200, P@100, P@200 of -scores as
    distances) against metrics.score_matrix_metrics under --protocol zse-sbir, on one matrix of relation-like
    scores in (0, 1) of 400 sketches x 1,500 photos of 10 classes (float64 draws, so no ties)."""
    ap = load_module("zse_sbir_ap", os.path.join(zse_dir, "utils", "ap.py"))
    g = np.random.default_rng(seed)
    ql, gl = g.integers(0, 10, 400), g.integers(0, 10, 1500)
    scores = 1 / (1 + np.exp(-(1.5 * (ql[:, None] == gl[None, :]) + g.normal(size=(400, 1500)))))
    # it prints its time; threads, not processes: loky's workers could not import their module by its name here
    with contextlib.redirect_stdout(open(os.devnull, "w")), joblib.parallel_backend("threading"):
        theirs = ap.calculate(-scores, (ql[:, None] == gl[None, :]) * 1, test=True)
    ours = metrics.score_matrix_metrics(torch.from_numpy(scores), torch.from_numpy(ql), torch.from_numpy(gl),
                                        ks=KS, protocols=("zse-sbir",))["protocols"]["zse-sbir"]
    for name, key, t in (("mAP@all", "map_all", theirs[0]), ("mAP@200", "map@200", theirs[1]),
                         ("P@100", "p@100", theirs[2]), ("P@200", "p@200", theirs[3])):
        rows.append((f"{name}, relation-like scores", "score_matrix_metrics, zse-sbir", "utils/ap.py calculate",
                     abs(ours[key] - t), f"{ours[key]:.9f} vs {t:.9f}"))


def print_rows(rows, ours_header: str) -> None:
    widths = [max(len(str(r[i])) for r in rows) for i in range(3)]
    print(f"{'setting':<{widths[0]}} | {ours_header:<{widths[1]}} | {'theirs (file:function)':<{widths[2]}}"
          " | largest |diff| | note")
    for setting, ours, theirs, diff, note in rows:
        shown = "-" if np.isnan(diff) else f"{diff:.3g}"
        print(f"{setting:<{widths[0]}} | {ours:<{widths[1]}} | {theirs:<{widths[2]}} | {shown:>14} | {note}")


def metric_rows(args) -> list:
    """The --sem_pcyc table: hashing, float and (with --sketch_lvm) fine-grained rows."""
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
    print(f"{source}: {len(q)} queries x {len(g)} gallery, {q.shape[1]}-d, {len(np.unique(ql))} query classes")
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
    return rows


def main(args) -> None:
    if args.sketch_lvm and not args.sem_pcyc:
        sys.exit("error: --sketch_lvm adds the fine-grained row to the --sem_pcyc table; pass --sem_pcyc DIR too")
    if not (args.sem_pcyc or args.sketch_lvm_ca33be9 or args.zse_sbir_88f87f7):
        sys.exit("error: nothing to compare; pass --sem_pcyc DIR (metrics), --sketch_lvm_ca33be9 DIR and/or "
                 "--zse_sbir_88f87f7 DIR (models)")
    print(f"numpy {np.__version__}, torch {torch.__version__} ({torch.get_num_threads()} threads)")
    if args.sem_pcyc:
        print_rows(metric_rows(args), "ours (metrics.py)")
    if args.sketch_lvm_ca33be9:
        print(f"Sketch_LVM ca33be9 ({args.sketch_lvm_ca33be9}) beside model.py: ViT-B/32 with the same random "
              f"weights (seed {args.seed}), float32 on the CPU, batches of {args.lvm_images} random 224 px images")
        rows = sketch_lvm_rows(args.sketch_lvm_ca33be9, args.seed, args.lvm_images)
        print_rows(rows, "ours (train.py's model.SketchLVMNet)")
    if args.zse_sbir_88f87f7:
        print(f"ZSE-SBIR 88f87f7 ({args.zse_sbir_88f87f7}) beside model.ZSESBIRNet: the same random weights (seed "
              f"{args.seed}), dropout off, on the CPU, {args.zse_items} quadruplets of random 224 px images")
        print_rows(zse_sbir_rows(args.zse_sbir_88f87f7, args.seed, args.zse_items), "ours (train.py's ZSESBIRNet)")


if __name__ == "__main__":
    main(get_args_parser().parse_args())
