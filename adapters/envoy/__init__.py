"""Envoy ext_authz v3 adapter: the servicer and a sample envoy.yaml (docs/envoy.md)."""
