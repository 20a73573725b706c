"""Fixtures of the reliability suite: its own servers (never the shared one) and the counts it reports.

Every test here sends traffic to 127.0.0.1 only. Tests that kill or restart servers start their own
LocalTriton; the non-destructive ones share `rel_server`, started once for the session.
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
        f"{COUNTS.rows_lost:,} rows lost (of {COUNTS.rows_checked:,} rows checked)"
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


