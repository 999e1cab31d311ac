"""The Docker image, compose file and .env.example, read as an operator's tools read them
(there is no Docker daemon here to build them): what they promise is checked, not assumed."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

from app.settings import Settings
from services.payment_providers.factory import discover_provider_classes

ROOT = Path(__file__).resolve().parents[1]


def _provider_settings() -> set[str]:
    names = set()
    for cls in discover_provider_classes().values():
        if cls.settings_prefix is None:
            continue
        for model in (cls.config_model, cls.secrets_model):
            names |= {f"{cls.settings_prefix}{field}".upper() for field in model.model_fields}
    return names


class TestCompose:
    def test_production_with_required_secrets_on_loopback(self) -> None:
        api = yaml.safe_load((ROOT / "compose.yaml").read_text())["services"]["api"]
        environment = api["environment"]
        assert environment["ENVIRONMENT"] == "production"
        for name in ("JWT_SECRET_KEY", "PROVIDER_SECRETS_KEY", "PAYMENT_PROVIDER"):
            # ${NAME:?message}: compose refuses to start while it is unset or empty.
            assert re.fullmatch(rf"\$\{{{name}:\?[^}}]+\}}", environment[name]), name
        assert "FORWARDED_ALLOW_IPS" in environment
        assert all(port.startswith("127.0.0.1:") for port in api["ports"])
        # The service listens on PORT inside the container: the one the mapping targets, not
        # whatever PORT .env (env_file) sets for the host side.
        assert [port.rsplit(":", 1)[1] for port in api["ports"]] == [environment["PORT"]]
        assert api["init"] is True
        assert api["env_file"] == [".env"]

    def test_services_come_back_after_a_crash(self) -> None:
        services = yaml.safe_load((ROOT / "compose.yaml").read_text())["services"]
        assert {name: service.get("restart") for name, service in services.items()} == {
            "api": "unless-stopped",
            "redis": "unless-stopped",
        }


def _dockerfile_instructions() -> list[str]:
    """The Dockerfile's instructions, each on one line (continuations joined), comments left out."""
    instructions: list[str] = []
    continued = False
    for line in (ROOT / "Dockerfile").read_text().splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        if continued:
            instructions[-1] += " " + line.strip().removesuffix("\\")
        else:
            instructions.append(line.removesuffix("\\"))
        continued = line.endswith("\\")
    return instructions


class TestDockerfile:
    def test_signals_volume_health_and_workers(self) -> None:
        text = (ROOT / "Dockerfile").read_text()
        cmd = [line for line in text.splitlines() if line.startswith("CMD ")]
        assert cmd == ['CMD ["payments", "serve", "--host", "0.0.0.0"]']  # exec form, no shell
        assert "chown -R app:app /srv/data" in text  # the receipts volume is the app's
        healthcheck = text[text.index("HEALTHCHECK") :]
        assert "os.environ.get('PORT'" in healthcheck.split("\n\n")[0]
        assert "ENVIRONMENT=production" in text and "WEB_CONCURRENCY=" in text

    def test_dependencies_are_installed_before_the_code_is_copied(self) -> None:
        # A layer of their own, from pyproject.toml alone: a change to the code reuses it from
        # the build cache instead of reinstalling some 70 packages; the project itself comes
        # after its code, without them.
        instructions = _dockerfile_instructions()
        copies = [i for i, line in enumerate(instructions) if line.startswith("COPY ")]
        first_code_copy = next(i for i in copies if instructions[i] != "COPY pyproject.toml ./")
        installs = [i for i, line in enumerate(instructions) if "pip install" in line]
        [dependencies] = [i for i in installs if "['project']['dependencies']" in instructions[i]]
        [project] = [i for i in installs if instructions[i].endswith(" -e .")]
        assert "COPY pyproject.toml ./" in instructions[:dependencies]
        assert dependencies < first_code_copy, (instructions[dependencies], first_code_copy)
        assert project > copies[-1] and "--no-deps" in instructions[project]

    def test_build_context_is_what_it_copies(self) -> None:
        # .dockerignore starts from nothing (`*`) and admits what COPY names: .env (secrets),
        # .venv and .git never reach the builder, and a new COPY fails here until admitted.
        lines = [
            line
            for line in (ROOT / ".dockerignore").read_text().splitlines()
            if line and not line.startswith("#")
        ]
        assert lines[0] == "*"
        admitted = {line[1:] for line in lines if line.startswith("!")}
        copied = set()
        for line in (ROOT / "Dockerfile").read_text().splitlines():
            if line.startswith("COPY "):
                copied |= set(line.split()[1:-1])
        assert copied and copied == admitted, (copied, admitted)


class TestEnvExample:
    def test_every_name_is_a_setting(self) -> None:
        names = re.findall(r"^#? ?([A-Z][A-Z0-9_]+)=", (ROOT / ".env.example").read_text(), re.M)
        known = {name.upper() for name in Settings.model_fields} | _provider_settings()
        known |= {"WEB_CONCURRENCY"}  # read by `payments serve`
        assert names and not set(names) - known, set(names) - known

    def test_required_secrets_are_left_empty(self) -> None:
        text = (ROOT / ".env.example").read_text()
        for name in ("JWT_SECRET_KEY", "PROVIDER_SECRETS_KEY", "PAYMENT_PROVIDER"):
            assert re.search(rf"^{name}=$", text, re.M), name
