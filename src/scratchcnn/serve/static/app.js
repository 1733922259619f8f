// The draw-a-digit page: a canvas, predictions from /api/predict while you draw, and the
// compare report from /api/report. Everything the server sends is put into the page as text
// nodes or pixels, never parsed as HTML.
"use strict";

const DEBOUNCE_MS = 150;
const INK_WIDTH = 20;

const $ = (id) => document.getElementById(id);

function element(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

// -- tabs --------------------------------------------------------------------------------------

let reportLoaded = false;

function showView(name) {
  for (const tab of document.querySelectorAll(".tab")) {
    tab.classList.toggle("active", tab.dataset.view === name);
  }
  $("view-draw").hidden = name !== "draw";
  $("view-report").hidden = name !== "report";
  if (name === "report" && !reportLoaded) {
    reportLoaded = true;
    loadReport();
  }
}

// -- drawing -----------------------------------------------------------------------------------

const pad = $("pad");
const ctx = pad.getContext("2d");
let drawing = false;
let inked = false;
let last = null;

function clearPad() {
  ctx.fillStyle = "#fff";
  ctx.fillRect(0, 0, pad.width, pad.height);
  inked = false;
  resetAnswers();
}

function position(event) {
  const box = pad.getBoundingClientRect();
  return {
    x: (event.clientX - box.left) * (pad.width / box.width),
    y: (event.clientY - box.top) * (pad.height / box.height),
  };
}

function stroke(from, to) {
  ctx.strokeStyle = "#000";
  ctx.lineWidth = INK_WIDTH;
  ctx.lineCap = "round";
  ctx.lineJoin = "round";
  ctx.beginPath();
  ctx.moveTo(from.x, from.y);
  ctx.lineTo(to.x, to.y);
  ctx.stroke();
  inked = true;
}

pad.addEventListener("pointerdown", (event) => {
  event.preventDefault();
  try {
    pad.setPointerCapture(event.pointerId);  // keep the stroke when the pointer leaves the pad
  } catch (error) {
    // a pointer that is already gone: draw without capture
  }
  drawing = true;
  last = position(event);
  stroke(last, last);
  schedulePredict();
});
pad.addEventListener("pointermove", (event) => {
  if (!drawing) return;
  event.preventDefault();
  const point = position(event);
  stroke(last, point);
  last = point;
  schedulePredict();
});
for (const name of ["pointerup", "pointercancel"]) {
  pad.addEventListener(name, () => {
    if (!drawing) return;
    drawing = false;
    schedulePredict(0);
  });
}

// -- predictions -------------------------------------------------------------------------------

let timer = null;
let inFlight = false;
let again = false;

function schedulePredict(delay = DEBOUNCE_MS) {
  clearTimeout(timer);
  timer = setTimeout(predict, delay);
}

async function predict() {
  if (!inked) return;
  if (inFlight) {  // one request at a time; the newest drawing goes next
    again = true;
    return;
  }
  inFlight = true;
  try {
    const response = await fetch("/api/predict", {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ image: pad.toDataURL("image/png") }),
    });
    const body = await response.json();
    if (!response.ok) throw new Error(body.error || `HTTP ${response.status}`);
    if (inked) showResult(body);  // not if cleared meanwhile
    $("status").textContent = "";
  } catch (error) {
    $("status").textContent = `prediction failed: ${error.message}`;
  } finally {
    inFlight = false;
    if (again) {
      again = false;
      predict();
    }
  }
}

let classes = [];

function resetAnswers() {
  for (const side of ["numpy", "torch"]) {
    $(`${side}-prediction`).textContent = "?";
    $(`${side}-time`).textContent = "";
    fillBars(side, null);
  }
  $("feature-maps").replaceChildren();
  $("seen").getContext("2d").clearRect(0, 0, 28, 28);
  document.body.dataset.predictions = "0";
}

function fillBars(side, answer) {
  const list = $(`${side}-bars`);
  list.replaceChildren();
  classes.forEach((name, index) => {
    const p = answer ? answer.probabilities[index] : 0;
    const row = element("li", answer && index === answer.index ? "top" : "");
    const bar = element("span", "bar");
    const fill = element("span");
    fill.style.width = `${(100 * p).toFixed(2)}%`;
    bar.append(fill);
    const value = element("span", "value", answer ? `${(100 * p).toFixed(1)}%` : "");
    if (answer) value.dataset.probability = String(p);  // full precision, for checks
    row.append(element("span", "class", name), bar, value);
    list.append(row);
  });
}

function showAnswer(side, answer) {
  $(`answer-${side}`).classList.toggle("unavailable", !answer);
  if (!answer) return;
  $(`${side}-prediction`).textContent = answer.label;
  $(`${side}-time`).textContent = `${answer.milliseconds.toFixed(2)} ms`;
  fillBars(side, answer);
}

function bytes(base64) {
  const text = atob(base64);
  const out = new Uint8Array(text.length);
  for (let i = 0; i < text.length; i++) out[i] = text.charCodeAt(i);
  return out;
}

function grayCanvas(levels, offset, height, width, scale) {
  const canvas = element("canvas");
  canvas.width = width;
  canvas.height = height;
  canvas.style.width = `${width * scale}px`;
  canvas.style.height = `${height * scale}px`;
  paintGray(canvas, levels, offset, height, width);
  return canvas;
}

function paintGray(canvas, levels, offset, height, width) {
  const context = canvas.getContext("2d");
  const image = context.createImageData(width, height);
  for (let i = 0; i < height * width; i++) {
    const v = levels[offset + i];
    image.data[4 * i] = v;
    image.data[4 * i + 1] = v;
    image.data[4 * i + 2] = v;
    image.data[4 * i + 3] = 255;
  }
  context.putImageData(image, 0, 0);
}

function showResult(result) {
  showAnswer("numpy", result.numpy);
  showAnswer("torch", result.torch);
  paintGray($("seen"), bytes(result.input.data), 0, result.input.height, result.input.width);
  const layers = [];
  for (const map of result.feature_maps) {
    const levels = bytes(map.data);
    const scale = map.height >= 20 ? 2 : 3;
    const grid = element("div", "maps");
    for (let c = 0; c < map.channels; c++) {
      grid.append(grayCanvas(levels, c * map.height * map.width, map.height, map.width, scale));
    }
    const block = element("div", "layer");
    block.append(element("h3", "",
      `layer ${map.layer}: ${map.description} -> ${map.channels} x ${map.height} x ${map.width}`),
      grid);
    layers.push(block);
  }
  $("feature-maps").replaceChildren(...layers);
  document.body.dataset.predictions = String(Number(document.body.dataset.predictions || 0) + 1);
}

// -- the compare report ------------------------------------------------------------------------

// `code` and **bold** marks as elements, the rest as text.
function inline(text) {
  const fragment = document.createDocumentFragment();
  for (const part of text.split(/(`[^`]+`|\*\*[^*]+\*\*)/)) {
    if (!part) continue;
    if (part.startsWith("`") && part.endsWith("`") && part.length > 1) {
      fragment.append(element("code", "", part.slice(1, -1)));
    } else if (part.startsWith("**") && part.endsWith("**") && part.length > 3) {
      fragment.append(element("strong", "", part.slice(2, -2)));
    } else {
      fragment.append(document.createTextNode(part));
    }
  }
  return fragment;
}

function renderBlock(block) {
  switch (block.type) {
    case "heading": {
      const node = element(`h${Math.min(6, Math.max(2, block.level + 1))}`);
      node.append(inline(block.text));
      return node;
    }
    case "list": {
      const node = element("ul");
      for (const item of block.items) {
        const li = element("li");
        li.append(inline(item));
        node.append(li);
      }
      return node;
    }
    case "table": {
      const table = element("table");
      const head = element("tr");
      for (const cell of block.header) {
        const th = element("th");
        th.append(inline(cell));
        head.append(th);
      }
      table.append(element("thead"));
      table.tHead.append(head);
      const body = element("tbody");
      for (const row of block.rows) {
        const tr = element("tr");
        for (const cell of row) {
          const td = element("td");
          td.append(inline(cell));
          tr.append(td);
        }
        body.append(tr);
      }
      table.append(body);
      return table;
    }
    case "image": {
      const img = element("img");
      img.alt = block.alt || block.name;
      img.src = `/api/report/plots/${encodeURIComponent(block.name)}`;
      img.dataset.plot = block.name;
      return img;
    }
    default: {
      const node = element("p");
      node.append(inline(block.text || ""));
      return node;
    }
  }
}

async function loadReport() {
  try {
    const response = await fetch("/api/report");
    const report = await response.json();
    if (!response.ok) throw new Error(report.error || `HTTP ${response.status}`);
    if (!report.available) {
      $("report-source").textContent = "";
      $("report").replaceChildren(element("p", "", report.hint));
      return;
    }
    $("report-source").textContent = `from ${report.directory}`;
    $("report").replaceChildren(...report.blocks.map(renderBlock));
  } catch (error) {
    $("report").replaceChildren(element("p", "status", `cannot load the report: ${error.message}`));
  }
}

// -- start -------------------------------------------------------------------------------------

async function loadInfo() {
  try {
    const response = await fetch("/api/info");
    const info = await response.json();
    if (!response.ok) throw new Error(info.error || `HTTP ${response.status}`);
    classes = info.classes;
    $("model-info").textContent =
      `${info.architecture} trained on ${info.dataset}, epoch ${info.epoch} (${info.checkpoint})` +
      (info.torch ? `; PyTorch ${info.torch}` : "; PyTorch not installed");
    if (!info.torch) $("answer-torch").classList.add("unavailable");
    resetAnswers();
  } catch (error) {
    $("model-info").textContent = `cannot reach the server: ${error.message}`;
  }
}

for (const tab of document.querySelectorAll(".tab")) {
  tab.addEventListener("click", () => showView(tab.dataset.view));
}
$("clear").addEventListener("click", clearPad);
clearPad();
loadInfo();
