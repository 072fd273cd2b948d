"""The audit log: records and their hash chain (records), the writer and indexer (journal)."""
