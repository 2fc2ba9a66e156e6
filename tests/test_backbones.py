"""The backbones beyond the paper's CNNs (EfficientNet-B0, ConvNeXt-T, Swin-T, ViT-B/16, ViT-B/32, and CLIP's
ViT-B/32 and ViT-B/16 image encoders), with random weights: shapes, unit embeddings, a training step, save and
load; two training steps that evaluate.py then scores; the input sizes and normalisations they cannot take;
starting weights from a file; CLIP's MLP activation (QuickGELU; GELU for the models trained before it;
tests/test_clip.py compares CLIP's encoder with OpenAI's own definition). The full networks give the feature
widths model.BACKBONES lists; everything else runs on tiny networks of the same classes (one block per stage, a few
channels: tiny_networks), through the project's own wrapping."""
import os

import pytest
import torch
import torchvision

import demo_data
import train
import utils
from conftest import run_main
import model as M
from model import PATCH_SIZE, ZSSBIRModel
from test_train import assert_one_line_error

def _has_open_clip() -> bool:
    try:
        import open_clip  # noqa: F401
        return True
    except ImportError:
        return False


# CLIP's encoders need open_clip, which requirements.txt installs; a machine without it skips them.
NEEDS_OPEN_CLIP = pytest.mark.skipif(not _has_open_clip(), reason="open_clip is not installed")
NEW = ["efficientnet_b0", "convnext_tiny", "swin_t", "vit_b_16", "vit_b_32",
       pytest.param("clip_vit_b_32", marks=NEEDS_OPEN_CLIP), pytest.param("clip_vit_b_16", marks=NEEDS_OPEN_CLIP)]
SIZE = 64


def tiny_torchvision_network(name: str, image_size: int = 224) -> torch.nn.Module:
    """The torchvision class behind a backbone name, one block per stage and a few channels wide: what
    model.build_trunk cuts, resizes and wraps, at a fraction of the full network's cost."""
    from torchvision.models import convnext, efficientnet, swin_transformer, vision_transformer
    if name in ("vit_b_16", "vit_b_32"):
        return vision_transformer.VisionTransformer(image_size, PATCH_SIZE[name], num_layers=1, num_heads=2,
                                                    hidden_dim=32, mlp_dim=64)
    if name == "swin_t":  # 4 stages, as Swin-T: width 8 * embed_dim
        return swin_transformer.SwinTransformer([4, 4], embed_dim=4, depths=[1, 1, 1, 1], num_heads=[1, 1, 1, 1],
                                                window_size=[7, 7])
    if name == "convnext_tiny":  # 4 stages, as ConvNeXt-T
        return convnext.ConvNeXt([convnext.CNBlockConfig(4, 8, 1), convnext.CNBlockConfig(8, 16, 1),
                                  convnext.CNBlockConfig(16, 32, 1), convnext.CNBlockConfig(32, None, 1)])
    if name == "efficientnet_b0":  # the stem, two MBConv blocks, the 1x1 head conv to 4 x 8 channels
        return efficientnet.EfficientNet([efficientnet.MBConvConfig(1, 3, 1, 8, 8, 1),
                                          efficientnet.MBConvConfig(6, 3, 2, 8, 8, 1)], dropout=0.2)
    raise KeyError(name)


# backbone -> the tiny network's feature width (model.BACKBONES lists the full networks'; the first test checks them)
TINY_WIDTH = {"vit_b_16": 32, "vit_b_32": 32, "swin_t": 32, "convnext_tiny": 32, "efficientnet_b0": 32,
              "clip_vit_b_32": 16, "clip_vit_b_16": 16}


@pytest.fixture
def tiny_networks(monkeypatch):
    """model.build_trunk builds the tiny networks for the backbones of NEW (and the full ones for the others),
    through the same torchvision and open_clip calls, and model.BACKBONES gives their widths."""
    real_get_model = torchvision.models.get_model

    def get_model(name, weights=None, **kwargs):
        if name not in TINY_WIDTH:
            return real_get_model(name, weights=weights, **kwargs)
        assert weights is None, "the tiny networks have no published weights"
        return tiny_torchvision_network(name, **kwargs)
    monkeypatch.setattr(torchvision.models, "get_model", get_model)
    for name, width in TINY_WIDTH.items():
        monkeypatch.setitem(M.BACKBONES, name, M.BACKBONES[name][:2] + (width,))
    if _has_open_clip():
        import open_clip
        real_create_model = open_clip.create_model

        def create_model(model_name, pretrained=None, force_image_size=224, **kwargs):
            assert pretrained is None, "the tiny networks have no published weights"
            # the "-quickgelu" names build the same network with QuickGELU in its MLPs
            backbone = {"ViT-B-32": "clip_vit_b_32", "ViT-B-16": "clip_vit_b_16"}[model_name.removesuffix("-quickgelu")]
            return real_create_model(model_name, pretrained=None, force_image_size=force_image_size,
                                     embed_dim=TINY_WIDTH[backbone],
                                     vision_cfg=dict(layers=1, width=32, head_width=16, patch_size=PATCH_SIZE[backbone],
                                                     image_size=force_image_size),
                                     text_cfg=dict(context_length=8, vocab_size=64, width=16, heads=1, layers=1),
                                     **kwargs)
        monkeypatch.setattr(open_clip, "create_model", create_model)


def step_args(backbone: str):
    args = train.get_args_parser().parse_args(["--data_dir", "unused", "--recipe", "scratch", "--no-pretrained",
                                               "--backbone", backbone, "--image_size", str(SIZE), "--device", "cpu"])
    train.check_args(args)
    return args


@pytest.mark.parametrize("backbone", NEW)
def test_a_full_size_backbone_gives_the_features_its_width_says(backbone):
    """The full networks, built for SIZE (the other tests build tiny ones): their features are as wide as
    model.BACKBONES says, which sizes the head and the domain classifier."""
    trunk, width = M.build_trunk(backbone, pretrained=False, image_size=SIZE)
    with torch.no_grad():
        feats = trunk.eval()(torch.rand(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0)))
    assert width == M.BACKBONES[backbone][2] and feats.shape == (2, width)


@pytest.mark.parametrize("backbone", NEW)
def test_a_backbone_embeds_trains_and_reloads(backbone, tiny_networks):
    torch.manual_seed(0)
    model = ZSSBIRModel(backbone, 16, pretrained=False, num_classes=3, shared_trunk=True, image_size=SIZE)
    g = torch.Generator().manual_seed(0)
    sketch, photo = torch.rand(4, 3, SIZE, SIZE, generator=g), torch.rand(4, 3, SIZE, SIZE, generator=g)
    labels = torch.tensor([0, 1, 2, 0])
    before = [p.detach().clone() for p in model.parameters()]
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    vals = train.global_mean(train.train_step(train.TrainingLosses(model), optimizer,
                                              torch.amp.GradScaler("cpu", enabled=False), [sketch, photo, labels],
                                              0.5, 1e-3, step_args(backbone), None))
    assert all(torch.isfinite(torch.tensor(v)) for v in vals.values()) and vals["class"] > 0
    assert any(not torch.equal(p, b) for p, b in zip(model.parameters(), before))  # it stepped
    model.eval()
    with torch.no_grad():
        emb = model.sketch_encoder(sketch)
        assert emb.shape == (4, 16)
        torch.testing.assert_close(emb.norm(dim=1), torch.ones(4))
        clone = ZSSBIRModel(backbone, 16, pretrained=False, num_classes=3, shared_trunk=True, image_size=SIZE)
        clone.load_state_dict(model.state_dict())
        assert torch.equal(clone.eval().photo_encoder(photo), model.photo_encoder(photo))


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> str:
    """The demo data (demo_data.py) at 64 px, 2 sketches and 2 photos of each of its 47 classes: 67 training
    photos after the validation hold-out, so 2 steps of 32."""
    out = str(tmp_path_factory.mktemp("demo") / "demo")
    demo_data.main(demo_data.get_args_parser().parse_args(["--out", out, "--image_size", str(SIZE),
                                                           "--sketches_per_class", "2", "--photos_per_class", "2",
                                                           "--workers", "1"]))
    return out


@pytest.mark.parametrize("backbone", NEW)
def test_a_backbone_trains_two_steps_and_evaluates_on_the_demo(backbone, demo, tmp_path, tiny_networks):
    data, ckpt = demo, str(tmp_path / "ckpt")
    proc = run_main("train.py", "--data_dir", data, "--checkpoint_dir", ckpt, "--no-pretrained", "--backbone", backbone,
                    "--image_size", str(SIZE), "--embedding_dim", "16", "--batch_size", "32", "--epochs", "1",
                    "--workers", "0", "--device", "cpu", "--print_every", "1")
    assert proc.returncode == 0, proc.stderr
    assert "epoch 1 step 2:" in proc.stdout and "epoch 1 step 3:" not in proc.stdout
    proc = run_main("evaluate.py", "--model", os.path.join(ckpt, "best.pth"), "--data", data, "--workers", "0",
                    "--device", "cpu", "--num_sketches", "0", "--output_dir", str(tmp_path / "eval"))
    assert proc.returncode == 0, proc.stderr
    assert f"model {os.path.join(ckpt, 'best.pth')}: {backbone}, 16-d, {SIZE}px" in proc.stdout
    assert "standard" in proc.stdout
    entry = utils.load_checkpoint(os.path.join(ckpt, "best.pth"))["model"]  # CLIP's activation is recorded
    assert entry.get("activation") == ("quick_gelu" if backbone in M.CLIP_BACKBONES else None)


def test_sizes_and_norms_a_backbone_cannot_take(tiny_data, tmp_path):
    common = ["--data_dir", tiny_data, "--checkpoint_dir", str(tmp_path / "c"), "--no-pretrained", "--device", "cpu"]
    proc = run_main("train.py", *common, "--backbone", "vit_b_16", "--image_size", "72")
    assert_one_line_error(proc, "16-pixel patches", "divisible by 16")
    proc = run_main("train.py", *common, "--backbone", "convnext_tiny", "--domain_bn")
    assert_one_line_error(proc, "--domain_bn", "convnext_tiny has none")
    assert PATCH_SIZE == {"vit_b_16": 16, "vit_b_32": 32, "clip_vit_b_16": 16, "clip_vit_b_32": 32}
    with pytest.raises(M.ModelConfigError, match="divisible by 32"):  # the same rule, checked once (ModelConfig)
        ZSSBIRModel("vit_b_32", 8, pretrained=False, image_size=48)


def test_weights_from_a_file_start_the_trunk_and_another_networks_file_is_one_line(tiny_data, tmp_path, tiny_networks):
    torch.manual_seed(1)
    net = torchvision.models.resnet18()
    model = ZSSBIRModel("resnet18", 8, pretrained=net.state_dict())
    assert all(torch.equal(e.trunk[0].weight, net.conv1.weight) for e in (model.sketch_encoder, model.photo_encoder))
    # A ViT's weights trained at 224 px start a ViT built for 64 px: its 2 x 2 patches get interpolated positions.
    vit = torchvision.models.get_model("vit_b_32")  # the tiny one, 7 x 7 patches
    small = ZSSBIRModel("vit_b_32", 8, pretrained=vit.state_dict(), shared_trunk=True, image_size=SIZE)
    assert torch.equal(small.encoder.trunk.conv_proj.weight, vit.conv_proj.weight)
    assert vit.encoder.pos_embedding.shape == (1, 1 + 7 ** 2, TINY_WIDTH["vit_b_32"])
    assert small.encoder.trunk.encoder.pos_embedding.shape == (1, 1 + (SIZE // 32) ** 2, TINY_WIDTH["vit_b_32"])
    # train.py --weights: the checkpoint says where the trunk started; a wrong or missing file is one line.
    path, other = str(tmp_path / "resnet18.pth"), str(tmp_path / "mobilenet.pth")
    torch.save({"state_dict": net.state_dict()}, path)  # as many training scripts save it
    torch.save(torchvision.models.mobilenet_v3_small().state_dict(), other)
    common = ["--data_dir", tiny_data, "--backbone", "resnet18", "--image_size", "32", "--embedding_dim", "8",
              "--batch_size", "8", "--epochs", "1", "--workers", "0", "--device", "cpu"]
    proc = run_main("train.py", *common, "--checkpoint_dir", str(tmp_path / "c"), "--weights", path)
    assert proc.returncode == 0, proc.stderr
    assert utils.load_checkpoint(str(tmp_path / "c" / "last.pth"))["model"]["weights"] == "file"
    assert_one_line_error(run_main("train.py", *common, "--checkpoint_dir", str(tmp_path / "d"), "--weights", other),
                          "do not fit torchvision's resnet18")
    assert_one_line_error(run_main("train.py", *common, "--checkpoint_dir", str(tmp_path / "d"), "--weights",
                                   str(tmp_path / "missing.pth")), "missing.pth not found")
    assert not os.path.exists(tmp_path / "d")


@NEEDS_OPEN_CLIP
def test_clip_sees_clips_normalisation_and_starts_from_a_file_of_another_size(tiny_networks):
    """The data pipeline gives images in [0, 1]; each encoder normalises them with the statistics its weights
    expect: CLIP's for CLIP's encoder, ImageNet's (torchvision's) for a torchvision backbone. A state dict of the
    whole CLIP model made for 224 px starts an encoder built for 64 px, its position embeddings resized."""
    import open_clip

    def normalised(pixel, mean, std):
        return (pixel - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None]

    model = ZSSBIRModel("clip_vit_b_32", 8, pretrained=False, shared_trunk=True, image_size=SIZE)
    pixel = torch.rand(3, 1, 1)  # one pixel in [0, 1], as the pipeline gives it
    clip = normalised(pixel, open_clip.OPENAI_DATASET_MEAN, open_clip.OPENAI_DATASET_STD)
    torch.testing.assert_close(model.encoder.normalize(pixel), clip, rtol=0, atol=0)
    imagenet = torchvision.models.ResNet18_Weights.DEFAULT.transforms()
    resnet = ZSSBIRModel("resnet18", 8, pretrained=False).sketch_encoder.normalize
    torch.testing.assert_close(resnet(pixel), normalised(pixel, imagenet.mean, imagenet.std), rtol=0, atol=0)
    assert not any(".normalize." in k for k in model.state_dict())  # the config holds the statistics
    torch.manual_seed(3)
    full = open_clip.create_model("ViT-B-32", pretrained=None)  # 224 px (the tiny one: 7 x 7 patches)
    openai = {**full.state_dict(), "input_resolution": torch.tensor(224), "context_length": torch.tensor(77),
              "vocab_size": torch.tensor(49408)}  # the int buffers OpenAI's TorchScript archive also holds
    started = ZSSBIRModel("clip_vit_b_32", 8, pretrained=openai, shared_trunk=True, image_size=SIZE)
    assert torch.equal(started.encoder.trunk.conv1.weight, full.visual.conv1.weight)
    assert full.visual.positional_embedding.shape == (1 + 7 ** 2, 32)  # 32: the tiny encoder's width
    assert started.encoder.trunk.positional_embedding.shape == (1 + (SIZE // 32) ** 2, 32)


def test_a_missing_open_clip_is_one_line(tiny_data, tmp_path, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "open_clip", None)  # as if it were not installed: importing it fails
    proc = run_main("train.py", "--data_dir", tiny_data, "--checkpoint_dir", str(tmp_path / "c"), "--no-pretrained",
                    "--backbone", "clip_vit_b_32", "--image_size", "64", "--batch_size", "8", "--device", "cpu")
    assert_one_line_error(proc, "needs the open_clip package", "pip install open_clip_torch")
    assert not os.path.exists(tmp_path / "c")


@NEEDS_OPEN_CLIP
def test_a_clip_model_from_before_quickgelu_is_built_with_gelu(tiny_networks):
    """A CLIP config made today builds QuickGELU into the encoder's MLPs (open_clip's -quickgelu model); one read from
    a checkpoint written before (format 1, no activation) builds torch's GELU, as it was trained, from the same
    weights, and embeds otherwise."""
    from open_clip.transformer import QuickGELU, ResidualAttentionBlock

    new = M.ModelConfig("clip_vit_b_32", 8, SIZE, shared_trunk=True, weights="none")
    old = M.ModelConfig.from_dict({k: v for k, v in new.to_dict().items() if k != "activation"} | {"format": 1})
    models = [ZSSBIRModel.from_config(c, start_weights=False).eval() for c in (new, old)]
    for model, activation in zip(models, (QuickGELU, torch.nn.GELU)):
        mlps = [m.mlp.gelu for m in model.modules() if isinstance(m, ResidualAttentionBlock)]
        assert len(mlps) == 1 and all(type(a) is activation for a in mlps)
    models[1].load_state_dict(models[0].state_dict())
    x = torch.rand(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert not torch.allclose(models[0].sketch_encoder(x), models[1].sketch_encoder(x))


def test_a_clip_run_from_before_quickgelu_resumes_and_evaluates_as_it_was_trained(tiny_data, tmp_path, tiny_networks):
    """--resume of a CLIP checkpoint written before QuickGELU (its model entry without activation) goes on with
    GELU, says so, and writes GELU into its checkpoints; evaluate.py builds it with GELU and says so."""
    ckpt = str(tmp_path / "ckpt")
    common = ["--data_dir", tiny_data, "--recipe", "scratch", "--no-test_flip", "--test_shift", "0", "--backbone",
              "clip_vit_b_32",
              "--image_size", str(SIZE), "--embedding_dim", "8", "--batch_size", "4", "--workers", "0",
              "--device", "cpu"]
    proc = run_main("train.py", *common, "--checkpoint_dir", ckpt, "--epochs", "1")
    assert proc.returncode == 0, proc.stderr
    last = os.path.join(ckpt, "last.pth")
    old = utils.load_checkpoint(last)
    old["model"] = {k: v for k, v in old["model"].items() if k != "activation"} | {"format": 1}
    utils.save_checkpoint(old, last)
    proc = run_main("train.py", *common, "--resume", last, "--epochs", "2")
    assert proc.returncode == 0, proc.stderr
    assert "note: this clip_vit_b_32 model uses GELU in its MLPs, as it was trained" in proc.stdout
    resumed = utils.load_checkpoint(last)
    assert resumed["epoch"] == 2 and "activation" not in resumed["model"] and resumed["model"]["format"] == 1
    proc = run_main("evaluate.py", "--model", last, "--data", tiny_data, "--workers", "0", "--device", "cpu",
                    "--num_sketches", "0", "--output_dir", str(tmp_path / "e"))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("uses GELU in its MLPs, as it was trained") == 1


def test_the_small_input_resnets_do_a_quarter_and_a_sixteenth_of_resnet18s_flops_and_train_from_scratch():
    """resnet18_w32 and resnet18_w16: resnet18's blocks at base width 32 and 16 behind a 3x3 stride-2 stem and
    a max pool; at the same input size they do about 1/4 and 1/16 of resnet18's FLOPs (forward: 0.240 and
    0.0614, their 3x3 first convolution being cheaper than its 7x7 one), and have no published weights."""
    from torch.utils.flop_counter import FlopCounterMode

    def flops(name):
        trunk, width = M.build_trunk(name, pretrained=False, image_size=32)
        with FlopCounterMode(display=False) as counter:
            feats = trunk(torch.rand(2, 3, 32, 32))
        assert feats.shape == (2, width) and width == M.BACKBONES[name][2]
        return counter.get_total_flops()
    base = flops("resnet18")
    assert abs(flops("resnet18_w32") / base - 1 / 4) < 0.015 and abs(flops("resnet18_w16") / base - 1 / 16) < 0.0015
    assert M.backbone_stats("resnet18_w32") == M.IMAGENET_STATS
    for weights in ("imagenet", "file"):
        with pytest.raises(M.ModelConfigError, match="has no published weights") as e:
            M.ModelConfig("resnet18_w32", 16, 32, weights=weights)
        assert e.value.field == "weights"
    M.ModelConfig("resnet18_w32", 16, 32, weights="none")
