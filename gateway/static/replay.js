// The replay page: a session's pane recording (asciicast v2) played in xterm.js with its timing.
// The recording comes from the same-origin GET /s/<id>/recording, with the API token from this browser's
// localStorage (as the terminal page keeps it) or the browser sign-in's cookie, sent only to its keyed path
// /s/k/<key>/... (the key arrives in the fragment, #signin=..., and door.js keeps it in this origin's
// localStorage when it belongs to a sign-in this browser started).
// ?speed=N plays faster, ?idle=S caps each pause (default 2 s), ?part=previous plays the part rotated out.
"use strict";
(function () {
  const sessionId = document.body.dataset.session;
  const params = new URLSearchParams(location.search);
  const STORE_KEY = orzDoor.STORE_KEY;
  const SIGNIN_KEY = orzDoor.SIGNIN_KEY;
  const notice = orzDoor.takeFragment().ignored ? "a sign-in link this browser did not start was ignored; " : "";
  const idleLimit = Math.max(0.01, Number(params.get("idle")) || 2);
  const statusEl = document.getElementById("status");
  const speedEl = document.getElementById("speed");
  const form = document.getElementById("login");
  if (params.get("speed")) speedEl.value = params.get("speed");

  let term = null;
  let events = [];
  let timer = null;
  let run = 0; // a restart supersedes the playback in progress

  function status(text, kind) {
    statusEl.textContent = `${sessionId} replay: ${text}`;
    statusEl.className = kind || "";
  }

  async function load() {
    const apiToken = localStorage.getItem(STORE_KEY);
    const signinKey = localStorage.getItem(SIGNIN_KEY);
    if (!apiToken && !signinKey) { form.hidden = false; return status(`${notice}sign in, or paste an API token`, "warn"); }
    const headers = apiToken ? { Authorization: `Bearer ${apiToken}` } : {};
    const base = apiToken ? "/s/" : `/s/k/${encodeURIComponent(signinKey)}/`;
    const part = params.get("part") === "previous" ? "?part=previous" : "";
    const resp = await fetch(`${base}${encodeURIComponent(sessionId)}/recording${part}`,
      { headers, cache: "no-store", credentials: apiToken ? "omit" : "same-origin" });
    if (!resp.ok) {
      const body = await resp.json().catch(() => ({}));
      if (resp.status === 401) {
        form.hidden = false;
        localStorage.removeItem(apiToken ? STORE_KEY : SIGNIN_KEY);
      }
      return status(body.detail || `HTTP ${resp.status}`, "bad");
    }
    const lines = (await resp.text()).split("\n");
    let header;
    try { header = JSON.parse(lines[0]); } catch (e) { header = null; }
    if (!header || header.version !== 2) return status("the recording is not asciicast v2", "bad");
    events = [];
    for (const line of lines.slice(1)) {
      try { const ev = JSON.parse(line); if (Array.isArray(ev) && ev.length === 3) events.push(ev); } catch (e) { /* cut off */ }
    }
    if (term) term.dispose();
    term = new Terminal({ cols: header.width, rows: header.height, scrollback: 5000, disableStdin: true,
      fontFamily: "DejaVu Sans Mono, Menlo, Consolas, monospace", fontSize: 14,
      linkHandler: orzDoor.linkHandler((text) => status(text, "warn")) });
    term.open(document.getElementById("terminal"));
    window.orzTerminal = term; // for tests and the console
    play();
  }

  function play() {
    clearTimeout(timer);
    const mine = ++run;
    term.reset();
    let i = 0;
    let last = 0;
    const step = () => {
      if (mine !== run) return;
      while (i < events.length) {
        const [at, kind, data] = events[i];
        const pause = Math.min(Math.max(0, at - last), idleLimit) / Number(speedEl.value || 1);
        last = Math.max(last, at);
        if (pause > 0.001) {
          timer = setTimeout(() => { if (mine !== run) return; apply(kind, data); i += 1; step(); }, pause * 1000);
          return;
        }
        apply(kind, data);
        i += 1;
      }
      status(`end of the recording (${events.length} events)`, "ok");
    };
    status("playing", "ok");
    step();
  }

  function apply(kind, data) {
    if (kind === "o") term.write(data);
    else if (kind === "r") {
      const [cols, rows] = data.split("x").map(Number);
      if (cols > 0 && rows > 0) term.resize(cols, rows);
    }
  }

  document.getElementById("restart").addEventListener("click", () => { if (term) play(); });
  form.addEventListener("submit", (ev) => {
    ev.preventDefault();
    const input = document.getElementById("api-token");
    localStorage.setItem(STORE_KEY, input.value.trim());
    input.value = "";
    form.hidden = true;
    load().catch((err) => status(err.message, "bad"));
  });
  load().catch((err) => status(err.message, "bad"));
})();
