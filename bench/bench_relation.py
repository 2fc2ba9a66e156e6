"""ZSE-SBIR's retrieval by relation scores: pairs per second of ours against their utils/valid.py, side by side.

    python bench/bench_relation.py --zse_sbir_88f87f7 /tmp/zse               # 40 sketches x 40 photos, 224 px, CPU
    python bench/bench_relation.py --zse_sbir_88f87f7 /tmp/zse --device cuda --sketches 200 --photos 400

Both sides score every sketch against every photo with the same random model (their Model with seeded weights,
ours given them by model.zse_sbir_state; dropout off) on the same random images, and end with the same metrics:
- theirs: utils/valid.py valid_cls, -r rn, batches of 20 sketches and 20 photos as their options: for every
  sketch batch it runs the self-attention of every photo batch again, then cross-attention and the relation
  network over the tiled pairs, then utils/ap.py. Their tensors' .cuda() calls are made no-ops on the CPU.
- ours: each image's self-attention once (ZSESBIRNet.tokens), ZSESBIRNet.relation_scores over the pairs in blocks
  of --pairs, metrics.score_matrix_metrics.
It prints the seconds and pairs per second of each, their ratio, the largest difference of the two score
matrices, the FLOPs of one pair's cross-attention and relation head (torch.utils.flop_counter), and the work of a
full Sketchy-25 evaluation (15,229 x 17,101 = 2.6e8 pairs, the test split their data_utils lists): the hours at
the rate measured here, and the FLOPs a faster device would have to do.
"""
import argparse
import contextlib
import os
import sys
import time
import types

import joblib
import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import metrics  # noqa: E402
from bench_peers import import_with_stubs, load_module, zse_sbir_pair  # noqa: E402  (bench/, this script's folder, is on sys.path)

SKETCHY25 = (15229, 17101)  # test sketches and photos of their Sketchy-25 split (data_utils/utils.py:129-142)


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--zse_sbir_88f87f7", type=str, required=True, help="checkout of buptLinfy/ZSE-SBIR at 88f87f7")
    p.add_argument("--sketches", type=int, default=40, help="query sketches (their batches hold 20)")
    p.add_argument("--photos", type=int, default=40, help="gallery photos (their batches hold 20)")
    p.add_argument("--pairs", type=int, default=256, help="pairs per block of ours (ZSESBIRNet.relation_scores)")
    p.add_argument("--device", type=str, default="cpu")
    p.add_argument("--seed", type=int, default=0)
    return p


def load_their_valid(zse_dir: str):
    """Their utils/valid.py, whose `from utils.ap import calculate` is given their utils/ap.py while it imports;
    this project's utils module is put back afterwards (bench_peers.import_with_stubs)."""
    ap = load_module("zse_sbir_ap", os.path.join(zse_dir, "utils", "ap.py"))
    return import_with_stubs("zse_sbir_valid", os.path.join(zse_dir, "utils", "valid.py"),
                             {"utils": types.SimpleNamespace(ap=ap), "utils.ap": ap})


def theirs_valid(zse_dir: str, model, sketches, photos, labels) -> tuple:
    """Their valid_cls on these images (TensorDatasets as their ValidSets), -r rn; returns (seconds, their
    (Q, N) distances = -scores as it builds them, their metrics)."""
    valid = load_their_valid(zse_dir)
    captured = {}
    real_calculate = valid.calculate

    def calculate(dist, same, test=None):
        captured["dist"] = dist
        with joblib.parallel_backend("threading"):  # loky's worker processes could not import their module by name
            return real_calculate(dist, same, test)
    valid.calculate = calculate
    args = types.SimpleNamespace(test_sk=20, test_im=20, num_workers=0, retrieval="rn")
    sk = torch.utils.data.TensorDataset(sketches, labels[0])
    im = torch.utils.data.TensorDataset(photos, labels[1])
    cuda = torch.Tensor.cuda
    torch.Tensor.cuda = lambda self, *a, **k: self  # their valid.py moves every tensor with .cuda()
    try:
        with open(os.devnull, "w") as null, contextlib.redirect_stdout(null), contextlib.redirect_stderr(null):
            t0 = time.perf_counter()
            out = valid.valid_cls(args, model, sk, im)
            seconds = time.perf_counter() - t0
    finally:
        torch.Tensor.cuda, valid.calculate = cuda, real_calculate
        torch.set_grad_enabled(True)  # valid_cls turns gradients off for the whole process
    return seconds, torch.from_numpy(captured["dist"]), out


def ours_valid(net, sketches, photos, labels, pairs: int) -> tuple:
    t0 = time.perf_counter()
    with torch.no_grad():
        s = torch.cat([net.tokens(x) for x in sketches.split(20)])
        p = torch.cat([net.tokens(x) for x in photos.split(20)])
        scores = net.relation_scores(s, p, pairs)
    out = metrics.score_matrix_metrics(scores, labels[0], labels[1], protocols=("zse-sbir",))["protocols"]["zse-sbir"]
    return time.perf_counter() - t0, scores, (out["map_all"], out["map@200"], out["p@100"], out["p@200"])


def pair_flops(net, device) -> int:
    """Forward FLOPs of one pair's cross-attention and relation head at 224 px (torch.utils.flop_counter)."""
    tokens = torch.randn(1, 197, 768, device=device)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        net.pair(tokens, tokens)
    return counter.get_total_flops()


def main(args) -> None:
    device = torch.device(args.device)
    theirs, _, _, ours, _ = zse_sbir_pair(args.zse_sbir_88f87f7, args.seed, 1)
    theirs.to(device).eval(), ours.net.to(device).eval()
    g = torch.Generator().manual_seed(args.seed + 1)
    sketches = torch.randn(args.sketches, 3, 224, 224, generator=g)
    photos = torch.randn(args.photos, 3, 224, 224, generator=g)
    labels = (torch.randint(0, 5, (args.sketches,), generator=g), torch.randint(0, 5, (args.photos,), generator=g))
    n = args.sketches * args.photos
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {device}; {args.sketches} sketches x "
          f"{args.photos} photos = {n:,} pairs of random 224 px images, random weights (seed {args.seed})")
    t_theirs, dist, m_theirs = theirs_valid(args.zse_sbir_88f87f7, theirs, sketches.to(device), photos.to(device),
                                            labels)
    t_ours, scores, m_ours = ours_valid(ours.net, sketches.to(device), photos.to(device), labels, args.pairs)
    print(f"theirs (utils/valid.py, -r rn): {t_theirs:.1f} s, {n / t_theirs:.1f} pairs/s")
    print(f"ours (tokens once, relation_scores in blocks of {args.pairs}): {t_ours:.1f} s, {n / t_ours:.1f} pairs/s")
    print(f"ours / theirs pairs per second: {t_theirs / t_ours:.2f}x")
    print(f"largest |score difference|: {(scores.cpu().double() + dist.double()).abs().max().item():.3g}; "
          f"metrics (mAP@all, mAP@200, P@100, P@200) ours {tuple(round(x, 6) for x in m_ours)} vs theirs "
          f"{tuple(round(float(x), 6) for x in m_theirs)}")
    flops = pair_flops(ours.net, device)
    full = SKETCHY25[0] * SKETCHY25[1]
    print(f"one pair's cross-attention + relation head: {flops / 1e9:.2f} GFLOP forward. A full Sketchy-25 "
          f"evaluation ({SKETCHY25[0]:,} x {SKETCHY25[1]:,} = {full:.3g} pairs) is {full * flops / 1e15:.0f} PFLOP: "
          f"{full / (n / t_ours) / 3600:,.0f} h at ours' rate here, {full / (n / t_theirs) / 3600:,.0f} h at theirs'")


if __name__ == "__main__":
    main(get_args_parser().parse_args())
