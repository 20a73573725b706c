"""`python -m mtl_tools.gpu prepare|device` (see --help)."""

import sys

from .cli import main

sys.exit(main())
