"""Peak RSS of the `mtl-client predict` process: flat in the number of rows.

What it measures, exactly:
  1. Full runs against a real server (--url) on generated CSVs of each size in --rows (default
     5,000 / 10,000 / 20,000): every row is read, checked, sent, scored and written. The peak RSS of
     the CLI process comes from the kernel (`ru_maxrss` of that one child, via os.wait4), so it is a
     true high-water mark, not a sample.
  2. The file check over --scan-rows rows (default 1,000,000): `mtl-client predict` reads and checks
     a whole file (decoding, CSV parsing, empty/oversized texts, duplicate-id hashes) before it sends
     anything, so pointing it at a closed port measures that pass over a million rows without an hour
     of CPU inference; it then exits 1 at the connection.

The streaming phase holds at most 2 x concurrency batches of rows, whatever the file's size, so if
(1) is flat in the row count and (2) stays under the limit, a 1,000,000-row run stays under it too.
A full 1M-row run is `--rows 1000000` (over an hour against the CPU server).

    python -m mtl_tools.bench.client_rss --url 127.0.0.1:8001
"""

from __future__ import annotations

import argparse
import csv
import os
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

LIMIT_MB = 300
WORDS = [
    "market",
    "shares",
    "bank",
    "rate",
    "profit",
    "film",
    "album",
    "concert",
    "series",
    "phone",
    "battery",
    "update",
    "laptop",
    "chip",
    "app",
    "great",
    "terrible",
    "slow",
    "love",
    "hate",
    "boring",
    "brilliant",
    "quarter",
    "growth",
    "stream",
    "song",
    "screen",
    "release",
]


def write_csv(path: Path, rows: int, seed: int = 7) -> None:
    rng = random.Random(seed)
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["id", "text"])
        for number in range(rows):
            words = rng.choices(WORDS, k=rng.randint(6, 30))
            writer.writerow([f"row-{number}", " ".join(words).capitalize() + "."])


def run_cli(command: list[str]) -> tuple[int, float, float, str]:
    """(exit code, seconds, peak RSS in MB, stderr tail) of one CLI run."""
    started = time.monotonic()
    with tempfile.TemporaryFile() as err:
        process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=err)
        _, status, usage = os.wait4(process.pid, 0)
        process.returncode = os.waitstatus_to_exitcode(status)
        err.seek(0)
        tail = err.read().decode(errors="replace").strip().splitlines()[-1:] or [""]
    return process.returncode, time.monotonic() - started, usage.ru_maxrss / 1024, tail[0]


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", help="gRPC host:port of a running server (without it, only the scan is measured)")
    parser.add_argument("--model", default="multitask")
    parser.add_argument("--rows", default="5000,10000,20000", help="comma-separated row counts for full runs")
    parser.add_argument("--scan-rows", type=int, default=1_000_000, help="rows for the file-check pass (0: skip)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--concurrency", type=int, default=4)
    beside = Path(sys.executable).with_name("mtl-client")
    parser.add_argument(
        "--cli",
        default=str(beside) if beside.exists() else shutil.which("mtl-client"),
        help="the mtl-client executable to measure (default: this Python's)",
    )
    args = parser.parse_args()

    results, failed = [], False
    with tempfile.TemporaryDirectory(prefix="mtl-client-rss-") as folder:
        folder = Path(folder)
        runs = [int(r) for r in args.rows.split(",") if r.strip()] if args.url else []
        for rows in runs:
            source = folder / f"{rows}.csv"
            write_csv(source, rows)
            code, seconds, peak, tail = run_cli(
                [
                    args.cli,
                    "predict",
                    str(source),
                    "--url",
                    args.url,
                    "--model",
                    args.model,
                    "--out-dir",
                    str(folder / "out"),
                    "--batch-size",
                    str(args.batch_size),
                    "--concurrency",
                    str(args.concurrency),
                ]
            )
            source.unlink()
            results.append(("full run", rows, seconds, peak, code, tail))
            failed |= code != 0
            print(
                f"full run  {rows:>9,} rows  {seconds:7.1f}s  {rows / seconds:7.0f} rows/s  peak RSS {peak:6.1f} MB"
                + ("" if code == 0 else f"  EXIT {code}: {tail}"),
                flush=True,
            )
        if args.scan_rows:
            source = folder / "scan.csv"
            write_csv(source, args.scan_rows)
            size_mb = source.stat().st_size / 1e6
            code, seconds, peak, tail = run_cli(
                [
                    args.cli,
                    "predict",
                    str(source),
                    "--url",
                    f"127.0.0.1:{closed_port()}",
                    "--retries",
                    "0",
                    "--out-dir",
                    str(folder / "out"),
                ]
            )
            # Exit 1 at the connection means the whole file was read and found valid first.
            ok = code == 1 and "unavailable" in tail
            failed |= not ok
            results.append(("file check", args.scan_rows, seconds, peak, code, tail))
            print(
                f"file check {args.scan_rows:>8,} rows  {seconds:7.1f}s  ({size_mb:.0f} MB CSV)  "
                f"peak RSS {peak:6.1f} MB" + ("" if ok else f"  UNEXPECTED EXIT {code}: {tail}"),
                flush=True,
            )

    peaks = [r[3] for r in results]
    if not peaks:
        return 1
    full = [r for r in results if r[0] == "full run"]
    if len(full) >= 2:
        growth = (full[-1][3] - full[0][3]) / ((full[-1][1] - full[0][1]) / 10_000)
        print(f"growth over full runs: {growth:+.2f} MB per 10,000 rows")
    verdict = "under" if max(peaks) < LIMIT_MB else "OVER"
    print(f"peak RSS: {max(peaks):.1f} MB, {verdict} the {LIMIT_MB} MB limit")
    return 1 if failed or max(peaks) >= LIMIT_MB else 0


if __name__ == "__main__":
    sys.exit(main())
