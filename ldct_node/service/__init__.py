"""The running node: what ``ldct-node serve`` starts.

A C-STORE arrives in :mod:`~ldct_node.service.receive` (behind the connection guard in
:mod:`~ldct_node.service.netguard`), is kept in the :mod:`~ldct_node.service.spool` and
recorded in the job store (:mod:`ldct_node.store`); :mod:`~ldct_node.service.scheduler`
promotes stable series to jobs, :mod:`~ldct_node.service.worker` denoises them and
:mod:`~ldct_node.service.forward` (DIMSE) or :mod:`~ldct_node.service.dicomweb`
(STOW-RS) sends the derived series on. :mod:`~ldct_node.service.node` wires these
together after the checks of :mod:`~ldct_node.service.preflight`;
:mod:`~ldct_node.service.routing` says which output profiles apply and where they go,
:mod:`~ldct_node.service.monitoring` exports Prometheus metrics.
"""
