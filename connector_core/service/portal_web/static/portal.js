/* Configuration portal: progressive enhancement only (every page works without it).
   - focuses the error summary of a form that came back with errors;
   - the approver picker: an ARIA 1.2 combobox that searches the directory as you type
     (POST /api/portal/directory with the form's CSRF token; arrow keys, Enter, Escape);
   - copy buttons for the integration records, announced in a live region.
   No inline script and no eval: the Content-Security-Policy allows scripts from 'self' only. */
(function () {
  "use strict";

  function ready(fn) {
    if (document.readyState !== "loading") fn();
    else document.addEventListener("DOMContentLoaded", fn);
  }

  function announce(region, text) {
    if (!region) return;
    region.textContent = "";
    window.setTimeout(function () { region.textContent = text; }, 60);
  }

  function setupCombobox() {
    var input = document.getElementById("approverUpn");
    var list = document.getElementById("approver-options");
    if (!input || !list || !input.form) return;
    var field = input.closest(".combobox");
    var url = field && field.getAttribute("data-directory");
    var csrfInput = input.form.querySelector('input[name="csrf"]');
    var status = document.getElementById("approver-status");
    var message = document.getElementById("approver-message");
    if (!url || !csrfInput) return;
    input.setAttribute("role", "combobox");
    input.setAttribute("aria-autocomplete", "list");
    input.setAttribute("aria-expanded", "false");
    input.setAttribute("aria-controls", list.id);
    var options = [];
    var active = -1;
    var timer = null;
    var blurTimer = null;
    var sequence = 0;

    function text(name, values) {
      var template = field.getAttribute("data-" + name) || "";
      return template.replace(/\{(\w+)\}/g, function (_, key) {
        return values && key in values ? String(values[key]) : "";
      });
    }

    function close() {
      list.hidden = true;
      input.setAttribute("aria-expanded", "false");
      input.removeAttribute("aria-activedescendant");
      active = -1;
    }

    function open() {
      if (!options.length) return;
      list.hidden = false;
      input.setAttribute("aria-expanded", "true");
    }

    function highlight(index) {
      var items = list.querySelectorAll('[role="option"]');
      for (var i = 0; i < items.length; i++) {
        items[i].setAttribute("aria-selected", i === index ? "true" : "false");
      }
      active = index;
      if (index >= 0 && items[index]) {
        input.setAttribute("aria-activedescendant", items[index].id);
        items[index].scrollIntoView({ block: "nearest" });
      } else {
        input.removeAttribute("aria-activedescendant");
      }
    }

    function choose(index) {
      var person = options[index];
      if (!person) return;
      // A search still waiting for the typing to pause, or on its way, is moot now: without
      // this, its answer would open the list again over the chosen value.
      window.clearTimeout(timer);
      sequence++;
      input.value = person.upn;
      close();
      announce(status, text("selected", { name: person.name, upn: person.upn }));
    }

    function render(people) {
      list.textContent = "";
      options = people;
      people.forEach(function (person, index) {
        var item = document.createElement("li");
        item.id = "approver-option-" + index;
        item.setAttribute("role", "option");
        item.setAttribute("aria-selected", "false");
        item.setAttribute("data-upn", person.upn);
        var name = document.createElement("span");
        name.className = "option-name";
        name.textContent = person.name;
        var upn = document.createElement("span");
        upn.className = "option-upn";
        upn.textContent = person.upn;
        item.appendChild(name);
        item.appendChild(upn);
        item.addEventListener("mousedown", function (event) { event.preventDefault(); });
        item.addEventListener("click", function () { choose(index); });
        list.appendChild(item);
      });
      if (people.length) {
        open();
        announce(status, text("found", { count: people.length }));
      } else {
        close();
        announce(status, text("none"));
      }
    }

    function showMessage(value) {
      if (!message) return;
      message.textContent = value || "";
      message.hidden = !value;
    }

    function search() {
      var query = input.value.trim();
      if (query.length < 2) {
        render([]);
        return;
      }
      var mine = ++sequence;
      var body = new URLSearchParams();
      body.set("q", query);
      body.set("csrf", csrfInput.value);
      window.fetch(url, {
        method: "POST",
        credentials: "same-origin",
        headers: { "Content-Type": "application/x-www-form-urlencoded" },
        body: body.toString()
      }).then(function (response) {
        return response.json().then(function (data) { return { ok: response.ok, data: data }; });
      }).then(function (result) {
        if (mine !== sequence) return;
        if (!result.ok) {
          render([]);
          showMessage(result.data && result.data.error);
          return;
        }
        showMessage("");
        render(result.data.results || []);
      }).catch(function () {
        if (mine !== sequence) return;
        render([]);
        showMessage(text("unavailable"));
      });
    }

    input.addEventListener("input", function () {
      window.clearTimeout(timer);
      timer = window.setTimeout(search, 250);
    });
    input.addEventListener("keydown", function (event) {
      if (event.key === "ArrowDown") {
        if (!options.length) return;
        event.preventDefault();
        open();
        highlight(active + 1 >= options.length ? 0 : active + 1);
      } else if (event.key === "ArrowUp") {
        if (!options.length) return;
        event.preventDefault();
        open();
        highlight(active <= 0 ? options.length - 1 : active - 1);
      } else if (event.key === "Enter") {
        if (!list.hidden && active >= 0) {
          event.preventDefault();
          choose(active);
        }
      } else if (event.key === "Escape") {
        if (!list.hidden) {
          event.preventDefault();
          close();
        }
      }
    });
    // Closing waits a moment after a blur (a click on an option lands first); coming back
    // within it keeps the list, so the arrow keys and Enter act on what is shown.
    input.addEventListener("focus", function () { window.clearTimeout(blurTimer); });
    input.addEventListener("blur", function () { blurTimer = window.setTimeout(close, 150); });
  }

  function selectText(element) {
    var range = document.createRange();
    range.selectNodeContents(element);
    var selection = window.getSelection();
    selection.removeAllRanges();
    selection.addRange(range);
  }

  function setupCopy() {
    var status = document.getElementById("copy-status");
    var buttons = document.querySelectorAll("button.copy[data-copy]");
    Array.prototype.forEach.call(buttons, function (button) {
      button.hidden = false;
      button.addEventListener("click", function () {
        var source = document.getElementById(button.getAttribute("data-copy"));
        if (!source) return;
        var value = source.textContent;
        function done(ok) {
          button.classList.toggle("copied", ok);
          if (!ok) selectText(source);
          announce(status, status && status.getAttribute(ok ? "data-copied" : "data-failed"));
        }
        function fallback() {
          selectText(source);
          var ok = false;
          try { ok = document.execCommand("copy"); } catch (error) { ok = false; }
          done(ok);
        }
        if (navigator.clipboard && window.isSecureContext) {
          navigator.clipboard.writeText(value).then(function () { done(true); }, fallback);
        } else {
          fallback();
        }
      });
    });
  }

  ready(function () {
    var summary = document.getElementById("error-summary");
    if (summary) summary.focus();
    else if (window.location.hash === "#records") {
      var heading = document.getElementById("records");
      if (heading) heading.focus();
    }
    setupCombobox();
    setupCopy();
  });
})();
