"""What the CLI prints, in this process: plain aligned text in a pipe, rich tables and colours on a terminal
(worker.cli.printing), and how `--wait` shows jobs (worker.cli.watch's live table, its lines and hints)."""

from __future__ import annotations

import dataclasses
import io
import re
import sys
import time
from types import SimpleNamespace

import pytest
from rich.console import Console

from models.job import Job
from worker import resources
from worker.cli import printing, watch

# The ANSI sequences of a 16-colour terminal, as rich writes them.
RESET = "\x1b[0m"
BOLD = "\x1b[1m"
DIM = "\x1b[2m"
ITALIC = "\x1b[3m"
RED = "\x1b[31m"
GREEN = "\x1b[32m"
YELLOW = "\x1b[33m"
CYAN = "\x1b[36m"

# Whatever the environment running the tests says about terminals and colour, these decide alone.
_TERMINAL_SETTINGS = ("TTY_COMPATIBLE", "TTY_INTERACTIVE", "FORCE_COLOR", "NO_COLOR", "COLORTERM", "JUPYTER_COLUMNS")


class Tty(io.StringIO):
    """A stream that says it is a terminal."""

    def isatty(self) -> bool:
        return True


@pytest.fixture
def plain(monkeypatch) -> None:
    """stdout and stderr are pipes (pytest's capture), whatever the environment says."""
    for name in _TERMINAL_SETTINGS:
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def screen(monkeypatch):
    """Make stdout and/or stderr a 60-column, 16-colour terminal; the two streams, to read what was written."""
    for name in _TERMINAL_SETTINGS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("TERM", "xterm")
    monkeypatch.setenv("COLUMNS", "60")
    monkeypatch.setenv("LINES", "25")

    def attach(stdout: bool = True, stderr: bool = False) -> tuple[io.StringIO, io.StringIO]:
        out = Tty() if stdout else io.StringIO()
        err = Tty() if stderr else io.StringIO()
        monkeypatch.setattr(sys, "stdout", out)
        monkeypatch.setattr(sys, "stderr", err)
        return out, err

    return attach


# -- printing: the words, the cells ------------------------------------------------------------


def test_each_status_and_verdict_has_its_colour_and_other_words_none():
    colours = {
        "succeeded": "green",
        "ok": "green",
        "retried": "green",
        "deleted": "green",
        "failed": "red",
        "rejected": "red",
        "FAIL": "bold red",
        "cancelled": "yellow",
        "skipped": "yellow",
        "would retry": "cyan",
        "would delete": "cyan",
        "not sent": "bold red",
        "queued": "dim",
        "submitting": "cyan",
        "submitted": "cyan",
        "processing": "cyan",
    }
    for word, colour in colours.items():
        shown = printing.styled(word)
        assert (shown.plain, shown.style) == (word, colour), word
    for word in ("Succeeded", "fail", "retry", "", "j1", 3):
        shown = printing.styled(word)
        assert (shown.plain, shown.style) == (str(word), ""), word


def test_a_cell_is_empty_for_none_json_for_dicts_and_lists_and_str_otherwise():
    assert printing.cell(None) == ""
    assert printing.cell({"name": "café", "n": [1, 2]}) == '{"name": "café", "n": [1, 2]}'
    assert printing.cell(["é", None]) == '["é", null]'
    assert printing.cell([]) == "[]"
    assert printing.cell(0) == "0"
    assert printing.cell(False) == "False"
    assert printing.cell("as is") == "as is"
    assert printing.styled(None).plain == ""
    assert printing.styled({"k": "é"}).plain == '{"k": "é"}'


def test_on_terminal_asks_about_stdout_or_stderr_as_told(screen):
    screen(stdout=True, stderr=False)
    assert printing.on_terminal() is True and printing.on_terminal(err=True) is False
    screen(stdout=False, stderr=True)
    assert printing.on_terminal() is False and printing.on_terminal(err=True) is True
    screen(stdout=False, stderr=False)
    assert printing.on_terminal() is False and printing.on_terminal(err=True) is False


def test_the_console_is_made_on_this_moments_stream(screen):
    out, err = screen(stdout=True, stderr=True)
    assert printing.console().file is out and printing.console(err=True).file is err
    assert printing.console().is_terminal and printing.console(err=True).is_terminal


# -- printing: plain text in a pipe ---------------------------------------------------------------


def test_a_table_in_a_pipe_is_aligned_with_two_spaces_and_no_trailing_blanks(plain, capsys):
    printing.table(
        ["id", "status", "n"],
        [("j1", "succeeded", 3), ("job-22", None, {"k": "é"}), ("j3", "failed", "")],
    )
    out, err = capsys.readouterr()
    assert out.split("\n") == [
        "id      status     n",
        "j1      succeeded  3",
        'job-22             {"k": "é"}',
        "j3      failed",
        "",
    ]
    assert err == ""


def test_a_table_without_header_or_on_stderr_in_a_pipe(plain, capsys):
    printing.table(["verdict", "check"], [("ok", "broker"), ("FAIL", "db")], header=False)
    assert capsys.readouterr() == ("ok    broker\nFAIL  db\n", "")
    printing.table(["verdict", "check"], [("ok", "broker")], err=True)
    assert capsys.readouterr() == ("", "verdict  check\nok       broker\n")
    printing.table(["status", "deleted"], [])
    assert capsys.readouterr() == ("status  deleted\n", "")
    printing.table(["status", "deleted"], [], header=False)  # nothing at all, not even an empty line
    assert capsys.readouterr() == ("", "")


def test_a_row_longer_than_the_columns_is_a_mistake_not_cut_short(plain, capsys):
    with pytest.raises(ValueError, match="zip"):
        printing.table(["id"], [("j1", "extra")])


def test_fields_in_a_pipe_are_right_aligned_names_and_their_values(plain, capsys):
    printing.fields([("id", "j1"), ("attempts", 0), ("metadata", {"a": 1}), ("empty", None)])
    assert capsys.readouterr().out == ('      id: j1\nattempts: 0\nmetadata: {"a": 1}\n   empty: \n')
    printing.fields([("failed", 2), ("in flight", "1 of 7")], sep="  ", title="not shown in a pipe")
    assert capsys.readouterr().out == "   failed  2\nin flight  1 of 7\n"
    printing.fields([])
    assert capsys.readouterr() == ("", "")


def test_a_job_in_full_names_its_files_and_deliveries_and_leaves_out_the_rest(plain, capsys):
    printing.job(
        {
            "id": "j7",
            "status": "succeeded",
            "retry_of": None,
            "attempts": 0,
            "error_code": "task_failed",
            "last_response": {"code": 0},
            "request": {"prompt": "a cat"},
            "retried_as": ["j7:retry1"],
            "files": [
                {"uri": "file:///a/0.png", "content_type": "image/png", "bytes": 12},
                {"uri": None, "error": "HTTP 404"},
            ],
            "deliveries": [
                {"channel": "webhook", "state": "failed", "attempts": 3, "last_error": "HTTP 500"},
                {"channel": "callback", "state": "sent", "attempts": 1, "last_error": None},
            ],
        }
    )
    assert capsys.readouterr().out.splitlines() == [
        "        id: j7",
        "    status: succeeded",
        "  attempts: 0",
        "error_code: task_failed",  # only retried_as loses its underscore
        '   request: {"prompt": "a cat"}',
        'retried as: ["j7:retry1"]',
        "    file 0: file:///a/0.png (image/png, 12 bytes)",
        "    file 1: not archived: HTTP 404",
        "   webhook: failed after 3 attempt(s); last error: HTTP 500",
        "  callback: sent after 1 attempt(s)",
    ]


def test_a_job_without_files_or_deliveries_is_its_columns_only(plain, capsys):
    printing.job({"id": "j8", "status": "queued", "files": None, "deliveries": None, "error_code": None})
    assert capsys.readouterr().out == "    id: j8\nstatus: queued\n"


def test_json_is_indented_unescaped_and_a_message_goes_to_stderr(plain, capsys):
    printing.as_json({"b": "é", "a": [1, None]})
    assert capsys.readouterr() == ('{\n  "b": "é",\n  "a": [\n    1,\n    null\n  ]\n}\n', "")
    printing.say("3 retried, 1 skipped")
    assert capsys.readouterr() == ("", "3 retried, 1 skipped\n")


# -- printing: on a terminal ----------------------------------------------------------------------


def test_a_table_on_a_terminal_has_a_title_a_head_rule_and_coloured_statuses(screen):
    out, err = screen()
    printing.table(["id", "status", "n"], [("j1", "succeeded", 3), ("j2", "failed", None)], title="Jobs")
    bold = [f"{BOLD} {RESET}{BOLD}{name}{RESET}{BOLD} {RESET}" for name in ("id", "status   ", "n")]
    assert out.getvalue().splitlines() == [
        f"{ITALIC}Jobs{' ' * 18}{RESET}",  # the title, on the left
        " " * 22,
        f" {' '.join(bold)} ",
        f" {'─' * 20} ",
        f"  j1   {GREEN}succeeded{RESET}   3  ",
        f"  j2   {RED}failed   {RESET}      ",
        " " * 22,
    ]
    assert err.getvalue() == ""


def test_a_long_cell_on_a_terminal_is_folded_not_cut(screen):
    out, _ = screen()
    printing.table(["verdict", "detail"], [("ok", "x" * 70)], header=False)
    assert out.getvalue().splitlines() == [
        f" {GREEN}ok{RESET}  " + "x" * 54 + " ",
        "     " + "x" * 16 + " " * 39,
    ]


def test_a_table_for_stderr_goes_to_the_terminal_there(screen):
    out, err = screen(stdout=False, stderr=True)
    printing.table(["status"], [("rejected",)], err=True)
    assert out.getvalue() == ""
    assert err.getvalue().splitlines() == [
        "            ",
        f" {BOLD} {RESET}{BOLD}status  {RESET}{BOLD} {RESET} ",
        " ────────── ",
        f"  {RED}rejected{RESET}  ",
        "            ",
    ]


def test_fields_on_a_terminal_are_bold_right_aligned_names_and_coloured_values(screen):
    out, _ = screen()
    printing.fields([("id", "j1"), ("attempts", 2), ("status", "queued")], title="Job")
    assert out.getvalue().splitlines() == [
        f"{ITALIC}Job             {RESET}",
        f"{BOLD}      id{RESET}{BOLD} {RESET} j1    ",
        f"{BOLD}attempts{RESET}{BOLD} {RESET} 2     ",
        f"{BOLD}  status{RESET}{BOLD} {RESET} {DIM}queued{RESET}",
    ]


def test_a_long_field_on_a_terminal_is_folded(screen):
    out, _ = screen()
    printing.fields([("uri", "y" * 70)])
    assert out.getvalue().splitlines() == [
        f"{BOLD}uri{RESET}{BOLD} {RESET} " + "y" * 55,
        f"{BOLD}    {RESET} " + "y" * 15 + " " * 40,
    ]


# -- watch: hints, lines, the live table ---------------------------------------------------------


class Clock:
    """time.monotonic() as the test sets it."""

    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch) -> Clock:
    """The watch module's clock alone (other threads of this process keep the real one)."""
    fake = Clock(1000.0)
    monkeypatch.setattr(watch, "time", SimpleNamespace(monotonic=fake, sleep=time.sleep))
    return fake


def test_a_hint_counts_its_time_down_to_zero(clock):
    hint = watch.Hint("why", "because")
    assert hint == watch.Hint("why", "because") and len({hint, watch.Hint("why", "because")}) == 1
    with pytest.raises(dataclasses.FrozenInstanceError):
        hint.text = "changed"  # type: ignore[misc]
    assert watch.Hint("why", "because").sentence() == "because"
    paused = watch.Hint("pause", "the fleet is paused: 429", until=1042.4)
    assert paused.sentence() == "the fleet is paused: 429 (42s left)"
    clock.now = 1042.0
    assert paused.sentence() == "the fleet is paused: 429 (0s left)"
    clock.now = 1100.0
    assert paused.sentence() == "the fleet is paused: 429 (0s left)"


def test_lines_say_each_change_and_each_reason_once_until_it_changes():
    out = io.StringIO()
    lines = watch._Lines(out)
    lines.changed("job-1", "queued")
    first, second = watch.Hint("a", "no worker"), watch.Hint("b", "paused")
    lines.hints([first, second])
    lines.hints([first, second])  # said already
    lines.hints([second])
    lines.hints([first, second])  # `a` went away and came back
    lines.hints([])
    lines.hints([watch.Hint("b", "paused again")])
    lines.changed("job-1", "succeeded")
    said = out.getvalue().splitlines()
    assert all(re.fullmatch(r"\d\d:\d\d:\d\d .*", line) for line in said)
    assert [line[9:] for line in said] == [
        "job-1                  queued",
        "waiting: no worker",
        "waiting: paused",
        "waiting: no worker",
        "waiting: paused again",
        "job-1                  succeeded",
    ]


def live_console() -> tuple[Console, io.StringIO]:
    out = io.StringIO()
    return Console(file=out, width=60, force_terminal=True, color_system="standard", highlight=False), out


def test_the_live_table_starts_with_every_job_queued_and_no_reason(clock):
    console, out = live_console()
    view = watch._LiveView(console, ["job-a", "job-b"])
    assert (view.ids, view.status, view.found) == (["job-a", "job-b"], {}, [])
    assert view.live.console is console and view.live.refresh_per_second == 4
    clock.now += 9  # jobs nobody has reported yet count from now
    console.print(view._render())
    assert out.getvalue() == (f"job-a  {DIM}queued{RESET}  {DIM}0s{RESET}\njob-b  {DIM}queued{RESET}  {DIM}0s{RESET}\n")


def test_the_live_table_shows_each_status_how_long_it_has_lasted_and_the_reasons(clock):
    console, out = live_console()
    view = watch._LiveView(console, ["job-a", "job-bb", "job-c", "job-d"])
    view.changed("job-a", "succeeded")
    clock.now = 1003.0
    view.changed("job-bb", "processing")
    view.changed("job-d", "failed")
    view.hints([watch.Hint("pause x", "the fleet is paused: x", until=1060.0), watch.Hint("b", "because")])
    assert view.status == {
        "job-a": ("succeeded", 1000.0),
        "job-bb": ("processing", 1003.0),
        "job-d": ("failed", 1003.0),
    }
    clock.now = 1010.4
    console.print(view._render())
    assert out.getvalue().splitlines() == [
        f"job-a   {GREEN}succeeded {RESET}  {DIM}  {RESET}",  # ended: no time
        f"job-bb  {CYAN}processing{RESET}  {DIM}7s{RESET}",
        f"job-c   {DIM}queued    {RESET}  {DIM}0s{RESET}",
        f"job-d   {RED}failed    {RESET}  {DIM}  {RESET}",
        f"{YELLOW}waiting: the fleet is paused: x (50s left){RESET}",
        f"{YELLOW}waiting: because{RESET}",
    ]
    view.hints([])
    view.changed("job-c", "submitting")
    clock.now = 1075.0
    out.truncate(0)
    out.seek(0)
    console.print(view._render())
    assert out.getvalue().splitlines() == [
        f"job-a   {GREEN}succeeded {RESET}  {DIM}   {RESET}",
        f"job-bb  {CYAN}processing{RESET}  {DIM}72s{RESET}",
        f"job-c   {CYAN}submitting{RESET}  {DIM}65s{RESET}",
        f"job-d   {RED}failed    {RESET}  {DIM}   {RESET}",
    ]


def test_the_live_table_runs_while_in_use(clock):
    console, _ = live_console()
    view = watch._LiveView(console, ["job-a"])
    assert not view.live.is_started
    with view as entered:
        assert entered is view and view.live.is_started
    assert not view.live.is_started


def test_watch_on_a_terminal_draws_the_live_table_to_its_stream(sqlite_url, configure, monkeypatch):
    configure(DATABASE_URL=sqlite_url)
    for name in _TERMINAL_SETTINGS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("TERM", "xterm")
    monkeypatch.setenv("COLUMNS", "60")
    with resources.get().transaction() as s:
        s.add(Job(id="done-1", status="succeeded", request={"prompt": "p"}))
        s.add(Job(id="gone-2", status="failed", request={"prompt": "p"}, error_code="task_failed"))
    out = Tty()
    rows = watch.watch(["done-1", "gone-2"], 5, out)
    assert {job_id: row["status"] for job_id, row in rows.items()} == {"done-1": "succeeded", "gone-2": "failed"}
    drawn = out.getvalue()
    assert drawn.startswith("\x1b[?25l")  # the cursor hidden while the table is live
    assert drawn.endswith(f"done-1  {GREEN}succeeded{RESET}  \ngone-2  {RED}failed   {RESET}  \n\x1b[?25h")
