"""The code's shape (docs/testing.md): every function of the top-level scripts and modules fits on a screen and
takes few enough parameters to read at a call, and the README stays a page a newcomer reads through."""
import ast
import glob
import os

from conftest import ROOT

MAX_LINES = 59  # from `def` to the function's last line, docstring included
MAX_PARAMETERS = 8  # positional, keyword-only, *args and **kwargs; self and cls not counted
README_LINES = 250


def functions():
    for path in sorted(glob.glob(os.path.join(ROOT, "*.py"))):
        with open(path, encoding="utf-8") as f:
            tree = ast.parse(f.read())
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                a = node.args
                params = [*a.posonlyargs, *a.args, *a.kwonlyargs, *filter(None, (a.vararg, a.kwarg))]
                if params and params[0].arg in ("self", "cls"):
                    params = params[1:]
                yield f"{os.path.basename(path)}:{node.name}", node.end_lineno - node.lineno + 1, len(params)


def test_no_function_is_long_or_takes_many_parameters():
    found = list(functions())
    assert len(found) > 300  # the walk found the code
    long = [(name, n) for name, n, _ in found if n > MAX_LINES]
    many = [(name, k) for name, _, k in found if k > MAX_PARAMETERS]
    assert not long, f"functions of more than {MAX_LINES} lines: {long}"
    assert not many, f"functions of more than {MAX_PARAMETERS} parameters: {many}"


def test_the_readme_is_one_page():
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        lines = f.read().splitlines()
    assert len(lines) <= README_LINES, f"README.md has {len(lines)} lines"
