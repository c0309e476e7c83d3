"""Generated key pairs that mint real signed JWTs, with their public halves as PEM files or a JWKS.

For tests, `bench/` and `gateway demo`: `key = SigningKey("ec", kid="k1")`,
`key.write_public_pem(path)`, then `key.token(scope="read")`.
"""

from __future__ import annotations

import base64
import json
import time
import uuid
from pathlib import Path
from typing import Any, Literal

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

KeyType = Literal["rsa", "ec", "ed25519"]

_CURVES = {"ES256": ec.SECP256R1, "ES384": ec.SECP384R1, "ES512": ec.SECP521R1}
_UNSET: Any = object()


class SigningKey:
    """A fresh private key. `algorithm` defaults to RS256, ES256 or EdDSA by type; for EC it picks the curve."""

    def __init__(self, kind: KeyType = "rsa", kid: str | None = None, algorithm: str | None = None):
        self.kid = kid
        if kind == "rsa":
            self.algorithm = algorithm or "RS256"
            self.private_key: Any = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        elif kind == "ec":
            self.algorithm = algorithm or "ES256"
            self.private_key = ec.generate_private_key(_CURVES[self.algorithm]())
        elif kind == "ed25519":
            self.algorithm = "EdDSA"
            self.private_key = ed25519.Ed25519PrivateKey.generate()
        else:
            raise ValueError(f"unknown key type {kind!r} (rsa, ec or ed25519)")

    @property
    def public_pem(self) -> bytes:
        return self.private_key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )

    def write_public_pem(self, path: Path) -> Path:
        path.write_bytes(self.public_pem)
        return path

    def public_jwk(self) -> dict[str, Any]:
        algorithm = jwt.get_algorithm_by_name(self.algorithm)
        jwk: dict[str, Any] = json.loads(algorithm.to_jwk(self.private_key.public_key()))
        if self.kid is not None:
            jwk["kid"] = self.kid
        return jwk

    def token(
        self, ttl: float | None = 300, now: float | None = None, kid: str | None = _UNSET,
        algorithm: str | None = None, **claims: Any,
    ) -> str:
        """A signed token: `sub`, `jti`, `iat` and `exp` (now + ttl) by default, overridden by `claims`;
        a claim given as None is left out (`ttl=None` leaves out `exp`)."""
        now = time.time() if now is None else now
        payload: dict[str, Any] = {"sub": "test-user", "jti": uuid.uuid4().hex, "iat": int(now)}
        if ttl is not None:
            payload["exp"] = int(now + ttl)
        payload.update(claims)
        payload = {name: value for name, value in payload.items() if value is not None}
        kid = self.kid if kid is _UNSET else kid
        headers = {"kid": kid} if kid is not None else None
        return jwt.encode(payload, self.private_key, algorithm=algorithm or self.algorithm, headers=headers)

    def signed(self, payload: dict[str, Any], header: dict[str, Any] | None = None) -> str:
        """A token signed over exactly `payload` and `header` (alg and kid added), without the checks
        PyJWT's encoder makes on claims: for tests of tokens an identity provider should never issue."""
        header = {"alg": self.algorithm, **({"kid": self.kid} if self.kid else {}), **(header or {})}
        segments = [_b64(json.dumps(part, separators=(",", ":")).encode()) for part in (header, payload)]
        signing_input = ".".join(segments).encode()
        signature = jwt.get_algorithm_by_name(self.algorithm).sign(signing_input, self.private_key)
        return f"{signing_input.decode()}.{_b64(signature)}"


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def write_jwks(path: Path, keys: list[SigningKey]) -> Path:
    """A JWKS file holding the public keys of `keys`."""
    path.write_text(json.dumps({"keys": [key.public_jwk() for key in keys]}))
    return path
