"""Model for zero-shot sketch-based image retrieval: two CNN branches, one embedding space.

    model = ZSSBIRModel("resnet18", embedding_dim=256, pretrained=False)
    s, p = model.sketch_encoder(sketches), model.photo_encoder(photos)   # (B, D) each
    logits = model.domain_classifier(torch.cat([s, p]), lambd=0.5)       # (2B,)

A sketch encoder and a photo encoder (same torchvision backbone, separate weights) map images to
L2-normalised embeddings. A domain classifier reads the embeddings through a gradient reversal
layer (Ganin et al., "Domain-Adversarial Training of Neural Networks", JMLR 2016): it learns to
tell sketches from photos while the reversed gradient pushes both encoders towards embeddings it
cannot tell apart. This module does no I/O and chooses no device.
"""
import math

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
    "mobilenet_v3_small": ("mobilenet_v3_small", "MobileNet_V3_Small_Weights", 576),
    "shufflenet_v2_x1_0": ("shufflenet_v2_x1_0", "ShuffleNet_V2_X1_0_Weights", 1024),
}


class PretrainedWeightsUnavailable(RuntimeError):
    """ImageNet weights were asked for but could not be downloaded or read."""


def backbone_weights(name: str):
    """torchvision's default ImageNet weights enum member for a backbone name."""
    _, weights_name, _ = BACKBONES[name]
    return getattr(torchvision.models, weights_name).DEFAULT


def build_trunk(name: str, pretrained: bool) -> tuple[nn.Module, int]:
    """A backbone without its classifier: images (B, 3, H, W) -> pooled features (B, F)."""
    if name not in BACKBONES:
        raise ValueError(f"unknown backbone {name!r}; choose one of {', '.join(BACKBONES)}")
    builder, _, width = BACKBONES[name]
    weights = backbone_weights(name) if pretrained else None
    try:
        net = torchvision.models.get_model(builder, weights=weights)
    except Exception as e:  # no network, no cached file, corrupt cache
        raise PretrainedWeightsUnavailable(
            f"could not load ImageNet weights for {name} ({type(e).__name__}: {e}); place "
            f"{weights.url.rsplit('/', 1)[-1]} in {torch.hub.get_dir()}/checkpoints/ or pass --no-pretrained"
        ) from None
    if name.startswith("vgg") or name.startswith("mobilenet"):
        trunk = nn.Sequential(net.features, nn.AdaptiveAvgPool2d(1), nn.Flatten())
    elif name.startswith("shufflenet"):
        trunk = nn.Sequential(net.conv1, net.maxpool, net.stage2, net.stage3, net.stage4, net.conv5,
                              nn.AdaptiveAvgPool2d(1), nn.Flatten())
    else:  # resnets: everything up to the global pool, without fc
        trunk = nn.Sequential(*list(net.children())[:-1], nn.Flatten())
    return trunk, width


class Encoder(nn.Module):
    """Backbone trunk + linear projection: images (B, 3, H, W) -> unit-norm embeddings (B, D)."""

    def __init__(self, backbone: str, embedding_dim: int, pretrained: bool):
        super().__init__()
        self.trunk, width = build_trunk(backbone, pretrained)
        self.head = nn.Sequential(nn.Dropout(0.2), nn.Linear(width, embedding_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feats = self.trunk(x)                         # (B, F)
        return F.normalize(at_least_float32(self.head(feats)), dim=1)  # (B, D)


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
    """Gradient reversal, then an MLP: embeddings (B, D) -> domain logits (B,) (photo = 1)."""

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

    With ``num_classes`` > 0 it also holds seen-class proxies for the optional class loss; they
    are created last, so the encoders' initialisation does not depend on them.
    """

    def __init__(self, backbone: str = "vgg16", embedding_dim: int = 512, pretrained: bool = True,
                 num_classes: int = 0):
        super().__init__()
        self.sketch_encoder = Encoder(backbone, embedding_dim, pretrained)
        self.photo_encoder = Encoder(backbone, embedding_dim, pretrained)
        self.domain_classifier = DomainClassifier(embedding_dim)
        if num_classes > 0:
            self.class_proxies = ClassProxies(embedding_dim, num_classes)


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


def sbir_losses(model: ZSSBIRModel, sketch: torch.Tensor, positive: torch.Tensor, negative: torch.Tensor,
                lambd: float, margin: float, labels: torch.Tensor | None = None,
                neg_labels: torch.Tensor | None = None) -> dict:
    """Losses for a batch of (sketch, positive photo, negative photo) triplets, images (B, 3, H, W).

    triplet: max(0, margin + |s - p| - |s - n|) on unit embeddings, mean over the batch.
    domain:  BCE with logits of the domain classifier (sketch = 0, photo = 1), the sketch and the
             photo terms weighted equally although a batch holds twice as many photos.
    class:   (only with class proxies and labels) cross-entropy of the cosine logits of all 3B
             embeddings against their seen classes; sketches and photos share the proxies.
    Also returns the domain classifier's (equally weighted) accuracy.
    """
    b = sketch.shape[0]
    s = model.sketch_encoder(sketch)                               # (B, D)
    photos = model.photo_encoder(torch.cat([positive, negative]))  # (2B, D)
    p, n = photos[:b], photos[b:]
    out = {"triplet": F.triplet_margin_loss(s, p, n, margin=margin)}
    logits = at_least_float32(model.domain_classifier(torch.cat([s, photos]), lambd))  # (3B,)
    ls, lp = logits[:b], logits[b:]
    out["domain"] = 0.5 * (F.binary_cross_entropy_with_logits(ls, torch.zeros_like(ls))
                           + F.binary_cross_entropy_with_logits(lp, torch.ones_like(lp)))
    out["domain_acc"] = 0.5 * ((ls.detach() < 0).float().mean() + (lp.detach() > 0).float().mean())
    if hasattr(model, "class_proxies") and labels is not None:
        class_logits = at_least_float32(model.class_proxies(torch.cat([s, photos])))  # (3B, C)
        out["class"] = F.cross_entropy(class_logits, torch.cat([labels, labels, neg_labels]))
    return out
