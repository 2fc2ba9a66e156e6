"""The methods train.py trains: each one class, the one place where the method is defined.

    method = methods.get(args.method)                       # or methods.get(model_config.method)
    model = method.network(config, num_classes)              # the network a checkpoint's ModelConfig describes
    optimizer = method.optimizer(model, args)                # which parameters train, in which groups, at which rates
    lr = method.lr_at(progress, args)                        # its learning-rate schedule, progress in [0, 1]
    out = method.losses(model, batch, lambd, args)           # {"loss": what to minimise, its terms, ...}
    s, p = model.sketch_encoder(sketches), model.photo_encoder(photos)   # how it embeds for retrieval (B, D)

A method is more than a config of one network (DomainBed's Algorithm is the model for this): its modules beyond
the trunk, what trains at which rate in which optimizer, its losses and schedule, and how it embeds. train.py
stays the loop (data, steps, checkpoints, resume); evaluate.py, retrieve.py and app.py only embed. Each method
keeps its hyperparameters in train.py's flags and its configs/*.yaml.

- "sbir": today's model (ZSSBIRModel: two branches or one shared trunk, a domain classifier behind a gradient
  reversal layer, class proxies). The recipes scratch, finetune and original are configs of it.
- "sketch_lvm": Sain et al., CVPR 2023, as their code at ca33be9 trains it (docs/sketch_lvm.md): learnt prompts
  on CLIP's image tower, Adam in two groups, a triplet loss on 1 - cosine, a constant learning rate.
- "zse_sbir": Lin et al., CVPR 2023, as their code at 88f87f7 trains it (docs/zse_sbir.md): a ViT-B/16 with
  cross-attention between a sketch and a photo and a relation network scoring the pair.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from model import (IMAGENET_STATS, ModelConfig, Pairs, PromptedView, Quadruplets, SketchLVMNet, Triplets,
                   ZSE_SBIR_FITS, ZSESBIRNet, ZSSBIRModel,
                   at_least_float32, backbone_stats, cosine_triplet_loss, freeze_all_but_layer_norms,
                   freeze_as_sketch_lvm, sbir_losses)


def one_cycle_lr(progress: float, warmup: float, base_lr: float) -> float:
    """The learning rate at a point of the schedule, progress in [0, 1] (steps done / all steps, or seconds
    spent / the budget): a linear warm-up from 1% of base_lr over the first ``warmup`` of the schedule,
    then a cosine decay to 1% of it at the end (the shape of a one-cycle schedule).

        lr = base (0.01 + 0.99 p / w)                          p < w
        lr = base (0.01 + 0.99 (1 + cos(pi (p - w) / (1 - w))) / 2)    p >= w
    """
    p = min(max(progress, 0.0), 1.0)
    if p < warmup:
        return base_lr * (0.01 + 0.99 * p / warmup)
    t = (p - warmup) / (1 - warmup) if warmup < 1 else 1.0
    return base_lr * (0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * t)))


class Method:
    """What a method defines; train.py calls nothing else of it. ``optimizer_name`` names its optimizer's state
    in checkpoints; ``augments``: whether training crops and flips its images (dataset.augment);
    ``reverses_gradient``: whether it has a gradient reversal layer, whose lambda the loop schedules and prints;
    ``image_fits``: how its (sketch, photo) images are made square (dataset.FITS: resized, padded, cropped to the
    strokes), as its encoders say (their ``image_fit``); the training store reads them that way."""
    name = ""
    optimizer_name = "adamw"
    augments = True
    reverses_gradient = False
    image_fits = ("resize", "resize")

    def check(self, args) -> str | None:
        """What in the flags this method cannot take, as one line naming the flags (None: nothing)."""
        return None

    def input_stats(self, backbone: str) -> tuple:
        """(mean, std) its encoders normalise [0, 1] images with."""
        return backbone_stats(backbone)

    def network(self, config: ModelConfig, num_classes: int = 0, start: bool | dict = True) -> nn.Module:
        """The network ``config`` describes, with sketch_encoder and photo_encoder; ``start``: the trunk's
        published weights (True), random ones (False), or a state dict of the whole backbone network."""
        raise NotImplementedError

    def param_groups(self, model: nn.Module, args) -> list:
        """What trains: [{"name", "params", "lr_mult"}], each group at lr_mult times the schedule's rate. It may
        stop parameters training (requires_grad); every parameter it returns trains."""
        raise NotImplementedError

    def optimizer(self, model: nn.Module, args) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.param_groups(model, args), lr=args.lr, weight_decay=args.weight_decay)

    def lr_at(self, progress: float, args) -> float:
        """The base learning rate at ``progress`` in [0, 1] of the schedule."""
        return one_cycle_lr(progress, args.warmup, args.lr)

    def losses(self, model: nn.Module, batch: Pairs | Triplets, lambd: float, args) -> dict:
        """The losses of one batch as 0-dim tensors: "loss" (what the optimizer minimises) and its terms, plus any
        figures worth logging. Runs inside the training network's forward (DDP synchronises what runs there)."""
        raise NotImplementedError

    def compiled_parts(self, model: nn.Module, args) -> list:
        """The modules --compile compiles (in place, so that the state dict keeps its names)."""
        return [model]

    def describe(self, args) -> str:
        """The method as train.py's banner says it, after "recipe: NAME: "."""
        return self.name


class SBIR(Method):
    """Today's model (model.ZSSBIRModel): AdamW over everything, the class proxies in their own group at
    --proxy_lr_mult times the rate; the one-cycle schedule; triplet, domain and class losses weighted by
    --triplet_loss_ratio, --domain_loss_ratio and --class_loss_ratio (model.sbir_losses)."""
    name = "sbir"
    reverses_gradient = True

    def check(self, args) -> str | None:
        if args.sampling == "quadruplets":
            return "--sampling quadruplets is ZSE-SBIR's (--method zse_sbir); give pairs or triplets"
        return None

    def network(self, config: ModelConfig, num_classes: int = 0, start: bool | dict = True) -> nn.Module:
        return ZSSBIRModel.from_config(config, num_classes, start_weights=start is not False,
                                       start_state=start if isinstance(start, dict) else None)

    def param_groups(self, model: nn.Module, args) -> list:
        proxies = list(model.class_proxies.parameters()) if hasattr(model, "class_proxies") else []
        others = [p for p in model.parameters() if all(p is not q for q in proxies)]
        return [{"name": "network", "params": others, "lr_mult": 1.0},
                {"name": "class proxies", "params": proxies, "lr_mult": args.proxy_lr_mult}]

    def losses(self, model: nn.Module, batch: Pairs | Triplets, lambd: float, args) -> dict:
        out = sbir_losses(model, batch, lambd, args.margin, args.domain_label_smoothing)
        loss = args.triplet_loss_ratio * out["triplet"] + args.domain_loss_ratio * out["domain"]
        if "class" in out and args.class_loss_ratio:
            loss = loss + args.class_loss_ratio * out["class"]
        return {**out, "loss": loss}

    def compiled_parts(self, model: nn.Module, args) -> list:
        # a shared trunk is called directly (embed_pair) and through both domain views: compile it, not the views
        return [model.encoder] if hasattr(model, "encoder") else [model.sketch_encoder, model.photo_encoder]

    def describe(self, args) -> str:
        return (f"{'one shared trunk' if args.shared_trunk else 'two branches'}"
                f"{' with domain batch norm' if args.domain_bn else ''}, "
                f"{args.sampling}{' + photo edge maps' if args.edge_maps else ''}, losses "
                + ", ".join(f"{k} {getattr(args, k + '_loss_ratio')}" for k in ("class", "triplet", "domain"))
                + f", lr {args.lr}")


# What Sketch_LVM trains in CLIP: "code" as its freeze_all_but_bn leaves it (LayerNorms, attention in-projections,
# class embedding, positions, proj), "paper" as the paper words it (LayerNorms only); the prompts train in both.
SKETCH_LVM_TRAINS = {"code": freeze_as_sketch_lvm, "paper": freeze_all_but_layer_norms}


class SketchLVM(Method):
    """Sketch_LVM (Sain et al., CVPR 2023) as its code at ca33be9 trains it (docs/sketch_lvm.md): CLIP's image tower
    with 3 learnt prompts per domain (model.SketchLVMNet); Adam without weight decay in two groups, CLIP's trainable
    parameters (--sketch_lvm_trains) at --lr (their clip_LN_lr) and the prompts at --prompt_lr; a constant learning
    rate; triplets (sketch, photo of its class, photo of a class drawn uniformly) scored by
    model.cosine_triplet_loss on the raw embeddings; no augmentation; ImageNet's channel statistics."""
    name = "sketch_lvm"
    optimizer_name = "adam"
    augments = False
    image_fits = (PromptedView.image_fit, PromptedView.image_fit)

    def check(self, args) -> str | None:
        if args.sampling != "triplets" or args.edge_maps or args.thicken:
            return "--method sketch_lvm trains on triplets: give --sampling triplets, without --edge_maps or --thicken"
        if args.class_loss_ratio or args.domain_loss_ratio or args.triplet_loss_ratio != 1.0:
            return ("--method sketch_lvm's one loss is its triplet loss: give --triplet_loss_ratio 1 and "
                    "--class_loss_ratio 0 --domain_loss_ratio 0 (configs/sketch_lvm_clip_vit_b32.yaml)")
        if not args.prompt_lr > 0:
            return f"--prompt_lr must be positive, got {args.prompt_lr}"
        return None

    def input_stats(self, backbone: str) -> tuple:
        return IMAGENET_STATS

    def network(self, config: ModelConfig, num_classes: int = 0, start: bool | dict = True) -> nn.Module:
        published = config.weights in ("imagenet", "openai")  # "file" without a state dict: random, as SBIR's
        return SketchLVMNet(config, start if isinstance(start, dict) else start and published)

    def param_groups(self, model: nn.Module, args) -> list:
        SKETCH_LVM_TRAINS[args.sketch_lvm_trains](model.prompted.visual)
        tower = [p for p in model.prompted.visual.parameters() if p.requires_grad]
        return [{"name": "clip", "params": tower, "lr_mult": 1.0},
                {"name": "prompts", "params": [model.prompted.prompts], "lr_mult": args.prompt_lr / args.lr}]

    def optimizer(self, model: nn.Module, args) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.param_groups(model, args), lr=args.lr, weight_decay=args.weight_decay)

    def lr_at(self, progress: float, args) -> float:
        return args.lr

    def losses(self, model: nn.Module, batch: Pairs | Triplets, lambd: float, args) -> dict:
        s = at_least_float32(model.embed(batch.sketch, 0))  # (B, E) raw, as their loss reads them (theirs: float32)
        p = at_least_float32(model.embed(torch.cat([batch.positive, batch.negative]), 1))  # (2B, E)
        b = s.shape[0]
        loss = cosine_triplet_loss(s, p[:b], p[b:], args.margin)
        return {"triplet": loss, "loss": loss}

    def compiled_parts(self, model: nn.Module, args) -> list:
        return [model.prompted]

    def describe(self, args) -> str:
        return (f"Sketch_LVM: prompts on CLIP ({args.sketch_lvm_trains}'s trainable set), Adam, clip lr {args.lr}, "
                f"prompt lr {args.prompt_lr}, triplets, cosine triplet loss margin {args.margin}, constant lr")


class ZSESBIR(Method):
    """ZSE-SBIR (Lin et al., CVPR 2023) as its code at 88f87f7 trains it (docs/zse_sbir.md): model.ZSESBIRNet on
    Quadruplets; 2 x a triplet loss (margin --margin 1.0, Euclidean, on the raw 768-d class tokens after cross-
    attention: the sketch, its photo, the other pair's photo) + 4 x the mean squared error of the relation scores
    against 0.99 (matching pair) and 0.01; AdamW over every parameter at a constant --lr; no augmentation; images
    normalised with mean = std = 0.5."""
    name = "zse_sbir"
    augments = False
    image_fits = ZSE_SBIR_FITS

    def check(self, args) -> str | None:
        if args.sampling != "quadruplets":
            return "--method zse_sbir trains on quadruplets: give --sampling quadruplets"
        if args.pretrained and not args.weights:
            return ("--method zse_sbir starts from the SAM-trained ViT-B/16 its authors use, not torchvision's "
                    "weights: pass it with --weights sam_ViT-B_16.pth (docs/zse_sbir.md), or --no-pretrained")
        if args.class_loss_ratio or args.domain_loss_ratio or args.triplet_loss_ratio != 2.0:
            return ("--method zse_sbir's losses are 2 x its triplet loss + 4 x its relation loss: give "
                    "--triplet_loss_ratio 2 --class_loss_ratio 0 --domain_loss_ratio 0 (configs/zse_sbir_vit_b16.yaml)")
        return None

    def input_stats(self, backbone: str) -> tuple:
        return (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)

    def network(self, config: ModelConfig, num_classes: int = 0, start: bool | dict = True) -> nn.Module:
        return ZSESBIRNet(config, start if isinstance(start, dict) else False)

    def param_groups(self, model: nn.Module, args) -> list:
        return [{"name": "network", "params": list(model.parameters()), "lr_mult": 1.0}]

    def lr_at(self, progress: float, args) -> float:
        return args.lr

    def losses(self, model: nn.Module, batch: Quadruplets, lambd: float, args) -> dict:
        b = batch.sketch.shape[0]
        tokens = model.tokens(torch.cat([batch.sketch, batch.other_sketch, batch.positive, batch.negative]))
        s, p, score = model.pair(tokens[:2 * b], tokens[2 * b:])  # (2B, 768), (2B, 768), (2B,)
        s, p, score = at_least_float32(s), at_least_float32(p), at_least_float32(score)
        triplet = F.triplet_margin_loss(s[:b], p[:b], p[b:], margin=args.margin)
        target = torch.cat([torch.full((b,), 0.99), torch.full((b,), 0.01)]).to(score.device)
        relation = F.mse_loss(score, target)
        return {"triplet": triplet, "relation": relation,
                "loss": args.triplet_loss_ratio * triplet + RELATION_LOSS_WEIGHT * relation}

    def compiled_parts(self, model: nn.Module, args) -> list:
        return [model.vit]

    def describe(self, args) -> str:
        return (f"ZSE-SBIR: ViT-B/16 + cross-attention + relation network, quadruplets, {args.triplet_loss_ratio} x "
                f"triplet (margin {args.margin}) + {RELATION_LOSS_WEIGHT} x relation MSE, AdamW lr {args.lr} "
                f"constant, weight decay {args.weight_decay}")


RELATION_LOSS_WEIGHT = 4.0  # ZSE-SBIR's train.py:56: lossrn = rn_loss(rn_scores, target_rn) * 4

METHODS = {m.name: m for m in (SBIR(), SketchLVM(), ZSESBIR())}


def get(name: str) -> Method:
    """The method called ``name`` (model.METHODS lists them)."""
    return METHODS[name]
