"""Fixtures of the reliability suite: its own servers (never the shared one) and the counts it reports.

Every test here sends traffic to 127.0.0.1 only. Tests that kill or restart servers start their own
(`local_triton`); the non-destructive ones share `rel_server`, started once for the session. The canary
inferences their watchdogs send count among the inputs tried.
"""

from __future__ import annotations

import pytest
from rel_helpers import COUNTS, Counts


@pytest.fixture(scope="session")
def counts() -> Counts:
    return COUNTS


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if not (COUNTS.inputs or COUNTS.faults or COUNTS.rows_checked):
        return
    terminalreporter.write_sep("-", "reliability counts")
    terminalreporter.write_line(
        f"reliability: {COUNTS.inputs:,} inputs tried, {COUNTS.faults:,} faults injected, "
        f"{COUNTS.rows_lost:,} rows lost (of {COUNTS.rows_checked:,} rows checked; the inputs include "
        f"{COUNTS.probes:,} watchdog canary inferences)"
    )
    for note in COUNTS.notes:
        terminalreporter.write_line(f"  {note}")


@pytest.fixture(scope="session")
def rel_server(built_repository, tmp_path_factory):
    """A LocalTriton of this suite's own for the non-destructive tests (hostile input, load, security)."""
    from mtl_serve import LocalTriton

    log = tmp_path_factory.mktemp("rel-triton") / "tritonserver.log"
    with LocalTriton(built_repository, grpc_port=0, http_port=0, metrics_port=0, log_file=log) as server:
        yield server
        COUNTS.canaries(server)


@pytest.fixture
def local_triton(local_triton):
    """The session's `local_triton` factory, counting each server's watchdog canaries at the end."""
    started = []

    def start(*args, **options):
        server = local_triton(*args, **options)
        started.append(server)
        return server

    yield start
    for server in started:
        COUNTS.canaries(server)
