"""Hub access without the minute of retries: detect an unreachable hub once, then work from the HF cache.

Offline, huggingface_hub retries every file request with back-off: a hub id printed ~46 retry lines
over a minute before failing. Before the first hub (non-local) load, `prepare_hub_access` tries one TCP
connection to the hub endpoint (`huggingface_hub.constants.ENDPOINT`, through the configured proxy if
any) with a short timeout, once per process. When it fails, the process switches to offline mode (what
`HF_HUB_OFFLINE=1` does), so a cached model or dataset still loads and a missing one fails at once.
Setting `HF_HUB_OFFLINE` (to any value) skips the check: the user has decided (`HF_HUB_OFFLINE=0` for a
hub that is reachable but slower than the check's timeout to connect).
"""

from __future__ import annotations

import logging
import os
import socket
import sys
import threading
import urllib.parse
import urllib.request

logger = logging.getLogger(__name__)

CONNECT_TIMEOUT_S = 3.0
_USER_SWITCHES = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE")


class OfflineError(ConnectionError):
    """A hub id is needed, the hub is unreachable (or offline mode is on), and the cache lacks it."""


_reachable: dict[str, bool] = {}  # endpoint -> result of the one check of this process
_went_offline: list[str] = []  # the endpoint this process found unreachable (at most one entry)
_noted: set[str] = set()  # hub ids already logged as loaded from the cache


def is_local(source: str) -> bool:
    """A path on this machine (existing, or spelled like a path), as opposed to a hub id."""
    return os.path.exists(source) or source.startswith((".", "/", "~"))


def endpoint() -> str:
    from huggingface_hub import constants

    return constants.ENDPOINT


def _address(url: str) -> tuple[str, int] | None:
    """(host, port) a connection to `url` goes to first: its proxy when one applies, else its host."""
    parts = urllib.parse.urlsplit(url)
    if not parts.hostname:
        return None
    proxy = urllib.request.getproxies().get(parts.scheme)
    if proxy and not urllib.request.proxy_bypass(parts.hostname):
        proxy_parts = urllib.parse.urlsplit(proxy if "://" in proxy else f"http://{proxy}")
        if proxy_parts.hostname:
            return proxy_parts.hostname, proxy_parts.port or (443 if proxy_parts.scheme == "https" else 80)
    return parts.hostname, parts.port or (443 if parts.scheme == "https" else 80)


def can_connect(host: str, port: int, timeout: float = CONNECT_TIMEOUT_S) -> bool:
    """One TCP connection within `timeout` seconds, name resolution included (run in a thread, since
    `socket.create_connection`'s timeout does not bound a hanging DNS lookup)."""
    result: list[bool] = []

    def attempt() -> None:
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            result.append(True)
        except OSError:
            result.append(False)

    thread = threading.Thread(target=attempt, name="codi-hub-check", daemon=True)
    thread.start()
    thread.join(timeout)
    return bool(result) and result[0]


def hub_reachable() -> bool:
    """Whether the hub endpoint accepts a TCP connection (checked once per process and endpoint)."""
    url = endpoint()
    if url not in _reachable:
        address = _address(url)
        _reachable[url] = address is not None and can_connect(*address)
    return _reachable[url]


def user_chose_mode() -> bool:
    return any(os.environ.get(name) is not None for name in _USER_SWITCHES)


def go_offline() -> None:
    """Switch huggingface_hub, transformers and datasets to offline mode for this process (and its
    children). They read the mode at call time from these module constants (set from the environment
    at import), so setting the constants, not only the variable, is what takes effect."""
    from huggingface_hub import constants

    os.environ["HF_HUB_OFFLINE"] = "1"
    constants.HF_HUB_OFFLINE = True
    datasets_config = sys.modules.get("datasets.config")
    if datasets_config is not None:  # imported already: its copy was taken at import
        datasets_config.HF_HUB_OFFLINE = True
        datasets_config.HF_DATASETS_OFFLINE = True


def prepare_hub_access(source: str) -> None:
    """Before loading `source` from the hub: when the hub is unreachable, go offline (cache only)."""
    if is_local(source) or user_chose_mode() or _went_offline:
        return
    if not hub_reachable():
        _went_offline.append(endpoint())
        go_offline()


def offline_reason() -> str | None:
    """Why hub ids resolve from the cache only in this process, or None when the hub is in use."""
    from huggingface_hub import constants

    if _went_offline:
        return f"the hub at {_went_offline[0]} is unreachable"
    if constants.HF_HUB_OFFLINE:
        return "offline mode is on (HF_HUB_OFFLINE)"
    return None


def note_cache_use(what: str, source: str) -> None:
    """Log (once per source) that `source` came from the cache because the hub is unreachable."""
    if _went_offline and source not in _noted:
        _noted.add(source)
        logger.info(
            "%s %r loaded from the HF cache: the hub at %s is unreachable", what, source, _went_offline[0]
        )


def offline_message(what: str, source: str) -> str:
    """One line for a hub id that cannot be loaded from the cache while offline."""
    from huggingface_hub import constants

    if _went_offline:
        then = "download it where there is network (HF_HUB_OFFLINE=1 then uses the cache without a check)"
    else:
        then = "unset HF_HUB_OFFLINE to download it"
    return (
        f"cannot load the {what} {source!r}: {offline_reason() or 'offline'} and {source!r} is not (fully) "
        f"in the HF cache ({constants.HF_HUB_CACHE}). Pass a local path instead, or {then}"
    )
