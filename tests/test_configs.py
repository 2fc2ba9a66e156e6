"""train.py's YAML configs: configs/*.yaml as the flags' defaults, --help, bad files, and the record of the config."""
import json
import os

import pytest

import train
import utils
from conftest import make_tiny_dataset, run_main

# The recipes as train.py wrote them in Python before they became configs/*.yaml (commit a003a0a): the files
# must keep these values, or runs of a recipe stop matching the figures measured with it.
SCRATCH = dict(backbone="resnet18", pretrained=False, image_size=32, batch_size=64, lr=2e-3, weight_decay=5e-4,
               warmup=0.3, shared_trunk=True, domain_bn=False, edge_maps=True, sampling="pairs", triplet_loss_ratio=0.0,
               class_loss_ratio=1.0, domain_loss_ratio=0.0, grl_threshold_epoch=0, proxy_lr_mult=10.0, crop_scale=0.5)
RECIPES = {
    # issue 33: resnet18's blocks at a quarter of the width behind a small-input stem, at 64 px, test-time flips and
    # shifts, 4x the learning rate
    "scratch": {**SCRATCH, "backbone": "resnet18_w16", "image_size": 64, "test_flip": True, "test_shift": 2,
                "lr": 8e-3, "backbone_from_tflops": "48:resnet18_w32"},
    "finetune": {**SCRATCH, "backbone": "resnet50", "pretrained": True, "image_size": 224, "lr": 1e-4, "warmup": 0.1},
    "original": {"pretrained": True} | dict(backbone="vgg16", image_size=224, batch_size=32, lr=1e-4, weight_decay=1e-4,
                     warmup=0.5 / 30, shared_trunk=False, domain_bn=False, edge_maps=False, sampling="triplets",
                     triplet_loss_ratio=1.0, class_loss_ratio=0.0, domain_loss_ratio=0.5, grl_threshold_epoch=5,
                     proxy_lr_mult=1.0, crop_scale=0.7),
}


def parse(*argv: str):
    args = train.get_args_parser().parse_args(["--data_dir", "x", *argv])
    train.apply_recipe(args)
    return args


def config_values(name: str) -> dict:
    return train.read_config(os.path.join(train.CONFIG_DIR, name + ".yaml"), train.get_args_parser())[1]


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_the_recipe_configs_hold_the_recipes_bit_for_bit(name):
    assert config_values(name) == RECIPES[name]
    assert all(type(v) is type(RECIPES[name][k]) for k, v in config_values(name).items())  # 0.0 stays a float


def test_finetune_yaml_is_the_parsers_own_defaults():
    """get_args_parser writes finetune's values as its defaults (what a config leaves out falls back to)."""
    parser = train.get_args_parser()
    assert {k: parser.get_default(k) for k in RECIPES["finetune"]} == RECIPES["finetune"]


def test_each_recipe_chooses_its_initial_weights_and_a_flag_wins():
    # --recipe scratch once kept the parser's --pretrained and started from ImageNet weights.
    assert train.model_config(parse("--recipe", "scratch")).weights == "none"
    assert train.model_config(parse("--no-pretrained")).weights == "none"
    on_resnet18 = parse("--recipe", "scratch", "--pretrained", "--backbone", "resnet18")
    assert train.model_config(on_resnet18).weights == "imagenet"
    with pytest.raises(train.ModelConfigError, match="resnet18_w16 has no published weights"):
        train.model_config(parse("--recipe", "scratch", "--pretrained"))  # its own backbone has none
    assert train.model_config(parse("--recipe", "finetune")).weights == "imagenet"
    assert train.model_config(parse("--recipe", "finetune", "--no-pretrained")).weights == "none"


def test_the_scratch_recipe_widens_its_backbone_from_48_tflops_unless_a_backbone_is_given():
    assert parse("--no-pretrained").backbone == "resnet18_w16"  # an epoch schedule: no budget to choose by
    assert parse("--no-pretrained", "--budget_tflops", "47.9").backbone == "resnet18_w16"
    assert parse("--no-pretrained", "--budget_tflops", "48").backbone == "resnet18_w32"
    assert parse("--no-pretrained", "--budget_tflops", "73", "--backbone", "resnet18_w16").backbone == "resnet18_w16"
    assert parse("--no-pretrained", "--budget_tflops", "73", "--backbone_from_tflops", "").backbone == "resnet18_w16"
    assert parse("--no-pretrained", "--budget_tflops", "9", "--backbone_from_tflops", "8:resnet18").backbone == \
        "resnet18"
    assert parse("--budget_tflops", "73").backbone == "resnet50"  # finetune has no such rule
    for bad in ("48", "x:resnet18_w32", "48:resnet19", "-1:resnet18"):
        with pytest.raises(utils.UserError, match="--backbone_from_tflops must be T:NAME"):
            parse("--no-pretrained", "--budget_tflops", "73", f"--backbone_from_tflops={bad}")


@pytest.mark.parametrize("planned, resumed_with", [("40", ["--budget_tflops", "73"]), ("73", [])])
def test_a_resumed_run_keeps_the_backbone_its_budget_chose(planned, resumed_with):
    saved = vars(parse("--no-pretrained", "--budget_tflops", planned))
    args = parse("--no-pretrained", "--resume", "ckpt/last.pth", *resumed_with)
    train.resume_args(args, {"args": saved, "step": 100}, "ckpt/last.pth")
    train.apply_recipe(args)
    assert args.backbone == saved["backbone"] == ("resnet18_w16" if planned == "40" else "resnet18_w32")


def test_config_and_recipe_name_the_same_file_and_a_flag_wins(tmp_path):
    by_recipe = parse("--recipe", "original")
    by_config = parse("--config", os.path.join(train.CONFIG_DIR, "original.yaml"))
    assert {k: v for k, v in vars(by_config).items() if k not in ("config", "given")} == {
        k: v for k, v in vars(by_recipe).items() if k not in ("config", "given")}
    assert by_config.given == ["config", "data_dir"] and by_recipe.given == ["data_dir", "recipe"]
    assert by_recipe.recipe == by_config.recipe == "original" and by_config.recipe_source == "given"
    assert os.path.samefile(by_recipe.config, by_config.config)
    assert parse("--recipe", "original", "--lr", "0.5", "--shared_trunk").lr == 0.5
    assert parse("--recipe", "original", "--shared_trunk").shared_trunk is True
    # A config sets what it names; what it leaves out keeps train.py's own default; numbers in any YAML spelling.
    own = tmp_path / "mine.yaml"
    own.write_text("lr: 1e-4  # a string to YAML 1.1, read as the command line reads it\nepochs: 3\nmargin: 1\n")
    mine = parse("--config", str(own), "--epochs", "4")
    assert (mine.lr, mine.epochs, mine.margin, mine.backbone) == (1e-4, 4, 1.0, "resnet50") and mine.recipe == "mine"
    # The parser is left as it was: the next parse sees its own defaults again.
    parser = train.get_args_parser()
    parser.parse_args(["--data_dir", "x", "--config", str(own)])
    assert parser.get_default("epochs") is None and parser.get_default("lr") == 1e-4


@pytest.mark.parametrize("name", ["zse_sbir_vit_b16", "sketch_lvm_clip_vit_b32"])
def test_published_settings_are_usable_and_say_where_each_value_comes_from(name):
    args = parse("--recipe", name, "--no-pretrained")
    train.check_args(args)
    assert args.image_size == 224 and args.method == name.split("_")[0] + "_" + name.split("_")[1]
    text = open(os.path.join(train.CONFIG_DIR, name + ".yaml")).read()
    assert "CVPR 2023" in text and "github.com/" in text and "at commit" in text
    for key in ("backbone", "image_size", "embedding_dim", "batch_size", "lr", "weight_decay"):
        line = next(line for line in text.splitlines() if line.startswith(key + ":"))
        assert "#" in line, f"{name}.yaml does not say where {key} comes from"
    assert "epochs:" in text or "Epochs: not confirmed" in text


def test_help_shows_real_defaults_in_groups():
    out = run_main("train.py", "--help")
    assert out.returncode == 0, out.stderr
    text = " ".join(out.stdout.split())
    assert "(default: None)" not in text
    finetune = os.path.relpath(os.path.join(train.CONFIG_DIR, "finetune.yaml"))
    lr_help = "--lr LR learning rate (--method sbir: AdamW's; sketch_lvm: Adam's for CLIP, its clip_LN_lr)"
    assert f"{lr_help} (default: 0.0001)" in text and f"(default: {finetune})" in text
    for group in ("data, outputs and schedule:", "model:", "sampling and losses:", "optimiser:", "speed"):
        assert group in text
    scratch = " ".join(run_main("train.py", "--no-pretrained", "--help").stdout.split())
    assert f"{lr_help} (default: 0.008)" in scratch and "(default: resnet18_w16)" in scratch
    original = " ".join(run_main("train.py", "--recipe", "original", "--help").stdout.split())
    assert "(default: vgg16)" in original and "(default: triplets)" in original


@pytest.mark.parametrize("content, fragment", [
    (None, "cannot read config"),
    ("lr: [0.1\n", "is not YAML"),
    ("- lr\n- 0.1\n", "holds a list, not flag names and values"),
    ("lrr: 0.1\n", "unknown key 'lrr'"),
    ("data_dir: data/demo\n", "unknown key 'data_dir'"),
    ("lr: fast\n", "lr must be a number, got 'fast'"),
    ("epochs: 2.5\n", "epochs must be an integer, got 2.5"),
    ("lr: true\n", "lr must be a number, got True"),
    ("shared_trunk: 1\n", "shared_trunk must be true or false, got 1"),
    ("sampling: quads\n", "sampling must be one of pairs, triplets, quadruplets, got 'quads'"),
    ("backbone: null\n", "backbone must be a string, got None"),
])
def test_a_bad_config_is_one_line(tmp_path, content, fragment):
    path = tmp_path / "bad.yaml"
    if content is not None:
        path.write_text(content)
    proc = run_main("train.py", "--data_dir", str(tmp_path), "--config", str(path))
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert len(lines) == 1 and lines[0].startswith("error: ") and fragment in lines[0], proc.stderr


@pytest.mark.parametrize("flags, fragment", [
    (["--recipe", "nosuch"], "there is no configs/nosuch.yaml; choose one of"),
    (["--recipe", "original", "--config", "configs/scratch.yaml"], "not both"),
])
def test_a_bad_choice_of_config_is_one_line(tmp_path, flags, fragment):
    proc = run_main("train.py", "--data_dir", str(tmp_path), *flags)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and len(lines) == 1 and fragment in lines[0], proc.stderr


def test_the_banner_args_json_and_checkpoints_keep_the_config(tmp_path):
    data = make_tiny_dataset(str(tmp_path / "data"))
    config = tmp_path / "tiny.yaml"
    text = "# a tiny run\nbackbone: mobilenet_v3_small\nimage_size: 32\nbatch_size: 10\nsampling: triplets\n" \
           "edge_maps: false\ntriplet_loss_ratio: 1.0\nclass_loss_ratio: 0.0\n"
    config.write_text(text)
    ckpt = str(tmp_path / "ckpt")
    proc = run_main("train.py", "--data_dir", data, "--checkpoint_dir", ckpt, "--config", str(config),
                    "--no-pretrained", "--embedding_dim", "16", "--workers", "0", "--device", "cpu", "--epochs", "1")
    assert proc.returncode == 0, proc.stderr
    assert f"config {config} (given):\n" + "".join(f"  {line}\n" for line in text.splitlines()) in proc.stdout
    last = utils.load_checkpoint(os.path.join(ckpt, "last.pth"))
    assert last["config"] == {"path": str(config), "text": text} and last["args"]["recipe"] == "tiny"
    assert last["args"]["sampling"] == "triplets" and last["step"] == 2  # 20 training sketches in batches of 10
    assert json.load(open(os.path.join(ckpt, "args.json")))["config"] == last["config"]
