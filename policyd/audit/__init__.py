"""The audit log: records and their hash chain (records), reading (reader), the writer and
indexer (journal)."""
