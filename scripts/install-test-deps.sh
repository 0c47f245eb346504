#!/bin/sh
# Installs the external programs the test suite starts for real (Debian/Ubuntu).
#   coturn: `turnserver`, the STUN target of health::stun::tests::stun_against_coturn.
#   dnsmasq: the nameserver of tests/discovery_dns.rs (records changed during the test).
set -eu

SUDO=
if [ "$(id -u)" -ne 0 ]; then
    SUDO=sudo
fi

missing=
if ! command -v turnserver >/dev/null 2>&1; then
    missing="$missing coturn"
fi
# dnsmasq lives in /usr/sbin, which is not on every user's PATH.
if ! command -v dnsmasq >/dev/null 2>&1 && [ ! -x /usr/sbin/dnsmasq ]; then
    # dnsmasq-base: the binary only, without the system service the dnsmasq package
    # would start on port 53.
    missing="$missing dnsmasq-base"
fi
if [ -n "$missing" ]; then
    $SUDO apt-get update
    # shellcheck disable=SC2086 # one word per package
    $SUDO apt-get install -y --no-install-recommends $missing
fi

echo "test dependencies present: $(command -v turnserver) $(command -v dnsmasq || echo /usr/sbin/dnsmasq)"
