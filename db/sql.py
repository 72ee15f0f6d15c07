"""Pieces of SQL the query modules share: the dialect's INSERT, and how a statement names its
rows by id."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from sqlalchemy import BigInteger, String, Table, any_, bindparam, func
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session


def dialect_insert(session: Session, table: Table) -> postgresql.Insert | sqlite.Insert:
    """The dialect's INSERT, which knows ON CONFLICT (PostgreSQL and SQLite spell it alike)."""
    dialect = session.get_bind().dialect.name
    if dialect == "postgresql":
        return postgresql.insert(table)
    if dialect == "sqlite":
        return sqlite.insert(table)
    raise NotImplementedError(f"medbatch supports PostgreSQL and SQLite, not {dialect}")


def among(session: Session, column: Any, ids: Iterable[int]) -> Any:
    """``column IN ids``; on PostgreSQL as ``= ANY(array)``: one parameter, however many ids."""
    values = list(ids)
    if session.get_bind().dialect.name == "postgresql":
        return column == any_(bindparam(None, values, type_=postgresql.ARRAY(BigInteger)))
    return column.in_(values)


def among_param(dialect: str, column: Any, name: str = "ids") -> Any:
    """:func:`among` with the ids left to a named parameter, for a statement built once and
    executed many times (a list of ids under ``name``)."""
    if dialect == "postgresql":
        return column == any_(bindparam(name, type_=postgresql.ARRAY(BigInteger)))
    return column.in_(bindparam(name, expanding=True))


def status_among_ids(table: Any) -> Any:
    """``table.status`` for a statement that names its rows by id (with :func:`among`): as an
    expression no status index matches, so the ids' key drives the plan. Statistics from
    before a bulk load make a status index look selective; the planner then read it whole and
    hash-joined it with the ids (7,680 index entries and 1,040 heap pages to claim 128 cases)."""
    return func.coalesce(table.status, "", type_=String)
