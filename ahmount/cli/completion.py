"""Shell completion for ``ah`` (argcomplete): commands and options come from the parser;
API paths (``model/llm/gpt2:v1``) come from the hub, one level per <Tab>, and mount paths
(``./``, ``~/assets/...``) from the file system.

``ah completion bash|zsh`` prints the script to source (or put in
``/etc/bash_completion.d/ah``); the shell then runs ``ah`` with ``_ARGCOMPLETE`` set, and
:func:`autocomplete` answers before any command runs. A hub that does not answer within
:data:`HUB_TIMEOUT` gives no names rather than a hung prompt.
"""

from __future__ import annotations

import argparse
import os
from typing import Any

from ahmount.names import KINDS

#: Seconds a <Tab> may wait for the hub.
HUB_TIMEOUT = 2.0
#: The arguments that take an API path or a mount path.
PATH_ARGUMENTS = ("path", "paths", "a", "b")
SHELLS = ("bash", "zsh", "fish", "tcsh")


def attach(parser: argparse.ArgumentParser) -> None:
    """Give every path argument of every subcommand the hub-and-files completer."""
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    for sub in subs:
        for command in sub.choices.values():
            for action in command._actions:
                if action.dest in PATH_ARGUMENTS:
                    setattr(action, "completer", complete_path)  # noqa: B010 (argcomplete reads it)


def autocomplete(parser: argparse.ArgumentParser) -> None:
    """Answer a shell's completion request and exit; no-op for ordinary runs (argcomplete is
    not even imported then, so ``ah`` starts as fast as before)."""
    if "_ARGCOMPLETE" not in os.environ:
        return
    import argcomplete

    argcomplete.autocomplete(parser)


def shellcode(shell: str) -> str:
    from argcomplete.shell_integration import shellcode as script

    return str(script(["ah"], shell=shell))


def complete_path(prefix: str, **_: Any) -> list[str]:
    """Mount paths from the file system; API paths from the hub, one level at a time."""
    if prefix.startswith((".", "/", "~")):
        from argcomplete.completers import FilesCompleter

        return list(FilesCompleter()(prefix))
    try:
        return _hub_names(prefix)
    except Exception:  # a <Tab> never prints a traceback into the command line
        return []


def _hub_names(prefix: str) -> list[str]:
    import trio

    from ahmount.client.embedded import connect
    from ahmount.hub.models import AssetAddr, FolderAddr
    from ahmount.sync_runner import run_sync

    parts = prefix.split("/")
    if len(parts) == 1:
        return [f"{kind}/" for kind in KINDS if kind.startswith(prefix)]
    kind = parts[0]
    if kind not in KINDS or len(parts) > 3:
        return []

    async def names() -> list[str]:
        with trio.move_on_after(HUB_TIMEOUT):
            async with connect(retries=0) as hub:
                me = await hub.whoami()
                if len(parts) == 2:
                    return [f"{kind}/{f.name}/" for f in await hub.list_folders(me, kind)]
                folder = FolderAddr(me, kind, parts[1])
                asset, colon, _ = parts[2].partition(":")
                if not colon:
                    return [f"{kind}/{parts[1]}/{a.name}"
                            for a in await hub.list_assets(folder)]
                addr = AssetAddr(folder, asset)
                refs = [name for ref_type in ("branch", "tag")
                        for name, _ in await hub.list_refs(addr, ref_type)]
                return [f"{kind}/{parts[1]}/{asset}:{ref}" for ref in refs]
        return []

    return [name for name in run_sync(names) if name.startswith(prefix)]
