// The operator console: versions (promote, roll back), the learner live, feedback health, learning charts, events.
// The admin token is kept in sessionStorage: for this tab's session only.

import { ApiError, getJson, postJson } from "./api.js";
import { lineChart } from "./charts.js";

const $ = (id) => document.getElementById(id);
const TOKEN_STORE = "rankloop.adminToken";
const REFRESH_MS = 5000; // versions, learner, events
const SLOW_EVERY = 6; // history and feedback health every sixth refresh (30 s): they read the dataset and logs
const CHARTS = [
  ["rankings", "rankings received"],
  ["rm_accuracy", "reward model held-out accuracy"],
  ["ppo.reward", "PPO mean reward"],
  ["ppo.kl_per_answer", "KL to the reference per answer"],
  ["ppo.ptx_loss", "ptx loss"],
  ["ppo.answer_length", "answer length (tokens)"],
];

let current = null; // the current version as last shown
let timer = null;
let refreshes = 0;
let shownVersions = ""; // what the versions table was drawn from: redrawn only when it changes (focus stays)
let history = { win_rates: {}, win_labels: {} };

const token = () => sessionStorage.getItem(TOKEN_STORE);

function say(message, kind = "info") {
  $("status").textContent = message;
  $("status").dataset.kind = kind;
}

function when(seconds) {
  return seconds ? new Date(seconds * 1000).toLocaleString() : "";
}

function percent(value) {
  return typeof value === "number" && Number.isFinite(value) ? `${(100 * value).toFixed(1)}%` : "";
}

function number(value, digits = 2) {
  return typeof value === "number" && Number.isFinite(value) ? value.toFixed(digits) : "";
}

function cell(text, className = "") {
  const td = document.createElement("td");
  td.textContent = text;
  if (className) td.className = className;
  return td;
}

function figures(list, pairs) {
  const nodes = [];
  for (const [name, value] of pairs) {
    if (value === undefined || value === null || value === "") continue;
    const dt = document.createElement("dt");
    dt.textContent = name;
    const dd = document.createElement("dd");
    dd.textContent = String(value);
    nodes.push(dt, dd);
  }
  list.replaceChildren(...nodes);
}

// -- versions ---------------------------------------------------------------------------------------------------
function winRates(history) {
  const byVersion = new Map();
  for (const [preference, points] of Object.entries(history.win_rates || {})) {
    history.win_labels[preference].forEach((version, i) => {
      const said = `${percent(points[i][1])} (${preference})`;
      byVersion.set(version, byVersion.has(version) ? `${byVersion.get(version)}, ${said}` : said);
    });
  }
  return byVersion;
}

// The card's figure for each reading of agreement the gate can be set to (RANKLOOP_LEARN_AGREEMENT_BY).
const GATE_READS = { per_token: "agreement_per_token", sum: "agreement", reference: "agreement_reference" };

function versionRow(info, wins) {
  const details = info.card || {}; // the registry keeps a card's details as `card`
  const evaluation = details.eval || {};
  const before = evaluation.before || {};
  const after = evaluation.after || {};
  const agreement = details.agreement || {};
  const row = document.createElement("tr");
  row.dataset.version = info.version;
  const rewards = "reward" in after ? `${number(before.reward)} → ${number(after.reward)}` : "";
  const shares = "empty" in after ? `${percent(after.empty)} / ${percent(after.degenerate)}` : "";
  row.append(
    cell(info.version),
    cell(info.state, `state-${info.state}`),
    cell(info.parent || ""),
    cell(info.made_by),
    cell(when(info.created)),
    // The share the gate read (its card says which); older cards have the one a token, or the summed one only.
    cell(
      agreement.agreement_pairs
        ? `${percent(agreement[GATE_READS[details.agreement_by]] ?? agreement.agreement_per_token ?? agreement.agreement)} of ${agreement.agreement_pairs}`
        : "",
      "num",
    ),
    cell(rewards, "num"),
    cell(number(after.kl, 1), "num"),
    cell(shares, "num"),
    cell(wins.get(info.version) || ""),
  );
  const actions = document.createElement("td");
  if (info.state !== "current" && info.state !== "failed") {
    const button = document.createElement("button");
    button.type = "button";
    button.textContent = `Promote ${info.version}`;
    button.addEventListener("click", () => promote(info.version));
    actions.append(button);
  }
  if (info.error) actions.append(document.createTextNode(` ${info.error.slice(0, 200)}`));
  row.append(actions);
  return row;
}

async function loadVersions() {
  const listed = await getJson("/admin/versions", token());
  const drawn = JSON.stringify([listed, history.win_rates]);
  if (drawn === shownVersions) return;
  shownVersions = drawn;
  current = listed.current;
  $("current").textContent = listed.current || "none";
  $("epoch").textContent = String(listed.epoch);
  const wins = winRates(history);
  const rows = [...listed.versions].reverse().map((info) => versionRow(info, wins));
  $("versions").querySelector("tbody").replaceChildren(...rows);
  const targets = listed.versions.filter((v) => v.state !== "current" && v.state !== "failed").map((v) => v.version);
  $("target").replaceChildren(
    new Option("the previous version", ""),
    ...targets.reverse().map((v) => new Option(v, v)),
  );
}

// -- the learner, feedback, charts, events ----------------------------------------------------------------------
function showLearner(found) {
  const status = found.status;
  const progress = $("learner-progress");
  if (!status) {
    figures($("learner"), [["phase", "no learner has reported yet"]]);
    progress.hidden = true;
    return;
  }
  const last = status.last_round || {};
  figures($("learner"), [
    ["phase", status.phase],
    ["doing", status.detail],
    ["updated", when(status.updated)],
    ["last round", last.version ? `${last.version} ${last.outcome}` : last.outcome],
    ["its gate", last.gate],
  ]);
  progress.hidden = !status.iterations;
  if (status.iterations) {
    progress.max = status.iterations;
    progress.value = status.iteration || 0;
  }
}

function showFeedback(health) {
  const stream = health.stream;
  const memory = health.redis_memory;
  const mib = (bytes) => `${(bytes / 1024 ** 2).toFixed(1)} MiB`;
  figures($("feedback"), [
    ["rankings stored", health.dataset.ranking],
    ["demonstrations stored", health.dataset.demonstration],
    ["comparisons stored", health.comparisons],
    ["stream length", stream.max_backlog ? `${stream.length} of at most ${stream.max_backlog}` : stream.length],
    ["pending", stream.pending],
    ["lag", stream.lag],
    ["consumers", stream.consumers],
    ["Redis memory", memory.max_bytes ? `${mib(memory.used_bytes)} of ${mib(memory.max_bytes)}` : mib(memory.used_bytes)],
  ]);
  $("warnings").replaceChildren(
    ...health.warnings.map((w) => Object.assign(document.createElement("li"), { textContent: w })),
  );
}

function showCharts() {
  const series = (path) => path.split(".").reduce((node, key) => (node ? node[key] : undefined), history);
  const charts = [];
  for (const [path, title] of CHARTS) {
    const points = series(path);
    if (points && points.length) charts.push(lineChart(title, points));
  }
  for (const [preference, points] of Object.entries(history.win_rates || {})) {
    if (points.length) charts.push(lineChart(`win rate vs v0001 (${preference})`, points));
  }
  if (!charts.length) charts.push(Object.assign(document.createElement("p"), { textContent: "No rankings yet." }));
  $("charts").replaceChildren(...charts);
}

async function loadEvents() {
  const { events } = await getJson("/admin/events?newest=true&count=50", token());
  const rows = events
    .reverse()
    .map((e) => {
      const row = document.createElement("tr");
      row.append(cell(when(e.time)), cell(e.action), cell(e.version), cell(e.previous || ""), cell(e.who), cell(e.why));
      return row;
    });
  $("events").querySelector("tbody").replaceChildren(...rows);
}

async function loadSlow() {
  history = await getJson("/admin/history", token());
  showCharts();
  showFeedback(await getJson("/admin/feedback", token()));
}

async function loadFast() {
  showLearner(await getJson("/admin/learner", token()));
  await loadEvents();
}

// Every panel loads on its own: one that fails (say, an unreadable log) leaves the others, and promoting, working.
async function refresh() {
  const slow = refreshes++ % SLOW_EVERY === 0;
  const results = await Promise.allSettled([loadVersions(), loadFast(), slow ? loadSlow() : Promise.resolve()]);
  const refused = results.find((r) => r.status === "rejected" && [401, 403, 404].includes(r.reason.status));
  if (refused) {
    signOut(`Refused: ${refused.reason.message}`);
    return false;
  }
  const failed = results.find((r) => r.status === "rejected");
  if (failed) say(`Part of the console could not be loaded: ${failed.reason.message}`, "error");
  return true;
}

// The next refresh once this one is done (never two at once), and none while a dialog is open.
function schedule() {
  clearTimeout(timer);
  timer = setTimeout(async () => {
    if (!$("confirm").open) await refresh();
    if (!$("console").hidden) schedule();
  }, REFRESH_MS);
}

// -- promote and roll back --------------------------------------------------------------------------------------
function confirmDialog(text, withTarget) {
  return new Promise((resolve) => {
    const dialog = $("confirm");
    $("confirm-text").textContent = text;
    $("target-row").hidden = !withTarget;
    $("reason").value = "";
    dialog.returnValue = ""; // Escape closes with the last value otherwise: it must not confirm
    dialog.addEventListener(
      "close",
      () => {
        const reason = $("reason").value.trim();
        resolve(dialog.returnValue === "ok" && reason ? { reason, target: $("target").value } : null);
      },
      { once: true },
    );
    dialog.showModal();
  });
}

async function change(doing, url, body) {
  try {
    const { body: done } = await postJson(url, body, token());
    say(`${doing}: ${done.current} is now current (epoch ${done.epoch}).`);
  } catch (error) {
    if (error instanceof ApiError && error.status === 409) {
      say(`Someone else changed the current version meanwhile (${error.message}). The list is reloaded: check it and try again.`, "error");
    } else {
      say(`${doing} refused: ${error.message}`, "error");
    }
  }
  await refresh();
}

async function promote(version) {
  const seen = current; // the guard: what this operator saw when deciding, not what a refresh shows later
  const answer = await confirmDialog(`Promote ${version}? Every server will answer with it (now: ${seen}).`, false);
  if (!answer) return;
  await change(`Promoted ${version}`, "/admin/promote", { version, reason: answer.reason, who: "console", expected: seen });
}

async function rollback() {
  const seen = current;
  const answer = await confirmDialog(`Roll back from ${seen}?`, true);
  if (!answer) return;
  const body = { reason: answer.reason, who: "console", expected: seen };
  if (answer.target) body.version = answer.target;
  await change("Rolled back", "/admin/rollback", body);
}

// -- signing in -------------------------------------------------------------------------------------------------
function signOut(message) {
  sessionStorage.removeItem(TOKEN_STORE);
  clearTimeout(timer);
  shownVersions = "";
  refreshes = 0;
  $("console").hidden = true;
  $("signin").hidden = false;
  $("signout").hidden = true;
  say(message, "error");
}

async function open() {
  say("Loading…", "busy");
  if (!(await refresh())) return;
  $("signin").hidden = true;
  $("console").hidden = false;
  $("signout").hidden = false;
  if ($("status").dataset.kind !== "error") say("");
  schedule();
}

$("signin").addEventListener("submit", (event) => {
  event.preventDefault();
  sessionStorage.setItem(TOKEN_STORE, $("token").value.trim());
  open();
});
$("signout").addEventListener("click", () => signOut("Signed out."));
$("rollback").addEventListener("click", rollback);
$("confirm-cancel").addEventListener("click", () => $("confirm").close("cancel"));
if (token()) open();
