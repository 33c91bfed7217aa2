"""patient linkage without identifiers in clear, the audit log, and the key ids

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-28

``studies`` gains the keyed hashes of the patient (IssuerOfPatientID +
PatientID) and of the accession number, the identifiers sealed with AES-GCM,
the study date, the id of the key that made them, and ``prior_of`` (a study
fetched from the PACS as another's prior). Studies received before this
revision have none of them: they are not linked to a patient.
``audit_log`` records who read or changed what; ``secret_keys`` the ids of the
keys in use.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("studies", schema=None) as batch_op:
        batch_op.add_column(sa.Column("key_id", sa.String(length=32), nullable=True))
        batch_op.add_column(sa.Column("patient_key", sa.String(length=64), nullable=True))
        batch_op.add_column(sa.Column("accession_key", sa.String(length=64), nullable=True))
        batch_op.add_column(sa.Column("identifiers", sa.Text(), nullable=True))
        batch_op.add_column(sa.Column("study_date", sa.Date(), nullable=True))
        batch_op.add_column(sa.Column("prior_of", sa.String(length=64), nullable=True))
        batch_op.create_index("ix_studies_patient_key", ["patient_key"], unique=False)
        batch_op.create_index("ix_studies_accession_key", ["accession_key"], unique=False)
    op.create_table(
        "audit_log",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("interface", sa.String(length=8), nullable=False),
        sa.Column("actor", sa.String(length=64), nullable=False),
        sa.Column("source", sa.String(length=128), nullable=False),
        sa.Column("action", sa.String(length=255), nullable=False),
        sa.Column("studies", sa.Text(), nullable=True),
        sa.Column("outcome", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_audit_log_at", "audit_log", ["at"], unique=False)
    op.create_table(
        "secret_keys",
        sa.Column("key_id", sa.String(length=32), nullable=False),
        sa.Column("first_used_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("key_id"),
    )


def downgrade() -> None:
    op.drop_table("secret_keys")
    op.drop_index("ix_audit_log_at", table_name="audit_log")
    op.drop_table("audit_log")
    with op.batch_alter_table("studies", schema=None) as batch_op:
        batch_op.drop_index("ix_studies_accession_key")
        batch_op.drop_index("ix_studies_patient_key")
        batch_op.drop_column("prior_of")
        batch_op.drop_column("study_date")
        batch_op.drop_column("identifiers")
        batch_op.drop_column("accession_key")
        batch_op.drop_column("patient_key")
        batch_op.drop_column("key_id")
