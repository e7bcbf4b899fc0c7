// Cache-memory calculator. The formulas in `Memory` mirror src/hybridlm/memory.py line for line
// (layer_cost, bookkeeping_costs, cache_bytes, attention_twin, crossover_context); the browser test
// checks the page against memory.py for every preset. Everything else here is the page.
"use strict";

const Memory = (() => {
  const DTYPE_BYTES = { float32: 4, float64: 8, bfloat16: 2, float16: 2 };
  const LINEAR = "GKLDX";
  const ATTENTION = "AMSW";
  const POSITION_BYTES = 4;
  const MAX_CONTEXT = 2 ** 34;

  function dtypeBytes(name, arg) {
    if (!(name in DTYPE_BYTES)) throw new Error(`${arg}: expected one of ${Object.keys(DTYPE_BYTES)}, got ${name}`);
    return DTYPE_BYTES[name];
  }

  function layerTypes(cfg) {
    const p = cfg.layer_pattern;
    return p.repeat(Math.floor(cfg.num_layers / p.length) + 1).slice(0, cfg.num_layers);
  }

  function convChannels(cfg, letter) {
    if (!"GDK".includes(letter) || cfg.linear_conv_kernel_dim === 0) return 0;
    return 2 * cfg.linear_num_key_heads * cfg.linear_key_head_dim
      + cfg.linear_num_value_heads * cfg.linear_value_head_dim;
  }

  function attentionPerToken(cfg, letter, kvb) {
    const gqa = 2 * cfg.num_key_value_heads * cfg.head_dim * kvb;
    const mla = (cfg.mla_kv_lora_rank + cfg.mla_qk_rope_head_dim) * kvb;
    if ("AW".includes(letter)) return gqa;
    if (letter === "M") return mla;
    const indexKey = cfg.index_key_bytes ? Math.trunc(cfg.index_key_bytes) : cfg.index_head_dim * kvb;
    return (cfg.sparse_base === "mla" ? mla : gqa) + indexKey;
  }

  // {state, conv, perToken, cap}: bytes one layer caches per sequence at context n.
  function layerCost(cfg, letter, kvDtype, stateDtype) {
    const kvb = dtypeBytes(kvDtype, "kv_dtype");
    const sb = dtypeBytes(stateDtype || cfg.state_dtype, "state_dtype");
    if (ATTENTION.includes(letter)) {
      return { state: 0, conv: 0, perToken: attentionPerToken(cfg, letter, kvb),
               cap: letter === "W" ? cfg.sliding_window : null };
    }
    const valueDim = cfg.linear_value_head_dim + (letter === "X" && cfg.linear_normalize ? 1 : 0);
    const state = cfg.linear_num_value_heads * cfg.linear_key_head_dim * valueDim * sb;
    const conv = convChannels(cfg, letter) * Math.max(cfg.linear_conv_kernel_dim - 1, 0) * kvb;
    return { state, conv, perToken: 0, cap: null };
  }

  function kvAt(c, n) {
    return c.perToken * (c.cap === null ? n : Math.min(n, c.cap));
  }

  function bookkeepingCosts(cfg) {
    const types = layerTypes(cfg);
    const costs = [{ state: POSITION_BYTES, conv: 0, perToken: 0, cap: null }];
    if ([..."AMS"].some((c) => types.includes(c))) costs.push({ state: 0, conv: 0, perToken: POSITION_BYTES, cap: null });
    if (types.includes("W")) costs.push({ state: 0, conv: 0, perToken: POSITION_BYTES, cap: cfg.sliding_window });
    return costs;
  }

  function cacheBytes(cfg, batch, context, kvDtype, stateDtype) {
    let kv = 0, state = 0, book = 0;
    for (const letter of layerTypes(cfg)) {
      const c = layerCost(cfg, letter, kvDtype, stateDtype);
      kv += batch * kvAt(c, context);
      state += batch * (c.state + c.conv);
    }
    for (const c of bookkeepingCosts(cfg)) book += batch * (c.state + kvAt(c, context));
    return { kv, state, bookkeeping: book, total: kv + state + book };
  }

  function attentionLetter(cfg) {
    const types = layerTypes(cfg);
    let best = "A", bestCount = 0;
    for (const c of "AMS") {
      const count = [...types].filter((x) => x === c).length;
      if (count > bestCount) { best = c; bestCount = count; }
    }
    return best;
  }

  function attentionTwin(cfg) {
    const letter = attentionLetter(cfg);
    const pattern = [...layerTypes(cfg)].map((c) => (LINEAR.includes(c) ? letter : c)).join("");
    return { ...cfg, layer_pattern: pattern, num_layers: pattern.length };
  }

  function crossoverContext(cfg, baseline, kvDtype, stateDtype) {
    const caps = new Set();
    for (const m of [cfg, baseline]) {
      for (const x of new Set(layerTypes(m))) caps.add(layerCost(m, x, kvDtype, stateDtype).cap);
      for (const c of bookkeepingCosts(m)) caps.add(c.cap);
    }
    const breaks = [...caps].filter((c) => c).sort((a, b) => a - b);
    const total = (m, n) => cacheBytes(m, 1, n, kvDtype, stateDtype).total;
    const belowFrom = (n) => [n, ...breaks.filter((b) => b > n), MAX_CONTEXT]
      .every((m) => total(cfg, m) < total(baseline, m));
    if (!belowFrom(MAX_CONTEXT)) return null;
    let lo = 1, hi = MAX_CONTEXT;
    if (belowFrom(lo)) return lo;
    while (hi - lo > 1) {
      const mid = Math.floor((lo + hi) / 2);
      if (belowFrom(mid)) hi = mid; else lo = mid;
    }
    return hi;
  }

  return { layerTypes, cacheBytes, attentionTwin, crossoverContext, DTYPE_BYTES };
})();

// ---------------------------------------------------------------------------------------- page
const LIMITS = {
  context: [1, 2 ** 26], batch: [1, 4096], layers: [1, 1024], kv_heads: [1, 1024], head_dim: [1, 4096],
  linear_key_heads: [1, 1024], linear_value_heads: [1, 1024], linear_key_dim: [1, 4096],
  linear_value_dim: [1, 4096], conv_kernel: [0, 64], ratio: [0, 63],
};

function readInputs() {
  const out = {};
  for (const [name, [lo, hi]] of Object.entries(LIMITS)) {
    const text = document.getElementById(name).value.trim();
    const value = Number(text);
    if (text === "" || !Number.isInteger(value) || value < lo || value > hi) {
      throw new Error(`${name.replace(/_/g, " ")}: expected a whole number from ${lo.toLocaleString("en-US")} `
        + `to ${hi.toLocaleString("en-US")}, got "${text}"`);
    }
    out[name] = value;
  }
  if (out.linear_value_heads % out.linear_key_heads) {
    throw new Error("linear value heads: expected a multiple of linear key heads");
  }
  out.kv_dtype = document.getElementById("kv_dtype").value;
  out.state_dtype = document.getElementById("state_dtype").value;
  return out;
}

// The page's own models: pure attention and an r:1 Gated DeltaNet hybrid with the typed dimensions.
function customConfig(inp, pattern) {
  return {
    num_layers: inp.layers, layer_pattern: pattern, num_key_value_heads: inp.kv_heads, head_dim: inp.head_dim,
    sliding_window: null, linear_num_key_heads: inp.linear_key_heads, linear_num_value_heads: inp.linear_value_heads,
    linear_key_head_dim: inp.linear_key_dim, linear_value_head_dim: inp.linear_value_dim,
    linear_conv_kernel_dim: inp.conv_kernel, linear_normalize: false, state_dtype: inp.state_dtype,
    mla_kv_lora_rank: 0, mla_qk_rope_head_dim: 0, sparse_base: "gqa", index_head_dim: 0, index_key_bytes: 0,
  };
}

function models(inp) {
  const preset = PRESETS[document.getElementById("preset").value];
  const name = document.getElementById("preset").value;
  return [
    ["pure attention", customConfig(inp, "A")],
    [`${inp.ratio}:1 hybrid`, customConfig(inp, "G".repeat(inp.ratio) + "A")],
    [name, preset],
    [`${name} all-attention twin`, Memory.attentionTwin(preset)],
  ];
}

function formatBytes(n) {
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i += 1; }
  return i === 0 ? `${n} B` : `${n.toFixed(2)} ${units[i]}`;
}

function cell(tr, text, bytes) {
  const td = document.createElement("td");
  td.textContent = text;
  if (bytes !== undefined) td.dataset.bytes = String(bytes);
  tr.appendChild(td);
}

function render() {
  const error = document.getElementById("error");
  const body = document.getElementById("results");
  body.replaceChildren();
  let inp;
  try {
    inp = readInputs();
  } catch (e) {
    error.textContent = e.message;
    error.hidden = false;
    drawChart(null);
    return;
  }
  error.hidden = true;
  const list = models(inp);
  const pure = Memory.cacheBytes(list[0][1], inp.batch, inp.context, inp.kv_dtype, inp.state_dtype).total;
  const twin = list[3][1];
  for (const [label, cfg] of list) {
    const b = Memory.cacheBytes(cfg, inp.batch, inp.context, inp.kv_dtype, inp.state_dtype);
    const tr = document.createElement("tr");
    tr.dataset.model = label;
    cell(tr, label);
    cell(tr, Memory.layerTypes(cfg).length > 24 ? Memory.layerTypes(cfg).slice(0, 24) + "..." : Memory.layerTypes(cfg));
    cell(tr, formatBytes(b.kv), b.kv);
    cell(tr, formatBytes(b.state), b.state);
    cell(tr, formatBytes(b.total), b.total);
    cell(tr, `${(100 * (1 - b.total / pure)).toFixed(1)}%`);
    body.appendChild(tr);
  }
  const preset = list[2][1];
  const cross = Memory.crossoverContext(preset, twin, inp.kv_dtype, inp.state_dtype);
  const crossHybrid = Memory.crossoverContext(list[1][1], list[0][1], inp.kv_dtype, inp.state_dtype);
  const red = 1 - Memory.cacheBytes(preset, inp.batch, inp.context, inp.kv_dtype, inp.state_dtype).total
    / Memory.cacheBytes(twin, inp.batch, inp.context, inp.kv_dtype, inp.state_dtype).total;
  const summary = document.getElementById("summary");
  summary.dataset.crossover = cross === null ? "none" : String(cross);
  summary.dataset.reduction = String(red);
  summary.textContent = `${list[2][0]}: ${(100 * red).toFixed(1)}% less cache than its all-attention twin at `
    + `${inp.context.toLocaleString("en-US")} tokens; `
    + (cross === null ? "it never falls below the twin. " : `crossover at ${cross.toLocaleString("en-US")} tokens. `)
    + `The ${inp.ratio}:1 hybrid crosses pure attention `
    + (crossHybrid === null ? "never." : `at ${crossHybrid.toLocaleString("en-US")} tokens.`);
  drawChart(inp, list);
}

// ---------------------------------------------------------------------------------------- chart
const COLORS = ["#d62728", "#1f77b4", "#2ca02c", "#9467bd"];

function drawChart(inp, list) {
  const canvas = document.getElementById("chart");
  const ctx = canvas.getContext("2d");
  const W = canvas.width, H = canvas.height, L = 70, R = 20, T = 20, B = 40;
  ctx.clearRect(0, 0, W, H);
  if (!inp) return;
  const maxExp = Math.max(10, Math.ceil(Math.log2(inp.context)));
  const xs = [];
  for (let e = 8; e <= maxExp; e += 0.25) xs.push(Math.round(2 ** e));
  const series = list.map(([, cfg]) => xs.map((n) => Memory.cacheBytes(cfg, inp.batch, n, inp.kv_dtype, inp.state_dtype).total));
  const yMax = Math.max(...series.flat()) || 1;
  const logY = document.getElementById("logy").checked;
  const yMin = logY ? Math.max(1, Math.min(...series.flat().filter((y) => y > 0))) : 0;
  const px = (n) => L + (Math.log2(n) - 8) / (maxExp - 8) * (W - L - R);
  const frac = (y) => (logY ? Math.log(Math.max(y, yMin) / yMin) / Math.log(yMax / yMin || 2) : y / yMax);
  const py = (y) => H - B - frac(y) * (H - T - B);
  ctx.strokeStyle = "#888"; ctx.fillStyle = "#333"; ctx.font = "12px sans-serif"; ctx.lineWidth = 1;
  ctx.beginPath(); ctx.moveTo(L, T); ctx.lineTo(L, H - B); ctx.lineTo(W - R, H - B); ctx.stroke();
  for (let e = 8; e <= maxExp; e += 2) {
    ctx.fillText(e >= 20 ? `${2 ** (e - 20)}M` : e >= 10 ? `${2 ** (e - 10)}k` : String(2 ** e), px(2 ** e) - 10, H - B + 16);
  }
  for (let i = 0; i <= 4; i += 1) {
    const y = logY ? yMin * (yMax / yMin) ** (i / 4) : yMax * i / 4;
    ctx.fillText(formatBytes(Math.round(y)), 2, py(y) + 4);
  }
  ctx.fillText("context (tokens, log scale)", W / 2 - 70, H - 6);
  series.forEach((ys, k) => {
    ctx.strokeStyle = COLORS[k]; ctx.lineWidth = 2; ctx.beginPath();
    ys.forEach((y, i) => (i ? ctx.lineTo(px(xs[i]), py(y)) : ctx.moveTo(px(xs[i]), py(y))));
    ctx.stroke();
    ctx.fillStyle = COLORS[k];
    ctx.fillText(list[k][0], L + 10, T + 14 * (k + 1));
  });
  ctx.strokeStyle = "#aaa"; ctx.setLineDash([4, 4]);
  ctx.beginPath(); ctx.moveTo(px(Math.max(inp.context, 256)), T); ctx.lineTo(px(Math.max(inp.context, 256)), H - B); ctx.stroke();
  ctx.setLineDash([]);
}

// ---------------------------------------------------------------------------------------- wiring
function fillFromPreset() {
  const p = PRESETS[document.getElementById("preset").value];
  const set = (id, v) => { document.getElementById(id).value = String(v); };
  set("layers", p.num_layers);
  set("kv_heads", p.num_key_value_heads);
  set("head_dim", p.head_dim);
  set("linear_key_heads", p.linear_num_key_heads);
  set("linear_value_heads", p.linear_num_value_heads);
  set("linear_key_dim", p.linear_key_head_dim);
  set("linear_value_dim", p.linear_value_head_dim);
  set("conv_kernel", p.linear_conv_kernel_dim);
  set("state_dtype", p.state_dtype);
  const types = Memory.layerTypes(p);
  const attn = [...types].filter((c) => "AMSW".includes(c)).length;
  set("ratio", attn ? Math.min(63, Math.round((types.length - attn) / attn)) : 3);
  render();
}

function init() {
  const select = document.getElementById("preset");
  for (const name of Object.keys(PRESETS)) {
    const opt = document.createElement("option");
    opt.value = name; opt.textContent = name;
    select.appendChild(opt);
  }
  select.value = "qwen3-next-80b-a3b" in PRESETS ? "qwen3-next-80b-a3b" : Object.keys(PRESETS)[0];
  select.addEventListener("change", fillFromPreset);
  for (const el of document.querySelectorAll("input, select.dtype")) el.addEventListener("input", render);
  document.getElementById("logy").addEventListener("change", render);
  fillFromPreset();
}

document.addEventListener("DOMContentLoaded", init);
