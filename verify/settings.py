"""Config overrides as text: ``--set lr=1e-3``, ``--lr 1e-3``, ``--set optim.lr=1e-3``.

A name is a config field's flat name (``lr``) or its dotted name (``optim.lr``); a flat
name that would match fields of several groups is an error naming the candidates
(``reference.config.field_path``). Values are converted by the field's type; ``none``
turns an optional field off. Every problem is reported before any work."""

import typing

from reference.config import ConfigError, field_path, field_type, type_name


def parse_value(name, text):
    """Convert the override text for field ``name`` to the field's type.
    Raises ConfigError for unknown fields or text of the wrong type."""
    tp = field_type(name)
    options = typing.get_args(tp) if typing.get_origin(tp) is typing.Union else (tp,)
    s = str(text).strip()
    if type(None) in options and s.lower() in ("none", "null", "off"):
        return None
    for t in options:
        if t is bool:
            if s.lower() in ("true", "yes", "1", "on"):
                return True
            if s.lower() in ("false", "no", "0", "off"):
                return False
        elif t is int:
            try:
                return int(s.replace("_", ""))
            except ValueError:
                try:  # allow 5e4 or 2000.0 when the value is integral
                    f = float(s)
                    if f.is_integer():
                        return int(f)
                except ValueError:
                    pass
        elif t is float:
            try:
                return float(s)
            except ValueError:
                pass
        elif t is str:
            return s
    raise ConfigError(f"{name}: cannot read {text!r} as {type_name(tp)}")


def apply_overrides(cfg, overrides):
    """A new config with ``overrides`` (a mapping name -> value or text) applied.
    Texts are converted by the field's type; a field named twice (flat and dotted) is
    refused; every problem is reported before any work."""
    values, errs, seen = {}, [], {}
    for k, v in overrides.items():
        try:
            path = field_path(k)
            if path in seen:
                raise ConfigError(f"{k}: the same field as {seen[path]!r}, given twice")
            seen[path] = k
            values[".".join(path)] = parse_value(k, v) if isinstance(v, str) else v
        except ConfigError as exc:
            errs.append(str(exc))
    if errs:
        raise ConfigError("invalid override(s):\n  " + "\n  ".join(errs))
    return cfg.replace(**values)


def parse_set_args(pairs):
    """['steps=2000', 'lr=5e-4'] -> {'steps': '2000', 'lr': '5e-4'}."""
    out = {}
    for p in pairs:
        if "=" not in p:
            raise ConfigError(f"--set expects KEY=VALUE, got {p!r}")
        k, v = p.split("=", 1)
        out[k.strip()] = v
    return out
