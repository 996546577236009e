/* the explorer app's controller: asks the local server (mech_vqa/explorer/app.py) to compute, polls
 * its jobs, and draws the answer with the static views' MechVQA.render. One session id per tab. */
(function () {
  "use strict";
  var session = sessionStorage.getItem("mech-vqa-session");
  if (!session) {
    var bytes = new Uint8Array(12); crypto.getRandomValues(bytes);
    session = Array.prototype.map.call(bytes, function (b) { return ("0" + b.toString(16)).slice(-2); }).join("");
    sessionStorage.setItem("mech-vqa-session", session);
  }
  var $ = function (id) { return document.getElementById(id); };
  var view = null, busy = false, knockouts = [], meta = null;

  function message(text) { $("message").textContent = text || ""; }
  function status(text) { $("status").textContent = text || ""; }
  function call(method, url, body, raw) {
    var init = { method: method, headers: { "X-Session": session } };
    if (body !== undefined) { init.body = raw ? body : JSON.stringify(body); if (!raw) init.headers["Content-Type"] = "application/json"; }
    return fetch(url, init).then(function (response) {
      return response.json().catch(function () { return { error: "the server answered " + response.status }; }).then(function (data) {
        if (!response.ok || data.error) throw new Error(data.error || ("the server answered " + response.status));
        return data;
      });
    });
  }
  function methods() { return Array.prototype.filter.call(document.querySelectorAll("#methods input"), function (i) { return i.checked; }).map(function (i) { return i.value; }); }
  function setBusy(value) { busy = value; document.body.setAttribute("data-busy", value ? "1" : "0"); ["ask", "compute", "knock-run"].forEach(function (id) { $(id).disabled = value; }); }
  function run(url, body) {
    if (busy) { message("still computing: wait for the current step to finish"); return Promise.resolve(); }
    message(""); setBusy(true); status("starting…");
    return call("POST", url, body).then(poll).catch(function (err) { setBusy(false); status(""); message(err.message); });
  }
  function poll(job) {
    return call("GET", "/api/job?session=" + session + "&id=" + job.id).then(function (state) {
      if (state.state === "error") { setBusy(false); status(""); message(state.error); return; }
      if (state.state !== "done") { status("computing: " + (state.messages.slice(-1)[0] || "waiting for the model") + " …"); return new Promise(function (r) { setTimeout(r, 250); }).then(function () { return poll(job); }); }
      setBusy(false); status("done");
      if (state.payload) show(state.payload);
      showKnockout(state.knockout);
    });
  }
  function show(payload) {
    $("answer").textContent = "";
    $("answer").appendChild(document.createTextNode("greedy answer: "));
    var b = document.createElement("b"); b.id = "answer-text"; b.textContent = payload.answer; $("answer").appendChild(b);
    var root = $("view");
    var keep = root.mechvqa ? root.mechvqa.state : null;
    if (keep && root.getAttribute("data-answer") !== payload.answer + "|" + payload.question) keep = null;
    root.setAttribute("data-answer", payload.answer + "|" + payload.question);
    view = window.MechVQA.render(root, payload, { state: keep, onMissing: onMissing, onChange: exportLink });
    ["export-html", "export-zip"].forEach(function (id) { $(id).classList.remove("mv-disabled"); });
  }
  function exportLink(api) {  // the exported page opens on what this tab shows
    var st = api.state;
    $("export-html").href = "/api/export.html?session=" + session + "&token=" + st.token +
      (st.method ? "&method=" + encodeURIComponent(st.method) : "") + (st.head ? "&head=" + encodeURIComponent(st.head) : "");
  }
  function onMissing(kind, detail, api) {
    if (kind === "token") run("/api/token", { token: detail.index, methods: methods(), curves: $("curves").checked });
    else if (kind === "head") run("/api/head", { token: detail.token, layer: detail.layer, head: detail.head });
  }
  function showKnockout(k) {
    var box = $("knock-result");
    if (!k) { box.textContent = ""; return; }
    box.textContent = "knocked out: " + k.knocked_out.join(", ") + "\nanswer now:   " + JSON.stringify(k.answer) + (k.changed ? "   (CHANGED)" : "   (unchanged)") +
      "\nclean answer: " + JSON.stringify(k.clean_answer) + "\nchange of each answer token's log-prob (teacher-forced clean answer):\n" +
      k.tokens.map(function (t, i) { return "  " + JSON.stringify(t) + ": " + (k.delta[i] >= 0 ? "+" : "") + k.delta[i] + " nats"; }).join("\n");
    box.setAttribute("data-changed", k.changed ? "1" : "0");
  }
  function renderKnockList() {
    var list = $("knock-list"); list.innerHTML = "";
    knockouts.forEach(function (k) { var s = document.createElement("span"); s.textContent = k; list.appendChild(s); });
  }

  call("GET", "/api/items").then(function (data) {
    meta = data;
    $("app-model").textContent = "model: " + data.model;
    data.items.forEach(function (item) {
      var option = document.createElement("option"); option.value = String(item.index);
      option.textContent = "#" + item.index + ": " + item.question; $("item").appendChild(option);
    });
    if (data.items.length) { $("item").value = "0"; $("question").value = data.items[0].question; }
    data.all_methods.forEach(function (name) {
      var label = document.createElement("label"), box = document.createElement("input");
      box.type = "checkbox"; box.value = name; box.checked = data.methods.indexOf(name) >= 0 || name === "mechanistic";
      if (name === "mechanistic") box.disabled = true;
      label.appendChild(box); label.appendChild(document.createTextNode(" " + name + (name.indexOf("igos") === 0 ? " (slow)" : "")));
      $("methods").appendChild(label);
    });
    for (var l = 0; l < data.layers; l++) {
      for (var h = 0; h < data.heads; h++) { var o = document.createElement("option"); o.value = o.textContent = "L" + l + "H" + h; $("knock-choice").appendChild(o); }
      ["attn", "mlp"].forEach(function (block) { var o = document.createElement("option"); o.value = o.textContent = "L" + l + "." + block; $("knock-choice").appendChild(o); });
    }
    document.body.setAttribute("data-ready", "1");
  }).catch(function (err) { message(err.message); });

  $("item").addEventListener("change", function () {
    var index = $("item").value;
    if (index !== "" && meta) $("question").value = meta.items[parseInt(index, 10)].question;
  });
  $("upload").addEventListener("change", function () {
    var file = $("upload").files[0];
    if (!file) return;
    message(""); $("upload-note").textContent = "uploading…";
    call("POST", "/api/upload", file, true).then(function (data) {
      $("item").value = "";
      $("upload-note").textContent = "uploaded " + data.width + " x " + data.height + (data.note ? "; " + data.note : "");
    }).catch(function (err) { $("upload-note").textContent = ""; message(err.message); });
  });
  $("ask").addEventListener("click", function () {
    var item = $("item").value;
    run("/api/ask", { item: item === "" ? null : parseInt(item, 10), question: $("question").value, methods: methods(), curves: $("curves").checked });
  });
  $("compute").addEventListener("click", function () {
    if (!view) { message("ask a question first"); return; }
    run("/api/methods", { token: view.state.token, methods: methods(), curves: $("curves").checked });
  });
  $("knock-add").addEventListener("click", function () { var v = $("knock-choice").value; if (knockouts.indexOf(v) < 0) knockouts.push(v); renderKnockList(); });
  $("knock-clear").addEventListener("click", function () { knockouts = []; renderKnockList(); showKnockout(null); });
  $("knock-run").addEventListener("click", function () { run("/api/knockout", { knockouts: knockouts }); });
  ["export-html", "export-zip"].forEach(function (id) {
    $(id).classList.add("mv-disabled");
    $(id).href = "/api/" + (id === "export-html" ? "export.html" : "export.zip") + "?session=" + session;
  });
})();
