// The chat-and-rank page: ask, watch K answers stream in side by side, rank them (keys, buttons or drag), optionally
// write a better one; the conversation then goes on from the answer ranked best.

import { ApiError, getJson, newKey, postJson, streamChat } from "./api.js";
import { Ranking } from "./ranking.js";

const $ = (id) => document.getElementById(id);
const KEY_STORE = "rankloop.apiKey";
const letters = "ABCDEFGHI";
const STORAGE_DOWN = ["redis_unavailable", "redis_full", "feedback_backlog"];
// Keys typed here belong to the control, not to the ranking.
const OWN_KEYS = "a, button, summary, select, input, textarea, [contenteditable]";

const state = {
  config: null,
  history: [], // the conversation so far, as sent with the next request: {role, content}
  round: null, // the comparison on screen (see ask)
  busy: false,
  sortables: [],
};

function token() {
  return sessionStorage.getItem(KEY_STORE) || null;
}

function say(message, kind = "info") {
  const status = $("status");
  status.textContent = message;
  status.dataset.kind = kind;
}

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
  return item;
}

// A question whose answers were never ranked is not part of the conversation the next request carries.
function leaveOut(round) {
  if (!round || round.phase === "sent" || !round.turn) return;
  round.turn.classList.add("left-out");
  round.turn.querySelector(".who").textContent = "You (not ranked: left out of the conversation)";
}

function newConversation() {
  if (state.busy) return;
  state.history = [];
  state.round = null;
  $("conversation").replaceChildren();
  $("round").hidden = true;
  say("A new conversation: ask anything.");
  $("prompt").focus();
}

// -- the answers ----------------------------------------------------------------------------------------------
function answerCard(i) {
  const card = document.createElement("article");
  card.className = "answer streaming";
  card.id = `answer-${i}`;
  card.setAttribute("aria-label", `Answer ${letters[i]}`);
  const head = document.createElement("h3");
  const key = Object.assign(document.createElement("span"), { className: "key", textContent: String(i + 1) });
  const version = Object.assign(document.createElement("span"), { className: "version" });
  head.append(key, ` Answer ${letters[i]}`, version);
  const text = Object.assign(document.createElement("div"), { className: "text" });
  card.append(head, text);
  return card;
}

function onChunk(chunk) {
  const round = state.round;
  round.id = chunk.id;
  $("answers").dataset.comparison = chunk.id;
  for (const choice of chunk.choices) {
    const card = $(`answer-${choice.index}`);
    if (choice.delta && choice.delta.content) {
      round.texts[choice.index] += choice.delta.content;
      card.querySelector(".text").textContent = round.texts[choice.index];
    }
    if (choice.finish_reason) {
      card.classList.remove("streaming");
      card.dataset.finish = choice.finish_reason;
      if (choice.finish_reason === "abort") round.aborted = true;
    }
    if (state.config.show_versions) {
      // A canary's comparison mixes versions: each choice names its own on its first chunk.
      card.dataset.writer = choice.policy_version || card.dataset.writer || chunk.policy_version;
      card.querySelector(".version").textContent = ` · ${card.dataset.writer}`;
    }
  }
}

function chosenK() {
  const k = Number($("k").value);
  return Number.isInteger(k) && k >= 2 && k <= state.config.max_n ? k : null;
}

async function ask(event) {
  event.preventDefault();
  const text = $("prompt").value.trim();
  if (!text || state.busy) return;
  const k = chosenK();
  if (k === null) {
    say(`Choose a whole number of answers to compare, from 2 to ${state.config.max_n}.`, "error");
    return;
  }
  leaveOut(state.round);
  const messages = [...state.history, { role: "user", content: text }];
  state.round = {
    id: null,
    messages,
    texts: Array(k).fill(""),
    ranking: new Ranking(k),
    rankKey: newKey(),
    demoKey: newKey(),
    phase: "streaming", // then "ranking", "sending", "sent" or "closed" (expired, refused for good)
    attempted: false, // a submission went out: the ranking no longer changes, so a retry is the same request
    aborted: false,
    turn: null,
  };
  $("answers").replaceChildren(...Array.from({ length: k }, (_, i) => answerCard(i)));
  $("round").hidden = false;
  $("rank-panel").hidden = true;
  for (const id of ["ranking-result", "demo-result"]) $(id).textContent = "";
  $("demo-text").value = "";
  say(`Writing ${k} answers…`, "busy");
  try {
    state.busy = true;
    $("ask").disabled = true;
    await streamChat({ messages, n: k }, token(), onChunk);
    if (state.round.aborted) {
      throw new ApiError(503, "a new version went live while the answers were written, so they were cut short and cannot be ranked; ask again");
    }
    state.round.turn = addTurn("user", text);
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

function smallButton(text, label, pressed, onClick) {
  const button = Object.assign(document.createElement("button"), { type: "button", className: "tie", textContent: text });
  button.setAttribute("aria-label", label);
  if (pressed !== null) button.setAttribute("aria-pressed", String(pressed));
  button.disabled = !editable();
  button.addEventListener("click", onClick);
  return button;
}

function rankItem(i, place, position, tie) {
  const item = document.createElement("li");
  item.className = "rank-item";
  item.dataset.index = String(i);
  const label = document.createElement("span");
  label.className = "label";
  label.textContent = place === null ? `Answer ${letters[i]}` : `${place}. Answer ${letters[i]}`;
  const text = Object.assign(document.createElement("span"), { className: "snippet", textContent: snippet(i) });
  item.append(label, text);
  if (place === null) {
    item.append(smallButton("rank next", `Rank answer ${letters[i]} next`, null, () => change((r) => r.pick(i))));
  } else if (position > 0) {
    const said = tie ? "tied with above" : "tie with above";
    const name = `Tie answer ${letters[i]} with the one above`;
    item.append(smallButton(said, name, tie, () => change((r) => r.toggleTie(i))));
  }
  if (tie) item.classList.add("tied");
  return item;
}

function editable() {
  const round = state.round;
  return Boolean(round) && round.phase === "ranking" && !round.attempted;
}

function renderRanking() {
  const round = state.round;
  const ranking = round.ranking;
  let place = 0;
  const ranked = ranking.ranked.map(({ index, tie }, position) => {
    if (!tie) place += 1;
    return rankItem(index, place, position, tie);
  });
  $("ranked").replaceChildren(...ranked);
  $("unranked").replaceChildren(...ranking.unranked.map((i) => rankItem(i, null, 0, false)));
  $("submit-ranking").disabled = !ranking.ready() || round.phase !== "ranking";
  $("ranking-shown").textContent = ranking.ready() ? `Ranking: ${describe(ranking.tiers())}` : "";
  for (const sortable of state.sortables) sortable.option("disabled", !editable());
}

function describe(tiers) {
  return tiers.map((tier) => tier.map((i) => letters[i]).join(" = ")).join(" > ");
}

function change(apply) {
  if (!editable()) {
    if (state.round && state.round.attempted && state.round.phase === "ranking") {
      say("This ranking was sent once already: it is retried as it is. Ask again for new answers.", "error");
    }
    if (state.round) renderRanking(); // undo what a drag moved on screen
    return;
  }
  if (apply(state.round.ranking)) renderRanking();
}

function showRanking() {
  state.round.phase = "ranking";
  $("rank-panel").hidden = false;
  renderRanking();
  $("rank-panel").focus();
}

function enableDragging() {
  if (!globalThis.Sortable) return; // without the library, keys and buttons still rank
  const read = (id) => Array.from($(id).children, (el) => Number(el.dataset.index));
  state.sortables = ["ranked", "unranked"].map((list) =>
    globalThis.Sortable.create($(list), {
      group: "ranking",
      animation: 120,
      handle: ".label", // the rest of an answer scrolls the page on a phone
      delay: 150,
      delayOnTouchOnly: true,
      forceFallback: true, // pointer events: the same on mouse and touch
      onEnd: () => change((ranking) => (ranking.reorder(read("ranked"), read("unranked")), true)),
    }),
  );
}

function bestOf(payload) {
  const first = payload[0];
  return Array.isArray(first) ? first[0] : first;
}

async function submitRanking() {
  const round = state.round;
  if (!round || round.phase !== "ranking" || !round.ranking.ready()) return;
  round.phase = "sending";
  round.attempted = true;
  renderRanking();
  const payload = round.ranking.payload();
  const body = { comparison_id: round.id, ranking: payload, idempotency_key: round.rankKey };
  try {
    const { status, body: accepted } = await postJson("/v1/feedback", body, token());
    round.phase = "sent";
    const again = status === 200 && accepted.duplicate;
    $("ranking-result").textContent = again
      ? `This ranking was submitted already (event ${accepted.id}).`
      : `Ranking submitted (event ${accepted.id}).`;
    say("Thank you. Ask a follow-up: the conversation goes on from the answer you ranked best.");
    const best = bestOf(payload);
    state.history = [...round.messages, { role: "assistant", content: round.texts[best] }];
    addTurn("assistant", round.texts[best], `answer ${letters[best]}, ranked best`);
  } catch (error) {
    if (error.status === 404) {
      round.phase = "closed";
      say("This comparison has expired or is unknown to the server; ask again to get new answers.", "error");
    } else if (error.status === 409 || error.status === 400 || error.status === 403) {
      round.phase = "closed"; // refused for good: sending it again cannot change that
      say(`The ranking was not recorded: ${error.message}`, "error");
    } else {
      round.phase = "ranking"; // the same request (same key) may be retried
      say(explain(error, "Submitting the ranking"), "error");
    }
  }
  renderRanking();
}

async function submitDemonstration() {
  const round = state.round;
  const answer = $("demo-text").value.trim();
  if (!round || !round.id || round.demoSending) return;
  if (!answer) {
    say("Write your answer first.", "error");
    return;
  }
  round.demoSending = true;
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
    round.demoSending = false;
    $("submit-demo").disabled = false;
  }
}

// Number keys pick, "=" ties, Backspace undoes, Enter submits; not while a control has the key.
function onKey(event) {
  const round = state.round;
  if (!round || $("rank-panel").hidden || event.ctrlKey || event.metaKey || event.altKey) return;
  if (event.target instanceof Element && event.target.closest(OWN_KEYS)) return;
  const digit = Number(event.key);
  if (Number.isInteger(digit) && digit >= 1 && digit <= round.texts.length) {
    change((ranking) => ranking.pick(digit - 1));
  } else if (event.key === "=") {
    change((ranking) => ranking.tieLast());
  } else if (event.key === "Backspace") {
    change((ranking) => ranking.undo());
  } else if (event.key === "Enter") {
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
    if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
      event.preventDefault(); // Enter sends, Shift+Enter starts a new line
      $("ask-form").requestSubmit();
    }
  });
  $("demo-text").addEventListener("input", () => {
    if (state.round) state.round.demoKey = newKey(); // another text, another demonstration; the same text, a retry
  });
  $("new-conversation").addEventListener("click", newConversation);
  enableDragging();
  $("submit-ranking").addEventListener("click", submitRanking);
  $("submit-demo").addEventListener("click", submitDemonstration);
  document.addEventListener("keydown", onKey);
  say("Ask anything; you will get several answers to rank.");
}

start();
