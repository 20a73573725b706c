"""Build the tests' own project (tests/conftest.py's write_project) for client/ci/test-numpy2.sh.

python client/ci/build_test_project.py FOLDER   ->  FOLDER/project/config.yaml (+ its data), FOLDER/repo
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def main(folder: Path) -> None:
    sys.path.insert(0, str(ROOT / "tests"))
    from conftest import write_project  # the same subset and settings as the session fixture

    from mtl_build.cli import build

    config = write_project(folder / "project")
    build(config, folder / "repo", log=lambda message: print(f"  build: {message}", flush=True))


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: build_test_project.py FOLDER")
    main(Path(sys.argv[1]).resolve())
