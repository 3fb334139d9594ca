// The live topic viewer of index.html: connects with MQTT.js over WebSocket,
// subscribes to one filter, shows the last payload and a count per topic, and
// publishes what the form says. State is also kept in `window.viewer` so that the
// browser test (tests/browser/run.mjs) can read what arrived.
"use strict";

(function () {
  const params = new URLSearchParams(window.location.search);
  const url = params.get("url") || `ws://${window.location.hostname || "127.0.0.1"}:8083/mqtt`;
  const filter = params.get("topic") || "#";
  const version = Number(params.get("v") || 4); // 4 = MQTT 3.1.1, 5 = MQTT 5.0

  const $ = (id) => document.getElementById(id);
  const viewer = { url, filter, status: "connecting", messages: [], errors: [] };
  window.viewer = viewer;
  $("url").textContent = url;
  $("filter").textContent = filter;

  function setStatus(text, ok) {
    viewer.status = text;
    const el = $("status");
    el.textContent = text;
    el.className = ok === undefined ? "" : ok ? "ok" : "bad";
  }
  function log(line) {
    const div = document.createElement("div");
    div.textContent = `${new Date().toISOString().slice(11, 23)} ${line}`;
    $("log").prepend(div);
  }

  const rows = new Map(); // topic -> { tr, count }
  function show(topic, payload, retain) {
    let row = rows.get(topic);
    if (!row) {
      const tr = document.createElement("tr");
      for (const cls of ["topic", "payload", "count", "retained"]) {
        const td = document.createElement("td");
        td.className = cls;
        tr.appendChild(td);
      }
      tr.children[0].textContent = topic;
      row = { tr, count: 0 };
      rows.set(topic, row);
      $("topics").appendChild(tr);
    }
    row.count += 1;
    row.tr.children[1].textContent = payload;
    row.tr.children[2].textContent = String(row.count);
    row.tr.children[3].textContent = retain ? "yes" : "";
  }

  const client = mqtt.connect(url, {
    protocolVersion: version,
    clientId: `viewer-${Math.random().toString(16).slice(2, 10)}`,
    clean: true,
    reconnectPeriod: 0, // a test wants to see failures, not retries
    connectTimeout: 10000,
  });
  viewer.client = client;

  client.on("connect", () => {
    setStatus("connected", true);
    log(`connected to ${url}`);
    client.subscribe(filter, { qos: 1 }, (err, granted) => {
      if (err) {
        viewer.errors.push(String(err));
        setStatus(`subscribe failed: ${err}`, false);
        return;
      }
      log(`subscribed to ${filter} (granted QoS ${granted.map((g) => g.qos).join(",")})`);
      setStatus("subscribed", true);
    });
  });
  client.on("message", (topic, payload, packet) => {
    const text = new TextDecoder().decode(payload);
    viewer.messages.push({ topic, payload: text, qos: packet.qos, retain: packet.retain });
    show(topic, text, packet.retain);
    log(`message on ${topic}: ${text}`);
  });
  client.on("error", (err) => {
    viewer.errors.push(String(err));
    setStatus(`error: ${err.message || err}`, false);
  });
  client.on("close", () => {
    if (viewer.status !== "subscribed" && viewer.status !== "connected") return;
    setStatus("disconnected", false);
    log("connection closed");
  });

  $("publish").addEventListener("submit", (ev) => {
    ev.preventDefault();
    const topic = $("pub-topic").value;
    const payload = $("pub-payload").value;
    const opts = { qos: Number($("pub-qos").value), retain: $("pub-retain").checked };
    client.publish(topic, payload, opts, (err) => {
      if (err) {
        viewer.errors.push(String(err));
        log(`publish to ${topic} failed: ${err}`);
      } else {
        viewer.published = (viewer.published || 0) + 1;
        log(`published to ${topic}`);
      }
    });
  });
})();
