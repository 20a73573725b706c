"""`python -m mtl_tools.gpu prepare|device`: the GPU check in one device call (docs/gpu.md).

`prepare` (here) packs into the carry folder what the GPU machine lacks; `device` (there) unpacks it, serves
the model through LocalTriton with a numpy<2 stub environment and writes everything into --out.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from ..paths import MODEL_REPOSITORY, ROOT


def _ints(value: str) -> list[int]:
    """'1,2,4' → [1, 2, 4]; 'auto' → 0 (the served core's default)."""
    try:
        return [0 if v.strip() == "auto" else int(v) for v in value.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r}: expected comma-separated integers") from None


def parser() -> argparse.ArgumentParser:
    main = argparse.ArgumentParser(prog="python -m mtl_tools.gpu", description=__doc__.split("\n\n")[0])
    commands = main.add_subparsers(dest="command", required=True)
    p = commands.add_parser("prepare", help="fill the carry folder (here; needs PyPI for the wheels)")
    p.add_argument("--carry", type=Path, default=ROOT / ".carry", help="the folder to fill (git-ignored)")
    p.add_argument("--model-repository", type=Path, default=MODEL_REPOSITORY, help="the built repository to carry")
    p.add_argument("--python", default="3.12", help="Python of the GPU machine (its stub and cp wheels)")
    d = commands.add_parser("device", help="unpack and run everything (on the GPU machine)")
    d.add_argument("--carry", type=Path, default=ROOT / ".carry", help="the carry folder prepare filled")
    d.add_argument("--work", type=Path, default=Path("/tmp/mtl-gpu"), help="scratch folder (emptied first)")
    d.add_argument(
        "--out",
        type=Path,
        default=Path(os.environ.get("OUT", "/tmp/mtl-gpu-out")),
        help="results folder (default $OUT)",
    )
    d.add_argument("--sentences", type=int, default=2000, help="sentences per benchmark workload")
    d.add_argument("--repeats", type=int, default=3, help="benchmark repetitions (median)")
    d.add_argument("--concurrency", type=int, default=16, help="requests in flight of the benchmark's client and CLI")
    d.add_argument(
        "--bench-contenders",
        default=None,
        help="benchmark contenders (python -m mtl_tools.bench --help); default: the device's peers, "
        "core, client, cli, perf",
    )
    d.add_argument(
        "--bench-perf",
        action="append",
        default=None,
        metavar="SENTENCES:C1,C2",
        help="perf_analyzer workloads of the benchmark; repeatable (default 64:4,8,16,32 and 1:32,128,256,512)",
    )
    d.add_argument("--bench-timeout", type=float, default=330, help="seconds the benchmark may take")
    d.add_argument(
        "--sweep-perf",
        action="append",
        default=None,
        metavar="SENTENCES:C1,C2",
        help="perf_analyzer workloads per sweep variant; repeatable (default 64:16 and 1:256)",
    )
    d.add_argument("--instances", type=_ints, default=[1, 2, 4], help="sweep: instance counts (default 1,2,4)")
    d.add_argument(
        "--queue-delays", type=_ints, default=[500, 2000], help="sweep: queue delays in µs (default 500,2000)"
    )
    d.add_argument(
        "--tokens-per-forward",
        type=_ints,
        default=[0],
        help="sweep: padded tokens per forward (default auto: 65,536 on a GPU)",
    )
    d.add_argument(
        "--preferred",
        action="append",
        default=None,
        help="sweep: preferred batch sizes, repeatable (default 64,128,256)",
    )
    d.add_argument("--measurement-ms", type=int, default=2000, help="perf_analyzer measurement window")
    d.add_argument("--stability", type=int, default=50, help="perf_analyzer --stability-percentage")
    d.add_argument(
        "--deadline-s",
        type=float,
        default=420,
        help="seconds the whole check may take (the device call's timeout less a margin)",
    )
    d.add_argument("--skip-bench", action="store_true", help="parity and sweep only")
    d.add_argument("--skip-sweep", action="store_true", help="parity and benchmark only")
    return main


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.command == "prepare":
        from .pack import prepare

        return prepare(args.carry, args.model_repository, args.python)
    args.bench_perf = args.bench_perf or ["64:4,8,16,32", "1:32,128,256,512"]
    args.sweep_perf = args.sweep_perf or ["64:16", "1:256"]
    args.preferred = args.preferred or ["64,128,256"]
    from .device import device

    return device(args)


if __name__ == "__main__":
    sys.exit(main())
