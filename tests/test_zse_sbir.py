"""ZSE-SBIR's pieces (model.ZSESBIRNet, methods.ZSESBIR, dataset.QuadrupletBatches) against their definitions in
docs/zse_sbir.md, written out here in float64 from their code at 88f87f7 (model/ca.py, model/rn.py,
model/model.py, utils/loss.py, data_utils/dataset.py). Their code itself runs beside ours in
bench/bench_peers.py --zse_sbir_88f87f7."""
import json
import math
import os
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import dataset
import evaluate
import methods
import metrics
import model as M
import train
import utils
from conftest import U64, make_tiny_dataset, run_main


def noisy(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """The module in float64 with seeded noise on every weight (layer norms start at 1 and 0, biases at 0, where a
    weight read in the wrong place would go unseen), dropout off."""
    g = torch.Generator().manual_seed(seed)
    module = module.double().eval()
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g, dtype=torch.float64))
    return module


def their_norm(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """model/ca.py:20-23, with the unbiased standard deviation written out."""
    mean = x.mean(-1, keepdim=True)
    std = torch.sqrt(((x - mean) ** 2).sum(-1, keepdim=True) / (x.shape[-1] - 1))
    return a * (x - mean) / (std + eps) + b


def their_attention(layer: M.CrossAttentionLayer, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """model/ca.py:72-129: separate q, k, v maps (ours stacked in in_proj), 8 heads, softmax(q k^T / sqrt(d)) v."""
    w, bias, heads = layer.attention.in_proj_weight, layer.attention.in_proj_bias, layer.attention.num_heads
    width = q.shape[-1]
    d = width // heads
    qs, ks, vs = (x @ w[i * width:(i + 1) * width].T + bias[i * width:(i + 1) * width] for i, x in enumerate((q, k, v)))
    split = [x.reshape(x.shape[0], -1, heads, d).transpose(1, 2) for x in (qs, ks, vs)]  # (B, h, L, d)
    att = torch.softmax(split[0] @ split[1].transpose(-2, -1) / math.sqrt(d), dim=-1) @ split[2]
    out = att.transpose(1, 2).reshape(q.shape[0], -1, width)
    return out @ layer.attention.out_proj.weight.T + layer.attention.out_proj.bias


def their_layer(layer: M.CrossAttentionLayer, own: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """model/ca.py:47-50 EncoderLayer(q=own, k=other, v=own): post-norm, the residual its own tokens."""
    x = their_norm(own + their_attention(layer, own, other, own), layer.norm1.weight, layer.norm1.bias)
    f = layer.ffn
    y = F.relu(x @ f[0].weight.T + f[0].bias) @ f[3].weight.T + f[3].bias
    return their_norm(x + y, layer.norm2.weight, layer.norm2.bias)


def test_cross_attention_is_their_encoder_layer():
    """Queries and values from its own image, keys from the other, post-norm with their LayerNorm (unbiased std, eps
    on the std), ReLU feed-forward: equal to float64's rounding (a bound of 2 K u relative to the magnitudes, K
    the longest sum, over the 6 sums on a value's path, each through at most a factor 10 of normalisation)."""
    torch.manual_seed(0)
    layer = noisy(M.CrossAttentionLayer(width=32, heads=4, ffn=48))
    g = torch.Generator().manual_seed(1)
    own, other = (torch.randn(3, 5, 32, generator=g, dtype=torch.float64) for _ in range(2))
    with torch.no_grad():
        got, want = layer(own, other), their_layer(layer, own, other)
    assert got.shape == (3, 5, 32)
    atol = 2 * 6 * 48 * U64 * 10 * want.abs().max().item()
    assert (got - want).abs().max().item() <= atol
    assert (got - their_layer(layer, own, own)).abs().max().item() > 1e6 * atol  # the keys do come from the other


def test_the_relation_head_reads_the_tokens_memory_as_their_view_does():
    """model/model.py:30-42: the patch tokens (B, g*g, W) reinterpreted as (B, W, g, g) (not transposed), a 2x2
    stride-2 convolution, the cosine matrix of the a = (g/2)^2 anchors, MLP a^2 -> a sqrt(a) -> a -> 1, sigmoid."""
    torch.manual_seed(0)
    head = noisy(M.RelationHead(grid=4, width=8))
    assert [m.out_features for m in head.mlp if isinstance(m, torch.nn.Linear)] == [8, 4, 1]  # a = 4: 16 -> 8 -> 4 -> 1
    g = torch.Generator().manual_seed(1)
    s, p = (torch.randn(3, 17, 8, generator=g, dtype=torch.float64) for _ in range(2))

    def anchors(t, transpose=False):
        grid = t[:, 1:].transpose(1, 2) if transpose else t[:, 1:].contiguous().view(3, 8, 4, 4)
        x = F.conv2d(grid.reshape(3, 8, 4, 4), head.conv.weight, head.conv.bias, stride=2)
        return x.reshape(3, 512, 4).transpose(1, 2)  # (B, a, 512)

    def score(transpose=False):
        a, b = anchors(s, transpose), anchors(p, transpose)
        cos = (a @ b.transpose(1, 2)) / a.norm(dim=-1)[:, :, None] / b.norm(dim=-1)[:, None, :]
        h = cos.flatten(1)
        for m in head.mlp:
            h = m(h)
        return torch.sigmoid(h).squeeze(1)

    with torch.no_grad():
        got = head(s, p)
        assert torch.allclose(got, score(), rtol=0, atol=1e-12)
        assert not torch.allclose(got, score(transpose=True), rtol=0, atol=1e-6)  # a transpose is another network


def test_zse_sbir_state_maps_their_names_and_stacks_q_k_v():
    """Their cross-attention keeps q, k, v in linears.0-2; ours is one in_proj, q then k then v. The relation MLP,
    the stem and the ViT's names map one to one; the layer their forward never calls is reported unused."""
    q, k, v = (torch.full((2, 2), float(i)) for i in range(3))
    theirs = {"ca.encoder.layer1.0.self_attn.linears.0.weight": q, "ca.encoder.layer1.0.self_attn.linears.1.weight": k,
              "ca.encoder.layer1.0.self_attn.linears.2.weight": v, "ca.encoder.layer2.0.sublayer.1.norm.a": q,
              "ca.encoder.layers.0.feed_forward.w_1.weight": q, "rn.rn.3.bias": k, "conv2d.weight": v,
              "sa.model.transformer.layers.11.0.attention.to_qkv.weight": q, "embedding.bias": k, "cls": v,
              "sa.model.scale.seq.6.weight": q, "mlp_head.weight": q}
    ours, unused = M.zse_sbir_state(theirs)
    assert torch.equal(ours["sketch_side.attention.in_proj_weight"], torch.cat([q, k, v]))
    assert set(ours) == {"sketch_side.attention.in_proj_weight", "photo_side.norm2.weight", "relation.mlp.3.bias",
                         "relation.conv.weight", "vit.encoder.layers.encoder_layer_11.self_attention.in_proj_weight",
                         "vit.conv_proj.bias", "vit.class_token", "stem.convs.6.weight"}
    assert unused == ["ca.encoder.layers.0.feed_forward.w_1.weight", "mlp_head.weight"]


def test_quadruplets_are_their_pairs_with_classes_drawn_uniformly(tmp_path):
    """(sketch, other sketch, photo) of one class and a photo of another; over many draws every class comes as
    often as the others, to within 5 standard deviations of a binomial count; the same seed and epoch, the same
    batches."""
    root = make_tiny_dataset(str(tmp_path), seen=("tri", "square", "pent", "hexa"), per_class=5)
    data = dataset.scan_dataset(root)
    split = {"sketches": data.sketches, "photos": data.photos}
    source = dataset.QuadrupletBatches(split, data.seen, 32, 8, 4000, seed=3, root=root)
    assert len(source) == 500
    (groups, (c, other)) = source.plan(0)
    paths = source.sketches + source.photos
    label = {p: data.seen.index(os.path.basename(os.path.dirname(p))) for p in paths}
    cls = np.vectorize(lambda i: label[paths[i]])
    assert (cls(groups[0]) == c).all() and (cls(groups[1]) == c).all() and (cls(groups[2]) == c).all()
    assert (cls(groups[3]) == other).all() and (other != c).all()
    assert all(i >= len(source.sketches) for i in groups[2].ravel()) and all(i < len(source.sketches)
                                                                               for i in groups[1].ravel())
    n, k = c.size, len(data.seen)
    counts = np.bincount(c.ravel(), minlength=k)
    assert np.abs(counts - n / k).max() <= 5 * math.sqrt(n * (1 / k) * (1 - 1 / k))
    assert all(np.array_equal(a, b) for a, b in zip(source.plan(0)[0], groups))
    assert not np.array_equal(source.plan(1)[0][0], groups[0])


def their_names(ours: dict) -> dict:
    """Our state dict under their code's names (model/model.py's Model: sa.model.*, ca.encoder.layer1/2.*, rn.rn.*,
    conv2d.*), written out backwards from docs/zse_sbir.md's table, in_proj split into their q, k, v maps."""
    out = {}
    for k, v in ours.items():
        side = {"sketch_side": "ca.encoder.layer1.0.", "photo_side": "ca.encoder.layer2.0."}.get(k.split(".")[0])
        if side and ".attention.in_proj_" in k:
            for i, part in enumerate(v.chunk(3)):
                out[f"{side}self_attn.linears.{i}.{k.rsplit('_', 1)[1]}"] = part
            continue
        side_names = (("attention.out_proj.", "self_attn.linears.3."), ("ffn.0.", "feed_forward.w_1."),
                      ("ffn.3.", "feed_forward.w_2."), ("norm1.weight", "sublayer.0.norm.a"),
                      ("norm1.bias", "sublayer.0.norm.b"), ("norm2.weight", "sublayer.1.norm.a"),
                      ("norm2.bias", "sublayer.1.norm.b"))
        for a, b in side_names if side else ():
            k = k.replace(a, b)
        for a, b in (("sketch_side.", "ca.encoder.layer1.0."), ("photo_side.", "ca.encoder.layer2.0."),
                     ("relation.mlp.", "rn.rn."), ("relation.conv.", "conv2d."),
                     ("stem.convs.", "sa.model.scale.seq."), ("vit.conv_proj.", "sa.model.embedding."),
                     ("vit.class_token", "sa.model.cls"), ("vit.encoder.pos_embedding", "sa.model.pos_embedding"),
                     ("vit.encoder.ln.", "sa.model.transformer.encoder_norm."),
                     ("vit.encoder.layers.encoder_layer_", "sa.model.transformer.layers."),
                     (".ln_1.", ".0.layer_norm_input."),
                     (".ln_2.", ".0.layer_norm_out."), (".self_attention.in_proj_", ".0.attention.to_qkv."),
                     (".self_attention.out_proj.", ".0.attention.to_out.0."), (".mlp.", ".0.mlp.net.")):
            k = k.replace(a, b)
        out[k] = v
    return out


def test_weights_load_under_their_names_whole_or_the_vit_alone():
    """A whole Model of theirs gives every tensor (bit for bit); sam_ViT-B_16.pth's ViT alone (their ViTPatch names)
    leaves the stem, the cross-attention and the relation head at random and says so; a file of another network is
    a ValueError that names a tensor."""
    config = train.model_config(zse_args("x", "y"))
    torch.manual_seed(0)
    source = M.ZSESBIRNet(config).state_dict()
    whole = their_names(source)
    assert len(whole) == len(source) + 8  # each side's in_proj weight and bias are three tensors each there
    net = methods.get("zse_sbir").network(config, start=whole)
    assert all(torch.equal(v, source[k]) for k, v in net.state_dict().items())
    assert net.start_note == f"weights: {len(source)} of this network's {len(source)} tensors from the file"
    vit = {k[len("sa.model."):]: v for k, v in whole.items() if k.startswith("sa.model.") and ".scale." not in k}
    net = methods.get("zse_sbir").network(config, start=vit)
    assert net.start_note.endswith("at random: photo_side, relation, sketch_side, stem")
    assert torch.equal(net.state_dict()["vit.class_token"], source["vit.class_token"])
    with pytest.raises(ValueError, match="none of its 2 tensors is a ZSE-SBIR weight"):
        methods.get("zse_sbir").network(config, start={"fc.weight": torch.ones(1), "fc.bias": torch.ones(1)})


def zse_args(data: str, ckpt: str, *extra: str):
    args = train.get_args_parser().parse_args(
        ["--data_dir", data, "--checkpoint_dir", ckpt, "--recipe", "zse_sbir_vit_b16", "--workers", "0", "--device",
         "cpu", "--print_every", "1", "--image_size", "32", "--batch_size", "2", "--quadruplets_per_epoch", "4",
         *extra])
    train.apply_recipe(args)
    return args


def test_zse_sbir_trains_and_evaluates_by_its_retrieval_token_end_to_end(tmp_path):
    """Two steps of the method at 32 px (a 2 x 2 patch grid, one relation anchor): both losses are logged, every
    parameter moves (AdamW over all of them), the checkpoint names the method, and evaluate.py ranks by the
    retrieval token."""
    data, ckpt = make_tiny_dataset(str(tmp_path / "data")), str(tmp_path / "run")
    train.main(zse_args(data, ckpt, "--epochs", "1"))
    last = utils.load_checkpoint(os.path.join(ckpt, "last.pth"))
    assert last["model"]["method"] == "zse_sbir" and last["step"] == 2
    steps = [r for r in utils.read_jsonl(os.path.join(ckpt, "log.jsonl")) if r["kind"] == "step"]
    assert all(r["triplet"] >= 0 and 0 <= r["relation"] <= 1 for r in steps) and len(steps) == 2
    start, trained = (utils.build_model(last, "last.pth", t).state_dict() for t in (False, True))
    moved = [k for k in start if not torch.equal(start[k], trained[k])]
    assert len(moved) == len(start)
    out = run_main("evaluate.py", "--model", os.path.join(ckpt, "best.pth"), "--data_dir", data, "--workers", "0",
                   "--device", "cpu", "--output_dir", str(tmp_path / "eval"))
    assert out.returncode == 0, out.stderr
    assert "zse_sbir (vit_b_16), 768-d, 32px" in out.stdout
    out = run_main("evaluate.py", "--model", os.path.join(ckpt, "best.pth"), "--data_dir", data, "--workers", "0",
                   "--device", "cpu", "--output_dir", str(tmp_path / "rel"), "--score", "relation", "--task", "zs",
                   "gzs", "--num_sketches", "1")
    assert out.returncode == 0, out.stderr
    pairs = re.findall(r"relation scores: ([\d,]+) sketch-photo pairs", out.stdout)
    assert [int(n.replace(",", "")) for n in pairs] == [12 * 12, 14 * 14]  # zs; gzs with its drawn seen images
    for task in ("zs", "gzs"):
        with open(tmp_path / "rel" / task / "results.json") as f:
            assert json.load(f)["scored_by"] == "relation"
    assert os.path.exists(tmp_path / "rel" / "zs" / "grid_00_circle.png") or \
        os.path.exists(tmp_path / "rel" / "zs" / "grid_00_star.png")


def test_fine_grained_accuracy_of_given_scores_ranks_as_the_embeddings_do():
    """--task fg with --score relation: evaluate's acc@k of -Hamming distances given as scores (score "given", ties
    everywhere) equals its acc@k of the codes themselves, over every photo and within each class."""
    g = torch.Generator().manual_seed(0)
    q, p = (torch.randint(0, 256, (n, 1), generator=g, dtype=torch.uint8) for n in (30, 30))
    q_labels = g_labels = torch.arange(30) % 3
    targets = torch.randperm(30, generator=g)
    targets = torch.stack([targets[(targets % 3) == c][0] for c in q_labels.tolist()])  # a photo of its class
    scores = -metrics.hamming_distance(q, p).double()
    placeholder = scores.new_zeros(scores.shape[1], 0)  # (N, 0)
    mixed = evaluate.fine_grained_accuracy(scores, placeholder, targets, score="given")
    own = evaluate.fine_grained_within_class(scores, q_labels, placeholder, g_labels, targets, score="given")
    assert mixed == evaluate.fine_grained_accuracy(q, p, targets, score="hamming")
    assert own == evaluate.fine_grained_within_class(q, q_labels, p, g_labels, targets, score="hamming")
    assert 0 < mixed["acc@5"] < 1


def test_relation_scoring_needs_a_relation_network(tmp_path):
    """--score relation on a model without one (the SBIR model here) is one line, as are the flags it cannot take."""
    data = make_tiny_dataset(str(tmp_path / "data"))
    fake = str(tmp_path / "x.pth")
    out = run_main("evaluate.py", "--embeddings", fake, "--score", "relation")
    assert out.returncode == 2 and "--score relation scores sketch-photo pairs" in out.stderr
    from test_retrieve import save_tiny_checkpoint
    ckpt = save_tiny_checkpoint(str(tmp_path / "sbir.pth"))
    out = run_main("evaluate.py", "--model", ckpt, "--data_dir", data, "--score", "relation", "--device", "cpu",
                   "--workers", "0", "--output_dir", str(tmp_path / "e"))
    assert out.returncode == 2 and "--score relation needs a model with a relation network" in out.stderr, out.stderr
    assert len(out.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("extra, fragment", [
    (["--sampling", "triplets"], "--method zse_sbir trains on quadruplets: give --sampling quadruplets"),
    (["--pretrained"], "--method zse_sbir starts from the SAM-trained ViT-B/16 its authors use"),
    (["--triplet_loss_ratio", "1"], "--method zse_sbir's losses are 2 x its triplet loss + 4 x its relation loss"),
    (["--image_size", "48"], "give an --image_size divisible by 32 (224), not 48"),
    (["--method", "sbir"], "--sampling quadruplets is ZSE-SBIR's (--method zse_sbir); give pairs or triplets"),
])
def test_what_the_method_cannot_take_is_one_line(tmp_path, extra, fragment):
    out = run_main("train.py", "--data_dir", str(tmp_path), "--recipe", "zse_sbir_vit_b16", *extra)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert fragment in out.stderr and len(out.stderr.strip().splitlines()) == 1, out.stderr



def test_relation_scores_of_every_pair_in_bounded_blocks():
    """ZSESBIRNet.relation_scores (Q, N) from tokens computed once: each entry is pair() of that sketch and that
    photo alone, for blocks that split rows and columns unevenly, to float64's rounding (another batch shape may
    sum in another order: 2 K u over about 10 sums on the path, K = 3072 the longest, the relation convolution's)."""
    config = train.model_config(zse_args("x", "y", "--image_size", "64"))  # 4 x 4 patches: 4 relation anchors
    torch.manual_seed(0)
    net = noisy(M.ZSESBIRNet(config))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        s, p = (net.tokens(torch.rand(k, 3, 64, 64, generator=g, dtype=torch.float64)) for k in (3, 5))
        got = net.relation_scores(s, p, pairs=4)
        want = torch.tensor([[net.pair(s[i:i + 1], p[j:j + 1])[2].item() for j in range(5)] for i in range(3)],
                            dtype=torch.float64)
    assert got.shape == (3, 5) and got.dtype == torch.float64
    assert (got - want).abs().max().item() <= 2 * 10 * 3072 * U64
    assert want.std().item() > 1e-6  # the scores differ from pair to pair


def their_sketch(a: np.ndarray) -> np.ndarray:
    """data_utils/utils.py:201-205 and 210-289 for an (H, W, 3) uint8 sketch whose cropped box needs no resizing:
    remove_white_space_image(img, 10) and make_img_square, written out with numpy as their lines do."""
    h, w, _ = a.shape
    ys, xs = np.where(np.sum(a, axis=2) <= 300)
    a = a[max(0, ys.min() - 10):min(h, ys.max() + 10), max(0, xs.min() - 10):min(w, xs.max() + 10), :]
    h, w, c = a.shape
    d1 = (h - w) // 2 if h > w else (w - h) // 2
    d2 = (h - w) - d1 if h > w else (w - h) - d1
    if h > w:
        return np.hstack([np.ones((h, d1, c), dtype=a.dtype) * np.max(a), a,
                          np.ones((h, d2, c), dtype=a.dtype) * np.max(a)])
    return np.vstack([np.ones((d1, w, c), dtype=a.dtype) * np.max(a), a,
                      np.ones((d2, w, c), dtype=a.dtype) * np.max(a)])


def test_sketches_are_cropped_to_their_strokes_and_padded_white_as_theirs(tmp_path):
    """dataset.crop_to_strokes: their crop (strokes' box + 10 px, ending before max + 10), long side scaled to the
    size and centred on white. A box 32 high and 20 wide at size 32 needs no scaling, so it is theirs bit for bit;
    ZSE-SBIR's sketch encoder asks for it and its photo encoder for plain resizing, and train.py's store reads each
    domain so."""
    a = np.full((60, 50, 3), 255, dtype=np.uint8)
    a[20:33, 15] = 0  # a stroke in rows 20-32 of column 15: the box is rows 10-41 and columns 5-24
    want = their_sketch(a)
    got = np.asarray(dataset.crop_to_strokes(Image.fromarray(a), 32))
    assert want.shape == (32, 32, 3) and np.array_equal(got, want)
    assert (got[:, :6] == 255).all() and (got[:, -6:] == 255).all() and (got[:, 16] == 0).any()  # 6 white each side
    config = train.model_config(zse_args("x", "y"))
    net = methods.get("zse_sbir").network(config, start=False)
    encoders = (net.sketch_encoder, net.photo_encoder, net.sketch_tokens, net.photo_tokens)
    assert [utils.image_fit(e) for e in encoders] == ["strokes", "resize", "strokes", "resize"]
    source = train.read_training_data(zse_args(make_tiny_dataset(str(tmp_path)), "y"), 0, 1)[2]
    n = len(source.sketches)
    assert source.store.fits == ["strokes"] * n + ["resize"] * (len(source.store) - n) and n > 0
