"""ComfyUI's own frontend in headless Chromium (selenium): load a UI-format workflow as a drop does, inspect what
the page made of it, queue it from the page.

Facts this relies on (SPEC 5.3, found by trying the 0.3.75 host with frontend 1.32.x): the page is ready when
``window.app.graph`` exists; ``app.loadGraphData(workflow)`` loads a UI-format workflow like a drop and returns a
promise; unknown node types open a ``.p-dialog`` titled "This workflow has missing nodes"; a workflow failing the
frontend's schema raises an alert "Invalid workflow against zod schema: ..." (the graph is still drawn);
``LiteGraph.registered_node_types`` holds the registered types.

- :func:`browser_missing` -> why no browser can run here (``None`` when Chromium, chromedriver and selenium exist).
- :func:`start_chromium` -> a headless ``webdriver.Chrome`` with a fresh profile.
- :class:`ComfyPage` -> ``open()``, ``load(workflow)`` -> :class:`LoadReport`, ``set_widget``, ``queue()``.
- :func:`is_ui_workflow`, :func:`ui_workflow_files`.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

BROWSER_HINT = ("browser tests need Chromium and selenium: apt-get install -y chromium chromium-driver; "
                "pip install selenium (in rdt's [test] extras)")
MISSING_NODES_TITLE = "This workflow has missing nodes"
ZOD_ALERT = "Invalid workflow against zod schema"
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-dev-shm-usage", "--window-size=1600,1000")


def is_ui_workflow(data: Any) -> bool:
    """A UI-format (drag-in) workflow: a dict with ``nodes`` and ``links`` lists."""
    return isinstance(data, dict) and isinstance(data.get("nodes"), list) and isinstance(data.get("links"), list)


def ui_workflow_files(folder: str | Path) -> list[Path]:
    """``folder/*.json`` files that are UI-format workflows (API-format graphs and other JSON are left out)."""
    out = []
    for path in sorted(Path(folder).glob("*.json")):
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except ValueError:
            out.append(path)  # broken JSON: let the test report it
            continue
        if is_ui_workflow(data):
            out.append(path)
    return out


def _chromium_binary() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        found = shutil.which(name)
        if found:
            return found
    return None


def _driver_binary() -> str | None:
    for candidate in ("chromedriver", "/usr/bin/chromedriver", "/usr/lib/chromium/chromedriver"):
        found = shutil.which(candidate) or (candidate if Path(candidate).is_file() else None)
        if found:
            return found
    return None


def browser_missing() -> str | None:
    """``None`` when a headless browser can run, else what is missing (one line)."""
    missing = []
    try:
        import selenium  # noqa: F401
    except ImportError:
        missing.append("selenium")
    if _chromium_binary() is None:
        missing.append("chromium")
    if _driver_binary() is None:
        missing.append("chromium-driver")
    return None if not missing else f"no {', '.join(missing)}: {BROWSER_HINT}"


def start_chromium(profile_dir: str | Path | None = None):
    """Headless Chromium under chromedriver, with a fresh ``--user-data-dir`` (a temp folder by default)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = _chromium_binary()
    for flag in CHROMIUM_FLAGS:
        opts.add_argument(flag)
    profile = Path(profile_dir) if profile_dir else Path(tempfile.mkdtemp(prefix="rdt_chromium_"))
    opts.add_argument(f"--user-data-dir={profile}")
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(executable_path=_driver_binary()), options=opts)
    driver.set_script_timeout(300)
    driver.set_page_load_timeout(300)
    return driver


@dataclass
class LoadReport:
    """What the page made of a loaded workflow."""

    load_error: str | None
    missing_nodes_dialogs: list[str]
    alerts: list[str]
    registered_types: set[str]
    node_count: int
    link_count: int
    widgets_values: dict[str, Any] = field(default_factory=dict)  # node id -> serialized widgets_values

    @property
    def zod_alerts(self) -> list[str]:
        return [a for a in self.alerts if ZOD_ALERT in a]


# Records window.alert calls and toast texts so a schema alert is seen whichever way the frontend shows it.
_INSTALL_WATCH = """
if (!window.__rdt) {
  window.__rdt = {alerts: [], prompts: [], queueErrors: []};
  const origAlert = window.alert;
  window.alert = function(msg) { window.__rdt.alerts.push(String(msg)); };
  const api = (window.comfyAPI && window.comfyAPI.api && window.comfyAPI.api.api) || null;
  if (api && api.queuePrompt && !api.__rdtWrapped) {
    const orig = api.queuePrompt.bind(api);
    api.queuePrompt = async function(...args) {
      try { const r = await orig(...args); window.__rdt.prompts.push(r); return r; }
      catch (e) { window.__rdt.queueErrors.push(String(e && (e.message || e)) + ' ' +
                  JSON.stringify((e && e.response) || null)); throw e; }
    };
    api.__rdtWrapped = true;
  }
}
"""

_LOAD = """
const wf = arguments[0], done = arguments[arguments.length - 1];
Promise.resolve().then(() => window.app.loadGraphData(wf))
  .then(() => done(null), (e) => done(String((e && (e.stack || e.message)) || e)));
"""

_INSPECT = """
const app = window.app, graph = app.graph;
const dialogs = Array.from(document.querySelectorAll('.p-dialog')).map(d => d.innerText || '');
const toasts = Array.from(document.querySelectorAll('.p-toast-message, .p-toast, [role=alert]'))
  .map(t => t.innerText || '');
const links = graph.links instanceof Map ? graph.links.size : Object.keys(graph.links || {}).length;
const widgets = {};
for (const node of graph._nodes) {
  const s = node.serialize();
  widgets[String(node.id)] = s.widgets_values === undefined ? null : s.widgets_values;
}
return {dialogs: dialogs, alerts: window.__rdt.alerts.concat(toasts),
        registered: Object.keys(window.LiteGraph.registered_node_types),
        nodes: graph._nodes.length, links: links, widgets: widgets};
"""

_SET_WIDGET = """
const [nodeId, name, value] = arguments;
const node = window.app.graph.getNodeById(nodeId);
if (!node) return 'no node ' + nodeId;
const w = (node.widgets || []).find(w => w.name === name);
if (!w) return 'no widget ' + name + ' on node ' + nodeId;
w.value = value;
if (w.callback) { try { w.callback(value, window.app.canvas, node); } catch (e) {} }
return null;
"""

_WIDGETS = """
const out = [];
for (const node of window.app.graph._nodes) {
  out.push({id: node.id, type: node.type, widgets: (node.widgets || []).map(w => ({
    name: w.name, value: w.value, options: (w.options && Array.isArray(w.options.values)) ? w.options.values : null}))});
}
return out;
"""

_QUEUE = """
const done = arguments[arguments.length - 1];
const before = window.__rdt.prompts.length;
Promise.resolve().then(() => window.app.queuePrompt(0, 1)).then(
  (r) => done({result: r === undefined ? null : r, prompts: window.__rdt.prompts.slice(before),
               errors: window.__rdt.queueErrors}),
  (e) => done({error: String((e && (e.stack || e.message)) || e), errors: window.__rdt.queueErrors}));
"""


class ComfyPage:
    """The ComfyUI page of ``server_url`` in a selenium ``driver``."""

    def __init__(self, driver, server_url: str):
        self.driver = driver
        self.url = server_url.rstrip("/") + "/"

    # A fresh user folder makes the frontend open its templates browser (first run) over the canvas.
    FIRST_RUN_SETTINGS = {"Comfy.TutorialCompleted": True}

    def _post_setting(self, key: str, value: Any) -> None:
        req = urllib.request.Request(f"{self.url}api/settings/{key}", data=json.dumps(value).encode("utf-8"),
                                     headers={"Content-Type": "application/json"}, method="POST")
        with urllib.request.urlopen(req, timeout=30):
            pass

    def open(self, timeout: float = 180.0) -> None:
        """Load the page (first-run templates dialog turned off) and wait until ``window.app.graph`` exists."""
        for key, value in self.FIRST_RUN_SETTINGS.items():
            self._post_setting(key, value)
        self.driver.get(self.url)
        deadline = time.monotonic() + timeout
        while not self.driver.execute_script("return !!(window.app && window.app.graph && window.LiteGraph)"):
            if time.monotonic() > deadline:
                raise TimeoutError(f"ComfyUI's page at {self.url} did not set window.app.graph in {timeout:.0f} s")
            time.sleep(0.5)
        self.driver.execute_script(_INSTALL_WATCH)

    def load(self, workflow: dict, settle: float = 2.0) -> LoadReport:
        """``app.loadGraphData(workflow)`` (a deep copy), wait ``settle`` s for dialogs, then inspect."""
        self.driver.execute_script(_INSTALL_WATCH)
        error = self.driver.execute_async_script(_LOAD, json.loads(json.dumps(workflow)))
        time.sleep(settle)
        data = self.driver.execute_script(_INSPECT)
        return LoadReport(
            load_error=error,
            missing_nodes_dialogs=[d for d in data["dialogs"] if MISSING_NODES_TITLE in d],
            alerts=[a for a in data["alerts"] if a],
            registered_types=set(data["registered"]),
            node_count=int(data["nodes"]),
            link_count=int(data["links"]),
            widgets_values=data["widgets"],
        )

    def widgets(self) -> list[dict]:
        """Every node's widgets: ``[{id, type, widgets: [{name, value, options}]}]``."""
        return self.driver.execute_script(_WIDGETS)

    def set_widget(self, node_id: int, name: str, value: Any) -> None:
        """Set a widget's value as the user would (value, then its callback)."""
        problem = self.driver.execute_script(_SET_WIDGET, node_id, name, value)
        if problem:
            raise KeyError(problem)

    def queue(self) -> list[str]:
        """``app.queuePrompt(0, 1)`` (the Queue button); returns the prompt ids the page got back.

        Raises:
            RuntimeError: the page could not queue (validation errors, exceptions), with the server's answer.
        """
        out = self.driver.execute_async_script(_QUEUE)
        if out.get("error") or out.get("errors"):
            raise RuntimeError(f"queueing from the page failed: {out}")
        return [p["prompt_id"] for p in out.get("prompts", []) if isinstance(p, dict) and "prompt_id" in p]

    def dismiss_dialogs(self) -> None:
        """Close open PrimeVue dialogs (so the next load starts clean)."""
        self.driver.execute_script(
            "document.querySelectorAll('.p-dialog .p-dialog-close-button, .p-dialog-header-close')"
            ".forEach(b => b.click());")
        time.sleep(0.3)

    def screenshot(self, path: str | Path) -> Path:
        """Save a PNG of the page (the canvas redrawn first)."""
        self.driver.execute_script("window.app.graph.setDirtyCanvas(true, true);")
        time.sleep(0.5)
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        self.driver.save_screenshot(str(path))
        return path
