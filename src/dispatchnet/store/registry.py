"""The store registry: the one place that picks a Store implementation, by the scheme of
the profile's `[store] url` (the SQLite file in the data directory when it is empty).
Nothing else compares an engine's name (tests/test_units.py checks that).

    ""                                  SQLite, <data dir>/coordinator.db (the default)
    sqlite:PATH, sqlite:///ABS/PATH     SQLite at PATH (relative: under the data dir)
    postgresql://USER@HOST:PORT/DB      PostgreSQL (also postgres://); several
                                        coordinators may share the database
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from pathlib import Path
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from dispatchnet.profiles import Profile, StoreConfig
from dispatchnet.store.base import Store

DEFAULT_SQLITE_FILE = "coordinator.db"


def scheme(url: str) -> str:
    """The url's scheme, lower case ("sqlite" for the empty default)."""
    if not url:
        return "sqlite"
    head, sep, _ = url.partition(":")
    return head.lower() if sep else ""


def sqlite_path(url: str, data_dir: Path) -> Path:
    """Where a sqlite url's database is ("" and relative paths: under data_dir)."""
    if not url:
        return data_dir / DEFAULT_SQLITE_FILE
    rest = url.partition(":")[2]
    if rest.startswith("//"):  # sqlite:///abs/path: an empty host, then the path
        rest = rest[2:]
    if rest == ":memory:":
        return Path(rest)
    return data_dir / rest  # an absolute path stays itself


SECRET_PARAMETERS = ("password", "sslpassword")  # libpq's, which asyncpg reads too


def redacted(url: str) -> str:
    """The url without its password (in its user part or as a query parameter), for
    logs and output."""
    parts = urlsplit(url)
    if parts.password is not None:
        host = parts.netloc.rpartition("@")[2]
        parts = parts._replace(netloc=f"{parts.username or ''}:***@{host}")
    pairs = parse_qsl(parts.query, keep_blank_values=True)
    if any(k.lower() in SECRET_PARAMETERS for k, _ in pairs):
        query = [(k, "***" if k.lower() in SECRET_PARAMETERS else v) for k, v in pairs]
        parts = parts._replace(query=urlencode(query, safe="*"))
    return urlunsplit(parts)


def describe(profile: Profile, data_dir: Path) -> str:
    """Where the profile's store is, for people: a SQLite file, or the url without its
    password."""
    url = profile.store.url
    return str(sqlite_path(url, data_dir)) if scheme(url) == "sqlite" else redacted(url)


def missing(profile: Profile, data_dir: Path) -> str | None:
    """Why the profile's store certainly holds nothing yet (a SQLite file that does not
    exist), for tools that only read a coordinator's store; None when it may."""
    url = profile.store.url
    if scheme(url) == "sqlite" and not sqlite_path(url, data_dir).exists():
        return f"no coordinator database at {sqlite_path(url, data_dir)}"
    return None


async def _open_sqlite(profile: Profile, data_dir: Path) -> Store:
    from dispatchnet.store.threaded import open_store

    path = sqlite_path(profile.store.url, data_dir)
    if path.name != ":memory:":
        path.parent.mkdir(parents=True, exist_ok=True)
    return await open_store(
        path,
        profile.server.sqlite_synchronous,
        readers=profile.server.sqlite_readers,
        writer=profile.server.sqlite_writer,
        writer_nice=profile.server.sqlite_writer_nice,
    )


async def _open_postgres(profile: Profile, data_dir: Path) -> Store:
    from dispatchnet.store.postgres import open_postgres_store

    return await open_postgres_store(profile.store.url, profile.store.pool_size)


_OPENERS: dict[str, Callable[[Profile, Path], Awaitable[Store]]] = {
    "sqlite": _open_sqlite,
    "postgresql": _open_postgres,
    "postgres": _open_postgres,
}


def problems(cfg: StoreConfig) -> list[str]:
    """What is wrong with a [store] section (checked when a profile loads)."""
    out = []
    if scheme(cfg.url) not in _OPENERS:
        out.append(
            f"[store] url {redacted(cfg.url)!r} must be empty (SQLite in the data directory) "
            "or start with sqlite:, postgresql:// or postgres://"
        )
    elif scheme(cfg.url) == "sqlite" and cfg.url and not sqlite_path(cfg.url, Path()).name:
        out.append(f"[store] url {cfg.url!r} names no file")
    if not 1 <= cfg.pool_size <= 1000:
        out.append("[store] pool_size must be 1-1000")
    return out


async def open_store(profile: Profile, data_dir: Path) -> Store:
    """The profile's store, open (its schema migrated). Raises Unavailable when its
    database cannot be reached, ValueError when it refuses us (e.g. a wrong password or
    no such database), RuntimeError when its schema is newer than this build."""
    return await _OPENERS[scheme(profile.store.url)](profile, data_dir)
