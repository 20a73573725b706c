"""The client over gRPC with TLS: a second real Triton started with a self-signed certificate."""
import dataclasses
import shutil
import subprocess

import pytest
from click.testing import CliRunner

from mtl_client import MultiTaskClient, ServerUnavailableError
from mtl_client.cli import main

pytestmark = pytest.mark.e2e


def _make_certificates(folder):
    """A CA, and a server certificate for 127.0.0.1 signed by it (openssl CLI)."""
    def openssl(*args):
        subprocess.run(["openssl", *args], check=True, capture_output=True, cwd=folder)

    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=mtl test CA",
            "-keyout", "ca.key", "-out", "ca.pem")
    openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=127.0.0.1", "-keyout", "server.key",
            "-out", "server.csr")
    (folder / "san.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    openssl("x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
            "-days", "2", "-extfile", "san.ext", "-out", "server.pem")
    return folder / "ca.pem", folder / "server.pem", folder / "server.key"


@pytest.fixture(scope="module")
def tls_server(built_repository, tmp_path_factory):
    from mtl_serve import LocalTriton

    if "grpc_server_cert" not in {f.name for f in dataclasses.fields(LocalTriton)}:
        pytest.skip("this mtl_serve.LocalTriton cannot serve gRPC over TLS")
    if shutil.which("openssl") is None:
        pytest.skip("the openssl command is needed to make test certificates")
    folder = tmp_path_factory.mktemp("tls")
    ca, cert, key = _make_certificates(folder)
    server = LocalTriton(built_repository, grpc_port=0, http_port=0, metrics_port=0, log_file=folder / "triton.log",
                         grpc_server_cert=cert, grpc_server_key=key)
    with server:
        yield server, ca


def test_predict_over_tls_with_a_root_certificate(tls_server):
    server, ca = tls_server
    with MultiTaskClient(server.grpc_url, root_certificates=ca, headers={"x-caller": "tls-test"}) as client:
        predictions = client.predict(["The shares jumped after the earnings call", "This laptop keeps crashing"])
    assert [p.text for p in predictions] == ["The shares jumped after the earnings call", "This laptop keeps crashing"]
    result = CliRunner().invoke(main, ["info", "--url", server.grpc_url, "--root-certificates", str(ca)])
    assert result.exit_code == 0, result.output
    assert "max batch size" in result.stdout


def test_plain_client_cannot_talk_to_a_tls_server(tls_server):
    server, _ = tls_server
    with MultiTaskClient(server.grpc_url, retries=0, timeout_s=5) as client:
        with pytest.raises(ServerUnavailableError):
            client.health()
    result = CliRunner().invoke(main, ["health", "--url", server.grpc_url, "--retries", "0", "--timeout", "5"])
    assert result.exit_code == 1 and result.stderr.startswith("mtl-client: error: ")
