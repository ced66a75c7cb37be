"""Secrets kktd reads from files (an upstream's password, from its own file or a systemd credential): never
from the TOML file or the environment, and never quoted in an error."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from kktd.errors import ConfigError
from kktd.options import CONTROL_CHARS_RE, string

MAX_SECRET_LEN = 100


def parse_secret_path(raw: Any) -> Path:
    """A setting naming a password file: the path only (the file is read when its upstream is chosen)."""
    text = str(raw) if isinstance(raw, Path) else string(raw)
    if not text or "\x00" in text:
        raise ValueError("must be the path of a file holding the password")
    return Path(text)


def read_secret(path: Path, what: str) -> str:
    """The one-line secret in ``path`` (one trailing newline ignored). ValueError never quotes the content."""

    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise ValueError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise ValueError(f"{path}: is a directory") from None
    except OSError as exc:
        raise ValueError(f"{path}: cannot be read: {exc.strerror}") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise ValueError(f"{path}: the {what} is not UTF-8 text") from None
    text = text[:-1] if text.endswith("\n") else text
    text = text[:-1] if text.endswith("\r") else text
    if not text:
        raise ValueError(f"{path}: the file is empty")
    if len(text) > MAX_SECRET_LEN or CONTROL_CHARS_RE.search(text):
        raise ValueError(f"{path}: the {what} must be one line of at most {MAX_SECRET_LEN} characters")
    return text


def secret_from(
    explicit: Path | None, key: str, credential: str, environ: Mapping[str, str], what: str = "password"
) -> tuple[Path, str] | None:
    """The secret of setting ``key``: from the file it names, else from systemd's credential ``credential``
    ($CREDENTIALS_DIRECTORY/credential) when that exists; None when neither is set. ConfigError names the key."""
    if explicit is None:
        directory = environ.get("CREDENTIALS_DIRECTORY", "")
        if not directory or not (Path(directory) / credential).exists():
            return None
        path, shown = Path(directory) / credential, f"{key} (default $CREDENTIALS_DIRECTORY/{credential})"
    else:
        path, shown = explicit, key
    try:
        return path, read_secret(path, what)
    except ValueError as exc:
        raise ConfigError(f"{shown}: {exc}") from None
