#!/usr/bin/env bash
# Check that lab reports render in headless Chromium: every embedded figure decodes (naturalWidth > 0),
# the page has its sections, and a full-page screenshot is written beside each report for a person to
# look at (report.html.png).
#
# Usage: scripts/check_report_html.sh RUN_DIR_OR_REPORT.html [...]
# Needs Debian's `chromium` (apt-get install chromium). Exits non-zero if a report fails.
set -euo pipefail

browser="$(command -v chromium || command -v chromium-browser || command -v google-chrome || true)"
if [ -z "$browser" ]; then
    echo "headless Chromium not found: apt-get install chromium" >&2
    exit 2
fi
[ "$#" -ge 1 ] || { echo "usage: $0 RUN_DIR_OR_REPORT.html [...]" >&2; exit 2; }

flags=(--headless --no-sandbox --disable-gpu --hide-scrollbars --allow-file-access-from-files
       --virtual-time-budget=5000)
failed=0
for target in "$@"; do
    report="$target"
    [ -d "$target" ] && report="$target/report.html"
    if [ ! -f "$report" ]; then
        echo "FAIL $report: no such file"; failed=1; continue
    fi
    work="$(mktemp -d)"
    # A copy of the page with a probe appended: after load it writes, into the DOM, how many images
    # there are and how many decoded, which --dump-dom then prints.
    probe_js='window.addEventListener("load", () => { const i = [...document.images];
      document.body.setAttribute("data-probe",
        i.length + "/" + i.filter(x => x.complete && x.naturalWidth > 0).length); });'
    page="$(cat "$report")"
    printf '%s<script>%s</script></body></html>\n' "${page%</body></html>*}" "$probe_js" > "$work/probe.html"
    dom="$("$browser" "${flags[@]}" --dump-dom "file://$work/probe.html" 2>/dev/null)"
    probe="$(grep -o 'data-probe="[0-9]*/[0-9]*"' <<<"$dom" | head -1 | grep -o '[0-9]*/[0-9]*' || true)"
    total="${probe%/*}"; decoded="${probe#*/}"
    sections="$(grep -c '<h2>' <<<"$dom" || true)"
    "$browser" "${flags[@]}" --window-size=1100,4000 --screenshot="$report.png" "file://$(realpath "$report")" \
        >/dev/null 2>&1 || true
    # every figure the run wrote must be in the page and decode; a report whose run wrote none (a
    # table-only experiment) passes with none
    expected="$(find "$(dirname "$report")/figures" -maxdepth 1 -name '*.png' 2>/dev/null | wc -l)"
    if [ -n "$probe" ] && [ "$total" = "$decoded" ] && [ "$total" -ge "$expected" ] \
        && { [ "$total" -gt 0 ] || [ "$expected" -eq 0 ]; } && [ "$sections" -ge 3 ]; then
        echo "ok   $report: $decoded/$total figures decoded, $sections sections; screenshot $report.png"
    else
        echo "FAIL $report: figures decoded ${probe:-none found}, $sections sections"
        failed=1
    fi
    rm -rf "$work"
done
exit "$failed"
