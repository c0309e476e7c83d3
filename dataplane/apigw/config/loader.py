"""Reading config files into a validated `Config`, with every error located by file, line and path.

A config is one YAML file, or the ConfigMap directory holding `config.yaml` (people's settings,
possibly with routes) and `routes.yaml` (the operator's routes and policies). Both are validated
together: a name defined twice or a policy that is not defined anywhere is an error.
"""

from __future__ import annotations

import pickle
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from apigw.config.errors import ConfigError
from apigw.config.model import Backend, Config, Policy, Route, RoutesDocument, config_hash

GLOBAL_FILE = "config.yaml"
ROUTES_FILE = "routes.yaml"

YAML_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
"""libyaml's C parser where PyYAML was built with it: a 5,000-route file parses several times faster.
Its nodes carry line marks as the pure-Python parser's do, so errors stay located."""


ROUTE_TIMEOUTS = ("timeout", "attempt_timeout", "request_timeout")
CLUSTER_SETTINGS = [name for name in Backend.model_fields if name not in ("service", "url", *ROUTE_TIMEOUTS)]
"""What routes sharing a backend service must agree on: it has one upstream cluster (how long to wait
for an answer is the route's)."""


def config_files(path: Path) -> list[Path]:
    """The files a `--config` path stands for, in the order they are read."""
    if path.is_dir():
        files = [path / GLOBAL_FILE, path / ROUTES_FILE]
        present = [f for f in files if f.exists()]
        if not present:
            raise ConfigError([f"{path}: directory holds neither {GLOBAL_FILE} nor {ROUTES_FILE}"])
        return present
    return [path]


def load_config(path: Path) -> Config:
    """Read and validate the config at `path` (a file or a ConfigMap directory)."""
    documents: dict[str, str] = {}
    errors = []
    for file in config_files(path):
        try:
            documents[str(file)] = file.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            errors.append(f"{file}: cannot read: {getattr(exc, 'strerror', None) or exc}")
    if errors:
        raise ConfigError(errors)
    return parse_documents(documents)


def load_config_parts(path: Path, chunk: int = 50) -> tuple[bytes, list[bytes], str]:
    """`load_config` in a worker process, for a reload: the config without its routes, its routes
    `chunk` at a time, each pickled, and its hash. The event loop unpickles a part at a time (a few ms
    each for a 5,000-route config) and serves traffic in between."""
    config = load_config(path)
    routes = config.routes
    parts = [pickle.dumps(routes[i:i + chunk]) for i in range(0, len(routes), chunk)]
    return pickle.dumps(config.model_copy(update={"routes": []})), parts, config_hash(config)


def parse_documents(documents: Mapping[str, str]) -> Config:
    """Validate config texts by file name. A file named `routes.yaml` may hold only routes and policies.

    This is what the operator calls with the ConfigMap's two keys, so both sides agree on validity.
    """
    errors: list[str] = []
    parsed: list[tuple[str, BaseModel]] = []
    nodes: dict[str, yaml.Node | None] = {}
    for name, text in documents.items():
        model = RoutesDocument if Path(name).name == ROUTES_FILE else Config
        document, nodes[name] = _validate(name, text, model, errors)
        if document is not None:
            parsed.append((name, document))
    if errors:
        raise ConfigError(errors)

    def where(file: str, *loc: Any) -> str:
        line = _line_of(nodes[file], loc)
        return f"{file}:{line}: {format_loc(loc)}" if line else f"{file}: {format_loc(loc)}"

    globals_ = [doc for _, doc in parsed if isinstance(doc, Config)]
    base = globals_[0] if globals_ else Config()
    routes = [(name, i, route) for name, doc in parsed for i, route in enumerate(doc.routes)]
    policies = [(name, i, policy) for name, doc in parsed for i, policy in enumerate(doc.policies)]
    _check_references(routes, policies, where, errors)
    if not (base.auth.keys or base.auth.jwks_file):
        for file, i, route in routes:
            if route.enabled and route.auth is not None:
                errors.append(f"{where(file, 'routes', i, 'auth')}: the route checks tokens, but no key is "
                              "configured (auth.keys or auth.jwks_file in config.yaml)")
    if errors:
        raise ConfigError(errors)
    return base.model_copy(update={"routes": [r for _, _, r in routes], "policies": [p for _, _, p in policies]})


def _validate(
    name: str, text: str, model: type[BaseModel], errors: list[str]
) -> tuple[BaseModel | None, yaml.Node | None]:
    try:
        root, data = _parse_yaml(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{name}:{mark.line + 1}" if mark else name
        problem = getattr(exc, "problem", None) or str(exc)
        errors.append(f"{where}: not valid YAML: {problem}")
        return None, None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        errors.append(f"{name}:1: the top level must be a mapping of settings, not {type(data).__name__}")
        return None, root
    try:
        return model.model_validate(data), root
    except ValidationError as exc:
        for error in exc.errors(include_url=False):
            loc = error["loc"]
            line = _line_of(root, loc)
            where = f"{name}:{line}" if line else name
            errors.append(f"{where}: {format_loc(loc) or '(top level)'}: {_message(error)}")
        return None, root


def _parse_yaml(text: str) -> tuple[yaml.Node | None, Any]:
    """One parse for both the node tree (line numbers for errors) and the data (what is validated)."""
    loader = YAML_LOADER(text)
    try:
        root = loader.get_single_node()
        return root, (loader.construct_document(root) if root is not None else None)
    finally:
        loader.dispose()


def format_loc(loc: tuple[Any, ...]) -> str:
    """('routes', 2, 'backend', 'url') -> 'routes[2].backend.url'."""
    text = ""
    for part in loc:
        if isinstance(part, int):
            text += f"[{part}]"
        elif isinstance(part, str) and "[" in part:  # a union member's name: not a place in the file
            continue
        else:
            text += f".{part}" if text else str(part)
    return text


def _message(error: dict[str, Any]) -> str:
    msg = error["msg"].removeprefix("Value error, ")
    if error["type"] == "extra_forbidden":
        return "unknown setting (check its spelling and indentation)"
    if error["type"] == "missing":
        return "required setting is missing"
    value = error.get("input")
    if not isinstance(value, (dict, list)) and value is not None and repr(value) not in msg:
        msg += f" (got {_redacted(value)!r})"
    return msg


def _redacted(value: Any) -> Any:
    """A URL's password never reaches a message (messages are printed and logged)."""
    if isinstance(value, str) and "://" in value and "@" in value:
        scheme, _, rest = value.partition("://")
        userinfo, _, host = rest.rpartition("@")
        return f"{scheme}://{userinfo.partition(':')[0]}:***@{host}" if userinfo else value
    return value


def _line_of(node: yaml.Node | None, loc: tuple[Any, ...]) -> int | None:
    """The 1-based line of the YAML node at `loc`, or of its deepest existing parent."""
    line = node.start_mark.line + 1 if node is not None else None
    for part in loc:
        child = None
        if isinstance(node, yaml.MappingNode):
            child = next((v for k, v in node.value if k.value == part), None)
            if child is None:  # an unknown key: point at the key itself
                child = next((k for k, _ in node.value if k.value == part), None)
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and part < len(node.value):
            child = node.value[part]
        if child is None:
            break
        node, line = child, child.start_mark.line + 1
    return line


def _check_references(
    routes: list[tuple[str, int, Route]],
    policies: list[tuple[str, int, Policy]],
    where: Callable[..., str],
    errors: list[str],
) -> None:
    policy_names: dict[str, str] = {}
    for file, i, policy in policies:
        if policy.name in policy_names:
            errors.append(f"{where(file, 'policies', i, 'name')}: policy {policy.name!r} is already defined in {policy_names[policy.name]}")
        policy_names.setdefault(policy.name, f"{file} policies[{i}]")

    route_names: dict[str, str] = {}
    backends: dict[str, tuple[Backend, str]] = {}
    matches: dict[tuple[Any, ...], str] = {}
    for file, i, route in routes:
        here = f"{file} routes[{i}]"
        if route.name in route_names:
            errors.append(f"{where(file, 'routes', i, 'name')}: route {route.name!r} is already defined in {route_names[route.name]}")
        route_names.setdefault(route.name, here)
        if route.ratelimit is not None and route.ratelimit not in policy_names:
            known = ", ".join(sorted(policy_names)) or "none"
            errors.append(f"{where(file, 'routes', i, 'ratelimit')}: policy {route.ratelimit!r} is not defined (defined: {known})")
        backend = route.backend
        first, first_at = backends.setdefault(backend.service, (backend, here))
        if first.url != backend.url:
            errors.append(
                f"{where(file, 'routes', i, 'backend', 'url')}: backend service {backend.service!r} already has url {first.url} in {first_at}"
            )
        for setting in CLUSTER_SETTINGS:
            if getattr(first, setting) != getattr(backend, setting):
                errors.append(
                    f"{where(file, 'routes', i, 'backend', setting)}: backend service {backend.service!r} has other "
                    f"{setting} settings in {first_at}; routes sharing a backend must give the same"
                )
        if not route.enabled:
            continue
        m = route.match
        for method in m.methods or ["*"]:
            key = (m.host, m.path, m.path_prefix or ("/" if m.path is None else None), method)
            if key in matches:
                errors.append(f"{where(file, 'routes', i, 'match')}: same host, path and method as {matches[key]}")
                break
            matches[key] = f"route {route.name!r} ({here})"
