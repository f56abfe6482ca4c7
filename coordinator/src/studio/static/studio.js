// The studio's few lines of JavaScript: confirmations, and a job page that follows
// its job (state, why, instances and log) over Server-Sent Events, without reloading.
"use strict";
document.addEventListener("submit", (event) => {
  const message = event.target.dataset.confirm;
  if (message && !window.confirm(message)) event.preventDefault();
});

function cell(row, text, href) {
  const td = row.insertCell();
  if (href) {
    const a = document.createElement("a");
    a.href = href;
    a.textContent = text;
    td.append(a);
  } else {
    td.textContent = text;
  }
}

document.addEventListener("DOMContentLoaded", () => {
  const log = document.getElementById("log");
  if (!log || !log.dataset.events) return;
  const byId = (id) => document.getElementById(id);
  const source = new EventSource(log.dataset.events);
  source.addEventListener("log", (e) => {
    const pinned = log.scrollTop + log.clientHeight >= log.scrollHeight - 4;
    log.append(document.createTextNode(JSON.parse(e.data)));
    if (pinned) log.scrollTop = log.scrollHeight;
  });
  source.addEventListener("status", (e) => {
    const job = JSON.parse(e.data);
    byId("job-status").textContent = job.status;
    byId("job-status").className = "state " + job.status;
    byId("job-reason").textContent = job.reason;
    if (byId("job-progress")) byId("job-progress").textContent = job.progress;
    byId("why").replaceChildren(...job.why.map((line) => {
      const li = document.createElement("li");
      li.textContent = line;
      return li;
    }));
    const rows = byId("instances").tBodies[0];
    rows.replaceChildren();
    for (const i of job.instances) {
      const row = rows.insertRow();
      cell(row, String(i.index));
      cell(row, i.node || "—", i.node ? "/studio/nodes/" + encodeURIComponent(i.node) : null);
      cell(row, i.status);
      cell(row, i.exit_code === null ? "—" : String(i.exit_code));
      cell(row, i.message);
    }
    if (job.final) {
      source.close();
      const cancel = byId("cancel");
      if (cancel) cancel.closest("form").remove();
    }
  });
});
