// The incident list refreshes itself: while #rows carries data-refresh, its rows are fetched again
// every that many seconds (only while the tab is visible) and swapped in when they changed. The
// server stops it (X-Console-Live: 0) once nothing on the page can change any more.
"use strict";
(function () {
  var rows = document.getElementById("rows");
  var status = document.getElementById("refresh-status");
  if (!rows || !rows.dataset.refresh) { return; }
  var every = Number(rows.dataset.refresh) * 1000;
  function schedule() { window.setTimeout(tick, every); }
  function tick() {
    if (document.hidden) { schedule(); return; }
    fetch(rows.dataset.src, { credentials: "same-origin", headers: { "Accept": "text/html" }, redirect: "error" })
      .then(function (response) {
        if (!response.ok) { throw new Error("HTTP " + response.status); }
        var live = response.headers.get("X-Console-Live") !== "0";
        return response.text().then(function (html) { return { html: html, live: live }; });
      })
      .then(function (result) {
        if (result.html.trim() !== rows.innerHTML.trim()) { rows.innerHTML = result.html; }
        rows.dataset.updated = new Date().toISOString();
        if (result.live) {
          schedule();
        } else {
          status.textContent = "Every incident on this page is finished: no more updates.";
        }
      })
      .catch(function () {
        status.textContent = "Could not refresh (signed out, or the service is down): reload the page.";
      });
  }
  schedule();
})();
