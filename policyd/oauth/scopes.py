"""The scopes the consent screen can offer: name, description, whether data sources go with it.

`scope_catalogue(policy_dir)` is the one place the authorization server learns about
scopes: from the policy files (`scopes:` in policies/*.yaml, docs/policy.md), reloaded when
the files change. The access level a data-source grant gets is the highest of the approved
data scopes' levels below (at most the user's own access).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path

from policyd.core.errors import PolicydError
from policyd.core.model import Access
from policyd.core.policy import Policy, fingerprint, load_policy


@dataclass(frozen=True, slots=True)
class ScopeInfo:
    name: str
    description: str
    # The scope reaches data sources: the consent screen asks which ones.
    needs_grants: bool
    # The access level a data-source grant made with this scope gets (at most the user's).
    access: Access = Access.READ


# Scopes whose grants allow writing. Every other data scope grants read access.
WRITE_SCOPES = frozenset({"DataWrite"})

_lock = threading.Lock()
_cache: dict[str, tuple[str, dict[str, ScopeInfo]]] = {}


def scope_catalogue(policy_dir: str | Path) -> dict[str, ScopeInfo]:
    """Every scope the policy defines, by name, in the policy's order.

    Loaded again only when the policy files change; a policy that does not load keeps the
    last good catalogue (the decision service reports the problem).
    """
    key = str(policy_dir)
    version = fingerprint(policy_dir)
    with _lock:
        cached = _cache.get(key)
        if cached is not None and cached[0] == version:
            return cached[1]
    policy = load_policy(policy_dir) if cached is None else _try_load(policy_dir)
    if policy is None:
        assert cached is not None
        return cached[1]
    catalogue = {
        name: ScopeInfo(
            name,
            scope.description or name,
            scope.data_sources,
            Access.WRITE if name in WRITE_SCOPES else Access.READ,
        )
        for name, scope in policy.scopes.items()
    }
    with _lock:
        _cache[key] = (version, catalogue)
    return catalogue


def _try_load(policy_dir: str | Path) -> Policy | None:
    try:
        return load_policy(policy_dir)
    except (PolicydError, OSError):
        return None
