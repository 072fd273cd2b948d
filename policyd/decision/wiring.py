"""Builds the core objects from a Config; shared by the server, the CLI and the tests."""

from __future__ import annotations

import atexit
from pathlib import Path
from typing import TYPE_CHECKING

from policyd.audit.journal import AuditLog
from policyd.audit.records import load_key
from policyd.audit.target import IndexTarget
from policyd.config import Config
from policyd.core import tracing
from policyd.core.policy import Policy, load_policy
from policyd.decision.decider import Decider
from policyd.decision.engine import Engine, EngineSettings
from policyd.decision.tokens import TokenSettings, Verifier
from policyd.store.base import Store
from policyd.store.facts import Facts
from policyd.store.keys import KeyRing
from policyd.store.open import facts_for
from policyd.store.open import open_store as open_url

if TYPE_CHECKING:
    from policyd.store.replica import Replica


def token_settings(config: Config) -> TokenSettings:
    t = config.tokens
    return TokenSettings(
        issuer=t.issuer,
        audience=t.audience,
        link_audience=t.link_audience,
        leeway_seconds=t.leeway_seconds,
        max_token_bytes=t.max_token_bytes,
        ttl_seconds=t.ttl_seconds,
    )


def open_store(config: Config, *, migrate: bool = True) -> Store:
    st = config.store
    return open_url(
        config.store_url, migrate=migrate, pool_size=st.pool_size, lease_seconds=st.lease_seconds
    )


def keyring(config: Config, store: Store) -> KeyRing:
    return KeyRing(store, config.tokens.key_dir)


def build_engine(
    config: Config,
    store: Store | None = None,
    policy: Policy | None = None,
    *,
    serving: bool = False,
) -> Engine:
    """The engine on the configured store and policy (PolicyInvalid if it does not load).

    `serving`: a process that answers decisions for long (a server): on PostgreSQL it
    becomes a replica, with a lease, and answers from caches while it holds it (replica.py);
    other processes read every decision afresh."""
    policy = policy or load_policy(config.policy.dir)
    store = store or open_store(config)
    facts = facts_for(store, token_cache_size=config.tokens.cache_size)
    if serving and store.backend == "postgresql":
        start_replica(config, facts)
    return Engine(
        facts,
        Verifier(token_settings(config)),
        policy,
        EngineSettings(max_body_bytes=config.engine.max_body_bytes),
    )


def index_target(config: Config) -> IndexTarget:
    """Where the audit records are indexed: the PostgreSQL store's database, each replica
    extending its own chain (named config.node), when store.url is one; else the audit's
    own SQLite file (audit.path). The journals are at audit.path either way."""
    a = config.audit
    if config.postgres:
        return IndexTarget(Path(a.path), config.store.url, config.node, a.sync)
    return IndexTarget(Path(a.path), sync=a.sync)


def open_audit_log(config: Config) -> AuditLog | None:
    a = config.audit
    if not a.enabled:
        return None
    key = load_key(a.key_file, create=True)
    return AuditLog(a.path, key, sync=a.sync, timeout=a.timeout_seconds, index=index_target(config))


def build_decider(config: Config, store: Store | None = None, *, serving: bool = False) -> Decider:
    """The engine plus the audit log: what every door calls. `serving` (see build_engine)
    also turns tracing on in this process when the config says so."""
    if serving and config.tracing.enabled:
        t = config.tracing
        tracing.enable(
            t.endpoint,
            sample_ratio=t.sample_ratio,
            timeout_seconds=t.timeout_seconds,
            instance=config.node,
        )
    return Decider(build_engine(config, store, serving=serving), open_audit_log(config))


# How long a starting replica waits for its first lease before it serves anyway (answering
# from the database, uncached, until the lease comes).
FIRST_LEASE_SECONDS = 5.0


def start_replica(config: Config, facts: Facts) -> Replica:
    """Make this process a replica of the PostgreSQL store (its facts: pgfacts.PgFacts):
    its lease thread runs, and it gives the lease back when the process exits normally."""
    from policyd.store.pgfacts import PgFacts
    from policyd.store.replica import Replica

    assert isinstance(facts, PgFacts)
    replica = Replica(config.store.url, config.node, config.store.lease_seconds, facts.advance)
    facts.replica = replica
    replica.start()
    replica.wait_ready(FIRST_LEASE_SECONDS)
    atexit.register(replica.stop)
    return replica
