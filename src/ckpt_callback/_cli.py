"""The ``ckpt`` command: list, inspect, verify, download, url, delete, prune, request and plot checkpoints.

A thin layer over `CheckpointManager`: each command parses its options, makes one or two
manager calls and formats what comes back. `main` turns errors into one line on stderr and
an exit status: 0 success, 1 a failed check or operation, 2 bad usage (a traceback only
with ``--debug``).

Example:
    $ ckpt list runs/gpt2-ft --sort-by evalLoss --order asc --limit 5
    $ ckpt inspect runs/gpt2-ft best --json
    $ ckpt verify runs/gpt2-ft
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
import traceback
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click

from ._errors import CheckpointError, InvalidArgumentError, InvalidNameError
from ._manager import CheckpointManager, CheckpointWarning
from ._sidecar import CHECKPOINT_TYPES, CheckpointInfo
from ._views import flexai_document, human_size

__all__ = ["cli", "human_size", "inspect_document", "main"]

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
_CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


@dataclass
class _State:
    """What the shared options set, kept in ``ctx.obj`` so every command can open its root."""

    debug: bool = False
    storage_options: dict[str, Any] = field(default_factory=dict)
    monitor: str | None = None  # None: what the run recorded in its sidecars
    mode: str | None = None


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``ckpt`` with ``argv`` (default: ``sys.argv[1:]``) and return the exit status.

    Example:
        >>> main(["list", "/tmp/ckpt-doc-no-such-root"])  # prints "ckpt: error: ..." to stderr
        1
    """
    state = _State()
    with _library_output(state):
        try:
            result = cli.main(args=list(argv) if argv is not None else None, prog_name="ckpt",
                              standalone_mode=False, obj=state)
        except click.UsageError as exc:
            return _usage_error(exc)
        except click.ClickException as exc:
            return _fail(state, exc, exc.format_message(), exc.exit_code)
        except click.Abort:
            click.echo("ckpt: aborted", err=True)
            return EXIT_FAILED
        except (InvalidArgumentError, InvalidNameError) as exc:
            return _fail(state, exc, str(exc), EXIT_USAGE)
        except (CheckpointError, OSError) as exc:
            return _fail(state, exc, str(exc), EXIT_FAILED)
        except Exception as exc:
            return _fail(state, exc, f"unexpected {type(exc).__name__}: {exc} (run with --debug for details)",
                         EXIT_FAILED)
    return result if isinstance(result, int) else EXIT_OK


def _usage_error(exc: click.UsageError) -> int:
    where = exc.ctx.command_path if exc.ctx is not None else "ckpt"
    click.echo(f"ckpt: error: {_one_line(exc.format_message()).rstrip('.')}; see '{where} --help'", err=True)
    return EXIT_USAGE


def _fail(state: _State, exc: BaseException, message: str, code: int) -> int:
    if state.debug:
        traceback.print_exception(exc)
    click.echo(f"ckpt: error: {_one_line(message)}", err=True)
    return code


def _one_line(text: str) -> str:
    return " ".join(line.strip() for line in str(text).splitlines() if line.strip())


@contextlib.contextmanager
def _library_output(state: _State) -> Iterator[None]:
    """Show the library's log records and warnings as ``ckpt: warning: ...`` lines, INFO too with --debug.

    Everything is restored afterwards, because `main` also runs inside other programs (tests).
    """
    logger = logging.getLogger("ckpt_callback")
    handler = logging.StreamHandler()  # stderr as it is when a record arrives (pytest swaps it)
    handler.setFormatter(_PrefixFormatter())
    handler.addFilter(lambda record: state.debug or record.levelno >= logging.WARNING)
    old_level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        with warnings.catch_warnings():
            # The manager logs every CheckpointWarning as well; show each problem once.
            warnings.simplefilter("ignore", CheckpointWarning)
            warnings.showwarning = _show_warning
            yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)


class _PrefixFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return f"ckpt: {record.levelname.lower()}: {record.getMessage()}"


def _show_warning(message: Warning | str, category: type[Warning], *args: Any, **kwargs: Any) -> None:
    click.echo(f"ckpt: warning: {_one_line(str(message))}", err=True)


# --- shared options ---------------------------------------------------------------------------


def _set_debug(ctx: click.Context, param: click.Parameter, value: bool) -> None:
    state = ctx.ensure_object(_State)
    state.debug = state.debug or value  # `ckpt --debug list` and `ckpt list --debug` both work


def _set_storage_options(ctx: click.Context, param: click.Parameter, values: tuple[str, ...]) -> None:
    options = ctx.ensure_object(_State).storage_options
    for item in values:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"expected KEY=VALUE, got {item!r}", ctx, param)
        try:
            options[key] = json.loads(raw)  # true, 8, {"region_name": "x"}; anything else stays text
        except ValueError:
            options[key] = raw


def _set_state(ctx: click.Context, param: click.Parameter, value: str) -> None:
    assert param.name is not None
    setattr(ctx.ensure_object(_State), param.name, value)


_debug_option = click.option("--debug", is_flag=True, expose_value=False, is_eager=True, callback=_set_debug,
                             help="Show tracebacks and the library's log.")


def _root_options(fn: Any) -> Any:
    """The ROOT-opening options every command takes after its own."""
    fn = _debug_option(fn)
    fn = click.option("--mode", type=click.Choice(["min", "max"]), default=None,
                      expose_value=False, callback=_set_state,
                      help="Whether a lower or a higher --monitor value is better (default: as the run recorded).")(fn)
    fn = click.option("--monitor", default=None, expose_value=False, callback=_set_state,
                      help="What 'best' means: evalLoss, trainLoss or a metric name.")(fn)
    fn = click.option("--storage-option", "storage_options", metavar="KEY=VALUE", multiple=True,
                      expose_value=False, callback=_set_storage_options,
                      help="Passed to fsspec (repeatable), e.g. endpoint_url=http://localhost:9000; "
                           "VALUE is read as JSON when it parses, else as text.")(fn)
    return fn


def _examples(*lines: str) -> str:
    """A --help epilog of example command lines, kept as written (click's ``\\b`` marker)."""
    return "\b\nExamples:\n" + "\n".join(f"  $ {line}" if line else "" for line in lines)


def _echo_json(value: Any) -> None:
    click.echo(json.dumps(value, indent=2))


def _hint_if_empty(root: str) -> None:
    """Say why ROOT may look empty (a checkpoint folder, roots below it, a Trainer output_dir)."""
    from ._hints import empty_root_hint
    from ._storage import Storage

    state = click.get_current_context().ensure_object(_State)
    hint = empty_root_hint(Storage(root, state.storage_options or None))
    if hint is not None:
        click.echo(f"ckpt: hint: {hint}", err=True)


def _manager(root: str, **options: Any) -> CheckpointManager:
    state = click.get_current_context().ensure_object(_State)
    return CheckpointManager(root, storage_options=state.storage_options or None, monitor=state.monitor,
                             mode=state.mode, catalog_cache=_cache_dir(), **options)


def _cache_dir() -> str | None:
    """Where ``ckpt`` keeps the sidecars of object-store roots between runs (a later ``ckpt list`` reads
    again only those that changed): ``CKPT_CACHE_DIR``, else ``$XDG_CACHE_HOME/ckpt-callback``, else
    ``~/.cache/ckpt-callback``. ``CKPT_CACHE_DIR=off`` keeps none."""
    given = os.environ.get("CKPT_CACHE_DIR")
    if given is not None:
        return None if given.strip().lower() in ("", "off", "0", "none", "false") else given
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "ckpt-callback")


# --- formatting -------------------------------------------------------------------------------


def _number(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.4f}" if value == 0 or abs(value) >= 1e-3 else f"{value:.2e}"


def _count(n: int, noun: str = "checkpoint") -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def _describe(info: CheckpointInfo) -> str:
    return f"{info.name} ({info.type}, step {info.step}, {human_size(info.size)})"


def _table(headers: Sequence[str], rows: Sequence[Sequence[str]], right: set[int]) -> str:
    widths = [max(len(str(cell)) for cell in column) for column in zip(headers, *rows, strict=True)]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(c.rjust(w) if k in right else c.ljust(w)
                         for k, (c, w) in enumerate(zip(cells, widths, strict=True))).rstrip()

    return "\n".join([line(headers), *(line(row) for row in rows)])


def inspect_document(info: CheckpointInfo, manager: CheckpointManager) -> dict[str, Any]:
    """The ``ckpt inspect`` document of one checkpoint: FlexAI's ``checkpoint inspect`` plus our fields."""
    local = manager.local_path(info.name)
    root = os.path.dirname(local) if local is not None else manager.root.rstrip("/")  # local: an absolute path
    return flexai_document(info, root=root, path=f"{root.rstrip('/')}/{info.name}")


# --- commands ---------------------------------------------------------------------------------


@click.group(context_settings=_CONTEXT, no_args_is_help=False)  # `ckpt` alone: "Missing command", exit 2
@click.version_option(package_name="ckpt-callback", prog_name="ckpt")
@_debug_option
def cli() -> None:
    """List, inspect, verify, download, sign, delete, prune, request and plot checkpoints under ROOT.

    ROOT is a local folder or an fsspec URL (s3://bucket/run, gs://..., memory://...).
    Wherever NAME is taken, 'latest', 'best' and 'final' work too, and so does a checkpoint id.
    S3 credentials come from the usual AWS environment variables or --storage-option.

    Shell completion: eval "$(_CKPT_COMPLETE=bash_source ckpt)" in ~/.bashrc
    (zsh_source in ~/.zshrc, fish_source for fish).
    """


@cli.command("list", epilog=_examples(
    "ckpt list runs/gpt2-ft",
    "ckpt list runs/gpt2-ft --sort-by evalLoss --order asc --limit 5",
    "ckpt list runs/gpt2-ft --limit 5 --after checkpoint-800       # the next page",
    "ckpt list s3://bucket/run --type best --json",
    "ckpt list runs/gpt2-ft --format openai                        # OpenAI's fine-tuning checkpoint list",
    "ckpt list runs/gpt2-ft --format tensorone --sort-by validationLoss --order asc"))
@click.argument("root")
@click.option("--sort-by", default="createdAt", show_default=True,
              help="createdAt, updatedAt, step, epoch, name, size, trainLoss, evalLoss or a metric name.")
@click.option("--order", type=click.Choice(["asc", "desc"]), default="desc", show_default=True)
@click.option("--limit", type=click.IntRange(1, 100), default=None, help="At most N checkpoints (1 to 100).")
@click.option("--after", metavar="ID", default=None, help="Start after this checkpoint (id or name): the next page.")
@click.option("--type", "type_", type=click.Choice(CHECKPOINT_TYPES), default=None, help="Only this type.")
@click.option("--json", "as_json", is_flag=True, help="Print the list object as JSON (sizes in bytes).")
@click.option("--format", "format_", type=click.Choice(["table", "native", "openai", "tensorone"]), default="table",
              help="native: the --json list object; openai: OpenAI's fine-tuning checkpoint list; "
                   "tensorone: TensorOne's checkpoints list (all JSON).")
@click.option("--include-metrics/--no-include-metrics", default=True, show_default=True,
              help="With --format tensorone: each checkpoint's metrics.")
@_root_options
def list_command(root: str, sort_by: str, order: str, limit: int | None, after: str | None,
                 type_: str | None, as_json: bool, format_: str, include_metrics: bool) -> int:
    """Show the checkpoints under ROOT as a table (or JSON).

    Newest first by default (--sort-by createdAt --order desc), as --json pages are.

    Sizes in the table are decimal (1 MB = 1,000,000 bytes); --json gives exact bytes.
    Page with --limit N and --after the last id (or name) of the previous page.
    """
    page = _manager(root).list(sort_by=sort_by, order=order, limit=limit, after=after, type=type_)
    if as_json and format_ not in ("table", "native"):
        raise click.UsageError("--json is --format native; give one of them")
    if as_json or format_ != "table":
        if page.total_count == 0 and type_ is None:
            _hint_if_empty(root)
        views = {"table": page.to_json, "native": page.to_json, "openai": page.to_openai,
                 "tensorone": lambda: page.to_tensorone(include_metrics=include_metrics)}
        click.echo(json.dumps(views[format_](), indent=2))
        return EXIT_OK
    if page.total_count == 0 and type_ is None:
        _hint_if_empty(root)
    if not page.data:
        click.echo(f"no {type_ + ' ' if type_ else ''}checkpoints in {root}" + (f" after {after}" if after else ""))
        return EXIT_OK
    # Compressed or shared data: the stored size and the size once decoded differ, so both are shown.
    both = any(i.logical_size != i.size or i.shared_size for i in page.data) or (
        summary_logical(page) != page.summary.total_size)
    rows = [[i.name, i.type + (f" ({i.adapter.type})" if i.adapter else ""), str(i.step), _number(i.train_loss),
             _number(i.eval_loss), human_size(i.size), *([human_size(i.logical_size)] if both else []),
             i.created_at[:19].replace("T", " ")]
            for i in page.data]
    headers = ["name", "type", "step", "trainLoss", "evalLoss", "size", *(["logical"] if both else []),
               "created (UTC)"]
    click.echo(_table(headers, rows, right={2, 3, 4, 5, 6} if both else {2, 3, 4, 5}))
    summary = page.summary
    total = human_size(summary.total_size)
    if both:
        total = f"{total} stored ({human_size(summary_logical(page))} logical)"
    footer = f"{_count(page.total_count)}, {total}"
    if type_:
        footer = f"{_count(page.total_count, type_ + ' checkpoint')}; {total} in all"
    if summary.best is not None:
        footer += f"; best {summary.best.name}"
    if summary.latest is not None:
        footer += f"; latest {summary.latest.name}"
    if page.has_more:
        footer += f"; next page: --after {page.data[-1].name}"
    click.echo(footer)
    return EXIT_OK


@cli.command("inspect", epilog=_examples(
    "ckpt inspect runs/gpt2-ft best",
    "ckpt inspect runs/gpt2-ft checkpoint-500 --json",
    "ckpt inspect s3://bucket/run latest"))
@click.argument("root")
@click.argument("name")
@click.option("--json", "as_json", is_flag=True, help="JSON instead of YAML.")
@_root_options
def inspect_command(root: str, name: str, as_json: bool) -> int:
    """Describe one checkpoint as YAML (or JSON): FlexAI's checkpoint inspect document.

    kind, metadata (name, id, creatorUserID, ownerOrgID), spec (fromLocalFiles, storageProvider,
    sourcePath: where an imported checkpoint came from; plus root, path, type, description, epoch,
    metrics, runId) and status (status, storageProviderID, size, files, metadata, createdAt, updatedAt).
    """
    manager = _manager(root)
    document = inspect_document(manager.get(name), manager)
    if as_json:
        click.echo(json.dumps(document, indent=2))
    else:
        import yaml

        click.echo(yaml.safe_dump(document, sort_keys=False, allow_unicode=True, width=100), nl=False)
    return EXIT_OK


@cli.command("verify", epilog=_examples(
    "ckpt verify runs/gpt2-ft",
    "ckpt verify runs/gpt2-ft best",
    "ckpt verify s3://bucket/run --json"))
@click.argument("root")
@click.argument("name", required=False)
@click.option("--json", "as_json", is_flag=True, help="Print one {name, ok, problems, leftovers} per checkpoint.")
@_root_options
def verify_command(root: str, name: str | None, as_json: bool) -> int:
    """Re-hash files against their sidecar; exit 1 if any differs.

    Checks checkpoint NAME, or every checkpoint under ROOT; each bad or missing file is named.
    """
    results = _manager(root).verify(name)
    if not results:
        _hint_if_empty(root)
    if as_json:
        _echo_json([{"name": r.name, "ok": r.ok, "problems": r.problems, "leftovers": r.leftovers} for r in results])
        return EXIT_OK if all(r.ok for r in results) else EXIT_FAILED
    for result in results:
        if result.ok:
            click.echo(f"ok      {result.name}")
        for problem in result.problems:
            click.echo(f"FAILED  {result.name}/{problem}")
        for leftover in result.leftovers:
            click.echo(f"note    {result.name}/{leftover}")
    bad = [r.name for r in results if not r.ok]
    if bad:
        raise click.ClickException(f"{len(bad)} of {_count(len(results))} failed verification: {', '.join(bad)}")
    click.echo(f"{_count(len(results))} verified" if results else f"no checkpoints in {root}")
    return EXIT_OK


def summary_logical(page: Any) -> int:
    """The page summary's logical total (decoded bytes, every checkpoint in full)."""
    logical = page.summary.total_logical_size
    return page.summary.total_size if logical is None else int(logical)


@cli.command("download", epilog=_examples(
    "ckpt download runs/gpt2-ft best ./best-model",
    "ckpt download s3://bucket/run latest ./weights --include '*.safetensors' --exclude 'optimizer*'",
    "ckpt download runs/gpt2-ft checkpoint-500 ./ckpt --force --json"))
@click.argument("root")
@click.argument("name")
@click.argument("dest", type=click.Path(file_okay=False, writable=True))
@click.option("--include", multiple=True, metavar="GLOB",
              help="Copy only files matching GLOB (repeatable), e.g. '*.safetensors'.")
@click.option("--exclude", multiple=True, metavar="GLOB",
              help="Skip files matching GLOB (repeatable), e.g. 'optimizer*'.")
@click.option("--force", is_flag=True, help="Write into DEST even if it is not empty.")
@click.option("--decompress", is_flag=True,
              help="Decode compressed files (compression='zstd') into plain ones that from_pretrained loads.")
@click.option("--progress/--no-progress", default=None,
              help="Show a progress bar [default: on a terminal, above 4 MB].")
@click.option("--json", "as_json", is_flag=True, help="Print what was copied as JSON.")
@_root_options
def download_command(root: str, name: str, dest: str, include: tuple[str, ...], exclude: tuple[str, ...],
                     force: bool, decompress: bool, progress: bool | None, as_json: bool) -> int:
    """Copy checkpoint NAME to the local folder DEST.

    Every file's sha256 is checked; DEST becomes the checkpoint folder itself (for HF models,
    from_pretrained(DEST) works). Globs match each file's path inside the checkpoint; the
    sidecar copied to DEST lists the files copied. A DEST that is not empty is refused without
    --force (files of the same name are then replaced; others are left).
    """
    target = Path(dest)
    if target.exists() and (not target.is_dir() or any(target.iterdir())) and not force:
        raise click.UsageError(f"{dest} is not empty: pass --force to write into it, or choose an empty folder")
    manager = _manager(root)
    info = manager.get(name)
    folder = manager.download(info.name, dest, progress=progress, include=include or None, exclude=exclude or None,
                              decompress=decompress)
    copied = CheckpointInfo.loads((folder / "checkpoint.json").read_bytes())
    if as_json:
        _echo_json({"name": info.name, "id": info.id, "dest": str(folder),
                    "files": [f.path for f in copied.files], "size": copied.size})
        return EXIT_OK
    part = f" ({_count(len(copied.files), 'file')}, {human_size(copied.size)})" if include or exclude else ""
    click.echo(f"downloaded {_describe(info)}{part} to {folder}")
    return EXIT_OK


@cli.command("url", epilog=_examples(
    "ckpt url s3://bucket/run best",
    "ckpt url s3://bucket/run checkpoint-500 --expires 600 --json"))
@click.argument("root")
@click.argument("name")
@click.option("--expires", type=click.IntRange(min=1), default=3600, show_default=True, metavar="SECONDS",
              help="How long the URLs work.")
@click.option("--json", "as_json", is_flag=True, help="Print {path: url} as JSON.")
@_root_options
def url_command(root: str, name: str, expires: int, as_json: bool) -> int:
    """Print signed download URLs for the files of NAME.

    Only object storage can sign (s3://, gs://, ...); a local folder cannot.
    """
    manager = _manager(root)
    info = manager.get(name)
    urls = manager.signed_urls(info.name, expires=expires)
    if as_json:
        click.echo(json.dumps(urls, indent=2))
    else:
        width = max(len(path) for path in urls)
        for path, url in urls.items():
            click.echo(f"{path.ljust(width)}  {url}")
    return EXIT_OK


@cli.command("delete", epilog=_examples(
    "ckpt delete runs/gpt2-ft checkpoint-100",
    "ckpt delete s3://bucket/run checkpoint-100 --yes --json"))
@click.argument("root")
@click.argument("name")
@click.option("--yes", "-y", is_flag=True, help="Do not ask; required when not on a terminal.")
@click.option("--json", "as_json", is_flag=True, help="Print the deleted checkpoint's sidecar as JSON.")
@_root_options
def delete_command(root: str, name: str, yes: bool, as_json: bool) -> int:
    """Remove checkpoint NAME.

    Asks for confirmation on a terminal; elsewhere (scripts, CI) --yes is required.
    """
    manager = _manager(root)
    info = manager.get(name)  # resolve 'best'/'latest' once, so the one confirmed is the one deleted
    if not yes:
        if not sys.stdin.isatty():
            raise click.UsageError(f"stdin is not a terminal, so no one can confirm: pass --yes to delete {info.name}")
        if not click.confirm(f"Delete {_describe(info)} from {root}?", default=False):
            click.echo("nothing deleted")
            return EXIT_FAILED
    manager.delete(info.name)
    if as_json:
        _echo_json(info.to_json())
    else:
        click.echo(f"deleted {_describe(info)}")
    return EXIT_OK


@cli.command("prune", epilog=_examples(
    "ckpt prune runs/gpt2-ft --keep-last 2 --dry-run",
    "ckpt prune runs/gpt2-ft --keep-last 2 --keep-best 1",
    "ckpt prune s3://bucket/run --keep-last 3 --monitor accuracy --mode max --json"))
@click.argument("root")
@click.option("--keep-last", type=click.IntRange(min=0), required=True, metavar="N",
              help="Keep the N newest automatic checkpoints.")
@click.option("--keep-best", type=click.IntRange(min=0), default=1, show_default=True, metavar="N",
              help="Also keep the N best by --monitor.")
@click.option("--dry-run", is_flag=True, help="Only show what would be deleted.")
@click.option("--json", "as_json", is_flag=True, help="Print {dryRun, deleted: [names], freed: bytes} as JSON.")
@_root_options
def prune_command(root: str, keep_last: int, keep_best: int, dry_run: bool, as_json: bool) -> int:
    """Delete old automatic checkpoints, keeping the N newest.

    The best --keep-best by --monitor, every final and manual one, and the newest checkpoint
    are always kept. Incomplete folders left by crashed saves are removed too (not with --dry-run).
    """
    manager = _manager(root, keep_best=keep_best)
    doomed = manager.prune(keep_last=keep_last, dry_run=dry_run)
    if as_json:
        _echo_json({"dryRun": dry_run, "deleted": [i.name for i in doomed], "freed": sum(i.size for i in doomed)})
        return EXIT_OK
    verb = "would delete" if dry_run else "deleted"
    for info in doomed:
        click.echo(f"{verb} {_describe(info)}")
    freed = human_size(sum(i.size for i in doomed))
    click.echo(f"{verb} {_count(len(doomed))} ({freed})" if doomed else "nothing to prune")
    return EXIT_OK


@cli.command("request", epilog=_examples(
    "ckpt request runs/job --name before-lr-drop --description 'asked from the shell' --wait",
    "ckpt request s3://bucket/run --stop --wait --timeout 900"))
@click.argument("root")
@click.option("--name", default=None, help="Name of the checkpoint (default: checkpoint-STEP).")
@click.option("--description", default=None, help="Free text for its sidecar.")
@click.option("--stop", is_flag=True, help="Ask for a final checkpoint and a clean stop of the job (cancel it).")
@click.option("--wait", is_flag=True, help="Wait until the job saved it; exit 1 if it could not.")
@click.option("--timeout", type=click.FloatRange(min=0), default=600.0, show_default=True, metavar="SECONDS",
              help="With --wait: how long to wait; a request no job took by then is withdrawn.")
@click.option("--json", "as_json", is_flag=True, help="Print the request (or with --wait the checkpoint) as JSON.")
@_root_options
def request_command(root: str, name: str | None, description: str | None, stop: bool, wait: bool, timeout: float,
                    as_json: bool) -> int:
    """Ask the running job writing ROOT for a checkpoint now.

    The job (its CheckpointHook or CheckpointCallback) looks for requests every 10 s by default,
    saves a manual checkpoint at its next step boundary (with --stop a final one, then it stops)
    and records the outcome, which --wait prints. The request travels through ROOT itself, so
    this works from any machine that can write ROOT.
    """
    manager = _manager(root)
    request = manager.request(name=name, description=description, stop=stop)
    if not wait:
        if as_json:
            click.echo(json.dumps(request.to_json(), indent=2))
        else:
            click.echo(f"requested a {'final' if stop else 'manual'} checkpoint{' and a stop' if stop else ''} "
                       f"({request.id}); the job takes it at its next look (every 10 s by default)")
        return EXIT_OK
    if not as_json:
        click.echo(f"requested {request.id}; waiting for the job (up to {timeout:g}s)", err=True)
    info = request.wait(timeout=timeout)
    if as_json:
        click.echo(json.dumps(info.to_json(), indent=2))
    else:
        click.echo(f"saved {_describe(info)}" + (f": {info.description}" if info.description else ""))
    return EXIT_OK


@cli.command("plot", epilog=_examples(
    "ckpt plot runs/gpt2-ft -o loss.png",
    "ckpt plot s3://bucket/run -o loss.svg --log-scale --json"))
@click.argument("root")
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False, writable=True),
              help="Image file to write (.png, .svg, .pdf).")
@click.option("--log-scale", is_flag=True, help="A logarithmic loss axis.")
@click.option("--json", "as_json", is_flag=True, help="Print {output, checkpoints} as JSON.")
@_root_options
def plot_command(root: str, output: str, log_scale: bool, as_json: bool) -> int:
    """Plot train and eval loss over steps to an image file.

    HF runs: the whole train and eval loss history the Trainer logged (trainer_state.json of
    the newest checkpoint), with the stored checkpoints marked on it. Otherwise one point per
    stored checkpoint. Marker shapes show the type, a gold halo the best by --monitor.
    """
    from ._plot import plot_losses, unsupported_suffix

    try:
        problem = unsupported_suffix(output)
    except ImportError as exc:
        raise click.ClickException(str(exc)) from exc
    if problem is not None:
        raise click.BadParameter(problem, param_hint="'-o' / '--output'")
    manager = _manager(root)
    page = manager.list(sort_by="step", order="asc")
    history = _loss_history(root, page.data)
    if not history and not any(i.train_loss is not None or i.eval_loss is not None for i in page.data):
        if not page.data:
            _hint_if_empty(root)
        state = "no checkpoints" if not page.data else "no checkpoint with a trainLoss or evalLoss"
        raise click.ClickException(f"{state} in {root}; there is nothing to plot")
    path = plot_losses(page.data, output, best=page.summary.best, monitor=manager.monitor[0],
                       title=root, log_scale=log_scale, history=history)
    logged = len({step for series in (history or {}).values() for step, _ in series})
    if as_json:
        _echo_json({"output": str(path), "checkpoints": len(page.data), "loggedSteps": logged})
    else:
        click.echo(f"wrote {path} ({_count(len(page.data))}" + (f", {_count(logged, 'logged step')})" if logged
                                                                 else ")"))
    return EXIT_OK


def _loss_history(root: str, infos: Sequence[CheckpointInfo]) -> dict[str, list[tuple[float, float]]] | None:
    """The run's logged losses from the newest checkpoint's trainer_state.json (HF runs), sha256-checked."""
    import hashlib

    from ._plot import loss_history
    from ._sidecar import loads_strict
    from ._storage import Storage

    for info in sorted(infos, key=lambda i: i.step, reverse=True):
        entry = next((f for f in info.files if f.path == "trainer_state.json"), None)
        if entry is None:
            continue
        state = click.get_current_context().ensure_object(_State)
        try:
            data = Storage(root, state.storage_options or None).read_bytes(f"{info.name}/{entry.path}",
                                                                            limit=entry.size)
            if hashlib.sha256(data).hexdigest() != entry.sha256:
                raise CheckpointError(f"{info.name}/{entry.path} does not match its sha256")
            history = loss_history(loads_strict(data, f"{info.name}/{entry.path}"))
        except CheckpointError as exc:
            click.echo(f"ckpt: warning: no loss history from {info.name}: {exc}", err=True)
            return None
        return history if any(history.values()) else None
    return None


# --- import, export, serve --------------------------------------------------------------------


@cli.command("import", epilog=_examples(
    "ckpt import runs/nanogpt out/ckpt.pt --name nanogpt-5000 --description 'from the nanoGPT run'",
    "ckpt import runs/gpt2-ft hf-output/                      # every checkpoint-N of a Trainer output_dir",
    "ckpt import runs/gpt2-ft hf-output/checkpoint-500 --type manual",
    "ckpt import s3://bucket/run s3://bucket/old/model.safetensors --step 1200 --json",
    "ckpt import runs/base ./my-model                         # an HF save_pretrained folder"))
@click.argument("root")
@click.argument("sources", nargs=-1, required=True, metavar="SOURCE...")
@click.option("--name", default=None, help="Checkpoint name (one checkpoint only) [default: checkpoint-N for "
                                           "Trainer checkpoints, else the file or folder name].")
@click.option("--step", type=click.IntRange(min=0), default=None, help="Training step [default: as recorded, else 0].")
@click.option("--type", "type_", type=click.Choice(["automatic", "manual", "final"]), default=None,
              help="[default: automatic for Trainer checkpoints, else manual].")
@click.option("--description", default=None, help="Free text for the sidecar.")
@click.option("--source-option", "source_options", metavar="KEY=VALUE", multiple=True,
              help="fsspec options for remote SOURCEs [default: --storage-option when on the root's protocol].")
@click.option("--json", "as_json", is_flag=True, help="Print the new checkpoints' sidecars as JSON.")
@_root_options
def import_command(root: str, sources: tuple[str, ...], name: str | None, step: int | None, type_: str | None,
                   description: str | None, source_options: tuple[str, ...], as_json: bool) -> int:
    """Register existing files as checkpoints under ROOT, recording where they came from.

    A SOURCE is a torch .pt/.bin file (a state dict, or a training checkpoint such as nanoGPT's
    ckpt.pt with model, optimizer, iter_num, best_val_loss), a .safetensors file, an HF
    save_pretrained folder, an HF Trainer checkpoint-N folder (steps, losses and metrics from
    trainer_state.json; optimizer and scheduler when they load with weights_only=True), or a
    whole Trainer output_dir. Local paths or fsspec URLs. Pickles are never unpickled beyond
    tensors and plain containers. `ckpt inspect` shows the provenance (spec.fromLocalFiles,
    spec.storageProvider, spec.sourcePath).
    """
    from ._import import import_checkpoints

    state = click.get_current_context().ensure_object(_State)
    options: dict[str, Any] = {}
    for item in source_options:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"expected KEY=VALUE, got {item!r}", param_hint="'--source-option'")
        try:
            options[key] = json.loads(raw)
        except ValueError:
            options[key] = raw
    infos = import_checkpoints(root, list(sources), name=name, step=step, type=type_, description=description,
                               storage_options=state.storage_options or None,
                               source_options=options if source_options else None)
    if as_json:
        _echo_json([info.to_json() for info in infos])
        return EXIT_OK
    for info in infos:
        source = info.source
        origin = "" if source is None else source.source_path or (
            os.path.commonpath(source.from_local_files) if source.from_local_files else "")
        click.echo(f"imported {_describe(info)} from {origin}")
    return EXIT_OK


@cli.command("export", epilog=_examples(
    "ckpt export runs/gpt2-ft best ./gpt2-best",
    "ckpt export s3://bucket/run checkpoint-500 ./gpt2-500 --dtype bfloat16 --json"))
@click.argument("root")
@click.argument("name")
@click.argument("dest", type=click.Path(file_okay=False, writable=True))
@click.option("--dtype", type=click.Choice(["bfloat16", "float16", "float32"]), default=None,
              help="Cast floating-point weights [default: as stored].")
@click.option("--format", "format_", type=click.Choice(["hf"]), default="hf", show_default=True)
@click.option("--max-shard-size", default="5GB", show_default=True, help="Largest weights file before sharding.")
@click.option("--force", is_flag=True, help="Write into DEST even if it is not empty.")
@click.option("--json", "as_json", is_flag=True, help="Print {name, dest, files, size} as JSON.")
@_root_options
def export_command(root: str, name: str, dest: str, dtype: str | None, format_: str, max_shard_size: str,
                   force: bool, as_json: bool) -> int:
    """Write checkpoint NAME as an inference-only HF folder DEST.

    Weights (optionally cast), config, generation config and tokenizer: what
    AutoModel*.from_pretrained(DEST) needs, and no optimizer or training state. Works for any
    checkpoint this library wrote (sharded or compressed ones too) that has a config.json.
    """
    from ._export import export_checkpoint

    state = click.get_current_context().ensure_object(_State)
    manager = _manager(root, writer=False)
    info = manager.get(name)
    target = export_checkpoint(root, info.name, dest, dtype=dtype, format=format_, force=force,
                               max_shard_size=max_shard_size, storage_options=state.storage_options or None)
    files = sorted(p.relative_to(target).as_posix() for p in target.rglob("*") if p.is_file())
    size = sum((target / f).stat().st_size for f in files)
    if as_json:
        _echo_json({"name": info.name, "id": info.id, "dest": str(target), "files": files, "size": size})
    else:
        click.echo(f"exported {_describe(info)} to {target} ({_count(len(files), 'file')}, {human_size(size)}"
                   f"{', ' + dtype if dtype else ''})")
    return EXIT_OK


@cli.command("serve", epilog=_examples(
    "ckpt serve runs/gpt2-ft best --port 8000",
    "ckpt serve s3://bucket/run latest --host 0.0.0.0 --port 8080 --dtype bfloat16",
    "",
    "then, with the openai package:",
    "  python -c \"from openai import OpenAI; c = OpenAI(base_url='http://127.0.0.1:8000/v1', api_key='-');"
    " print(c.completions.create(model='checkpoint-700', prompt='Hello', max_tokens=8))\""))
@click.argument("root")
@click.argument("name")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", type=click.IntRange(1, 65535), default=8000, show_default=True)
@click.option("--backend", type=click.Choice(["auto", "transformers", "vllm"]), default="auto", show_default=True,
              help="auto: vLLM when installed and a GPU is present, else transformers serve.")
@click.option("--dtype", type=click.Choice(["bfloat16", "float16", "float32"]), default=None,
              help="Cast the weights before serving [default: as stored].")
@click.option("--json", "as_json", is_flag=True, help="Print {name, model, baseUrl, backend, command} on start.")
@_root_options
def serve_command(root: str, name: str, host: str, port: int, backend: str, dtype: str | None,
                  as_json: bool) -> int:
    """Serve checkpoint NAME behind an OpenAI-compatible API (/v1/completions, /v1/chat/completions).

    The checkpoint is exported to a temporary HF folder and served by `transformers serve` (or
    vLLM); the model id in requests is the checkpoint's name. Stops on Ctrl-C or SIGTERM.
    Needs the [serve] extra: pip install 'ckpt-callback[serve]'.
    """
    from ._serve import Served, serve

    state = click.get_current_context().ensure_object(_State)

    def started(served: Served) -> None:
        if as_json:
            _echo_json(served.to_json())
        else:
            click.echo(f"serving {served.name} with {served.backend} at {served.base_url} (model id "
                       f"{served.model!r}); Ctrl-C stops it")
        sys.stdout.flush()

    code = serve(root, name, host=host, port=port, backend=backend, dtype=dtype,
                 storage_options=state.storage_options or None, on_start=started)
    return EXIT_OK if code in (0, -2, -15, 130, 143) else EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
