"""When changed config files are complete enough to load (`StableFiles`, on a fake clock), and what a
reload says about the files it reads (real gateway processes: the warning for dropped routes, an empty
file that is not served until it has settled)."""

from __future__ import annotations

import gc
import pickle
import re
import signal
import time
import weakref
from pathlib import Path

import pytest
import yaml

from apigw.config.errors import ConfigError
from apigw.config.loader import YAML_LOADER, load_config, load_config_parts, parse_documents
from apigw.config.model import config_hash, shard_hash
from apigw.observability.metrics import Metrics
from apigw.pipeline.state import Gateway
from apigw.server.reload import SETTLE, Reloader, StableFiles
from apigw.testkit import loopback_allowed
from apigw.testkit.process import BackendProcess, GatewayProcess, http_status, ports, wait_until
from apigw.testkit.tokens import SigningKey
from apigw.testkit.volume import Projection


def publish(volume: Path, version: str, text: str) -> Path:
    """Kubernetes' ConfigMap volume update: a new `..<version>` directory, then `..data` re-pointed at it."""
    data = volume / f"..{version}"
    data.mkdir()
    (data / "routes.yaml").write_text(text)
    staged = volume / "..data_tmp"
    staged.symlink_to(data.name)
    staged.rename(volume / "..data")
    link = volume / "routes.yaml"
    if not link.is_symlink():
        link.symlink_to("..data/routes.yaml")
    return link


def test_a_file_changed_in_place_is_ready_only_once_unchanged_for_the_settle_time(tmp_path, clock) -> None:
    path = tmp_path / "routes.yaml"
    path.write_text("routes: []\n")
    files = StableFiles(lambda: [path], settle=1.0, clock=clock)
    assert not files.ready()

    path.write_text("routes: [")  # the first half of a write
    assert not files.ready()
    clock.advance(0.5)
    assert not files.ready()
    path.write_text("routes: [] # the rest, within the settle time")
    clock.advance(0.6)
    assert not files.ready()  # changed since it was first seen: the wait starts again
    clock.advance(0.5)
    assert not files.ready()
    clock.advance(0.5)
    assert files.ready()


def test_files_in_force_are_not_ready_and_a_change_back_is_no_change(tmp_path, clock) -> None:
    path = tmp_path / "routes.yaml"
    path.write_text("routes: []\n")
    files = StableFiles(lambda: [path], settle=1.0, clock=clock)
    clock.advance(5)
    assert not files.ready()
    files.in_force = files.snapshot()
    clock.advance(5)
    assert not files.ready()


def test_a_symlink_swap_is_ready_at_once(tmp_path, clock) -> None:
    link = publish(tmp_path, "v1", "routes: []\n")
    files = StableFiles(lambda: [link], settle=1.0, clock=clock)
    publish(tmp_path, "v2", "routes: [] # v2\n")
    assert files.ready()


def test_a_swap_waits_when_another_watched_file_changed_in_place(tmp_path, clock) -> None:
    link = publish(tmp_path, "v1", "routes: []\n")
    key = tmp_path / "key.pem"
    key.write_text("old")
    files = StableFiles(lambda: [link, key], settle=1.0, clock=clock)
    publish(tmp_path, "v2", "routes: [] # v2\n")
    key.write_text("half")
    assert not files.ready()
    clock.advance(1.0)
    assert files.ready()


def test_a_file_that_appears_or_vanishes_waits_for_the_settle_time(tmp_path, clock) -> None:
    path = tmp_path / "config.yaml"
    files = StableFiles(lambda: [path], settle=1.0, clock=clock)
    path.write_text("routes: []\n")
    assert not files.ready()
    clock.advance(1.0)
    assert files.ready()
    files.in_force = files.snapshot()
    path.unlink()
    assert not files.ready()


def test_the_c_loader_keeps_errors_located(tmp_path) -> None:
    assert YAML_LOADER is getattr(__import__("yaml"), "CSafeLoader", None), "PyYAML without libyaml here"
    routes = [{"name": f"r{i}", "match": {"path_prefix": f"/r{i}"}, "backend": {"service": "s", "url": "http://127.0.0.1:1"}}
              for i in range(300)]
    routes[299]["backend"]["timeout"] = "soon"
    text = yaml.safe_dump({"routes": routes}, sort_keys=False)
    line = next(n for n, each in enumerate(text.splitlines(), 1) if "soon" in each)
    with pytest.raises(ConfigError) as caught:
        parse_documents({"gw.yaml": text})
    assert caught.value.errors[0].startswith(f"gw.yaml:{line}: routes[299].backend.timeout: ")


def test_the_worker_process_hands_back_the_same_config_or_its_errors(tmp_path) -> None:
    path = tmp_path / "gw.yaml"
    routes = [{"name": f"r{i}", "match": {"path_prefix": f"/r{i}"}, "backend": {"service": "s", "url": "http://127.0.0.1:1"}}
              for i in range(120)]
    path.write_text(yaml.safe_dump({"routes": routes, "policies": [{"name": "p", "requests": 1, "period": "1s"}]}))
    base, parts, digest, texts = load_config_parts(path)
    assert texts == {str(path): path.read_text()}
    assert len(parts) == 3
    config = pickle.loads(base).model_copy(update={"routes": [r for part in parts for r in pickle.loads(part)]})
    assert config == load_config(path)
    assert digest == config_hash(config)
    assert [p.name for p in config.policies] == ["p"]

    path.write_text("routes: [{name: broken}]\n")
    with pytest.raises(ConfigError) as caught:
        load_config_parts(path)
    crossed = pickle.loads(pickle.dumps(caught.value))
    assert crossed.errors == caught.value.errors == [f"{path}:1: routes[0].backend: required setting is missing"]


def write_config(path: Path, port: int, metrics_port: int, backend_url: str, names: list[str]) -> None:
    staged = path.with_suffix(".new")
    staged.write_text(config_text(port, metrics_port, backend_url, names))
    staged.rename(path)


def config_text(port: int, metrics_port: int, backend_url: str, names: list[str]) -> str:
    routes = [{"name": name, "match": {"path_prefix": f"/{name}"}, "backend": {"service": "echo", "url": backend_url}}
              for name in names]
    listen = {"address": "127.0.0.1", "port": port, "metrics_port": metrics_port}
    return yaml.safe_dump({"listen": listen, "routes": routes}, sort_keys=False)


def test_a_reload_that_drops_most_routes_is_applied_with_a_warning(tmp_path) -> None:
    port, metrics_port = ports()
    path = tmp_path / "gw.yaml"
    with BackendProcess() as backend:
        write_config(path, port, metrics_port, backend.url, ["a", "b", "c", "d"])
        with GatewayProcess(path, port, metrics_port) as gateway:
            first = gateway.ready()["config_hash"]
            write_config(path, port, metrics_port, backend.url, ["a", "b", "e"])  # drops 2 of 4: not more than half
            gateway.signal(signal.SIGHUP)
            wait_until(lambda: gateway.ready()["config_hash"] != first)
            second = gateway.ready()["config_hash"]
            write_config(path, port, metrics_port, backend.url, ["e"])  # drops 2 of 3
            gateway.signal(signal.SIGHUP)
            wait_until(lambda: gateway.ready()["config_hash"] != second)
            assert http_status(f"{gateway.url}/a") == 404
            assert http_status(f"{gateway.url}/e") == 200
    warnings = [line for line in gateway.log_lines() if "drops" in line["msg"]]
    assert len(warnings) == 1, warnings
    assert warnings[0]["level"] == "warning"
    assert warnings[0]["msg"].startswith("config reload drops 2 of 3 routes (1 routes now)")
    assert (warnings[0]["routes_dropped"], warnings[0]["routes_before"], warnings[0]["routes_after"]) == (2, 3, 1)


def test_an_empty_file_under_sighup_is_served_only_once_it_has_settled(tmp_path) -> None:
    port, metrics_port = ports()
    path = tmp_path / "gw.yaml"
    with BackendProcess() as backend:
        write_config(path, port, metrics_port, backend.url, ["a"])
        with GatewayProcess(path, port, metrics_port) as gateway:
            first = gateway.ready()["config_hash"]
            with open(path, "w"):  # truncated for rewriting; the writer stalls
                pass
            gateway.signal(signal.SIGHUP)
            wait_until(lambda: any("deferred" in line["msg"] for line in gateway.log_lines()))
            assert gateway.ready()["config_hash"] == first
            assert http_status(f"{gateway.url}/a") == 200
            # Left empty, it is what the file says once it has settled: applied by the watcher, with a warning.
            wait_until(lambda: gateway.ready()["config_hash"] != first, timeout=10 * SETTLE)
    lines = gateway.log_lines()
    deferred = [line for line in lines if "deferred" in line["msg"]]
    assert deferred[0]["msg"].startswith("config reload (SIGHUP) deferred: the new config has no routes (1 in force)")
    assert any(line["msg"].startswith("config reload drops 1 of 1 routes") for line in lines)
    assert any(line["msg"].startswith("config reloaded (file change)") for line in lines)


def every_feature(tmp_path: Path, timeout: str) -> str:
    """A config using each kind of setting the state compiles: keys, policies, hosts, methods, rewrites."""
    key_file = SigningKey("ec").write_public_pem(tmp_path / "key.pem")
    routes = [
        {"name": f"r{i}", "match": {"host": f"h{i % 3}.example.com", "path_prefix": f"/r{i}", "methods": ["GET"]},
         "backend": {"service": f"s{i % 4}", "url": "http://127.0.0.1:1", "timeout": timeout},
         "auth": {"required": True, "scopes": ["read"]} if i % 2 == 0 else {"required": False}, "ratelimit": "p", "rewrite_prefix": "/v1/"}
        for i in range(40)
    ]
    routes.append({"name": "exact", "match": {"path": "/x"}, "backend": {"service": "s0", "url": "http://127.0.0.1:1"}})
    return yaml.safe_dump({"auth": {"keys": [{"file": str(key_file)}]},
                           "policies": [{"name": "p", "requests": 5, "period": "1s"}], "routes": routes})


async def test_a_replaced_state_is_freed_by_reference_counting_alone(tmp_path) -> None:
    """What makes freezing the state in force safe (`keep_out_of_collections`): no reference cycle keeps a
    replaced state alive, so it is freed without the cyclic collector, which never sees it."""
    path = tmp_path / "gw.yaml"
    path.write_text(every_feature(tmp_path, "5s"))
    gateway = Gateway.create(load_config(path), Metrics())
    reloader = Reloader(gateway, path, None, None)
    try:
        for version in range(2):
            replaced = weakref.ref(gateway.state)
            path.write_text(every_feature(tmp_path, f"{6 + version}s"))
            gc.disable()
            try:
                assert await reloader.reload("test")
                assert replaced() is None, gc.get_referrers(replaced())
            finally:
                gc.enable()
    finally:
        gc.unfreeze()
        await reloader.close()
        await gateway.shared.close()


def sharded(port: int, metrics_port: int, backend_url: str, names: list[str], indexed: list[str] | None = None) -> dict[str, str]:
    """A projected volume's files: config.yaml, routes.yaml naming one shard, the shard holding `names`'
    routes; routes.yaml names the hash of a shard holding `indexed` instead when given (a shard not
    updated yet)."""
    def shard(routes: list[str]) -> str:
        return config_text(port, metrics_port, backend_url, routes).split("routes:", 1)[1].join(["routes:", ""])
    listen = {"address": "127.0.0.1", "port": port, "metrics_port": metrics_port}
    index = {"shards": {"routes-001.yaml": shard_hash(shard(names if indexed is None else indexed))}, "policies": []}
    return {"config.yaml": yaml.safe_dump({"listen": listen, "ownership": loopback_allowed()}),
            "routes.yaml": yaml.safe_dump(index),
            "routes-001.yaml": shard(names)}


def test_shards_are_loaded_only_when_each_matches_the_index(tmp_path) -> None:
    """ConfigMaps projected into one volume reach it at different times: a shard that does not match
    routes.yaml's index defers the reload (no failure counted, the config in force serves) until one does."""
    port, metrics_port = ports()
    volume = Projection(tmp_path / "config")
    with BackendProcess() as backend:
        volume.write(sharded(port, metrics_port, backend.url, ["a"]))
        with GatewayProcess(volume.dir, port, metrics_port) as gateway:
            first = gateway.ready()["config_hash"]
            assert http_status(f"{gateway.url}/a") == 200
            volume.write(sharded(port, metrics_port, backend.url, ["a"], indexed=["a", "b"]))  # index ahead of its shard
            wait_until(lambda: any("deferred" in line["msg"] for line in gateway.log_lines()))
            assert gateway.ready()["config_hash"] == first
            assert http_status(f"{gateway.url}/b") == 404
            volume.write(sharded(port, metrics_port, backend.url, ["a", "b"]))
            wait_until(lambda: gateway.ready()["config_hash"] != first)
            assert http_status(f"{gateway.url}/b") == 200
            assert not re.search(r'gateway_config_reloads_total\{result="failure"\} [1-9]', gateway.metrics())
    deferred = [line for line in gateway.log_lines() if "deferred" in line["msg"]]
    assert len(deferred) == 1 and deferred[0]["level"] == "warning", deferred
    assert "routes-001.yaml: holds content" in deferred[0]["msg"] and deferred[0]["config_hash"] == first


def test_a_gateway_starting_before_its_shards_match_the_index_waits_for_them(tmp_path) -> None:
    """A pod may start on routes.yaml newer than a shard's ConfigMap (the kubelet updates each on its own):
    it waits for the next volume update, within the startup probe's minute, instead of exiting."""
    port, metrics_port = ports()
    volume = Projection(tmp_path / "config")
    with BackendProcess() as backend:
        volume.write(sharded(port, metrics_port, backend.url, ["a"], indexed=["a", "b"]))  # index ahead of its shard
        gateway = GatewayProcess(volume.dir, port, metrics_port)
        try:
            gateway.start(wait=False)
            wait_until(lambda: any("waiting" in line["msg"] for line in gateway.log_lines()) or gateway.process.poll())
            assert gateway.process.poll() is None, gateway.log_text()
            volume.write(sharded(port, metrics_port, backend.url, ["a", "b"]))
            gateway.wait_ready()
            assert http_status(f"{gateway.url}/b") == 200
        finally:
            gateway.stop()
    waiting = [line for line in gateway.log_lines() if "waiting" in line["msg"]]
    assert len(waiting) == 1 and waiting[0]["level"] == "warning", waiting
    assert "routes-001.yaml: holds content" in waiting[0]["msg"]


def test_a_sighup_storm_makes_a_few_reloads_not_one_each(tmp_path) -> None:
    """Signals that come while a reload is under way make one more reload after it, not one each: a storm
    of SIGHUPs (a script in a loop, a sidecar gone wild) must not queue a reload, and a process, per signal."""
    port, metrics_port = ports()
    path = tmp_path / "gw.yaml"
    signals = 50
    with BackendProcess() as backend:
        write_config(path, port, metrics_port, backend.url, ["a"])
        with GatewayProcess(path, port, metrics_port) as gateway:
            for _ in range(signals):  # each handled on its own (the kernel merges only those not yet handled)
                gateway.signal(signal.SIGHUP)
                time.sleep(0.02)

            def reloads() -> int:
                found = re.search(r'gateway_config_reloads_total\{result="success"\} (\S+)', gateway.metrics())
                return int(float(found.group(1))) if found else 0

            counts = [-1, reloads()]
            while counts[-1] != counts[-2]:  # until a second passes without a reload (each takes well under)
                time.sleep(1)
                counts.append(reloads())
            assert http_status(f"{gateway.url}/a") == 200
    assert 0 < counts[-1] <= signals // 4, f"{counts[-1]} reloads for {signals} signals"
