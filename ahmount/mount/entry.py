"""The ``ah-mount`` command's entry point: says what to install when pyfuse3 is missing (a
venv set up with ``pip install ahmount`` has everything but the FUSE binding) instead of an
ImportError traceback, then runs the daemon."""

from __future__ import annotations

import sys

from ahmount.exit_codes import FAILURE


def main(argv: list[str] | None = None) -> int:
    try:
        import pyfuse3  # noqa: F401  (only to find out whether it can be imported)
    except ImportError as exc:
        print(f"ah-mount: the FUSE binding is missing ({exc}): install it with "
              "pip install 'ahmount[mount]' (needs Debian's fuse3 libfuse3-dev pkg-config), "
              "or run ./install.sh", file=sys.stderr)
        return FAILURE
    from ahmount.mount.daemon import main as daemon_main

    return daemon_main(argv)


if __name__ == "__main__":
    sys.exit(main())
