"""A job waiting to be forwarded, for tests of :class:`ldct_node.service.forward.Forwarder`."""

from __future__ import annotations

from pathlib import Path

from _dicom_util import make_ct_series
from _node_util import spool_series

from ldct_node.config import Settings
from ldct_node.service.spool import Spool
from ldct_node.store import Database, JobState


def forwarding_job(
    tmp_path: Path, settings: Settings, n: int = 2, *, series_uid: str = "1.2.826.0.1.3680043.99.7"
) -> tuple[Database, int, list[Path]]:
    """A job in state ``forwarding`` to every destination of ``settings``.

    Its "derived" files (a small CT series with SeriesInstanceUID ``series_uid``, made
    in the job's derived folder) stand in for the cascade's output: what matters is that
    they are sent. Returns the database, the job id and the files.
    """
    db = Database(settings.database_url)
    db.create_schema()
    spool = Spool(settings.spool_path)
    spool_series(db, spool, make_ct_series(tmp_path, n=n, size=16, subdir="src"))
    db.promote_stable_series(stable_seconds=0)
    job = db.claim_next_job("test")
    assert job is not None
    derived = make_ct_series(
        spool.derived_dir(f"job-{job.id}"), n=n, size=16, subdir="out", series_uid=series_uid
    )
    state = db.finish_processing(
        job.id, series_uid, derived[0].parent, len(derived), [d.name for d in settings.destinations]
    )
    assert state == JobState.FORWARDING
    return db, job.id, derived
