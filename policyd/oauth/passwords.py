"""Local users' passwords: argon2id hashes (argon2-cffi, its default RFC 9106 parameters)."""

from __future__ import annotations

import functools

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError

from policyd.core.errors import InvalidInput

MIN_LENGTH = 8
MAX_LENGTH = 1024

_hasher = PasswordHasher()


@functools.cache
def dummy_hash() -> str:
    """Verified against when the user does not exist, so that an unknown name takes as long
    as a wrong password and sign-in does not tell which names exist. Made once, when first
    needed (the authorization server makes it as it starts): hashing costs about 0.1 s,
    which every CLI command importing this module paid before."""
    return _hasher.hash("policyd: no such user")


def hash_password(password: str) -> str:
    if not MIN_LENGTH <= len(password) <= MAX_LENGTH:
        raise InvalidInput(f"a password must be {MIN_LENGTH}-{MAX_LENGTH} characters long")
    return _hasher.hash(password)


def verify_password(stored_hash: str | None, password: str) -> bool:
    """True if the password matches. Always does the work of one verification."""
    if len(password) > MAX_LENGTH:
        return False
    try:
        return _hasher.verify(stored_hash or dummy_hash(), password) and stored_hash is not None
    except (VerifyMismatchError, VerificationError, InvalidHashError):
        return False
