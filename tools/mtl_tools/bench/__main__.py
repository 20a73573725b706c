"""`python -m mtl_tools.bench` (see --help)."""

from .cli import main

main()
