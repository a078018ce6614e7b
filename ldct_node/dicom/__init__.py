"""DICOM handling shared by the node and the offline tools: reading, decoding and
writing instances (:mod:`~ldct_node.dicom.io`), Enhanced CT frames
(:mod:`~ldct_node.dicom.enhanced`) and the derived series
(:mod:`~ldct_node.dicom.derive`). No networking, no database.
"""
