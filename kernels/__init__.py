"""Triton kernels, installed as `fastgpt.kernels` (never as a bare `kernels`).

From the checkout's root (on sys.path first, as with `python -c` or `python -m pytest` there), a bare
`import kernels` would find this folder before an installed package of that name: Hugging Face's
`kernels`, which transformers 5 imports. Imported under that name, this file hands the name over to
the installed package, or fails as if the name were not there. (A folder without this file would
lose to the installed package by itself, but setuptools' editable install then finds no
fastgpt.kernels.)
"""

if __name__ == "kernels":
    import importlib.machinery
    import importlib.util
    import os
    import sys

    _checkout = os.path.realpath(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    _spec = importlib.machinery.PathFinder.find_spec(
        __name__, [p for p in sys.path if os.path.realpath(p or os.curdir) != _checkout])
    del sys.modules[__name__]  # the import system takes whatever module holds the name when this file ends
    if _spec is None or _spec.loader is None:
        raise ModuleNotFoundError(f"No module named {__name__!r}", name=__name__)
    _module = importlib.util.module_from_spec(_spec)
    sys.modules[__name__] = _module
    try:
        _spec.loader.exec_module(_module)
    except BaseException:
        sys.modules.pop(__name__, None)
        raise
