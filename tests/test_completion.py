"""Shell completion, as a shell does it: bash sources ``ah completion bash`` and runs its
completion function against the real ``ah`` and the embedded hub; zsh registers it."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from ahmount import ah
from ahmount.config import make_config, save_config
from tests.conftest import command, free_port

BASH = r'''
eval "$(ah completion bash)"
complete_line() {
  COMP_LINE="$1"; COMP_POINT=${#COMP_LINE}; read -ra COMP_WORDS <<< "$1"
  [[ "$1" == *" " ]] && COMP_WORDS+=("")
  COMP_CWORD=$((${#COMP_WORDS[@]} - 1)); COMPREPLY=()
  _python_argcomplete ah 2>/dev/null
  printf '%s\n' "${COMPREPLY[@]}"
}
complete_line "$LINE"
'''


def complete(line: str) -> list[str]:
    env = dict(os.environ, LINE=line, PATH=f"{Path(command('ah')).parent}:{os.environ['PATH']}")
    result = subprocess.run(["bash", "-c", BASH], capture_output=True, text=True, env=env,
                            timeout=60, check=True)
    return [w.strip() for w in result.stdout.splitlines() if w.strip()]


@pytest.fixture
def hub_names() -> None:
    ah.create("model/vision")
    ah.create("model/vision/resnet")
    ah.create("model/vision/regnet")
    ah.create("model/vision/resnet:exp-1")
    ah.create("dataset/text")


def test_bash_completes_commands_and_options() -> None:
    assert {"commit", "log", "diff", "completion"} <= set(complete("ah "))
    assert complete("ah commit --fo") == ["--force"]


@pytest.mark.usefixtures("hub_names")
def test_bash_completes_folder_asset_and_ref_names_from_the_hub() -> None:
    assert complete("ah ls mo") == ["model/"]
    assert complete("ah ls model/") == ["model/vision/"]
    assert set(complete("ah ls model/vision/re")) == {"model/vision/resnet",
                                                      "model/vision/regnet"}
    # bash breaks words at ':', so it is handed (and shows) the ref names alone
    assert set(complete("ah log model/vision/resnet:")) == {"main", "exp-1"}
    assert complete("ah ls dataset/t") == ["dataset/text/"]
    assert complete("ah ls model/nowhere/") == []  # unknown: nothing, no traceback


def test_bash_completes_mount_paths_from_the_file_system(tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "weights-dir").mkdir()
    monkeypatch.chdir(tmp_path)
    assert complete("ah status ./wei") == ["./weights-dir/"]


def test_a_hub_that_is_down_completes_nothing_quickly() -> None:
    save_config(make_config(f"http://127.0.0.1:{free_port()}", None, "ah_x"))  # no one listens
    started = time.monotonic()
    assert complete("ah ls model/") == []
    assert time.monotonic() - started < 30  # not the client's minute of retries


@pytest.mark.skipif(shutil.which("zsh") is None, reason="zsh is installed by install.sh --dev")
def test_zsh_registers_the_completion() -> None:
    script = 'autoload -U compinit && compinit -u && eval "$(ah completion zsh)" && ' \
             'print -r -- ${_comps[ah]}'
    env = dict(os.environ, PATH=f"{Path(command('ah')).parent}:{os.environ['PATH']}")
    out = subprocess.run(["zsh", "-c", script], capture_output=True, text=True, env=env,
                         timeout=60, check=True).stdout
    assert out.strip() == "_python_argcomplete"
