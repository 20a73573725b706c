"""`device` (on the GPU machine): unpack the carry, serve the model through LocalTriton, and run the checks.

Order: unpack (Triton, perf_analyzer, a numpy<2 stub environment, the model repository), parity in process,
the benchmark (python -m mtl_tools.bench in a child), the serving-layout sweep with served parity on its first
server. A failed step is recorded and the next still runs; everything lands in --out (at most 8 files).
Nothing from mtl_tools.perf or mtl_build is imported before `unpack`: tritonclient arrives with the carry.
"""

from __future__ import annotations

import json
import lzma
import os
import shutil
import site
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from ..paths import SOURCE_VERSION
from ..served import version_dir
from .archive import extract
from .pack import GENERATED_SMALL, MODEL, PACKED_WEIGHTS
from .weights import join_bytes, restore_embedding

SWEEP_RESERVE_S = 150  # six variants loading (~40 s on the H100 probe's numbers) plus 12 short perf_analyzer runs


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


@dataclass
class Unpacked:
    site: Path
    extra: Path
    stub_python: Path
    stub_numpy: str
    repository: Path
    st: Path
    carried_ids: set[int]
    manifest: dict

    @property
    def version_dir(self) -> Path:
        return version_dir(self.repository)


def check_carry(carry: Path) -> dict:
    from multitask_core.files import sha256_file

    manifest = json.loads((carry / "MANIFEST.json").read_text())
    python = f"{sys.version_info.major}.{sys.version_info.minor}"
    if manifest["python"] != python:
        raise SystemExit(
            f"device: the carry was prepared for Python {manifest['python']}, this is {python}: "
            f"run `gpu/prepare.sh --python {python}` first"
        )
    for name, entry in manifest["files"].items():
        if sha256_file(carry / name) != entry["sha256"]:
            raise SystemExit(f"device: {carry / name} does not match MANIFEST.json: prepare the carry again")
    return manifest


def install_wheels(carry: Path, extra: Path) -> None:
    wheels = sorted((carry / "wheels").glob("*.whl"))
    installed = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "-q",
            "--no-index",
            "--no-deps",
            "--no-compile",
            "--target",
            str(extra),
        ]
        + [str(w) for w in wheels],
        capture_output=True,
        text=True,
    )
    if installed.returncode != 0:
        raise SystemExit(f"device: could not install {[w.name for w in wheels]}: {installed.stderr.strip()[-300:]}")


def make_stub_environment(carry: Path, work: Path, extra: Path, modules: list[str]) -> tuple[Path, str]:
    """numpy 1.26.4 in its own site-packages; this environment's packages and the carried wheels after it (.pth).

    LocalTriton refuses a stub environment whose numpy is >= 2; every module the core needs must import there,
    without PYTHONPATH (the stub ignores it)."""
    from ..triton import check_stub_environment

    stubenv = work / "stubenv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(stubenv)], check=True)
    stub_site = stubenv / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}" / "site-packages"
    extract(next(carry.glob("numpy-*-slim.tar.xz")), stub_site)
    (stub_site / "zz_main_env.pth").write_text("\n".join([*site.getsitepackages(), str(extra)]) + "\n")
    python = stubenv / "bin" / "python3"
    stub_numpy = check_stub_environment(python)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    probe = subprocess.run([str(python), "-c", f"import {', '.join(modules)}"], capture_output=True, text=True, env=env)
    if probe.returncode != 0:
        raise SystemExit(
            f"device: the stub environment cannot import the served core's modules {modules}: "
            f"{probe.stderr.strip()[-300:]}"
        )
    return python, stub_numpy


def rebuild_repository(carry: Path, work: Path, manifest: dict) -> tuple[Path, Path, set[int]]:
    """The model repository from the carried files and this checkout's model.py and multitask_core; the
    sentence-transformers folder of the peers over the same encoder weights (speed, not accuracy)."""
    from safetensors.torch import load_file, save_file

    from multitask_core import files

    repository = work / "repository"
    version = version_dir(repository)
    version.mkdir(parents=True)
    unpacked = work / "files"
    extract(carry / "model" / "files.tar.xz", unpacked)
    shutil.copyfile(unpacked / "model" / "config.pbtxt", repository / MODEL / "config.pbtxt")
    for name in GENERATED_SMALL:
        if (unpacked / "model" / name).is_file():
            shutil.copyfile(unpacked / "model" / name, version / name)
    shutil.copyfile(SOURCE_VERSION / files.MODEL_FILE, version / files.MODEL_FILE)
    shutil.copytree(
        SOURCE_VERSION / files.CORE_PACKAGE, version / files.CORE_PACKAGE, ignore=shutil.ignore_patterns("__pycache__")
    )
    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp) / "w.safetensors"
        raw.write_bytes(join_bytes(lzma.decompress((carry / "model" / PACKED_WEIGHTS).read_bytes())))
        state, carried = restore_embedding(load_file(str(raw)), manifest["vocab_size"])
    save_file(state, str(version / files.WEIGHTS_FILE), metadata={"format": "pt"})
    artifacts = [files.WEIGHTS_FILE, files.TOKENIZER_FILE, files.ENCODER_CONFIG_FILE]
    files.write_manifest(version, artifacts + files.source_files(version))
    st = unpacked / "st"
    shutil.copyfile(version / files.TOKENIZER_FILE, st / files.TOKENIZER_FILE)
    save_file(
        {k[len("encoder.") :]: v.float().contiguous() for k, v in state.items() if k.startswith("encoder.")},
        str(st / "model.safetensors"),
        metadata={"format": "pt"},
    )
    return repository, st, carried


def unpack(carry: Path, work: Path) -> Unpacked:
    """Triton + stub env + perf_analyzer + the model repository under `work`."""
    manifest = check_carry(carry)
    if work.exists():
        shutil.rmtree(work)
    site_dir, cache, extra = work / "site", work / "cache", work / "extra"
    site_dir.mkdir(parents=True)
    extract(next(carry.glob("tritonserver-*.tar.xz")), site_dir)
    # mtl_serve finds the server through `import pytriton`; only the server's files travelled.
    (site_dir / "pytriton" / "__init__.py").write_text(
        '"""Stand-in for nvidia-pytriton: only its bundled server travelled."""\n'
    )
    install_wheels(carry, extra)
    sys.path.insert(0, str(site_dir))
    sys.path.append(str(extra))  # after the machine's own packages: only what it lacks comes from here
    os.environ["MTL_TRITON_CACHE"] = str(cache)
    from ..perf.analyzer import PERF_ANALYZER_VERSION

    pa_dir = cache / f"perf_analyzer-{PERF_ANALYZER_VERSION}"
    pa_dir.mkdir(parents=True)
    (pa_dir / "perf_analyzer").write_bytes(lzma.decompress(next(carry.glob("perf_analyzer-*.xz")).read_bytes()))
    (pa_dir / "perf_analyzer").chmod(0o755)
    stub_python, stub_numpy = make_stub_environment(carry, work, extra, manifest["stub_modules"])
    repository, st, carried = rebuild_repository(carry, work, manifest)
    return Unpacked(site_dir, extra, stub_python, stub_numpy, repository, st, carried, manifest)


def run_child(command: list[str], env: dict, log_path: Path, timeout_s: float) -> int | None:
    """A child process with a deadline; on timeout SIGTERM (the benchmark stops its Triton cleanly), then SIGKILL."""
    with open(log_path, "w") as handle:
        child = subprocess.Popen(command, env=env, stdout=handle, stderr=subprocess.STDOUT)
        try:
            return child.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            log(f"{command[2] if len(command) > 2 else command[0]}: over {timeout_s:.0f}s, stopping it")
            child.terminate()
            try:
                child.wait(timeout=60)
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()
            return None


def benchmark_command(args, paths: Unpacked, device_name: str, out: Path) -> list[str]:
    command = [
        sys.executable,
        "-m",
        "mtl_tools.bench",
        "--device",
        device_name,
        "--label",
        "device",
        "--model-repository",
        str(paths.repository),
        "--st-model",
        str(paths.st),
        "--stub-python",
        str(paths.stub_python),
        "--sentences",
        str(args.sentences),
        "--out",
        str(out),
        "--repeats",
        str(args.repeats),
        "--stability",
        str(args.stability),
        "--concurrency",
        str(args.concurrency),
    ]
    from ..bench.run import default_contenders

    command += ["--contenders", args.bench_contenders or ",".join(default_contenders(device_name) + ["perf"])]
    for workload in args.bench_perf:
        command += ["--perf-requests", workload]
    return command


def device(args) -> int:
    from .parity import check_coverage, parity_in_process, parity_served, smoke_texts
    from .report import targets, write_outputs

    started = time.monotonic()
    out, work, carry = args.out.resolve(), args.work.resolve(), args.carry.resolve()
    out.mkdir(parents=True, exist_ok=True)
    results = out / "results"
    results.mkdir(exist_ok=True)
    import numpy
    import torch

    device_name = "cuda" if torch.cuda.is_available() else "cpu"
    env = {
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "device": torch.cuda.get_device_name(0) if device_name == "cuda" else "cpu",
        "numpy_main_env": numpy.__version__,
    }
    log(f"device: {env}")
    report: dict = {"env": env, "carry": {}, "errors": [], "parity_in_process": None, "parity_served": None}
    bench, sweep_rows, served = None, [], None

    def step(name: str, function):
        """Run one step; a failure is recorded and the next step still runs."""
        begun = time.monotonic()
        try:
            return function()
        except Exception as exc:  # the summary must come back whatever failed
            report["errors"].append(f"{name}: {type(exc).__name__}: {exc}")
            log(f"{name} FAILED: {exc}")
            return None
        finally:
            log(f"{name}: {time.monotonic() - begun:.0f}s")

    def prepare_all():
        paths = unpack(carry, work)
        env["stub_numpy"] = paths.stub_numpy
        report["carry"] = {k: paths.manifest[k] for k in ("embedding_rows", "vocab_size", "source_weights_sha256")}
        reference = json.loads(lzma.decompress((carry / "reference.json.xz").read_bytes()))
        check_coverage(paths.version_dir, reference["texts"] + smoke_texts(), paths.carried_ids)
        return paths, reference

    prepared = step("unpack", prepare_all)
    if prepared:
        paths, reference = prepared
        report["parity_in_process"] = step(
            "in-process parity", lambda: parity_in_process(paths.version_dir, reference, device_name)
        )
        child_env = dict(os.environ)
        child_env["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(paths.site), child_env.get("PYTHONPATH", ""), str(paths.extra)) if p
        )
        if not args.skip_bench:

            def benchmarks():
                bench_dir = results / "benchmarks"
                command = benchmark_command(args, paths, device_name, bench_dir)
                log("benchmarks: " + " ".join(command))
                # Leave the sweep its share of the call's time.
                budget = max(
                    60.0, min(args.bench_timeout, args.deadline_s - (time.monotonic() - started) - SWEEP_RESERVE_S)
                )
                code = run_child(command, child_env, results / "benchmarks.log", budget)
                if code != 0:
                    report["errors"].append(f"python -m mtl_tools.bench exited {code} (see results/benchmarks.log)")
                found = bench_dir / "device.json"
                return json.loads(found.read_text()) if found.is_file() else None

            bench = step("benchmarks", benchmarks)
        if not args.skip_sweep:

            def sweep():
                nonlocal sweep_rows
                from mtl_build import pbtxt

                from ..perf import (
                    PerfAnalyzer,
                    RunSettings,
                    Workload,
                    grid,
                    metadata,
                    parse_preferred,
                    read_settings,
                    run_variants,
                    write_sweep,
                )

                def on_ready(target, _served):
                    nonlocal served
                    served = step("served parity", lambda: parity_served(target, reference))
                    if served:
                        log(f"served parity ({target.model}): {json.dumps(served['all_tasks'])}")

                analyzer = PerfAnalyzer.locate()
                settings = RunSettings(
                    measurement_ms=args.measurement_ms, max_trials=6, stability_percent=args.stability
                )
                base = read_settings(pbtxt.read_config(paths.repository / MODEL))
                variants = grid(
                    args.instances,
                    args.queue_delays,
                    [parse_preferred(p) for p in args.preferred],
                    tokens=args.tokens_per_forward,
                )
                texts = reference["texts"][:1024]
                failed: list[str] = []
                notes: list[str] = []
                sweep_rows = run_variants(
                    analyzer,
                    paths.repository,
                    MODEL,
                    variants,
                    texts,
                    [Workload.parse(w) for w in args.sweep_perf],
                    results / "sweep",
                    settings,
                    stub_python=paths.stub_python,
                    on_ready=on_ready,
                    log=log,
                    errors=failed,
                    notes=notes,
                )
                report["sweep_failed_runs"] = failed
                if sweep_rows:
                    report["sweep_table"] = write_sweep(
                        sweep_rows,
                        results / "sweep",
                        metadata(analyzer, settings, texts, "reference sentences"),
                        base,
                        MODEL,
                        notes=notes,
                    )

            if args.deadline_s - (time.monotonic() - started) < SWEEP_RESERVE_S:
                report["errors"].append(
                    f"sweep skipped: less than {SWEEP_RESERVE_S:.0f}s left of --deadline-s {args.deadline_s:.0f}"
                )
            else:
                step("sweep", sweep)
    report["parity_served"] = served
    report["targets"] = targets(
        bench, sweep_rows, served, "float16" if device_name == "cuda" else "CPU (serving.precision auto)"
    )
    report["seconds"] = round(time.monotonic() - started, 1)
    write_outputs(out, results, report, bench)
    return 1 if report["errors"] or report.get("sweep_failed_runs") else 0
