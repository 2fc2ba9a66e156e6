"""train.py --weights reads the weights files users have without running anything in them (utils.load_weights_file):
OpenAI's CLIP .pt (a TorchScript archive), open_clip's .bin and .safetensors, torchvision's .pth. Each format is made
here from a tiny network and must give that network's state dict bit for bit; a wrong file is one error line, and
a hostile one is one line too, while the marker file its payload would create never appears."""
import math
import os
import pickle
import shlex
import subprocess
import sys
import warnings
import zipfile
from collections import OrderedDict

import pytest
import torch
import torchvision
from torch import nn

import train
import utils
from conftest import run_main
from model import ZSSBIRModel
from test_train import TINY, assert_one_line_error
from test_user_files import Payload, Shell

WIDTH = 64  # open_clip's reader of OpenAI's weights counts one attention head per 64 channels


class ResidualAttentionBlock(nn.Module):
    """OpenAI's CLIP block in small, under its names; attn_mask is a plain attribute there, not a buffer."""

    def __init__(self, attn_mask: torch.Tensor | None = None):
        super().__init__()
        self.attn = nn.MultiheadAttention(WIDTH, 1)
        self.ln_1 = nn.LayerNorm(WIDTH)
        self.mlp = nn.Sequential(OrderedDict([("c_fc", nn.Linear(WIDTH, 4 * WIDTH)), ("gelu", nn.GELU()),
                                              ("c_proj", nn.Linear(4 * WIDTH, WIDTH))]))
        self.ln_2 = nn.LayerNorm(WIDTH)
        self.attn_mask = attn_mask

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (L, B, W)
        h = self.ln_1(x)
        x = x + self.attn(h, h, h, need_weights=False, attn_mask=self.attn_mask)[0]
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    def __init__(self, attn_mask: torch.Tensor | None = None):
        super().__init__()
        self.resblocks = nn.Sequential(ResidualAttentionBlock(attn_mask))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.resblocks(x)


class VisionTransformer(nn.Module):
    """OpenAI's image encoder in small: 8 px images, 4 px patches (a 2 x 2 grid), one block."""

    def __init__(self, embed_dim: int):
        super().__init__()
        self.conv1 = nn.Conv2d(3, WIDTH, 4, 4, bias=False)
        self.class_embedding = nn.Parameter(torch.randn(WIDTH))
        self.positional_embedding = nn.Parameter(torch.randn(1 + 2 * 2, WIDTH))
        self.ln_pre = nn.LayerNorm(WIDTH)
        self.transformer = Transformer()
        self.ln_post = nn.LayerNorm(WIDTH)
        self.proj = nn.Parameter(torch.randn(WIDTH, embed_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, 3, 8, 8)
        x = self.conv1(x).flatten(2).transpose(1, 2)  # (B, 4, W)
        cls = self.class_embedding + torch.zeros(x.shape[0], 1, x.shape[-1])  # (B, 1, W)
        x = torch.cat([cls, x], dim=1) + self.positional_embedding  # (B, 5, W)
        x = self.transformer(self.ln_pre(x).transpose(0, 1)).transpose(0, 1)  # (B, 5, W)
        return self.ln_post(x[:, 0]) @ self.proj  # (B, E)


class TinyClip(nn.Module):
    """OpenAI's CLIP model in small, under its names, with the three int buffers its TorchScript archives hold."""

    def __init__(self, embed_dim: int = 16, context: int = 3, vocab: int = 10):
        super().__init__()
        self.visual = VisionTransformer(embed_dim)
        self.transformer = Transformer(torch.full((context, context), -math.inf).triu(1))
        self.token_embedding = nn.Embedding(vocab, WIDTH)
        self.positional_embedding = nn.Parameter(torch.randn(context, WIDTH))
        self.ln_final = nn.LayerNorm(WIDTH)
        self.text_projection = nn.Parameter(torch.randn(WIDTH, embed_dim))
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
        for name, value in (("input_resolution", 8), ("context_length", context), ("vocab_size", vocab)):
            self.register_buffer(name, torch.tensor(value))

    def forward(self, image: torch.Tensor, text: torch.Tensor) -> torch.Tensor:  # (B, 3, 8, 8), (B, context)
        x = self.token_embedding(text) + self.positional_embedding  # (B, context, W)
        x = self.ln_final(self.transformer(x.transpose(0, 1)).transpose(0, 1))
        t = x[torch.arange(x.shape[0]), text.argmax(dim=-1)] @ self.text_projection  # (B, E)
        return self.logit_scale.exp() * self.visual(image) @ t.t()  # (B, B)


def torchscript(kind: str) -> tuple[torch.jit.ScriptModule, dict]:
    """A TinyClip as TorchScript: traced in float32, or scripted with OpenAI's mix of dtypes (the image encoder's
    weights in float16, as in OpenAI's files); with the state dict of the network it was made from."""
    torch.manual_seed(0)
    net = TinyClip().eval()
    with warnings.catch_warnings():  # torch.jit is deprecated, and tracing warns about attention's shape checks
        warnings.simplefilter("ignore")
        if kind == "trace":
            return torch.jit.trace(net, (torch.randn(2, 3, 8, 8), torch.randint(0, 10, (2, 3)))), net.state_dict()
        net.visual.half()
        return torch.jit.script(net), net.state_dict()


def assert_same_weights(got: dict, expected: dict) -> None:
    """The same names (safetensors keeps them sorted), and each tensor of the same dtype, shape and bits."""
    assert sorted(got) == sorted(expected)
    for name, t in expected.items():
        assert got[name].dtype == t.dtype and got[name].shape == t.shape, name
        assert torch.equal(got[name].contiguous().reshape(-1).view(torch.uint8),
                           t.contiguous().reshape(-1).view(torch.uint8)), name


@pytest.mark.parametrize("kind", ["trace", "script"])
def test_a_torchscript_archive_gives_its_networks_state_dict_bit_for_bit(tmp_path, kind):
    module, expected = torchscript(kind)
    path = str(tmp_path / "ViT-tiny.pt")
    module.save(path)
    state = utils.load_weights_file(path, "HINT")
    assert_same_weights(state, expected)
    assert list(state) == list(expected)  # in nn.Module.state_dict's order too
    # the names OpenAI's files use; a scripted block keeps attn_mask as an attribute, which is no weight
    assert {"visual.conv1.weight", "visual.class_embedding", "visual.proj", "logit_scale", "vocab_size",
            "visual.transformer.resblocks.0.attn.in_proj_weight", "transformer.resblocks.0.mlp.c_fc.bias"} <= set(state)
    assert not any("attn_mask" in name for name in state)
    assert state["visual.conv1.weight"].dtype == (torch.float16 if kind == "script" else torch.float32)
    # what clip.load(jit=False) and open_clip build their models from: torch.jit.load (run here on our own file)
    assert_same_weights(state, torch.jit.load(path).state_dict())


def test_the_names_are_those_open_clip_reads_openai_weights_by(tmp_path):
    """open_clip's own reader of OpenAI's state dicts (after torch.jit.load) builds its CLIP from what the tiny
    archive gives, loading it strictly; it drops the three int buffers first, and casts weights to float16."""
    open_clip_model = pytest.importorskip("open_clip.model")
    module, expected = torchscript("trace")
    module.save(str(tmp_path / "ViT-tiny.pt"))
    state = utils.load_weights_file(str(tmp_path / "ViT-tiny.pt"), "HINT")
    loaded = open_clip_model.build_model_from_openai_state_dict(dict(state)).state_dict()
    assert set(state) - set(loaded) == {"input_resolution", "context_length", "vocab_size"}
    for name in set(state) & set(loaded):
        assert torch.equal(loaded[name], state[name].to(loaded[name].dtype)), name


def write_zip(path, entries: dict) -> None:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
        for name, raw in entries.items():
            z.writestr(name, raw)


def zip_entries(path) -> dict:
    with zipfile.ZipFile(path) as z:
        return {name: z.read(name) for name in z.namelist()}


def text(s: str) -> bytes:
    """pickle's BINUNICODE: a string of ``s``."""
    return b"X" + len(s.encode()).to_bytes(4, "little") + s.encode()


def ints(*values: int) -> bytes:
    """pickle's tuple of BININTs."""
    return b"(" + b"".join(b"J" + v.to_bytes(4, "little", signed=True) for v in values) + b"t"


def handmade_archive(path, key: str = "0", offset: int = 1, tail: bytes = b"") -> None:
    """A TorchScript archive written byte by byte: module class __torch__.M declares one parameter, "weight", a
    (2, 2) float32 view (strides (1, 2), from ``offset``) of storage ``key`` of the 6 floats 0..5; ``tail`` is
    pickle opcodes run on the tensor before it is stored."""
    tensor = (b"ctorch._utils\n_rebuild_tensor_v2\n(" + b"(" + text("storage") + b"ctorch\nFloatStorage\n" + text(key)
              + text("cpu") + b"J" + (6).to_bytes(4, "little") + b"tQ" + b"J" + offset.to_bytes(4, "little")
              + ints(2, 2) + ints(1, 2) + b"\x89ccollections\nOrderedDict\n)RtR" + tail)
    data_pkl = b"\x80\x02c__torch__\nM\n)\x81}" + text("weight") + tensor + b"sb."  # M(), {"weight": tensor}, BUILD
    code = 'class M(Module):\n  __parameters__ = ["weight", ]\n  __buffers__ = []\n  weight : Tensor\n'
    write_zip(path, {"m/data.pkl": data_pkl, "m/code/__torch__.py": code.encode(), "m/version": b"3\n",
                     "m/data/0": torch.arange(6.0).numpy().tobytes()})


def flip_stored_byte(path, entry: str) -> None:
    """Flip a byte of an entry's data in place, its CRC left as it was (rewriting the zip would recompute it)."""
    with zipfile.ZipFile(path) as z:
        info = z.getinfo(entry)
    with open(path, "r+b") as f:
        f.seek(info.header_offset + 26)
        name_len, extra_len = (int.from_bytes(f.read(2), "little") for _ in range(2))
        f.seek(info.header_offset + 30 + name_len + extra_len)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0x10]))


def write_hostile_files(folder, marker: str, archive: str) -> dict:
    """name -> path of files whose unpickling creates ``marker`` (through exec, or os.system): the TorchScript
    ``archive`` with its data.pkl replaced, a torch.save'd dict and a bare pickle."""
    paths = {}
    for kind, payload in (("exec", Payload(f"import pathlib; pathlib.Path({marker!r}).write_text('code ran')")),
                          ("system", Shell(f"touch '{marker}'"))):
        paths.update({f"hostile_{kind}.{ext}": os.path.join(folder, f"hostile_{kind}.{ext}")
                      for ext in ("pt", "pth", "bin")})
        entries = zip_entries(archive)
        data_pkl = next(name for name in entries if name.endswith("/data.pkl"))
        write_zip(paths[f"hostile_{kind}.pt"], {**entries, data_pkl: pickle.dumps(payload, protocol=2)})
        torch.save({"weight": payload}, paths[f"hostile_{kind}.pth"])
        with open(paths[f"hostile_{kind}.bin"], "wb") as f:
            f.write(pickle.dumps(payload, protocol=2))
    return paths


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """name -> path of every file of the table below, and the state dicts they hold."""
    root = tmp_path_factory.mktemp("weights_files")
    from safetensors.torch import save_file

    module, clip = torchscript("trace")
    torch.manual_seed(0)
    vision = torchvision.models.squeezenet1_1()  # the smallest torchvision classifier: 1.2M weights
    paths = {name: str(root / name) for name in [
        "openai_clip.pt", "open_clip_model.safetensors", "open_clip_pytorch_model.bin", "under_state_dict.bin",
        "under_model.pth", "squeezenet1_1.pth", "squeezenet1_1_legacy.pth", "safetensors_named.bin",
        "handmade_archive.pt", "notes.txt", "empty.pth", "truncated_archive.pt", "truncated.safetensors",
        "bad_header.safetensors", "flipped_storage.pt", "tensor_outside_storage.pt", "missing_storage.pt",
        "state_given_to_a_tensor.pt", "whole_model.pth", "a_list.pth", "empty_state_dict.pth"]}
    module.save(paths["openai_clip.pt"])
    save_file(clip, paths["open_clip_model.safetensors"])
    save_file(clip, paths["safetensors_named.bin"])
    torch.save(clip, paths["open_clip_pytorch_model.bin"])
    torch.save({"state_dict": clip, "epoch": 3}, paths["under_state_dict.bin"])
    torch.save({"model": clip, "args": {"lr": 0.1}}, paths["under_model.pth"])
    torch.save(vision.state_dict(), paths["squeezenet1_1.pth"])
    torch.save(vision.state_dict(), paths["squeezenet1_1_legacy.pth"], _use_new_zipfile_serialization=False)
    handmade_archive(paths["handmade_archive.pt"])
    handmade_archive(paths["tensor_outside_storage.pt"], offset=3)  # its last element would be the 7th of 6
    handmade_archive(paths["missing_storage.pt"], key="7")
    handmade_archive(paths["state_given_to_a_tensor.pt"], tail=b"}b")  # BUILD on the tensor: Tensor.__setstate__
    with open(paths["notes.txt"], "w") as f:
        f.write("the weights are on the lab's server\n" * 20)
    open(paths["empty.pth"], "wb").close()
    with open(paths["openai_clip.pt"], "rb") as f:
        archive = f.read()
    with open(paths["truncated_archive.pt"], "wb") as f:
        f.write(archive[:len(archive) // 2])
    with open(paths["open_clip_model.safetensors"], "rb") as f:
        safetensors = f.read()
    with open(paths["truncated.safetensors"], "wb") as f:
        f.write(safetensors[:-100])
    with open(paths["bad_header.safetensors"], "wb") as f:
        f.write((40).to_bytes(8, "little") + b"{this is not json at all" + b" " * 16 + safetensors[48:])
    module.save(paths["flipped_storage.pt"])
    flip_stored_byte(paths["flipped_storage.pt"], "flipped_storage/data/3")
    torch.save(TinyClip(), paths["whole_model.pth"])
    torch.save([torch.ones(2)], paths["a_list.pth"])
    torch.save({}, paths["empty_state_dict.pth"])

    marker = str(root / "CODE_RAN")
    paths.update(write_hostile_files(root, marker, paths["openai_clip.pt"]))
    handmade = {"weight": torch.tensor([[1.0, 3.0], [2.0, 4.0]])}
    return {"paths": paths, "marker": marker, "clip": clip, "vision": vision.state_dict(), "handmade": handmade}


# file -> the state dict it holds (files' key), or fragments of its one error line
LOADS = {"openai_clip.pt": "clip", "open_clip_model.safetensors": "clip", "open_clip_pytorch_model.bin": "clip",
         "under_state_dict.bin": "clip", "under_model.pth": "clip", "safetensors_named.bin": "clip",
         "squeezenet1_1.pth": "vision", "squeezenet1_1_legacy.pth": "vision", "handmade_archive.pt": "handmade"}
CONVERT = "weights_only=False).state_dict()"  # a piece of utils.WEIGHTS_CONVERT, the conversion command
FAILS = {
    "notes.txt": ["is not a readable weights file", "HINT"],
    "empty.pth": ["is not a readable weights file", "HINT"],
    "truncated_archive.pt": ["is not a readable weights file", "HINT"],
    "truncated.safetensors": ["is not a readable safetensors file", "HINT"],
    "bad_header.safetensors": ["is not a readable safetensors file", "HINT"],
    "flipped_storage.pt": ["TorchScript archive this reader cannot read (BadZipFile: Bad CRC-32", "HINT", CONVERT],
    "tensor_outside_storage.pt": ["cannot read (ValueError: a tensor outside its storage", "HINT"],
    "missing_storage.pt": ["cannot read (KeyError", "m/data/7", "HINT"],
    "state_given_to_a_tensor.pt": ["cannot read (UnpicklingError: data.pkl gives a tensor a state", "HINT"],
    "whole_model.pth": ["holds a pickled test_weights_files.TinyClip", "nothing in it ran", CONVERT],
    "a_list.pth": ["holds no state dict", "HINT"],
    "empty_state_dict.pth": ["holds no state dict", "HINT"],
    "hostile_exec.pt": ["TorchScript archive whose data.pkl asks for __builtin__.exec", "nothing in it ran", CONVERT],
    "hostile_system.pt": ["TorchScript archive whose data.pkl asks for posix.system", "nothing in it ran", CONVERT],
    "hostile_exec.pth": ["holds a pickled exec,", "nothing in it ran", CONVERT],
    "hostile_system.pth": ["holds a pickled posix.system", "nothing in it ran", CONVERT],
    "hostile_exec.bin": ["holds a pickled exec,", "nothing in it ran", CONVERT],
    "hostile_system.bin": ["holds a pickled posix.system", "nothing in it ran", CONVERT],
}


@pytest.mark.parametrize("name", list(LOADS))
def test_every_format_loads_as_the_state_dict_it_was_made_from(files, name):
    assert_same_weights(utils.load_weights_file(files["paths"][name], "HINT"), files[LOADS[name]])


@pytest.mark.skipif(os.name != "posix", reason="os.system pickles as posix.system")
@pytest.mark.parametrize("name", list(FAILS))
def test_every_wrong_or_hostile_file_is_one_line_and_nothing_in_it_runs(files, name):
    with pytest.raises(utils.UserError) as caught:
        utils.load_weights_file(files["paths"][name], "HINT")
    message = str(caught.value)
    assert "\n" not in message and message.startswith(files["paths"][name])
    for fragment in FAILS[name]:
        assert fragment in message, message
    assert not os.path.exists(files["marker"])


def test_the_hostile_files_payloads_do_run_code_when_unpickled_the_unsafe_way(files, tmp_path):
    """The hostile files' payloads are live: unpickled the unsafe way (here, on a marker of this test's own),
    each creates its marker; load_weights_file refuses the same files and the marker stays absent."""
    proof = str(tmp_path / "proof")
    for name, path in write_hostile_files(tmp_path, proof, files["paths"]["openai_clip.pt"]).items():
        with pytest.raises(utils.UserError, match="nothing in it ran"):
            utils.load_weights_file(path, "HINT")
        assert not os.path.exists(proof), name
        if name.endswith(".pt"):
            with zipfile.ZipFile(path) as z:
                pickle.loads(z.read("openai_clip/data.pkl"))
        elif name.endswith(".bin"):
            with open(path, "rb") as f:
                pickle.load(f)
        else:
            torch.load(path, weights_only=False)
        assert os.path.exists(proof), name
        os.remove(proof)


def test_missing_files_and_folders_are_one_line(tmp_path):
    for path, fragment in ((str(tmp_path / "nothing.pt"), "not found"), (str(tmp_path), "is a folder")):
        with pytest.raises(utils.UserError, match=f"weights file {path} {fragment}; HINT$"):
            utils.load_weights_file(path, "HINT")


def test_the_documented_conversion_command_turns_an_archive_into_a_state_dict(files, tmp_path):
    """utils.WEIGHTS_CONVERT, run as written on a file this test made (it runs the archive's code: trusted here)."""
    out = str(tmp_path / "weights.pth")
    argv = [{"python": sys.executable, "FILE": files["paths"]["openai_clip.pt"], "weights.pth": out}.get(a, a)
            for a in shlex.split(utils.WEIGHTS_CONVERT)]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert_same_weights(utils.load_weights_file(out, "HINT"), files["clip"])


def test_train_starts_from_a_torchscript_archive_and_refuses_a_hostile_one_in_one_line(files, tiny_data, tmp_path):
    torch.manual_seed(0)
    net = torchvision.models.mobilenet_v3_small()
    path = str(tmp_path / "mobilenet.pt")
    torch.jit.script(net).save(path)
    model = ZSSBIRModel("mobilenet_v3_small", 16, pretrained=train.start_weights(path))
    assert torch.equal(model.sketch_encoder.trunk[0][0][0].weight, net.features[0][0].weight)
    common = [*TINY, "--data_dir", tiny_data, "--epochs", "1"]
    proc = run_main("train.py", *common, "--checkpoint_dir", str(tmp_path / "c"), "--weights", path)
    assert proc.returncode == 0, proc.stderr
    assert utils.load_checkpoint(str(tmp_path / "c" / "last.pth"))["model"]["weights"] == "file"
    proc = run_main("train.py", *common, "--checkpoint_dir", str(tmp_path / "d"), "--weights",
                    files["paths"]["hostile_system.pt"])
    assert_one_line_error(proc, "asks for posix.system", "nothing in it ran")
    assert not os.path.exists(files["marker"]) and not os.path.exists(tmp_path / "d")
