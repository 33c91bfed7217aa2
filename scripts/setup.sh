#!/usr/bin/env bash
# Idempotent set-up for pacs-ai: used by `make run`, `make test`, `make bench`
# and CI (.ci/run). Quiet when everything is already in place.
#
#   scripts/setup.sh venv       .venv with `pip install -e .[dev]` (redone when
#                               pyproject.toml changes; a stamp file remembers)
#   scripts/setup.sh system     Debian packages for the tests: dcmtk, dicom3tools,
#                               redis-server, postgresql, orthanc, orthanc-dicomweb,
#                               chromium, chromium-driver, npm (apt-get, as root)
#   scripts/setup.sh viewer     OHIF's prebuilt viewer for the viewer test:
#                               `npm pack @ohif/app@3.13.2` (the built app only, none
#                               of its dependency tree), unpacked into the cache
#   scripts/setup.sh services   start PostgreSQL and Redis if they are down
#   scripts/setup.sh all        all four (the default)
#
# Environment: VENV (default .venv), PYTHON (default python3), PACS_AI_OHIF_DIST
# (an unpacked OHIF dist/ to use instead; default
# ${XDG_CACHE_HOME:-~/.cache}/pacs-ai/ohif-3.13.2/package/dist).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}
STAMP="$VENV/.pacs-ai-installed"
# Look for system tools outside the venv (pynetdicom installs its own `storescu`).
SYSTEM_PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin

say() { echo "setup: $*" >&2; }
die() {
    echo "setup: error: $*" >&2
    exit 1
}
have() { PATH=$SYSTEM_PATH command -v "$1" >/dev/null 2>&1; }
is_root() { [ "$(id -u)" = 0 ]; }

# -- Python virtual environment ------------------------------------------------

setup_venv() {
    local want
    want="$(sha256sum pyproject.toml | cut -d' ' -f1) $("$PYTHON" -V 2>&1 || true)"
    if [ -x "$VENV/bin/python" ] && [ -x "$VENV/bin/pacs-ai" ] && [ -f "$STAMP" ] &&
        [ "$(cat "$STAMP")" = "$want" ] && "$VENV/bin/python" -c "" 2>/dev/null; then
        return 0
    fi
    command -v "$PYTHON" >/dev/null || die "$PYTHON not found; install Python 3.11 or newer"
    "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' ||
        die "pacs-ai needs Python >= 3.11 ($PYTHON is $("$PYTHON" -V 2>&1))"
    if [ -e "$VENV" ] && ! "$VENV/bin/python" -c "" 2>/dev/null; then
        say "$VENV is broken (its Python is gone); recreating it"
        rm -rf "$VENV"
    fi
    if [ ! -x "$VENV/bin/python" ]; then
        if ! "$PYTHON" -c 'import ensurepip, venv' 2>/dev/null; then
            is_root || die "python3 -m venv needs the Debian package python3-venv"
            apt_install python3-venv
        fi
        say "creating $VENV"
        "$PYTHON" -m venv "$VENV"
    fi
    say "installing pacs-ai and its dev tools into $VENV (pip install -e .[dev])"
    "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check --upgrade pip
    "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check -e '.[dev]'
    echo "$want" >"$STAMP"
}

# -- Debian packages -----------------------------------------------------------

APT_UPDATED=
apt_install() {
    command -v apt-get >/dev/null || die "missing: $*; install them (no apt-get here)"
    is_root || die "missing Debian packages: $*; run as root, or: sudo apt-get install $*"
    export DEBIAN_FRONTEND=noninteractive
    if [ -z "$APT_UPDATED" ]; then
        apt-get update -qq >/dev/null
        APT_UPDATED=1
    fi
    say "apt-get install $*"
    apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}

setup_system() {
    local missing=()
    have storescu && have echoscu && have dcmdump || missing+=(dcmtk)
    have dciodvfy || missing+=(dicom3tools)
    # the dashboard test drives a real headless Chromium (never a downloaded browser)
    have chromium || missing+=(chromium)
    have chromedriver || missing+=(chromium-driver)
    have Orthanc || missing+=(orthanc) # a real PACS for the results round trip test
    # the viewer test: OHIF reads our objects over Orthanc's DICOMweb
    [ -f /usr/share/orthanc/plugins/libOrthancDicomWeb.so ] || missing+=(orthanc-dicomweb)
    have npm || missing+=(npm) # only `npm pack`: fetches OHIF's prebuilt viewer
    have redis-server && have redis-cli || missing+=(redis-server)
    have psql && have pg_isready || missing+=(postgresql-client)
    # the test suite needs a local PostgreSQL server, not only the client
    compgen -G "/usr/lib/postgresql/*/bin/postgres" >/dev/null && have pg_ctlcluster ||
        missing+=(postgresql)
    [ ${#missing[@]} -eq 0 ] || apt_install "${missing[@]}"
}

# -- OHIF viewer (the viewer test) ---------------------------------------------

OHIF_VERSION=3.13.2

setup_viewer() {
    local cache dist tmp
    if [ -n "${PACS_AI_OHIF_DIST:-}" ]; then
        [ -f "$PACS_AI_OHIF_DIST/index.html" ] ||
            die "PACS_AI_OHIF_DIST=$PACS_AI_OHIF_DIST holds no index.html"
        return 0
    fi
    cache="${XDG_CACHE_HOME:-$HOME/.cache}/pacs-ai"
    dist="$cache/ohif-$OHIF_VERSION/package/dist"
    [ -f "$dist/index.html" ] && return 0
    have npm || die "npm not found; run scripts/setup.sh system as root, or apt-get install npm"
    say "fetching OHIF $OHIF_VERSION's prebuilt viewer (npm pack @ohif/app@$OHIF_VERSION)"
    mkdir -p "$cache"
    tmp=$(mktemp -d "$cache/.ohif-XXXXXX")
    if ! (cd "$tmp" && PATH=$SYSTEM_PATH npm pack --silent "@ohif/app@$OHIF_VERSION" >/dev/null &&
        tar -xzf ohif-app-"$OHIF_VERSION".tgz package/dist package/LICENSE); then
        rm -rf "$tmp"
        die "npm pack @ohif/app@$OHIF_VERSION failed"
    fi
    rm -f "$tmp"/ohif-app-"$OHIF_VERSION".tgz
    rm -rf "$cache/ohif-$OHIF_VERSION"
    mv "$tmp" "$cache/ohif-$OHIF_VERSION"
}

# -- PostgreSQL and Redis --------------------------------------------------------

wait_until() {
    local what=$1
    shift
    for _ in $(seq 1 60); do
        "$@" >/dev/null 2>&1 && return 0
        sleep 0.5
    done
    die "$what did not come up within 30 s"
}

pg_up() { pg_isready -q -h 127.0.0.1 -p 5432; }
pg_login() { psql -h 127.0.0.1 -U postgres -w -d postgres -Atqc 'SELECT 1'; }
redis_up() { [ "$(redis-cli -h 127.0.0.1 -p 6379 ping 2>/dev/null)" = PONG ]; }

setup_services() {
    if ! pg_up; then
        say "starting PostgreSQL"
        # shellcheck disable=SC2046
        pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql) main start
        wait_until PostgreSQL pg_up
    fi
    # The tests connect as postgres@127.0.0.1 without a password
    # (PACS_AI_TEST_PG overrides). A fresh Debian cluster asks for one.
    if [ -z "${PACS_AI_TEST_PG:-}" ] && ! pg_login >/dev/null 2>&1; then
        is_root || die "cannot log in to PostgreSQL as postgres@127.0.0.1; set PACS_AI_TEST_PG"
        local hba
        hba=$(su postgres -c "psql -Atqc 'SHOW hba_file'")
        say "allowing local trust logins for postgres in $hba (test machine)"
        sed -i '1i host all postgres 127.0.0.1/32 trust\nhost all postgres ::1/128 trust' "$hba"
        su postgres -c "psql -qc 'SELECT pg_reload_conf()'" >/dev/null
        wait_until "PostgreSQL login" pg_login
    fi
    if ! redis_up; then
        say "starting Redis"
        mkdir -p /var/lib/redis /var/log/redis
        redis-server --daemonize yes --bind 127.0.0.1 -::1 --port 6379 --save "" --appendonly no --dir /var/lib/redis --logfile /var/log/redis/ci.log
        wait_until Redis redis_up
    fi
}

[ $# -gt 0 ] || set -- all
for step in "$@"; do
    case $step in
    venv) setup_venv ;;
    system) setup_system ;;
    viewer) setup_viewer ;;
    services) setup_services ;;
    all)
        setup_system
        setup_venv
        setup_viewer
        setup_services
        ;;
    *) die "unknown step '$step' (venv, system, viewer, services or all)" ;;
    esac
done
