"""The one place where the environment's settings become each provider's config and secret
models, and where a stored configuration is laid over them.

For a provider class with a ``settings_prefix``, each field ``f`` of its ``config_model`` and
``secrets_model`` is the setting ``<prefix>f`` (``STRIPE_SECRET_KEY`` is ``StripeSecrets``'s
``secret_key``). It is read from ``Settings`` where ``Settings`` declares it (the built-in
providers': the production check reads them there, and a ``Settings`` made in code configures
them too), else from the environment and .env as any setting is (a plug-in's, which
``Settings`` cannot know). Each value is checked against its field when the app starts: a bad
one stops the start, naming the setting and never the value. An empty value is no value.

A stored configuration then overrides the environment field by field, except the fields marked
``EnvironmentOnly`` (an API base address), and the result is validated into the models. A
model that a required field is missing from is None: the provider is not configured.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Any

from pydantic import BaseModel, SecretStr, ValidationError, create_model
from pydantic_core import InitErrorDetails, PydanticCustomError
from pydantic_settings import BaseSettings, SettingsConfigDict

from app.settings import Settings
from services.payment_providers.base import (
    BasePaymentProvider,
    ProviderDeps,
    environment_only_fields,
)
from services.payment_providers.factory import discover_provider_classes
from services.provider_configs import (
    NOT_HEADER_SAFE,
    ProviderConfigStore,
    ProviderModels,
    StoredConfigInvalid,
    StoredProvider,
    unsendable_secrets,
)
from services.provider_manager import ProviderManager


class ProviderSettings:
    """Every provider's configuration from the environment, read once (at start)."""

    def __init__(
        self, settings: Settings, classes: Mapping[str, type[BasePaymentProvider]]
    ) -> None:
        self._environment = {
            name: _read_environment(settings, cls) for name, cls in classes.items()
        }
        for cls in classes.values():
            self.configure(cls, None)  # values that do not fit together stop the start too

    def configure(
        self, cls: type[BasePaymentProvider], stored: StoredProvider | None
    ) -> ProviderModels:
        """The models ``cls`` is built from: the environment's values, overridden field by
        field by ``stored``. Raises ``StoredConfigInvalid`` when ``stored`` does not fit."""
        environment = self._environment.get(cls.name, {})
        config_values = _fields_of(cls.config_model, environment)
        secret_values = _fields_of(cls.secrets_model, environment)
        if stored is not None:
            config_values |= _storable(cls.config_model, stored.config)
            secret_values |= _storable(cls.secrets_model, stored.secrets)
        config, config_errors = _validated(cls.config_model, config_values)
        secrets, secret_errors = _validated(cls.secrets_model, secret_values)
        if secrets is not None:
            secret_errors += [(name, NOT_HEADER_SAFE) for name in unsendable_secrets(secrets)]
        if stored is not None and (config_errors or secret_errors):
            raise StoredConfigInvalid(
                cls.name,
                tuple(f"config.{where}" for where, _ in config_errors)
                + tuple(f"config_secret.{where}" for where, _ in secret_errors),
            )
        if config_errors or secret_errors:
            # Values that each fit their field but not together, or a secret no HTTP header
            # can carry: as any bad setting, a ValidationError that names the setting and
            # never the value.
            prefix = cls.settings_prefix or ""
            raise ValidationError.from_exception_data(
                f"{cls.__name__} settings",
                [
                    InitErrorDetails(
                        type=PydanticCustomError("provider_settings", "{why}", {"why": message}),
                        loc=(f"{prefix}{where}",) if where else (),
                        input=None,
                    )
                    for where, message in config_errors + secret_errors
                ],
                hide_input=True,
            )
        return ProviderModels(config=config, secrets=secrets)


def _fields_of(model: type[BaseModel], values: Mapping[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in values.items() if key in model.model_fields}


def _storable(model: type[BaseModel], stored: Mapping[str, Any]) -> dict[str, Any]:
    """A stored configuration's values, but never for a field only the environment sets
    (the admin API refuses them; this holds for values written around it too)."""
    only_environment = environment_only_fields(model)
    return {key: value for key, value in stored.items() if key not in only_environment}


def _validated(
    model: type[BaseModel], values: Mapping[str, Any]
) -> tuple[BaseModel | None, list[tuple[str, str]]]:
    """``model`` from ``values``. None when required fields are missing and nothing else is
    wrong; else what is wrong: (field, message), never a value."""
    try:
        return model.model_validate(values), []
    except ValidationError as error:
        problems = error.errors(include_input=False, include_url=False)
        return None, [
            (".".join(map(str, item["loc"])), item["msg"])
            for item in problems
            if item["type"] != "missing"
        ]


def _read_environment(settings: Settings, cls: type[BasePaymentProvider]) -> dict[str, Any]:
    """``cls``'s fields as the environment sets them (those it leaves unset are absent)."""
    prefix = cls.settings_prefix
    if prefix is None:
        return {}
    fields: dict[str, Any] = {}
    for model in (cls.config_model, cls.secrets_model):
        for name, info in model.model_fields.items():
            # The field's type and constraints, each optional: a value is checked, none is
            # needed (a missing required one leaves the provider unconfigured).
            kind: Any = info.annotation
            if info.metadata:
                kind = Annotated[kind, *info.metadata]
            fields[f"{prefix}{name}"] = (kind | None, None)
    reader = create_model(
        f"{cls.__name__}Settings",
        __base__=_ProviderEnvironment,
        **fields,
    )
    given = {
        name: None if _empty(getattr(settings, name)) else getattr(settings, name)
        for name in fields
        if name in Settings.model_fields
    }
    read: BaseSettings = reader(**given)
    return {name.removeprefix(prefix): value for name, value in read if value is not None}


class _ProviderEnvironment(BaseSettings):
    # As Settings reads the environment; errors name the setting, never the value.
    model_config = SettingsConfigDict(
        env_file=".env",
        extra="ignore",
        case_sensitive=False,
        env_ignore_empty=True,
        hide_input_in_errors=True,
    )


def _empty(value: object) -> bool:
    if isinstance(value, SecretStr):
        value = value.get_secret_value()
    return value is None or value == ""


def provider_manager(
    settings: Settings, deps: ProviderDeps, configs: ProviderConfigStore
) -> ProviderManager:
    """Every provider found (built in, then plug-ins), configured from the environment and
    the stored configurations, with PAYMENT_PROVIDER and PAYMENT_FALLBACK until routing is
    stored."""
    classes = discover_provider_classes()
    environment = ProviderSettings(settings, classes)
    return ProviderManager(
        classes,
        environment.configure,
        deps,
        configs,
        default=settings.payment_provider,
        fallback=settings.payment_fallback,
    )
