"""The README's first command: build the model repository, serve it, score the sample CSV, stop.

`python -m mtl_serve.demo` — every step is the real thing: mtl-build, the bundled Triton, and the
mtl-client CLI over gRPC.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import click

from .local import LocalTriton, ServerError


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--config", type=click.Path(path_type=Path), default="config.yaml", show_default=True)
@click.option("--model-repository", type=click.Path(path_type=Path), default="model_repository", show_default=True)
@click.option(
    "--input", "input_csv", type=click.Path(path_type=Path, exists=True), default="data/sample.csv", show_default=True
)
@click.option("--out-dir", type=click.Path(path_type=Path), default="outputs", show_default=True)
@click.option(
    "--skip-build",
    is_flag=True,
    help="Serve the repository as it is, without even checking whether its inputs changed.",
)
@click.option("--force-build", is_flag=True, help="Rebuild even when the build's inputs are unchanged.")
def main(
    config: Path, model_repository: Path, input_csv: Path, out_dir: Path, skip_build: bool, force_build: bool
) -> None:
    """Build (skipped when config, data, code and versions are unchanged), serve on free local ports, run
    `mtl-client predict` on INPUT, and stop the server. Exit 2 for a problem with the inputs."""
    started = time.monotonic()
    if not skip_build:
        from mtl_build.cli import build
        from mtl_build.errors import BuildError

        click.echo("== mtl-build", err=True)
        try:
            build(config, model_repository, force=force_build)
        except BuildError as exc:
            click.echo(f"demo: error: {exc}", err=True)
            sys.exit(2)
    click.echo("== starting the local Triton server", err=True)
    try:
        with LocalTriton(model_repository, grpc_port=0, http_port=0, metrics_port=0) as server:
            click.echo(f"ready: gRPC {server.grpc_url}, HTTP {server.http_url} (log: {server.log_file})", err=True)
            client = Path(sys.executable).with_name("mtl-client")
            command = [str(client), "predict", str(input_csv), "--url", server.grpc_url, "--out-dir", str(out_dir)]
            click.echo("== " + " ".join(command), err=True)
            status = subprocess.call(command)
    except ServerError as exc:
        click.echo(f"demo: error: {exc}", err=True)
        sys.exit(1)
    if status != 0:
        click.echo(f"demo: mtl-client exited with {status}", err=True)
        sys.exit(status)
    click.echo(f"== server stopped; outputs in {out_dir}/ ({time.monotonic() - started:.0f}s in all)", err=True)


if __name__ == "__main__":
    main()
