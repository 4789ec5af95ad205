"""No function of the installed package runs over MAX_LINES lines.

The package is what pyproject.toml's package-dir installs (fastgpt/ and kernels/), less
benchmarks/, the standalone experiment scripts. A function's length is its source from the `def`
line to its last line (decorators not counted; a nested function counts in its parent's length and
on its own). Every file is parsed, never imported.

Exempt, by name in EXEMPT with the reason: Triton kernels (@triton.jit) that read best as one GPU
program. Today that is `_attn_bwd_dkdv` in kernels/flash_attention_bwd.py: its signature alone is
nine lines (the tutorial's one role per line: tensors, each tensor's strides, sizes, constexprs),
and its body is the program of one key block in order (offsets, the k and v tiles, the loop over
the query heads that share them, the store), its inner loop already a @triton.jit function of its
own. Cutting it further would hand the offsets, strides and tiles through another dozen-argument
signature: longer to read, not shorter. An entry must stay a @triton.jit function over the limit:
the second test fails for one that no longer needs its place.
"""

from __future__ import annotations

import ast
from pathlib import Path

from test_import_graph import REPO, package_dirs

MAX_LINES = 60
NOT_CHECKED = ("fastgpt.benchmarks",)  # standalone scripts, not the library
EXEMPT = {
    "kernels/flash_attention_bwd.py::_attn_bwd_dkdv": "a Triton kernel: one GPU program (see the docstring)",
}


def functions() -> dict[str, tuple[int, ast.FunctionDef | ast.AsyncFunctionDef]]:
    """{"path::name": (length in lines, its node)} for every function of the checked packages;
    a method's name carries its class ("path::Class.method")."""
    found = {}
    for package, root in package_dirs().items():
        if package in NOT_CHECKED:
            continue
        for path in sorted(root.rglob("*.py")):
            if "__pycache__" in path.parts:
                continue
            tree = ast.parse(path.read_text(), filename=str(path))
            found.update(_functions_in(tree, path.relative_to(REPO).as_posix()))
    return found


def _functions_in(tree: ast.AST, where: str, prefix: str = "") -> dict:
    found = {}
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            found[f"{where}::{prefix}{node.name}"] = (node.end_lineno - node.lineno + 1, node)
            found.update(_functions_in(node, where, f"{prefix}{node.name}."))
        elif isinstance(node, ast.ClassDef):
            found.update(_functions_in(node, where, f"{prefix}{node.name}."))
        else:
            found.update(_functions_in(node, where, prefix))
    return found


def is_triton_kernel(node: ast.FunctionDef | ast.AsyncFunctionDef) -> bool:
    """Decorated with triton.jit, bare or called (`@triton.jit(do_not_specialize=...)`)."""
    for decorator in node.decorator_list:
        target = decorator.func if isinstance(decorator, ast.Call) else decorator
        if ast.unparse(target) == "triton.jit":
            return True
    return False


def test_no_function_is_longer_than_the_limit():
    too_long = sorted((length, name) for name, (length, _) in functions().items()
                      if length > MAX_LINES and name not in EXEMPT)
    assert not too_long, (f"{len(too_long)} function(s) over {MAX_LINES} lines; split each into named parts:\n"
                          + "\n".join(f"  {length:4d}  {name}" for length, name in reversed(too_long)))


def test_every_exemption_is_a_triton_kernel_that_still_needs_it():
    found = functions()
    for name, why in EXEMPT.items():
        assert name in found, f"{name} is exempt ({why}) but no longer exists: drop it from EXEMPT"
        length, node = found[name]
        assert is_triton_kernel(node), f"{name} is exempt but is not a @triton.jit kernel: only kernels may be"
        assert length > MAX_LINES, f"{name} is {length} lines, within the limit: drop it from EXEMPT"


def test_the_walk_finds_methods_nested_functions_and_kernels():
    found = functions()
    assert "fastgpt/run/trainer.py::Trainer.step" in found
    assert "kernels/flash_attention_bwd.py::_attn_bwd_dkdv" in found
    assert not any(name.startswith("benchmarks/") for name in found)
    assert Path(REPO / "fastgpt/cli").is_dir() and any(name.startswith("fastgpt/cli/") for name in found)
