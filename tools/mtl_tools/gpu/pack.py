"""`prepare` (here): fill the carry folder with what the GPU machine lacks, within the device call's 64 MiB.

tritonserver-2.51.0-py<X.Y>.tar.xz   Triton from the nvidia-pytriton wheel, with one python stub
perf_analyzer-2.50.0.xz              from the tritonclient 2.50.0 wheel
numpy-1.26.4-cp<XY>-slim.tar.xz      numpy for the stub environment (tests, f2py, typing stubs removed)
model/                               the built repository's generated files; fp16 weights whose word-embedding
                                     rows are only those of the tokens the check sends (weights.py)
reference.json.xz                    fp32 CPU probabilities of the real weights for the validation split and
                                     every benchmark sentence: the parity reference
wheels/                              pure or cp<XY> wheels the machine lacks (WHEELS)
MANIFEST.json                        SHA-256 of each file, the Python it is for, the benchmark size
"""

from __future__ import annotations

import ast
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from ..paths import ROOT, SOURCE_VERSION
from ..served import MODEL, version_dir
from .archive import xz_bytes, xz_tar
from .weights import EMBEDDING, prune_embedding, split_bytes

PACKED_WEIGHTS = "weights.fp16-pruned.split.safetensors.xz"
GENERATED_SMALL = ("tokenizer.json", "encoder_config.json", "metrics.json", "MODEL_CARD.md")
ST_FILES = (
    "config.json",
    "modules.json",
    "sentence_bert_config.json",
    "config_sentence_transformers.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.txt",
    "1_Pooling/config.json",
)
# The GPU image has no network; these travel as wheels: the client's (contender client/cli, config.pbtxt through
# the schema) and the served core's pure-Python needs the image lacks.
WHEELS = {"tritonclient": "tritonclient==2.73.0", "rapidjson": "python-rapidjson==1.25", "emoji": "emoji==2.16.0"}
# What the served core imports that the GPU image already has (docs/gpu.md); the rest must be a WHEEL.
IMAGE_PROVIDES = ("numpy", "torch", "tokenizers", "safetensors")
# Imported by the core only inside the CPU runtimes (never on the GPU's torch runtime).
CPU_RUNTIME_ONLY = ("openvino", "onnxruntime")
SERVABLE_RUNTIMES = ("auto", "torch")  # the carry holds the torch weights, not the exported graphs
LIMIT_BYTES = 64 * 1024 * 1024


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def core_imports(package: Path = SOURCE_VERSION / "multitask_core") -> dict[str, set[str]]:
    """Third-party modules the served core imports: {"module": top-level names, "function": inside functions}."""
    found: dict[str, set[str]] = {"module": set(), "function": set()}
    for path in sorted(package.glob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        inner = {
            id(n) for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef)) for n in ast.walk(f)
        }
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                if top not in sys.stdlib_module_names and top != "__future__":
                    found["function" if id(node) in inner else "module"].add(top)
    found["function"] -= found["module"]
    return found


def stub_modules() -> list[str]:
    """What the stub must import for the core on the GPU: everything it imports but the CPU runtimes."""
    imports = core_imports()
    return sorted((imports["module"] | imports["function"]) - set(CPU_RUNTIME_ONLY))


def pip_download(spec: str, dest: Path, python: str | None = None) -> Path:
    from ..wheels import WheelDownloadError, download_wheel

    try:
        return download_wheel(spec, dest, python)
    except WheelDownloadError as exc:
        raise SystemExit(f"prepare: {exc}") from None


def stripped(path: Path, tmp: Path) -> Path:
    """A copy without the symbol table (`strip --strip-unneeded`, dynamic symbols kept): ~30% smaller.

    The wheels ship these binaries unstripped; every byte counts against the device call's 64 MiB.
    """
    if not shutil.which("strip"):
        return path
    copy = tmp / path.name
    shutil.copy2(path, copy)
    subprocess.run(["strip", "--strip-unneeded", str(copy)], check=True)
    return copy


def pack_server(carry: Path, python: str) -> Path:
    from ..triton import TRITON_VERSION, wheel_paths

    target = carry / f"tritonserver-{TRITON_VERSION}-py{python}.tar.xz"
    if target.is_file():
        return target
    server, libs = wheel_paths()
    stub = server / "python_backend_stubs" / python
    if not stub.is_dir():
        raise SystemExit(f"prepare: the nvidia-pytriton wheel has no python stub for {python}")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        members = [(stripped(server / "bin" / "tritonserver", tmp), "pytriton/tritonserver/bin/tritonserver")]
        members += [(server / part, f"pytriton/tritonserver/{part}") for part in ("backends", "caches")]
        members.append((stub, f"pytriton/tritonserver/python_backend_stubs/{python}"))
        # The stubs link the running Python's libpython; the wheel's own libpython3.13 copy is not needed.
        for lib in sorted(libs.iterdir()):
            if not lib.name.startswith("libpython"):
                source = stripped(lib, tmp) if lib.name.startswith("libtritonserver") else lib
                members.append((source, f"nvidia_pytriton.libs/{lib.name}"))
        log(f"packing Triton {TRITON_VERSION} (python {python} stub) with xz -9e: a few minutes on 2 cores")
        return xz_tar(target, members)


def pack_perf_analyzer(carry: Path) -> Path:
    from ..perf.analyzer import PERF_ANALYZER_VERSION, install

    target = carry / f"perf_analyzer-{PERF_ANALYZER_VERSION}.xz"
    if not target.is_file():
        with tempfile.TemporaryDirectory() as tmp:
            target.write_bytes(xz_bytes(stripped(install(), Path(tmp)).read_bytes()))
    return target


def pack_numpy(carry: Path, python: str, downloads: Path) -> Path:
    tag = python.replace(".", "")
    target = carry / f"numpy-1.26.4-cp{tag}-slim.tar.xz"
    if target.is_file():
        return target
    import zipfile

    wheel = pip_download("numpy==1.26.4", downloads, python)
    with tempfile.TemporaryDirectory() as tmp:
        with zipfile.ZipFile(wheel) as archive:
            archive.extractall(tmp)
        root = Path(tmp)
        for path in sorted(root.rglob("*"), reverse=True):
            relative = path.relative_to(root).as_posix()
            # Not imported by `import numpy`: test suites, f2py, distutils, typing stubs.
            if (path.is_dir() and path.name == "tests") or relative in (
                "numpy/f2py",
                "numpy/distutils",
                "numpy/typing",
                "numpy/_pyinstaller",
                "numpy/doc",
            ):
                shutil.rmtree(path, ignore_errors=True)
            elif path.suffix == ".pyi":
                path.unlink(missing_ok=True)
        for path in root.rglob("*.so"):
            path.chmod(0o755)
        xz_tar(target, [(p, p.name) for p in sorted(root.iterdir())])
    return target


def check_servable(repository: Path) -> Path:
    """The built version folder, if the GPU can serve it from the carried torch weights."""
    from mtl_build import pbtxt

    version = version_dir(repository)
    if not (version / "weights.safetensors").is_file():
        raise SystemExit(f"prepare: {repository} holds no built model: run `make build` (or pass --model-repository)")
    runtime = pbtxt.read_config(repository / MODEL).get("parameters", {}).get("runtime", {}).get("string_value", "auto")
    if runtime not in SERVABLE_RUNTIMES:
        raise SystemExit(
            f"prepare: {repository} is built for runtime {runtime!r}; the GPU check serves the torch weights "
            f"(runtime {' or '.join(SERVABLE_RUNTIMES)}): rebuild with serving.runtime: auto"
        )
    return version


def pack_model(carry: Path, repository: Path, texts: list[str]) -> dict:
    """model/files.tar.xz (config.pbtxt, the small generated files, sentence-transformers' config files) and the
    pruned fp16 weights; returns what the manifest records about them."""
    from safetensors.torch import load_file, save_file

    from mtl_build.backbone import default_backbone_path
    from multitask_core.files import WEIGHTS_FILE, sha256_file, verify_artifacts

    from ..served import open_served
    from .parity import smoke_texts, token_ids

    version = version_dir(repository)
    verify_artifacts(version)
    model_dir = carry / "model"
    shutil.rmtree(model_dir, ignore_errors=True)
    model_dir.mkdir(parents=True)
    st = default_backbone_path()
    small = [(repository / MODEL / "config.pbtxt", "model/config.pbtxt")]
    small += [(version / name, f"model/{name}") for name in GENERATED_SMALL]
    small += [(st / name, f"st/{name}") for name in ST_FILES]  # tokenizer.json: the model's own, the same file
    xz_tar(model_dir / "files.tar.xz", [(path, name) for path, name in small if path.is_file()])
    served = open_served(version, runtime="torch", device="cpu", precision="float32")
    ids = token_ids(served, texts + smoke_texts())
    state = load_file(str(version / WEIGHTS_FILE))
    vocab_size = int(state[EMBEDDING].shape[0])
    source_sha = sha256_file(version / WEIGHTS_FILE)
    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp) / "weights.safetensors"
        save_file(
            prune_embedding(state, ids), str(raw), metadata={"vocab_size": str(vocab_size), "source_sha256": source_sha}
        )
        log(f"packing fp16 weights ({len(ids)} of {vocab_size} embedding rows) with xz -9e")
        (model_dir / PACKED_WEIGHTS).write_bytes(xz_bytes(split_bytes(raw.read_bytes())))
    return {"embedding_rows": len(ids), "vocab_size": vocab_size, "source_weights_sha256": source_sha}


def pack_wheels(carry: Path, python: str, downloads: Path) -> list[Path]:
    wheels = carry / "wheels"
    shutil.rmtree(wheels, ignore_errors=True)
    wheels.mkdir()
    return [Path(shutil.copy(pip_download(spec, downloads, python), wheels)) for spec in WHEELS.values()]


def working_tree_bytes() -> int:
    """What the device call sends besides the carry: the files git tracks or would track."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        check=True,
    ).stdout.split(b"\0")
    return sum((ROOT / p.decode()).stat().st_size for p in listed if p and (ROOT / p.decode()).is_file())


def prepare(carry: Path, repository: Path, python: str) -> int:
    from multitask_core.files import sha256_file

    from .parity import reference, reference_texts

    carry = carry.resolve()
    carry.mkdir(parents=True, exist_ok=True)
    repository = repository.resolve()
    version = check_servable(repository)
    texts = reference_texts()
    downloads = carry / ".downloads"
    downloads.mkdir(exist_ok=True)
    files = {
        "server": pack_server(carry, python),
        "perf_analyzer": pack_perf_analyzer(carry),
        "numpy": pack_numpy(carry, python, downloads),
    }
    model_info = pack_model(carry, repository, texts)
    log(f"fp32 reference on the CPU for {len(texts)} sentences")
    (carry / "reference.json.xz").write_bytes(xz_bytes(json.dumps(reference(version, texts)).encode()))
    pack_wheels(carry, python, downloads)
    shutil.rmtree(downloads, ignore_errors=True)
    for pattern, keep in (("tritonserver-*.tar.xz", files["server"]), ("numpy-*-slim.tar.xz", files["numpy"])):
        for stale in carry.glob(pattern):
            if stale != keep:
                stale.unlink()
    (carry / "MANIFEST.json").unlink(missing_ok=True)
    sizes = {p.relative_to(carry).as_posix(): p.stat().st_size for p in sorted(carry.rglob("*")) if p.is_file()}
    tree = working_tree_bytes()
    manifest = {
        "python": python,
        "model_repository": str(repository),
        **model_info,
        "stub_modules": stub_modules(),
        "files": {name: {"bytes": size, "sha256": sha256_file(carry / name)} for name, size in sizes.items()},
        "carry_bytes": sum(sizes.values()),
        "working_tree_bytes": tree,
        "limit_bytes": LIMIT_BYTES,
    }
    (carry / "MANIFEST.json").write_text(json.dumps(manifest, indent=2) + "\n")
    total = sum(sizes.values()) + (carry / "MANIFEST.json").stat().st_size + tree
    for name, size in sizes.items():
        print(f"{size / 1e6:8.2f} MB  {name}")
    print(f"{total / 2**20:8.2f} MiB with the working tree ({tree / 1e6:.2f} MB), limit 64 MiB")
    if total > LIMIT_BYTES:
        print("prepare: error: over the device call's 64 MiB limit", file=sys.stderr)
        return 1
    return 0
