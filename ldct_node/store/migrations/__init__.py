"""Alembic migrations of the job database (applied by :mod:`ldct_node.store.migrate`)."""
