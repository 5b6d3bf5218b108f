// Chiffon console: live updates without a framework. Plain JavaScript, served from
// /ui/static/ (the Content-Security-Policy allows no inline script); nothing is built.
// Text from the server's events is inserted as text, never as HTML.
(function () {
  "use strict";

  // A list page (requests, agents): re-read the page every few seconds and swap the table.
  function poll(live) {
    var every = parseInt(live.getAttribute("data-poll"), 10) || 5000;
    setInterval(function () {
      if (document.hidden) return;
      fetch(location.href, { credentials: "same-origin", headers: { Accept: "text/html" } })
        .then(function (r) { return r.ok ? r.text() : null; })
        .then(function (html) {
          if (!html) return;
          var doc = new DOMParser().parseFromString(html, "text/html");
          var fresh = doc.getElementById("live");
          if (fresh) live.replaceChildren.apply(live, Array.from(fresh.childNodes).map(function (n) { return document.importNode(n, true); }));
        })
        .catch(function () {});
    }, every);
  }

  // The request page: follow its events; append log lines and progress as they come and
  // reload the page when the request or a step changes status (unless a comment is typed).
  function follow(req) {
    var url = req.getAttribute("data-events");
    if (!url || !window.EventSource) return;
    var current = req.getAttribute("data-status");
    var log = document.getElementById("log");
    var pending = null;
    function reloadSoon() {
      if (pending) return;
      pending = setTimeout(function () {
        var c = document.getElementById("comment");
        if (c && c.value.trim() !== "") { pending = null; return; }
        location.reload();
      }, 250);
    }
    function line(text) {
      if (!log) return;
      log.appendChild(document.createTextNode(new Date().toTimeString().slice(0, 8) + " " + text + "\n"));
      log.scrollTop = log.scrollHeight;
    }
    var es = new EventSource(url);
    es.addEventListener("status", function (e) {
      var d = JSON.parse(e.data);
      if (d.status !== current) { es.close(); reloadSoon(); }
    });
    es.addEventListener("step", function (e) {
      var d = JSON.parse(e.data);
      line("step " + (d.seq + 1) + " " + d.status);
      var el = document.querySelector("#step-" + d.seq + " .step-status");
      if (!el || el.textContent !== d.status) reloadSoon();
    });
    es.addEventListener("progress", function (e) {
      var d = JSON.parse(e.data);
      var bar = document.querySelector("#step-" + d.seq + " .step-progress");
      if (bar) bar.value = d.progress;
      line("progress " + d.progress + "% " + d.message);
    });
    es.addEventListener("output", function (e) {
      var d = JSON.parse(e.data);
      line("output " + d.line);
    });
  }

  document.addEventListener("DOMContentLoaded", function () {
    var live = document.getElementById("live");
    if (live) poll(live);
    var req = document.getElementById("request");
    if (req) follow(req);
  });
})();
