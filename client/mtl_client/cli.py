"""`mtl-client`: score a CSV, evaluate on labelled data, check health, show the model. A thin layer over
MultiTaskClient."""

from __future__ import annotations

import codecs
import contextlib
import importlib.metadata
import json
import signal
import sys
import time
from pathlib import Path

import click
from click.core import ParameterSource

from .base import DEFAULT_MODEL, DEFAULT_URL, normalize_urls
from .batching import DEFAULT_MAX_REQUEST_BYTES
from .client import MultiTaskClient
from .csv_input import CsvInput, InputFileError, InputSource, RowChecker, max_row_chars, parse_delimiter
from .errors import InvalidInputError, MTLClientError
from .evaluate import Evaluation, LabelChecker, format_report, label_tasks
from .plot import PlotUnavailableError, require_matplotlib, write_plot
from .writer import FORMATS, AtomicOutputs

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130

EXIT_CODES = """\b
Exit codes:
  0    success
  1    server, inference or output error (unreachable, TLS mismatch, timeout, model missing or
       not as expected, an output file that cannot be written)
  2    usage or bad input (options, CSV content, labels); nothing is written
  130  interrupted (Ctrl-C or SIGTERM); nothing is written"""


class _Fail(click.ClickException):
    """One line on stderr, `mtl-client: error: ...`, and the exit code given."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code

    def show(self, file=None) -> None:
        click.echo(f"mtl-client: error: {self.format_message()}", err=True)


@contextlib.contextmanager
def _errors(input_name: str | None = None):
    """Map the client's errors (and Ctrl-C) to one line and an exit code."""
    try:
        yield
    except InvalidInputError as exc:
        message = str(exc)
        if input_name and exc.index is not None and not isinstance(exc, InputFileError):
            # The CLI sends one item per data row, so the item index is the row number less one.
            message = f"{input_name}: row {exc.index + 1}: {exc.reason}"
        raise _Fail(message, EXIT_USAGE) from None
    except MTLClientError as exc:
        raise _Fail(str(exc), EXIT_FAILED) from None
    except KeyboardInterrupt:
        raise _Fail("interrupted; no output written", EXIT_INTERRUPTED) from None
    except OSError as exc:
        raise _Fail(f"{exc.strerror or exc}: {exc.filename or ''}".rstrip(": "), EXIT_FAILED) from None


def _usage_error(exc: click.UsageError, ctx: click.Context | None) -> click.ClickException:
    if isinstance(exc, click.exceptions.NoArgsIsHelpError):  # bare `mtl-client`: click shows the help
        return exc
    where = f" (see '{ctx.command_path} --help')" if ctx is not None else ""
    return _Fail(f"{exc.format_message()}{where}", EXIT_USAGE)


class _Command(click.Command):
    """Option and argument errors as one line too, like every other error."""

    def make_context(self, info_name, args, parent=None, **extra):
        try:
            return super().make_context(info_name, args, parent=parent, **extra)
        except click.UsageError as exc:
            raise _usage_error(exc, exc.ctx) from None


class _Group(click.Group):
    command_class = _Command

    def make_context(self, info_name, args, parent=None, **extra):
        try:
            return super().make_context(info_name, args, parent=parent, **extra)
        except click.UsageError as exc:
            raise _usage_error(exc, exc.ctx) from None

    def resolve_command(self, ctx, args):
        try:
            return super().resolve_command(ctx, args)
        except click.UsageError as exc:
            raise _usage_error(exc, ctx) from None


def _raise_interrupt(signum, _frame):
    raise KeyboardInterrupt(signal.Signals(signum).name)


@contextlib.contextmanager
def _sigterm_as_interrupt():
    """SIGTERM cleans up like Ctrl-C (temp files removed) instead of killing the process mid-write."""
    try:
        previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    except ValueError:  # not the main thread
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _parse_headers(_ctx, _param, values: tuple[str, ...]) -> dict[str, str]:
    headers = {}
    for value in values:
        for separator in ("=", ":"):
            name, found, content = value.partition(separator)
            if found and name.strip():
                headers[name.strip()] = content.strip()
                break
        else:
            raise click.BadParameter(f"{value!r} is not NAME=VALUE (or 'NAME: VALUE')")
    return headers


def _check_encoding(_ctx, _param, value: str) -> str:
    try:
        codecs.lookup(value)
    except LookupError:
        raise click.BadParameter(f"unknown encoding {value!r} (e.g. utf-8, latin-1, cp1252, utf-16)") from None
    return value


def _check_delimiter(_ctx, _param, value: str) -> str:
    try:
        return parse_delimiter(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None


def _display_name(input_path: str) -> str:
    return "<stdin>" if input_path == "-" else input_path


def _reading_options(command):
    """How INPUT is read and sent, the same for predict and evaluate."""
    options = [
        click.option(
            "--delimiter",
            default=",",
            show_default=True,
            callback=_check_delimiter,
            help="Field separator of INPUT: one character; '\\t' or tab for TSV.",
        ),
        click.option(
            "--encoding",
            default="utf-8",
            show_default=True,
            callback=_check_encoding,
            help="Encoding of INPUT; a UTF-8 byte-order mark is skipped.",
        ),
        click.option(
            "--batch-size",
            type=click.IntRange(min=1),
            default=64,
            show_default=True,
            help="Rows per request (capped by the model's max_batch_size and a 4 MB request).",
        ),
        click.option(
            "--concurrency",
            type=click.IntRange(min=1),
            default=4,
            show_default=True,
            help="Requests in flight at once.",
        ),
        click.option(
            "--wait-ready",
            type=click.FloatRange(min=0),
            default=0,
            show_default=True,
            metavar="SECONDS",
            help="Wait up to SECONDS for the server and model to become ready first.",
        ),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def _version() -> str:
    try:
        return importlib.metadata.version("mtl-client")
    except importlib.metadata.PackageNotFoundError:  # run from a source tree
        from . import __version__

        return __version__


def _connection_options(command):

    def check_urls(_ctx, _param, values: tuple[str, ...]) -> tuple[str, ...]:
        try:
            return normalize_urls(values)
        except MTLClientError as exc:
            raise click.BadParameter(str(exc)) from None

    def parse_channel_args(_ctx, _param, values: tuple[str, ...]) -> dict[str, str | int]:
        channel_args = {}
        for value in values:
            name, found, content = value.partition("=")
            if not found or not name.strip().startswith("grpc."):
                raise click.BadParameter(f"{value!r} is not grpc.NAME=VALUE (e.g. grpc.lb_policy_name=round_robin)")
            # gRPC takes integer options as ints and refuses them as strings.
            content = content.strip()
            channel_args[name.strip()] = int(content) if content.lstrip("-").isdigit() else content
        return channel_args

    options = [
        click.option(
            "--url",
            multiple=True,
            default=(DEFAULT_URL,),
            show_default=True,
            envvar="MTL_CLIENT_URL",
            callback=check_urls,
            metavar="HOST:PORT",
            help="Triton gRPC endpoint; repeat it or give a comma list for several replicas: requests go "
            "round robin over the healthy ones and a failed one is skipped until it is healthy "
            "again. A gRPC target with a scheme (dns:///svc:8001) goes to gRPC as it is "
            "(env MTL_CLIENT_URL).",
        ),
        click.option(
            "--model",
            default=DEFAULT_MODEL,
            show_default=True,
            envvar="MTL_CLIENT_MODEL",
            help="Model name (env MTL_CLIENT_MODEL).",
        ),
        click.option(
            "--timeout",
            type=click.FloatRange(min=0, min_open=True),
            default=60.0,
            show_default=True,
            help="Seconds allowed for each call to the server.",
        ),
        click.option(
            "--retries",
            type=click.IntRange(min=0),
            default=3,
            show_default=True,
            help="Retries of a call that fails with UNAVAILABLE (exponential backoff with jitter).",
        ),
        click.option("--ssl", is_flag=True, help="Use TLS (implied by the certificate options)."),
        click.option(
            "--root-certificates",
            type=click.Path(exists=True, dir_okay=False),
            help="PEM root certificates for TLS (default: the system's).",
        ),
        click.option(
            "--private-key", type=click.Path(exists=True, dir_okay=False), help="PEM client key (mutual TLS)."
        ),
        click.option(
            "--certificate-chain",
            type=click.Path(exists=True, dir_okay=False),
            help="PEM client certificate chain (mutual TLS).",
        ),
        click.option(
            "--header",
            "headers",
            multiple=True,
            callback=_parse_headers,
            metavar="NAME=VALUE",
            help="Header sent with every call; repeatable.",
        ),
        click.option(
            "--channel-arg",
            "channel_args",
            multiple=True,
            callback=parse_channel_args,
            metavar="grpc.NAME=VALUE",
            help="gRPC channel option, e.g. grpc.lb_policy_name=round_robin with a dns:/// url of a "
            "headless Service; repeatable.",
        ),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def _client(
    url,
    model,
    timeout,
    retries,
    ssl,
    root_certificates,
    private_key,
    certificate_chain,
    headers,
    channel_args=None,
    concurrency: int = 4,
) -> MultiTaskClient:
    """The client of --url (one endpoint, or several replicas) and the other connection options."""
    return MultiTaskClient(
        url,
        model,
        timeout_s=timeout,
        retries=retries,
        ssl=ssl,
        root_certificates=root_certificates,
        private_key=private_key,
        certificate_chain=certificate_chain,
        headers=headers,
        concurrency=concurrency,
        channel_args=channel_args,
    )


@click.group(
    cls=_Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110}, epilog=EXIT_CODES
)
@click.version_option(_version(), "--version", "-V", prog_name="mtl-client", message="%(prog)s %(version)s")
def main() -> None:
    """Client of the multi-task sentence classifier served by Triton over gRPC.

    Tasks and labels are read from the server's model config; nothing about them is built in.
    """


@main.command(epilog=EXIT_CODES)
@click.argument("input_path", metavar="INPUT", type=click.Path(dir_okay=False, allow_dash=True))
@click.option("--text-column", default="text", show_default=True, help="Column holding the texts.")
@click.option(
    "--id-column",
    default="id",
    show_default=True,
    help="Column holding row ids; without it in the file, ids are 1-based row numbers.",
)
@click.option(
    "--out-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default="outputs",
    show_default=True,
    help="Folder for the per-task files, named by the server's output_filename template.",
)
@click.option(
    "--format",
    "fmt",
    type=click.Choice(FORMATS),
    default="csv",
    show_default=True,
    help="Output format; jsonl files get the .jsonl extension.",
)
@click.option("--probs", is_flag=True, help="Add a prob_<label> column per label.")
@_reading_options
@click.option(
    "--allow-empty",
    is_flag=True,
    help="Write rows with an empty text (nothing visible: whitespace, control or format characters "
    "such as U+200B) with an empty label and score, without sending them (default: an error).",
)
@_connection_options
def predict(
    input_path,
    text_column,
    id_column,
    out_dir,
    fmt,
    probs,
    batch_size,
    concurrency,
    encoding,
    delimiter,
    allow_empty,
    wait_ready,
    **connection,
) -> None:
    """Score INPUT (a CSV with a header; - for stdin) and write one file per task into --out-dir.

    \b
    Each file has one row per input row, in input order:
      id, text, label, score, [prob_<label> ...,] truncated
    (truncated: the text was cut at the model's token budget). Files are written to
    temporary files first and all renamed into place only when every row was scored: a
    failed or interrupted run leaves no partial file and keeps every earlier output.

    A file INPUT is checked completely before anything is sent (stdin and pipes such as
    <(...) are checked as they stream). Bad bytes for --encoding, broken CSV, a missing
    or repeated column, a row with more fields than the header, an empty id, a row too
    large for one request, or empty texts (listed by row; allowed with --allow-empty)
    exit 2. Long texts are sent whole (the server truncates them by tokens) unless one
    alone is over the 4 MB request size. Duplicate ids only warn. Progress goes to
    stderr (on a terminal); the last line says rows, time and rows/s.
    """
    context = click.get_current_context()
    id_required = context.get_parameter_source("id_column") is not ParameterSource.DEFAULT
    display = _display_name(input_path)
    started = time.monotonic()

    def reader(stream) -> CsvInput:
        return CsvInput(
            stream,
            display,
            text_column=text_column,
            id_column=id_column,
            id_required=id_required,
            encoding=encoding,
            delimiter=delimiter,
            max_row_chars=max_row_chars(DEFAULT_MAX_REQUEST_BYTES),
        )

    def checker(source: CsvInput, check_ids: bool) -> RowChecker:
        return RowChecker(
            display,
            allow_empty=allow_empty,
            max_request_bytes=DEFAULT_MAX_REQUEST_BYTES,
            check_ids=check_ids,
            id_column=source.id_column,
        )

    with _errors(display), _sigterm_as_interrupt():
        origin = InputSource(input_path)
        total, prescan = None, None
        if origin.rereadable:
            with origin.open() as stream:
                source = reader(stream)
                prescan = checker(source, source.id_index is not None)
                for row in source:
                    prescan.check(row)
                if prescan.failed:
                    raise prescan.error()
                total = prescan.rows
                _warn_duplicates(prescan)

        with _client(**connection, concurrency=concurrency) as client:
            if wait_ready:
                client.wait_until_ready(wait_ready)
            contract = client.get_contract()
            progress = _Progress(total)
            with (
                origin.open() as stream,
                AtomicOutputs(out_dir, contract.output_files(fmt), contract.tasks, fmt, probs) as outputs,
            ):
                source = reader(stream)
                # Checked again as sent (stdin and pipes had no first pass; a file may have changed since).
                check = checker(source, prescan is None and source.id_index is not None)
                rows = iter(source)

                def items():
                    for row in rows:
                        send = check.check(row)
                        if check.failed:
                            # Stop sending, but read on to list every empty row in the message.
                            for rest in rows:
                                check.check(rest)
                            raise check.error()
                        yield row, (row.text if send else None)

                written = 0
                for row, prediction in client.predict_items(items(), batch_size):
                    if prediction is None:
                        outputs.write(row.id, row.text, None, None)
                    else:
                        outputs.write(row.id, row.text, prediction.tasks, prediction.truncated)
                    written += 1
                    progress.update(written)
                if prescan is None:
                    _warn_duplicates(check)
                progress.close()
                paths = outputs.commit()

    elapsed = time.monotonic() - started
    click.echo(f"wrote {', '.join(str(p) for p in paths)}")
    click.echo(f"{written:,} rows in {elapsed:.2f}s ({written / max(elapsed, 1e-9):,.1f} rows/s)")


@main.command(epilog=EXIT_CODES)
@click.argument("input_path", metavar="LABELLED", type=click.Path(dir_okay=False, allow_dash=True))
@click.option("--text-column", default="text", show_default=True, help="Column holding the texts.")
@_reading_options
@click.option(
    "--allow-empty",
    is_flag=True,
    help="Leave out rows with an empty text (nothing visible) instead of failing on them.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the whole report as JSON instead of the table.")
@click.option(
    "--plot",
    "plot_path",
    type=click.Path(dir_okay=False, path_type=Path),
    metavar="FILE.png",
    help="Also write a PNG of the confusion matrices and reliability diagrams (needs mtl-client[plot]).",
)
@_connection_options
def evaluate(
    input_path,
    text_column,
    batch_size,
    concurrency,
    encoding,
    delimiter,
    allow_empty,
    wait_ready,
    as_json,
    plot_path,
    **connection,
) -> None:
    """Score a labelled CSV (- for stdin) through the server and report each task's metrics.

    \b
    A column named like one of the server's tasks holds that task's true labels (see
    `mtl-client info`); an empty cell leaves the row unlabelled for that task, other
    columns are ignored. Rows labelled for no task are not sent. Per task: labelled
    rows, accuracy, macro-F1, macro-recall, per-class precision, recall and F1, the
    confusion matrix and the expected calibration error (10 bins, top label).

    The CSV is read and checked as by predict; a label the server does not know for its
    task (named with its row and column), or no task column at all, exits 2.
    """
    display = _display_name(input_path)
    if plot_path is not None:
        try:
            require_matplotlib()
        except PlotUnavailableError as exc:
            raise _Fail(str(exc), EXIT_USAGE) from None

    def reader(stream, contract) -> tuple[CsvInput, tuple]:
        source = CsvInput(
            stream,
            display,
            text_column=text_column,
            id_column=None,
            encoding=encoding,
            delimiter=delimiter,
            max_row_chars=max_row_chars(DEFAULT_MAX_REQUEST_BYTES),
        )
        return source, label_tasks(source, contract)

    def checkers(tasks) -> tuple[RowChecker, LabelChecker]:
        return (
            RowChecker(display, allow_empty=allow_empty, max_request_bytes=DEFAULT_MAX_REQUEST_BYTES, check_ids=False),
            LabelChecker(display, tasks),
        )

    def read_on(rows, check: RowChecker, labels: LabelChecker) -> None:
        # Stop sending, but read on so the message counts every bad row.
        for rest in rows:
            check.check(rest)
            labels.labels(rest)
        raise check.error() if check.failed else labels.error()

    with _errors(display), _sigterm_as_interrupt():
        origin = InputSource(input_path)
        with _client(**connection, concurrency=concurrency) as client:
            if wait_ready:
                client.wait_until_ready(wait_ready)
            contract = client.get_contract()
            prescanned = False
            if origin.rereadable:
                with origin.open() as stream:
                    source, tasks = reader(stream, contract)
                    check, labels = checkers(tasks)
                    rows = iter(source)
                    for row in rows:
                        check.check(row)
                        labels.labels(row)
                    if check.failed or labels.failed:
                        raise check.error() if check.failed else labels.error()
                prescanned = True
            with origin.open() as stream:
                source, tasks = reader(stream, contract)
                check, labels = checkers(tasks)
                rows = iter(source)
                evaluation = Evaluation(tasks)

                def items():
                    for row in rows:
                        send = check.check(row)
                        found = labels.labels(row)
                        if check.failed or labels.failed:
                            read_on(rows, check, labels)
                        yield (found, not send), (row.text if send and Evaluation.wanted(found) else None)

                for (found, empty_text), prediction in client.predict_items(items(), batch_size):
                    evaluation.add(found, prediction, empty_text)
            report = evaluation.report(
                input=display, model=contract.model, url=client.url, checked_before_sending=prescanned
            )
            if plot_path is not None:
                write_plot(report, plot_path)

    if as_json:
        click.echo(json.dumps(report, indent=2))
    else:
        click.echo(format_report(report))
    if plot_path is not None:
        click.echo(f"wrote {plot_path}", err=as_json)


def _warn_duplicates(check: RowChecker) -> None:
    count, pairs = check.duplicate_ids()
    if count:
        listed = ", ".join(f"rows {a} and {b}" for a, b in pairs) + (", ..." if count > len(pairs) else "")
        click.echo(
            f"mtl-client: warning: {check.name}: {count} row(s) repeat an earlier row's id ({listed}); "
            "every row is still written",
            err=True,
        )


class _Progress:
    """rows and rows/s on stderr, redrawn in place; only on a terminal and once a run passes one second."""

    def __init__(self, total: int | None):
        self.total = total
        self.started = self.drawn_at = time.monotonic()
        self.enabled = sys.stderr.isatty()
        self.shown = False

    def update(self, rows: int) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        if now - self.started < 1.0 or now - self.drawn_at < 0.2:
            return
        self.drawn_at = now
        rate = rows / (now - self.started)
        line = f"{rows:,} rows"
        if self.total:
            line = f"{rows:,}/{self.total:,} rows ({100 * rows / self.total:.0f}%)"
            if rate > 0:
                line += f", {_duration((self.total - rows) / rate)} left"
        sys.stderr.write(f"\r{line}, {rate:,.0f} rows/s\x1b[K")
        sys.stderr.flush()
        self.shown = True

    def close(self) -> None:
        if self.shown:
            sys.stderr.write("\r\x1b[K")
            sys.stderr.flush()


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


@main.command(epilog=EXIT_CODES)
@click.option(
    "--wait",
    type=click.FloatRange(min=0),
    default=0,
    show_default=True,
    metavar="SECONDS",
    help="Wait up to SECONDS for the server and the model to become ready.",
)
@_connection_options
def health(wait, **connection) -> None:
    """Report whether the server is live and ready and the model is ready.

    Exit 0 when all three are, 1 otherwise (or when the server cannot be reached).
    """
    with _errors(), _client(**connection) as client:
        if wait:
            with contextlib.suppress(MTLClientError):
                client.wait_until_ready(wait)
        status = client.health()
    yes = {True: "yes", False: "no"}
    click.echo(f"server {status.url}: live {yes[status.live]}, ready {yes[status.ready]}")
    click.echo(f"model {status.model}: ready {yes[status.model_ready]}")
    if not status.ok:
        raise _Fail(f"model '{status.model}' at {status.url} is not ready", EXIT_FAILED)


@main.command(epilog=EXIT_CODES)
@click.option("--json", "as_json", is_flag=True, help="Print the information as JSON.")
@_connection_options
def info(as_json, **connection) -> None:
    """Show the server's version and the model's tasks, labels, limits and output file names."""
    with _errors(), _client(**connection) as client:
        details = client.info()
    c = details.contract
    if as_json:
        data = details.to_dict()
        for key, value in c.serving().items():
            data["model"].setdefault(key, value)
        click.echo(json.dumps(data, indent=2))
        return
    click.echo(f"server: {details.server_name} {details.server_version} at {client.url}")
    click.echo(f"model: {c.model} (versions {', '.join(details.model_versions) or '?'}, {details.platform or '?'})")
    click.echo(f"input: {c.input_name}; max batch size {c.max_batch_size}; max tokens {c.max_tokens or '?'}")
    tokens = c.tokens_per_forward
    per_forward = "?" if tokens is None else ("the device's default" if tokens == 0 else f"{tokens:,}")
    click.echo(
        f"serving: precision {c.precision or '?'}, runtime {c.runtime or '?'}, device {c.device or '?'}, "
        f"tokens per forward {per_forward}"
    )
    files = c.output_files()
    click.echo("tasks:")
    for task in c.tasks:
        click.echo(f"  {task.name}: {', '.join(task.labels)}  -> {files[task.name]}")
    click.echo(f"truncation flag output: {c.truncated_output}")


if __name__ == "__main__":
    main()
