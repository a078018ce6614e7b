"""What inference needs: the network builders (:mod:`~ldct_node.model.networks`), the
cascade that runs them over HU slices (:mod:`~ldct_node.model.cascade`), its fused graph
(:mod:`~ldct_node.model.fused`) and the low-frequency fidelity step
(:mod:`~ldct_node.model.fidelity`). Training code lives in :mod:`ldct_node.lab`.
"""
