"""JWT authentication with real keys, real signed tokens and a real Redis for the revocation list."""

from __future__ import annotations

import asyncio
import base64
import gc
import hashlib
import hmac
import json
import logging
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import jwt
import pytest
import redis.asyncio
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from hypothesis import example, given, settings
from hypothesis import strategies as st

from apigw.config.errors import ConfigError
from apigw.config.model import AuthConfig, RedisConfig
from apigw.http.errors import GatewayError
from apigw.observability.metrics import Metrics
from apigw.policy.auth import (
    HEADER_MEMO_SIZE,
    MAX_TOKEN_LENGTH,
    NO_EXP_CACHE_SECONDS,
    REFUSED_CACHE_SECONDS,
    Authenticator,
    Claims,
    plain_text,
)
from apigw.redis.batch import RedisBatch
from apigw.testkit.clock import FakeClock
from apigw.testkit.redis import RedisServer
from apigw.testkit.tokens import SigningKey, write_jwks
from tests.test_redislink import RawRedis

NOW = 1_800_000_000.0

JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.integers(min_value=2**1024) | st.floats() | st.text(max_size=10),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3),
    max_leaves=6,
)
"""Any JSON value a claim may hold (texts of any characters, controls included; NaN, infinities and ints
too large for a float, which Python's JSON parser accepts)."""


@pytest.fixture(scope="module")
def rsa_key() -> SigningKey:
    return SigningKey("rsa", kid="rsa-1")


@pytest.fixture(scope="module")
def ec_key() -> SigningKey:
    return SigningKey("ec", kid="ec-1")


@pytest.fixture(scope="module")
def ed_key() -> SigningKey:
    return SigningKey("ed25519", kid="ed-1")


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(NOW)


@pytest.fixture
async def make_auth(tmp_path: Path, clock: FakeClock, metrics: Metrics) -> AsyncIterator[Callable[..., Authenticator]]:
    """An authenticator over the public halves of `keys`, each in its own PEM file named by kid
    (`write=False`: over the files as they are now, as a reload reads them); revocations in `redis`."""
    batches: list[RedisBatch] = []

    def make(*keys: SigningKey, redis: RedisServer | None = None, write: bool = True, **settings: Any) -> Authenticator:
        files = [tmp_path / f"{key.kid}.pem" for key in keys]
        if write:
            for key, file in zip(keys, files):
                key.write_public_pem(file)
        entries = [{"file": file, "kid": key.kid} for key, file in zip(keys, files)]
        config = AuthConfig.model_validate({"keys": entries, **settings})
        if redis is not None:  # bounded as the gateway's: a dead or paused Redis fails fast
            batches.append(RedisBatch(RedisConfig(url=redis.url, timeout=0.1, connect_timeout=0.2)))
        return Authenticator.build(config, metrics, batches[-1] if redis else None, clock=clock)

    yield make
    for batch in batches:
        await batch.aclose()


@pytest.fixture(scope="module")
def claims_auth(tmp_path_factory: pytest.TempPathFactory) -> tuple[Authenticator, SigningKey]:
    """For property tests (which run many examples in one test): an Ed25519 key (fast to sign with) and an
    authenticator that forwards `name`, fixed at NOW, without cache so every example is verified."""
    key = SigningKey("ed25519")
    pem = key.write_public_pem(tmp_path_factory.mktemp("keys") / "key.pem")
    config = AuthConfig.model_validate(
        {"keys": [{"file": pem}], "forward_claims": {"name": "X-Name"}, "cache_size": 0}
    )
    return Authenticator.build(config, Metrics(), None, clock=lambda: NOW), key


@pytest.fixture
async def redis_client(redis_server: RedisServer) -> AsyncIterator[redis.asyncio.Redis]:
    """redis-py, to write revocations."""
    client = redis.asyncio.Redis.from_url(redis_server.url, socket_timeout=0.1, socket_connect_timeout=0.2)
    yield client
    await client.aclose()


def attempts(metrics: Metrics, result: str, error_type: str) -> float:
    labels = {"result": result, "error_type": error_type}
    return metrics.registry.get_sample_value("gateway_auth_attempts_total", labels) or 0.0


async def authenticate(auth: Authenticator, authorization: str | None, scopes: tuple[str, ...] = ()) -> Claims:
    """Both steps, as the pipeline takes them (it asks for its rate limit step in between), and the
    success count it adds once the response is out."""
    claims = auth.verify(authorization)
    await auth.admit(claims, scopes)
    auth.count_success()
    return claims


async def rejected(auth: Authenticator, authorization: str | None, scopes: tuple[str, ...] = ()) -> GatewayError:
    with pytest.raises(GatewayError) as caught:
        await authenticate(auth, authorization, scopes)
    return caught.value


B64URL = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def raw_signed(key: SigningKey, header: bytes, payload: bytes, algorithm: str | None = None) -> str:
    """A token `key` signed (with `algorithm`, by default its own) over exactly these header and payload bytes."""
    signing_input = f"{b64(header)}.{b64(payload)}"
    signature = jwt.get_algorithm_by_name(algorithm or key.algorithm).sign(signing_input.encode(), key.private_key)
    return f"{signing_input}.{b64(signature)}"


def hand_made(header: dict[str, Any], payload: dict[str, Any], secret: bytes = b"") -> str:
    """A token built without PyJWT's guards, HMAC-SHA256 signed with `secret`."""
    return hmac_signed(json.dumps(header).encode(), payload, secret)


def hmac_signed(header: bytes, payload: dict[str, Any], secret: bytes) -> str:
    signing_input = f"{b64(header)}.{b64(json.dumps(payload).encode())}"
    signature = hmac.new(secret, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{b64(signature)}"


# --- valid tokens -------------------------------------------------------------------------------


@pytest.mark.parametrize("key_name", ["rsa_key", "ec_key", "ed_key"])
async def test_a_valid_token_of_each_key_type_is_accepted(request, make_auth, clock, metrics, key_name):
    key = request.getfixturevalue(key_name)
    auth = make_auth(key)
    claims = await authenticate(auth, f"Bearer {key.token(now=clock.now, sub='alice')}", ())
    assert claims["sub"] == "alice"
    assert attempts(metrics, "success", "none") == 1


async def test_keys_of_all_types_side_by_side_each_verify_their_own_tokens(make_auth, clock, rsa_key, ec_key, ed_key):
    auth = make_auth(rsa_key, ec_key, ed_key)
    for key in (rsa_key, ec_key, ed_key):
        claims = await authenticate(auth, f"Bearer {key.token(now=clock.now, sub=key.kid)}", ())
        assert claims["sub"] == key.kid


async def test_scheme_is_case_insensitive_and_claims_are_read_only(make_auth, clock, rsa_key):
    auth = make_auth(rsa_key)
    claims = await authenticate(auth, f"bearer {rsa_key.token(now=clock.now)}", ())
    with pytest.raises(TypeError):
        claims["sub"] = "mallory"  # type: ignore[index]


# --- rejections ---------------------------------------------------------------------------------


async def test_missing_token_is_401_with_a_bare_bearer_challenge(make_auth, metrics, rsa_key):
    auth = make_auth(rsa_key)
    for authorization in (None, ""):
        error = await rejected(auth, authorization)
        assert (error.status, error.error_type) == (401, "missing_token")
        assert error.headers == {"WWW-Authenticate": "Bearer"}
    assert attempts(metrics, "failure", "missing_token") == 2


def _hostile_tokens(rsa_key: SigningKey, ec_key: SigningKey, now: float) -> dict[str, tuple[str, str]]:
    """name -> (Authorization header, expected error_type), against an authenticator holding rsa_key."""
    valid = rsa_key.token(now=now)
    header, payload, signature = valid.split(".")
    claims = {"sub": "mallory", "exp": int(now) + 300}
    padded = rsa_key.token(now=now, padding="x" * MAX_TOKEN_LENGTH)
    other_signature = rsa_key.token(now=now).split(".")[2]
    rs256 = json.dumps({"alg": "RS256", "kid": "rsa-1"}).encode()
    stray = B64URL[B64URL.index(signature[-1]) + 1]  # 256 bytes end in one: the last character's low 4 bits are spare
    not_utf8, tab = b'{"alg":"RS256","sub":"\xff"}', "\t"
    none_last, rs256_last = b'{"alg":"RS256","alg":"none"}', b'{"alg":"HS256","alg":"RS256"}'
    return {
        "alg none": (f"Bearer {jwt.encode(claims, None, algorithm='none')}", "disallowed_alg"),
        "alg none, kid set": (f"Bearer {hand_made({'alg': 'none', 'kid': 'rsa-1'}, claims)}", "disallowed_alg"),
        "HS256 signed with the public key PEM": (
            f"Bearer {hand_made({'alg': 'HS256', 'kid': 'rsa-1', 'typ': 'JWT'}, claims, rsa_key.public_pem)}",
            "disallowed_alg",
        ),
        "ES256 token naming the RSA key's kid": (f"Bearer {ec_key.token(now=now, kid='rsa-1')}", "disallowed_alg"),
        "RS512, not in the allow-list": (f"Bearer {rsa_key.token(now=now, algorithm='RS512')}", "disallowed_alg"),
        "alg not a string": (f"Bearer {hand_made({'alg': ['RS256']}, claims)}", "malformed"),
        "truncated in the payload": (f"Bearer {header}.{payload[:10]}", "malformed"),
        "signature cut to an impossible base64 length": (f"Bearer {header}.{payload}.{signature[:-1]}", "malformed"),
        "signature cut short": (f"Bearer {header}.{payload}.{signature[:-2]}", "bad_signature"),
        "signature of another token": (f"Bearer {header}.{payload}.{other_signature}", "bad_signature"),
        "huge garbage": ("Bearer " + "A" * (MAX_TOKEN_LENGTH + 1), "malformed"),
        "huge but validly signed": (f"Bearer {padded}", "malformed"),
        "garbage base64": ("Bearer !!!.@@@.###", "malformed"),
        "base64 of no JSON": (f"Bearer {b64(b'hello')}.{b64(b'world')}.{signature}", "malformed"),
        "header a JSON array": (f"Bearer {b64(b'[1]')}.{payload}.{signature}", "malformed"),
        "one segment": ("Bearer abcdef", "malformed"),
        "not Bearer": (f"Basic {base64.b64encode(b'user:pass').decode()}", "malformed"),
        "Token scheme": (f"Token {valid}", "malformed"),
        "Bearer without token": ("Bearer ", "malformed"),
        "wrong kid": (f"Bearer {rsa_key.token(now=now, kid='nobody')}", "unknown_kid"),
        "kid not a string": (f"Bearer {hand_made({'alg': 'RS256', 'kid': 7}, claims)}", "malformed"),
        "signed by another key with the same kid": (
            f"Bearer {SigningKey('rsa', kid='rsa-1').token(now=now)}", "bad_signature"
        ),
        # the parser: segments, base64url, JSON
        "four segments": (f"Bearer {valid}.{signature}", "malformed"),
        "three empty segments": ("Bearer ..", "malformed"),
        "empty signature": (f"Bearer {header}.{payload}.", "bad_signature"),
        "a + of the standard alphabet": (f"Bearer {header}.{payload}.+{signature[1:]}", "malformed"),
        "a / of the standard alphabet": (f"Bearer {header}.{payload}./{signature[1:]}", "malformed"),
        "padding one = short": (f"Bearer {header}.{payload}.{signature}=", "malformed"),
        "padding one = too many": (f"Bearer {header}.{payload}.{signature}===", "malformed"),
        "padding inside a segment": (f"Bearer {header}.{payload}.{signature[:2]}=={signature[2:]}", "malformed"),
        "a stray bit in the last character": (f"Bearer {header}.{payload}.{signature[:-1]}{stray}", "malformed"),
        "a space inside": (f"Bearer {header}.{payload}. {signature}", "malformed"),
        "a tab inside": (f"Bearer {header}.{payload}{tab}.{signature}", "malformed"),
        "a non-ASCII character": (f"Bearer {header}.{payload}.{signature[:-1]}é", "malformed"),
        "header nested deeper than the JSON parser goes": (f"Bearer {b64(b'[' * 4000)}.{payload}.{signature}", "malformed"),
        "header a big object within the size limit": (
            f"Bearer {b64(json.dumps({'alg': 'RS256', 'x': 'a' * 5000}).encode())}.{payload}.{signature}",
            "bad_signature",
        ),
        "header naming alg twice, none last": (f"Bearer {b64(none_last)}.{payload}.{signature}", "disallowed_alg"),
        "header naming alg twice, HS256 signed, RS256 last": (
            f"Bearer {hmac_signed(rs256_last, claims, rsa_key.public_pem)}", "bad_signature"
        ),
        "header not UTF-8": (f"Bearer {b64(not_utf8)}.{payload}.{signature}", "malformed"),
        "payload not JSON, validly signed": (f"Bearer {raw_signed(rsa_key, rs256, b'hello')}", "malformed"),
        "payload not UTF-8, validly signed": (f"Bearer {raw_signed(rsa_key, rs256, not_utf8)}", "malformed"),
        "payload a JSON array, validly signed": (f"Bearer {raw_signed(rsa_key, rs256, b'[1]')}", "malformed"),
        "payload a JSON string, validly signed": (f"Bearer {raw_signed(rsa_key, rs256, json.dumps('x').encode())}", "malformed"),
        "payload JSON with trailing data, validly signed": (
            f"Bearer {raw_signed(rsa_key, rs256, json.dumps(claims).encode() + b' {}')}", "malformed"
        ),
        "payload not JSON, signature not its own": (f"Bearer {header}.{b64(b'hello')}.{signature}", "bad_signature"),
        "PS256 signature under an RS256 header": (
            f"Bearer {raw_signed(rsa_key, rs256, json.dumps(claims).encode(), algorithm='PS256')}", "bad_signature"
        ),
        "EdDSA header naming the RSA key": (f"Bearer {hand_made({'alg': 'EdDSA', 'kid': 'rsa-1'}, claims)}", "disallowed_alg"),
    }


HOSTILE = list(_hostile_tokens(SigningKey("rsa", kid="rsa-1"), SigningKey("ec"), 0.0))


@pytest.mark.parametrize("name", HOSTILE)
async def test_hostile_tokens_are_rejected_with_their_cause_and_never_echoed(
    make_auth, clock, metrics, rsa_key, ec_key, name
):
    auth = make_auth(rsa_key)
    authorization, error_type = _hostile_tokens(rsa_key, ec_key, clock.now)[name]
    error = await rejected(auth, authorization)
    assert (error.status, error.error_type) == (401, error_type)
    assert error.headers["WWW-Authenticate"].startswith('Bearer error="invalid_token", error_description="')
    token = authorization.partition(" ")[2]
    assert not token or token not in f"{error} {error.message} {error.headers}"
    assert attempts(metrics, "failure", error_type) == 1
    assert attempts(metrics, "success", "none") == 0


async def test_a_huge_token_is_rejected_before_decoding(make_auth, clock, rsa_key):
    auth = make_auth(rsa_key)
    await rejected(auth, f"Bearer {rsa_key.token(now=clock.now, padding='x' * MAX_TOKEN_LENGTH)}")
    assert auth.cache.misses == 0  # every decode follows a cache miss


MANGLING = st.lists(
    st.tuples(st.sampled_from(["replace", "insert", "delete"]), st.integers(min_value=0),
              st.sampled_from(B64URL[:4] + B64URL[-6:] + ".=+/ \t\x00{}\"\\é\u2028")),
    min_size=1, max_size=4,
)


@given(edits=MANGLING)
@settings(max_examples=300, deadline=None)
def test_any_change_to_a_valid_token_is_refused_unless_only_padding_differs(claims_auth, edits):
    """The rule: a valid token with characters replaced, inserted or removed is a 401, unless all that then
    differs is right `=` padding after the signature (or whitespace around the token), when it carries the
    same claims: one token, one spelling, whatever a lenient base64 or JSON reader would accept."""
    auth, key = claims_auth
    claims = {"sub": "alice", "exp": int(NOW) + 60}
    token = key.signed(claims)
    chars = list(token)
    for edit, at, char in edits:
        at %= len(chars) + 1
        if edit == "insert":
            chars.insert(at, char)
        elif at < len(chars):
            chars[at:at + 1] = [char] if edit == "replace" else []
    mangled = "".join(chars)
    try:
        verified = auth.verify(f"Bearer {mangled}")
    except GatewayError as exc:
        assert (exc.status, exc.error_type) in {(401, "malformed"), (401, "bad_signature"), (401, "disallowed_alg"),
                                                (401, "unknown_kid"), (401, "missing_token")}
        return
    assert mangled.strip().rstrip("=") == token
    assert dict(verified) == claims


async def test_right_base64_padding_is_tolerated_where_the_signature_allows(make_auth, clock, rsa_key):
    """Some issuers pad segments with `=` (PyJWT accepts it too). Right padding decodes, but the signature
    covers the header and payload as sent: padding added to them afterwards is a bad signature."""
    auth = make_auth(rsa_key)
    tokens = (rsa_key.token(now=clock.now, sub=sub) for sub in ("p", "pa", "pad"))
    header, payload, signature = next(t.split(".") for t in tokens if len(t.split(".")[1]) % 4)
    assert len(signature) % 4 == 2
    assert await authenticate(auth, f"Bearer {header}.{payload}.{signature}==", ())
    padded = payload + "=" * (-len(payload) % 4)
    assert (await rejected(auth, f"Bearer {header}.{padded}.{signature}")).error_type == "bad_signature"


def canonical_b64url(segment: str) -> bool:
    """The rule, spelled out: base64url characters, a length base64 can have, no bits set beyond the data in
    the last character, and `=` padding, if any, exactly to a multiple of 4."""
    body = segment.rstrip("=")
    padding = len(segment) - len(body)
    if (padding and padding != -len(body) % 4) or set(body) - set(B64URL) or len(body) % 4 == 1:
        return False
    return b64(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4))) == body


@given(segment=st.text(alphabet=B64URL[:3] + "QgwEMk" + B64URL[-4:] + "=+/ .", max_size=13))
@example(segment="AAAA=")
@example(segment="QQ=")
@example(segment="QR")
@example(segment="QQ===")
@settings(max_examples=500, deadline=None)
def test_a_payload_segment_decodes_only_if_canonical_base64url(claims_auth, segment):
    """Segments are decoded before the signature is checked: a canonical one gets as far as the signature
    (bad_signature, since the payload is not the signed one), any other spelling is malformed."""
    auth, key = claims_auth
    header, _, signature = key.signed({"sub": "alice", "exp": int(NOW) + 60}).split(".")
    with pytest.raises(GatewayError) as caught:
        auth.verify(f"Bearer {header}.{segment}.{signature}")
    assert caught.value.error_type == ("bad_signature" if canonical_b64url(segment) else "malformed")


@given(before=st.text(alphabet=" \t\n\r\x0b\x0c\xa0x", max_size=3), after=st.text(alphabet=" \t\n\r\x0b\x0c\xa0x{}", max_size=3))
@settings(max_examples=200, deadline=None)
def test_claims_are_one_json_object_with_only_json_whitespace_around(claims_auth, before, after):
    """Signed claims with characters around the object verify exactly when those are JSON's whitespace
    (space, tab, CR, LF), as `json.loads` reads them."""
    auth, key = claims_auth
    claims = {"sub": "alice", "exp": int(NOW) + 60}
    token = raw_signed(key, b'{"alg":"EdDSA"}', f"{before}{json.dumps(claims)}{after}".encode())
    if set(before + after) <= set(" \t\n\r"):
        assert dict(auth.verify(f"Bearer {token}")) == claims
    else:
        with pytest.raises(GatewayError) as caught:
            auth.verify(f"Bearer {token}")
        assert caught.value.error_type == "malformed"


async def test_a_remembered_header_is_one_that_verified_and_the_memo_is_bounded(make_auth, clock, rsa_key):
    """A header segment is remembered with its verifiers only once a signature has verified with it: forged
    tokens, each with a header of its own, leave the memo as it was. Issuer-signed headers beyond
    HEADER_MEMO_SIZE start it afresh, and every token is still checked in full."""
    auth = make_auth(rsa_key)
    token = rsa_key.token(now=clock.now)
    await authenticate(auth, f"Bearer {token}")
    assert list(auth.header_memo) == [token.split(".")[0].encode()]
    signature = token.split(".")[2]
    for n in range(HEADER_MEMO_SIZE + 5):
        header = b64(json.dumps({"alg": "RS256", "typ": "JWT", "n": n}).encode())
        error = await rejected(auth, f"Bearer {header}.{token.split('.')[1]}.{signature}")
        assert error.error_type == "bad_signature"
    assert list(auth.header_memo) == [token.split(".")[0].encode()]
    header, payload, _ = token.split(".")
    assert (await rejected(auth, f"Bearer {header}.{payload}.{b64(bytes(256))}")).error_type == "bad_signature"
    for n in range(HEADER_MEMO_SIZE + 5):
        signed = raw_signed(rsa_key, json.dumps({"alg": "RS256", "n": n}).encode(),
                            json.dumps({"sub": f"user-{n}", "exp": int(clock.now) + 60}).encode())
        assert (await authenticate(auth, f"Bearer {signed}"))["sub"] == f"user-{n}"
        assert 1 <= len(auth.header_memo) <= HEADER_MEMO_SIZE


async def test_an_ecdsa_signature_must_be_r_and_s_of_the_curve_size(make_auth, clock, ec_key):
    """RFC 7518 3.4: R || S, 32 bytes each for P-256; DER (what some libraries emit by mistake), a byte more
    or less, or zeros are a bad signature, never an exception."""
    auth = make_auth(ec_key)
    token = ec_key.token(now=clock.now)
    header, payload, signature = token.split(".")
    raw = base64.urlsafe_b64decode(signature + "==")
    der = encode_dss_signature(int.from_bytes(raw[:32], "big"), int.from_bytes(raw[32:], "big"))
    for variant in (der, raw[:-1], raw + b"\0", b"\0" + raw, bytes(64), raw[32:] + raw[:32]):
        error = await rejected(auth, f"Bearer {header}.{payload}.{b64(variant)}")
        assert error.error_type == "bad_signature"
    assert await authenticate(auth, f"Bearer {token}", ())


ALGORITHMS = ["RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA"]


@pytest.mark.parametrize("algorithm", ALGORITHMS)
async def test_every_algorithm_verifies_with_its_key_and_no_other(tmp_path, clock, metrics, algorithm):
    kind = {"R": "rsa", "P": "rsa", "E": "ec", "Ed": "ed25519"}[algorithm[:2] if algorithm == "EdDSA" else algorithm[0]]
    key, impostor = (SigningKey(kind, algorithm=algorithm) for _ in range(2))
    config = AuthConfig.model_validate({"keys": [{"file": key.write_public_pem(tmp_path / "key.pem")}],
                                        "algorithms": ALGORITHMS})
    auth = Authenticator.build(config, metrics, None, clock=clock)
    assert (await authenticate(auth, f"Bearer {key.token(now=clock.now, sub=algorithm)}", ()))["sub"] == algorithm
    assert (await rejected(auth, f"Bearer {impostor.token(now=clock.now)}")).error_type == "bad_signature"


@pytest.mark.parametrize(
    ("offset", "error_type"),
    [(-29, None), (-31, "expired"), (-400, "expired")],
    ids=["expired within the skew", "expired beyond the skew", "long expired"],
)
async def test_exp_honours_the_clock_skew(make_auth, clock, rsa_key, offset, error_type):
    auth = make_auth(rsa_key, clock_skew="30s")
    token = rsa_key.token(now=clock.now + offset - 300)  # exp = now + offset
    if error_type is None:
        assert await authenticate(auth, f"Bearer {token}", ())
    else:
        assert (await rejected(auth, f"Bearer {token}")).error_type == error_type


@pytest.mark.parametrize("claim", ["nbf", "iat"])
async def test_tokens_from_the_future_honour_the_clock_skew(make_auth, clock, rsa_key, claim):
    auth = make_auth(rsa_key, clock_skew=30)
    early = rsa_key.token(now=clock.now, **{claim: int(clock.now) + 20})
    assert await authenticate(auth, f"Bearer {early}", ())
    too_early = rsa_key.token(now=clock.now, **{claim: int(clock.now) + 40})
    assert (await rejected(auth, f"Bearer {too_early}")).error_type == "not_yet_valid"


@pytest.mark.parametrize("value", ["soon", True, [1]])
async def test_time_claims_must_be_numbers(make_auth, clock, rsa_key, value):
    auth = make_auth(rsa_key)
    assert (await rejected(auth, f"Bearer {rsa_key.token(now=clock.now, exp=value)}")).error_type == "malformed"


async def test_issuer_and_audience_are_checked_when_configured(make_auth, clock, metrics, rsa_key):
    auth = make_auth(rsa_key, issuer="https://idp.example", audience="api")

    def token(**claims: Any) -> str:
        return f"Bearer {rsa_key.token(now=clock.now, **claims)}"

    assert await authenticate(auth, token(iss="https://idp.example", aud="api"), ())
    assert await authenticate(auth, token(iss="https://idp.example", aud=["other", "api"]), ())
    for claims, error_type in [
        ({"iss": "https://evil.example", "aud": "api"}, "bad_issuer"),
        ({"aud": "api"}, "bad_issuer"),
        ({"iss": "https://idp.example", "aud": "other"}, "bad_audience"),
        ({"iss": "https://idp.example"}, "bad_audience"),
    ]:
        assert (await rejected(auth, token(**claims))).error_type == error_type
    assert attempts(metrics, "failure", "bad_issuer") == 2
    assert attempts(metrics, "failure", "bad_audience") == 2


async def test_issuer_and_audience_are_not_checked_when_not_configured(make_auth, clock, rsa_key):
    auth = make_auth(rsa_key)
    assert await authenticate(auth, f"Bearer {rsa_key.token(now=clock.now, iss='anyone', aud='anything')}", ())


# --- what a token must carry: required claims, no crit, claims of their types ------------------------


async def test_exp_is_required_by_default(make_auth, clock, metrics, rsa_key):
    auth = make_auth(rsa_key)
    error = await rejected(auth, f"Bearer {rsa_key.token(now=clock.now, ttl=None)}")
    assert (error.status, error.error_type) == (401, "missing_claim")
    assert error.headers == {"WWW-Authenticate": (
        'Bearer error="invalid_token", error_description="the token lacks the required claim exp"')}
    assert attempts(metrics, "failure", "missing_claim") == 1
    assert len(auth.cache.entries) == 0


async def test_required_claims_are_configurable(make_auth, clock, rsa_key):
    auth = make_auth(rsa_key, required_claims=["exp", "sub", "https://idp.example/tenant"])
    tenant = {"https://idp.example/tenant": "t1"}
    assert await authenticate(auth, f"Bearer {rsa_key.token(now=clock.now, **tenant)}", ())
    for claims, missing in [({"sub": None, **tenant}, "sub"), ({}, "https://idp.example/tenant"),
                            ({"https://idp.example/tenant": None}, "https://idp.example/tenant")]:
        error = await rejected(auth, f"Bearer {rsa_key.token(now=clock.now, **claims)}")
        assert (error.error_type, error.message) == ("missing_claim", f"the token lacks the required claim {missing}")


async def test_no_required_claims_accepts_a_token_that_never_expires(make_auth, clock, rsa_key):
    auth = make_auth(rsa_key, required_claims=[])
    assert await authenticate(auth, f"Bearer {rsa_key.token(now=clock.now, ttl=None)}", ())


@pytest.mark.parametrize("name", ["", "a b", 'a"b', "a\\b", "é", "a\nb"])
@pytest.mark.parametrize("setting", ["required_claims", "forward_claims"])
def test_claim_names_in_the_config_are_checked(name, setting):
    value = [name] if setting == "required_claims" else {name: "X-Claim"}
    with pytest.raises(ValueError, match="is not a claim name"):
        AuthConfig.model_validate({setting: value})


@pytest.mark.parametrize("crit", [["exp"], ["b64"], ["https://example.com/ext"], [], "b64", None])
async def test_a_token_with_a_crit_header_is_refused(make_auth, clock, metrics, rsa_key, crit):
    """RFC 7515 4.1.11: extensions named in `crit` must be understood, and the gateway understands none."""
    auth = make_auth(rsa_key)
    token = rsa_key.signed({"sub": "a", "exp": int(clock.now) + 60}, {"crit": crit, "exp": int(clock.now) + 60})
    error = await rejected(auth, f"Bearer {token}")
    assert (error.status, error.error_type) == (401, "malformed")
    assert "crit" in error.message
    assert attempts(metrics, "failure", "malformed") == 1


WRONG_TYPES = {
    "iss": [1, 1.5, True, None, ["https://idp.example"], {"a": 1}],
    "sub": [42, False, None, ["alice"], {"id": "alice"}],
    "jti": [7, True, None, ["t-1"], {"id": 1}],
    "exp": ["1800000300", True, None, [1800000300], {"t": 1}, float("inf"), float("nan")],
    "nbf": ["0", False, None, [0]],
    "iat": ["now", True, None, [0]],
    "aud": [1, True, None, {"a": "b"}, ["api", 2], [["api"]]],
    "scope": [1, True, None, {"read": True}, ["read", 1], [None]],
    "scp": [1, False, None, ["read", ["write"]]],
}
WRONG_TYPE_CASES = [(claim, value) for claim, values in WRONG_TYPES.items() for value in values]


@pytest.mark.parametrize(("claim", "value"), WRONG_TYPE_CASES, ids=[f"{c}={v!r}" for c, v in WRONG_TYPE_CASES])
async def test_a_claim_of_the_wrong_type_is_401_malformed(make_auth, clock, metrics, rsa_key, redis_server, claim, value):
    """Revocation (jti) and scopes (scope, scp) are in play, so a wrong type would otherwise reach their code."""
    auth = make_auth(rsa_key, redis=redis_server, required_claims=[])
    token = rsa_key.signed({"sub": "test-user", "jti": "t-1", "exp": int(clock.now) + 300, claim: value})
    error = await rejected(auth, f"Bearer {token}", ("read",))
    assert (error.status, error.error_type) == (401, "malformed")
    assert error.message.startswith(f"the token's {claim} claim must be ")
    assert attempts(metrics, "failure", "malformed") == 1


@pytest.mark.parametrize("claims", [
    {"iss": "https://idp.example", "sub": "alice", "jti": "t-1", "aud": "api", "scope": "read"},
    {"aud": ["api", "other"], "scp": ["read", "write"], "iat": 1_799_999_999.5, "nbf": 0},
    {"aud": [], "scope": [], "scp": ""},
    {"exp": 10**400, "nbf": -(10**400)},
], ids=["strings", "lists and float times", "empty", "times too large for a float"])
async def test_claims_of_the_right_types_are_accepted(make_auth, clock, rsa_key, claims):
    auth = make_auth(rsa_key)
    assert await authenticate(auth, f"Bearer {rsa_key.token(now=clock.now, **claims)}", ())


CLAIM_TYPE_RULES = {
    **{name: lambda v: isinstance(v, str) for name in ("iss", "sub", "jti")},
    **{name: lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) for name in ("exp", "nbf", "iat")},
    **{name: lambda v: isinstance(v, str) or (isinstance(v, list) and all(isinstance(i, str) for i in v))
       for name in ("aud", "scope", "scp")},
}


@given(claim=st.sampled_from(sorted(CLAIM_TYPE_RULES)), value=JSON_VALUES)
@settings(max_examples=300, deadline=None)
def test_any_wrongly_typed_registered_claim_is_401_malformed(claims_auth, claim, value):
    """The rule: a registered (or scope) claim whose JSON type is not its own makes the token a 401
    `malformed` (a null `exp`, required by default, counts as missing), whatever the value; one of its own
    type never does."""
    auth, key = claims_auth
    payload = {"sub": "test-user", "iat": int(NOW), "exp": int(NOW) + 300, claim: value}
    if claim in ("exp", "nbf", "iat") and CLAIM_TYPE_RULES[claim](value):
        payload[claim] = {"exp": NOW + 60, "nbf": NOW - 60, "iat": NOW - 60}[claim]  # a time of its type, in range
    token = key.signed(payload)
    if CLAIM_TYPE_RULES[claim](payload[claim]):
        assert auth.verify(f"Bearer {token}")[claim] == payload[claim]
    else:
        with pytest.raises(GatewayError) as caught:
            auth.verify(f"Bearer {token}")
        missing = claim == "exp" and value is None
        assert (caught.value.status, caught.value.error_type) == (401, "missing_claim" if missing else "malformed")


# --- the audience warning ------------------------------------------------------------------------------


def test_keys_without_an_audience_log_a_warning_naming_no_token(tmp_path, metrics, rsa_key, caplog):
    pem = rsa_key.write_public_pem(tmp_path / "key.pem")
    caplog.set_level(logging.WARNING, logger="apigw.auth")
    Authenticator.build(AuthConfig.model_validate({"keys": [{"file": pem}]}), metrics, None)
    [record] = caplog.records
    assert record.levelno == logging.WARNING
    assert record.getMessage().startswith("auth.audience is not set: tokens signed by the configured keys are accepted")
    caplog.clear()
    Authenticator.build(AuthConfig.model_validate({"keys": [{"file": pem}], "audience": "api"}), metrics, None)
    Authenticator.build(AuthConfig(), metrics, None)  # no keys: no auth, nothing to warn about
    assert caplog.records == []


async def test_scopes_from_scope_or_scp_and_403_when_one_is_missing(make_auth, clock, metrics, rsa_key):
    auth = make_auth(rsa_key)
    assert await authenticate(auth, f"Bearer {rsa_key.token(now=clock.now, scope='read write')}", ("read", "write"))
    assert await authenticate(auth, f"Bearer {rsa_key.token(now=clock.now, scp=['read'])}", ("read",))
    error = await rejected(auth, f"Bearer {rsa_key.token(now=clock.now, scope='read')}", ("read", "admin"))
    assert (error.status, error.error_type) == (403, "insufficient_scope")
    assert error.headers == {"WWW-Authenticate": 'Bearer error="insufficient_scope", scope="read admin"'}
    assert attempts(metrics, "failure", "insufficient_scope") == 1
    assert attempts(metrics, "success", "none") == 2


# --- forwarded claims -------------------------------------------------------------------------


async def test_forwarded_claims_become_headers_and_their_names_are_stripped(make_auth, clock, rsa_key):
    forward = {"sub": "X-User", "roles": "X-Roles", "name": "X-Name", "tenant": "X-Tenant"}
    auth = make_auth(rsa_key, forward_claims=forward)
    assert auth.stripped_headers == frozenset({"x-user", "x-roles", "x-name", "x-tenant"})
    token = rsa_key.token(now=clock.now, roles=["a", "b"], name="Zoë: y")
    claims = await authenticate(auth, f"Bearer {token}", ())
    assert auth.forward_headers(claims) == {"X-User": "test-user", "X-Roles": '["a","b"]', "X-Name": '"Zo\\u00eb: y"'}


@pytest.mark.parametrize("value", [
    "alice\r\nX-Admin: true", "alice\n", "alice\r", "a\x00b", "a\x7f", "a\x85b", "a\u2028b", "\t",
    ["ok", "bad\nline"], {"k\r\n": "v"}, {"k": ["deep", {"deeper": "x\x01"}]},
], ids=repr)
async def test_a_forwarded_claim_with_control_characters_refuses_the_token(make_auth, clock, metrics, rsa_key, value):
    """Whatever the backend decodes from a forwarded header (JSON included) holds no line break or control."""
    auth = make_auth(rsa_key, forward_claims={"name": "X-Name"})
    error = await rejected(auth, f"Bearer {rsa_key.token(now=clock.now, name=value)}")
    assert (error.status, error.error_type) == (401, "malformed")
    assert "name claim holds control characters" in error.message
    assert attempts(metrics, "failure", "malformed") == 1


async def test_control_characters_in_claims_that_are_not_forwarded_do_not_matter(make_auth, clock, rsa_key):
    auth = make_auth(rsa_key, forward_claims={"sub": "X-User"})
    token = rsa_key.token(now=clock.now, note="two\nlines")
    claims = await authenticate(auth, f"Bearer {token}", ())
    assert auth.forward_headers(claims) == {"X-User": "test-user"}


@given(value=JSON_VALUES)
@settings(max_examples=150, deadline=None)
def test_forwarded_headers_are_printable_ascii_or_the_token_is_refused(claims_auth, value):
    """For any claim value: 401, or every forwarded header value is printable ASCII (no CR, LF, NUL, DEL)."""
    auth, key = claims_auth
    try:
        claims = auth.verify(f"Bearer {key.signed({'exp': int(NOW) + 60, 'name': value})}")
    except GatewayError as exc:
        assert (exc.status, exc.error_type) == (401, "malformed")
        return
    for header in auth.forward_headers(claims).values():
        assert header.isascii() and header.isprintable(), header


# --- keys: loading, rotation, reload -------------------------------------------------------------


def test_an_unreadable_key_file_is_a_located_config_error(tmp_path, metrics, rsa_key):
    good = rsa_key.write_public_pem(tmp_path / "good.pem")
    missing = tmp_path / "missing.pem"
    config = AuthConfig.model_validate({"keys": [{"file": good}, {"file": missing}]})
    with pytest.raises(ConfigError) as caught:
        Authenticator.build(config, metrics, None)
    assert caught.value.errors == [f"auth.keys[1].file: cannot read {missing}: No such file or directory"]


def _pem(private_key: Any, private: bool = False) -> bytes:
    if private:
        return private_key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    public = private_key.public_key()
    return public.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"hello", "not a PEM public key"),
        (b"-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n", "not a PEM public key"),
        (
            _pem(rsa.generate_private_key(65537, 2048), private=True),
            "holds a private key (PRIVATE KEY); give the gateway only the public key",
        ),
        (_pem(rsa.generate_private_key(65537, 1024)), "RSA key of 1024 bits is too short (at least 2048)"),
        (
            _pem(ec.generate_private_key(ec.SECP384R1())),
            "EC secp384r1 key verifies ES384, none of which is in auth.algorithms",
        ),
        (_pem(ec.generate_private_key(ec.SECP256K1())), "EC secp256k1 key cannot verify any supported algorithm"),
    ],
    ids=["not PEM", "bad PEM body", "private key", "short RSA key", "algorithm not allowed", "unsupported curve"],
)
def test_an_unusable_key_file_is_a_located_config_error(tmp_path, metrics, content, message):
    (tmp_path / "key.pem").write_bytes(content)
    config = AuthConfig.model_validate({"keys": [{"file": tmp_path / "key.pem"}]})
    with pytest.raises(ConfigError) as caught:
        Authenticator.build(config, metrics, None)
    assert caught.value.errors == [f"auth.keys[0].file: {message}"]


async def test_a_key_file_with_two_keys_accepts_tokens_of_both(tmp_path, make_auth, clock, metrics):
    """The runbook rotates by replacing the single jwt-public-key.pem: old and new may sit in it together."""
    old, new = SigningKey("rsa"), SigningKey("ec")
    (tmp_path / "jwt-public-key.pem").write_bytes(old.public_pem + new.public_pem)
    config = AuthConfig.model_validate({"keys": [{"file": tmp_path / "jwt-public-key.pem"}]})
    auth = Authenticator.build(config, metrics, None, clock=clock)
    for key in (old, new):
        assert await authenticate(auth, f"Bearer {key.token(now=clock.now)}", ())


async def test_rotation_by_kid_and_reload_after_the_file_is_replaced(tmp_path, make_auth, clock, rsa_key, ec_key):
    auth = make_auth(rsa_key, ec_key)
    assert auth.watched_files() == [tmp_path / "rsa-1.pem", tmp_path / "ec-1.pem"]
    old_token = f"Bearer {rsa_key.token(now=clock.now)}"
    assert await authenticate(auth, old_token, ())
    assert await authenticate(auth, f"Bearer {ec_key.token(now=clock.now)}", ())

    successor = SigningKey("rsa", kid="rsa-1")
    successor.write_public_pem(tmp_path / "rsa-1.pem")
    new_token = f"Bearer {successor.token(now=clock.now)}"
    assert await authenticate(auth, old_token, ())  # until reloaded, the keys in force stay
    assert (await rejected(auth, new_token)).error_type == "bad_signature"
    auth = make_auth(rsa_key, ec_key, write=False)  # what a reload does: keys read afresh, new caches
    assert (await rejected(auth, old_token)).error_type == "bad_signature"  # the cached verdict went with the key
    assert await authenticate(auth, new_token, ())  # and so did the refusal
    assert await authenticate(auth, f"Bearer {ec_key.token(now=clock.now)}", ())


async def test_a_bad_key_file_on_reload_keeps_the_keys_in_force(tmp_path, make_auth, clock, rsa_key):
    auth = make_auth(rsa_key)
    (tmp_path / "rsa-1.pem").write_text("half-written")
    with pytest.raises(ConfigError) as caught:
        make_auth(rsa_key, write=False)  # a reload reads the keys afresh, and fails
    assert caught.value.errors == ["auth.keys[0].file: not a PEM public key"]
    assert await authenticate(auth, f"Bearer {rsa_key.token(now=clock.now)}", ())


async def test_a_key_without_kid_checks_tokens_with_any_kid(tmp_path, clock, metrics, rsa_key, ec_key):
    rsa_key.write_public_pem(tmp_path / "any.pem")
    ec_key.write_public_pem(tmp_path / "ec.pem")
    keys = [{"file": tmp_path / "any.pem"}, {"file": tmp_path / "ec.pem", "kid": "ec-1"}]
    config = AuthConfig.model_validate({"keys": keys})
    auth = Authenticator.build(config, metrics, None, clock=clock)
    for kid in ("rsa-1", "whatever", None):
        assert await authenticate(auth, f"Bearer {rsa_key.token(now=clock.now, kid=kid)}", ())
    assert await authenticate(auth, f"Bearer {ec_key.token(now=clock.now)}", ())


async def test_a_jwks_file_provides_keys_by_kid(tmp_path, clock, metrics, rsa_key, ec_key, ed_key):
    jwks = write_jwks(tmp_path / "jwks.json", [rsa_key, ec_key, ed_key])
    auth = Authenticator.build(AuthConfig(jwks_file=jwks), metrics, None, clock=clock)
    assert auth.watched_files() == [jwks]
    for key in (rsa_key, ec_key, ed_key):
        assert await authenticate(auth, f"Bearer {key.token(now=clock.now)}", ())
    assert (await rejected(auth, f"Bearer {rsa_key.token(now=clock.now, kid='gone')}")).error_type == "unknown_kid"


async def test_a_jwks_key_is_held_to_its_alg(tmp_path, clock, metrics, rsa_key):
    jwk = rsa_key.public_jwk() | {"alg": "PS256"}
    (tmp_path / "jwks.json").write_text(json.dumps({"keys": [jwk]}))
    config = AuthConfig(jwks_file=tmp_path / "jwks.json", algorithms=["RS256", "PS256"])
    auth = Authenticator.build(config, metrics, None, clock=clock)
    assert await authenticate(auth, f"Bearer {rsa_key.token(now=clock.now, algorithm='PS256')}", ())
    assert (await rejected(auth, f"Bearer {rsa_key.token(now=clock.now)}")).error_type == "disallowed_alg"


@pytest.mark.parametrize(
    ("document", "message"),
    [
        ("{not json", "auth.jwks_file: not JSON: "),
        ('{"keys": 1}', 'auth.jwks_file: not a JWKS document (expected {"keys": [...]})'),
        ('{"keys": [{"kty": "oct", "k": "c2VjcmV0"}]}', "auth.jwks_file: keys[0]: symmetric (oct) keys are not accepted"),
        ('{"keys": [{"kty": "RSA", "n": "AQAB"}]}', "auth.jwks_file: keys[0]: unusable key (kty 'RSA', crv None, alg None)"),
        ('{"keys": []}', "auth.jwks_file: no signing key for the allowed algorithms (ES256, EdDSA, RS256)"),
    ],
    ids=["not JSON", "not JWKS", "symmetric key", "broken key", "no keys"],
)
def test_an_unusable_jwks_file_is_a_located_config_error(tmp_path, metrics, document, message):
    (tmp_path / "jwks.json").write_text(document)
    with pytest.raises(ConfigError) as caught:
        Authenticator.build(AuthConfig(jwks_file=tmp_path / "jwks.json"), metrics, None)
    [error] = caught.value.errors
    assert error.startswith(message)


async def test_a_jwks_key_for_an_algorithm_the_gateway_does_not_know_is_left_out(tmp_path, clock, metrics, rsa_key):
    """An identity provider's JWKS may hold an ES256K (secp256k1) signing key beside the keys the gateway uses:
    outside the allow-list, it is left out as it is without its `alg`, not an error that refuses the file."""
    secp256k1 = ec.generate_private_key(ec.SECP256K1()).public_key()
    es256k = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(secp256k1)) | {"kid": "k1", "alg": "ES256K", "use": "sig"}
    (tmp_path / "jwks.json").write_text(json.dumps({"keys": [rsa_key.public_jwk(), es256k]}))
    auth = Authenticator.build(AuthConfig(jwks_file=tmp_path / "jwks.json"), metrics, None, clock=clock)
    assert await authenticate(auth, f"Bearer {rsa_key.token(now=clock.now)}", ())
    p384 = SigningKey("ec", algorithm="ES384").public_jwk() | {"alg": "ES256"}
    (tmp_path / "jwks.json").write_text(json.dumps({"keys": [p384]}))
    with pytest.raises(ConfigError) as caught:  # an allowed alg the key cannot verify stays an error
        Authenticator.build(AuthConfig(jwks_file=tmp_path / "jwks.json"), metrics, None)
    assert caught.value.errors == ["auth.jwks_file: keys[0]: alg 'ES256' does not fit EC secp384r1 key"]


@pytest.mark.parametrize("alg", ["none", ["RS256"], {"RS256": True}], ids=["none", "a list", "an object"])
def test_a_jwks_key_whose_alg_is_none_or_not_a_string_is_a_located_config_error(tmp_path, metrics, rsa_key, alg):
    """PyJWK raises NotImplementedError for `"alg": "none"` and TypeError for an alg that cannot be a dict key:
    each such key is unusable like any other, never a traceback from `gateway -validate-config` or at start."""
    (tmp_path / "jwks.json").write_text(json.dumps({"keys": [{**rsa_key.public_jwk(), "alg": alg}]}))
    with pytest.raises(ConfigError) as caught:
        Authenticator.build(AuthConfig(jwks_file=tmp_path / "jwks.json"), metrics, None)
    assert caught.value.errors == [f"auth.jwks_file: keys[0]: unusable key (kty 'RSA', crv None, alg {alg!r})"]


def test_a_jwks_key_whose_kid_is_not_a_string_is_refused(tmp_path, metrics, rsa_key):
    """Read as a key without kid, it would verify tokens naming any kid."""
    (tmp_path / "jwks.json").write_text(json.dumps({"keys": [{**rsa_key.public_jwk(), "kid": 5}]}))
    with pytest.raises(ConfigError) as caught:
        Authenticator.build(AuthConfig(jwks_file=tmp_path / "jwks.json"), metrics, None)
    assert caught.value.errors == ["auth.jwks_file: keys[0]: kid must be a string (got int)"]


def test_a_private_jwk_is_refused_without_echoing_it(tmp_path, metrics):
    private = json.loads(jwt.get_algorithm_by_name("RS256").to_jwk(rsa.generate_private_key(65537, 2048)))
    (tmp_path / "jwks.json").write_text(json.dumps({"keys": [private]}))
    with pytest.raises(ConfigError) as caught:
        Authenticator.build(AuthConfig(jwks_file=tmp_path / "jwks.json"), metrics, None)
    [error] = caught.value.errors
    assert error == "auth.jwks_file: keys[0]: holds private key material; give the gateway only public keys"


# --- the verified-token cache ---------------------------------------------------------------------


async def test_a_repeated_token_is_served_from_the_cache(make_auth, clock, rsa_key):
    auth = make_auth(rsa_key)
    token = f"Bearer {rsa_key.token(now=clock.now)}"
    first = await authenticate(auth, token, ())
    second = await authenticate(auth, token, ())
    assert second == first
    assert (auth.cache.hits, auth.cache.misses) == (1, 1)


async def test_cached_claims_cost_the_garbage_collector_nothing(make_auth, clock, rsa_key):
    """Claims of strings and numbers are kept as an untracked dict, with nothing tracked around them: a
    full cache then adds no object to each walk of the cyclic collector. What a request gets is read-only."""
    auth = make_auth(rsa_key)
    tokens = [rsa_key.token(now=clock.now, sub=f"user-{i}") for i in range(3)]
    for token in tokens:
        await authenticate(auth, f"Bearer {token}", ())
    assert [gc.is_tracked(auth.cache.entries[token]) for token in tokens] == [False] * 3
    claims = await authenticate(auth, f"Bearer {tokens[0]}", ())
    with pytest.raises(TypeError):
        claims["sub"] = "someone-else"  # type: ignore[index]


async def test_the_cache_never_serves_a_token_past_exp(make_auth, clock, metrics, rsa_key):
    auth = make_auth(rsa_key, clock_skew=30)
    token = f"Bearer {rsa_key.token(now=clock.now, ttl=60)}"
    await authenticate(auth, token, ())
    clock.now += 59
    await authenticate(auth, token, ())
    assert (auth.cache.hits, auth.cache.misses) == (1, 1)
    clock.now += 2  # past exp, within the skew: verified afresh, still valid
    await authenticate(auth, token, ())
    assert (auth.cache.hits, auth.cache.misses) == (1, 2)
    clock.now += 30
    assert (await rejected(auth, token)).error_type == "expired"
    assert attempts(metrics, "failure", "expired") == 1


async def test_a_token_without_exp_is_reverified_after_a_short_while(make_auth, clock, rsa_key):
    auth = make_auth(rsa_key, required_claims=[])  # exp is required by default
    token = f"Bearer {rsa_key.token(now=clock.now, ttl=None)}"
    await authenticate(auth, token, ())
    clock.now += NO_EXP_CACHE_SECONDS - 1
    await authenticate(auth, token, ())
    clock.now += 2
    await authenticate(auth, token, ())
    assert (auth.cache.hits, auth.cache.misses) == (1, 2)


async def test_the_cache_is_bounded_least_recently_used_first(make_auth, clock, rsa_key):
    auth = make_auth(rsa_key, cache_size=2)
    a, b, c = (f"Bearer {rsa_key.token(now=clock.now)}" for _ in range(3))
    for token in (a, b, a, c):  # a was used after b: b goes
        await authenticate(auth, token, ())
    assert len(auth.cache.entries) == 2
    hits = auth.cache.hits
    await authenticate(auth, a, ())
    assert auth.cache.hits == hits + 1
    await authenticate(auth, b, ())
    assert auth.cache.hits == hits + 1


async def test_cache_size_zero_verifies_every_time(make_auth, clock, rsa_key):
    auth = make_auth(rsa_key, cache_size=0)
    token = f"Bearer {rsa_key.token(now=clock.now)}"
    for _ in range(3):
        await authenticate(auth, token, ())
    assert (auth.cache.hits, auth.cache.misses) == (0, 3)


# --- the refused-token cache -------------------------------------------------------------------------


@pytest.mark.parametrize("error_type", ["bad_signature", "malformed", "unknown_kid", "disallowed_alg", "missing_claim"])
async def test_a_refused_token_is_remembered_and_every_refusal_counted(make_auth, clock, metrics, rsa_key, error_type):
    auth = make_auth(rsa_key)
    header, payload, signature = rsa_key.token(now=clock.now).split(".")
    token = {
        "bad_signature": f"{header}.{payload}.{signature[:-4]}AAAA",
        "malformed": f"{header}.{payload}.{signature}=",
        "unknown_kid": rsa_key.token(now=clock.now, kid="gone"),
        "disallowed_alg": rsa_key.token(now=clock.now, algorithm="RS512"),
        "missing_claim": rsa_key.token(now=clock.now, ttl=None),
    }[error_type]
    errors = [await rejected(auth, f"Bearer {token}") for _ in range(3)]
    assert {(e.status, e.error_type, e.message, tuple(e.headers.items())) for e in errors} == {
        (401, error_type, errors[0].message, tuple(errors[0].headers.items()))}
    assert len({id(e) for e in errors}) == 3  # a fresh error each time: no traceback piles up on one
    assert (auth.refused.hits, auth.refused.misses) == (2, 1)
    assert attempts(metrics, "failure", error_type) == 3


async def test_an_expired_token_is_remembered_and_stays_expired(make_auth, clock, metrics, rsa_key):
    auth = make_auth(rsa_key, clock_skew=30)
    token = f"Bearer {rsa_key.token(now=clock.now, ttl=10)}"
    assert await authenticate(auth, token, ())
    clock.now += 41
    assert (await rejected(auth, token)).error_type == "expired"
    clock.now += REFUSED_CACHE_SECONDS - 1
    assert (await rejected(auth, token)).error_type == "expired"
    assert auth.refused.hits == 1
    clock.now += 10**6  # the refusal is forgotten (a clock stepped back would be trusted again), then made again
    assert (await rejected(auth, token)).error_type == "expired"
    assert auth.refused.hits == 1
    assert attempts(metrics, "failure", "expired") == 3


async def test_a_token_in_its_clock_skew_grace_is_accepted_without_evicting_cached_tokens(make_auth, clock, rsa_key):
    auth = make_auth(rsa_key, clock_skew=30, cache_size=2)
    live = f"Bearer {rsa_key.token(now=clock.now, ttl=3600, sub='live')}"
    assert await authenticate(auth, live, ())
    late = f"Bearer {rsa_key.token(now=clock.now - 20, ttl=10)}"  # expired 10 s ago, within the 30 s grace
    for _ in range(3):
        assert await authenticate(auth, late, ())
    assert list(auth.cache.entries) == [live.removeprefix("Bearer ")]


async def test_two_authorization_headers_are_refused(make_auth, clock, metrics, rsa_key):
    """A backend reading the other copy would see a token the gateway never checked."""
    auth = make_auth(rsa_key)
    token = f"Bearer {rsa_key.token(now=clock.now)}"
    with pytest.raises(GatewayError) as caught:
        auth.verify_request([token, "Bearer forged"])
    assert (caught.value.status, caught.value.error_type) == (401, "malformed")
    assert attempts(metrics, "failure", "malformed") == 1
    assert auth.verify_request([token])["sub"] == "test-user"


@pytest.mark.parametrize("scope, granted", [("read admin", True), ("read\u00a0admin", False), ("read\u2028admin", False),
                                            ("read\tadmin", False), ("  admin  ", True)])
async def test_scopes_are_separated_by_spaces_only(make_auth, clock, rsa_key, scope, granted):
    auth = make_auth(rsa_key)
    token = f"Bearer {rsa_key.token(now=clock.now, scope=scope)}"
    if granted:
        assert await authenticate(auth, token, ("admin",))
    else:
        assert (await rejected(auth, token, ("admin",))).error_type == "insufficient_scope"


@given(value=st.text(max_size=30))
@example(value="alice ")
@example(value="true\t")
@settings(max_examples=400, deadline=None)
def test_a_forwarded_string_reads_back_as_itself_by_one_rule(value):
    """A backend's rule, "JSON if it parses as JSON, else the text itself", applied to the header value as
    HTTP delivers it (spaces and tabs around it removed), gives back every string: no two claim values
    share a header value."""
    sent = value if plain_text(value) else json.dumps(value, separators=(",", ":"))
    received = sent.strip(" \t")
    try:
        read = json.loads(received)
    except ValueError:
        read = received
    assert read == value


async def test_a_token_not_yet_valid_is_not_remembered_as_refused(make_auth, clock, rsa_key):
    """Time ends `not_yet_valid`: such a token is verified afresh until it is valid."""
    auth = make_auth(rsa_key)
    token = f"Bearer {rsa_key.token(now=clock.now, nbf=int(clock.now) + 100)}"
    assert (await rejected(auth, token)).error_type == "not_yet_valid"
    assert len(auth.refused.entries) == 0
    clock.now += 100
    assert await authenticate(auth, token, ())
    assert len(auth.cache.entries) == 1


async def test_the_refused_cache_is_bounded_least_recently_used_first(make_auth, clock, rsa_key):
    auth = make_auth(rsa_key, cache_size=2)
    a, b, c = (f"Bearer {rsa_key.token(now=clock.now, kid=f'gone-{i}')}" for i in range(3))
    for token in (a, b, a, c):  # a was refused after b: b goes
        await rejected(auth, token)
    assert len(auth.refused.entries) == 2
    hits = auth.refused.hits
    await rejected(auth, a)
    assert auth.refused.hits == hits + 1
    await rejected(auth, b)
    assert auth.refused.hits == hits + 1


async def test_cache_size_zero_remembers_no_refusal(make_auth, clock, rsa_key):
    auth = make_auth(rsa_key, cache_size=0)
    token = f"Bearer {rsa_key.token(now=clock.now, kid='gone')}"
    for _ in range(3):
        await rejected(auth, token)
    assert (auth.refused.hits, len(auth.refused.entries)) == (0, 0)


TIMED_TOKENS = [  # (seconds from NOW to nbf, to exp): valid now; valid later; expiring soon; both
    (None, 60), (20, 120), (None, 5), (45, 50),
]


@given(steps=st.lists(st.one_of(st.integers(0, len(TIMED_TOKENS) + 1), st.floats(0, 40)), max_size=30))
@settings(max_examples=100, deadline=None)
def test_the_caches_never_change_a_verdict(tmp_path_factory, steps):
    """The rule: as the clock moves on, an authenticator with its caches gives every token the verdict one
    without caches gives (the same claims, or the same error type), whatever the order of requests; tokens
    that time makes valid, then expired, and a forged one included. An int step is a
    request for that token, a float step moves the clock on by that many seconds."""
    key = SigningKey("ed25519")
    pem = key.write_public_pem(tmp_path_factory.mktemp("keys") / "key.pem")
    now = [NOW]
    cached, fresh = (
        Authenticator.build(AuthConfig.model_validate({"keys": [{"file": pem}], "cache_size": size, "clock_skew": 10}),
                            Metrics(), None, clock=lambda: now[0])
        for size in (10, 0)
    )
    tokens = [key.token(now=NOW, ttl=exp, nbf=None if nbf is None else int(NOW) + nbf) for nbf, exp in TIMED_TOKENS]
    tokens += [SigningKey("ed25519").token(now=NOW), key.token(now=NOW, ttl=1)]
    for step in steps:
        if isinstance(step, float):
            now[0] += step
            continue
        verdicts = []
        for auth in (cached, fresh):
            try:
                verdicts.append(dict(auth.verify(f"Bearer {tokens[step]}")))
            except GatewayError as exc:
                verdicts.append(exc.error_type)
        assert verdicts[0] == verdicts[1], (step, now[0] - NOW)


# --- revocation against a real Redis ----------------------------------------------------------------


async def test_a_revoked_token_is_rejected_even_when_cached(make_auth, clock, metrics, rsa_key, redis_server, redis_client):
    auth = make_auth(rsa_key, redis=redis_server)
    token = rsa_key.token(now=clock.now, jti="t-1")
    assert await authenticate(auth, f"Bearer {token}", ())
    await redis_client.set("revoked:t-1", "1", ex=300)
    error = await rejected(auth, f"Bearer {token}")
    assert (error.status, error.error_type) == (401, "revoked")
    assert auth.cache.hits == 1
    assert attempts(metrics, "failure", "revoked") == 1
    other = rsa_key.token(now=clock.now, jti="t-2")
    assert await authenticate(auth, f"Bearer {other}", ())
    assert len(auth.refused.entries) == 0  # revocation is Redis's to say, request by request
    await redis_client.delete("revoked:t-1")
    assert await authenticate(auth, f"Bearer {token}", ())


async def test_a_revoked_token_is_401_before_its_scopes_are_judged(make_auth, clock, rsa_key, redis_server, redis_client):
    auth = make_auth(rsa_key, redis=redis_server)
    await redis_client.set("revoked:t-1", "1")
    error = await rejected(auth, f"Bearer {rsa_key.token(now=clock.now, jti='t-1')}", ("admin",))
    assert error.error_type == "revoked"


async def test_revocation_disabled_skips_redis(make_auth, clock, rsa_key, redis_server, redis_client):
    auth = make_auth(rsa_key, redis=redis_server, revocation={"enabled": False})
    await redis_client.set("revoked:t-1", "1")
    assert await authenticate(auth, f"Bearer {rsa_key.token(now=clock.now, jti='t-1')}", ())


@pytest.mark.parametrize("how", ["stopped", "paused"])
@pytest.mark.parametrize(
    ("mode", "status", "result", "error_type"),
    [("fail_open", 200, "success", "none"), ("fail_closed", 503, "failure", "revocation_unavailable")],
)
async def test_redis_down_follows_the_failure_mode_and_is_counted(
    make_auth, clock, metrics, rsa_key, redis_server, how, mode, status, result, error_type
):
    auth = make_auth(rsa_key, redis=redis_server, revocation={"failure_mode": mode})
    token = f"Bearer {rsa_key.token(now=clock.now)}"
    if how == "stopped":
        redis_server.stop()
    else:
        redis_server.pause()
    async with asyncio.timeout(10):  # a hang guard, not a timing assertion
        try:
            await authenticate(auth, token, ())
            outcome = (200, "none")
        except GatewayError as exc:
            outcome = (exc.status, exc.error_type)
    assert outcome == (status, error_type)
    assert metrics.registry.get_sample_value("gateway_redis_errors_total", {"operation": "revocation"}) == 1
    assert attempts(metrics, result, error_type) == 1


@pytest.mark.parametrize(("mode", "error_type"), [("fail_open", "none"), ("fail_closed", "revocation_unavailable")])
async def test_a_revocation_answer_that_is_not_a_number_follows_the_failure_mode(
    make_auth, clock, metrics, rsa_key, mode, error_type
):
    """A Redis (or a proxy) that answers the check with a nil: never read as 'not revoked' (a revoked
    token let in, nothing counted), but a counted Redis error and the configured failure mode."""
    async with RawRedis([b"*1\r\n$-1\r\n"]) as raw:
        auth = make_auth(rsa_key, redis=raw, revocation={"failure_mode": mode})
        try:
            await authenticate(auth, f"Bearer {rsa_key.token(now=clock.now, jti='t-1')}", ())
            outcome = "none"
        except GatewayError as exc:
            outcome = exc.error_type
    assert outcome == error_type
    assert metrics.registry.get_sample_value("gateway_redis_errors_total", {"operation": "revocation"}) == 1


async def test_revocation_works_again_after_redis_restarts(make_auth, clock, rsa_key, redis_server, redis_client):
    auth = make_auth(rsa_key, redis=redis_server, revocation={"failure_mode": "fail_closed"})
    token = f"Bearer {rsa_key.token(now=clock.now, jti='t-1')}"
    assert await authenticate(auth, token, ())
    redis_server.stop()
    assert (await rejected(auth, token)).error_type == "revocation_unavailable"
    redis_server.start()
    assert await authenticate(auth, token, ())
    await redis_client.set("revoked:t-1", "1")
    assert (await rejected(auth, token)).error_type == "revoked"


async def test_tokens_without_jti_need_no_redis(make_auth, clock, metrics, rsa_key, redis_server):
    auth = make_auth(rsa_key, redis=redis_server, revocation={"failure_mode": "fail_closed"})
    redis_server.stop()
    assert await authenticate(auth, f"Bearer {rsa_key.token(now=clock.now, jti=None)}", ())
    assert metrics.registry.get_sample_value("gateway_redis_errors_total", {"operation": "revocation"}) == 0
