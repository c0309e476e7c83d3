"""The config model and loader: every bad case names its file, line and setting."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from apigw.config.errors import ConfigError, ConfigIncomplete
from apigw.config.loader import check_models, load_config, parse_documents
from apigw.config.model import Config, RoutesDocument, config_hash, parse_duration, restart_settings, shard_hash

ROOT = Path(__file__).parent.parent
INVALID = sorted((Path(__file__).parent / "configs" / "invalid").glob("*.yaml"))


@pytest.mark.parametrize("case", INVALID, ids=[p.stem for p in INVALID])
def test_invalid_config_reports_exactly_its_located_errors(case: Path) -> None:
    """Each `# error:` line heading a case is the start of one error, in order; no other error is reported."""
    text = case.read_text()
    expected = [line.removeprefix("# error: ") for line in text.splitlines() if line.startswith("# error: ")]
    with pytest.raises(ConfigError) as caught:
        parse_documents({"config.yaml": text})
    errors = caught.value.errors
    assert len(errors) == len(expected), errors
    assert all(error.startswith(start) for error, start in zip(errors, expected, strict=True)), errors


@pytest.mark.parametrize("path", [ROOT / "examples" / "gateway.yaml", ROOT / "examples" / "configmap"])
def test_examples_are_valid(path: Path) -> None:
    config = load_config(path)
    assert config.routes


def test_directory_merges_both_files_and_keeps_people_settings() -> None:
    config = load_config(ROOT / "examples" / "configmap")
    assert config.ratelimit.failure_mode == "fail_open"
    assert [r.name for r in config.routes] == ["default.users", "default.orders"]
    assert config.policies[0].period == 60.0


def test_routes_file_may_not_hold_global_settings() -> None:
    with pytest.raises(ConfigError) as caught:
        parse_documents({"config.yaml": "", "routes.yaml": "ratelimit: {enabled: false}\n"})
    assert caught.value.errors == ["routes.yaml:1: ratelimit: unknown setting (check its spelling and indentation)"]


def test_every_error_is_reported_not_just_the_first() -> None:
    text = "listen: {port: 0}\nroutes:\n  - name: a\n  - name: b\n"
    with pytest.raises(ConfigError) as caught:
        parse_documents({"config.yaml": text})
    errors = caught.value.errors
    assert len(errors) == 3
    assert any("routes[1].backend" in e for e in errors)


def test_missing_file_and_empty_directory(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read: No such file"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="holds neither config.yaml nor routes.yaml"):
        load_config(tmp_path)


@pytest.mark.parametrize(
    "text, seconds", [("500ms", 0.5), ("30s", 30), ("1m", 60), ("1h", 3600), (2, 2.0), ("1.5s", 1.5)]
)
def test_durations(text: object, seconds: float) -> None:
    assert parse_duration(text) == seconds


def test_hash_is_stable_and_sensitive() -> None:
    base = "routes: [{name: a, backend: {service: a, url: 'http://a'}}]"
    one, two = parse_documents({"config.yaml": base}), parse_documents({"config.yaml": base + "\n# comment"})
    assert config_hash(one) == config_hash(two)
    other = parse_documents({"config.yaml": base.replace("http://a", "http://b")})
    assert config_hash(one) != config_hash(other)


def test_restart_settings_marks_listeners_not_routes() -> None:
    settings = restart_settings(Config())
    assert settings["listen.port"] == 8080
    assert settings["listen.tls"] is False
    assert not any(key.startswith(("routes", "ratelimit", "auth")) for key in settings)


def test_both_files_errors_come_in_one_pass_in_file_then_line_order() -> None:
    config = "routes:\n  - name: a\n    backend: {service: a, url: 'http://a'}\n    ratelimit: gold\nlisten: {port: x}\n"
    routes = (
        "routes:\n  - name: b\n    backend: {service: b, url: 'http://b', timeout: -1}\n"
        "  - name: a\n    match: {path: /a}\n    backend: {service: a, url: 'http://a'}\n"
        "policies:\n  - {name: bronze, requests: 1, period: 1s}\n"
    )
    with pytest.raises(ConfigError) as caught:
        parse_documents({"config.yaml": config, "routes.yaml": routes})
    assert [e.split(": ")[0] for e in caught.value.errors] == [
        "config.yaml:4", "config.yaml:5", "routes.yaml:3", "routes.yaml:4",
    ]
    assert "policy 'gold' is not defined (defined: bronze)" in caught.value.errors[0]
    assert "routes[1].name: route 'a' is already defined in config.yaml routes[0]" in caught.value.errors[3]


def test_a_file_that_does_not_parse_hides_only_what_may_be_in_it() -> None:
    """config.yaml may define the policy routes.yaml names: with config.yaml unreadable as YAML, the
    reference is not called undefined; routes.yaml's own errors still are."""
    routes = "routes:\n  - name: a\n    backend: {service: a, url: 'http://a'}\n    ratelimit: gold\n  - name: b\n"
    with pytest.raises(ConfigError) as caught:
        parse_documents({"config.yaml": "listen: [\n", "routes.yaml": routes})
    assert len(caught.value.errors) == 2, caught.value.errors
    assert caught.value.errors[0].startswith("config.yaml:2: not valid YAML")
    assert caught.value.errors[1] == "routes.yaml:5: routes[1].backend: required setting is missing"


def test_a_problem_shared_by_aliases_is_reported_once_per_setting() -> None:
    """YAML anchors make one node appear at several settings: each setting is named once, none twice."""
    text = "routes:\n  - &r {name: a, backend: {service: a, url: nope}}\n  - *r\n"
    with pytest.raises(ConfigError) as caught:
        parse_documents({"config.yaml": text})
    errors = caught.value.errors
    assert len(errors) == len(set(errors)) == 2, errors


_BASE = [
    "listen: {port: 8080}",
    "logging: {level: INFO}",
    "routes:",
    "  - {name: r0, match: {path_prefix: /r0}, backend: {service: s0, url: 'http://s0'}}",
    "  - {name: r1, match: {path_prefix: /r1}, backend: {service: s1, url: 'http://s1'}, ratelimit: p0}",
    "  - {name: r2, match: {path_prefix: /r2}, backend: {service: s2, url: 'http://s2'}}",
    "  - {name: r3, match: {path_prefix: /r3}, backend: {service: s3, url: 'http://s3'}}",
    "  - {name: r4, match: {path_prefix: /r4}, backend: {service: s4, url: 'http://s4'}}",
    "  - {name: r5, match: {path_prefix: /r5}, backend: {service: s5, url: 'http://s5'}}",
    "  - {name: r6, match: {path_prefix: /r6}, backend: {service: s6, url: 'http://s6'}}",
    "policies:",
    "  - {name: p0, requests: 1, period: 1s}",
    "  - {name: p1, requests: 1, period: 1s}",
    "  - {name: p2, requests: 1, period: 1s}",
]
_FAULTS = {  # line index -> the line with one fault; no fault touches an item another fault refers to
    0: "listen: {port: banana}",
    1: "logging: {level: LOUD}",
    3: "  - {name: r0, match: {path_prefix: /r0}, backend: {service: s0, url: nope}}",
    4: "  - {name: r1, match: {path_prefix: /r1}, backend: {service: s1, url: 'http://s1'}, ratelimit: px}",
    5: "  - {name: r3, match: {path_prefix: /r2}, backend: {service: s2, url: 'http://s2'}}",
    7: "  - {name: r4, match: {path_prefix: /r4}, backend: {service: s4, url: 'http://s4', timeout: soon}}",
    8: "  - {name: r5, match: {path_prefix: /r3}, backend: {service: s5, url: 'http://s5'}}",
    9: "  - {name: r6, match: {path_prefix: /r6}, backend: {service: s6, url: 'http://s6'}, auth: {}}",
}
"""A policy's fault would change the `defined:` list of the undefined-policy error (fixtures cover those)."""


def _errors(faults: set[int]) -> list[str]:
    text = "\n".join(_FAULTS[i] if i in faults else line for i, line in enumerate(_BASE))
    try:
        parse_documents({"config.yaml": text})
    except ConfigError as exc:
        return exc.errors
    return []


@settings(max_examples=60, deadline=None)
@given(st.sets(st.sampled_from(sorted(_FAULTS)), min_size=1))
def test_one_pass_reports_what_each_fault_reports_alone(faults: set[int]) -> None:
    """Independent faults together: exactly the errors each gives alone, in line order, none twice."""
    assert _errors(set()) == []
    alone = {line: _errors({line}) for line in faults}
    assert all(len(errors) == 1 for errors in alone.values()), alone
    together = _errors(faults)
    assert sorted(together, key=lambda e: int(e.split(":")[1])) == together
    assert sorted(together) == sorted(e for errors in alone.values() for e in errors)


_ACROSS_ITEMS = {4, 5, 8, 9}
"""Faults in no item alone, only between items or files: what `check_models` checks."""


@settings(max_examples=30, deadline=None)
@given(st.sets(st.sampled_from(sorted(_ACROSS_ITEMS))))
def test_checking_models_finds_what_checking_their_text_finds(faults: set[int]) -> None:
    """The operator validates its routes as models, not as text: the same errors (without lines, there
    is no text), the same config and hash."""
    lines = [_FAULTS[i] if i in faults else line for i, line in enumerate(_BASE)]
    config_text = "\n".join(lines[:2])
    routes_text = "\n".join(lines[2:])
    models = {"config.yaml": Config.model_validate(yaml.safe_load(config_text) or {}),
              "routes.yaml": RoutesDocument.model_validate(yaml.safe_load(routes_text))}
    checked = check_models(models)
    texts = {"config.yaml": config_text, "routes.yaml": routes_text}
    try:
        config = parse_documents(texts)
    except ConfigError as exc:
        assert checked.errors == [re.sub(r"^(\S+\.yaml):\d+:", r"\1:", e) for e in exc.errors]
        assert faults
    else:
        assert not faults and checked.errors == []
        assert config_hash(checked.result()) == config_hash(config)


def _volume(tmp_path: Path, shard: str, named: str) -> Path:
    (tmp_path / "config.yaml").write_text("listen: {port: 8080}\n")
    (tmp_path / "routes.yaml").write_text(yaml.safe_dump({"shards": {"routes-001.yaml": shard_hash(named)},
                                                          "policies": [{"name": "p", "requests": 1, "period": "1s"}]}))
    (tmp_path / "routes-001.yaml").write_text(shard)
    (tmp_path / "routes-002.yaml").write_text("not: [valid")  # not named by routes.yaml: never read
    return tmp_path


SHARD = "routes:\n- {name: a, match: {path_prefix: /a}, backend: {service: s, url: 'http://s'}, ratelimit: p}\n"


def test_shards_named_by_routes_yaml_load_as_one_config(tmp_path: Path) -> None:
    config = load_config(_volume(tmp_path, SHARD, SHARD))
    assert [(r.name, r.ratelimit) for r in config.routes] == [("a", "p")], "a shard's route refers to routes.yaml's policy"


def test_a_shard_not_matching_the_index_is_incomplete_not_invalid(tmp_path: Path) -> None:
    newer = SHARD + "# newer\n"
    with pytest.raises(ConfigIncomplete) as caught:
        load_config(_volume(tmp_path, SHARD, newer))
    expected = (f"{tmp_path}/routes-001.yaml: holds content {shard_hash(SHARD)}, routes.yaml names {shard_hash(newer)} "
                "(its ConfigMap and routes.yaml's were updated at different times)")
    assert caught.value.errors == [expected]
    (tmp_path / "routes-001.yaml").unlink()
    with pytest.raises(ConfigIncomplete, match="routes-001.yaml: named by routes.yaml but not there"):
        load_config(tmp_path)


def test_shard_errors_are_located_in_the_shard_and_names_are_unique_across_files(tmp_path: Path) -> None:
    shard = SHARD + "- {name: a, match: {path_prefix: /b}, backend: {service: s, url: 'http://s'}, ratelimit: gold}\n"
    with pytest.raises(ConfigError) as caught:
        load_config(_volume(tmp_path, shard, shard))
    assert not isinstance(caught.value, ConfigIncomplete)
    assert caught.value.errors == [
        f"{tmp_path}/routes-001.yaml:3: routes[1].name: route 'a' is already defined in {tmp_path}/routes-001.yaml routes[0]",
        f"{tmp_path}/routes-001.yaml:3: routes[1].ratelimit: policy 'gold' is not defined (defined: p)",
    ]


@pytest.mark.parametrize("name", ["../config.yaml", "routes-1.yaml", "/etc/passwd"])
def test_the_index_names_only_shard_files_in_its_directory(tmp_path: Path, name: str) -> None:
    (tmp_path / "routes.yaml").write_text(yaml.safe_dump({"shards": {name: "0123456789abcdef"}}))
    with pytest.raises(ConfigError) as caught:
        load_config(tmp_path)
    assert not isinstance(caught.value, ConfigIncomplete)
    assert caught.value.errors[0].startswith(f"{tmp_path}/routes.yaml:2: shards.{name}: String should match pattern")


@pytest.mark.parametrize("redis", [
    {"url": "redis://:hunter2/Q9+x==@redis-master:6379/0"},  # a base64 password, its `/` not percent-encoded
    {"url": "redis://app:hunter2#x@redis-master:6379/0"},
    {"url": "redis://app:hunter2?x@redis-master:6379/0"},
    {"url": "redis+sentinel://app:hunter2/x@s1:26379/mymaster"},
    {"url": "redis:/:hunter2@redis-master:6379/0"},  # a scheme typo
    {"url": "redis://:6380/hunter2@redis-master:6379/0"},  # would be 127.0.0.1:6380, db ignored
    {"url": "redis+sentinel://app:6379/hunter2@s1:26379"},  # would be sentinel app:6379, master 'hunter2@s1:26379'
    {"url": "redis+sentinel://s1:26379/mymaster", "sentinel_password": 1234567},  # YAML reads it as a number
])
def test_a_redis_setting_error_never_shows_the_password(redis: dict[str, object]) -> None:
    """Config errors are printed, logged, served in `/_health/ready` and copied into CR status."""
    with pytest.raises(ConfigError) as caught:
        parse_documents({"config.yaml": yaml.safe_dump({"redis": redis})})
    assert caught.value.errors and all("config.yaml:" in error for error in caught.value.errors)
    assert not any("hunter2" in error or "1234567" in error for error in caught.value.errors), caught.value.errors
