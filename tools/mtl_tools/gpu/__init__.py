"""The one-call GPU check (docs/gpu.md): `pack` (prepare the carry here), `device` (unpack and run there),
`parity` (labels against the fp32 reference), `weights` (the pruned fp16 weights), `report` (what comes back).

Public functions: `prepare`, `prune_embedding`, `restore_embedding`, `agreement`, `targets`,
`core_imports`/`stub_modules` (what the stub must import for the served core). Importing this package pulls
in nothing the GPU machine lacks before the carry is unpacked.
"""

from .pack import core_imports, prepare, stub_modules
from .parity import agreement, reference_texts
from .report import parity_table, targets
from .weights import prune_embedding, restore_embedding

__all__ = [
    "agreement",
    "core_imports",
    "reference_texts",
    "parity_table",
    "prepare",
    "prune_embedding",
    "restore_embedding",
    "stub_modules",
    "targets",
]
