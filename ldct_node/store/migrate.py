"""Schema migrations of the job database with Alembic (``ldct-node db upgrade``).

The revisions ship inside the package (``ldct_node/store/migrations``), so an installed node
can upgrade its database without the source tree. :func:`upgrade` is run by
``ldct-node db upgrade`` and by every ``ldct-node serve`` at start:

- several processes starting at once on one database upgrade one after another: the
  whole upgrade is one transaction that first takes a lock (PostgreSQL: a transaction
  advisory lock; SQLite: ``BEGIN IMMEDIATE``, the database's write lock). Both engines
  have transactional DDL, so a failed upgrade leaves the schema as it was;
- a database made before migrations existed (tables created by ``create_all``, no
  ``alembic_version`` table) is adopted: when it already equals the current models it
  is stamped with the head revision, otherwise with ``0001`` (the schema of ldct-node
  0.1) and upgraded from there;
- an empty database gets every revision.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.config import Config
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import inspect, text
from sqlalchemy.engine import URL, Connection

from ldct_node.store import Base, Database

logger = logging.getLogger(__name__)

SCRIPT_LOCATION = "ldct_node.store:migrations"
#: The revision whose schema is what ldct-node 0.1 created with ``create_all``.
BASELINE_REVISION = "0001"
#: Key of the PostgreSQL advisory lock serialising concurrent upgrades ("ldct" in hex).
_PG_LOCK_KEY = 0x6C646374


@dataclass(frozen=True)
class UpgradeResult:
    """What :func:`upgrade` did.

    Attributes
    ----------
    before
        The revision before (None for an empty or a pre-migration database).
    after
        The revision now (the head).
    adopted
        True when a pre-migration database was stamped before upgrading.
    """

    before: str | None
    after: str
    adopted: bool

    @property
    def changed(self) -> bool:
        return self.adopted or self.before != self.after

    def describe(self) -> str:
        """One line for operators."""
        if not self.changed:
            return f"schema is up to date (revision {self.after})"
        start = self.before or ("existing tables" if self.adopted else "empty database")
        return f"schema upgraded: {start} -> revision {self.after}" + (
            " (adopted a database created before migrations)" if self.adopted else ""
        )


def alembic_config(connection: Connection | None = None) -> Config:
    """An Alembic config for the packaged revisions, bound to ``connection`` if given."""
    cfg = Config()
    cfg.set_main_option("script_location", SCRIPT_LOCATION)
    if connection is not None:
        cfg.attributes["connection"] = connection
    return cfg


def head_revision() -> str:
    """The newest revision shipped with this version."""
    head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    if head is None:  # pragma: no cover - the package always ships revisions
        raise RuntimeError("no Alembic revisions found in ldct_node/store/migrations")
    return head


def current_revision(connection: Connection) -> str | None:
    """The database's revision (None without an ``alembic_version`` table)."""
    return MigrationContext.configure(connection).get_current_revision()


def schema_differences(connection: Connection) -> list[Any]:
    """Alembic's autogenerate diff between the database and the models (empty: equal)."""
    context = MigrationContext.configure(connection, opts={"compare_type": True})
    return list(compare_metadata(context, Base.metadata))


def upgrade(target: str | URL | Database) -> UpgradeResult:
    """Bring the database to the head revision (see the module docstring).

    Parameters
    ----------
    target
        A SQLAlchemy URL, or an open :class:`~ldct_node.store.Database` (its engine is
        used and stays open).

    Raises
    ------
    sqlalchemy.exc.SQLAlchemyError
        When the database cannot be reached or a revision fails (nothing is changed).
    """
    db = target if isinstance(target, Database) else Database(target)
    try:
        with db.engine.begin() as conn:  # SQLite: BEGIN IMMEDIATE (see ldct_node.store)
            if conn.dialect.name == "postgresql":
                conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _PG_LOCK_KEY})
            before = current_revision(conn)
            adopted = False
            cfg = alembic_config(conn)
            if before is None and inspect(conn).has_table("job"):
                adopted = True
                stamp = "head" if not schema_differences(conn) else BASELINE_REVISION
                command.stamp(cfg, stamp)
                logger.info("adopted a database created before migrations (stamped %s)", stamp)
            command.upgrade(cfg, "head")
            after = current_revision(conn) or ""
    finally:
        if db is not target:
            db.close()
    result = UpgradeResult(before=before, after=after, adopted=adopted)
    if result.changed:
        logger.info("database %s", result.describe())
    return result
