"""Model for zero-shot sketch-based image retrieval: sketches and photos in one embedding space.

    model = ZSSBIRModel("resnet18", embedding_dim=256, pretrained=False)          # two branches
    model = ZSSBIRModel("resnet18", 256, pretrained=False, shared_trunk=True)     # one trunk
    s, p = model.sketch_encoder(sketches), model.photo_encoder(photos)   # images (B, 3, S, S) in [0, 1] -> (B, D)
    losses = sbir_losses(model, Pairs(sketches, photos, labels), lambd=0.5, margin=0.2)  # or Triplets(...)

A sketch encoder and a photo encoder map images to L2-normalised embeddings: either two copies of
a torchvision backbone with separate weights (the original two-branch model), or one trunk shared
by both domains (optionally with domain-specific batch norm), seen through two thin views. A
domain classifier reads the embeddings through a gradient reversal layer (Ganin et al.,
"Domain-Adversarial Training of Neural Networks", JMLR 2016): it learns to tell sketches from
photos while the reversed gradient pushes the encoders towards embeddings it cannot tell apart.
Seen-class proxies give the normalised-softmax class loss. Each encoder normalises its images with the
statistics its trunk's weights expect; CLIP's encoders have QuickGELU in their MLPs, as OpenAI trained them.
ModelConfig describes a network and holds the rules it must follow.
This module does no I/O and chooses no device.
"""
import copy
import logging
import math
import os
from dataclasses import asdict, dataclass, fields
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision

# backbone name -> (torchvision builder name, default weights enum name, feature width)
BACKBONES = {
    "vgg16": ("vgg16", "VGG16_Weights", 512),
    "vgg16_bn": ("vgg16_bn", "VGG16_BN_Weights", 512),
    "resnet18": ("resnet18", "ResNet18_Weights", 512),
    "resnet34": ("resnet34", "ResNet34_Weights", 512),
    "resnet50": ("resnet50", "ResNet50_Weights", 2048),
    # resnet18's layout for small inputs, built here (small_input_resnet), without published weights
    "resnet18_w16": ("small_input_resnet", None, 128),
    "resnet18_w32": ("small_input_resnet", None, 256),
    "mobilenet_v3_small": ("mobilenet_v3_small", "MobileNet_V3_Small_Weights", 576),
    "shufflenet_v2_x1_0": ("shufflenet_v2_x1_0", "ShuffleNet_V2_X1_0_Weights", 1024),
    "efficientnet_b0": ("efficientnet_b0", "EfficientNet_B0_Weights", 1280),
    "convnext_tiny": ("convnext_tiny", "ConvNeXt_Tiny_Weights", 768),
    "swin_t": ("swin_t", "Swin_T_Weights", 768),
    "vit_b_16": ("vit_b_16", "ViT_B_16_Weights", 768),
    "vit_b_32": ("vit_b_32", "ViT_B_32_Weights", 768),
    # CLIP's image encoders (Radford et al., ICML 2021) through the open_clip package: (its model name, the
    # pretrained tag of OpenAI's weights, the width of the projected image embedding)
    "clip_vit_b_32": ("ViT-B-32", "openai", 512),
    "clip_vit_b_16": ("ViT-B-16", "openai", 512),
}
CLIP_BACKBONES = {"clip_vit_b_32", "clip_vit_b_16"}
# The activation in the MLP of CLIP's transformer blocks -> the suffix of open_clip's model name that builds it.
# OpenAI trained CLIP with QuickGELU, x * sigmoid(1.702 x) (their clip/model.py), which open_clip builds under the
# "-quickgelu" names; "gelu" (torch's exact GELU, open_clip's plain names) is what this project built before, kept so
# that the checkpoints trained with it load as they were trained.
CLIP_ACTIVATIONS = {"quick_gelu": "-quickgelu", "gelu": ""}
# Vision transformers cut the image into patches: their input side is fixed when they are built and must be
# a multiple of the patch size.
IMAGENET_STATS = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))  # torchvision's; Sketch_LVM's data code uses them
CLIP_EMBEDDING_DIM = 512  # the width of CLIP ViT-B/32's and ViT-B/16's image embedding (visual.proj's output)
PATCH_SIZE = {"vit_b_16": 16, "vit_b_32": 32, "clip_vit_b_16": 16, "clip_vit_b_32": 32}
# Backbones normalised by layer norm only: nothing for --domain_bn to split.
WITHOUT_BATCH_NORM = {"convnext_tiny", "swin_t", "vit_b_16", "vit_b_32", "clip_vit_b_16", "clip_vit_b_32"}


# The newest format of a checkpoint's "model" entry; this code reads every older one too. 0: no entry (the args
# describe the model); 1: ModelConfig's fields but activation and method, whose absence means GELU for CLIP and
# today's SBIR model; 2: format 1 plus activation; 3: format 2 plus method; 4: format 3 plus test_flip; 5: format 4
# plus test_shift. to_dict writes the oldest format that describes the network (2 only for QuickGELU, 3 only for a
# method other than "sbir", 4 only with test_flip, 5 only with test_shift), so every entry an older format can
# describe keeps its bytes and its fingerprint (utils.model_fingerprint).
MODEL_FORMAT = 5
METHODS = ("sbir", "sketch_lvm", "zse_sbir")  # the networks methods.py builds (methods.METHODS: the methods)
DOMAIN_INPUTS = ("embedding", "features")  # what the domain classifier reads: unit embeddings or trunk features
WEIGHTS = ("imagenet", "openai", "file", "none")  # where a trunk starts: ImageNet's or CLIP's weights, a file, random


class ModelConfigError(ValueError):
    """A ModelConfig field that breaks a rule. The message names fields in braces ("{image_size}"): str() gives
    them bare, ``phrase(prefix)`` as the caller knows them, e.g. train.py's flags ("--image_size") or a
    checkpoint's entry ("model.image_size"). ``field`` is the field at fault."""

    def __init__(self, field: str, template: str):
        self.field, self.template = field, template
        super().__init__(self.phrase(""))

    def phrase(self, prefix: str) -> str:
        text = self.template
        for name in ModelConfig.__dataclass_fields__:
            text = text.replace("{" + name + "}", prefix + name)
        return text


def is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def is_clip(backbone) -> bool:
    return isinstance(backbone, str) and backbone in CLIP_BACKBONES


def format1_activation(backbone) -> str | None:
    """What a format 1 entry, which has no activation field, was built with: GELU for CLIP, the backbone's own
    (None) for the others."""
    return "gelu" if is_clip(backbone) else None


def is_channel_stats(v) -> bool:
    """Three per-channel numbers (R, G, B)."""
    return isinstance(v, tuple) and len(v) == 3 and all(isinstance(x, (int, float)) and not isinstance(x, bool)
                                                         for x in v)


@dataclass(frozen=True)
class ModelConfig:
    """The network a checkpoint holds, in its own terms, not in any script's flags; a checkpoint stores it
    as to_dict gives it, ``{"format": 1 or 2, **fields}``, under "model". ``weights`` is where the trunk
    started (WEIGHTS): "imagenet" (torchvision's default weights for the backbone), "openai" (CLIP's), "file" (a
    user's, train.py --weights) or "none" (random). ``mean`` and ``std`` are the channel statistics the trunk's
    weights expect (backbone_stats), with which the encoder normalises its [0, 1] images. ``activation`` is
    CLIP's MLP activation (CLIP_ACTIVATIONS): "quick_gelu", OpenAI's, which None (left out) becomes, or "gelu",
    that of the CLIP models this project trained before (their entries, format 1, have no activation). The
    other backbones have their own: None. ``method`` is the method whose network it is (METHODS): "sbir" (the
    sketch and photo encoders of ZSSBIRModel, what every entry before format 3 holds) or "sketch_lvm"
    (SketchLVMNet: CLIP's image tower with learnt prompts; a CLIP backbone, its embedding size CLIP's own) or
    "zse_sbir" (ZSESBIRNet: vit_b_16 with cross-attention and a relation network; 768-d, a side divisible by 32).
    ``test_flip``: the SBIR model's encoders embed an image at test time (eval mode) as the normalised sum of the
    unit embeddings of the image and of its mirror image, wherever the model is used (validation, evaluate.py,
    retrieve.py, app.py); training sees single images. ``test_shift`` (pixels, 0: off) adds the image shifted by
    that many pixels up, down, left and right (its edge pixels repeated) to the images summed so: 5 views, 10 with
    test_flip.

    The one place the rules of a network's description live: a config that breaks one raises
    ModelConfigError when it is made, whether by the model, by train.py's flags or from a checkpoint."""
    backbone: str
    embedding_dim: int
    image_size: int
    shared_trunk: bool = False
    domain_bn: bool = False
    domain_input: str = "embedding"
    weights: str = "imagenet"
    mean: tuple = ()  # () when built by hand: backbone_stats(backbone); checkpoints always hold the numbers
    std: tuple = ()
    activation: str | None = None  # None when built by hand: "quick_gelu" for CLIP; checkpoints hold the choice
    method: str = "sbir"
    test_flip: bool = False
    test_shift: int = 0

    def __post_init__(self):
        self._check_sizes()
        if self.activation is None and is_clip(self.backbone):
            object.__setattr__(self, "activation", "quick_gelu")  # frozen: set once, before anyone reads it
        self._check_choices()
        unset = [isinstance(v, tuple) and not v for v in (self.mean, self.std)]  # () and (): backbone_stats
        if not (all(unset) or (is_channel_stats(self.mean) and is_channel_stats(self.std))):
            raise ModelConfigError("mean", f"{{mean}} and {{std}} must be 3 channel values each (or both ()), "
                                           f"got {self.mean!r} and {self.std!r}")
        if not all(unset) and not all(v > 0 for v in self.std):
            raise ModelConfigError("std", f"{{std}} must be positive, got {self.std!r}")

    def _check_sizes(self) -> None:
        """The backbone, the embedding's size and the input side, which a vision transformer cuts into patches."""
        b, size = self.backbone, self.image_size
        if not isinstance(b, str) or b not in BACKBONES:
            raise ModelConfigError("backbone", f"unknown {{backbone}} {b!r}; choose one of {', '.join(BACKBONES)}")
        if not is_int(self.embedding_dim) or self.embedding_dim < 1:
            raise ModelConfigError("embedding_dim", f"{{embedding_dim}} must be a whole number of at least 1, "
                                                    f"got {self.embedding_dim!r}")
        if not is_int(size) or size < 32:
            raise ModelConfigError("image_size", f"{{image_size}} must be at least 32 pixels, got {size!r}")
        if b in PATCH_SIZE and size % PATCH_SIZE[b]:
            raise ModelConfigError("image_size", f"{{backbone}} {b} cuts images into {PATCH_SIZE[b]}-pixel patches; "
                                                 f"give an {{image_size}} divisible by {PATCH_SIZE[b]} (e.g. 224), "
                                                 f"not {size}")

    def _check_choices(self) -> None:
        """One trunk or two, domain batch norm, what the domain classifier reads, where the trunk starts."""
        for name in ("shared_trunk", "domain_bn", "test_flip"):
            if not isinstance(getattr(self, name), bool):
                raise ModelConfigError(name, f"{{{name}}} must be True or False, got {getattr(self, name)!r}")
        if not is_int(self.test_shift) or not 0 <= self.test_shift <= self.image_size // 8:
            raise ModelConfigError("test_shift", f"{{test_shift}} must be a whole number of pixels from 0 to an eighth "
                                                 f"of {{image_size}} ({self.image_size // 8}), got {self.test_shift!r}")
        if self.domain_bn and self.backbone in WITHOUT_BATCH_NORM:
            raise ModelConfigError("domain_bn", f"{{domain_bn}} splits batch norms, and {{backbone}} {self.backbone} "
                                                "has none (layer norm only); drop {domain_bn} or choose a CNN with "
                                                "batch norm")
        if self.domain_bn and not self.shared_trunk:
            raise ModelConfigError("domain_bn", "{domain_bn} splits the batch norms of a shared trunk; add "
                                                "{shared_trunk} (two branches already normalise each domain apart)")
        for name, allowed in (("domain_input", DOMAIN_INPUTS), ("weights", WEIGHTS)):
            if not isinstance(getattr(self, name), str) or getattr(self, name) not in allowed:
                raise ModelConfigError(name, f"{{{name}}} must be one of {', '.join(allowed)}, "
                                             f"got {getattr(self, name)!r}")
        if not has_published_weights(self.backbone) and self.weights != "none":
            raise ModelConfigError("weights", f"{{backbone}} {self.backbone} has no published weights ("
                                              f"{self.weights} asked): train it from random ones (--no-pretrained)")
        if is_clip(self.backbone) and (not isinstance(self.activation, str) or self.activation not in CLIP_ACTIVATIONS):
            raise ModelConfigError("activation", f"{{activation}} must be one of {', '.join(CLIP_ACTIVATIONS)}, "
                                                 f"got {self.activation!r}")
        if not is_clip(self.backbone) and self.activation is not None:
            raise ModelConfigError("activation", f"{{activation}} chooses CLIP's MLP activation; {{backbone}} "
                                                 f"{self.backbone} has its own: leave it out (None), "
                                                 f"got {self.activation!r}")
        self._check_method()

    def _check_method(self) -> None:
        """A known method, and the network it builds: Sketch_LVM's is one CLIP tower, its embedding CLIP's own."""
        if not isinstance(self.method, str) or self.method not in METHODS:
            raise ModelConfigError("method", f"{{method}} must be one of {', '.join(METHODS)}, got {self.method!r}")
        for name in ("test_flip", "test_shift"):
            if getattr(self, name) and self.method != "sbir":
                raise ModelConfigError(name, f"{{{name}}} is the SBIR model's (method sbir); {{method}} "
                                             f"{self.method} embeds as its authors' code does: leave it out")
        if self.method == "zse_sbir":
            self._check_zse_sbir()
        if self.method != "sketch_lvm":
            return
        if not is_clip(self.backbone):
            clips = ", ".join(sorted(CLIP_BACKBONES))
            raise ModelConfigError("backbone", f"{{method}} sketch_lvm prompts CLIP's image tower; choose a CLIP "
                                               f"{{backbone}} ({clips}), not {self.backbone}")
        if self.embedding_dim != CLIP_EMBEDDING_DIM:
            raise ModelConfigError("embedding_dim", f"{{method}} sketch_lvm embeds with CLIP's own projection: "
                                                    f"{{embedding_dim}} must be {CLIP_EMBEDDING_DIM}, "
                                                    f"got {self.embedding_dim}")
        if not self.shared_trunk or self.domain_bn:
            raise ModelConfigError("shared_trunk", "{method} sketch_lvm has one CLIP tower for both domains: "
                                                   "give {shared_trunk} and no {domain_bn}")

    def _check_zse_sbir(self) -> None:
        """ZSE-SBIR's network: torchvision's vit_b_16 with its 768-d class token as the embedding, one network for
        both domains, and a patch grid of even side (its relation head halves it)."""
        if self.backbone != "vit_b_16":
            raise ModelConfigError("backbone", f"{{method}} zse_sbir is a ViT-B/16: give {{backbone}} vit_b_16, "
                                               f"not {self.backbone}")
        if self.embedding_dim != 768:
            raise ModelConfigError("embedding_dim", "{method} zse_sbir embeds with its 768-d class token: "
                                                    f"{{embedding_dim}} must be 768, got {self.embedding_dim}")
        if self.image_size % 32:
            raise ModelConfigError("image_size", "{method} zse_sbir's relation head halves the 16 px patch grid: "
                                                 f"give an {{image_size}} divisible by 32 (224), not {self.image_size}")
        if not self.shared_trunk or self.domain_bn:
            raise ModelConfigError("shared_trunk", "{method} zse_sbir has one network for both domains: give "
                                                   "{shared_trunk} and no {domain_bn}")

    def to_dict(self) -> dict:
        """{"format": 1 to 5, **fields}: the oldest format that describes the network (MODEL_FORMAT), so that an
        entry written before activation, method, test_flip or test_shift existed reads back to itself: format 1
        without any (every backbone but a QuickGELU CLIP, in the SBIR model), 2 with activation, 3 with method
        too, 4 with test_flip too, 5 with test_shift too."""
        d = asdict(self)
        if self.test_shift:
            return {"format": 5, **d}
        del d["test_shift"]
        if self.test_flip:
            return {"format": 4, **d}
        del d["test_flip"]
        if self.method != "sbir":
            return {"format": 3, **d}
        del d["method"]
        if self.activation == format1_activation(self.backbone):
            del d["activation"]
            return {"format": 1, **d}
        return {"format": 2, **d}

    def note(self) -> str:
        """One line for a person where the network departs from its published one, else "": a CLIP model with
        GELU (trained by this project before QuickGELU) is built as it was trained."""
        if self.activation != "gelu":
            return ""
        return (f"note: this {self.backbone} model uses GELU in its MLPs, as it was trained; OpenAI's CLIP uses "
                "QuickGELU, which models trained since use (docs/backbones.md)")

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        """The inverse of to_dict, for formats 1 to 5 (an entry without activation: format1_activation; without
        method: "sbir"; without test_flip: False; without test_shift: 0);
        ValueError for another format or a field its format does not have, ModelConfigError for a value that
        breaks a rule, TypeError for a missing field."""
        fmt = d.get("format")
        if not is_int(fmt) or not 1 <= fmt <= MODEL_FORMAT:
            raise ValueError(f"model format {fmt!r}; this version reads formats 1 to {MODEL_FORMAT}")
        known = {f.name for f in fields(cls)} - ({"activation"} if fmt == 1 else set()) - (
            {"method"} if fmt < 3 else set()) - ({"test_flip"} if fmt < 4 else set()) - (
            {"test_shift"} if fmt < 5 else set())
        unknown = sorted(set(d) - known - {"format"})
        if unknown:
            raise ValueError(f"unknown model field(s) {', '.join(unknown)} (format {fmt})")
        values = {k: tuple(v) if k in ("mean", "std") and isinstance(v, (list, tuple)) else v
                  for k, v in d.items() if k != "format"}
        values.setdefault("activation", format1_activation(d.get("backbone")))
        return cls(**values)


class PretrainedWeightsUnavailable(RuntimeError):
    """A backbone's pretrained weights were asked for but could not be downloaded or read, or the optional
    package it needs (open_clip) is not installed."""


def has_published_weights(name: str) -> bool:
    return BACKBONES[name][1] is not None


def small_input_resnet(width: int) -> nn.Module:
    """resnet18's layout (torchvision's BasicBlock, 2 per stage) for 32-64 px inputs: a 3x3 stride-2 convolution
    and a 3x3 stride-2 max pool as the stem (resnet18's 7x7 one is sized for 224 px), then 4 stages of width,
    2 width, 4 width and 8 width channels, global average pooling: images (B, 3, H, W) -> (B, 8 width). At base
    width 32 it does a quarter of resnet18's FLOPs on an image of the same size, at 16 a sixteenth, so a budget
    of training compute sees 4x or 16x the images (docs/results.md)."""
    from torchvision.models.resnet import BasicBlock
    layers = [nn.Conv2d(3, width, 3, 2, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True),
              nn.MaxPool2d(3, 2, 1)]
    channels = width
    for stage in range(4):
        out = width * 2 ** stage
        for block in range(2):
            stride = 2 if stage > 0 and block == 0 else 1
            down = None if stride == 1 and channels == out else nn.Sequential(
                nn.Conv2d(channels, out, 1, stride, bias=False), nn.BatchNorm2d(out))
            layers.append(BasicBlock(channels, out, stride, down))
            channels = out
    net = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())
    for m in net.modules():  # torchvision's ResNet initialisation
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
    return net


def backbone_weights(name: str):
    """torchvision's default ImageNet weights enum member for a backbone name."""
    _, weights_name, _ = BACKBONES[name]
    return getattr(torchvision.models, weights_name).DEFAULT


def build_trunk(name: str, pretrained: bool, image_size: int = 224, start_state: dict | None = None,
                activation: str | None = None) -> tuple[nn.Module, int]:
    """A backbone without its classifier: images (B, 3, H, W) -> pooled features (B, F). It starts from
    torchvision's ImageNet weights (``pretrained``), from ``start_state`` (a state dict of the whole
    torchvision network, e.g. a weights file a user already has; ValueError when it does not fit), or at
    random. A vision transformer is built for ``image_size``: weights trained at another size (224 for
    ImageNet's) get their position embeddings interpolated. The CNNs and Swin take any size. ModelConfig
    holds the rules for ``name``, ``image_size`` (a known backbone; a transformer's side a multiple of its patch) and
    ``activation`` (CLIP's MLP activation, CLIP_ACTIVATIONS; None: QuickGELU, as OpenAI's weights were trained)."""
    if name in CLIP_BACKBONES:
        return build_clip_trunk(name, pretrained, image_size, start_state, activation or "quick_gelu")
    builder, _, width = BACKBONES[name]
    if not has_published_weights(name):  # ModelConfig allows it no weights but random ones
        return small_input_resnet(width // 8), width
    weights = backbone_weights(name) if pretrained else None
    random_vit = name in PATCH_SIZE and weights is None and start_state is None
    try:
        net = torchvision.models.get_model(builder, weights=weights,
                                           **({"image_size": image_size} if random_vit else {}))
    except Exception as e:  # no network, no cached file, corrupt cache
        raise PretrainedWeightsUnavailable(
            f"could not load ImageNet weights for {name} ({type(e).__name__}: {e}); place "
            f"{weights.url.rsplit('/', 1)[-1]} in {torch.hub.get_dir()}/checkpoints/ or pass --no-pretrained"
        ) from None
    if start_state is not None:
        try:
            net.load_state_dict(start_state)
        except RuntimeError as e:
            first = (str(e).strip().splitlines() or ["mismatch"])[0][:160]
            raise ValueError(f"the weights do not fit torchvision's {name} ({first})") from None
    if name in PATCH_SIZE:
        if net.image_size != image_size:  # pretrained at 224: the same weights, position embeddings resized
            from torchvision.models.vision_transformer import interpolate_embeddings
            state = interpolate_embeddings(image_size, PATCH_SIZE[name], net.state_dict())
            net = torchvision.models.get_model(builder, weights=None, image_size=image_size)
            net.load_state_dict(state)
        net.heads = nn.Identity()
        trunk = net                                   # the class token after the last layer norm
    elif name.startswith(("vgg", "mobilenet", "efficientnet")):
        trunk = nn.Sequential(net.features, nn.AdaptiveAvgPool2d(1), nn.Flatten())
    elif name.startswith("shufflenet"):
        trunk = nn.Sequential(net.conv1, net.maxpool, net.stage2, net.stage3, net.stage4, net.conv5,
                              nn.AdaptiveAvgPool2d(1), nn.Flatten())
    elif name.startswith("convnext"):
        trunk = nn.Sequential(net.features, net.avgpool, net.classifier[0], net.classifier[1])  # LayerNorm2d, Flatten
    elif name.startswith("swin"):
        trunk = nn.Sequential(net.features, net.norm, net.permute, net.avgpool, net.flatten)
    else:  # resnets: everything up to the global pool, without fc
        trunk = nn.Sequential(*list(net.children())[:-1], nn.Flatten())
    return trunk, width


def backbone_stats(name: str) -> tuple:
    """(mean, std): the channel statistics a backbone's published weights expect, from their own package."""
    if name in CLIP_BACKBONES:
        open_clip = import_open_clip(name)
        return tuple(open_clip.OPENAI_DATASET_MEAN), tuple(open_clip.OPENAI_DATASET_STD)
    if not has_published_weights(name):  # trained from scratch: any fixed statistics do; ImageNet's, as the others
        return IMAGENET_STATS
    preset = backbone_weights(name).transforms()
    return tuple(preset.mean), tuple(preset.std)


def import_open_clip(name: str):
    """The open_clip package, or one line saying how to install it."""
    try:
        import open_clip
    except ImportError:
        raise PretrainedWeightsUnavailable(f"--backbone {name} needs the open_clip package: pip install "
                                           "open_clip_torch (requirements.txt lists it)") from None
    return open_clip


class Normalize(nn.Module):
    """Images with values in [0, 1] -> normalised with the channel statistics a trunk's weights expect:
    (x - mean) / std per channel, in the images' dtype. The statistics are not in the state dict: the
    checkpoint's ModelConfig holds them."""

    def __init__(self, mean: tuple, std: tuple):
        super().__init__()
        mean, std = (torch.tensor(v, dtype=torch.float32)[:, None, None] for v in (mean, std))  # (3, 1, 1) each
        self.register_buffer("mean", mean, persistent=False)
        self.register_buffer("std", std, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean.to(x.dtype)) / self.std.to(x.dtype)


def build_clip_trunk(name: str, pretrained: bool, image_size: int, start_state: dict | None,
                     activation: str = "quick_gelu") -> tuple[nn.Module, int]:
    """CLIP's image encoder through open_clip (an optional package), built for ``image_size`` (OpenAI's
    weights, trained at 224, get their position embeddings resized) with ``activation`` in its MLPs
    (CLIP_ACTIVATIONS: open_clip's "-quickgelu" model for OpenAI's QuickGELU). Its weights are cached in
    <torch hub dir>/open_clip. The text tower is dropped."""
    open_clip = import_open_clip(name)
    base_name, tag, width = BACKBONES[name]
    model_name = base_name + CLIP_ACTIVATIONS[activation]
    cache = os.path.join(torch.hub.get_dir(), "open_clip")
    # open_clip logs (on the root logger) a warning for every model it initialises at random, as ours are before
    # their weights load: that one message is dropped, while the call lasts; every other warning shows.
    random_init = f"No pretrained weights loaded for model '{model_name}'. Model initialized randomly."
    root = logging.getLogger()

    def not_random_init(record: logging.LogRecord) -> bool:
        return record.getMessage() != random_init
    root.addFilter(not_random_init)
    try:
        clip = open_clip.create_model(model_name, pretrained=tag if pretrained and start_state is None else None,
                                      force_image_size=image_size, cache_dir=cache)
    except Exception as e:  # no network, no cached file, corrupt cache
        raise PretrainedWeightsUnavailable(
            f"could not load CLIP weights {model_name} ({tag}) ({type(e).__name__}: {str(e)[:120]}); they are "
            f"downloaded into {cache}; or pass --no-pretrained") from None
    finally:
        root.removeFilter(not_random_init)
    if start_state is not None:
        from open_clip.model import resize_pos_embed

        # OpenAI's TorchScript archive (utils.load_weights_file) also holds three int buffers that its own model
        # keeps and open_clip's does not: they describe the network, which the names and shapes already do
        state = {k: v for k, v in start_state.items() if k not in ("input_resolution", "context_length", "vocab_size")}
        resize_pos_embed(state, clip)  # weights trained at another size: positions resized in place
        try:
            clip.load_state_dict(state)
        except RuntimeError as e:
            first = (str(e).strip().splitlines() or ["mismatch"])[0][:160]
            raise ValueError(f"the weights do not fit open_clip's {model_name} ({first})") from None
    return clip.visual, width


class DomainBatchNorm2d(nn.Module):
    """One BatchNorm2d per domain (domain-specific batch norm, Chang et al., CVPR 2019): the trunk's
    weights are shared, its normalisation statistics and affine parameters are not. The owning
    Encoder sets ``domain`` before each forward pass."""

    def __init__(self, bn: nn.BatchNorm2d, domains: int):
        super().__init__()
        self.bns = nn.ModuleList(copy.deepcopy(bn) for _ in range(domains))
        self.domain = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bns[self.domain](x)


def split_batch_norms(module: nn.Module, domains: int) -> None:
    """Replace every BatchNorm2d inside ``module`` by a DomainBatchNorm2d (in place)."""
    for name, child in module.named_children():
        if isinstance(child, nn.BatchNorm2d):
            setattr(module, name, DomainBatchNorm2d(child, domains))
        else:
            split_batch_norms(child, domains)


class Encoder(nn.Module):
    """Normalisation, trunk, linear projection: images (B, 3, H, W) in [0, 1] -> unit-norm embeddings (B, D).

    ``pretrained``: True starts the trunk from its published weights, False at random, a state dict of the
    whole torchvision (or open_clip) network from those weights (build_trunk's ``start_state``). The images are
    normalised with the statistics the trunk's weights expect (backbone_stats). With ``domain_bn`` the trunk's
    batch norms are split into one per domain (0 sketch, 1 photo) and ``forward`` takes the domain of its batch.
    With ``test_flip`` and ``test_shift``, in eval mode an image's embedding is the normalised sum of those of its
    test views (ModelConfig, test_views)."""

    def __init__(self, backbone: str, embedding_dim: int, pretrained: bool | dict, domain_bn: bool = False,
                 image_size: int = 224, activation: str | None = None, test_flip: bool = False, test_shift: int = 0):
        super().__init__()
        self.test_flip, self.test_shift = test_flip, test_shift
        start_state = pretrained if isinstance(pretrained, dict) else None
        published = start_state is None and bool(pretrained)
        self.trunk, self.width = build_trunk(backbone, published, image_size, start_state, activation)
        self.normalize = Normalize(*backbone_stats(backbone))
        self.domain_bn = domain_bn
        if domain_bn:
            split_batch_norms(self.trunk, 2)
        # found once; a plain list, so not registered twice (SyncBatchNorm conversion keeps these modules)
        self.domain_norms = [m for m in self.trunk.modules() if isinstance(m, DomainBatchNorm2d)]
        self.head = nn.Sequential(nn.Dropout(0.2), nn.Linear(self.width, embedding_dim))

    def forward(self, x: torch.Tensor, domain: int = 0, with_features: bool = False):
        for m in self.domain_norms:
            m.domain = domain
        b = x.shape[0]
        if not self.training:  # one batch of all the test views, the images first
            x = test_views(x, self.test_flip, self.test_shift)
        feats = self.trunk(self.normalize(x))  # (B, F), or (V B, F)
        emb = F.normalize(at_least_float32(self.head(feats)), dim=1)  # (B, D), or (V B, D)
        views = x.shape[0] // b
        if views > 1:
            emb = F.normalize(emb.unflatten(0, (views, -1)).sum(0), dim=1)
            feats = feats.unflatten(0, (views, -1)).sum(0) / views
        return (emb, feats) if with_features else emb


def test_views(x: torch.Tensor, flip: bool, shift: int) -> torch.Tensor:
    """Images (B, C, H, W) -> their test views (V B, C, H, W), view by view, the images first: with ``shift``
    (pixels) the images moved that far right, left, down and up (the edge pixels repeated into the gap), then with
    ``flip`` the mirror images of all of those."""
    views = [x]
    if shift:
        h, w = x.shape[2:]
        padded = F.pad(x, (shift, shift, shift, shift), mode="replicate")
        for dy, dx in ((0, -shift), (0, shift), (-shift, 0), (shift, 0)):
            views.append(padded[:, :, shift + dy:shift + dy + h, shift + dx:shift + dx + w])
    if flip:
        views += [v.flip(3) for v in views]
    return torch.cat(views) if len(views) > 1 else x


class DomainView(nn.Module):
    """The shared encoder as seen by one domain: images (B, 3, H, W) -> embeddings (B, D). Holds no
    weights of its own; ZSSBIRModel keeps it out of its state dict."""

    def __init__(self, encoder: Encoder, domain: int):
        super().__init__()
        self.encoder, self.domain = encoder, domain

    def forward(self, x: torch.Tensor, with_features: bool = False):
        return self.encoder(x, self.domain, with_features)


def at_least_float32(x: torch.Tensor) -> torch.Tensor:
    """x in float32 when autocast computed it in float16 or bfloat16; float32 and float64 stay as they are."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


class GradientReversal(torch.autograd.Function):
    """Identity in the forward pass; multiplies the gradient by -lambda in the backward pass."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, lambd: float) -> torch.Tensor:
        ctx.lambd = lambd
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        return -ctx.lambd * grad_output, None


class GradientReversalLayer(nn.Module):
    """Module form of GradientReversal; lambda is given per call so a schedule can drive it."""

    def forward(self, x: torch.Tensor, lambd: float) -> torch.Tensor:
        return GradientReversal.apply(x, lambd)


class DomainClassifier(nn.Module):
    """Gradient reversal, then an MLP: embeddings (B, D) (or trunk features (B, F)) -> domain logits
    (B,) (photo = 1)."""

    def __init__(self, embedding_dim: int, hidden_dim: int = 256):
        super().__init__()
        self.grl = GradientReversalLayer()
        self.mlp = nn.Sequential(
            nn.Linear(embedding_dim, hidden_dim), nn.ReLU(inplace=True),
            nn.Linear(hidden_dim, hidden_dim), nn.ReLU(inplace=True),
            nn.Linear(hidden_dim, 1),
        )

    def forward(self, emb: torch.Tensor, lambd: float) -> torch.Tensor:
        return self.mlp(self.grl(emb, lambd)).squeeze(1)  # (B,)


class ClassProxies(nn.Module):
    """One learnable unit vector per seen class: embeddings (B, D) -> cosine logits (B, C) / T."""

    def __init__(self, embedding_dim: int, num_classes: int, temperature: float = 0.1):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(num_classes, embedding_dim))
        self.temperature = temperature

    def forward(self, emb: torch.Tensor) -> torch.Tensor:
        return emb @ F.normalize(self.weight, dim=1).t() / self.temperature  # (B, C)


class ZSSBIRModel(nn.Module):
    """Sketch encoder, photo encoder and domain classifier of the zero-shot SBIR model.

    Two branches (``sketch_encoder``, ``photo_encoder``: separate weights), or with ``shared_trunk``
    one ``encoder`` whose two DomainViews are ``sketch_encoder`` and ``photo_encoder`` (attributes
    outside the state dict, so each weight is saved once). ``domain_bn`` splits a shared trunk's batch
    norms by domain. ``domain_input`` is what the domain classifier reads: "embedding" (B, D) or the
    trunk's "features" (B, F). With ``num_classes`` > 0 the model also holds seen-class proxies for
    the class loss; they are created last, so the encoders' initialisation does not depend on them.
    ``image_size`` is the input side a vision transformer is built for (the other backbones take any).
    ``pretrained`` (Encoder): True, False, or a state dict of the whole network to start the trunk(s) from.
    ``activation``: CLIP's MLP activation (ModelConfig; None: QuickGELU for CLIP, the backbone's own otherwise).
    These, after num_classes, are given by name (``network``): with backbone and embedding_dim they must make a
    valid ModelConfig, whose rules they meet first (ModelConfigError otherwise; TypeError for an unknown name).
    """

    def __init__(self, backbone: str = "vgg16", embedding_dim: int = 512, pretrained: bool | dict = True,
                 num_classes: int = 0, **network):
        super().__init__()
        # network: the rest of the ModelConfig (shared_trunk, domain_bn, domain_input, image_size, activation,
        # test_flip, test_shift), by name
        start = "none" if pretrained is False else "file" if isinstance(pretrained, dict) else (
            "openai" if is_clip(backbone) else "imagenet")
        cfg = ModelConfig(backbone, embedding_dim, **{"image_size": 224, "weights": start, **network})  # or raise
        shared_trunk, domain_bn, domain_input = cfg.shared_trunk, cfg.domain_bn, cfg.domain_input
        image_size, activation, flip, shift = cfg.image_size, cfg.activation, cfg.test_flip, cfg.test_shift
        if shared_trunk:
            self.encoder = Encoder(backbone, embedding_dim, pretrained, domain_bn, image_size, activation, flip, shift)
            width = self.encoder.width
            object.__setattr__(self, "sketch_encoder", DomainView(self.encoder, 0))  # not registered: no
            object.__setattr__(self, "photo_encoder", DomainView(self.encoder, 1))   # second copy in state_dict
        else:
            self.sketch_encoder = Encoder(backbone, embedding_dim, pretrained, image_size=image_size,
                                          activation=activation, test_flip=flip, test_shift=shift)
            self.photo_encoder = Encoder(backbone, embedding_dim, pretrained, image_size=image_size,
                                         activation=activation, test_flip=flip, test_shift=shift)
            width = self.sketch_encoder.width
        self.domain_input = domain_input
        self.domain_classifier = DomainClassifier(embedding_dim if domain_input == "embedding" else width)
        if num_classes > 0:
            self.class_proxies = ClassProxies(embedding_dim, num_classes)

    @classmethod
    def from_config(cls, config: ModelConfig, num_classes: int = 0, start_weights: bool = True,
                    start_state: dict | None = None) -> "ZSSBIRModel":
        """The network a ModelConfig describes; with ``start_weights`` the trunk starts from config.weights:
        the published ones, or for "file" ``start_state`` (random without it); False: random, e.g. before
        loading a checkpoint's trained weights. Its encoders normalise with config.mean and config.std
        when the config holds them (a checkpoint's always do)."""
        if not start_weights or config.weights == "none" or (config.weights == "file" and start_state is None):
            start = False
        else:
            start = start_state if config.weights == "file" else True
        model = cls(config.backbone, config.embedding_dim, start, num_classes, shared_trunk=config.shared_trunk,
                    domain_bn=config.domain_bn, domain_input=config.domain_input, image_size=config.image_size,
                    activation=config.activation, test_flip=config.test_flip, test_shift=config.test_shift)
        if config.mean:
            for encoder in [m for m in model.modules() if isinstance(m, Encoder)]:
                encoder.normalize = Normalize(config.mean, config.std)
        return model

    def embed_pair(self, sketch: torch.Tensor, photo: torch.Tensor) -> tuple:
        """Embeddings (B1, D), (B2, D) and trunk features (B1, F), (B2, F) of sketches and photos. A shared
        trunk without domain batch norm embeds both in one batch, so that its batch statistics are those
        of the mixture its running statistics (used at test time) describe."""
        if hasattr(self, "encoder") and not self.encoder.domain_bn:
            emb, feats = self.encoder(torch.cat([sketch, photo]), with_features=True)
            b = sketch.shape[0]
            return emb[:b], emb[b:], feats[:b], feats[b:]
        s, fs = self.sketch_encoder(sketch, with_features=True)
        p, fp = self.photo_encoder(photo, with_features=True)
        return s, p, fs, fp


# ----------------------------------------------------------------------------------- Sketch_LVM

class PromptedCLIP(nn.Module):
    """Sketch_LVM's encoder (Sain et al., CVPR 2023), as their code at ca33be9 builds it (src/clip/model.py
    VisionTransformer.forward, src/model_LN_prompt.py; docs/sketch_lvm.md): CLIP's image tower ``visual``
    (open_clip's VisionTransformer of a -quickgelu model) with ``num_prompts`` learnt tokens per domain (0
    sketch, 1 photo; randn, as theirs) appended after the class and patch tokens once the positions are added,
    and before ln_pre. The embedding is ln_post(class token) @ proj, with no head and no normalisation.

        x = conv1(image) -> (B, g*g, W);  x = [class; x] + positions;  x = [x; prompts(domain)]   (B, 1+g*g+P, W)
        embedding = ln_post(transformer(ln_pre(x))[:, 0]) @ proj                                   (B, E)

    Input: images normalised as the method's data code does (ImageNet's statistics, after padding to a square).
    """

    def __init__(self, visual: nn.Module, num_prompts: int = 3, domains: int = 2):
        super().__init__()
        plain = (isinstance(getattr(visual, "patch_dropout", None), nn.Identity) and visual.attn_pool is None
                 and not visual.final_ln_after_pool and visual.pool_type == "tok")
        if not plain:  # forward below follows open_clip's ViT only where these are off, as in CLIP's own models
            raise ValueError("PromptedCLIP follows a CLIP ViT without patch dropout, attention pooling or a pooled "
                             "ln_post; this tower has one of them")
        self.visual = visual
        width = visual.conv1.out_channels
        # theirs: sk_prompt, then img_prompt, each torch.randn(n_prompts, prompt_dim) on the global generator
        self.prompts = nn.Parameter(torch.stack([torch.randn(num_prompts, width) for _ in range(domains)]))

    def forward(self, x: torch.Tensor, domain: int) -> torch.Tensor:
        v = self.visual
        x = v.conv1(x)  # (B, W, g, g)
        x = x.reshape(x.shape[0], x.shape[1], -1).permute(0, 2, 1)  # (B, g*g, W)
        cls = v.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)  # (B, 1, W)
        x = torch.cat([cls, x], dim=1) + v.positional_embedding.to(x.dtype)  # (B, 1 + g*g, W)
        x = torch.cat([x, self.prompts[domain].to(x.dtype).expand(x.shape[0], -1, -1)], dim=1)  # (B, 1+g*g+P, W)
        x = v.transformer(v.ln_pre(x))  # open_clip's transformer takes (B, L, W) either way it runs inside
        return v.ln_post(x[:, 0]) @ v.proj  # (B, E)


class SketchLVMNet(nn.Module):
    """Sketch_LVM's network: images (B, 3, S, S) in [0, 1], normalised with ``mean`` and ``std`` (ImageNet's, as
    their data code does), through PromptedCLIP with the domain's prompts. ``embed`` gives the raw embedding (B, E)
    their loss reads; ``sketch_encoder`` and ``photo_encoder`` give it L2-normalised (B, E) for retrieval, which
    ranks by cosine as their evaluation does. ``config``: a ModelConfig of method "sketch_lvm"; ``start``: the
    trunk's start (Encoder's ``pretrained``: True, False or a state dict of the whole CLIP model)."""

    def __init__(self, config: "ModelConfig", start: bool | dict = False, num_prompts: int = 3):
        super().__init__()
        start_state = start if isinstance(start, dict) else None
        visual, _ = build_trunk(config.backbone, start_state is None and bool(start), config.image_size, start_state,
                                config.activation)
        self.normalize = Normalize(*(config.mean and (config.mean, config.std) or IMAGENET_STATS))
        self.prompted = PromptedCLIP(visual, num_prompts)
        object.__setattr__(self, "sketch_encoder", PromptedView(self, 0))  # views, outside the state dict
        object.__setattr__(self, "photo_encoder", PromptedView(self, 1))

    def embed(self, x: torch.Tensor, domain: int) -> torch.Tensor:
        return self.prompted(self.normalize(x), domain)  # (B, E)


class PromptedView(nn.Module):
    """SketchLVMNet as one domain sees it: images (B, 3, S, S) in [0, 1] -> unit embeddings (B, E). Its images are
    padded to a square, not resized to one (``image_fit``, which the code that reads images for an encoder asks
    of it: dataset.FITS), as Sketch_LVM's data code prepares them."""
    image_fit = "pad"

    def __init__(self, net: SketchLVMNet, domain: int):
        super().__init__()
        self.net, self.domain = net, domain  # the net is not saved through its views (they are not its modules)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(at_least_float32(self.net.embed(x, self.domain)), dim=1)


def freeze_as_sketch_lvm(module: nn.Module) -> None:
    """Sketch_LVM's freeze_all_but_bn (src/model_LN_prompt.py), applied to every submodule: the ``weight`` and
    ``bias`` of each module that is not a LayerNorm stop training. Parameters under other names train on:
    attention's in_proj_weight / in_proj_bias, and the class embedding, positions and proj of the tower itself
    (21,733,632 of ViT-B/32's image tower, against 39,936 in its LayerNorms; docs/sketch_lvm.md)."""
    for m in module.modules():
        if isinstance(m, nn.LayerNorm):
            continue
        for name in ("weight", "bias"):
            p = getattr(m, name, None)
            if isinstance(p, torch.Tensor):
                p.requires_grad_(False)


def freeze_all_but_layer_norms(module: nn.Module) -> None:
    """The paper's wording of what trains in CLIP (its LayerNorms, and the prompts outside it): every parameter
    of ``module`` outside a LayerNorm stops training. Apply it to CLIP's tower (PromptedCLIP.visual): the prompts
    sit outside it and keep training."""
    norms = {id(p) for m in module.modules() if isinstance(m, nn.LayerNorm) for p in m.parameters()}
    for p in module.parameters():
        p.requires_grad_(id(p) in norms)


def cosine_triplet_loss(anchor: torch.Tensor, positive: torch.Tensor, negative: torch.Tensor,
                        margin: float = 0.2) -> torch.Tensor:
    """Sketch_LVM's loss, nn.TripletMarginWithDistanceLoss with d(x, y) = 1 - cos(x, y) on the raw embeddings
    (B, E): mean over the batch of max(0, d(a, p) - d(a, n) + margin)."""
    d_pos = 1.0 - F.cosine_similarity(anchor, positive)  # (B,)
    d_neg = 1.0 - F.cosine_similarity(anchor, negative)
    return torch.clamp(margin + d_pos - d_neg, min=0.0).mean()  # torch's order of the sum: the same rounding


# ----------------------------------------------------------------------------------- ZSE-SBIR

ZSE_SBIR_FITS = ("strokes", "resize")  # their sketches cropped to the strokes and padded white, photos resized


class ScaleStem(nn.Module):
    """ZSE-SBIR's second patch embedding (their model/rn.py Scale_Embedding): four stride-2 convolutions without
    bias, ReLU between them: images (B, 3, S, S) -> (B, 768, S/16, S/16), averaged with the 16 px patch
    convolution's output."""

    def __init__(self, width: int = 768):
        super().__init__()
        self.convs = nn.Sequential(nn.Conv2d(3, 64, 7, 2, 3, bias=False), nn.ReLU(inplace=True),
                                   nn.Conv2d(64, 128, 3, 2, 1, bias=False), nn.ReLU(inplace=True),
                                   nn.Conv2d(128, 256, 3, 2, 1, bias=False), nn.ReLU(inplace=True),
                                   nn.Conv2d(256, width, 3, 2, 1, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.convs(x)


class UnbiasedLayerNorm(nn.Module):
    """ZSE-SBIR's LayerNorm (model/ca.py), not nn.LayerNorm: the standard deviation is the unbiased one (n - 1)
    and eps is added to it, not to the variance: a (x - mean) / (std + eps) + b, over the last dimension."""

    def __init__(self, width: int, eps: float = 1e-6):
        super().__init__()
        self.weight, self.bias, self.eps = nn.Parameter(torch.ones(width)), nn.Parameter(torch.zeros(width)), eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean, std = x.mean(-1, keepdim=True), x.std(-1, keepdim=True)
        return self.weight * (x - mean) / (std + self.eps) + self.bias


class CrossAttentionLayer(nn.Module):
    """One post-norm layer of ZSE-SBIR's cross-attention (model/ca.py EncoderLayer): the attention's queries and
    values come from its own image's tokens, its keys from the paired image's, and the residual is its own:

        x = norm1(own + dropout(attention(q=own, k=other, v=own)));  out = norm2(x + dropout(ffn(x)))

    with 8 heads, dropout 0.1 on the attention weights and after each sublayer, ffn = Linear(768, 1024), ReLU,
    dropout, Linear(1024, 768), and UnbiasedLayerNorm."""

    def __init__(self, width: int = 768, heads: int = 8, ffn: int = 1024, dropout: float = 0.1):
        super().__init__()
        self.attention = nn.MultiheadAttention(width, heads, dropout=dropout, batch_first=True)
        self.ffn = nn.Sequential(nn.Linear(width, ffn), nn.ReLU(), nn.Dropout(dropout), nn.Linear(ffn, width))
        self.norm1, self.norm2 = UnbiasedLayerNorm(width), UnbiasedLayerNorm(width)
        self.dropout1, self.dropout2 = nn.Dropout(dropout), nn.Dropout(dropout)

    def forward(self, own: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
        a = self.attention(own, other, own, need_weights=False)[0]  # (B, L, W)
        x = self.norm1(own + self.dropout1(a))
        return self.norm2(x + self.dropout2(self.ffn(x)))


class RelationHead(nn.Module):
    """ZSE-SBIR's relation scoring (model/model.py and model/rn.py) of a sketch's and a photo's tokens after
    cross-attention, (B, 1 + g*g, W) each: the g*g patch tokens are read as a (W, g, g) map by reinterpreting
    their memory, as their token_fea.view(batch, 768, 14, 14) does (not a transpose of (g*g, W)), a 2x2 stride-2
    convolution makes a = (g/2)^2 tokens of width 512, their a x a cosine matrix goes through an MLP
    a^2 -> a sqrt(a) -> a -> 1 (2401 -> 343 -> 49 -> 1 at 224 px) with ReLU and dropout, and a sigmoid: (B,)."""

    def __init__(self, grid: int, width: int = 768, dropout: float = 0.1):
        super().__init__()
        a = (grid // 2) ** 2
        self.grid, self.conv = grid, nn.Conv2d(width, 512, 2, 2)
        self.mlp = nn.Sequential(nn.Linear(a * a, a * math.isqrt(a)), nn.ReLU(), nn.Dropout(dropout),
                                 nn.Linear(a * math.isqrt(a), a), nn.ReLU(), nn.Dropout(dropout), nn.Linear(a, 1))

    def anchors(self, tokens: torch.Tensor) -> torch.Tensor:
        b, w = tokens.shape[0], tokens.shape[2]
        x = self.conv(tokens[:, 1:].reshape(b, w, self.grid, self.grid))  # (B, 512, g/2, g/2): memory read as (W, g, g)
        return x.flatten(2).transpose(1, 2)  # (B, a, 512)

    def forward(self, sketch: torch.Tensor, photo: torch.Tensor) -> torch.Tensor:
        s, p = self.anchors(sketch), self.anchors(photo)  # (B, a, 512) each
        cos = s @ p.transpose(1, 2) / s.norm(dim=-1)[:, :, None] / p.norm(dim=-1)[:, None, :]  # (B, a, a)
        cos = torch.where(torch.isnan(cos), torch.zeros_like(cos), cos)  # theirs: a 0 / 0 is 0
        return torch.sigmoid(self.mlp(cos.flatten(1))).squeeze(1)  # (B,)


class ZSESBIRNet(nn.Module):
    """ZSE-SBIR (Lin et al., CVPR 2023) as its code at 88f87f7 builds it (docs/zse_sbir.md): a ViT-B/16 (torchvision's,
    nn.LayerNorm's default eps 1e-5 as theirs) whose patch embedding is averaged with ScaleStem's, one layer of
    cross-attention per direction (CrossAttentionLayer: sketch_side for the sketch, photo_side for the photo) and a
    RelationHead. ``tokens`` gives an image's self-attention output (B, 1 + g*g, 768); ``pair`` the class tokens
    after cross-attention (what their triplet loss reads) and the relation score of index-paired sketches and
    photos; ``sketch_encoder`` / ``photo_encoder`` the retrieval token, the self-attention class token alone
    (their -r sa), L2-normalised (B, 768). Images in [0, 1], normalised with mean = std = 0.5 as theirs."""

    def __init__(self, config: "ModelConfig", start: bool | dict = False):
        super().__init__()
        from functools import partial
        from torchvision.models.vision_transformer import VisionTransformer

        size = config.image_size
        self.normalize = Normalize(*(config.mean and (config.mean, config.std) or ((0.5,) * 3, (0.5,) * 3)))
        self.vit = VisionTransformer(size, 16, 12, 12, 768, 3072, dropout=0.1, num_classes=1,
                                     norm_layer=partial(nn.LayerNorm, eps=1e-5))
        self.vit.heads = nn.Identity()
        self.stem = ScaleStem()
        self.sketch_side, self.photo_side = CrossAttentionLayer(), CrossAttentionLayer()
        self.relation = RelationHead(size // 16)
        self.start_note = self.load_start(start) if isinstance(start, dict) else ""
        sketch_fit, photo_fit = ZSE_SBIR_FITS
        object.__setattr__(self, "sketch_encoder", RetrievalToken(self, fit=sketch_fit))
        object.__setattr__(self, "photo_encoder", RetrievalToken(self, fit=photo_fit))
        object.__setattr__(self, "sketch_tokens", RetrievalToken(self, tokens=True, fit=sketch_fit))
        object.__setattr__(self, "photo_tokens", RetrievalToken(self, tokens=True, fit=photo_fit))

    def load_start(self, state: dict) -> str:
        """Start from a state dict under this network's names or their code's (a whole Model, or sam_ViT-B_16.pth's
        ViT alone: zse_sbir_state); ValueError when a tensor does not fit or none is given. Returns a line for a
        person: what came from it, what stays random, what of it had no place here."""
        ours = self.state_dict()
        given, unused = (state, []) if set(state) <= set(ours) else zse_sbir_state(state)
        wrong = [k for k, v in given.items() if k in ours and tuple(v.shape) != tuple(ours[k].shape)]
        if wrong:
            raise ValueError(f"{wrong[0]} has shape {tuple(given[wrong[0]].shape)}, this network's "
                             f"{tuple(ours[wrong[0]].shape)} (at --image_size {self.relation.grid * 16})")
        if not given:
            raise ValueError(f"none of its {len(state)} tensors is a ZSE-SBIR weight (e.g. {next(iter(state), '-')})")
        self.load_state_dict(given, strict=False)
        random = sorted({k.split(".")[0] if not k.startswith("vit.") else "vit" for k in set(ours) - set(given)})
        return (f"weights: {len(given)} of this network's {len(ours)} tensors from the file"
                + (f"; at random: {', '.join(random)}" if random else "")
                + (f"; {len(unused)} of the file's tensors have no place here (e.g. {unused[0]})" if unused else ""))

    def tokens(self, x: torch.Tensor) -> torch.Tensor:
        v, x = self.vit, self.normalize(x)
        t = (v.conv_proj(x) + self.stem(x)) / 2  # (B, 768, g, g)
        t = t.flatten(2).transpose(1, 2)  # (B, g*g, 768)
        t = torch.cat([v.class_token.expand(t.shape[0], -1, -1), t], dim=1)  # (B, 1 + g*g, 768)
        return v.encoder(t)  # positions, dropout, 12 pre-norm blocks, final LayerNorm

    def pair(self, sketch_tokens: torch.Tensor, photo_tokens: torch.Tensor) -> tuple:
        """(sketch class tokens (B, 768), photo class tokens (B, 768), relation scores (B,)) of index-paired
        sketches and photos, from their tokens (B, 1 + g*g, 768)."""
        s = self.sketch_side(sketch_tokens, photo_tokens)
        p = self.photo_side(photo_tokens, sketch_tokens)
        return s[:, 0], p[:, 0], self.relation(s, p)

    def relation_scores(self, sketch_tokens: torch.Tensor, photo_tokens: torch.Tensor,
                        pairs: int = 256) -> torch.Tensor:
        """The relation score of every sketch with every photo, (Q, N), from tokens computed once per image
        (Q, L, W) and (N, L, W), the photos' anywhere (e.g. a memory-mapped file; their valid.py recomputes them for
        every batch of 20 sketches), read a block at a time onto the sketches' device: the pairs
        go through cross-attention and the relation head ``pairs`` at a time, which bounds the memory (their
        activations: bench/bench_relation.py measures it), a block of sketch rows against a block of photos."""
        q, n, device = sketch_tokens.shape[0], photo_tokens.shape[0], sketch_tokens.device
        dtype = torch.promote_types(photo_tokens.dtype, torch.float32)  # at least float32: no false ties
        out = torch.empty(q, n, device=device, dtype=dtype)
        cols = max(1, min(n, pairs))
        rows = max(1, pairs // cols)
        for i in range(0, q, rows):
            s = sketch_tokens[i:i + rows]  # (r, L, W)
            for j in range(0, n, cols):
                p = photo_tokens[j:j + cols].to(device)  # (c, L, W): a block read where the photos' tokens are
                r, c = s.shape[0], p.shape[0]
                tiled_s = s[:, None].expand(r, c, *s.shape[1:]).reshape(r * c, *s.shape[1:])
                tiled_p = p[None].expand(r, c, *p.shape[1:]).reshape(r * c, *p.shape[1:])
                out[i:i + r, j:j + c] = self.pair(tiled_s, tiled_p)[2].view(r, c)
        return out


class RetrievalToken(nn.Module):
    """ZSESBIRNet's retrieval embedding of images (B, 3, S, S): the self-attention class token, unit length (B, 768);
    with ``tokens``, all of an image's self-attention tokens, flattened (B, (1 + g*g) 768), for the relation scores
    (ZSESBIRNet.relation_scores) of an embedding loop that keeps (B, D) rows. ``fit``: how its images are made
    square (``image_fit``: dataset.FITS), as their data code prepares the domain's images (ZSE_SBIR_FITS)."""

    def __init__(self, net: ZSESBIRNet, tokens: bool = False, fit: str = "resize"):
        super().__init__()
        self.net, self.all_tokens, self.image_fit = net, tokens, fit

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.net.tokens(x)  # (B, 1 + g*g, 768)
        return at_least_float32(t).flatten(1) if self.all_tokens else F.normalize(at_least_float32(t[:, 0]), dim=1)


# Their parameter names (model/*.py at 88f87f7: a whole Model's "sa.model.*", "ca.*", "rn.*", "conv2d.*", or
# sam_ViT-B_16.pth's ViTPatch names without "sa.model.") -> ours, as (pattern, replacement) regular expressions.
ZSE_SBIR_KEYS = (
    (r"^(sa\.model\.)?embedding\.", "vit.conv_proj."), (r"^(sa\.model\.)?scale\.seq\.", "stem.convs."),
    (r"^(sa\.model\.)?pos_embedding$", "vit.encoder.pos_embedding"), (r"^(sa\.model\.)?cls$", "vit.class_token"),
    (r"^(sa\.model\.)?transformer\.encoder_norm\.", "vit.encoder.ln."),
    (r"^(sa\.model\.)?transformer\.layers\.(\d+)\.0\.layer_norm_input\.", r"vit.encoder.layers.encoder_layer_\2.ln_1."),
    (r"^(sa\.model\.)?transformer\.layers\.(\d+)\.0\.layer_norm_out\.", r"vit.encoder.layers.encoder_layer_\2.ln_2."),
    (r"^(sa\.model\.)?transformer\.layers\.(\d+)\.0\.attention\.to_qkv\.(weight|bias)$",
     r"vit.encoder.layers.encoder_layer_\2.self_attention.in_proj_\3"),
    (r"^(sa\.model\.)?transformer\.layers\.(\d+)\.0\.attention\.to_out\.0\.",
     r"vit.encoder.layers.encoder_layer_\2.self_attention.out_proj."),
    (r"^(sa\.model\.)?transformer\.layers\.(\d+)\.0\.mlp\.net\.", r"vit.encoder.layers.encoder_layer_\2.mlp."),
    (r"^ca\.encoder\.layer1\.0\.", "sketch_side."), (r"^ca\.encoder\.layer2\.0\.", "photo_side."),
    (r"^rn\.rn\.", "relation.mlp."), (r"^conv2d\.", "relation.conv."))
# Within a cross-attention layer: their 4 linear maps (q, k, v, out), feed-forward w_1 / w_2 and AddAndNorm norms.
ZSE_SBIR_SIDE_KEYS = ((r"self_attn\.linears\.3\.", "attention.out_proj."), (r"feed_forward\.w_1\.", "ffn.0."),
                      (r"feed_forward\.w_2\.", "ffn.3."), (r"sublayer\.0\.norm\.a$", "norm1.weight"),
                      (r"sublayer\.0\.norm\.b$", "norm1.bias"), (r"sublayer\.1\.norm\.a$", "norm2.weight"),
                      (r"sublayer\.1\.norm\.b$", "norm2.bias"))


def zse_sbir_state(theirs: dict) -> tuple[dict, list]:
    """A state dict of ZSE-SBIR's code (a whole Model, or sam_ViT-B_16.pth's ViT) under ZSESBIRNet's names: their
    separate query, key and value maps of the cross-attention stacked into one in_proj, as nn.MultiheadAttention
    holds them. Returns (our state, their keys that have no place here: e.g. ca.encoder.layers.*, a cross-attention
    layer their forward never calls, or a classifier head)."""
    import re

    ours, unused, qkv = {}, [], {}
    for key, value in theirs.items():
        name = key
        for pattern, repl in ZSE_SBIR_KEYS:
            name = re.sub(pattern, repl, name)
        if name.startswith(("sketch_side.", "photo_side.")):
            side, rest = name.split(".", 1)
            m = re.match(r"self_attn\.linears\.([012])\.(weight|bias)$", rest)
            if m:
                qkv.setdefault((side, m.group(2)), {})[int(m.group(1))] = value
                continue
            for pattern, repl in ZSE_SBIR_SIDE_KEYS:
                rest = re.sub(pattern, repl, rest)
            name = f"{side}.{rest}"
        if name == key:
            unused.append(key)
        else:
            ours[name] = value
    for (side, kind), parts in qkv.items():
        ours[f"{side}.attention.in_proj_{kind}"] = torch.cat([parts[i] for i in range(3)])
    return ours, unused


def grl_lambda(step: int, total_steps: int, start_step: int) -> float:
    """Reversal strength at a training step (Ganin et al. 2016, section 5.2.2).

        lambda = 0                                   if step < start_step
        lambda = 2 / (1 + exp(-10 p)) - 1,           p = (step - start_step) / (total_steps - start_step)

    p goes from 0 at ``start_step`` (the first step of ``--grl_threshold_epoch``) to 1 at
    ``total_steps``, so lambda rises smoothly from 0 towards ~1. p is clipped to [0, 1].
    """
    if step < start_step or total_steps <= start_step:
        return 0.0
    p = min(1.0, (step - start_step) / (total_steps - start_step))
    return 2.0 / (1.0 + math.exp(-10.0 * p)) - 1.0


def domain_loss(logits: torch.Tensor, n_sketch: int, smoothing: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """BCE with logits of the domain classifier over [sketches; photos] (sketch = 0, photo = 1), the sketch
    and photo terms weighted equally whatever their numbers, with targets smoothed to smoothing / 2 and
    1 - smoothing / 2; and the classifier's (equally weighted) accuracy.

    Smoothing bounds the logits the classifier is pushed to: the loss is minimal at |logit| =
    log((2 - s) / s) (2.9 for s = 0.1), so the classifier cannot saturate, and its gradient, which
    is what the reversal layer hands to the encoders, does not vanish while it wins."""
    ls, lp = logits[:n_sketch], logits[n_sketch:]
    loss = 0.5 * (F.binary_cross_entropy_with_logits(ls, torch.full_like(ls, smoothing / 2))
                  + F.binary_cross_entropy_with_logits(lp, torch.full_like(lp, 1 - smoothing / 2)))
    acc = 0.5 * ((ls.detach() < 0).float().mean() + (lp.detach() > 0).float().mean())
    return loss, acc


def hardest_negative_triplet(s: torch.Tensor, p: torch.Tensor, labels: torch.Tensor, margin: float) -> torch.Tensor:
    """Triplet loss of sketches s (B, D) against photos p (B, D), photo i of sketch i's class: for anchor i,
    positive p_i and negative the closest photo of another class in the batch (batch-hard, Hermans et al.
    2017). max(0, margin + |s_i - p_i| - |s_i - p_n|), mean over the anchors that have a negative."""
    d = torch.cdist(s, p)                                    # (B, B)
    other = labels[:, None] != labels[None, :]               # (B, B) photo j is of another class
    d_neg = d.masked_fill(~other, float("inf")).min(dim=1).values  # (B,) inf where there is no negative
    # relu(-inf) = 0: an anchor without a negative adds nothing. No boolean indexing, so the host never
    # waits for the device here.
    return F.relu(margin + d.diagonal() - d_neg).sum() / other.any(dim=1).sum().clamp(min=1)


class Pairs(NamedTuple):
    """A batch of B sketch-domain images and B photos, images (B, 3, H, W), photo i of sketch i's class."""
    sketch: torch.Tensor
    photo: torch.Tensor
    labels: torch.Tensor  # (B,) seen-class indices


class Triplets(NamedTuple):
    """A batch of B (sketch, positive photo of its class, negative photo of another class), images (B, 3, H, W)."""
    sketch: torch.Tensor
    positive: torch.Tensor
    negative: torch.Tensor
    labels: torch.Tensor | None = None      # (B,) the sketches' (and positives') seen classes
    neg_labels: torch.Tensor | None = None  # (B,) the negatives' seen classes


class Quadruplets(NamedTuple):
    """ZSE-SBIR's batch of B (sketch, another sketch of its class, photo of its class, photo of another class),
    images (B, 3, H, W): (sketch, positive) is a matching pair, (other_sketch, negative) a non-matching one."""
    sketch: torch.Tensor
    other_sketch: torch.Tensor
    positive: torch.Tensor
    negative: torch.Tensor
    labels: torch.Tensor | None = None      # (B,) the sketches' (and positives') seen classes
    neg_labels: torch.Tensor | None = None  # (B,) the negatives' seen classes


def sbir_losses(model: ZSSBIRModel, batch: Pairs | Triplets, lambd: float, margin: float,
                smoothing: float = 0.0) -> dict:
    """The losses of a named batch: Pairs (B sketches, B photos) or Triplets (B sketches, 2B photos).

    triplet: Pairs: hardest_negative_triplet (sketch i, photo i, the closest photo of another class);
             Triplets: max(0, margin + |s - p| - |s - n|) on unit embeddings, mean over the batch.
    domain:  domain_loss of the domain classifier through the gradient reversal layer, over the sketches and
             all the photos (the two domains weighted equally), reading what ``model.domain_input`` says: the unit
             embeddings (B, D) or the trunk features (B, F).
    class:   normalised-softmax loss (cross-entropy of cosine / T logits over one proxy per seen class, shared
             by the domains), only with class proxies and labels. Pairs: the mean of the sketch and the photo
             terms; Triplets: over all 3B embeddings.
    Also returns the domain classifier's accuracy and mean |logit|.
    """
    b = batch.sketch.shape[0]
    photos = batch.photo if isinstance(batch, Pairs) else torch.cat([batch.positive, batch.negative])
    s, p, fs, fp = model.embed_pair(batch.sketch, photos)  # (B, D), (P, D), (B, F), (P, F); P = B or 2B
    out = {}
    if hasattr(model, "class_proxies") and batch.labels is not None:
        out["class"] = class_loss(model.class_proxies, s, p, batch)
    if isinstance(batch, Pairs):
        out["triplet"] = hardest_negative_triplet(s, p, batch.labels, margin)
    else:
        out["triplet"] = F.triplet_margin_loss(s, p[:b], p[b:], margin=margin)
    reads = torch.cat([s, p]) if model.domain_input == "embedding" else at_least_float32(torch.cat([fs, fp]))
    logits = at_least_float32(model.domain_classifier(reads, lambd))  # (B + P,)
    out["domain"], out["domain_acc"] = domain_loss(logits, b, smoothing)
    out["domain_logit"] = logits.detach().abs().mean()  # how sure the classifier is (saturation shows here)
    return out


def class_loss(proxies: ClassProxies, s: torch.Tensor, p: torch.Tensor, batch: Pairs | Triplets) -> torch.Tensor:
    """sbir_losses' normalised-softmax term of sketch embeddings s (B, D) and photo embeddings p (B or 2B, D)."""
    if isinstance(batch, Pairs):
        return 0.5 * (F.cross_entropy(at_least_float32(proxies(s)), batch.labels)
                      + F.cross_entropy(at_least_float32(proxies(p)), batch.labels))
    logits = at_least_float32(proxies(torch.cat([s, p])))  # (3B, C)
    return F.cross_entropy(logits, torch.cat([batch.labels, batch.labels, batch.neg_labels]))
