"""Alembic migrations for both backends. The first revision is the schema as first released."""
