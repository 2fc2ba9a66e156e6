"""Sketch_LVM's pieces in model.py (PromptedCLIP, freeze_as_sketch_lvm, freeze_all_but_layer_norms,
cosine_triplet_loss) against their definitions in docs/sketch_lvm.md, on tiny open_clip ViTs built here.

PromptedCLIP is checked against a float64 forward written out below from the equations of Sketch_LVM's
VisionTransformer.forward at ca33be9 (prompts appended after the positions are added, before ln_pre; the
embedding is ln_post of the class token times proj); the transformer blocks are open_clip's own, called as
open_clip calls them. The trainable parameters are counted on the full ViT-B/32 image tower, built on the meta
device (shapes only). Their code itself runs beside ours in bench/bench_peers.py --sketch_lvm_ca33be9."""
import json
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps

import dataset
import methods
import model as M
import train
import utils
from conftest import U64, make_tiny_dataset, run_main

open_clip = pytest.importorskip("open_clip", reason="open_clip is not installed (requirements.txt installs it)")

# The tiny tower: 32 px images in 8 px patches (4 x 4 = 16 patches), width 32 in 2 heads, 2 layers, 16-d output
LAYERS, WIDTH, PATCH, SIZE, EMBED = 2, 32, 8, 32, 16


def tiny_visual(seed: int = 0) -> torch.nn.Module:
    """open_clip's ViT-B-32-quickgelu image tower made tiny, in float64, with seeded random weights. open_clip's
    initialisation leaves the layer norms at 1 and 0 and the attention biases at 0, where a weight read in the
    wrong place would go unseen: every weight gets seeded noise on top."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        clip = open_clip.create_model(
            "ViT-B-32-quickgelu", pretrained=None, force_image_size=SIZE, embed_dim=EMBED,
            vision_cfg=dict(layers=LAYERS, width=WIDTH, head_width=16, patch_size=PATCH, image_size=SIZE),
            text_cfg=dict(context_length=8, vocab_size=64, width=16, heads=1, layers=1))
    visual = clip.visual
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in visual.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return visual.double().eval()


def layer_norm(x: torch.Tensor, ln: torch.nn.LayerNorm) -> torch.Tensor:
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + ln.eps) * ln.weight + ln.bias


def reference(v: torch.nn.Module, prompts: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sketch_LVM's forward (src/clip/model.py:223-243 at ca33be9) for images x (B, 3, S, S) and one domain's
    prompts (P, W): (embedding (B, E), ln_post's output (B, W))."""
    b, p, w = x.shape[0], PATCH, WIDTH
    g = SIZE // p
    patches = x.unfold(2, p, p).unfold(3, p, p)  # (B, 3, g, g, p, p)
    patches = patches.permute(0, 2, 3, 1, 4, 5).reshape(b, g * g, 3 * p * p)  # row by row, as conv1's output
    tokens = patches @ v.conv1.weight.reshape(w, -1).T  # (B, g*g, W): the patch convolution, no bias
    tokens = torch.cat([v.class_embedding.expand(b, 1, w), tokens], dim=1) + v.positional_embedding  # (B, 1+g*g, W)
    tokens = torch.cat([tokens, prompts.expand(b, -1, -1)], dim=1)  # (B, 1+g*g+P, W): no positions on the prompts
    h = layer_norm(tokens, v.ln_pre)
    assert v.transformer.batch_first  # open_clip runs its blocks on (B, L, W)
    for block in v.transformer.resblocks:
        h = block(h)
    h = layer_norm(h[:, 0], v.ln_post)  # (B, W): the class token
    return h @ v.proj, h


def reordering_atol(h: torch.Tensor, proj: torch.Tensor, tokens: int) -> float:
    """The largest difference between two float64 computations of one ViT embedding h @ proj that sum in other
    orders (here: the patch convolution as a matrix product, the layer norms written out; the blocks then see
    inputs that differ by that rounding). A sum of K terms in any order is within (K - 1) u of the exact one
    relative to the sum of its terms' magnitudes (Higham 2002, section 4.2), carried through layer norm, residuals
    and linear maps to first order: 2 S K u max_j sum_i |h_i| |proj_ij|, K the longest sum (a patch's 3 p^2
    pixels, the MLP's 4 W units, the tokens), S the sums on a value's path (4 before the blocks, 13 in each, 3
    after), as tests/test_clip.py derives."""
    sums = 4 + 13 * LAYERS + 3
    return 2 * sums * max(3 * PATCH ** 2, 4 * WIDTH, tokens) * U64 * (h.abs() @ proj.abs()).max().item()


def images(n: int = 3, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_prompted_clip_is_sketch_lvms_forward():
    """Each domain's embedding is the written-out forward with that domain's prompts appended; the two domains'
    prompts give embeddings far apart (by more than a thousand times the rounding bound)."""
    v = tiny_visual()
    torch.manual_seed(2)
    model = M.PromptedCLIP(v, num_prompts=3).double().eval()
    assert model.prompts.shape == (2, 3, WIDTH)
    x = images()
    tokens = 1 + (SIZE // PATCH) ** 2 + 3
    with torch.no_grad():
        got = [model(x, d) for d in (0, 1)]
        for d in (0, 1):
            want, h = reference(v, model.prompts[d], x)
            atol = reordering_atol(h, v.proj, tokens)
            assert got[d].shape == (3, EMBED)
            diff = (got[d] - want).abs().max().item()
            assert diff <= atol, f"domain {d}: {diff:.3g} from the equations, more than float64's {atol:.3g}"
    assert (got[0] - got[1]).abs().max().item() > 1000 * atol


def test_the_domain_only_picks_the_prompts():
    """With the photo prompts set to the sketch prompts, the two domains compute the same thing, bit for bit (the
    same kernels on the same layouts); and a backward through one domain reaches only that domain's prompts."""
    torch.manual_seed(3)
    model = M.PromptedCLIP(tiny_visual(), num_prompts=2).double().train()
    x = images()
    model(x, 1).square().sum().backward()
    assert torch.count_nonzero(model.prompts.grad[0]) == 0
    assert torch.count_nonzero(model.prompts.grad[1]) == model.prompts[1].numel()
    with torch.no_grad():
        model.prompts[1] = model.prompts[0]
        assert torch.equal(model(x, 0), model(x, 1))


def test_without_prompts_it_is_open_clips_own_forward():
    v = tiny_visual()
    model = M.PromptedCLIP(v, num_prompts=0).double().eval()
    assert model.prompts.shape == (2, 0, WIDTH)
    x = images()
    seen = {}
    hook = v.ln_post.register_forward_hook(lambda m, i, out: seen.update(h=out[:, 0]))
    with torch.no_grad():
        want = v(x)  # open_clip's VisionTransformer.forward: (B, E)
        hook.remove()  # ours calls ln_post too
        got = [model(x, d) for d in (0, 1)]
    atol = reordering_atol(seen["h"], v.proj, 1 + (SIZE // PATCH) ** 2)
    for d in (0, 1):
        diff = (got[d] - want).abs().max().item()
        assert diff <= atol, f"domain {d}: {diff:.3g} from open_clip's forward, more than float64's {atol:.3g}"


def vit_b_32_on_meta() -> torch.nn.Module:
    """The full ViT-B/32 image tower (shapes only: no memory, no arithmetic)."""
    with torch.device("meta"):
        return open_clip.create_model("ViT-B-32-quickgelu", pretrained=None, device="meta").visual


def test_freeze_as_sketch_lvm_trains_what_their_code_trains_in_vit_b_32():
    """docs/sketch_lvm.md section 2.1: their freeze_all_but_bn stops the weight and bias of every module but the
    LayerNorms, so attention's in_proj_weight / in_proj_bias (MultiheadAttention has no .weight), the class
    embedding, the positions and proj train on, with the LayerNorms and the prompts: 21,733,632 + 4,608."""
    with torch.device("meta"):
        model = M.PromptedCLIP(vit_b_32_on_meta(), num_prompts=3)
    M.freeze_as_sketch_lvm(model)
    trainable = {n: p.numel() for n, p in model.named_parameters() if p.requires_grad}
    per_block = ("attn.in_proj_weight", "attn.in_proj_bias", "ln_1.weight", "ln_1.bias", "ln_2.weight", "ln_2.bias")
    expected = {"prompts", "visual.class_embedding", "visual.positional_embedding", "visual.proj",
                "visual.ln_pre.weight", "visual.ln_pre.bias", "visual.ln_post.weight", "visual.ln_post.bias",
                *(f"visual.transformer.resblocks.{i}.{name}" for i in range(12) for name in per_block)}
    assert set(trainable) == expected, f"in one set only: {sorted(set(trainable) ^ expected)}"
    # per block: in_proj (3 W x W) and its bias (3 W), two layer norms (4 W); then class (W), positions
    # ((7 x 7 + 1) x W), proj (W x 512), ln_pre and ln_post (4 W); W = 768
    w = 768
    tower = 12 * (3 * w * w + 3 * w + 4 * w) + w + 50 * w + w * 512 + 4 * w
    assert tower == 21_733_632
    assert sum(trainable.values()) == tower + 2 * 3 * w == 21_738_240


def test_freeze_all_but_layer_norms_trains_the_26_layer_norms_of_vit_b_32():
    """The paper's wording: only CLIP's LayerNorms train (ln_pre, ln_1 and ln_2 of 12 blocks, ln_post)."""
    visual = vit_b_32_on_meta()
    M.freeze_all_but_layer_norms(visual)
    trainable = {n: p.numel() for n, p in visual.named_parameters() if p.requires_grad}
    assert all(n.split(".")[-2] in ("ln_pre", "ln_1", "ln_2", "ln_post") for n in trainable)
    assert len(trainable) == 2 * 26 and sum(trainable.values()) == 26 * 2 * 768 == 39_936


@pytest.mark.parametrize("margin", [0.2, 0.5])
def test_cosine_triplet_loss_is_torchs_triplet_loss_with_cosine_distance(margin):
    """Their loss_fn: nn.TripletMarginWithDistanceLoss(distance_function=1 - cos, margin). Both sides compute the
    same two distances (one F.cosine_similarity call each); they add margin, d_pos and -d_neg in another order:
    two roundings on each side of each triplet's value, each within u of at most |margin| + 2 + 2, then a mean
    whose sum is within (B - 1) u of its terms' magnitudes on either side. The gradients go back through the same
    operations and are equal."""
    g = torch.Generator().manual_seed(0)
    a, p, n = (torch.randn(64, 16, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(3))
    theirs = torch.nn.TripletMarginWithDistanceLoss(distance_function=lambda x, y: 1.0 - F.cosine_similarity(x, y),
                                                    margin=margin)
    want = theirs(a, p, n)
    want_grads = torch.autograd.grad(want, (a, p, n))
    got = M.cosine_triplet_loss(a, p, n, margin=margin)
    got_grads = torch.autograd.grad(got, (a, p, n))
    with torch.no_grad():
        inside = (F.cosine_similarity(a, n) - F.cosine_similarity(a, p) + margin > 0).sum().item()
    assert 0 < inside < 64  # the clamp cuts some triplets and not others
    largest = margin + 4
    atol = 4 * U64 * largest + 2 * 63 * U64 * largest
    assert abs(got.item() - want.item()) <= atol, f"{got.item()!r} vs {want.item()!r}, more than {atol:.3g} apart"
    for x, y in zip(got_grads, want_grads):
        assert torch.equal(x, y)


# ----------------------------------------------------------------------------------- the method through train.py

def lvm_args(data: str, ckpt: str, *extra: str):
    """configs/sketch_lvm_clip_vit_b32.yaml on random weights, resolved as train.main resolves it."""
    args = train.get_args_parser().parse_args(
        ["--data_dir", data, "--checkpoint_dir", ckpt, "--recipe", "sketch_lvm_clip_vit_b32", "--no-pretrained",
         "--workers", "0", "--device", "cpu", "--print_every", "2", *extra])
    train.apply_recipe(args)
    return args


@pytest.mark.parametrize("trains, clip_count", [("code", 21_733_632), ("paper", 39_936)])
def test_train_builds_their_optimizer_groups(trains, clip_count):
    """What train.py builds for the config (methods.SketchLVM) is their configure_optimizers: Adam without weight
    decay, CLIP's trainable parameters at clip_LN_lr 1e-6 and the two domains' prompts (2 x 3 x 768) at prompt_lr
    1e-4; nothing else trains. bench_peers.py compares the same groups with their code's."""
    args = lvm_args("x", "y", "--sketch_lvm_trains", trains)
    model, optimizer = train.build_model_and_optimizer(args, 4, torch.device("cpu"))
    assert type(optimizer) is torch.optim.Adam
    groups = [(g["name"], sum(p.numel() for p in g["params"]), g["lr"] * g["lr_mult"], g["weight_decay"])
              for g in optimizer.param_groups]
    assert groups == [("clip", clip_count, 1e-6, 0.0), ("prompts", 4_608, pytest.approx(1e-4, rel=1e-12), 0.0)]
    in_groups = {id(p) for g in optimizer.param_groups for p in g["params"]}
    assert all(p.requires_grad == (id(p) in in_groups) for p in model.parameters())


def test_sketch_lvm_trains_resumes_evaluates_and_retrieves_end_to_end(tmp_path):
    """A few steps of the method on tiny data at 32 px: what their code freezes does not move, what it trains
    does; the checkpoint names the method (model format 3) and Adam's state, resumes, and evaluate.py and
    retrieve.py embed with its prompts."""
    data, ckpt = make_tiny_dataset(str(tmp_path / "data"), per_class=4), str(tmp_path / "run")
    train.main(lvm_args(data, ckpt, "--image_size", "32", "--batch_size", "4", "--epochs", "1"))
    last = utils.load_checkpoint(os.path.join(ckpt, "last.pth"))
    assert last["model"]["format"] == 3 and last["model"]["method"] == "sketch_lvm"
    assert list(last["optimizers"]) == ["adam"] and tuple(last["model"]["mean"]) == M.IMAGENET_STATS[0]
    start, trained = utils.build_model(last, "last.pth", trained=False), utils.build_model(last, "last.pth", True)
    s, t = start.state_dict(), trained.state_dict()
    block = "prompted.visual.transformer.resblocks.0."
    for frozen in ("prompted.visual.conv1.weight", block + "mlp.c_fc.weight", block + "attn.out_proj.weight"):
        assert torch.equal(s[frozen], t[frozen]), frozen
    for trains in ("prompted.prompts", block + "attn.in_proj_weight", "prompted.visual.proj"):
        assert not torch.equal(s[trains], t[trains]), trains
    steps = last["step"]
    train.main(lvm_args(data, ckpt, "--image_size", "32", "--batch_size", "4", "--epochs", "2", "--resume",
                        os.path.join(ckpt, "last.pth")))
    assert utils.load_checkpoint(os.path.join(ckpt, "last.pth"))["step"] == 2 * steps
    out = run_main("evaluate.py", "--model", os.path.join(ckpt, "best.pth"), "--data_dir", data, "--workers", "0",
                   "--device", "cpu", "--output_dir", str(tmp_path / "eval"))
    assert out.returncode == 0, out.stderr
    assert "sketch_lvm (clip_vit_b_32), 512-d, 32px" in out.stdout
    with open(tmp_path / "eval" / "results.json") as f:
        assert 0 < json.load(f)["protocols"]["standard"]["map_all"] <= 1
    query = os.path.join(data, "sketches", "circle", "circle_0.png")
    out = run_main("retrieve.py", "--model", os.path.join(ckpt, "best.pth"), "--gallery", os.path.join(data, "photos"),
                   "--query", query, "--output_dir", str(tmp_path / "found"), "--device", "cpu", "--workers", "0")
    assert out.returncode == 0, out.stderr


@pytest.mark.parametrize("extra, fragment", [
    (["--sampling", "pairs"], "--method sketch_lvm trains on triplets: give --sampling triplets"),
    (["--class_loss_ratio", "1"], "--method sketch_lvm's one loss is its triplet loss"),
    (["--backbone", "resnet18"], "--method sketch_lvm prompts CLIP's image tower; choose a CLIP --backbone"),
    (["--embedding_dim", "256"], "--embedding_dim must be 512, got 256"),
])
def test_what_the_method_cannot_take_is_one_line(tmp_path, extra, fragment):
    out = run_main("train.py", "--data_dir", str(tmp_path), "--recipe", "sketch_lvm_clip_vit_b32", "--no-pretrained",
                   *extra)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert fragment in out.stderr and len(out.stderr.strip().splitlines()) == 1, out.stderr


def test_images_are_padded_to_a_square_as_their_data_code_pads_them(tmp_path):
    """Sketch_LVM's images (src/dataset_retrieval.py:78-84): ImageOps.pad(Image.open(p).convert('RGB'), size),
    black bars around the aspect-kept image. The project reads them the same way, bit for bit, wherever its
    encoders ask for it: evaluation and galleries (ImageFilesDataset), training's store and its disk cache."""
    path = str(tmp_path / "wide.png")
    g = np.random.default_rng(0)
    Image.fromarray(g.integers(0, 256, (20, 48, 3), dtype=np.uint8)).save(path)  # 48 wide, 20 high
    theirs = np.array(ImageOps.pad(Image.open(path).convert("RGB"), size=(32, 32)))
    ours = np.asarray(dataset.read_resized(path, 32, fit="pad"))
    assert np.array_equal(ours, theirs) and not theirs[:4].any() and theirs[16].any()  # black bars top and bottom
    files = dataset.ImageFilesDataset([path], 32, fit="pad")
    assert torch.equal(files[0][0], torch.from_numpy(theirs).permute(2, 0, 1).float() / 255)
    store = dataset.ImageStore([(path, False)], 32, str(tmp_path), fits=["pad"])
    assert torch.equal(store.get(np.array([0]))[0], torch.from_numpy(theirs).permute(2, 0, 1))
    assert dataset.write_disk_cache(str(tmp_path), store.items, 32, str(tmp_path / "cache"), fits=["pad"]) == (1, 0)
    assert store.open_disk_cache(str(tmp_path / "cache")) == 1  # the padded row, under its own key
    assert torch.equal(store.get(np.array([0]))[0], torch.from_numpy(theirs).permute(2, 0, 1))
    unpadded = dataset.ImageStore([(path, False)], 32, str(tmp_path))
    assert unpadded.open_disk_cache(str(tmp_path / "cache")) == 0  # a resized image is another row


def test_the_method_decides_who_pads(tmp_path):
    """Sketch_LVM's encoders ask for padded images (utils.image_fit), and train.py's training store pads for it; the
    SBIR model's encoders and store resize, as before."""
    data = make_tiny_dataset(str(tmp_path / "data"))
    lvm = lvm_args(data, str(tmp_path / "a"), "--image_size", "32", "--batch_size", "4")
    sbir = train.get_args_parser().parse_args(["--data_dir", data, "--no-pretrained", "--image_size", "32",
                                               "--batch_size", "4"])
    train.apply_recipe(sbir)
    assert set(train.read_training_data(lvm, 0, 1)[2].store.fits) == {"pad"}
    assert set(train.read_training_data(sbir, 0, 1)[2].store.fits) == {"resize"}
    net = methods.get("sketch_lvm").network(train.model_config(lvm), start=False)
    assert utils.image_fit(net.sketch_encoder) == utils.image_fit(net.photo_encoder) == "pad"
    plain = methods.get("sbir").network(train.model_config(sbir), start=False)
    assert utils.image_fit(plain.sketch_encoder) == utils.image_fit(plain.photo_encoder) == "resize"
