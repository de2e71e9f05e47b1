// What the web door's pages (terminal and replay) share: the browser sign-in's key, and opening links.
//
// The sign-in (docs/sign-in.md): its API token sits in an HttpOnly cookie the browser sends only to
// /s/k/<key>/...; the page learns the key once, from the fragment of the redirect back (#signin=<key>&nonce=...),
// and keeps it in this origin's localStorage, which no other port of this host can read. Only a key of a
// sign-in this browser started from a page of this door is taken: the "Sign in with ..." link makes a random
// nonce and keeps it here before the browser leaves, the door hands the nonce back beside the key, and a key
// arriving without that nonce (a link crafted to sign this browser into someone else's account) is ignored.
"use strict";
window.orzDoor = (function () {
  const SIGNIN_KEY = "orz.signinKey";
  const STORE_KEY = "orz.apiToken";
  const NONCE_KEY = "orz.signinNonce";
  const SHAPE = /^[A-Za-z0-9_-]{32}$/;

  function nonce() {
    const bytes = crypto.getRandomValues(new Uint8Array(24));
    return btoa(String.fromCharCode(...bytes)).replace(/\+/g, "-").replace(/\//g, "_");
  }

  // Each sign-in link carries a fresh nonce, kept here first (a link opened in another tab of this browser
  // shares it; the door refuses a start without one).
  for (const link of document.querySelectorAll("a.signin")) {
    link.addEventListener("click", (ev) => {
      ev.preventDefault();
      const value = nonce();
      localStorage.setItem(NONCE_KEY, value);
      location.assign(`${link.href}&nonce=${value}`);
    });
  }

  // The fragment's one-time attach token and sign-in key; the fragment leaves the address bar. Returns
  // {token, ignored}: ignored when a sign-in key came that this browser did not ask for.
  function takeFragment() {
    const fragment = new URLSearchParams(location.hash.slice(1));
    if (location.hash) history.replaceState(null, "", location.pathname + location.search);
    const key = fragment.get("signin");
    let ignored = false;
    if (key !== null) {
      const expected = localStorage.getItem(NONCE_KEY);
      if (SHAPE.test(key) && expected && SHAPE.test(expected) && fragment.get("nonce") === expected) {
        localStorage.setItem(SIGNIN_KEY, key);
        localStorage.removeItem(NONCE_KEY); // single use
      } else {
        ignored = true; // the key stored before (if any) stays; a pending sign-in's nonce too
      }
    }
    return { token: fragment.get("token"), ignored };
  }

  // Forget: this browser's API token and sign-in key go from its storage, and the door revokes the sign-in's
  // API token and clears its cookie (HttpOnly: only the door's answer can). Resolves to a sentence.
  async function forget() {
    const key = localStorage.getItem(SIGNIN_KEY);
    localStorage.removeItem(STORE_KEY);
    localStorage.removeItem(SIGNIN_KEY);
    if (!key || !SHAPE.test(key)) return "API token removed from this browser";
    try {
      const resp = await fetch(`/s/k/${encodeURIComponent(key)}/forget`, { cache: "no-store", credentials: "same-origin" });
      if (!resp.ok) return `signed out in this browser; the server answered HTTP ${resp.status}`;
      const body = await resp.json().catch(() => ({}));
      return body.revoked ? "signed out: the sign-in is revoked and its cookie removed"
        : "signed out: the sign-in's cookie is removed";
    } catch (err) {
      return "signed out in this browser; the server could not be reached to revoke the sign-in";
    }
  }

  // xterm.js's handler for links a program prints (OSC 8): only http and https open, in a new tab that
  // cannot reach this page (noopener) and is not told where it came from (noreferrer). Any other scheme
  // (javascript:, data:, file:, ...) does nothing but say so.
  function linkHandler(say) {
    return {
      allowNonHttpProtocols: false,
      activate(event, uri) {
        let url = null;
        try { url = new URL(uri); } catch (e) { url = null; }
        if (!url || (url.protocol !== "http:" && url.protocol !== "https:")) {
          say("link not opened: only http and https links open");
          return;
        }
        window.open(url.href, "_blank", "noopener,noreferrer");
      },
    };
  }

  return { takeFragment, forget, linkHandler, SIGNIN_KEY, STORE_KEY };
})();
