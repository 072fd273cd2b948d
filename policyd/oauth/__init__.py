"""The OAuth 2.0 authorization server: where apps are let in and grants come from.

A Starlette app (app.py) around authlib's framework-agnostic protocol core (rfc6749.py),
with the sign-in, consent and settings pages (pages.py, templates/). Access tokens are the
RFC 9068 JWTs of policyd.decision.tokens; codes, refresh tokens and sessions live hashed in the
policy store (storage.py). See docs/oauth.md.
"""
