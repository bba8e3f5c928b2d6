// The layout calculator of chapter 5: the package lmkit/costs/ itself, run in the browser by Pyodide.
//
// book/tools/assets.py vendors Pyodide (npm package "pyodide") and copies the modules of lmkit/costs/
// next to this file, with files.json naming them (_static/pyodide/, _static/lmkit/costs/), so the
// page loads nothing from outside the site and shows exactly what `lmkit.costs.calculate` returns
// in the tests. The markup comes from
// book/_ext/calculator.py; every input and output has a stable id (calc-*), the last inputs sent
// are in data-inputs of #lmkit-calculator and the raw result (JSON from Python) in data-result.

const STATIC = new URL("./", import.meta.url);
const root = document.getElementById("lmkit-calculator");

// Python glue: calculate() and format_bytes() are the tested functions of lmkit.costs.
const GLUE = `
import dataclasses, json
from lmkit import costs

def presets():
    return json.dumps({key: dataclasses.asdict(m) for key, m in costs.PRESETS.items()})

def run(text):
    out = costs.calculate(json.loads(text))
    shown = {}
    if out.get("error") is None:
        for group in ("memory", "communication"):
            for key, value in out[group].items():
                shown[f"{group}-{key}"] = costs.format_bytes(value)
        shown["device-memory"] = costs.format_bytes(out["device_memory"])
        shown["num-params"] = f"{out['num_params'] / 1e9:.3f} B"
        shown["active-params"] = f"{out['active_params'] / 1e9:.3f} B"
        shown["expert-params-per-rank"] = f"{out['expert_params_per_rank'] / 1e9:.3f} B"
        shown["all-to-all-per-layer"] = costs.format_bytes(out["all_to_all_per_layer"])
        shown["kv-cache-per-token"] = costs.format_bytes(out["kv_cache_per_token"])
        shown["bubble"] = f"{100 * out['bubble']:.2f} %"
    return json.dumps({"result": out, "shown": shown})
`;

const INTEGER_FIELDS = ["dp", "cp", "tp", "pp", "ep", "zero", "microbatches", "virtual_stages", "global_batch"];
const MODEL_FIELDS = ["n_layer", "d_model", "n_head", "n_kv_head", "d_ff", "vocab_size", "seq_len",
                      "n_experts", "moe_top_k", "moe_every", "moe_d_ff", "n_shared_experts"];
// The network select sets three fields of lmkit.costs.Model at once.
const NETWORKS = {
  gpt2: { pos: "learned", norm: "layer", bias: true },
  llama: { pos: "rope", norm: "rms", bias: false },
};
// Every control that describes the model: editing one makes the model "custom".
const MODEL_CONTROLS = [...MODEL_FIELDS, "mlp", "tie_embeddings", "network"];
const PARTS = ["params", "grads", "optimizer", "activations"];
const COLOURS = { params: "#4c72b0", grads: "#dd8452", optimizer: "#55a868", activations: "#c44e52" };

const $ = (name) => document.getElementById(`calc-${name}`);
const idOf = (field) => field.replace(/_/g, "-");

function number(text) {
  // A number when the field holds one, else the text itself: calculate() names the problem.
  const value = Number(text);
  return text.trim() !== "" && Number.isFinite(value) ? value : text;
}

function readInputs() {
  const inputs = {};
  const preset = $("preset").value;
  if (preset === "custom") {
    inputs.model = Object.fromEntries(MODEL_FIELDS.map((f) => [f, number($(idOf(f)).value)]));
    inputs.model.mlp = $("mlp").value;
    inputs.model.tie_embeddings = $("tie-embeddings").checked;
    Object.assign(inputs.model, NETWORKS[$("network").value]);
  } else {
    inputs.preset = preset;
  }
  for (const f of INTEGER_FIELDS) inputs[f] = number($(idOf(f)).value);
  inputs.sequence_parallel = $("sequence-parallel").checked;
  inputs.recompute = $("recompute").value;
  inputs.schedule = $("schedule").value;
  inputs.precision = $("precision").value;
  if (inputs.precision === "mixed") inputs.reduce = $("reduce").value;  // the gradients' dtype
  inputs.device_memory_gb = number($("device-memory-gb").value);
  inputs.imbalance = number($("imbalance").value);  // the all-to-alls' load-imbalance factor
  return inputs;
}

function showReduce() {
  // The gradients' dtype is a choice of mixed precision only (fp32 training reduces fp32 gradients).
  const hidden = $("precision").value !== "mixed";
  $("reduce").hidden = hidden;
  root.querySelector('label[for="calc-reduce"]').hidden = hidden;
}

function svg(tag, attrs, text) {
  const el = document.createElementNS("http://www.w3.org/2000/svg", tag);
  for (const [k, v] of Object.entries(attrs)) el.setAttribute(k, v);
  if (text !== undefined) el.textContent = text;
  return el;
}

function drawBar(result, shown) {
  // Memory per rank as one stacked bar, with the device's memory as a dashed line.
  const bar = $("bar");
  bar.replaceChildren();
  const width = 640, left = 10, right = 10, top = 22, height = 34;
  const mem = result.memory, device = result.device_memory;
  const scale = (width - left - right) / (1.08 * Math.max(mem.total, device));
  let x = left;
  bar.append(svg("title", {}, `memory per rank: ${shown["memory-total"]} of ${shown["device-memory"]}`));
  for (const part of PARTS) {
    const w = mem[part] * scale;
    const rect = svg("rect", { x, y: top, width: Math.max(w, 0), height, fill: COLOURS[part],
                               id: `calc-bar-${part}`, "data-value": String(mem[part]) });
    rect.append(svg("title", {}, `${part}: ${shown[`memory-${part}`]}`));
    bar.append(rect);
    x += w;
  }
  const dx = left + device * scale;
  bar.append(svg("line", { x1: dx, x2: dx, y1: top - 8, y2: top + height + 8, stroke: "currentColor",
                           "stroke-width": 2, "stroke-dasharray": "5 3", id: "calc-bar-device" }));
  bar.append(svg("text", { x: Math.min(dx, width - 150), y: top - 10, "font-size": 12, fill: "currentColor" },
                 `device memory ${shown["device-memory"]}`));
  let lx = left;
  for (const part of PARTS) {  // the legend
    bar.append(svg("rect", { x: lx, y: top + height + 12, width: 10, height: 10, fill: COLOURS[part] }));
    bar.append(svg("text", { x: lx + 14, y: top + height + 21, "font-size": 12, fill: "currentColor" }, part));
    lx += 24 + 7 * part.length;
  }
  bar.append(svg("text", { x: lx + 10, y: top + height + 21, "font-size": 12, fill: "currentColor",
                           "font-weight": "bold" },
                 `total ${shown["memory-total"]} per rank` + (result.fits ? " (fits)" : " (does not fit)")));
}

function show(inputs, reply) {
  const { result, shown } = JSON.parse(reply);
  root.dataset.inputs = JSON.stringify(inputs);
  root.dataset.result = JSON.stringify(result);
  const error = $("error");
  const outputs = root.querySelectorAll("[data-output]");
  if (result.error !== null && result.error !== undefined) {
    error.textContent = result.error;
    error.hidden = false;
    $("results").hidden = true;
    for (const el of outputs) { el.textContent = ""; el.dataset.value = ""; }
    root.dataset.state = "error";
    return;
  }
  error.textContent = "";
  error.hidden = true;
  $("results").hidden = false;
  const values = {
    "num-params": result.num_params, "kv-cache-per-token": result.kv_cache_per_token,
    "active-params": result.active_params, "expert-params-per-rank": result.expert_params_per_rank,
    "all-to-all-per-layer": result.all_to_all_per_layer,
    "bubble": result.bubble, "fits": result.fits,
    "device-memory": result.device_memory, "model": result.model, "layout": result.layout,
    "stage": result.stage, "notes": result.notes,
  };
  for (const group of ["memory", "communication"]) {
    for (const [k, v] of Object.entries(result[group])) values[`${group}-${k}`] = v;
  }
  for (const el of outputs) {
    const key = el.dataset.output;
    const value = values[key];
    el.dataset.value = String(value);
    if (key === "fits") el.textContent = value ? "yes" : "no";
    else el.textContent = key in shown ? shown[key] : String(value);
  }
  drawBar(result, shown);
  root.dataset.state = "ready";
}

function fillModel(presets) {
  const preset = $("preset").value;
  if (preset === "custom") return;
  const model = presets[preset];
  for (const f of MODEL_FIELDS) $(idOf(f)).value = model[f];
  $("mlp").value = model.mlp;
  $("tie-embeddings").checked = model.tie_embeddings;
  $("network").value = model.pos === "rope" ? "llama" : "gpt2";
}

// The modules of lmkit/costs/ as [name, source] pairs, in the order files.json lists them.
async function costsModules() {
  const text = async (name) => {
    const response = await fetch(new URL(`lmkit/costs/${name}`, STATIC));
    if (!response.ok) throw new Error(`lmkit/costs/${name}: HTTP ${response.status}`);
    return response.text();
  };
  const names = JSON.parse(await text("files.json"));
  return Promise.all(names.map(async (name) => [name, await text(name)]));
}

async function main() {
  const status = $("status");
  let pyodide;
  try {
    const { loadPyodide } = await import(new URL("pyodide/pyodide.mjs", STATIC).href);
    const [runtime, modules] = await Promise.all([
      loadPyodide(),  // finds its runtime next to pyodide.mjs (the site's, or the CDN's with the fallback)
      costsModules(),
    ]);
    pyodide = runtime;
    pyodide.FS.mkdirTree("/lmkit-site/lmkit/costs");
    pyodide.FS.writeFile("/lmkit-site/lmkit/__init__.py", "");
    for (const [name, source] of modules) pyodide.FS.writeFile(`/lmkit-site/lmkit/costs/${name}`, source);
    pyodide.runPython("import sys; sys.path.insert(0, '/lmkit-site')");
    pyodide.runPython(GLUE);
  } catch (err) {
    status.textContent = `The calculator could not start Python in this browser: ${err}`;
    root.dataset.state = "failed";
    return;
  }
  const run = pyodide.globals.get("run");
  const presets = JSON.parse(pyodide.globals.get("presets")());
  const select = $("preset");
  select.replaceChildren();
  for (const [key, model] of Object.entries(presets)) {
    select.append(new Option(model.name || key, key));
  }
  select.append(new Option("custom (type a model)", "custom"));
  select.value = root.dataset.defaultPreset in presets ? root.dataset.defaultPreset : Object.keys(presets)[0];
  fillModel(presets);

  let pending = false;
  const update = () => {
    if (pending) return;
    pending = true;
    queueMicrotask(() => {
      pending = false;
      const inputs = readInputs();
      show(inputs, run(JSON.stringify(inputs)));
    });
  };
  select.addEventListener("change", () => { fillModel(presets); update(); });
  for (const f of MODEL_CONTROLS) {
    const el = $(idOf(f));
    el.addEventListener(el.tagName === "SELECT" || el.type === "checkbox" ? "change" : "input", () => {
      if (select.value !== "custom") select.value = "custom";
      update();
    });
  }
  $("schedule").addEventListener("change", () => {
    // interleaving needs v >= 2 and the other schedules v = 1: keep the pair consistent
    const v = $("virtual-stages");
    if ($("schedule").value === "interleaved" && Number(v.value) < 2) v.value = 2;
    if ($("schedule").value !== "interleaved") v.value = 1;
  });
  $("precision").addEventListener("change", showReduce);
  showReduce();
  for (const el of root.querySelectorAll("input, select")) {
    el.addEventListener(el.tagName === "SELECT" || el.type === "checkbox" ? "change" : "input", update);
  }
  for (const el of root.querySelectorAll("input, select")) el.disabled = false;
  status.textContent = `Python ${pyodide.version ? "(Pyodide " + pyodide.version + ")" : ""} runs ` +
                       "lmkit/costs/ in this page.";
  update();
}

// Pyodide is megabytes: it loads when the reader starts the calculator, not when the page opens.
if (root) {
  const start = $("start");
  start.addEventListener("click", () => {
    start.disabled = true;
    root.dataset.state = "loading";
    $("status").textContent = "Loading Python (Pyodide) and lmkit.costs ...";
    main();
  }, { once: true });
}
