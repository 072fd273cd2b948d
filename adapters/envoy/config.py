"""Render the sample Envoy configurations (envoy.yaml, envoy-tls.yaml, envoy-http.yaml) with
other ports and certificate paths, for tests, benchmarks and `make run-envoy` on non-default
ports; with several policyd ports, the `policyd` cluster balances over them round robin
(`make run-cluster`: one Envoy in front of three replicas).

The samples stay the one source of truth: this loads one, changes only addresses and file
names in the loaded dict, and writes JSON that `envoy -c` reads.

    python -m adapters.envoy.config [--tls | --http] --listen 10000 --hub 8001 --policyd 50051 \
        [--policyd 50052 ...] --admin 9901 [--cert-dir DIR] --out envoy.json
"""

from __future__ import annotations

import argparse
import copy
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

HERE = Path(__file__).resolve().parent
PLAIN = HERE / "envoy.yaml"
TLS = HERE / "envoy-tls.yaml"
HTTP = HERE / "envoy-http.yaml"  # ext_authz http_service; `policyd` is the HTTP door's port
# envoy-tls.yaml's placeholder file names, by role.
PLACEHOLDERS = {
    "listener_cert": "/etc/policyd/tls/envoy.pem",
    "listener_key": "/etc/policyd/tls/envoy.key",
    "client_cert": "/etc/policyd/tls/gateway.pem",
    "client_key": "/etc/policyd/tls/gateway.key",
    "ca": "/etc/policyd/tls/ca.pem",
}


@dataclass(frozen=True)
class Ports:
    listen: int = 10000
    hub: int = 8001
    policyd: int = 50051
    admin: int = 9901
    host: str = "127.0.0.1"


def load(source: Path = PLAIN) -> dict[str, Any]:
    data = yaml.safe_load(source.read_text())
    if not isinstance(data, dict):
        raise ValueError(f"{source}: not an Envoy bootstrap")
    return data


def _set_address(holder: dict[str, Any], host: str, port: int) -> None:
    address = holder["address"]["socket_address"]
    address["address"] = host
    address["port_value"] = port


def _cluster(config: dict[str, Any], name: str) -> dict[str, Any]:
    for cluster in config["static_resources"]["clusters"]:
        if cluster["name"] == name:
            return dict(cluster)
    raise KeyError(f"no cluster {name!r}")


def _replace_files(node: Any, files: dict[str, str]) -> Any:
    if isinstance(node, dict):
        return {
            k: (
                files.get(v, v)
                if k == "filename" and isinstance(v, str)
                else _replace_files(v, files)
            )
            for k, v in node.items()
        }
    if isinstance(node, list):
        return [_replace_files(item, files) for item in node]
    return node


def render(
    ports: Ports,
    *,
    source: Path = PLAIN,
    files: dict[str, Path] | None = None,
    policyd_sni: str | None = None,
    policyd_unix: str | None = None,
    policyd_replicas: Sequence[int] = (),
) -> dict[str, Any]:
    """The sample with the listener, admin, hub and policyd addresses changed; `files` maps
    PLACEHOLDERS roles to real certificate files (TLS sample); `policyd_unix`: reach policyd
    on that Unix socket instead of `ports.policyd` (the HTTP door's `unix:` address);
    `policyd_replicas`: more policyd ports on `ports.host` besides `ports.policyd`, one
    endpoint each in the `policyd` cluster, balanced round robin."""
    config = load(source)
    _set_address(config["admin"], ports.host, ports.admin)
    _set_address(config["static_resources"]["listeners"][0], ports.host, ports.listen)
    for name, port in (("hub", ports.hub), ("policyd", ports.policyd)):
        cluster = _cluster(config, name)
        endpoint = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]
        _set_address(endpoint, ports.host, port)
    for http_filter in config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0][
        "typed_config"
    ]["http_filters"]:
        service = http_filter.get("typed_config", {}).get("http_service")
        if service is not None:
            service["server_uri"]["uri"] = f"http://{ports.host}:{ports.policyd}"
    if files:
        unknown = set(files) - set(PLACEHOLDERS)
        if unknown:
            raise KeyError(f"unknown certificate roles: {sorted(unknown)}")
        config = _replace_files(config, {PLACEHOLDERS[k]: str(v) for k, v in files.items()})
    if policyd_sni is not None:
        tls = _cluster(config, "policyd")["transport_socket"]["typed_config"]
        tls["sni"] = policyd_sni
    if policyd_unix is not None:
        cluster = _cluster(config, "policyd")
        endpoint = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]
        endpoint["address"] = {"pipe": {"path": policyd_unix}}
    if policyd_replicas:
        if policyd_unix is not None:
            raise ValueError("policyd replicas are ports: not with a Unix socket")
        _balance(config, [ports.policyd, *policyd_replicas], ports.host)
    return config


def _balance(config: dict[str, Any], policyd_ports: list[int], host: str) -> None:
    """The `policyd` cluster: one endpoint per port, each request to the next (round robin)."""
    for cluster in config["static_resources"]["clusters"]:
        if cluster["name"] == "policyd":
            break
    else:
        raise KeyError("no cluster 'policyd'")
    cluster["lb_policy"] = "ROUND_ROBIN"
    group = cluster["load_assignment"]["endpoints"][0]
    template = group["lb_endpoints"][0]
    group["lb_endpoints"] = []
    for port in policyd_ports:
        endpoint = copy.deepcopy(template)
        _set_address(endpoint["endpoint"], host, port)
        group["lb_endpoints"].append(endpoint)


def write(config: dict[str, Any], path: Path) -> Path:
    """Write the config as JSON for `envoy -c PATH` (Envoy picks the format by extension)."""
    if path.suffix != ".json":
        raise ValueError("write the rendered config to a .json file")
    path.write_text(json.dumps(config, indent=1) + "\n")
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m adapters.envoy.config", description=__doc__.split("\n")[0]
    )
    defaults = Ports()
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--tls", action="store_true", help="render envoy-tls.yaml")
    which.add_argument(
        "--http", action="store_true", help="render envoy-http.yaml (--policyd: the HTTP door)"
    )
    parser.add_argument("--listen", type=int, default=defaults.listen)
    parser.add_argument("--hub", type=int, default=defaults.hub)
    parser.add_argument(
        "--policyd",
        type=int,
        action="append",
        metavar="PORT",
        help=f"policyd's port (default {defaults.policyd}); repeated: several replicas,"
        " balanced round robin",
    )
    parser.add_argument("--admin", type=int, default=defaults.admin)
    parser.add_argument(
        "--policyd-unix",
        metavar="PATH",
        help="reach policyd on this Unix socket (--http: envoy.http_address = unix:PATH)",
    )
    parser.add_argument(
        "--cert-dir",
        type=Path,
        help="folder with envoy.pem, envoy.key, gateway.pem, gateway.key, ca.pem (--tls)",
    )
    parser.add_argument("--out", type=Path, required=True, help="a .json file")
    args = parser.parse_args(argv)
    files = None
    if args.cert_dir is not None:
        files = {role: args.cert_dir / Path(p).name for role, p in PLACEHOLDERS.items()}
    first, *more = args.policyd or [defaults.policyd]
    ports = Ports(args.listen, args.hub, first, args.admin)
    source = TLS if args.tls else HTTP if args.http else PLAIN
    config = render(
        ports, source=source, files=files, policyd_unix=args.policyd_unix, policyd_replicas=more
    )
    write(config, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
