""".env.example documents every variable a settings class or docker-compose.yml reads."""

from __future__ import annotations

import importlib
import pkgutil
import re
from pathlib import Path

from pydantic_settings import BaseSettings

import consumers
import driftloop
import gateway
from driftloop.settings import DriftloopSettings

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_BUILTINS = {"HOSTNAME"}


def _documented() -> set[str]:
    text = (ROOT / ".env.example").read_text()
    return set(re.findall(r"^([A-Z][A-Z0-9_]*)=", text, flags=re.MULTILINE))


def _settings_classes() -> list[type[BaseSettings]]:
    for package in (driftloop, gateway, consumers):
        for module in pkgutil.walk_packages(package.__path__, f"{package.__name__}."):
            importlib.import_module(module.name)
    found: list[type[BaseSettings]] = []
    pending: list[type[BaseSettings]] = [DriftloopSettings]
    while pending:
        current = pending.pop()
        found.append(current)
        pending.extend(current.__subclasses__())
    return found


def _variables(settings_class: type[BaseSettings]) -> set[str]:
    prefix = str(settings_class.model_config.get("env_prefix", ""))
    names = set()
    for name, field in settings_class.model_fields.items():
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseSettings):
            continue  # nested connection settings: documented under their own prefix
        alias = field.validation_alias
        names.add(alias if isinstance(alias, str) else f"{prefix}{name}".upper())
    return names


def test_every_settings_field_is_documented() -> None:
    documented = _documented()
    missing = {
        f"{settings_class.__module__}.{settings_class.__name__}: {variable}"
        for settings_class in _settings_classes()
        if not settings_class.__module__.startswith("tests.")
        # A base class's fields are checked through its subclasses, which inherit them under
        # their own prefix (ServiceSettings.metrics_port is FEATURE_LOGGER_METRICS_PORT, ...).
        and not any(
            not sub.__module__.startswith("tests.") for sub in settings_class.__subclasses__()
        )
        for variable in _variables(settings_class)
        if variable not in documented
    }
    assert not missing, f"add these to .env.example: {sorted(missing)}"


def test_every_compose_variable_is_documented() -> None:
    lines = (ROOT / "docker-compose.yml").read_text().splitlines()
    compose = "\n".join(line for line in lines if not line.lstrip().startswith("#"))
    used = set(re.findall(r"\$\{([A-Z][A-Z0-9_]*)", compose)) - COMPOSE_BUILTINS
    assert used <= _documented(), f"add to .env.example: {sorted(used - _documented())}"
