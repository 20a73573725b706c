"""Restricted APIs, and gRPC over TLS with a header-based key, against the real server.

Model control is off (--model-control-mode=none) and the model-repository, shared-memory, logging and
trace APIs need the per-start admin key: HTTP header `mtl-admin-key`, gRPC metadata
`triton-grpc-protocol-mtl-admin-key` (Triton 2.51 prefixes restricted gRPC keys). Without it they are
refused; with it they get past the restriction (and model load/unload then meets model-control=none).
"""

from __future__ import annotations

import os
import subprocess
from multiprocessing import shared_memory
from pathlib import Path

import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from rel_helpers import BIN, COUNTS, read_output, write_csv
from tritonclient.utils import InferenceServerException

from mtl_client import MTLClientError, MultiTaskClient, ServerUnavailableError
from mtl_serve import ADMIN_HEADER, GRPC_ADMIN_HEADER, LocalTriton
from mtl_serve.procs import cmdline

pytestmark = pytest.mark.reliability
TEXTS = ["The bank's shares rallied after earnings", "This phone update is useless", "A joyful new album"]


@pytest.fixture
def region():
    memory = shared_memory.SharedMemory(create=True, size=64)
    yield "/" + memory.name
    memory.close()
    memory.unlink()


def _outcome(call) -> str:
    COUNTS.inputs += 1
    try:
        call()
    except InferenceServerException as exc:
        return exc.message() or str(exc)
    return "ok"


# tritonclient's gRPC and HTTP clients share these method names, so one table serves both protocols.
RESTRICTED_CALLS = {
    "load": lambda c, h, r: c.load_model("multitask", headers=h),
    "unload": lambda c, h, r: c.unload_model("multitask", headers=h),
    "repository index": lambda c, h, r: c.get_model_repository_index(headers=h),
    "shared-memory register": lambda c, h, r: (
        c.register_system_shared_memory("rel", r, 64, headers=h),
        c.unregister_system_shared_memory("rel", headers=h),
    ),
    "shared-memory status": lambda c, h, r: c.get_system_shared_memory_status(headers=h),
    "log settings": lambda c, h, r: c.update_log_settings({"log_verbose_level": 0}, headers=h),
    "trace settings": lambda c, h, r: c.get_trace_settings(headers=h),
}


def _assert_let_through(server, call: str, allowed: str) -> None:
    """With the key the call passes the restriction; load/unload then meet model control mode none."""
    assert "restricted" not in allowed, allowed
    if call in ("load", "unload"):
        assert "explicit model load / unload is not allowed" in allowed, allowed
    else:
        assert allowed == "ok", allowed
    assert server.is_ready("multitask")


@pytest.mark.parametrize("call", list(RESTRICTED_CALLS))
def test_grpc_restricted_api_needs_the_admin_key(rel_server, region, call):
    with grpcclient.InferenceServerClient(rel_server.grpc_url) as client:
        refused = _outcome(lambda: RESTRICTED_CALLS[call](client, None, region))
        wrong = _outcome(lambda: RESTRICTED_CALLS[call](client, {GRPC_ADMIN_HEADER: "not-the-key"}, region))
        allowed = _outcome(lambda: RESTRICTED_CALLS[call](client, {GRPC_ADMIN_HEADER: rel_server.admin_key}, region))
    restricted = f"This protocol is restricted, expecting header '{GRPC_ADMIN_HEADER}'"
    assert restricted in refused and restricted in wrong, (refused, wrong)
    _assert_let_through(rel_server, call, allowed)


@pytest.mark.parametrize("call", list(RESTRICTED_CALLS))
def test_http_restricted_api_needs_the_admin_key(rel_server, region, call):
    client = httpclient.InferenceServerClient(rel_server.http_url.removeprefix("http://"))
    try:
        refused = _outcome(lambda: RESTRICTED_CALLS[call](client, None, region))
        allowed = _outcome(lambda: RESTRICTED_CALLS[call](client, {ADMIN_HEADER: rel_server.admin_key}, region))
    finally:
        client.close()
    assert f"This API is restricted, expecting header '{ADMIN_HEADER}'" in refused, refused
    _assert_let_through(rel_server, call, allowed)


# -- gRPC over TLS (Triton's own SSL), plus an API key on inference -----------------------------------
API_KEY = "reliability-suite-key"
API_HEADER = "triton-grpc-protocol-x-api-key"


@pytest.fixture(scope="module")
def certificate(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tls")
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            str(key),
            "-out",
            str(cert),
            "-days",
            "2",
            "-subj",
            "/CN=localhost",
            "-addext",
            "subjectAltName=DNS:localhost,IP:127.0.0.1",
        ],
        check=True,
        capture_output=True,
        timeout=60,
    )
    return cert, key


@pytest.fixture(scope="module")
def tls_server(built_repository, certificate, tmp_path_factory):
    cert, key = certificate
    log = tmp_path_factory.mktemp("tls-triton") / "tritonserver.log"
    # Inference needs a key too: Triton's restricted-protocol option as a shared-secret check.
    with LocalTriton(
        built_repository,
        0,
        0,
        0,
        log_file=log,
        grpc_server_cert=cert,
        grpc_server_key=key,
        extra_args=(f"--grpc-restricted-protocol=inference:x-api-key={API_KEY}",),
    ) as server:
        yield server


def test_tls_client_with_root_cert_and_key_header_succeeds(tls_server, certificate):
    COUNTS.inputs += 1
    with MultiTaskClient(
        tls_server.grpc_url,
        ssl=True,
        root_certificates=certificate[0],
        retries=0,
        timeout_s=60,
        headers={API_HEADER: API_KEY},
    ) as client:
        predictions = client.predict(TEXTS)
    assert len(predictions) == len(TEXTS)
    assert all(p["topic"].label in ("entertainment", "finance", "tech") for p in predictions)


def test_tls_client_without_the_key_header_is_refused(tls_server, certificate):
    COUNTS.inputs += 1
    with (
        MultiTaskClient(
            tls_server.grpc_url, ssl=True, root_certificates=certificate[0], retries=0, timeout_s=30
        ) as client,
        pytest.raises(MTLClientError) as refused,
    ):
        client.predict(TEXTS)
    assert f"expecting header '{API_HEADER}'" in str(refused.value), refused.value


def test_plaintext_client_fails_clearly_against_tls(tls_server):
    COUNTS.inputs += 1
    with (
        MultiTaskClient(tls_server.grpc_url, retries=0, timeout_s=20, headers={API_HEADER: API_KEY}) as client,
        pytest.raises(ServerUnavailableError) as failed,
    ):
        client.predict(TEXTS)
    message = str(failed.value)
    assert message.startswith(f"server at {tls_server.grpc_url} is unavailable"), message


def test_tls_client_that_does_not_trust_the_certificate_fails(tls_server):
    COUNTS.inputs += 1
    # ssl=True with the system's roots: the self-signed certificate is not trusted.
    with (
        MultiTaskClient(
            tls_server.grpc_url, ssl=True, retries=0, timeout_s=20, headers={API_HEADER: API_KEY}
        ) as client,
        pytest.raises(ServerUnavailableError),
    ):
        client.predict(TEXTS)


def test_cli_over_tls_with_header(tls_server, certificate, tmp_path):
    rows = write_csv(tmp_path / "in.csv", 20)
    COUNTS.inputs += 2
    ok = subprocess.run(
        [
            str(BIN / "mtl-client"),
            "predict",
            str(tmp_path / "in.csv"),
            "--url",
            tls_server.grpc_url,
            "--root-certificates",
            str(certificate[0]),
            "--header",
            f"{API_HEADER}={API_KEY}",
            "--out-dir",
            str(tmp_path / "out"),
            "--retries",
            "0",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert ok.returncode == 0, ok.stderr
    written = read_output(tmp_path / "out" / "topic_predictions.csv")
    COUNTS.rows(len(rows), sum(1 for w, (i, _) in zip(written, rows) if w["id"] == i))
    assert [w["id"] for w in written] == [i for i, _ in rows]
    plain = subprocess.run(
        [
            str(BIN / "mtl-client"),
            "predict",
            str(tmp_path / "in.csv"),
            "--url",
            tls_server.grpc_url,
            "--out-dir",
            str(tmp_path / "plain"),
            "--retries",
            "0",
            "--timeout",
            "20",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert plain.returncode == 1, plain.stderr
    assert plain.stderr.startswith("mtl-client: error: ") and len(plain.stderr.strip().splitlines()) == 1, plain.stderr
    assert not (tmp_path / "plain").exists()


# -- keys stay out of what other local users can read ------------------------------------------------
NOBODY = ("setpriv", "--reuid=65534", "--regid=65534", "--clear-groups")


def _as_nobody(*command: str) -> subprocess.CompletedProcess:
    COUNTS.inputs += 1
    return subprocess.run([*NOBODY, *command], capture_output=True, timeout=60)


def test_keys_are_not_readable_by_another_local_user(tls_server):
    # tls_server holds two keys: the per-start admin key, and the inference key given in extra_args.
    keys = [tls_server.admin_key.encode(), API_KEY.encode()]
    assert tls_server.secrets_hidden
    pids = [tls_server.pid, *tls_server.stub_pids(), os.getpid()]
    listing = _as_nobody("ps", "-eo", "pid,args", "ww")
    assert listing.returncode == 0 and str(tls_server.pid).encode() in listing.stdout, listing.stderr
    assert not [k for k in keys if k in listing.stdout]
    for pid in pids:
        command_line = _as_nobody("cat", f"/proc/{pid}/cmdline")
        assert command_line.returncode == 0 and command_line.stdout, command_line.stderr  # readable: not the issue
        assert not [k for k in keys if k in command_line.stdout], (pid, command_line.stdout[-300:])
        assert _as_nobody("cat", f"/proc/{pid}/environ").returncode != 0  # the environment is its owner's only
        # Even its owner finds the keys blanked in the environment block tritonserver started with.
        assert not [k for k in keys if k in Path(f"/proc/{pid}/environ").read_bytes()], pid
    assert "--grpc-restricted-protocol=(hidden)" in cmdline(tls_server.pid)
    assert not [k for k in keys if k in tls_server.log_file.read_bytes()]
