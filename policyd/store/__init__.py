"""The store: SQLite tables and migrations, exact caches of what decisions read (facts), keys."""
