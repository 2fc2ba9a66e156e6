"""Shared test fixtures: the repository on sys.path, a tiny on-disk SBIR dataset, a command-line runner,
the float64 reordering bound, and the gpu marker."""
import contextlib
import functools
import io
import os
import sys
import traceback
import warnings
from types import ModuleType, SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def make_tiny_dataset(root: str, seen=("tri", "square", "pent", "hexa"), unseen=("circle", "star"),
                      per_class: int = 6, size: int = 32, seed: int = 0) -> str:
    """Write a tiny dataset in the project layout: outline sketches and filled photos of shapes."""
    rng = np.random.default_rng(seed)
    sides = {"tri": 3, "square": 4, "pent": 5, "hexa": 6, "circle": 24, "star": 10}
    for ci, c in enumerate(list(seen) + list(unseen)):
        k = sides.get(c, 3 + ci)
        for domain in ("sketches", "photos"):
            folder = os.path.join(root, domain, c)
            os.makedirs(folder, exist_ok=True)
            for i in range(per_class):
                im = Image.new("RGB", (size, size), "white")
                draw = ImageDraw.Draw(im)
                phase = rng.random()
                radii = [0.35 * size * (0.5 if (c == "star" and j % 2) else 1.0) for j in range(k)]
                angles = [2 * np.pi * (j / k + phase) for j in range(k)]
                pts = [(size / 2 + r * np.cos(a), size / 2 + r * np.sin(a)) for a, r in zip(angles, radii)]
                if domain == "sketches":
                    draw.polygon(pts, outline="black", width=2)
                else:
                    draw.polygon(pts, fill=tuple(int(v) for v in rng.integers(0, 200, 3)))
                im.save(os.path.join(folder, f"{c}_{i}.png"))
    with open(os.path.join(root, "train_labels.txt"), "w") as f:
        f.write("\n".join(seen) + "\n")
    with open(os.path.join(root, "test_labels.txt"), "w") as f:
        f.write("\n".join(unseen) + "\n")
    return root


@functools.cache
def script_code(script: str):
    """A script's compiled code, compiled once per test session (the suite runs the scripts thousands of times)."""
    path = os.path.join(ROOT, script)
    with open(path, "rb") as f:
        return compile(f.read(), path, "exec")


def run_main(script: str, *argv: str) -> SimpleNamespace:
    """Run ``python SCRIPT ARGV...`` in this process: the script's __main__ block (argument parsing, one
    line per user error, the exit code) with its own stdout and stderr. Like a subprocess, without
    importing torch again (seconds a call); anything that escapes it is a traceback with code 1."""
    stdout, stderr, code = io.StringIO(), io.StringIO(), 0
    main = ModuleType("__main__")
    main.__file__ = os.path.join(ROOT, script)
    saved_argv, saved_main, sys.argv, sys.modules["__main__"] = sys.argv, sys.modules["__main__"], [script, *argv], main
    try:
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr), \
                warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("default")  # shown once per place, as a fresh interpreter shows them
            try:
                exec(script_code(script), main.__dict__)
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
            except BaseException:  # noqa: BLE001 - reported like an uncaught exception in a subprocess
                traceback.print_exc()
                code = 1
    finally:
        sys.argv, sys.modules["__main__"] = saved_argv, saved_main
    for w in caught:  # on stderr, as a subprocess would print them
        stderr.write(warnings.formatwarning(w.message, w.category, w.filename, w.lineno, w.line))
    return SimpleNamespace(returncode=code, stdout=stdout.getvalue(), stderr=stderr.getvalue())


U64 = 2.0 ** -53  # float64's unit roundoff
# float32's unit roundoff: a float32 dot product of D terms, summed in any order, is within about D U32 of the
# exact one relative to the sum of its terms' magnitudes (Higham 2002, section 3.1), so two orders (two BLAS
# kernels) differ by at most about 2 D U32 for unit vectors
U32 = 2.0 ** -24


def reordering_rtol(model, longest_sum: int) -> float:
    """Relative difference allowed between two float64 runs of one network that sum in other orders.

    Another split of the batch, another memory layout or another device computes the same sums
    (convolutions, batch means, gradient reductions) in another order. A sum of K terms in any order
    is within (K - 1) u of the exact one, relative to the sum of the terms' magnitudes (Higham,
    "Accuracy and Stability of Numerical Algorithms", 2002, section 4.2), and a value passes through
    at most one such sum per layer, so two computations agree to 2 L K u: L layers with weights, K
    the longest sum, the longer of a weight's fan-in and ``longest_sum`` (a weight gradient sums over
    every image and pixel of the batch)."""
    layers = [m for m in model.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    longest = max(longest_sum, max(m.weight[0].numel() for m in layers))
    return 2 * len(layers) * longest * U64


@pytest.fixture
def tiny_data(tmp_path):
    return make_tiny_dataset(str(tmp_path / "data"))


def pytest_configure(config):
    # One torch thread in the test process. The suite's tensors are tiny (32 px, batches of 4), where a second
    # thread adds synchronisation and spin-waiting, not speed: on 2 cores the suite took 131 s and 208 CPU-seconds
    # with two threads, 134 s and 136 CPU-seconds with one. On a slow or shared machine the CPU-seconds are the
    # time; on a many-core one, dozens of threads on tiny tensors are slower still.
    torch.set_num_threads(1)
    config.addinivalue_line("markers", "gpu: needs CUDA; runs wherever torch.cuda.is_available(), skipped elsewhere")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (marker gpu)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
