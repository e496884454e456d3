// The chat-and-rank page: ask, watch K answers stream in side by side, rank them (keys or drag), optionally write a
// better one; the conversation then goes on from the answer ranked best.

import { ApiError, getJson, newKey, postJson, streamChat } from "./api.js";
import { Ranking } from "./ranking.js";

const $ = (id) => document.getElementById(id);
const KEY_STORE = "rankloop.apiKey";
const letters = "ABCDEFGHI";

const state = {
  config: null,
  history: [], // the conversation sent with each request: {role, content}
  round: null, // the comparison on screen: {id, texts, versions, done, ranking, rankKey, demoKey, submitted}
  busy: false,
};

function token() {
  return sessionStorage.getItem(KEY_STORE) || null;
}

function say(message, kind = "info") {
  const status = $("status");
  status.textContent = message;
  status.dataset.kind = kind;
}

const STORAGE_DOWN = ["redis_unavailable", "redis_full", "feedback_backlog"];

function explain(error, doing) {
  if (!(error instanceof ApiError) || error.status === 0) return `${doing} failed: ${error.message || error}`;
  if (STORAGE_DOWN.includes(error.code)) {
    return `${doing} failed: the server cannot store anything right now (${error.message}). Nothing was recorded; try again in a moment.`;
  }
  if (error.status === 429 || error.status === 503) {
    return `${doing} failed: ${error.message}. Nothing was recorded; try again in a moment.`;
  }
  return `${doing} failed: ${error.message}`;
}

// -- the conversation ---------------------------------------------------------------------------------------
function addTurn(role, text, note = "") {
  const item = document.createElement("li");
  item.className = `turn ${role}`;
  const who = document.createElement("span");
  who.className = "who";
  who.textContent = role === "user" ? "You" : `Assistant${note ? ` (${note})` : ""}`;
  const body = document.createElement("div");
  body.className = "text";
  body.textContent = text;
  item.append(who, body);
  $("conversation").append(item);
}

// -- the answers ----------------------------------------------------------------------------------------------
function answerCard(i) {
  const card = document.createElement("article");
  card.className = "answer streaming";
  card.id = `answer-${i}`;
  card.setAttribute("aria-label", `Answer ${i + 1}`);
  const head = document.createElement("h3");
  head.innerHTML = `<span class="key">${i + 1}</span> Answer ${letters[i]}<span class="version"></span>`;
  const text = document.createElement("div");
  text.className = "text";
  card.append(head, text);
  return card;
}

function onChunk(chunk) {
  const round = state.round;
  round.id = chunk.id;
  $("answers").dataset.comparison = chunk.id;
  for (const choice of chunk.choices) {
    round.versions[choice.index] = chunk.policy_version;
    const card = $(`answer-${choice.index}`);
    if (choice.delta && choice.delta.content) {
      round.texts[choice.index] += choice.delta.content;
      card.querySelector(".text").textContent = round.texts[choice.index];
    }
    if (choice.finish_reason) {
      card.classList.remove("streaming");
      card.dataset.finish = choice.finish_reason;
    }
    if (state.config.show_versions) card.querySelector(".version").textContent = ` · ${chunk.policy_version}`;
  }
}

async function ask(event) {
  event.preventDefault();
  const text = $("prompt").value.trim();
  if (!text || state.busy) return;
  const k = Number($("k").value) || state.config.default_n;
  if (k < 2 || k > state.config.max_n) {
    say(`Choose between 2 and ${state.config.max_n} answers to compare.`, "error");
    return;
  }
  state.busy = true;
  $("ask").disabled = true;
  const messages = [...state.history, { role: "user", content: text }];
  state.round = {
    id: null,
    texts: Array(k).fill(""),
    versions: Array(k).fill(null),
    ranking: new Ranking(k),
    rankKey: newKey(),
    demoKey: newKey(),
    submitted: false,
  };
  $("answers").replaceChildren(...Array.from({ length: k }, (_, i) => answerCard(i)));
  $("round").hidden = false;
  $("rank-panel").hidden = true;
  $("ranking-result").textContent = "";
  $("demo-result").textContent = "";
  $("demo-text").value = "";
  say(`Writing ${k} answers…`, "busy");
  try {
    await streamChat({ messages, n: k }, token(), onChunk);
    state.history = messages;
    addTurn("user", text);
    $("prompt").value = "";
    showRanking();
    say(`${k} answers written. Rank them, best first.`);
  } catch (error) {
    // Nothing to rank: a comparison the server did not store cannot take a ranking.
    $("round").hidden = true;
    state.round = null;
    say(explain(error, "Asking"), "error");
  } finally {
    state.busy = false;
    $("ask").disabled = false;
  }
}

// -- ranking ----------------------------------------------------------------------------------------------------
function snippet(i) {
  const text = state.round.texts[i].trim().replace(/\s+/g, " ");
  return text.length > 80 ? `${text.slice(0, 80)}…` : text || "(empty answer)";
}

function rankItem(i, position, tie) {
  const item = document.createElement("li");
  item.className = "rank-item";
  item.dataset.index = String(i);
  const label = document.createElement("span");
  label.className = "label";
  label.textContent = `Answer ${letters[i]}`;
  const text = document.createElement("span");
  text.className = "snippet";
  text.textContent = snippet(i);
  item.append(label, text);
  if (position !== null) {
    item.dataset.place = String(position);
    if (position > 0) {
      const button = document.createElement("button");
      button.type = "button";
      button.className = "tie";
      button.textContent = tie ? "tied with above" : "tie with above";
      button.setAttribute("aria-pressed", String(tie));
      button.addEventListener("click", () => change(() => state.round.ranking.toggleTie(i)));
      item.append(button);
    }
    if (tie) item.classList.add("tied");
  }
  return item;
}

function renderRanking() {
  const ranking = state.round.ranking;
  let place = 0;
  const ranked = ranking.ranked.map(({ index, tie }, position) => {
    if (!tie) place += 1;
    const item = rankItem(index, position, tie);
    item.querySelector(".label").textContent = `${place}. Answer ${letters[index]}`;
    return item;
  });
  $("ranked").replaceChildren(...ranked);
  $("unranked").replaceChildren(...ranking.unranked.map((i) => rankItem(i, null, false)));
  $("submit-ranking").disabled = !ranking.ready() || state.round.submitted;
  $("ranking-shown").textContent = ranking.ready() ? `Ranking: ${describe(ranking.tiers())}` : "";
}

function describe(tiers) {
  return tiers.map((tier) => tier.map((i) => letters[i]).join(" = ")).join(" > ");
}

function change(apply) {
  if (state.round && !state.round.submitted && apply()) renderRanking();
}

function showRanking() {
  $("rank-panel").hidden = false;
  renderRanking();
  $("rank-panel").focus();
}

function enableDragging() {
  if (!globalThis.Sortable) return; // without the library, keys and buttons still rank
  const read = (id) => Array.from($(id).children, (el) => Number(el.dataset.index));
  for (const list of ["ranked", "unranked"]) {
    globalThis.Sortable.create($(list), {
      group: "ranking",
      animation: 120,
      forceFallback: true, // pointer events: the same on mouse and touch
      filter: "button",
      preventOnFilter: false,
      onEnd: () => change(() => (state.round.ranking.reorder(read("ranked"), read("unranked")), true)),
    });
  }
}

async function submitRanking() {
  const round = state.round;
  if (!round || round.submitted || !round.ranking.ready()) return;
  $("submit-ranking").disabled = true;
  const body = { comparison_id: round.id, ranking: round.ranking.payload(), idempotency_key: round.rankKey };
  try {
    const { status, body: accepted } = await postJson("/v1/feedback", body, token());
    round.submitted = true;
    const again = status === 200 && accepted.duplicate;
    $("ranking-result").textContent = again
      ? `This ranking was submitted already (event ${accepted.id}).`
      : `Ranking submitted (event ${accepted.id}).`;
    say("Thank you. Ask a follow-up: the conversation goes on from the answer you ranked best.");
    const best = round.ranking.tiers()[0][0];
    state.history = [...state.history, { role: "assistant", content: round.texts[best] }];
    addTurn("assistant", round.texts[best], `answer ${letters[best]}, ranked best`);
    renderRanking();
  } catch (error) {
    if (error.status === 404) {
      say("This comparison has expired or is unknown to the server; ask again to get new answers.", "error");
    } else {
      say(explain(error, "Submitting the ranking"), "error"); // the same key: a retry is safe
      $("submit-ranking").disabled = false;
    }
  }
}

async function submitDemonstration() {
  const round = state.round;
  const answer = $("demo-text").value.trim();
  if (!round || !round.id) return;
  if (!answer) {
    say("Write your answer first.", "error");
    return;
  }
  $("submit-demo").disabled = true;
  try {
    const body = { comparison_id: round.id, answer, idempotency_key: round.demoKey };
    const { status, body: accepted } = await postJson("/v1/demonstrations", body, token());
    const again = status === 200 && accepted.duplicate;
    $("demo-result").textContent = again
      ? `This answer was sent already (event ${accepted.id}).`
      : `Your answer was saved (event ${accepted.id}).`;
  } catch (error) {
    say(explain(error, "Sending your answer"), "error");
  } finally {
    $("submit-demo").disabled = false;
  }
}

// Number keys pick, "=" ties, Backspace undoes, Enter submits; not while typing in a text field.
function onKey(event) {
  const round = state.round;
  if (!round || $("rank-panel").hidden || event.ctrlKey || event.metaKey || event.altKey) return;
  const target = event.target;
  if (target instanceof HTMLTextAreaElement || target instanceof HTMLInputElement) return;
  const digit = Number(event.key);
  if (Number.isInteger(digit) && digit >= 1 && digit <= round.texts.length) {
    change(() => round.ranking.pick(digit - 1));
  } else if (event.key === "=") {
    change(() => round.ranking.tieLast());
  } else if (event.key === "Backspace") {
    change(() => round.ranking.undo());
  } else if (event.key === "Enter" && !(target instanceof HTMLButtonElement)) {
    submitRanking();
  } else {
    return;
  }
  event.preventDefault();
}

async function start() {
  try {
    state.config = await getJson("/ui/config");
  } catch (error) {
    say(explain(error, "Loading the page"), "error");
    return;
  }
  $("k").value = String(Math.max(2, state.config.default_n));
  $("k").max = String(state.config.max_n);
  if (state.config.auth === "keys") {
    $("key-label").hidden = false;
    $("api-key").value = token() || "";
    $("api-key").addEventListener("change", () => sessionStorage.setItem(KEY_STORE, $("api-key").value.trim()));
  }
  $("ask-form").addEventListener("submit", ask);
  $("prompt").addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey) {
      event.preventDefault(); // Enter sends, Shift+Enter starts a new line
      $("ask-form").requestSubmit();
    }
  });
  enableDragging();
  $("submit-ranking").addEventListener("click", submitRanking);
  $("submit-demo").addEventListener("click", submitDemonstration);
  document.addEventListener("keydown", onKey);
  say("Ask anything; you will get several answers to rank.");
}

start();
