"""Where the clients connect and with which key (arguments, else OPTSERVE_URL and
OPTSERVE_API_KEY), and that `clients` stands without `service`."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from clients import AsyncOptimizerClient, AuthenticationError, OptimizerClient
from tests.clients.conftest import KEYS
from tests.support.live_server import LiveServer

ROOT = Path(__file__).resolve().parents[2]


def test_defaults_without_environment() -> None:
    with OptimizerClient() as client:
        assert client.base_url == "http://127.0.0.1:8000"
        assert client.api_key is None
        assert "authorization" not in client._http.headers


def test_explicit_arguments_win(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPTSERVE_URL", "http://127.0.0.1:1")
    monkeypatch.setenv("OPTSERVE_API_KEY", "from-env")
    with OptimizerClient("http://127.0.0.1:2/", "explicit") as client:
        assert client.base_url == "http://127.0.0.1:2"
        assert client.api_key == "explicit"
    with OptimizerClient(api_key="") as client:  # "" is no key, whatever the environment
        assert client.api_key is None
        assert client.base_url == "http://127.0.0.1:1"


def test_url_and_key_from_the_environment(
    auth_server: LiveServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OPTSERVE_URL", auth_server.base_url)
    monkeypatch.setenv("OPTSERVE_API_KEY", next(iter(KEYS)))
    with OptimizerClient() as client:
        session = client.create_session({"w": np.zeros(2)}, {"name": "sgd", "lr": 0.1})
        assert client.step(session.id, {"w": np.ones(2)}).version == 1
    with OptimizerClient(api_key="") as anonymous, pytest.raises(AuthenticationError):
        anonymous.get_session(session.id)
    monkeypatch.setenv("OPTSERVE_API_KEY", "not-a-key")
    with OptimizerClient() as client, pytest.raises(AuthenticationError):
        client.get_session(session.id)


@pytest.mark.asyncio
async def test_url_and_key_from_the_environment_async(
    auth_server: LiveServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OPTSERVE_URL", auth_server.base_url + "/")
    monkeypatch.setenv("OPTSERVE_API_KEY", list(KEYS)[1])
    async with AsyncOptimizerClient() as client:
        session = await client.create_session({"w": np.zeros(2)}, {"name": "sgd", "lr": 0.1})
        assert (await client.get_session(session.id)).version == 0
    monkeypatch.delenv("OPTSERVE_API_KEY")
    async with AsyncOptimizerClient() as client:
        with pytest.raises(AuthenticationError):
            await client.get_session(session.id)


BLOCK_SERVICE = textwrap.dedent(
    """
    import importlib.abc, sys

    class NoService(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "service" or name.startswith("service."):
                raise ImportError(f"{name} is blocked: clients must not import it")
            return None

    sys.meta_path.insert(0, NoService())
    """
)


def run_python(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120
    )


def test_clients_import_without_service() -> None:
    code = BLOCK_SERVICE + textwrap.dedent(
        """
        import clients
        from clients import *  # every public name, which imports every module
        import clients.errors, clients.sync, clients.async_client, clients.tensorfile, clients._base
        assert OptimizerClient and AsyncOptimizerClient and ValidationError
        try:
            import service
        except ImportError:
            pass
        else:
            raise SystemExit("service was importable: the block failed")
        bad = sorted(m for m in sys.modules if m == "service" or m.startswith("service."))
        assert not bad, bad
        print("ok")
        """
    )
    done = run_python(code)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"


def test_the_server_codec_does_not_import_httpx() -> None:
    code = textwrap.dedent(
        """
        import sys
        import service.core.tensorfile, clients.tensorfile
        assert "httpx" not in sys.modules, "the codec pulled in httpx"
        from clients.tensorfile import TensorFileError
        assert issubclass(service.core.tensorfile.TensorFileError, TensorFileError)
        print("ok")
        """
    )
    done = run_python(code)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"
