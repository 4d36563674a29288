// geoindex page: send a photo to v1/locate, then draw the answer. Plain JS, no build step, no network
// beyond this server: the map is Natural Earth country outlines (static/map/, TopoJSON) in plain SVG.
"use strict";

const W = 800, H = 460, SVG_NS = "http://www.w3.org/2000/svg";
// answer key -> [method id, title]; the method ids are those of the answer's `method` (the one it leads with)
const METHODS = { top5: ["knn", "kNN vote"], classifier_top5: ["classifier", "Classifier"],
                  hybrid_top5: ["hybrid", "Hybrid (kNN + classifier)"], zeroshot_top5: ["zeroshot", "CLIP zero-shot"] };
const PALETTE = ["#2f6fb0", "#d97b29", "#2a9d74", "#c0417a", "#7a5cc2", "#8c6d31", "#3aa0b8", "#b5463c",
                 "#5b8c2a", "#6d6f8c"];
const $ = (id) => document.getElementById(id);
const state = { index: null, land: null, colour: {} };

// A file name is kept on one line (a name starting with "-" must not break after it), the message after it.
function setStatus(text, kind, fileName) {
  const el = $("status");
  el.replaceChildren();
  if (fileName) {
    const name = document.createElement("span");
    name.className = "filename";
    name.textContent = fileName;
    name.title = fileName;
    el.append(name, ": ");
  }
  el.append(text);
  el.className = "status" + (kind ? " " + kind : "");
  document.body.dataset.state = kind || "idle";
}

function svg(tag, attrs, parent) {
  const el = document.createElementNS(SVG_NS, tag);
  for (const [k, v] of Object.entries(attrs || {})) el.setAttribute(k, v);
  if (parent) parent.appendChild(el);
  return el;
}

function pct(p) { return (100 * p).toFixed(p >= 0.995 || p < 0.001 ? 0 : 1) + "%"; }

// ------------------------------------------------------------------ TopoJSON -> rings of [lon, lat]
function topologyRings(topo, objectName) {
  const [sx, sy] = topo.transform.scale, [tx, ty] = topo.transform.translate;
  const arcs = topo.arcs.map((arc) => {
    let x = 0, y = 0;
    return arc.map(([dx, dy]) => { x += dx; y += dy; return [x * sx + tx, y * sy + ty]; });
  });
  const ring = (ids) => {
    const out = [];
    for (const i of ids) {
      const a = i < 0 ? arcs[~i].slice().reverse() : arcs[i];
      for (let j = out.length ? 1 : 0; j < a.length; j++) out.push(a[j]);
    }
    return out;
  };
  const countries = [];
  for (const g of topo.objects[objectName].geometries) {
    const polygons = g.type === "Polygon" ? [g.arcs] : g.type === "MultiPolygon" ? g.arcs : [];
    const rings = [];
    for (const polygon of polygons) for (const r of polygon) {
      const pts = ring(r);
      let x0 = 180, x1 = -180, y0 = 90, y1 = -90;
      for (const [x, y] of pts) { x0 = Math.min(x0, x); x1 = Math.max(x1, x); y0 = Math.min(y0, y); y1 = Math.max(y1, y); }
      rings.push({ pts, box: [x0, y0, x1, y1] });
    }
    countries.push({ name: (g.properties || {}).name || "", rings });
  }
  return countries;
}

// ------------------------------------------------------------------ the map
// Equirectangular around the view's middle latitude (x scaled by its cosine), fitted to the points.
function projection(points) {
  let lon0 = Infinity, lon1 = -Infinity, lat0 = Infinity, lat1 = -Infinity;
  for (const [lon, lat] of points) {
    lon0 = Math.min(lon0, lon); lon1 = Math.max(lon1, lon); lat0 = Math.min(lat0, lat); lat1 = Math.max(lat1, lat);
  }
  if (!points.length) { lon0 = -170; lon1 = 170; lat0 = -55; lat1 = 75; }
  const minSpan = 1.2;  // degrees: even neighbours a street apart show their coast and country
  const padLat = Math.max(minSpan - (lat1 - lat0), 0) / 2 + (lat1 - lat0) * 0.18 + 0.15;
  lat0 = Math.max(-85, lat0 - padLat); lat1 = Math.min(85, lat1 + padLat);
  const k = Math.cos(((lat0 + lat1) / 2) * Math.PI / 180);
  const padLon = Math.max(minSpan / k - (lon1 - lon0), 0) / 2 + (lon1 - lon0) * 0.18 + 0.15 / k;
  lon0 -= padLon; lon1 += padLon;
  const lonC = (lon0 + lon1) / 2, latC = (lat0 + lat1) / 2;
  const scale = Math.min(W / ((lon1 - lon0) * k), H / (lat1 - lat0));
  const project = ([lon, lat]) => [W / 2 + (lon - lonC) * k * scale, H / 2 - (lat - latC) * scale];
  const view = [lonC - W / 2 / (k * scale), latC - H / 2 / scale, lonC + W / 2 / (k * scale), latC + H / 2 / scale];
  return { project, view, degreesAcross: (view[2] - view[0]) };
}

function drawMap(points, result) {
  const proj = projection(points);
  const [v0, v1, v2, v3] = proj.view;
  const land = $("land"), grat = $("graticule"), cities = $("cities"), markers = $("markers");
  for (const g of [land, grat, cities, markers]) g.replaceChildren();
  for (const country of state.land || []) {
    let d = "";
    for (const { pts, box } of country.rings) {
      if (box[2] < v0 || box[0] > v2 || box[3] < v1 || box[1] > v3) continue;  // off screen
      d += "M" + pts.map((p) => proj.project(p).map((c) => c.toFixed(1)).join(",")).join("L") + "Z";
    }
    if (d) svg("title", {}, svg("path", { d, "data-name": country.name }, land)).textContent = country.name;
  }
  const step = [0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 30].find((s) => proj.degreesAcross / s <= 10) || 30;
  let d = "";
  for (let lon = Math.ceil(v0 / step) * step; lon <= v2; lon += step) {
    const [x] = proj.project([lon, 0]); d += `M${x.toFixed(1)},0V${H}`;
  }
  for (let lat = Math.ceil(v1 / step) * step; lat <= v3; lat += step) {
    const [, y] = proj.project([0, lat]); d += `M0,${y.toFixed(1)}H${W}`;
  }
  svg("path", { d }, grat);
  for (const c of (state.index && state.index.cities) || []) {
    if (c.lat == null || c.lon == null || c.lon < v0 || c.lon > v2 || c.lat < v1 || c.lat > v3) continue;
    const [x, y] = proj.project([c.lon, c.lat]);
    svg("circle", { cx: x, cy: y, r: 3 }, cities);
    const nearRightEdge = x > W - 8 * c.name.length;  // label to the left of the dot, so it is not cut off
    svg("text", { x: nearRightEdge ? x - 6 : x + 6, y: y - 6, "text-anchor": nearRightEdge ? "end" : "start" },
        cities).textContent = c.name;
  }
  if (!result) return;
  const spot = atSpot(result);
  result.neighbours.forEach((n, i) => {
    if (n.lat == null || n.lon == null) return;
    const [x, y] = proj.project([n.lon, n.lat]);
    const g = svg("g", { class: "marker neighbour" + (spot.has(n.row) ? " at-spot" : ""), "data-rank": i + 1,
                         "data-city": n.city,
                         transform: `translate(${x.toFixed(1)},${y.toFixed(1)})` }, markers);
    svg("title", {}, g).textContent = `#${i + 1} ${n.city}, similarity ${n.similarity.toFixed(3)}`;
    svg("circle", { r: 9, fill: colourOf(n.city) }, g);
    svg("text", {}, g).textContent = i + 1;
  });
  if (result.gps && result.gps.lat != null) {
    const [x, y] = proj.project([result.gps.lon, result.gps.lat]);
    const g = svg("g", { class: "marker estimate", transform: `translate(${x.toFixed(1)},${y.toFixed(1)})` }, markers);
    svg("title", {}, g).textContent = `GPS estimate ${result.gps.lat.toFixed(5)}, ${result.gps.lon.toFixed(5)}`;
    svg("circle", { r: 17 }, g);
    svg("path", { d: "M0,-12 L3.5,-4 L12,-3.7 L5.5,2 L7.4,10.5 L0,6 L-7.4,10.5 L-5.5,2 L-12,-3.7 L-3.5,-4 Z" }, g);
  }
}

// The rows of the indexed photos the street-level answer stands on (none at city level): drawn and listed apart.
function atSpot(result) {
  const gps = result.gps || {};
  return new Set(gps.level === "street" ? (gps.cluster || []).map((c) => c.row) : []);
}

function colourOf(city) {
  if (!(city in state.colour)) state.colour[city] = PALETTE[Object.keys(state.colour).length % PALETTE.length];
  return state.colour[city];
}

// ------------------------------------------------------------------ the answer
function renderAnswer(result, timings) {
  $("answer").hidden = false;
  $("city").textContent = result.name || result.city;
  $("city").dataset.city = result.city;
  $("city").dataset.method = result.method || "knn";
  $("lead").textContent = result.method_note ? "answer from " + result.method_note : "";
  // The API's unlike_indexed flag, said as plainly as `geoindex query` says it: the answer is a guess.
  const unlike = Boolean(result.unlike_indexed);
  $("caveat").hidden = !unlike;
  $("city").classList.toggle("guess", unlike);
  $("kicker").textContent = unlike ? "Best guess (unlike anything indexed)" : "Predicted city";
  document.body.dataset.unlike = String(unlike);
  if (unlike) {
    const cities = ((state.index && state.index.cities) || []).map((c) => c.name);
    const sim = result.top_similarity == null ? "" : `The nearest indexed photo has similarity ${result.top_similarity.toFixed(3)}` +
      (result.unlike_threshold == null ? ". " : `, below the ${result.unlike_threshold.toFixed(3)} that 99% of validation photos exceed. `);
    $("caveat-detail").textContent = sim + "The photo may be from none of the index's " +
      (cities.length ? `${cities.length} cities (${cities.join("; ")})` : "cities") + ": read the figures below as which of these it resembles most, not where it was taken.";
  }
  const gps = result.gps || {};
  $("gps").textContent = gps.lat == null ? "no GPS estimate (the index holds no coordinates)"
    : `GPS estimate ${gps.lat.toFixed(4)}, ${gps.lon.toFixed(4)}` + gpsLevel(gps);
  const methods = $("methods");
  methods.replaceChildren();
  const boxes = [];
  for (const [key, value] of Object.entries(result)) {
    if (!(key === "top5" || key.endsWith("_top5")) || !Array.isArray(value) || !value.length) continue;
    const [cls, baseTitle] = METHODS[key] || ["other", key.replace(/_top5$/, "").replace(/_/g, " ")];
    const title = cls === "classifier" && result.classifier ? `Classifier (${result.classifier})` : baseTitle;
    const box = document.createElement("div");
    box.className = `method ${cls}`;
    box.dataset.method = cls;
    const leads = cls === (result.method || "knn");
    const agrees = value[0].city === result.city;
    box.innerHTML = `<h4><span><span class="title"></span><span class="leads"></span></span><span class="pick"></span></h4>`;
    box.querySelector(".title").textContent = title;
    box.querySelector(".leads").textContent = leads ? "leads" : "";
    box.querySelector(".pick").textContent = (agrees ? "" : "says ") + (value[0].name || value[0].city) +
      " " + pct(value[0].probability);
    for (const [i, c] of value.slice(0, 3).entries()) {
      const row = document.createElement("div");
      row.className = "bar-row" + (i === 0 ? " top" : "");
      row.innerHTML = `<span class="label"></span><span class="value"></span><span class="track"><span class="fill"></span></span>`;
      row.querySelector(".label").textContent = c.name || c.city;
      row.querySelector(".fill").style.width = (100 * c.probability).toFixed(1) + "%";
      row.querySelector(".value").textContent = pct(c.probability);
      box.appendChild(row);
    }
    boxes.push([leads, box]);
  }
  boxes.sort((a, b) => b[0] - a[0]);  // the leading method first, the others beside it in the answer's order
  for (const [, box] of boxes) methods.appendChild(box);
  const t = result.timings_ms || {};
  $("timings").textContent = `answered in ${Math.round(timings.total)} ms (decode ${Math.round(t.decode || 0)} ms, ` +
    `model ${Math.round(t.model_batch || 0)} ms in a batch of ${t.batch_size || 1})`;

  const list = $("neighbours");
  list.replaceChildren();
  const spot = atSpot(result);
  result.neighbours.forEach((n, i) => {
    const li = document.createElement("li");
    li.dataset.city = n.city;
    if (spot.has(n.row)) li.classList.add("at-spot");
    const img = document.createElement("img");
    img.alt = `indexed photo ${i + 1} (${n.city})`;
    img.loading = "lazy";
    if (n.thumbnail) img.src = n.thumbnail;  // names the build: a thumbnail never comes from a replaced index
    else if (n.row != null) img.src = `v1/photos/${n.row}`;
    const meta = document.createElement("div");
    meta.className = "meta";
    meta.innerHTML = `<span class="rank"></span><span class="name"></span><span class="sim"></span>`;
    meta.querySelector(".rank").textContent = i + 1;
    meta.querySelector(".rank").style.background = colourOf(n.city);
    meta.querySelector(".name").textContent = displayName(n.city);
    meta.querySelector(".sim").textContent = "sim " + n.similarity.toFixed(3);
    li.append(img, meta);
    list.appendChild(li);
  });
  $("evidence").hidden = false;
  const points = result.neighbours.filter((n) => n.lat != null && n.lon != null).map((n) => [n.lon, n.lat]);
  if (gps.lat != null) points.push([gps.lon, gps.lat]);
  drawMap(points, result);
}

function displayName(city) {
  const c = ((state.index && state.index.cities) || []).find((x) => x.city === city);
  return c ? c.name : city;
}

async function locate(file) {
  if (!file) return;
  const photo = $("photo");
  if (photo.dataset.url) URL.revokeObjectURL(photo.dataset.url);
  photo.dataset.url = URL.createObjectURL(file);
  photo.src = photo.dataset.url;
  photo.hidden = false;
  $("drop").classList.add("has-photo");
  setStatus("locating…", "busy", file.name);
  const form = new FormData();
  form.append("image", file, file.name);
  const started = performance.now();
  try {
    const response = await fetch("v1/locate", { method: "POST", body: form });
    const payload = await response.json().catch(() => ({ error: `HTTP ${response.status}` }));
    if (!response.ok) throw new Error(payload.error || `HTTP ${response.status}`);
    renderAnswer(payload.results[0], { total: performance.now() - started });
    const answer = payload.results[0];
    setStatus(answer.unlike_indexed ? "done: unlike anything indexed, the answer is a guess" : "done", "done", file.name);
  } catch (err) {
    setStatus(err.message, "error", file.name);
  }
}

async function init() {
  setStatus("", "loading");
  const drop = $("drop"), input = $("file");
  input.addEventListener("change", () => locate(input.files[0]));
  for (const ev of ["dragenter", "dragover"]) drop.addEventListener(ev, (e) => { e.preventDefault(); drop.classList.add("over"); });
  for (const ev of ["dragleave", "drop"]) drop.addEventListener(ev, (e) => { e.preventDefault(); drop.classList.remove("over"); });
  drop.addEventListener("drop", (e) => locate(e.dataTransfer.files[0]));
  try {
    const [index, topo] = await Promise.all([
      fetch("v1/index").then((r) => r.json()),
      fetch("static/map/countries-50m.json").then((r) => r.json()),
    ]);
    state.index = index;
    state.land = topologyRings(topo, "countries");
    index.cities.forEach((c) => colourOf(c.city));
    const info = $("index-info");
    info.textContent = `index ${index.name} · ${index.backbone} · ${index.cities.length} cities · ` +
      `${index.counts.train.toLocaleString()} photos · methods: ${index.methods.join(", ")}` +
      (index.answer_method_note ? ` · answers from ${index.answer_method_note}` : "");
    if (index.synthetic) {
      const s = document.createElement("span");
      s.className = "synthetic";
      s.textContent = " · SYNTHETIC images";
      info.appendChild(s);
    }
    drawMap(index.cities.filter((c) => c.lat != null && c.lon != null).map((c) => [c.lon, c.lat]), null);
    setStatus("", "ready");
  } catch (err) {
    setStatus(`cannot load the index description: ${err.message}`, "error");
  }
}

init();

// Street level when a cluster of indexed photos within 25 m of each other carries the vote, or when spatial
// verification matched the photo to one indexed photo (gps.inliers); else a city-level guess.
function gpsLevel(gps) {
  const radius = gps.radius_m == null ? ""
    : gps.radius_m >= 1000 ? `, 80% of val answers within ${(gps.radius_m / 1000).toFixed(1)} km`
    : `, 80% of val answers within ${Math.round(gps.radius_m)} m`;
  if (gps.level === "street" && gps.inliers) {
    return ` (street level: an indexed photo shares ${gps.inliers} matched points with it${radius})`;
  }
  if (gps.level === "street") {
    const n = (gps.cluster || []).length;
    return ` (street level: ${n} indexed photo${n === 1 ? "" : "s"} of this spot${radius})`;
  }
  return gps.level ? ` (city level${radius})` : "";
}
