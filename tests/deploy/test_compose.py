"""docker-compose.yml for a GPU host: validated by docker-compose where it is installed, and its key settings checked.

No Docker engine runs here. Debian's docker-compose 1.29 (`apt-get install docker-compose`) validates a
file against the Compose schema without one; the parse-based checks below run everywhere.
"""

from __future__ import annotations

import ast
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "docker-compose.yml"
DOCKER = ROOT / "docker"
MODEL_NAME = yaml.safe_load((ROOT / "config.yaml").read_text())["serving"]["model_name"]
_VARIABLE = re.compile(r"\$\{(\w+)(?::?-([^}]*))?\}")


def interpolate(value: str) -> str:
    """${NAME:-default} as Compose resolves it with NAME unset."""
    return _VARIABLE.sub(lambda m: m.group(2) or "", value)


def compose_cli() -> list[str] | None:
    for command in (["docker", "compose"], ["docker-compose"]):
        if shutil.which(command[0]):
            probe = subprocess.run(command + ["version"], capture_output=True, text=True, timeout=60)
            if probe.returncode == 0:
                return command
    return None


def clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith(("TRITON_", "COMPOSE_"))}


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


@pytest.fixture(scope="module")
def triton(compose) -> dict:
    return compose["services"]["triton"]


def _ports(service: dict) -> list[str]:
    ports = []
    for entry in service.get("ports", []):
        if isinstance(entry, dict):  # long syntax, or `docker compose config` output
            ports.append(f"{entry.get('host_ip', '')}:{entry.get('published', '')}:{entry['target']}")
        else:
            ports.append(interpolate(str(entry)))
    return ports


def test_docker_compose_config_accepts_the_file():
    cli = compose_cli()
    if cli is None:
        pytest.skip("no `docker compose` or `docker-compose` here (apt-get install docker-compose)")
    result = subprocess.run(
        cli + ["-f", str(COMPOSE), "config"], capture_output=True, text=True, cwd=ROOT, env=clean_env(), timeout=120
    )
    assert result.returncode == 0, result.stderr
    resolved = yaml.safe_load(result.stdout)
    for name, service in resolved["services"].items():
        for port in _ports(service):
            assert port.startswith("127.0.0.1:"), f"{name}: {port} as resolved by {' '.join(cli)}"
    assert resolved["services"]["triton"]["deploy"]["resources"]["reservations"]["devices"]


def test_docker_compose_config_rejects_a_misspelt_key(tmp_path):
    """The validator really validates: the GPU reservation with a typo is refused, naming the key."""
    cli = compose_cli()
    if cli is None:
        pytest.skip("no `docker compose` or `docker-compose` here (apt-get install docker-compose)")
    broken = tmp_path / "docker-compose.yml"
    broken.write_text(COMPOSE.read_text().replace("capabilities:", "capabilites:"))
    result = subprocess.run(
        cli + ["-f", str(broken), "--project-directory", str(ROOT), "config"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=clean_env(),
        timeout=120,
    )
    assert result.returncode != 0
    assert "capabilites" in result.stderr + result.stdout


def test_gpu_is_reserved(triton):
    devices = triton["deploy"]["resources"]["reservations"]["devices"]
    assert any(
        d.get("driver") == "nvidia" and "gpu" in d.get("capabilities", []) and (d.get("count") or d.get("device_ids"))
        for d in devices
    ), devices


def _bytes(size: str) -> int:
    match = re.fullmatch(r"(\d+)\s*([kmg]?)i?b?", str(size).strip().lower())
    assert match, size
    return int(match.group(1)) * {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}[match.group(2)]


def test_shm_size_fits_the_python_backend(triton):
    # Docker's default /dev/shm is 64 MiB; the python backend passes every tensor through it.
    assert _bytes(triton["shm_size"]) >= 256 << 20


def test_model_repository_is_mounted_read_only(triton):
    command = " ".join(triton["command"])
    target = re.search(r"--model-repository=(\S+)", command).group(1)
    mounts = [v for v in triton["volumes"] if (v.get("target") if isinstance(v, dict) else v.split(":")[1]) == target]
    assert len(mounts) == 1, triton["volumes"]
    mount = mounts[0]
    if isinstance(mount, dict):
        assert mount["read_only"] is True and mount["source"].rstrip("/") == "./model_repository"
    else:
        assert mount.split(":")[0] == "./model_repository" and mount.split(":")[2:] == ["ro"]


def test_model_control_mode_is_none(triton):
    assert "--model-control-mode=none" in triton["command"]


def test_every_published_port_is_on_loopback_by_default(compose):
    for name, service in compose["services"].items():
        for port in _ports(service):
            assert port.startswith("127.0.0.1:"), f"{name}: {port}"
    published = {
        port.rsplit(":", 1)[1]: name for name, service in compose["services"].items() for port in _ports(service)
    }
    assert published == {
        "8001": "triton",
        "8000": "http-guard",
        "8002": "metrics-guard",
        "9090": "prometheus",
        "3000": "grafana",
    }


def test_healthcheck_scores_one_row_rather_than_asking_ready(triton):
    # Triton 2.51 keeps a model READY after its stub died (docs/reliability.md): only an answered inference counts.
    test = " ".join(triton["healthcheck"]["test"])
    assert f"http://127.0.0.1:8000/v2/models/{MODEL_NAME}/infer" in test and "/ready" not in test
    assert "[1,1]" in test  # one row
    assert "mtl-serve-canary" in test  # the metrics leave the probe out (docs/metrics.md)
    compile(triton["healthcheck"]["test"][-1], "healthcheck", "exec")  # the probe is valid Python
    # Inside the container 8000 is Triton's own HTTP port: not moved by the command, exposed to the guard.
    assert "--http-port" not in " ".join(triton["command"]) and "8000" in [str(p) for p in triton["expose"]]


def _guard(compose: dict, name: str) -> tuple[dict, dict[str, str]]:
    service = compose["services"][name]
    command = service["command"]
    assert command[:3] == ["python", "-m", "mtl_serve.guard"], command
    options = dict(zip(command[3::2], command[4::2], strict=True))
    return service, options


def test_http_and_metrics_reach_the_host_only_through_the_guard(compose, triton):
    """docs/reliability.md: a form-encoded body of ~4 MB or deeply nested JSON kills Triton 2.51's HTTP side."""
    assert [p.rsplit(":", 1)[1] for p in _ports(triton)] == ["8001"]
    for name, port in (("http-guard", "8000"), ("metrics-guard", "8002")):
        service, options = _guard(compose, name)
        assert options["--upstream"] == f"triton:{port}" and options["--listen"] == f"0.0.0.0:{port}"
        assert [p.rsplit(":", 1)[1] for p in _ports(service)] == [port]
        assert port in [str(p) for p in triton["expose"]]
        assert service["read_only"] is True and service["user"].split(":")[0] != "0"
        mount = service["volumes"][0]
        assert mount["read_only"] is True and (ROOT / mount["source"] / "guard.py").is_file()
        assert mount["target"].rsplit("/", 1)[0] == service["environment"]["PYTHONPATH"]
        assert re.fullmatch(r"python:\d+\.\d+\.\d+-slim-\w+", service["image"]), service["image"]
    assert int(_guard(compose, "metrics-guard")[1]["--max-body-bytes"]) <= 1 << 20


def test_the_guard_services_command_runs_on_a_bare_python(compose, tmp_path):
    """The guard image is plain Python: the mounted mtl_serve must run with the standard library alone (-S: no
    site-packages), and the command's options must be the guard's. It re-types a form body as JSON on the way."""
    import http.server
    import json
    import socket
    import sys
    import threading
    import time
    import urllib.request

    seen = {}

    class Upstream(http.server.BaseHTTPRequestHandler):
        def do_POST(self):
            seen["content_type"] = self.headers.get("Content-Type")
            self.rfile.read(int(self.headers.get("Content-Length", 0)))
            body = b'{"ok": true}'
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    upstream = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Upstream)
    threading.Thread(target=upstream.serve_forever, daemon=True).start()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        listen_port = sock.getsockname()[1]
    service, options = _guard(compose, "http-guard")
    command = [sys.executable, "-S", *service["command"][1:]]
    command[command.index("--listen") + 1] = f"127.0.0.1:{listen_port}"
    command[command.index("--upstream") + 1] = f"127.0.0.1:{upstream.server_address[1]}"
    guard = subprocess.Popen(
        command,
        env={"PYTHONPATH": str(ROOT / "server"), "PATH": os.environ.get("PATH", "")},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                request = urllib.request.Request(
                    f"http://127.0.0.1:{listen_port}/v2/models/m/infer",
                    b'{"inputs": []}',
                    {"Content-Type": "application/x-www-form-urlencoded"},
                )
                with urllib.request.urlopen(request, timeout=5) as response:
                    assert json.load(response) == {"ok": True}
                break
            except OSError:
                assert guard.poll() is None, guard.communicate()
                assert time.monotonic() < deadline, "the guard did not answer within 30 s"
                time.sleep(0.2)
        assert seen["content_type"] == "application/json"
    finally:
        guard.terminate()
        guard.wait(timeout=10)
        upstream.shutdown()


def test_triton_runs_with_the_fixed_mmap_threshold_of_local_triton(triton):
    """docs/reliability.md, design change 3: the same MALLOC_MMAP_THRESHOLD_ as mtl-serve sets."""
    from mtl_serve.local import LocalTriton

    default = LocalTriton.__dataclass_fields__["malloc_mmap_threshold"].default
    assert int(triton["environment"]["MALLOC_MMAP_THRESHOLD_"]) == default


def test_triton_exports_the_latency_summaries_the_dashboard_reads(triton):
    assert "--metrics-config=summary_latencies=true" in triton["command"]


def test_triton_image_is_named_for_the_triton_release_it_holds(triton):
    """NGC numbering: 24.10 is Triton 2.51 (the wheel's), each month one more: 24.12 is 2.53."""
    year, month = map(int, re.search(r":(\d{2})\.(\d{2})-", triton["build"]["args"]["TRITON_IMAGE"]).groups())
    release = 51 + (year - 24) * 12 + (month - 10)
    assert triton["image"].split(":")[1].startswith(f"2.{release}-{year}.{month:02d}-"), triton["image"]
    assert f"Triton 2.{release} (NGC {year}.{month:02d})" in COMPOSE.read_text()


def test_client_profile_scores_a_csv_against_triton(compose):
    client = compose["services"]["client"]
    assert client["profiles"] == ["client"]
    assert client["depends_on"]["triton"]["condition"] == "service_healthy"
    command = client["command"]
    assert command[0] == "predict" and command[command.index("--url") + 1] == "triton:8001"
    assert (ROOT / "docker" / "client.Dockerfile").is_file()
    assert "mtl-client" in (ROOT / "docker" / "client.Dockerfile").read_text()


def _third_party_imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return {n for n in names if n not in __import__("sys").stdlib_module_names and n != "__future__"}


def test_image_adds_exactly_what_model_py_imports():
    version = ROOT / "model_repository" / "multitask" / "1"
    imports = set().union(
        *(
            _third_party_imports(path)
            for path in [version / "model.py", *sorted((version / "multitask_core").glob("*.py"))]
        )
    )
    # triton_python_backend_utils comes with the python backend; multitask_core is the package beside model.py.
    needed = imports - {"triton_python_backend_utils", "multitask_core"}
    assert {"numpy", "torch", "tokenizers", "safetensors"} <= needed, needed
    words = (DOCKER / "requirements.txt").read_text().split()
    pins = [word for word in words if "==" in word and not word.startswith("#")]
    requirements = dict(line.split("==", 1) for line in pins)
    dockerfile = (DOCKER / "Dockerfile").read_text()
    assert needed - {"torch"} == set(requirements)
    assert "torch==" in dockerfile and "import numpy, torch, tokenizers, safetensors" in dockerfile
    assert int(requirements["numpy"].split(".")[0]) < 2
    project = (ROOT / "pyproject.toml").read_text()
    for name, version_pin in requirements.items():
        assert f'"{name}=={version_pin}"' in project, f"{name} pinned differently from pyproject.toml"


def test_triton_image_is_pinned_to_a_pytorch_python_release(triton):
    image = triton["build"]["args"]["TRITON_IMAGE"]
    assert re.fullmatch(r"nvcr\.io/nvidia/tritonserver:\d{2}\.\d{2}-pyt-python-py3", image), image
    default = re.search(r"ARG TRITON_IMAGE=(\S+)", (DOCKER / "Dockerfile").read_text()).group(1)
    assert default == image
