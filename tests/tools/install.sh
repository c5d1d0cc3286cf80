#!/usr/bin/env bash
# Install what the project and its tests need on a Debian machine, as root:
# the system tools, then a virtualenv (.venv) holding the project and pytest.
set -euo pipefail
cd "$(dirname "$0")/../.."

packages=(iproute2 iptables nftables conntrack ipset dnsmasq-base iputils-ping procps dbus systemd
          python3 python3-venv mmdebstrap systemd-container
          build-essential dpkg-dev debhelper dh-virtualenv lintian)
missing=()
for pkg in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "ok installed" || missing+=("$pkg")
done
if ((${#missing[@]})); then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q >/dev/null || echo "install.sh: apt-get update failed; trying the cached lists" >&2
    apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null
fi

# Debian's interpreter, the one the package and the README's install use (not
# another python3 first on PATH, such as pyenv's): tests and benchmarks run what users run.
default_python=python3
[ -x /usr/bin/python3 ] && default_python=/usr/bin/python3
python=${PYTHON:-$default_python}
if [ ! -x .venv/bin/python ]; then
    "$python" -m venv .venv
fi
# compat mode: a plain path entry, no import hook (the hook costs ~14 ms at every start)
.venv/bin/python -m pip install -q --disable-pip-version-check --config-settings editable_mode=compat -e '.[test]'
# setuptools builds the project in pip's isolated build environment; in the venv
# itself its distutils-precedence.pth would import a module at every
# interpreter start (~0.5 ms of each event's client here), for nothing we use.
if .venv/bin/python -m pip show -q setuptools >/dev/null 2>&1; then
    .venv/bin/python -m pip uninstall -q -y setuptools
fi
# Byte-compile our modules as a packaged install would: with PYTHONDONTWRITEBYTECODE
# set (as on some hosts), every event would otherwise compile each module from
# source again (~2 ms a module). A source newer than its .pyc is still honoured.
.venv/bin/python -m compileall -q vif_route_qubes setup_dnat_to_ns
echo "install.sh: ready (.venv/bin/vif-route-qubes)" >&2
