"""The request target's one meaning: normal form of paths and hosts, and routes chosen on it.

The property tests state the rule the gateway exists for: whatever a client sends, the route chosen for
the path in normal form is the route a backend would choose for the path it receives, whichever of the
common ways it reads paths (Tomcat/Jetty cutting `;parameters`, Spring also cutting `%3B`, a backend
that percent-decodes twice).
"""

from __future__ import annotations

import re
from urllib.parse import unquote

import pytest
from hypothesis import given
from hypothesis import strategies as st

from apigw.config.model import Route
from apigw.http.errors import GatewayError
from apigw.http.target import BadTarget, Target, normalize_host, normalize_path, parse_target
from apigw.pipeline.handler import _route
from apigw.pipeline.routing import Router

ROUTES = {
    "any": {},
    "admin": {"path_prefix": "/admin"},
    "secure": {"path_prefix": "/secure"},
    "secure-x": {"path_prefix": "/secure/x"},
    "status": {"path": "/open/status"},
    "users": {"path_prefix": "/api/v1/users"},
    "host-admin": {"host": "admin.internal", "path_prefix": "/"},
    "wild": {"host": "*.example.com", "path_prefix": "/"},
    "deep-wild": {"host": "*.eu.example.com", "path_prefix": "/"},
    "exact-host": {"host": "api.example.com", "path_prefix": "/api"},
}


def router() -> Router[str]:
    routes = [Route.model_validate({"name": name, "match": match, "backend": {"service": "s", "url": "http://b"}})
              for name, match in ROUTES.items()]
    return Router([(route, route.name) for route in routes])


ROUTER = router()


@pytest.mark.parametrize(("raw", "normal"), [
    ("/", "/"),
    ("/a/b", "/a/b"),
    ("//secure/x/", "/secure/x/"),
    ("//a///b", "/a/b"),
    ("/a/", "/a/"),
    ("/%61dmin", "/admin"),
    ("/%7euser/%2D", "/~user/-"),
    ("/a%3bb", "/a%3Bb"),
    ("/x%3D1%40y", "/x%3D1%40y"),
    ("/caf%c3%a9", "/caf%C3%A9"),
    ("/%ff%fe", "/%FF%FE"),
    ("/a%20b", "/a%20b"),
    ("/a\"b<c>", "/a%22b%3Cc%3E"),
    ("/.well-known/x", "/.well-known/x"),
    ("/a/...", "/a/..."),
    ("/a/.b./c..", "/a/.b./c.."),
    ("/open;jsessionid=1/x", "/open;jsessionid=1/x"),
])
def test_paths_in_normal_form(raw: str, normal: str) -> None:
    assert normalize_path(raw) == normal


@pytest.mark.parametrize("raw", [
    "/a/../admin", "/a/./b", "/a/..", "/a/.", "/..", "/a/%2e%2e/b", "/a/%2E%2e/b", "/a/.%2e/b", "/a/%2e/b",
    "/open/..;/secure/x", "/open/..;a=b/secure", "/a/.;x/b", "/a/..%3B/b", "/a/%2e%2e%3bx/b",
    "/x/%2fadmin", "/x/%2Fadmin", "/a\\..\\admin", "/a/%5c/b", "/a/%5C", "/a/%00b", "/a%0Ab", "/a%0d%0ab", "/a%7f",
    "/%2561dmin", "/a/%25%32%66", "/a/%zz", "/a/%4", "/a/%",
])
def test_ambiguous_paths_are_refused(raw: str) -> None:
    with pytest.raises(BadTarget):
        normalize_path(raw)


@pytest.mark.parametrize(("header", "host"), [
    ("api.example.com", "api.example.com"),
    ("API.Example.COM", "api.example.com"),
    ("api.example.com:8080", "api.example.com"),
    ("api.example.com.", "api.example.com"),
    ("api.example.com.:443", "api.example.com"),
    ("127.0.0.1:80", "127.0.0.1"),
    ("[::1]:8080", "[::1]"),
    ("[0:0::1]", "[::1]"),
    ("under_score.local", "under_score.local"),
])
def test_hosts_in_normal_form(header: str, host: str) -> None:
    assert normalize_host(header) == host


@pytest.mark.parametrize("header", [
    "", "a b", "api.example.com..", "a..b", ".a", "a:b", "a:", "a:123456", "[::1", "[zz]", "[::1]x", "a/b",
    "a\\b", "a@b", "a%2eb", "-", "x" * 254,
])
def test_invalid_hosts_are_refused(header: str) -> None:
    with pytest.raises(BadTarget) as caught:
        normalize_host(header)
    assert caught.value.error_type == "bad_host"


@pytest.mark.parametrize(("raw", "host_header", "expected"), [
    ("/x?a=1#frag", "h", Target("h", "/x", "a=1")),
    ("/x?a=%20&b=/../", "h", Target("h", "/x", "a=%20&b=/../")),
    ("http://Admin.Internal./admin/x?q=1", "public.example.com", Target("admin.internal", "/admin/x", "q=1")),
    ("HTTPS://api.example.com:8443", "other", Target("api.example.com", "/", "")),
    ("/x", None, Target("", "/x", "")),
])
def test_targets(raw: str, host_header: str | None, expected: Target) -> None:
    assert parse_target(raw, host_header) == expected


@pytest.mark.parametrize("raw", ["*", "example.com:443", "http://user:pw@h/x", "ftp://h/x", "x/y", "http://[::1/x"])
def test_other_target_forms_are_refused(raw: str) -> None:
    with pytest.raises(BadTarget):
        parse_target(raw, "h")


@pytest.mark.parametrize(("host", "path", "expected"), [
    ("admin.internal", "/admin/x", "host-admin"),
    ("other", "/admin/x", "admin"),
    ("a.example.com", "/x", "wild"),
    ("a.b.example.com", "/x", "wild"),
    ("example.com", "/x", "any"),
    ("a.eu.example.com", "/x", "deep-wild"),
    ("eu.example.com", "/x", "wild"),
    ("api.example.com", "/api/x", "exact-host"),
    ("api.example.com", "/other", "wild"),
    ("", "/secure/x/y", "secure-x"),
    ("", "/secure/xy", "secure"),
    ("", "/open/status", "status"),
    ("", "/open/status/", "any"),
])
def test_host_and_path_precedence(host: str, path: str, expected: str) -> None:
    assert ROUTER.match(host, path, "GET") == expected


@pytest.mark.parametrize(("host_header", "expected"), [
    ("admin.internal", "host-admin"), ("ADMIN.INTERNAL", "host-admin"), ("admin.internal:8080", "host-admin"),
    ("admin.internal.", "host-admin"), ("Admin.Internal.:80", "host-admin"), ("x.Example.COM.", "wild"),
])
def test_host_spellings_reach_the_host_bound_route(host_header: str, expected: str) -> None:
    target = parse_target("/admin/x", host_header)
    assert _route(ROUTER, target, "GET") == expected


@pytest.mark.parametrize(("raw", "expected"), [
    ("/api/v1/users/7;jsessionid=1", "users"),  # parameters that change nothing are passed on
    ("/x;a=1/y", "any"),
])
def test_path_parameters_that_keep_the_route_are_allowed(raw: str, expected: str) -> None:
    assert _route(ROUTER, parse_target(raw, "h"), "GET") == expected


@pytest.mark.parametrize("raw", ["/secure;x=1/y", "/admin;/x", "/admin%3B/x", "/api/v1;x/users", "/open/status;x",
                                 "/api/v1/users;jsessionid=1", "/;/admin", "/;/;/secure"])
def test_path_parameters_that_change_the_route_are_refused(raw: str) -> None:
    with pytest.raises(GatewayError) as caught:
        _route(ROUTER, parse_target(raw, "h"), "GET")
    assert (caught.value.status, caught.value.error_type) == (400, "bad_path")


PIECES = ["/", "//", "admin", "secure", "x", "open", "status", "api", "v1", "users", ".", "..", "%2e", "%2E", "%2f",
          "%5c", "\\", ";", "%3b", "%3B", "=", "a", "%61", "%64%6d%69%6e", "dmin", "%25", "61", "%", "%00", "%0a",
          "%C3%A9", "é", "%7e", "~", " ", "%20", "@", ":"]
targets = st.lists(st.sampled_from(PIECES), max_size=12).map(lambda parts: "/" + "".join(parts))


def _dot_segments_resolved(path: str) -> str:
    out: list[str] = []
    for segment in path.split("/"):
        if segment in ("", "."):
            continue
        if segment == "..":
            if out:
                out.pop()
            continue
        out.append(segment)
    return "/" + "/".join(out) + ("/" if path.endswith("/") and out else "")


def tomcat(path: str) -> str:
    """Cut `;params` from each segment, then decode, then resolve `.`, `..` and `//`."""
    return _dot_segments_resolved(unquote("/".join(s.split(";", 1)[0] for s in path.split("/"))))


def spring(path: str) -> str:
    """Decode first (so `%3B` is a `;` too), then cut parameters, then resolve."""
    decoded = unquote(path)
    return _dot_segments_resolved("/".join(s.split(";", 1)[0] for s in decoded.split("/")))


def double_decoding(path: str) -> str:
    return _dot_segments_resolved(unquote(unquote(path)))


@given(targets, st.sampled_from(["h", "admin.internal", "a.example.com", "api.example.com"]))
def test_the_backend_routes_what_it_receives_as_the_gateway_did(raw: str, host: str) -> None:
    try:
        target = parse_target(raw, host)
        chosen = _route(ROUTER, target, "GET")
    except (BadTarget, GatewayError):
        return  # refused: nothing reaches a backend
    for backend_reading in (tomcat, spring, double_decoding):
        assert ROUTER.match(target.host, backend_reading(target.path), "GET") == chosen, backend_reading.__name__


_NORMAL = re.compile(r"(/([A-Za-z0-9\-._~!$&'()*+,;=:@]|%[0-9A-F]{2})*)+")


@given(st.text(max_size=40).map(lambda text: "/" + text))
def test_any_text_is_refused_or_normal_and_stays_so(raw: str) -> None:
    try:
        normal = normalize_path(raw)
    except BadTarget:
        return
    assert _NORMAL.fullmatch(normal), normal
    assert "//" not in normal
    assert normalize_path(normal) == normal
