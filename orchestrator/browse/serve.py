"""Run the browse app with uvicorn: loopback by default; another interface only when asked, and
always behind a token the user opens the printed URL with."""

from __future__ import annotations

import ipaddress
import json
import secrets
import socket
import sys

from orchestrator.errors import ConfigError
from orchestrator.store import Store

DEFAULT_PORT = 8765


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def free_port(host: str) -> int:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def serve(store: Store, *, host: str = "127.0.0.1", port: int = DEFAULT_PORT, remote: bool = False,
          token: str | None = None, no_token: bool = False, as_json: bool = False) -> None:
    """Serve until Ctrl-C. ``remote`` must be set to bind anything but loopback; a token (given,
    or a random one) guards every request unless ``no_token`` (loopback only)."""
    import uvicorn

    from orchestrator.browse.app import create_app

    if not is_loopback(host) and not remote:
        raise ConfigError(f"--host {host} would serve the store's data beyond this machine",
                          hint="pass --remote as well to mean it (every request then needs the printed token)")
    if no_token and not is_loopback(host):
        raise ConfigError("--no-token is for loopback only", hint="drop --no-token: remote users open the token URL")
    token = None if no_token else (token or secrets.token_urlsafe(24))
    port = port or free_port(host)
    shown = f"[{host}]" if ":" in host else host
    url = f"http://{shown}:{port}/" + (f"?token={token}" if token else "")
    if as_json:
        print(json.dumps({"url": url, "host": host, "port": port, "token": token, "store": store.uri,
                          "principal": store.principal}), flush=True)
    else:
        print(f"orchestrator browse: {store.uri} as {store.principal}\n  open {url}\n  Ctrl-C to stop", flush=True)
    config = uvicorn.Config(create_app(store, token=token), host=host, port=port, log_level="warning",
                            access_log=False)
    try:
        uvicorn.Server(config).run()
    except SystemExit as exc:  # uvicorn exits when it cannot bind
        raise ConfigError(f"cannot serve on {host}:{port} (in use, or not an address here)",
                          hint="pass another --port (0: any free one) or --host") from exc
    sys.stdout.flush()
