"""Where ahmount keeps things, and the client configuration file.

``AHMOUNT_HOME=DIR`` puts config, data, cache and runtime files under ``DIR`` (tests use it to
be hermetic); otherwise the XDG base directories are used.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ahmount.errors import InvalidArgument


@dataclass(frozen=True)
class Dirs:
    config: Path
    data: Path
    cache: Path
    runtime: Path

    @property
    def config_file(self) -> Path:
        return self.config / "config.json"


def dirs() -> Dirs:
    home = os.environ.get("AHMOUNT_HOME")
    if home:
        base = Path(home)
        return Dirs(base / "config", base / "data", base / "cache", base / "run")
    user_home = Path.home()

    def xdg(var: str, default: Path) -> Path:
        value = os.environ.get(var)
        return Path(value) if value else default

    runtime = os.environ.get("XDG_RUNTIME_DIR")
    return Dirs(
        xdg("XDG_CONFIG_HOME", user_home / ".config") / "ahmount",
        xdg("XDG_DATA_HOME", user_home / ".local" / "share") / "ahmount",
        xdg("XDG_CACHE_HOME", user_home / ".cache") / "ahmount",
        Path(runtime) / "ahmount" if runtime else Path(tempfile.gettempdir())
        / f"ahmount-{os.getuid()}",
    )


@dataclass(frozen=True)
class ClientConfig:
    """What ``ah login`` stores. ``ah_host`` None means the embedded hub."""

    ah_host: str | None = None
    ais_host: str | None = None
    api_key: str | None = None
    timeout: float | None = None


def _check_host(value: Any, what: str) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not value.startswith(("http://", "https://", "unix:")):
        raise InvalidArgument(f"{what} {value!r} must be an http(s):// URL")
    return value.rstrip("/")


def make_config(
    ah_host: Any = None, ais_host: Any = None, api_key: Any = None, timeout: Any = None
) -> ClientConfig:
    """Validate login settings."""
    if api_key is not None and (not isinstance(api_key, str) or not api_key.strip()):
        raise InvalidArgument("api_key must be a non-empty string")
    if timeout is not None and (
        not isinstance(timeout, int | float) or isinstance(timeout, bool) or timeout <= 0
    ):
        raise InvalidArgument(f"timeout {timeout!r} must be a positive number of seconds")
    return ClientConfig(
        _check_host(ah_host, "ah_host"), _check_host(ais_host, "ais_host"), api_key,
        None if timeout is None else float(timeout),
    )


def hub_identity(config: ClientConfig) -> str:
    """Who a client of ``config`` is, as a digest of the hub it talks to (the embedded one:
    its data directory) and the key it uses. A mount and the CLI with the same identity see
    the same branches by the same names (a relative path's owner is the key's user), so the
    CLI may hand a mount's branches to it; the key itself never leaves the process."""
    hub = config.ah_host or f"embedded:{dirs().data}"
    return hashlib.sha256(f"{hub}\n{config.api_key or ''}".encode()).hexdigest()[:32]


def load_config() -> ClientConfig:
    path = dirs().config_file
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        return ClientConfig()
    except ValueError as exc:
        raise InvalidArgument(f"config file {path} is not valid JSON: {exc}") from None
    return make_config(raw.get("ah_host"), raw.get("ais_host"), raw.get("api_key"),
                       raw.get("timeout"))


def save_config(config: ClientConfig) -> Path:
    """Write the config file with mode 0600 (it holds the API key)."""
    path = dirs().config_file
    path.parent.mkdir(parents=True, exist_ok=True)
    body = {k: v for k, v in config.__dict__.items() if v is not None}
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        json.dump(body, handle, indent=2)
    os.replace(tmp, path)
    return path


def remove_config() -> bool:
    path = dirs().config_file
    try:
        path.unlink()
    except FileNotFoundError:
        return False
    return True


#: The disk cache bound of a mount and of ``ah://`` when none is given (one cache for both).
DEFAULT_CACHE = "10G"
_SIZE_RE = re.compile(r"(\d+(?:\.\d+)?)\s*([KMGT]?)i?B?", re.IGNORECASE)


def parse_size(text: str, minimum: int = 16 << 20, what: str = "cache size") -> int:
    """``512M``, ``10G``, ``1.5T``, ``4096``: bytes (at least ``minimum``)."""
    match = _SIZE_RE.fullmatch(text.strip())
    if not match:
        raise InvalidArgument(f"{what} {text!r} is not a number with an optional K/M/G/T unit")
    number, unit = float(match.group(1)), match.group(2).upper()
    value = int(number * (1 << (10 * "_KMGT".index(unit or "_"))))
    if value < minimum:
        raise InvalidArgument(f"{what} {text!r} is below the {minimum >> 20}M minimum")
    return value
