// The clinician's visit page (inlined with a nonce): open the meeting as chosen last time, then
// keep the list of who is here current from the event stream, or by polling where that fails.
(function () {
  "use strict";
  // The base template puts this script at the end of <body>: the page is parsed.
  var root = document.getElementById("visit");
  if (!root) { return; }
  var labels = JSON.parse(root.getAttribute("data-labels") || "{}");
  var visit = root.getAttribute("data-visit");
  var CHOICE = "vv-open-with";
  var OPENED = "vv-opened-" + visit;
  var remembered = document.getElementById("remembered");

  function store(kind) { try { localStorage.setItem(CHOICE, kind); } catch (e) { /* private mode */ } }
  function choice() { try { return localStorage.getItem(CHOICE); } catch (e) { return null; } }
  function link(kind) { return root.querySelector('a.open[data-open="' + kind + '"]'); }
  function note(kind) {
    if (kind === "app") { remembered.textContent = labels.rememberedApp; }
    if (kind === "browser") { remembered.textContent = labels.rememberedBrowser; }
  }

  Array.prototype.forEach.call(root.querySelectorAll("a.open"), function (a) {
    a.addEventListener("click", function () { var kind = a.getAttribute("data-open"); store(kind); note(kind); });
  });

  // Once per visit in this tab: a reload does not open the meeting again.
  var kind = choice();
  if (kind === "app" || kind === "browser") {
    note(kind);
    var opened = null;
    try { opened = sessionStorage.getItem(OPENED); sessionStorage.setItem(OPENED, "1"); } catch (e) { opened = null; }
    if (!opened) {
      if (kind === "app") {
        window.location.href = link("app").href;  // the protocol handler: this page stays
      } else {
        var w = window.open(link("browser").href, "_blank");
        if (w) { try { w.opener = null; } catch (e) { /* cross-origin already */ } }
        else { document.getElementById("blocked").hidden = false; }
      }
    }
  }

  var summary = document.getElementById("summary");
  var people = document.getElementById("people");
  function clock(iso) {
    if (!iso) { return ""; }
    var d = new Date(iso);
    return isNaN(d) ? "" : d.toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" });
  }
  function render(view) {
    var waiting = !!view.patientWaitingInLobby;
    var connected = (view.connected || []).length;
    summary.setAttribute("data-waiting", waiting ? "true" : "false");
    summary.setAttribute("data-connected", String(connected));
    summary.setAttribute("data-call", view.callStatus || "");
    summary.textContent = waiting ? labels.waiting
      : connected ? labels.connected.replace("{count}", String(connected)) : labels.nobody;
    while (people.firstChild) { people.removeChild(people.firstChild); }
    (view.participants || []).forEach(function (p) {
      var li = document.createElement("li");
      li.className = "participant";
      li.setAttribute("data-role", p.role);
      li.setAttribute("data-status", p.status);
      var who = document.createElement("strong");
      who.textContent = labels.roles[p.role] || p.role;
      var status = document.createElement("span");
      status.className = "status";
      status.textContent = labels.statuses[p.status] || p.status;
      var since = document.createElement("span");
      since.className = "since";
      since.textContent = clock(p.status === "left" ? p.leftAt : p.status === "lobby" ? p.lobbySince : p.joinedAt);
      li.appendChild(who); li.appendChild(document.createTextNode(": "));
      li.appendChild(status); li.appendChild(document.createTextNode(" ")); li.appendChild(since);
      people.appendChild(li);
    });
    root.setAttribute("data-updated", String(Date.now()));
  }

  var pollUrl = root.getAttribute("data-poll");
  var polling = false;
  function poll() {
    if (polling) { return; }
    polling = true;
    root.setAttribute("data-mode", "polling");
    (function ask() {
      fetch(pollUrl, { credentials: "same-origin", headers: { Accept: "application/json" } })
        .then(function (r) {
          if (r.status >= 400) { summary.textContent = labels.offline; return null; }
          return r.json();
        })
        .then(function (v) { if (v) { render(v); setTimeout(ask, 2000); } }, function () { setTimeout(ask, 2000); });
    })();
  }

  if (!window.EventSource) { poll(); return; }
  root.setAttribute("data-mode", "stream");
  var source = new EventSource(root.getAttribute("data-events"));
  source.addEventListener("view", function (e) { render(JSON.parse(e.data)); });
  // The stream ends every few seconds and reconnects by itself (readyState CONNECTING); a
  // refusal (401/403) or a proxy that breaks it closes it: then poll instead.
  source.onerror = function () { if (source.readyState === 2) { poll(); } };
})();
