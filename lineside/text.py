"""Text that lineside logs, prints, saves or publishes: always valid UTF-8, never a secret.

File names on Linux are bytes. Python hands a name that is not UTF-8 (a Latin-1 name
from a Windows share, say) over as a str holding lone surrogates ('caf\\udce9.png'),
which every UTF-8 encoder refuses: SQLite, MQTT, OPC UA, the terminal. `printable()`
turns such text into valid UTF-8 once, where it enters a record, keeping the raw bytes
recoverable as backslash escapes ('caf\\xe9.png'), so that no output can fail on it.

URLs given on the command line (an RTSP camera, the MQTT broker) may hold a user and a
password; `redact_url()` is what every message and record shows of them.
"""

from __future__ import annotations

import re
from urllib.parse import urlsplit, urlunsplit


def printable(text) -> str:
    """`text` as a str that encodes to UTF-8: lone surrogates (bytes that were not UTF-8)
    become backslash escapes of those bytes; anything not a str is str()-ed first."""
    if not isinstance(text, str):
        text = str(text)
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        pass
    try:     # the bytes that os.fsdecode() turned into surrogates, shown as \xNN
        return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:    # surrogates from elsewhere (a JSON \ud800 escape): \udNNN
        return text.encode("utf-8", "backslashreplace").decode("utf-8")


def printable_or_none(text) -> str | None:
    return None if text is None else printable(text)


_USERINFO = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)(?P<user>[^/@\s:]*)(:[^/\s]*)?@")


def redact_url(text: str) -> str:
    """A URL (or any text holding URLs) with each password replaced by '***':
    'rtsp://cam:secret@10.0.0.5/stream' -> 'rtsp://cam:***@10.0.0.5/stream'."""
    text = printable(text)
    try:
        parts = urlsplit(text)
        if parts.password is not None and "://" in text and " " not in text:
            host = parts.netloc.rpartition("@")[2]
            return urlunsplit(parts._replace(netloc=f"{parts.username}:***@{host}"))
    except ValueError:
        pass
    return _USERINFO.sub(lambda m: f"{m['scheme']}{m['user']}{':***' if m.group(3) else ''}@", text)
