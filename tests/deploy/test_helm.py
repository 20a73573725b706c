"""deploy/helm/mtl-triton: rendered by a real Helm engine, every object validated, and its settings checked.

No cluster runs here. What runs:
- Helm 4's own engine (the `helm-python-sdk` wheel bundles Helm's Go library as libhelm_c): templates,
  values coalescing, `values.schema.json` enforcement, `fail`, and `helm lint --strict`;
- `kubernetes-validate` in strict mode (unknown fields are errors) for every built-in kind, against the
  Kubernetes releases in KUBERNETES_VERSIONS, from the schemas bundled in the package;
- the two CRD kinds, ServiceMonitor (monitoring.coreos.com/v1) and ScaledObject (keda.sh/v1alpha1), have
  no built-in schema (kubernetes-validate only warns about them): they are validated against the typed
  models that `cloudcoil-models-prometheus-operator` 0.80.1 and `cloudcoil-models-keda` 2.16.1 generate
  from those projects' CRD schemas, and a field the model does not know counts as an error.
A missing tool fails the tests (with the pip command to install it) rather than skipping them.
"""

from __future__ import annotations

import base64
import copy
import importlib
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "deploy" / "helm" / "mtl-triton"
CI_VALUES = sorted((CHART / "ci").glob("*.yaml"))
# The chart's floor (Chart.yaml kubeVersion) and a current release; both bundled with kubernetes-validate 1.37.0.
KUBERNETES_VERSIONS = ("1.28.0", "1.33.0")
RELEASE, NAMESPACE = "demo", "ml"
FULLNAME = f"{RELEASE}-mtl-triton"
CONFIG = yaml.safe_load((ROOT / "config.yaml").read_text())
MODEL = CONFIG["serving"]["model_name"]
CRD_KINDS = {"ServiceMonitor", "ScaledObject"}

PINS = {
    "helm_python": "helm-python-sdk==0.2.2",
    "kubernetes_validate": "kubernetes-validate==1.37.0",
    "cloudcoil.models.prometheus_operator.v1": "cloudcoil-models-prometheus-operator==0.80.1.0",
    "cloudcoil.models.keda.v1alpha1": "cloudcoil-models-keda==2.16.1.0",
    "pydantic": "pydantic==2.14.4",
}


def need(module: str):
    """Import a checking tool, or fail (not skip) saying how to install it."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        pytest.fail(
            f"{module} is needed to check the Helm chart ({exc}); install it: "
            f"{sys.executable} -m pip install {PINS[module]} (pyproject.toml [dev])",
            pytrace=False,
        )


@pytest.fixture(scope="module")
def helm():
    return need("helm_python")


@pytest.fixture(scope="module")
def chart(helm):
    loaded = helm.Chart.load(CHART)
    yield loaded
    loaded.close()


def render_files(chart, values: dict | None = None, **kw) -> dict[str, str]:
    return chart.render(values, name=kw.get("name", RELEASE), namespace=kw.get("namespace", NAMESPACE))


def objects(chart, values: dict | None = None, **kw) -> list[dict]:
    docs = []
    for path, text in render_files(chart, values, **kw).items():
        if path.endswith(".txt"):
            continue
        docs += [doc for doc in yaml.safe_load_all(text) if doc]
    return docs


def find(docs: list[dict], kind: str, name: str | None = None) -> list[dict]:
    return [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]


def one(docs: list[dict], kind: str, name: str | None = None) -> dict:
    found = find(docs, kind, name)
    assert len(found) == 1, f"expected one {kind} {name or ''}, got {[d['metadata']['name'] for d in found]}"
    return found[0]


def pod_spec(docs: list[dict]) -> dict:
    return one(docs, "Deployment")["spec"]["template"]["spec"]


def triton(docs: list[dict]) -> dict:
    containers = pod_spec(docs)["containers"]
    assert [c["name"] for c in containers] == ["triton"]
    return containers[0]


def env(container: dict) -> dict[str, dict]:
    return {e["name"]: e for e in container.get("env", [])}


def args(container: dict) -> dict[str, str]:
    flags = {}
    for arg in container["args"][1:]:
        key, _, value = arg.partition("=")
        assert key not in flags, f"{key} given twice"
        flags[key] = value
    return flags


def load_ci(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def rejected(helm, chart, values: dict) -> str:
    with pytest.raises(helm.HelmError) as caught:
        render_files(chart, values)
    return str(caught.value)


@pytest.fixture(scope="module")
def default(chart) -> list[dict]:
    return objects(chart)


@pytest.fixture(scope="module")
def full(chart) -> list[dict]:
    return objects(chart, load_ci(CHART / "ci" / "full-values.yaml"))


@pytest.fixture(scope="module")
def keda(chart) -> list[dict]:
    return objects(chart, load_ci(CHART / "ci" / "keda-values.yaml"))


# -- the tools and the validation ------------------------------------------------------------------------


def test_helm_engine_is_the_pinned_one(helm):
    assert helm.__version__ == "0.2.2"
    assert helm.helm_sdk_version() == "v4.2.3"


@pytest.mark.parametrize("kube", KUBERNETES_VERSIONS)
def test_helm_lint_strict_is_clean(helm, kube):
    for values in [None] + [load_ci(p) for p in CI_VALUES]:
        report = helm.lint(CHART, values, strict=True, kube_version=f"v{kube}")
        problems = [m for m in report["messages"] if m["severity"] >= 2]
        assert report["total_charts_linted"] == 1
        assert not problems and not report["errors"], (values, problems, report["errors"])


RENDERINGS = [pytest.param(None, id="defaults")] + [pytest.param(p, id=p.stem) for p in CI_VALUES]


@pytest.mark.parametrize("values_file", RENDERINGS)
@pytest.mark.parametrize("kube", KUBERNETES_VERSIONS)
def test_every_builtin_object_passes_kubernetes_validate_strict(chart, values_file, kube):
    kv = need("kubernetes_validate")
    docs = objects(chart, load_ci(values_file) if values_file else None)
    assert docs
    validated = 0
    for doc in docs:
        label = f"{doc['kind']}/{doc['metadata']['name']}"
        try:
            kv.validate(doc, kube, strict=True)
            validated += 1
        except kv.SchemaNotFoundError:
            assert doc["kind"] in CRD_KINDS, f"{label}: no schema in kubernetes-validate for Kubernetes {kube}"
        except kv.ValidationError as exc:
            pytest.fail(f"{label} is invalid for Kubernetes {kube}: {'.'.join(map(str, exc.path))}: {exc.message}")
    assert validated == len([d for d in docs if d["kind"] not in CRD_KINDS])


def test_kubernetes_validate_cli_on_the_whole_release(chart, tmp_path):
    """The command-line tool, as an operator would run it on `helm template` output."""
    need("kubernetes_validate")
    manifest = tmp_path / "release.yaml"
    rendered = render_files(chart, load_ci(CHART / "ci" / "full-values.yaml"))
    manifest.write_text("\n---\n".join(text for path, text in rendered.items() if not path.endswith(".txt")))
    run = subprocess.run(
        [sys.executable, "-m", "kubernetes_validate", "--strict", "-k", KUBERNETES_VERSIONS[-1], str(manifest)],
        check=False,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    passed = re.findall(r"^INFO .* passed for resource (\S+)", run.stdout, re.MULTILINE)
    assert f"deployment/{FULLNAME}" in passed and f"horizontalpodautoscaler/{FULLNAME}" in passed
    assert f"service/{FULLNAME}-headless" in passed and f"networkpolicy/{FULLNAME}" in passed
    # The CRD kind is not something it can check: it says so (validated separately below).
    assert re.search(r"^WARN .*kind ServiceMonitor", run.stdout, re.MULTILINE), run.stdout


def unknown_fields(given, parsed, path="") -> list[str]:
    """Fields of `given` that the typed model dropped (it ignores what it does not know)."""
    if isinstance(given, dict):
        if not isinstance(parsed, dict):
            return [path or "."]
        return [
            p
            for k, v in given.items()
            for p in ([f"{path}.{k}"] if k not in parsed else unknown_fields(v, parsed[k], f"{path}.{k}"))
        ]
    if isinstance(given, list):
        if not isinstance(parsed, list) or len(parsed) != len(given):
            return [path]
        pairs = enumerate(zip(given, parsed, strict=True))
        return [p for i, (a, b) in pairs for p in unknown_fields(a, b, f"{path}[{i}]")]
    return []


def validate_crd(doc: dict) -> None:
    if doc["kind"] == "ServiceMonitor":
        model = need("cloudcoil.models.prometheus_operator.v1").ServiceMonitor
    else:
        model = need("cloudcoil.models.keda.v1alpha1").ScaledObject
    parsed = model.model_validate(doc).model_dump(by_alias=True, exclude_unset=True, mode="json")
    extra = unknown_fields(doc, parsed)
    assert not extra, f"{doc['kind']}: fields not in its CRD schema: {extra}"


def test_crd_objects_match_their_crd_schemas(full, keda):
    docs = find(full, "ServiceMonitor") + find(keda, "ServiceMonitor") + find(keda, "ScaledObject")
    assert sorted(d["kind"] for d in docs) == ["ScaledObject", "ServiceMonitor", "ServiceMonitor"]
    for doc in docs:
        validate_crd(doc)


def test_crd_check_catches_unknown_fields_and_wrong_types(keda):
    pydantic = need("pydantic")
    scaled = copy.deepcopy(one(keda, "ScaledObject"))
    scaled["spec"]["minReplicas"] = 1  # the HPA's name; KEDA's is minReplicaCount
    with pytest.raises(AssertionError, match=r"\.spec\.minReplicas"):
        validate_crd(scaled)
    monitor = copy.deepcopy(one(keda, "ServiceMonitor"))
    monitor["spec"]["endpoints"][0]["interval"] = 15
    with pytest.raises(pydantic.ValidationError):
        validate_crd(monitor)


# -- values.schema.json ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "values, where",
    [
        ({"replicaCount": -1}, "/replicaCount"),
        ({"replicaCount": "two"}, "/replicaCount"),
        ({"replicas": 2}, "additional properties 'replicas'"),
        ({"resources": {"gpu": -1}}, "/resources/gpu"),
        ({"resources": {"gpu": "1"}}, "/resources/gpu"),
        ({"resources": {"limits": {"memory": "lots"}}}, "/resources/limits/memory"),
        ({"shm": {"sizeLimit": "big"}}, "/shm/sizeLimit"),
        ({"shm": {"sizeLimit": 1024}}, "/shm/sizeLimit"),
        ({"ports": {"grpc": 70000}}, "/ports/grpc"),
        ({"model": {"name": "multi task"}}, "/model/name"),
        ({"modelRepository": {"source": "nfs"}}, "/modelRepository/source"),
        ({"modelRepository": {"source": "s3"}}, "/modelRepository/s3/uri"),
        ({"modelRepository": {"source": "s3", "s3": {"uri": "gs://bucket/models"}}}, "/modelRepository/s3/uri"),
        ({"modelRepository": {"source": "gcs", "gcs": {"uri": "/models"}}}, "/modelRepository/gcs/uri"),
        ({"modelRepository": {"pvc": {"subPath": "/abs"}}}, "/modelRepository/pvc/subPath"),
        ({"image": {"pullPolicy": "Sometimes"}}, "/image/pullPolicy"),
        ({"image": {"digest": "latest"}}, "/image/digest"),
        ({"rollingUpdate": {"maxSurge": 0}}, "/rollingUpdate/maxSurge"),
        ({"probes": {"startup": {"failureThreshold": 0}}}, "/probes/startup/failureThreshold"),
        ({"mallocMmapThreshold": -1}, "/mallocMmapThreshold"),
        ({"adminKey": {"apis": ["everything"]}}, "/adminKey/apis"),
        ({"triton": {"extraArgs": ["model-control-mode=poll"]}}, "/triton/extraArgs"),
        ({"autoscaling": {"engine": "gpu-utilisation"}}, "/autoscaling/engine"),
        ({"autoscaling": {"targetQueueComputeRatio": "0"}}, "/autoscaling/targetQueueComputeRatio"),
        ({"autoscaling": {"targetQueueComputeRatio": "500m"}}, "/autoscaling/targetQueueComputeRatio"),
        ({"autoscaling": {"targetQueueComputeRatio": 0.5}}, "/autoscaling/targetQueueComputeRatio"),
        ({"autoscaling": {"minReplicas": 0}}, "/autoscaling/minReplicas"),
        ({"serviceMonitor": {"interval": "15 seconds"}}, "/serviceMonitor/interval"),
        ({"service": {"type": "ExternalName"}}, "/service/type"),
        ({"networkPolicy": {"enabled": "yes"}}, "/networkPolicy/enabled"),
    ],
)
def test_schema_rejects_bad_values(helm, chart, values, where):
    message = rejected(helm, chart, values)
    assert "schema" in message and where in message, message


def test_schema_accepts_the_defaults_and_every_ci_file(chart):
    chart.validate_schema(None)
    for path in CI_VALUES:
        chart.validate_schema(load_ci(path))


# -- the Deployment ---------------------------------------------------------------------------------------


def test_image_is_the_one_docker_compose_builds(default, chart):
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    assert triton(default)["image"] == compose["services"]["triton"]["image"]
    digest = "sha256:" + "ab" * 32
    pinned = triton(objects(chart, {"image": {"digest": digest}}))["image"]
    assert pinned == f"mtl-triton/triton@{digest}"


def test_model_name_default_is_config_yaml_serving_model_name(chart, default):
    assert chart.values["model"]["name"] == MODEL
    container = triton(default)
    assert container["startupProbe"]["httpGet"]["path"] == f"/v2/models/{MODEL}/ready"


def test_probes(default):
    container = triton(default)
    startup, ready, live = container["startupProbe"], container["readinessProbe"], container["livenessProbe"]
    assert ready["httpGet"] == {"path": f"/v2/models/{MODEL}/ready", "port": "http"}
    assert live["httpGet"] == {"path": "/v2/health/live", "port": "http"}
    assert startup["httpGet"] == ready["httpGet"]
    # The model load (bucket download, CUDA start-up, first forward) gets minutes, not liveness's 30 s;
    # docker-compose.yml's healthcheck allows 180 s.
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 300
    assert live["periodSeconds"] * live["failureThreshold"] < startup["periodSeconds"] * startup["failureThreshold"]
    named = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert named == {"http": 8000, "grpc": 8001, "metrics": 8002}


def test_probes_follow_the_model_name_and_values(chart):
    container = triton(
        objects(
            chart, {"model": {"name": "mtl_v2"}, "probes": {"startup": {"periodSeconds": 5, "failureThreshold": 240}}}
        )
    )
    assert container["readinessProbe"]["httpGet"]["path"] == "/v2/models/mtl_v2/ready"
    assert container["startupProbe"]["httpGet"]["path"] == "/v2/models/mtl_v2/ready"
    assert container["startupProbe"]["failureThreshold"] == 240
    assert container["livenessProbe"]["httpGet"]["path"] == "/v2/health/live"


def mounts(container: dict) -> dict[str, dict]:
    return {m["mountPath"]: m for m in container["volumeMounts"]}


def volumes(docs: list[dict]) -> dict[str, dict]:
    return {v["name"]: v for v in pod_spec(docs)["volumes"]}


def test_dev_shm_is_a_memory_emptydir_sized_from_values(chart, default):
    assert mounts(triton(default))["/dev/shm"]["name"] == "shm"
    assert volumes(default)["shm"]["emptyDir"] == {"medium": "Memory", "sizeLimit": "1Gi"}
    bigger = objects(chart, {"shm": {"sizeLimit": "4Gi"}, "resources": {"limits": {"memory": "16Gi"}}})
    assert volumes(bigger)["shm"]["emptyDir"] == {"medium": "Memory", "sizeLimit": "4Gi"}


def test_gpu_limits_tolerations_and_node_selector(chart, default, full):
    limits = triton(default)["resources"]["limits"]
    assert limits["nvidia.com/gpu"] == 1
    assert "nvidia.com/gpu" not in triton(default)["resources"].get("requests", {})
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod_spec(default)["tolerations"]
    assert "nodeSelector" not in pod_spec(default)
    assert pod_spec(full)["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert pod_spec(full)["runtimeClassName"] == "nvidia"
    two = objects(
        chart,
        {
            "resources": {"gpu": 2},
            "tolerations": [{"key": "dedicated", "operator": "Equal", "value": "inference", "effect": "NoSchedule"}],
        },
    )
    assert triton(two)["resources"]["limits"]["nvidia.com/gpu"] == 2
    assert pod_spec(two)["tolerations"] == [
        {"key": "dedicated", "operator": "Equal", "value": "inference", "effect": "NoSchedule"}
    ]
    cpu_only = triton(objects(chart, {"resources": {"gpu": 0}}))["resources"]
    assert cpu_only["limits"] == {"memory": "12Gi"}
    # A null removes a default in Helm; with no GPU either, no limits at all.
    assert "limits" not in triton(objects(chart, {"resources": {"gpu": 0, "limits": None}}))["resources"]


def test_security_context_non_root_read_only_no_capabilities(default):
    pod = pod_spec(default)["securityContext"]
    assert pod["runAsNonRoot"] is True and pod["runAsUser"] != 0 and pod["runAsGroup"] != 0
    assert pod["seccompProfile"] == {"type": "RuntimeDefault"}
    container = triton(default)["securityContext"]
    assert container["readOnlyRootFilesystem"] is True
    assert container["allowPrivilegeEscalation"] is False
    assert container["capabilities"] == {"drop": ["ALL"]}
    assert pod_spec(default)["automountServiceAccountToken"] is False


def test_every_writable_path_is_an_emptydir(default):
    """With a read-only root, what Triton, the stub, torch and CUDA write must land on a writable volume."""
    container, vols = triton(default), volumes(default)
    writable = {path: m for path, m in mounts(container).items() if not m.get("readOnly")}
    assert set(writable) == {"/dev/shm", "/tmp"}
    assert all("emptyDir" in vols[m["name"]] for m in writable.values())
    assert vols["tmp"]["emptyDir"]["sizeLimit"] == "4Gi"
    variables = env(container)
    # Triton copies an s3:// or gs:// repository into /tmp/folderXXXXXX; HOME and caches go there too.
    assert variables["HOME"]["value"].startswith("/tmp")
    assert variables["XDG_CACHE_HOME"]["value"].startswith("/tmp/")
    assert mounts(container)["/models"]["readOnly"] is True


def test_malloc_threshold_is_the_one_docs_reliability_md_asks_for(chart, default):
    doc = (ROOT / "docs" / "reliability.md").read_text()
    asked = {int(n) for n in re.findall(r"MALLOC_MMAP_THRESHOLD_=(\d+)", doc)}
    assert len(asked) == 1, asked
    from mtl_serve.local import LocalTriton

    assert LocalTriton.malloc_mmap_threshold in asked  # what mtl-serve sets
    assert int(env(triton(default))["MALLOC_MMAP_THRESHOLD_"]["value"]) in asked
    assert "MALLOC_MMAP_THRESHOLD_" not in env(triton(objects(chart, {"mallocMmapThreshold": 0})))


def test_triton_flags_for_a_server(default):
    flags = args(triton(default))
    assert triton(default)["args"][0] == "tritonserver"
    assert flags["--model-control-mode"] == "none"
    assert flags["--model-repository"] == "/models"
    assert flags["--exit-on-error"] == "true"
    assert flags["--exit-timeout-secs"] == "30"
    assert (flags["--http-port"], flags["--grpc-port"], flags["--metrics-port"]) == ("8000", "8001", "8002")
    assert flags["--allow-metrics"] == "true"
    assert flags["--metrics-config"] == "summary_latencies=true"
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]["triton"]["command"]
    for flag in ("--model-control-mode", "--exit-timeout-secs", "--metrics-config"):
        assert f"{flag}={flags[flag]}" in compose, (flag, compose)


def test_restricted_apis_need_the_admin_key_from_a_secret(chart, default):
    from mtl_serve.local import ADMIN_HEADER, RESTRICTED_APIS

    flags = args(triton(default))
    expected = f"{','.join(RESTRICTED_APIS)}:{ADMIN_HEADER}=$(MTL_ADMIN_KEY)"
    assert flags["--http-restricted-api"] == expected
    assert flags["--grpc-restricted-protocol"] == expected
    ref = env(triton(default))["MTL_ADMIN_KEY"]["valueFrom"]["secretKeyRef"]
    secret = one(default, "Secret", ref["name"])
    key = base64.b64decode(secret["data"][ref["key"]]).decode()
    assert re.fullmatch(r"[A-Za-z0-9]{40}", key)
    assert secret["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"

    theirs = objects(chart, {"adminKey": {"existingSecret": "ops-admin-key"}})
    assert not find(theirs, "Secret")
    assert env(triton(theirs))["MTL_ADMIN_KEY"]["valueFrom"]["secretKeyRef"]["name"] == "ops-admin-key"

    off = objects(chart, {"adminKey": {"enabled": False}})
    assert not find(off, "Secret")
    assert "--http-restricted-api" not in args(triton(off)) and "MTL_ADMIN_KEY" not in env(triton(off))


def test_extra_args_and_env_are_passed_on(chart):
    container = triton(
        objects(
            chart,
            {
                "triton": {"extraArgs": ["--log-format=ISO8601"]},
                "extraEnv": [{"name": "CUDA_MODULE_LOADING", "value": "LAZY"}],
            },
        )
    )
    assert container["args"][-1] == "--log-format=ISO8601"
    assert env(container)["CUDA_MODULE_LOADING"]["value"] == "LAZY"


# -- the model repository --------------------------------------------------------------------------------


def test_pvc_repository_created_by_default(default):
    claim = one(default, "PersistentVolumeClaim")
    assert volumes(default)["models"]["persistentVolumeClaim"] == {
        "claimName": claim["metadata"]["name"],
        "readOnly": True,
    }
    assert claim["spec"]["resources"]["requests"]["storage"] == "2Gi"
    assert claim["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"


def test_existing_claim_and_sub_path(chart):
    docs = objects(chart, load_ci(CHART / "ci" / "pvc-existing-values.yaml"))
    assert not find(docs, "PersistentVolumeClaim")
    assert volumes(docs)["models"]["persistentVolumeClaim"]["claimName"] == "mtl-models"
    assert mounts(triton(docs))["/models"]["subPath"] == "releases/0.1.0"
    assert args(triton(docs))["--model-repository"] == "/models"


def test_s3_repository_with_credentials_from_a_secret(chart):
    docs = objects(chart, load_ci(CHART / "ci" / "s3-values.yaml"))
    container = triton(docs)
    assert args(container)["--model-repository"] == "s3://my-models/mtl-triton/0.1.0"
    variables = env(container)
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        assert variables[name]["valueFrom"]["secretKeyRef"] == {"name": "mtl-s3", "key": name}
    assert variables["AWS_SESSION_TOKEN"]["valueFrom"]["secretKeyRef"]["optional"] is True
    assert variables["AWS_DEFAULT_REGION"]["value"] == "eu-west-1"
    assert "models" not in volumes(docs) and "/models" not in mounts(container)
    assert not find(docs, "PersistentVolumeClaim")


def test_s3_without_a_secret_passes_no_keys(chart):
    """IAM roles for service accounts: the role comes from the ServiceAccount's annotation."""
    role = {"eks.amazonaws.com/role-arn": "arn:aws:iam::123456789012:role/mtl-models"}
    docs = objects(
        chart,
        {
            "modelRepository": {"source": "s3", "s3": {"uri": "s3://https://minio.local:9000/models/mtl"}},
            "serviceAccount": {"annotations": role},
        },
    )
    assert args(triton(docs))["--model-repository"] == "s3://https://minio.local:9000/models/mtl"
    assert not {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"} & set(env(triton(docs)))
    assert one(docs, "ServiceAccount")["metadata"]["annotations"] == role


def test_gcs_repository_with_a_mounted_key(chart):
    docs = objects(chart, load_ci(CHART / "ci" / "gcs-values.yaml"))
    container = triton(docs)
    assert args(container)["--model-repository"] == "gs://my-models/mtl-triton/0.1.0"
    key_path = env(container)["GOOGLE_APPLICATION_CREDENTIALS"]["value"]
    mount = next(m for m in container["volumeMounts"] if key_path.startswith(m["mountPath"] + "/"))
    assert mount["readOnly"] is True
    secret = volumes(docs)[mount["name"]]["secret"]
    assert secret["secretName"] == "mtl-gcs"
    assert secret["items"] == [{"key": "key.json", "path": key_path.rsplit("/", 1)[1]}]


# -- Services, PDB, NetworkPolicy, ServiceMonitor --------------------------------------------------------


def labels_match(selector: dict, labels: dict) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def test_service_ports_and_selector(default):
    service = one(default, "Service", FULLNAME)
    ports = {p["name"]: (p["port"], p["targetPort"]) for p in service["spec"]["ports"]}
    assert ports == {"http": (8000, "http"), "grpc": (8001, "grpc"), "metrics": (8002, "metrics")}
    pod_labels = one(default, "Deployment")["spec"]["template"]["metadata"]["labels"]
    assert labels_match(service["spec"]["selector"], pod_labels)
    assert service["spec"]["type"] == "ClusterIP"


def test_headless_service_off_by_default_on_for_grpc_round_robin(default, full):
    assert [s["metadata"]["name"] for s in find(default, "Service")] == [FULLNAME]
    headless = one(full, "Service", f"{FULLNAME}-headless")
    assert headless["spec"]["clusterIP"] == "None"
    assert headless["spec"]["publishNotReadyAddresses"] is False
    assert {p["name"]: p["port"] for p in headless["spec"]["ports"]}["grpc"] == 8001
    pod_labels = one(full, "Deployment")["spec"]["template"]["metadata"]["labels"]
    assert labels_match(headless["spec"]["selector"], pod_labels)


def test_pod_disruption_budget(chart, default):
    pdb = one(default, "PodDisruptionBudget")
    assert pdb["spec"]["maxUnavailable"] == 1 and "minAvailable" not in pdb["spec"]
    assert labels_match(
        pdb["spec"]["selector"]["matchLabels"], one(default, "Deployment")["spec"]["template"]["metadata"]["labels"]
    )
    min_one = one(objects(chart, load_ci(CHART / "ci" / "pvc-existing-values.yaml")), "PodDisruptionBudget")
    assert min_one["spec"]["minAvailable"] == 1 and "maxUnavailable" not in min_one["spec"]
    assert not find(objects(chart, {"podDisruptionBudget": {"enabled": False}}), "PodDisruptionBudget")


def test_pod_disruption_budget_needs_exactly_one_bound(helm, chart):
    message = rejected(helm, chart, {"podDisruptionBudget": {"minAvailable": 1}})
    assert "exactly one of minAvailable and maxUnavailable" in message
    message = rejected(helm, chart, {"podDisruptionBudget": {"maxUnavailable": None}})
    assert "exactly one of minAvailable and maxUnavailable" in message


def test_network_policy_optional(default, full, chart):
    assert not find(default, "NetworkPolicy")
    policy = one(full, "NetworkPolicy")["spec"]
    assert labels_match(
        policy["podSelector"]["matchLabels"], one(full, "Deployment")["spec"]["template"]["metadata"]["labels"]
    )
    inference, scrape = policy["ingress"]
    client_label = {f"{FULLNAME}-client": "true"}
    assert {"podSelector": {"matchLabels": client_label}} in inference["from"]
    assert {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "gateway"}}} in inference["from"]
    assert {p["port"] for p in inference["ports"]} == {"grpc", "http"}
    assert [p["port"] for p in scrape["ports"]] == ["metrics"]
    assert policy["policyTypes"] == ["Ingress", "Egress"]
    assert any(p["port"] == 53 for rule in policy["egress"] for p in rule.get("ports", []))
    # The `helm test` pod carries the client label, so it gets through.
    test_pod = one(full, "Pod")
    assert labels_match(client_label, test_pod["metadata"]["labels"])
    ingress_only = one(objects(chart, {"networkPolicy": {"enabled": True}}), "NetworkPolicy")["spec"]
    assert ingress_only["policyTypes"] == ["Ingress"] and "egress" not in ingress_only
    assert len(ingress_only["ingress"]) == 1


def test_service_monitor_optional_and_scrapes_the_metrics_port(default, full):
    assert not find(default, "ServiceMonitor")
    monitor = one(full, "ServiceMonitor")
    assert monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    assert monitor["spec"]["namespaceSelector"] == {"matchNames": [NAMESPACE]}
    selected = [
        s
        for s in find(full, "Service")
        if labels_match(monitor["spec"]["selector"]["matchLabels"], s["metadata"]["labels"])
    ]
    assert [s["metadata"]["name"] for s in selected] == [FULLNAME]
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["port"] == "metrics" and endpoint["path"] == "/metrics"
    assert endpoint["port"] in {p["name"] for p in selected[0]["spec"]["ports"]}


# -- autoscaling -----------------------------------------------------------------------------------------

RATIO_METRICS = ("nv_inference_queue_duration_us", "nv_inference_compute_infer_duration_us")


def assert_queue_compute_ratio(query: str, selector: str, model: str = MODEL) -> None:
    queue, compute = RATIO_METRICS
    pattern = (
        rf"^sum(?: by \((?P<by>[^)]*)\))?\(rate\({queue}\{{(?P<s1>[^}}]*)\}}\[1m\]\)\) / "
        rf"clamp_min\(sum(?: by \((?P<by2>[^)]*)\))?\(rate\({compute}\{{(?P<s2>[^}}]*)\}}\[1m\]\)\), 1\)$"
    )
    match = re.match(pattern, query)
    assert match, query
    assert match["s1"] == match["s2"] == selector
    assert match["by"] == match["by2"]
    assert f'model="{model}"' in selector
    assert "gpu" not in query.lower()


def test_autoscaling_off_by_default(default):
    assert not find(default, "HorizontalPodAutoscaler") and not find(default, "ScaledObject")
    assert not find(default, "ConfigMap")
    assert one(default, "Deployment")["spec"]["replicas"] == 1


def test_hpa_on_the_prometheus_adapter_metric(full):
    hpa = one(full, "HorizontalPodAutoscaler")
    deployment = one(full, "Deployment")
    assert "replicas" not in deployment["spec"], "the HPA owns the replica count"
    assert hpa["spec"]["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": deployment["metadata"]["name"],
    }
    assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (2, 6)
    (metric,) = hpa["spec"]["metrics"]
    assert metric["type"] == "Pods"
    assert metric["pods"]["target"] == {"type": "AverageValue", "averageValue": "1"}

    rule_map = one(full, "ConfigMap", f"{FULLNAME}-adapter-rule")
    (rule,) = yaml.safe_load(rule_map["data"]["rules.yaml"])
    assert rule["name"]["as"] == metric["pods"]["metric"]["name"]
    assert rule["seriesQuery"].startswith(RATIO_METRICS[0] + "{") and f'model="{MODEL}"' in rule["seriesQuery"]
    assert rule["resources"]["overrides"] == {"namespace": {"resource": "namespace"}, "pod": {"resource": "pod"}}
    assert_queue_compute_ratio(rule["metricsQuery"], f'<<.LabelMatchers>>,model="{MODEL}"')
    assert "by (<<.GroupBy>>)" in rule["metricsQuery"]


def test_adapter_rule_configmap_optional(chart):
    values = load_ci(CHART / "ci" / "full-values.yaml")
    values["autoscaling"]["prometheusAdapter"] = {"renderRuleConfigMap": False}
    docs = objects(chart, values)
    assert find(docs, "HorizontalPodAutoscaler") and not find(docs, "ConfigMap")


def test_keda_scaled_object_with_a_prometheus_trigger(keda):
    assert not find(keda, "HorizontalPodAutoscaler"), "KEDA makes the HPA itself"
    scaled = one(keda, "ScaledObject")["spec"]
    assert scaled["scaleTargetRef"]["name"] == FULLNAME
    assert (scaled["minReplicaCount"], scaled["maxReplicaCount"]) == (1, 8)
    assert "replicas" not in one(keda, "Deployment")["spec"]
    (trigger,) = scaled["triggers"]
    assert trigger["type"] == "prometheus"
    # A ratio is not a per-pod total: Value, not AverageValue (replicas grow by ratio / threshold).
    assert trigger["metricType"] == "Value"
    assert trigger["metadata"]["threshold"] == "1"
    assert float(trigger["metadata"]["threshold"]) > 0
    assert trigger["authenticationRef"] == {"name": "prometheus-auth"}
    assert_queue_compute_ratio(
        trigger["metadata"]["query"], f'namespace="{NAMESPACE}",service="{FULLNAME}",model="{MODEL}"'
    )


def test_autoscaling_follows_model_name_and_target(chart):
    values = load_ci(CHART / "ci" / "keda-values.yaml")
    values["model"] = {"name": "mtl_v2"}
    values["autoscaling"]["targetQueueComputeRatio"] = "1.25"
    trigger = one(objects(chart, values), "ScaledObject")["spec"]["triggers"][0]
    assert trigger["metadata"]["threshold"] == "1.25"
    assert_queue_compute_ratio(
        trigger["metadata"]["query"], f'namespace="{NAMESPACE}",service="{FULLNAME}",model="mtl_v2"', model="mtl_v2"
    )


def test_autoscaling_min_above_max_is_refused(helm, chart):
    message = rejected(helm, chart, {"autoscaling": {"enabled": True, "minReplicas": 5, "maxReplicas": 2}})
    assert "autoscaling.minReplicas (5) is above autoscaling.maxReplicas (2)" in message


# -- rolling updates and graceful stop -------------------------------------------------------------------


def test_rolling_update_never_drops_a_serving_pod(default):
    strategy = one(default, "Deployment")["spec"]["strategy"]
    assert strategy == {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1}}


def test_grace_period_covers_pre_stop_and_triton_exit_timeout(default):
    spec = pod_spec(default)
    pre_stop = triton(default)["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep"
    exit_timeout = int(args(triton(default))["--exit-timeout-secs"])
    assert int(pre_stop[1]) > 0
    assert spec["terminationGracePeriodSeconds"] >= int(pre_stop[1]) + exit_timeout


def test_too_short_grace_period_fails_the_render(helm, chart):
    message = rejected(helm, chart, {"terminationGracePeriodSeconds": 30, "triton": {"exitTimeoutSeconds": 30}})
    assert "terminationGracePeriodSeconds (30) must be at least" in message and "= 45" in message
    ok = objects(
        chart,
        {
            "terminationGracePeriodSeconds": 95,
            "triton": {"exitTimeoutSeconds": 80},
            "lifecycle": {"preStopSleepSeconds": 10},
        },
    )
    assert pod_spec(ok)["terminationGracePeriodSeconds"] == 95
    assert args(triton(ok))["--exit-timeout-secs"] == "80"


# -- helm test, NOTES, names -----------------------------------------------------------------------------


def test_helm_test_pod_asks_the_service_for_model_readiness(chart, default):
    assert not find(objects(chart, {"tests": {"enabled": False}}), "Pod")
    pod = one(default, "Pod")
    assert pod["metadata"]["annotations"]["helm.sh/hook"] == "test"
    script = pod["spec"]["containers"][0]["command"][-1]
    assert f"http://{FULLNAME}:8000/v2/models/{MODEL}/ready" in script
    assert pod["spec"]["containers"][0]["securityContext"]["readOnlyRootFilesystem"] is True
    compile(script, "helm-test", "exec")


def test_notes_and_long_release_names(chart):
    notes = render_files(chart, load_ci(CHART / "ci" / "full-values.yaml"))["mtl-triton/templates/NOTES.txt"]
    assert f"dns:///{FULLNAME}-headless.{NAMESPACE}.svc.cluster.local:8001" in notes and "round_robin" in notes
    long_name = "a" * 53  # Helm's longest release name
    docs = objects(chart, load_ci(CHART / "ci" / "full-values.yaml"), name=long_name)
    for doc in docs:
        assert len(doc["metadata"]["name"]) <= 63, doc["metadata"]["name"]
    names = [d["metadata"]["name"] for d in find(docs, "Service")]
    assert len(set(names)) == 2 and any(n.endswith("-headless") for n in names)
