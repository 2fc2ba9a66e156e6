"""A network's description (ModelConfig): its rules, checked once, as the model, train.py's flags and a
checkpoint meet them; what train.py writes (format 1, or 2 for a CLIP model with QuickGELU), what it wrote before
(format 0, a committed fixture; format 1 for CLIP, which meant GELU), and what a newer or damaged description
gives."""
import json
import os

import pytest
import torch

import model as M
import train
import utils
from conftest import U32, U64, make_tiny_dataset, reordering_rtol, run_main
from test_metrics import assert_same_results
from test_train import TINY, assert_one_line_error, train_args

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures")


@pytest.mark.parametrize("fields, field, message", [
    ({"backbone": "alexnet9"}, "backbone", "unknown backbone 'alexnet9'; choose one of vgg16,"),
    ({"backbone": ["resnet18"]}, "backbone", "unknown backbone ['resnet18']"),
    ({"embedding_dim": 0}, "embedding_dim", "embedding_dim must be a whole number of at least 1, got 0"),
    ({"embedding_dim": 16.0}, "embedding_dim", "got 16.0"),
    ({"image_size": 16}, "image_size", "image_size must be at least 32 pixels, got 16"),
    ({"backbone": "vit_b_16", "image_size": 72}, "image_size",
     "backbone vit_b_16 cuts images into 16-pixel patches; give an image_size divisible by 16 (e.g. 224), not 72"),
    ({"shared_trunk": "yes"}, "shared_trunk", "shared_trunk must be True or False, got 'yes'"),
    ({"domain_bn": True}, "domain_bn", "domain_bn splits the batch norms of a shared trunk; add shared_trunk"),
    ({"backbone": "swin_t", "shared_trunk": True, "domain_bn": True}, "domain_bn",
     "domain_bn splits batch norms, and backbone swin_t has none (layer norm only)"),
    ({"domain_input": "logits"}, "domain_input", "domain_input must be one of embedding, features, got 'logits'"),
    ({"weights": "hub"}, "weights", "weights must be one of imagenet, openai, file, none, got 'hub'"),
    ({"mean": (0.5, 0.5)}, "mean", "mean and std must be 3 channel values each"),
    ({"mean": (0.5, 0.5, 0.5), "std": (0.2, 0.0, 0.2)}, "std", "std must be positive"),
    ({"activation": "gelu"}, "activation", "activation chooses CLIP's MLP activation; backbone resnet18 has its own"),
    ({"backbone": "clip_vit_b_32", "activation": "relu"}, "activation",
     "activation must be one of quick_gelu, gelu, got 'relu'"),
])
def test_each_rule_of_a_model_config_names_its_field(fields, field, message):
    with pytest.raises(M.ModelConfigError) as err:
        M.ModelConfig(**{"backbone": "resnet18", "embedding_dim": 16, "image_size": 32, **fields})
    assert err.value.field == field and message in str(err.value)
    flags = err.value.phrase("--")  # as train.py says it
    assert f"--{field}" in flags and "{" not in flags


def test_the_flags_the_model_and_a_checkpoint_meet_the_same_rule(tiny_data, tmp_path):
    """domain_bn without shared_trunk: the model's ModelConfigError, train.py's one line in flags, a checkpoint's
    one line naming its entry's field."""
    with pytest.raises(M.ModelConfigError, match="domain_bn splits the batch norms of a shared trunk"):
        M.ZSSBIRModel("resnet18", 16, pretrained=False, domain_bn=True)
    proc = run_main("train.py", "--data_dir", tiny_data, "--checkpoint_dir", str(tmp_path / "c"), *TINY, "--domain_bn")
    assert_one_line_error(proc, "--domain_bn splits the batch norms of a shared trunk; add --shared_trunk")
    ckpt_dir = str(tmp_path / "ckpt")
    train.main(train_args(tiny_data, ckpt_dir, "--epochs", "1", "--val_fraction", "0"))
    ckpt = utils.load_checkpoint(os.path.join(ckpt_dir, "last.pth"))
    broken = str(tmp_path / "broken.pth")
    utils.save_checkpoint({**ckpt, "model": {**ckpt["model"], "domain_bn": True}}, broken)
    assert_one_line_error(evaluate(broken, tiny_data, str(tmp_path / "e")), "wrong model.domain_bn",
                          "model.domain_bn splits the batch norms of a shared trunk; add model.shared_trunk")
    old = {k: v for k, v in ckpt.items() if k != "model"}  # format 0: the arguments describe the model
    utils.save_checkpoint({**old, "args": {**old["args"], "image_size": 16}}, broken)
    assert_one_line_error(evaluate(broken, tiny_data, str(tmp_path / "e")), "wrong args.image_size",
                          "args.image_size must be at least 32 pixels, got 16")
    assert not os.path.exists(tmp_path / "c")  # a bad flag: nothing written


def test_triplets_train_with_trunk_features_for_the_domain_classifier(tiny_data, tmp_path):
    """--sampling triplets (the original recipe) with --domain_input features on a trunk wider than the embedding
    (mobilenet_v3_small: 576 features, a 16-d embedding): the domain classifier is built for the features and
    reads them."""
    ckpt_dir = str(tmp_path / "ckpt")
    proc = run_main("train.py", "--data_dir", tiny_data, "--checkpoint_dir", ckpt_dir, *TINY, "--epochs", "1",
                    "--domain_input", "features")
    assert proc.returncode == 0, proc.stderr
    ckpt = utils.load_checkpoint(os.path.join(ckpt_dir, "last.pth"))
    assert ckpt["args"]["sampling"] == "triplets" and ckpt["model"]["domain_input"] == "features"
    assert ckpt["models"]["domain_classifier"]["mlp.0.weight"].shape == (256, 576)


def evaluate(model: str, data: str, out: str, *extra):
    return run_main("evaluate.py", "--model", model, "--data", data, "--workers", "0", "--device", "cpu",
                    "--num_sketches", "0", "--output_dir", out, *extra)


def test_a_format_0_checkpoint_evaluates_to_the_numbers_it_gave(tmp_path):
    """tests/fixtures/README.md says how the fixture and its numbers were made, by the code before format 1."""
    data = make_tiny_dataset(str(tmp_path / "data"))
    path = os.path.join(FIXTURES, "checkpoint_format0.pth")
    expected = json.load(open(os.path.join(FIXTURES, "checkpoint_format0.json")))
    ckpt = utils.load_checkpoint(path)
    config = utils.checkpoint_model(ckpt)
    assert "model" not in ckpt and config.backbone == "mobilenet_v3_small" and config.mean == (0.485, 0.456, 0.406)
    out = str(tmp_path / "eval")
    proc = evaluate(path, data, out, "--save_embeddings", os.path.join(out, "emb.pt"))
    assert proc.returncode == 0, proc.stderr
    emb = torch.load(os.path.join(out, "emb.pt"), weights_only=False)
    assert emb["query_paths"] == expected["query_paths"] and emb["gallery_paths"] == expected["gallery_paths"]
    q_old, g_old = torch.tensor(expected["queries"]), torch.tensor(expected["gallery"])
    # Unit embeddings in float32: another BLAS may sum in another order, within 2 L K u (conftest.reordering_rtol).
    model = utils.build_model(ckpt, path, trained=True)
    atol = reordering_rtol(model, 3 * 32 * 32) * U32 / U64
    torch.testing.assert_close(emb["queries"], q_old, rtol=0, atol=atol)
    torch.testing.assert_close(emb["gallery"], g_old, rtol=0, atol=atol)
    got = json.load(open(os.path.join(out, "results.json")))["protocols"]
    sims_new, sims_old = emb["queries"] @ emb["gallery"].T, q_old @ g_old.T
    if torch.equal(sims_new.argsort(dim=1, stable=True), sims_old.argsort(dim=1, stable=True)):
        # The same ranking: the same ranks and hits. What is left are float64 sums of at most N + Q terms in
        # [0, 1] (N per AP, Q per mean), which the machine that wrote the fixture may have added in another
        # order: within 2 (N + Q) u64 (Higham 2002, section 4.2; as test_metrics.test_cuda_matches_cpu).
        assert_same_results(got, expected["protocols"], atol=2 * (len(g_old) + len(q_old)) * U64)
    else:  # a near-tie broke the other way on this machine: only within the float tolerance
        assert (sims_new - sims_old).abs().max() <= 4 * atol


def test_a_new_checkpoint_describes_its_model_in_its_own_terms(tiny_data, tmp_path):
    ckpt_dir = str(tmp_path / "ckpt")
    train.main(train_args(tiny_data, ckpt_dir, "--epochs", "1"))
    path = os.path.join(ckpt_dir, "last.pth")
    ckpt = utils.load_checkpoint(path)
    assert ckpt["model"] == {"format": 1, "backbone": "mobilenet_v3_small", "embedding_dim": 16, "image_size": 32,
                             "shared_trunk": False, "domain_bn": False, "domain_input": "embedding", "weights": "none",
                             # torchvision's ImageNet statistics
                             "mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225)}
    before = evaluate(path, tiny_data, str(tmp_path / "a"))
    assert before.returncode == 0, before.stderr
    # Evaluation reads the model entry, not the flags: renaming or dropping train.py's flags changes nothing.
    for key in ("backbone", "embedding_dim", "image_size", "pretrained", "shared_trunk", "domain_bn", "domain_input"):
        ckpt["args"].pop(key)
    renamed = str(tmp_path / "renamed.pth")
    utils.save_checkpoint(ckpt, renamed)
    after = evaluate(renamed, tiny_data, str(tmp_path / "b"))
    assert after.returncode == 0, after.stderr
    a, b = (json.load(open(str(tmp_path / d / "results.json")))["protocols"] for d in ("a", "b"))
    assert a == b
    # A newer format, and a damaged entry: one line each.
    ckpt["model"]["format"] = M.MODEL_FORMAT + 1
    utils.save_checkpoint(ckpt, renamed)
    assert_one_line_error(evaluate(renamed, tiny_data, str(tmp_path / "c")), f"format {M.MODEL_FORMAT + 1}",
                          "newer than this code")
    ckpt["model"] = {**ckpt["model"], "format": 1, "backbone": "resnet999"}
    utils.save_checkpoint(ckpt, renamed)
    assert_one_line_error(evaluate(renamed, tiny_data, str(tmp_path / "d")), "wrong model.backbone")


# A CLIP model's "model" entry as this code wrote it before the activation field (format 1; its MLPs used GELU).
CLIP_FORMAT1 = {"format": 1, "backbone": "clip_vit_b_32", "embedding_dim": 16, "image_size": 64, "shared_trunk": True,
                "domain_bn": False, "domain_input": "embedding", "weights": "openai",
                "mean": (0.48145466, 0.4578275, 0.40821073), "std": (0.26862954, 0.26130258, 0.27577711)}


def test_clips_activation_is_quick_gelu_and_an_older_clip_entry_reads_as_gelu():
    """A CLIP config made today has QuickGELU and is written in format 2 with its activation; an entry written
    before (format 1) means GELU, reads back to itself (so its checkpoint's fingerprint, utils.model_fingerprint, a
    hash of to_dict and the weights, is the one it had) and says so in one line. The other backbones stay format 1
    without activation."""
    new = M.ModelConfig(**{k: v for k, v in CLIP_FORMAT1.items() if k != "format"})
    assert new.activation == "quick_gelu" and new.note() == ""
    assert new.to_dict() == {**CLIP_FORMAT1, "format": 2, "activation": "quick_gelu"}
    assert M.ModelConfig.from_dict(new.to_dict()) == new
    old = M.ModelConfig.from_dict(CLIP_FORMAT1)
    assert old.activation == "gelu" and old.to_dict() == CLIP_FORMAT1
    assert "\n" not in old.note() and "uses GELU in its MLPs, as it was trained" in old.note()
    spelt_out = {**CLIP_FORMAT1, "format": 2, "activation": "gelu"}  # the same network: the same description
    assert M.ModelConfig.from_dict(spelt_out) == old
    assert utils.model_fingerprint({"model": spelt_out, "models": {}}) == \
        utils.model_fingerprint({"model": CLIP_FORMAT1, "models": {}})
    resnet = M.ModelConfig("resnet18", 16, 32)
    assert resnet.activation is None and resnet.to_dict()["format"] == 1 and "activation" not in resnet.to_dict()
    with pytest.raises(ValueError, match=r"unknown model field\(s\) activation \(format 1\)"):
        M.ModelConfig.from_dict({**CLIP_FORMAT1, "activation": "quick_gelu"})  # format 1 had no such field
    with pytest.raises(ValueError, match="this version reads formats 1 to 5"):
        M.ModelConfig.from_dict({**CLIP_FORMAT1, "format": 6})


def with_and_without_test_views(config):
    """The network ``config`` describes at seed 0 and the same weights without test views, both in eval mode."""
    torch.manual_seed(0)
    net = M.ZSSBIRModel.from_config(config, start_weights=False).eval()
    plain = M.ZSSBIRModel.from_config(M.ModelConfig("resnet18", 16, 32, shared_trunk=True), start_weights=False)
    plain.load_state_dict(net.state_dict())
    return net, plain.eval()


def assert_training_embeds_the_image_alone(net, plain, x):
    """In training mode (same dropout draws) the network with test views embeds as the one without."""
    net.train()
    plain.train()
    torch.manual_seed(1)
    a = net.photo_encoder(x)
    torch.manual_seed(1)
    torch.testing.assert_close(a, plain.photo_encoder(x), rtol=0, atol=0)


def test_test_flip_is_written_as_format_4_and_embeds_an_image_and_its_mirror_image():
    """test_flip (format 4) is written only when on; older formats read as off and cannot hold it. In eval
    mode the encoder's embedding is the normalised sum of the image's and its mirror image's, in training
    the image's own; the other methods refuse it."""
    flip = M.ModelConfig("resnet18", 16, 32, shared_trunk=True, test_flip=True)
    d = flip.to_dict()
    assert d["format"] == 4 and d["test_flip"] is True and d["method"] == "sbir"
    assert M.ModelConfig.from_dict(d) == flip and "test_flip" not in M.ModelConfig("resnet18", 16, 32).to_dict()
    with pytest.raises(ValueError, match=r"unknown model field\(s\) test_flip \(format 3\)"):
        M.ModelConfig.from_dict({**d, "format": 3})
    with pytest.raises(M.ModelConfigError) as e:
        M.ModelConfig("clip_vit_b_32", 512, 64, shared_trunk=True, method="sketch_lvm", test_flip=True)
    assert e.value.field == "test_flip"
    net, plain = with_and_without_test_views(flip)
    x = torch.rand(3, 3, 32, 32)
    with torch.no_grad():
        both = plain.photo_encoder(torch.cat([x, x.flip(3)]))  # the same kernels on the same batch: bit-exact
        want = torch.nn.functional.normalize(both[:3] + both[3:], dim=1)
        torch.testing.assert_close(net.photo_encoder(x), want, rtol=0, atol=0)
        assert not torch.allclose(net.photo_encoder(x), plain.photo_encoder(x), atol=1e-3)
        assert_training_embeds_the_image_alone(net, plain, x)


def test_test_shift_is_written_as_format_5_and_embeds_the_sum_of_the_shifted_views():
    """test_shift (format 5) is written only when on; format 4 cannot hold it; it is a whole number of pixels up to
    an eighth of the image. In eval mode the embedding is the normalised sum of the unit embeddings of the image,
    of the image moved right, left, down and up by test_shift pixels (edge pixels repeated) and, with test_flip,
    of the mirror images of all five; training embeds the image alone."""
    shift = M.ModelConfig("resnet18", 16, 32, shared_trunk=True, test_flip=True, test_shift=2)
    d = shift.to_dict()
    assert d["format"] == 5 and d["test_shift"] == 2 and M.ModelConfig.from_dict(d) == shift
    assert M.ModelConfig("resnet18", 16, 32, test_flip=True).to_dict()["format"] == 4
    with pytest.raises(ValueError, match=r"unknown model field\(s\) test_shift \(format 4\)"):
        M.ModelConfig.from_dict({**d, "format": 4})
    for bad in (-1, 5, 1.5, True):
        with pytest.raises(M.ModelConfigError) as e:
            M.ModelConfig("resnet18", 16, 32, test_shift=bad)
        assert e.value.field == "test_shift"
    net, plain = with_and_without_test_views(shift)
    x = torch.rand(3, 3, 32, 32)
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2), mode="replicate")
    moved = [x, padded[:, :, 2:34, :32], padded[:, :, 2:34, 4:], padded[:, :, :32, 2:34], padded[:, :, 4:, 2:34]]
    assert torch.equal(moved[1][:, :, :, 2:], x[:, :, :, :30]) and torch.equal(moved[4][:, :, :30], x[:, :, 2:])
    views = torch.cat(moved + [v.flip(3) for v in moved])
    with torch.no_grad():
        each = plain.photo_encoder(views)  # the same kernels on the same batch: bit-exact
        want = torch.nn.functional.normalize(each.unflatten(0, (10, 3)).sum(0), dim=1)
        torch.testing.assert_close(net.photo_encoder(x), want, rtol=0, atol=0)
        flip_only = M.ZSSBIRModel.from_config(M.ModelConfig("resnet18", 16, 32, shared_trunk=True, test_flip=True),
                                              start_weights=False)
        flip_only.load_state_dict(net.state_dict())
        assert not torch.allclose(net.photo_encoder(x), flip_only.eval().photo_encoder(x), atol=1e-3)
        assert_training_embeds_the_image_alone(net, plain, x)


def test_a_method_other_than_sbir_is_written_as_format_3_and_older_entries_keep_their_bytes():
    """method (format 3) is written only for another method than today's model; format 1 and 2 entries have
    none and read as "sbir"; Sketch_LVM's rules (a CLIP tower, CLIP's embedding size, one tower) hold."""
    lvm = M.ModelConfig("clip_vit_b_32", 512, 64, shared_trunk=True, method="sketch_lvm")
    d = lvm.to_dict()
    assert d["format"] == 3 and d["method"] == "sketch_lvm" and d["activation"] == "quick_gelu"
    assert M.ModelConfig.from_dict(d) == lvm
    assert M.ModelConfig.from_dict(CLIP_FORMAT1).method == "sbir" and "method" not in M.ModelConfig(
        "clip_vit_b_32", 512, 64).to_dict()
    with pytest.raises(ValueError, match=r"unknown model field\(s\) method \(format 2\)"):
        M.ModelConfig.from_dict({**CLIP_FORMAT1, "format": 2, "activation": "gelu", "method": "sbir"})
    for kwargs, field in (({"backbone": "resnet18"}, "backbone"), ({"embedding_dim": 256}, "embedding_dim"),
                          ({"shared_trunk": False}, "shared_trunk"), ({"method": "zse"}, "method")):
        with pytest.raises(M.ModelConfigError) as e:
            M.ModelConfig(**{**dict(backbone="clip_vit_b_32", embedding_dim=512, image_size=64, shared_trunk=True,
                                    method="sketch_lvm"), **kwargs})
        assert e.value.field == field
