"""The request target, parsed once: the host and path that routing matches are the host and path the
backend is told about, so a backend can never understand a request differently from how it was routed.

Normal form of a path (what routing matches and what the backend receives, the same string):
- percent-encoded unreserved characters (`A-Z a-z 0-9 - . _ ~`) are decoded (`/%61dmin` is `/admin`);
  every other percent-encoding stays as the client sent it, in upper-case hex (`%3b` becomes `%3B`), and
  characters a path may not hold raw are encoded;
- empty segments collapse (`//a//b/` is `/a/b/`);
- refused: `.` and `..` segments in any spelling (`%2e%2E`, `..;x`), encoded `/` and `\\`, a raw `\\`, NUL
  and other control characters, double encoding (`%2561`), and malformed escapes (`%zz`).
Path parameters (`;`, `%3B`) stay in the path; the pipeline refuses a path whose route would change
were they removed, as Tomcat, Jetty and Spring remove them.

Hosts are lower-cased, lose their port and one trailing dot, and must be a DNS name, an IPv4 address or
a bracketed IPv6 address. An absolute-form target (`GET http://host/path`) names the host itself, and
the Host header is then ignored (RFC 9112 §3.2.2).
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from functools import lru_cache

UNRESERVED = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")

_PLAIN_PATH = re.compile(r"(?:/[A-Za-z0-9\-_~!$&'()*+,=:@][A-Za-z0-9\-._~!$&'()*+,=:@]*)*/?").fullmatch
"""Paths already in normal form with nothing to look at: no escapes, no `;`, no segment starting with a dot."""
_PATH_CHARS = re.compile(r"%(?P<hex>[0-9A-Fa-f]{2})?|(?P<raw>[^A-Za-z0-9\-._~!$&'()*+,;=:@%])")
"""Per segment: an escape (or a `%` that starts none), or a character a path may not hold raw."""
_TWICE = re.compile(r"%25[0-9A-Fa-f]{2}").search
"""In normal form: a `%` escaped before hex digits, which a backend decoding twice reads as another escape."""
_PARAMS = re.compile(r";|%3B")
_ABSOLUTE = re.compile(r"[Hh][Tt][Tt][Pp][Ss]?://(?P<authority>[^/?#]*)(?P<rest>.*)", re.DOTALL)
_HOST_NAME = re.compile(r"[a-z0-9_](?:[-a-z0-9_]{0,62})(?:\.[a-z0-9_](?:[-a-z0-9_]{0,62}))*").fullmatch
_PORT = re.compile(r"\d{1,5}").fullmatch


class BadTarget(ValueError):
    """A request target, path or host that could mean different things to the gateway and a backend."""

    def __init__(self, message: str, error_type: str = "bad_path"):
        super().__init__(message)
        self.error_type = error_type


@dataclass(frozen=True, slots=True)
class Target:
    host: str
    """Normal form; empty when an HTTP/1.0 request named none."""
    path: str
    """Normal form: what routing matches and what the backend receives."""
    query: str
    """As the client sent it, without `?`; a fragment is the client's own and is dropped."""

    def without_parameters(self) -> str | None:
        """The path as Tomcat, Jetty and Spring see it, with `;params` cut from every segment; None when
        it has none."""
        if ";" not in self.path and "%3B" not in self.path:
            return None
        return _joined([_PARAMS.split(segment, 1)[0] for segment in self.path.split("/")[1:]])


def parse_target(raw: str, host_header: str | None) -> Target:
    """The origin-form (`/path?query`) or absolute-form (`http://host/path?query`) target of a request.
    Asterisk and authority forms are the caller's to handle (they route nowhere)."""
    raw = raw.partition("#")[0]
    absolute = _ABSOLUTE.fullmatch(raw) if not raw.startswith("/") else None
    if absolute is not None:
        authority, raw = absolute["authority"], absolute["rest"] or "/"
        if "@" in authority:
            raise BadTarget("the request target carries user information (user@host)", "bad_target")
        host = normalize_host(authority)
    elif raw.startswith("/"):
        host = normalize_host(host_header) if host_header is not None else ""
    else:
        raise BadTarget("the request target is neither a path (/...) nor an absolute URL (http://...)", "bad_target")
    path, _, query = raw.partition("?")
    return Target(host, normalize_path(path), query)


def normalize_path(raw: str) -> str:
    """`raw` (starting with `/`) in normal form (see the module's docstring), or BadTarget."""
    if _PLAIN_PATH(raw):
        return raw
    segments = [_PATH_CHARS.sub(_normal_char, segment) for segment in raw.split("/")[1:]]
    for segment in segments:
        if _TWICE(segment):
            raise BadTarget("the path is percent-encoded twice (%25XX)")
        if _PARAMS.split(segment, 1)[0] in (".", ".."):
            raise BadTarget("the path has a . or .. segment")
    return _joined(segments)


def _joined(segments: list[str]) -> str:
    """`/`-joined, without empty segments but a last one (`//a//b/` is `/a/b/`)."""
    last = len(segments) - 1
    return "/" + "/".join(segment for index, segment in enumerate(segments) if segment or index == last)


def _normal_char(found: re.Match[str]) -> str:
    raw = found["raw"]
    if raw is not None:
        if raw == "\\" or raw < " " or raw == "\x7f":
            raise BadTarget("the path has a backslash or a control character")
        return "".join(f"%{byte:02X}" for byte in raw.encode("utf-8", "surrogateescape"))
    hex_digits = found["hex"]
    if hex_digits is None:
        raise BadTarget("the path has a % that starts no percent-encoding")
    byte = int(hex_digits, 16)
    char = chr(byte)
    if char in UNRESERVED:
        return char
    if char in "/\\" or byte < 0x20 or byte == 0x7F:
        raise BadTarget("the path has an encoded slash, backslash or control character")
    return f"%{byte:02X}"


@lru_cache(maxsize=4096)
def normalize_host(value: str) -> str:
    """`value` (a Host header or an absolute target's authority) in normal form, or BadTarget."""
    name, port = value, None
    if value.startswith("["):
        literal, bracket, after = value[1:].partition("]")
        if not bracket:
            raise BadTarget(f"host {value!r} is not a valid host name", "bad_host")
        if after:
            if not after.startswith(":"):
                raise BadTarget(f"host {value!r} is not a valid host name", "bad_host")
            port = after[1:]
        try:
            address = ipaddress.IPv6Address(literal)
        except ValueError:
            raise BadTarget(f"host {value!r} is not a valid IPv6 address", "bad_host") from None
        name = f"[{address.compressed}]"
    else:
        if ":" in value:
            name, port = value.rsplit(":", 1)
        name = name.lower().removesuffix(".")
        if not _HOST_NAME(name) or len(name) > 253:
            raise BadTarget(f"host {value!r} is not a valid host name", "bad_host")
    if port is not None and not _PORT(port):
        raise BadTarget(f"host {value!r} has an invalid port", "bad_host")
    return name
