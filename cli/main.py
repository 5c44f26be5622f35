"""`mcs`: the service's command line (serve, worker, migrate, keys, demo)."""

import argparse
import os
import sys
from collections.abc import Sequence


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
    create.set_defaults(run=_keys_create)
    listing = keys.add_parser("list", help="list a tenant's API keys: prefix, created, revoked")
    listing.add_argument("--tenant", required=True)
    listing.set_defaults(run=_keys_list)
    revoke = keys.add_parser("revoke", help="revoke an API key at once, by its prefix (see `keys list`) or value")
    revoke.add_argument("key", metavar="PREFIX_OR_KEY")
    revoke.set_defaults(run=_keys_revoke)

    demo = sub.add_parser("demo", help="compress the real all-MiniLM-L6-v2 through the API and print the numbers")
    demo.add_argument("--api-url", default=None, help="use a running API instead of starting the embedded stack")
    demo.add_argument("--api-key", default=None, help="API key for --api-url (default: create one)")
    demo.set_defaults(run=_demo)
    return parser


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
    from core.service.db.repositories import Tenants
    from core.service.db.session import session_scope

    with session_scope() as session:
        tenants = Tenants(session)
        key = tenants.create_api_key(tenants.get_or_create(args.tenant))
    print(f"API key for tenant {args.tenant!r} (shown once; only its hash is stored):", file=sys.stderr)
    print(key)
    return 0


def _keys_list(args: argparse.Namespace) -> int:
    from core.errors import NotFound
    from core.service.db.repositories import Tenants
    from core.service.db.session import session_scope

    try:
        with session_scope() as session:
            keys = Tenants(session).api_keys(args.tenant)
    except NotFound as exc:
        print(exc.message, file=sys.stderr)
        return 1
    for key in keys:
        revoked = f"revoked {key.revoked_at:%Y-%m-%d %H:%M}" if key.revoked_at else "active"
        print(f"{key.prefix}  created {key.created_at:%Y-%m-%d %H:%M}  {revoked}")
    return 0


def _keys_revoke(args: argparse.Namespace) -> int:
    from core.errors import Conflict, NotFound
    from core.service.db.repositories import Tenants
    from core.service.db.session import session_scope

    try:
        with session_scope() as session:
            prefix = Tenants(session).revoke_api_key(args.key).prefix
    except (NotFound, Conflict) as exc:
        print(exc.message, file=sys.stderr)
        return 1
    print(f"revoked the API key {prefix}…; requests with it now get 401")
    return 0


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
