"""Persistence: SQLModel tables, the unit of work, the group-committing store."""
