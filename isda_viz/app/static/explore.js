// isda-viz explore: the page. Everything comes from this app's own routes (app/server.py); nothing from the network.
"use strict";

const state = {
  info: null,        // /api/state
  view: null,        // the open image (/api/open, /api/upload)
  latest: null,      // the slider position not yet sent: {t, strength, seq, time}
  inflight: false,   // one move request at a time: positions arriving meanwhile are coalesced to the latest
  seq: 0,
  thumbnail: null,
};
// What bench/explore.py and the browser tests read: per displayed picture, the milliseconds from the input
// event of the position it shows to the next animation frame after it is decoded in the page (`ms`), and its
// parts: event to request sent (`waited_ms`: a request in flight), the request (`request_ms`), and response to
// that frame (`display_ms`).
window.exploreLatencies = [];
window.explorePictures = 0;

const $ = (id) => document.getElementById(id);

async function api(path, body, type = "application/json") {
  const init = body === undefined ? {} : {
    method: "POST", headers: {"Content-Type": type}, body: type === "application/json" ? JSON.stringify(body) : body,
  };
  const response = await fetch(path, init);
  let data;
  try { data = await response.json(); } catch (e) { data = {error: `the app answered ${response.status}`}; }
  if (!response.ok) {
    const error = new Error(data.error || response.statusText);
    error.status = response.status;
    throw error;
  }
  return data;
}

function showMessage(text) {
  const box = $("message");
  box.textContent = text || "";
  box.hidden = !text;
}

function setStatus(text) { $("status").textContent = text || ""; }

function className(index) {
  return index === null || index === undefined ? "—" : state.info.class_names[index];
}

function describe(picture, extra) {
  const top = picture.top.map(([c, p]) => `${className(c)} ${(100 * p).toFixed(1)}%`).join(", ");
  const parts = [`<span class="${picture.predicted === state.view.label ? "" : "changed"}">` +
                 `${escapeHtml(className(picture.predicted))}</span>`, `top-3: ${escapeHtml(top)}`];
  if (picture.judged !== null && picture.judged !== undefined) parts.push(`judge: ${escapeHtml(className(picture.judged))}`);
  if (extra) parts.push(extra);
  return parts.join("<br>");
}

function escapeHtml(text) {
  return String(text).replace(/[&<>"']/g, (c) => ({"&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;"}[c]));
}

async function setImage(img, src) {
  img.src = src;
  try { await img.decode(); } catch (e) { /* a replaced source: the newer one is shown */ }
}

const nextFrame = () => new Promise((resolve) => requestAnimationFrame(() => resolve(performance.now())));

async function showPicture(picture) {
  const error = picture.reached_shift_error === null ? "at a: the reconstruction itself"
    : `reached-shift error ${picture.reached_shift_error.toFixed(3)}`;
  await Promise.all([setImage($("current"), picture.png), setImage($("change"), picture.change)]);
  $("current-class").innerHTML = describe(picture, `${error} · RMS change ${picture.pixel_distance.toFixed(3)}`);
  $("current").dataset.seq = String(picture.seq === undefined ? 0 : picture.seq);
  window.explorePictures += 1;
  return nextFrame();
}

// -- the sliders ----------------------------------------------------------------------------------------------
function position() {
  const t = Array.from(document.querySelectorAll("#sliders input")).map((s) => Number(s.value));
  return {t, strength: Number($("strength").value)};
}

function showValues() {
  document.querySelectorAll("#sliders input").forEach((s) => {
    s.nextElementSibling.textContent = `t ${Number(s.value) >= 0 ? "+" : ""}${Number(s.value).toFixed(1)}`;
  });
  $("strength-value").textContent = Number($("strength").value).toFixed(2);
}

function onSliderInput(event) {
  showValues();
  if (!state.view) return;
  state.seq += 1;
  state.latest = {...position(), seq: state.seq, time: event && event.timeStamp ? event.timeStamp : performance.now()};
  pump();
}

async function pump() {
  if (state.inflight || !state.latest || !state.view) return;
  const sent = state.latest;
  const view = state.view.view;
  state.latest = null;
  state.inflight = true;
  document.body.classList.add("busy");
  setStatus(state.info.searching ? "searching (seconds)…" : "computing…");
  try {
    const asked = performance.now();
    const picture = await api("/api/move", {view, t: sent.t, strength: sent.strength, seq: sent.seq});
    const answered = performance.now();
    if (state.view && state.view.view === view) {   // not an image the page has left meanwhile
      const shown = await showPicture(picture);
      if (picture.seq === sent.seq) {
        window.exploreLatencies.push({ms: shown - sent.time, seq: sent.seq, waited_ms: asked - sent.time,
                                      request_ms: answered - asked, display_ms: shown - answered});
      }
    }
    showMessage("");
  } catch (error) {
    showMessage(error.message);
  } finally {
    state.inflight = false;
    document.body.classList.remove("busy");
    setStatus("");
    pump();
  }
}

function buildSliders(view) {
  const box = $("sliders");
  box.textContent = "";
  const range = state.info.range;
  view.directions.forEach((d) => {
    const row = document.createElement("div");
    row.className = "slider-row";
    const label = document.createElement("label");
    label.htmlFor = `u${d.k}`;
    label.textContent = `u${d.k} · ${(100 * d.share).toFixed(1)}% of tr Σ_y`;
    const input = document.createElement("input");
    Object.assign(input, {type: "range", id: `u${d.k}`, min: -range, max: range, step: 0.1, value: 0});
    input.className = "direction";
    input.addEventListener("input", onSliderInput);
    row.append(label, input, document.createElement("output"));
    box.append(row);
  });
  showValues();
}

// -- opening images -------------------------------------------------------------------------------------------
async function openView(request) {
  setStatus(state.info.searching ? "reconstructing (a search: seconds)…" : "reconstructing…");
  try {
    const view = await request();
    state.view = view;
    state.latest = null;
    buildSliders(view);
    await setImage($("original"), view.original);
    await setImage($("reconstruction"), view.reconstruction.png);
    $("original-class").innerHTML = describe({predicted: view.original_predicted, top: view.original_top,
                                              judged: view.original_judged}, `label: ${escapeHtml(className(view.label))}`);
    $("reconstruction-class").innerHTML = describe(view.reconstruction,
      `feature error ${view.reconstruction.feature_error.toFixed(3)} · PSNR ${view.reconstruction.psnr.toFixed(1)} dB`);
    await showPicture(view.reconstruction);
    $("draws").hidden = true;
    showMessage("");
  } catch (error) {
    showMessage(error.message);
  } finally {
    setStatus("");
  }
}

function openThumbnail(index) {
  document.querySelectorAll(".thumb").forEach((t) => t.classList.toggle("selected", Number(t.dataset.index) === index));
  state.thumbnail = index;
  return openView(() => api("/api/open", {thumbnail: index}));
}

const MAX_UPLOAD = 32 * 1024 * 1024;

function onUpload() {
  const file = $("upload-file").files[0];
  if (!file) return;
  if (file.size > MAX_UPLOAD) { showMessage(`${file.name} is ${file.size.toLocaleString()} bytes; uploads may be at most 32 MiB`); return; }
  const query = new URLSearchParams({label: $("upload-label").value, name: file.name});
  $("upload-file").value = "";
  return openView(() => api(`/api/upload?${query}`, file, "application/octet-stream"));
}

// -- draw, refine, save ---------------------------------------------------------------------------------------
function strip(box, pictures) {
  box.textContent = "";
  pictures.forEach((p) => {
    const figure = document.createElement("figure");
    const img = document.createElement("img");
    img.src = p.png;
    img.alt = className(p.predicted);
    const caption = document.createElement("figcaption");
    caption.textContent = className(p.predicted);
    if (p.predicted !== state.view.label) caption.className = "changed";
    figure.append(img, caption);
    box.append(figure);
  });
}

async function action(label, run) {
  if (!state.view) return;
  setStatus(label);
  try {
    await run();
    showMessage("");
  } catch (error) {
    showMessage(error.message);
    setStatus("");
  }
}

function onDraw() {
  return action(state.info.searching ? "drawing (16 searches: a while)…" : "drawing…", async () => {
    const drawn = await api("/api/draw", {view: state.view.view, strength: Number($("strength").value)});
    strip($("draws-isda"), drawn.isda);
    strip($("draws-isotropic"), drawn.isotropic);
    $("draws").hidden = false;
    setStatus(`drew 8 + 8 at λ = ${drawn.strength.toFixed(2)}`);
  });
}

function onRefine() {
  return action("refining…", async () => {
    const picture = await api("/api/refine", {view: state.view.view});
    await showPicture(picture);
    setStatus("refined");
  });
}

function onSave() {
  return action("saving…", async () => {
    const saved = await api("/api/save", {view: state.view.view, name: $("save-name").value.trim()});
    setStatus(`saved to ${saved.folder}`);
  });
}

function onReset() {
  document.querySelectorAll("#sliders input").forEach((s) => { s.value = 0; });
  onSliderInput(null);
}

// -- start ----------------------------------------------------------------------------------------------------
function buildThumbnails(info) {
  const box = $("thumbnails");
  const rows = new Map();
  info.thumbnails.forEach((t) => {
    if (!rows.has(t.label)) {
      const row = document.createElement("div");
      row.className = "class-row";
      const name = document.createElement("span");
      name.textContent = info.class_names[t.label];
      row.append(name);
      rows.set(t.label, row);
      box.append(row);
    }
    const img = document.createElement("img");
    Object.assign(img, {src: t.png, className: "thumb", alt: `${info.class_names[t.label]} (${t.source})`, title: t.source});
    img.dataset.index = t.index;
    img.addEventListener("click", () => openThumbnail(t.index));
    rows.get(t.label).append(img);
  });
  info.class_names.forEach((name, i) => {
    const option = document.createElement("option");
    option.value = String(i);
    option.textContent = name;
    $("upload-label").append(option);
  });
}

async function start() {
  try {
    const info = await api("/api/state");
    state.info = info;
    $("models").textContent = `classifier ${info.classifier} · generator ${info.generator} · pictures by ${info.inverter}`;
    info.notes.forEach((note) => {
      const p = document.createElement("p");
      p.textContent = note;
      $("notes").append(p);
    });
    Object.assign($("strength"), {max: info.strength_max, value: info.strength});
    $("strength").addEventListener("input", onSliderInput);
    buildThumbnails(info);
    showValues();
    $("upload-file").addEventListener("change", onUpload);
    $("draw").addEventListener("click", onDraw);
    $("refine").addEventListener("click", onRefine);
    $("save").addEventListener("click", onSave);
    $("reset").addEventListener("click", onReset);
    if (info.thumbnails.length) await openThumbnail(0);
  } catch (error) {
    showMessage(error.message);
  }
  document.body.dataset.ready = "1";
}

start();
