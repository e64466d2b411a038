"""Settings: defaults from the contract, `.env` under the environment, one clear error per problem."""

from __future__ import annotations

import base64
import hashlib

import pytest

from service.settings import Settings, SettingsError

LOCAL = {
    "LEAK_RESPONDER_SUPERMEMORY_API_URL": "http://127.0.0.1:9",
    "LEAK_RESPONDER_SUPERMEMORY_ADMIN_TOKEN": "t",
}


def load(env: dict[str, str], env_file=None) -> Settings:
    return Settings.load({**LOCAL, **env}, env_file=env_file)


def test_defaults_follow_the_contract():
    s = Settings.load({"LEAK_RESPONDER_SUPERMEMORY_ADMIN_TOKEN": "t"}, env_file=None)
    assert s.database_url == "sqlite:///./data/leak-responder.db"
    assert s.github_keys_url == "https://api.github.com/meta/public_keys/secret_scanning"
    assert s.gitlab_keys_url is None
    assert s.depsdev_keys_url == "https://storage.googleapis.com/depsdev-gcp-public-keys/secret_scanning"
    assert s.supermemory_api_url == "https://api.supermemory.ai"
    assert s.admin_url == s.supermemory_api_url
    assert s.mode == "enforce" and not s.dry_run
    assert s.body_limit == 10 * 1024 * 1024 and s.request_budget == 5
    assert s.probe_schedule == (0, 2, 5, 15, 30, 60, 120)
    assert s.retention_days == 30


def test_env_file_is_read_and_the_environment_wins(tmp_path):
    env_file = tmp_path / ".env"
    env_file.write_text(
        "# comment\nexport LEAK_RESPONDER_MODE=dry-run\nLEAK_RESPONDER_REQUEST_BUDGET='3'\n"
        'LEAK_RESPONDER_MAIL_FROM="leaks@example.test"  \nLEAK_RESPONDER_CONCURRENCY=8 # inline\n'
    )
    s = load({"LEAK_RESPONDER_REQUEST_BUDGET": "4"}, env_file=env_file)
    assert s.mode == "dry-run"
    assert s.request_budget == 4
    assert s.mail_from == "leaks@example.test"
    assert s.concurrency == 8


def test_operator_tokens_hold_only_hashes():
    digest = hashlib.sha256(b"alice-token").hexdigest()
    s = load({"LEAK_RESPONDER_OPERATOR_TOKENS": f"alice:{digest}, bob:{'0' * 64}"})
    assert s.operator_tokens == {"alice": digest, "bob": "0" * 64}


def test_data_key_must_be_32_bytes():
    key = base64.b64encode(bytes(32)).decode()
    assert load({"LEAK_RESPONDER_DATA_KEY": key}).data_key == bytes(32)
    with pytest.raises(SettingsError, match="LEAK_RESPONDER_DATA_KEY: expected base64 of 32 bytes"):
        load({"LEAK_RESPONDER_DATA_KEY": base64.b64encode(bytes(16)).decode()})


@pytest.mark.parametrize(
    ("env", "named"),
    [
        ({"LEAK_RESPONDER_SUPERMEMORY_API_URL": "ftp://x"}, "LEAK_RESPONDER_SUPERMEMORY_API_URL"),
        ({"LEAK_RESPONDER_BODY_LIMIT": "-1"}, "LEAK_RESPONDER_BODY_LIMIT"),
        ({"LEAK_RESPONDER_BODY_LIMIT": "lots"}, "LEAK_RESPONDER_BODY_LIMIT"),
        ({"LEAK_RESPONDER_SMTP_URL": "http://mail"}, "LEAK_RESPONDER_SMTP_URL"),
        ({"LEAK_RESPONDER_SMTP_URL": "smtp://mail:25"}, "LEAK_RESPONDER_MAIL_FROM"),
        ({"LEAK_RESPONDER_SECURITY_CONTACT": "nobody"}, "LEAK_RESPONDER_SECURITY_CONTACT"),
        (
            {"LEAK_RESPONDER_OPERATOR_TOKENS": "a:" + "0" * 64 + ",a:" + "1" * 64},
            "LEAK_RESPONDER_OPERATOR_TOKENS",
        ),
        ({"LEAK_RESPONDER_DATABASE_URL": "postgresql://db/x"}, "LEAK_RESPONDER_DATA_KEY"),
        (
            {"LEAK_RESPONDER_GITHUB_KEYS_URL": "", "LEAK_RESPONDER_DEPSDEV_KEYS_URL": ""},
            "LEAK_RESPONDER_GITHUB_KEYS_URL",
        ),
    ],
)
def test_each_problem_names_its_setting(env, named):
    with pytest.raises(SettingsError) as caught:
        load(env)
    assert caught.value.name == named
    assert "\n" not in str(caught.value)


def test_describe_masks_secrets():
    s = load({"LEAK_RESPONDER_SUPERMEMORY_ADMIN_TOKEN": "hunter2", "SENTRY_DSN": "https://k@sentry.test/1"})
    shown = dict(s.describe())
    assert shown["LEAK_RESPONDER_SUPERMEMORY_ADMIN_TOKEN"] == "(set, masked)"
    assert shown["SENTRY_DSN"] == "(set, masked)"
    assert "hunter2" not in repr(s.describe())


@pytest.mark.parametrize(
    ("raw", "size"),
    [("10485760", 10 * 1024 * 1024), ("10MiB", 10 * 1024 * 1024), ("10MB", 10_000_000), ("512 KiB", 524288)],
)
def test_body_limit_takes_a_size_with_its_unit(raw, size):
    assert load({"LEAK_RESPONDER_BODY_LIMIT": raw}).body_limit == size


@pytest.mark.parametrize(
    ("env", "says"),
    [
        ({"LEAK_RESPONDER_BODY_LIMIT": "10 furlongs"}, "e.g. 10485760 or 10MiB, got '10 furlongs'"),
        ({"LEAK_RESPONDER_BODY_LIMIT": "0MB"}, "expected a positive size"),
        ({"LEAK_RESPONDER_CONCURRENCY": "many"}, "expected a positive integer, got 'many'"),
        ({"LEAK_RESPONDER_LEASE_SECONDS": "30s"}, "expected a positive number, got '30s'"),
        ({"SENTRY_DSN": "https://sentry.example/1"}, "not a Sentry DSN"),
        ({"SENTRY_DSN": "not a url"}, "expected https://PUBLIC_KEY@HOST/PROJECT_ID"),
    ],
)
def test_a_malformed_value_is_one_line_that_says_what_was_expected(env, says):
    with pytest.raises(SettingsError) as caught:
        load(env)
    assert caught.value.name == next(iter(env))
    assert says in str(caught.value) and "\n" not in str(caught.value)


def test_a_misspelt_variable_and_a_long_retention_are_warned_about():
    env = {
        "LEAK_RESPONDER_RETENTON_DAYS": "7",  # sic
        "LEAK_RESPONDER_RETENTION_DAYS": "90",
        "LEAK_RESPONDER_NOT_EVEN_CLOSE_TO_ANYTHING": "1",
        # Not ours to warn about: the CLI's own, and what Kubernetes injects for a Service.
        "LEAK_RESPONDER_URL": "http://127.0.0.1:8000",
        "LEAK_RESPONDER_OPERATOR_TOKEN": "x",
        "LEAK_RESPONDER_SERVICE_HOST": "10.0.0.1",
        "LEAK_RESPONDER_PORT_8000_TCP_ADDR": "10.0.0.1",
        "LEAK_RESPONDER_PORT": "tcp://10.0.0.1:8000",
    }
    settings = load(env)
    assert settings.notices(env) == [
        "LEAK_RESPONDER_NOT_EVEN_CLOSE_TO_ANYTHING is not a setting and is ignored",
        "LEAK_RESPONDER_RETENTON_DAYS is not a setting and is ignored;"
        " did you mean LEAK_RESPONDER_RETENTION_DAYS?",
        "LEAK_RESPONDER_RETENTION_DAYS is 90 days: GitHub's partner program asks that reporter"
        " metadata be deleted within 30 days",
    ]
    assert load({}).notices({}) == []


def test_every_url_setting_is_shown_without_its_password():
    env = {
        "LEAK_RESPONDER_DATABASE_URL": "postgresql://leak:s3cret-pw@db.internal:5432/leak",
        "LEAK_RESPONDER_DATA_KEY": "A" * 43 + "=",
        "LEAK_RESPONDER_GITLAB_KEYS_URL": "https://bot:gl-pass@gitlab.example/keys",
        "LEAK_RESPONDER_SMTP_URL": "smtps://mailer:smtp-pw@mail.example:465",
        "LEAK_RESPONDER_MAIL_FROM": "x@example.test",
        "SENTRY_DSN": "https://pub:legacy-secret@sentry.example/1",
    }
    shown = dict(load(env).describe())
    assert shown["LEAK_RESPONDER_DATABASE_URL"] == "postgresql://leak:***@db.internal:5432/leak"
    assert shown["LEAK_RESPONDER_GITLAB_KEYS_URL"] == "https://bot:***@gitlab.example/keys"
    for secret in ("s3cret-pw", "gl-pass", "smtp-pw", "legacy-secret"):
        assert secret not in repr(shown)


def test_the_admin_token_is_required_on_loopback_too():
    """The sandbox checks it as Supermemory does: without one, every lookup would be refused."""
    with pytest.raises(SettingsError) as caught:
        Settings.load({"LEAK_RESPONDER_SUPERMEMORY_API_URL": "http://127.0.0.1:8101"}, env_file=None)
    assert caught.value.name == "LEAK_RESPONDER_SUPERMEMORY_ADMIN_TOKEN"
