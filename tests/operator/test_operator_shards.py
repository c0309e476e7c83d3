"""Routes past one ConfigMap's limit: split over the shard ConfigMaps, loaded by pods as one config (KMock)."""

from __future__ import annotations

import contextlib
import re
import tempfile
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import yaml

from apigw.config.errors import ConfigError
from apigw.config.loader import load_config, shard_index
from apigw.config.model import config_hash, shard_hash
from apigw_operator.cluster import Target
from apigw_operator.reconciler import configmap_size
from tests.operator.kube import CM, NS, GatewayPod, configmap, eventually, operator, route
from tests.operator.test_operator_kmock import (
    API,
    CM_PATH,
    ROUTES,
    data,
    options,
    settle,
    summary,
    sync_pods,
    volume,
    writes,
)

LIMIT = 1400
"""Bytes per ConfigMap: four of these routes fit in routes.yaml beside config.yaml and `PADDING`, five in a
shard (half the limit: the other half takes the shard's next version)."""
PADDING = {"notes.txt": "x" * 690}


@pytest.fixture(autouse=True)
def padded(cluster: Any) -> None:
    """The gateway's ConfigMap with a file people keep beside config.yaml, which takes room from routes.yaml."""
    found = configmap()
    cluster.objects["v1/configmaps", NS, CM] = {**found, "data": {**found["data"], **PADDING}}


def shard(kmock: Any, number: int) -> dict[str, str]:
    return kmock.objects["v1/configmaps", NS, Target().shard(number)].get("data") or {}


def configmap_writes(kmock: Any) -> list[str]:
    """The ConfigMaps written, in order."""
    return [path.rsplit("/", 1)[1] for method, path, _ in writes(kmock) if "/configmaps/" in path and method == "PATCH"]


def loaded(files: dict[str, str]) -> str:
    """What a gateway starting on a volume holding `files` gets: its config's hash, or why it exits."""
    with tempfile.TemporaryDirectory() as directory:
        for key, text in files.items():
            (Path(directory) / key).write_text(text)
        try:
            return config_hash(load_config(Path(directory)))
        except ConfigError as exc:
            return f"{type(exc).__name__}: {exc.errors[0].removeprefix(directory + '/')}"


def name(i: int) -> str:
    return f"r{i:02d}"


async def test_routes_outgrowing_the_configmap_go_to_shards_and_come_back(cluster: Any, pods: dict[str, GatewayPod]) -> None:
    for i in range(8):
        cluster.objects[ROUTES, "shop", name(i)] = route(name(i), f"/{name(i)}")
    async with operator(replace(options(pods), configmap_limit=LIMIT)):
        await eventually(lambda: "shards:" in data(cluster).get("routes.yaml", ""))
        index = yaml.safe_load(data(cluster)["routes.yaml"])
        assert index["routes"] == [] and index["shards"] == {
            "routes-001.yaml": shard_hash(shard(cluster, 1)["routes-001.yaml"]),
            "routes-002.yaml": shard_hash(shard(cluster, 2)["routes-002.yaml"]),
        }
        held = [r["name"] for n in (1, 2) for r in yaml.safe_load(shard(cluster, n)[f"routes-00{n}.yaml"])["routes"]]
        assert held == [f"shop.{name(i)}" for i in range(8)], "in order, each route once"
        assert configmap_writes(cluster)[-1] == "api-gateway-config", "the index is written after the shards it names"
        assert shard(cluster, 3) == {}
        sync_pods(cluster, pods)
        await eventually(lambda: all(summary(cluster, name(i)).get("Programmed") == ("True", "Programmed") for i in range(8)))

        before = len(configmap_writes(cluster))
        await cluster.patch(f"{API}/gatewayroutes/{name(6)}", json={"spec": {"match": {"path_prefix": "/v2"}}})
        await eventually(lambda: "/v2" in shard(cluster, 2).get("routes-502.yaml", ""))
        await settle(cluster, 2)
        assert configmap_writes(cluster)[before:] == ["api-gateway-routes-2", "api-gateway-config"], \
            "one shard written beside the one in force, then the index"
        assert list(yaml.safe_load(data(cluster)["routes.yaml"])["shards"]) == ["routes-001.yaml", "routes-502.yaml"]
        assert sorted(shard(cluster, 2)) == ["routes-002.yaml", "routes-502.yaml"], "the replaced version stays"

        for i in range(2, 8):
            await cluster.delete(f"{API}/gatewayroutes/{name(i)}")
        await eventually(lambda: "shards:" not in data(cluster)["routes.yaml"] and shard(cluster, 1) == shard(cluster, 2) == {})
        assert [r["name"] for r in yaml.safe_load(data(cluster)["routes.yaml"])["routes"]] == ["shop.r00", "shop.r01"]


async def test_past_every_shard_nothing_is_written_and_the_routes_in_force_are_spared(cluster: Any, pods: dict[str, GatewayPod]) -> None:
    for i in range(10):  # two full shards
        cluster.objects[ROUTES, "shop", name(i)] = route(name(i), f"/{name(i)}")
    async with operator(replace(options(pods), configmap_limit=LIMIT, target=Target(route_shards=2))):
        await eventually(lambda: "routes-002.yaml" in data(cluster).get("routes.yaml", ""))
        sync_pods(cluster, pods)
        await eventually(lambda: summary(cluster, name(9)).get("Programmed") == ("True", "Programmed"))
        in_force = data(cluster)["routes.yaml"], shard(cluster, 1), shard(cluster, 2)

        await cluster.post(f"{API}/gatewayroutes", json=route("late", "/late", created="2025-02-01T00:00:00Z"))
        await eventually(lambda: summary(cluster, "late").get("Programmed") == ("False", "ConfigTooLarge"))
        message = cluster.objects[ROUTES, "shop", "late"]["status"]["conditions"][2]["message"]
        assert re.fullmatch(
            r"routes.yaml \(\d+ bytes\) would make ConfigMap api-gateway/api-gateway-config \d+ bytes, over its limit of 1400, "
            r"and the routes do not fit in the 2 shard ConfigMaps api-gateway-routes-1..2 \(700 bytes each, half their limit: "
            r"the other half takes the next version while the one in force stays\) either: the last good routes.yaml "
            r"stays in force; remove or shrink routes, or raise --route-shards \(each shard one more ConfigMap, "
            r"api-gateway-routes-3 next, projected into the gateway's config volume and named in the operator's RBAC\)",
            message)
        await settle(cluster, 3)
        assert (data(cluster)["routes.yaml"], shard(cluster, 1), shard(cluster, 2)) == in_force, "nothing partial written"
        assert summary(cluster, name(9))["Programmed"] == ("True", "Programmed"), "a route in a shard in force is spared"
    gets = {path.rsplit("/", 1)[1] for path in (r.url.path for r in cluster if r.method.value == "GET") if "/configmaps/" in path}
    assert gets == {"api-gateway-config", "api-gateway-routes-1", "api-gateway-routes-2"}


@contextlib.asynccontextmanager
async def eight_routes_in_shards(cluster: Any, pods: dict[str, GatewayPod]) -> AsyncIterator[None]:
    """The operator running with eight routes over routes.yaml and two shards, programmed on the pods."""
    for i in range(8):
        cluster.objects[ROUTES, "shop", name(i)] = route(name(i), f"/{name(i)}")
    async with operator(replace(options(pods), configmap_limit=LIMIT)):
        await eventually(lambda: "routes-002.yaml" in data(cluster).get("routes.yaml", ""))
        sync_pods(cluster, pods)
        await eventually(lambda: all(summary(cluster, name(i)).get("Programmed") == ("True", "Programmed")
                                     for i in range(8)))
        yield


async def test_a_shard_that_lost_its_routes_is_written_again(cluster: Any, pods: dict[str, GatewayPod]) -> None:
    """The operator trusts routes.yaml's index to say what the shards hold, and reads them back when the
    pods do not serve its config: a shard recreated empty behind its back is written again."""
    async with eight_routes_in_shards(cluster, pods):
        before = pods["api-gateway-a"].config_hash

        cluster.objects["v1/configmaps", NS, Target().shard(1)]["data"] = {}
        await cluster.patch(f"{API}/gatewayroutes/{name(6)}", json={"spec": {"match": {"path_prefix": "/v2"}}})
        await eventually(lambda: "/v2" in shard(cluster, 2).get("routes-502.yaml", ""))
        sync_pods(cluster, pods)
        assert pods["api-gateway-a"].config_hash == before, "a shard missing: the pods keep their config"
        await eventually(lambda: "routes-001.yaml" in shard(cluster, 1))
        sync_pods(cluster, pods)
        await eventually(lambda: summary(cluster, name(6)).get("Programmed") == ("True", "Programmed"))


async def test_an_index_write_that_fails_leaves_the_config_in_force_loadable(
    cluster: Any, pods: dict[str, GatewayPod]
) -> None:
    """The shards are written, then routes.yaml is refused (an API hiccup, the Lease lost, a crash): a pod
    starting now reads the routes.yaml in force, whose shards must still hold what it names."""
    async with eight_routes_in_shards(cluster, pods):
        in_force, serving = dict(data(cluster)), pods["api-gateway-a"].config_hash
        starting: list[str] = []

        def refused() -> Any:
            """The API server refuses routes.yaml once (KMock stores it all the same: the volume is rebuilt
            with the routes.yaml in force), and a pod starts on what the ConfigMaps hold at this instant."""
            if starting:
                return NotImplemented  # KMock's own answer
            starting.append(loaded({**volume(cluster), **in_force}))
            return 500

        cluster[f"patch {CM_PATH}"] << refused
        await cluster.patch(f"{API}/gatewayroutes/{name(6)}", json={"spec": {"match": {"path_prefix": "/v2"}}})
        await eventually(lambda: starting)
        assert starting == [serving], "a new pod loads the config in force"
        await eventually(lambda: "/v2" in "".join(volume(cluster).values()) and loaded(volume(cluster)) != serving)
        assert not loaded(volume(cluster)).startswith("Config"), "the next pass writes a loadable config"


async def test_a_pod_whose_kubelet_still_has_the_previous_index_loads_its_config(
    cluster: Any, pods: dict[str, GatewayPod]
) -> None:
    """The kubelet updates each ConfigMap of the volume on its own: a pod starting right after an edit may get
    the shard ConfigMaps as they are now and routes.yaml as it was. The shards that routes.yaml named must
    still be there (the replaced one goes only when its slot's next version takes its key)."""
    async with eight_routes_in_shards(cluster, pods):
        previous, serving = dict(data(cluster)), pods["api-gateway-a"].config_hash
        await cluster.patch(f"{API}/gatewayroutes/{name(6)}", json={"spec": {"match": {"path_prefix": "/v2"}}})
        await eventually(lambda: "/v2" in "".join(volume(cluster).values()))
        await settle(cluster, 2)
        assert loaded({**volume(cluster), **previous}) == serving


async def test_an_operator_restarted_with_other_route_shards_finds_the_shards_in_force(
    cluster: Any, pods: dict[str, GatewayPod]
) -> None:
    """--route-shards changed across restarts (3, then 2, then 3): the shards the index in force names are
    found, replaced and removed in the ConfigMaps that hold them; none holds more than its two versions."""
    async with eight_routes_in_shards(cluster, pods):
        await cluster.patch(f"{API}/gatewayroutes/{name(6)}", json={"spec": {"match": {"path_prefix": "/v2"}}})
        await eventually(lambda: "/v2" in "".join(shard(cluster, 2).values()))
        await settle(cluster, 2)
    for shards, path in ((2, "/v3"), (2, "/v4"), (3, "/v5")):
        cluster.objects[ROUTES, "shop", name(6)] = route(name(6), path)
        async with operator(replace(options(pods), configmap_limit=LIMIT, target=Target(route_shards=shards))):
            await eventually(lambda: path in "".join(volume(cluster).values()))
            await settle(cluster, 2)
            held = {number: sorted(shard(cluster, number)) for number in (1, 2, 3)}
            assert all(len(keys) <= 2 for keys in held.values()), f"--route-shards {shards}: {held}"
            assert not loaded(volume(cluster)).startswith("Config")


async def test_shards_filled_past_half_their_configmap_are_rewritten_in_place_once(
    cluster: Any, pods: dict[str, GatewayPod]
) -> None:
    """Shards written before the two-key scheme filled whole ConfigMaps (here by an operator with a
    --configmap-limit twice as large): no next version fits beside them, so each is rewritten in place,
    once, rather than every shard ConfigMap write being refused as too large from then on."""
    for i in range(18):
        cluster.objects[ROUTES, "shop", name(i)] = route(name(i), f"/{name(i)}")
    async with operator(replace(options(pods), configmap_limit=2 * LIMIT)):
        await eventually(lambda: "routes-002.yaml" in data(cluster).get("routes.yaml", ""))
    fourth = Target().shard(4)
    cluster.objects["v1/configmaps", NS, fourth] = {"apiVersion": "v1", "kind": "ConfigMap",
                                                    "metadata": {"name": fourth, "namespace": NS}}
    async with operator(replace(options(pods), configmap_limit=LIMIT, target=Target(route_shards=4))):
        await eventually(lambda: "routes-004.yaml" in data(cluster).get("routes.yaml", ""))
        await settle(cluster, 2)
        sizes = {n: configmap_size(cluster.objects["v1/configmaps", NS, Target().shard(n)], {}) for n in range(1, 5)}
        assert all(size <= LIMIT for size in sizes.values()), sizes
        assert not loaded({**volume(cluster), **shard(cluster, 4)}).startswith("Config")
