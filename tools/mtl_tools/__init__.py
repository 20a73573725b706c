"""The project's tools, one importable package with public functions (no sys.path edits):

- `mtl_tools.perf`  load tests with the real perf_analyzer, and the sweep of serving layouts
                    (`python -m mtl_tools.perf run|sweep|install`)
- `mtl_tools.bench` the product against the in-process peers a user could choose instead, in one run
                    (`python -m mtl_tools.bench`)
- `mtl_tools.gpu`   the one-call GPU check: pack here, run on the lent GPU machine
                    (`python -m mtl_tools.gpu prepare|device`; gpu/prepare.sh and gpu/run.sh wrap it)

Shared: `paths` (where the checkout keeps data and results), `machine` (what ran a measurement),
`triton` (the one place that imports the local-Triton helpers of mtl_serve), `served` (the served model, opened
as model.py opens it), `wheels` (pip downloads).
"""
