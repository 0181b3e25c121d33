// A run's page: its header and timeline, growing live over /ws
// (runs.subscribe for new records, runs.get_trace to catch up).
"use strict";

const TRUNCATED = "…[truncated]";
const runId = decodeURIComponent(location.pathname.slice("/runs/".length));
// The run's records by position (0: started).
const records = [];
let status = null;

async function load() {
  let subscribed;
  try {
    subscribed = await Car.call("runs.subscribe", { run_id: runId });
  } catch (error) {
    if (/unknown run/.test(error.message)) {
      document.getElementById("missing").hidden = false;
      return;
    }
    // Too large to follow live: read it, and read again later.
    await catchUp(Infinity);
    setTimeout(load, 2000);
    return;
  }
  status = subscribed.status;
  // The cursor counts turns: the snapshot also holds `started`, and `ended`
  // once the run is over.
  await catchUp(subscribed.cursor + (status === "in_progress" ? 1 : 2));
}

// Read the records from the last one held up to (not including) position `until`.
async function catchUp(until) {
  while (records.length < until) {
    const cursor = records.length;
    const page = await Car.call("runs.get_trace", { run_id: runId, cursor });
    if (page.not_found) {
      document.getElementById("missing").hidden = false;
      return;
    }
    if (!page.records.length) break;
    page.records.forEach((record, offset) => add(record, cursor + offset));
  }
  showHeader();
}

function onEvent(event) {
  if (event.run_id !== runId) return;
  // A turn event's cursor is the turns once it is in, so turn k (record
  // k + 1) comes with cursor k + 1; the ended event's cursor is unchanged.
  const position = event.record.record === "ended" ? event.cursor + 1 : event.cursor;
  status = event.status;
  if (position === records.length) {
    add(event.record, position);
    showHeader();
  } else if (position > records.length) {
    // Events were dropped: read what was missed.
    catchUp(position + 1).catch(() => {});
  }
}

// Add record `position` of the run, unless it is held already (a page read
// while events came in) or one before it is missing.
function add(record, position) {
  if (position !== records.length) return;
  records.push(record);
  if (record.record === "ended") status = statusOf(record);
  document.getElementById("timeline").append(entry(record));
}

function statusOf(ended) {
  return { outcome: "completed", incomplete: "incomplete", cancelled: "cancelled" }[ended.termination];
}

function showHeader() {
  const started = records[0];
  if (!started) return;
  const ended = records.find((record) => record.record === "ended");
  document.title = "car-twisted: " + started.intent;
  document.getElementById("intent").textContent = started.intent;
  document.getElementById("run-id").textContent = started.run_id;
  document.getElementById("agent").textContent = started.agent_id;
  const badge = document.getElementById("status");
  const shown = ended ? statusOf(ended) : status || "in_progress";
  badge.textContent = shown;
  badge.className = "status " + shown;
  badge.dataset.status = shown;
  document.getElementById("outcome").textContent = ended ? outcomeText(ended) : "";
  document.getElementById("duration").textContent = Car.duration(
    started.started_at,
    ended ? ended.ended_at : null
  );
  const metrics = document.getElementById("metrics");
  const values = ended && ended.outcome && ended.outcome.metrics ? ended.outcome.metrics : {};
  metrics.replaceChildren(
    ...Object.entries(values).map(([name, value]) => Car.element("span", name + " " + value, "metric"))
  );
}

function outcomeText(ended) {
  if (ended.termination === "outcome") {
    const outcome = ended.outcome || {};
    return outcome.summary ? outcome.status + ": " + outcome.summary : outcome.status;
  }
  if (ended.termination === "incomplete") return "incomplete: " + (ended.reason || "");
  return "cancelled";
}

const FIELDS = {
  started: ["intent", "outcome_description", "client_id"],
  turn: ["prompt", "tool", "parameters", "output", "cli_outcome", "verifier_verdict", "policy_rejected"],
  model_turn: ["model_id", "token_usage", "duration_ms", "turn_index", "assistant_text", "requested_tool_calls"],
  ended: ["termination", "reason", "outcome"],
};

function entry(record) {
  const item = Car.element("li", null, "entry " + record.record);
  item.dataset.record = record.record;
  const head = Car.element("div", null, "entry-head");
  head.append(Car.element("span", record.record.replace("_", " "), "kind"));
  if (record.index !== undefined) head.append(Car.element("span", "#" + record.index, "index"));
  const at = record.started_at || record.recorded_at || record.ended_at;
  head.append(Car.element("span", Car.time(at), "time"));
  item.append(head);
  const fields = Car.element("dl", null, "fields");
  for (const name of FIELDS[record.record] || []) {
    const value = record[name];
    if (value === undefined || value === null || value === "") continue;
    const text = typeof value === "string" ? value : JSON.stringify(value, null, 2);
    fields.append(Car.element("dt", name.replace(/_/g, " ")));
    const shown = Car.element("dd", null, typeof value === "string" ? "text" : "json");
    shown.append(Car.element("pre", text));
    if (text.includes(TRUNCATED)) shown.append(Car.element("span", "truncated", "truncated"));
    fields.append(shown);
  }
  item.append(fields);
  return item;
}

Car.start(() => load().catch(() => {}), onEvent);
setInterval(showHeader, 1000);
