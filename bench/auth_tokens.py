"""The token check alone: microseconds per request for a cached token, per fresh token verified, and per
forged token refused (the same one repeated, and each a new one).

    PYTHONPATH=dataplane python bench/auth_tokens.py [--requests 200000] [--tokens 2000] [--key ec]

A cached token costs the cache lookup, the scope check and the forwarded headers; a fresh one also its
header, signature and claim checks (required claims, types, forwardable values), which run once per
distinct token. A forged token (a signature not its own) is refused after its signature check, once per
distinct token: repeated, its refusal is remembered. Best of several runs, without Redis (the revocation
check is a Redis round trip of its own, measured by the end-to-end benchmarks).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import tempfile
import timeit
from pathlib import Path

from apigw.config.model import AuthConfig
from apigw.http.errors import GatewayError
from apigw.observability.metrics import Metrics
from apigw.policy.auth import Authenticator
from apigw.testkit.tokens import SigningKey


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=200_000)
    parser.add_argument("--tokens", type=int, default=2000)
    parser.add_argument("--key", choices=["rsa", "ec", "ed25519"], default="ec")
    args = parser.parse_args()
    logging.disable(logging.WARNING)  # the no-audience warning
    key = SigningKey(args.key)
    with tempfile.TemporaryDirectory() as tmp:
        pem = key.write_public_pem(Path(tmp) / "key.pem")
        config = AuthConfig.model_validate({"keys": [{"file": pem}], "forward_claims": {"sub": "X-User-Id"}})
        auth = Authenticator.build(config, Metrics(), None)

    header = f"Bearer {key.token(scope='read write')}"

    async def requests(count: int) -> None:
        for _ in range(count):
            claims = auth.verify(header)
            await auth.admit(claims, ("read",))
            auth.forward_headers(claims)
            auth.count_success()

    loop = asyncio.new_event_loop()
    loop.run_until_complete(requests(1))
    cached = min(timeit.repeat(lambda: loop.run_until_complete(requests(args.requests)), number=1, repeat=5))
    loop.close()
    headers = [f"Bearer {key.token(scope='read', jti=str(i))}" for i in range(args.tokens)]

    def fresh() -> None:
        auth.cache.clear()
        for header in headers:
            auth.verify(header)

    verified = min(timeit.repeat(fresh, number=1, repeat=3))
    other_signature = key.token().split(".")[2]
    forged = [header.rpartition(".")[0] + "." + other_signature for header in headers]

    def refused(tokens: list[str]) -> None:
        auth.refused.clear()
        for header in tokens:
            try:
                auth.verify(header)
            except GatewayError:
                pass

    repeated = min(timeit.repeat(lambda: refused(forged[:1] * args.tokens), number=1, repeat=3))
    distinct = min(timeit.repeat(lambda: refused(forged), number=1, repeat=3))
    print(f"cached token: {cached / args.requests * 1e6:.2f} us per request (verify, admit, forwarded headers)")
    print(f"fresh {key.algorithm} token: {verified / args.tokens * 1e6:.1f} us per token verified")
    print(f"forged token, repeated: {repeated / args.tokens * 1e6:.2f} us per request refused")
    print(f"forged token, each new: {distinct / args.tokens * 1e6:.1f} us per request refused")


if __name__ == "__main__":
    main()
