"""Reading config files into a validated `Config`, with every error located by file, line and path.

A config is one YAML file, or the ConfigMap directory holding `config.yaml` (people's settings,
possibly with routes) and `routes.yaml` (the operator's routes and policies). Both are validated
together: a name defined twice or a policy that is not defined anywhere is an error. When the routes
outgrow one ConfigMap, `routes.yaml` names shard files (`routes-001.yaml`...) with the hash of each,
from other ConfigMaps projected into the same directory; they are read and validated with the rest,
and a shard missing or holding other content means the files are mid-update (`ConfigIncomplete`).
"""

from __future__ import annotations

import pickle
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from apigw.config.errors import ConfigError, ConfigIncomplete
from apigw.config.model import (
    SHARD_FILE,
    Backend,
    Config,
    Policy,
    Route,
    RoutesDocument,
    RoutesFile,
    config_hash,
    shard_hash,
)

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


def shard_files(path: Path) -> list[Path]:
    """The shard files present in a ConfigMap directory (to watch; only those routes.yaml names are read)."""
    if not path.is_dir():
        return []
    return sorted(file for file in path.glob("routes-*.yaml") if re.match(SHARD_FILE, file.name))


def shard_index(routes_yaml: str) -> dict[str, str]:
    """The shards a routes.yaml names (file -> hash); {} when it names none or does not parse (its own
    validation then says why). Cheap for the usual routes.yaml without shards: no second parse."""
    if "shards:" not in routes_yaml:
        return {}
    try:
        data = yaml.load(routes_yaml, Loader=YAML_LOADER)
    except yaml.YAMLError:
        return {}
    shards = data.get("shards") if isinstance(data, dict) else None
    if not isinstance(shards, dict):
        return {}
    return {k: v for k, v in shards.items() if isinstance(k, str) and re.match(SHARD_FILE, k) and isinstance(v, str)}


def load_config(path: Path) -> Config:
    """Read and validate the config at `path` (a file or a ConfigMap directory)."""
    return check_config(path).result()


def check_config(path: Path) -> Checked:
    """Read the config at `path` and find every problem in it: what `load_config` and
    `gateway -validate-config` report. Unreadable files are problems like any other."""
    documents = _read_files(config_files(path))
    routes_yaml = documents.get(str(path / ROUTES_FILE))
    if path.is_dir() and routes_yaml is not None:
        documents.update(_read_shards(path, shard_index(routes_yaml)))
    return check_documents(documents)


def _read_files(files: list[Path]) -> dict[str, str]:
    documents: dict[str, str] = {}
    unreadable = []
    for file in files:
        try:
            documents[str(file)] = file.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            unreadable.append(f"{file}: cannot read: {getattr(exc, 'strerror', None) or exc}")
    if unreadable:
        raise ConfigError(unreadable)
    return documents


def _read_shards(path: Path, index: Mapping[str, str]) -> dict[str, str]:
    """The shard files `index` names, each holding the content it names; else the files are mid-update."""
    documents = _read_files([path / name for name in index if (path / name).exists()])
    pending = []
    for name, wanted in sorted(index.items()):
        text = documents.get(str(path / name))
        if text is None:
            pending.append(f"{path / name}: named by {ROUTES_FILE} but not there (its ConfigMap is not projected "
                           "into this directory yet, or at all)")
        elif shard_hash(text) != wanted:
            pending.append(f"{path / name}: holds content {shard_hash(text)}, {ROUTES_FILE} names {wanted} "
                           "(its ConfigMap and routes.yaml's were updated at different times)")
    if pending:
        raise ConfigIncomplete(pending)
    return documents


def load_config_parts(path: Path, chunk: int = 50) -> tuple[bytes, list[bytes], str, dict[str, str]]:
    """`load_config` in a worker process, for a reload: the config without its routes, its routes
    `chunk` at a time, each pickled, its hash, and the texts it was read from. The event loop unpickles
    a part at a time (a few ms each for a 5,000-route config) and serves traffic in between."""
    checked = check_config(path)
    config = checked.result()
    routes = config.routes
    parts = [pickle.dumps(routes[i:i + chunk]) for i in range(0, len(routes), chunk)]
    return pickle.dumps(config.model_copy(update={"routes": []})), parts, config_hash(config), checked.texts


def parse_documents(documents: Mapping[str, str]) -> Config:
    """Validate config texts by file name. A file named `routes.yaml` may hold only routes and policies.

    This is what the operator calls with the ConfigMap's two keys, so both sides agree on validity.
    """
    return check_documents(documents).result()


class Checked:
    """Every problem found in a config's files, each located, in file-then-line order, none twice;
    and the config made of the parts that parsed (whole only when there is no problem)."""

    def __init__(self, files: list[str]):
        self.config = Config()
        self.global_file: str | None = None
        """The file holding the global settings (`config.yaml`, or the one file), once it parsed."""
        self.unparsed: set[str] = set()
        """Global settings (`listen`, `auth`...) that did not parse: their defaults stand in for them."""
        self.nodes: dict[str, yaml.Node | None] = {}
        """Each file's YAML node tree, for the line of a setting."""
        self.route_places: dict[str, tuple[str, int]] = {}
        """Each route's file and index there, by name (the first, if defined twice)."""
        self.texts: dict[str, str] = {}
        """The files' texts by name, as read (none when the documents came as models)."""
        self._order = {name: i for i, name in enumerate(files)}
        self._found: dict[str, tuple[int, int]] = {}

    @property
    def errors(self) -> list[str]:
        return sorted(self._found, key=self._found.__getitem__)

    def result(self) -> Config:
        if self._found:
            raise ConfigError(self.errors)
        return self.config

    def add(self, file: str, line: int | None, message: str) -> None:
        """`message` at `file:line` (or at the file alone)."""
        where = f"{file}:{line}" if line else file
        self._found.setdefault(f"{where}: {message}", (self._order[file], line or 0))

    def add_at(self, file: str, loc: tuple[Any, ...], message: str) -> None:
        """`message` about the setting at `loc` in `file`."""
        self.add(file, _line_of(self.nodes.get(file), loc), f"{format_loc(loc) or '(top level)'}: {message}")

    def add_setting_error(self, message: str) -> None:
        """A problem found outside the loader, named by its setting (`auth.keys[0].file: cannot read...`):
        located at that setting in the file holding the global settings."""
        setting = _SETTING_PATH.match(message)
        if self.global_file is None or setting is None:
            self._found.setdefault(message, (len(self._order), 0))
            return
        loc = tuple(int(p[1:-1]) if p.startswith("[") else p for p in _SETTING_PART.findall(setting.group()))
        self.add(self.global_file, _line_of(self.nodes[self.global_file], loc), message)


_SETTING_PATH = re.compile(r"[a-z_]+(?:\.[a-z_]+|\[\d+\])*")
_SETTING_PART = re.compile(r"[a-z_]+|\[\d+\]")


def check_documents(documents: Mapping[str, str]) -> Checked:
    """Validate config texts by file name, finding every problem in one pass.

    Each document is validated whole (fast when valid); one that fails is validated again item by
    item, so that a bad route or setting hides nothing else. The cross-reference checks then run over
    the items that parsed, and say nothing about names that may belong to an item that did not.
    """
    checked = Checked(list(documents))
    checked.texts = dict(documents)
    parts = _Parts()
    for name, text in documents.items():
        model = _model_of(Path(name).name)
        checked.nodes[name], data = _read_yaml(name, text, checked)
        if data is None:
            parts.unknown_policies = True
            parts.unknown_settings |= model is Config
            continue
        _add_document(name, _validate(name, data, model, checked, parts), checked)
    return _check_whole(checked, parts)


def _model_of(file_name: str) -> type[RoutesDocument]:
    if file_name == ROUTES_FILE:
        return RoutesFile
    return RoutesDocument if re.match(SHARD_FILE, file_name) else Config


def check_models(documents: Mapping[str, RoutesDocument]) -> Checked:
    """The checks across files, over documents already validated one by one: what `check_documents`
    finds in their texts once each parsed. The operator validates its rendered routes so, without
    writing and re-reading them; its errors carry no line (there is no text)."""
    checked = Checked(list(documents))
    parts = _Parts()
    for name, document in documents.items():
        parts.add(name, document)
        _add_document(name, document, checked)
    return _check_whole(checked, parts)


def _add_document(name: str, document: RoutesDocument, checked: Checked) -> None:
    """The first document with global settings is the config's base."""
    if isinstance(document, Config) and checked.global_file is None:
        checked.global_file = name
        checked.config = document


def _check_whole(checked: Checked, parts: _Parts) -> Checked:
    """References, duplicates and keys across every document, then the config made of all parts."""
    auth_known = not (parts.unknown_settings or "auth" in checked.unparsed)
    _check_references(parts, checked)
    base = checked.config
    if auth_known and not (base.auth.keys or base.auth.jwks_file):
        for file, i, route in parts.routes:
            if route.enabled and route.auth is not None:
                checked.add_at(file, ("routes", i, "auth"), "the route checks tokens, but no key is configured "
                               "(auth.keys or auth.jwks_file in config.yaml)")
    for file, i, route in parts.routes:
        checked.route_places.setdefault(route.name, (file, i))
    checked.config = base.model_copy(
        update={"routes": [r for _, _, r in parts.routes], "policies": [p for _, _, p in parts.policies]}
    ).with_operator_routes(frozenset(r.name for file, _, r in parts.routes if _model_of(Path(file).name) is not Config))
    return checked


class _Parts:
    """The routes and policies that parsed, by file and index, and what is unknown about the rest."""

    def __init__(self) -> None:
        self.routes: list[tuple[str, int, Route]] = []
        self.policies: list[tuple[str, int, Policy]] = []
        self.failed_policies: set[str] = set()
        """Names of policies that did not parse: a route naming one is not told it is undefined."""
        self.unknown_policies = False
        """A policy (or a whole file) did not parse and its name is unknown: no reference is called undefined."""
        self.unknown_settings = False
        """A file that may hold the global settings did not parse."""

    def add(self, name: str, document: RoutesDocument) -> None:
        self.routes += [(name, i, route) for i, route in enumerate(document.routes)]
        self.policies += [(name, i, policy) for i, policy in enumerate(document.policies)]

    def may_be_defined(self, policy: str) -> bool:
        """Whether a policy that did not parse may have this name."""
        return self.unknown_policies or policy in self.failed_policies


def _read_yaml(name: str, text: str, checked: Checked) -> tuple[yaml.Node | None, dict[str, Any] | None]:
    try:
        root, data = _parse_yaml(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        problem = getattr(exc, "problem", None) or str(exc)
        checked.add(name, mark.line + 1 if mark else None, f"not valid YAML: {problem}")
        return None, None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        checked.add(name, 1, f"the top level must be a mapping of settings, not {type(data).__name__}")
        return root, None
    return root, data


def _validate(
    name: str, data: dict[str, Any], model: type[RoutesDocument], checked: Checked, parts: _Parts
) -> RoutesDocument:
    """The document's settings, with its routes and policies moved to `parts`; what fails is reported."""
    try:
        document = model.model_validate(data)
    except ValidationError as exc:
        failed: set[Any] = set()
        for error in exc.errors(include_url=False):
            loc = error["loc"]
            checked.add_at(name, loc, _message(error))
            failed.add(loc[:2] if loc[:1] in (("routes",), ("policies",)) and len(loc) > 1 else loc[:1])
        document = _validate_parts(name, data, model, failed, parts)
        checked.unparsed |= {loc[0] for loc in failed if len(loc) == 1 and loc[0] not in ("routes", "policies")}
        return document
    parts.add(name, document)
    return document


def _validate_parts(
    name: str, data: dict[str, Any], model: type[RoutesDocument], failed: set[Any], parts: _Parts
) -> RoutesDocument:
    """Validate again what did not fail: the settings without the failed ones, each route and policy alone."""
    settings = {k: v for k, v in data.items() if (k,) not in failed and k not in ("routes", "policies")}
    for section, item_model, found in (("routes", Route, parts.routes), ("policies", Policy, parts.policies)):
        if (section,) in failed:
            parts.unknown_policies |= section == "policies"
            continue
        for i, item in enumerate(data.get(section) or []):
            if (section, i) not in failed:
                found.append((name, i, item_model.model_validate(item)))
            elif section == "policies":
                policy_name = item.get("name") if isinstance(item, dict) else None
                if isinstance(policy_name, str):
                    parts.failed_policies.add(policy_name)
                else:
                    parts.unknown_policies = True
    return model.model_validate(settings)


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
    if str(error["loc"][-1] if error["loc"] else "").endswith("password"):
        return msg  # a password is never shown, whatever its type
    if not isinstance(value, (dict, list)) and value is not None and repr(value) not in msg:
        msg += f" (got {_redacted(value)!r})"
    return msg


def _redacted(value: Any) -> Any:
    """A URL's password never reaches a message (messages are printed and logged)."""
    if isinstance(value, str) and "://" in value and "@" in value:
        scheme, _, rest = value.partition("://")
        userinfo, _, host = rest.rpartition("@")
        return f"{scheme}://{userinfo.partition(':')[0]}:***@{host}" if userinfo else value
    head, at, host = value.rpartition("@") if isinstance(value, str) else ("", "", "")
    if at and ":" in head:  # a mistyped scheme (`redis:/:password@host`); not an address such as ops@example.com
        return f"{re.split('[:/]', head)[0]}:***@{host}"
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


def _check_references(parts: _Parts, checked: Checked) -> None:
    policy_names: dict[str, str] = {}
    for file, i, policy in parts.policies:
        if policy.name in policy_names:
            checked.add_at(file, ("policies", i, "name"), f"policy {policy.name!r} is already defined in {policy_names[policy.name]}")
        policy_names.setdefault(policy.name, f"{file} policies[{i}]")

    route_names: dict[str, str] = {}
    backends: dict[str, tuple[Backend, str]] = {}
    matches: dict[tuple[Any, ...], str] = {}
    for file, i, route in parts.routes:
        here = f"{file} routes[{i}]"
        if route.name in route_names:
            checked.add_at(file, ("routes", i, "name"), f"route {route.name!r} is already defined in {route_names[route.name]}")
        route_names.setdefault(route.name, here)
        if route.ratelimit is not None and route.ratelimit not in policy_names and not parts.may_be_defined(route.ratelimit):
            known = ", ".join(sorted(policy_names)) or "none"
            checked.add_at(file, ("routes", i, "ratelimit"), f"policy {route.ratelimit!r} is not defined (defined: {known})")
        backend = route.backend
        first, first_at = backends.setdefault(backend.service, (backend, here))
        if first.url != backend.url:
            checked.add_at(file, ("routes", i, "backend", "url"),
                           f"backend service {backend.service!r} already has url {first.url} in {first_at}")
        for setting in CLUSTER_SETTINGS:
            if getattr(first, setting) != getattr(backend, setting):
                checked.add_at(file, ("routes", i, "backend", setting), f"backend service {backend.service!r} has other "
                               f"{setting} settings in {first_at}; routes sharing a backend must give the same")
        if not route.enabled:
            continue
        m = route.match
        for method in m.methods or ["*"]:
            key = (m.host, m.path, m.path_prefix or ("/" if m.path is None else None), method)
            if key in matches:
                checked.add_at(file, ("routes", i, "match"), f"same host, path and method as {matches[key]}")
                break
            matches[key] = f"route {route.name!r} ({here})"
