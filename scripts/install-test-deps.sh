#!/bin/sh
# Installs the external programs the test suite starts for real (Debian/Ubuntu).
#   coturn: `turnserver`, the STUN target of health::stun::tests::stun_against_coturn.
set -eu

SUDO=
if [ "$(id -u)" -ne 0 ]; then
    SUDO=sudo
fi

if ! command -v turnserver >/dev/null 2>&1; then
    $SUDO apt-get update
    $SUDO apt-get install -y --no-install-recommends coturn
fi

echo "test dependencies present: $(command -v turnserver)"
