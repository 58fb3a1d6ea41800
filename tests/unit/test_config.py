"""herder.toml's sections and the environment: the fleet's release, allowed hosts, limits."""

from __future__ import annotations

from pathlib import Path

import pytest

from herder.config import load_settings
from herder.errors import ConfigError


def test_the_fleet_section_names_a_release(tmp_path: Path) -> None:
    (tmp_path / "herder.toml").write_text('[fleet]\nrelease = "r-0123456789abcdef0123"\n')
    assert load_settings({}, home=tmp_path).fleet_release == "r-0123456789abcdef0123"


@pytest.mark.parametrize(
    ("text", "field"),
    [
        ('[fleet]\nrelease = "v1"\n', "release"),
        ("[fleet]\nrelease = 3\n", "release"),
        ('[fleet]\nreleases = "r-0123456789abcdef0123"\n', "releases"),
    ],
)
def test_a_bad_fleet_section_names_the_file_and_field(
    tmp_path: Path, text: str, field: str
) -> None:
    (tmp_path / "herder.toml").write_text(text)
    with pytest.raises(ConfigError) as caught:
        load_settings({}, home=tmp_path)
    assert caught.value.field == field  # type: ignore[attr-defined]
    assert str(tmp_path / "herder.toml") in str(caught.value)


def test_security_settings_from_the_file_and_the_environment(tmp_path: Path) -> None:
    (tmp_path / "herder.toml").write_text(
        '[coordinator]\nallowed_hosts = ["herd.example.com"]\nmax_auth_failures = 5\n'
        "max_connections_per_source = 64\nmax_body_mb = 8\n"
    )
    settings = load_settings({}, home=tmp_path)
    assert settings.allowed_hosts == ("herd.example.com",)
    assert (settings.max_auth_failures, settings.max_connections_per_source) == (5, 64)
    assert settings.max_body_mb == 8.0
    env = {"HERDER_ALLOWED_HOSTS": "a.example, b.example", "HERDER_MAX_AUTH_FAILURES": "7"}
    settings = load_settings(env, home=tmp_path)
    assert settings.allowed_hosts == ("a.example", "b.example")
    assert settings.max_auth_failures == 7
