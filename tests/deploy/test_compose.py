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
    result = subprocess.run(cli + ["-f", str(COMPOSE), "config"], capture_output=True, text=True, cwd=ROOT,
                            env=clean_env(), timeout=120)
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
    result = subprocess.run(cli + ["-f", str(broken), "--project-directory", str(ROOT), "config"],
                            capture_output=True, text=True, cwd=ROOT, env=clean_env(), timeout=120)
    assert result.returncode != 0
    assert "capabilites" in result.stderr + result.stdout


def test_gpu_is_reserved(triton):
    devices = triton["deploy"]["resources"]["reservations"]["devices"]
    assert any(d.get("driver") == "nvidia" and "gpu" in d.get("capabilities", []) and (d.get("count") or d.get("device_ids"))
               for d in devices), devices


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
    assert len(_ports(compose["services"]["triton"])) == 3


def test_healthcheck_asks_whether_the_model_is_ready(triton):
    test = " ".join(triton["healthcheck"]["test"])
    assert f"http://127.0.0.1:8000/v2/models/{MODEL_NAME}/ready" in test
    assert any(p.endswith(":8000") for p in _ports(triton)), "the healthcheck's port 8000 is Triton's HTTP port"
    assert "--http-port" not in " ".join(triton["command"])


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
    imports = _third_party_imports(version / "model.py") | _third_party_imports(version / "multitask_core.py")
    # triton_python_backend_utils comes with the python backend; multitask_core is the file beside model.py.
    needed = imports - {"triton_python_backend_utils", "multitask_core"}
    assert needed == {"numpy", "torch", "tokenizers", "safetensors"}, needed
    requirements = {line.split("==")[0]: line.split("==")[1] for line in (DOCKER / "requirements.txt").read_text().split()
                    if "==" in line and not line.startswith("#")}
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
