"""A real, throwaway PostgreSQL for the tests (fixtures imported by conftest.py).

`postgres`: one cluster for the whole session, started on first use (initdb + pg_ctl on a
free loopback port in a temporary directory; as the `postgres` system user when the tests
run as root) and stopped, its directory deleted, when the session ends. Without
PostgreSQL's server binaries the tests that use it fail, saying how to install them
(`make setup` does); they never skip.

`pg_url`: a new, empty database of that cluster for one test, dropped after it.
"""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator, Iterator

import asyncpg
import pytest

from dispatchnet.store.local_postgres import LocalPostgres, PostgresNotFound


@pytest.fixture(scope="session")
def postgres() -> Iterator[LocalPostgres]:
    try:
        cluster = LocalPostgres.create()
    except PostgresNotFound as e:
        pytest.fail(str(e), pytrace=False)
    try:
        yield cluster
    finally:
        cluster.stop()


async def create_database(cluster: LocalPostgres) -> str:
    """A new empty database; its url."""
    name = f"t_{secrets.token_hex(6)}"
    admin = await asyncpg.connect(cluster.url("postgres"))
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    return cluster.url(name)


async def drop_database(cluster: LocalPostgres, url: str) -> None:
    """Drops a database made by create_database, disconnecting whoever is still on it."""
    name = url.rsplit("/", 1)[1]
    admin = await asyncpg.connect(cluster.url("postgres"))
    try:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await admin.close()


@pytest.fixture
async def pg_url(postgres: LocalPostgres) -> AsyncIterator[str]:
    url = await create_database(postgres)
    try:
        yield url
    finally:
        await drop_database(postgres, url)
