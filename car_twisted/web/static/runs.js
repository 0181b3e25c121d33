// The runs page: every agent's runs, newest first, paged and filtered, with
// counts and a chart of the last hour. Refreshed over /ws every two seconds.
"use strict";

const PAGE_SIZE = 25;
const REFRESH_MS = 2000;
const CHART_REFRESH_MS = 5000;
// The chart reads at most CHART_PAGES pages of CHART_PAGE runs; a page of
// 50 summaries fits the smallest message limit even with 16 KiB intents.
const CHART_PAGE = 50;
const CHART_PAGES = 100;
const SVG = "http://www.w3.org/2000/svg";

const query = new URLSearchParams(location.search);
const filter = { agent: query.get("agent") || "", status: query.get("status") || "" };
// The cursor of each page seen so far; the last one is shown.
let cursors = [null];

function listParams(extra) {
  const params = Object.assign({}, extra);
  if (filter.agent) params.agent_id = filter.agent;
  return params;
}

async function refreshRuns() {
  const params = listParams({ limit: PAGE_SIZE });
  if (filter.status) params.status = filter.status;
  const cursor = cursors[cursors.length - 1];
  if (cursor !== null) params.cursor = cursor;
  const page = await Car.call("runs.list", params);
  const body = document.getElementById("runs");
  body.replaceChildren(...page.runs.map(runRow));
  document.getElementById("empty").hidden = page.runs.length > 0;
  const older = document.getElementById("older");
  older.disabled = page.next_cursor === null;
  older.dataset.cursor = page.next_cursor || "";
  document.getElementById("newer").disabled = cursors.length === 1;
}

function runRow(run) {
  const row = document.createElement("tr");
  row.dataset.runId = run.run_id;
  row.dataset.status = run.status;
  row.append(Car.element("td", Car.time(run.started_at), "time"));
  row.append(Car.element("td", run.agent_id));
  const intent = Car.element("td");
  const link = Car.element("a", run.intent);
  link.href = "/runs/" + encodeURIComponent(run.run_id);
  intent.append(link);
  row.append(intent);
  const status = Car.element("td");
  const shown = run.status.replace("_", " ");
  const label = run.outcome_status ? shown + " (" + run.outcome_status + ")" : shown;
  status.append(Car.element("span", label, "status " + run.status));
  row.append(status);
  row.append(Car.element("td", run.turn_count, "number"));
  row.append(Car.element("td", Car.time(run.ended_at), "time"));
  return row;
}

async function refreshChart() {
  const since = Date.now() - 3600 * 1000;
  const runs = [];
  let cursor = null;
  for (let n = 0; n < CHART_PAGES; n++) {
    const params = listParams({ limit: CHART_PAGE });
    if (cursor !== null) params.cursor = cursor;
    const page = await Car.call("runs.list", params);
    const recent = page.runs.filter((run) => Date.parse(run.started_at) >= since);
    runs.push(...recent);
    cursor = page.next_cursor;
    if (cursor === null || recent.length < page.runs.length) break;
  }
  drawCounts(runs);
  drawChart(runs, since);
}

function drawCounts(runs) {
  const counts = document.getElementById("counts");
  counts.replaceChildren(
    ...Car.statuses.map((status) => {
      const item = Car.element("li", null, "key " + status);
      item.dataset.status = status;
      item.append(Car.element("span", runs.filter((run) => run.status === status).length, "count"));
      item.append(Car.element("span", status.replace("_", " ")));
      return item;
    })
  );
}

function drawChart(runs, since) {
  const minutes = 60;
  const buckets = Array.from({ length: minutes }, () => ({}));
  for (const run of runs) {
    const minute = Math.min(minutes - 1, Math.floor((Date.parse(run.started_at) - since) / 60000));
    buckets[minute][run.status] = (buckets[minute][run.status] || 0) + 1;
  }
  const highest = Math.max(1, ...buckets.map((b) => Object.values(b).reduce((a, c) => a + c, 0)));
  const svg = document.getElementById("chart");
  const width = 600 / minutes;
  const height = 110;
  const bars = [];
  buckets.forEach((bucket, minute) => {
    let top = height;
    for (const status of Car.statuses) {
      const count = bucket[status] || 0;
      if (!count) continue;
      const tall = (count / highest) * (height - 10);
      top -= tall;
      const bar = document.createElementNS(SVG, "rect");
      bar.setAttribute("x", String(minute * width + 0.5));
      bar.setAttribute("y", String(top));
      bar.setAttribute("width", String(width - 1));
      bar.setAttribute("height", String(tall));
      bar.setAttribute("class", "bar " + status);
      const title = document.createElementNS(SVG, "title");
      title.textContent = count + " " + status + ", " + (minutes - minute) + " min ago";
      bar.append(title);
      bars.push(bar);
    }
  });
  const axis = document.createElementNS(SVG, "line");
  axis.setAttribute("x1", "0");
  axis.setAttribute("x2", "600");
  axis.setAttribute("y1", String(height));
  axis.setAttribute("y2", String(height));
  axis.setAttribute("class", "axis");
  const peak = document.createElementNS(SVG, "text");
  peak.setAttribute("x", "2");
  peak.setAttribute("y", "10");
  peak.setAttribute("class", "axis-label");
  peak.textContent = highest + "/min";
  svg.replaceChildren(axis, peak, ...bars);
}

function showFilter() {
  document.getElementById("agent").value = filter.agent;
  document.getElementById("status").value = filter.status;
}

function applyFilter(event) {
  event.preventDefault();
  filter.agent = document.getElementById("agent").value.trim();
  filter.status = document.getElementById("status").value;
  const search = new URLSearchParams();
  if (filter.agent) search.set("agent", filter.agent);
  if (filter.status) search.set("status", filter.status);
  history.replaceState(null, "", search.toString() ? "?" + search : "/");
  cursors = [null];
  refresh();
}

function refresh() {
  refreshRuns().catch(() => {});
  refreshChart().catch(() => {});
}

document.getElementById("filter").addEventListener("submit", applyFilter);
document.getElementById("older").addEventListener("click", (event) => {
  cursors.push(event.target.dataset.cursor);
  refreshRuns().catch(() => {});
});
document.getElementById("newer").addEventListener("click", () => {
  if (cursors.length > 1) cursors.pop();
  refreshRuns().catch(() => {});
});
showFilter();
Car.start(refresh);
setInterval(() => refreshRuns().catch(() => {}), REFRESH_MS);
setInterval(() => refreshChart().catch(() => {}), CHART_REFRESH_MS);
