"""The job database: the store's units composed into one object.

:class:`Database` is what the node and the admin CLI hold; each of its parts is a small
unit of its own: intake (:mod:`~ldct_node.store.intake`), jobs and leases
(:mod:`~ldct_node.store.jobs`), forwards (:mod:`~ldct_node.store.forwards`) and
reports with retention (:mod:`~ldct_node.store.reports`), all on the engine and
sessions of :mod:`~ldct_node.store.engine`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ldct_node.store.forwards import Forwards
from ldct_node.store.intake import Intake
from ldct_node.store.jobs import Jobs
from ldct_node.store.reports import Reports

if TYPE_CHECKING:
    from ldct_node.config import Settings


class Database(Intake, Jobs, Forwards, Reports):
    """The job database.

    Parameters
    ----------
    url
        A SQLAlchemy URL (``sqlite:////abs/path.db``, ``sqlite://`` for in-memory,
        ``postgresql+psycopg://...``).
    """


def open_database(settings: Settings, create: bool = True) -> Database:
    """The database configured in ``settings`` (``storage.database_url``, resolved).

    Parameters
    ----------
    create
        Create missing tables (the default; idempotent).
    """
    db = Database(settings.database_url)
    if create:
        db.create_schema()
    return db
