"""Train a zero-shot sketch-based image retrieval model (triplet loss + domain-adversarial loss).

    python train.py --data_dir data/demo --checkpoint_dir runs/demo --no-pretrained --budget_tflops 4  # make demo's run
    python train.py --data_dir data/sketchy --config configs/original.yaml --checkpoint_dir ckpt --epochs 30
    python train.py --data_dir data/sketchy --checkpoint_dir ckpt --epochs 30 --resume ckpt/last.pth
    torchrun --standalone --nproc_per_node=4 train.py --data_dir data/sketchy --batch_size 128 --checkpoint_dir ckpt

The training flags' defaults come from a YAML config (configs/: the recipes scratch, finetune and original, and
published settings): --config FILE, or --recipe NAME for configs/NAME.yaml, or without either configs/finetune.yaml
(--pretrained) or configs/scratch.yaml (--no-pretrained). A flag on the command line wins over the config, and
--help shows the defaults under the config it is given with. The banner, args.json and every checkpoint keep the
config file's path and text.

Seen classes (DATA/train_labels.txt) are split once, seeded, into training images and a held-out
validation set; seen-class validation mAP@all selects ckpt/best.pth, so model selection never
looks at the unseen classes. ckpt/last.pth is written after every epoch (atomically), with the
optimizer and scaler states, for --resume. SIGTERM or Ctrl-C (SIGINT) finishes the current step,
writes last.pth mid-epoch (with the loader position and the RNG states) and exits; --resume then
continues from that exact step, as if the run had never stopped.

Under torchrun, DistributedDataParallel trains one replica per process (NCCL on GPUs, gloo on the
CPU): --batch_size stays the global batch, each process takes its share of every epoch's seeded
shuffle, batch norm is synchronised across GPUs, and only rank 0 logs and writes checkpoints.
Validation embeds its images sharded across the processes.
"""
import argparse
import hashlib
import math
import os
import signal
import time
import uuid
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import yaml
from torch import nn
from torch.utils.flop_counter import FlopCounterMode
from tqdm import tqdm

import dataset
import methods
import metrics
import utils
from model import (BACKBONES, CLIP_BACKBONES, DOMAIN_INPUTS, METHODS, ModelConfig, ModelConfigError, Pairs,
                   PretrainedWeightsUnavailable, Quadruplets, Triplets, grl_lambda)


# ----------------------------------------------------------------------------------- configs

CONFIG_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs")
NOT_IN_CONFIGS = ("help", "config", "recipe")  # the flags that choose the config itself


def recipe_names() -> list:
    """What --recipe NAME can name: the files configs/NAME.yaml."""
    return sorted(f[:-len(".yaml")] for f in os.listdir(CONFIG_DIR) if f.endswith(".yaml"))


def read_config(path: str, parser: argparse.ArgumentParser) -> tuple[str, dict]:
    """A config file's text and its values: a YAML mapping of the parser's flag names (without the dashes) to
    values, each converted and checked as the command line would; anything else is a UserError."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise utils.UserError(f"cannot read config {path} ({getattr(e, 'strerror', None) or e}); pass a YAML file "
                              f"such as configs/scratch.yaml") from None
    try:
        values = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise utils.UserError(f"config {path} is not YAML ({getattr(e, 'problem', None) or 'unreadable'}{where}); "
                              "write one 'flag_name: value' per line") from None
    if values is None:
        values = {}  # an empty file changes no default
    if not isinstance(values, dict):
        raise utils.UserError(f"config {path} holds a {type(values).__name__}, not flag names and values; "
                              "write one 'flag_name: value' per line")
    flags = {a.dest: a for a in parser._actions
             if a.option_strings and not a.required and a.dest not in NOT_IN_CONFIGS}
    return text, {key: config_value(path, flags, key, value) for key, value in values.items()}


def config_value(path: str, flags: dict, key, value):
    """One config entry as the flag ``key`` takes it: true/false for a --flag/--no-flag, a string for the
    flag's type (read as on the command line), a number of its kind, or null where the flag's default is."""
    action = flags.get(key)
    if action is None:
        raise utils.UserError(f"config {path}: unknown key {key!r}; its keys are train.py's flags without the "
                              "dashes (python train.py --help), except --data_dir, --config and --recipe")
    if value is None and action.default is None:
        return None
    if isinstance(action, argparse.BooleanOptionalAction):
        if isinstance(value, bool):
            return value
        raise utils.UserError(f"config {path}: {key} must be true or false, got {value!r}")
    kinds = {str: (str,), int: (int, str), float: (int, float, str)}[action.type]
    try:
        if isinstance(value, bool) or not isinstance(value, kinds):
            raise ValueError
        converted = action.type(value)
    except ValueError:
        what = {str: "a string", int: "an integer", float: "a number"}[action.type]
        raise utils.UserError(f"config {path}: {key} must be {what}, got {value!r}") from None
    if action.choices and converted not in action.choices:
        raise utils.UserError(f"config {path}: {key} must be one of {', '.join(map(str, action.choices))}, "
                              f"got {value!r}")
    return converted


class ConfigArgumentParser(argparse.ArgumentParser):
    """An ArgumentParser whose defaults come from a YAML config, as timm's train.py reads its --config: the
    config's values replace the flags' own defaults for this parse (and for --help), and a flag given on the
    command line wins over both. The config is --config FILE, or configs/NAME.yaml for --recipe NAME, or with
    neither configs/finetune.yaml (--pretrained, the default) or configs/scratch.yaml (--no-pretrained).
    The parsed arguments name it: config (its path), recipe (its name) and recipe_source (how it was chosen).
    A config that cannot be used is one line, "error: ...", and exit status 2."""

    def parse_known_args(self, args=None, namespace=None):
        # Only the three flags that choose the config, spelled out (no abbreviations); its errors are this parser's.
        first = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
        first.error = self.error
        first.add_argument("--config", type=str, default="")
        first.add_argument("--recipe", type=str, default="")
        first.add_argument("--pretrained", action=argparse.BooleanOptionalAction, default=True)
        chosen = first.parse_known_args(args)[0]
        path, name, source = self.choose_config(chosen)
        try:
            values = read_config(path, self)[1]
        except utils.UserError as e:
            self.exit(2, f"error: {e}\n")
        defaults = {**values, "config": path, "recipe": name}
        saved = {action: action.default for action in self._actions}
        try:
            for action in self._actions:
                action.default = defaults.get(action.dest, action.default)
            parsed, rest = super().parse_known_args(args, namespace)
            for action in self._actions:  # parsed again without defaults: what the command line itself gives
                action.default = argparse.SUPPRESS
            given = vars(super().parse_known_args(args)[0])
        finally:
            for action, default in saved.items():
                action.default = default
        parsed.recipe_source = source
        parsed.given = sorted(given)  # --resume keeps the run's own value of every flag not given (resume_args)
        return parsed, rest

    def choose_config(self, chosen: argparse.Namespace) -> tuple[str, str, str]:
        """(path, name, how it was chosen) of the config that --config, --recipe and --pretrained choose."""
        if chosen.config and chosen.recipe:
            self.exit(2, "error: give --config FILE or --recipe NAME (configs/NAME.yaml), not both\n")
        if chosen.config:
            return chosen.config, os.path.splitext(os.path.basename(chosen.config))[0], "given"
        name = chosen.recipe or ("finetune" if chosen.pretrained else "scratch")
        path = os.path.join(CONFIG_DIR, name + ".yaml")
        if not os.path.isfile(path):
            self.exit(2, f"error: --recipe {name}: there is no configs/{name}.yaml; choose one of "
                         f"{', '.join(recipe_names())}, or pass --config FILE\n")
        return os.path.relpath(path), name, "given" if chosen.recipe else (
            "from --pretrained" if chosen.pretrained else "from --no-pretrained")


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Every default shown, except None: such a flag's help says what leaving it out does."""

    def _get_help_string(self, action):
        return action.help if action.default is None else super()._get_help_string(action)


# ----------------------------------------------------------------------------------- arguments

def get_args_parser() -> argparse.ArgumentParser:
    """train.py's flags, in groups. The defaults written here are configs/finetune.yaml's; the parser replaces
    them with the chosen config's (ConfigArgumentParser)."""
    common = utils.common_parser(64, "triplets (--sampling triplets) or sketch-photo pairs per step, over all "
                                     "processes under torchrun")
    p = ConfigArgumentParser(description=__doc__.split("\n")[0], parents=[common], formatter_class=HelpFormatter)
    add_run_args(p.add_argument_group("data, outputs and schedule"))
    add_model_args(p.add_argument_group("model"))
    add_loss_args(p.add_argument_group("sampling and losses"))
    add_optimizer_args(p.add_argument_group("optimiser"))
    add_speed_args(p.add_argument_group("speed (how fast training runs, not what it learns)"))
    return p


def add_run_args(g) -> None:
    g.add_argument("--data_dir", type=str, required=True, help="dataset folder (layout: docs/data.md)")
    g.add_argument("--class_split", type=str, default="",
                   help="a named zero-shot split under DATA/splits/ (e.g. sake25, sempcyc25, yelamarthi21); "
                        "default: DATA/train_labels.txt and test_labels.txt")
    g.add_argument("--checkpoint_dir", type=str, default="checkpoints", help="where checkpoints and logs go")
    g.add_argument("--config", type=str, default="",
                   help="YAML file of flag defaults (see configs/); flags given here win over it")
    g.add_argument("--recipe", type=str, default="", choices=recipe_names(),
                   help="configs/NAME.yaml as the config; without --config or --recipe: finetune with "
                        "--pretrained, scratch with --no-pretrained; 'original' is the paper's setting")
    g.add_argument("--epochs", type=int, default=None,
                   help="total number of epochs (if not given: 30; with a budget, no limit but the budget)")
    g.add_argument("--budget_minutes", type=float, default=0.0,
                   help="wall-clock budget of the training: the learning rate and lambda schedules span it and "
                        "training stops when it is spent, with a checkpoint (0: the schedules span --epochs)")
    g.add_argument("--budget_tflops", type=float, default=0.0,
                   help="training compute budget in TFLOP, as train.py counts it (Work): the schedules span it, "
                        "planned from the first step's count, and training stops when it is spent (0: off)")
    g.add_argument("--val_fraction", type=float, default=0.1,
                   help="fraction of each seen class's sketches and photos held out for model selection")
    g.add_argument("--val_every", type=int, default=1, help="validate every N epochs (and after the last)")
    g.add_argument("--print_every", type=int, default=100,
                   help="log the mean losses of the last N steps every N steps "
                        "(the only time the loop waits for the GPU)")
    g.add_argument("--seed", type=int, default=0, help="random seed")
    g.add_argument("--resume", type=str, default="",
                   help="checkpoint (e.g. ckpt/last.pth) to continue from, with the run's own flags and data "
                        "(docs/errors.md says which flags may change)")
    g.add_argument("--overwrite", action=argparse.BooleanOptionalAction, default=False,
                   help="start a new run in a --checkpoint_dir that holds another run, deleting its checkpoints and "
                        "logs (without it, such a folder is refused)")


def add_model_args(g) -> None:
    g.add_argument("--method", type=str, default="sbir", choices=METHODS,
                   help="what trains and how (methods.py): sbir, this project's model (the recipes scratch, finetune "
                        "and original); sketch_lvm, Sain et al. CVPR 2023 (configs/sketch_lvm_clip_vit_b32.yaml)")
    g.add_argument("--backbone", type=str, default="resnet50", choices=sorted(BACKBONES),
                   help="image encoder: a torchvision CNN or ViT, or a CLIP image encoder")
    g.add_argument("--backbone_from_tflops", type=str, default="",
                   help="T:NAME: with --budget_tflops T or more, NAME instead of --backbone, unless --backbone is on "
                        "the command line (configs/scratch.yaml: a wider network once the budget gives it enough "
                        "steps; '': off)")
    g.add_argument("--pretrained", action=argparse.BooleanOptionalAction, default=True,
                   help="start from the backbone's published weights (torchvision's ImageNet ones; OpenAI's for CLIP)")
    g.add_argument("--weights", type=str, default="",
                   help="start the trunk from this file instead of downloading: the whole --backbone network's "
                        "weights as torchvision's .pth, open_clip's .bin or .safetensors, or OpenAI's CLIP .pt "
                        "(read without running code from the file)")
    g.add_argument("--shared_trunk", action=argparse.BooleanOptionalAction, default=True,
                   help="one trunk for both domains instead of two branches")
    g.add_argument("--domain_bn", action=argparse.BooleanOptionalAction, default=False,
                   help="domain-specific batch norm in a shared trunk")
    g.add_argument("--image_size", type=int, default=224, help="input side in pixels")
    g.add_argument("--embedding_dim", type=int, default=512, help="size of the shared embedding")
    g.add_argument("--test_flip", action=argparse.BooleanOptionalAction, default=False,
                   help="embed each image at test time as it and its mirror image (the sum of the two unit "
                        "embeddings, normalised); the model keeps it, so validation, evaluate.py, retrieve.py and "
                        "app.py all embed so (2x the test-time compute)")
    g.add_argument("--test_shift", type=int, default=0,
                   help="pixels (0: off, at most an eighth of --image_size): also embed each image at test time "
                        "shifted that far right, left, down and up (5 views, 10 with --test_flip; 5x the test-time "
                        "compute), kept by the model as --test_flip is")
    g.add_argument("--domain_input", type=str, default="embedding", choices=DOMAIN_INPUTS,
                   help="what the domain classifier reads: the unit embedding or the trunk's pooled features")


def add_loss_args(g) -> None:
    g.add_argument("--sampling", type=str, default="pairs", choices=["pairs", "triplets", "quadruplets"],
                   help="pairs: one pass over the photos per epoch, each with a sketch-domain partner of its "
                        "class; triplets: one (sketch, positive, negative) per training sketch; quadruplets "
                        "(--method zse_sbir): (sketch, sketch, photo of their class, photo of another)")
    g.add_argument("--quadruplets_per_epoch", type=int, default=10000,
                   help="--sampling quadruplets: how many make an epoch (ZSE-SBIR's --datasetLen)")
    g.add_argument("--edge_maps", action=argparse.BooleanOptionalAction, default=True,
                   help="edge maps of the training photos as extra sketch-domain samples (pairs only)")
    g.add_argument("--thicken", type=float, default=0.0,
                   help="fraction of sketch-domain images whose strokes are thickened (pairs only)")
    g.add_argument("--crop_scale", type=float, default=0.5,
                   help="smallest area of the random resized crop, done on the device")
    g.add_argument("--semantic_negatives", action=argparse.BooleanOptionalAction, default=True,
                   help="draw negatives by class-name similarity when DATA/train_embeddings.npy exists (triplets)")
    g.add_argument("--semantic_temperature", type=float, default=0.2,
                   help="softmax temperature of class-name cosine similarity for negative sampling")
    g.add_argument("--triplet_loss_ratio", type=float, default=0.0,
                   help="weight of the triplet loss (pairs: batch-hard negative)")
    g.add_argument("--margin", type=float, default=0.2, help="triplet margin on unit-norm embeddings")
    g.add_argument("--class_loss_ratio", type=float, default=1.0,
                   help="weight of the normalised-softmax loss on seen-class proxies shared by both domains")
    g.add_argument("--domain_loss_ratio", type=float, default=0.0, help="weight of the domain loss (0 disables it)")
    g.add_argument("--grl_threshold_epoch", type=int, default=0,
                   help="epoch (0-based) from which the gradient reversal lambda ramps up from 0")
    g.add_argument("--grl_max_lambda", type=float, default=1.0, help="the lambda ramp's end value (Ganin: 1)")
    g.add_argument("--domain_label_smoothing", type=float, default=0.0,
                   help="domain targets s/2 and 1 - s/2 instead of 0 and 1")


def add_optimizer_args(g) -> None:
    g.add_argument("--lr", type=float, default=1e-4,
                   help="learning rate (--method sbir: AdamW's; sketch_lvm: Adam's for CLIP, its clip_LN_lr)")
    g.add_argument("--proxy_lr_mult", type=float, default=10.0, help="learning rate multiplier of the class proxies")
    g.add_argument("--weight_decay", type=float, default=5e-4, help="AdamW weight decay")
    g.add_argument("--warmup", type=float, default=0.1,
                   help="fraction of the schedule with a linear LR warm-up, then cosine decay to 1%%")
    g.add_argument("--warmup_epochs", type=float, default=None,
                   help="the warm-up in epochs instead (not with --budget_minutes)")
    g.add_argument("--grad_clip", type=float, default=10.0, help="clip the gradient norm (0: off)")
    g.add_argument("--prompt_lr", type=float, default=1e-4,
                   help="--method sketch_lvm: the prompts' learning rate (--lr is CLIP's)")
    g.add_argument("--sketch_lvm_trains", type=str, default="code", choices=sorted(methods.SKETCH_LVM_TRAINS),
                   help="--method sketch_lvm: what trains in CLIP besides the prompts: code, what their code's "
                        "freeze_all_but_bn leaves (21.7M of ViT-B/32); paper, the LayerNorms only (docs/sketch_lvm.md)")


def add_speed_args(g) -> None:
    """The flags that change how fast training runs, not what it learns: caches, memory layout, compilation."""
    g.add_argument("--cache_gb", type=float, default=8.0,
                   help="hold the training images in memory at --image_size when they fit in this many GiB "
                        "(and the disk cache does not hold them all)")
    g.add_argument("--disk_cache", action=argparse.BooleanOptionalAction, default=None,
                   help="the training images resized to --image_size in one .npy file (--cache_dir), read without "
                        "decoding: --disk_cache writes what is missing before training, the default reads it "
                        "where it exists, --no-disk_cache ignores it")
    g.add_argument("--cache_dir", type=str, default="", help="where the disk cache lives (default DATA/cache)")
    g.add_argument("--channels_last", action=argparse.BooleanOptionalAction, default=None,
                   help="NHWC memory format for the CNNs (default: on with --amp on CUDA, where it speeds up "
                        "convolutions; off on the CPU)")
    g.add_argument("--compile", action=argparse.BooleanOptionalAction, default=False,
                   help="torch.compile the encoder(s) (slower start, faster steps; needs a C++ compiler on CPU)")


def start_weights(path: str) -> dict:
    """The state dict in a --weights file: torchvision's .pth, open_clip's .bin or .safetensors, OpenAI's CLIP .pt
    (TorchScript), bare or under "state_dict" or "model" as training scripts save it (utils.load_weights_file:
    nothing in the file runs)."""
    return utils.load_weights_file(path, "pass a state dict of the whole --backbone network: torchvision's .pth, "
                                         "open_clip's .bin or .safetensors, or OpenAI's CLIP .pt")


def apply_recipe(args) -> None:
    """Resolve what follows from other flags once the config and the command line are read (in place; a second
    call changes nothing): the backbone that --backbone_from_tflops chooses for the budget, a warm-up given in
    epochs as a fraction of the schedule, and 30 epochs when neither --epochs nor --budget_minutes ends training."""
    budget = budget_flag(args)
    args.backbone = budget_backbone(args) or args.backbone
    if args.warmup_epochs is not None:
        if budget:
            raise utils.UserError(f"--warmup_epochs needs an epoch schedule; with {budget} give --warmup "
                                  "as a fraction of the budget")
        args.warmup = args.warmup_epochs / (args.epochs or 30)
    if args.epochs is None and not budget:
        args.epochs = 30


def budget_backbone(args) -> str:
    """The backbone --backbone_from_tflops T:NAME chooses: NAME for a new run with --budget_tflops T or more and
    no --backbone on the command line (a resumed run keeps its own), else ''."""
    if not args.backbone_from_tflops:
        return ""
    tflops, _, name = args.backbone_from_tflops.partition(":")
    try:
        tflops = float(tflops)
    except ValueError:
        tflops = -1.0
    if tflops < 0 or name not in BACKBONES:
        raise utils.UserError(f"--backbone_from_tflops must be T:NAME, a budget in TFLOP and a --backbone choice "
                              f"(e.g. 48:resnet18_w32), got {args.backbone_from_tflops!r}")
    given = getattr(args, "given", vars(args))
    chosen = args.budget_tflops >= tflops and "backbone" not in given and not args.resume
    return name if chosen else ""


# The training steps behind each recipe's figures in docs/results.md (the demo's make demo, emoji-dev's longest run of
# resnet18_w16, what the scratch recipe trains without --budget_tflops), which a run that a --budget_minutes ends is
# compared with: a slower machine does fewer steps in the same minutes.
MEASURED_STEPS = {"scratch": {"the demo": 564, "emoji-dev": 9845}}


def measured_against(recipe: str, work: "Work") -> str:
    """How far a run got, against the work the recipe's published figures took."""
    measured = MEASURED_STEPS.get(recipe)
    if not measured:
        return f"docs/results.md has no figure of the {recipe} recipe to compare these {work.steps} steps with"
    return (f"docs/results.md measured the {recipe} recipe with " + " and ".join(
        f"{n:,} steps on {where} (this run did {work.steps / n:.0%} of that)" for where, n in measured.items()))


def budget_flag(args) -> str:
    """The budget that ends training, as its flag ('--budget_tflops', '--budget_minutes'), or '' for none."""
    if args.budget_minutes > 0 and args.budget_tflops > 0:
        raise utils.UserError("give one budget: --budget_minutes (wall clock, this machine's) or --budget_tflops "
                              "(training compute, the same on any machine), not both")
    return "--budget_tflops" if args.budget_tflops > 0 else "--budget_minutes" if args.budget_minutes > 0 else ""


def budget_text(args) -> str:
    """What ends training, in words: 'budget 73 TFLOP', 'budget 10 min' or '30 epochs'."""
    if args.budget_tflops:
        return f"budget {args.budget_tflops:g} TFLOP"
    return f"budget {args.budget_minutes} min" if args.budget_minutes else f"{args.epochs} epochs"


def check_args(args) -> None:
    apply_recipe(args)
    for name in ("epochs", "batch_size", "print_every", "val_every", "quadruplets_per_epoch"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise utils.UserError(f"--{name} must be at least 1, got {getattr(args, name)}")
    for name in ("lr", "margin"):
        if not getattr(args, name) > 0:
            raise utils.UserError(f"--{name} must be positive, got {getattr(args, name)}")
    for name in ("triplet_loss_ratio", "domain_loss_ratio", "class_loss_ratio", "weight_decay", "grad_clip", "warmup",
                 "grl_threshold_epoch", "budget_minutes", "budget_tflops", "thicken", "domain_label_smoothing",
                 "grl_max_lambda", "cache_gb"):
        if getattr(args, name) < 0:
            raise utils.UserError(f"--{name} must not be negative, got {getattr(args, name)}")
    if not 0 <= args.val_fraction < 1:
        raise utils.UserError(f"--val_fraction must be in [0, 1), got {args.val_fraction}")
    for name in ("warmup", "thicken", "domain_label_smoothing", "crop_scale"):
        if not 0 <= getattr(args, name) <= 1:
            raise utils.UserError(f"--{name} must be in [0, 1], got {getattr(args, name)}")
    try:  # the model's own rules, checked where they live (ModelConfig), said in flags
        model_config(args)
    except ModelConfigError as e:
        raise utils.UserError(e.phrase("--")) from None
    refused = methods.get(args.method).check(args)
    if refused:
        raise utils.UserError(refused)
    if args.sampling == "triplets" and (args.edge_maps or args.thicken):
        raise utils.UserError("--edge_maps and --thicken need --sampling pairs")
    if args.sampling == "pairs" and args.class_loss_ratio == 0 and args.triplet_loss_ratio == 0:
        raise utils.UserError("--sampling pairs with --class_loss_ratio 0 and --triplet_loss_ratio 0 learns nothing; "
                              "give one of them a weight")


def validate(model, val: dict, classes: list, args, device) -> float | None:
    """Seen-class validation mAP@all: held-out sketches against held-out photos (None without a hold-out)."""
    sk_paths, sk_labels = dataset.flatten(val["sketches"], classes)
    ph_paths, ph_labels = dataset.flatten(val["photos"], classes)
    if not sk_paths or not ph_paths:
        return None
    common = dict(image_size=args.image_size, batch_size=2 * args.batch_size, workers=args.workers,
                  device=device, amp=args.amp)
    q = utils.embed_images(model.sketch_encoder, sk_paths, desc="val sketches", **common)
    g = utils.embed_images(model.photo_encoder, ph_paths, desc="val photos", **common)
    res = metrics.retrieval_metrics(q, torch.tensor(sk_labels), g, torch.tensor(ph_labels), ks=())
    return res["protocols"]["standard"]["map_all"]


class TrainingLosses(nn.Module):
    """The model with its method's losses as forward (methods.Method.losses of a named batch, model.Pairs or
    model.Triplets). DistributedDataParallel synchronises gradients only for work done inside its wrapped
    module's forward, so it wraps this, not the bare model."""

    def __init__(self, model: nn.Module, method: str = "sbir"):
        super().__init__()
        self.model, self.method = model, methods.get(method)

    def forward(self, batch: Pairs | Triplets, lambd: float, args) -> dict:
        return self.method.losses(self.model, batch, lambd, args)


BATCH_TYPES = {"pairs": Pairs, "triplets": Triplets, "quadruplets": Quadruplets}  # --sampling -> its named batch
IMAGES_PER_ITEM = {"pairs": 2, "triplets": 3, "quadruplets": 4}  # the images of one item of each, sketches first


def train_step(net: nn.Module, optimizer, scaler, batch: tuple, lambd: float, lr: float, args,
               dtype: torch.dtype | None) -> dict:
    """One optimisation step on this process's share of the global batch (images already on the device).

    Returns this process's losses, and their weighted sum as "loss", as detached 0-dim tensors on the
    device: nothing here waits for the GPU. The loop sums them there and reads them (global_mean) every
    --print_every steps and at the end of an epoch, where a non-finite loss stops training."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_mult", 1.0)
    with torch.autocast(batch[0].device.type, dtype=dtype, enabled=dtype is not None):
        out = net(BATCH_TYPES[args.sampling](*batch), lambd=lambd, args=args)
    loss = out["loss"]
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    if args.grad_clip > 0:
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(net.parameters(), args.grad_clip)
    scaler.step(optimizer)
    scaler.update()
    return {k: v.detach() for k, v in out.items()}


def global_mean(values: dict, count: int = 1) -> dict:
    """Sums of per-step losses on the device -> their means per step as floats, over every process under
    torchrun (each holds an equal share of the global batch, so this is the global batch's mean). One read
    from the device (and one all-reduce); every process must call it at the same steps."""
    if not values:
        return {}
    summed = utils.all_ranks_sum(torch.stack([v.double() for v in values.values()])).tolist()
    world = utils.rank_and_world()[1]
    return {k: v / (world * count) for k, v in zip(values, summed)}


def agree(stop: bool, seconds: float) -> tuple[bool, float]:
    """Under torchrun: whether any process was asked to stop, and the processes' mean clock (so that every
    process follows one time-based schedule), over the CPU, never waiting for a GPU. Alone: as given."""
    if utils.rank_and_world()[1] == 1:
        return stop, seconds
    summed = utils.cpu_ranks_sum(torch.tensor([float(stop), seconds], dtype=torch.float64))
    return summed[0].item() > 0, summed[1].item() / utils.rank_and_world()[1]


def check_finite(sums: dict, before: dict, step_before: int, step_now: int, epoch: int) -> None:
    """Stop with one line when the summed loss is no longer finite (it was at the previous read)."""
    total = sums.get("loss", 0.0)
    if not math.isfinite(total):
        raise utils.UserError(f"the loss became {total - before.get('loss', 0.0)} between steps {step_before} and "
                              f"{step_now} of epoch {epoch + 1}; lower --lr or use --no-amp; last.pth holds the "
                              "last good epoch")


def any_process(flag: bool) -> bool:
    """True when ``flag`` holds in at least one process (so that all of them act alike)."""
    return flag if utils.rank_and_world()[1] == 1 else utils.all_ranks_sum(torch.tensor([float(flag)])).item() > 0


def rng_state() -> dict:
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class StopRequest:
    """SIGTERM (a cluster's time limit) and SIGINT set a flag that the training loop checks after each
    step; the previous handlers come back on exit."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.signal = None

    def __enter__(self):
        self.previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def _handle(self, signum, frame):
        if self.signal is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C stops at once
        self.signal = signum
        print(f"\n{signal.Signals(signum).name} received: finishing this step, then saving last.pth", flush=True)

    def __exit__(self, *exc):
        for s, handler in self.previous.items():
            signal.signal(s, handler)


# --resume: the flags a resumed run may give other values than the run's own. Where files are and how fast training
# runs (what it learns is the same), and how long it goes on (the schedule is planned anew, said in a line). Any
# other flag given with another value is refused; one left out takes the run's own value (docs/errors.md).
RESUME_FREE = {"data_dir", "checkpoint_dir", "resume", "overwrite", "workers", "device", "amp", "cache_gb",
               "disk_cache", "cache_dir", "channels_last", "compile", "print_every", "val_every"}
RESUME_LENGTH = ("epochs", "budget_minutes", "budget_tflops")
NOT_RESTORED = {"given", "recipe_source"}  # what the parser makes, not flags


def flag_text(name: str, value) -> str:
    """A flag and its value as the command line writes them: --lr 0.002, --no-pretrained, --backbone resnet18."""
    if isinstance(value, bool):
        return f"--{name}" if value else f"--no-{name}"
    return f"--{name} {' '.join(map(str, value)) if isinstance(value, list) else value}"


def resume_args(args, ckpt: dict, path: str) -> None:
    """Continue the run with its own flags (in place): each flag left out of the command line takes the value the
    checkpoint's run used; one given with another value is refused, except RESUME_FREE and RESUME_LENGTH (a new
    length re-plans the schedule, said in a line). The checkpoint folder is the resumed file's unless given."""
    saved, given = ckpt["args"], set(getattr(args, "given", vars(args)))
    restored = []
    for name, value in saved.items():
        if name in NOT_RESTORED | RESUME_FREE or (not hasattr(args, name) and name != "run_id"):
            continue  # a flag this version no longer has is left out
        if name in ("config", "recipe"):  # the run's every flag is restored or checked: its config names them
            if name in given and getattr(args, name) != value:
                print(f"note: {flag_text(name, getattr(args, name))} is not used: a resumed run keeps its own "
                      f"flags, set from {flag_text(name, value)} and its command line")
            setattr(args, name, value)
        elif name not in given:
            if getattr(args, name, None) != value and name != "run_id":
                restored.append(name)
            setattr(args, name, value)
        elif getattr(args, name) != value and name not in RESUME_LENGTH:
            raise utils.UserError(f"{path} was trained with {flag_text(name, value)} but this run gives "
                                  f"{flag_text(name, getattr(args, name))}; leave it out to continue with the run's "
                                  "own value (or pass the same), or start a new run in another --checkpoint_dir")
    if "checkpoint_dir" not in given:
        args.checkpoint_dir = os.path.dirname(os.path.abspath(path))
    for name in RESUME_LENGTH:
        if name in given and name in saved and getattr(args, name) != saved[name]:
            print(f"note: {path}'s run was planned for {flag_text(name, saved[name])}; continuing with "
                  f"{flag_text(name, getattr(args, name))}: the learning rate's warm-up and decay (and the lambda "
                  f"ramp) are planned anew over the new length from step {ckpt['step']}")
    if restored:
        print(f"resume: the run's own values of flags left out (config {args.config}): "
              + " ".join(flag_text(n, getattr(args, n)) for n in restored))


def load_resume_checkpoint(path: str, args, world: int) -> dict:
    """The --resume checkpoint, read and checked against this run before any data is read; the run's own flags
    replace the ones not given (resume_args)."""
    ckpt = utils.load_checkpoint(path)
    resume_args(args, ckpt, path)
    check_args(args)
    saved = utils.checkpoint_model(ckpt)
    if saved.activation != model_config(args).activation:  # a CLIP run from before QuickGELU: it goes on as trained
        args.clip_activation = saved.activation
        print(saved.note())
    for key in ("backbone", "embedding_dim"):
        if getattr(saved, key) != getattr(args, key):
            raise utils.UserError(f"{path} was trained with --{key} {getattr(saved, key)} but this run uses "
                                  f"--{key} {getattr(args, key)}; pass the same value to resume")
    if ckpt.get("epoch_step") and ckpt.get("world_size", 1) != world:
        raise utils.UserError(f"{path} was saved inside an epoch by {ckpt.get('world_size', 1)} process(es); resume "
                              f"it with as many (this run has {world}) or from an end-of-epoch checkpoint")
    if ckpt.get("epoch_step") and not (("rng_by_rank" in ckpt and len(ckpt["rng_by_rank"]) == world) or "rng" in ckpt):
        raise utils.UserError(f"{path} was saved inside an epoch without its random states; resume from an "
                              "end-of-epoch checkpoint")
    return ckpt


def resume_from(ckpt: dict, path: str, model, optimizer, scaler, args) -> None:
    """Restore the weights and the optimizer and scaler states of a checkpoint (load_resume_checkpoint); the
    rest of it, where training stood, becomes the TrainState (TrainState.start)."""
    utils.load_model_state(model, ckpt, path)
    try:
        optimizer.load_state_dict(ckpt["optimizers"][methods.get(args.method).optimizer_name])
        if ckpt["scaler"]:  # empty when saved without a float16 GradScaler (CPU, bfloat16): keep the fresh one
            scaler.load_state_dict(ckpt["scaler"])
        for group in optimizer.param_groups:  # a moment of another shape would only fail at the first step
            for p in group["params"]:
                for value in optimizer.state.get(p, {}).values():
                    if isinstance(value, torch.Tensor) and value.ndim and value.shape != p.shape:
                        raise ValueError(f"a moment of shape {tuple(value.shape)} for a weight of {tuple(p.shape)}")
    except (KeyError, ValueError, TypeError, RuntimeError, IndexError, AttributeError) as e:
        raise utils.UserError(f"the optimizer state in {path} does not fit this model ({type(e).__name__}: "
                              f"{str(e)[:120]}); the checkpoint is damaged or from another version") from None
    inside = f" and {ckpt['epoch_step']} step(s) of the next" if ckpt.get("epoch_step") else ""
    print(f"resumed from {path}: {ckpt['epoch']} epoch(s){inside} done, step {ckpt['step']}, "
          f"{utils.validation_text(ckpt['best'])}")


def nothing_left(ckpt: dict, args) -> bool:
    """Whether a --resume checkpoint already finished what this run asks for (its budget or its epochs)."""
    spent = ckpt.get("seconds", 0.0)
    if args.budget_minutes > 0 and spent >= args.budget_minutes * 60:
        print(f"nothing to do: {args.resume} already spent {spent / 60:.1f} of --budget_minutes {args.budget_minutes}")
        return True
    done = ckpt.get("work", {}).get("flops", 0)
    if args.budget_tflops > 0 and done >= args.budget_tflops * 1e12:
        print(f"nothing to do: {args.resume} already did {utils.flops_text(done)} of --budget_tflops "
              f"{args.budget_tflops:g}")
        return True
    if args.epochs is not None and ckpt["epoch"] >= args.epochs:
        print(f"nothing to do: {args.resume} already has {ckpt['epoch']} of --epochs {args.epochs}")
        return True
    return False


RUN_FILES = ("best.pth", "last.pth", "log.jsonl", "args.json", "curves.png")


def check_run_folder(args, resume: dict | None) -> int:
    """--checkpoint_dir against this run, before anything is written: a new run is refused a folder that holds
    another (unless --overwrite), and a resumed one a folder of another run or one whose last.pth went further
    than the checkpoint it resumes (it would be replaced). Returns how many log.jsonl records lie past the
    resumed step (a run killed after its last checkpoint), which clear_run_folder drops."""
    folder = args.checkpoint_dir
    there = [n for n in RUN_FILES if os.path.exists(os.path.join(folder, n))]
    if resume is None:
        if there and not args.overwrite:
            raise utils.UserError(f"{folder} already holds a run ({', '.join(there)}): a new run would replace its "
                                  f"checkpoints and add to its log; continue it with --resume "
                                  f"{os.path.join(folder, 'last.pth')}, choose another --checkpoint_dir, or pass "
                                  "--overwrite to delete that run first")
        return 0
    recorded = os.path.join(folder, "args.json")
    other = (utils.read_json(recorded) or {}).get("args", {}).get("run_id") if os.path.isfile(recorded) else None
    if other not in (None, args.run_id):
        raise utils.UserError(f"{folder} holds another run (run {other}) than {args.resume}'s (run {args.run_id}); "
                              "resume into the run's own folder, or pass an empty --checkpoint_dir")
    last = os.path.join(folder, "last.pth")
    if os.path.isfile(last) and not os.path.samefile(last, args.resume):
        step = utils.load_user_file(last, "checkpoint", utils.CHECKPOINT_HINT, mmap=True).get("step", 0)
        if step > resume["step"]:
            raise utils.UserError(f"{last} is at step {step}, past {args.resume}'s step {resume['step']}: continuing "
                                  f"here would replace it; resume from {last}, or pass another --checkpoint_dir to "
                                  f"branch off at step {resume['step']}")
    return sum(r.get("step", 0) > resume["step"] for r in utils.read_jsonl(os.path.join(folder, "log.jsonl")))


def clear_run_folder(args, resume: dict | None, stale: int) -> None:
    """What check_run_folder allowed: --overwrite deletes the other run's files; a resumed run's log loses the
    records past its checkpoint's step, which it is about to train again."""
    folder = args.checkpoint_dir
    if resume is None and args.overwrite:
        gone = [n for n in RUN_FILES if os.path.exists(os.path.join(folder, n))]
        for name in gone:
            os.remove(os.path.join(folder, name))
        if gone:
            print(f"--overwrite: deleted the run that was in {folder} ({', '.join(gone)})")
    if resume is not None and stale:
        log = os.path.join(folder, "log.jsonl")
        utils.rewrite_jsonl(log, [r for r in utils.read_jsonl(log) if r.get("step", 0) <= resume["step"]])
        print(f"{log}: dropped {stale} record(s) past step {resume['step']}, where {args.resume} was written "
              "(the run went on after it, e.g. was killed); this run trains those steps again")


def training_data_record(root: str, data: dataset.SBIRData, train: dict, val: dict) -> dict:
    """What a run trains and validates on, as its checkpoints keep it: the seen classes, the image counts and a
    sha256 of the training and validation files' paths relative to the data folder (a moved copy is the same)."""
    h = hashlib.sha256()
    counts = {}
    for part, images in (("train", train), ("val", val)):
        for domain in ("sketches", "photos"):
            files = [os.path.relpath(p, root) for c in data.seen for p in images[domain].get(c, [])]
            counts[f"{part}_{domain}"] = len(files)
            h.update(f"|{part}|{domain}|".encode() + "\n".join(files).encode())
    return {"classes": list(data.seen), **counts, "files_sha256": h.hexdigest()}


def check_resumed_data(ckpt: dict, path: str, now: dict) -> None:
    """A resumed run trains on the data it started with: the same seen classes and, where the checkpoint
    records them (training_data_record), the same training and validation files."""
    classes = ckpt.get("classes")
    if classes is not None and classes != now["classes"]:
        raise utils.UserError(f"{path} trained on {len(classes)} seen classes ({', '.join(classes[:4])}, ...), this "
                              f"data has {len(now['classes'])} ({', '.join(now['classes'][:4])}, ...): another dataset "
                              "or split; resume on the data the run started with, or start a new run")
    was = ckpt.get("data")
    if isinstance(was, dict) and was.get("files_sha256") != now["files_sha256"]:
        counts = ", ".join(f"{k} {was.get(k)} -> {v}" for k, v in now.items()
                           if k not in ("classes", "files_sha256") and was.get(k) != v)
        raise utils.UserError(f"{path} trained and validated on other files of these classes "
                              f"({counts or 'the same counts, other files'}); resume on the data the run started "
                              "with, or start a new run")


def main(args) -> None:
    check_args(args)
    rank, world, device = utils.init_distributed(args.device)
    try:
        run_training(args, rank, world, device)
    finally:
        if world > 1:
            dist.destroy_process_group()


def run_training(args, rank: int, world: int, device: torch.device) -> None:
    """Everything the loop needs, read and checked before anything is written; then fit."""
    if args.batch_size % world:
        raise utils.UserError(f"--batch_size {args.batch_size} is not divisible by the {world} processes; "
                              "each process takes an equal share of the batch")
    args.workers = utils.resolve_workers(args.workers)
    if args.channels_last is None:
        args.channels_last = device.type == "cuda" and args.amp
    resume = load_resume_checkpoint(args.resume, args, world) if args.resume else None
    if getattr(args, "run_id", None) is None:  # a new run (or one from before runs had an id)
        args.run_id = uuid.uuid4().hex[:12]
    stale = check_run_folder(args, resume)
    info = print_setup(args, world, resume.get("config") if resume else None)
    dtype = utils.amp_dtype(device, args.amp)
    utils.seed_everything(args.seed)
    data, val, source, data_record = read_training_data(args, rank, world)
    if resume is not None:
        check_resumed_data(resume, args.resume, data_record)
    loader = open_image_store(source, args, rank, world, device)
    utils.seed_everything(args.seed)  # the initial weights do not depend on what reading the data drew
    model, optimizer = build_model_and_optimizer(args, len(data.seen), device, world)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    if resume is not None:
        resume_from(resume, args.resume, model, optimizer, scaler, args)
        if nothing_left(resume, args):
            return
    if rank == 0:  # every input was read and fits: only now is anything written
        utils.ensure_dir(args.checkpoint_dir, "checkpoint folder")
        clear_run_folder(args, resume, stale)
        utils.write_json(os.path.join(args.checkpoint_dir, "args.json"), info)
    method = methods.get(args.method)
    if args.compile:  # in place: the state dict keeps its names
        for part in method.compiled_parts(model, args):
            part.compile()
    net = TrainingLosses(model, args.method)
    if world > 1:  # after loading: DDP copies rank 0's weights to every process
        net = nn.parallel.DistributedDataParallel(net, device_ids=[device] if device.type == "cuda" else None)
    trainer = Trainer(args, model, net, optimizer, scaler, device, dtype, info["config"], data_record)
    with StopRequest() as stop:
        fit(trainer, loader, val, data.seen, TrainState.start(args, len(loader), resume), stop)


def print_setup(args, world: int, saved_config: dict | None = None) -> dict:
    """Print the arguments, versions, the config (its path and text; a resumed run's as its checkpoint keeps it)
    and the recipe in words; return what args.json keeps: utils.print_banner's record with the config."""
    info = utils.print_banner("train.py", args)
    if isinstance(saved_config, dict):
        info["config"] = dict(saved_config)
        text = info["config"].get("text", "")
    else:
        text = read_config(args.config, get_args_parser())[0]
        info["config"] = {"path": args.config, "text": text}
    print(f"config {args.config} ({args.recipe_source}):\n" + "".join(f"  {line}\n" for line in text.splitlines()),
          end="")
    print(f"recipe: {args.recipe}: {methods.get(args.method).describe(args)}, "
          + budget_text(args))
    if budget_backbone(args):
        print(f"backbone {args.backbone}: --backbone_from_tflops {args.backbone_from_tflops} at --budget_tflops "
              f"{args.budget_tflops:g} (give --backbone to choose another)")
    if world > 1:
        print(f"distributed: {world} processes ({dist.get_backend()}), "
              f"{args.batch_size // world} {args.sampling} each per step")
    return info


def read_training_data(args, rank: int, world: int) -> tuple:
    """The dataset, its seen-class validation split, the batches of the training split that --sampling draws
    (this process's share of them), and what checkpoints record of the data (training_data_record)."""
    data = dataset.scan_dataset(args.data_dir, class_split=args.class_split)
    if data.skipped:
        print(f"warning: skipped {len(data.skipped)} unreadable image file(s), e.g. {data.skipped[0]}")
    train, val = dataset.split_seen(data, args.val_fraction, seed=dataset.VAL_SPLIT_SEED)
    n_train = [sum(map(len, train[d].values())) for d in ("sketches", "photos")]
    n_val = [sum(map(len, val[d].values())) for d in ("sketches", "photos")]
    print(f"data {args.data_dir}: {len(data.seen)} seen / {len(data.unseen)} unseen classes; "
          f"train {n_train[0]} sketches + {n_train[1]} photos; val {n_val[0]} sketches + {n_val[1]} photos")
    source = training_source(args, data, train, n_train, (rank, world))
    sketch_fit, photo_fit = methods.get(args.method).image_fits  # set before any image is read (dataset.ImageStore)
    source.store.fits = [sketch_fit] * source.sketch_items + [photo_fit] * (len(source.store) - source.sketch_items)
    return data, val, source, training_data_record(args.data_dir, data, train, val)


def training_source(args, data: dataset.SBIRData, train: dict, n_train: list, shard: tuple) -> dataset.StepBatches:
    """The batches --sampling draws from the training split (this process's share: shard = (rank, world))."""
    if args.sampling == "pairs":
        source = dataset.PairedBatches(train, data.seen, args.image_size, args.batch_size, args.edge_maps, args.seed,
                                       root=args.data_dir, shard=shard)
        print(f"pairs: {len(source)} steps of {args.batch_size} photos + {args.batch_size} sketch-domain images "
              "per epoch")
        if len(source) < 1:
            raise utils.UserError(f"--batch_size {args.batch_size} is larger than the {n_train[1]} training photos; "
                                  "lower it")
    elif args.sampling == "quadruplets":
        source = dataset.QuadrupletBatches(train, data.seen, args.image_size, args.batch_size,
                                           args.quadruplets_per_epoch, args.seed, root=args.data_dir, shard=shard)
        print(f"quadruplets: {len(source)} steps of {args.batch_size} per epoch "
              f"(--quadruplets_per_epoch {args.quadruplets_per_epoch}), classes drawn uniformly")
        if len(source) < 1:
            raise utils.UserError(f"--batch_size {args.batch_size} is larger than --quadruplets_per_epoch "
                                  f"{args.quadruplets_per_epoch}; lower it or raise that")
    else:
        semantic = data.train_embeddings if args.semantic_negatives else None
        print("negatives: " + ("by class-name similarity (train_embeddings.npy)" if semantic is not None
                               else "uniform over the other seen classes"))
        negatives = dataset.negative_class_probs(len(data.seen), semantic, args.semantic_temperature)
        source = dataset.TripletBatches(train, data.seen, args.image_size, args.batch_size, negatives, args.seed,
                                        root=args.data_dir, shard=shard)
        if len(source) < 1:
            raise utils.UserError(f"--batch_size {args.batch_size} is larger than the {n_train[0]} training "
                                  "sketches; lower it")
    return source


def model_config(args) -> ModelConfig:
    """The network the flags describe, as checkpoints store it."""
    published = "openai" if args.backbone in CLIP_BACKBONES else "imagenet"
    weights = "file" if args.weights else (published if args.pretrained else "none")
    method = methods.get(args.method)
    return ModelConfig(args.backbone, args.embedding_dim, args.image_size, args.shared_trunk, args.domain_bn,
                       args.domain_input, weights, *method.input_stats(args.backbone),
                       activation=getattr(args, "clip_activation", None),  # a resumed older CLIP run's: GELU
                       method=args.method, test_flip=args.test_flip, test_shift=args.test_shift)


def build_model_and_optimizer(args, num_classes: int, device: torch.device, world: int = 1):
    """The model the flags describe (its method's network), on the device in --channels_last's layout, and its
    method's optimizer (methods.Method.optimizer: which parameters train in which groups at which rates)."""
    method = methods.get(args.method)
    uses_proxies = args.sampling == "pairs" or args.class_loss_ratio > 0
    config = model_config(args)
    start = start_weights(args.weights) if args.weights else config.weights != "none"
    try:
        model = method.network(config, num_classes if uses_proxies else 0, start)
    except ValueError as e:  # a --weights file of another network
        raise utils.UserError(f"--weights {args.weights}: {e}; pass the weights of the whole {args.backbone} network "
                              "(torchvision's, open_clip's / OpenAI's for CLIP, ZSE-SBIR's own for --method zse_sbir), "
                              "or another --backbone") from None
    if getattr(model, "start_note", ""):  # what a method's network made of a --weights file
        print(model.start_note)
    if world > 1 and device.type == "cuda":
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)  # batch statistics of the global batch
    model.to(device, memory_format=torch.channels_last if args.channels_last else torch.contiguous_format)
    return model, method.optimizer(model, args)


def open_image_store(source, args, rank: int, world: int, device: torch.device) -> dataset.BatchLoader:
    """Where the training images come from, printed: the disk cache (written first with --disk_cache), then
    memory when they fit in --cache_gb (filled by fit, inside the budget), else their files."""
    store = source.store
    cache_dir = args.cache_dir or os.path.join(args.data_dir, "cache")
    if args.disk_cache and rank == 0:
        try:
            added, kept = dataset.write_disk_cache(args.data_dir, store.items, args.image_size, cache_dir, args.workers,
                                                   store.fits)
        except OSError as e:
            raise utils.UserError(f"cannot write the disk cache in {cache_dir} ({e.strerror or e}); pass --cache_dir "
                                  "with a writable folder, or --no-disk_cache") from None
        print(f"disk cache {dataset.cache_paths(cache_dir, args.image_size)[0]}: {added} images added, {kept} kept")
    if args.disk_cache and world > 1:
        torch.distributed.barrier()
    cached = store.open_disk_cache(cache_dir) if args.disk_cache is not False else 0
    fits = store.bytes() <= args.cache_gb * 2 ** 30
    print(f"images: {len(store)} at {args.image_size}px ({store.bytes() / 2 ** 30:.2f} GiB), {cached} from the disk "
          f"cache, " + ("held in memory" if fits else f"{args.workers} loader processes (over --cache_gb)"))
    return dataset.BatchLoader(source, args.workers, pin_memory=device.type == "cuda", memory=fits)


# ----------------------------------------------------------------------------------- the loop

class Schedule:
    """The learning rate's and the lambda ramp's clock. Progress p = position / length in [0, 1], the position
    in the schedule's unit: with --epochs, steps done out of all steps; with --budget_minutes, seconds of training
    (a resumed run adds the seconds it had spent) out of the budget; with --budget_tflops, training FLOPs done
    (Work) out of the budget, which at a fixed batch shape is steps out of the budget over the first step's
    count. A budget also ends training. The lambda ramp starts at --grl_threshold_epoch's first step (with a
    budget, at the position that epoch began: the first epoch at or past the threshold that has no start yet)
    and ends with the schedule."""

    def __init__(self, args, steps_per_epoch: int, spent: float = 0.0, grl_start: float = -1.0,
                 grl_unit: str = "seconds"):
        self.unit = "flops" if args.budget_tflops else "seconds" if args.budget_minutes else "steps"
        self.budget = args.budget_tflops * 1e12 if self.unit == "flops" else args.budget_minutes * 60.0
        self.length = self.budget or args.epochs * steps_per_epoch
        self.grl_epoch, self.max_lambda = args.grl_threshold_epoch, args.grl_max_lambda
        if self.unit == "steps":
            self.grl_start = args.grl_threshold_epoch * steps_per_epoch
        else:  # a resumed run's start, if it was recorded in this unit; else set anew (start_epoch)
            self.grl_start = grl_start if grl_unit == self.unit else -1.0
        self.spent, self.t0, self.planned = spent, time.time(), False

    def seconds(self) -> float:
        """Seconds of training so far on this process's clock, a resumed run's earlier ones included."""
        return self.spent + time.time() - self.t0

    def position(self, state: "TrainState") -> float:
        return {"steps": state.step, "seconds": state.seconds, "flops": state.work.flops}[self.unit]

    def start_epoch(self, state: "TrainState") -> None:
        if state.epoch >= self.grl_epoch and self.grl_start < 0:
            self.grl_start = self.position(state)

    def progress(self, state: "TrainState") -> float:
        return min(1.0, self.position(state) / self.length)

    def lambd(self, state: "TrainState") -> float:
        if self.grl_start < 0:
            return 0.0
        return self.max_lambda * grl_lambda(self.position(state), self.length, self.grl_start)

    def over(self, state: "TrainState") -> bool:
        return self.budget > 0 and self.position(state) >= self.budget

    def plan(self, work: "Work", steps_per_epoch: int) -> str:
        """The budget in steps at the FLOPs of a step as counted so far (--budget_tflops), said once known."""
        per_step = work.flops / max(work.steps, 1)
        steps = math.ceil(self.budget / per_step)
        return (f"budget {utils.flops_text(self.budget)}: {steps:,} steps of {per_step / 1e9:.2f} GFLOP "
                f"({steps / steps_per_epoch:.1f} epochs of {steps_per_epoch} steps); the learning rate's warm-up and "
                f"decay span them")


class Work:
    """The work a run has done, in units that travel between machines: optimisation steps, training images
    (sketch-domain and photo, over every process) and training FLOPs: the forward and backward passes'
    floating-point operations as torch.utils.flop_counter counts them (a multiply-add is 2; convolutions,
    matrix products and attention; the optimizer's element-wise updates and the on-device augmentation are
    not counted). A step's FLOPs depend only on its batch's shapes, so each shape is counted once, on the
    first step that has it, and reused."""

    def __init__(self, steps: int = 0, images: int = 0, flops: int = 0):
        self.steps, self.images, self.flops = steps, images, flops
        self.flops_by_shape = {}  # the batch's image shapes -> FLOPs of one step over every process

    def to_dict(self) -> dict:
        return {"steps": self.steps, "images": self.images, "flops": self.flops}

    def step(self, run, batch: list) -> dict:
        """Run one training step, ``run()``, on ``batch`` (this process's images on the device, then labels)
        and add its work; returns what ``run`` returns."""
        images = [x for x in batch if x.is_floating_point()]
        shape = tuple(tuple(x.shape) for x in images)
        world = utils.rank_and_world()[1]
        if shape in self.flops_by_shape:
            out = run()
        else:
            with FlopCounterMode(display=False) as counter:
                out = run()
            self.flops_by_shape[shape] = counter.get_total_flops() * world  # every process runs the same shapes
        self.steps += 1
        self.images += sum(len(x) for x in images) * world
        self.flops += self.flops_by_shape[shape]
        return out

    def describe(self, seconds: float) -> str:
        return (f"{self.steps:,} steps, {self.images:,} images, {utils.flops_text(self.flops)} in "
                f"{seconds / 60:.1f} min ({self.images / max(seconds, 1e-9):.0f} images/s)")


@dataclass
class TrainState:
    """Where a run stands: what the loop's functions hand each other, and what a checkpoint keeps for --resume
    besides the weights and the optimizer. After a stop inside an epoch, epoch_step counts that epoch's steps
    done, and epoch_sums and rng_by_rank hold what continuing it exactly needs: the epoch's loss sums as last
    read (LossSums.read) and every process's RNG states."""
    schedule: Schedule
    work: Work
    epoch: int = 0  # epochs completed
    step: int = 0  # optimisation steps done over every epoch
    best: float = -1.0  # the best seen-class validation mAP@all so far
    seconds: float = 0.0  # seconds of training at the last step, as every process agreed (agree)
    finished: bool = False  # the budget is spent
    epoch_step: int = 0  # steps done in epoch `epoch` (the one under way)
    epoch_sums: dict = field(default_factory=dict)
    rng_by_rank: list = field(default_factory=list)

    @classmethod
    def start(cls, args, steps_per_epoch: int, ckpt: dict | None = None) -> "TrainState":
        """A new run's state, or a --resume checkpoint's (load_resume_checkpoint). Checkpoints written before the
        work was counted give steps only; before torchrun support, one process's RNG states under "rng"."""
        ckpt = ckpt or {}
        grl_start = ckpt.get("grl_start", ckpt.get("grl_start_seconds", -1.0))  # the latter: before --budget_tflops
        schedule = Schedule(args, steps_per_epoch, ckpt.get("seconds", 0.0), grl_start,
                            ckpt.get("schedule_unit", "seconds"))
        return cls(schedule, Work(**ckpt.get("work", {"steps": ckpt.get("step", 0)})), ckpt.get("epoch", 0),
                   ckpt.get("step", 0), ckpt.get("best", -1.0), epoch_step=ckpt.get("epoch_step", 0),
                   epoch_sums=ckpt.get("epoch_sums", {}),
                   rng_by_rank=ckpt.get("rng_by_rank") or ([ckpt["rng"]] if "rng" in ckpt else []))

    def next_epoch(self) -> None:
        """The epoch under way counts as done (all its steps, or the budget ended it)."""
        self.epoch, self.epoch_step, self.epoch_sums, self.rng_by_rank = self.epoch + 1, 0, {}, []


@dataclass
class Trainer:
    """What training works with, fixed once built: the arguments, the model (bare: its state dict is what
    checkpoints keep), the network whose forward returns the losses (TrainingLosses, wrapped in DDP under
    torchrun), the optimizer and the gradient scaler, the device, autocast's dtype (None: full precision),
    and the config file behind the arguments ({"path", "text"})."""
    args: argparse.Namespace
    model: nn.Module  # its method's network (methods.Method.network)
    net: nn.Module
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    device: torch.device
    dtype: torch.dtype | None
    config: dict
    data: dict  # what it trains and validates on (training_data_record), which --resume checks

    @property
    def method(self) -> methods.Method:
        return methods.get(self.args.method)


def fit(t: Trainer, loader, val: dict, classes: list, state: TrainState, stop: StopRequest) -> None:
    """The outer loop: train an epoch, then validate, log and checkpoint it (end_epoch), until --epochs, a spent
    budget or a stop request (SIGTERM, Ctrl-C), after which last.pth lets --resume continue exactly. ``loader``
    is a BatchLoader, or anything with len(), prepare() and epoch(e, start)."""
    args = t.args
    last_path = os.path.join(args.checkpoint_dir, "last.pth")
    loader.prepare()  # inside the budget: reading the images is part of training
    state.seconds = state.schedule.seconds()
    while args.epochs is None or state.epoch < args.epochs:
        stats = train_one_epoch(t, loader, state, stop)
        if stats["stopped"]:
            if utils.rank_and_world()[0] == 0:
                utils.save_checkpoint(make_checkpoint(t, state, state.seconds, classes), last_path)
            print(f"stopped at step {state.step} ({state.epoch_step}/{len(loader)} of epoch {state.epoch + 1}); "
                  f"continue with --resume {last_path}")
            return
        state.next_epoch()
        end_epoch(t, val, classes, state, stats)
        if state.finished:
            print(f"{budget_text(args)} spent after {state.step} steps ({state.epoch} epoch(s), the "
                  f"last one {stats['steps']}/{len(loader)} steps); {measured_against(args.recipe, state.work)}")
            break
        if any_process(stop.signal is not None) and (args.epochs is None or state.epoch < args.epochs):
            print(f"stopped after epoch {state.epoch}; continue with --resume {last_path}")
            return
    print(f"done: {state.work.describe(state.schedule.seconds())}; {utils.validation_text(state.best)} -> "
          f"{os.path.join(args.checkpoint_dir, 'best.pth')}")


def train_one_epoch(t: Trainer, loader, state: TrainState, stop: StopRequest) -> dict:
    """Train epoch state.epoch from its step state.epoch_step (non-zero when resuming a stop inside it) to its
    end, a spent budget (state.finished) or a stop request. Reads from the device only every --print_every
    steps, at a stop and at the end. Returns the epoch's stats; "stopped": a stop inside the epoch, after which
    the state holds what resuming it needs."""
    args, rank = t.args, utils.rank_and_world()[0]
    epoch, skip, schedule, steps = state.epoch, state.epoch_step, state.schedule, len(loader)
    memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
    t.model.train()
    # A resumed epoch draws the same dropout; each process its own. Batches and augmentations depend on
    # (seed, epoch, step) alone.
    utils.seed_everything(args.seed * 1000 + epoch + 1_000_003 * rank)
    losses = LossSums(t.device, state.epoch_sums if skip else {}, skip, epoch)
    schedule.start_epoch(state)
    t0 = time.time()
    batches = loader.epoch(epoch, skip)
    if skip:
        set_rng_state(state.rng_by_rank[rank])
    bar = tqdm(batches, desc=epoch_label(epoch, args.epochs), leave=False, disable=None if rank == 0 else True,
               total=steps, initial=skip)
    lambd = 0.0
    for i, batch in enumerate(bar, start=skip + 1):
        batch = to_device_batch(batch, args, t.device, state.step, memory_format)
        lambd = schedule.lambd(state)
        lr = t.method.lr_at(schedule.progress(state), args)
        vals = state.work.step(lambda: train_step(t.net, t.optimizer, t.scaler, batch, lambd, lr, args, t.dtype), batch)
        stopping, state.seconds = agree(stop.signal is not None, schedule.seconds())
        state.step, state.epoch_step = state.step + 1, i
        losses.add(vals)
        state.finished = schedule.over(state)
        if schedule.unit == "flops" and not schedule.planned:  # the first step's count is known
            schedule.planned = True
            print(schedule.plan(state.work, steps))
        stop_inside = stopping and i < steps
        if state.step % args.print_every == 0 or state.finished or stop_inside:
            log_steps(args, state, losses.window(i), bar, lambd, lr)  # the one wait for the device
        if state.finished:
            break
        if stop_inside:
            state.epoch_sums, state.rng_by_rank = losses.read, utils.all_gather_objects(rng_state())
            return {"stopped": True}
    train_s = time.time() - t0
    return {"stopped": False, "losses": losses.means(state.epoch_step), "lambda": lambd, "train_seconds": train_s,
            "steps": state.epoch_step, "rate": (state.epoch_step - skip) * args.batch_size / max(train_s, 1e-9)}


def epoch_label(epoch: int, epochs: int | None) -> str:
    """'epoch 3/30' for 0-based epoch 2 ('epoch 3' without an epoch limit)."""
    return f"epoch {epoch + 1}" + (f"/{epochs}" if epochs else "")


def lambda_text(args, lambd: float) -> str:
    """The reversal strength as the progress lines print it, for a method that has a gradient reversal layer."""
    return f"  lambda {lambd:.3f}" if methods.get(args.method).reverses_gradient else ""


def log_steps(args, state: TrainState, means: dict, bar, lambd: float, lr: float) -> None:
    """The mean losses of the steps since the last read on the progress bar and, every --print_every steps,
    printed and appended to log.jsonl (rank 0)."""
    bar.set_postfix({k: f"{v:.3f}" for k, v in means.items() if k in ("class", "triplet", "domain")})
    if state.step % args.print_every:
        return
    print(f"epoch {state.epoch + 1} step {state.step}: " + "  ".join(f"{k} {v:.4f}" for k, v in means.items())
          + lambda_text(args, lambd) + f"  lr {lr:.2e}")
    if utils.rank_and_world()[0] == 0:
        utils.append_jsonl(os.path.join(args.checkpoint_dir, "log.jsonl"), {
            "kind": "step", "epoch": state.epoch + 1, "step": state.step, "lambda": lambd, "lr": lr,
            "seconds": state.seconds, **state.work.to_dict(), **means})


def end_epoch(t: Trainer, val: dict, classes: list, state: TrainState, stats: dict) -> None:
    """After epoch state.epoch (counted as done): validate (every --val_every epochs and after the last), print
    and log it, and write last.pth and, when validation improved, best.pth (rank 0)."""
    args = t.args
    val_map, val_s, improved, val_text = None, 0.0, False, f"(validation every {args.val_every} epochs)"
    if state.finished or state.epoch == args.epochs or state.epoch % args.val_every == 0:
        t1 = time.time()
        val_map = validate(t.model, val, classes, args, t.device)
        val_s = time.time() - t1
        improved = val_map is None or val_map > state.best  # without a validation set, the last epoch is best
        state.best = state.best if val_map is None else max(val_map, state.best)  # -1: nothing validated
        val_text = ("no validation set (--val_fraction 0): best.pth is the last epoch" if val_map is None else
                    f"val mAP@all {val_map:.4f}{'  (best)' if improved else ''}  [{val_s:.0f}s validation]")
    seconds = state.schedule.seconds()
    print(f"{epoch_label(state.epoch - 1, args.epochs)}: "
          + "  ".join(f"{k} {v:.4f}" for k, v in stats["losses"].items())
          + lambda_text(args, stats['lambda']) + f"  {val_text}  [{stats['train_seconds']:.0f}s, {stats['rate']:.1f} "
          f"{args.sampling}/s" + (f", {seconds / 60:.1f} of {args.budget_minutes} min" if args.budget_minutes else "")
          + (f", {state.work.flops / 1e12:.1f} of {args.budget_tflops:g} TFLOP" if args.budget_tflops else "")
          + f"; so far {state.work.describe(seconds)}]")
    if utils.rank_and_world()[0] == 0:
        log_path = os.path.join(args.checkpoint_dir, "log.jsonl")
        utils.append_jsonl(log_path, {"kind": "epoch", "epoch": state.epoch, "step": state.step, "val_map": val_map,
                                      "lambda": stats["lambda"], "train_seconds": stats["train_seconds"],
                                      "val_seconds": val_s, "seconds": seconds, **state.work.to_dict(),
                                      **stats["losses"]})
        ckpt = make_checkpoint(t, state, seconds, classes)
        last = os.path.join(args.checkpoint_dir, "last.pth")
        utils.save_checkpoint(ckpt, last)
        if improved:  # the same checkpoint: linked, not written twice (a ViT-B's is 0.5 GB)
            utils.atomic_link(last, os.path.join(args.checkpoint_dir, "best.pth"))
        utils.plot_training_curves(utils.read_jsonl(log_path), os.path.join(args.checkpoint_dir, "curves.png"))


def make_checkpoint(t: Trainer, state: TrainState, seconds: float, classes: list) -> dict:
    """The checkpoint of the run as it stands, ``seconds`` into its training: the weights, the optimizer and
    scaler states, the arguments, the model's description, the config, the seen ``classes`` it trains on (their
    names, so that a cross-dataset evaluation knows them after the data has moved), and the state; epoch counts
    completed epochs, and epoch_step > 0 marks a stop inside the next one, with its loss sums and RNG states."""
    ckpt = {"models": {name: m.state_dict() for name, m in t.model.named_children()},
            "optimizers": {t.method.optimizer_name: t.optimizer.state_dict()}, "scaler": t.scaler.state_dict(),
            "epoch": state.epoch, "step": state.step, "args": vars(t.args), "model": model_config(t.args).to_dict(),
            "config": t.config, "classes": list(classes), "best": state.best, "epoch_step": state.epoch_step,
            "world_size": utils.rank_and_world()[1], "seconds": seconds,
            "grl_start": state.schedule.grl_start, "schedule_unit": state.schedule.unit,
            "finished": state.finished,
            "work": state.work.to_dict(), "data": t.data}
    if state.epoch_step:
        ckpt["epoch_sums"], ckpt["rng_by_rank"] = dict(state.epoch_sums), state.rng_by_rank
    return ckpt


def to_device_batch(batch, args, device, step: int, memory_format) -> list:
    """A loaded batch (uint8 images, labels) on the device, its images augmented there (augment: crop and flip;
    each encoder normalises its own input) with random numbers seeded by (seed, step, rank), so a resumed run
    draws the same ones."""
    rank, world = utils.rank_and_world()
    g = torch.Generator().manual_seed(args.seed * 1_000_003 + step * world + rank)
    n_images = IMAGES_PER_ITEM[args.sampling]
    if not methods.get(args.method).augments:  # the images as they are, in [0, 1]
        return ([(x.to(device, non_blocking=True).float() / 255.0).contiguous(memory_format=memory_format)
                 for x in batch[:n_images]] + [x.to(device, non_blocking=True) for x in batch[n_images:]])
    images = [dataset.augment(x.to(device, non_blocking=True), g, (args.crop_scale, 1.0),
                              thicken=args.thicken if i == 0 else 0.0).contiguous(memory_format=memory_format)
              for i, x in enumerate(batch[:n_images])]  # the sketch-domain images first
    return images + [x.to(device, non_blocking=True) for x in batch[n_images:]]


class LossSums:
    """The losses of an epoch's steps, summed on the device; read (one wait for the device, one all-reduce
    under torchrun) only when asked, where a non-finite loss stops training. ``read`` holds the per-step
    means' sums as last read, after step ``read_at`` of the epoch (a resumed epoch starts from its saved sums)."""

    def __init__(self, device: torch.device, saved: dict, at: int, epoch: int):
        self.sums = {k: torch.tensor(v, dtype=torch.float64, device=device) for k, v in saved.items()}
        self.read, self.read_at, self.epoch = dict(saved), at, epoch

    def add(self, vals: dict) -> None:
        for k, v in vals.items():
            self.sums[k] = self.sums[k] + v.double() if k in self.sums else v.double()

    def window(self, i: int) -> dict:
        """The mean losses of the steps since the last read, up to step i of the epoch."""
        now = global_mean(self.sums)
        check_finite(now, self.read, self.read_at, i, self.epoch)
        means = {k: (now[k] - self.read.get(k, 0.0)) / (i - self.read_at) for k in now if k != "loss"}
        self.read, self.read_at = now, i
        return means

    def means(self, done: int) -> dict:
        """The epoch's mean losses over its ``done`` steps."""
        if done > self.read_at:
            self.window(done)
        return {k: v / max(1, done) for k, v in self.read.items() if k != "loss"}


if __name__ == "__main__":
    utils.run_cli(main, get_args_parser(), (dataset.DataError, PretrainedWeightsUnavailable))
