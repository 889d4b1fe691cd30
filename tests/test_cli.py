"""The installed ``ah`` command, run as a subprocess: output, exit codes, config, progress."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import HubProcess, command, run_command


def ah(*args: str, cwd: Path | None = None, stderr_tty: bool = False,
       check: bool = True) -> subprocess.CompletedProcess[str]:
    return run_command("ah", *args, cwd=cwd, stderr_tty=stderr_tty, check=check)


@pytest.fixture
def files(tmp_path: Path) -> Path:
    root = tmp_path / "files"
    (root / "saved_model").mkdir(parents=True)
    (root / "model.pt").write_bytes(b"w" * 4096)
    (root / "saved_model" / "config.json").write_text("{}")
    return root


def test_help_has_an_example_for_every_command() -> None:
    top = ah("--help").stdout
    assert "example:" in top
    for name in ("login", "logout", "ls", "list", "get", "create", "delete", "commit",
                 "download", "update", "merge", "reset", "status", "share"):
        out = ah(name, "--help").stdout
        assert "example:" in out, name
        assert f"ah {name if name != 'list' else 'ls'}" in out or name == "list"


def test_listings_print_the_spec_tables(files: Path) -> None:
    ah("create", "model/llm", "--label", "nlp", "--description", "language models")
    ah("create", "model/llm/gpt2")
    out = ah("commit", "model/llm/gpt2", "-m", "first", "-a", "model.pt",
             "-a", "saved_model:cfg/", cwd=files)
    commit_id = out.stdout.strip()
    assert len(commit_id) == 64
    assert f"Commit {commit_id[:8]} created" in out.stderr
    folders = ah("ls", "model").stdout.splitlines()
    assert folders[0].split() == ["NAME", "PATH", "LABELS", "PERMISSION"]
    assert folders[1].split()[0] == "llm" and folders[1].split()[2:] == ["nlp", "own"]
    assert ah("list", "model/llm").stdout.splitlines()[0].split() == \
        ["NAME", "PATH", "LABELS", "PERMISSION"]
    objects = ah("ls", "model/llm/gpt2").stdout.splitlines()
    assert objects[0].split() == ["PATH", "BYTES", "CHECKSUM", "MODIFIED"]
    assert [line.split()[0] for line in objects[1:]] == ["cfg/saved_model/config.json",
                                                         "model.pt"]
    branches = ah("ls", "model/llm/gpt2", "--branch").stdout.splitlines()
    assert branches[0].split() == ["NAME", "COMMIT_ID"]
    assert branches[1].split() == ["main", commit_id[:12]]  # the width of --commit's
    commits = ah("ls", "model/llm/gpt2", "--commit").stdout.splitlines()
    assert commits[0].split() == ["COMMIT_ID", "MESSAGE", "CREATED"]
    assert commits[1].split()[0] == commit_id[:12] and "first" in commits[1]
    assert "4.0 KiB" in ah("ls", "model/llm/gpt2").stdout
    assert " 4096 " in ah("ls", "model/llm/gpt2", "--bytes").stdout
    shown = ah("get", f"model/llm/gpt2:{commit_id[:8]}").stdout
    assert re.search(r"creation_date: \d{4}-\d\d-\d\d \d\d:\d\d:\d\d", shown)
    assert "Repository created" in commits[2]
    data = json.loads(ah("ls", "model/llm/gpt2", "--json").stdout)
    assert {d["path"] for d in data} == {"cfg/saved_model/config.json", "model.pt"}
    assert set(data[0]) == {"path", "size_bytes", "checksum", "mtime", "content_type",
                            "path_type"}
    got = json.loads(ah("get", f"model/llm/gpt2:{commit_id[:6]}", "--json").stdout)
    assert (got["kind"], got["id"], got["name"]) == ("Commit", commit_id, commit_id[:8])


def test_full_cli_workflow(files: Path, tmp_path: Path) -> None:
    ah("create", "model/llm")
    ah("create", "model/llm/gpt2")
    ah("create", "model/llm/gpt2:v1")
    ah("commit", "model/llm/gpt2:v1", "-m", "w", "-a", "model.pt", cwd=files)
    ah("create", "model/llm/gpt2:20220101", "--tag", "--source", "v1")
    assert "20220101" in ah("ls", "model/llm/gpt2", "--tag").stdout
    ah("merge", "model/llm/gpt2:v1")
    assert "model.pt" in ah("ls", "model/llm/gpt2").stdout
    ah("commit", "model/llm/gpt2:v1", "-m", "rm", "-d", "model.pt")
    assert ah("ls", "model/llm/gpt2:v1").stdout.splitlines()[1:] == []
    ah("download", "model/llm/gpt2:20220101", "--save-dir", str(tmp_path / "dl"))
    assert (tmp_path / "dl" / "model.pt").read_bytes() == b"w" * 4096
    ah("download", "model/llm/gpt2", "--object", "model.pt", "--save-dir",
       str(tmp_path / "one"))
    assert (tmp_path / "one" / "model.pt").exists()
    ah("update", "model/llm/gpt2", "--label", "JAX", "--description", "d")
    assert json.loads(ah("ls", "model/llm", "--json").stdout)[0]["labels"] == ["JAX"]
    ah("update", "model/llm", "-n", "renamed")
    status = ah("status", "model/renamed/gpt2:v1").stdout
    assert "nothing to commit" in status
    ah("reset", "model/renamed/gpt2:v1")
    ah("delete", "model/renamed/gpt2:v1")
    ah("delete", "model/renamed")
    ah("delete", "model/renamed", "--force")
    assert ah("ls", "model").stdout.splitlines()[1:] == []


@pytest.mark.parametrize(
    ("args", "code", "fragment"),
    [
        (["get", "model/nope"], 3, "does not exist"),
        (["create", "model/a..b/../x"], 2, "'..'"),
        (["get", "model/llm/gpt2:abc"], 3, "at least 4"),
        (["commit", "model/llm/gpt2", "-m", "x", "-a", "/no/such/file"], 2, "/no/such/file"),
        (["ls", "model", "--resource", "nope"], 2, "invalid choice"),
        (["create", "model/llm"], 4, "already exists"),
        (["delete", "model/llm/gpt2:main"], 2, "cannot be deleted"),
        (["share", "model/llm", "ghost", "view"], 3, "ghost"),
    ],
)
def test_errors_are_one_line_with_an_exit_code(args: list[str], code: int,
                                               fragment: str) -> None:
    ah("create", "model/llm")
    ah("create", "model/llm/gpt2")
    result = ah(*args, check=False)
    assert result.returncode == code, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    if "choice" not in fragment:  # argparse prints its usage line before its error
        assert len(lines) == 1 and lines[0].startswith("ah: error: "), lines
    assert fragment in result.stderr


def test_login_stores_config_0600_and_logout_removes_it(hub_server: HubProcess,
                                                        ahmount_home: Path) -> None:
    name, key = hub_server.fresh_user()
    ah("login", "--host", hub_server.url, "--api-key", key)
    config = ahmount_home / "config" / "config.json"
    assert stat.S_IMODE(config.stat().st_mode) == 0o600
    assert json.loads(config.read_text())["api_key"] == key
    ah("create", "model/remote")
    listed = json.loads(ah("ls", "model", "--json").stdout)
    assert [f["path"] for f in listed] == [f"/{name}/t9k-assethub/model/remote"]
    ah("logout")
    assert not config.exists()
    assert ah("ls", "model").stdout.splitlines()[1:] == []  # the embedded hub again
    bad = ah("login", "--host", hub_server.url, "--api-key", "wrong", check=False)
    assert bad.returncode == 5 and "not valid" in bad.stderr
    assert not config.exists()


def test_progress_bars_on_a_terminal_only(files: Path) -> None:
    ah("create", "dataset/d")
    ah("create", "dataset/d/x")
    piped = ah("commit", "dataset/d/x", "-m", "piped", "-a", "model.pt", cwd=files)
    assert "%|" not in piped.stderr and "B/s" not in piped.stderr
    (files / "other.bin").write_bytes(os.urandom(300_000))
    tty = ah("commit", "dataset/d/x", "-m", "tty", "-a", "other.bin", cwd=files,
             stderr_tty=True)
    assert "Uploading 1/1 files" in tty.stderr and "/s" in tty.stderr


def test_several_processes_share_the_embedded_hub(files: Path) -> None:
    ah("create", "dataset/shared")
    ah("create", "dataset/shared/many")
    for i in range(6):
        (files / f"f{i}.bin").write_bytes(os.urandom(1000))
    procs = [
        subprocess.Popen([command("ah"), "-q", "commit", "dataset/shared/many", "-m", f"p{i}",
                          "-a", f"f{i}.bin"], cwd=files, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE)
        for i in range(6)
    ]
    for proc in procs:
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
    objects = json.loads(ah("ls", "dataset/shared/many", "--json").stdout)
    assert sorted(o["path"] for o in objects) == [f"f{i}.bin" for i in range(6)]
    assert len(json.loads(ah("ls", "dataset/shared/many", "--commit", "--json").stdout)) == 7


@pytest.mark.parametrize("name", ["ah", "ah-mount", "ah-server"])
def test_every_command_says_its_version(name: str) -> None:
    from importlib.metadata import version

    import ahmount

    result = subprocess.run([command(name), "--version"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"{name} {ahmount.__version__}"
    assert version("ahmount") == ahmount.__version__  # the package's metadata agrees


def test_ah_mount_without_the_fuse_binding_says_what_to_install() -> None:
    code = ("import sys; sys.modules['pyfuse3'] = None\n"
            "from ahmount.mount.entry import main\n"
            "sys.exit(main(['/nonexistent-mountpoint']))\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 1
    assert "pip install 'ahmount[mount]'" in result.stderr
    assert "Traceback" not in result.stderr


def test_log_show_and_diff(files: Path, tmp_path: Path) -> None:
    ah("create", "model/hist")
    ah("create", "model/hist/m")
    ah("commit", "model/hist/m", "-m", "first", "-a", str(files / "model.pt"))
    ah("create", "model/hist/m:v1", "--tag")
    (files / "model.pt").write_bytes(b"w" * 8192)
    (files / "notes.md").write_text("n")
    ah("commit", "model/hist/m", "-m", "second\n\nwith a body", "-a", str(files / "model.pt"),
       "-a", str(files / "notes.md"))
    log = ah("log", "model/hist/m").stdout
    assert log.index("    second") < log.index("    first") < log.index("Repository created")
    assert "    with a body" in log and "Author: " in log and "Date:   " in log
    oneline = ah("log", "model/hist/m", "--oneline", "-n", "2").stdout.splitlines()
    assert len(oneline) == 2 and oneline[0].endswith(": second")
    commits = json.loads(ah("log", "model/hist/m", "--json").stdout)
    assert [c["message"].splitlines()[0] for c in commits] == ["second", "first",
                                                                "Repository created"]
    show = ah("show", "model/hist/m").stdout
    assert "modified:  model.pt  (4.0 KiB -> 8.0 KiB)" in show
    assert "added:     notes.md  (1 B)" in show and "1 added, 1 modified, 0 deleted" in show
    first = ah("show", f"model/hist/m:{commits[1]['id'][:8]}").stdout
    assert "added:     model.pt" in first
    diff = ah("diff", "model/hist/m:v1", "main").stdout
    assert "modified:  model.pt" in diff and "added:     notes.md" in diff
    back = json.loads(ah("diff", "model/hist/m:main", "model/hist/m:v1", "--json").stdout)
    assert {d["path"]: d["change"] for d in back} == {"model.pt": "modified",
                                                      "notes.md": "deleted"}
    bad = ah("diff", "model/hist/m:v1", check=False)
    assert bad.returncode != 0 and "needs two refs" in bad.stderr


def test_a_closed_pipe_ends_ah_quietly(files: Path, tmp_path: Path) -> None:
    many = tmp_path / "many"
    many.mkdir()
    for i in range(2000):  # a listing far larger than a pipe's buffer
        (many / f"object-with-a-long-name-{i:05d}.txt").write_text(str(i))
    ah("create", "model/pipe")
    ah("create", "model/pipe/m")
    ah("commit", "model/pipe/m", "-m", "many", "-a", str(many))
    proc = subprocess.Popen([command("ah"), "ls", "model/pipe/m"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout is not None and proc.stderr is not None
    assert proc.stdout.read(10)
    proc.stdout.close()  # what head does after its lines
    proc.wait(timeout=60)
    assert proc.stderr.read() == b""
    assert proc.returncode == 141  # it did meet the closed pipe


def test_ml_files_get_sensible_content_types(files: Path, tmp_path: Path) -> None:
    for name in ("w.pt", "m.safetensors", "t.parquet"):
        (tmp_path / name).write_bytes(b"x")
    ah("create", "model/types")
    ah("create", "model/types/m")
    ah("commit", "model/types/m", "-m", "t", "-a", str(tmp_path / "w.pt"),
       "-a", str(tmp_path / "m.safetensors"), "-a", str(tmp_path / "t.parquet"))
    listed = {o["path"]: o["content_type"]
              for o in json.loads(ah("ls", "model/types/m", "--json").stdout)}
    assert listed == {"w.pt": "application/octet-stream",
                      "m.safetensors": "application/octet-stream",
                      "t.parquet": "application/vnd.apache.parquet"}


def test_piped_transfers_print_one_summary_line(tmp_path: Path) -> None:
    many = tmp_path / "many"
    many.mkdir()
    for i in range(50):
        (many / f"{i}.txt").write_text(str(i))
    ah("create", "model/quiet")
    ah("create", "model/quiet/m")
    err = ah("commit", "model/quiet/m", "-m", "many", "-a", str(many)).stderr
    assert "Uploading object" not in err and err.count("Uploaded 50 files, ") == 1
    err = ah("download", "model/quiet/m", "--save-dir", str(tmp_path / "out")).stderr
    assert err.count("Downloaded 50 files, ") == 1
    assert ah("-q", "download", "model/quiet/m", "--save-dir", str(tmp_path / "o2")).stderr == ""


def test_global_flags_after_the_command_and_exit_codes_in_help(tmp_path: Path) -> None:
    (tmp_path / "f.txt").write_text("f")
    ah("create", "model/flags")
    ah("create", "model/flags/m")
    quiet = ah("commit", "model/flags/m", "-m", "q", "-a", str(tmp_path / "f.txt"), "-q")
    assert quiet.stderr == ""
    top = ah("--help").stdout
    assert "exit codes:" in top and "7  hub unreachable" in top and "141" in top


def test_every_option_and_argument_has_help() -> None:
    import argparse

    from ahmount.cli.main import build_parser

    parser = build_parser()
    subs = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    missing = [f"{name} {'/'.join(action.option_strings) or action.dest}"
               for name, sub in subs.choices.items() for action in sub._actions
               if action.help is None and not isinstance(action, argparse._HelpAction)]
    assert missing == []


def test_every_option_is_read_by_its_command() -> None:
    """An option its handler never reads is dead: accepted, shown in --help, and ignored
    (a --lazy once slipped onto `ah delete` and `ah commit` by a careless edit). The
    handler's source must name ``args.<dest>``, or hand ``args`` on whole."""
    import argparse
    import inspect
    import re

    from ahmount.cli.main import build_parser

    parser = build_parser()
    subs = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    unread = []
    for name, sub in subs.choices.items():
        source = inspect.getsource(sub.get_default("handler"))
        passes_args_on = re.search(r"\bargs\b[,)]", source) is not None
        unread += [f"{name} {'/'.join(action.option_strings) or action.dest}"
                   for action in sub._actions
                   if not isinstance(action, argparse._HelpAction) and action.dest != "quiet"
                   and f"args.{action.dest}" not in source and not passes_args_on]
    assert unread == []


def _with_terminal_stdin(args: list[str], answer: bytes) -> subprocess.CompletedProcess[str]:
    leader, follower = os.openpty()
    try:
        proc = subprocess.Popen([command("ah"), *args], stdin=follower,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        os.write(leader, answer)
        out, err = proc.communicate(timeout=60)
    finally:
        os.close(follower)
        os.close(leader)
    return subprocess.CompletedProcess(args, proc.returncode, out, err)


def test_delete_asks_on_a_terminal_for_what_holds_something(files: Path) -> None:
    ah("create", "model/ask")
    ah("create", "model/ask/m")
    ah("commit", "model/ask/m", "-m", "w", "-a", str(files / "model.pt"))
    declined = _with_terminal_stdin(["delete", "model/ask/m"], b"n\n")
    assert declined.returncode == 1 and "holds 1 object on main" in declined.stdout
    assert "not deleted" in declined.stderr
    assert ah("get", "model/ask/m").returncode == 0
    asked = _with_terminal_stdin(["delete", "model/ask"], b"y\n")
    assert asked.returncode == 0 and "holds 1 asset" in asked.stdout
    assert ah("get", "model/ask", check=False).returncode == 3
    ah("create", "model/ask2")
    ah("create", "model/ask2/m")
    quiet = _with_terminal_stdin(["delete", "-y", "model/ask2"], b"")
    assert quiet.returncode == 0 and quiet.stdout == ""
    ah("create", "model/ask3")
    ah("create", "model/ask3/m")
    assert ah("delete", "model/ask3").returncode == 0  # not a terminal: not asked


def test_a_wrong_flag_shows_that_commands_usage() -> None:
    wrong = ah("commit", "model/x/y", "-m", "m", "--nope", check=False)
    assert wrong.returncode == 2
    assert wrong.stderr.startswith("usage: ah commit") and "--nope" in wrong.stderr


def _bytes_read(pid: int) -> int:
    """What process ``pid`` has read so far (its /proc io counters)."""
    for line in Path(f"/proc/{pid}/io").read_text().splitlines():
        if line.startswith("rchar:"):
            return int(line.split()[1])
    return 0


def _as_a_terminals_job() -> None:
    """In the child, before its exec: SIGINT as a terminal's foreground job gets it. Tests
    run from a background job of a script (`.ci/run &`) inherit it ignored, and an ignored
    signal stays ignored across exec: Ctrl-C then never reached ah at all."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _signals(pid: int) -> str:
    """The signals process ``pid`` blocks, ignores and catches (hex masks)."""
    with contextlib.suppress(OSError):
        return " ".join(line.strip() for line in Path(f"/proc/{pid}/status").open()
                        if line.startswith(("SigBlk", "SigIgn", "SigCgt")))
    return "gone"


def _hashing_a_huge_file(tmp_path: Path) -> subprocess.Popen[str]:
    """``ah commit`` of a 1 TiB file (holes: read at memory speed, for many minutes), once
    its hash is under way."""
    from tests.conftest import wait_until

    ah("create", "model/llm")
    ah("create", "model/llm/gpt2")
    huge = tmp_path / "huge.bin"
    with huge.open("wb") as handle:
        handle.truncate(1 << 40)
    proc = subprocess.Popen([command("ah"), "commit", "model/llm/gpt2:main", "-m", "huge",
                             "-a", str(huge)], stderr=subprocess.PIPE, text=True,
                            preexec_fn=_as_a_terminals_job)
    try:
        wait_until(lambda: _bytes_read(proc.pid) > (256 << 20), timeout=60,
                   what="the hash to be under way")
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    return proc


def _interrupted(proc: subprocess.Popen[str]) -> str:
    """Ctrl-C ``proc``; its stderr once it stopped (30 s at most: if it is stuck, the
    failure shows every thread's stack)."""
    proc.send_signal(signal.SIGINT)
    try:
        code = proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        signals = _signals(proc.pid)
        proc.send_signal(signal.SIGUSR1)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=2)
        proc.kill()
        _, err = proc.communicate()
        pytest.fail(f"ah did not stop within 30 s of Ctrl-C ({signals}):\n{err}")
    err = proc.stderr.read() if proc.stderr else ""
    assert code == 130, err
    assert "ah: interrupted" in err
    return err


def test_ctrl_c_while_a_huge_file_is_hashed_stops_at_once_and_commits_nothing(
        tmp_path: Path) -> None:
    """The hash of a file runs in a worker thread, and Ctrl-C waited for it to end: for a
    20 GiB file, 2.5 minutes. It now stops the hash at its next chunk."""
    proc = _hashing_a_huge_file(tmp_path)
    try:
        _interrupted(proc)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    listed = ah("log", "model/llm/gpt2:main").stdout
    assert "huge" not in listed


def test_sigusr1_shows_where_a_command_is_and_it_goes_on(tmp_path: Path) -> None:
    """A command that seems stuck says where, and is not stopped by being asked."""
    from tests.conftest import wait_until

    proc = _hashing_a_huge_file(tmp_path)
    try:
        proc.send_signal(signal.SIGUSR1)
        before = _bytes_read(proc.pid)
        wait_until(lambda: _bytes_read(proc.pid) > before + (256 << 20), timeout=60,
                   what="the hash to go on")
        err = _interrupted(proc)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert "Current thread" in err and "in hash_file" in err, err
