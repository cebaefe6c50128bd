"""The command line's shape: validation at parse time, the API command's refusal to listen beyond
loopback without tokens, the questions commands over the service (stats, repeats in show)."""

from __future__ import annotations

import json

import pytest

from docsrag.flows.cli import main, parser
from docsrag.tasks.core.records import STATUSES


@pytest.mark.parametrize("argv, says", [
    (["ask", "q", "--priority", "11"], "11 is not between -10 and 10"),
    (["ask", "q", "--priority", "high"], "'high' is not an integer"),
    (["ask", "q", "--wait", "-1"], "is not a number of seconds"),
    (["questions", "--status", "waiting"], "invalid choice: 'waiting'"),
    (["search", "q", "-k", "0"], "0 is not between 1 and 100"),
    (["api", "--port", "70000"], "70000 is not between 1 and 65535"),
])
def test_bad_arguments_are_refused_before_anything_runs(argv, says, capsys):
    with pytest.raises(SystemExit) as exit:
        parser().parse_args(argv)
    assert exit.value.code == 2 and says in capsys.readouterr().err


def test_status_choices_are_the_queues_own():
    listing = parser()._subparsers._group_actions[0].choices["questions"]
    [status] = [action for action in listing._actions if action.dest == "status"]
    assert tuple(status.choices) == STATUSES


def test_every_command_group_shares_the_json_parent():
    commands = parser()._subparsers._group_actions[0].choices
    with_json = {name for name, sub in commands.items() if any(a.dest == "json" for a in sub._actions)}
    assert with_json == set(commands) - {"api"}


def test_the_api_will_not_listen_beyond_loopback_without_tokens(home, capsys):
    assert main(["api", "--host", "0.0.0.0"]) == 2
    assert "set DOCSRAG_API_TOKENS to listen on 0.0.0.0" in capsys.readouterr().err


def test_questions_stats_show_repeats_feedback_and_gaps(home, capsys):
    assert main(["ask", "Where does Milvus store data?", "--json"]) == 0
    asked = json.loads(capsys.readouterr().out)
    assert (asked["status"], asked["repeat_of"]) == ("pending", None)
    assert main(["questions", "--stats", "--json"]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert stats["counts"]["pending"] == 1 and stats["answered_from_repeats"] == 0
    assert stats["feedback"] == {"helpful": 0, "not_helpful": 0} and stats["coverage_gaps"] == []
    assert main(["questions", "--stats"]) == 0
    assert "answered from repeats: 0" in capsys.readouterr().out
    assert main(["show", "999"]) == 1 and "no question 999" in capsys.readouterr().err


def test_a_bug_shows_its_traceback_and_a_docsrag_error_one_line(monkeypatch, tmp_path, capsys):
    """A DocsragError says what to do in one line; anything else is a bug and looks like one (it read
    `docsrag ingest: 'doc_path'`, with no traceback)."""
    from docsrag.flows.cli import index
    from docsrag.tasks.ingest.release import ReleaseError

    monkeypatch.setenv("DOCSRAG_HOME", str(tmp_path / "home"))
    for raised, traced in ((ReleaseError("the release is not a zip; pass --release PATH"), False),
                           (KeyError("doc_path"), True)):
        def fail(*args, raised=raised):
            raise raised

        monkeypatch.setattr(index, "_rollback", fail)
        assert main(["rollback"]) == 1
        err = capsys.readouterr().err
        assert ("Traceback (most recent call last)" in err) is traced, err
        assert err.strip().splitlines()[-1].startswith("docsrag rollback: ")
        assert traced or len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("asked", [["--debug"], "DOCSRAG_DEBUG"])
def test_debug_shows_a_docsrag_errors_traceback_above_its_line(monkeypatch, tmp_path, capsys, asked):
    """The one line is for the user; --debug (or DOCSRAG_DEBUG=1) is for whoever reports it."""
    from docsrag.flows.cli import index
    from docsrag.tasks.ingest.release import ReleaseError

    monkeypatch.setenv("DOCSRAG_HOME", str(tmp_path / "home"))
    monkeypatch.setattr(index, "_rollback", lambda *a: (_ for _ in ()).throw(ReleaseError("not a zip")))
    if asked == "DOCSRAG_DEBUG":
        monkeypatch.setenv("DOCSRAG_DEBUG", "1")
    assert main(["rollback", *([] if asked == "DOCSRAG_DEBUG" else asked)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[0] == "Traceback (most recent call last):" and err[-1] == "docsrag rollback: not a zip", err
