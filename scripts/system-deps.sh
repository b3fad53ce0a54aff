#!/usr/bin/env bash
# The system packages the tests use, in one list: `make test` (through scripts/setup.sh) and .ci/run
# both come here. As root with apt-get, the missing ones are installed; elsewhere this says once what is
# missing, and the tests that need it are skipped with that reason in pytest's summary.
#   go + testify, Boost, OpenSSL  HumanEval-X's Go and C++ tests in the sandbox (harness/execution/)
#   bubblewrap                    the sandbox's namespaces (full isolation)
#   chromium                      the HTML report rendered in a real browser
# Each line: a Debian package, then the path whose presence means it is installed.
set -uo pipefail
PACKAGES="
golang-go                          /usr/bin/go
golang-github-stretchr-testify-dev /usr/share/gocode/src/github.com/stretchr/testify
libboost-dev                       /usr/include/boost/any.hpp
libssl-dev                         /usr/include/openssl/md5.h
bubblewrap                         /usr/bin/bwrap
chromium                           /usr/bin/chromium
"
missing=()
while read -r pkg path; do
  [ -n "$pkg" ] && [ ! -e "$path" ] && missing+=("$pkg")
done <<< "$PACKAGES"
[ ${#missing[@]} -eq 0 ] && exit 0

if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  echo "installing system packages: ${missing[*]}"
  if apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null; then
    exit 0
  fi
  echo "error: apt-get could not install ${missing[*]} (see apt's message above)" >&2
  exit 1
fi
echo "note: not installed (needs root and apt-get): ${missing[*]}; the tests that need them are skipped" \
  "(pytest's summary says which). To run them: sudo apt-get install ${missing[*]}" >&2
exit 0
