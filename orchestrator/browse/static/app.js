// orchestrator browse: a small single-page app over the JSON endpoints (see browse/app.py).
// Routes live in the URL fragment, so every view has a link: #/ (datasets), #/d/NAME?v=&q=&p=
// (a version or slice), #/i/NAME?v=&id= (an item), #/diff/NAME?a=&b=&q=, #/stats/NAME?v=&q=.
"use strict";

const PAGE = 48;
const main = document.getElementById("main");
const crumbs = document.getElementById("crumbs");
const SVG = "http://www.w3.org/2000/svg";

function el(tag, attrs = {}, ...children) {
  const node = tag.startsWith("svg:") ? document.createElementNS(SVG, tag.slice(4)) : document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v === undefined || v === null) continue;
    if (k === "text") node.textContent = v;
    else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else node.setAttribute(k, v);
  }
  for (const c of children.flat()) if (c !== null && c !== undefined) node.append(c);
  return node;
}

async function api(path, params = {}) {
  const qs = new URLSearchParams(Object.entries(params).filter(([, v]) => v !== undefined && v !== null && v !== ""));
  const response = await fetch(path + (qs.toString() ? "?" + qs : ""), {credentials: "same-origin"});
  let body;
  try { body = await response.json(); } catch { body = {error: `${response.status} ${response.statusText}`}; }
  if (!response.ok) throw new Error(body.error || `${response.status}`);
  return body;
}

function errorBox(message) { return el("pre", {class: "error", id: "error", text: message}); }

function link(route, params, text) {
  const qs = new URLSearchParams(Object.entries(params).filter(([, v]) => v !== undefined && v !== null && v !== ""));
  return el("a", {href: `#/${route}` + (qs.toString() ? "?" + qs : ""), text});
}

function setCrumbs(...parts) { crumbs.replaceChildren(...parts.flatMap((p) => [p, el("span", {text: "›"})]).slice(0, -1)); }

// The instances of one item drawn over its image: one <g class="instance"> per box or polygon, in
// the image's pixels (the SVG's viewBox), so the drawing scales with the image however it is shown.
function overlay(width, height, instances, colours) {
  const svg = el("svg:svg", {viewBox: `0 0 ${width} ${height}`, preserveAspectRatio: "xMidYMid meet",
                             class: "overlay"});
  for (const inst of instances) {
    const colour = colours[inst.label] || "#ffffff";
    const [x0, y0, x1, y1] = inst.box;
    const g = el("svg:g", {class: "instance", "data-label": inst.label});
    if (inst.polygon && inst.polygon.length >= 6) {
      const points = [];
      for (let k = 0; k + 1 < inst.polygon.length; k += 2) points.push(`${inst.polygon[k]},${inst.polygon[k + 1]}`);
      g.append(el("svg:polygon", {points: points.join(" "), stroke: colour}));
    } else {
      g.append(el("svg:rect", {x: x0, y: y0, width: Math.max(0, x1 - x0), height: Math.max(0, y1 - y0), stroke: colour}));
    }
    const size = Math.max(10, Math.round(Math.max(width, height) / 40));
    g.append(el("svg:text", {x: x0 + 2, y: Math.max(size, y0 - 3), fill: colour, "font-size": size, text: inst.label}));
    svg.append(g);
  }
  return svg;
}

function thumbCell(dataset, version, item, colours, extra) {
  const box = el("div", {class: "thumb"});
  const img = el("img", {src: item.thumb, alt: item.id, class: "thumb-img"});
  img.addEventListener("error", () => box.append(el("div", {class: "problem", text:
    `image unavailable: its blob is missing or corrupt (run \`orchestrator verify ${dataset}\`)`})));
  box.append(img);
  if (item.instances) box.append(overlay(item.width, item.height, item.instances, colours));
  if (item.error) box.append(el("div", {class: "problem", text: item.error}));
  const href = `#/i/${encodeURIComponent(dataset)}?` + new URLSearchParams({v: version, id: item.id});
  return el("div", {class: "cell", "data-id": item.id}, el("a", {href}, box),
            el("div", {class: "caption", title: item.id, text: item.id}), extra || null);
}

// -- pages ------------------------------------------------------------------------------------
async function datasetsPage() {
  setCrumbs(el("span", {text: "datasets"}));
  const body = await api("/api/datasets");
  document.getElementById("who").textContent = `${body.principal} @ ${body.store}`;
  if (!body.datasets.length) return main.replaceChildren(el("p", {class: "muted", text: "no datasets you may read"}));
  const rows = body.datasets.map((d) => el("tr", {"data-name": d.name},
    el("td", {}, link(`d/${encodeURIComponent(d.name)}`, {v: d.latest}, d.name)),
    el("td", {text: String(d.latest)}), el("td", {text: String(d.items)}), el("td", {text: String(d.versions)}),
    el("td", {text: d.updated}),
    el("td", {}, link(`stats/${encodeURIComponent(d.name)}`, {v: d.latest}, "stats"))));
  main.replaceChildren(el("h2", {text: "Datasets"}), el("table", {id: "datasets"},
    el("tr", {}, ...["dataset", "latest version", "items", "versions", "updated", ""].map((h) => el("th", {text: h}))),
    ...rows));
}

async function versionsTable(name) {
  const body = await api(`/api/datasets/${encodeURIComponent(name)}/versions`);
  return body.versions;
}

async function datasetPage(name, params) {
  const versions = await versionsTable(name);
  const version = params.get("v") ?? String(versions[versions.length - 1].version);
  const query = params.get("q") || "";
  const page = Number(params.get("p") || 0);
  setCrumbs(link("", {}, "datasets"), el("span", {text: name}));
  const go = (changes) => {
    const next = {v: version, q: query, p: 0, ...changes};
    location.hash = `#/d/${encodeURIComponent(name)}?` + new URLSearchParams(
      Object.entries(next).filter(([, v]) => v !== "" && v !== null && v !== undefined));
  };
  const select = el("select", {id: "version", onchange: (e) => go({v: e.target.value})},
    ...versions.slice().reverse().map((v) => el("option", {value: v.version, text:
      `v${v.version} · ${v.items} items · ${v.time.slice(0, 16)} · ${v.principal || ""} · ${v.message || v.operation}`})));
  select.value = version;
  const input = el("input", {type: "text", id: "query", value: query, spellcheck: "false",
    placeholder: "labels.car > 3 and 'night' in tags", onkeydown: (e) => { if (e.key === "Enter") go({q: input.value}); }});
  const toggle = el("input", {type: "checkbox", id: "show-labels", checked: "checked",
    onchange: (e) => grid.classList.toggle("hide-labels", !e.target.checked)});
  const count = el("span", {id: "count", class: "muted", text: "…"});
  const grid = el("div", {class: "grid", id: "grid"});
  const pager = el("div", {class: "toolbar", id: "pager"});
  const problem = el("div", {id: "problem"});
  main.replaceChildren(
    el("div", {class: "toolbar"}, select, input, el("button", {id: "apply", text: "Apply", onclick: () => go({q: input.value})}),
       el("label", {}, toggle, " labels"), count,
       link(`diff/${encodeURIComponent(name)}`, {a: Math.max(0, Number(version) - 1), b: version, q: query}, "diff"),
       link(`stats/${encodeURIComponent(name)}`, {v: version, q: query}, "stats")),
    problem, grid, pager);
  let body;
  try {
    body = await api(`/api/datasets/${encodeURIComponent(name)}/items`, {version, query, offset: page * PAGE, limit: PAGE});
  } catch (err) {
    count.textContent = "—";
    problem.replaceChildren(errorBox(err.message));
    return;
  }
  const total = versions.find((v) => String(v.version) === String(body.version))?.items;
  count.textContent = query ? `${body.count} of ${total} items match` : `${body.count} items`;
  count.dataset.count = body.count;
  grid.replaceChildren(...body.items.map((it) => thumbCell(name, body.version, it, body.colours)));
  const pages = Math.max(1, Math.ceil(body.count / PAGE));
  pager.replaceChildren(
    el("button", {id: "prev", text: "‹ previous", disabled: page <= 0 ? "disabled" : null, onclick: () => go({q: query, p: page - 1})}),
    el("span", {id: "page", text: `page ${page + 1} of ${pages}`}),
    el("button", {id: "next", text: "next ›", disabled: page + 1 >= pages ? "disabled" : null, onclick: () => go({q: query, p: page + 1})}));
}

async function itemPage(name, params) {
  const version = params.get("v");
  const id = params.get("id");
  setCrumbs(link("", {}, "datasets"), link(`d/${encodeURIComponent(name)}`, {v: version}, name), el("span", {text: id}));
  const it = await api(`/api/datasets/${encodeURIComponent(name)}/item`, {id, version});
  const image = el("div", {class: "item-image"}, el("img", {src: it.media, alt: it.id, id: "image"}),
                   overlay(it.width, it.height, it.instances, it.colours));
  const instances = el("table", {id: "instances"},
    el("tr", {}, ...["label", "box (x0, y0, x1, y1)", "polygon points", "attributes"].map((h) => el("th", {text: h}))),
    ...it.instances.map((inst) => el("tr", {},
      el("td", {}, el("span", {style: `color:${it.colours[inst.label]}`, text: inst.label})),
      el("td", {text: inst.box.map((v) => v.toFixed(1)).join(", ")}),
      el("td", {text: inst.polygon.length ? String(inst.polygon.length / 2) : ""}),
      el("td", {text: Object.entries(inst.attributes).map(([k, v]) => `${k}=${v}`).join(", ")}))));
  const attributes = el("table", {id: "attributes"},
    ...Object.entries(it.attributes).map(([k, v]) => el("tr", {}, el("td", {text: k}), el("td", {text: v}))));
  const history = el("table", {id: "history"},
    el("tr", {}, ...["version", "time", "state", "parts", "operation"].map((h) => el("th", {text: h}))),
    ...it.history.map((h) => el("tr", {},
      el("td", {}, link(`i/${encodeURIComponent(name)}`, {v: h.version, id}, `v${h.version}`)),
      el("td", {text: h.time}), el("td", {class: h.state, text: h.state}), el("td", {text: h.parts.join(", ")}),
      el("td", {text: h.message || h.operation}))));
  main.replaceChildren(...[
    el("h2", {text: `${it.id} (version ${it.version}, ${it.width}×${it.height})`}),
    it.media_error ? errorBox(it.media_error) : null,
    el("div", {class: "item-view"}, image, el("div", {},
      el("h3", {text: `${it.instances.length} instances`}), instances,
      el("h3", {text: "tags"}), el("div", {id: "tags"}, ...[...it.tags, ...it.instance_tags.map((t) => `${t} (instance)`)]
        .map((t) => el("span", {class: "tag", text: t}))),
      el("h3", {text: "attributes"}), attributes,
      el("h3", {text: "history"}), history))].filter((x) => x !== null));
}

async function diffPage(name, params) {
  const versions = await versionsTable(name);
  const latest = String(versions[versions.length - 1].version);
  const a = params.get("a") ?? String(Math.max(0, Number(latest) - 1));
  const b = params.get("b") ?? latest;
  const query = params.get("q") || "";
  setCrumbs(link("", {}, "datasets"), link(`d/${encodeURIComponent(name)}`, {v: b}, name), el("span", {text: "diff"}));
  const pick = (id, value) => {
    const s = el("select", {id}, ...versions.map((v) => el("option", {value: v.version, text: `v${v.version}`})));
    s.value = value;
    return s;
  };
  const sa = pick("before", a), sb = pick("after", b);
  const input = el("input", {type: "text", id: "query", value: query, placeholder: "optional slice"});
  const go = () => { location.hash = `#/diff/${encodeURIComponent(name)}?` +
    new URLSearchParams({a: sa.value, b: sb.value, ...(input.value ? {q: input.value} : {})}); };
  main.replaceChildren(el("div", {class: "toolbar"}, sa, el("span", {text: "→"}), sb, input,
                          el("button", {id: "apply", text: "Compare", onclick: go})), el("p", {class: "muted", text: "…"}));
  let d;
  try {
    d = await api(`/api/datasets/${encodeURIComponent(name)}/diff`, {before: a, after: b, query});
  } catch (err) {
    main.lastChild.replaceWith(errorBox(err.message));
    return;
  }
  const section = (kind, entries, make) => el("section", {id: kind},
    el("h3", {class: kind, text: `${kind}: ${d.counts[kind]}` + (entries.length < d.counts[kind] ? ` (first ${entries.length})` : "")}),
    el("div", {class: "grid"}, ...entries.map(make)));
  const deltas = Object.entries(d.label_totals).filter(([, t]) => t.delta)
    .map(([label, t]) => `${label} ${t.before} → ${t.after} (${t.delta > 0 ? "+" : ""}${t.delta})`);
  main.lastChild.replaceWith(el("div", {},
    el("p", {id: "summary", text: `version ${d.before} → ${d.after}${d.query ? ` (slice ${d.query})` : ""}: ` +
      `${d.counts.added} added, ${d.counts.removed} removed, ${d.counts.changed} changed, ${d.counts.unchanged} unchanged`}),
    deltas.length ? el("p", {class: "muted", text: "label instances: " + deltas.join(", ")}) : null,
    section("changed", d.changed, (c) => el("div", {class: "cell", "data-id": c.id},
      el("div", {class: "pair"}, thumbCell(name, d.before, c.before, d.colours, el("div", {class: "caption", text: `v${d.before}`})),
                                 thumbCell(name, d.after, c.after, d.colours, el("div", {class: "caption", text: `v${d.after}`}))),
      el("div", {class: "caption", title: c.id},
         link(`i/${encodeURIComponent(name)}`, {v: d.after, id: c.id}, c.id), ` · ${c.parts.join(", ")}`))),
    section("added", d.added, (it) => thumbCell(name, d.after, it, d.colours)),
    section("removed", d.removed, (it) => thumbCell(name, d.before, it, d.colours))));
}

async function statsPage(name, params) {
  const version = params.get("v");
  const query = params.get("q") || "";
  setCrumbs(link("", {}, "datasets"), link(`d/${encodeURIComponent(name)}`, {v: version, q: query}, name),
            el("span", {text: "stats"}));
  const s = await api(`/api/datasets/${encodeURIComponent(name)}/stats`, {version, query});
  const most = Math.max(1, ...Object.values(s.labels).map((l) => l.instances));
  const labels = el("table", {id: "labels"},
    el("tr", {}, ...["label", "instances", "images", ""].map((h) => el("th", {text: h}))),
    ...Object.entries(s.labels).map(([label, l]) => el("tr", {},
      el("td", {text: label}), el("td", {text: String(l.instances)}), el("td", {text: String(l.images)}),
      el("td", {}, el("span", {class: "bar", style: `width:${Math.round(300 * l.instances / most)}px;` +
                                                    `background:${s.colours[label] || "var(--accent)"}`})))));
  const png = `/api/datasets/${encodeURIComponent(name)}/stats.png?` + new URLSearchParams({version, ...(query ? {query} : {})});
  main.replaceChildren(el("h2", {text: `${s.items} items${query ? ` matching ${query}` : ""}`}), labels,
                       el("p", {}, el("img", {src: png, alt: "statistics", id: "stats-figure", style: "max-width:100%"})));
}

// -- router -----------------------------------------------------------------------------------
async function route() {
  const [path, qs] = location.hash.replace(/^#\/?/, "").split("?");
  const params = new URLSearchParams(qs || "");
  const [page, ...rest] = path.split("/");
  const name = decodeURIComponent(rest.join("/"));
  main.dataset.ready = "false";
  try {
    if (page === "d") await datasetPage(name, params);
    else if (page === "i") await itemPage(name, params);
    else if (page === "diff") await diffPage(name, params);
    else if (page === "stats") await statsPage(name, params);
    else await datasetsPage();
  } catch (err) {
    main.replaceChildren(errorBox(err.message), el("p", {}, link("", {}, "back to the datasets")));
  }
  main.dataset.ready = "true";  // what tests wait for
}

window.addEventListener("hashchange", route);
route();
