// The A/B arena page: no build step, no dependencies. Talks to the same server it was served from.
"use strict";

const $ = (id) => document.getElementById(id);
const SIDES = ["A", "B"];
let battleId = null;
let finished = new Set();

async function api(path, body) {
  const res = await fetch(path, body === undefined ? {} : {
    method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body),
  });
  if (!res.ok) {
    let msg = res.status + " " + res.statusText;
    try { msg = (await res.json()).error.message; } catch (e) { /* not JSON */ }
    throw new Error(msg);
  }
  return res;
}

function setStatus(text) { $("status").textContent = text; }
function setVoting(on) { for (const id of ["vote-A", "vote-tie", "vote-B"]) $(id).disabled = !on; }

async function loadModels() {
  const models = (await (await api("/v1/models")).json()).data;
  const arena = await (await api("/v1/arena/config")).json();
  for (const [i, sel] of [[0, $("recipe-1")], [1, $("recipe-2")]]) {
    sel.innerHTML = "";
    const any = new Option("(random)", "");
    sel.add(any);
    for (const m of models) sel.add(new Option(m.id + (m.kind === "source" ? " (source)" : ""), m.id));
    const recipes = models.filter((m) => m.kind === "recipe");
    const pick = arena.featured ? { id: arena.featured[i] } : (recipes.length >= 2 ? recipes : models)[i];
    if (pick) sel.value = pick.id;
  }
  showExamples(arena.examples);
}

// Example prompts of the form the served models understand: a click puts one in the prompt box.
function showExamples(examples) {
  const box = $("examples");
  box.innerHTML = "";
  box.hidden = examples.length === 0;
  if (!examples.length) return;
  box.appendChild(document.createTextNode("Try: "));
  for (const text of examples) {
    const b = document.createElement("button");
    b.type = "button";
    b.className = "example";
    b.textContent = text;
    b.addEventListener("click", () => { $("prompt").value = text; $("prompt").focus(); });
    box.appendChild(b);
  }
}

async function loadBoard(rows) {
  if (rows === undefined) rows = (await (await api("/v1/leaderboard")).json()).data;
  const body = $("leaderboard").querySelector("tbody");
  body.innerHTML = "";
  rows.forEach((r, i) => {
    const tr = document.createElement("tr");
    tr.dataset.recipe = r.recipe;
    for (const v of [i + 1, r.recipe, r.rating.toFixed(1), (100 * r.win_rate).toFixed(0) + "%", r.wins, r.losses,
                     r.ties, r.games]) {
      const td = document.createElement("td");
      td.textContent = v;
      tr.appendChild(td);
    }
    body.appendChild(tr);
  });
}

// Parse a server-sent-events body, calling onEvent(obj) for every JSON `data:` line.
async function readEvents(res, onEvent) {
  const reader = res.body.getReader();
  const dec = new TextDecoder();
  let buf = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buf += dec.decode(value, { stream: true });
    let cut;
    while ((cut = buf.indexOf("\n\n")) >= 0) {
      const block = buf.slice(0, cut);
      buf = buf.slice(cut + 2);
      for (const line of block.split("\n")) {
        if (!line.startsWith("data: ")) continue;
        const data = line.slice(6);
        if (data === "[DONE]") return;
        onEvent(JSON.parse(data));
      }
    }
  }
}

async function run() {
  const prompt = $("prompt").value.trim();
  if (!prompt) { setStatus("Type a prompt first."); return; }
  const picked = [$("recipe-1").value, $("recipe-2").value];
  const body = {
    prompt, chat: $("chat").checked,
    max_tokens: parseInt($("max-tokens").value, 10) || 32,
    temperature: parseFloat($("temperature").value) || 0,
  };
  if (picked[0] && picked[1]) body.recipes = picked;
  battleId = null;
  finished = new Set();
  setVoting(false);
  for (const s of SIDES) { $("out-" + s).textContent = ""; $("stats-" + s).textContent = ""; $("name-" + s).textContent = ""; }
  $("run").disabled = true;
  setStatus("Generating…");
  try {
    const res = await api("/v1/arena/battles", body);
    await readEvents(res, (ev) => {
      if (ev.type === "battle") battleId = ev.battle_id;
      else if (ev.type === "delta") $("out-" + ev.side).textContent += ev.text;
      else if (ev.type === "done") {
        finished.add(ev.side);
        $("stats-" + ev.side).textContent =
          `${ev.completion_tokens} tokens · ${ev.latency_s.toFixed(2)} s · ${ev.tokens_per_s.toFixed(1)} tok/s · ${ev.finish_reason}`;
      } else if (ev.type === "error") {
        finished.add(ev.side);
        $("stats-" + ev.side).textContent = "error: " + ev.error.message;
      }
    });
    setStatus(finished.size === 2 ? "Which answer is better?" : "Stream ended early.");
    setVoting(battleId !== null && finished.size === 2);
  } catch (e) {
    setStatus("Error: " + e.message);
  } finally {
    $("run").disabled = false;
  }
}

async function vote(winner) {
  if (!battleId) return;
  setVoting(false);
  try {
    const res = await (await api("/v1/arena/votes", { battle_id: battleId, winner })).json();
    for (const s of SIDES) $("name-" + s).textContent = res.recipes[s];
    setStatus(winner === "tie" ? "Recorded a tie." : `Recorded: ${winner} (${res.recipes[winner]}) wins.`);
    battleId = null;
    await loadBoard(res.leaderboard);
  } catch (e) {
    setStatus("Error: " + e.message);
  }
}

$("run").addEventListener("click", run);
$("prompt").addEventListener("keydown", (e) => { if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) run(); });
$("vote-A").addEventListener("click", () => vote("A"));
$("vote-B").addEventListener("click", () => vote("B"));
$("vote-tie").addEventListener("click", () => vote("tie"));
Promise.all([loadModels(), loadBoard()])
  .then(() => setStatus("Ready."))
  .catch((e) => setStatus("Error: " + e.message));
