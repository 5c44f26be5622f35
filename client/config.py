"""Where the client finds the API: arguments first, then `MCS_API_URL` / `MCS_API_KEY`, then the config file.

The config file is TOML, at `$MCS_CONFIG`, else `$XDG_CONFIG_HOME/mcs/config.toml`, else `~/.config/mcs/config.toml`:

    url = "https://mcs.example.com"
    key = "mcs_..."

Keep it private (`chmod 600`): it holds a key. Without any URL the client uses `http://127.0.0.1:8000`, where
`mcs serve` listens by default.
"""

import os
import tomllib
from dataclasses import dataclass
from pathlib import Path

from client.errors import MISSING_API_KEY, ApiError

DEFAULT_URL = "http://127.0.0.1:8000"


@dataclass(frozen=True)
class Settings:
    url: str
    key: str


def config_path() -> Path:
    """The config file the client reads (it need not exist)."""
    if os.environ.get("MCS_CONFIG"):
        return Path(os.environ["MCS_CONFIG"]).expanduser()
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "mcs" / "config.toml"


def read_config(path: Path | None = None) -> dict[str, str]:
    """`url` and `key` from the config file; empty when there is none."""
    path = path or config_path()
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ApiError("invalid_config", f"cannot read the client config {path}: {exc}", {"path": str(path)}) from exc
    return {name: str(data[name]) for name in ("url", "key") if data.get(name)}


def resolve(url: str | None = None, key: str | None = None, config_file: Path | None = None) -> Settings:
    """The API URL and key: the arguments, else the environment, else the config file (read only when needed)."""
    url = url or os.environ.get("MCS_API_URL") or None
    key = key or os.environ.get("MCS_API_KEY") or None
    if url is None or key is None:
        found = read_config(config_file)
        url, key = url or found.get("url"), key or found.get("key")
    if not key:
        raise ApiError(MISSING_API_KEY, "no API key: pass one (Client(url, key) or --api-key), set MCS_API_KEY, or "
                       f"write `key = \"...\"` in {config_file or config_path()}")
    return Settings(url=(url or DEFAULT_URL).rstrip("/"), key=key)
