"""Fail fast when the Hugging Face Hub cannot be reached.

huggingface_hub retries a failed connection five times with back-off (about 25 s per file), so an
offline first run would hang for a minute before saying "no weights". When the Hub's host name does not
even resolve (and no proxy is configured), we switch huggingface_hub to its offline mode for the
duration of the load: cached weights still load, missing ones fail at once with our own message.

It also tells a local model folder from a hub id: a ``--model`` value that looks like a path is never sent
to the Hub (whose "repo_type" error would hide the real problem, a folder that does not exist).
"""
from __future__ import annotations

import os
import socket
import threading
from contextlib import contextmanager
from typing import Iterator
from urllib.parse import urlparse

from guardalign.errors import ModelLoadError

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


def looks_like_path(model: str) -> bool:
    """True when ``model`` can only be meant as a local path, never as a hub id ``name`` or ``org/name``:
    it starts with ``/``, ``.`` or ``~``, ends with a separator, or has more than one separator."""
    seps = ("/", os.sep) + ((os.altsep,) if os.altsep else ())
    text = str(model)
    return (text.startswith(("/", ".", "~")) or text.endswith(seps) or text.count("/") > 1
            or (os.sep != "/" and os.sep in text))


def local_or_hub(model: str, flag: str = "--model") -> str:
    """The value to load: ``~`` expanded; a path-like value must be an existing directory.

    Raises
    ------
    ModelLoadError
        ``model`` looks like a path (:func:`looks_like_path`) but no such directory exists, or it is a file.
    """
    text = str(model)
    path = os.path.expanduser(text)
    if os.path.isdir(path):
        return path
    if os.path.exists(path):
        raise ModelLoadError(f"{flag} {text}: is a file, not a directory; pass the model's folder (the one holding "
                             "config.json, the weights and the processor files)")
    if looks_like_path(text):
        raise ModelLoadError(f"{flag} {text}: no such directory. A value that looks like a path is read as a local "
                             "directory (holding config.json, the weights and the processor files), not as a "
                             "Hugging Face hub id such as llava-hf/llava-1.5-7b-hf")
    return text
