"""YAML configs: defaults.yaml names every key once; run configs and ``--set`` override it.

An unknown key, a value of the wrong type, or a value outside what rules.yaml (next to
defaults.yaml) allows for its key is an error naming the key, the file or --set that gave it, and
the allowed choices or range.
"""
from __future__ import annotations

import argparse
import copy
import difflib
import functools
import re
from pathlib import Path

import yaml

DEFAULTS = Path(__file__).resolve().parent.parent / "configs" / "defaults.yaml"
RULES = DEFAULTS.with_name("rules.yaml")


class ConfigError(ValueError):
    pass


class Config(dict):
    """A nested dict with attribute access: ``cfg.optim.lr``."""

    def __getattr__(self, key):
        try:
            return self[key]
        except KeyError as e:
            raise AttributeError(f"config has no key {key!r}") from e

    def __setattr__(self, key, value):
        self[key] = value

    def __deepcopy__(self, memo):
        return Config({k: copy.deepcopy(v, memo) for k, v in self.items()})

    def to_dict(self) -> dict:
        return {k: v.to_dict() if isinstance(v, Config) else v for k, v in self.items()}


def _wrap(value):
    if isinstance(value, dict):
        return Config({k: _wrap(v) for k, v in value.items()})
    return value


def _read_yaml(path: Path) -> dict:
    try:
        with open(path) as f:
            data = yaml.safe_load(f) or {}
    except (OSError, yaml.YAMLError) as e:
        raise ConfigError(f"{path}: cannot read config: {e}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping")
    return data


def _coerce(key: str, default, value, source: str):
    """Check ``value`` against the type of ``default``; ints are accepted for floats.

    A key whose default is null takes any value; null is accepted only where the default is null.
    List items are checked against the type of the default's first item.
    """
    if default is None:
        return value
    if isinstance(default, bool):
        if isinstance(value, bool):
            return value
    elif isinstance(default, float):
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "1e-4" as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif isinstance(default, int):
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif isinstance(default, str):
        if isinstance(value, str):
            return value
    elif isinstance(default, list):
        if isinstance(value, list):
            if not default:
                return value
            return [_coerce(f"{key}[{i}]", default[0], v, source) for i, v in enumerate(value)]
    elif isinstance(default, dict):
        if isinstance(value, dict):
            return value
    raise ConfigError(f"{source}: key {key!r} must be {type(default).__name__}, "
                      f"got {type(value).__name__} {value!r}")


@functools.lru_cache(maxsize=None)
def rules(path: str | Path = RULES) -> dict[str, dict]:
    """Dotted key -> its rule (see rules.yaml's header)."""
    return _read_yaml(Path(path))


def _bounds(rule: dict) -> str:
    lo = f"[{rule['min']}" if "min" in rule else f"({rule['above']}" if "above" in rule else None
    hi = f"{rule['max']}]" if "max" in rule else f"{rule['below']})" if "below" in rule else None
    if lo and hi:
        return f"in {lo}, {hi}"
    if lo:
        return (">= " if lo[0] == "[" else "> ") + lo[1:]
    return ("<= " if hi[-1] == "]" else "< ") + hi[:-1]


def _violation(value, rule: dict) -> str:
    """What ``value`` breaks of ``rule`` ('' if nothing)."""
    if "choices" in rule and value not in rule["choices"]:
        return "must be one of " + ", ".join(map(str, rule["choices"]))
    if "pattern" in rule and not re.fullmatch(rule["pattern"], str(value)):
        return f"must be {rule['means']}"
    if rule.get("nonempty") and not str(value).strip():
        return "must not be empty"
    items = value if isinstance(value, list) else [value]
    if "length" in rule and len(items) != rule["length"]:
        return f"must be a list of {rule['length']} items"
    if rule.get("ascending") and items != sorted(items):
        return "must be in ascending order"
    if any(k in rule for k in ("min", "max", "above", "below")):
        ok = all(
            ("min" not in rule or v >= rule["min"]) and ("max" not in rule or v <= rule["max"])
            and ("above" not in rule or v > rule["above"])
            and ("below" not in rule or v < rule["below"]) for v in items)
        if not ok:
            return ("each item " if isinstance(value, list) else "") + "must be " + _bounds(rule)
    return ""


def _check(key: str, value, source: str) -> None:
    rule = rules().get(key)
    if rule is None or value is None or isinstance(value, dict):
        return
    why = _violation(value, rule)
    if why:
        raise ConfigError(f"{source}: {key}={value!r} {why}")


def _lookup(cfg: dict, key: str):
    node = cfg
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def _ref(cfg: dict, ref, section: str):
    """A rule's reference: a number, or another key's value (None outside ``section``)."""
    if not isinstance(ref, str):
        return ref
    return _lookup(cfg, ref[len(section):]) if ref.startswith(section) else None


def check_relations(cfg: dict, source: str = "config", section: str = "") -> None:
    """The rules that relate a key to others (multiple_of, at_most) over a merged config, or over
    its ``section`` (keys relative to it; references outside it are not checked)."""
    for key, rule in rules().items():
        value = _lookup(cfg, key[len(section):]) if key.startswith(section) else None
        for kind in ("multiple_of", "at_most"):
            refs = rule.get(kind, [])
            for ref in refs if isinstance(refs, list) else [refs]:
                other = _ref(cfg, ref, section)
                if value is None or other is None:
                    continue
                name = f"{ref}={other!r}" if isinstance(ref, str) else str(ref)
                if kind == "multiple_of" and (not other or value % other):
                    raise ConfigError(f"{source}: {key}={value!r} must be a multiple of {name}")
                if kind == "at_most" and value > other:
                    raise ConfigError(f"{source}: {key}={value!r} must be <= {name}")


def _null_keys(cfg: dict, prefix: str = "") -> frozenset[str]:
    """Dotted keys whose value is null (in defaults.yaml: the keys that may be set back to null)."""
    out = set()
    for key, value in cfg.items():
        if value is None:
            out.add(f"{prefix}{key}")
        elif isinstance(value, dict):
            out |= _null_keys(value, f"{prefix}{key}.")
    return frozenset(out)


def _merge(base: dict, override: dict, source: str, prefix: str = "",
           nullable: frozenset[str] = frozenset()) -> None:
    """``override`` into ``base`` in place, each value checked against base's type; a key in
    ``nullable`` (null in defaults.yaml) also takes null after a layer gave it a value."""
    for key, value in override.items():
        path = f"{prefix}{key}"
        if key not in base:
            close = difflib.get_close_matches(str(key), [str(k) for k in base], n=1)
            hint = f" (did you mean {prefix + close[0]!r}?)" if close else ""
            raise ConfigError(f"{source}: unknown config key {path!r}{hint}")
        if isinstance(base[key], dict) and base[key] and isinstance(value, dict):
            _merge(base[key], value, source, path + ".", nullable)
        elif value is None and path in nullable:
            base[key] = None
        else:
            base[key] = _coerce(path, base[key], value, source)
            _check(path, base[key], source)


def with_defaults(section: str, saved: dict, source: str) -> Config:
    """defaults.yaml's ``section`` with ``saved`` (e.g. a checkpoint's stored section) merged over
    it: a key added after the checkpoint was written takes its default, which keeps the older
    behaviour."""
    base = copy.deepcopy(_read_yaml(DEFAULTS)[section])
    _merge(base, saved, source, section + ".", _null_keys(base, section + "."))
    check_relations(base, source, section + ".")
    return _wrap(base)


def differences(a: dict, b: dict, prefix: str = "") -> list[tuple[str, object, object]]:
    """``(dotted key, a's value, b's value)`` for every leaf key whose values differ (None where
    absent)."""
    out = []
    for key in list(a) + [k for k in b if k not in a]:
        va, vb = a.get(key), b.get(key)
        if isinstance(va, dict) and isinstance(vb, dict):
            out += differences(va, vb, f"{prefix}{key}.")
        elif va != vb:
            out.append((f"{prefix}{key}", va, vb))
    return out


def _parse_override(item: str):
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: expected key=value")
    key, raw = item.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"--set {item!r}: cannot parse value: {e}") from e
    nested: dict = {}
    node = nested
    parts = key.strip().split(".")
    if not all(parts):
        raise ConfigError(f"--set {item!r}: bad key {key!r}")
    for p in parts[:-1]:
        node = node.setdefault(p, {})
    node[parts[-1]] = value
    return nested


def load_config(path: str | Path | None = None, overrides: list[str] | None = None,
                defaults: str | Path = DEFAULTS) -> Config:
    """defaults.yaml <- ``path`` (and the files it lists under ``base``) <- ``overrides``."""
    cfg = _read_yaml(Path(defaults))
    nullable = _null_keys(cfg)
    if path is not None:
        for layer_path, layer in _layers(Path(path).resolve()):
            _merge(cfg, layer, str(layer_path), nullable=nullable)
    for item in overrides or []:
        _merge(cfg, _parse_override(item), f"--set {item}", nullable=nullable)
    sets = f" with --set {' '.join(overrides)}" if overrides else ""
    check_relations(cfg, f"{path if path is not None else defaults}{sets}")
    return _wrap(cfg)


def _layers(path: Path, seen=()) -> list[tuple[Path, dict]]:
    """A config may name ``base: other.yaml`` or a list of them (relative to itself); bases apply
    first, in order."""
    if path in seen:
        raise ConfigError(f"{path}: circular 'base'")
    data = _read_yaml(path)
    bases = data.pop("base", None) or []
    if isinstance(bases, str):
        bases = [bases]
    if not isinstance(bases, list) or not all(isinstance(b, str) for b in bases):
        raise ConfigError(f"{path}: 'base' must be a file name or a list of them")
    layers = []
    for base in bases:
        layers += _layers((path.parent / base).resolve(), seen + (path,))
    return layers + [(path, data)]


def save_config(cfg: Config, path: str | Path) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        yaml.safe_dump(cfg.to_dict(), f, sort_keys=False)


def add_config_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument(
        "--config", default=None, help="YAML config (overrides configs/defaults.yaml)"
    )
    parser.add_argument("--set", nargs="*", action="extend", default=[], metavar="KEY=VALUE",
                        help="dotted overrides, e.g. --set optim.lr=1e-4 data.batch_size=8")
    return parser
