// editlab playground page: every action is one call to the JSON API (/docs).
"use strict";
const $ = (id) => document.getElementById(id);
const lines = (id) => $(id).value.split("\n").map((s) => s.trim()).filter(Boolean);
let hparamTypes = {};
let lastProbes = [];

async function api(path, body) {
  const opts = body === undefined ? {} : { method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body) };
  const res = await fetch("/api/" + path, opts);
  const data = await res.json().catch(() => ({ error: `HTTP ${res.status}` }));
  if (!res.ok) {
    const msg = data.error || (Array.isArray(data.detail) ? data.detail.map((d) => `${d.loc.slice(-1)[0]}: ${d.msg}`).join("; ") : `HTTP ${res.status}`);
    throw new Error(msg);
  }
  return data;
}

function showError(err) { $("error").textContent = err ? String(err.message || err) : ""; $("error").hidden = !err; }
function fmt(p) { return p === undefined || p === null ? "—" : p < 0.001 ? p.toExponential(1) : p.toFixed(3); }
// a token as text, with escapes for control characters and a visible mark for a whitespace-only token
function tok(t) {
  const s = document.createElement("span");
  s.className = "tok";
  s.textContent = t.trim() ? JSON.stringify(t).slice(1, -1) : t.replace(/ /g, "\u2423").replace(/\n/g, "\u21b5") || "\u2205";
  return s;
}
function cell(tr, content, cls) {
  const td = tr.insertCell();
  if (cls) td.className = cls;
  if (content instanceof Node) td.appendChild(content); else td.textContent = content;
  return td;
}

async function busy(label, fn) {
  const buttons = document.querySelectorAll("button");
  buttons.forEach((b) => (b.disabled = true));
  showError(null);
  $("status").textContent = label + "…";
  const poll = setInterval(async () => {
    try {
      const s = await api("status");
      if (s.busy) {
        const p = s.progress;
        $("status").textContent = `${s.activity}… ${s.seconds} s` +
          (p && p.total ? ` — ${p.task}: ${Math.floor((100 * p.done) / p.total)} % (computed once, then cached)` : "");
      }
    } catch (e) { /* keep polling */ }
  }, 500);
  try { return await fn(); } catch (e) { showError(e); } finally {
    clearInterval(poll);
    buttons.forEach((b) => (b.disabled = false));
    $("status").textContent = "";
  }
}

function probesFromForm() {
  return [...lines("paraphrases").map((p) => ({ prompt: p, kind: "paraphrase" })),
          ...lines("neighbours").map((p) => ({ prompt: p, kind: "neighbour" })),
          ...lines("free").map((p) => ({ prompt: p, kind: "free" }))];
}

function hparamsFromForm() {
  const out = {};
  for (const input of $("hparams").querySelectorAll("input")) {
    const name = input.name, type = hparamTypes[name];
    if (input.value === input.dataset.default && input.type !== "checkbox") continue;
    if (type === "bool") { if (input.checked !== (input.dataset.default === "true")) out[name] = input.checked; continue; }
    if (type === "int" || type === "float") {
      if (input.value.trim() === "" || !Number.isFinite(Number(input.value))) throw new Error(`hyper-parameter ${name}: ${JSON.stringify(input.value)} is not a number`);
      out[name] = Number(input.value);
    } else if (type === "str") {
      out[name] = input.value;
    } else {  // lists, tuples, mappings, null defaults: JSON
      try { out[name] = JSON.parse(input.value); } catch (e) { throw new Error(`hyper-parameter ${name}: not valid JSON (${input.value})`); }
    }
  }
  return out;
}

async function loadHparams() {
  const m = $("method").value;
  const data = await api(`methods/${encodeURIComponent(m)}/hparams`);
  hparamTypes = data.types;
  const box = $("hparams");
  box.replaceChildren();
  for (const [name, value] of Object.entries(data.hparams)) {
    const label = document.createElement("label");
    label.textContent = name;
    const input = document.createElement("input");
    input.name = name;
    if (data.types[name] === "bool") { input.type = "checkbox"; input.checked = value; input.dataset.default = String(value); }
    else { input.value = typeof value === "object" ? JSON.stringify(value) : String(value); input.dataset.default = input.value; }
    label.appendChild(input);
    box.appendChild(label);
  }
}

function renderTop(id, row) {
  const t = $(id);
  t.replaceChildren();
  for (const [token, p] of row.top) { const tr = t.insertRow(); cell(tr, tok(token)); cell(tr, fmt(p), "num"); }
}

function renderReport(r) {
  const after = r.after, before = r.before || [];
  renderTop("after-top", after[0]);
  $("after-cont").textContent = after[0].continuation || "";
  if (before.length) { renderTop("before-top", before[0]); $("before-cont").textContent = before[0].continuation || ""; }
  else { $("before-top").replaceChildren(); $("before-cont").textContent = "(no edit applied)"; }
  const body = $("probes").tBodies[0];
  body.replaceChildren();
  after.forEach((a, i) => {
    const b = before[i];
    const tr = body.insertRow();
    if (a.moved && (a.kind === "neighbour" || a.kind === "free")) tr.className = "moved";
    cell(tr, a.kind);
    cell(tr, a.prompt);
    const top = (x) => { const s = document.createElement("span"); if (!x) { s.textContent = "—"; return s; } s.append(tok(x.top[0][0]), " " + fmt(x.top[0][1])); return s; };
    cell(tr, top(b));
    cell(tr, top(a));
    cell(tr, `${fmt(b && b.p_new)} → ${fmt(a.p_new)}`, "num");
    cell(tr, a.tv === undefined ? "—" : a.tv.toFixed(3), "num");
  });
}

function renderStack(stack) {
  const ol = $("stack");
  ol.replaceChildren();
  for (const e of stack) {
    const li = document.createElement("li");
    li.textContent = `${e.method}: ${e.prompt} → ${e.target_new}` + (e.target_true ? ` (was ${e.target_true})` : "");
    ol.appendChild(li);
  }
  if (!stack.length) { const li = document.createElement("li"); li.className = "muted"; li.textContent = "no edits"; ol.appendChild(li); }
}

$("method").addEventListener("change", () => busy("loading hyper-parameters", async () => {
  $("method-help").textContent = $("method").selectedOptions[0].title;
  await loadHparams();
}));

$("apply").addEventListener("click", () => busy("applying", async () => {
  lastProbes = probesFromForm();
  const r = await api("edit", {
    method: $("method").value, prompt: $("prompt").value, subject: $("subject").value, target: $("target").value,
    target_true: $("target-true").value || null, hparams: hparamsFromForm(), probes: lastProbes,
    extend: $("extend").value === "" ? null : $("extend").value === "true",
  });
  renderReport(r);
  renderStack(r.stack);
  $("status").textContent = `applied in ${r.seconds} s` + (r.extended ? ", extending the newest edit" : "") +
    (r.not_extended ? ` as a new edit (could not extend the newest: ${r.not_extended})` : "");
}));

$("probe").addEventListener("click", () => busy("probing", async () => {
  const r = await api("probe", { probes: probesFromForm(), prompt: null });
  renderReport(r); renderStack(r.stack);
}));

$("undo").addEventListener("click", () => busy("undoing", async () => {
  const r = await api("undo", {});
  renderStack(r.stack);
  showError(r.bit_exact === false ? "warning: the weights differ from those before the edit" : null);
  if (r.stack.length) { renderReport(await api("probe", { probes: probesFromForm(), prompt: null })); }
  else { renderReport(await api("probe", { probes: probesFromForm(), prompt: $("prompt").value })); }
}));

$("save").addEventListener("click", () => busy("saving", async () => {
  const r = await api("save", { folder: $("folder").value });
  $("status").textContent = `saved to ${r.folder}`;
}));

$("load").addEventListener("click", () => busy("loading", async () => {
  const r = await api("load", { folder: $("folder").value });
  renderStack(r.stack);
  renderReport(await api("probe", { probes: probesFromForm(), prompt: null }));
}));

$("check").addEventListener("click", () => busy("checking", async () => {
  const portability = lines("portability").map((l) => { const [q, a] = l.split("|"); return { question: (q || "").trim(), answer: (a || "").trim() }; });
  const r = await api("check", { paraphrases: lines("paraphrases"), neighbours: lines("neighbours"), portability });
  const body = $("check-table").tBodies[0];
  body.replaceChildren();
  for (const row of r.rows) { const tr = body.insertRow(); cell(tr, row.metric); cell(tr, String(row.n), "num"); cell(tr, fmt(row.before), "num"); cell(tr, fmt(row.after), "num"); }
}));

(async () => {
  try {
    const info = await api("info");
    $("model").textContent = `${info.model} · ${info.layers} layers · ${info.fingerprint.slice(0, 12)}`;
    $("moved-tv").textContent = info.moved_tv;
    for (const m of info.methods) {
      const o = document.createElement("option");
      o.value = m.name; o.textContent = `${m.name} (${m.family})`; o.title = m.description;
      if (m.name === "rome") o.selected = true;
      $("method").appendChild(o);
    }
    $("method-help").textContent = $("method").selectedOptions[0].title;
    renderStack(info.stack);
    await loadHparams();
  } catch (e) { showError(e); }
})();
