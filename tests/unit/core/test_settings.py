from pathlib import Path

import pytest

from docsrag.tasks.core.settings import DEFAULT_RELEASE_URL, SettingsError, load_settings


def test_defaults_live_under_home(home):
    settings = load_settings()
    assert settings.home == home
    assert settings.milvus_uri == str(home / "milvus.db")
    assert settings.object_store == str(home / "objects")
    assert settings.collection == "milvus_docs"
    assert settings.release_url == DEFAULT_RELEASE_URL
    assert settings.embedding == "local"


def test_default_release_is_the_milvus_docs_github_asset():
    assert DEFAULT_RELEASE_URL.endswith("/milvus-io/milvus-docs/releases/download/v2.4.6-preview/milvus_docs_2.4.x_en.zip")


def test_unknown_variable_is_named_with_a_suggestion(monkeypatch):
    monkeypatch.setenv("DOCSRAG_COLECTION", "x")
    with pytest.raises(SettingsError, match=r"DOCSRAG_COLECTION: unknown setting \(did you mean DOCSRAG_COLLECTION\?\)"):
        load_settings()


@pytest.mark.parametrize("name,value", [
    ("DOCSRAG_EMBEDDING", "magic"),
    ("DOCSRAG_EMBEDDING_BATCH_SIZE", "lots"),
    ("DOCSRAG_COLLECTION", "has-dash"),
    ("DOCSRAG_MAX_ARCHIVE_FILES", "0"),
    ("DOCSRAG_MILVUS_WRITE_RETRY_DELAYS_S", "1,soon"),
])
def test_invalid_value_names_the_variable(monkeypatch, name, value):
    monkeypatch.setenv(name, value)
    with pytest.raises(SettingsError, match=name):
        load_settings()


def test_secrets_are_not_echoed_in_errors(monkeypatch):
    monkeypatch.setenv("DOCSRAG_EMBEDDING_API_KEY", "sk-very-secret")
    monkeypatch.setenv("DOCSRAG_EMBEDDING", "nope")
    with pytest.raises(SettingsError) as error:
        load_settings()
    assert "sk-very-secret" not in str(error.value)
    monkeypatch.setenv("DOCSRAG_EMBEDDING", "openai")
    assert "sk-very-secret" not in repr(load_settings())


def test_chunk_limits_are_checked_together(monkeypatch):
    monkeypatch.setenv("DOCSRAG_CHUNK_MAX_CHARS", "500")
    monkeypatch.setenv("DOCSRAG_CHUNK_NEW_AFTER_CHARS", "900")
    with pytest.raises(SettingsError, match="DOCSRAG_CHUNK_NEW_AFTER_CHARS"):
        load_settings()


def test_overrides_win_over_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("DOCSRAG_RELEASE_URL", "https://example.invalid/a.zip")
    assert load_settings(release_url=str(tmp_path / "b.zip")).release_url == str(tmp_path / "b.zip")
    assert load_settings().release_url == "https://example.invalid/a.zip"


def test_cli_reports_bad_configuration_with_exit_code_2(monkeypatch, capsys):
    from docsrag.flows.cli import main

    monkeypatch.setenv("DOCSRAG_EMBEDDING", "magic")
    assert main(["search", "anything"]) == 2
    assert "DOCSRAG_EMBEDDING" in capsys.readouterr().err


def test_home_may_be_relative(monkeypatch):
    monkeypatch.setenv("DOCSRAG_HOME", "state")
    assert load_settings().milvus_uri == str(Path("state") / "milvus.db")


def test_milvus_write_retries_are_one_per_wait(monkeypatch):
    assert load_settings().milvus_write_retry_delays == [1, 5, 15]
    monkeypatch.setenv("DOCSRAG_MILVUS_WRITE_RETRY_DELAYS_S", "0.5, 2")
    assert load_settings().milvus_write_retry_delays == [0.5, 2]
    monkeypatch.setenv("DOCSRAG_MILVUS_WRITE_RETRY_DELAYS_S", "")
    assert load_settings().milvus_write_retry_delays == []
