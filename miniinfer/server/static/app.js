// MiniInfer playground + live dashboard. Plain JS, no dependencies, no build step.
"use strict";

(() => {
  const $ = (id) => document.getElementById(id);
  const state = { history: [], busy: false, controller: null, model: null };

  // ───────────────────────────── helpers ─────────────────────────────
  const fmt = (x, digits = 0) =>
    x === null || x === undefined || Number.isNaN(x) ? "—" : Number(x).toLocaleString(undefined, {
      minimumFractionDigits: digits, maximumFractionDigits: digits,
    });

  function authHeaders() {
    const key = $("api-key").value.trim();
    return key ? { Authorization: `Bearer ${key}` } : {};
  }

  async function errorMessage(resp) {
    try {
      const body = await resp.json();
      if (body && body.error && body.error.message) return `${resp.status}: ${body.error.message}`;
    } catch (_) { /* not JSON */ }
    return `${resp.status} ${resp.statusText}`;
  }

  // Parse a text/event-stream body into the payloads of its `data:` lines.
  async function* sseData(resp) {
    const reader = resp.body.getReader();
    const decoder = new TextDecoder();
    let buf = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buf += decoder.decode(value, { stream: true });
      let cut;
      while ((cut = buf.search(/\r?\n\r?\n/)) !== -1) {
        const event = buf.slice(0, cut);
        buf = buf.slice(cut).replace(/^\r?\n\r?\n/, "");
        const data = event.split(/\r?\n/)
          .filter((l) => l.startsWith("data:"))
          .map((l) => l.slice(5).replace(/^ /, ""))
          .join("\n");
        if (data) yield data;
      }
    }
  }

  // ───────────────────────────── chat ─────────────────────────────
  const messagesEl = $("messages");

  function nearBottom() {
    return messagesEl.scrollHeight - messagesEl.scrollTop - messagesEl.clientHeight < 80;
  }

  function addBubble(role, text) {
    const hint = $("empty-hint");
    if (hint) hint.remove();
    const div = document.createElement("div");
    div.className = `msg ${role}`;
    const label = document.createElement("span");
    label.className = "role";
    label.textContent = role === "user" ? "You" : role === "assistant" ? "Assistant" : "Error";
    const content = document.createElement("span");
    content.className = "content";
    content.textContent = text;
    div.append(label, content);
    messagesEl.appendChild(div);
    messagesEl.scrollTop = messagesEl.scrollHeight;
    return div;
  }

  function setBusy(busy) {
    state.busy = busy;
    $("send").disabled = busy;
    $("stop").disabled = !busy;
  }

  function showLastStats({ ttft, tps, tokens }) {
    $("last-ttft").textContent = ttft === null ? "—" : `${fmt(ttft * 1000)} ms`;
    $("last-tps").textContent = tps === null ? "—" : `${fmt(tps, 1)} tok/s`;
    $("last-tokens").textContent = tokens === null ? "—" : fmt(tokens);
  }

  async function send() {
    const input = $("chat-input");
    const text = input.value.trim();
    if (!text || state.busy) return;
    input.value = "";
    state.history.push({ role: "user", content: text });
    addBubble("user", text);

    const messages = [];
    const system = $("system-prompt").value.trim();
    if (system) messages.push({ role: "system", content: system });
    messages.push(...state.history);

    const body = {
      messages,
      stream: true,
      stream_options: { include_usage: true },
      temperature: Number($("temperature").value),
      max_tokens: Math.max(1, parseInt($("max-tokens").value, 10) || 256),
    };
    if (state.model) body.model = state.model;

    const bubble = addBubble("assistant", "");
    bubble.classList.add("streaming");
    const contentEl = bubble.querySelector(".content");
    const controller = new AbortController();
    state.controller = controller;
    setBusy(true);

    const t0 = performance.now();
    let tFirst = null, tLast = null, chunks = 0, usageTokens = null, reply = "", failed = null;
    try {
      const resp = await fetch("/v1/chat/completions", {
        method: "POST",
        headers: { "Content-Type": "application/json", ...authHeaders() },
        body: JSON.stringify(body),
        signal: controller.signal,
      });
      if (!resp.ok) throw new Error(await errorMessage(resp));
      for await (const data of sseData(resp)) {
        if (data === "[DONE]") break;
        const obj = JSON.parse(data);
        if (obj.error) throw new Error(obj.error.message || "server error");
        if (obj.usage) usageTokens = obj.usage.completion_tokens;
        const choice = obj.choices && obj.choices[0];
        const piece = choice && choice.delta && choice.delta.content;
        if (piece) {
          const now = performance.now();
          if (tFirst === null) tFirst = now;
          tLast = now;
          chunks += 1;
          const stick = nearBottom();
          reply += piece;
          contentEl.textContent = reply;
          if (stick) messagesEl.scrollTop = messagesEl.scrollHeight;
        }
      }
    } catch (err) {
      if (err.name === "AbortError") {
        reply += reply ? " [stopped]" : "[stopped]";
        contentEl.textContent = reply;
      } else {
        failed = err.message || String(err);
      }
    } finally {
      bubble.classList.remove("streaming");
      state.controller = null;
      setBusy(false);
    }

    if (failed !== null && !reply) {
      bubble.remove();
      state.history.pop(); // drop the failed turn so it can be retried
      addBubble("error", failed);
      input.value = text;
      return;
    }
    if (failed !== null) addBubble("error", failed);
    state.history.push({ role: "assistant", content: reply.replace(/ ?\[stopped\]$/, "") });
    bubble.dataset.done = "true";
    const tokens = usageTokens !== null ? usageTokens : chunks;
    const ttft = tFirst === null ? null : (tFirst - t0) / 1000;
    const tps = tFirst !== null && tLast > tFirst && tokens > 1 ? (tokens - 1) / ((tLast - tFirst) / 1000) : null;
    showLastStats({ ttft, tps, tokens });
  }

  $("chat-form").addEventListener("submit", (e) => { e.preventDefault(); send(); });
  $("chat-input").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey && !e.isComposing) { e.preventDefault(); send(); }
  });
  $("stop").addEventListener("click", () => { if (state.controller) state.controller.abort(); });
  $("clear").addEventListener("click", () => {
    if (state.controller) state.controller.abort();
    state.history = [];
    messagesEl.replaceChildren();
    const hint = document.createElement("div");
    hint.className = "empty"; hint.id = "empty-hint";
    hint.textContent = "Send a message to start. Replies stream token by token.";
    messagesEl.appendChild(hint);
    showLastStats({ ttft: null, tps: null, tokens: null });
  });
  $("temperature").addEventListener("input", () => { $("temperature-value").textContent = $("temperature").value; });
  $("api-key").value = sessionStorage.getItem("miniinfer-api-key") || "";
  $("api-key").addEventListener("change", () => sessionStorage.setItem("miniinfer-api-key", $("api-key").value.trim()));

  // ───────────────────────────── charts ─────────────────────────────
  class LineChart {
    constructor(canvas, series, { windowS = 120, minMax = 1, unit = "" } = {}) {
      this.canvas = canvas;
      this.series = series; // [{ label, color }]
      this.windowS = windowS;
      this.minMax = minMax;
      this.unit = unit;
      this.points = []; // [{ t, v: [..] }]
    }

    push(t, values) {
      this.points.push({ t, v: values });
      const cutoff = t - this.windowS - 5;
      while (this.points.length && this.points[0].t < cutoff) this.points.shift();
    }

    // Axis top = 4 "nice" steps (1, 2, 2.5, 5 x 10^k), so every gridline label is round.
    static niceMax(x) {
      const raw = Math.max(x, 1e-9) / 4;
      const p = 10 ** Math.floor(Math.log10(raw));
      for (const m of [1, 2, 2.5, 5, 10]) if (m * p >= raw) return 4 * m * p;
      return 40 * p;
    }

    draw(now) {
      const c = this.canvas;
      const dpr = window.devicePixelRatio || 1;
      const w = Math.max(200, c.clientWidth), h = Math.max(100, c.clientHeight);
      if (c.width !== Math.round(w * dpr) || c.height !== Math.round(h * dpr)) {
        c.width = Math.round(w * dpr); c.height = Math.round(h * dpr);
      }
      const g = c.getContext("2d");
      g.setTransform(dpr, 0, 0, dpr, 0, 0);
      g.clearRect(0, 0, w, h);
      const css = getComputedStyle(document.documentElement);
      const line = css.getPropertyValue("--line").trim() || "#e3e6ec";
      const muted = css.getPropertyValue("--muted").trim() || "#6b7385";

      const left = 44, right = 14, top = 8, bottom = 20;
      const pw = w - left - right, ph = h - top - bottom;
      let max = 0;
      for (const p of this.points) for (const v of p.v) if (v !== null && v > max) max = v;
      const yMax = LineChart.niceMax(Math.max(max * 1.05, this.minMax));
      const t0 = now - this.windowS;
      const x = (t) => left + ((t - t0) / this.windowS) * pw;
      const y = (v) => top + ph - (v / yMax) * ph;

      g.font = "11px system-ui, sans-serif";
      g.fillStyle = muted;
      g.strokeStyle = line;
      g.lineWidth = 1;
      g.textAlign = "right";
      g.textBaseline = "middle";
      for (let i = 0; i <= 4; i++) {
        const v = (yMax * i) / 4;
        const yy = Math.round(y(v)) + 0.5;
        g.beginPath(); g.moveTo(left, yy); g.lineTo(left + pw, yy); g.stroke();
        const digits = v >= 100 || Number.isInteger(v) ? 0 : (Number.isInteger(v * 10) ? 1 : 2);
        g.fillText(fmt(v, digits), left - 6, yy);
      }
      g.textAlign = "center";
      g.textBaseline = "top";
      for (const s of [120, 90, 60, 30, 0]) {
        if (s > this.windowS) continue;
        g.textAlign = s === 0 ? "right" : "center";
        g.fillText(s === 0 ? "now" : `-${s}s`, s === 0 ? left + pw : x(now - s), top + ph + 5);
      }

      this.series.forEach((s, k) => {
        g.strokeStyle = s.color;
        g.lineWidth = 2;
        g.lineJoin = "round";
        g.beginPath();
        let pen = false;
        for (const p of this.points) {
          const v = p.v[k];
          if (v === null || v === undefined || p.t < t0 - 2) { pen = false; continue; }
          const px = x(p.t), py = y(v);
          if (!pen) { g.moveTo(px, py); pen = true; } else { g.lineTo(px, py); }
        }
        g.stroke();
        const lastP = [...this.points].reverse().find((p) => p.v[k] !== null && p.v[k] !== undefined);
        if (lastP) {
          g.fillStyle = s.color;
          g.beginPath(); g.arc(x(lastP.t), y(lastP.v[k]), 3, 0, 2 * Math.PI); g.fill();
        }
      });
    }
  }

  const css = getComputedStyle(document.documentElement);
  const c1 = css.getPropertyValue("--c1").trim() || "#3b6ef5";
  const c2 = css.getPropertyValue("--c2").trim() || "#e8813a";
  const charts = {
    throughput: new LineChart($("chart-throughput"), [{ label: "tok/s", color: c1 }], { minMax: 10 }),
    requests: new LineChart($("chart-requests"), [{ label: "running", color: c1 }, { label: "waiting", color: c2 }], { minMax: 4 }),
    kv: new LineChart($("chart-kv"), [{ label: "KV %", color: c1 }], { minMax: 10 }),
    latency: new LineChart($("chart-latency"), [{ label: "TTFT", color: c1 }, { label: "TPOT", color: c2 }], { minMax: 10 }),
  };

  // ───────────────────────────── dashboard polling ─────────────────────────────
  const dashboard = $("dashboard");
  let points = 0;

  function setStatus(kind, text) {
    const el = $("server-status");
    el.className = `status ${kind}`;
    el.textContent = text;
  }

  function fmtUptime(s) {
    s = Math.floor(s);
    const h = Math.floor(s / 3600), m = Math.floor((s % 3600) / 60), sec = s % 60;
    return `up ${h ? `${h}h ` : ""}${m ? `${m}m ` : ""}${sec}s`;
  }

  async function poll() {
    let st;
    try {
      const resp = await fetch("/api/stats", { cache: "no-store" });
      st = await resp.json();
    } catch (_) {
      setStatus("bad", "offline");
      return;
    }
    if (st.healthy) setStatus("ok", "ready");
    else if (st.state === "loading" || st.state === "created") setStatus("loading", "loading model…");
    else setStatus("bad", st.error ? "engine error" : st.state);
    if (st.model) { $("model-name").textContent = st.model; state.model = st.model; }
    if (st.device) $("device-name").textContent = st.device;
    if (st.version) $("version").textContent = `v${st.version}`;
    $("api-key-field").hidden = !st.auth_required;
    $("uptime").textContent = fmtUptime(st.uptime_s || 0);

    const tps = st.generation_throughput_tok_s || 0;
    const kv = (st.kv_cache_usage_perc || 0) * 100;
    const ttft = st.ttft_mean_s === null || st.ttft_mean_s === undefined ? null : st.ttft_mean_s * 1000;
    const tpot = st.tpot_mean_s === null || st.tpot_mean_s === undefined ? null : st.tpot_mean_s * 1000;
    $("stat-throughput").textContent = fmt(tps, tps < 10 ? 1 : 0);
    $("stat-running").textContent = fmt(st.num_requests_running);
    $("stat-waiting").textContent = fmt(st.num_requests_waiting);
    $("stat-kv").textContent = fmt(kv, 1);
    $("stat-ttft").textContent = ttft === null ? "—" : fmt(ttft, ttft < 10 ? 1 : 0);
    $("stat-tpot").textContent = tpot === null ? "—" : fmt(tpot, tpot < 10 ? 1 : 0);
    $("stat-prompt-tokens").textContent = fmt(st.prompt_tokens_total);
    $("stat-gen-tokens").textContent = fmt(st.generation_tokens_total);
    $("stat-prefix-hit").textContent = `${fmt((st.prefix_cache_hit_rate || 0) * 100, 1)}%`;
    $("stat-preemptions").textContent = fmt(st.num_preemptions_total);
    if (st.spec_acceptance_rate !== null && st.spec_acceptance_rate !== undefined) {
      $("stat-spec-row").hidden = false;
      $("stat-spec").textContent =
        `${fmt(st.spec_acceptance_rate * 100, 1)}% · ${fmt(st.spec_mean_accepted_len, 2)} tok/verify · ` +
        `draft ${fmt(st.spec_draft_ms_per_step || 0, 2)} ms · verify ${fmt(st.spec_verify_ms_per_step || 0, 2)} ms`;
    }
    $("stat-kv-blocks").textContent = st.num_kv_blocks ? `${fmt(st.num_free_kv_blocks)} / ${fmt(st.num_kv_blocks)}` : "—";
    $("stat-max-len").textContent = st.max_model_len ? `${fmt(st.max_model_len)} tokens` : "—";

    const t = performance.now() / 1000;
    charts.throughput.push(t, [tps]);
    charts.requests.push(t, [st.num_requests_running || 0, st.num_requests_waiting || 0]);
    charts.kv.push(t, [kv]);
    charts.latency.push(t, [ttft, tpot]);
    points += 1;
    dashboard.dataset.points = String(points);
    dashboard.dataset.genTokens = String(st.generation_tokens_total || 0);
    redraw();
  }

  function redraw() {
    const t = performance.now() / 1000;
    for (const ch of Object.values(charts)) ch.draw(t);
  }

  window.addEventListener("resize", redraw);
  poll();
  setInterval(poll, 1000);
})();
