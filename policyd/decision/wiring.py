"""Builds the core objects from a Config; shared by the server, the CLI and the tests."""

from __future__ import annotations

from pathlib import Path

from policyd.audit.journal import AuditLog
from policyd.audit.records import load_key
from policyd.config import Config
from policyd.core.policy import Policy, load_policy
from policyd.decision.decider import Decider
from policyd.decision.engine import Engine, EngineSettings
from policyd.decision.tokens import TokenSettings, Verifier
from policyd.store.facts import Facts
from policyd.store.keys import KeyRing
from policyd.store.sqlite import Store


def token_settings(config: Config) -> TokenSettings:
    t = config.tokens
    return TokenSettings(
        issuer=t.issuer,
        audience=t.audience,
        leeway_seconds=t.leeway_seconds,
        max_token_bytes=t.max_token_bytes,
        ttl_seconds=t.ttl_seconds,
    )


def open_store(config: Config) -> Store:
    return Store(Path(config.store.path))


def keyring(config: Config, store: Store) -> KeyRing:
    return KeyRing(store, config.tokens.key_dir)


def build_engine(
    config: Config, store: Store | None = None, policy: Policy | None = None
) -> Engine:
    """The engine on the configured store and policy (PolicyInvalid if it does not load)."""
    policy = policy or load_policy(config.policy.dir)
    store = store or open_store(config)
    facts = Facts(store, token_cache_size=config.tokens.cache_size)
    return Engine(
        facts,
        Verifier(token_settings(config)),
        policy,
        EngineSettings(max_body_bytes=config.engine.max_body_bytes),
    )


def open_audit_log(config: Config) -> AuditLog | None:
    a = config.audit
    if not a.enabled:
        return None
    key = load_key(a.key_file, create=True)
    return AuditLog(a.path, key, sync=a.sync, timeout=a.timeout_seconds)


def build_decider(config: Config, store: Store | None = None) -> Decider:
    """The engine plus the audit log: what every door calls."""
    return Decider(build_engine(config, store), open_audit_log(config))
