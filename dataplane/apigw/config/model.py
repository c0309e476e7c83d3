"""The gateway config model: the single source of truth for the config file format.

The data plane loads it, `gateway -validate-config` checks it, and the operator renders and validates
routes with it. Every model forbids unknown keys so that a typo is an error, not a silent default.
Cross-references (policy names, duplicate names, conflicting matches) are checked in `loader`, where
each route's file is known. Settings the data plane cannot apply live are annotated `RESTART`.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from ipaddress import ip_network
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import (
    AfterValidator,
    AnyHttpUrl,
    BaseModel,
    BeforeValidator,
    ByteSize,
    ConfigDict,
    Field,
    IPvAnyNetwork,
    PositiveInt,
    PrivateAttr,
    field_validator,
    model_validator,
)
from redis.connection import parse_url

from apigw.http.headers import set_by_gateway
from apigw.http.target import BadTarget, normalize_host, normalize_path

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*$")
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}


def parse_duration(value: Any) -> Any:
    """`500ms`, `30s`, `1m`, `1h` or a bare number of seconds, to float seconds."""
    if isinstance(value, bool):
        raise ValueError("expected a duration such as 500ms, 30s or 1m")
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        match = _DURATION.match(value)
        if match:
            return float(match.group(1)) * _UNIT_SECONDS[match.group(2)]
    raise ValueError(f"expected a duration such as 500ms, 30s or 1m, got {value!r}")


_SIZE = re.compile(r"^\s*(\d*\.?\d+)\s*(\w+)?\s*$")


def whole_size(value: Any) -> Any:
    """A size text must be a size and nothing more: pydantic's ByteSize reads `10MiB junk` as 10 MiB."""
    if isinstance(value, str) and not _SIZE.match(value):
        raise ValueError(f"expected a size such as 1048576, 512KiB or 10MiB, got {value!r}")
    return value


Size = Annotated[ByteSize, BeforeValidator(whole_size)]
Duration = Annotated[float, BeforeValidator(parse_duration), Field(ge=0)]
PositiveDuration = Annotated[float, BeforeValidator(parse_duration), Field(gt=0)]
Name = Annotated[str, Field(pattern=r"^[a-z0-9]([-a-z0-9_.]{0,61}[a-z0-9])?$")]
"""Route, policy and backend names: they become metric labels and Kubernetes object names."""


@dataclass(frozen=True)
class RestartRequired:
    """Marks a setting the data plane cannot apply live; `view` picks what of it matters."""

    view: Any = None

    def of(self, value: Any) -> Any:
        return self.view(value) if self.view else value


RESTART = RestartRequired()


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class HTTPMethod(StrEnum):
    GET = "GET"
    HEAD = "HEAD"
    POST = "POST"
    PUT = "PUT"
    PATCH = "PATCH"
    DELETE = "DELETE"
    OPTIONS = "OPTIONS"


class FailureMode(StrEnum):
    fail_open = "fail_open"
    fail_closed = "fail_closed"


# --- global settings (config.yaml, owned by people) ---------------------------------------------


class TLSFiles(Strict):
    cert_file: Path
    key_file: Path


class ListenConfig(Strict):
    address: Annotated[str, RESTART] = "0.0.0.0"
    port: Annotated[int, RESTART, Field(ge=1, le=65535)] = 8080
    tls_port: Annotated[int, RESTART, Field(ge=1, le=65535)] = 8443
    metrics_port: Annotated[int, RESTART, Field(ge=1, le=65535)] = 9090
    workers: Annotated[int, RESTART, Field(ge=1, le=64)] = 1
    """Processes serving the traffic port together (`gateway --workers N` overrides): one per core."""
    server_header: Annotated[str, Field(pattern=r"^[!-~]+( [!-~]+)*$", max_length=64)] | None = None
    """The `Server` header of the responses the gateway makes; none: no Server header (a backend's own
    is passed through). Never aiohttp's `Python/x aiohttp/y` banner."""
    tls: Annotated[TLSFiles | None, RestartRequired(lambda tls: tls is not None)] = None
    """TLS on `tls_port` when set. Turning it on or off needs a restart; new files do not."""
    drain_delay: Duration = 0.0
    """After SIGTERM, keep serving (while reporting not-ready) this long so load balancers notice."""
    drain_timeout: Duration = 30.0
    """After that, how long in-flight requests may take to finish."""
    idle_timeout: PositiveDuration = 60.0
    """A client connection with no request under way (a new one that sends nothing too) is closed after
    this long; applies to connections opened after a reload."""
    request_head_timeout: PositiveDuration = 10.0
    """From the first byte of a request's head to its last: a slower client is cut off (408). Also the TLS
    port's handshake bound, which keeps its value from start until a restart."""
    request_body_timeout: PositiveDuration = 30.0
    """The longest wait for the next piece of a request body (408 `client_body_timeout`)."""
    trusted_proxies: list[IPvAnyNetwork] = []
    """Peers (CIDRs) whose X-Forwarded-For, X-Forwarded-*, Forwarded and X-Real-IP headers are believed:
    the client IP is the rightmost X-Forwarded-For entry that is not itself a trusted proxy. From any
    other peer those headers are dropped and the client IP is the peer's address."""
    headers_with_underscores: Literal["drop", "reject"] = "drop"
    """`X_User_Id` is `X-User-Id` to CGI, PHP and WSGI backends: such headers are dropped, or refused (400)."""
    trust_client_request_id: bool = False
    """Keep an X-Request-ID sent by any client; by default only trusted proxies' are kept."""


class LimitsConfig(Strict):
    max_body_size: Size = ByteSize(10 * 1024 * 1024)
    """Default request body limit; a route may set its own."""
    max_request_head_size: Annotated[Size, Field(ge=1024)] = ByteSize(64 * 1024)
    """Request line and headers together (431 `headers_too_large` above it): what backends must accept."""


class LoggingConfig(Strict):
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    access_log: bool = True
    access_log_sample: Annotated[float, Field(gt=0, le=1, strict=True)] = 1.0
    """The share of requests whose access line is written, drawn at random per request (0.01: one in a
    hundred), for very high rates; errors (status 400 and above, or an error seen by the gateway) are
    always written. Metrics count every request either way."""


class RedisConfig(Strict):
    url: str = "redis://127.0.0.1:6379/0"
    """`redis://`, `rediss://`, `unix://`, or Redis Sentinel: `redis+sentinel://[user:password@]host:26379[,host:26379
    ...]/master-name[/db]` (`rediss+sentinel://`: TLS to the sentinels and to Redis)."""
    sentinel_password: str | None = None
    """The sentinels' own password (`requirepass` in sentinel.conf); the URL's credentials are Redis's."""
    pool_size: PositiveInt = 50
    timeout: PositiveDuration = 0.1
    """Bound on every Redis call: a dead or paused Redis never holds a request longer."""
    connect_timeout: PositiveDuration = 0.2

    @field_validator("url")
    @classmethod
    def _redis_url(cls, url: str) -> str:
        """Parsed as the client will parse it, so a bad port or host is an error here, not at start."""
        scheme = url.partition("://")[0].lower()
        if "cluster" in scheme:
            raise ValueError(
                "Redis Cluster is not supported: each script call checks the keys of many clients and policies "
                "at once, and Cluster runs a script only on keys of one hash slot; use Redis Sentinel "
                "(redis+sentinel://) for high availability"
            )
        if not url.startswith(("redis://", "rediss://", "unix://", *SENTINEL_SCHEMES)):
            raise ValueError("must start with redis://, rediss://, unix://, redis+sentinel:// or rediss+sentinel://")
        try:
            params = _parse_redis_url(url)
        except ValueError as exc:
            raise ValueError(f"not a valid Redis URL: {_url_error(url, exc)}") from None
        unknown = sorted(set(params) - REDIS_URL_PARTS - REDIS_URL_OPTIONS)
        if unknown:
            supported = ", ".join(sorted(REDIS_URL_OPTIONS))
            raise ValueError(f"URL option {unknown[0]!r} is not supported (supported: {supported})")
        return url

    @model_validator(mode="after")
    def _sentinel_password_needs_sentinels(self) -> RedisConfig:
        if self.sentinel_password is not None and self.sentinel() is None:
            raise ValueError("sentinel_password is set but redis.url names no sentinels (redis+sentinel://...)")
        return self

    def sentinel(self) -> SentinelTarget | None:
        """The sentinels and master name of a `redis+sentinel://` URL; None for a plain Redis URL."""
        return sentinel_target(self.url) if self.url.startswith(SENTINEL_SCHEMES) else None


def _parse_redis_url(url: str) -> dict[str, Any]:
    """redis-py's reading of `url`, or ValueError also where it would pass over a path that is not a
    database number (as `redis://:6380/pw@host` is: the port 6380 of no host, the rest of the password a
    path), or a sentinel's master name holding `@` (the rest of a password holding `/`)."""
    if url.startswith(SENTINEL_SCHEMES):
        target = sentinel_target(url)
        if "@" in target.master_name:
            raise ValueError("the master name holds '@'")
        return parse_url(target.url)
    if not url.startswith("unix://") and not re.fullmatch(r"/?\d*", urlsplit(url).path):
        raise ValueError("the path must be the database number (redis://host:6379/0)")
    return parse_url(url)


def _url_error(url: str, exc: ValueError) -> str:
    """What is wrong with `url`, without its credentials: the parsers quote what they took for a port or
    a host, which is part of the password when the password holds an unencoded `/`, `?` or `#`."""
    scheme, _, rest = url.partition("://")
    _, at, address = rest.rpartition("@")
    if not at:
        return str(exc)
    try:
        _parse_redis_url(f"{scheme}://{address}")
    except ValueError as without_credentials:
        return str(without_credentials)
    return "the user name or password is not URL-encoded (write '/', '?', '#' and '@' in it as %2F, %3F, %23, %40)"


REDIS_URL_PARTS = frozenset({"host", "port", "path", "db", "username", "password", "connection_class"})
REDIS_URL_OPTIONS = frozenset({"ssl_cert_reqs", "ssl_ca_certs", "ssl_certfile", "ssl_keyfile", "ssl_check_hostname"})
"""What `?name=value` may set in `redis.url`: TLS for rediss:// (timeouts and pool size are settings of their own)."""
SENTINEL_SCHEMES = ("redis+sentinel://", "rediss+sentinel://")


@dataclass(frozen=True)
class SentinelTarget:
    sentinels: tuple[tuple[str, int], ...]
    master_name: str
    url: str
    """A plain Redis URL with the credentials, database and TLS options for the master (its host and port
    are the first sentinel's: the master's own come from the sentinels)."""


def sentinel_target(url: str) -> SentinelTarget:
    """`redis+sentinel://[user:password@]host[:26379][,host[:26379]...]/master-name[/db][?tls options]`."""
    scheme, _, rest = url.partition("://")
    rest, query_mark, query = rest.partition("?")
    netloc, _, path = rest.partition("/")
    userinfo, at, hosts = netloc.rpartition("@")
    sentinels = tuple(_host_port(item.strip()) for item in hosts.split(","))
    master_name, _, db = path.strip("/").partition("/")
    if not master_name:
        raise ValueError("the master name is missing: redis+sentinel://host:26379/<master-name>[/db]")
    if db and not db.isdigit():
        raise ValueError(f"the database after the master name must be a number, got {db!r}")
    host, port = sentinels[0]
    address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    plain = scheme.removesuffix("+sentinel")
    return SentinelTarget(sentinels, master_name, f"{plain}://{userinfo}{at}{address}/{db or 0}{query_mark}{query}")


def _host_port(item: str) -> tuple[str, int]:
    """`host`, `host:port` or `[v6]:port`, the port 26379 when left out."""
    host, port = item, "26379"
    if item.startswith("["):
        host, _, tail = item[1:].partition("]")
        port = tail.removeprefix(":") or port
    elif ":" in item:
        host, _, port = item.rpartition(":")
    if not host:
        raise ValueError(f"a sentinel address has no host: {item!r}")
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"a sentinel port must be 1-65535, got {port!r}")
    return host, int(port)


class JWTKey(Strict):
    file: Path
    """A PEM public key (RSA, EC or Ed25519), reloaded when the file changes."""
    kid: str | None = None
    """Tokens whose header names this `kid` are checked with this key only."""


class RevocationConfig(Strict):
    enabled: bool = True
    failure_mode: FailureMode = FailureMode.fail_open
    """What a Redis error during the revocation check does to the request."""


_WORD = re.compile(r'[!#-\[\]-~]+').fullmatch
"""Printable ASCII without spaces, quotes or backslashes: claim names and scopes (RFC 6749 3.3)."""


class AuthConfig(Strict):
    keys: list[JWTKey] = []
    jwks_file: Path | None = None
    algorithms: list[Literal["RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA"]] = [
        "RS256",
        "ES256",
        "EdDSA",
    ]
    issuer: str | None = None
    audience: str | None = None
    """Without it, tokens minted for any service are accepted (logged as a warning at start and reload)."""
    required_claims: list[str] = ["exp"]
    """Claims every token must carry (else 401 `missing_claim`); `[]` accepts tokens that never expire."""
    clock_skew: Duration = 30.0
    revocation: RevocationConfig = Field(default_factory=RevocationConfig)
    forward_claims: dict[str, Annotated[str, Field(pattern=r"^[A-Za-z0-9-]+$")]] = {}
    """Claim name -> request header carrying it to the backend (client-sent copies are stripped)."""
    cache_size: Annotated[int, Field(ge=0)] = 10_000

    @field_validator("required_claims", "forward_claims")
    @classmethod
    def _claim_names(cls, names: list[str] | dict[str, str]) -> Any:
        """Names appear in the 401's WWW-Authenticate header: printable ASCII, no space, quote or backslash."""
        for name in names:
            if not _WORD(name):
                raise ValueError(f"{name!r} is not a claim name (printable ASCII without spaces, quotes or backslashes)")
        return names

    @field_validator("forward_claims")
    @classmethod
    def _forward_headers_of_their_own(cls, headers: dict[str, str]) -> dict[str, str]:
        taken = [f"{claim} -> {header}" for claim, header in headers.items() if set_by_gateway(header)]
        if taken:
            raise ValueError(
                f"{', '.join(taken)}: the gateway strips or sets these headers itself (hop-by-hop, framing, Host, "
                "X-Forwarded-*, X-Request-ID...); forward each claim in a header of its own, such as X-User-Id"
            )
        return headers


class RateLimitSettings(Strict):
    enabled: bool = True
    failure_mode: FailureMode = FailureMode.fail_open
    """What a Redis error or timeout does: fail_open lets the request through, fail_closed answers 503."""


class BreakerSettings(Strict):
    consecutive_failures: PositiveInt = 5
    error_ratio: Annotated[float, Field(gt=0, le=1)] = 0.5
    window: PositiveDuration = 30.0
    min_requests: PositiveInt = 20
    open_duration: PositiveDuration = 30.0
    half_open_probes: PositiveInt = 1


# --- routes and policies (routes.yaml, owned by the operator) -----------------------------------


class LimitKey(Strict):
    type: Literal["client_ip", "header", "claim"] = "client_ip"
    name: str | None = None
    """The header or JWT claim name, for those types."""

    @model_validator(mode="after")
    def _name_matches_type(self) -> LimitKey:
        if self.type == "client_ip" and self.name is not None:
            raise ValueError("key type client_ip takes no name")
        if self.type != "client_ip" and not self.name:
            raise ValueError(f"key type {self.type} needs a name")
        return self


class Policy(Strict):
    name: Name
    requests: PositiveInt
    period: PositiveDuration
    burst: Annotated[int, Field(ge=0)] = 0
    """Extra requests allowed at once on top of the steady rate."""
    key: LimitKey = Field(default_factory=LimitKey)

    @model_validator(mode="after")
    def _within_the_limiter(self) -> Policy:
        """The limiter counts whole microseconds, in Redis in doubles (exact to 2^53) and 64-bit replies."""
        if self.requests > self.period * 1_000_000:
            raise ValueError("more than one request a microsecond (requests / period) is finer than the limiter counts")
        if (self.requests + self.burst) * self.period / self.requests > MAX_REFILL:
            raise ValueError("a bucket that takes more than 100 years to refill ((requests + burst) * period / "
                             "requests) is more than the limiter keeps")
        return self


MAX_REFILL = 100 * 365 * 86400
"""Seconds: a bucket's TAT stays exact in the script's doubles (2^53 microseconds from 1970) to the 2140s."""


def _normal_path(value: str, what: str = "") -> str:
    """A path a route names must be in the normal form requests are matched in (see `apigw.http.target`)."""
    if not value.startswith("/"):
        raise ValueError(f"{what}must start with /")
    try:
        normal = normalize_path(value)
    except BadTarget as exc:
        raise ValueError(f"{what}is not a usable path: {exc}") from None
    if ";" in normal or "%3B" in normal:
        raise ValueError(f"{what}must not hold path parameters (;)")
    if normal != value:
        raise ValueError(f"{what}must be written in normal form: {normal!r}")
    return value


RoutePath = Annotated[str, Field(max_length=1024)]


def _host_pattern(value: str) -> str:
    """In the normal form requests' hosts are matched in: lower-case, no trailing dot, no port."""
    wildcard = value.startswith("*.")
    try:
        host = normalize_host(value[2:] if wildcard else value)
    except BadTarget:
        raise ValueError(f"{value!r} is not a host name (exact, or *.example.com)") from None
    if host != value.lower().removeprefix("*.").removesuffix(".") or host.startswith("["):
        raise ValueError(f"{value!r} is not a host name (exact, or *.example.com); requests are matched "
                         "by host without their port")
    return f"*.{host}" if wildcard else host


HostPattern = Annotated[str, Field(max_length=255), AfterValidator(_host_pattern)]


class RouteMatch(Strict):
    host: Annotated[str, Field(max_length=255)] | None = None
    """Exact host, or `*.example.com` for any subdomain. Absent: any host."""
    path_prefix: RoutePath | None = None
    path: RoutePath | None = None
    """Exact path. Give either `path` or `path_prefix`; neither means prefix `/`."""
    methods: list[HTTPMethod] = []
    """Empty: any method."""

    @field_validator("path_prefix", "path")
    @classmethod
    def _absolute(cls, value: str | None) -> str | None:
        return None if value is None else _normal_path(value)

    @field_validator("host")
    @classmethod
    def _host(cls, value: str | None) -> str | None:
        return None if value is None else _host_pattern(value)

    @model_validator(mode="after")
    def _one_path_kind(self) -> RouteMatch:
        if self.path is not None and self.path_prefix is not None:
            raise ValueError("give either path or path_prefix, not both")
        return self


class RetrySettings(Strict):
    """Retries of idempotent requests (GET, HEAD, OPTIONS, PUT, DELETE), bounded by a retry budget."""

    max_retries: Annotated[int, Field(ge=0)] = 1
    """Attempts after the first; 0 turns retries off. A connection that failed before any byte of the
    request was sent is retried; a backend status only if `on_statuses` lists it."""
    on_statuses: list[Annotated[int, Field(ge=400, le=599)]] = []
    """Backend statuses retried as well, e.g. [503]."""
    budget_ratio: Annotated[float, Field(ge=0, le=1)] = 0.2
    """Retries may add at most this share to the backend's requests of the last 10 seconds..."""
    min_retries_per_second: Annotated[int, Field(ge=0)] = 3
    """...plus this many per second, so that a backend with little traffic can still be retried."""


class BackendTLS(Strict):
    """How an `https://` backend is checked, and how the gateway proves who it is to it."""

    ca_file: Path | None = None
    """PEM bundle the backend's certificate must chain to; none: the system's CAs."""
    server_name: str | None = None
    """The name sent as SNI and checked against the certificate; none: the URL's host."""
    cert_file: Path | None = None
    """The gateway's client certificate (PEM), for backends that ask for one; with `key_file`."""
    key_file: Path | None = None

    def files(self) -> list[Path]:
        """Those given: read into the backend's TLS context, and watched for renewals."""
        return [file for file in (self.ca_file, self.cert_file, self.key_file) if file is not None]

    @model_validator(mode="after")
    def _cert_with_key(self) -> BackendTLS:
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("give cert_file and key_file together")
        return self


class Backend(Strict):
    service: Name
    """The backend's name in metrics and logs (`backend_service`), and its circuit breaker's key."""
    url: AnyHttpUrl
    timeout: PositiveDuration = 30.0
    """The route's longest wait for the backend: for the response headers, and for each chunk of its body."""
    attempt_timeout: PositiveDuration | None = None
    """The route's bound on one attempt, from sending it to the response's last byte (a backend that
    trickles never outlasts it); none: only `request_timeout` bounds it."""
    request_timeout: PositiveDuration = 300.0
    """The route's bound on the whole request, every attempt and the response's body included."""
    connect_timeout: PositiveDuration = 5.0
    max_connections: PositiveInt = 1024
    """Connections open to this backend at most (per gateway process)..."""
    max_pending: Annotated[int, Field(ge=0)] = 1024
    """...and requests waiting for one of them at most; beyond, 503 `upstream_overflow` at once."""
    tls: BackendTLS | None = None
    """For `https://` URLs: CA bundle, SNI name, client certificate."""
    circuit_breaker: BreakerSettings | None = None
    """Replaces the global `circuit_breaker` settings for this backend (settings left out take their
    defaults, not the global values). Routes sharing the service must agree on it."""
    retries: RetrySettings = Field(default_factory=RetrySettings)
    """Routes sharing the service must agree on it: the retry budget is the backend's."""

    @model_validator(mode="after")
    def _tls_for_https(self) -> Backend:
        if self.tls is not None and self.url.scheme != "https":
            raise ValueError("tls settings need an https:// url")
        return self

    @field_validator("url")
    @classmethod
    def _no_credentials(cls, url: AnyHttpUrl) -> AnyHttpUrl:
        """user:password@ would travel in every request's Host header; backends that need credentials
        get them from the client's headers."""
        if url.username or url.password:
            raise ValueError("must not carry credentials (user:password@)")
        return url


class RouteAuth(Strict):
    required: bool = True
    scopes: list[str] = []
    """Every one of these must be in the token's `scope`/`scp` claim (else 403)."""

    @field_validator("scopes")
    @classmethod
    def _scope_names(cls, scopes: list[str]) -> list[str]:
        """A scope as RFC 6749 3.3 spells one: `""` or `"read write"` no token could hold, and `""` would
        be granted by a `scope` claim with a stray space."""
        for scope in scopes:
            if not _WORD(scope):
                raise ValueError(f"{scope!r} is not a scope (printable ASCII without spaces, quotes or backslashes; "
                                 "list each scope a route needs as an item of its own)")
        return scopes

    @model_validator(mode="after")
    def _scopes_need_a_token(self) -> RouteAuth:
        if self.scopes and not self.required:
            raise ValueError("scopes with required: false let a request without a token in while a token without "
                             "the scopes is refused; set required: true, or remove scopes")
        return self


class Route(Strict):
    name: Name
    enabled: bool = True
    match: RouteMatch = Field(default_factory=RouteMatch)
    backend: Backend
    rewrite_prefix: RoutePath | None = None
    """Replaces the matched path prefix before the request goes to the backend."""
    auth: RouteAuth | None = None
    ratelimit: Name | None = None
    """The name of a policy under `policies`."""
    max_body_size: Size | None = None

    @model_validator(mode="after")
    def _rewrite_needs_prefix(self) -> Route:
        if self.rewrite_prefix is not None and self.match.path_prefix is None and self.match.path is None:
            raise ValueError("rewrite_prefix needs match.path_prefix or match.path")
        if self.rewrite_prefix is not None:
            _normal_path(self.rewrite_prefix, "rewrite_prefix ")
        return self


# --- ownership (config.yaml, owned by the platform team; read by the operator) ------------------

NamespaceName = Annotated[str, Field(pattern=r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")]


class NamespaceSelector(Strict):
    """Namespaces by name, or by labels (every label given must match, like a `matchLabels` selector)."""

    names: list[NamespaceName] = []
    labels: dict[str, str] = {}

    @model_validator(mode="after")
    def _one_way(self) -> NamespaceSelector:
        if bool(self.names) == bool(self.labels):
            raise ValueError("give either names or labels")
        return self

    def selects(self, name: str, labels: Mapping[str, str]) -> bool:
        if self.names:
            return name in self.names
        return all(labels.get(key) == value for key, value in self.labels.items())


class RouteGrant(Strict):
    """GatewayRoutes in these namespaces may claim these hosts and paths (the Gateway API's
    `allowedRoutes` and listener `hostnames`)."""

    namespaces: NamespaceSelector
    hostnames: list[HostPattern] = []
    """Exact, or `*.example.com` for any subdomain. Empty: any host, and routes without `match.host`."""
    path_prefixes: list[Annotated[RoutePath, AfterValidator(_normal_path)]] = []
    """Routes' paths and path prefixes must lie under one of these (whole segments). Empty: any path."""


class PolicyGrant(Strict):
    """GatewayRoutes in `from` may refer to RateLimitPolicies of `namespace` as `namespace/name` (the
    Gateway API's ReferenceGrant)."""

    from_: NamespaceSelector = Field(alias="from")
    namespace: NamespaceName
    policies: list[Name] = []
    """Empty: every policy in `namespace`."""


DEFAULT_DENIED_BACKEND_NETWORKS = [
    ip_network(network) for network in (
        "127.0.0.0/8", "::1/128",  # the gateway pod's own ports (metrics, health, sidecars)
        "169.254.0.0/16", "fe80::/10",  # link-local: the AWS, GCP and Azure metadata endpoints (169.254.169.254)
        "0.0.0.0/32", "::/128",  # unspecified: Linux connects them to loopback
        "fd00:ec2::254/128",  # AWS's IPv6 metadata endpoint
    )
]


class Ownership(Strict):
    """Which namespaces' GatewayRoutes may claim which hosts and paths, and use which policies; and
    which networks their backends may not reach."""

    routes: list[RouteGrant] | None = None
    """Absent: every namespace may claim any host and path (as before ownership existed). A list, even
    empty: only the namespaces it selects may attach routes, each within its grants."""
    policy_references: list[PolicyGrant] = []
    """A route may always use the policies of its own namespace; another namespace's only if granted."""
    denied_backend_networks: list[IPvAnyNetwork] = Field(default_factory=DEFAULT_DENIED_BACKEND_NETWORKS.copy)
    """Networks (CIDRs) the backends of routes from routes.yaml (tenants' GatewayRoutes) may not reach: the
    gateway resolves the backend's host for each new connection and connects only to an address outside
    them (else 502 `backend_denied`); the operator refuses a URL whose host is such an address. An IPv4
    network also holds the IPv4-mapped IPv6 addresses of its own (`::ffff:169.254.169.254`). `[]`: none.
    config.yaml's own routes are trusted and not checked."""


class RoutesDocument(Strict):
    """What `routes.yaml` may hold: the operator's part of the config."""

    routes: list[Route] = []
    policies: list[Policy] = []


SHARD_FILE = r"^routes-[0-9]{3}\.yaml$"
"""`routes-001.yaml`...: files holding the routes that do not fit in routes.yaml's ConfigMap."""


class RoutesFile(RoutesDocument):
    """What `routes.yaml` may hold: routes and policies, and the index of the shard files holding the
    rest of the routes, each with the hash of its text (`shard_hash`). The config is loaded only when
    every shard it names is present with that hash: ConfigMaps updated one after another never load
    half old, half new."""

    shards: dict[Annotated[str, Field(pattern=SHARD_FILE)], Annotated[str, Field(pattern=r"^[0-9a-f]{16}$")]] = {}


def shard_hash(text: str) -> str:
    """The hash of a shard file's text, as routes.yaml's `shards` index names it."""
    return hashlib.sha256(text.encode()).hexdigest()[:16]


class Config(RoutesDocument):
    """The whole config: global settings plus routes and policies."""

    listen: ListenConfig = Field(default_factory=ListenConfig)
    limits: LimitsConfig = Field(default_factory=LimitsConfig)
    logging: LoggingConfig = Field(default_factory=LoggingConfig)
    redis: RedisConfig | None = None
    """Absent: limiter state is kept in-process (per replica; for `gateway demo` and development)."""
    auth: AuthConfig = Field(default_factory=AuthConfig)
    ratelimit: RateLimitSettings = Field(default_factory=RateLimitSettings)
    circuit_breaker: BreakerSettings = Field(default_factory=BreakerSettings)
    ownership: Ownership = Field(default_factory=Ownership)
    """Which namespaces' CRs may claim which hosts, paths and policies (read by the operator), and which
    networks their backends may not reach (by the operator and the gateway)."""

    _operator_routes: frozenset[str] = PrivateAttr(default=frozenset())
    """Names of the routes read from routes.yaml or its shards: not a setting, where the loader found them."""

    def with_operator_routes(self, names: frozenset[str]) -> Config:
        """This config, knowing which of its routes came from the operator's files (`operator_owned`)."""
        config = self.model_copy()
        config._operator_routes = names
        return config

    def operator_owned(self, route: Route) -> bool:
        """Whether `route` came from routes.yaml or a shard (rendered by the operator from tenants' CRs)
        rather than from config.yaml (people's). A backend of tenants' routes only is held unavailable
        when its TLS files cannot be used, where one of people's fails the whole load; and it may not
        reach `ownership.denied_backend_networks`."""
        return route.name in self._operator_routes


def config_hash(config: Config) -> str:
    """A stable digest of the config in force, reported by `/_health/ready` and read by the operator."""
    canonical = json.dumps(config.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def restart_settings(config: BaseModel, prefix: str = "") -> dict[str, Any]:
    """The settings marked RESTART, by dotted path: what the operator hashes to decide on a rollout."""
    found: dict[str, Any] = {}
    for name, field in type(config).model_fields.items():
        value = getattr(config, name)
        path = f"{prefix}{name}"
        marks = [m for m in field.metadata if isinstance(m, RestartRequired)]
        if marks:
            found[path] = marks[0].of(value)
        elif isinstance(value, BaseModel):
            found.update(restart_settings(value, prefix=f"{path}."))
    return found
