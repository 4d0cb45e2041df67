"""Commands of the ``ingestd`` CLI."""

from __future__ import annotations

import concurrent.futures
import os
import re
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click
import grpc
from rich.console import Console
from rich.markup import escape
from rich.padding import Padding
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.text import Text

from ingestd.cli import keys, supervisor
from ingestd.cli.client import (
    call_metadata,
    open_channel,
    upload_requests,
    with_retries,
)
from ingestd.cli.snippets import SNIPPET_CHARS, plain_text, shorten
from ingestd.cli.tables import Column, print_rows
from ingestd.v1 import resources_pb2, search_service_pb2, search_service_pb2_grpc
from ingestd.v1 import upload_service_pb2 as upload_pb
from ingestd.v1 import upload_service_pb2_grpc as upload_grpc
from shared.config import Settings, SettingsError, get_settings
from shared.logging import configure_logging

# Output that goes to a file or a pipe is not cut to 80 columns: ids and
# file names stay whole on one line, for grep and for copying.
PIPED_WIDTH = 200
console = Console()
# Messages are not broken at the console width when stderr goes to a file,
# so a grep finds a whole phrase.
err_console = Console(stderr=True, soft_wrap=True)
for _output in (console, err_console):
    if not _output.is_terminal:
        _output.width = max(_output.width, PIPED_WIDTH)

TERMINAL = {
    resources_pb2.JOB_STATUS_COMPLETE,
    resources_pb2.JOB_STATUS_FAILED_PARSE,
    resources_pb2.JOB_STATUS_FAILED_CHUNKING,
    resources_pb2.JOB_STATUS_FAILED_EMBEDDING,
}
SAMPLE_DIR = Path(__file__).resolve().parents[2] / "docs"
# Seconds between GetJob calls of `upload --wait` when the gateway rejects a watch.
POLL_SECONDS = 1.0


def status_name(value: int) -> str:
    return resources_pb2.JobStatus.Name(value).removeprefix("JOB_STATUS_").lower()


def plural(count: int, noun: str) -> str:
    """Return "1 chunk" or "3 chunks"."""
    return f"{count} {noun}" if count == 1 else f"{count} {noun}s"


def exit_description(returncode: int) -> str:
    """Describe a child's exit: "exited with status 2" or "was killed by SIGKILL"."""
    if returncode < 0:
        try:
            return f"was killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"was killed by signal {-returncode}"
    return f"exited with status {returncode}"


def fail(message: str) -> None:
    err_console.print(f"[red]error:[/red] {escape(message)}", highlight=False)
    sys.exit(1)


# Control and direction-override characters in a local file name would move
# the cursor, recolour the terminal or reorder the line when printed.
_UNPRINTABLE = re.compile("[\x00-\x1f\x7f-\x9f\u200e\u200f\u202a-\u202e\u2066-\u2069]")


def printable(value: object) -> str:
    """Return a local path or a server's text with control characters as "?"."""
    return _UNPRINTABLE.sub("?", str(value))


def shown(value: object) -> str:
    """Return a local path or a server's text safe to print as rich markup."""
    return escape(printable(value))


# Where the CLI took its API key from, for the hint after UNAUTHENTICATED.
_key_source: str | None = None


def rpc_error_text(exc: grpc.RpcError) -> str:
    """Describe a failed call, with a hint for the usual causes."""
    code = exc.code()  # type: ignore[attr-defined]
    text = f"{code.name}: {exc.details()}"  # type: ignore[attr-defined]
    if code == grpc.StatusCode.UNAVAILABLE:
        text += (
            "\nIs the gateway running? Start it with `ingestd up`, or pass "
            "--gateway HOST:PORT (INGESTD_GATEWAY_ADDRESS)."
        )
    if code == grpc.StatusCode.UNAUTHENTICATED:
        if _key_source is None:
            text += (
                "\nThe CLI found no API key: pass --api-key, set INGESTD_API_KEY, "
                "or set INGESTD_DATA_DIR to the folder `ingestd up` used, which "
                "holds the key file api-key."
            )
        else:
            text += (
                f"\nThe CLI sent the key from {_key_source}. Pass another with "
                "--api-key or INGESTD_API_KEY, or create one with `ingestd keys create`."
            )
    return text


@click.group()
@click.option(
    "--gateway",
    envvar="INGESTD_GATEWAY_ADDRESS",
    show_envvar=True,
    default=None,
    help="gateway host:port [default: INGESTD_HOST:INGESTD_GATEWAY_PORT]",
)
@click.option(
    "--user",
    envvar="INGESTD_USER",
    show_envvar=True,
    default=None,
    help="user id the calls act for; needs an admin key, or a gateway without authentication",
)
@click.option(
    "--api-key",
    envvar="INGESTD_API_KEY",
    show_envvar=True,
    default=None,
    help="API key for the gateway [default: the key file `ingestd up` writes in the data folder]",
)
@click.option(
    "--tls/--no-tls",
    default=None,
    help="connect with TLS, trusting INGESTD_TLS_CA_FILE [default: on when TLS settings are set]",
)
@click.pass_context
def cli(
    context: click.Context,
    gateway: str | None,
    user: str | None,
    api_key: str | None,
    tls: bool | None,
) -> None:
    """ingestd: turn documents into embedded, searchable chunks."""
    try:
        settings = get_settings()
    except SettingsError as exc:
        raise click.ClickException(str(exc)) from None
    if tls is None:
        tls = settings.tls_enabled or settings.tls_ca_file is not None
    context.obj = {
        "settings": settings,
        "gateway": gateway or f"{settings.host}:{settings.gateway_port}",
        "user": user,
        "api_key": api_key,
        "tls": tls,
    }


def gateway_channel(obj: dict) -> grpc.Channel:
    """Open a channel to the gateway with the CLI's key and TLS choice."""
    global _key_source
    settings: Settings = obj["settings"]
    api_key = obj["api_key"]
    _key_source = "--api-key or INGESTD_API_KEY" if api_key else None
    if not api_key:
        api_key = keys.read_key_file(settings)
        if api_key:
            _key_source = str(keys.key_file(settings))
    return open_channel(
        obj["gateway"],
        api_key=api_key,
        tls=obj["tls"],
        tls_ca_file=settings.tls_ca_file,
    )


def _local_key(obj: dict, url: str) -> None:
    """Create the first API key if the database has none, and tell the user."""
    settings: Settings = obj["settings"]
    if settings.allow_unauthenticated:
        return
    path = keys.key_file(settings)
    key, created = keys.ensure_first_key(settings, url, path)
    if created:
        console.print(
            f"created an admin API key for user {settings.default_user!r} and saved it "
            f"in {path}; this CLI reads it from there. Other clients "
            "send it as the metadata 'authorization: Bearer KEY'."
        )
    elif obj["api_key"]:
        return
    elif key is None:
        err_console.print(
            f"[yellow]note:[/yellow] the database has API keys but {path} does not "
            "exist, so pass --api-key or set INGESTD_API_KEY for the CLI"
        )
    elif not keys.key_is_active(url, key):
        err_console.print(
            f"[yellow]warning:[/yellow] the key in {path} is revoked or unknown; "
            "create one with `ingestd keys create --user USER --admin` and save it "
            "in that file, or pass --api-key"
        )
    if key and not obj["api_key"]:
        obj["api_key"] = key


@cli.group(name="keys")
def keys_group() -> None:
    """Create, list and revoke API keys (works on the database directly)."""


@keys_group.command(name="create")
@click.option("--user", "user_id", required=True, help="user id the key acts for")
@click.option("--admin", is_flag=True, help="allow admin-only calls")
@click.option("--label", default="", help="a note to recognize the key by")
@click.pass_obj
def keys_create(obj: dict, user_id: str, admin: bool, label: str) -> None:
    """Create a key and print it once; only its hash is stored."""
    configure_logging("WARNING", "text")
    url = supervisor.prepare_database(obj["settings"])
    try:
        key_id, key = keys.create(url, user_id, is_admin=admin, label=label)
    except ValueError as exc:
        fail(str(exc))
    console.print(f"key id {key_id} for user {user_id}{' (admin)' if admin else ''}")
    console.print("the key is shown only now; store it safely:")
    click.echo(key)


@keys_group.command(name="list")
@click.option("--all", "include_revoked", is_flag=True, help="include revoked keys")
@click.pass_obj
def keys_list(obj: dict, include_revoked: bool) -> None:
    """List keys without their secrets."""
    configure_logging("WARNING", "text")
    url = supervisor.prepare_database(obj["settings"])
    records = keys.list_all(url, include_revoked)
    if not records:
        console.print(
            "no API keys in this database; create one with `ingestd keys create --user USER`"
        )
        return
    columns = [
        Column("key id"),
        Column("user"),
        Column("admin"),
        Column("label", fold=True),
        Column("created"),
    ]
    if include_revoked:
        columns.append(Column("revoked"))
    rows = []
    for record in records:
        row = [
            record.key_id,
            printable(record.user_id),
            "yes" if record.is_admin else "",
            printable(record.label),
            f"{record.created_at:%Y-%m-%d %H:%M}",
        ]
        if include_revoked:
            row.append(
                f"{record.revoked_at:%Y-%m-%d %H:%M}" if record.revoked_at else ""
            )
        rows.append(row)
    print_rows(console, columns, rows)


@keys_group.command(name="revoke")
@click.argument("key_id")
@click.pass_obj
def keys_revoke(obj: dict, key_id: str) -> None:
    """Revoke a key by its id; services stop accepting it within INGESTD_AUTH_CACHE_SECONDS."""
    configure_logging("WARNING", "text")
    url = supervisor.prepare_database(obj["settings"])
    active = keys.list_all(url, include_revoked=False)
    if not keys.revoke(url, key_id):
        fail(
            f"no active key has id {key_id!r}; it does not exist or is revoked "
            "already, see `ingestd keys list --all`"
        )
    console.print(f"revoked key {key_id}")
    admins_left = [k for k in active if k.is_admin and k.key_id != key_id]
    if not admins_left and any(k.is_admin for k in active):
        err_console.print(
            "[yellow]warning:[/yellow] no active admin key is left; create one with "
            "`ingestd keys create --user USER --admin`"
        )


@cli.command()
@click.option(
    "--admin-key-file",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="if the database has no API key yet, create an admin key and save it here",
)
@click.pass_obj
def migrate(obj: dict, admin_key_file: Path | None) -> None:
    """Apply the database migrations (starts the embedded database if no URL is set)."""
    configure_logging("WARNING", "text")
    settings: Settings = obj["settings"]
    url = supervisor.prepare_database(settings)
    console.print(f"database migrated: {_redact(url)}")
    if admin_key_file is not None:
        _, created = keys.ensure_first_key(settings, url, admin_key_file)
        if created:
            console.print(
                f"created an admin API key for user {settings.default_user!r} in {admin_key_file}"
            )
        else:
            console.print("API keys exist already; created none")
    elif not settings.allow_unauthenticated and not keys.list_all(url, False):
        console.print(
            "the database has no API key yet, and the services need one to start; "
            "create one with `ingestd keys create --user USER --admin`"
        )


def _redact(url: str) -> str:
    scheme, sep, rest = url.partition("://")
    credentials, at, host = rest.rpartition("@")
    if not at:
        return url
    user = credentials.split(":", 1)[0]
    return f"{scheme}{sep}{user}:***@{host}"


@cli.command()
@click.option(
    "--log-dir",
    type=click.Path(path_type=Path),
    default=None,
    help="write service logs here instead of the terminal",
)
@click.pass_obj
def up(obj: dict, log_dir: Path | None) -> None:
    """Migrate, then run the gateway, chunker and embedder until Ctrl-C."""
    configure_logging("INFO", "text")
    settings: Settings = obj["settings"]
    url = supervisor.prepare_database(settings)
    _local_key(obj, url)
    try:
        children = supervisor.start_services(settings, url, log_dir)
    except RuntimeError as exc:
        fail(str(exc))
    stopping = False
    failed = False

    def on_signal(_signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    try:
        supervisor.wait_until_serving(settings, children)
        for child in children:
            console.print(f"{child.name:<9} serving on {settings.host}:{child.port}")
        console.print("press Ctrl-C to stop")
        while not stopping:
            exited = [child for child in children if child.process.poll() is not None]
            if exited:
                err_console.print(
                    f"[red]{exited[0].name} {exit_description(exited[0].process.returncode)}"
                    "; stopping[/red]"
                )
                failed = True
                break
            time.sleep(0.5)
    except RuntimeError as exc:
        err_console.print(f"[red]error:[/red] {exc}")
        failed = True
    finally:
        console.print("stopping services")
        supervisor.stop_services(children, settings.shutdown_grace_seconds)
    console.print("stopped")
    if failed:
        sys.exit(1)


def _upload_one(
    stub: upload_grpc.UploadServiceStub,
    path: Path,
    user: str | None,
    password: str | None,
) -> upload_pb.UploadResponse:
    return with_retries(
        lambda: stub.Upload(
            upload_requests(path, password), metadata=call_metadata(user), timeout=600
        )
    )


def _watch(
    stub: upload_grpc.UploadServiceStub,
    job_id: str,
    user: str | None,
    progress: Progress,
    task: int,
) -> resources_pb2.Job:
    job = None
    try:
        for update in stub.WatchJob(
            upload_pb.WatchJobRequest(job_id=job_id), metadata=call_metadata(user)
        ):
            job = update.job
            _show_progress(progress, task, job)
    except grpc.RpcError as error:
        if error.code() == grpc.StatusCode.UNAVAILABLE:
            raise click.ClickException(
                f"lost the gateway while waiting for job {job_id} ({error.details()}); "
                "the job goes on when the services run again: check it with "
                "`ingestd jobs`"
            ) from None
        if error.code() != grpc.StatusCode.RESOURCE_EXHAUSTED:
            raise
        # The gateway has no watch to spare; GetJob answers the same question.
        while job is None or job.status not in TERMINAL:
            time.sleep(POLL_SECONDS)
            job = stub.GetJob(
                upload_pb.GetJobRequest(job_id=job_id), metadata=call_metadata(user)
            ).job
            _show_progress(progress, task, job)
    assert job is not None
    return job


def _show_progress(progress: Progress, task: int, job: resources_pb2.Job) -> None:
    # The chunk count is known once the chunker has run; until then the bar
    # has no total. A document with no text has a total of 0.
    total = None
    if job.status >= resources_pb2.JOB_STATUS_CHUNKS_STORED:
        total = job.progress.embeds_total
    progress.update(
        task,
        total=total,
        completed=job.progress.embeds_done,
        status=status_name(job.status),
    )


@cli.command()
@click.argument(
    "paths",
    nargs=-1,
    required=True,
    type=click.Path(exists=True, path_type=Path),
)
@click.option(
    "--wait",
    is_flag=True,
    help="wait for every document to finish, with a progress bar each",
)
@click.option("--password", default=None, help="password for encrypted PDFs")
@click.pass_obj
def upload(
    obj: dict, paths: tuple[Path, ...], wait: bool, password: str | None
) -> None:
    """Upload files and folders; with --wait, follow each to complete or failed.

    A folder is searched recursively for .md, .markdown, .txt, .html, .htm
    and .pdf files. Hidden files and folders (.git, .venv), linked folders
    and links to files outside the folder are skipped and named. A file
    named on the command line is uploaded even if it is hidden or a link.
    The exit status is 1 when any file could not be read or uploaded, or,
    with --wait, did not complete.
    """
    files, unreadable = _expand(paths)
    if not files:
        names = ", ".join(str(path) for path in paths)
        fail(
            f"no documents to upload in {names}: no readable .md, .markdown, .txt, "
            ".html, .htm or .pdf files there"
        )
    with gateway_channel(obj) as channel:
        results, failures = upload_paths(
            channel, obj["user"], tuple(files), wait=wait, password=password
        )
    incomplete = wait and any(
        job.status != resources_pb2.JOB_STATUS_COMPLETE for job in results
    )
    if unreadable or failures or incomplete:
        sys.exit(1)


def upload_paths(
    channel: grpc.Channel,
    user: str | None,
    paths: tuple[Path, ...],
    *,
    wait: bool,
    password: str | None = None,
) -> tuple[list[resources_pb2.Job], int]:
    """Upload paths and optionally watch them; return the final jobs and the failures.

    A file the gateway rejects is reported and skipped, and counts as a
    failure. The command exits with status 1 when every file was rejected.
    """
    stub = upload_grpc.UploadServiceStub(channel)
    responses = []
    failures = 0
    for path in paths:
        try:
            response = _upload_one(stub, path, user, password)
        except grpc.RpcError as exc:
            # One rejected file must not stop the others.
            err_console.print(
                f"[red]upload of {shown(path)} failed:[/red] {shown(rpc_error_text(exc))}",
                highlight=False,
            )
            failures += 1
            continue
        note = ""
        if response.duplicate:
            note = f" (already uploaded; job {status_name(response.job.status)})"
        console.print(
            f"{shown(path.name)}: document {response.document.document_id} "
            f"job {response.job.job_id}{note}",
            soft_wrap=True,
            highlight=False,
        )
        responses.append((path, response))
    if failures and not responses:
        sys.exit(1)
    if not wait:
        return [response.job for _, response in responses], failures
    columns = (
        TextColumn("{task.description}", style="bold"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total} chunks"),
        TextColumn("{task.fields[status]}"),
        TimeElapsedColumn(),
    )
    with (
        Progress(*columns, console=console) as progress,
        concurrent.futures.ThreadPoolExecutor(max_workers=8) as pool,
    ):
        futures = []
        for path, response in responses:
            task = progress.add_task(
                shown(path.name[:40]),
                total=None,
                status=status_name(response.job.status),
            )
            futures.append(
                pool.submit(_watch, stub, response.job.job_id, user, progress, task)
            )
        jobs = [future.result() for future in futures]
    for (path, _), job in zip(responses, jobs, strict=True):
        if job.status != resources_pb2.JOB_STATUS_COMPLETE:
            err_console.print(
                f"[red]{shown(path.name)}: {status_name(job.status)}: "
                f"{shown(job.last_error.code)}: {shown(job.last_error.message)}[/red]",
                highlight=False,
            )
    return jobs, failures


@cli.command()
@click.argument("query")
@click.option(
    "--top-k", default=5, show_default=True, help="number of results, 1 to 100"
)
@click.option(
    "--min-score",
    default=0.0,
    show_default=True,
    type=click.FloatRange(-1, 1),
    help="drop results whose cosine similarity is below this value",
)
@click.pass_obj
def search(obj: dict, query: str, top_k: int, min_score: float) -> None:
    """Search your documents and print the best chunks."""
    with gateway_channel(obj) as channel:
        print_search(channel, obj["user"], query, top_k, min_score)


def print_search(
    channel: grpc.Channel,
    user: str | None,
    query: str,
    top_k: int,
    min_score: float = 0.0,
) -> None:
    """Run a search and print the ranked results."""
    stub = search_service_pb2_grpc.SearchServiceStub(channel)
    try:
        response = stub.Search(
            search_service_pb2.SearchRequest(
                query=query, top_k=top_k, min_score=min_score
            ),
            metadata=call_metadata(user),
            timeout=60,
        )
    except grpc.RpcError as exc:
        fail(f"search failed: {rpc_error_text(exc)}")
    if response.other_version_documents:
        count = response.other_version_documents
        err_console.print(
            f"[yellow]{count} of your documents {'was' if count == 1 else 'were'} "
            f"embedded with another model or version than the embedder's "
            f"{response.embed_model} {response.embed_version}, so this search "
            "skipped them; upload them again to embed them with it[/yellow]",
            highlight=False,
        )
    if not response.results:
        # Scores are cosine similarities, so -1 already admits every chunk.
        hint = " (try --min-score -1 to see weak matches)" if min_score > -1 else ""
        console.print(
            f"no results with a score of at least {min_score} among the documents "
            f"embedded with {response.embed_model} {response.embed_version}{hint}",
            highlight=False,
        )
        return
    for rank, result in enumerate(response.results, start=1):
        where = " > ".join(plain_text(heading) for heading in result.heading_path)
        if result.page_start:
            where = (
                f"page {result.page_start}"
                + (
                    f"-{result.page_end}"
                    if result.page_end != result.page_start
                    else ""
                )
                + (f", {where}" if where else "")
            )
        console.print(
            f"[bold]{rank}. {shown(result.filename)}[/bold]  "
            f"score {result.score:.3f}  {shown(where)}",
            highlight=False,
        )
        snippet = printable(shorten(plain_text(result.text), SNIPPET_CHARS))
        if console.is_terminal:
            # Wrapped lines keep the indent.
            console.print(Padding(Text(snippet), (0, 0, 0, 3), expand=False))
        else:
            # Piped output keeps each snippet on one line, without the
            # trailing spaces that padding adds to wrapped lines.
            console.print(Text(f"   {snippet}"), soft_wrap=True)


# The maximum number of items that one list call returns.
MAX_PAGE_SIZE = 500


def read_pages(fetch: Callable[[int, str], Any], field: str, limit: int) -> list[Any]:
    """Read up to limit items from a paged list call, following next_page_token.

    fetch(page_size, page_token) makes one call. field is the name of the
    response's repeated field.
    """
    found: list[Any] = []
    token = ""
    while len(found) < limit:
        response = fetch(min(limit - len(found), MAX_PAGE_SIZE), token)
        found.extend(getattr(response, field))
        token = response.next_page_token
        if not token:
            break
    return found


def limit_option(noun: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Return the --limit option of a list command, 50 by default and at least 1."""
    return click.option(
        "--limit",
        default=50,
        show_default=True,
        type=click.IntRange(min=1),
        help=f"maximum {noun} to list",
    )


# The --status shortcut for every failed status.
FAILED_STATUSES = ("failed_parse", "failed_chunking", "failed_embedding")


def job_status_values(statuses: tuple[str, ...]) -> list[int]:
    """Map --status names to JobStatus values; "failed" means every failed status."""
    names: list[str] = []
    for status in statuses:
        names.extend(FAILED_STATUSES if status.lower() == "failed" else [status])
    known = resources_pb2.JobStatus.DESCRIPTOR.values_by_name
    unknown = [name for name in names if f"JOB_STATUS_{name.upper()}" not in known]
    if unknown:
        valid = ", ".join(
            name.removeprefix("JOB_STATUS_").lower()
            for name in resources_pb2.JobStatus.keys()[1:]
        )
        fail(
            f"unknown status {', '.join(map(repr, unknown))}; use one of: {valid}, "
            "or failed for all three failed statuses"
        )
    return [
        resources_pb2.JobStatus.Value(f"JOB_STATUS_{name.upper()}") for name in names
    ]


@cli.command()
@click.option(
    "--status",
    "statuses",
    multiple=True,
    help="only jobs in this status (repeatable), for example failed_parse, "
    "or failed for every failed status",
)
@limit_option("jobs")
@click.option(
    "--all-users", is_flag=True, help="list every user's jobs (needs an admin key)"
)
@click.pass_obj
def jobs(obj: dict, statuses: tuple[str, ...], limit: int, all_users: bool) -> None:
    """List your jobs with status and progress, newest first."""
    values = job_status_values(statuses)
    with gateway_channel(obj) as channel:
        stub = upload_grpc.UploadServiceStub(channel)
        try:
            found: list[resources_pb2.Job] = read_pages(
                lambda size, token: stub.ListJobs(
                    upload_pb.ListJobsRequest(
                        page_size=size,
                        page_token=token,
                        statuses=values,
                        all_users=all_users,
                    ),
                    metadata=call_metadata(obj["user"]),
                    timeout=30,
                ),
                "jobs",
                limit,
            )
        except grpc.RpcError as exc:
            if all_users and exc.code() == grpc.StatusCode.PERMISSION_DENIED:
                fail(
                    "--all-users needs an admin key; leave it out to list your own jobs"
                )
            fail(f"listing jobs failed: {rpc_error_text(exc)}")
        if not found:
            console.print("no jobs")
            return
        names: dict[str, str] = {}
        if not all_users:
            try:
                names = _file_names(stub, obj["user"], found)
            except grpc.RpcError as exc:
                fail(f"listing the jobs' documents failed: {rpc_error_text(exc)}")
    columns = [
        Column("job"),
        Column("user") if all_users else Column("file", fold=True),
        Column("status"),
        Column("embedded", right_aligned=True),
    ]
    rows = [
        [
            job.job_id,
            printable(job.user_id if all_users else names.get(job.document_id, "")),
            status_name(job.status),
            f"{job.progress.embeds_done}/{job.progress.embeds_total}",
        ]
        for job in found
    ]
    print_rows(console, columns, rows)
    # Errors go below the table in full, because a column would cut them
    # short in a narrow terminal.
    for job in found:
        if job.last_error.code:
            console.print(
                f"{job.job_id} {status_name(job.status)}: {job.last_error.code}: "
                f"{job.last_error.message}",
                highlight=False,
                markup=False,
            )


def _file_names(
    stub: upload_grpc.UploadServiceStub,
    user: str | None,
    jobs: list[resources_pb2.Job],
) -> dict[str, str]:
    """Map the jobs' document ids to file names, reading documents newest first.

    Jobs and documents are both listed newest first, so the first page of
    documents usually names every job. Later pages are read only while some
    document is still missing.
    """
    requested = {job.document_id for job in jobs}
    names: dict[str, str] = {}
    token = ""
    while requested - names.keys():
        response = stub.ListDocuments(
            upload_pb.ListDocumentsRequest(page_size=500, page_token=token),
            metadata=call_metadata(user),
            timeout=30,
        )
        names.update(
            (document.document_id, document.filename) for document in response.documents
        )
        token = response.next_page_token
        if not token:
            break
    return names


@cli.command()
@limit_option("documents")
@click.pass_obj
def documents(obj: dict, limit: int) -> None:
    """List your documents, newest first."""
    with gateway_channel(obj) as channel:
        stub = upload_grpc.UploadServiceStub(channel)
        try:
            found: list[resources_pb2.Document] = read_pages(
                lambda size, token: stub.ListDocuments(
                    upload_pb.ListDocumentsRequest(page_size=size, page_token=token),
                    metadata=call_metadata(obj["user"]),
                    timeout=30,
                ),
                "documents",
                limit,
            )
        except grpc.RpcError as exc:
            fail(f"listing documents failed: {rpc_error_text(exc)}")

    if not found:
        console.print("no documents")
        return

    columns = [
        Column("document"),
        Column("file", fold=True),
        Column("type"),
        Column("bytes", right_aligned=True),
        Column("pages", right_aligned=True),
        Column("uploaded"),
    ]
    rows = [
        [
            document.document_id,
            printable(document.filename),
            printable(document.content_type),
            f"{document.byte_size:,}",
            str(document.page_count or ""),
            document.created_at.ToDatetime().strftime("%Y-%m-%d %H:%M:%S UTC"),
        ]
        for document in found
    ]
    print_rows(console, columns, rows)


@cli.command()
@click.argument("document_ids", nargs=-1, required=True)
@click.option("--yes", is_flag=True, help="delete without asking")
@click.pass_obj
def delete(obj: dict, document_ids: tuple[str, ...], yes: bool) -> None:
    """Delete documents with their jobs, chunks and stored file."""
    question = (
        f"delete document {document_ids[0]} and everything ingested from it?"
        if len(document_ids) == 1
        else f"delete {len(document_ids)} documents and everything ingested from them?"
    )
    if not yes and not sys.stdin.isatty():
        fail(
            "deleting needs a confirmation and input is not a terminal; "
            "pass --yes to delete without asking"
        )
    if not yes and not click.confirm(question):
        console.print("nothing deleted")
        return
    with gateway_channel(obj) as channel:
        stub = upload_grpc.UploadServiceStub(channel)
        failures = _call_each(
            document_ids,
            lambda document_id: stub.DeleteDocument(
                upload_pb.DeleteDocumentRequest(document_id=document_id),
                metadata=call_metadata(obj["user"]),
                timeout=60,
            ),
            action="deleting",
            not_found_hint="`ingestd documents` lists the ids of your documents.",
            describe=lambda response: (
                f"deleted {response.document_id}: "
                f"{plural(response.chunks_deleted, 'searchable chunk')}, "
                f"{plural(response.jobs_deleted, 'job')}"
            ),
        )
    if failures:
        sys.exit(1)


@cli.command()
@click.argument("job_ids", nargs=-1, required=True)
@click.pass_obj
def retry(obj: dict, job_ids: tuple[str, ...]) -> None:
    """Run failed jobs again from their last durable step."""
    with gateway_channel(obj) as channel:
        stub = upload_grpc.UploadServiceStub(channel)
        failures = _call_each(
            job_ids,
            lambda job_id: stub.RetryJob(
                upload_pb.RetryJobRequest(job_id=job_id),
                metadata=call_metadata(obj["user"]),
                timeout=30,
            ),
            action="retrying",
            not_found_hint="`ingestd jobs` lists the ids of your jobs.",
            describe=lambda response: (
                f"{response.job.job_id}: {status_name(response.job.status)}"
            ),
        )
    if failures:
        sys.exit(1)


def _call_each(
    ids: tuple[str, ...],
    call: Callable[[str], Any],
    *,
    action: str,
    not_found_hint: str,
    describe: Callable[[Any], str],
) -> int:
    """Call the gateway once per id, print each outcome, and return the failures."""
    failures = 0
    for item_id in ids:
        try:
            response = with_retries(lambda item_id=item_id: call(item_id))
        except grpc.RpcError as exc:
            hint = ""
            if exc.code() == grpc.StatusCode.NOT_FOUND:
                hint = f"\n{not_found_hint}"
            err_console.print(
                f"[red]{action} {shown(item_id[:80])} failed:[/red] "
                f"{shown(rpc_error_text(exc))}{hint}",
                highlight=False,
            )
            failures += 1
            continue
        console.print(describe(response), highlight=False, markup=False)
    return failures


@cli.command()
@click.option(
    "--query",
    default="How does a worker claim a job?",
    show_default=True,
    help="search to run after ingesting",
)
@click.argument("paths", nargs=-1, type=click.Path(exists=True, path_type=Path))
@click.pass_obj
def demo(obj: dict, query: str, paths: tuple[Path, ...]) -> None:
    """Start everything, ingest sample documents, search them, and stop.

    PATHS defaults to the project's own docs folder and README.
    """
    configure_logging("WARNING", "text")
    settings: Settings = obj["settings"]
    files, _ = _expand(paths or (SAMPLE_DIR, SAMPLE_DIR.parent / "README.md"))
    if not files:
        fail(
            "no documents to ingest; pass files or folders of .md, .txt, .html or .pdf files"
        )
    console.print(
        f"starting the database and services (logs in {settings.data_dir / 'logs'})"
    )
    url = supervisor.prepare_database(settings)
    _local_key(obj, url)
    try:
        children = supervisor.start_services(settings, url, settings.data_dir / "logs")
    except RuntimeError as exc:
        fail(str(exc))
    try:
        supervisor.wait_until_serving(settings, children)
        obj["gateway"] = f"{settings.host}:{settings.gateway_port}"
        noun = "document" if len(files) == 1 else "documents"
        console.print(f"ingesting {len(files)} {noun}")
        with gateway_channel(obj) as channel:
            upload_paths(channel, obj["user"], tuple(files), wait=True)
        console.print(f"\nsearch: [bold]{query}[/bold]")
        with gateway_channel(obj) as channel:
            print_search(channel, obj["user"], query, 5)
    except RuntimeError as exc:
        fail(str(exc))
    finally:
        supervisor.stop_services(children, settings.shutdown_grace_seconds)


def _expand(paths: tuple[Path, ...]) -> tuple[list[Path], int]:
    """List the files to ingest: given files, and documents inside given folders.

    Files in a folder whose suffix is not a document type are skipped and
    named on stderr. So are hidden files and folders (names that start with
    a dot, such as .git and .venv), symbolic links in a folder that point
    outside it, linked folders, and files and folders that cannot be read.
    Returns the files and the number that cannot be read.
    """
    suffixes = {".md", ".markdown", ".txt", ".html", ".htm", ".pdf"}
    files: list[Path] = []
    skipped: list[Path] = []
    outside_links: list[Path] = []
    linked_folders: list[Path] = []
    hidden: list[Path] = []
    unreadable: list[str] = []

    def note_error(error: OSError) -> None:
        unreadable.append(f"{error.filename}: {error.strerror}")

    for path in paths:
        if path.is_dir():
            # os.walk does not descend into linked folders, but it lists
            # linked files. A link to a file outside the folder would upload
            # a file that the user did not choose, such as a key in a
            # home folder.
            root = path.resolve()
            found_here: list[Path] = []
            for folder, folder_names, file_names in os.walk(path, onerror=note_error):
                # Hidden folders (.git, .venv) are not walked into.
                hidden.extend(
                    Path(folder) / name
                    for name in folder_names + file_names
                    if name.startswith(".")
                )
                folder_names[:] = [
                    name for name in folder_names if not name.startswith(".")
                ]
                found_here.extend(
                    Path(folder) / name
                    for name in file_names
                    if not name.startswith(".")
                )
                linked_folders.extend(
                    Path(folder) / name
                    for name in folder_names
                    if (Path(folder) / name).is_symlink()
                )
            for found in sorted(found_here):
                if found.suffix.lower() not in suffixes:
                    skipped.append(found)
                    continue
                if found.is_symlink():
                    target = _link_target(found)
                    if target is None:
                        unreadable.append(f"{found}: symbolic link loop")
                        continue
                    if not target.is_relative_to(root):
                        outside_links.append(found)
                        continue
                if not found.is_file() or not os.access(found, os.R_OK):
                    unreadable.append(f"{found}: not a readable file")
                else:
                    files.append(found)
        elif path.is_file():
            files.append(path)
        else:
            unreadable.append(f"{path}: not a regular file or folder")
    if skipped:
        _print_skipped(
            f"skipping {len(skipped)} file(s) that are not .md, .markdown, .txt, "
            ".html, .htm or .pdf",
            skipped,
        )
    if outside_links:
        _print_skipped(
            f"skipping {len(outside_links)} symbolic link(s) that point outside the "
            "folder",
            outside_links,
            "name a file on the command line to upload it",
        )
    if hidden:
        _print_skipped(
            f"skipping {len(hidden)} hidden file(s) and folder(s)",
            sorted(hidden),
            "name them on the command line to upload them",
        )
    if linked_folders:
        _print_skipped(
            f"skipping {len(linked_folders)} linked folder(s)",
            linked_folders,
            "name a folder on the command line to upload its files",
        )
    for problem in unreadable:
        err_console.print(f"[red]cannot read[/red] {shown(problem)}", highlight=False)
    return files, len(unreadable)


def _link_target(link: Path) -> Path | None:
    """Return the path a symbolic link finally points to, or None for a loop."""
    try:
        return link.resolve(strict=False)
    except (RuntimeError, OSError):
        # Python 3.11 and 3.12 raise RuntimeError for a loop. Python 3.13
        # resolves the path as far as it goes, and the file check then fails.
        return None


def _print_skipped(message: str, paths: list[Path], hint: str = "") -> None:
    """Print message on stderr with up to 10 of the skipped paths, then the hint."""
    names = ", ".join(str(path) for path in paths[:10])
    more = f" and {len(paths) - 10} more" if len(paths) > 10 else ""
    ending = f"; {hint}" if hint else ""
    err_console.print(f"{message}: {shown(names)}{more}{ending}", highlight=False)


def main() -> None:
    """Entry point of the ``ingestd`` console script."""
    cli()
