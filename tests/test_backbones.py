"""The backbones beyond the paper's CNNs (EfficientNet-B0, ConvNeXt-T, Swin-T, ViT-B/16, ViT-B/32), with random
weights: shapes, unit embeddings, a training step, save and load; two training steps that evaluate.py then
scores; and the input sizes and normalisations they cannot take."""
import os

import pytest
import torch

import train
from conftest import make_tiny_dataset, run_main
from model import PATCH_SIZE, ZSSBIRModel
from test_train import assert_one_line_error

NEW = ["efficientnet_b0", "convnext_tiny", "swin_t", "vit_b_16", "vit_b_32"]
SIZE = 64


def step_args(backbone: str):
    args = train.get_args_parser().parse_args(["--data_dir", "unused", "--recipe", "scratch", "--no-pretrained",
                                               "--backbone", backbone, "--image_size", str(SIZE), "--device", "cpu"])
    train.check_args(args)
    return args


@pytest.mark.parametrize("backbone", NEW)
def test_a_backbone_embeds_trains_and_reloads(backbone):
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


@pytest.mark.parametrize("backbone", NEW)
def test_a_backbone_trains_two_steps_and_evaluates(backbone, tmp_path):
    data = make_tiny_dataset(str(tmp_path / "data"))  # 22 training photos: 2 steps of 8
    ckpt = str(tmp_path / "ckpt")
    proc = run_main("train.py", "--data_dir", data, "--checkpoint_dir", ckpt, "--no-pretrained", "--backbone", backbone,
                    "--image_size", str(SIZE), "--embedding_dim", "16", "--batch_size", "8", "--epochs", "1",
                    "--workers", "0", "--device", "cpu", "--print_every", "1")
    assert proc.returncode == 0, proc.stderr
    assert "epoch 1 step 2:" in proc.stdout and "epoch 1 step 3:" not in proc.stdout
    proc = run_main("evaluate.py", "--model", os.path.join(ckpt, "best.pth"), "--data", data, "--workers", "0",
                    "--device", "cpu", "--num_sketches", "0", "--output_dir", str(tmp_path / "eval"))
    assert proc.returncode == 0, proc.stderr
    assert f"model {os.path.join(ckpt, 'best.pth')}: {backbone}, 16-d, {SIZE}px" in proc.stdout
    assert "standard" in proc.stdout
    for name in os.listdir(ckpt):  # a vision transformer's checkpoint is about 1 GB
        if name.endswith(".pth"):
            os.remove(os.path.join(ckpt, name))


def test_sizes_and_norms_a_backbone_cannot_take(tiny_data, tmp_path):
    common = ["--data_dir", tiny_data, "--checkpoint_dir", str(tmp_path / "c"), "--no-pretrained", "--device", "cpu"]
    proc = run_main("train.py", *common, "--backbone", "vit_b_16", "--image_size", "72")
    assert_one_line_error(proc, "16-pixel patches", "divisible by 16")
    proc = run_main("train.py", *common, "--backbone", "convnext_tiny", "--domain_bn")
    assert_one_line_error(proc, "--domain_bn", "convnext_tiny has none")
    assert PATCH_SIZE == {"vit_b_16": 16, "vit_b_32": 32}
    with pytest.raises(ValueError, match="divisible by 32"):
        ZSSBIRModel("vit_b_32", 8, pretrained=False, image_size=48)
