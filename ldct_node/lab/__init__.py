"""The lab: what makes and judges the weights, never imported by the node.

Low-dose simulation and phantoms (:mod:`~ldct_node.lab.simulation`), paired training
data (:mod:`~ldct_node.lab.data`), losses (:mod:`~ldct_node.lab.losses`), the trainer
(:mod:`~ldct_node.lab.train`), image-quality metrics (:mod:`~ldct_node.lab.metrics`)
and the evaluation report (:mod:`~ldct_node.lab.evaluation`).
"""
