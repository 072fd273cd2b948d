"""`policyd serve`: the server process, its workers, CPU pinning and the audit indexer child."""
