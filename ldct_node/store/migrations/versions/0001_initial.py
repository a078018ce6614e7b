"""The schema of ldct-node 0.1 (before migrations existed: ``create_all``).

Databases created by that version have exactly these tables and no
``alembic_version``; :func:`ldct_node.store.migrate.upgrade` stamps them with this revision
and upgrades them from here.

Revision ID: 0001
Revises:
Create Date: 2024-06-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "series",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("series_instance_uid", sa.String(64), nullable=False),
        sa.Column("study_instance_uid", sa.String(64), nullable=False),
        sa.Column("calling_aet", sa.String(16), nullable=False),
        sa.Column("modality", sa.String(16), nullable=True),
        sa.Column("n_instances", sa.Integer(), nullable=False),
        sa.Column("n_skipped", sa.Integer(), nullable=False),
        sa.Column("first_received_at", sa.DateTime(), nullable=False),
        sa.Column("last_received_at", sa.DateTime(), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("purged_at", sa.DateTime(), nullable=True),
        sa.UniqueConstraint("series_instance_uid"),
    )
    op.create_index("ix_series_last_received_at", "series", ["last_received_at"])
    op.create_table(
        "instance",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("sop_instance_uid", sa.String(64), nullable=False),
        sa.Column(
            "series_id",
            sa.Integer(),
            sa.ForeignKey("series.id", ondelete="CASCADE"),
            nullable=False,
        ),
        sa.Column("path", sa.Text(), nullable=False),
        sa.Column("sop_class_uid", sa.String(64), nullable=False),
        sa.Column("transfer_syntax_uid", sa.String(64), nullable=False),
        sa.Column("instance_number", sa.Integer(), nullable=True),
        sa.Column("z_position", sa.Float(), nullable=True),
        sa.Column("skip_reason", sa.String(200), nullable=True),
        sa.Column("size_bytes", sa.Integer(), nullable=False),
        sa.Column("received_at", sa.DateTime(), nullable=False),
        sa.UniqueConstraint("sop_instance_uid"),
    )
    op.create_index("ix_instance_series_id", "instance", ["series_id"])
    op.create_table(
        "job",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column(
            "series_id",
            sa.Integer(),
            sa.ForeignKey("series.id", ondelete="CASCADE"),
            nullable=False,
        ),
        sa.Column("profile", sa.String(64), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.Column("updated_at", sa.DateTime(), nullable=False),
        sa.Column("started_at", sa.DateTime(), nullable=True),
        sa.Column("finished_at", sa.DateTime(), nullable=True),
        sa.Column("worker_id", sa.String(128), nullable=True),
        sa.Column("heartbeat_at", sa.DateTime(), nullable=True),
        sa.Column("derived_series_uid", sa.String(64), nullable=True),
        sa.Column("output_dir", sa.Text(), nullable=True),
        sa.Column("n_instances", sa.Integer(), nullable=True),
        sa.Column("rerun_requested", sa.Boolean(), nullable=False),
        sa.Column("purged_at", sa.DateTime(), nullable=True),
        sa.UniqueConstraint("series_id", "profile", name="uq_job_series_profile"),
    )
    op.create_index("ix_job_state_updated", "job", ["state", "updated_at"])
    op.create_table(
        "forward",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column(
            "job_id", sa.Integer(), sa.ForeignKey("job.id", ondelete="CASCADE"), nullable=False
        ),
        sa.Column("destination", sa.String(64), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("next_attempt_at", sa.DateTime(), nullable=True),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.Column("n_sent", sa.Integer(), nullable=False),
        sa.Column("updated_at", sa.DateTime(), nullable=False),
        sa.Column("sent_at", sa.DateTime(), nullable=True),
        sa.UniqueConstraint("job_id", "destination", name="uq_forward_job_dest"),
    )
    op.create_index("ix_forward_state", "forward", ["state"])


def downgrade() -> None:
    for table in ("forward", "job", "instance", "series"):
        op.drop_table(table)
