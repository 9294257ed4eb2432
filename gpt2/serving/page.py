"""The single page that `python -m gpt2.serve` shows at /: a prompt, the sampling controls, the text as it streams.

Plain HTML and JavaScript, no build step and nothing fetched from elsewhere; it talks to the server's own
/v1/completions (stream: true) and /info. When the server has an API key the page shows a key field and
sends what is typed there as `Authorization: Bearer KEY` (kept in this tab's sessionStorage only).
"""


def page(max_tokens: int, key_required: bool = False) -> str:
    return PAGE.replace("__MAX_TOKENS__", str(max_tokens)).replace("__KEY_REQUIRED__", str(key_required).lower())


PAGE = r"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>gpt2-speedrun: talk to the model</title>
<style>
  body { font-family: system-ui, sans-serif; max-width: 52rem; margin: 2rem auto; padding: 0 1rem; color: #222; }
  h1 { font-size: 1.4rem; margin-bottom: .2rem; }
  #model { color: #555; font-size: .9rem; margin-bottom: 1rem; }
  textarea { width: 100%; box-sizing: border-box; font: 1rem/1.4 ui-monospace, monospace; padding: .5rem; }
  .controls { display: flex; flex-wrap: wrap; gap: .8rem 1.2rem; margin: .8rem 0; align-items: end; }
  label { display: flex; flex-direction: column; font-size: .85rem; color: #444; }
  input { width: 7rem; padding: .2rem; }
  button { font-size: 1rem; padding: .4rem 1.2rem; cursor: pointer; }
  #output { white-space: pre-wrap; font: 1rem/1.5 ui-monospace, monospace; border: 1px solid #ccc;
            border-radius: 4px; padding: .8rem; min-height: 8rem; background: #fafafa; }
  #output .prompt { color: #777; }
  #status { font-size: .85rem; color: #555; margin-top: .4rem; min-height: 1.2em; }
  .error { color: #b00; }
  [hidden] { display: none !important; }  /* over label's display: flex */
  #key_box { margin-bottom: .8rem; }
</style>
</head>
<body>
<h1>Talk to the model</h1>
<div id="model">loading model information...</div>
<label id="key_box" hidden>API key <input id="api_key" type="password" autocomplete="off"
  placeholder="the server's --api-key"></label>
<textarea id="prompt" rows="4" placeholder="Type a prompt...">Hello, I'm a language model,</textarea>
<div class="controls">
  <label>max tokens <input id="max_tokens" type="number" min="1" max="__MAX_TOKENS__" value="64"></label>
  <label>temperature <input id="temperature" type="number" min="0" max="2" step="0.05" value="1.0"></label>
  <label>top-k <input id="top_k" type="number" min="0" step="1" value="50" title="0: off"></label>
  <label>top-p <input id="top_p" type="number" min="0.01" max="1" step="0.01" value="1.0"></label>
  <label>seed <input id="seed" type="number" step="1" placeholder="random"></label>
  <label>stop <input id="stop" type="text" placeholder="e.g. \n\n"></label>
  <button id="generate">Generate</button>
  <button id="cancel" disabled>Stop</button>
</div>
<div id="output"></div>
<div id="status"></div>
<script>
const $ = (id) => document.getElementById(id);
let controller = null;
const KEY_REQUIRED = __KEY_REQUIRED__;

function headers(extra) {
  const h = Object.assign({}, extra), key = $("api_key").value.trim();
  if (key) h["Authorization"] = "Bearer " + key;
  return h;
}

async function failure(r) {
  try { const e = await r.json(); return e.error ? e.error.message : r.statusText; } catch (e) { return r.statusText; }
}

function loadInfo() {
  fetch("info", { headers: headers() }).then(async (r) => {
    if (!r.ok) throw new Error(await failure(r));
    return r.json();
  }).then((info) => {
    const parts = [info.run_folder || info.source];
    if (info.stage) parts.push("stage " + info.stage);
    if (info.steps !== null && info.steps !== undefined) parts.push(info.steps + " steps");
    if (info.val_loss !== null && info.val_loss !== undefined) {
      parts.push("val loss " + Number(info.val_loss).toFixed(4));
    }
    parts.push((info.params / 1e6).toFixed(1) + "M parameters", "context " + info.block_size);
    $("model").textContent = "Model: " + parts.join(" \u00b7 ");
  }).catch((e) => { $("model").textContent = "Model: (unknown: " + e.message + ")"; });
}
if (KEY_REQUIRED) {
  $("key_box").hidden = false;
  $("api_key").value = sessionStorage.getItem("api_key") || "";
  $("api_key").addEventListener("change", () => {
    sessionStorage.setItem("api_key", $("api_key").value.trim());
    loadInfo();
  });
}
loadInfo();

function number(id) { const v = $(id).value.trim(); return v === "" ? null : Number(v); }

async function generate() {
  const out = $("output"), status = $("status");
  out.textContent = "";
  const prompt = document.createElement("span");
  prompt.className = "prompt";
  prompt.textContent = $("prompt").value;
  const text = document.createElement("span");
  text.id = "completion";
  out.append(prompt, text);
  const body = { prompt: $("prompt").value, max_tokens: number("max_tokens"), temperature: number("temperature"),
                 top_p: number("top_p"), stream: true };
  const k = number("top_k"); if (k) body.top_k = k;
  const seed = number("seed"); if (seed !== null) body.seed = seed;
  const stop = $("stop").value.replace(/\\n/g, "\n"); if (stop) body.stop = stop;
  controller = new AbortController();
  $("generate").disabled = true; $("cancel").disabled = false;
  status.className = ""; status.textContent = "generating...";
  const t0 = performance.now(); let pieces = 0, finish = null;
  try {
    const r = await fetch("v1/completions", { method: "POST", headers: headers({ "Content-Type": "application/json" }),
                                              body: JSON.stringify(body), signal: controller.signal });
    if (!r.ok) throw new Error(await failure(r));
    const reader = r.body.getReader(), decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      let cut;
      while ((cut = buffer.indexOf("\n\n")) >= 0) {
        const event = buffer.slice(0, cut); buffer = buffer.slice(cut + 2);
        if (!event.startsWith("data: ")) continue;
        const data = event.slice(6);
        if (data === "[DONE]") continue;
        const msg = JSON.parse(data);
        if (msg.error) throw new Error(msg.error.message);
        text.textContent += msg.choices[0].text; pieces++;
        if (msg.choices[0].finish_reason) finish = msg.choices[0].finish_reason;
      }
    }
    const s = (performance.now() - t0) / 1000;
    status.textContent = `done (${finish || "stopped"}) in ${s.toFixed(1)} s`;
  } catch (e) {
    if (e.name === "AbortError") { status.textContent = "stopped"; }
    else { status.className = "error"; status.textContent = "error: " + e.message; }
  } finally {
    $("generate").disabled = false; $("cancel").disabled = true; controller = null;
  }
}
$("generate").addEventListener("click", generate);
$("cancel").addEventListener("click", () => controller && controller.abort());
$("prompt").addEventListener("keydown", (e) => { if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) generate(); });
</script>
</body>
</html>
"""
