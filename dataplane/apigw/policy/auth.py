"""JWT authentication: verify a bearer token, check its scopes and the Redis revocation list.

Keys are PEM public keys (RSA, EC, Ed25519; a file may hold several, e.g. old and new during a
rotation) and optionally a JWKS file. Each key verifies only the algorithms that fit its type (RSA:
RS*/PS*; EC: the ES* of its curve; Ed25519: EdDSA) and are in `auth.algorithms`, so `none`, HS* and
RS/HS confusion can never verify. A token naming a `kid` is checked with the keys of that kid and with
keys configured without a kid; a token without a `kid` with every key.

Tokens are parsed and verified here with `cryptography`, on a path prepared at config load (each key's
verifier per algorithm, by kid): the three base64url segments decoded strictly (the URL-safe alphabet,
canonical, right `=` padding tolerated as PyJWT does), the header parsed, its `alg` and `kid` picking the
verifiers, the signature checked, and only then the claims parsed, as a JSON object. A header segment that
has verified a signature is remembered with its verifiers (an issuer's tokens mostly share one), so the next
token with it skips the header's decoding and checks. A name given twice in
a JSON object keeps its last value, as RFC 7515 4 and RFC 7519 4 allow (the signature covers the bytes, so
only the issuer can write such a token). `iss` and `aud` are checked as PyJWT did (`bad_issuer`,
`bad_audience`); time claims (`exp`, `nbf`, `iat`, with `auth.clock_skew`) with the clock passed in, so
that fresh verification and the cache follow one clock.

What a token must be beyond its signature is checked here too, once per distinct token (the verified-token
cache holds only tokens that passed): no `crit` header (RFC 7515 4.1.11: a token naming extensions the
verifier does not understand is invalid, and the gateway understands none); every claim of
`auth.required_claims` present (default `exp`: a token that never expires is refused); the registered
claims of their types (`iss`, `sub`, `jti` strings; `exp`, `nbf`, `iat` numbers; `aud` and the scope
claims a string or a list of strings); and the `auth.forward_claims` free of control characters, so that
no value the backend decodes from a forwarded header can hold a line break. A wrong type is a 401,
never an exception further down.

Verified tokens are cached (LRU, `auth.cache_size` entries, keyed by the token) to skip signature
verification for repeated tokens. An entry never outlives the token's `exp`; a token without `exp`
is re-verified at least every `NO_EXP_CACHE_SECONDS`. Refused tokens are cached too (at most
`REFUSED_CACHE_SIZE`, within `auth.cache_size`), so that a flood of one bad token costs a dictionary
lookup, not a signature check: every refusal that time cannot undo (a token that has expired stays
expired as the clock moves on), for `REFUSED_CACHE_SECONDS`, but not `not_yet_valid`, which time ends.
New keys come with a new authenticator and caches.

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

import binascii
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
from typing import Any, Generic, TypeVar

import jwt
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from cryptography.hazmat.primitives.serialization import load_pem_public_key
from redis.exceptions import RedisError

from apigw.config.errors import ConfigError
from apigw.config.model import AuthConfig, FailureMode
from apigw.http.errors import GatewayError
from apigw.observability.metrics import Metrics
from apigw.redis.batch import RedisBatch

log = logging.getLogger("apigw.auth")
revocation_log = logging.getLogger("apigw.revocation")
"""Redis trouble of the revocation check: not under `apigw.auth`, whose lines with `error` in them the
runbook reads as token failures (`grep -i "auth.*error" | jq -r '.error_type'`)."""

Claims = Mapping[str, Any]
"""The verified claims of a token (read-only: the same mapping may serve many requests)."""

MAX_TOKEN_LENGTH = 8192
"""Longer Authorization headers are rejected as malformed before any decoding or crypto."""
NO_EXP_CACHE_SECONDS = 60.0
REFUSED_CACHE_SIZE = 1000
"""At most this many refused tokens are remembered (each up to MAX_TOKEN_LENGTH ASCII characters: 8 MB
at worst)."""
REFUSED_CACHE_SECONDS = 300.0
"""How long a refusal is remembered: a clock stepped back (NTP after a jump forward) lets an `expired`
token in again after this long at most."""
MIN_RSA_BITS = 2048
REVOKED_PREFIX = "revoked:"
HEADER_MEMO_SIZE = 64
"""Header segments remembered with their verifiers. Only the headers of tokens whose signature verified get
in, and the memo starts afresh when full."""

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


Verifier = Callable[[bytes, bytes], None]
"""`verify(signature, signing_input)`: returns if the signature is good, raises InvalidSignature if not."""


@dataclass(frozen=True, slots=True)
class VerifyKey:
    key: Any
    kid: str | None
    algorithms: tuple[str, ...]
    """The algorithms this key may verify: those fitting its type, within `auth.algorithms`."""


class KeyRing:
    """The loaded keys, with their verifiers by kid and algorithm for the hot path."""

    def __init__(self, keys: list[VerifyKey]):
        self.keys = keys
        any_kid = [key for key in keys if key.kid is None]
        self._no_kid = _verifiers(keys) if keys else None
        self._other_kid = _verifiers(any_kid) if any_kid else None
        self._by_kid = {
            kid: _verifiers([key for key in keys if key.kid == kid] + any_kid)
            for kid in {key.kid for key in keys if key.kid is not None}
        }

    def verifiers(self, kid: str | None) -> Mapping[str, tuple[Verifier, ...]] | None:
        """By algorithm, the verifiers of the keys a token naming `kid` is checked with (a token without kid:
        every key; a kid no key has: the keys configured without kid); None when there are no such keys."""
        if kid is None:
            return self._no_kid
        return self._by_kid.get(kid, self._other_kid)


def _verifiers(keys: list[VerifyKey]) -> dict[str, tuple[Verifier, ...]]:
    table: dict[str, tuple[Verifier, ...]] = {}
    for key in keys:
        for alg in key.algorithms:
            table[alg] = (*table.get(alg, ()), _verifier(key.key, alg))
    return table


_HASHES = {"256": hashes.SHA256, "384": hashes.SHA384, "512": hashes.SHA512}


def _verifier(public: Any, alg: str) -> Verifier:
    """The signature check of `alg` (RFC 7518 3) with `public`, its parameters made once."""
    if alg == "EdDSA":
        return lambda signature, data: public.verify(signature, data)
    digest = _HASHES[alg[2:]]()
    if alg.startswith("RS"):
        pkcs1 = padding.PKCS1v15()
        return lambda signature, data: public.verify(signature, data, pkcs1, digest)
    if alg.startswith("PS"):
        pss = padding.PSS(mgf=padding.MGF1(digest), salt_length=digest.digest_size)
        return lambda signature, data: public.verify(signature, data, pss, digest)
    size = (public.curve.key_size + 7) // 8
    ecdsa = ec.ECDSA(digest)

    def verify_ecdsa(signature: bytes, data: bytes) -> None:  # JWS holds R || S, cryptography wants DER
        if len(signature) != 2 * size:
            raise InvalidSignature
        r, s = int.from_bytes(signature[:size], "big"), int.from_bytes(signature[size:], "big")
        public.verify(encode_dss_signature(r, s), data, ecdsa)

    return verify_ecdsa


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
        except (jwt.PyJWTError, NotImplementedError, TypeError):  # the last two: alg none, alg a list or object
            # the error's message repeats the key data: say what we know instead
            kty, crv, alg = entry.get("kty"), entry.get("crv"), entry.get("alg")
            errors.append(f"{here}: unusable key (kty {kty!r}, crv {crv!r}, alg {alg!r})")
            continue
        kid = entry.get("kid")
        if kid is not None and not isinstance(kid, str):  # else a key without kid: it would verify any kid
            errors.append(f"{here}: kid must be a string (got {type(kid).__name__})")
            continue
        restrict = entry.get("alg")
        fits = _fitting_algorithms(public)
        if not (allowed & ({restrict} if restrict else set(fits))):  # ES256K, say: outside the allow-list
            continue
        if restrict is not None and restrict not in fits:
            errors.append(f"{here}: alg {restrict!r} does not fit {_describe(public)}")
            continue
        key = _verify_key(public, kid, allowed, restrict, here, errors)
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


V = TypeVar("V")


class TokenCache(Generic[V]):
    """Values by token, least recently used dropped first; an entry is dropped at its deadline.

    Values and deadlines are kept apart, each the value itself, not a (value, deadline) pair: a dict of
    strings and numbers (most tokens' claims) is not tracked by Python's cyclic garbage collector, but a
    tuple holding one is, so 10,000 cached tokens made every full collection walk 10,000 more objects
    (`bench/compare.py`: the warm row 10% dearer after the cold row filled the cache)."""

    def __init__(self, size: int):
        self.size = size
        self.entries: OrderedDict[str, V] = OrderedDict()
        self._deadlines: dict[str, float] = {}
        self.hits = 0
        self.misses = 0

    def get(self, token: str, now: float) -> V | None:
        value = self.entries.get(token)
        if value is not None:
            if now < self._deadlines[token]:
                self.entries.move_to_end(token)
                self.hits += 1
                return value
            del self.entries[token], self._deadlines[token]
        self.misses += 1
        return None

    def put(self, token: str, value: V, deadline: float) -> None:
        if self.size == 0:
            return
        self.entries[token] = value
        self.entries.move_to_end(token)
        self._deadlines[token] = deadline
        if len(self.entries) > self.size:
            del self._deadlines[self.entries.popitem(last=False)[0]]

    def clear(self) -> None:
        self.entries.clear()
        self._deadlines.clear()


class Authenticator:
    """Checks bearer tokens for the request pipeline; built once per config."""

    def __init__(
        self, config: AuthConfig, metrics: Metrics, revocations: RedisBatch | None, keys: KeyRing,
        clock: Callable[[], float],
    ):
        self.config = config
        self._keys = keys
        self.header_memo: dict[bytes, tuple[Verifier, ...]] = {}
        """The verifiers of each header segment that has verified a signature (HEADER_MEMO_SIZE)."""
        self.cache: TokenCache[dict[str, Any]] = TokenCache(config.cache_size)
        """The claims of verified tokens, as plain dicts (see TokenCache); handed out read-only."""
        self.refused: TokenCache[tuple[str, str]] = TokenCache(min(config.cache_size, REFUSED_CACHE_SIZE))
        """(error_type, description) of tokens refused for a cause time cannot end."""
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
        """The `auth.forward_claims` headers for the backend: a plain string as it is, anything else as
        JSON (`plain_text`), so that a backend reads a value unambiguously: JSON if it parses as JSON."""
        headers = {}
        for claim, header in self._forward:
            value = claims.get(claim)
            if value is None:
                continue
            headers[header] = value if plain_text(value) else json.dumps(value, separators=(",", ":"))
        return headers

    def verify_request(self, authorization: list[str]) -> Claims:
        """`verify` for a request's Authorization headers: more than one is refused, since a backend reading
        another copy would see a token the gateway never checked."""
        if len(authorization) > 1:
            self._failures["malformed"].inc()
            raise _invalid("malformed", "more than one Authorization header")
        return self.verify(authorization[0] if authorization else None)

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
        503 when revocations cannot be read and `fail_closed`. A refusal is counted here, a success by
        `count_success`. (The revocation check is inline, not a coroutine of its own: this runs once
        per request.)"""
        try:
            jti = claims.get("jti")
            if self._redis is not None and jti is not None:
                try:
                    revoked = await self._redis.revoked(REVOKED_PREFIX + jti)
                except (RedisError, OSError, TimeoutError) as error:
                    self._redis_errors.inc()
                    reason = self._redis.describe(error)
                    mode = self.config.revocation.failure_mode.value
                    revocation_log.error(  # flood-controlled: one line per kind and 10 s (RepeatFilter)
                        "revocation check error: Redis %s; %s", reason, mode,
                        extra={"fields": {"error": reason, "failure_mode": mode}},
                    )
                    if not self._fail_open:
                        raise GatewayError(
                            503, "revocation_unavailable", "the token's revocation status cannot be checked right now"
                        ) from None
                    revoked = 0
                if revoked:
                    raise _invalid("revoked", "the token has been revoked")
            if scopes:
                _check_scopes(claims, scopes)
        except GatewayError as exc:
            self._failures[exc.error_type].inc()
            raise

    def count_success(self) -> None:
        """Count a token that passed `verify` and `admit`. The pipeline calls this once the response has
        gone out: work done before costs a loaded gateway about three times its own (`bench/features.py`)."""
        self._success.inc()

    def _verified(self, authorization: str | None) -> Claims:
        if not authorization:
            raise GatewayError(401, "missing_token", "a bearer token is required", {"WWW-Authenticate": "Bearer"})
        if len(authorization) > MAX_TOKEN_LENGTH:
            raise _invalid("malformed", "the token is too large")
        scheme, _, token = authorization.partition(" ")
        token = token.strip(" \t")
        if scheme.lower() != "bearer" or not token:
            raise _invalid("malformed", "the Authorization header must be: Bearer <token>")
        if not token.isascii():  # before any cache: a token is base64url and dots, one byte a character
            raise _invalid("malformed", "the token holds characters other than base64url and dots")
        now = self._clock()
        claims = self.cache.get(token, now)
        if claims is None:
            refused = self.refused.get(token, now)
            if refused is not None:
                raise _invalid(*refused)
            try:
                claims = self._verify(token, now)
            except GatewayError as exc:
                if exc.error_type != "not_yet_valid":
                    self.refused.put(token, (exc.error_type, exc.message), now + REFUSED_CACHE_SECONDS)
                raise
            exp = claims.get("exp")
            deadline = exp if exp is not None else now + NO_EXP_CACHE_SECONDS
            if deadline > now:  # in the clock-skew grace after `exp`: checked again each time, never cached
                self.cache.put(token, claims, deadline)
        return MappingProxyType(claims)

    def _verify(self, token: str, now: float) -> dict[str, Any]:
        header_segment, payload, signature, signing_input = _segments(token)
        verifiers = self.header_memo.get(header_segment)
        remembered = verifiers is not None
        if verifiers is None:
            verifiers = self._header_verifiers(header_segment)
        for verify in verifiers:
            try:
                verify(signature, signing_input)
                break
            except InvalidSignature:
                continue
        else:
            raise _invalid("bad_signature", "the token's signature is invalid")
        if not remembered:
            if len(self.header_memo) >= HEADER_MEMO_SIZE:
                self.header_memo.clear()
            self.header_memo[header_segment] = verifiers
        claims = _json_object(payload)
        self._check_claims(claims)
        _check_times(claims, now, self._skew)
        return claims

    def _header_verifiers(self, segment: bytes) -> tuple[Verifier, ...]:
        """The verifiers that the header segment's `alg` and `kid` pick; 401 if it is malformed or picks none."""
        try:
            header = _json_object(_b64url(segment))
        except ValueError:  # binascii.Error, not canonical
            raise _invalid("malformed", "the token is not a well-formed JWT") from None
        alg, kid = header.get("alg"), header.get("kid")
        if not isinstance(alg, str) or not isinstance(kid, (str, type(None))):
            raise _invalid("malformed", "the token is not a well-formed JWT")
        if "crit" in header:
            raise _invalid("malformed", "the token names critical header extensions (crit), which are not supported")
        if alg not in self._algorithms:
            raise _invalid("disallowed_alg", "the token's algorithm is not accepted")
        by_alg = self._keys.verifiers(kid)
        if by_alg is None:
            raise _invalid("unknown_kid", "the token's key id (kid) is not known")
        verifiers = by_alg.get(alg)
        if not verifiers:
            raise _invalid("disallowed_alg", "the token's algorithm does not fit its key")
        return verifiers

    def _check_claims(self, claims: Mapping[str, Any]) -> None:
        """Issuer and audience as configured, required claims present, claims of their types, forwarded
        claims fit for a header; 401 otherwise."""
        issuer, audience = self.config.issuer, self.config.audience
        if issuer is not None and claims.get("iss") != issuer:
            raise _invalid("bad_issuer", "the token's issuer is not accepted")
        if audience is not None and not _names_audience(claims.get("aud"), audience):
            raise _invalid("bad_audience", "the token's audience is not accepted")
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


_URLSAFE_TO_STANDARD = bytes.maketrans(b"-_+/", b"+/!!")
"""base64url to the standard alphabet; `+` and `/`, not base64url, become a character no decoder accepts."""


def _segments(token: str) -> tuple[bytes, bytes, bytes, bytes]:
    """The header segment as sent, the decoded payload and signature of a compact JWS, and the signing input;
    401 malformed unless there are three segments, the payload and signature canonical base64url (the header
    is decoded by `_header_verifiers`, unless its segment is a remembered one)."""
    try:
        raw = token.encode("ascii")
        header, payload, signature = raw.split(b".")
        decoded = _b64url(payload), _b64url(signature)
    except ValueError:  # UnicodeEncodeError, a count of segments other than 3, binascii.Error
        raise _invalid("malformed", "the token is not a well-formed JWT") from None
    return header, *decoded, raw[: len(header) + 1 + len(payload)]


_NO_STRAY_BITS = (b"", b"AQgw", b"AEIMQUYcgkosw048")
"""By the bytes in the last quantum (1 or 2), the characters that may end the data: those whose bits beyond the
bytes are zero (values that are multiples of 16, of 4). They are the same in both alphabets."""


def _b64url(segment: bytes) -> bytes:
    """Strict base64url: its alphabet only, `=` padding tolerated if right, no stray bits in the last character
    (one spelling per segment, but for the padding; nothing is keyed on a token's spelling but the caches)."""
    if not segment.endswith(b"="):
        segment += b"=" * (-len(segment) % 4)
    decoded = binascii.a2b_base64(segment.translate(_URLSAFE_TO_STANDARD), strict_mode=True)
    spare = len(decoded) % 3  # strict mode: the last quantum, XY== (1 byte) or XYZ= (2), ends the segment
    if len(segment) != (len(decoded) + 2) // 3 * 4 or (spare and segment[spare - 4] not in _NO_STRAY_BITS[spare]):
        raise ValueError("not canonical base64")  # padding beyond the last quantum, or stray bits
    return decoded


_SCAN = json.JSONDecoder().scan_once
_JSON_SPACE = re.compile(r"[ \t\n\r]*").match
"""The whitespace JSON allows around a value."""


def _json_object(data: bytes) -> dict[str, Any]:
    """A segment's JSON object (UTF-8); 401 malformed otherwise. NaN and Infinity are read as Python reads
    them (a time claim holding one is refused by its type check, naming the claim). Read as `json.loads`
    reads it, but with its scanner called directly: `loads` costs twice that for a token's few claims."""
    try:
        text = data.decode("utf-8")
        value, end = _SCAN(text, 0 if text.startswith("{") else _JSON_SPACE(text).end())
        if end != len(text) and _JSON_SPACE(text, end).end() != len(text):
            value = None
    except (ValueError, RecursionError, StopIteration):  # StopIteration: no JSON value starts there
        value = None
    if not isinstance(value, dict):
        raise _invalid("malformed", "the token is not a well-formed JWT")
    return value


def _names_audience(aud: Any, audience: str) -> bool:
    """Whether the `aud` claim (a string or a list of strings) names `audience`."""
    if isinstance(aud, str):
        return aud == audience
    return isinstance(aud, list) and all(isinstance(item, str) for item in aud) and audience in aud


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


_JSON_START = frozenset(' \t"[{-0123456789')


def plain_text(value: Any) -> bool:
    """A string sent as it is: printable ASCII that no JSON parser reads as JSON and that HTTP delivers
    unchanged (no space or tab at either end, which header parsing removes). Any other string, such as
    `"x"`, `[1]`, `true`, `42` or `alice `, goes as JSON text, so two values never share a header."""
    return (isinstance(value, str) and value != "" and value.isascii() and value.isprintable()
            and value[0] not in _JSON_START and value[-1] not in " \t"
            and value not in ("true", "false", "null", "NaN", "Infinity"))


def _check_scopes(claims: Claims, required: tuple[str, ...]) -> None:
    granted: set[str] = set()
    for name in ("scope", "scp"):  # a string or a list of strings (checked when the token was verified)
        value = claims.get(name)
        if isinstance(value, str):
            granted.update(value.split(" "))  # RFC 6749: scopes are separated by spaces, no other character
        elif value is not None:
            granted.update(value)
    if not granted.issuperset(required):
        wanted = " ".join(required).replace("\\", "\\\\").replace('"', '\\"')
        raise GatewayError(
            403, "insufficient_scope", "the token lacks a required scope",
            {"WWW-Authenticate": f'Bearer error="insufficient_scope", scope="{wanted}"'},
        )


def _invalid(error_type: str, description: str) -> GatewayError:
    return GatewayError(
        401, error_type, description,
        {"WWW-Authenticate": f'Bearer error="invalid_token", error_description="{description}"'},
    )
