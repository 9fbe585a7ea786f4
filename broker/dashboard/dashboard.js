// jobbroker's dashboard: fetches /api/overview every few seconds and redraws the tables.
// Everything from the broker goes into the page as text (textContent), never as markup.
"use strict";

const REFRESH_MS = Number(new URLSearchParams(location.search).get("refresh")) || 2000;

function cell(text, field) {
  const td = document.createElement("td");
  td.textContent = text;
  if (field) td.dataset.field = field;
  return td;
}

function fillTable(id, items, makeRow) {
  const body = document.querySelector(`#${id} tbody`);
  body.replaceChildren(...items.map(makeRow));
  document.getElementById(`${id}-empty`).hidden = items.length > 0;
}

function number(value) {
  return Number(value).toLocaleString("en-US");
}

function seconds(value) {
  if (value < 60) return `${value.toFixed(1)} s`;
  if (value < 3600) return `${Math.floor(value / 60)} min ${Math.round(value % 60)} s`;
  return `${Math.floor(value / 3600)} h ${Math.floor((value % 3600) / 60)} min`;
}

// A queue's controls: "paused", "max 2" (held at once), "20/s"; "-" when none is set.
function controls(q) {
  const parts = [];
  if (q.paused) parts.push("paused");
  if (q.concurrency != null) parts.push(`max ${q.concurrency}`);
  if (q.rate != null) parts.push(`${q.rate}/s`);
  return parts.join(" ") || "-";
}

function queueRow([name, q]) {
  const tr = document.createElement("tr");
  tr.dataset.queue = name;
  tr.append(
    cell(name, "name"),
    cell(number(q.pending), "pending"),
    cell(number(q.waiting), "waiting"),
    cell(number(q.delayed), "delayed"),
    cell(number(q.in_flight), "in_flight"),
    cell(number(q.dead), "dead"),
    cell(number(q.done), "done"),
    cell(number(q.failed), "failed"),
    cell(q.submitted_per_second.toFixed(1), "submitted_per_second"),
    cell(q.done_per_second.toFixed(1), "done_per_second"),
    cell(number(q.workers), "workers"),
    cell(controls(q), "controls"),
  );
  if (q.dead > 0) tr.classList.add("has-dead");
  return tr;
}

function runningJob(job) {
  const div = document.createElement("div");
  div.className = "job";
  div.dataset.job = job.id;
  const label = document.createElement("span");
  // A job in the worker's prefetch buffer has not started: it is waiting, not running.
  label.textContent = job.started === false
    ? `#${job.id} ${job.queue}, waiting in the worker's buffer`
    : `#${job.id} ${job.queue}, ${seconds(job.running_seconds)}`;
  if (job.started === false) div.classList.add("buffered");
  div.append(label);
  if (job.progress) {
    const bar = document.createElement("progress");
    bar.max = 1;
    bar.value = job.progress.fraction;
    const message = document.createElement("span");
    message.className = "message";
    message.textContent = `${Math.round(job.progress.fraction * 100)}% ${job.progress.message}`;
    div.append(bar, message);
  }
  return div;
}

function workerRow(w) {
  const tr = document.createElement("tr");
  tr.dataset.session = w.session;
  const running = cell("", "running");
  running.append(...w.running.map(runningJob));
  const late = w.last_heartbeat_age > 10;
  const heartbeat = cell(`${seconds(w.last_heartbeat_age)} ago`, "last_heartbeat");
  if (late) heartbeat.classList.add("late");
  tr.append(
    cell(w.session, "session"),
    cell(w.name, "name"),
    cell(w.peer, "peer"),
    cell(w.queues.join(", "), "queues"),
    cell(number(w.in_flight), "in_flight"),
    heartbeat,
    running,
  );
  return tr;
}

function deadRow(job) {
  const tr = document.createElement("tr");
  tr.dataset.job = job.id;
  const error = cell("", "error");
  const pre = document.createElement("pre");
  pre.textContent = job.error ? `${job.error.type}: ${job.error.message}` : "";
  error.append(pre);
  if (job.error && job.error.traceback) {
    const details = document.createElement("details");
    const summary = document.createElement("summary");
    summary.textContent = "traceback";
    const trace = document.createElement("pre");
    trace.className = "traceback";
    trace.textContent = job.error.traceback;
    details.append(summary, trace);
    error.append(details);
  }
  tr.append(cell(job.queue, "queue"), cell(job.id, "id"), cell(`${job.attempts}/${job.max_attempts}`, "attempts"), error);
  return tr;
}

function totals(data) {
  const queues = Object.values(data.queues);
  const sum = (key) => queues.reduce((total, q) => total + q[key], 0);
  const figures = [
    ["pending", number(sum("pending"))],
    ["in flight", number(sum("in_flight"))],
    ["dead", number(sum("dead"))],
    ["done/s", sum("done_per_second").toFixed(1)],
    ["workers", number(data.workers.length)],
    ["connections", number(data.broker.sessions)],
  ];
  document.getElementById("totals").replaceChildren(
    ...figures.map(([name, value]) => {
      const div = document.createElement("div");
      div.className = "figure";
      div.dataset.field = name;
      const strong = document.createElement("strong");
      strong.textContent = value;
      const small = document.createElement("small");
      small.textContent = name;
      div.append(strong, small);
      return div;
    }),
  );
}

function render(data) {
  const b = data.broker;
  document.getElementById("broker").textContent =
    `${b.address}, ${b.durable ? "durable" : "in memory"}, up ${seconds(b.uptime_seconds)}, version ${b.version}`;
  document.getElementById("draining").hidden = !b.draining;
  totals(data);
  fillTable("queues", Object.entries(data.queues).sort(([a], [b]) => a.localeCompare(b)), queueRow);
  fillTable("workers", data.workers, workerRow);
  fillTable("dead", data.dead, deadRow);
}

function setStatus(text, failing) {
  const status = document.getElementById("status");
  status.textContent = text;
  status.classList.toggle("failing", failing);
}

async function refresh() {
  try {
    const response = await fetch("api/overview", { cache: "no-store", credentials: "same-origin" });
    if (response.status === 401) {
      location.assign("login");
      return;
    }
    if (!response.ok) throw new Error(`HTTP ${response.status}`);
    render(await response.json());
    setStatus(`updated ${new Date().toLocaleTimeString()}`, false);
  } catch (error) {
    setStatus(`cannot reach the broker (${error.message}); retrying`, true);
  }
  setTimeout(refresh, REFRESH_MS);
}

if (document.body.classList.contains("login")) {
  document.getElementById("failed").hidden = !new URLSearchParams(location.search).has("failed");
} else {
  refresh();
}
