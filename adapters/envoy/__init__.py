"""Envoy: sample envoy*.yaml files and config.py, which writes Envoy configs (docs/envoy.md).

The ext_authz doors themselves (gRPC and HTTP) are served by `policyd serve`: policyd/doors/.
"""
