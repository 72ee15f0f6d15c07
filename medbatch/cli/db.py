"""``medbatch db``: the schema, tenants, API clients and their keys."""

from __future__ import annotations

import argparse
import json
from datetime import datetime
from typing import TYPE_CHECKING, Any

from medbatch.cli._common import (
    command,
    entity_name,
    fail,
    find_tenant,
    group,
    number,
    transaction,
)

if TYPE_CHECKING:
    from datetime import timedelta

    from sqlalchemy.orm import Session

    from medbatch.settings import Settings


def add_parsers(sub: Any) -> None:
    db, dsub = group(sub, "db", "database schema, tenants and API keys")
    up = command(dsub, "upgrade", "run Alembic migrations (SQLite is also migrated on first use)")
    up.add_argument("revision", nargs="?", default="head", help="target revision")
    lifetime = argparse.ArgumentParser(add_help=False)
    lifetime.add_argument(
        "--lifetime-days",
        type=number(int, 0, 36500),
        help="days the new key works (default: MEDBATCH_API_KEY_LIFETIME_DAYS, 365; 0: never)",
    )
    #: The first argument of every command on an existing tenant.
    of_tenant = argparse.ArgumentParser(add_help=False)
    of_tenant.add_argument("tenant", help="the tenant's name")
    tenant = command(
        dsub, "create-tenant", "create a tenant and print its API key once", parents=[lifetime]
    )
    tenant.add_argument("name", type=entity_name, help="the tenant's unique name")
    client = command(
        dsub,
        "create-client",
        "an API client of a tenant with scopes; prints its key once",
        parents=[lifetime, of_tenant],
    )
    client.add_argument("name", type=entity_name, help="the client's name, unique in the tenant")
    client.add_argument(
        "--scopes",
        required=True,
        help="comma-separated: cases:submit, results:read, genome:submit, compounds:submit, admin",
    )
    rotate = command(
        dsub,
        "rotate-key",
        "a new key for a tenant (or --client); the old ones work until the overlap ends",
        parents=[lifetime, of_tenant],
    )
    rotate.add_argument("--client", help="rotate this client's key instead of the tenant's own")
    rotate.add_argument(
        "--overlap-hours",
        type=number(float, 0, 24 * 90),
        help="hours the previous keys keep working (default: MEDBATCH_API_KEY_ROTATION_OVERLAP_H, "
        "24; 0: they stop now)",
    )
    revoke = command(dsub, "revoke-client", "stop every key of a client, now", parents=[of_tenant])
    revoke.add_argument("client", help="the client's name")
    command(
        dsub,
        "list-clients",
        "a tenant's keys: client, scopes, state, expiry, last use (no keys)",
        parents=[of_tenant],
    )
    db.set_defaults(func=run)


def run(args: argparse.Namespace, settings: Settings) -> int:
    if args.db_command == "upgrade":
        from alembic.util import CommandError

        from db.migrate import upgrade

        try:
            upgrade(settings.database_url, args.revision)
        except CommandError as exc:
            fail(f"revision {args.revision!r}: {exc}")
        print(f"database at revision {args.revision}")
        return 0
    if args.db_command == "create-tenant":
        return _create_tenant(args, settings)
    if args.db_command == "create-client":
        return _create_client(args, settings)
    return _key_lifecycle(args, settings)


def _create_tenant(args: argparse.Namespace, settings: Settings) -> int:
    from sqlalchemy.exc import IntegrityError

    from db.repo import create_tenant

    try:
        with transaction(settings) as session:
            tenant, key = create_tenant(
                session, name=args.name, lifetime=_key_lifetime(args, settings)
            )
            expires = _expiry(session, key)
            print(json.dumps({"tenant": tenant.name, "id": tenant.id, "api_key": key, **expires}))
    except IntegrityError:
        # The README's quickstart run a second time in the same folder: say how to get a key.
        fail(
            f"tenant {args.name!r} already exists; a new key for it (printed the same way): "
            f"medbatch db rotate-key {args.name}",
            code=1,
        )
    return 0


def _create_client(args: argparse.Namespace, settings: Settings) -> int:
    from db.repo import create_client

    with transaction(settings) as session:
        tenant_id = find_tenant(session, args.tenant)
        scopes = [s.strip() for s in args.scopes.split(",") if s.strip()]
        if any(c.revoked_at is None for c in _clients(session, tenant_id, args.name)):
            fail(
                f"tenant {args.tenant!r} already has a client {args.name!r} "
                "(revoke it first, or choose another name)",
                code=1,
            )
        try:
            client, key = create_client(
                session,
                tenant_id=tenant_id,
                name=args.name,
                scopes=scopes,
                lifetime=_key_lifetime(args, settings),
            )
        except ValueError as exc:
            fail(f"--scopes: {exc}")
        print(
            json.dumps(
                {
                    "client": client.name,
                    "id": client.id,
                    "scopes": client.scopes,
                    "api_key": key,
                    **_expiry(session, key),
                }
            )
        )
    return 0


def _clients(session: Session, tenant_id: int, name: str) -> list[Any]:
    """The tenant's clients called ``name``, oldest first: revoked ones, and at most one that is
    not (several, in a database from before ``create-client`` checked)."""
    from sqlalchemy import select

    from db.tables import ApiClient

    found = select(ApiClient).where(ApiClient.tenant_id == tenant_id, ApiClient.name == name)
    return list(session.scalars(found.order_by(ApiClient.id)))


def _key_lifetime(args: argparse.Namespace, settings: Settings) -> timedelta | None:
    """--lifetime-days, else MEDBATCH_API_KEY_LIFETIME_DAYS; 0 means never."""
    from datetime import timedelta

    days = settings.api_key_lifetime_days if args.lifetime_days is None else args.lifetime_days
    return None if days == 0 else timedelta(days=days)


def _iso(moment: datetime | None) -> str | None:
    return None if moment is None else moment.isoformat(timespec="seconds")


def _expiry(session: Session, key: str) -> dict[str, str | None]:
    from sqlalchemy import select

    from db import repo

    expires = session.scalar(
        select(repo.ApiKey.expires_at).where(repo.ApiKey.sha256 == repo.hash_api_key(key))
    )
    return {"expires_at": _iso(expires)}


def _key_lifecycle(args: argparse.Namespace, settings: Settings) -> int:
    """rotate-key, revoke-client, list-clients: a tenant's keys, never printed but once."""
    from datetime import timedelta

    from db import repo

    with transaction(settings) as session:
        tenant_id = find_tenant(session, args.tenant)
        if args.db_command == "list-clients":
            for row in repo.list_keys(session, tenant_id=tenant_id):
                print(
                    json.dumps(
                        {k: _iso(v) if isinstance(v, datetime) else v for k, v in row.items()}
                    )
                )
            return 0
        client = None
        name = getattr(args, "client", None)
        if name is not None:
            named = _clients(session, tenant_id, name)
            if not named:
                fail(f"tenant {args.tenant!r} has no client {name!r}")
            active = [c for c in named if c.revoked_at is None]
            if args.db_command == "revoke-client":
                # Every live client of the name: a database from before create-client refused a
                # taken name may hold several, and revoking one left the others' keys working.
                for client in active or named[-1:]:
                    keys = repo.revoke_client(session, client_id=client.id)
                    print(
                        json.dumps({"client": client.name, "id": client.id, "keys_revoked": keys})
                    )
                return 0
            if len(active) > 1:
                ids = ", ".join(str(c.id) for c in active)
                fail(f"tenant {args.tenant!r} has {len(active)} clients named {name!r} (ids {ids})")
            client = active[0] if active else named[-1]
        if client is not None and client.revoked_at is not None:
            fail(f"client {name!r} is revoked; create a new one")
        hours = (
            settings.api_key_rotation_overlap_h
            if args.overlap_hours is None
            else args.overlap_hours
        )
        rotated = repo.rotate_key(
            session,
            tenant_id=tenant_id,
            client_id=None if client is None else client.id,
            overlap=timedelta(hours=hours),
            lifetime=_key_lifetime(args, settings),
        )
        print(
            json.dumps(
                {
                    "tenant": args.tenant,
                    "client": name,
                    "key_id": rotated.key_id,
                    "api_key": rotated.key,
                    "expires_at": _iso(rotated.expires_at),
                    "previous_keys_work_until": {
                        str(k): _iso(until) for k, until in rotated.overlapping
                    },
                }
            )
        )
        return 0
