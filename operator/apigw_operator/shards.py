"""Splitting the rendered routes over ConfigMaps when they outgrow one (the API server's 1 MiB each).

While everything fits, `routes.yaml` in `api-gateway-config` holds every route and policy, as it always
did. Past that, `routes.yaml` holds the policies and an index, `shards`, naming each shard file
(`routes-001.yaml`, in ConfigMap `api-gateway-routes-1`, ...) with the hash of its text; the routes go to
the shards, in order, each filled up to the limit. The gateway's volume projects all of these
ConfigMaps into one directory, and the gateway loads them only when every shard matches the index
(`apigw.config.loader`), so ConfigMaps that reach a pod at different times never load half-updated.
"""

from __future__ import annotations

from collections.abc import Sequence

import yaml

from apigw.config.loader import ROUTES_FILE
from apigw.config.model import shard_hash
from apigw_operator.render import document_text


def shard_key(number: int) -> str:
    """The key of shard `number` (from 1) in its ConfigMap, and its file name in the gateway's volume."""
    return f"routes-{number:03d}.yaml"


def shard_number(key: str) -> int:
    return int(key.removeprefix("routes-").removesuffix(".yaml"))


def split(routes: Sequence[str], policies: Sequence[str], room: int, shard_room: int, shards: int) -> dict[str, str] | None:
    """The files to write, routes.yaml first: routes.yaml alone when it fits in `room` bytes, else
    routes.yaml with the policies and the index, and the routes in as few shards of at most
    `shard_room` bytes as they fill, in order. None when more than `shards` shards would be needed."""
    whole = document_text(routes, policies)
    if len(whole.encode()) <= room:
        return {ROUTES_FILE: whole}
    files: dict[str, str] = {}
    for group in _groups(routes, shard_room - len(document_text(["x"], []).encode()) + 1):
        if len(files) == shards:
            return None
        files[shard_key(len(files) + 1)] = document_text(group, [])
    if not files:  # one route alone is larger than a shard
        return None
    head = yaml.safe_dump({"shards": {key: shard_hash(text) for key, text in files.items()}}, sort_keys=False)
    index = document_text([], policies, head=head)
    if len(index.encode()) > room:
        return None
    return {ROUTES_FILE: index, **files}


def _groups(items: Sequence[str], room: int) -> list[list[str]]:
    """`items` in order, in consecutive groups of at most `room` bytes; [] when one item alone is larger."""
    groups: list[list[str]] = []
    used = room + 1
    for item in items:
        size = len(item.encode())
        if size > room:
            return []
        if used + size > room:
            groups.append([])
            used = 0
        groups[-1].append(item)
        used += size
    return groups
