"""The doors `policyd serve` serves: the Decision API, Envoy ext_authz (gRPC and HTTP).

Also what they share with the ASGI middleware in adapters/: the deny table (denials), RFC 6750
challenges and header names. adapters/ may import these; policyd never imports adapters.
"""
