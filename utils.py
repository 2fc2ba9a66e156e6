"""What train.py and evaluate.py share: errors, seeding, devices, processes, run banner, checkpoints, logs.

    utils.seed_everything(0)
    utils.save_checkpoint(ckpt, "ckpt/last.pth")     # atomic: temp file + os.replace
    ckpt = utils.load_checkpoint("ckpt/last.pth")    # map_location="cpu", clear errors
"""
import argparse
import ast
import dataclasses
import hashlib
import io
import json
import math
import os
import pickle
import random
import re
import shutil
import subprocess
import sys
import tempfile
import warnings
import zipfile

import numpy as np
import torch
import torch.distributed as dist
import torchvision

import methods
from model import MODEL_FORMAT, ModelConfig, ModelConfigError, backbone_stats, is_int


class UserError(Exception):
    """A mistake in the user's input; printed as one line, without a traceback."""


def run_cli(main, parser, user_errors: tuple = ()) -> None:
    """Parse arguments and run ``main(args)``; user errors print one line and exit with 2."""
    args = parser.parse_args()
    try:
        main(args)
    except (UserError, *user_errors) as e:
        if int(os.environ.get("RANK", "0")) == 0:  # under torchrun every process meets the same error: say it once
            print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)


# ----------------------------------------------------------------------------------- setup

def seed_everything(seed: int) -> None:
    """Seed Python's, numpy's and torch's generators (all devices)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def seed_worker(worker_id: int) -> None:
    """DataLoader worker_init_fn: derive numpy's and random's seeds from torch's worker seed."""
    s = torch.initial_seed() % 2**32
    np.random.seed(s)
    random.seed(s)


def get_device(name: str) -> torch.device:
    """'auto' picks CUDA when present, else CPU; an explicit CUDA device must exist."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"unknown device {name!r}; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {name} asked for CUDA but no GPU is visible; use --device cpu")
    return device


def amp_dtype(device: torch.device, amp: bool) -> torch.dtype | None:
    """The autocast dtype of --amp: bfloat16 on GPUs that support it, else float16 (which needs a
    GradScaler); None (full precision) when --amp is off or on the CPU."""
    if not amp or device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


# ----------------------------------------------------------------------------------- processes

def init_distributed(device_name: str) -> tuple[int, int, torch.device]:
    """(rank, world size, device) of this process. Under torchrun (WORLD_SIZE > 1) join the process
    group: NCCL with one GPU per process (cuda:LOCAL_RANK) on CUDA, gloo on the CPU; ranks other than
    0 then print nothing on stdout. A plain `python script.py` is rank 0 of 1 and joins nothing."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    device = get_device(device_name)
    if world == 1:
        return 0, 1, device
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        per_node = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        if per_node > torch.cuda.device_count():  # every process checks, so rank 0 reports it
            raise UserError(f"{per_node} processes per node but {torch.cuda.device_count()} GPU(s) visible; "
                            "start at most one process per GPU (torchrun --nproc_per_node), or pass --device cpu")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                            device_id=device if device.type == "cuda" else None)
    global _CPU_GROUP
    _CPU_GROUP = dist.new_group(backend="gloo") if device.type == "cuda" else None  # for cpu_ranks_sum
    if rank != 0:
        sys.stdout = open(os.devnull, "w")  # one copy of the logs; errors still reach stderr
    return rank, world, device


def common_parser(batch_size: int | None, batch_help: str) -> argparse.ArgumentParser:
    """The flags every script shares, as a parent parser (``parents=[...]``): --batch_size (each script gives
    its default and meaning), --workers, --device and --amp."""
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--batch_size", type=int, default=batch_size, help=batch_help)
    p.add_argument("--workers", type=int, default=-1, help="data loader processes (-1: the CPUs this process may "
                                                           "use, divided among torchrun's processes)")
    p.add_argument("--device", type=str, default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--amp", action=argparse.BooleanOptionalAction, default=True,
                   help="mixed precision on CUDA: bfloat16 where the GPU supports it, else float16 (with a "
                        "GradScaler when training); ignored on the CPU")
    return p


def resolve_workers(workers: int) -> int:
    """--workers as a number of processes: -1 becomes this process's share of the CPUs it may use."""
    if workers < -1:
        raise UserError(f"--workers must be -1 (all CPUs) or at least 0, got {workers}")
    return max(1, available_cpus() // rank_and_world()[1]) if workers == -1 else workers


def available_cpus() -> int:
    """The CPUs this process may run on (its affinity mask, where the OS has one)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def rank_and_world() -> tuple[int, int]:
    """This process's rank and the number of processes (0, 1 outside torchrun)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def all_ranks_sum(values: torch.Tensor) -> torch.Tensor:
    """Sum a float tensor over all processes (itself when alone)."""
    if rank_and_world()[1] == 1:
        return values
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    summed = values.detach().to(device, torch.float64).clone()
    dist.all_reduce(summed)
    return summed.to(values.device)


_CPU_GROUP = None  # a gloo group beside NCCL's, set by init_distributed


def cpu_ranks_sum(values: torch.Tensor) -> torch.Tensor:
    """Sum a CPU tensor over all processes through gloo, which never waits for a GPU (itself when alone)."""
    if rank_and_world()[1] == 1:
        return values
    summed = values.clone()
    dist.all_reduce(summed, group=_CPU_GROUP)
    return summed


def all_gather_objects(obj) -> list:
    """Every process's ``obj`` (picklable), in rank order ([obj] when alone)."""
    world = rank_and_world()[1]
    if world == 1:
        return [obj]
    out = [None] * world
    dist.all_gather_object(out, obj)
    return out


def flops_text(flops: float) -> str:
    """A FLOP count for people: 3 significant digits in GFLOP to EFLOP, or whole FLOPs below a GFLOP."""
    for unit, scale in (("EFLOP", 1e18), ("PFLOP", 1e15), ("TFLOP", 1e12), ("GFLOP", 1e9)):
        if flops >= scale:
            return f"{flops / scale:.3g} {unit}"
    return f"{flops:,.0f} FLOP"


def git_commit() -> str:
    """The repository's current commit (with '+dirty' when modified), or 'unknown'."""
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        out = subprocess.run(["git", "describe", "--always", "--dirty=+dirty", "--abbrev=12"], cwd=here,
                             capture_output=True, text=True, timeout=5)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def print_banner(script: str, args) -> dict:
    """Print the arguments, commit and library versions; return them as a dict."""
    info = {"script": script, "commit": git_commit(), "torch": torch.__version__,
            "torchvision": torchvision.__version__, "args": vars(args)}
    print(f"{script} | commit {info['commit']} | torch {info['torch']} | torchvision {info['torchvision']}")
    print("args: " + " ".join(f"{k}={v}" for k, v in vars(args).items()))
    return info


def ensure_dir(path: str, what: str) -> None:
    """Create an output folder, or say clearly why it cannot be."""
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create {what} {path} ({e.strerror}); choose another folder") from None
    if not os.access(path, os.W_OK):
        raise UserError(f"{what} {path} is not writable; choose another folder")


# ----------------------------------------------------------------------------------- checkpoints

def atomic_write(path: str, write) -> None:
    """Call ``write(file_object)`` on a temp file beside ``path``, then rename it into place,
    so a crash or a full disk never leaves a truncated file where a good one was."""
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=folder)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600 files; give the usual permissions
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def save_checkpoint(ckpt: dict, path: str) -> None:
    """torch.save a checkpoint dict atomically."""
    atomic_write(path, lambda f: torch.save(ckpt, f))


def atomic_link(src: str, path: str) -> None:
    """Make ``path`` hold what ``src`` holds, atomically: a hard link to src's file (its bytes are on the disk
    once; atomic_write gives src a new file later and leaves path's as it is), or a copy where the file system
    has no hard links."""
    tmp = os.path.join(os.path.dirname(os.path.abspath(path)), f".{os.path.basename(path)}.{os.getpid()}.link.tmp")
    try:
        os.link(src, tmp)
        os.replace(tmp, path)
    except OSError:
        if os.path.lexists(tmp):
            os.remove(tmp)
        with open(src, "rb") as source:
            atomic_write(path, lambda f: shutil.copyfileobj(source, f))


def check_user_path(path: str, what: str, hint: str) -> None:
    """A file the user named must be a file: a missing one or a folder is one UserError ending in ``hint``."""
    if not os.path.isfile(path):
        where = "is a folder" if os.path.isdir(path) else "not found"
        raise UserError(f"{what} {path} {where}; {hint}")


def load_user_file(path: str, what: str, hint: str, mmap: bool = False, objects_hint: str = ""):
    """torch.load a file the user named (a checkpoint, an embeddings file, a gallery index) onto the CPU.

    The one reader of such files. torch's weights-only unpickler builds tensors, numbers, strings and
    containers of them and refuses everything else, so nothing in the file ever runs. Whatever the
    file holds (random bytes, an empty file, a zip of junk, a hostile pickle), a failure is one
    UserError saying what was expected and ``hint``; the caller then checks the structure it got.
    With ``objects_hint``, a file refused for a pickled object (a whole model, a hostile payload) says
    which one, then ``objects_hint`` instead of ``hint``.
    """
    check_user_path(path, what, hint)
    try:
        with warnings.catch_warnings():  # e.g. "Detected pickle protocol 4": the error line says enough
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as e:  # noqa: BLE001 - arbitrary bytes can raise almost anything (KeyError, struct.error, ...)
        refused = re.search(r"GLOBAL ([\w.]+)", str(e)) if objects_hint else None  # torch names the refused global
        if refused:
            raise UserError(f"{path} holds a pickled {refused.group(1)}, which only running code from the file "
                            f"would build (refused: nothing in it ran); {objects_hint}") from None
        raise UserError(f"{path} is not a readable {what} ({type(e).__name__}); {hint}") from None


# ----------------------------------------------------------------------------------- weights files

# What a user who trusts a file this reader refuses runs once, where they trust it: a state dict in a .pth file.
# torch.load(weights_only=False) runs the file's code; given a TorchScript archive it calls torch.jit.load.
WEIGHTS_CONVERT = ("python -c \"import sys, torch; torch.save(torch.load(sys.argv[1], map_location='cpu', "
                   "weights_only=False).state_dict(), sys.argv[2])\" FILE weights.pth")
WEIGHTS_OBJECTS_HINT = ("if you trust the file, convert it to a state dict once (this runs its code): "
                        f"{WEIGHTS_CONVERT}, then pass weights.pth")


def load_weights_file(path: str, hint: str) -> dict:
    """The state dict (names -> tensors, on the CPU) in a file of weights, read without running anything in it.

    The content, not the name, tells the format:
    - a TorchScript archive (OpenAI's CLIP ``ViT-B-32.pt``, what ``clip.load`` downloads): a zip holding
      FOLDER/data.pkl beside FOLDER/code/. torch.jit.load would run that code; read_torchscript_state reads
      the weights alone, named as ``torch.jit.load(path).state_dict()`` names them (``visual.conv1.weight``);
    - safetensors (open_clip's ``open_clip_model.safetensors``): the header's length in 8 bytes, then its JSON;
    - anything else through torch's weights-only unpickler (load_user_file): open_clip's ``.bin`` and
      torchvision's ``.pth``, bare or under "state_dict" or "model" as training scripts save them.
    A file this cannot read is one UserError ending in ``hint``; one that holds more than weights (a whole
    pickled model, a TorchScript archive of parts this does not read) also names WEIGHTS_CONVERT, the one
    command that turns it into a state dict where the user trusts it. Names are the file's own: mapping
    them onto a network is the caller's work.
    """
    check_user_path(path, "weights file", hint)
    folder = torchscript_folder(path)
    if folder is not None:
        try:
            state = read_torchscript_state(path, folder)
        except _RefusedGlobal as e:
            raise UserError(f"{path} is a TorchScript archive whose data.pkl asks for {e}, which weights never "
                            f"need (refused: nothing in it ran); {WEIGHTS_OBJECTS_HINT}") from None
        except Exception as e:  # noqa: BLE001 - a damaged archive can raise almost anything
            raise UserError(f"{path} is a TorchScript archive this reader cannot read ({_first_line(e)}); {hint}; "
                            f"or {WEIGHTS_OBJECTS_HINT}") from None
    elif looks_like_safetensors(path):
        state = _read_safetensors(path, hint)
    else:
        state = load_user_file(path, "weights file", hint, objects_hint=WEIGHTS_OBJECTS_HINT)
        for key in ("state_dict", "model"):
            if isinstance(state, dict) and isinstance(state.get(key), dict):
                state = state[key]
    if not is_state_dict(state) or not state:
        raise UserError(f"{path} holds no state dict (names -> tensors); {hint}")
    return state


def _first_line(e: Exception) -> str:
    """An exception as a short phrase for an error line: its type and the start of its message's first line."""
    first = (str(e).strip().splitlines() or [""])[0][:160]
    return f"{type(e).__name__}: {first}" if first else type(e).__name__


def looks_like_safetensors(path: str) -> bool:
    """A .safetensors name, or safetensors' layout: the JSON header's length (8 bytes, little-endian), then "{".
    (torch.load itself hands a .safetensors name to safetensors, so the name decides for such files.)"""
    if path.endswith(".safetensors"):
        return True
    with open(path, "rb") as f:
        head = f.read(9)
    return len(head) == 9 and head[8:] == b"{" and 8 + int.from_bytes(head[:8], "little") <= os.path.getsize(path)


def _read_safetensors(path: str, hint: str) -> dict:
    """A safetensors file's tensors: its format is a JSON header and raw bytes, which hold no code to run."""
    try:
        from safetensors.torch import load_file
    except ImportError:
        raise UserError(f"{path} is a safetensors file; reading it needs the safetensors package: pip install "
                        "safetensors (requirements.txt lists it)") from None
    try:
        return load_file(path, device="cpu")
    except Exception as e:  # noqa: BLE001 - a damaged header or a truncated file
        raise UserError(f"{path} is not a readable safetensors file ({_first_line(e)}); {hint}") from None


def torchscript_folder(path: str) -> str | None:
    """The folder ("name/") of a TorchScript archive, a zip holding name/data.pkl beside name/code/; None for
    any other file (torch.save's zips have no code/)."""
    if not zipfile.is_zipfile(path):
        return None
    try:
        with zipfile.ZipFile(path) as z:
            names = z.namelist()
    except Exception:  # noqa: BLE001 - bytes that only look like a zip: the next reader says what is wrong
        return None
    with_code = {n.split("/")[0] for n in names if n.count("/") >= 2 and n.split("/")[1] == "code"}
    pickles = sorted(n[:-len("data.pkl")] for n in names if n.endswith("/data.pkl") and n.count("/") == 1)
    return next((f for f in pickles if f[:-1] in with_code), None)


def _read_entry(archive: zipfile.ZipFile, name: str, limit: int) -> bytes:
    """An archive entry's bytes, when it unpacks to at most ``limit`` bytes (the archive's size: torch stores its
    entries uncompressed), so that a zip bomb fills no memory."""
    size = archive.getinfo(name).file_size
    if size > limit:
        raise ValueError(f"{name} would unpack to {size} bytes, more than the whole file holds")
    return archive.read(name)


class _RefusedGlobal(Exception):
    """data.pkl asked for a function or class that weights never need (a hostile file, or an unusual one)."""


class _ScriptObject:
    """An object of a TorchScript class in data.pkl (a module, mostly): its class's name and the state pickle
    gives it, nothing more. Unpickling makes one subclass per class name."""
    qualname = ""
    state = None

    def __setstate__(self, state):
        self.state = state


class _Storage:
    """One storage of the archive (FOLDER/data/KEY) as a flat tensor of its dtype."""
    __slots__ = ("flat",)

    def __init__(self, flat: torch.Tensor):
        self.flat = flat

    def __setstate__(self, state):
        raise pickle.UnpicklingError("data.pkl gives a storage a state")


class _TensorRef:
    """A tensor as data.pkl describes it (torch._utils._rebuild_tensor_v2's arguments: a storage, an offset, a
    size and strides; requires_grad, hooks and metadata are not weights); tensor() checks it, then views it."""
    __slots__ = ("storage", "offset", "size", "stride")

    def __init__(self, storage, offset, size, stride, *_):
        self.storage, self.offset, self.size, self.stride = storage, offset, size, stride

    def __setstate__(self, state):
        raise pickle.UnpicklingError("data.pkl gives a tensor a state")

    def tensor(self) -> torch.Tensor:
        size, stride, offset = self.size, self.stride, self.offset
        ok = isinstance(self.storage, _Storage) and is_int(offset) and offset >= 0 and isinstance(size, tuple) \
            and isinstance(stride, tuple) and len(size) == len(stride) and all(is_int(n) and n >= 0
                                                                               for n in size + stride)
        last = offset + sum((n - 1) * s for n, s in zip(size, stride)) if ok and all(size) else -1
        if not ok or last >= self.storage.flat.numel():
            raise ValueError(f"a tensor outside its storage (size {size}, stride {stride}, offset {offset})")
        return self.storage.flat.as_strided(size, stride, offset)


_STORAGE_DTYPES = {f"{name}Storage": dtype for name, dtype in (
    ("Float", torch.float32), ("Double", torch.float64), ("Half", torch.float16), ("BFloat16", torch.bfloat16),
    ("Long", torch.int64), ("Int", torch.int32), ("Short", torch.int16), ("Char", torch.int8),
    ("Byte", torch.uint8), ("Bool", torch.bool), ("ComplexFloat", torch.complex64),
    ("ComplexDouble", torch.complex128))}


def _same(value, *_):
    """torch.jit._pickle's list builders and type tags, which only return their first argument."""
    return value


# The globals a TorchScript data.pkl may ask for besides its __torch__ classes, each answered by a harmless stand-in:
# tensors and storages (torch.FloatStorage etc.: their dtype), typed lists, empty hook dicts, devices (as strings).
_SCRIPT_GLOBALS = {("torch._utils", "_rebuild_tensor_v2"): _TensorRef, ("collections", "OrderedDict"): dict,
                   ("torch", "device"): str, ("torch.jit._pickle", "restore_type_tag"): _same,
                   **{("torch.jit._pickle", f"build_{kind}list"): _same
                      for kind in ("int", "tensor", "double", "bool")},
                   **{("torch", name): dtype for name, dtype in _STORAGE_DTYPES.items()}}


class _ScriptUnpickler(pickle.Unpickler):
    """Unpickles a TorchScript archive's data.pkl without running anything from it: find_class answers only
    _SCRIPT_GLOBALS and __torch__.* classes (as _ScriptObject subclasses that record their state), and
    persistent_load reads storages from FOLDER/data/ into tensors after checking their sizes."""

    def __init__(self, archive: zipfile.ZipFile, folder: str, limit: int):
        super().__init__(io.BytesIO(_read_entry(archive, folder + "data.pkl", limit)))
        self.archive, self.folder, self.limit = archive, folder, limit
        self.classes, self.storages = {}, {}

    def find_class(self, module: str, name: str):
        if module == "__torch__" or module.startswith("__torch__."):
            qualname = f"{module}.{name}"
            if qualname not in self.classes:
                self.classes[qualname] = type("ScriptObject", (_ScriptObject,), {"qualname": qualname})
            return self.classes[qualname]
        if (module, name) not in _SCRIPT_GLOBALS:
            raise _RefusedGlobal(f"{module}.{name}"[:120])
        return _SCRIPT_GLOBALS[module, name]

    def persistent_load(self, pid):
        # ("storage", the storage's type (here its dtype), its key under FOLDER/data/, its device, its elements)
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage" and isinstance(pid[1], torch.dtype)
                and isinstance(pid[2], str) and is_int(pid[4]) and pid[4] >= 0):
            raise pickle.UnpicklingError(f"an unknown persistent id {str(pid)[:80]}")
        _, dtype, key, _, numel = pid
        if (key, dtype) not in self.storages:
            info = self.archive.getinfo(f"{self.folder}data/{key}")
            if info.file_size != numel * dtype.itemsize or info.file_size > self.limit:
                raise pickle.UnpicklingError(f"storage {key} holds {info.file_size} bytes, not {numel} {dtype}")
            flat = torch.empty(numel, dtype=dtype)
            with self.archive.open(info) as f:  # its CRC is checked once read to the end
                if f.readinto(flat.view(torch.uint8).numpy()) != info.file_size:
                    raise pickle.UnpicklingError(f"storage {key} is shorter than its {info.file_size} bytes")
            self.storages[key, dtype] = _Storage(flat)
        return self.storages[key, dtype]


def read_torchscript_state(path: str, folder: str) -> dict:
    """The state dict of a TorchScript archive's module tree, as torch.jit.load(path).state_dict() gives it, read
    without running the archive's code: data.pkl through _ScriptUnpickler, and the names of each module class's
    parameters and buffers from the class declarations in code/ (read as text). Each module gives its
    parameters, then its buffers (None ones skipped), then its submodules', under their attribute names."""
    with zipfile.ZipFile(path) as archive:
        limit = os.path.getsize(path)
        order = folder + "byteorder"  # older archives have none: little-endian
        if order in archive.namelist() and _read_entry(archive, order, limit) != b"little":
            raise ValueError("its tensors are big-endian")
        declared = _script_module_tensors(archive, folder, limit)
        root = _ScriptUnpickler(archive, folder, limit).load()
    state = {}

    def visit(module: _ScriptObject, prefix: str, ancestors: frozenset) -> None:
        if not isinstance(module.state, dict):
            raise ValueError(f"{module.qualname} keeps its state as {type(module.state).__name__}, not attributes")
        if id(module) in ancestors:
            raise ValueError(f"{module.qualname} contains itself")
        for name in declared[module.qualname]:
            value = module.state.get(name)
            if value is not None and not isinstance(value, _TensorRef):
                raise ValueError(f"{prefix}{name} is declared a tensor but holds {type(value).__name__}")
            if value is not None:
                state[prefix + name] = value.tensor()
        for name, value in module.state.items():
            if isinstance(value, _ScriptObject) and value.qualname in declared:  # a submodule, not a script object
                visit(value, f"{prefix}{name}.", ancestors | {id(module)})

    if not isinstance(root, _ScriptObject) or root.qualname not in declared:
        raise ValueError("its data.pkl holds no module")
    visit(root, "", frozenset())
    return state


_CLASS_LINE = re.compile(r"class (\w+)\(Module\):")
_TENSORS_LINE = re.compile(r"  (__parameters__|__buffers__) = (\[.*\])")


def _script_module_tensors(archive: zipfile.ZipFile, folder: str, limit: int) -> dict:
    """qualified class name (as data.pkl names it) -> its parameters' names, then its buffers', for each module
    class in the archive's code/, read as text: FOLDER/code/__torch__/a/b.py declares ``class C(Module):``, the
    class __torch__.a.b.C, then ``__parameters__ = ["weight", "bias", ]`` and ``__buffers__ = [...]``."""
    declared = {}
    code = folder + "code/"
    for file in archive.namelist():
        if not (file.startswith(code) and file.endswith(".py")):
            continue
        module, kinds = file[len(code):-len(".py")].replace("/", "."), None
        for line in _read_entry(archive, file, limit).decode("utf-8").splitlines():
            if match := _CLASS_LINE.fullmatch(line):
                kinds = declared.setdefault(f"{module}.{match[1]}", {"__parameters__": [], "__buffers__": []})
            elif line[:1] not in ("", " "):  # another top-level statement ends the class
                kinds = None
            elif (match := _TENSORS_LINE.fullmatch(line.rstrip())) and kinds is not None:
                names = ast.literal_eval(match[2])  # a literal list of names; literal_eval evaluates nothing else
                if not is_str_list(names):
                    raise ValueError(f"{file} declares {match[1]} that are not names")
                kinds[match[1]] = names
    return {qualname: kinds["__parameters__"] + kinds["__buffers__"] for qualname, kinds in declared.items()}


# Predicates for checking what load_user_file returned, field by field (and model.is_int).
def is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def is_str_list(v) -> bool:
    return isinstance(v, list) and all(isinstance(x, str) for x in v)


def is_state_dict(v) -> bool:
    return isinstance(v, dict) and all(isinstance(k, str) and isinstance(t, torch.Tensor) for k, t in v.items())


def is_tensor(ndim: int, floating: bool):
    return lambda v: isinstance(v, torch.Tensor) and v.ndim == ndim and v.is_floating_point() == floating


def wrong_fields(obj: dict, required: dict, optional: dict | None = None) -> list:
    """The keys whose value fails its predicate: every key of ``required`` (missing ones too) and the
    keys of ``optional`` that ``obj`` holds."""
    bad = [k for k, ok in required.items() if k not in obj or not ok(obj[k])]
    return bad + [k for k, ok in (optional or {}).items() if k in obj and not ok(obj[k])]


CHECKPOINT_KEYS = ("models", "optimizers", "scaler", "epoch", "step", "args", "best")
CHECKPOINT_HINT = "pass a .pth file written by train.py (e.g. ckpt/best.pth)"


def _is_rng_state(v) -> bool:
    return isinstance(v, dict) and isinstance(v.get("torch"), torch.Tensor) and v["torch"].dtype == torch.uint8 \
        and isinstance(v.get("cuda"), list) and all(isinstance(t, torch.Tensor) and t.dtype == torch.uint8
                                                    for t in v["cuda"])


def load_checkpoint(path: str) -> dict:
    """Load a checkpoint written by train.py onto the CPU and check its structure; anything else is a
    UserError (load_user_file). The network it describes is checked by ModelConfig's own rules. The file is
    mapped, not read: its tensors are read when used (evaluation reads the weights, not the optimizer's state, a
    training checkpoint's larger part), copy-on-write (the file never changes)."""
    ckpt = load_user_file(path, "checkpoint", CHECKPOINT_HINT, mmap=True)
    if not isinstance(ckpt, dict) or any(k not in ckpt for k in CHECKPOINT_KEYS):
        raise UserError(f"{path} is not a checkpoint written by train.py (keys {CHECKPOINT_KEYS} expected)")
    bad = wrong_fields(ckpt, {
        "args": lambda a: isinstance(a, dict), "models": lambda m: isinstance(m, dict) and all(
            isinstance(k, str) and is_state_dict(v) for k, v in m.items()),
        "optimizers": lambda o: isinstance(o, dict), "scaler": lambda s: isinstance(s, dict),
        "epoch": lambda e: is_int(e) and e >= 0, "step": lambda s: is_int(s) and s >= 0, "best": is_number,
    }, {"epoch_step": lambda e: is_int(e) and e >= 0, "world_size": lambda w: is_int(w) and w >= 1,
        "epoch_sums": lambda d: isinstance(d, dict) and all(is_number(v) for v in d.values()),
        "rng_by_rank": lambda r: isinstance(r, list) and all(map(_is_rng_state, r)), "rng": _is_rng_state,
        "classes": is_str_list,  # the seen classes trained on; older checkpoints lack it
        "work": lambda w: isinstance(w, dict) and all(is_int(w.get(k)) and w[k] >= 0
                                                      for k in ("steps", "images", "flops"))})
    if not bad:  # what evaluation reads of the training arguments; format 0 also describes the model there
        bad = ["args." + k for k in wrong_fields(ckpt["args"], {
            "seed": is_int, "val_fraction": lambda f: is_number(f) and 0 <= f < 1,
            **({} if "model" in ckpt else {"pretrained": lambda p: isinstance(p, bool)})},
            {"class_split": lambda c: isinstance(c, str)})]
    if not bad:
        bad = _wrong_model_entry(ckpt["model"], path) if "model" in ckpt else _wrong_model_args(ckpt["args"])
    if bad:
        raise UserError(f"{path} is not a checkpoint written by train.py (wrong {', '.join(bad)}); the file is "
                        f"damaged or from another program; {CHECKPOINT_HINT}")
    return ckpt


def _wrong_model_entry(entry, path: str) -> list:
    """The wrong field of a checkpoint's "model" entry, by ModelConfig's rules (a newer format is a UserError of
    its own)."""
    if not isinstance(entry, dict):
        return ["model"]
    if is_int(entry.get("format")) and entry["format"] > MODEL_FORMAT:
        raise UserError(f"{path} describes its model in format {entry['format']}, newer than this code's "
                        f"({MODEL_FORMAT}); update this code (git pull) to read it")
    try:
        ModelConfig.from_dict(entry)
    except ModelConfigError as e:
        return [f"model.{e.field} ({e.phrase('model.')})"]
    except (ValueError, TypeError) as e:  # another format, an unknown or a missing field
        return [f"model ({e})"]
    return []


def _wrong_model_args(args: dict) -> list:
    """The wrong field of a format 0 checkpoint's arguments where they describe its model, by ModelConfig's rules."""
    try:
        _args_model(args)
    except KeyError as e:
        return [f"args.{e.args[0]}"]
    except ModelConfigError as e:
        return [f"args.{e.field} ({e.phrase('args.')})"]
    return []


def _args_model(a: dict) -> ModelConfig:
    """The network a format 0 checkpoint's training arguments describe, without its channel statistics."""
    return ModelConfig(a["backbone"], a["embedding_dim"], a["image_size"], a.get("shared_trunk", False),
                       a.get("domain_bn", False), a.get("domain_input", "embedding"),
                       "imagenet" if a["pretrained"] else "none")


def checkpoint_model(ckpt: dict) -> ModelConfig:
    """The network a checkpoint (from load_checkpoint) holds: its "model" entry, or for a checkpoint written
    before there was one (format 0) the same description rebuilt from train.py's saved arguments."""
    if "model" in ckpt:
        return ModelConfig.from_dict(ckpt["model"])
    config = _args_model(ckpt["args"])
    mean, std = backbone_stats(config.backbone)
    return dataclasses.replace(config, mean=mean, std=std)


def network_text(cfg: ModelConfig) -> str:
    """A checkpoint's network in a few words: its backbone, with its method when that is not today's model."""
    return cfg.backbone if cfg.method == "sbir" else f"{cfg.method} ({cfg.backbone})"


def validation_text(best) -> str:
    """A checkpoint's "best" as words: its seen-class validation mAP@all, or that it has none (-1: no epoch was
    validated, or trained with --val_fraction 0; NaN in checkpoints written before that was -1)."""
    if is_number(best) and best >= 0:
        return f"best seen-class val mAP@all {best:.4f}"
    return "no seen-class validation (none held out, or no epoch validated yet)"


def model_fingerprint(ckpt: dict) -> str:
    """sha256 of what the model embeds with: its description (the checkpoint's model config) and every weight of
    every network in it. Two checkpoints of one run at different steps differ; a copy or a rename does not."""
    h = hashlib.sha256(json.dumps(checkpoint_model(ckpt).to_dict(), sort_keys=True).encode())
    for net, state in sorted(ckpt["models"].items()):
        hash_tensors(h, state, prefix=net + ".")
    return h.hexdigest()


def hash_tensors(h, state: dict, prefix: str = "") -> None:
    """Feed a state dict to the hash ``h`` (hashlib), in name order: each tensor's name, dtype, shape and bytes."""
    for name, t in sorted(state.items()):
        h.update(f"|{prefix}{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())


def load_model_state(model: torch.nn.Module, ckpt: dict, path: str) -> None:
    """Load the checkpoint's weights into ``model``; a shape or key mismatch is a UserError."""
    try:
        for name, module in model.named_children():
            module.load_state_dict(ckpt["models"][name])
    except (KeyError, RuntimeError, ValueError, TypeError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise UserError(f"the weights in {path} do not fit a {checkpoint_model(ckpt).backbone} model "
                        f"({first}); the checkpoint may be corrupt or from another version") from None


def build_model(ckpt: dict, path: str, trained: bool) -> torch.nn.Module:
    """The checkpoint's network (checkpoint_model): with its trained weights, or as initialised under its
    training seed."""
    seed_everything(ckpt["args"]["seed"])
    config = checkpoint_model(ckpt)
    if trained and config.note():  # e.g. a CLIP model trained with GELU, before QuickGELU: built as it was trained
        print(config.note())
    model = methods.get(config.method).network(config, start=not trained)
    if trained:
        load_model_state(model, ckpt, path)
    return model


# ----------------------------------------------------------------------------------- logs

def _finite_or_none(v):
    """A record's value as strict JSON takes it: a NaN or infinite float becomes None (null)."""
    return None if isinstance(v, float) and not math.isfinite(v) else v


def append_jsonl(path: str, record: dict) -> None:
    """Append one JSON object as a line (the machine-readable training log). Strict JSON: a non-finite number
    is written as null (json.dumps would write NaN, which strict parsers reject)."""
    line = _json_line(record)
    with open(path, "a", encoding="utf-8") as f:
        f.write(line)


def _json_line(record: dict) -> str:
    """One flat record as a strict JSON line (non-finite numbers as null)."""
    return json.dumps({k: _finite_or_none(v) for k, v in record.items()}, allow_nan=False) + "\n"


def rewrite_jsonl(path: str, records: list) -> None:
    """Replace a JSON-lines file by ``records``, atomically."""
    text = "".join(map(_json_line, records))
    atomic_write(path, lambda f: f.write(text.encode("utf-8")))


def read_jsonl(path: str) -> list:
    if not os.path.isfile(path):
        return []
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


GRID_FILE = re.compile(r"grid_\d{2,}_.*\.png")  # the retrieval grids evaluate.py and retrieve.py write


def remove_outputs(folder: str, names: tuple) -> list:
    """Delete what an earlier run of a script wrote in ``folder``: the files ``names`` first (its results), then
    its retrieval grids (GRID_FILE); returns the paths removed. Nothing else in the folder is touched."""
    removed = [os.path.join(folder, n) for n in names if os.path.isfile(os.path.join(folder, n))]
    removed += [os.path.join(folder, n) for n in sorted(os.listdir(folder)) if GRID_FILE.fullmatch(n)]
    for path in removed:
        os.remove(path)
    return removed


def read_json(path: str):
    """A JSON file's content, or None when it is missing or unreadable."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def write_json(path: str, obj) -> None:
    atomic_write(path, lambda f: f.write(json.dumps(obj, indent=2).encode("utf-8")))


def pyplot():
    """matplotlib.pyplot on the file-only Agg backend (imported lazily: only plotting needs it)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def save_figure(fig, path: str, dpi: int = 100) -> None:
    """Write a matplotlib figure as PNG atomically, then close it."""
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=dpi))
    pyplot().close(fig)


def plot_training_curves(records: list, path: str) -> None:
    """PNG of the losses, domain accuracy and lambda (every logged step as a line, epoch means as
    dots at each epoch's last step) and of the per-epoch seen-class validation mAP."""
    plt = pyplot()
    steps = [r for r in records if r.get("kind") == "step"]
    epochs = [r for r in records if r.get("kind") == "epoch"]
    fig, axes = plt.subplots(1, 4, figsize=(16, 3.4))
    panels = [(axes[0], ("triplet", "domain", "class"), "losses"),
              (axes[1], ("domain_acc",), "domain classifier accuracy"), (axes[2], ("lambda",), "GRL lambda")]
    for ax, keys, title in panels:
        for key in keys:
            if not any(key in r for r in steps + epochs):
                continue
            line = ax.plot([r["step"] for r in steps if key in r], [r[key] for r in steps if key in r],
                           lw=1, label=key)[0]
            ax.plot([r["step"] for r in epochs if key in r], [r[key] for r in epochs if key in r], "o",
                    color=line.get_color(), ms=4)
        ax.set_title(title)
        ax.set_xlabel("step")
    axes[0].legend()
    axes[1].axhline(0.5, color="grey", ls="--", lw=0.8)
    validated = [r for r in epochs if r.get("val_map") is not None]  # --val_every skips some epochs
    axes[3].plot([r["epoch"] for r in validated], [r["val_map"] for r in validated], marker="o")
    axes[3].set_title("seen-class validation mAP@all")
    axes[3].set_xlabel("epoch")
    fig.tight_layout()
    save_figure(fig, path, dpi=90)


GRID_TILE, GRID_GAP, GRID_TEXT = 176, 14, 13  # a hit's square (px), the space between squares, the font size


def save_retrieval_grid(query, query_title: str, hits: list, out_path: str, per_row: int = 0) -> None:
    """The one retrieval grid: the query image (PIL) on the left, then its ranked hits, each (photo path, title,
    frame colour or None), in rows of ``per_row`` (0: all in one row), each titled above its square. A photo
    that cannot be read (changed or deleted since it was ranked) shows as "unreadable". Drawn with PIL: a
    matplotlib figure took 0.3 s a grid, a tenth of make demo's evaluation."""
    from PIL import Image, ImageDraw, ImageFont, ImageOps

    from dataset import IMAGE_ERRORS, load_image

    font = ImageFont.load_default(size=GRID_TEXT)
    per_row = per_row or max(1, len(hits))
    n_rows = max(1, -(-len(hits) // per_row))
    title_h = 2 * (GRID_TEXT + 4) + 6  # two lines of text above each square
    cell_w, cell_h = GRID_TILE + GRID_GAP, title_h + GRID_TILE + GRID_GAP
    query_w = GRID_TILE + 4 * GRID_GAP  # the query's column: a gap, its square, three gaps
    grid = Image.new("RGB", (query_w + per_row * cell_w + GRID_GAP, n_rows * cell_h + GRID_GAP), "white")
    draw = ImageDraw.Draw(grid)

    def titled(x: int, y: int, width: int, text: str, colour: str) -> None:  # centred above (x, y + title_h)
        draw.multiline_text((x + width // 2, y + title_h - 6), text, fill=colour, font=font, anchor="md",
                            align="center")

    top = (grid.height - GRID_TILE - title_h) // 2
    titled(GRID_GAP, top, GRID_TILE, query_title, "black")
    grid.paste(ImageOps.contain(query.convert("RGB"), (GRID_TILE, GRID_TILE)), (GRID_GAP, top + title_h))
    for rank, (path, title, colour) in enumerate(hits):
        x, y = query_w + (rank % per_row) * cell_w, GRID_GAP + (rank // per_row) * cell_h
        titled(x, y, GRID_TILE, title, colour or "black")
        box = (x, y + title_h, x + GRID_TILE - 1, y + title_h + GRID_TILE - 1)
        try:
            photo = ImageOps.contain(load_image(path).convert("RGB"), (GRID_TILE, GRID_TILE))
            grid.paste(photo, (x + (GRID_TILE - photo.width) // 2, y + title_h + (GRID_TILE - photo.height) // 2))
        except IMAGE_ERRORS:
            draw.text((x + GRID_TILE // 2, y + title_h + GRID_TILE // 2), "unreadable", fill="black", font=font,
                      anchor="mm")
        if colour:  # the frame: green right, red wrong; none when there is no truth
            draw.rectangle(box, outline=colour, width=5)
    atomic_write(out_path, lambda f: grid.save(f, format="png"))


# ----------------------------------------------------------------------------------- embedding

@torch.no_grad()
def embed_batches(encoder: torch.nn.Module, batches, device: torch.device, amp: bool, desc: str = "embed",
                  show: bool = True):
    """For each batch (images (B, 3, S, S), *rest) yield (embeddings (B, D) on the CPU, *rest): the encoder
    in eval mode, under --amp's autocast; its mode comes back afterwards."""
    from tqdm import tqdm

    dtype = amp_dtype(device, amp)
    was_training = encoder.training
    encoder.eval()
    try:
        for images, *rest in tqdm(batches, desc=desc, leave=False, disable=None if show else True):
            with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
                emb = encoder(images.to(device, non_blocking=True)).float().cpu()  # (B, D)
            yield emb, *rest
    finally:
        encoder.train(was_training)


def image_fit(encoder) -> str:
    """How an encoder takes its images made square (dataset.FITS): "resize", as most do, or what its ``image_fit``
    says (model.PromptedView pads them, ZSE-SBIR's sketch encoder crops them to the strokes)."""
    return getattr(encoder, "image_fit", "resize")


def embed_images(encoder: torch.nn.Module, paths: list, image_size: int, batch_size: int, workers: int,
                 device: torch.device, amp: bool, desc: str = "embed") -> torch.Tensor:
    """Embed images batch by batch; only the embeddings (N, D) are kept, on the CPU. Under torchrun
    each process embeds every world-th image, and every process gets all N rows back in order."""
    from dataset import ImageFilesDataset

    rank, world = rank_and_world()
    mine = paths[rank::world]
    loader = torch.utils.data.DataLoader(
        ImageFilesDataset(mine, image_size, upright=False, tolerant=False, fit=image_fit(encoder)),
        batch_size=batch_size, shuffle=False,
        num_workers=workers, pin_memory=device.type == "cuda", worker_init_fn=seed_worker)
    out = [emb for emb, _ in embed_batches(encoder, loader, device, amp, desc, show=rank == 0)]
    emb = torch.cat(out) if out else torch.empty(0, 0)
    if world == 1:
        return emb
    parts = all_gather_objects(emb)  # rank r holds rows r, r + world, r + 2 world, ...
    full = torch.empty(len(paths), max(part.shape[1] for part in parts))
    for r, part in enumerate(parts):
        if len(part):
            full[r::world] = part
    return full
