// The dashboard's pages: live fragments from the event stream, confirmations, actions.
// No inline scripts (the Content-Security-Policy forbids them); everything is delegated here.
(function () {
  "use strict";
  const page = document.body.dataset.page;

  if (page === "login") {
    // `changeover dashboard` prints /login#token=...: the fragment never reaches a server or a log.
    const m = location.hash.match(/^#token=(.+)$/);
    if (m) {
      history.replaceState(null, "", "/login");
      document.getElementById("token").value = decodeURIComponent(m[1]);
      document.getElementById("login-form").submit();
    }
    return;
  }

  const csrf = document.querySelector('meta[name="csrf-token"]').content;
  const post = (url, body) => fetch(url, {
    method: "POST", credentials: "same-origin",
    headers: {"Content-Type": "application/json", "X-CSRF-Token": csrf},
    body: JSON.stringify(body || {}),
  });

  // -- live fragments ---------------------------------------------------------------------------
  function swap(el, html) {
    // keep what the user opened (history rows) open across updates
    const open = new Set([...el.querySelectorAll("details[open]")].map((d) => d.id));
    el.innerHTML = html;
    open.forEach((id) => { const d = document.getElementById(id); if (d) d.open = true; });
  }

  const es = new EventSource("/events?page=" + encodeURIComponent(page));
  es.addEventListener("header", (e) => swap(document.getElementById("header"), e.data));
  es.addEventListener("main", (e) => swap(document.getElementById("main"), e.data));
  es.addEventListener("actions", (e) => swap(document.getElementById("actions"), e.data));
  es.addEventListener("traffic", (e) => {
    if (window.changeoverTraffic) window.changeoverTraffic(JSON.parse(e.data));
  });
  es.addEventListener("logout", () => { location.href = "/login"; });
  es.onopen = () => document.body.classList.remove("offline");
  es.onerror = () => document.body.classList.add("offline");

  // -- confirmations ------------------------------------------------------------------------------
  const dialog = document.getElementById("confirm");
  const text = document.getElementById("confirm-text");
  const reason = document.getElementById("confirm-reason");
  const reasonLabel = document.getElementById("confirm-reason-label");
  const error = document.getElementById("confirm-error");
  const ok = document.getElementById("confirm-ok");
  let pending = null;

  const TITLES = {rollback: "Rollback", promote: "Promote", stop_standby: "Stop standby", redeploy: "Redeploy"};

  async function confirmAction(action, version) {
    const q = version ? "?version=" + encodeURIComponent(version) : "";
    const r = await fetch("/api/plan/" + action + q, {credentials: "same-origin"});
    const plan = await r.json();
    if (!r.ok) { alert(plan.error || ("HTTP " + r.status)); return; }
    pending = plan;
    document.getElementById("confirm-title").textContent = TITLES[action] || action;
    text.textContent = plan.text;
    error.hidden = true;
    reason.value = "";
    reasonLabel.hidden = !plan.needs_reason;
    ok.hidden = !plan.allowed;
    ok.disabled = false;
    dialog.showModal();
    if (plan.needs_reason) reason.focus();
  }

  ok.addEventListener("click", async () => {
    if (!pending) return;
    if (pending.needs_reason && !reason.value.trim()) {
      error.textContent = "Say why: the reason is kept in the history.";
      error.hidden = false;
      return;
    }
    ok.disabled = true;
    const r = await post("/actions/" + pending.action,
      {expect: pending.expect, reason: reason.value, version: pending.version});
    const body = await r.json().catch(() => ({}));
    if (r.status === 202) { dialog.close(); pending = null; return; }
    error.textContent = body.error || ("refused (HTTP " + r.status + ")");
    error.hidden = false;
    ok.disabled = false;
  });
  document.getElementById("confirm-cancel").addEventListener("click", () => { pending = null; dialog.close(); });

  document.addEventListener("click", (e) => {
    const b = e.target.closest("[data-action]");
    if (b && b.tagName === "BUTTON") { e.preventDefault(); confirmAction(b.dataset.action, b.dataset.version); }
    if (e.target.closest("#logout")) {
      post("/logout").then(() => { location.href = "/login"; });
    }
  });
})();
