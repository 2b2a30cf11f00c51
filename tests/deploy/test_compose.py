"""docker-compose.yml and the Dockerfile agree with the server's settings.

No Docker engine runs here, so this checks what can go wrong silently: an environment
variable the server does not read, a port mapped to the wrong container port, a Redis
URL that names no service or the wrong port, persistence or health checks missing.
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pytest
import yaml

from service.config import Settings

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    data = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    assert isinstance(data, dict)
    return data


#: what `${NAME:?message}` in the compose file looks like: compose refuses to start
#: while NAME is unset or empty, printing the message
_REQUIRED = re.compile(r"\$\{(OPTSERVE_[A-Z_]+):\?[^}]+\}")


def test_no_api_key_is_committed(compose: dict[str, Any]) -> None:
    """The API keys come from the operator's environment (compose refuses to start
    without them); none is written in the file, where anyone could read it."""
    keys = compose["services"]["api"]["environment"]["OPTSERVE_API_KEYS"]
    match = _REQUIRED.fullmatch(keys)
    assert match is not None, keys
    assert match.group(1) == "OPTSERVE_API_KEYS"
    assert "change-me" not in (ROOT / "docker-compose.yml").read_text()


@pytest.fixture(scope="module")
def api_settings(compose: dict[str, Any]) -> Settings:
    env = dict(compose["services"]["api"]["environment"])
    # what an operator provides for the required variables (test_no_api_key_is_committed)
    env["OPTSERVE_API_KEYS"] = '{"a-key-of-the-operator": "dev"}'
    fields = set(Settings.model_fields)
    for name in env:
        assert name.startswith("OPTSERVE_"), name
        assert name.removeprefix("OPTSERVE_").lower() in fields, f"{name} is not a setting"
    values = {k.removeprefix("OPTSERVE_").lower(): v for k, v in env.items()}
    settings_cls: Any = Settings
    return settings_cls.model_validate(
        {k: (yaml.safe_load(v) if k == "api_keys" else v) for k, v in values.items()}
    )


def test_api_runs_two_workers_on_redis(compose: dict[str, Any], api_settings: Settings) -> None:
    assert api_settings.workers == 2
    assert api_settings.redis_url is not None
    url = urlparse(api_settings.redis_url)
    assert url.scheme == "redis"
    assert url.hostname in compose["services"], f"{url.hostname} is no compose service"
    command = compose["services"][url.hostname]["command"]
    port = int(command[command.index("--port") + 1]) if "--port" in command else 6379
    assert url.port == port


def test_ports_and_host(compose: dict[str, Any], api_settings: Settings) -> None:
    ports = compose["services"]["api"]["ports"]
    container_ports = {int(str(p).split(":")[-1]) for p in ports}
    assert container_ports == {api_settings.port}
    # published on the host's loopback only (a proxy with TLS serves others)
    assert all(str(p).startswith("127.0.0.1:") for p in ports), ports
    assert api_settings.host == "0.0.0.0"  # reachable from outside the container
    # a non-loopback server needs API keys or an explicit opt-out (see `optserve serve`)
    assert api_settings.api_keys or api_settings.allow_unauthenticated
    dockerfile = (ROOT / "Dockerfile").read_text()
    exposed = {int(p) for p in re.findall(r"^EXPOSE\s+(\d+)", dockerfile, re.M)}
    assert exposed == {api_settings.port}


def test_redis_persists_with_aof_everysec(compose: dict[str, Any]) -> None:
    redis = compose["services"]["redis"]
    command = redis["command"]
    assert command[command.index("--appendonly") + 1] == "yes"
    assert command[command.index("--appendfsync") + 1] == "everysec"
    volume = redis["volumes"][0].split(":")
    assert volume[1] == "/data"
    assert volume[0] in compose["volumes"]


def test_health_checks_and_start_order(compose: dict[str, Any]) -> None:
    services = compose["services"]
    for name in ("api", "redis"):
        assert services[name]["healthcheck"]["test"], name
    assert "/readyz" in " ".join(services["api"]["healthcheck"]["test"])
    assert services["api"]["depends_on"]["redis"]["condition"] == "service_healthy"
    assert "/healthz" in (ROOT / "Dockerfile").read_text()


def test_dockerfile_installs_the_server_and_runs_serve() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert '".[server]"' in dockerfile
    assert re.search(r'^CMD \["optserve", "serve"\]', dockerfile, re.M)
    assert "torch" not in dockerfile  # the server never needs torch


def test_dockerfile_copies_every_package_the_project_installs() -> None:
    """The image builds from what it copies: each package pyproject.toml installs
    (`[tool.setuptools.packages.find] include`) must be copied, or `pip install` in the
    image leaves it out and the server fails on import."""
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    patterns = pyproject["tool"]["setuptools"]["packages"]["find"]["include"]
    packages = [p.rstrip("*") for p in patterns]
    assert "wire" in packages
    dockerfile = (ROOT / "Dockerfile").read_text()
    for package in packages:
        assert re.search(rf"^COPY {package} \./{package}$", dockerfile, re.M), package
