#!/usr/bin/env bash
# Installs the Debian/Ubuntu packages the service needs, if any are missing.
#   scripts/system-deps.sh run    redis-server, Python venv, WeasyPrint's libraries and fonts
#   scripts/system-deps.sh test   the same, plus Chromium for the browser test
#   scripts/system-deps.sh bench  the same as run, plus wrk
# As root on Debian it installs them; otherwise it names what to install and fails.
set -euo pipefail

want=(redis-server python3-venv libpango-1.0-0 libpangoft2-1.0-0 libharfbuzz-subset0
      fonts-dejavu-core)
case "${1:-run}" in
  test) want+=(chromium wrk) ;;
  bench) want+=(wrk) ;;
esac

missing=()
for package in "${want[@]}"; do
  dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed" \
    || missing+=("$package")
done
[ ${#missing[@]} -eq 0 ] && exit 0

if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null; then
  echo "Installing system packages: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  # Debian's redis-server package starts a service on 6379; this project runs its own.
else
  echo "Missing system packages: ${missing[*]}" >&2
  echo "Install them with: sudo apt-get install ${missing[*]}" >&2
  exit 1
fi
