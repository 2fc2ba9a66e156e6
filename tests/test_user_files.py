"""Any file at a model, embeddings or index path is safe: one error line, exit 2, nothing written, no code run.

train.py --resume, evaluate.py --model / --embeddings and retrieve.py --model / --index all read the
user's file through utils.load_user_file. Each test here hands one of those five flags every file of a
generated corpus (random bytes, empty and truncated files, zips of junk, bit flips, a torchvision
state_dict, the right keys with wrong values, hostile pickles) and runs the script's command line.
"""
import builtins
import io
import os
import pickle
import random
import shutil
import zipfile

import pytest
import torch
import torchvision

import evaluate
import gallery
import utils
from conftest import make_tiny_dataset, run_main
from test_retrieve import save_tiny_checkpoint
from test_train import TINY

MIN_FILES = 200


class Payload:
    """Unpickling this runs ``source`` (pickle calls exec): what a hostile file would do."""

    def __init__(self, source: str):
        self.source = source

    def __reduce__(self):
        return builtins.exec, (self.source,)


class Shell:
    """Unpickling this runs a shell command through os.system."""

    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


def hostile_files(marker: str) -> dict:
    """name -> bytes of files whose unpickling creates ``marker``: raw pickles of every protocol, and the
    same payloads inside torch's zip format and its legacy format, as a checkpoint's values."""
    payloads = {"exec": Payload(f"import pathlib; pathlib.Path({marker!r}).write_text('code from a file ran')"),
                "system": Shell(f"touch '{marker}'")}
    files = {}
    for name, payload in payloads.items():
        for protocol in range(pickle.HIGHEST_PROTOCOL + 1):
            files[f"hostile_{name}_pickle{protocol}.pth"] = pickle.dumps(payload, protocol=protocol)
        for legacy in (False, True):
            buf = io.BytesIO()
            torch.save({"models": payload, "optimizers": {}, "scaler": {}, "epoch": 0, "step": 0, "args": payload,
                        "best": 0.0}, buf, _use_new_zipfile_serialization=not legacy)
            files[f"hostile_{name}_torch{'_legacy' if legacy else ''}.pth"] = buf.getvalue()
    return files


def torch_bytes(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


WRONG = [None, "text", [], {}, -1, 1.5, True, torch.ones(2)]


def kind(value):
    """A value's kind as the readers check it: numbers are one kind (bool is not a number)."""
    return "number" if isinstance(value, (int, float)) and not isinstance(value, bool) else type(value)


def wrong_values(valid: dict, nested: dict) -> dict:
    """name -> object: ``valid`` with one field at a time replaced by each value of WRONG of another
    kind than the field's (the right keys, wrong values), and by the values that ``nested`` lists
    for the fields of a field holding a dict."""
    files = {}
    for key in valid:
        if key == "format":
            continue
        for i, value in enumerate(WRONG):
            if kind(value) == kind(valid[key]):
                continue
            mutated = dict(valid)
            mutated[key] = value
            files[f"wrong_{key}_{i}.pth"] = mutated
        for sub, bad_values in nested.get(key, {}).items():
            for i, value in enumerate(bad_values):
                mutated = dict(valid)
                mutated[key] = {**valid[key], sub: value}
                files[f"wrong_{key}.{sub}_{i}.pth"] = mutated
    return files


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("user_files")
    rng = random.Random(0)
    data = make_tiny_dataset(str(root / "data"), per_class=2)
    model = save_tiny_checkpoint(str(root / "model.pth"), backbone="mobilenet_v3_small")  # small: read 1,000 times
    ckpt = utils.load_checkpoint(model)
    files = {}

    # bytes that are not a torch file at all
    files["empty.pth"] = b""
    for i in range(40):
        files[f"random_{i}.pth"] = rng.randbytes(rng.choice([1, 7, 64, 500, 4096]))
    for i in range(15):
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w") as z:
            for j in range(rng.randint(1, 4)):
                name = rng.choice(["data.pkl", "archive/data.pkl", "archive/data/0", "version", f"junk{j}"])
                z.writestr(f"{name}{j}", rng.randbytes(rng.randint(0, 300)))
        files[f"zip_of_junk_{i}.pth"] = buf.getvalue()
    files["text.pth"] = b"notes about my experiment\n" * 20

    # damaged real files: a checkpoint, an embeddings file and a gallery index, cut short or with bytes flipped
    embeddings = {"format": evaluate.EMBEDDINGS_FORMAT, "queries": torch.randn(4, 16), "gallery": torch.randn(6, 16),
                  "query_labels": torch.tensor([0, 0, 1, 1]), "gallery_labels": torch.tensor([0, 0, 0, 1, 1, 1]),
                  "query_paths": [f"sketches/c/{i}.png" for i in range(4)],
                  "gallery_paths": [f"photos/c/{i}.png" for i in range(6)], "classes": ["circle", "star"],
                  "split": "test", "data": data, "throughput": 10.0, "class_split": "",
                  "model": {"path": model, "backbone": "mobilenet_v3_small", "embedding_dim": 16, "val_fraction": 0.1}}
    index = {"format": gallery.INDEX_FORMAT, "model": "0" * 64, "root": data, "revision": "r",
             "paths": ["a.png", "b.png"], "sizes": torch.tensor([10, 20]), "mtimes": torch.tensor([1, 2]),
             "embeddings": torch.randn(2, 16), "skipped": {"c.png": [3, 4]}}
    # a checkpoint of train.py's structure with small stand-in weights: the files stay small
    small = {**ckpt, "models": {name: {"weight": torch.zeros(2, 2)} for name in ckpt["models"]}}
    valid = {"checkpoint": torch_bytes(small), "embeddings": torch_bytes(embeddings), "index": torch_bytes(index)}
    for kind, raw in valid.items():
        for i in range(12):
            files[f"truncated_{kind}_{i}.pth"] = raw[:rng.randrange(len(raw))]
        for i in range(12):
            flipped = bytearray(raw)
            for _ in range(rng.choice([1, 8, 64])):
                flipped[rng.randrange(len(flipped))] = rng.randrange(256)
            files[f"flipped_{kind}_{i}.pth"] = bytes(flipped)

    # readable torch files of the wrong kind
    torch.manual_seed(0)
    files["torchvision_state_dict.pth"] = torch_bytes(torchvision.models.mobilenet_v3_small().state_dict())
    files["encoder_state_dict.pth"] = torch_bytes(ckpt["models"]["sketch_encoder"])
    for i, obj in enumerate([torch.ones(3), [1, 2], 7, "checkpoint", None, {"models": {}}]):
        files[f"other_object_{i}.pth"] = torch_bytes(obj)

    # the right keys with wrong values
    shapes = {k: torch.zeros(1) for k in ckpt["models"]["sketch_encoder"]}  # every name, wrong shapes
    mutated = wrong_values(small, {
        "args": {"backbone": ["no_such_net", 3], "embedding_dim": [0, "16", 16.0], "image_size": [8, "32"],
                 "seed": ["0", 0.5], "pretrained": ["yes", 1], "val_fraction": [1.5, "0.1"], "class_split": [3]},
        "models": {"sketch_encoder": ["weights", {"trunk.0.weight": 1}, shapes, {}], "photo_encoder": [None]},
        "optimizers": {"adamw": ["state", {"state": {}, "param_groups": "x"}]}})
    mutated.update(wrong_values(embeddings, {"model": {"backbone": [None], "embedding_dim": ["16"]}}))
    mutated.update(wrong_values(index, {}))
    mutated["wrong_embeddings_shapes.pth"] = {**embeddings, "gallery": torch.randn(6, 8)}
    mutated["wrong_embeddings_labels.pth"] = {**embeddings, "query_labels": torch.tensor([0, 0, 1, 5])}
    mutated["wrong_index_rows.pth"] = {**index, "embeddings": torch.randn(5, 16)}
    for name, obj in mutated.items():
        files[name] = torch_bytes(obj)

    marker = str(root / "CODE_RAN")
    files.update(hostile_files(marker))

    folder = root / "files"
    folder.mkdir()
    for name, raw in files.items():
        (folder / name).write_bytes(raw)
    return {"root": root, "data": data, "model": model, "folder": folder, "names": sorted(files), "marker": marker}


def test_the_corpus_is_large_and_its_hostile_files_really_run_code(corpus, tmp_path):
    assert len(corpus["names"]) >= MIN_FILES
    assert sum(n.startswith("hostile_") for n in corpus["names"]) >= 10
    assert sum(n.startswith("wrong_") for n in corpus["names"]) >= 100
    proof = str(tmp_path / "proof")
    for name, raw in hostile_files(proof).items():
        if "_pickle" in name and "exec" in name:
            pickle.loads(raw)  # the unsafe way, on a marker of this test's own: the payload does run
            assert os.path.exists(proof), name
            os.remove(proof)
    with pytest.raises(pickle.UnpicklingError):  # and torch's weights-only unpickler refuses it
        torch.load(io.BytesIO(hostile_files(proof)["hostile_exec_torch.pth"]), weights_only=True)
    assert not os.path.exists(proof)


# flag -> (script, arguments around the file F); train --resume names another backbone than the corpus model's
# (mobilenet_v3_small, TINY's too), so a readable checkpoint stops at that check, before the data is read
ENTRY_POINTS = {
    "train --resume": ("train.py", ["--data_dir", "{data}", "--checkpoint_dir", "{out}", *TINY, "--backbone",
                                    "resnet18", "--epochs", "1", "--resume", "{file}"]),
    "evaluate --model": ("evaluate.py", ["--model", "{file}", "--data", "{data}", "--workers", "0", "--device", "cpu",
                                         "--output_dir", "{out}"]),
    "evaluate --embeddings": ("evaluate.py", ["--embeddings", "{file}", "--output_dir", "{out}"]),
    "retrieve --model": ("retrieve.py", ["--model", "{file}", "--gallery", "{gallery}", "--query", "{sketch}",
                                         "--output", "{out}", "--workers", "0", "--device", "cpu"]),
    "retrieve --index": ("retrieve.py", ["--model", "{model}", "--gallery", "{gallery}", "--query", "{sketch}",
                                         "--output", "{out}", "--index", "{file}", "--workers", "0",
                                         "--device", "cpu"]),
}


@pytest.mark.parametrize("entry", list(ENTRY_POINTS))
def test_every_file_is_one_error_line_and_nothing_runs_or_is_written(corpus, tmp_path, entry):
    script, template = ENTRY_POINTS[entry]
    out = tmp_path / "out"
    values = {"data": corpus["data"], "out": str(out), "model": corpus["model"],
              "gallery": os.path.join(corpus["data"], "photos"),
              "sketch": os.path.join(corpus["data"], "sketches", "star", "star_0.png")}
    for name in corpus["names"]:
        path = corpus["folder"] / name
        before = path.read_bytes()
        proc = run_main(script, *(a.format(file=path, **values) for a in template))
        assert not os.path.exists(corpus["marker"]), f"{name}: code in the file ran"
        if proc.returncode == 0 and name.startswith("flipped_"):
            # A flip in the zip's padding or in a tensor's values leaves a valid file: then it simply works.
            shutil.rmtree(out, ignore_errors=True)
            path.write_bytes(before)
            continue
        lines = [line for line in proc.stderr.splitlines() if line.strip()]
        assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), (name, proc.stderr)
        assert not out.exists() or not os.listdir(out), f"{name}: {os.listdir(out)} written"
        assert path.read_bytes() == before, f"{name} was changed"
