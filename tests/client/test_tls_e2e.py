"""The client over gRPC with TLS (a real Triton with the test certificate), and TLS mismatches either way."""

import pytest
from click.testing import CliRunner

import mtl_client.client
from mtl_client import MultiTaskClient, ServerUnavailableError
from mtl_client.cli import main
from mtl_client.errors import TlsMismatchError, is_transient

pytestmark = pytest.mark.e2e


@pytest.fixture
def attempts(monkeypatch):
    """How many times the sync client translated a failed call: one per attempt."""
    count = []
    translate = mtl_client.client.translate

    def counting(*args, **kwargs):
        count.append(1)
        return translate(*args, **kwargs)

    monkeypatch.setattr(mtl_client.client, "translate", counting)
    return count


def _cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def _one_error_line(result) -> str:
    assert result.exit_code == 1, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("mtl-client: error: "), result.stderr
    return lines[0]


def test_tls_server_with_a_root_certificate_and_each_mismatch(local_triton, tls_material, test_config, attempts):
    server = local_triton(grpc_server_cert=tls_material["cert"], grpc_server_key=tls_material["key"])
    texts = ["The shares jumped after the earnings call", "This laptop keeps crashing"]
    with MultiTaskClient(
        server.grpc_url, root_certificates=tls_material["ca"], headers={"x-caller": "tls-test"}
    ) as client:
        predictions = client.predict(texts)
    assert [p.text for p in predictions] == texts
    for task in test_config.tasks:
        assert all(p[task.name].label in task.labels for p in predictions)
    result = _cli("info", "--url", server.grpc_url, "--root-certificates", tls_material["ca"])
    assert result.exit_code == 0, result.output
    assert "max batch size" in result.stdout

    # A plaintext client: one clear error, on the first attempt, although retries are allowed.
    attempts.clear()
    with MultiTaskClient(server.grpc_url, retries=5, timeout_s=10) as client, pytest.raises(TlsMismatchError) as info:
        client.predict(texts)
    assert len(attempts) == 1 and not is_transient(info.value) and isinstance(info.value, ServerUnavailableError)
    assert str(info.value).startswith(f"server at {server.grpc_url} is unavailable: it serves gRPC over TLS")
    line = _one_error_line(_cli("health", "--url", server.grpc_url, "--retries", 5, "--timeout", 10))
    assert "serves gRPC over TLS" in line and "--ssl" in line and "gave up" not in line

    # TLS without the CA that signed the server's certificate: not trusted, not retried.
    attempts.clear()
    with (
        MultiTaskClient(server.grpc_url, ssl=True, retries=5, timeout_s=10) as client,
        pytest.raises(TlsMismatchError, match="certificate is not trusted"),
    ):
        client.health()
    assert len(attempts) == 1
    line = _one_error_line(_cli("info", "--url", server.grpc_url, "--ssl", "--retries", 5))
    assert "certificate is not trusted" in line and "--root-certificates" in line


def test_tls_client_against_a_plaintext_server(triton_server, tls_material, attempts, tmp_path):
    with (
        MultiTaskClient(triton_server.grpc_url, root_certificates=tls_material["ca"], retries=5) as client,
        pytest.raises(TlsMismatchError) as info,
    ):
        client.health()
    assert len(attempts) == 1 and not is_transient(info.value)
    assert str(info.value).startswith(
        f"server at {triton_server.grpc_url} is unavailable over TLS: it does not speak TLS"
    )
    source = tmp_path / "in.csv"
    source.write_text("id,text\n1,hello there\n")
    for command in (["health"], ["predict", source, "--out-dir", tmp_path / "out"]):
        line = _one_error_line(_cli(*command, "--url", triton_server.grpc_url, "--ssl", "--retries", 5))
        assert "does not speak TLS" in line and "without --ssl" in line
    assert not (tmp_path / "out").exists()
