"""Deciding: the engine (`decide`), the decider (decide, then record), tokens, wiring."""
