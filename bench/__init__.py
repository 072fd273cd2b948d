"""policyd benchmarks: `python -m bench` (or `make bench`). See docs/benchmarks.md.

Every benchmark runs its servers and its load generator as separate processes on free
127.0.0.1 ports, reads each server's CPU time from /proc/PID/stat around every timed window,
and stops every process it started.
"""
