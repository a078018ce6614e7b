"""A pynetdicom storage SCP standing in for PACS that records every C-STORE it accepts.

Unlike DCMTK ``storescp`` it can be made slow (``delay_s`` per C-STORE, to catch a
forward in progress), answer a chosen status, and it counts receipts, so a test sees
both the final set of SOP instances and how often each one arrived. It listens on
127.0.0.1 only and is stopped by the context manager that started it.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from _net_util import LOOPBACK
from pydicom.dataset import Dataset
from pynetdicom import AE, evt
from pynetdicom.sop_class import CTImageStorage, Verification  # type: ignore[attr-defined]
from pynetdicom.transport import ThreadedAssociationServer


@dataclass(frozen=True)
class Receipt:
    """One accepted C-STORE."""

    sop_instance_uid: str
    series_instance_uid: str
    #: The source instance the derived one was made from (SourceImageSequence), or "".
    source_sop_instance_uid: str


@dataclass
class RecordingPacs:
    """State of a running recording SCP (see :func:`recording_pacs`)."""

    port: int
    ae_title: str
    delay_s: float = 0.0
    status: int = 0x0000
    keep_datasets: bool = False
    receipts: list[Receipt] = field(default_factory=list)
    datasets: dict[str, Dataset] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def on_store(self, event: evt.Event) -> int:
        if self.delay_s:
            time.sleep(self.delay_s)
        if self.status != 0x0000:
            return self.status
        ds = event.dataset
        ds.file_meta = event.file_meta
        source = ""
        if "SourceImageSequence" in ds and len(ds.SourceImageSequence):
            source = str(ds.SourceImageSequence[0].ReferencedSOPInstanceUID)
        receipt = Receipt(str(ds.SOPInstanceUID), str(ds.SeriesInstanceUID), source)
        with self._lock:
            self.receipts.append(receipt)
            if self.keep_datasets:
                self.datasets[receipt.sop_instance_uid] = ds
        return 0x0000

    def of_series(self, series_uid: str) -> list[Receipt]:
        """Every receipt (re-deliveries included) of one series."""
        with self._lock:
            return [r for r in self.receipts if r.series_instance_uid == series_uid]

    def sop_uids(self, series_uid: str) -> set[str]:
        """The final set of SOP instances of a series, as a deduplicating PACS holds it."""
        return {r.sop_instance_uid for r in self.of_series(series_uid)}

    def receipt_counts(self, series_uid: str) -> Counter[str]:
        return Counter(r.sop_instance_uid for r in self.of_series(series_uid))


@contextmanager
def recording_pacs(
    *,
    ae_title: str = "PACS",
    delay_s: float = 0.0,
    keep_datasets: bool = False,
    port: int = 0,
) -> Iterator[RecordingPacs]:
    """Run a CT storage + verification SCP on 127.0.0.1 until the block ends.

    ``port`` 0 binds a free port (read it from the yielded object).
    """
    ae = AE(ae_title=ae_title)
    ae.add_supported_context(CTImageStorage)
    ae.add_supported_context(Verification)
    ae.maximum_associations = 20
    ae.network_timeout = 30
    ae.dimse_timeout = 30
    pacs = RecordingPacs(port=0, ae_title=ae_title, delay_s=delay_s, keep_datasets=keep_datasets)
    server: ThreadedAssociationServer | None = ae.start_server(
        (LOOPBACK, port), block=False, evt_handlers=[(evt.EVT_C_STORE, pacs.on_store)]
    )
    if server is None:  # only a blocking server returns None
        raise RuntimeError("pynetdicom did not return a server")
    pacs.port = int(server.server_address[1])
    try:
        yield pacs
    finally:
        server.shutdown()
        ae.shutdown()
