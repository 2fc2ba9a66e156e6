"""CLIP's image encoder (--backbone clip_vit_b_32 / clip_vit_b_16) against OpenAI's own definition of it.

No CLIP weights reach the test machines, so both networks get the same random ones: OpenAI's CLIP (clip/model.py
of the openai-clip package, OpenAI's file, which needs only torch) is built with a seed, and the project's encoder
(model.build_trunk, through open_clip) loads them, from a file under open_clip's "openai" tag as it would load the
published weights, or as a state dict. Both run in float64 on one batch; their embeddings agree within what float64
arithmetic allows (reordering_atol) when the encoder is the network OpenAI trained, QuickGELU in its MLPs included.
With torch's GELU (what this project built before) they differ by about 1e-3 of the embedding.

The networks are small (width 128, 2 layers of 2 heads, 8-pixel patches, 32 px), except one that checks ViT-B/32's
own shapes at 64 px."""
import importlib.metadata
import importlib.util
import logging
import warnings

import pytest
import torch

import model as M
from conftest import U64

open_clip = pytest.importorskip("open_clip", reason="open_clip is not installed (requirements.txt installs it)")

# OpenAI's CLIP(...) arguments for the small network: the image tower (embed_dim, image_resolution, vision_layers,
# vision_width, vision_patch_size; heads = vision_width // 64, as open_clip's head_width 64 gives) and a text tower
# as small as it goes, which only has to exist for the whole model's weights to load.
SMALL = dict(embed_dim=32, image_resolution=32, vision_layers=2, vision_width=128, vision_patch_size=8)
TEXT = dict(context_length=8, vocab_size=64, transformer_width=64, transformer_heads=1, transformer_layers=1)
MISMATCH = "QuickGELU mismatch"  # open_clip's warning for a GELU model given weights trained with QuickGELU
PUBLISHED = True  # build_trunk from the published ("openai") weights, which the small_clip fixture serves


def openai_clip_module():
    """OpenAI's clip/model.py as a module, loaded as a file: the clip package's __init__ imports pkg_resources,
    which today's setuptools no longer ships."""
    try:
        path = importlib.metadata.distribution("openai-clip").locate_file("clip/model.py")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("openai-clip is not installed (requirements.txt installs it)")
    spec = importlib.util.spec_from_file_location("openai_clip_model", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def openai_clip(seed: int, gelu: bool = False, **vision) -> torch.nn.Module:
    """OpenAI's CLIP with random weights, in float64. Its initialisation leaves the layer norms at 1 and 0 and the
    attention biases at 0, where a weight loaded into the wrong place would go unseen: every image-tower weight gets
    seeded noise on top. OpenAI's LayerNorm subclass computes in float32 and casts back (for fp16 weights), which
    float64 weights do not fit: its modules run as torch's LayerNorm, its base class, which is what it computes.
    ``gelu`` puts torch's GELU where OpenAI has QuickGELU, for the networks this project built before."""
    clip_model = openai_clip_module()
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        ref = clip_model.CLIP(**vision, **TEXT)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in ref.visual.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    for m in ref.modules():
        if isinstance(m, clip_model.LayerNorm):
            m.__class__ = torch.nn.LayerNorm
        if gelu and isinstance(m, clip_model.ResidualAttentionBlock):
            m.mlp.gelu = torch.nn.GELU()
    return ref.double().eval()


def reordering_atol(width: int, layers: int, patch: int, tokens: int, h: torch.Tensor, proj: torch.Tensor) -> float:
    """The largest difference allowed between two float64 computations of one ViT image embedding h @ proj that
    sum in other orders (other kernels, another memory layout: open_clip's attention takes (B, L, D), OpenAI's
    (L, B, D)).

    A sum of K terms in any order is within (K - 1) u of the exact one, relative to the sum of its terms'
    magnitudes (Higham 2002, section 4.2), and layer norm, a residual add and a linear map carry a relative error
    through to first order, so two computations agree to 2 S K u relative to the last sum's magnitudes
    max_j sum_i |h_i| |proj_ij|: K the longest sum (a patch's 3 p^2 pixels, the MLP's 4 D hidden units, the L
    tokens attention averages), S the sums on a value's path: the patch convolution, the class and position
    embeddings, ln_pre's mean and variance (4); per layer ln_1 (2), the q/k/v projection, q.k, softmax's
    denominator, the weighted values, the output projection, the residual, ln_2 (2), c_fc, c_proj and the
    residual (13); ln_post (2) and proj (1)."""
    sums = 4 + 13 * layers + 3
    longest = max(3 * patch ** 2, 4 * width, tokens)
    return 2 * sums * longest * U64 * (h.abs() @ proj.abs()).max().item()


def compare(trunk: torch.nn.Module, ref: torch.nn.Module, size: int) -> tuple[float, float]:
    """(largest |difference|, reordering_atol) of the two image embeddings of one float64 batch of 3 images."""
    x = torch.randn(3, 3, size, size, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    seen = {}
    hook = ref.visual.ln_post.register_forward_hook(lambda m, i, out: seen.update(h=out))
    with torch.no_grad():
        ours, theirs = trunk.double().eval()(x), ref.visual(x)  # (3, E) each
    hook.remove()
    v = ref.visual
    tokens = (size // v.conv1.kernel_size[0]) ** 2 + 1
    atol = reordering_atol(v.conv1.out_channels, len(v.transformer.resblocks), v.conv1.kernel_size[0], tokens,
                           seen["h"], v.proj)
    assert ours.shape == theirs.shape
    return (ours - theirs).abs().max().item(), atol


@pytest.fixture
def small_clip(monkeypatch, tmp_path):
    """open_clip builds the small network for model.build_trunk's CLIP backbones, and its "openai" tag loads the
    weights of OpenAI's CLIP (seed 0) from a file, as it loads the published ones after their download. Returns
    OpenAI's CLIP that wrote the file and a function of ``gelu`` that builds it again (the same weights)."""
    weights = str(tmp_path / "openai.pt")
    torch.save(openai_clip(0, **SMALL).float().state_dict(), weights)
    real_create_model = open_clip.create_model

    def create_model(model_name, pretrained=None, force_image_size=224, **kwargs):
        assert model_name.startswith("ViT-B-32") and force_image_size == SMALL["image_resolution"]
        return real_create_model(model_name, pretrained=pretrained, force_image_size=force_image_size,
                                 embed_dim=SMALL["embed_dim"],
                                 vision_cfg=dict(layers=SMALL["vision_layers"], width=SMALL["vision_width"],
                                                 head_width=64, patch_size=SMALL["vision_patch_size"],
                                                 image_size=force_image_size),
                                 text_cfg=dict(context_length=TEXT["context_length"], vocab_size=TEXT["vocab_size"],
                                               width=TEXT["transformer_width"], heads=TEXT["transformer_heads"],
                                               layers=TEXT["transformer_layers"]),
                                 **kwargs)
    monkeypatch.setattr(open_clip, "create_model", create_model)
    monkeypatch.setattr(open_clip.factory, "download_pretrained", lambda cfg, cache_dir=None: weights)
    return lambda gelu=False: openai_clip(0, gelu, **SMALL)


def test_clip_embeds_as_openais_clip_with_openais_weights(small_clip):
    """--backbone clip_vit_b_32 with --pretrained: the network OpenAI trained, QuickGELU included, and no warning
    from open_clip that the weights and the network disagree."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trunk, width = M.build_trunk("clip_vit_b_32", PUBLISHED, image_size=SMALL["image_resolution"])
    diff, atol = compare(trunk, small_clip(), SMALL["image_resolution"])
    assert diff <= atol, f"the embeddings differ by {diff:.3g}, more than float64's {atol:.3g}"
    assert not [w for w in caught if MISMATCH in str(w.message)]


def test_a_clip_model_trained_with_gelu_is_built_as_it_was_trained(small_clip):
    """activation "gelu" (checkpoints written before QuickGELU) builds torch's GELU: OpenAI's network with GELU
    in its MLPs, and not OpenAI's own. open_clip's warning that the "openai" weights expect QuickGELU shows."""
    with pytest.warns(UserWarning, match=MISMATCH):
        trunk, _ = M.build_trunk("clip_vit_b_32", PUBLISHED, image_size=SMALL["image_resolution"],
                                 activation="gelu")
    diff, atol = compare(trunk, small_clip(gelu=True), SMALL["image_resolution"])
    assert diff <= atol, f"the embeddings differ by {diff:.3g}, more than float64's {atol:.3g}"
    diff, atol = compare(trunk, small_clip(), SMALL["image_resolution"])
    assert diff > 1000 * atol  # GELU is not QuickGELU: far outside the rounding


def test_clip_vit_b_32_has_openais_shapes_and_keys():
    """The full ViT-B/32 image tower, at 64 px (2 x 2 patches) to stay fast: OpenAI's CLIP(512, 64, 12, 768, 32,
    ...) has the same weights under the same names (its "visual." ones) as the project's clip_vit_b_32 trunk,
    which embeds as it does, with QuickGELU in each of its 12 MLPs."""
    ref = openai_clip(0, embed_dim=512, image_resolution=64, vision_layers=12, vision_width=768, vision_patch_size=32)
    trunk, width = M.build_trunk("clip_vit_b_32", pretrained=False, image_size=64)
    trunk.load_state_dict(ref.visual.state_dict())  # strict: the same names and shapes, nothing left over
    diff, atol = compare(trunk, ref, 64)
    assert diff <= atol, f"the embeddings differ by {diff:.3g}, more than float64's {atol:.3g}"
    assert width == 512 and sum(isinstance(m, open_clip.transformer.QuickGELU) for m in trunk.modules()) == 12


def test_only_open_clips_random_initialisation_message_is_silenced(small_clip, caplog, monkeypatch):
    """open_clip logs (on the root logger) that a model it built without weights is random, as every trunk is
    before its weights load: that message is dropped while model.build_trunk runs; any other warning shows, and
    after the call the same message shows too."""
    real_create_model = open_clip.create_model

    def create_model(*args, **kwargs):
        logging.warning("another open_clip warning")
        return real_create_model(*args, **kwargs)
    monkeypatch.setattr(open_clip, "create_model", create_model)
    random_init = "No pretrained weights loaded for model 'ViT-B-32-quickgelu'. Model initialized randomly."
    with caplog.at_level(logging.WARNING):
        M.build_trunk("clip_vit_b_32", pretrained=False, image_size=SMALL["image_resolution"])
        assert [r.getMessage() for r in caplog.records] == ["another open_clip warning"]
        logging.warning(random_init)
    assert [r.getMessage() for r in caplog.records] == ["another open_clip warning", random_init]
