"""Is the Hugging Face Hub reachable? Asked once per process, in under a few seconds, before anything is fetched.

Without this, a machine with no network spends about a minute in huggingface_hub's retries with back-off (five
attempts, each logged) before the real error. A hub id that is already in the local cache is then loaded from it,
offline; one that is not gets one clear paragraph at once.
"""

from __future__ import annotations

import functools
import os
import socket
from urllib.parse import urlparse

PROXY_VARS = ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy")


def endpoint() -> str:
    return os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")


def offline_requested() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on")


@functools.lru_cache(maxsize=1)
def unreachable_reason(timeout: float = 3.0) -> str | None:
    """None when the hub's host accepts a connection (or a proxy is configured: only it can tell); else why not."""
    if offline_requested():
        return "HF_HUB_OFFLINE is set"
    if any(os.environ.get(v) for v in PROXY_VARS):
        return None
    url = urlparse(endpoint())
    host, port = url.hostname or "huggingface.co", url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError as e:
        return f"{host} is not reachable from this machine ({e.strerror or type(e).__name__})"
    return None


def go_offline() -> None:
    """Use only the local cache from now on (huggingface_hub, transformers and datasets read these at call time or
    import; set both so neither retries)."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["HF_DATASETS_OFFLINE"] = "1"
    try:  # huggingface_hub reads the variable at import; a process that already imported it needs its constant set
        from huggingface_hub import constants

        constants.HF_HUB_OFFLINE = True
    except ImportError:  # pragma: no cover
        pass
