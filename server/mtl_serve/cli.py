"""`mtl-serve`: run Triton on a model repository in the foreground until Ctrl-C or SIGTERM."""
from __future__ import annotations

import signal
import sys
import time
from pathlib import Path

import click

from .local import ADMIN_HEADER, LocalTriton, ServerError, log_problems, model_names


class _Stop(Exception):
    pass


def _raise_stop(signum, _frame):
    raise _Stop(signal.Signals(signum).name)


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--model-repository", type=click.Path(path_type=Path), default="model_repository", show_default=True,
              help="Folder built by mtl-build.")
@click.option("--grpc-port", type=click.IntRange(0, 65535), default=8001, show_default=True, help="0 picks a free port.")
@click.option("--http-port", type=click.IntRange(0, 65535), default=8000, show_default=True, help="0 picks a free port.")
@click.option("--metrics-port", type=click.IntRange(0, 65535), default=8002, show_default=True, help="0 picks a free port.")
@click.option("--log-file", type=click.Path(path_type=Path), default=None,
              help="Triton's log (default: ~/.cache/mtl-triton/logs/tritonserver-<http port>.log).")
@click.option("--stub-python", type=click.Path(path_type=Path, exists=True, dir_okay=False), default=None,
              help="python3 of the environment the model runs in (needs numpy<2, torch, tokenizers). "
                   "Default: this environment's.")
@click.option("--startup-timeout", type=float, default=180.0, show_default=True, help="Seconds to wait for READY.")
def main(model_repository, grpc_port, http_port, metrics_port, log_file, stub_python, startup_timeout) -> None:
    """Serve MODEL_REPOSITORY with the Triton 2.51 binary bundled in nvidia-pytriton.

    Waits until every model is READY, prints the endpoints, then runs until Ctrl-C or SIGTERM, which stop
    Triton and its python-backend stubs. Exit codes: 0 clean stop, 1 server failure, 2 bad setup
    (missing repository, busy port, unusable stub environment).
    """
    signal.signal(signal.SIGTERM, _raise_stop)
    signal.signal(signal.SIGINT, _raise_stop)
    server = LocalTriton(model_repository, grpc_port, http_port, metrics_port, log_file, stub_python, startup_timeout)
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
    click.echo(
        f"ready in {time.monotonic() - started:.1f}s: models {', '.join(model_names(server.model_repository))}\n"
        f"  gRPC     {server.grpc_url}\n  HTTP     {server.http_url}\n  metrics  {server.metrics_url}\n"
        f"  model-control and shared-memory APIs need header {ADMIN_HEADER}={server.admin_key}\n"
        f"  log      {server.log_file}\n(Ctrl-C to stop)",
    )
    try:
        while server.process.poll() is None:
            time.sleep(0.5)
    except _Stop as stop:
        click.echo(f"{stop}: stopping Triton", err=True)
        server.stop()
        click.echo("stopped", err=True)
        return
    click.echo(f"mtl-serve: error: tritonserver exited with code {server.process.returncode}:\n"
               + log_problems(server.log_text()), err=True)
    server.stop()
    sys.exit(1)
