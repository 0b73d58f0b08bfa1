"""Keep credentials out of logs, CLI output, metric labels, task results and error messages."""

from __future__ import annotations

from urllib.parse import urlsplit, urlunsplit


def redact_url(url: str) -> str:
    """Return ``url`` with any password replaced by ``***`` (user names are kept).

    ``redis://user:secret@host:6379/0`` → ``redis://user:***@host:6379/0``. A string that does not
    parse as a URL is replaced whole, since it might be a secret itself. When an ``@`` sits outside
    the parsed user-info (a password with an unencoded ``/``, ``?`` or ``#`` splits the URL in the
    wrong place), everything before the last ``@`` is masked: nothing is guessed.
    """
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        return "<unparseable url>"
    scheme, sep, rest = url.partition("://")
    if sep and "@" in rest and "@" not in parts.netloc:
        return f"{scheme}://***@{rest.rpartition('@')[2]}"
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.hostname or ""
    if ":" in host:  # IPv6 literal
        host = f"[{host}]"
    if port is not None:
        host = f"{host}:{port}"
    netloc = f"{user}:***@{host}"
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))
