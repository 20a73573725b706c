"""deploy/monitoring: promtool on the shipped Prometheus files, the Grafana provisioning, and a real Prometheus
(Debian's `prometheus` package) scraping a real local Triton, evaluating every dashboard query and rule.

No Grafana runs here (it is not in Debian's archive); the dashboard's queries are checked through Prometheus.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
MONITORING = ROOT / "deploy" / "monitoring"
PROMETHEUS_CONFIG = MONITORING / "prometheus" / "prometheus.yml"
RULES = MONITORING / "prometheus" / "rules" / "mtl.rules.yml"
RULE_TESTS = MONITORING / "prometheus" / "tests" / "mtl.rules.test.yml"
DATASOURCES = MONITORING / "grafana" / "provisioning" / "datasources" / "prometheus.yml"
PROVIDERS = MONITORING / "grafana" / "provisioning" / "dashboards" / "mtl.yml"
DASHBOARD = MONITORING / "grafana" / "dashboards" / "mtl-triton.json"
COMPOSE = ROOT / "docker-compose.yml"
# The live test's stand-ins for the shipped windows and `for:` durations, with a 1 s scrape and evaluation.
TEST_WINDOW = "60s"
TEST_FOR = "2s"
RATE_INTERVAL = "30s"  # what Grafana's $__rate_interval stands for in the live checks
PROMQL_WORDS = {
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "bool",
    "and",
    "or",
    "unless",
    "offset",
    "inf",
    "nan",
}
SENTENCES = [
    "The central bank raised interest rates again to fight inflation",
    "This new phone's battery dies before lunch, what a waste of money",
    "The film's soundtrack is gorgeous and the cast is wonderful",
    "Shares of the chipmaker fell sharply after weak quarterly results",
    "Tickets for the band's reunion tour sold out in minutes",
    "My laptop keeps overheating whenever I open a browser",
]


def tool(name: str) -> str:
    """Debian's prometheus package (apt-get install prometheus); CI installs it, so there a missing one fails."""
    path = shutil.which(name)
    if path is None:
        if os.environ.get("CI"):
            pytest.fail(f"{name} is not installed: .ci/run must apt-get install prometheus")
        pytest.skip(f"{name} is not installed (apt-get install prometheus)")
    return path


def promtool(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([tool("promtool"), *args], capture_output=True, text=True, cwd=cwd, timeout=120)


def rules() -> list[dict]:
    return [rule for group in yaml.safe_load(RULES.read_text())["groups"] for rule in group["rules"]]


def dashboard_panels() -> list[dict]:
    panels = []
    for panel in json.loads(DASHBOARD.read_text())["panels"]:
        panels.extend([panel, *panel.get("panels", [])])
    return [p for p in panels if p.get("type") != "row"]


def dashboard_queries(tasks: list[str]) -> list[tuple[str, str]]:
    """(panel title, PromQL) with Grafana's variables filled in: one query per task for the $task panels."""
    queries = []
    for panel in dashboard_panels():
        for target in panel["targets"]:
            expr = target["expr"].replace("$__rate_interval", RATE_INTERVAL)
            for task in tasks if "$task" in expr else [None]:
                filled = expr.replace("$task", task) if task else expr
                assert "$" not in filled, f"{panel['title']}: unknown variable in {filled}"
                queries.append((panel["title"], filled))
    return queries


def metric_names(expr: str) -> set[str]:
    """The metric (or recorded series) names a PromQL expression reads."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    expr = re.sub(r"\{[^}]*\}", " ", expr)
    expr = re.sub(r"\[[^\]]*\]", " ", expr)
    expr = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", expr)
    names = set()
    for match in re.finditer(r"(?<![\w.])[A-Za-z_:][A-Za-z0-9_:]*", expr):
        if expr[match.end() :].lstrip().startswith("(") or match.group(0).lower() in PROMQL_WORDS:
            continue  # a function or an operator
        names.add(match.group(0))
    return names


# -- the shipped files, checked by promtool ------------------------------------------------------------------
def test_promtool_accepts_the_prometheus_config_and_its_rule_files():
    result = promtool("check", "config", str(PROMETHEUS_CONFIG))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 rule files found" in result.stdout and f"{len(rules())} rules found" in result.stdout


def test_promtool_accepts_the_rules():
    result = promtool("check", "rules", str(RULES))
    assert result.returncode == 0, result.stdout + result.stderr
    names = [rule.get("alert") for rule in rules() if "alert" in rule]
    assert names == [
        "MtlLabelShareDrift",
        "MtlMedianConfidenceDropped",
        "MtlQueueExceedsCompute",
        "MtlModelNotReady",
        "MtlModelNotServing",
    ]


def test_each_alert_fires_and_stays_quiet_as_its_rule_tests_say():
    result = promtool("test", "rules", RULE_TESTS.name, cwd=RULE_TESTS.parent)
    assert result.returncode == 0, result.stdout + result.stderr
    tested = set(re.findall(r"alertname: (\w+)", RULE_TESTS.read_text()))
    assert tested == {rule["alert"] for rule in rules() if "alert" in rule}


def test_promtool_rejects_a_broken_rule(tmp_path):
    """The check really checks: a misspelt function is refused, naming it."""
    broken = tmp_path / "broken.rules.yml"
    broken.write_text(RULES.read_text().replace("histogram_quantile(", "histogram_quantil(", 1))
    result = promtool("check", "rules", str(broken))
    assert result.returncode != 0 and "histogram_quantil" in result.stdout + result.stderr


def test_alert_thresholds_are_the_documented_ones():
    by_name = {rule["alert"]: rule for rule in rules() if "alert" in rule}
    assert "> 0.2" in by_name["MtlLabelShareDrift"]["expr"] and by_name["MtlLabelShareDrift"]["for"] == "15m"
    assert "- 0.1)" in by_name["MtlMedianConfidenceDropped"]["expr"]
    assert by_name["MtlQueueExceedsCompute"]["expr"].strip() == "mtl:queue_to_compute_ratio:5m > 1"
    assert by_name["MtlQueueExceedsCompute"]["for"] == "5m"
    docs = (ROOT / "docs" / "metrics.md").read_text()
    for name in by_name:
        assert name in docs, f"{name} is not described in docs/metrics.md"


# -- Grafana provisioning -------------------------------------------------------------------------------------
def test_dashboard_panels_use_the_provisioned_data_source():
    source = yaml.safe_load(DATASOURCES.read_text())["datasources"]
    assert [s["type"] for s in source] == ["prometheus"]
    uid = source[0]["uid"]
    compose = yaml.safe_load(COMPOSE.read_text())
    assert source[0]["url"] == f"http://prometheus:{compose['services']['prometheus']['ports'][0].rsplit(':', 1)[1]}"
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["uid"] and dashboard["title"]
    panels = dashboard_panels()
    assert len(panels) >= 10
    for panel in panels:
        assert panel["datasource"]["uid"] == uid, panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == uid and target["expr"].strip(), panel["title"]
    for variable in dashboard["templating"]["list"]:
        assert variable["datasource"]["uid"] == uid


def test_dashboard_covers_what_the_issue_asks_for():
    exprs = " ".join(t["expr"] for p in dashboard_panels() for t in p["targets"])
    for needed in (
        "nv_inference_count",
        'nv_inference_request_summary_us{quantile="0.5"}',
        'nv_inference_request_summary_us{quantile="0.99"}',
        "nv_inference_queue_duration_us",
        "nv_inference_compute_infer_duration_us",
        "mtl_predictions_total",
        "mtl_expected_label_share",
        "mtl_top_probability_bucket",
        "mtl_truncated_rows_total",
        "nv_inference_request_failure",
        "mtl_rejected_requests_total",
        "mtl:label_share_tvd:1h",
    ):
        assert needed in exprs, needed


def test_compose_mounts_the_provisioning_where_grafana_and_prometheus_read_it():
    services = yaml.safe_load(COMPOSE.read_text())["services"]
    grafana, prometheus = services["grafana"], services["prometheus"]
    assert grafana["profiles"] == ["monitoring"] and prometheus["profiles"] == ["monitoring"]
    mounts = {v["target"]: v for v in grafana["volumes"] if isinstance(v, dict)}
    assert (ROOT / mounts["/etc/grafana/provisioning"]["source"]).resolve() == (MONITORING / "grafana" / "provisioning")
    provider = yaml.safe_load(PROVIDERS.read_text())["providers"][0]
    dashboards = mounts[provider["options"]["path"]]
    assert (ROOT / dashboards["source"]).resolve() == DASHBOARD.parent
    home = grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home == f"{provider['options']['path']}/{DASHBOARD.name}"
    config_flag = next(a for a in prometheus["command"] if a.startswith("--config.file="))
    config_path = config_flag.split("=", 1)[1]
    mount = next(v for v in prometheus["volumes"] if isinstance(v, dict) and config_path.startswith(v["target"]))
    assert (ROOT / mount["source"]).resolve() == PROMETHEUS_CONFIG.parent and mount["read_only"] is True
    scrape = yaml.safe_load(PROMETHEUS_CONFIG.read_text())["scrape_configs"]
    assert [job["job_name"] for job in scrape] == ["triton"]
    assert all('job="triton"' in rule["expr"] for rule in rules() if "up{" in rule["expr"] or "absent(" in rule["expr"])
    target = scrape[0]["static_configs"][0]["targets"][0]
    assert target.split(":")[0] in services and target.split(":")[1] in [str(p) for p in services["triton"]["expose"]]


def test_prometheus_image_matches_the_promtool_that_checks_the_rules():
    image = yaml.safe_load(COMPOSE.read_text())["services"]["prometheus"]["image"]
    version = re.fullmatch(r"prom/prometheus:v(\d+\.\d+)\.\d+", image)
    assert version, image
    result = subprocess.run([tool("promtool"), "--version"], capture_output=True, text=True, timeout=60)
    assert f"version {version.group(1)}." in result.stdout + result.stderr


def test_metric_names_reads_names_not_functions_or_labels():
    expr = (
        'sum by (task, le) (rate(mtl_top_probability_bucket{task="a b"}[5m])) / on (task) group_left '
        'max by (task) (mtl:label_share_tvd:1h) > bool 0.5 and up{job="triton"} offset 5m'
    )
    assert metric_names(expr) == {"mtl_top_probability_bucket", "mtl:label_share_tvd:1h", "up"}


# -- a real Prometheus against the real local Triton -------------------------------------------------------
class Prometheus:
    """Debian's prometheus on a free loopback port, with a config written for the test's Triton."""

    def __init__(self, folder: Path, metrics_port: int, rule_file: Path):
        from mtl_serve.local import free_port

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = {
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(rule_file)],
            "scrape_configs": [{"job_name": "triton", "static_configs": [{"targets": [f"127.0.0.1:{metrics_port}"]}]}],
        }
        (folder / "prometheus.yml").write_text(yaml.safe_dump(config))
        self.log = folder / "prometheus.log"
        with self.log.open("wb") as log:
            self.process = subprocess.Popen(
                [
                    tool("prometheus"),
                    f"--config.file={folder / 'prometheus.yml'}",
                    f"--storage.tsdb.path={folder / 'data'}",
                    f"--web.listen-address=127.0.0.1:{self.port}",
                    "--log.level=warn",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        deadline = time.monotonic() + 60
        while not self._ready():
            assert self.process.poll() is None, self.log.read_text()
            assert time.monotonic() < deadline, "prometheus not ready in 60 s:\n" + self.log.read_text()
            time.sleep(0.2)

    def _ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/-/ready", timeout=2) as response:
                return response.status == 200
        except OSError:
            return False

    def api(self, path: str, **params) -> dict:
        query = f"?{urllib.parse.urlencode(params)}" if params else ""
        try:
            with urllib.request.urlopen(f"{self.url}/api/v1/{path}{query}", timeout=30) as response:
                return json.load(response)
        except urllib.error.HTTPError as error:  # a bad query answers 400 with a JSON error
            return json.load(error)

    def query(self, expr: str) -> dict:
        return self.api("query", query=expr)

    def alerts(self, name: str) -> list[dict]:
        return [a for a in self.api("alerts")["data"]["alerts"] if a["labels"]["alertname"] == name]

    def active(self, name: str) -> list[dict]:
        """The alerts of that name that are pending or firing."""
        return [a for a in self.alerts(name) if a["state"] in ("pending", "firing")]

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout=10)


def shortened_rules(tmp_path: Path) -> Path:
    """The shipped rules with every range and `for:` shortened, so that a test can see them act."""
    document = yaml.safe_load(RULES.read_text())
    for group in document["groups"]:
        for rule in group["rules"]:
            rule["expr"] = re.sub(r"\[\d+[smhd]\]", f"[{TEST_WINDOW}]", rule["expr"])
            if "for" in rule:
                rule["for"] = TEST_FOR
    path = tmp_path / "mtl.rules.yml"
    path.write_text(yaml.safe_dump(document, sort_keys=False))
    return path


def scraped_names(url: str) -> set[str]:
    """The sample names Triton's metrics endpoint serves now."""
    with urllib.request.urlopen(url, timeout=10) as response:
        lines = response.read().decode().splitlines()
    return {re.match(r"[a-zA-Z_:][a-zA-Z0-9_:]*", line).group(0) for line in lines if line and not line.startswith("#")}


def wait_until(condition, timeout_s: float, what: str):
    deadline = time.monotonic() + timeout_s
    while True:
        result = condition()
        if result:
            return result
        assert time.monotonic() < deadline, f"timed out after {timeout_s:.0f} s waiting for {what}"
        time.sleep(0.5)


def send(client, model: str, rows: list[str]):
    import numpy as np
    import tritonclient.grpc as grpcclient

    tensor = grpcclient.InferInput("TEXT", [len(rows), 1], "BYTES")
    tensor.set_data_from_numpy(np.array([r.encode() for r in rows], dtype=object).reshape(-1, 1))
    return client.infer(model, [tensor])


@pytest.mark.e2e
def test_prometheus_evaluates_every_dashboard_query_and_rule_against_triton(local_triton, test_config, tmp_path):
    import tritonclient.grpc as grpcclient

    tool("prometheus")
    model = test_config.serving.model_name
    tasks = [task.name for task in test_config.tasks]
    # The same latency summaries as compose's Triton; no watchdog canaries in the traffic this test counts.
    server = local_triton(extra_args=("--metrics-config=summary_latencies=true",), watchdog=False)
    prometheus = Prometheus(tmp_path, server.metrics_port, shortened_rules(tmp_path))
    try:
        client = grpcclient.InferenceServerClient(server.grpc_url)
        long_text = " ".join(["tokens"] * (test_config.backbone.max_tokens * 2))
        for rows in (SENTENCES, SENTENCES[:2], [long_text, SENTENCES[3]], SENTENCES[2:5]):
            send(client, model, rows)
        with pytest.raises(grpcclient.InferenceServerException):
            send(client, model, ["   "])
        scored = len(SENTENCES) + 2 + 2 + 3
        wait_until(
            lambda: (
                (r := prometheus.query("sum(mtl_request_rows_sum)")["data"]["result"])
                and float(r[0]["value"][1]) >= scored
            ),
            60,
            "Prometheus to scrape the scored rows",
        )
        time.sleep(3)  # a few more scrapes and rule evaluations, so every rate has two samples of the traffic

        scraped = scraped_names(server.metrics_url)
        recorded = {rule["record"] for rule in rules() if "record" in rule}
        for title, expr in dashboard_queries(tasks):
            unknown = metric_names(expr) - scraped - recorded - {"up"}
            assert not unknown, f"panel {title!r} reads {sorted(unknown)}, which Triton does not export"
            answer = prometheus.query(expr)
            assert answer["status"] == "success", f"panel {title!r}: {answer.get('error')}\n{expr}"
            assert answer["data"]["result"], f"panel {title!r} returned no series:\n{expr}"
        for name in recorded:
            assert prometheus.query(name)["data"]["result"], f"recording rule {name} returned no series"
        for rule in rules():
            if "alert" in rule:
                answer = prometheus.query(re.sub(r"\[\d+[smhd]\]", f"[{TEST_WINDOW}]", rule["expr"]))
                assert answer["status"] == "success", f"{rule['alert']}: {answer.get('error')}"
        groups = prometheus.api("rules")["data"]["groups"]
        evaluated = [rule for group in groups for rule in group["rules"]]
        assert len(evaluated) == len(rules())
        assert all(rule["health"] == "ok" for rule in evaluated), [r for r in evaluated if r["health"] != "ok"]
        assert not prometheus.alerts("MtlModelNotReady") and not prometheus.alerts("MtlModelNotServing")

        # One text, over and over: every task's live mix is a single label, far from the validation split.
        for _ in range(50):
            send(client, model, [SENTENCES[0]] * 6)
        client.close()
        drift = wait_until(lambda: prometheus.active("MtlLabelShareDrift"), 60, "MtlLabelShareDrift to go pending")
        assert {a["labels"]["task"] for a in drift} <= set(tasks) and drift[0]["labels"]["model"] == model
        assert float(drift[0]["value"]) > 0.2

        server.stop()  # Triton gone: the scrape fails and the model's series go stale
        down = wait_until(lambda: prometheus.active("MtlModelNotReady"), 60, "MtlModelNotReady once Triton stopped")
        assert down[0]["labels"]["job"] == "triton"
    finally:
        prometheus.stop()
