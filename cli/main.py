"""`mcs`: the service's command line: running it (serve, worker, migrate, keys, demo) and using it through the
Python client (models, datasets, jobs, artifacts).

Exit codes: 0 success (a waited-for job succeeded), 1 failure (an API error, a failed job), 2 usage (bad
arguments, no API key, an unreadable recipe file), 3 a waited-for job ended cancelled.
"""

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence
from datetime import timedelta
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from sqlalchemy.orm import Session

    from client import Client, Job

EXIT_USAGE, EXIT_CANCELLED = 2, 3
JOB_EXIT = {"succeeded": 0, "failed": 1, "cancelled": EXIT_CANCELLED}
# The client's own error codes that mean the command was asked wrongly rather than failed
USAGE_ERRORS = {"missing_api_key", "invalid_config", "invalid_recipe", "no_such_file"}
SUMMARY = (("size_ratio", ".3f"), ("output_cosine", ".4f"), ("speedup", ".2f"))  # a succeeded job's headline


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "run"):
        parser.print_help()
        return 2
    return int(args.run(args) or 0)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mcs", description="Model compression service")
    sub = parser.add_subparsers(title="commands")

    serve = sub.add_parser("serve", help="run the HTTP API")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.set_defaults(run=_serve)

    worker = sub.add_parser("worker", help="run a Celery worker")
    worker.add_argument("--queues", default="cpu", help="comma-separated queues: cpu, gpu")
    worker.add_argument("--concurrency", type=int, default=1)
    worker.set_defaults(run=_worker)

    sub.add_parser("migrate", help="apply database migrations").set_defaults(run=_migrate)

    keys = sub.add_parser("keys", help="manage API keys").add_subparsers(title="keys commands")
    create = keys.add_parser("create", help="create an API key for a tenant (printed once, last line)")
    create.add_argument("--tenant", required=True)
    create.add_argument("--scope", action="append", choices=["read", "write", "admin"], dest="scopes",
                        help="read: GET routes; write (default): also submit, upload, delete; admin: also "
                             "/v1/admin (repeatable; each includes the ones before it)")
    create.add_argument("--expires-in", type=_duration, metavar="DURATION", help="e.g. 90d, 12h, 30m, 3600 (s)")
    create.add_argument("--name", help="a label shown by `keys list`")
    create.set_defaults(run=_keys_create)
    listing = keys.add_parser("list", help="list a tenant's API keys: id, prefix, scopes, created, expiry, state")
    listing.add_argument("--tenant", required=True)
    listing.set_defaults(run=_keys_list)
    revoke = keys.add_parser("revoke", help="revoke an API key at once, by its id or prefix (see `keys list`) or "
                             "value")
    revoke.add_argument("key", metavar="KEY")
    revoke.set_defaults(run=_keys_revoke)
    rotate = keys.add_parser("rotate", help="replace an API key with a new one (same tenant, name, scopes, "
                             "lifetime; printed once, last line); the old one is revoked, or lapses after --grace")
    rotate.add_argument("key", metavar="KEY", help="its id, prefix or value")
    rotate.add_argument("--grace", type=_duration, default=0, metavar="DURATION",
                        help="the old key keeps working this long (at most 7d; default: revoked at once)")
    rotate.set_defaults(run=_keys_rotate)

    quotas = sub.add_parser("quotas", help="tenant quotas").add_subparsers(title="quotas commands")
    show = quotas.add_parser("show", help="a tenant's quotas: limit (0: none) and use")
    show.add_argument("--tenant", required=True)
    show.set_defaults(run=_quotas_show)
    setting = quotas.add_parser("set", help="override a tenant's quotas ('default': back to MCS_QUOTA_*; 0: none)")
    setting.add_argument("--tenant", required=True)
    for quota in ("stored-bytes", "running-jobs", "queued-jobs"):
        setting.add_argument(f"--{quota}", type=_limit, metavar="N|default")
    setting.set_defaults(run=_quotas_set)

    demo = sub.add_parser("demo", help="compress the real all-MiniLM-L6-v2 through the API and print the numbers")
    demo.add_argument("--api-url", default=None, help="use a running API instead of starting the embedded stack")
    demo.add_argument("--api-key", default=None, help="API key for --api-url (default: create one)")
    demo.set_defaults(run=_demo)
    _client_commands(sub)
    return parser


def _client_commands(sub: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    """The user's verbs, on the Python client (`client`)."""
    options = argparse.ArgumentParser(add_help=False)
    options.add_argument("--api-url", help="default: MCS_API_URL, the config file, then http://127.0.0.1:8000")
    options.add_argument("--api-key", help="default: MCS_API_KEY, then the config file (~/.config/mcs/config.toml)")
    options.add_argument("--json", action="store_true", help="print the resource's JSON, as the API returns it")
    options.add_argument("-q", "--quiet", action="store_true", help="no progress bars or lines")
    paging = argparse.ArgumentParser(add_help=False)
    paging.add_argument("--page", type=int, default=1)
    paging.add_argument("--page-size", type=int, default=20)

    models = _group(sub, "models", "upload and list models")
    upload = models.add_parser("upload", parents=[options], help="upload a model folder (chunked, resumable) or "
                               "an archive (.zip, .tar.gz)")
    upload.add_argument("path", metavar="DIR_OR_ARCHIVE")
    upload.add_argument("--name", help="default: the folder's or archive's name")
    upload.add_argument("--resume", metavar="UPLOAD_ID", help="continue an interrupted chunked upload (upl_...)")
    upload.set_defaults(run=_client_command(_models_upload))
    imported = models.add_parser("import", parents=[options], help="import a model the service fetches: "
                                 "s3://bucket/prefix/ (an allowed bucket) or hf://org/name[@revision] (the workers' "
                                 "Hugging Face cache); waits until it is ready")
    imported.add_argument("source", metavar="SOURCE")
    imported.add_argument("--name", help="default: the resolved source")
    imported.add_argument("--s3-endpoint-url", help="MinIO or another S3-compatible store (default: AWS)")
    imported.add_argument("--no-wait", action="store_true", help="return once the import is accepted")
    imported.set_defaults(run=_client_command(_models_import))
    models.add_parser("list", parents=[options, paging], help="list models").set_defaults(
        run=_client_command(_models_list))

    datasets = _group(sub, "datasets", "upload and list datasets")
    dataset = datasets.add_parser("upload", parents=[options], help="upload calibration or training text: "
                                  "JSONL with a `text` field, or plain text, one sample per line")
    dataset.add_argument("path", metavar="FILE")
    dataset.add_argument("--name")
    dataset.add_argument("--format", choices=["auto", "jsonl", "text"], default="auto")
    dataset.set_defaults(run=_client_command(_datasets_upload))
    datasets.add_parser("list", parents=[options, paging], help="list datasets").set_defaults(
        run=_client_command(_datasets_list))

    jobs = _group(sub, "jobs", "submit, list, show, watch and cancel jobs")
    submit = jobs.add_parser("submit", parents=[options], help="submit a job (exit code of the job with --wait)")
    submit.add_argument("--model", required=True, metavar="MODEL_ID")
    recipe = submit.add_mutually_exclusive_group(required=True)
    recipe.add_argument("--recipe", metavar="FILE", help="a YAML or JSON recipe: `steps` (or `preset`), `export`")
    recipe.add_argument("--preset", metavar="NAME", help="a named recipe (`mcs presets list`)")
    submit.add_argument("--override", action="append", default=[], metavar="FIELD=JSON",
                        help="with --preset: a field merged into each step that has it, e.g. "
                             "'calibration={\"dataset_id\": \"dst_...\"}' (repeatable)")
    submit.add_argument("--queue", choices=["cpu", "gpu"], help="default: the recipe's, else the server's")
    submit.add_argument("--wait", action="store_true", help="wait for the job to end, with its progress")
    submit.add_argument("--download", metavar="DIR", help="wait, then download the artifact into DIR")
    submit.add_argument("--timeout", type=float, help="give up waiting after this many seconds (exit 1)")
    submit.set_defaults(run=_client_command(_jobs_submit))
    listing = jobs.add_parser("list", parents=[options, paging], help="list jobs, newest first")
    listing.add_argument("--status", choices=["queued", "running", "succeeded", "failed", "cancelled"])
    listing.set_defaults(run=_client_command(_jobs_list))
    show = jobs.add_parser("show", parents=[options], help="a job's status, steps, metrics, error and artifacts")
    show.add_argument("job", metavar="JOB_ID")
    show.set_defaults(run=_client_command(_jobs_show))
    watch = jobs.add_parser("watch", parents=[options], help="follow a job until it ends (exit code of the job)")
    watch.add_argument("job", metavar="JOB_ID")
    watch.add_argument("--timeout", type=float, help="give up after this many seconds (exit 1)")
    watch.set_defaults(run=_client_command(_jobs_watch))
    cancel = jobs.add_parser("cancel", parents=[options], help="cancel a job (a running one stops at its next "
                             "check; --wait for it)")
    cancel.add_argument("job", metavar="JOB_ID")
    cancel.add_argument("--wait", action="store_true", help="wait until it ended (exit 3 once cancelled)")
    cancel.set_defaults(run=_client_command(_jobs_cancel))

    searches = _group(sub, "searches", "search for the smallest recipe that meets a quality constraint")
    start = searches.add_parser("submit", parents=[options], help="start a search: a YAML/JSON file with objective, "
                                "constraint, evaluate and optionally space, budget, parallelism")
    start.add_argument("--model", required=True, metavar="MODEL_ID")
    start.add_argument("request", metavar="FILE")
    start.add_argument("--queue", choices=["cpu", "gpu"])
    start.set_defaults(run=_client_command(_searches_submit))
    for verb, text in (("show", "a search's trials and best recipe"), ("cancel", "cancel a search and its trials")):
        command = searches.add_parser(verb, parents=[options], help=text)
        command.add_argument("search", metavar="SEARCH_ID")
        command.set_defaults(run=_client_command(_searches_show if verb == "show" else _searches_cancel))

    presets = _group(sub, "presets", "the named recipes")
    presets.add_parser("list", parents=[options], help="list the presets, with what the benchmarks measured"
                       ).set_defaults(run=_client_command(_presets_list))

    artifacts = _group(sub, "artifacts", "download artifacts")
    download = artifacts.add_parser("download", parents=[options], help="download a job's artifact (resumes, "
                                    "checks its sha256)")
    download.add_argument("job", metavar="JOB_OR_ARTIFACT_ID")
    download.add_argument("-o", "--dest", default=".", help="a folder (default: the current one) or a .zip file name")
    download.set_defaults(run=_client_command(_artifacts_download))


def _group(sub: "argparse._SubParsersAction[argparse.ArgumentParser]", name: str,
           text: str) -> "argparse._SubParsersAction[argparse.ArgumentParser]":
    group = sub.add_parser(name, help=text)
    group.set_defaults(run=lambda args: _usage(group))
    return group.add_subparsers(title=f"{name} commands")


def _usage(parser: argparse.ArgumentParser) -> int:
    parser.print_help(sys.stderr)
    return EXIT_USAGE


def _client_command(command: Callable[["Client", argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """Run `command` with a Client from the options; an `ApiError` is a line on stderr (and its JSON body on
    stdout with --json) and exit 1, or 2 when the command was asked wrongly."""

    def run(args: argparse.Namespace) -> int:
        from client import ApiError, Client

        try:
            with Client(args.api_url, args.api_key) as client:
                return command(client, args)
        except ApiError as exc:
            print(f"mcs: {exc}", file=sys.stderr)
            if args.json:
                _print_json(exc.to_json())
            return EXIT_USAGE if exc.code in USAGE_ERRORS else 1
        except KeyboardInterrupt:
            print("mcs: interrupted", file=sys.stderr)
            return 130

    return run


def _print_json(data: Any) -> None:
    if hasattr(data, "model_dump"):
        data = data.model_dump(mode="json")
    print(json.dumps(data, indent=2))


def _say(args: argparse.Namespace, text: str) -> None:
    """A line for a human: stdout, or stderr when stdout carries --json."""
    print(text, file=sys.stderr if args.json else sys.stdout, flush=True)


def _progress(args: argparse.Namespace) -> bool:
    return not args.quiet  # True: a rich bar when stderr is a terminal, plain lines otherwise


def _models_upload(client: "Client", args: argparse.Namespace) -> int:
    model = client.models.upload(args.path, args.name, progress=_progress(args), upload_id=args.resume)
    if args.json:
        _print_json(model)
    else:
        print(f"model {model.id}: {model.name}, {model.architecture}, {model.num_parameters:,} parameters, "
              f"{model.size_bytes / 1e6:.1f} MB")
    return 0


def _models_import(client: "Client", args: argparse.Namespace) -> int:
    """S3 keys come from the standard AWS variables (never a command-line argument, which `ps` shows)."""
    s3 = {name: value for name, value in (("endpoint_url", args.s3_endpoint_url or ""),
                                          ("access_key_id", os.environ.get("AWS_ACCESS_KEY_ID", "")),
                                          ("secret_access_key", os.environ.get("AWS_SECRET_ACCESS_KEY", "")),
                                          ("session_token", os.environ.get("AWS_SESSION_TOKEN", ""))) if value}
    model = client.models.import_from(args.source, args.name, s3=s3 if args.source.startswith("s3://") and s3
                                      else None, wait=not args.no_wait, progress=_progress(args))
    if args.json:
        _print_json(model)
    else:
        print(f"model {model.id}: {model.name}, {model.status}" + (
            f", {model.architecture}, {model.num_parameters:,} parameters" if model.status == "ready" else ""))
    return 0


def _models_list(client: "Client", args: argparse.Namespace) -> int:
    page = client.models.list(page=args.page, page_size=args.page_size)
    if args.json:
        _print_json(page)
        return 0
    rows = [(m.id, m.name, m.status, m.architecture, f"{m.num_parameters:,}", f"{m.created_at:%Y-%m-%d %H:%M}")
            for m in page.items]
    _table(("ID", "NAME", "STATUS", "ARCHITECTURE", "PARAMETERS", "CREATED"), rows, page.total)
    return 0


def _datasets_upload(client: "Client", args: argparse.Namespace) -> int:
    dataset = client.datasets.upload(args.path, args.name, format=args.format, progress=_progress(args))
    if args.json:
        _print_json(dataset)
    else:
        print(f"dataset {dataset.id}: {dataset.name}, {dataset.format}, {dataset.num_samples:,} samples")
    return 0


def _datasets_list(client: "Client", args: argparse.Namespace) -> int:
    page = client.datasets.list(page=args.page, page_size=args.page_size)
    if args.json:
        _print_json(page)
        return 0
    rows = [(d.id, d.name, d.format, f"{d.num_samples:,}", f"{d.created_at:%Y-%m-%d %H:%M}") for d in page.items]
    _table(("ID", "NAME", "FORMAT", "SAMPLES", "CREATED"), rows, page.total)
    return 0


def _jobs_submit(client: "Client", args: argparse.Namespace) -> int:
    recipe = args.recipe if args.preset is None else {"preset": args.preset, **_overrides(args.override)}
    job = client.jobs.submit(args.model, recipe, queue=args.queue)
    if not (args.wait or args.download):
        if args.json:
            _print_json(job)
        else:
            print(f"job {job.id} {job.status}: {len(job.steps)} step(s) on {job.model_id}, queue {job.queue}")
        return 0
    _say(args, f"job {job.id} {job.status}: {len(job.steps)} step(s) on {job.model_id}, queue {job.queue}")
    return _follow(client, job, args, download=args.download)


def _overrides(pairs: list[str]) -> dict[str, Any]:
    """`--override field=JSON` pairs as the job's `overrides` (a bare word that is not JSON is a string)."""
    if not pairs:
        return {}
    overrides = {}
    for pair in pairs:
        field, separator, value = pair.partition("=")
        if not separator or not field:
            from client import ApiError

            raise ApiError("invalid_recipe", f"--override takes FIELD=JSON, not {pair!r}")
        try:
            overrides[field] = json.loads(value)
        except ValueError:
            overrides[field] = value
    return {"overrides": overrides}


def _presets_list(client: "Client", args: argparse.Namespace) -> int:
    presets = client.presets.list()
    if args.json:
        print(json.dumps([preset.model_dump(mode="json") for preset in presets], indent=2))
        return 0
    for preset in presets:
        print(f"{preset.name}\n  {preset.summary}\n  measured: {preset.measured}")
    return 0


def _jobs_watch(client: "Client", args: argparse.Namespace) -> int:
    return _follow(client, client.jobs.get(args.job), args)


def _jobs_cancel(client: "Client", args: argparse.Namespace) -> int:
    job = client.jobs.cancel(args.job)
    if args.wait:
        return _follow(client, job, args)
    if args.json:
        _print_json(job)
    else:
        print(f"job {job.id} {'cancelled' if job.done else 'will stop at its next check (cancel requested)'}")
    return 0


def _follow(client: "Client", job: "Job", args: argparse.Namespace, download: str | None = None) -> int:
    """Wait for the job with its progress, say how it ended, download its artifact if asked; the job's exit code."""
    job.wait(progress=_progress(args), timeout=getattr(args, "timeout", None))
    if job.status == "succeeded":
        metrics = job.metrics or {}
        numbers = ", ".join(f"{name.replace('_', ' ')} {metrics[name]:{fmt}}" for name, fmt in SUMMARY
                            if isinstance(metrics.get(name), int | float))
        _say(args, f"job {job.id} succeeded{': ' + numbers if numbers else ''}")
        if download is not None:
            path = job.download(download, progress=_progress(args))
            _say(args, f"downloaded {path} ({path.stat().st_size / 1e6:.1f} MB, sha256 verified)")
    elif job.status == "failed":
        error = job.error
        print(f"job {job.id} failed: {error.code}: {error.message}" if error else f"job {job.id} failed",
              file=sys.stderr)
    else:
        print(f"job {job.id} cancelled", file=sys.stderr)
    if args.json:
        _print_json(job)
    return JOB_EXIT[job.status]


def _jobs_list(client: "Client", args: argparse.Namespace) -> int:
    page = client.jobs.list(args.status, page=args.page, page_size=args.page_size)
    if args.json:
        _print_json(page)
        return 0
    rows = [(j.id, j.status, f"{j.progress * 100:.0f}%", j.model_id or "-", "+".join(s.type for s in j.steps),
             f"{j.created_at:%Y-%m-%d %H:%M}") for j in page.items]
    _table(("ID", "STATUS", "PROGRESS", "MODEL", "STEPS", "CREATED"), rows, page.total)
    return 0


def _jobs_show(client: "Client", args: argparse.Namespace) -> int:
    job = client.jobs.get(args.job)
    if args.json:
        _print_json(job)
        return 0
    print(f"{job.id}  {job.status}  {job.progress * 100:.1f}%  model {job.model_id}  queue {job.queue}  "
          f"attempts {job.attempts}{'  cancel requested' if job.cancel_requested and not job.done else ''}")
    times = [f"{label} {moment:%Y-%m-%d %H:%M:%S}" for label, moment in
             (("created", job.created_at), ("started", job.started_at), ("finished", job.finished_at)) if moment]
    print("  ".join(times))
    if job.message:
        print(job.message)
    for step in job.steps:
        metrics = ", ".join(f"{k} {v:.4g}" for k, v in (step.metrics or {}).items() if isinstance(v, int | float))
        print(f"  step {step.index} {step.type:<10} {step.status:<9} {metrics}")
    if job.error:
        print(f"error: {job.error.code}: {job.error.message}")
    for artifact in job.artifacts:
        print(f"artifact {artifact.id}  {artifact.name}  {artifact.size_bytes / 1e6:.1f} MB  sha256 {artifact.sha256}")
    return 0


def _searches_submit(client: "Client", args: argparse.Namespace) -> int:
    return _print_search(client.searches.submit(args.model, args.request, queue=args.queue), args)


def _searches_show(client: "Client", args: argparse.Namespace) -> int:
    return _print_search(client.searches.get(args.search), args)


def _searches_cancel(client: "Client", args: argparse.Namespace) -> int:
    return _print_search(client.searches.cancel(args.search), args)


def _print_search(search: Any, args: argparse.Namespace) -> int:
    if args.json:
        _print_json(search)
        return 0
    print(f"{search.id}  {search.status}  model {search.model_id}  {len(search.trials)} trial(s)  "
          f"{search.message or ''}".rstrip())
    for trial in search.trials:
        print(f"  trial {trial['number']:<3} {trial['status']:<9} size {trial.get('size_ratio') or 0:.4f}  "
              f"value {trial.get('value') or 0:.4g}  met {trial.get('feasible')}  job {trial.get('job_id')}")
    if search.best:
        print(f"best: trial {search.best['number']}, size {search.best['size_ratio']:.4f}, artifact "
              f"{search.best['artifact_id']}\n{json.dumps({'steps': search.best['steps']})}")
    return 0


def _artifacts_download(client: "Client", args: argparse.Namespace) -> int:
    if args.job.startswith("art_"):
        artifact = client.artifacts.head(args.job)
    else:
        job = client.jobs.get(args.job)
        if not job.artifacts:
            from client import ApiError

            raise ApiError("no_artifact", f"job {job.id} is {job.status} and has no artifact to download",
                           {"job_id": job.id, "status": job.status})
        artifact = job.artifacts[0]
    path = client.artifacts.download(artifact, args.dest, progress=_progress(args))
    if args.json:
        _print_json({**artifact.model_dump(mode="json"), "path": str(path)})
    else:
        print(f"downloaded {path} ({path.stat().st_size / 1e6:.1f} MB, sha256 verified)")
    return 0


def _table(header: Sequence[str], rows: Sequence[Sequence[object]], total: int) -> None:
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *rows, strict=False)]
    for row in (header, *rows):
        print("  ".join(str(cell).ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip())
    if total > len(rows):
        print(f"({len(rows)} of {total}; see --page)")


def _serve(args: argparse.Namespace) -> int:
    import uvicorn

    uvicorn.run("api.main:app", host=args.host, port=args.port, log_level="info")
    return 0


def _worker(args: argparse.Namespace) -> int:
    from worker.celery_app import app

    argv = ["worker", "-Q", args.queues, "--concurrency", str(args.concurrency), "--loglevel", "INFO",
            "--hostname", f"mcs-{args.queues.replace(',', '-')}-{os.getpid()}@%h"]
    app.worker_main(argv)
    return 0


def _migrate(args: argparse.Namespace) -> int:
    from core.service.db.migrate import upgrade
    from core.service.settings import get_settings

    _ensure_sqlite_folder()
    upgrade()
    print(f"database at {_redacted(get_settings().database_url)} is at the latest schema")
    return 0


def _keys_create(args: argparse.Namespace) -> int:
    from core.service import keys
    from core.service.db.models import utcnow
    from core.service.db.repositories import Tenants
    from core.service.db.session import session_scope

    expires_at = utcnow() + args.expires_in if args.expires_in else None
    with session_scope() as session:
        tenant = Tenants(session).get_or_create(args.tenant)
        row, key = keys.create_key(session, tenant.id, args.scopes or keys.DEFAULT_SCOPES, expires_at, args.name)
        summary = _key_line(row)
    print(f"API key for tenant {args.tenant!r} (shown once; only its hash is stored):\n{summary}", file=sys.stderr)
    print(key)
    return 0


def _keys_list(args: argparse.Namespace) -> int:
    from core.service.db.repositories import Tenants

    return _operator(lambda session: [_key_line(key) for key in Tenants(session).api_keys(args.tenant)])


def _keys_revoke(args: argparse.Namespace) -> int:
    from core.service.db.repositories import Tenants

    def revoke(session: "Session") -> list[str]:
        key = Tenants(session).revoke_api_key(args.key)
        return [f"revoked the API key {key.id} ({key.prefix}…); requests with it now get 401"]

    return _operator(revoke)


def _keys_rotate(args: argparse.Namespace) -> int:
    from core.service import keys
    from core.service.db.repositories import Tenants

    def rotate(session: "Session") -> list[str]:
        old = Tenants(session).find_active_key(args.key)
        row, key = keys.rotate_key(session, old, int(args.grace.total_seconds()) if args.grace else 0)
        print(f"old: {_key_line(old)}\nnew (shown once; only its hash is stored): {_key_line(row)}",
              file=sys.stderr)
        return [key]

    return _operator(rotate)


def _quotas_show(args: argparse.Namespace) -> int:
    from core.service import quotas
    from core.service.db.repositories import Tenants
    from core.service.settings import get_settings

    def show(session: "Session") -> list[str]:
        uses = quotas.usage(session, Tenants(session).named(args.tenant).id, get_settings())
        return [f"{use.quota:<13} limit {use.limit or 'none':>15}  used {use.used}" for use in uses]

    return _operator(show)


def _quotas_set(args: argparse.Namespace) -> int:
    from core.service.db.repositories import Tenants

    changes = {name: value for name in ("stored_bytes", "running_jobs", "queued_jobs")
               if (value := getattr(args, name)) is not None}

    def set_limits(session: "Session") -> list[str]:
        tenants = Tenants(session)
        tenants.set_quota(tenants.named(args.tenant).id, **{k: None if v == "default" else v
                                                            for k, v in changes.items()})
        return []

    code = _operator(set_limits)
    return _quotas_show(args) if code == 0 else code


def _operator(command: Callable[["Session"], list[str]]) -> int:
    """Run an operator command on the database in one transaction: its lines go to stdout once committed; a
    `NotFound`, `Conflict` or `InvalidRequest` is a line on stderr and exit 1."""
    from core.errors import Conflict, InvalidRequest, NotFound
    from core.service.db.session import session_scope

    try:
        with session_scope() as session:
            lines = command(session)
    except (NotFound, Conflict, InvalidRequest) as exc:
        print(f"mcs: {exc.message}", file=sys.stderr)
        return 1
    for line in lines:
        print(line)
    return 0


def _key_line(key: Any) -> str:
    from core.service.keys import is_expired

    state = (f"revoked {key.revoked_at:%Y-%m-%d %H:%M}" if key.revoked_at else
             "expired" if is_expired(key) else "active")
    expires = f"expires {key.expires_at:%Y-%m-%d %H:%M}" if key.expires_at else "no expiry"
    name = f"{key.name!r}  " if key.name else ""
    return (f"{key.prefix}  {key.id}  {','.join(key.scopes):<16}  created {key.created_at:%Y-%m-%d %H:%M}  "
            f"{expires}  {name}{state}")


def _duration(text: str) -> timedelta:
    """`90d`, `12h`, `30m`, `45s` or a number of seconds."""
    units = {"d": 86400, "h": 3600, "m": 60, "s": 1}
    number, unit = (text[:-1], text[-1]) if text[-1:] in units else (text, "s")
    try:
        seconds = float(number) * units[unit]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a duration: {text!r} (e.g. 90d, 12h, 30m, 3600)") from None
    if seconds <= 0:
        raise argparse.ArgumentTypeError("a duration must be positive")
    return timedelta(seconds=seconds)


def _limit(text: str) -> int | str:
    if text == "default":
        return text
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"a limit is a whole number (0: none) or 'default', not {text!r}")
    return int(text)


def _demo(args: argparse.Namespace) -> int:
    from cli.demo import run_demo

    return run_demo(args.api_url, args.api_key)


def _ensure_sqlite_folder() -> None:
    from core.service.settings import get_settings

    settings = get_settings()
    settings.var_dir.mkdir(parents=True, exist_ok=True)
    if settings.artifact_dir is not None:
        settings.artifact_dir.mkdir(parents=True, exist_ok=True)


def _redacted(url: str) -> str:
    scheme, sep, rest = url.partition("://")
    return f"{scheme}{sep}{rest.rsplit('@', 1)[-1]}" if "@" in rest else url


if __name__ == "__main__":
    sys.exit(main())
