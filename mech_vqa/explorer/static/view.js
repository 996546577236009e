/* mech_vqa explorer: linked views of one answer, drawn from the JSON payload of
 * mech_vqa/explorer/payload.py. No network, no library: plain DOM, canvas and SVG.
 * MechVQA.render(root, data, options) builds the view; options.onMissing(kind, detail) lets the app
 * compute what the payload lacks (a token, a head) and render again with options.state kept. */
(function () {
  "use strict";
  if (window.MechVQA) return;
  // the colour maps of mech_vqa.plotting: magma reversed (sequential) and RdBu reversed (diverging)
  var MAGMA_R = ["#fcfdbf", "#fecf92", "#fe9f6d", "#f7705c", "#de4968", "#b5367a", "#8c2981", "#641a80",
                 "#3b0f70", "#140e36", "#000004"];
  var RDBU_R = ["#053061", "#2065ab", "#4393c3", "#90c4dd", "#d1e5f0", "#f7f6f6", "#fddbc7", "#f3a481",
                "#d6604d", "#b1182b", "#67001f"];
  var MAX_ALPHA = 0.85;
  var SVGNS = "http://www.w3.org/2000/svg";

  function rgb(hex) { return [parseInt(hex.substr(1, 2), 16), parseInt(hex.substr(3, 2), 16), parseInt(hex.substr(5, 2), 16)]; }
  var STOPS = { magma: MAGMA_R.map(rgb), rdbu: RDBU_R.map(rgb) };
  function colour(name, t) {
    var stops = STOPS[name];
    t = Math.max(0, Math.min(1, isFinite(t) ? t : 0)) * (stops.length - 1);
    var i = Math.min(Math.floor(t), stops.length - 2), f = t - i, a = stops[i], b = stops[i + 1];
    return [Math.round(a[0] + f * (b[0] - a[0])), Math.round(a[1] + f * (b[1] - a[1])), Math.round(a[2] + f * (b[2] - a[2]))];
  }
  function css(c, alpha) { return "rgba(" + c[0] + "," + c[1] + "," + c[2] + "," + (alpha === undefined ? 1 : alpha) + ")"; }
  function el(tag, attrs, children) {
    var node = document.createElement(tag);
    Object.keys(attrs || {}).forEach(function (key) {
      if (key === "text") node.textContent = attrs[key];
      else if (key === "class") node.className = attrs[key];
      else if (key.slice(0, 2) === "on") node.addEventListener(key.slice(2), attrs[key]);
      else node.setAttribute(key, attrs[key]);
    });
    (children || []).forEach(function (child) { if (child) node.appendChild(typeof child === "string" ? document.createTextNode(child) : child); });
    return node;
  }
  function svg(tag, attrs) {
    var node = document.createElementNS(SVGNS, tag);
    Object.keys(attrs || {}).forEach(function (key) { node.setAttribute(key, attrs[key]); });
    return node;
  }
  function fmt(v) {
    if (v === null || v === undefined || (typeof v === "number" && !isFinite(v))) return "–";
    if (typeof v !== "number") return String(v);
    var a = Math.abs(v);
    return a !== 0 && (a < 1e-3 || a >= 1e4) ? v.toExponential(2) : String(Math.round(v * 1e4) / 1e4);
  }
  function flat(grid) { var out = []; grid.forEach(function (row) { row.forEach(function (v) { if (v !== null) out.push(v); }); }); return out; }
  function extent(grid) {
    var values = flat(grid), lo = Infinity, hi = -Infinity;
    values.forEach(function (v) { if (v < lo) lo = v; if (v > hi) hi = v; });
    return values.length ? [lo, hi] : [0, 0];
  }

  /* the scale of one map: sequential (opacity = share of the largest positive value) or signed */
  function scaleOf(entry) {
    var range = extent(entry.grid);
    if (entry.signed) { var m = Math.max(Math.abs(range[0]), Math.abs(range[1])) || 1; return { signed: true, vmax: m }; }
    return { signed: false, vmax: range[1] > 0 ? range[1] : 0 };
  }
  function cellColour(v, scale, opacity) {
    if (v === null || scale.vmax === 0) return [0, 0, 0, 0];
    if (scale.signed) {
      var s = v / scale.vmax, c = colour("rdbu", (s + 1) / 2);
      return [c[0], c[1], c[2], Math.round(255 * opacity * MAX_ALPHA * Math.min(1, Math.abs(s)))];
    }
    var t = Math.max(0, v / scale.vmax), d = colour("magma", t);
    return [d[0], d[1], d[2], Math.round(255 * opacity * MAX_ALPHA * Math.min(1, t))];
  }

  function render(root, data, options) {
    options = options || {};
    var old = root.mechvqa ? root.mechvqa.state : null;
    var state = Object.assign({ token: data.selected || 0, method: null, head: null, opacity: 1, box: true,
                                stage: data.lens ? data.lens.stages.length - 1 : 0, ablation: null }, data.state || {}, options.state || old || {});
    if (!data.tokens[state.token]) state.token = data.selected || 0;
    root.innerHTML = "";
    root.classList.add("mv-root");
    var api = { state: state, data: data, root: root };
    root.mechvqa = api;

    function part() { return data.per_token[String(state.token)] || null; }
    function missing(kind, detail) { if (options.onMissing) options.onMissing(kind, detail, api); }

    // ------------------------------------------------------------------ header and tokens
    root.appendChild(el("h2", { text: data.title || data.kind }));
    if (data.question || data.answer)
      root.appendChild(el("div", { class: "mv-qa" }, [el("b", { text: "Q: " }), data.question || "", "   ", el("b", { text: "  A: " }), data.answer || ""]));
    if (data.model) root.appendChild(el("div", { class: "mv-model", text: "model: " + data.model }));
    var tokenBar = el("div", { class: "mv-tokens" }, [el("span", { class: "mv-legend", text: data.tokens.length > 1 ? "answer tokens (click one):" : "explained token:" })]);
    data.tokens.forEach(function (token, index) {
      var computed = !!data.per_token[String(index)] || (!!token.computed && !options.onMissing);
      var button = el("button", { class: "mv-token" + (computed ? " mv-computed" : " mv-missing") + (index === state.token ? " mv-selected" : ""),
                                  "data-index": String(index), title: computed ? "predicted at position " + token.position : "not computed here" + (options.onMissing ? ": click to compute" : ""),
                                  text: token.text === "" ? "·" : token.text });
      button.addEventListener("click", function () {
        if (!data.per_token[String(index)] && options.onMissing) { state.token = index; state.head = null; missing("token", { index: index, position: token.position }); return; }
        state.token = index; state.head = null; state.method = null; refresh();
      });
      tokenBar.appendChild(button);
    });
    root.appendChild(tokenBar);

    var row = el("div", { class: "mv-row" });
    root.appendChild(row);

    // --------------------------------------------------------------------- the map panel
    var mapPanel = el("section", { class: "mv-panel mv-map-panel" });
    var methodSelect = el("select", { class: "mv-method", title: "which method's map" });
    var opacity = el("input", { type: "range", min: "0", max: "1", step: "0.05", value: String(state.opacity), class: "mv-opacity" });
    var boxCheck = el("input", { type: "checkbox", class: "mv-box-toggle" });
    boxCheck.checked = !!state.box;
    var controls = el("div", { class: "mv-controls" }, [el("label", {}, ["map ", methodSelect]), el("label", {}, ["opacity ", opacity]),
      data.box ? el("label", { title: "the ground-truth box (the asked object)" }, [boxCheck, " box"]) : null]);
    var side = 360;
    var image = data.image, canvas = el("canvas", { class: "mv-map" });
    var emptyNote = el("div", { class: "mv-empty" });
    var wrap = el("div", { class: "mv-canvas-wrap" }, [canvas]);
    var readout = el("div", { class: "mv-readout", text: " " });
    var caption = el("div", { class: "mv-caption" });
    var barCanvas = el("canvas", { width: "160", height: "10" }), barLo = el("span"), barHi = el("span"), barUnit = el("span");
    var colourbar = el("div", { class: "mv-colorbar" }, [barLo, barCanvas, barHi, barUnit]);
    mapPanel.appendChild(el("h3", { text: "the image the model saw, and a map over it" }));
    mapPanel.appendChild(controls); mapPanel.appendChild(wrap); mapPanel.appendChild(colourbar);
    mapPanel.appendChild(caption); mapPanel.appendChild(readout);
    var imageHeight = image ? image.height : 0, imageWidth = image ? image.width : 0;
    var scale = image ? side / Math.max(imageHeight, imageWidth) : 1;
    canvas.width = Math.round(imageWidth * scale) || side; canvas.height = Math.round(imageHeight * scale) || side;
    var picture = null;
    if (image) { picture = new Image(); picture.onload = function () { draw(); }; picture.src = image.src; }

    function maps() { var p = part(); return p && p.maps ? p.maps : []; }
    function currentEntry() {
      var p = part();
      if (!p) return null;
      if (state.head && p.head_maps && p.head_maps[state.head]) {
        var lh = state.head.split(",");
        return { name: "head L" + lh[0] + "H" + lh[1], label: "head L" + lh[0] + "H" + lh[1],
                 grid: p.head_maps[state.head], signed: p.head_signed !== false, unit: p.head_unit || "", components: "", scores: {} };
      }
      var list = maps();
      for (var i = 0; i < list.length; i++) if (list[i].name === state.method) return list[i];
      return list[0] || null;
    }
    function fillMethods() {
      methodSelect.innerHTML = "";
      maps().forEach(function (m) { methodSelect.appendChild(el("option", { value: m.name, text: m.label })); });
      var p = part();
      if (state.head && p && p.head_maps && p.head_maps[state.head]) {
        var lh = state.head.split(",");
        methodSelect.appendChild(el("option", { value: "head:" + state.head, text: "head L" + lh[0] + "H" + lh[1] }));
        methodSelect.value = "head:" + state.head;
      } else if (state.method) methodSelect.value = state.method;
      methodSelect.disabled = !methodSelect.options.length;
    }
    methodSelect.addEventListener("change", function () {
      if (methodSelect.value.indexOf("head:") === 0) return;
      state.method = methodSelect.value; state.head = null; refresh();
    });
    opacity.addEventListener("input", function () { state.opacity = parseFloat(opacity.value); draw(); });
    boxCheck.addEventListener("change", function () { state.box = boxCheck.checked; draw(); });

    function draw() {
      var ctx = canvas.getContext("2d");
      ctx.clearRect(0, 0, canvas.width, canvas.height);
      ctx.imageSmoothingEnabled = scale < 2;
      if (picture && picture.complete) ctx.drawImage(picture, 0, 0, canvas.width, canvas.height);
      var entry = currentEntry();
      canvas.setAttribute("data-shown", entry ? String(state.token) + "|" + entry.name : "");
      canvas.setAttribute("data-drawn", picture ? (picture.complete && picture.naturalWidth ? "image" : "waiting") : "map");
      if (emptyNote.parentNode) emptyNote.parentNode.removeChild(emptyNote);
      if (!entry) { caption.textContent = part() ? "no map for this token" : "this token was not computed"; barLo.textContent = barHi.textContent = barUnit.textContent = ""; return; }
      var grid = entry.grid, rows = grid.length, cols = rows ? grid[0].length : 0, sc = scaleOf(entry);
      var cells = document.createElement("canvas");
      cells.width = cols; cells.height = rows;
      var cctx = cells.getContext("2d"), pixels = cctx.createImageData(cols, rows);
      for (var r = 0; r < rows; r++) for (var c = 0; c < cols; c++) {
        var rgba = cellColour(grid[r][c], sc, state.opacity), o = 4 * (r * cols + c);
        pixels.data[o] = rgba[0]; pixels.data[o + 1] = rgba[1]; pixels.data[o + 2] = rgba[2]; pixels.data[o + 3] = rgba[3];
      }
      cctx.putImageData(pixels, 0, 0);
      ctx.imageSmoothingEnabled = false;
      ctx.drawImage(cells, 0, 0, canvas.width, canvas.height);
      if (data.box && state.box) {
        var b = data.box;
        ctx.save(); ctx.strokeStyle = "#00b050"; ctx.lineWidth = 2; ctx.setLineDash([6, 3]);
        ctx.strokeRect(b[0] * scale, b[1] * scale, (b[2] - b[0]) * scale, (b[3] - b[1]) * scale); ctx.restore();
      }
      if (sc.vmax === 0 || entry.empty_reason) {
        emptyNote.textContent = "no evidence: " + (entry.empty_reason || "no cell scores above zero");
        if (sc.vmax === 0) wrap.appendChild(emptyNote);
      }
      var bctx = barCanvas.getContext("2d");
      for (var x = 0; x < barCanvas.width; x++) {
        var t = x / (barCanvas.width - 1);
        var v = sc.signed ? (2 * t - 1) * sc.vmax : t * sc.vmax, cc = cellColour(v, sc, 1);
        bctx.clearRect(x, 0, 1, barCanvas.height);
        bctx.fillStyle = css(cc, cc[3] / 255); bctx.fillRect(x, 0, 1, barCanvas.height);
      }
      barLo.textContent = fmt(sc.signed ? -sc.vmax : 0); barHi.textContent = fmt(sc.vmax); barUnit.textContent = entry.unit || "";
      var lines = [entry.label + (entry.components && entry.label.indexOf(entry.components) < 0 ? ": " + entry.components : "")];
      var scores = entry.scores || {}, parts = [];
      if (scores.insertion_auc !== undefined) parts.push("insertion AUC " + fmt(scores.insertion_auc) + " (higher is better)");
      if (scores.deletion_auc !== undefined) parts.push("deletion AUC " + fmt(scores.deletion_auc) + " (lower is better)");
      if (scores.pointing_game !== undefined) parts.push(scores.pointing_game === 1 ? "peak in the box" : scores.pointing_game === 0 ? "peak outside the box" : "pointing " + fmt(scores.pointing_game));
      if (parts.length) lines.push(parts.join("; "));
      caption.textContent = lines.join("\n");
      caption.style.whiteSpace = "pre-line";
    }
    canvas.addEventListener("mousemove", function (event) {
      var entry = currentEntry();
      if (!entry) return;
      var rect = canvas.getBoundingClientRect(), grid = entry.grid;
      var r = Math.floor((event.clientY - rect.top) / rect.height * grid.length), c = Math.floor((event.clientX - rect.left) / rect.width * grid[0].length);
      if (grid[r] === undefined || grid[r][c] === undefined) return;
      readout.textContent = "cell (row " + r + ", col " + c + "): " + fmt(grid[r][c]) + " " + (entry.unit || "");
    });
    if (image || maps().length) row.appendChild(mapPanel);

    // --------------------------------------------------------- heads, layers, head text
    var headPanel = el("section", { class: "mv-panel mv-heads-panel" });
    var headText = el("div", { class: "mv-headtext" });
    function drawHeads() {
      headPanel.innerHTML = "";
      var p = part();
      if (!p || !p.heads) return false;
      var grid = p.heads.scores, range = extent(grid), m = Math.max(Math.abs(range[0]), Math.abs(range[1])) || 1;
      var sequential = range[0] >= 0;  // e.g. attention mass: darker = more; signed scores: blue lowers, red raises
      headPanel.appendChild(el("h3", { text: "heads: " + (p.heads.unit || "score") + " (click a head for its map)" }));
      var table = el("table", { class: "mv-grid mv-heads" });
      var head = el("tr", {}, [el("th", { text: "layer \\ head" })]);
      grid[0].forEach(function (_, h) { head.appendChild(el("th", { text: String(h) })); });
      table.appendChild(head);
      grid.forEach(function (values, layer) {
        var tr = el("tr", {}, [el("th", { text: String(layer) })]);
        values.forEach(function (v, h) {
          var key = layer + "," + h, hasMap = !!(p.head_maps && p.head_maps[key]);
          var top = p.heads.top && p.heads.top[0] === layer && p.heads.top[1] === h;
          var cell = el("td", { class: "mv-cell mv-head" + (hasMap ? " mv-has-map" : "") + (top ? " mv-top" : "") + (state.head === key ? " mv-selected" : ""),
                                "data-layer": String(layer), "data-head": String(h), title: "L" + layer + "H" + h + ": " + fmt(v) + " " + (p.heads.unit || "") + (hasMap ? "" : " (no position-level map here)") });
          cell.style.background = v === null ? "#eee" : sequential ? css(colour("magma", v / m)) : css(colour("rdbu", (v / m + 1) / 2));
          cell.addEventListener("click", function () {
            if (!hasMap) { state.head = key; missing("head", { token: state.token, layer: layer, head: h }); if (!options.onMissing) { headText.textContent = "L" + layer + "H" + h + ": no position-level map in this result (explain(..., heads=[(" + layer + ", " + h + ")]) computes it)"; } return; }
            state.head = state.head === key ? null : key; refresh();
          });
          tr.appendChild(cell);
        });
        table.appendChild(tr);
      });
      headPanel.appendChild(table);
      headPanel.appendChild(el("div", { class: "mv-legend", text: (sequential ? "darker: larger (up to " + fmt(m) + ")" : "blue: lowers, red: raises (±" + fmt(m) + ")") + "; green frame: top head; dot: map available" }));
      if (p.layers) headPanel.appendChild(layerStrip(p.layers));
      headText.textContent = "";
      if (state.head && p.head_text && p.head_text[state.head]) {
        var lh = state.head.split(",");
        headText.textContent = !p.head_text[state.head].length ? "head L" + lh[0] + "H" + lh[1] + ": no text position changes the token's log-prob through this head" :
          "text positions head L" + lh[0] + "H" + lh[1] + " draws on most (position, token, nats):\n" +
          p.head_text[state.head].map(function (e) { return "  " + e[0] + "  " + JSON.stringify(e[1]) + "  " + fmt(e[2]); }).join("\n");
        headText.style.whiteSpace = "pre";
      }
      headPanel.appendChild(headText);
      return true;
    }
    function layerStrip(layers) {
      var n = layers.attention.length, w = Math.max(220, 26 * n + 40), h = 120, zero = h / 2;
      var values = layers.attention.concat(layers.mlp).map(function (v) { return Math.abs(v || 0); });
      var m = Math.max.apply(null, values.concat([1e-9]));
      var box = el("div", { class: "mv-layers" }, [el("h3", { text: "layers: increase by the attention and MLP blocks" })]);
      var chart = svg("svg", { width: w, height: h + 16, class: "mv-layer-strip" });
      chart.appendChild(svg("line", { x1: 30, x2: w, y1: zero, y2: zero, stroke: "#000", "stroke-width": 0.5 }));
      var step = (w - 36) / n;
      for (var l = 0; l < n; l++) {
        [["attention", "#0072B2", 0], ["mlp", "#E69F00", 1]].forEach(function (spec) {
          var v = layers[spec[0]][l] || 0, bh = Math.abs(v) / m * (h / 2 - 4);
          var rect = svg("rect", { x: 32 + l * step + spec[2] * step * 0.42, y: v >= 0 ? zero - bh : zero, width: step * 0.4, height: Math.max(bh, 0.5), fill: spec[1] });
          var title = svg("title", {}); title.textContent = "layer " + l + " " + spec[0] + ": " + fmt(v) + " nats";
          rect.appendChild(title); chart.appendChild(rect);
        });
        var label = svg("text", { x: 32 + l * step + step * 0.4, y: h + 12, "font-size": 10, "text-anchor": "middle" });
        label.textContent = String(l); chart.appendChild(label);
      }
      var top = svg("text", { x: 0, y: 10, "font-size": 9 }); top.textContent = "+" + fmt(m); chart.appendChild(top);
      box.appendChild(chart);
      box.appendChild(el("div", { class: "mv-legend" }, [el("span", { class: "mv-swatch", style: "background:#0072B2" }), "attention",
        el("span", { class: "mv-swatch", style: "background:#E69F00" }), "MLP (nats; hover a bar)"]));
      return box;
    }
    row.appendChild(headPanel);

    // --------------------------------------------------------------------------- curves
    var curvePanel = el("section", { class: "mv-panel mv-curves" });
    function drawCurves() {
      curvePanel.innerHTML = "";
      var p = part(), curves = p && p.curves ? p.curves : [];
      if (!curves.length) return false;
      var entry = currentEntry(), curve = curves[0];
      curves.forEach(function (c) { if (entry && c.name === entry.name) curve = c; });
      curvePanel.appendChild(el("h3", { text: "deletion and insertion curves: " + curve.name }));
      var w = 300, h = 170, chart = svg("svg", { width: w, height: h + 20 });
      var raw = !curve.deletion.some(function (v) { return v !== null; }) && curve.deletion_raw;
      if (raw) curve = Object.assign({}, curve, { deletion: curve.deletion_raw, insertion: curve.insertion_raw, deletion_auc: curve.deletion_auc_raw, insertion_auc: curve.insertion_auc_raw });
      var all = curve.deletion.concat(curve.insertion).filter(function (v) { return v !== null; });
      var lo = Math.min(0, Math.min.apply(null, all)), hi = Math.max(1, Math.max.apply(null, all));
      function X(f) { return 34 + f * (w - 44); } function Y(v) { return 8 + (hi - v) / (hi - lo) * (h - 16); }
      chart.appendChild(svg("line", { x1: X(0), x2: X(1), y1: Y(0), y2: Y(0), stroke: "#999", "stroke-width": 0.5 }));
      chart.appendChild(svg("line", { x1: X(0), x2: X(1), y1: Y(1), y2: Y(1), stroke: "#999", "stroke-width": 0.5, "stroke-dasharray": "3,3" }));
      [["deletion", "#D55E00"], ["insertion", "#0072B2"]].forEach(function (spec) {
        var points = curve.fractions.map(function (f, i) { return curve[spec[0]][i] === null ? null : X(f) + "," + Y(curve[spec[0]][i]); }).filter(Boolean);
        chart.appendChild(svg("polyline", { points: points.join(" "), fill: "none", stroke: spec[1], "stroke-width": 1.8, class: "mv-curve-" + spec[0] }));
      });
      [[0, "0"], [1, "1"]].forEach(function (t) { var n = svg("text", { x: 2, y: Y(t[0]) + 3, "font-size": 9 }); n.textContent = t[1]; chart.appendChild(n); });
      var xl = svg("text", { x: X(0.5), y: h + 16, "font-size": 10, "text-anchor": "middle" }); xl.textContent = "share of cells removed / revealed (most important first)"; chart.appendChild(xl);
      curvePanel.appendChild(chart);
      curvePanel.appendChild(el("div", { class: "mv-legend" }, [el("span", { class: "mv-swatch", style: "background:#D55E00" }), "deletion AUC " + fmt(curve.deletion_auc) + " (lower is better)",
        el("span", { class: "mv-swatch", style: "background:#0072B2" }), "insertion AUC " + fmt(curve.insertion_auc) + " (higher is better)"]));
      if (raw) curvePanel.appendChild(el("div", { class: "mv-notes", text: "raw curves (mean probability of the token): the normalised ones are not defined here" }));
      if (curve.flag) curvePanel.appendChild(el("div", { class: "mv-notes", text: curve.flag }));
      return true;
    }
    root.appendChild(curvePanel);

    // ------------------------------------------------------------------------ logit lens
    if (data.lens && data.lens.cells && image) root.appendChild(lensPanel(data.lens));
    function lensPanel(lens) {
      var panel = el("section", { class: "mv-panel mv-lens" });
      var slider = el("input", { type: "range", min: "0", max: String(lens.stages.length - 1), step: "1", value: String(state.stage), class: "mv-stage" });
      var stageName = el("span", { class: "mv-stage-name" });
      panel.appendChild(el("h3", { text: "logit lens: each image token's top word after each layer (hover a cell for the top " + lens.k + ")" }));
      panel.appendChild(el("div", { class: "mv-controls" }, [el("label", {}, ["stage ", slider]), stageName]));
      var rows = lens.grid[0], cols = lens.grid[1], size = Math.min(480, Math.max(300, 40 * cols));
      var img = el("img", { src: image.src, width: String(size), height: String(Math.round(size * imageHeight / imageWidth)), style: "image-rendering: pixelated; display:block" });
      var gridDiv = el("div", { class: "mv-lens-grid", style: "width:" + size + "px;height:" + Math.round(size * imageHeight / imageWidth) + "px;grid-template-columns:repeat(" + cols + ",1fr);grid-template-rows:repeat(" + rows + ",1fr)" });
      var hover = el("div", { class: "mv-hover", text: "hover a cell" });
      var fontSize = Math.max(7, Math.min(12, size / cols / 4.2));
      function fill() {
        gridDiv.innerHTML = "";
        var stage = state.stage, cells = lens.cells[stage];
        stageName.textContent = lens.stages[stage] === "input" ? "projector output (input of layer 0)" : "after layer " + lens.stages[stage].slice(1);
        for (var r = 0; r < rows; r++) for (var c = 0; c < cols; c++) {
          (function (r, c) {
            var words = cells[r][c] || [], top = words[0] || ["", 0], p = top[1] || 0, col = colour("magma", p);
            var cell = el("div", { class: "mv-lens-cell", "data-row": String(r), "data-col": String(c), text: top[0].trim() || "·" });
            cell.style.background = css(col, 0.45 * p); cell.style.fontSize = fontSize + "px";
            cell.style.lineHeight = (size / cols * imageHeight / imageWidth) + "px";
            cell.addEventListener("mouseenter", function () {
              hover.textContent = "cell (row " + r + ", col " + c + "), " + stageName.textContent + "\n" +
                words.map(function (w, i) { return (i + 1) + ". " + JSON.stringify(w[0]) + "  p=" + fmt(w[1]); }).join("\n");
            });
            gridDiv.appendChild(cell);
          })(r, c);
        }
      }
      slider.addEventListener("input", function () { state.stage = parseInt(slider.value, 10); fill(); });
      fill();
      panel.appendChild(el("div", { class: "mv-row" }, [el("div", { class: "mv-lens-wrap" }, [img, gridDiv]), hover]));
      panel.appendChild(el("div", { class: "mv-legend", text: "backdrop opacity: probability of the top word" }));
      return panel;
    }

    // ------------------------------------------------------------------------- ablations
    var ablationHolder = el("div");
    if (data.ablation) root.appendChild(ablationHolder);
    function drawAblation() {
      if (!data.ablation) return;
      ablationHolder.innerHTML = "";
      ablationHolder.appendChild(ablationPanel(data.ablation));
    }
    function ablationPanel(ab) {
      var panel = el("section", { class: "mv-panel mv-ablation" });
      // token 0 of the bar is the sum over the answer; token k > 0 the k-th answer token alone
      var which = state.token > 0 ? state.token - 1 : null;
      var values = ab.names.map(function (_, i) { return which === null ? ab.total[i] : ab.delta[i][which]; });
      var grid = ab.head_grid ? ab.head_grid.map(function (row, layer) { return row.map(function (v, h) {
        var index = -1;
        ab.names.forEach(function (_, i) { if (ab.kinds[i] === "head" && ab.layers[i] === layer && ab.heads[i] === h) index = i; });
        return index < 0 ? null : values[index]; }); }) : null;
      var detail = el("div", { class: "mv-hover mv-ablation-detail", text: "click an ablation for its change per answer token" });
      function show(i) {
        state.ablation = i;
        detail.textContent = ab.names[i] + ": summed change " + fmt(ab.total[i]) + " nats" + (ab.flipped[i] ? ", the answer FLIPS" : ", the answer holds") + "\n" +
          ab.targets.map(function (t, j) { return "  " + JSON.stringify(t) + ": " + fmt(ab.delta[i][j]) + " (clean log p " + fmt(ab.clean_logprob[j]) + ")"; }).join("\n");
        Array.prototype.forEach.call(panel.querySelectorAll("[data-ablation]"), function (n) { n.classList.toggle("mv-selected", n.getAttribute("data-ablation") === String(i)); });
      }
      panel.appendChild(el("h3", { text: "ablations: " + (which === null ? ab.unit : "change of log p(" + JSON.stringify(ab.targets[which]) + ") (nats)") + " (vermilion dashes: the answer flips)" }));
      var m = Math.max.apply(null, values.map(function (v) { return Math.abs(v || 0); }).concat([1e-9]));
      if (grid) {
        var hm = Math.max.apply(null, flat(grid).map(Math.abs).concat([1e-9]));
        var table = el("table", { class: "mv-grid" }), head = el("tr", {}, [el("th", { text: "layer \\ head" })]);
        ab.head_grid[0].forEach(function (_, h) { head.appendChild(el("th", { text: String(h) })); });
        table.appendChild(head);
        grid.forEach(function (row, layer) {
          var tr = el("tr", {}, [el("th", { text: String(layer) })]);
          row.forEach(function (v, h) {
            var index = -1;
            ab.names.forEach(function (_, i) { if (ab.kinds[i] === "head" && ab.layers[i] === layer && ab.heads[i] === h) index = i; });
            var cell = el("td", { class: "mv-cell" + (index >= 0 && ab.flipped[index] ? " mv-flipped" : ""), "data-ablation": String(index), title: "L" + layer + "H" + h + ": " + fmt(v) });
            cell.style.background = v === null ? "#eee" : css(colour("rdbu", (v / hm + 1) / 2));
            if (index >= 0) cell.addEventListener("click", function () { show(index); });
            tr.appendChild(cell);
          });
          table.appendChild(tr);
        });
        panel.appendChild(table);
        panel.appendChild(el("div", { class: "mv-legend", text: "head grid: blue = the answer loses log-prob when the head is zeroed (down to " + fmt(-hm) + " nats); blank: not ablated; click a head" }));
      }
      var others = ab.names.map(function (_, i) { return i; }).filter(function (i) { return !ab.head_grid || ab.kinds[i] !== "head"; });
      if (others.length) {
        var w = 420, bar = 16, chart = svg("svg", { width: w, height: others.length * bar + 10 }), mid = w / 2 + 40;
        others.forEach(function (i, k) {
          var v = values[i] || 0, len = Math.abs(v) / m * (w - mid - 10);
          var rect = svg("rect", { x: v >= 0 ? mid : mid - len, y: 4 + k * bar, width: Math.max(len, 0.5), height: bar - 4, fill: ab.flipped[i] ? "#D55E00" : "#0072B2", "data-ablation": String(i), style: "cursor:pointer" });
          rect.addEventListener("click", function () { show(i); });
          var label = svg("text", { x: 2, y: 4 + k * bar + 10, "font-size": 10 }); label.textContent = ab.names[i] + "  " + fmt(v);
          chart.appendChild(label); chart.appendChild(rect);
        });
        panel.appendChild(chart);
      }
      panel.appendChild(detail);
      if (state.ablation !== null && state.ablation !== undefined && ab.names[state.ablation]) show(state.ablation);
      return panel;
    }

    // ---------------------------------------------------------------------------- table
    if (data.table && data.table.length) {
      var keys = Object.keys(data.table[0]).filter(function (k) { return k.indexOf("random_") !== 0; });
      var table = el("table", { class: "mv-table" }), head = el("tr");
      keys.forEach(function (k) { head.appendChild(el("th", { text: k })); });
      table.appendChild(head);
      data.table.forEach(function (r) {
        var tr = el("tr", { "data-method": String(r.method) });
        keys.forEach(function (k) { tr.appendChild(el("td", { text: fmt(r[k]) })); });
        tr.addEventListener("click", function () { state.method = r.method; state.head = null; refresh(); });
        table.appendChild(tr);
      });
      root.appendChild(el("section", { class: "mv-panel mv-scores", style: "overflow-x:auto" }, [el("h3", { text: "scores per method (click a row to show its map)" }), table]));
    }
    if (data.notes && data.notes.length) root.appendChild(el("div", { class: "mv-notes", text: data.notes.join(" · ") }));

    function refresh() {
      Array.prototype.forEach.call(tokenBar.querySelectorAll(".mv-token"), function (b) { b.classList.toggle("mv-selected", b.getAttribute("data-index") === String(state.token)); });
      Array.prototype.forEach.call(root.querySelectorAll("tr[data-method]"), function (tr) { var e = currentEntry(); tr.classList.toggle("mv-row-selected", !!e && tr.getAttribute("data-method") === e.name); });
      fillMethods();
      headPanel.style.display = drawHeads() ? "" : "none";
      curvePanel.style.display = drawCurves() ? "" : "none";
      drawAblation();
      draw();
      if (options.onChange) options.onChange(api);
    }
    api.refresh = refresh;
    api.select = function (index) { state.token = index; state.head = null; refresh(); };
    refresh();
    return api;
  }

  window.MechVQA = { render: render, colour: colour };
})();
