"""Config helpers: `file.py:variant,key=value` arguments, sibling config files, checks before any compute."""

from __future__ import annotations

import importlib.util
import os

import ml_collections as mlc


class ConfigError(ValueError):
    """A config or environment problem found before any compute; the message names the key and the fix.
    ``python -m matpac_jax.main`` prints it and exits 2."""


def parse_arg(arg: str | None, **defaults) -> mlc.ConfigDict:
    """Parse 'demo,batch=64' into a ConfigDict over `defaults` (whose types coerce the values).

    A bare word sets `variant` when defaults has that key, else is a boolean flag. Unknown keys fail with the key named.
    """
    out = mlc.ConfigDict(defaults)
    for part in filter(None, (arg or "").split(",")):
        key, sep, value = part.partition("=")
        key = key.strip()
        if not sep:
            if "variant" in defaults and key not in defaults:
                out.variant = key
                continue
            value = "True"
        if key not in defaults:
            raise ValueError(f"unknown config argument {key!r}; known: {sorted(defaults)}")
        kind = type(defaults[key])
        out[key] = value.lower() in ("1", "true", "yes") if kind is bool else kind(value)
    return out


def load_config_file(here: str, name: str, arg: str | None) -> mlc.ConfigDict:
    """get_config(arg) of the config file `name` next to the file `here` (configs/ is not a package)."""
    path = os.path.join(os.path.dirname(os.path.abspath(here)), name)
    spec = importlib.util.spec_from_file_location(f"_config_{name[:-3]}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)
