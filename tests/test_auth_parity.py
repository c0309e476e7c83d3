"""The gateway's JWT path against PyJWT: random tokens, real keys, one verdict.

`Authenticator.verify` parses and verifies tokens itself, with `cryptography`. The rule tested here: for
tokens built from random headers, claims, signers and edits, it accepts exactly the tokens `jwt.decode`
accepts with the same keys, algorithms, required claims, leeway, issuer and audience, and hands out the
same claims; except for the deliberate differences of `apigw.policy.auth`, spelled out in `expected`:

- a token naming a `kid` is checked with the keys of that kid and the keys configured without one
  (PyJWT is given one key: it is tried with each of those);
- claims are strict UTF-8 JSON (PyJWT's `json.loads` of bytes also reads a BOM, UTF-16 and UTF-32);
- no `crit` header, whatever it names;
- the registered claims of their types: `iss`, `sub`, `jti` strings; `exp`, `nbf`, `iat` numbers, never
  booleans or strings (PyJWT takes anything `int()` takes); `aud`, `scope`, `scp` a string or strings;
- time claims compared as they are (PyJWT truncates a fraction: `int(exp)`);
- forwarded claims free of control characters.

Not generated, since the two differ there by design and the gateway's way is harmless: `"kid": null`
(the gateway reads it as no kid; PyJWT refuses it) and `"b64": false` without `crit` (PyJWT reads the
token as one with a detached payload, the gateway as the plain JWS that RFC 7515 alone makes of it).
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import hmac
import json
import math
import re
from typing import Any
from unittest import mock

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from apigw.config.model import AuthConfig
from apigw.http.errors import GatewayError
from apigw.observability.metrics import Metrics
from apigw.policy.auth import Authenticator
from apigw.testkit.tokens import SigningKey
from tests.test_auth import B64URL, JSON_VALUES, b64

NOW = 1_800_000_000.0
SKEW = 30
ISSUER, AUDIENCE = "https://idp.example", "gateway"
ALGORITHMS = ["RS256", "PS256", "PS512", "ES256", "ES384", "EdDSA"]
ALL_ALGORITHMS = ["RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA"]
FORWARDED = "name"

# the configured keys (kid None: configured without one) and one key of each type no one configured
CONFIGURED = {
    "rsa": ("rsa", "r", None),
    "ec256": ("ec", "e", "ES256"),
    "ec384": ("ec", None, "ES384"),
    "ed": ("ed25519", "d", None),
}
FOREIGN = {"rsa-foreign": ("rsa", "r", None), "ec-foreign": ("ec", "e", "ES256"), "ed-foreign": ("ed25519", None, None)}


@pytest.fixture(scope="module")
def keys() -> dict[str, SigningKey]:
    return {name: SigningKey(kind, kid=kid, algorithm=alg) for name, (kind, kid, alg) in {**CONFIGURED, **FOREIGN}.items()}


@pytest.fixture(scope="module")
def clock() -> list[float]:
    """The time both authenticators read; it only moves on, across examples too."""
    return [NOW]


@pytest.fixture(scope="module")
def authenticators(
    keys: dict[str, SigningKey], clock: list[float], tmp_path_factory: pytest.TempPathFactory
) -> tuple[Authenticator, ...]:
    """The same config twice: with caches that live across examples (and the header memo with them), and
    with none, so that every token is verified afresh."""
    folder = tmp_path_factory.mktemp("keys")
    entries = [{"file": keys[name].write_public_pem(folder / f"{name}.pem"), "kid": keys[name].kid} for name in CONFIGURED]
    settings_ = {"keys": entries, "algorithms": ALGORITHMS, "issuer": ISSUER, "audience": AUDIENCE,
                 "clock_skew": SKEW, "forward_claims": {FORWARDED: "X-Name"}}
    return tuple(
        Authenticator.build(AuthConfig.model_validate({**settings_, "cache_size": size}), Metrics(), None,
                            clock=lambda: clock[0])
        for size in (64, 0)
    )


# --- the tokens ---------------------------------------------------------------------------------


def one_in(n: int) -> st.SearchStrategy[bool]:
    """True once in `n` draws (hypothesis' integers and booleans favour 0 and False: make those the usual)."""
    return st.sampled_from([False] * (n - 1) + [True])


_OFFSETS = st.sampled_from(range(-2 * SKEW, 2 * SKEW + 1)) | st.sampled_from([-SKEW - 1, -SKEW, -SKEW + 1, SKEW + 1])
"""Seconds from now, evenly spread (hypothesis' integers favour 0) and on either side of the clock skew."""


def times(now: float) -> st.SearchStrategy[Any]:
    """A time claim near `now` (whole seconds, or not), or a value that is no time."""
    return st.one_of(
        _OFFSETS.map(lambda offset: int(now) + offset),
        _OFFSETS.map(lambda offset: int(now) + offset),
        _OFFSETS.map(lambda offset: now + offset + 0.5),
        st.floats(-2 * SKEW, 2 * SKEW).map(lambda offset: now + offset),
        st.sampled_from([True, False, None, str(int(now) + 100), 10**400, -(10**400), math.nan, math.inf, [int(now)]]),
    )


CLAIM_VALUES = {
    "iss": st.sampled_from([ISSUER, ISSUER + "/", "", None, 1, [ISSUER]]),
    "aud": st.sampled_from([AUDIENCE, "other", [AUDIENCE], ["other", AUDIENCE], [], [AUDIENCE, 1], None, 1]),
    "sub": st.sampled_from(["alice", "", 7, None, ["alice"], "\ud800"]),
    "jti": st.sampled_from(["j-1", 1, None, {"a": 1}]),
    "scope": st.sampled_from(["read write", ["read"], [1], 1, None]),
    "scp": st.sampled_from(["read", ["read", None], True]),
    FORWARDED: st.sampled_from(["Alice", "a\nb", "\x7f", "\u2028", ["ok", "\r"], {"\x00": 1}, 1.5]),
    "other": JSON_VALUES,
}
NAMES = [*sorted(CLAIM_VALUES), *["exp", "nbf", "iat"] * 2]
"""The claims to change, the time claims more often than others."""
GOOD_CLAIMS = {"iss": ISSUER, "aud": AUDIENCE, "sub": "alice"}


@st.composite
def payloads(draw: st.DrawFn, now: float) -> bytes:
    """Mostly a valid set of claims with a few changed, removed or given twice (JSON keeps the last);
    sometimes bytes that are not strict UTF-8 JSON."""
    pairs = [("exp", int(now) + 300), *GOOD_CLAIMS.items(), ("exp", draw(st.just(int(now) + 300) | times(now)))]
    if draw(st.booleans()):
        pairs.append((draw(st.sampled_from(["nbf", "iat"])), draw(times(now))))
    for name in draw(st.lists(st.sampled_from(NAMES), max_size=draw(st.sampled_from([0, 0, 1, 2, 3])))):
        value = draw(times(now) if name in ("exp", "nbf", "iat") else CLAIM_VALUES[name])
        if draw(st.booleans()):
            pairs = [pair for pair in pairs if pair[0] != name]
        pairs.append((name, value))
    if draw(one_in(10)):
        pairs = [pair for pair in pairs if pair[0] != draw(st.sampled_from(["exp", *GOOD_CLAIMS]))]
    text = "{" + ",".join(f"{json.dumps(name)}:{json.dumps(value)}" for name, value in pairs) + "}"
    text = draw(st.sampled_from([""] * 20 + [" ", "\ufeff", "\t"])) + text
    return text.encode(draw(st.sampled_from(["utf-8"] * 30 + ["utf-16", "utf-8-sig"])))


@st.composite
def headers(draw: st.DrawFn, signer: SigningKey, algorithm: str) -> bytes:
    """The header: mostly the signer's alg and kid, sometimes another alg or kid, extra or odd members."""
    header: dict[str, Any] = {"alg": algorithm}
    if draw(one_in(12)):
        header["alg"] = draw(st.sampled_from([*ALL_ALGORITHMS, "none", "HS256", "rs256", "", 1, None]))
    kid = signer.kid if not draw(one_in(6)) else draw(st.sampled_from(["r", "e", "d", "zz", "", 7, None]))
    if kid is not None:
        header["kid"] = kid
    if draw(one_in(15)):
        header["crit"] = draw(st.sampled_from([["exp"], [], "b64"]))
    if draw(one_in(5)):
        header["typ"] = draw(st.sampled_from(["JWT", "at+jwt", 1]))
    text = json.dumps(header, separators=(",", ":") if draw(st.booleans()) else (", ", ": "))
    if draw(one_in(10)):
        text = text.replace('{"alg"', '{"alg":"none","alg"', 1)  # a name given twice: JSON keeps the last
    return text.encode()


Signer = tuple[str, str, bytes]
"""How a token was made: the name of its key, the algorithm it was signed with, its header."""


@st.composite
def tokens(draw: st.DrawFn, keys: dict[str, SigningKey], now: float, like: Signer | None = None) -> tuple[str, Signer]:
    """A token from a signer (configured or not) and an algorithm that fits its key or not, HMAC with the
    public key as secret, no signature or random bytes; then, sometimes, a few characters edited. `like`:
    with the header of that token, and mostly its key and algorithm too."""
    name = draw(st.sampled_from(sorted(CONFIGURED) * 4 + sorted(FOREIGN)))
    signer = keys[name]
    if isinstance(signer.private_key, rsa.RSAPrivateKey):
        algorithm = draw(st.sampled_from(["RS256", "RS384", "PS256", "PS512"]))  # RS384 is not configured
    else:
        algorithm = signer.algorithm
    if like is not None and not draw(one_in(3)):
        name, algorithm, _ = like
        signer = keys[name]
    header = draw(headers(signer, algorithm)) if like is None else like[2]
    signing_input = f"{b64(header)}.{b64(draw(payloads(now)))}".encode()
    how = draw(st.sampled_from(["sign"] * 20 + ["hmac", "empty", "random"]))
    if how == "sign":
        signature = jwt.get_algorithm_by_name(algorithm).sign(signing_input, signer.private_key)
    elif how == "hmac":
        signature = hmac.new(signer.public_pem, signing_input, hashlib.sha256).digest()
    elif how == "empty":
        signature = b""
    else:
        signature = draw(st.binary(max_size=300))
    token = f"{signing_input.decode()}.{b64(signature)}"
    if draw(one_in(6)):  # right padding on the signature: tolerated by both
        token += "=" * (-len(token.rsplit(".", 1)[1]) % 4)
    if draw(one_in(10)):  # the next character of the alphabet at the end: stray bits, or bad base64
        token = token[:-1] + B64URL[(B64URL.find(token[-1]) + 1) % 64]
        event("stray")
    for edit, at, char in draw(st.lists(st.tuples(
        st.sampled_from(["replace", "insert", "delete"]), st.integers(min_value=0),
        st.sampled_from("AQgw-_.=+/ \t\x00{"),
    ), max_size=draw(st.sampled_from([0] * 10 + [1, 2])))):
        at %= len(token) + 1
        token = token[:at] + (char if edit != "delete" else "") + token[at + (edit != "insert"):]
    return token, (name, algorithm, header)


# --- the oracle ---------------------------------------------------------------------------------


def candidates(keys: dict[str, SigningKey], token: str) -> list[Any]:
    """The public keys the gateway tries for the token's kid (the documented rule)."""
    try:
        kid = jwt.get_unverified_header(token).get("kid")
    except jwt.PyJWTError:
        kid = None
    configured = [keys[name] for name in CONFIGURED]
    known = {key.kid for key in configured}
    picked = [key for key in configured if kid is None or key.kid is None or (key.kid == kid and kid in known)]
    return [key.private_key.public_key() for key in picked]


def pyjwt_claims(keys: dict[str, SigningKey], token: str, now: float, exact_times: bool) -> dict[str, Any] | None:
    """The claims `jwt.decode` returns with any of the candidate keys, or None. `exact_times`: the time
    claims are left to `expected` (PyJWT truncates fractions)."""
    options: dict[str, Any] = {"require": ["exp"]}
    if exact_times:
        options.update(verify_exp=False, verify_nbf=False, verify_iat=False)

    class Frozen(datetime.datetime):
        @classmethod
        def now(cls, tz: Any = None) -> Any:
            return datetime.datetime.fromtimestamp(now, tz)

    with mock.patch.object(jwt.api_jwt, "datetime", Frozen):
        for key in candidates(keys, token):
            try:
                return jwt.decode(token, key, algorithms=ALGORITHMS, audience=AUDIENCE, issuer=ISSUER,
                                  leeway=SKEW, options=options)
            except jwt.PyJWTError:
                continue
            except (OverflowError, ValueError, TypeError):  # PyJWT's own trouble with hostile claims: a refusal
                continue
    return None


_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def _is_number(value: Any) -> bool:
    return not isinstance(value, bool) and (isinstance(value, int) or (isinstance(value, float) and math.isfinite(value)))


def _is_strings(value: Any) -> bool:
    return isinstance(value, str) or (isinstance(value, list) and all(isinstance(item, str) for item in value))


def _controls(value: Any) -> bool:
    if isinstance(value, str):
        return bool(_CONTROL.search(value))
    if isinstance(value, list):
        return any(_controls(item) for item in value)
    if isinstance(value, dict):
        return any(_controls(name) or _controls(item) for name, item in value.items())
    return False


def _strict_json(segment: str) -> Any:
    return json.loads(base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4)).decode("utf-8"))


def expected(keys: dict[str, SigningKey], token: str, now: float) -> dict[str, Any] | None:
    """The claims the gateway should hand out for `token`, or None: PyJWT's verdict and the documented
    differences."""
    try:
        header_segment, payload_segment, _ = token.split(".")
        header, claims = _strict_json(header_segment), _strict_json(payload_segment)
    except ValueError:  # not three segments, not base64 (canonical base64 is PyJWT's check), not strict UTF-8 JSON
        return None
    if not isinstance(header, dict) or "crit" in header or not isinstance(claims, dict):
        return None
    stamps = [claims.get(name) for name in ("exp", "nbf", "iat")]
    exact_times = any(isinstance(value, float) and value != int(value) for value in stamps if _is_number(value))
    decoded = pyjwt_claims(keys, token, now, exact_times)
    if decoded is None or repr(decoded) != repr(claims):  # repr: NaN is not equal to itself
        return None
    types = [(("iss", "sub", "jti"), lambda value: isinstance(value, str)), (("exp", "nbf", "iat"), _is_number),
             (("aud", "scope", "scp"), _is_strings)]
    if any(name in claims and not fits(claims[name]) for names, fits in types for name in names):
        return None
    if _controls(claims.get(FORWARDED)):
        return None
    exp, nbf, iat = stamps
    if exact_times and (now - SKEW >= exp or (nbf is not None and nbf > now + SKEW)
                        or (iat is not None and iat > now + SKEW)):
        return None
    return claims


AUTHORIZATION = st.sampled_from(["Bearer {}", "bearer {}", "BEARER  {} ", "Bearer {}\t"])


@given(data=st.data())
@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                    HealthCheck.too_slow])
def test_the_gateway_accepts_exactly_what_pyjwt_accepts_but_for_documented_differences(
    keys, clock, authenticators, data
):
    """Each example sends a few tokens in turn as the clock moves on: new ones, some with the header segment
    of one sent before (the header memo then holds it), and ones sent before again (the caches then hold
    them), to an authenticator whose caches live across examples and to one without; both must give each
    token the verdict of `expected` at that time."""
    sent: list[tuple[str, Signer]] = []
    remembered: list[tuple[str, Signer]] = []
    for _ in range(data.draw(st.integers(1, 4))):
        clock[0] += data.draw(st.sampled_from([0, 0, 1, SKEW - 1, SKEW, SKEW + 1, 2 * SKEW, 300]))
        how = data.draw(st.sampled_from(["new", "header", "again"])) if sent else "new"
        if how == "again":
            token, signer = data.draw(st.sampled_from(sent))
        else:  # "header": with the header of the last token accepted (else sent), its key or another, or forged
            like = (remembered or sent)[-1][1] if how == "header" else None
            token, signer = data.draw(tokens(keys, clock[0], like=like))
        sent.append((token, signer))
        want = expected(keys, token.strip(" \t"), clock[0])  # the gateway strips them, with the scheme
        event("accepted" if want is not None else "refused")
        event(f"{how}: {'accepted' if want is not None else 'refused'}")
        if want is not None:
            remembered.append((token, signer))
        authorization = data.draw(AUTHORIZATION).format(token)
        for auth in authenticators:
            try:
                got: Any = dict(auth.verify(authorization))
            except GatewayError as exc:
                assert exc.status == 401, exc
                got = None
                event(f"gateway: {exc.error_type}")
            assert repr(got) == repr(want), (token, clock[0], auth.cache.size)
