"""A quick "can we open a TCP connection to the W&B server?" check, run before an online `wandb.init`.

wandb retries a refused or unresolvable server until its init timeout expires; this probe turns the common
"no network at all" case into an immediate fallback instead of a wait.
"""

import socket
import threading
from urllib.parse import urlsplit


def _behind_proxy(scheme: str, host: str) -> bool:
    import urllib.request  # slow to import; only online starts get here

    proxies = urllib.request.getproxies()
    return bool(proxies.get(scheme) or proxies.get("all")) and not urllib.request.proxy_bypass(host)


def server_unreachable(base_url: str, timeout_s: float = 5.0) -> str | None:
    """Why `base_url` cannot be reached (one short phrase), or None if a TCP connection opened.

    Behind an HTTP(S) proxy a direct connection says nothing about reachability, so the check is skipped
    (returns None) and wandb's own init timeout bounds the wait.
    """
    parts = urlsplit(base_url)
    host = parts.hostname
    if not host:
        return f"bad W&B server URL {base_url!r}"
    if _behind_proxy(parts.scheme, host):
        return None
    port = parts.port or (443 if parts.scheme == "https" else 80)
    outcome: list[str | None] = []

    def connect() -> None:
        try:
            socket.create_connection((host, port), timeout=timeout_s).close()
            outcome.append(None)
        except OSError as error:
            outcome.append(f"cannot connect to {host}:{port}: {error.strerror or error}")

    # Name resolution ignores socket timeouts, so the whole attempt runs in a thread we stop waiting for.
    probe = threading.Thread(target=connect, name="wandb-server-probe", daemon=True)
    probe.start()
    probe.join(timeout_s)
    if not outcome:
        return f"no answer from {host}:{port} within {timeout_s:g} s"
    return outcome[0]
