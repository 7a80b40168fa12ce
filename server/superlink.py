"""The coordinator's SuperLink, with its Control and Runtime APIs reachable from this host only.

Flower 1.42 serves three APIs on the one HTTP port that `flower-superlink --host/--port`
binds: the Fleet API (SuperNodes), the Control API (`flwr run`, `flwr stop`,
`flwr supernode register`, ...) and the Runtime API (the ServerApp's process).
`--control-api-address` and `--fleet-api-address` are deprecated and bind nothing (they only
feed gRPC servers behind Flower-internal environment variables, which 1.42's HTTP-only
SuperNode cannot use), and Control API authentication (OIDC) exists only in Flower
Enterprise. So whoever can reach the port that the sites need can register a SuperNode key,
start, stop or read runs:

    flower-superlink --host 0.0.0.0 --port 9092 ... --enable-supernode-auth   # admits anyone

This command runs Flower's own SuperLink application on two listeners instead:

    python -m server.superlink --fleet-address 0.0.0.0:9092 --host 127.0.0.1 --port 9093 \
        [every other flower-superlink option: TLS, --database, --enable-supernode-auth, ...]

- `--host/--port`, which must be a loopback address, carries every API: the coordinator's
  own `flwr` commands and its ServerApp processes connect there;
- `--fleet-address` carries the Fleet API only: every other path that arrives there is
  answered 404 before Flower sees the request.
"""

from __future__ import annotations

import argparse
import importlib
import ipaddress
import logging
import socket
import sys
from collections.abc import Sequence

FLEET_PATH_PREFIX = "/v1/fleet/"
REFUSED = b"Not found: only the Fleet API is served on this address.\n"


def fleet_path(path: str) -> bool:
    """Whether `path` is one of the Fleet API's (no dot segments, no empty segments)."""
    return path.startswith(FLEET_PATH_PREFIX) and "/." not in path and "//" not in path


class FleetOnlyOnPublicPort:
    """ASGI middleware: a request that arrived on `public_port` may reach the Fleet API only.

    The port is that of the listening socket the connection came in on (`scope["server"]`),
    not something the caller says, so the local listener keeps every API.
    """

    def __init__(self, app, public_port: int) -> None:
        self.app = app
        self.public_port = public_port

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] in ("http", "websocket"):
            server = scope.get("server") or (None, None)
            if server[1] == self.public_port and not fleet_path(scope["path"]):
                if scope["type"] == "websocket":
                    await send({"type": "websocket.close", "code": 1008})
                    return
                await send({"type": "http.response.start", "status": 404,
                            "headers": [(b"content-type", b"text/plain"), (b"content-length", str(len(REFUSED)).encode())]})
                await send({"type": "http.response.body", "body": REFUSED})
                return
        await self.app(scope, receive, send)


def split_address(address: str) -> tuple[str, int]:
    """`host:port` or `[v6]:port` -> (host, port)."""
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536 or not host:
        raise ValueError(f"--fleet-address must be HOST:PORT, got {address!r}")
    return host.strip("[]"), int(port)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def listen(host: str, port: int) -> socket.socket:
    family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                         flags=socket.AI_PASSIVE)[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(address)
    return sock


def main(argv: Sequence[str] | None = None) -> None:
    """`fedvid-superlink`: Flower's SuperLink with only the Fleet API on `--fleet-address`."""
    argv = list(sys.argv[1:] if argv is None else argv)
    ours = argparse.ArgumentParser(prog="fedvid-superlink", add_help=False,
                                   description=__doc__.split("\n\n")[0])
    ours.add_argument("--fleet-address", help="HOST:PORT where SuperNodes connect; only the Fleet API is served there")
    if "-h" in argv or "--help" in argv:
        ours.print_help()
        print("\nEvery other option is flower-superlink's; --host/--port must be a loopback address:\n")
    args, flower_argv = ours.parse_known_args(argv)
    if args.fleet_address is None and "-h" not in argv and "--help" not in argv:
        ours.error("--fleet-address HOST:PORT is required")
    try:
        fleet_host, fleet_port = split_address(args.fleet_address) if args.fleet_address else ("", 0)
    except ValueError as err:
        ours.error(str(err))

    # Flower's own option parsing, validation and application; only the listeners are ours.
    import uvicorn
    from flwr.supercore import log
    # The module, not the function of the same name that flwr.superlink.cli exports.
    flower = importlib.import_module("flwr.superlink.cli.flower_superlink")
    from flwr.superlink.main import create_app
    from flwr.supercore.http_logging import get_uvicorn_log_config
    from flwr.supercore.logger import console_handler

    sys.argv = ["flower-superlink", *flower_argv]
    config = flower._parse_superlink_lifespan_config()  # --help exits here
    if not is_loopback(config.host):
        ours.error(f"--host must be a loopback address (it carries the Control API), got {config.host!r}")
    if fleet_port == config.port:
        ours.error(f"--fleet-address must use another port than --port ({config.port})")

    app = create_app(config, flower.SuperLinkLifespan)
    app.add_middleware(FleetOnlyOnPublicPort, public_port=fleet_port)
    server = uvicorn.Server(uvicorn.Config(
        app=app, host=config.host, port=config.port, reload=False, access_log=True, workers=1,
        log_config=get_uvicorn_log_config(console_handler.level),
        ssl_keyfile=config.ssl_keyfile, ssl_certfile=config.ssl_certfile,
    ))
    log(logging.INFO, "fedvid-superlink: every API on %s:%s, the Fleet API only on %s:%s",
        config.host, config.port, fleet_host, fleet_port)
    server.run(sockets=[listen(config.host, config.port), listen(fleet_host, fleet_port)])


if __name__ == "__main__":
    main()
