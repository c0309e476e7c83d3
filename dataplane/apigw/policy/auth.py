"""JWT authentication: verify a bearer token, check its scopes and the Redis revocation list.

Keys are PEM public keys (RSA, EC, Ed25519; a file may hold several, e.g. old and new during a
rotation) and optionally a JWKS file. Each key verifies only the algorithms that fit its type (RSA:
RS*/PS*; EC: the ES* of its curve; Ed25519: EdDSA) and are in `auth.algorithms`, so `none`, HS* and
RS/HS confusion can never verify. A token naming a `kid` is checked with the keys of that kid and with
keys configured without a kid; a token without a `kid` with every key.

Time claims (`exp`, `nbf`, `iat`, with `auth.clock_skew`) are checked here rather than by PyJWT, with
the clock passed in, so that fresh verification and the cache follow one clock.

What a token must be beyond its signature is checked here too, once per distinct token (the cache
holds only tokens that passed): no `crit` header (RFC 7515 4.1.11: a token naming extensions the
verifier does not understand is invalid, and the gateway understands none); every claim of
`auth.required_claims` present (default `exp`: a token that never expires is refused); the registered
claims of their types (`iss`, `sub`, `jti` strings; `exp`, `nbf`, `iat` numbers; `aud` and the scope
claims a string or a list of strings); and the `auth.forward_claims` free of control characters, so that
no value the backend decodes from a forwarded header can hold a line break. A wrong type is a 401,
never an exception further down.

Verified tokens are cached (LRU, `auth.cache_size` entries, keyed by the token) to skip signature
verification for repeated tokens. An entry never outlives the token's `exp`; a token without `exp`
is re-verified at least every `NO_EXP_CACHE_SECONDS`. New keys come with a new authenticator and cache.

Revocation list: a token is revoked while Redis holds the key `revoked:<jti>` (any value). Whoever
revokes sets its TTL to outlive the token, e.g. `SET revoked:<jti> 1 EXAT <exp>`, so the list
cleans itself. Tokens without `jti` cannot be revoked. The check is one EXISTS per request, cached
token or not, sent with the other checks of its event-loop tick (`apigw.redis.batch`) and bounded by
`redis.timeout`. Without Redis there is no
list and no check. When Redis fails, `auth.revocation.failure_mode` decides: `fail_open` accepts the
token, `fail_closed` answers 503 `revocation_unavailable`: the token is not known to be bad, so a 401
would make clients discard valid credentials and re-login in a storm, while a 503 says "retry" and
shows up as the outage it is.

`gateway_auth_attempts_total` counts each check as `result=success, error_type=none` or
`result=failure, error_type=<cause>`.
"""

from __future__ import annotations

import base64
import json
import logging
import math
import re
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

import jwt
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from cryptography.hazmat.primitives.serialization import load_pem_public_key
from redis.exceptions import RedisError

from apigw.config.errors import ConfigError
from apigw.config.model import AuthConfig, FailureMode
from apigw.http.errors import GatewayError
from apigw.observability.metrics import Metrics
from apigw.redis.batch import RedisBatch

log = logging.getLogger("apigw.auth")

Claims = Mapping[str, Any]
"""The verified claims of a token (read-only: the same mapping may serve many requests)."""

MAX_TOKEN_LENGTH = 8192
"""Longer Authorization headers are rejected as malformed before any decoding or crypto."""
NO_EXP_CACHE_SECONDS = 60.0
MIN_RSA_BITS = 2048
REVOKED_PREFIX = "revoked:"

ERROR_TYPES = (
    "missing_token", "malformed", "disallowed_alg", "unknown_kid", "bad_signature", "expired", "not_yet_valid",
    "bad_issuer", "bad_audience", "missing_claim", "revoked", "insufficient_scope", "revocation_unavailable",
)

STRING_CLAIMS = ("iss", "sub", "jti")
TIME_CLAIMS = ("exp", "nbf", "iat")
STRING_OR_LIST_CLAIMS = ("aud", "scope", "scp")
"""The registered claims (and the scope claims) whose type is checked; a claim of the wrong type is 401 malformed."""
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")
"""Characters no forwarded claim may hold: C0 and C1 controls (CR, LF, NUL, DEL, NEL...) and the Unicode line
and paragraph separators."""

_RSA_ALGORITHMS = ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512")
_EC_ALGORITHMS = {"secp256r1": "ES256", "secp384r1": "ES384", "secp521r1": "ES512"}
_PEM_BLOCK = re.compile(rb"-----BEGIN ([A-Z0-9 ]+)-----.+?-----END \1-----", re.DOTALL)


@dataclass(frozen=True, slots=True)
class VerifyKey:
    key: Any
    kid: str | None
    algorithms: tuple[str, ...]
    """The algorithms this key may verify: those fitting its type, within `auth.algorithms`."""


class KeyRing:
    """The loaded keys, indexed by `kid` for the hot path."""

    def __init__(self, keys: list[VerifyKey]):
        self.keys = keys
        self.any_kid = [k for k in keys if k.kid is None]
        self.by_kid: dict[str, list[VerifyKey]] = {}
        for key in keys:
            if key.kid is not None:
                self.by_kid.setdefault(key.kid, []).append(key)
        for keyed in self.by_kid.values():
            keyed.extend(self.any_kid)

    def candidates(self, kid: str | None) -> list[VerifyKey]:
        if kid is None:
            return self.keys
        return self.by_kid.get(kid, self.any_kid)


def load_keys(config: AuthConfig) -> KeyRing:
    """Read every key file; raise ConfigError with one located message per unusable file or key."""
    errors: list[str] = []
    keys: list[VerifyKey] = []
    allowed = frozenset(config.algorithms)
    for i, entry in enumerate(config.keys):
        where = f"auth.keys[{i}].file"
        data = _read(entry.file, where, errors)
        if data is not None:
            keys.extend(_pem_keys(data, entry.kid, allowed, where, errors))
    if config.jwks_file is not None:
        data = _read(config.jwks_file, "auth.jwks_file", errors)
        if data is not None:
            keys.extend(_jwks_keys(data, allowed, errors))
    if errors:
        raise ConfigError(errors)
    return KeyRing(keys)


def _read(path: Path, where: str, errors: list[str]) -> bytes | None:
    try:
        return path.read_bytes()
    except OSError as exc:
        errors.append(f"{where}: cannot read {path}: {exc.strerror or exc}")
        return None


def _pem_keys(data: bytes, kid: str | None, allowed: frozenset[str], where: str, errors: list[str]) -> list[VerifyKey]:
    blocks = list(_PEM_BLOCK.finditer(data))
    if not blocks:
        errors.append(f"{where}: not a PEM public key")
        return []
    keys = []
    for n, block in enumerate(blocks):
        here = f"{where} (PEM block {n + 1})" if len(blocks) > 1 else where
        label = block.group(1).decode()
        if "PRIVATE" in label:
            errors.append(f"{here}: holds a private key ({label}); give the gateway only the public key")
            continue
        try:
            public = load_pem_public_key(block.group(0))
        except (ValueError, TypeError, UnsupportedAlgorithm):
            errors.append(f"{here}: not a PEM public key" + (f" (found {label})" if "PUBLIC" not in label else ""))
            continue
        key = _verify_key(public, kid, allowed, None, here, errors)
        if key is not None:
            keys.append(key)
    return keys


def _jwks_keys(data: bytes, allowed: frozenset[str], errors: list[str]) -> list[VerifyKey]:
    """The signing keys of a JWKS document. Encryption keys and keys for algorithms outside the
    allow-list are left out (an identity provider's JWKS often holds such); unusable keys are errors."""
    try:
        document = json.loads(data)
    except ValueError as exc:
        errors.append(f"auth.jwks_file: not JSON: {exc}")
        return []
    entries = document.get("keys") if isinstance(document, dict) else None
    if not isinstance(entries, list):
        errors.append('auth.jwks_file: not a JWKS document (expected {"keys": [...]})')
        return []
    keys = []
    errors_before = len(errors)
    for i, entry in enumerate(entries):
        here = f"auth.jwks_file: keys[{i}]"
        if not isinstance(entry, dict):
            errors.append(f"{here}: not a JSON object")
            continue
        if entry.get("use") == "enc":
            continue
        if entry.get("kty") == "oct":
            errors.append(f"{here}: symmetric (oct) keys are not accepted")
            continue
        if "d" in entry:
            errors.append(f"{here}: holds private key material; give the gateway only public keys")
            continue
        try:
            public = jwt.PyJWK(entry).key
        except jwt.PyJWTError:  # its message repeats the key data: say what we know instead
            kty, crv, alg = entry.get("kty"), entry.get("crv"), entry.get("alg")
            errors.append(f"{here}: unusable key (kty {kty!r}, crv {crv!r}, alg {alg!r})")
            continue
        kid = entry.get("kid")
        restrict = entry.get("alg")
        fits = _fitting_algorithms(public)
        if restrict is not None and restrict not in fits:
            errors.append(f"{here}: alg {restrict!r} does not fit {_describe(public)}")
            continue
        if not (allowed & ({restrict} if restrict else set(fits))):
            continue
        key = _verify_key(public, kid if isinstance(kid, str) else None, allowed, restrict, here, errors)
        if key is not None:
            keys.append(key)
    if not keys and len(errors) == errors_before:
        errors.append(f"auth.jwks_file: no signing key for the allowed algorithms ({', '.join(sorted(allowed))})")
    return keys


def _verify_key(
    public: Any, kid: str | None, allowed: frozenset[str], restrict: str | None, where: str, errors: list[str]
) -> VerifyKey | None:
    fits = _fitting_algorithms(public)
    if not fits:
        errors.append(f"{where}: {_describe(public)} cannot verify any supported algorithm")
        return None
    if isinstance(public, rsa.RSAPublicKey) and public.key_size < MIN_RSA_BITS:
        errors.append(f"{where}: RSA key of {public.key_size} bits is too short (at least {MIN_RSA_BITS})")
        return None
    algorithms = tuple(a for a in fits if a in allowed and restrict in (None, a))
    if not algorithms:
        errors.append(
            f"{where}: {_describe(public)} verifies {', '.join(fits)}, none of which is in auth.algorithms"
        )
        return None
    return VerifyKey(public, kid, algorithms)


def _fitting_algorithms(public: Any) -> tuple[str, ...]:
    if isinstance(public, rsa.RSAPublicKey):
        return _RSA_ALGORITHMS
    if isinstance(public, ec.EllipticCurvePublicKey):
        alg = _EC_ALGORITHMS.get(public.curve.name)
        return (alg,) if alg else ()
    if isinstance(public, (ed25519.Ed25519PublicKey, ed448.Ed448PublicKey)):
        return ("EdDSA",)
    return ()


def _describe(public: Any) -> str:
    if isinstance(public, ec.EllipticCurvePublicKey):
        return f"EC {public.curve.name} key"
    return f"{type(public).__name__.removesuffix('PublicKey')} key"


class TokenCache:
    """Verified claims by token, least recently used dropped first; an entry is dropped at its deadline."""

    def __init__(self, size: int):
        self.size = size
        self.entries: OrderedDict[str, tuple[Claims, float]] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def get(self, token: str, now: float) -> Claims | None:
        entry = self.entries.get(token)
        if entry is not None:
            if now < entry[1]:
                self.entries.move_to_end(token)
                self.hits += 1
                return entry[0]
            del self.entries[token]
        self.misses += 1
        return None

    def put(self, token: str, claims: Claims, deadline: float) -> None:
        if self.size == 0:
            return
        self.entries[token] = (claims, deadline)
        self.entries.move_to_end(token)
        if len(self.entries) > self.size:
            self.entries.popitem(last=False)


class Authenticator:
    """Checks bearer tokens for the request pipeline; built once per config."""

    def __init__(
        self, config: AuthConfig, metrics: Metrics, revocations: RedisBatch | None, keys: KeyRing,
        clock: Callable[[], float],
    ):
        self.config = config
        self._keys = keys
        self.cache = TokenCache(config.cache_size)
        self._clock = clock
        self._skew = config.clock_skew
        self._algorithms = frozenset(config.algorithms)
        self._redis = revocations if config.revocation.enabled else None
        self._fail_open = config.revocation.failure_mode == FailureMode.fail_open
        self._redis_errors = metrics.redis_errors.labels(operation="revocation")
        self._success = metrics.auth_attempts.labels("success", "none")
        self._failures = {error_type: metrics.auth_attempts.labels("failure", error_type) for error_type in ERROR_TYPES}
        self._forward = tuple(config.forward_claims.items())
        self._required = tuple(config.required_claims)
        self.stripped_headers = frozenset(header.lower() for header in config.forward_claims.values())
        self._jwt = jwt.PyJWT(options={
            "verify_exp": False, "verify_nbf": False, "verify_iat": False,  # checked with our clock
            "verify_sub": False, "verify_jti": False,  # types checked by _check_claims, which names the claim
            "verify_aud": config.audience is not None,
            "enforce_minimum_key_length": True,
        })
        if (config.keys or config.jwks_file) and config.audience is None:
            log.warning(
                "auth.audience is not set: tokens signed by the configured keys are accepted whatever service "
                "they were minted for; set auth.audience to this gateway's audience"
            )

    @classmethod
    def build(
        cls, config: AuthConfig, metrics: Metrics, revocations: RedisBatch | None,
        clock: Callable[[], float] = time.time,
    ) -> Authenticator:
        """Load the keys (ConfigError if any file is unusable) and make the ready authenticator."""
        return cls(config, metrics, revocations, load_keys(config), clock)

    def watched_files(self) -> list[Path]:
        """The key files: a change to one reloads the config (with the keys read afresh)."""
        files = [entry.file for entry in self.config.keys]
        if self.config.jwks_file is not None:
            files.append(self.config.jwks_file)
        return files

    def forward_headers(self, claims: Claims) -> dict[str, str]:
        """The `auth.forward_claims` headers for the backend; non-string or non-ASCII values as JSON."""
        headers = {}
        for claim, header in self._forward:
            value = claims.get(claim)
            if value is None:
                continue
            if isinstance(value, str) and value.isascii() and value.isprintable():
                headers[header] = value
            else:
                headers[header] = json.dumps(value, separators=(",", ":"))
        return headers

    def verify(self, authorization: str | None) -> Claims:
        """The claims of the request's token once its signature, times, issuer and audience check out;
        GatewayError 401 (counted) otherwise. Revocation and scopes are `admit`'s: in between, the
        pipeline asks for its rate limit step, so that both go to Redis in the same round trip."""
        try:
            return self._verified(authorization)
        except GatewayError as exc:
            self._failures[exc.error_type].inc()
            raise

    async def admit(self, claims: Claims, scopes: tuple[str, ...]) -> None:
        """The revocation check (a revoked token is 401 whatever its scopes), then `scopes` (403);
        503 when revocations cannot be read and `fail_closed`. Counted either way."""
        try:
            jti = claims.get("jti")
            if self._redis is not None and jti is not None:
                await self._check_revocation(jti)
            if scopes:
                _check_scopes(claims, scopes)
        except GatewayError as exc:
            self._failures[exc.error_type].inc()
            raise
        self._success.inc()

    def _verified(self, authorization: str | None) -> Claims:
        if not authorization:
            raise GatewayError(401, "missing_token", "a bearer token is required", {"WWW-Authenticate": "Bearer"})
        if len(authorization) > MAX_TOKEN_LENGTH:
            raise _invalid("malformed", "the token is too large")
        scheme, _, token = authorization.partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            raise _invalid("malformed", "the Authorization header must be: Bearer <token>")
        now = self._clock()
        claims = self.cache.get(token, now)
        if claims is None:
            claims = self._verify(token, now)
            exp = claims.get("exp")
            self.cache.put(token, claims, exp if exp is not None else now + NO_EXP_CACHE_SECONDS)
        return claims

    def _verify(self, token: str, now: float) -> Claims:
        header = _unverified_header(token)
        alg, kid = header.get("alg"), header.get("kid")
        if not isinstance(alg, str) or not isinstance(kid, (str, type(None))):
            raise _invalid("malformed", "the token is not a well-formed JWT")
        if "crit" in header:
            raise _invalid("malformed", "the token names critical header extensions (crit), which are not supported")
        if alg not in self._algorithms:
            raise _invalid("disallowed_alg", "the token's algorithm is not accepted")
        candidates = self._keys.candidates(kid)
        if not candidates:
            raise _invalid("unknown_kid", "the token's key id (kid) is not known")
        fitting = [key for key in candidates if alg in key.algorithms]
        if not fitting:
            raise _invalid("disallowed_alg", "the token's algorithm does not fit its key")
        for key in fitting:
            try:
                claims = self._jwt.decode(
                    token, key.key, algorithms=key.algorithms, issuer=self.config.issuer, audience=self.config.audience
                )
            except jwt.InvalidSignatureError:
                continue
            except jwt.PyJWTError as exc:
                raise _invalid(*_cause(exc)) from None
            self._check_claims(claims)
            _check_times(claims, now, self._skew)
            return MappingProxyType(claims)
        raise _invalid("bad_signature", "the token's signature is invalid")

    def _check_claims(self, claims: Mapping[str, Any]) -> None:
        """Required claims present, claims of their types, forwarded claims fit for a header; 401 otherwise."""
        for name in self._required:
            if claims.get(name) is None:
                raise _invalid("missing_claim", f"the token lacks the required claim {name}")
        for names, fits, kind in _CLAIM_TYPES:
            for name in names:
                if name in claims and not fits(claims[name]):
                    raise _invalid("malformed", f"the token's {name} claim must be {kind}")
        for name, _ in self._forward:
            if _holds_control(claims.get(name)):
                raise _invalid("malformed", f"the token's {name} claim holds control characters and cannot be forwarded")

    async def _check_revocation(self, jti: str) -> None:
        assert self._redis is not None
        try:
            revoked = await self._redis.revoked(REVOKED_PREFIX + jti)
        except (RedisError, OSError, TimeoutError):
            self._redis_errors.inc()
            if self._fail_open:
                return
            raise GatewayError(
                503, "revocation_unavailable", "the token's revocation status cannot be checked right now"
            ) from None
        if revoked:
            raise _invalid("revoked", "the token has been revoked")


def _unverified_header(token: str) -> dict[str, Any]:
    """The token's JOSE header, read before verification to pick the key and to refuse `crit` with a
    message of our own (PyJWT reads it again, strictly, when it verifies)."""
    segment = token.partition(".")[0]
    try:
        header = json.loads(base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4)))
    except (ValueError, RecursionError):  # binascii.Error, UnicodeDecodeError and JSONDecodeError are ValueErrors
        header = None
    if not isinstance(header, dict):
        raise _invalid("malformed", "the token is not a well-formed JWT")
    return header


def _check_times(claims: Mapping[str, Any], now: float, skew: float) -> None:
    """The time claims against the clock (their types were checked before). The claims are compared,
    never added to: an int claim too large for a float would overflow arithmetic."""
    exp, nbf, iat = (claims.get(name) for name in TIME_CLAIMS)
    if exp is not None and now - skew >= exp:
        raise _invalid("expired", "the token has expired")
    if (nbf is not None and nbf > now + skew) or (iat is not None and iat > now + skew):
        raise _invalid("not_yet_valid", "the token is not valid yet")


def _is_time(value: Any) -> bool:
    """A JSON number: any int (isfinite would overflow on a huge one), or a finite float."""
    if isinstance(value, bool):
        return False
    return isinstance(value, int) or (isinstance(value, float) and math.isfinite(value))


def _is_string_or_list(value: Any) -> bool:
    return isinstance(value, str) or (isinstance(value, list) and all(isinstance(item, str) for item in value))


_CLAIM_TYPES = (
    (STRING_CLAIMS, lambda value: isinstance(value, str), "a string"),
    (TIME_CLAIMS, _is_time, "a number"),
    (STRING_OR_LIST_CLAIMS, _is_string_or_list, "a string or a list of strings"),
)


def _holds_control(value: Any) -> bool:
    """Whether a control character is in `value` or any string nested in it (keys too); iterative, so that
    no nesting depth the JSON parser accepted can exhaust the stack here."""
    pending = [value]
    while pending:
        item = pending.pop()
        if isinstance(item, str):
            if _CONTROL.search(item):
                return True
        elif isinstance(item, list):
            pending.extend(item)
        elif isinstance(item, dict):
            pending.extend(item)
            pending.extend(item.values())
    return False


def _check_scopes(claims: Claims, required: tuple[str, ...]) -> None:
    granted: set[str] = set()
    for name in ("scope", "scp"):  # a string or a list of strings (checked when the token was verified)
        value = claims.get(name)
        if isinstance(value, str):
            granted.update(value.split())
        elif value is not None:
            granted.update(value)
    if not granted.issuperset(required):
        wanted = " ".join(required).replace("\\", "\\\\").replace('"', '\\"')
        raise GatewayError(
            403, "insufficient_scope", "the token lacks a required scope",
            {"WWW-Authenticate": f'Bearer error="insufficient_scope", scope="{wanted}"'},
        )


def _cause(exc: jwt.PyJWTError) -> tuple[str, str]:
    """The error_type and client message for a PyJWT rejection after the signature verified."""
    missing = exc.claim if isinstance(exc, jwt.MissingRequiredClaimError) else None
    if isinstance(exc, jwt.InvalidIssuerError) or missing == "iss":
        return "bad_issuer", "the token's issuer is not accepted"
    if isinstance(exc, jwt.InvalidAudienceError) or missing == "aud":
        return "bad_audience", "the token's audience is not accepted"
    return "malformed", "the token is not a well-formed JWT"


def _invalid(error_type: str, description: str) -> GatewayError:
    return GatewayError(
        401, error_type, description,
        {"WWW-Authenticate": f'Bearer error="invalid_token", error_description="{description}"'},
    )
