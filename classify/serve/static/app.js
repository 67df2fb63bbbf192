// The page of `classify serve`: no framework, no build step, nothing loaded from elsewhere.
// Each dropped or chosen image is sent on its own to POST /predict (so several images travel as concurrent
// requests, which the server batches), then to POST /similar when the model card says training images are indexed.
// Text from the server is only ever set as textContent.
"use strict";

const state = { similar: false, topK: 5, card: Promise.resolve() };

function $(id) { return document.getElementById(id); }

function percent(x) { return `${(100 * x).toFixed(1)}%`; }

function addFact(dl, name, value) {
  const dt = document.createElement("dt");
  dt.textContent = name;
  const dd = document.createElement("dd");
  dd.textContent = value;
  dl.append(dt, dd);
}

async function loadCard() {
  const loading = $("card-loading");
  try {
    const response = await fetch("/model");
    const card = await response.json();
    state.similar = Boolean(card.similar && card.similar.available);
    state.topK = card.top_k || 5;
    const facts = $("card-facts");
    addFact(facts, "model", card.name);
    addFact(facts, "backbone", card.backbone);
    if (card.val && typeof card.val.accuracy === "number") {
      addFact(facts, "val accuracy", percent(card.val.accuracy));
      if (typeof card.val.macro_f1 === "number") addFact(facts, "val macro-F1", card.val.macro_f1.toFixed(3));
      if (card.val.images) addFact(facts, "val images", String(card.val.images));
    } else {
      addFact(facts, "val accuracy", "not measured (ImageNet classes)");
    }
    addFact(facts, "input", `${card.preprocessing.crop} px${card.preprocessing.tta ? " + flip" : ""}`);
    addFact(facts, "similar", state.similar ? `${card.similar.images} training images` : "unavailable");
    facts.hidden = false;
    const list = $("card-classes");
    for (const name of card.classes.slice(0, 200)) {
      const li = document.createElement("li");
      li.textContent = name;
      list.append(li);
    }
    if (card.classes.length > 200) {
      const li = document.createElement("li");
      li.textContent = `… and ${card.classes.length - 200} more`;
      list.append(li);
    }
    $("card-classes-title").textContent = `Classes (${card.classes.length})`;
    list.hidden = $("card-classes-title").hidden = false;
    loading.remove();
  } catch (error) {
    loading.textContent = `model card unavailable: ${error}`;
  }
}

function upload(file) {
  const form = new FormData();
  form.append("file", file, file.name);
  return form;
}

async function postJSON(url, file) {
  const response = await fetch(url, { method: "POST", body: upload(file) });
  let body;
  try {
    body = await response.json();
  } catch (error) {
    body = { error: `the server answered ${response.status} without JSON` };
  }
  return { ok: response.ok, body };
}

function showError(article, message) {
  const p = article.querySelector(".error");
  p.textContent = message;
  p.hidden = false;
  article.querySelector(".label").textContent = "cannot classify";
  article.classList.add("failed");
}

function showPrediction(article, prediction) {
  if (prediction.error) {
    showError(article, prediction.error);
    return;
  }
  article.querySelector(".label").textContent = prediction.label;
  article.querySelector(".confidence").textContent = `confidence ${percent(prediction.confidence)}`;
  const list = article.querySelector(".topk");
  for (const { label, score } of prediction.topk) {
    const li = document.createElement("li");
    const name = document.createElement("span");
    name.className = "name";
    name.textContent = label;
    name.title = label;
    const track = document.createElement("span");
    track.className = "track";
    const bar = document.createElement("span");
    bar.className = "bar";
    bar.style.display = "block";
    bar.style.width = percent(Math.max(0, Math.min(1, score)));
    track.append(bar);
    const value = document.createElement("span");
    value.className = "score";
    value.textContent = percent(score);
    li.append(name, track, value);
    list.append(li);
  }
  article.classList.add("done");
}

function showSimilar(article, result) {
  if (!result || result.error || !result.similar || result.similar.length === 0) return;
  const box = article.querySelector(".neighbours");
  for (const item of result.similar) {
    const figure = document.createElement("figure");
    const img = document.createElement("img");
    img.src = item.thumbnail;
    img.alt = `${item.label}: ${item.path}`;
    img.title = `${item.path} (similarity ${item.score.toFixed(3)})`;
    img.loading = "lazy";
    const caption = document.createElement("figcaption");
    caption.textContent = `${item.label} · ${item.score.toFixed(2)}`;
    figure.append(img, caption);
    box.append(figure);
  }
  article.querySelector(".similar").hidden = false;
}

async function classify(file) {
  const article = $("result-template").content.firstElementChild.cloneNode(true);
  article.querySelector(".filename").textContent = file.name;
  const thumb = article.querySelector(".thumb");
  thumb.addEventListener("error", () => { thumb.style.visibility = "hidden"; });  // not something a browser shows
  thumb.src = URL.createObjectURL(file);
  thumb.alt = file.name;
  $("results").prepend(article);
  try {
    const { ok, body } = await postJSON("/predict", file);
    const prediction = body.predictions && body.predictions[0];
    if (prediction) showPrediction(article, prediction);
    else showError(article, body.error || "no answer");
    await state.card;
    if (!ok || !state.similar || (prediction && prediction.error)) return;
    const similar = await postJSON("/similar?k=6", file);
    if (similar.ok) showSimilar(article, similar.body.results && similar.body.results[0]);
  } catch (error) {
    showError(article, `request failed: ${error}`);
  }
}

function handle(files) {
  const list = Array.from(files || []);
  if (list.length === 0) return;
  $("status").textContent = `${list.length} image${list.length > 1 ? "s" : ""} sent`;
  list.forEach(classify);
}

function wire() {
  const drop = $("drop");
  const input = $("files");
  input.addEventListener("change", () => { handle(input.files); input.value = ""; });
  for (const kind of ["dragenter", "dragover"]) {
    drop.addEventListener(kind, (event) => { event.preventDefault(); drop.classList.add("over"); });
  }
  for (const kind of ["dragleave", "drop"]) {
    drop.addEventListener(kind, (event) => { event.preventDefault(); drop.classList.remove("over"); });
  }
  drop.addEventListener("drop", (event) => handle(event.dataTransfer.files));
  state.card = loadCard();
}

document.addEventListener("DOMContentLoaded", wire);
