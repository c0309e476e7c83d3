"""Splitting the rendered routes over ConfigMaps when they outgrow one (the API server's 1 MiB each).

While everything fits, `routes.yaml` in `api-gateway-config` holds every route and policy, as it always
did. Past that, `routes.yaml` holds the policies and an index, `shards`, naming each shard file
(`routes-001.yaml`, in ConfigMap `api-gateway-routes-1`, ...) with the hash of its text; the routes go to
the shards, in order, each filled up to half the limit. The gateway's volume projects all of these
ConfigMaps into one directory, and the gateway loads them only when every shard matches the index
(`apigw.config.loader`), so ConfigMaps that reach a pod at different times never load half-updated.

A shard is never rewritten while the routes.yaml in force names it: shard N has two keys in its
ConfigMap, `routes-N` and `routes-(500+N)` (`routes-001.yaml` and `routes-501.yaml`); a changed shard goes
under the one the index in force does not name (hence half the limit each). The replaced version stays
until the slot's next version takes its key: a pod whose kubelet still has the previous routes.yaml finds
its shards too. Only a slot no longer used is emptied, both keys. So a write refused or cut at any point
leaves an index whose shards are all there (a pod starting then loads). The one exception: a shard in
force filled past half its ConfigMap (by an operator before this scheme) leaves no room beside it and is
rewritten in place, once (`in_place`). Which ConfigMap holds a key follows from the key alone, so an
operator restarted with another `--route-shards` finds the shards an older index names.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence

import yaml

from apigw.config.loader import ROUTES_FILE
from apigw.config.model import shard_hash
from apigw_operator.render import document_text


def shard_key(number: int) -> str:
    """The key of shard `number` (from 1) in its ConfigMap, and its file name in the gateway's volume."""
    return f"routes-{number:03d}.yaml"


def shard_number(key: str) -> int:
    return int(key.removeprefix("routes-").removesuffix(".yaml"))


MAX_SHARDS = 499
"""Shard keys have three digits (the gateway's `SHARD_FILE`): shard N's are N and SECOND_KEY + N."""
SECOND_KEY = 500


def shard_slot(key: str) -> int:
    """The shard (from 1) whose ConfigMap holds `key`: `routes-N` and `routes-(500+N)` are shard N's two keys."""
    return (shard_number(key) - 1) % SECOND_KEY + 1


def leftovers(index: Mapping[str, str], files: Mapping[str, str]) -> list[str]:
    """The keys to remove once routes.yaml naming `files` is written over one naming `index`: both keys of
    each slot `index` used and `files` does not (a slot still used keeps the version it replaced)."""
    used = {shard_slot(key) for key in files if key != ROUTES_FILE}
    gone = sorted({shard_slot(key) for key in index} - used)
    return [key for slot in gone for key in (shard_key(slot), shard_key(slot + SECOND_KEY))]


def _beside(texts: Sequence[str], in_force: Mapping[str, str], in_place: Collection[str]) -> dict[str, str]:
    """Shard texts by key: each under a key of its slot that the index in force does not name, unless
    that index names it with this very text (then it stays where it is) or it is `in_place` (no room beside it)."""
    named = {shard_slot(key): (key, digest) for key, digest in in_force.items()}
    placed = {}
    for slot, text in enumerate(texts, 1):
        kept, digest = named.get(slot, (None, None))
        if kept not in in_place and (kept is None or digest != shard_hash(text)):
            kept = shard_key(slot + SECOND_KEY) if kept == shard_key(slot) else shard_key(slot)
        placed[kept] = text
    return placed


def split(
    routes: Sequence[str],
    policies: Sequence[str],
    room: int,
    shard_room: int,
    shards: int,
    in_force: Mapping[str, str],
    in_place: Collection[str] = (),
) -> dict[str, str] | None:
    """The files to write, routes.yaml first: routes.yaml alone when it fits in `room` bytes, else
    routes.yaml with the policies and the index, and the routes in as few shards of at most
    `shard_room` bytes as they fill, in order, each under a key the index `in_force` does not name
    but for the keys `in_place` (`_beside`). None when more than `shards` shards would be needed."""
    whole = document_text(routes, policies)
    if len(whole.encode()) <= room:
        return {ROUTES_FILE: whole}
    texts = [document_text(group, []) for group in _groups(routes, shard_room - len(document_text(["x"], []).encode()) + 1)]
    if not texts or len(texts) > shards:  # one route alone is larger than a shard, or too many shards
        return None
    files = _beside(texts, in_force, in_place)
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
