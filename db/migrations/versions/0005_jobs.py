"""jobs: short leases with an owner, and the instances a job covers

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-27

``lease_owner`` names the run holding a running job's lease (its Celery task
id), which a heartbeat renews; ``max_instance_id`` is the highest instance id
a job covers. A job running at upgrade time keeps at most 60 s of its old long
lease (the new default), so the reconciler re-runs it soon if its worker is gone.
"""

from __future__ import annotations

import datetime as dt

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

_jobs = sa.table(
    "jobs",
    sa.column("status", sa.String()),
    sa.column("lease_until", sa.DateTime(timezone=True)),
)


def upgrade() -> None:
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.add_column(sa.Column("lease_owner", sa.String(length=64), nullable=True))
        batch_op.add_column(sa.Column("max_instance_id", sa.Integer(), nullable=True))
    until = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=60)
    if op.get_bind().dialect.name == "sqlite":
        until = until.replace(tzinfo=None)  # stored naive UTC, as db.models.UTCDateTime does
    op.execute(
        _jobs.update()
        .where(_jobs.c.status == "running", _jobs.c.lease_until > until)
        .values(lease_until=until)
    )


def downgrade() -> None:
    # an older schema knows no superseded job: it ended, as a failed one does
    op.execute(_jobs.update().where(_jobs.c.status == "superseded").values(status="failed"))
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.drop_column("max_instance_id")
        batch_op.drop_column("lease_owner")
