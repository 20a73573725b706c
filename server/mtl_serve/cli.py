"""`mtl-serve`: run Triton on a model repository in the foreground until Ctrl-C or SIGTERM."""

from __future__ import annotations

import logging
import signal
import sys
import time
from pathlib import Path

import click

from .local import ADMIN_HEADER, GRPC_ADMIN_HEADER, LocalTriton, ServerError, model_names


class _Stop(Exception):
    pass


def _raise_stop(signum, _frame):
    raise _Stop(signal.Signals(signum).name)


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--model-repository",
    type=click.Path(path_type=Path),
    default="model_repository",
    show_default=True,
    help="Folder built by mtl-build.",
)
@click.option(
    "--grpc-port", type=click.IntRange(0, 65535), default=8001, show_default=True, help="0 picks a free port."
)
@click.option(
    "--http-port", type=click.IntRange(0, 65535), default=8000, show_default=True, help="0 picks a free port."
)
@click.option(
    "--metrics-port", type=click.IntRange(0, 65535), default=8002, show_default=True, help="0 picks a free port."
)
@click.option(
    "--log-file",
    type=click.Path(path_type=Path),
    default=None,
    help="Triton's log (default: ~/.cache/mtl-triton/logs/tritonserver-<http port>.log).",
)
@click.option(
    "--stub-python",
    type=click.Path(path_type=Path, exists=True, dir_okay=False),
    default=None,
    help="python3 of the environment the model runs in (needs numpy<2, torch, tokenizers). "
    "Default: this environment's.",
)
@click.option("--startup-timeout", type=float, default=180.0, show_default=True, help="Seconds to wait for READY.")
@click.option(
    "--grpc-cert",
    type=click.Path(path_type=Path, exists=True, dir_okay=False),
    default=None,
    help="PEM server certificate: serve gRPC over TLS (needs --grpc-key).",
)
@click.option(
    "--grpc-key",
    type=click.Path(path_type=Path, exists=True, dir_okay=False),
    default=None,
    help="PEM private key of --grpc-cert.",
)
@click.option(
    "--grpc-root-cert",
    type=click.Path(path_type=Path, exists=True, dir_okay=False),
    default=None,
    help="PEM CA that client certificates must chain to (mutual TLS).",
)
@click.option(
    "--max-restarts",
    type=click.IntRange(0),
    default=3,
    show_default=True,
    help="Restarts of Triton after a python-backend stub dies or hangs, or Triton itself exits, within "
    "5 minutes, before giving up.",
)
@click.option(
    "--grpc-guard/--no-grpc-guard",
    default=True,
    show_default=True,
    help="Serve gRPC through the size-limiting, readiness-aware proxy. Off: Triton's own gRPC port, "
    "for measuring Triton alone (no request size limit; put a proxy in front: docs/reliability.md).",
)
def main(
    model_repository,
    grpc_port,
    http_port,
    metrics_port,
    log_file,
    stub_python,
    startup_timeout,
    grpc_cert,
    grpc_key,
    grpc_root_cert,
    max_restarts,
    grpc_guard,
) -> None:
    """Serve MODEL_REPOSITORY with the Triton 2.51 binary bundled in nvidia-pytriton.

    Waits until every model is READY, prints the endpoints, then runs until Ctrl-C or SIGTERM, which stop
    Triton and its python-backend stubs. HTTP, metrics and gRPC go through vetting proxies (bounded request
    sizes, readiness that is false while Triton cannot serve); a dead or hung python-backend stub, or a
    crashed Triton, makes it restart Triton on the same ports (docs/reliability.md). Exit codes: 0 clean stop,
    1 server failure, 2 bad setup (missing repository, busy port, unusable stub environment).
    """
    signal.signal(signal.SIGTERM, _raise_stop)
    signal.signal(signal.SIGINT, _raise_stop)
    # The HTTP guard's refusals (warnings) go to stderr; watchdog events come through on_event.
    logging.basicConfig(level=logging.WARNING, format="mtl-serve: %(message)s")
    if bool(grpc_cert) != bool(grpc_key):
        click.echo("mtl-serve: error: --grpc-cert and --grpc-key go together", err=True)
        sys.exit(2)
    server = LocalTriton(
        model_repository,
        grpc_port,
        http_port,
        metrics_port,
        log_file,
        stub_python,
        startup_timeout,
        grpc_server_cert=grpc_cert,
        grpc_server_key=grpc_key,
        grpc_root_cert=grpc_root_cert,
        grpc_ssl_mutual=grpc_root_cert is not None,
        max_restarts=max_restarts,
        grpc_guard=grpc_guard,
        on_event=lambda message: click.echo(f"mtl-serve: {message}", err=True),
    )
    try:
        server.check_setup()  # a refusal comes before any "starting" line
    except ServerError as exc:
        click.echo(f"mtl-serve: error: {exc}", err=True)
        sys.exit(2)
    click.echo(f"starting Triton on {server.model_repository} (log: {server.log_file or 'cache folder'})", err=True)
    try:
        started = time.monotonic()
        server.start()
    except ServerError as exc:
        click.echo(f"mtl-serve: error: {exc}", err=True)
        sys.exit(2 if server.process is None else 1)
    except _Stop:
        server.stop()
        sys.exit(0)
    limits = (
        f"  requests over {server.max_grpc_request_bytes / 2**20:,.1f} MiB (gRPC) or "
        f"{server.max_http_body_bytes / 2**20:,.0f} MiB (HTTP) are refused\n"
        if grpc_guard
        else ""
    )
    click.echo(
        f"ready in {time.monotonic() - started:.1f}s: models {', '.join(model_names(server.model_repository))}\n"
        f"  gRPC     {server.grpc_url}{' (TLS)' if server.tls else ''}\n  HTTP     {server.http_url}\n"
        f"  metrics  {server.metrics_url}\n{limits}"
        f"  model-repository, shared-memory, logging and trace APIs need the key {server.admin_key}\n"
        f"    (HTTP header {ADMIN_HEADER}, gRPC metadata {GRPC_ADMIN_HEADER})\n"
        f"  log      {server.log_file}\n(Ctrl-C to stop)",
    )
    try:
        # The watchdog restarts Triton when a stub dies or hangs or Triton exits; it sets `failure` when it gives up.
        while server.failure is None:
            time.sleep(0.5)
    except _Stop as stop:
        click.echo(f"{stop}: stopping Triton", err=True)
        server.stop()
        click.echo("stopped", err=True)
        return
    click.echo(f"mtl-serve: error: {server.failure}", err=True)
    server.stop()
    sys.exit(1)
