"""Settings layering: flags > CCO_EXPORTER_* environment > config.toml > defaults."""

from __future__ import annotations

import tomllib
from pathlib import Path

import msgspec
import pytest

from exporter.settings import (
    ProjectBudget,
    Settings,
    SettingsError,
    default_config_dir,
    default_data_dir,
    load_settings,
    render_toml,
    settings_report,
)


@pytest.fixture(autouse=True)
def _config_home(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    # The default config file is looked up in the user's config dir: point it at tmp_path so a
    # developer's own config.toml never leaks into a test.
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data"))


def write_toml(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def test_defaults_apply_when_nothing_is_set(tmp_path: Path) -> None:
    settings = load_settings(environ={})
    assert settings == Settings()
    assert settings.port == 9469
    assert settings.db_path == str(tmp_path / "data" / "cco" / "metrics.db")


def test_default_paths_follow_xdg(tmp_path: Path) -> None:
    assert default_data_dir() == tmp_path / "data" / "cco"
    assert default_config_dir() == tmp_path / "config" / "cco"


@pytest.mark.parametrize(
    ("use_flag", "use_env", "use_toml", "expected"),
    [
        (True, True, True, 3000),
        (False, True, True, 2000),
        (False, False, True, 1000),
        (False, False, False, 9469),
        (True, False, True, 3000),
        (True, True, False, 3000),
    ],
)
def test_flag_beats_env_beats_toml_beats_default(
    tmp_path: Path, use_flag: bool, use_env: bool, use_toml: bool, expected: int
) -> None:
    config = tmp_path / "config.toml"
    write_toml(config, 'port = 1000\nhost = "10.0.0.1"\n' if use_toml else "")
    settings = load_settings(
        flags={"port": 3000 if use_flag else None, "host": None},
        environ={"CCO_EXPORTER_PORT": "2000"} if use_env else {},
        config_file=config,
    )
    assert settings.port == expected
    # Unset in the flags and the environment, the file's host stays.
    assert settings.host == ("10.0.0.1" if use_toml else "127.0.0.1")


def test_the_default_config_file_is_read_when_present(tmp_path: Path) -> None:
    directory = tmp_path / "config" / "cco"
    directory.mkdir(parents=True)
    write_toml(directory / "config.toml", "retention_days = 7\n")
    assert load_settings(environ={}).retention_days == 7


def test_the_config_env_variable_names_the_file(tmp_path: Path) -> None:
    config = write_toml(tmp_path / "elsewhere.toml", "batch_size = 50\n")
    assert load_settings(environ={"CCO_EXPORTER_CONFIG": str(config)}).batch_size == 50


def test_environment_strings_become_typed_values(tmp_path: Path) -> None:
    settings = load_settings(
        environ={
            "CCO_EXPORTER_DB": str(tmp_path / "x.db"),
            "CCO_EXPORTER_TOKEN": "s3cret",
            "CCO_EXPORTER_AUTH_READS": "true",
            "CCO_EXPORTER_FLUSH_INTERVAL": "2.5",
            "CCO_EXPORTER_CORS_ORIGINS": "http://localhost:3000, https://grafana.example,",
            "CCO_EXPORTER_LOG_FORMAT": "json",
            "CCO_EXPORTER_OTLP_PROTOCOL": "grpc",
        }
    )
    assert settings.db_path == str(tmp_path / "x.db")
    assert settings.token == "s3cret"
    assert settings.auth_reads is True
    assert settings.flush_interval == 2.5
    assert settings.cors_origins == ["http://localhost:3000", "https://grafana.example"]
    assert settings.log_format == "json"
    assert settings.otlp_protocol == "grpc"


def test_an_empty_environment_variable_counts_as_unset(tmp_path: Path) -> None:
    config = write_toml(tmp_path / "c.toml", 'token = "from-file"\n')
    settings = load_settings(environ={"CCO_EXPORTER_TOKEN": ""}, config_file=config)
    assert settings.token == "from-file"


def test_a_home_relative_db_path_is_expanded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", "/home/someone")
    assert load_settings({"db_path": "~/m.db"}, environ={}).db_path == "/home/someone/m.db"


def test_a_bad_environment_value_names_the_variable() -> None:
    with pytest.raises(SettingsError) as raised:
        load_settings(environ={"CCO_EXPORTER_PORT": "nine"})
    assert str(raised.value) == "CCO_EXPORTER_PORT: Expected `int`, got `str`"


def test_a_bad_toml_value_names_the_file_and_the_key(tmp_path: Path) -> None:
    config = write_toml(tmp_path / "config.toml", 'port = "9469"\n')
    with pytest.raises(SettingsError) as raised:
        load_settings(environ={}, config_file=config)
    assert str(raised.value) == f"{config}: port: Expected `int`, got `str`"


def test_a_bad_flag_value_names_the_flag() -> None:
    with pytest.raises(SettingsError, match=r"^--log-level: Invalid enum value 'loud'$"):
        load_settings({"log_level": "loud"}, environ={})


def test_a_value_out_of_range_names_where_it_was_set() -> None:
    with pytest.raises(SettingsError, match=r"^CCO_EXPORTER_PORT: `port` must be between"):
        load_settings(environ={"CCO_EXPORTER_PORT": "70000"})


def test_a_cross_field_check_names_the_field_that_broke_it(tmp_path: Path) -> None:
    # The file raises batch_size above the default queue bound; the queue is what is named.
    config = write_toml(tmp_path / "c.toml", "batch_size = 500\n")
    with pytest.raises(SettingsError, match="must be at least `batch_size`"):
        load_settings({"max_queue": 100}, environ={}, config_file=config)
    assert load_settings({"max_queue": 1000}, environ={}, config_file=config).max_queue == 1000


def test_an_unknown_toml_key_is_an_error_naming_it(tmp_path: Path) -> None:
    config = write_toml(tmp_path / "config.toml", "prot = 1\n")
    with pytest.raises(SettingsError) as raised:
        load_settings(environ={}, config_file=config)
    assert str(raised.value) == f"{config}: unknown setting `prot` (did you mean `port`?)"


def test_malformed_toml_is_an_error_naming_the_file(tmp_path: Path) -> None:
    config = write_toml(tmp_path / "config.toml", "port = \n")
    with pytest.raises(SettingsError, match="not valid TOML"):
        load_settings(environ={}, config_file=config)


def test_a_missing_named_config_file_is_an_error(tmp_path: Path) -> None:
    missing = tmp_path / "nope.toml"
    with pytest.raises(SettingsError, match="config file not found"):
        load_settings(environ={}, config_file=missing)
    with pytest.raises(SettingsError, match="config file not found"):
        load_settings(environ={"CCO_EXPORTER_CONFIG": str(missing)})


def test_the_report_masks_the_token() -> None:
    report = settings_report(Settings(token="s3cret", port=1234))
    assert report["token"] == "***"
    assert report["port"] == 1234
    assert "s3cret" not in render_toml(report)
    assert settings_report(Settings())["token"] == ""


def test_rendered_toml_loads_back_into_the_same_settings(tmp_path: Path) -> None:
    settings = Settings(
        db_path=str(tmp_path / 'odd "name".db'),
        cors_origins=["http://a", "http://b"],
        auth_reads=True,
        flush_interval=0.25,
        otlp_protocol="grpc",
        machine="tab\there",
    )
    text = render_toml(msgspec.to_builtins(settings))
    assert tomllib.loads(text)["cors_origins"] == ["http://a", "http://b"]
    config = write_toml(tmp_path / "round.toml", text)
    assert load_settings(environ={}, config_file=config) == settings


def test_a_negative_retention_or_interval_is_refused() -> None:
    with pytest.raises(SettingsError, match=r"^--retention-days: `retention_days` must not be"):
        load_settings({"retention_days": -1}, environ={})
    with pytest.raises(
        SettingsError, match=r"^CCO_EXPORTER_HEARTBEAT_INTERVAL: `heartbeat_interval` must not"
    ):
        load_settings(environ={"CCO_EXPORTER_HEARTBEAT_INTERVAL": "-60"})


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("batch_size", 0),
        ("max_queue", 0),
        ("flush_interval", 0.0),
        ("recent_size", 0),
        ("switch_interval", 0.0),
        ("switch_interval", 2.0),
    ],
)
def test_settings_reject_nonsense(field: str, value: float) -> None:
    with pytest.raises(ValueError, match=field):
        Settings(**{field: value})  # type: ignore[arg-type]


def test_the_switch_interval_comes_from_the_environment() -> None:
    assert Settings().switch_interval == 0.0005
    env = {"CCO_EXPORTER_SWITCH_INTERVAL": "0.005"}
    assert load_settings(environ=env).switch_interval == 0.005


def test_the_queue_bound_must_hold_a_batch() -> None:
    with pytest.raises(ValueError, match="max_queue"):
        Settings(batch_size=100, max_queue=10)


# -- budgets --------------------------------------------------------------------------------------


def test_budgets_come_from_the_environment_and_project_budgets_from_the_file(
    tmp_path: Path,
) -> None:
    config = write_toml(
        tmp_path / "c.toml",
        "budget_monthly_usd = 100\n"
        "[project_budgets.web]\ndaily_usd = 5\n"
        '[project_budgets."api v2"]\ndaily_usd = 1.5\nmonthly_usd = 30\n',
    )
    settings = load_settings(
        environ={
            "CCO_EXPORTER_BUDGET_DAILY_USD": "10",
            "CCO_EXPORTER_BUDGET_MONTHLY_USD": "250.5",
            "CCO_EXPORTER_BUDGET_TIMEZONE": "Europe/Berlin",
        },
        config_file=config,
    )
    assert settings.budget_daily_usd == 10.0
    assert settings.budget_monthly_usd == 250.5
    assert settings.budget_timezone == "Europe/Berlin"
    assert settings.project_budgets == {
        "web": ProjectBudget(daily_usd=5.0),
        "api v2": ProjectBudget(daily_usd=1.5, monthly_usd=30.0),
    }
    defaults = Settings()
    assert (defaults.budget_daily_usd, defaults.budget_monthly_usd) == (0.0, 0.0)
    assert (defaults.project_budgets, defaults.budget_timezone) == ({}, "")


def test_settings_with_project_budgets_render_as_toml_that_loads_back(tmp_path: Path) -> None:
    settings = Settings(
        db_path=str(tmp_path / "m.db"),
        budget_daily_usd=2.5,
        budget_timezone="Asia/Kolkata",
        project_budgets={"web": ProjectBudget(daily_usd=5), 'odd "name"': ProjectBudget()},
    )
    text = render_toml(settings_report(settings))
    assert tomllib.loads(text)["project_budgets"]["web"] == {"daily_usd": 5.0, "monthly_usd": 0.0}
    config = write_toml(tmp_path / "round.toml", text)
    assert load_settings(environ={}, config_file=config) == settings
    assert "project_budgets = {}" in render_toml(settings_report(Settings()))


def test_an_unknown_budget_timezone_names_where_it_was_set(tmp_path: Path) -> None:
    with pytest.raises(
        SettingsError,
        match=r"^CCO_EXPORTER_BUDGET_TIMEZONE: `budget_timezone` must be an IANA time zone name"
        r" such as Europe/Berlin or UTC, got 'Mars/Olympus'$",
    ):
        load_settings(environ={"CCO_EXPORTER_BUDGET_TIMEZONE": "Mars/Olympus"})
    config = write_toml(tmp_path / "c.toml", 'budget_timezone = "/etc/passwd"\n')
    with pytest.raises(SettingsError, match=rf"^{config}: budget_timezone: `budget_timezone`"):
        load_settings(environ={}, config_file=config)


@pytest.mark.parametrize("value", ["-1", "inf", "nan"])
def test_a_negative_or_endless_budget_is_refused(value: str) -> None:
    with pytest.raises(SettingsError, match=r"^CCO_EXPORTER_BUDGET_DAILY_USD: `budget_daily_usd`"):
        load_settings(environ={"CCO_EXPORTER_BUDGET_DAILY_USD": value})


def test_a_bad_project_budget_names_the_file_and_the_field(tmp_path: Path) -> None:
    config = write_toml(tmp_path / "c.toml", "[project_budgets.web]\ndaily = 5\n")
    with pytest.raises(SettingsError) as raised:
        load_settings(environ={}, config_file=config)
    assert str(raised.value) == (
        f"{config}: project_budgets: Object contains unknown field `daily` - at `$[...]`"
    )
    config = write_toml(tmp_path / "c.toml", "[project_budgets.web]\nmonthly_usd = -5\n")
    with pytest.raises(SettingsError, match=r"`monthly_usd` must be a finite amount"):
        load_settings(environ={}, config_file=config)
    # `__all__` stands for every project in the budget metrics.
    config = write_toml(tmp_path / "c.toml", '[project_budgets."__all__"]\ndaily_usd = 5\n')
    with pytest.raises(SettingsError, match="`project_budgets` may not name the project '__all__'"):
        load_settings(environ={}, config_file=config)
