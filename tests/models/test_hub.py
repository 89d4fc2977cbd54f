"""Offline fast path: an unresolvable Hub switches huggingface_hub to offline mode for the load only."""
from __future__ import annotations

import socket

import huggingface_hub.constants as hub_constants
import pytest

from guardalign.models import hub as hub
@pytest.fixture()
def online_env(monkeypatch):
    for var in hub._PROXY_VARS:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", False)


def test_unresolvable_host_means_offline_and_is_restored(monkeypatch, online_env):
    def no_dns(*a, **k):
        raise socket.gaierror(-2, "Name or service not known")

    monkeypatch.setattr(socket, "getaddrinfo", no_dns)
    assert hub.hub_unreachable() is True
    with hub.offline_if_unreachable() as offline:
        assert offline is True and hub_constants.HF_HUB_OFFLINE is True
    assert hub_constants.HF_HUB_OFFLINE is False


def test_resolvable_host_or_proxy_leaves_hub_alone(monkeypatch, online_env):
    monkeypatch.setattr(socket, "getaddrinfo", lambda *a, **k: [("ok",)])
    with hub.offline_if_unreachable() as offline:
        assert offline is False and hub_constants.HF_HUB_OFFLINE is False
    monkeypatch.setattr(socket, "getaddrinfo", lambda *a, **k: (_ for _ in ()).throw(socket.gaierror()))
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy:3128")  # the proxy resolves names for us
    assert hub.hub_unreachable() is False
