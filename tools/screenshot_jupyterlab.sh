#!/usr/bin/env bash
# Retake docs/img/jupyterlab_01.png: JupyterLab in headless Chromium, showing notebook 01 as the
# refusal-rank kernel executed it on the `tiny` profile, scrolled to its first figure.
#
# Needs: .venv (./run_all.sh --profile tiny, or scripts/setup_env.sh tiny), Chromium (Debian:
# `apt-get install chromium`; or set CHROMIUM=/path/to/chrome) and Node.js with npm (playwright-core, a
# driver without bundled browsers, is installed into a scratch folder unless PLAYWRIGHT_CORE names one).
# Everything runs on 127.0.0.1 and in a scratch folder: runs/ and the repository's notebooks are left
# alone (notebook 01 writes results/tiny/ and figures/tiny/, as every tiny run does).
#
# Usage: tools/screenshot_jupyterlab.sh [OUT.png]
#   EXECUTED=path/to/01_directions.ipynb   show that executed notebook instead of executing one here
#   KEEP=1                                  keep the scratch folder (its path is printed)
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
OUT=$(realpath -m "${1:-docs/img/jupyterlab_01.png}")
CHROMIUM=${CHROMIUM:-$(command -v chromium || command -v chromium-browser || command -v google-chrome || true)}
[ -x .venv/bin/jupyter ] || { echo "no .venv/bin/jupyter: run scripts/setup_env.sh tiny first" >&2; exit 2; }
[ -n "$CHROMIUM" ] || { echo "no Chromium found: apt-get install chromium, or set CHROMIUM" >&2; exit 2; }
command -v node >/dev/null && command -v npm >/dev/null || { echo "Node.js and npm are needed" >&2; exit 2; }

WORK=$(mktemp -d -t jl-shot.XXXXXX)
mkdir -p "$WORK/nb" "$WORK/settings/@jupyterlab/apputils-extension" "$WORK/settings/@jupyterlab/notebook-extension" \
         "$WORK/workspaces" "$WORK/runtime"
LAB_PID=
cleanup() {
  if [ -n "$LAB_PID" ]; then kill "$LAB_PID" 2>/dev/null || true; wait "$LAB_PID" 2>/dev/null || true; fi
  if [ "${KEEP:-0}" = 1 ]; then echo "scratch folder kept: $WORK"; else rm -rf "$WORK"; fi
}
trap cleanup EXIT

export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} MKL_NUM_THREADS=${MKL_NUM_THREADS:-1}
export TQDM_DISABLE=1 TQDM_MININTERVAL=60 HF_HUB_DISABLE_PROGRESS_BARS=1

# 1. notebook 01 executed on tiny by the kernel run_all.sh registers
.venv/bin/python -m ipykernel install --sys-prefix --name refusal-rank --display-name "refusal-rank (.venv)" >/dev/null
if [ -n "${EXECUTED:-}" ]; then
  cp "$EXECUTED" "$WORK/nb/01_directions.ipynb"
else
  echo "[shot] executing notebook 01 on tiny"
  .venv/bin/papermill notebooks/01_directions.ipynb "$WORK/nb/01_directions.ipynb" -k refusal-rank -p profile tiny \
    --cwd notebooks --no-progress-bar 2> >(grep --line-buffered -v "TCP without encryption" >&2)
fi

# 2. JupyterLab, headless, on 127.0.0.1 only, on a free port; fresh settings: no news pop-up, no update
#    check, every cell rendered (no windowing), no workspace restored
echo '{"fetchNews": "false", "checkForUpdates": false}' \
  > "$WORK/settings/@jupyterlab/apputils-extension/notification.jupyterlab-settings"
echo '{"windowingMode": "none"}' > "$WORK/settings/@jupyterlab/notebook-extension/tracker.jupyterlab-settings"
PORT=$(.venv/bin/python -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
JUPYTERLAB_SETTINGS_DIR="$WORK/settings" JUPYTERLAB_WORKSPACES_DIR="$WORK/workspaces" JUPYTER_RUNTIME_DIR="$WORK/runtime" \
  .venv/bin/jupyter lab --no-browser --ServerApp.ip=127.0.0.1 --ServerApp.port="$PORT" --ServerApp.port_retries=0 \
  --IdentityProvider.token='' --ServerApp.password='' --ServerApp.root_dir="$WORK/nb" $([ "$(id -u)" = 0 ] && echo --allow-root) \
  >"$WORK/lab.log" 2>&1 &
LAB_PID=$!
for _ in $(seq 120); do
  .venv/bin/python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:$PORT/api/status', timeout=2)" \
    2>/dev/null && break
  kill -0 "$LAB_PID" 2>/dev/null || { cat "$WORK/lab.log" >&2; exit 1; }
  sleep 1
done

# 3. the browser: open the notebook, wait for its kernel and its figures, scroll the first figure's cell
#    to the top, take the screenshot
PW=${PLAYWRIGHT_CORE:-}
if [ -z "$PW" ]; then
  (cd "$WORK" && npm install --silent --no-audit --no-fund --prefix "$WORK/pw" playwright-core@1.65.2 >/dev/null)
  PW="$WORK/pw/node_modules/playwright-core"
fi
mkdir -p "$(dirname "$OUT")"
cat > "$WORK/shot.js" <<'JS'
const [pw, chromium, url, out] = process.argv.slice(2);
const { chromium: browserType } = require(pw);
(async () => {
  const browser = await browserType.launch({
    executablePath: chromium, headless: true,
    args: ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
           "--disable-component-update", "--disable-sync"],
  });
  const page = await browser.newPage({ viewport: { width: 1400, height: 1000 }, deviceScaleFactor: 1 });
  await page.goto(url, { waitUntil: "load", timeout: 120000 });
  // the notebook panel, its rendered figures, and the kernel started (the status bar says "Idle")
  await page.waitForSelector(".jp-NotebookPanel .jp-OutputArea-output img", { timeout: 120000 });
  await page.waitForFunction(() => /Idle/.test(document.querySelector(".jp-StatusBar-Widget")?.closest(".jp-StatusBar")?.innerText ?? ""),
                             null, { timeout: 120000 }).catch(() => {});
  // collapse the file browser a little less than fully: keep it, it shows where the notebook lives
  const cell = page.locator(".jp-NotebookPanel .jp-Cell", { has: page.locator(".jp-OutputArea-output img") }).first();
  await cell.evaluate((el) => el.scrollIntoView({ block: "start" }));
  // scroll back a little so that the cell's code is in view above its figure
  await page.evaluate(() => { const s = document.querySelector(".jp-NotebookPanel .jp-WindowedPanel-outer");
                              if (s) s.scrollTop = Math.max(0, s.scrollTop - 40); });
  await page.waitForTimeout(1500);
  await page.screenshot({ path: out });
  await browser.close();
})().catch((e) => { console.error(e); process.exit(1); });
JS
node "$WORK/shot.js" "$PW" "$CHROMIUM" "http://127.0.0.1:$PORT/lab/tree/01_directions.ipynb" "$OUT"
echo "[shot] wrote $(realpath --relative-to="$ROOT" "$OUT") ($(du -k "$OUT" | cut -f1) KB)"
