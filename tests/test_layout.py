"""The package's shape: no module imports one that imports it back (at the top or inside a function), and the
README's layout section names every module."""
import ast
import os

import pytest

from tests.helpers import ROOT

PACKAGES = {"semalign_ds": os.path.join(ROOT, "semalign_ds"), "semalign_ds.kernels": os.path.join(ROOT, "kernels")}


def modules():
    out = {}
    for package, folder in PACKAGES.items():
        for root, _, files in os.walk(folder):
            for name in files:
                if name.endswith(".py"):
                    rel = os.path.relpath(os.path.join(root, name), folder)[:-3].replace(os.sep, ".")
                    mod = package if rel == "__init__" else f"{package}.{rel.removesuffix('.__init__')}"
                    out[mod] = os.path.join(root, name)
    return out


def imports(path, known):
    found = set()
    for node in ast.walk(ast.parse(open(path).read())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            found |= {f"{node.module}.{a.name}" for a in node.names}
    return {m for m in found if m in known}


def test_no_import_cycles():
    known = modules()
    graph = {m: imports(p, known) - {m} for m, p in known.items()}
    # a package's __init__ may import its own modules; they must not import it back
    cycles = []

    def visit(node, path):
        for nxt in graph[node]:
            if nxt in path:
                cycles.append(path[path.index(nxt):] + [nxt])
            elif len(path) < 12:
                visit(nxt, path + [nxt])

    for m in graph:
        visit(m, [m])
    assert not cycles, sorted({" -> ".join(c) for c in cycles})[:10]


def test_the_readme_layout_names_every_module():
    text = open(os.path.join(ROOT, "README.md")).read()
    layout = text[text.index("## Layout"):]
    missing = [m for m, p in modules().items() if m.startswith("semalign_ds.") and not m.startswith("semalign_ds.kernels")
               and os.path.basename(p) != "__init__.py" and f"`{os.path.basename(p)}`" not in layout
               and f"`{m.split('.')[-1]}/`" not in layout]
    assert not missing, missing


# Hides Hugging Face's `kernels` (as on a machine without it, e.g. with transformers < 5.2x): from the shim's search,
# while the import system still finds the folder at the repository's root first, as transformers' find_spec does,
# and its distribution's metadata, which transformers reads before it imports.
HIDE_HF_KERNELS = """
import importlib.machinery, importlib.metadata, os
_find = importlib.machinery.PathFinder.find_spec
def _hidden(name, path=None, target=None):
    if name == "kernels" and path is not None and os.getcwd() not in [os.path.abspath(p or ".") for p in path]:
        return None
    return _find(name, path, target)
importlib.machinery.PathFinder.find_spec = _hidden
_version, _mapping = importlib.metadata.version, importlib.metadata.packages_distributions
def _no_version(name):
    if name == "kernels":
        raise importlib.metadata.PackageNotFoundError(name)
    return _version(name)
importlib.metadata.version = _no_version
importlib.metadata.packages_distributions = lambda: {k: v for k, v in _mapping().items() if k != "kernels"}
"""


@pytest.mark.parametrize("hf_kernels", ["as installed", "absent"])
def test_the_kernels_folder_never_shadows_the_package_of_that_name(hf_kernels):
    """From the repository's root `python -m`/`-c` put the root on sys.path, where kernels/ would be found as a
    top-level `kernels` before Hugging Face's package of that name (which transformers imports). Whether that
    package is installed or not, transformers imports, and kernels/ is never what `import kernels` gives."""
    import subprocess
    import sys
    code = ((HIDE_HF_KERNELS if hf_kernels == "absent" else "") +
            "import os, sys\n"
            "from transformers import LlamaConfig\n"  # transformers' check imports `kernels` if it finds the folder
            "from transformers.utils.import_utils import is_kernels_available\n"
            "import kernels\n"
            "print(is_kernels_available(), kernels.__file__ and os.path.dirname(os.path.abspath(kernels.__file__)))\n"
            "try:\n    import kernels.fisher_quadratic\nexcept ImportError:\n    print('no kernels.fisher_quadratic')\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    available, folder = out.stdout.split("\n")[0].split(" ", 1)
    assert folder != os.path.join(ROOT, "kernels")
    assert "no kernels.fisher_quadratic" in out.stdout  # nothing of kernels/ is reachable as `kernels`
    if hf_kernels == "absent":
        assert (available, folder) == ("False", "None")
    from semalign_ds.kernels import bench  # noqa: F401  (and the folder is still semalign_ds.kernels)
