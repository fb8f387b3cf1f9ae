"""Triton kernels fusing the vocabulary projection with the SemAlign losses (installed as semalign_ds.kernels).

    fisher_quadratic.fused_fisher_quadratic   backend="triton" of semalign_ds.losses.fisher_quadratic_loss
    linear_kl.fused_linear_kl                 backend="triton" of semalign_ds.losses.linear_kl_loss
    bench                                     python -m semalign_ds.kernels.bench --help

Nothing is imported here, so that importing the package needs no Triton. The kernels read the head weight as
given: under ZeRO-3 the caller gathers it first.
"""
if __name__ == "kernels":
    # Imported as a top-level `kernels`: the repository's root is on sys.path (`python -m` or `python -c` run from
    # it), and `kernels` is Hugging Face's package, which transformers imports. Stand aside for it, or, when it is
    # not installed, be an empty folder that transformers takes for absent. (As a namespace folder, without this
    # file, it would not shadow anything, but an editable install cannot map a namespace package into semalign_ds.)
    import importlib.machinery
    import importlib.util
    import os
    import sys
    _root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    _spec = importlib.machinery.PathFinder.find_spec(
        __name__, [p for p in sys.path if os.path.abspath(p or os.curdir) != _root])
    if _spec is None:
        # Not installed. transformers has already found this folder (find_spec) and imports it to read a version;
        # an exception here would break `import transformers`. Look like what transformers takes for a shadowing
        # folder, not an install (no __file__, no __version__), with nothing inside: `from kernels import x` and
        # `import kernels.x` still fail as they would without the package.
        __file__ = None
        __path__ = []
        del _root, _spec, importlib, os, sys
    else:
        _module = importlib.util.module_from_spec(_spec)
        sys.modules[__name__] = _module  # what the import returns
        _spec.loader.exec_module(_module)
