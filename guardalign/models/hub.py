"""Fail fast when the Hugging Face Hub cannot be reached.

huggingface_hub retries a failed connection five times with back-off (about 25 s per file), so an
offline first run would hang for a minute before saying "no weights". When the Hub's host name does not
even resolve (and no proxy is configured), we switch huggingface_hub to its offline mode for the
duration of the load: cached weights still load, missing ones fail at once with our own message.
"""
from __future__ import annotations

import os
import socket
import threading
from contextlib import contextmanager
from typing import Iterator
from urllib.parse import urlparse

_PROXY_VARS = ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy")


def hub_unreachable(timeout: float = 2.0) -> bool:
    """True when the Hub endpoint's host name cannot be resolved and no proxy would resolve it for us.

    The lookup runs in a helper thread joined with ``timeout``, so no process-wide socket timeout is touched.
    """
    if any(os.environ.get(v) for v in _PROXY_VARS):
        return False
    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or "huggingface.co"
    result: list[bool] = []

    def lookup() -> None:
        try:
            socket.getaddrinfo(host, 443)
            result.append(False)
        except OSError:
            result.append(True)

    worker = threading.Thread(target=lookup, name="guardalign-hub-lookup", daemon=True)
    worker.start()
    worker.join(timeout)
    return result[0] if result else True  # no answer within the timeout: as good as unreachable


@contextmanager
def offline_if_unreachable() -> Iterator[bool]:
    """Within the block, huggingface_hub runs in offline mode if the Hub is unreachable; yields that flag."""
    import huggingface_hub.constants as hub_constants

    if hub_constants.HF_HUB_OFFLINE:
        yield True
        return
    offline = hub_unreachable()
    if not offline:
        yield False
        return
    # HF_HUB_OFFLINE is read from the environment at import time; its module constant is the live switch.
    previous = hub_constants.HF_HUB_OFFLINE
    hub_constants.HF_HUB_OFFLINE = True
    try:
        yield True
    finally:
        hub_constants.HF_HUB_OFFLINE = previous
