"""`python -m mtl_tools.perf run|sweep|install` (see the package docstring)."""

from .cli import main

main()
