"""The config schema with its name lists taken from the registries, and the start-up checks across keys.

`workflow/schemas/config.schema.yaml` holds everything but the names of the extension points: the selector,
model adapter, hook site, component and intervention enums, and the parameter sections `select.<selector>`, are filled in
here from `SELECTORS`, `ADAPTERS` and `HOOK_SITES` before validation, so each list exists once. Validation
fills in the schema's defaults (as `snakemake.utils.validate(..., set_default=True)` does).
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml

SCHEMA_FILE = Path(__file__).resolve().parents[2] / "workflow" / "schemas" / "config.schema.yaml"
#: keys of `select` that are not selector parameter sections (a selector may not take these names)
SELECT_KEYS = ("selectors", "r", "scope", "seed", "random")


class ConfigError(ValueError):
    """A config value the schema or a start-up check rejects; the message names the key."""


def config_schema(path: str | Path = SCHEMA_FILE) -> dict[str, Any]:
    """The schema of `path` with the registries' names injected."""
    from .interventions import INTERVENTIONS
    from .models import ADAPTERS
    from .selectors import RANDOM, SELECTORS
    from .sites import HOOK_SITES

    # the C loader when PyYAML has it: the pure-Python one took 0.1-0.3 s of every Snakemake start (issue 8)
    schema = yaml.load(Path(path).read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    props = schema["properties"]
    props["model"]["properties"]["adapter"]["enum"] = list(ADAPTERS.names())
    props["hook_site"]["enum"] = list(HOOK_SITES)
    props["component"]["enum"] = sorted({c for a in ADAPTERS.names() for c in ADAPTERS[a].components})
    ev = props["evaluate"]["properties"]
    ev["interventions"]["items"]["enum"] = [n for n in INTERVENTIONS.names() if n != "none"]
    select = props["select"]["properties"]
    select["selectors"]["items"]["enum"] = [*SELECTORS.names(), RANDOM]
    for name in SELECTORS.names():
        if name in SELECT_KEYS or name == RANDOM:
            raise ConfigError(f"selector name {name!r} clashes with the config key select.{name}; rename it")
        if SELECTORS[name].params:
            select[name] = SELECTORS[name].schema()
    return schema


def _default_filling(cls: Any) -> Any:
    from jsonschema import validators

    check_properties = cls.VALIDATORS["properties"]

    def set_defaults(validator: Any, properties: dict, instance: Any, schema: dict) -> Any:
        if isinstance(instance, dict):
            for key, sub in properties.items():
                if "default" in sub:
                    instance.setdefault(key, copy.deepcopy(sub["default"]))
        yield from check_properties(validator, properties, instance, schema)

    return validators.extend(cls, {"properties": set_defaults})


def validate_config(config: dict[str, Any], path: str | Path = SCHEMA_FILE) -> dict[str, Any]:
    """Validate `config` in place (defaults filled in) against the injected schema, then `check_config`."""
    from jsonschema import Draft202012Validator
    from jsonschema.exceptions import best_match

    if "mad_signed" in (config.get("select") or {}):
        raise ConfigError(
            "config key select.mad_signed was replaced by select.mad.signed (a selector's parameters live under "
            "select.<selector>); move the setting there"
        )
    schema = config_schema(path)
    validator = _default_filling(Draft202012Validator)(schema)
    error = best_match(validator.iter_errors(config))
    if error is not None:
        key = ".".join(str(p) for p in error.absolute_path) or "(top level)"
        raise ConfigError(f"config key {key}: {error.message} (schema {path})")
    check_config(config, envs=Path(path).resolve().parents[2] / "envs")
    return config


def check_config(config: dict[str, Any], envs: Path | None = None) -> None:
    """Cross-key checks the schema cannot express: the adapter supports the component, hook site and tasks, and
    its environment file exists (in `envs`, the checkout's envs/ folder)."""
    from .models import entry

    decl = entry(config["model"]["adapter"])
    if config["component"] not in decl.components:
        raise ConfigError(
            f"config key component: adapter {decl.name!r} ({decl.file}) has no component {config['component']!r}; "
            f"it declares {list(decl.components)}"
        )
    if config["hook_site"] not in decl.hook_sites:
        raise ConfigError(
            f"config key hook_site: adapter {decl.name!r} ({decl.file}) does not support {config['hook_site']!r}; "
            f"it declares {list(decl.hook_sites)}"
        )
    for task, tcfg in config["tasks"].items():
        if tcfg.get("enabled", True) and task not in decl.tasks:
            raise ConfigError(
                f"config key tasks.{task}: adapter {decl.name!r} ({decl.file}) does not support task {task!r} "
                f"(it declares tasks {list(decl.tasks)}); set tasks.{task}.enabled: false"
            )
    env = (envs or SCHEMA_FILE.parents[2] / "envs") / f"{decl.env}.yaml"
    if not env.is_file():
        raise ConfigError(f"adapter {decl.name!r} ({decl.file}) names environment {decl.env!r}, but {env} is missing")
