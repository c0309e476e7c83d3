"""The shard writes, one request at a time: whatever request is the last to succeed, the routes.yaml in force
names shards that hold what it says, and no shard ConfigMap is over its limit."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from apigw.config.loader import ROUTES_FILE, shard_index
from apigw.config.model import shard_hash
from apigw_operator.cli import parse_args
from apigw_operator.shards import MAX_SHARDS, leftovers, shard_key, shard_slot, split

LIMIT = 1200
SLOTS = 3


def item(number: int, size: int) -> str:
    """A route's list item of about `size` bytes."""
    return f"- name: r{number}\n  note: {'x' * size}\n"


class Cluster:
    """routes.yaml and the shard ConfigMaps (slot -> key -> text), written as the reconciler writes them."""

    def __init__(self) -> None:
        self.routes_yaml = ""
        self.previous = ""
        """The routes.yaml before: what a pod whose kubelet has not caught up with routes.yaml reads."""
        self.shards: dict[int, dict[str, str]] = {slot: {} for slot in range(1, SLOTS + 1)}

    def write(self, key: str, text: str | None) -> None:
        if key == ROUTES_FILE:
            self.previous, self.routes_yaml = self.routes_yaml, text or ""
        elif text is None:
            self.shards[shard_slot(key)].pop(key, None)
        else:
            self.shards[shard_slot(key)][key] = text
        self.check()

    def check(self) -> None:
        """What a pod starting now finds: every shard routes.yaml names, with that content."""
        for key, digest in shard_index(self.routes_yaml).items():
            held = self.shards[shard_slot(key)].get(key)
            assert held is not None and shard_hash(held) == digest, f"{key} named by routes.yaml is not there"

    def check_previous(self) -> None:
        """Once a config is written, what a pod finds whose kubelet still has the previous routes.yaml (and
        the shard ConfigMaps as they are): every shard it named, in the slots still used."""
        used = {shard_slot(key) for key in shard_index(self.routes_yaml)}
        for key, digest in shard_index(self.previous).items():
            held = self.shards[shard_slot(key)].get(key)
            assert shard_slot(key) not in used or (held is not None and shard_hash(held) == digest), \
                f"{key} named by the previous routes.yaml is not there"
        for slot, data in self.shards.items():
            size = sum(len(k) + len(v.encode()) for k, v in data.items())
            assert size <= LIMIT, f"shard ConfigMap {slot} holds {size} bytes"


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.lists(st.integers(20, 200), min_size=1, max_size=14), st.integers(0, SLOTS)),
                min_size=1, max_size=6))
def test_every_write_leaves_the_index_in_force_whole(configs: list[tuple[list[int], int]]) -> None:
    """Each config written by an operator with its own --route-shards (restarted with another in between)."""
    cluster = Cluster()
    for sizes, shards in configs:
        in_force = shard_index(cluster.routes_yaml)
        files = split([item(i, size) for i, size in enumerate(sizes)], [], room=LIMIT // 2,
                      shard_room=LIMIT // 2 - len(shard_key(1)), shards=shards, in_force=in_force)
        if files is None:
            continue
        for key, text in files.items():
            if key != ROUTES_FILE and in_force.get(key) != shard_hash(text):
                cluster.write(key, text)
        cluster.write(ROUTES_FILE, files[ROUTES_FILE])
        for key in leftovers(in_force, files):
            cluster.write(key, None)
        cluster.check_previous()
        routes = "".join(cluster.shards[shard_slot(k)][k] for k in shard_index(cluster.routes_yaml))
        assert [line for line in (cluster.routes_yaml + routes).splitlines() if line.startswith("- name:")] == [
            f"- name: r{i}" for i in range(len(sizes))
        ], "the routes in force are the last config's, each once, in order"


def test_a_shards_configmap_follows_from_its_key_alone() -> None:
    """Whatever --route-shards the operator that wrote an index had, its keys are found where they were written."""
    assert [shard_slot(shard_key(n)) for n in (1, 3, 499, 501, 503, 999)] == [1, 3, 499, 1, 3, 499]


@pytest.mark.parametrize("shards", ["-1", str(MAX_SHARDS + 1)])
def test_route_shards_past_the_keys_three_digits_are_refused(shards: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        parse_args(["--route-shards", shards])
    assert f"--route-shards must be 0 to {MAX_SHARDS}, got {shards}" in capsys.readouterr().err
