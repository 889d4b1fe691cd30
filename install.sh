#!/usr/bin/env bash
# Installs ahmount on Debian 12 (as root): the system packages it needs, a virtualenv in
# /opt/ahmount/venv with this checkout installed into it, and the commands on PATH.
#   ./install.sh          for users
#   ./install.sh --dev    also the test and lint tools, and what the tests start
#                         (PostgreSQL, an S3-protocol server)
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
venv=${AHMOUNT_VENV:-/opt/ahmount/venv}
dev=0
[ "${1:-}" = "--dev" ] && dev=1

packages=(fuse3 libfuse3-dev pkg-config gcc python3-dev python3-venv)
# The tests start their own PostgreSQL server from Debian's binaries, complete in zsh; the benchmarks mount peers (sshfs, rclone).
if [ $dev = 1 ]; then packages+=(postgresql rsync git zsh openssh-server sshfs rclone); fi
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi

if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
fi
"$venv/bin/pip" install -q --upgrade pip >/dev/null 2>&1 || true
if [ $dev = 1 ]; then
  "$venv/bin/pip" install -q -e "$here[dev]"
else
  "$venv/bin/pip" install -q -e "$here[mount]"
fi
for cmd in ah ah-mount ah-server; do
  if [ -x "$venv/bin/$cmd" ]; then ln -sf "$venv/bin/$cmd" "/usr/local/bin/$cmd"; fi
done
echo "ahmount installed in $venv" >&2
