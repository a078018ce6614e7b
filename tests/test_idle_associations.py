"""An established association with nothing to do waits instead of polling (netguard,
issue 18): pynetdicom's DUL and association threads each look every millisecond,
~4 % of a core per idle association here. Real pynetdicom associations on 127.0.0.1."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pydicom
from _dicom_util import make_ct_series
from _net_util import node_settings, running_receiver, scu_association
from _node_util import wait_for
from pynetdicom.association import Association
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from ldct_node.service.receive import start_receiver, stop_receiver
from ldct_node.service.spool import Spool
from ldct_node.store import Database

CT = "1.2.840.10008.5.1.4.1.1.2"
IDLE_S = 1.0
#: pynetdicom's 1 ms polls would look ~1,000 times in IDLE_S (fewer on a loaded
#: machine, never more); the waits look ~20 times.
MAX_LOOKS = 200


def _server_association(server: Any) -> Association:
    return wait_for(
        lambda: next((a for a in server.active_associations if a.is_established), None),
        timeout=10,
        interval=0.01,
        what="an established association on the receiver",
    )


def _counting(owner: Any, name: str, counts: dict[str, int]) -> None:
    """Count the calls of ``owner.name`` (an instance attribute shadows the method)."""
    real: Callable[..., Any] = getattr(owner, name)
    counts[name] = 0

    def counted(*args: Any, **kwargs: Any) -> Any:
        counts[name] += 1
        return real(*args, **kwargs)

    setattr(owner, name, counted)


def test_an_idle_association_waits_then_serves_echo_store_and_release(tmp_path: Path) -> None:
    (path,) = make_ct_series(tmp_path / "in", n=1, size=32)
    with (
        running_receiver(node_settings(tmp_path / "node")) as node,
        scu_association(node.port, [Verification, CT]) as assoc,
    ):
        assert assoc.is_established
        served = _server_association(node.server)
        counts: dict[str, int] = {}
        _counting(served.dul, "_is_transport_event", counts)  # the DUL thread's loop
        _counting(served.dimse, "get_msg", counts)  # the association thread's loop
        time.sleep(IDLE_S)
        looks = dict(counts)
        assert looks["_is_transport_event"] < MAX_LOOKS, looks
        assert looks["get_msg"] < MAX_LOOKS, looks
        assert looks["_is_transport_event"] > 0 and looks["get_msg"] > 0, looks  # alive

        # Woken by what arrives: pynetdicom's C-ECHO, the direct C-STORE path, release.
        assert assoc.send_c_echo().Status == 0x0000
        status = assoc.send_c_store(pydicom.dcmread(path))
        assert status.Status == 0x0000
        assert node.db.instance_path(str(pydicom.dcmread(path).SOPInstanceUID)) is not None
        assoc.release()
        assert assoc.is_released
        served.join(10)
        assert not served.is_alive() and not served.dul.is_alive()
        assert served.dul._waker is None  # type: ignore[attr-defined]  # its sockets closed


def test_a_receiver_stopping_ends_an_idle_association(tmp_path: Path) -> None:
    settings = node_settings(tmp_path / "node")
    db = Database(settings.database_url)
    db.create_schema()
    server = start_receiver(settings, db, Spool(settings.spool_path))
    try:
        with scu_association(int(server.server_address[1]), [Verification]) as assoc:
            assert assoc.is_established
            served = _server_association(server)
            time.sleep(0.2)  # both of its threads in their waits
            stop_receiver(server, timeout=0.5)  # the association is aborted
            served.join(10)
            assert not served.is_alive() and not served.dul.is_alive()
            assoc.join(10)
            assert assoc.is_aborted
    finally:
        db.close()
