# Sourced by run.sh and test.sh: install what the project needs, from Debian and PyPI only.

install_system_packages() {
    local missing=()
    for package in "$@"; do
        case "$package" in
            g++) command -v g++ >/dev/null || missing+=(g++) ;;
            # The binary alone (no service started at install): the DNS discovery tests run their own.
            dnsmasq-base) command -v dnsmasq >/dev/null || [ -x /usr/sbin/dnsmasq ] || missing+=(dnsmasq-base) ;;
            # The replicas tests start their own redis-server on a loopback port (no persistence); a service the
            # package may start at install is left alone.
            redis-server) command -v redis-server >/dev/null || [ -x /usr/bin/redis-server ] || missing+=(redis-server) ;;
            *) command -v "$package" >/dev/null || missing+=("$package") ;;
        esac
    done
    [ ${#missing[@]} -eq 0 ] && return 0
    local sudo=""
    [ "$(id -u)" -eq 0 ] || sudo="sudo"
    echo "[setup] installing Debian packages: ${missing[*]}" >&2
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}" >/dev/null
}

ensure_venv() {
    [ -x .venv/bin/python ] || python3 -m venv .venv
    echo "[setup] pip install -e '$1' into .venv" >&2
    .venv/bin/python -m pip install -q -e "$1"
}
