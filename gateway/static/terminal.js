// The Orzbob Cloud browser terminal: xterm.js on the gateway's WebSocket attach endpoint.
// Credentials: a one-time attach token in the URL fragment (#token=...), or an API
// token kept in this browser's localStorage, exchanged for a fresh attach token on every (re)connect via
// the same-origin GET /s/<id>/token. A fragment never reaches a server, and it is wiped from the address bar.
// Or the browser sign-in (/s/login, docs/sign-in.md): its API token sits in an HttpOnly cookie this script
// cannot read, which the browser sends only to /s/k/<key>/...; the key arrives once in the fragment
// (#signin=...), and door.js keeps it only when it belongs to a sign-in this browser started.
"use strict";
(function () {
  const sessionId = document.body.dataset.session;
  const params = new URLSearchParams(location.search);
  const readonly = params.get("ro") === "1";
  const STORE_KEY = orzDoor.STORE_KEY;
  const SIGNIN_KEY = orzDoor.SIGNIN_KEY;
  const statusEl = document.getElementById("status");
  const reconnectBtn = document.getElementById("reconnect");
  const form = document.getElementById("login");
  const encoder = new TextEncoder();

  const taken = orzDoor.takeFragment();
  let oneTimeToken = taken.token;
  // Set on the page's first connect: a sign-in link this browser did not start, which was not taken.
  let notice = taken.ignored ? "a sign-in link this browser did not start was ignored; " : "";

  const term = new Terminal({ cursorBlink: true, scrollback: 5000, convertEol: false,
    fontFamily: "DejaVu Sans Mono, Menlo, Consolas, monospace", fontSize: 14,
    linkHandler: orzDoor.linkHandler((text) => status(text, "warn")) });
  const fit = new FitAddon.FitAddon();
  term.loadAddon(fit);
  term.open(document.getElementById("terminal"));
  fit.fit();
  window.orzTerminal = term; // for tests and the console

  let ws = null;
  let attempt = 0;
  let retryTimer = null;
  let ended = false;
  let stopped = false; // ended or refused: wait for the Reconnect button, not for the network
  let generation = 0; // a newer connect() supersedes one still waiting for its token

  function status(text, kind) {
    statusEl.textContent = `${sessionId}${readonly ? " (read-only)" : ""}: ${text}`;
    statusEl.className = kind || "";
  }

  function askForApiToken(reason) {
    status(notice + reason, "warn");
    notice = "";
    form.hidden = false;
    document.getElementById("api-token").focus();
  }

  async function attachToken() {
    if (oneTimeToken) {
      const t = oneTimeToken;
      oneTimeToken = null; // single use: a reconnect needs a new one
      return t;
    }
    const apiToken = localStorage.getItem(STORE_KEY);
    const signinKey = localStorage.getItem(SIGNIN_KEY);
    if (!apiToken && !signinKey) return null;
    const headers = apiToken ? { Authorization: `Bearer ${apiToken}` } : {};
    const base = apiToken ? "/s/" : `/s/k/${encodeURIComponent(signinKey)}/`;
    const resp = await fetch(`${base}${encodeURIComponent(sessionId)}/token${readonly ? "?readonly=1" : ""}`,
      { headers, cache: "no-store", credentials: apiToken ? "omit" : "same-origin" });
    const body = await resp.json().catch(() => ({}));
    if (resp.status === 401) {
      if (apiToken) localStorage.removeItem(STORE_KEY);
      else localStorage.removeItem(SIGNIN_KEY); // the sign-in expired: offer it again
      throw Object.assign(new Error(body.detail || "API token refused"), { login: true });
    }
    if (!resp.ok) throw Object.assign(new Error(body.detail || `HTTP ${resp.status}`), { fatal: resp.status < 500 });
    return body.token;
  }

  async function connect() {
    clearTimeout(retryTimer);
    const mine = ++generation;
    if (ws) { const old = ws; ws = null; old.close(1000, "reconnecting"); }
    reconnectBtn.hidden = true;
    ended = false;
    stopped = false;
    status(attempt ? `reconnecting (attempt ${attempt + 1})...` : "connecting...", "warn");
    let token;
    try {
      token = await attachToken();
      if (mine !== generation) return;
    } catch (err) {
      if (mine !== generation) return;
      if (err.login) return askForApiToken(`${err.message}: paste a valid API token`);
      if (err.fatal) return stop(err.message);
      return retry(err.message);
    }
    if (!token) return askForApiToken("sign in, or paste an API token, to connect");
    fit.fit();
    const scheme = location.protocol === "https:" ? "wss:" : "ws:";
    const query = new URLSearchParams({ token, cols: term.cols, rows: term.rows });
    // The subprotocol asks for the JSON control messages below; clients without it get terminal bytes only.
    const sock = new WebSocket(`${scheme}//${location.host}/v1/instances/${encodeURIComponent(sessionId)}/attach?${query}`,
                               ["orz.terminal.v1"]);
    sock.binaryType = "arraybuffer";
    ws = sock;
    sock.onmessage = (ev) => {
      if (ws !== sock) return;
      if (typeof ev.data !== "string") return term.write(new Uint8Array(ev.data));
      let msg;
      try { msg = JSON.parse(ev.data); } catch (e) { return; }
      if (msg.type === "status") status(msg.message, "warn");
      else if (msg.type === "attached") {
        attempt = 0;
        status(`${notice}connected${msg.mode === "ro" ? " (read-only)" : ""}`, notice ? "warn" : "ok");
        notice = "";
      }
      else if (msg.type === "error") status(msg.message, "bad");
      else if (msg.type === "exit") ended = true;
    };
    sock.onclose = (ev) => {
      if (ws !== sock) return;
      ws = null;
      if (ev.code === 1000 || ended) return stop("session ended or detached");
      if (ev.code === 4001) return stop(ev.reason || "attach refused");
      retry(ev.reason || "connection lost");
    };
  }

  function retry(reason) {
    attempt += 1;
    const delay = Math.min(15, 2 ** Math.min(attempt - 1, 4));
    status(`${reason}; reconnecting in ${delay} s`, "bad");
    reconnectBtn.hidden = false;
    retryTimer = setTimeout(connect, delay * 1000);
  }

  function stop(reason) {
    stopped = true;
    status(`${reason} - press Reconnect to attach again`, "bad");
    reconnectBtn.hidden = false;
  }

  function send(data) {
    if (ws && ws.readyState === WebSocket.OPEN) ws.send(data);
  }

  term.onData((d) => send(encoder.encode(d)));
  // tmux sets the title to "[needs input] <id> · Orzbob Cloud" as the agent's state changes.
  term.onTitleChange((title) => { if (title) document.title = title; });
  term.onBinary((d) => send(Uint8Array.from(d, (c) => c.charCodeAt(0))));
  term.onResize(({ cols, rows }) => send(JSON.stringify({ type: "resize", cols, rows })));
  window.addEventListener("resize", () => fit.fit());
  // The browser knows the network went away long before a dead TCP connection times out: drop the socket
  // now, and when it comes back (Wi-Fi rejoined, phone awake) reconnect at once instead of after the backoff.
  window.addEventListener("offline", () => {
    if (!ws) return;
    const old = ws;
    ws = null; // do not wait for a close handshake that cannot cross a dead network
    old.close(4000, "network offline");
    retry("network offline");
  });
  window.addEventListener("online", () => { if (!ws && !stopped) { attempt = 0; connect(); } });
  reconnectBtn.addEventListener("click", () => { attempt = 0; connect(); });
  document.getElementById("forget").addEventListener("click", async () => {
    status(await orzDoor.forget(), "warn");
  });
  form.addEventListener("submit", (ev) => {
    ev.preventDefault();
    const input = document.getElementById("api-token");
    localStorage.setItem(STORE_KEY, input.value.trim());
    input.value = "";
    form.hidden = true;
    attempt = 0;
    connect();
    term.focus();
  });
  term.focus();
  connect();
})();
