"""The layering, checked on every module's own imports (docs/architecture.md says why).

Front ends (``cli``, ``mount``) sit on the file-system core (``vfs``), which sits on the hub
client (``client``, ``transfer``), which speaks HTTP to the server (``server``) over the
service and its stores (``hub``). A module may import its own layer and the layers below,
never one above; ``vfs`` never imports pyfuse3, so it runs on machines without FUSE; and the
embedded hub is wired in one module of the client that the HTTP client does not import.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "ahmount"

#: layer -> the ahmount layers it must not import (by top-level package or module).
FORBIDDEN: dict[str, set[str]] = {
    "vfs": {"mount", "cli", "server", "ahfs", "pyfuse3"},
    "client": {"vfs", "mount", "cli", "server", "ahfs", "hub.service", "hub.open", "pyfuse3"},
    "hub": {"client", "vfs", "mount", "cli", "server", "transfer", "ah", "ahfs", "pyfuse3"},
    "server": {"client", "vfs", "mount", "cli", "transfer", "ah", "ahfs", "pyfuse3",
               "hub.blobs", "hub.s3_blobs", "hub.metadata", "hub.trees"},
    "ah": {"vfs", "mount", "cli", "server", "ahfs", "pyfuse3"},
    # ah:// is a front end of the vfs layer, like the mount, but with no FUSE in it
    "ahfs": {"mount", "cli", "server", "hub.service", "hub.open", "pyfuse3"},
    "transfer": {"vfs", "mount", "cli", "server", "ahfs", "pyfuse3"},
    "names": {"client", "vfs", "mount", "cli", "server", "hub", "transfer", "ah", "ahfs"},
    "errors": {"client", "vfs", "mount", "cli", "server", "hub", "transfer", "ah", "ahfs",
               "names"},
    # used by the caches (vfs, transfer) and by the hub's store alike: it imports neither
    "sqlite_damage": {"client", "vfs", "mount", "cli", "server", "hub", "transfer", "ah",
                      "ahfs", "names"},
}
#: The one module allowed to wire the embedded hub (service + ASGI app) into a client.
EMBEDDED_WIRING = "client/embedded.py"
#: The API's one way into the vfs layer: ah.download's offline fallback reads the shared
#: cache through ah:// (imported only then).
OFFLINE_DOWNLOAD = "ah.py"


def imported(path: Path) -> set[str]:
    """What ``path`` imports, as dotted names relative to ahmount (or top-level packages)."""
    tree = ast.parse(path.read_text(), str(path))
    out: set[str] = set()
    for node in ast.walk(tree):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        for name in names:
            out.add(name.removeprefix("ahmount.") if name.startswith("ahmount.") else
                    name.split(".")[0])
    return out


def layer_of(path: Path) -> str:
    rel = path.relative_to(PACKAGE)
    return rel.parts[0] if len(rel.parts) > 1 else rel.stem


def _breaks(name: str, rule: str) -> bool:
    return name == rule or name.startswith(rule + ".")


MODULES = sorted(p for p in PACKAGE.rglob("*.py"))


def run_python(code: str) -> None:
    """Run ``code`` in a fresh interpreter (nothing of this test process imported); its
    asserts must hold."""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_no_module_imports_a_layer_above_its_own(path: Path) -> None:
    rel = str(path.relative_to(PACKAGE))
    rules = FORBIDDEN.get(layer_of(path), set())
    if rel == EMBEDDED_WIRING:
        rules = rules - {"server", "hub.service", "hub.open"}
    if rel == OFFLINE_DOWNLOAD:
        rules = rules - {"ahfs"}
    bad = sorted(n for n in imported(path) for r in rules if _breaks(n, r))
    assert not bad, f"{rel} imports {bad}, which its layer must not"


def test_nothing_but_the_front_ends_imports_the_mount() -> None:
    users = [str(p.relative_to(PACKAGE)) for p in MODULES
             if layer_of(p) not in ("mount", "cli") and
             any(_breaks(n, "mount") for n in imported(p))]
    assert users == []


def test_the_vfs_core_runs_where_pyfuse3_cannot_be_imported() -> None:
    """Transitively, not only directly: the whole session, the API, the CLI and the server
    import with pyfuse3 blocked (a venv without the FUSE packages has all but ah-mount)."""
    code = ("import sys; sys.modules['pyfuse3'] = None\n"
            "import ahmount.vfs.session, ahmount.vfs.core, ahmount.ah, ahmount.cli.main, "
            "ahmount.server.main\n"
            "assert 'pyfuse3' not in [m for m, v in sys.modules.items() if v is not None]\n")
    run_python(code)


def test_ah_urls_work_in_a_venv_without_fuse() -> None:
    """``ah://`` through fsspec's entry point, end to end on the embedded hub, with pyfuse3
    blocked: what a container without FUSE (or a plain ``pip install ahmount``) gets."""
    code = ("import sys, os, tempfile; sys.modules['pyfuse3'] = None\n"
            "os.environ['AHMOUNT_HOME'] = tempfile.mkdtemp()\n"
            "import fsspec\n"
            "fs = fsspec.filesystem('ah')\n"
            "fs.makedirs('model/nofuse/m')\n"
            "fs.pipe('ah://model/nofuse/m/a.txt', b'works')\n"
            "assert fsspec.open('ah://model/nofuse/m/a.txt').open().read() == b'works'\n"
            "assert 'pyfuse3' not in [m for m, v in sys.modules.items() if v is not None]\n")
    run_python(code)


def test_the_http_client_does_not_pull_in_the_hub_service() -> None:
    code = ("import sys\n"
            "import ahmount.client.hub_client, ahmount.transfer.upload, ahmount.ah\n"
            "import ahmount.ahfs\n"
            "loaded = [m for m in sys.modules if m.startswith(('ahmount.server', "
            "'ahmount.hub.service', 'sqlalchemy'))]\n"
            "assert not loaded, loaded\n")
    run_python(code)


def test_importing_ahmount_changes_nothing_of_other_libraries() -> None:
    """No global patch of httpcore (the client's large socket reads are its own transport's),
    no logging handlers, for every module of the package."""
    modules = ", ".join(
        "ahmount." + ".".join(p.relative_to(PACKAGE).with_suffix("").parts)
        for p in MODULES if p.name != "__init__.py")
    code = ("import logging, httpcore\n"
            "before = httpcore.AsyncHTTP11Connection.READ_NUM_BYTES\n"
            f"import {modules}\n"
            "assert httpcore.AsyncHTTP11Connection.READ_NUM_BYTES == before\n"
            "assert not logging.getLogger().handlers\n"
            "assert not logging.getLogger('ahmount').handlers\n")
    run_python(code)


def _is_service(node: ast.expr) -> bool:
    """``svc``, ``service`` or ``service_of(request)``: an expression naming the service."""
    if isinstance(node, ast.Name):
        return node.id in ("svc", "service")
    return isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and \
        node.func.id in ("service_of", "_svc")


def test_the_server_reaches_the_stores_only_through_the_service() -> None:
    """No endpoint touches ``service.blobs`` or ``service.metadata``: reads go through the
    objects the service hands out after its checks, writes through its methods."""
    found = []
    for path in (PACKAGE / "server").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and node.attr in ("blobs", "metadata") and \
                    _is_service(node.value):
                found.append(f"{path.relative_to(PACKAGE)}:{node.lineno} .{node.attr}")
    assert found == []
