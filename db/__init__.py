"""Database layer: SQLAlchemy 2 models, per-process engines, migrations, repositories."""
