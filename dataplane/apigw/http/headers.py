"""Request header names with a meaning to the gateway itself: the proxy drops the client's copies, and
the config refuses to forward a token claim under one of them (a second `Host` or `Transfer-Encoding`
written by a claim would frame or route the backend's request differently from the gateway's)."""

HOP_BY_HOP = frozenset(
    {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "proxy-connection", "te",
     "trailer", "transfer-encoding", "upgrade"}
)
NOT_FORWARDED = HOP_BY_HOP | {"content-length", "host", "expect", "x-forwarded-for", "x-request-id",
                              "x-original-url", "x-rewrite-url"}
"""Client headers never passed on: hop-by-hop ones, those the gateway sets or answers itself (Expect), and
those that make IIS, Symfony or Zend backends serve another path than the one routed (X-Original-URL,
X-Rewrite-URL)."""


def set_by_gateway(name: str) -> bool:
    """Whether the gateway drops the client's copies of header `name` and may send its own: `NOT_FORWARDED`
    and every `X-Forwarded-*`."""
    lower = name.lower()
    return lower in NOT_FORWARDED or lower.startswith("x-forwarded-")
