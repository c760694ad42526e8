"""YAML configs: defaults.yaml names every key once; run configs and ``--set`` override it.

An unknown key or a value of the wrong type is an error naming the key and the file.
"""
from __future__ import annotations

import argparse
import copy
import difflib
from pathlib import Path

import yaml

DEFAULTS = Path(__file__).resolve().parent.parent / "configs" / "defaults.yaml"


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


def _merge(base: dict, override: dict, source: str, prefix: str = "") -> None:
    for key, value in override.items():
        path = f"{prefix}{key}"
        if key not in base:
            close = difflib.get_close_matches(str(key), [str(k) for k in base], n=1)
            hint = f" (did you mean {prefix + close[0]!r}?)" if close else ""
            raise ConfigError(f"{source}: unknown config key {path!r}{hint}")
        if isinstance(base[key], dict) and base[key] and isinstance(value, dict):
            _merge(base[key], value, source, path + ".")
        else:
            base[key] = _coerce(path, base[key], value, source)


def with_defaults(section: str, saved: dict, source: str) -> Config:
    """defaults.yaml's ``section`` with ``saved`` (e.g. a checkpoint's stored section) merged over
    it: a key added after the checkpoint was written takes its default, which keeps the older
    behaviour."""
    base = copy.deepcopy(_read_yaml(DEFAULTS)[section])
    _merge(base, saved, source, section + ".")
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
    if path is not None:
        for layer_path, layer in _layers(Path(path).resolve()):
            _merge(cfg, layer, str(layer_path))
    for item in overrides or []:
        _merge(cfg, _parse_override(item), f"--set {item}")
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
