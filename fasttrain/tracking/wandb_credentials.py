"""Where W&B credentials and the server address live, read from local files only (no wandb import, no network).

Mirrors the places wandb itself looks: the WANDB_API_KEY / WANDB_IDENTITY_TOKEN_FILE variables, the .netrc entry
for the server host that `wandb login` writes, and an `api_key` in the global settings file.
"""

import configparser
import netrc
import os
from pathlib import Path
from urllib.parse import urlsplit

DEFAULT_BASE_URL = "https://api.wandb.ai"


def global_settings_path() -> Path:
    config_dir = os.environ.get("WANDB_CONFIG_DIR")
    if config_dir:
        return Path(config_dir).expanduser() / "settings"
    return Path("~/.config/wandb/settings").expanduser()


def read_global_settings() -> dict[str, str]:
    """The [default] section of the global W&B settings file; empty when missing or unreadable."""
    parser = configparser.ConfigParser()
    try:
        parser.read(global_settings_path())
    except (configparser.Error, OSError, UnicodeDecodeError):
        return {}
    return dict(parser["default"]) if parser.has_section("default") else {}


def wandb_base_url() -> str:
    """The W&B server URL: WANDB_BASE_URL, else `base_url` from the settings file, else the public cloud."""
    return (os.environ.get("WANDB_BASE_URL") or read_global_settings().get("base_url") or DEFAULT_BASE_URL).rstrip("/")


def netrc_path() -> Path:
    if os.environ.get("NETRC"):
        return Path(os.environ["NETRC"]).expanduser()
    unix_netrc = Path("~/.netrc").expanduser()
    windows_netrc = Path("~/_netrc").expanduser()
    return windows_netrc if not unix_netrc.exists() and windows_netrc.exists() else unix_netrc


def _netrc_has_key(path: Path, host: str) -> bool:
    try:
        entries = netrc.netrc(path)
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False
    credentials = entries.authenticators(host)
    return bool(credentials and credentials[2])


def find_api_key_source() -> str | None:
    """Where a W&B credential for the configured server is found (a short description), or None.

    Only checks that a credential exists; whether the server accepts it is learned when the run starts.
    """
    if os.environ.get("WANDB_API_KEY"):
        return "WANDB_API_KEY"
    if os.environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return "WANDB_IDENTITY_TOKEN_FILE"
    base_url = wandb_base_url()
    host = urlsplit(base_url).netloc
    path = netrc_path()
    if host and _netrc_has_key(path, host):
        return str(path)
    settings = read_global_settings()
    if settings.get("api_key") and settings.get("base_url", DEFAULT_BASE_URL).rstrip("/") == base_url:
        return str(global_settings_path())
    return None
