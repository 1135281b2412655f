#!/usr/bin/env bash
# Headless Chromium for tests/report/test_browser.py (it renders a `ctrpipe report` page), from Debian's
# packages. Run by test.sh. Installs only when chromium is missing, apt-get exists and this runs as root;
# otherwise it does nothing and the browser test skips, saying why. Quiet unless the install fails.
set -uo pipefail
if command -v chromium >/dev/null 2>&1 || ! command -v apt-get >/dev/null 2>&1 || [ "$(id -u)" != 0 ]; then
  exit 0
fi
log="$(mktemp)"
if (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium) >"$log" 2>&1; then
  echo "installed chromium (Debian package) for tests/report/test_browser.py" >&2
else
  echo "warning: could not install chromium; tests/report/test_browser.py will skip. apt-get said:" >&2
  tail -n 5 "$log" >&2
fi
rm -f "$log"
