"""Keep credentials out of logs, CLI output, metric labels, task results and error messages."""

from __future__ import annotations

from urllib.parse import urlsplit, urlunsplit


def redact_url(url: str) -> str:
    """Return ``url`` with any password replaced by ``***`` (user names are kept).

    ``redis://user:secret@host:6379/0`` → ``redis://user:***@host:6379/0``. A string that does not
    parse as a URL is replaced whole, since it might be a secret itself.
    """
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparseable url>"
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.hostname or ""
    if parts.port is not None:
        host = f"{host}:{parts.port}"
    netloc = f"{user}:***@{host}"
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))
