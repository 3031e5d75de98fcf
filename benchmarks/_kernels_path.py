"""Make ``elastilab.kernels`` importable from a plain checkout (no ``pip install``): pyproject maps the
top-level kernels/ folder to that name, which only an install does. Used by gpu_check.py and as a
pytest plugin (``-p benchmarks._kernels_path``) on machines where elastilab is not installed."""
import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


HOW = None


def ensure() -> str:
    """Returns how elastilab.kernels was found: 'installed' or 'mapped from <path>'."""
    global HOW
    if HOW is not None:
        return HOW
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    try:
        import elastilab.kernels  # noqa: F401
        HOW = "installed"
        return HOW
    except ModuleNotFoundError:
        pass
    import elastilab
    spec = importlib.util.spec_from_file_location("elastilab.kernels", ROOT / "kernels" / "__init__.py",
                                                  submodule_search_locations=[str(ROOT / "kernels")])
    mod = importlib.util.module_from_spec(spec)
    sys.modules["elastilab.kernels"] = mod
    spec.loader.exec_module(mod)
    elastilab.kernels = mod
    HOW = f"mapped from {ROOT / 'kernels'}"
    return HOW


ensure()
