"""The served model's code, imported from the model repository's source folder (its one home).

model.py and multitask_core.py must sit beside the exported artifacts for Triton, so the build and the
tests load that same file instead of keeping a second copy inside this package.
"""
import importlib.util
import sys
from pathlib import Path

# model_repository/multitask/1 in this source tree (the package is installed in editable mode).
TEMPLATE_DIR = Path(__file__).resolve().parents[2] / "model_repository" / "multitask" / "1"
SOURCE_FILES = ("model.py", "multitask_core.py")


def _load():
    path = TEMPLATE_DIR / "multitask_core.py"
    if not path.is_file():
        raise ImportError(f"{path} not found: mtl-triton must be installed from its source tree (pip install -e .)")
    spec = importlib.util.spec_from_file_location("multitask_core", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("multitask_core", module)
    spec.loader.exec_module(module)
    return sys.modules["multitask_core"]


core = sys.modules.get("multitask_core") or _load()
