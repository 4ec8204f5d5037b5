// The installer console: pair the installer's phone, then set up the door station.
// Every request to /api/console is signed by the phone's own key (a console request
// token bound to its method, path and body); the relay test sends a signed unlock
// command with the installer's authenticator code. See docs/installer.md.

import { b64url, b64urlText, makeKeyPair, sign, unlockToken } from "./keys.js";

const $ = (id) => document.getElementById(id);
const encoder = new TextEncoder();
const DB = "intercom-installer"; // apart from the resident app's device record

const con = {
  device: null, zones: [], drawing: [], buttons: [], selected: null, dragging: false,
  live: null, // { pc, session }: the live picture while "Live" is on
};

function show(name) {
  for (const section of document.querySelectorAll(".screen")) {
    section.hidden = section.id !== `screen-${name}`;
  }
  document.body.dataset.screen = name;
}

// --- the installer's device record (IndexedDB: the private key is non-extractable) ----

function store(mode, act) {
  return new Promise((resolve, reject) => {
    const open = indexedDB.open(DB, 1);
    open.onupgradeneeded = () => open.result.createObjectStore("device");
    open.onerror = () => reject(open.error);
    open.onsuccess = () => {
      const tx = open.result.transaction("device", mode);
      const request = act(tx.objectStore("device"));
      tx.oncomplete = () => { open.result.close(); resolve(request.result); };
      tx.onerror = () => { open.result.close(); reject(tx.error); };
    };
  });
}

const loadInstaller = () => store("readonly", (s) => s.get("installer")).then((r) => r ?? null);
const saveInstaller = (record) => store("readwrite", (s) => s.put(record, "installer"));
const forgetInstaller = () => store("readwrite", (s) => s.delete("installer"));

// --- signed requests ---------------------------------------------------------------------

async function requestToken(device, method, path, body) {
  const iat = Math.floor(Date.now() / 1000);
  const digest = new Uint8Array(await crypto.subtle.digest("SHA-256", body));
  const claims = {
    aud: device.station, cmd: "console", iat, exp: iat + 60,
    jti: b64url(crypto.getRandomValues(new Uint8Array(16))),
    htm: method, htu: path, bh: b64url(digest),
  };
  const header = { alg: device.alg, kid: device.principal };
  const input = `${b64urlText(JSON.stringify(header))}.${b64urlText(JSON.stringify(claims))}`;
  return `${input}.${b64url(await sign(device, encoder.encode(input)))}`;
}

/** One console request: signed, JSON in and out; a refusal throws with its answer. */
async function ask(method, action, data) {
  const path = new URL(`api/console/${action}`, location.href).pathname;
  const body = data === undefined ? new Uint8Array() : encoder.encode(JSON.stringify(data));
  const token = await requestToken(con.device, method, path, body);
  const response = await fetch(path, {
    method,
    headers: { Authorization: `Intercom ${token}`, "Content-Type": "application/json" },
    body: method === "GET" ? undefined : body,
    cache: "no-store",
  });
  const answer = await response.json().catch(() => ({}));
  if (response.status === 401) {
    noAccess("The station no longer accepts this phone as its installer.");
  }
  if (!response.ok) {
    const error = new Error(answer.error ?? `refused (${response.status})`);
    error.answer = answer;
    throw error;
  }
  return answer;
}

function noAccess(why) {
  $("who").textContent = "no access";
  $("none-why").textContent = why;
  show("none");
}

// --- pairing -------------------------------------------------------------------------

function pairingLink() {
  const params = new URLSearchParams(location.hash.slice(1));
  const code = params.get("pair");
  const fp = (params.get("fp") ?? "").toLowerCase().replace(/[^0-9a-f]/g, "");
  return code ? { code, fp } : null;
}

function startPairing(link) {
  show("pair");
  $("pair-fp").textContent = link.fp.match(/.{1,2}/g)?.join(":") ?? "";
  $("pair-go").onclick = async () => {
    $("pair-go").disabled = true;
    $("pair-error").textContent = "";
    try {
      const key = await makeKeyPair();
      const response = await fetch("api/pair", {
        method: "POST",
        headers: { "Content-Type": "application/json" },
        body: JSON.stringify({ code: link.code, jwk: key.jwk, name: "installer" }),
        cache: "no-store",
      });
      const answer = await response.json().catch(() => ({}));
      if (!response.ok) throw new Error(answer.error ?? `pairing refused (${response.status})`);
      con.device = {
        privateKey: key.privateKey, alg: key.alg, principal: answer.principal,
        station: answer.station, door: answer.door,
      };
      await saveInstaller(con.device);
      window.history.replaceState(null, "", location.pathname); // the code is spent
      showEnrolment(answer);
    } catch (err) {
      $("pair-error").textContent = String(err.message ?? err);
      $("pair-go").disabled = false;
    }
  };
}

function showEnrolment(answer) {
  show("enrol");
  let markup = answer.totp_qr_svg ?? "";
  if (markup.startsWith("<svg") && !markup.includes("xmlns=")) {
    markup = markup.replace("<svg", '<svg xmlns="http://www.w3.org/2000/svg"');
  }
  $("enrol-qr").src = `data:image/svg+xml;base64,${btoa(markup)}`;
  $("enrol-uri").textContent = answer.totp_uri ?? "";
  $("enrol-done").onclick = () => {
    $("enrol-qr").removeAttribute("src");
    $("enrol-uri").textContent = "";
    startConsole();
  };
}

// --- the console -----------------------------------------------------------------------

async function startConsole() {
  show("console");
  $("who").textContent = "installer";
  try {
    const state = await ask("GET", "state");
    $("station").textContent = state.station;
    con.zones = state.zones ?? [];
    $("redact").checked = Boolean(state.redact_all_outputs);
    renderButtons(state.buttons ?? []);
    if (state.selftest) renderSelftest(state.selftest);
    $("check-clock").checked = state.clock_synchronized === true;
    showNetwork(state);
    document.body.dataset.console = "ready";
    if (!state.writable) {
      $("console-error").textContent = "The station cannot write its config file: changes "
        + "will be refused (see docs/installer.md).";
    }
    showPresses(state);
    watchPresses();
    await refreshPicture();
  } catch (err) {
    $("console-error").textContent = String(err.message ?? err);
  }
}

/** Each button's last press, as the station saw it; all pressed ticks "each button tested". */
function showPresses(state) {
  const pressed = state.pressed ?? {};
  for (const slot of document.querySelectorAll("[data-pressed-for]")) {
    const at = pressed[slot.dataset.pressedFor];
    if (at) {
      slot.textContent = `${slot.dataset.pressedFor}: pressed at `
        + new Date(at * 1000).toLocaleTimeString();
      slot.dataset.pressed = "true";
    }
  }
  const names = (state.buttons ?? []).map((b) => b.name);
  if (names.length && names.every((name) => pressed[name])) $("check-buttons").checked = true;
}

async function watchPresses() {
  while (document.body.dataset.screen === "console") {
    await new Promise((resolve) => { setTimeout(resolve, 2000); });
    if (document.body.dataset.screen !== "console") break;
    try {
      showPresses(await ask("GET", "state"));
    } catch {
      // shown by the next action; a refused phone leaves the console anyway
    }
  }
}

// Each button's fields; "label" is what the residents it rings see when it rings.
const BUTTON_FIELDS = [["name", "text"], ["pin", "number"], ["flat", "text"], ["label", "text"]];
const BUTTON_FIELD_NAMES = { label: "shown to residents" };

function renderButtons(buttons) {
  con.buttons = buttons;
  const box = $("buttons");
  box.replaceChildren();
  buttons.forEach((button, i) => {
    const row = document.createElement("div");
    row.className = "button-row";
    for (const [field, kind] of BUTTON_FIELDS) {
      const key = `hardware.buttons[${i}].${field}`;
      const label = document.createElement("label");
      label.textContent = `${BUTTON_FIELD_NAMES[field] ?? field} (${button.name})`;
      const input = document.createElement("input");
      input.type = kind;
      input.value = String(button[field] ?? "");
      if (field === "label") {
        input.maxLength = 40;
        input.placeholder = "e.g. Main entrance";
      }
      input.dataset.key = key;
      input.id = `button-${i}-${field}`;
      label.htmlFor = input.id;
      const wrap = document.createElement("div");
      wrap.append(label, input);
      row.append(wrap);
    }
    const pressed = document.createElement("p");
    pressed.className = "note pressed";
    pressed.dataset.pressedFor = button.name;
    pressed.textContent = `${button.name}: not pressed yet (press it at the door)`;
    row.append(pressed);
    for (const [field] of BUTTON_FIELDS) {
      const error = document.createElement("p");
      error.className = "error";
      error.dataset.errorFor = `hardware.buttons[${i}].${field}`;
      row.append(error);
    }
    box.append(row);
  });
}

/** Show each refused key's reason next to its field; a key without a field above the form. */
function showRefusals(refused, fallback) {
  for (const node of document.querySelectorAll("[data-error-for]")) node.textContent = "";
  for (const problem of refused ?? []) {
    const slot = document.querySelector(`[data-error-for="${CSS.escape(problem.key)}"]`);
    if (slot) slot.textContent = problem.reason;
    else fallback.textContent = `${problem.key}: ${problem.reason}`;
  }
}

async function saveButtons(event) {
  event.preventDefault();
  const changes = {};
  for (const input of $("buttons").querySelectorAll("input[data-key]")) {
    const field = input.dataset.key.split(".").pop();
    const before = con.buttons[Number(input.dataset.key.match(/\[(\d+)\]/)[1])][field] ?? null;
    let value = field === "pin" ? Number(input.value) : input.value;
    if (field === "label") value = value.trim() || null; // empty: no label (null removes it)
    if (value !== before) changes[input.dataset.key] = value;
  }
  $("buttons-result").textContent = "";
  if (!Object.keys(changes).length) {
    $("buttons-result").textContent = "Nothing changed.";
    return;
  }
  try {
    const answer = await ask("POST", "config", { changes });
    showRefusals([], $("buttons-result"));
    $("buttons-result").textContent = answer.at_restart?.length
      ? "Saved; takes effect when the station restarts." : "Saved.";
    const state = await ask("GET", "state");
    renderButtons(state.buttons);
  } catch (err) {
    showRefusals(err.answer?.refused, $("buttons-result"));
    if (!err.answer?.refused) $("buttons-result").textContent = String(err.message ?? err);
  }
}

async function relayTest() {
  const code = $("relay-totp").value.trim();
  $("relay-result").textContent = "Pulsing…";
  try {
    const { token } = await unlockToken(con.device, code);
    const answer = await ask("POST", "relay-test", { token });
    const door = answer.door ? `; door: ${answer.door}` : "";
    $("relay-result").textContent = `Relay ${answer.result}${door}.`;
    $("relay-result").dataset.result = answer.result;
    if (answer.result === "granted") $("check-relay").checked = true;
  } catch (err) {
    $("relay-result").textContent = String(err.message ?? err);
  }
  $("relay-totp").value = "";
}

async function runSelftest() {
  $("selftest").replaceChildren();
  try {
    renderSelftest(await ask("POST", "selftest"));
  } catch (err) {
    $("console-error").textContent = String(err.message ?? err);
  }
}

function renderSelftest(report) {
  const list = $("selftest");
  list.replaceChildren();
  for (const check of report.checks ?? []) {
    const item = document.createElement("li");
    item.dataset.outcome = check.outcome;
    item.dataset.part = check.part;
    item.textContent = `${check.part}: ${check.outcome} — ${check.detail}`;
    list.append(item);
  }
  list.dataset.passed = String(report.passed);
}

// --- privacy zones, drawn by pointer on a still picture --------------------------------

async function refreshPicture() {
  const preview = await ask("GET", "preview");
  const picture = $("zone-picture");
  await new Promise((resolve) => {
    picture.onload = resolve;
    picture.onerror = resolve;
    picture.src = `data:image/jpeg;base64,${preview.jpeg}`;
  });
  picture.dataset.zones = String(preview.zones.length);
  const canvas = $("zone-canvas");
  canvas.width = preview.width;
  canvas.height = preview.height;
  drawZones();
}

function drawZones() {
  const canvas = $("zone-canvas");
  const g = canvas.getContext("2d");
  g.clearRect(0, 0, canvas.width, canvas.height);
  g.lineWidth = Math.max(2, canvas.width / 200);
  const path = (points, closed) => {
    g.beginPath();
    points.forEach(([x, y], i) => {
      const at = [x * canvas.width, y * canvas.height];
      if (i === 0) g.moveTo(...at); else g.lineTo(...at);
    });
    if (closed) g.closePath();
    g.stroke();
  };
  g.strokeStyle = "#ffb703";
  for (const zone of con.zones) path(zone, true);
  g.strokeStyle = "#4f8fe8";
  if (con.drawing.length) path(con.drawing, false);
  g.fillStyle = "#4f8fe8";
  for (const [x, y] of con.drawing) {
    g.fillRect(x * canvas.width - 4, y * canvas.height - 4, 8, 8);
  }
  if (con.selected) {
    const [x, y] = con.zones[con.selected.zone][con.selected.point];
    g.fillStyle = "#b3261e";
    g.fillRect(x * canvas.width - 6, y * canvas.height - 6, 12, 12);
  }
  $("zone-canvas").dataset.points = String(con.drawing.length);
  $("zone-canvas").dataset.zones = String(con.zones.length);
}

const GRAB_PX = 16; // a tap this close to a corner of a zone takes that corner

function pointAt(event) {
  const box = $("zone-canvas").getBoundingClientRect();
  const clamp = (v) => Math.min(1, Math.max(0, Math.round(v * 1000) / 1000));
  return {
    at: [clamp((event.clientX - box.left) / box.width),
      clamp((event.clientY - box.top) / box.height)],
    box,
  };
}

function cornerNear(event, box) {
  let best = null;
  con.zones.forEach((zone, z) => zone.forEach(([x, y], p) => {
    const dx = x * box.width - (event.clientX - box.left);
    const dy = y * box.height - (event.clientY - box.top);
    const d = Math.hypot(dx, dy);
    if (d <= GRAB_PX && (!best || d < best.d)) best = { zone: z, point: p, d };
  }));
  return best;
}

function select(corner) {
  con.selected = corner ? { zone: corner.zone, point: corner.point } : null;
  $("zone-canvas").dataset.selected = corner ? `${corner.zone}:${corner.point}` : "";
}

function pointerDown(event) {
  const { at, box } = pointAt(event);
  const corner = con.drawing.length ? null : cornerNear(event, box);
  if (corner) { // move a corner of a zone: drag it
    select(corner);
    con.dragging = true;
    $("zone-canvas").setPointerCapture(event.pointerId);
  } else {
    select(null);
    con.drawing.push(at);
  }
  drawZones();
}

function pointerMove(event) {
  if (!con.dragging || !con.selected) return;
  con.zones[con.selected.zone][con.selected.point] = pointAt(event).at;
  drawZones();
}

function pointerUp() {
  con.dragging = false;
}

/** Remove the selected corner (a zone left with fewer than 3 goes), else the last new one. */
function removePoint() {
  if (con.selected) {
    const zone = con.zones[con.selected.zone];
    zone.splice(con.selected.point, 1);
    if (zone.length < 3) con.zones.splice(con.selected.zone, 1);
    select(null);
  } else {
    con.drawing.pop();
  }
  drawZones();
}

// The live picture: a session of the station's redacted live view (the WHEP view's
// track: zones masked, faces blurred), asked for with this phone's signed request; the
// zones are drawn on the canvas over the video. The station ends it at the hand-off.

/** The offer with every candidate (the station takes no trickle), within 5 s. */
function gathered(pc) {
  return new Promise((resolve) => {
    const done = () => { if (pc.iceGatheringState === "complete") resolve(); };
    pc.addEventListener("icegatheringstatechange", done);
    done();
    setTimeout(resolve, 5000);
  });
}

async function startLive() {
  const pc = new RTCPeerConnection();
  const video = $("zone-video");
  pc.addTransceiver("video", { direction: "recvonly" });
  pc.ontrack = (event) => { video.srcObject = new MediaStream([event.track]); };
  con.live = { pc, session: null };
  await pc.setLocalDescription(await pc.createOffer());
  await gathered(pc);
  const answer = await ask("POST", "live", { sdp: pc.localDescription.sdp });
  if (con.live?.pc !== pc) { // stopped meanwhile
    ask("POST", "live-end", { session: answer.session }).catch(() => {});
    return;
  }
  con.live.session = answer.session;
  await pc.setRemoteDescription({ type: "answer", sdp: answer.sdp });
  pc.onconnectionstatechange = () => {
    if (["failed", "closed", "disconnected"].includes(pc.connectionState) && con.live?.pc === pc) {
      stopLive("The live picture ended.");
    }
  };
  video.onloadeddata = () => { video.dataset.live = "playing"; };
  video.hidden = false;
  $("zone-picture").hidden = true;
}

function stopLive(why) {
  const live = con.live;
  con.live = null;
  const video = $("zone-video");
  video.srcObject = null;
  video.hidden = true;
  delete video.dataset.live;
  $("zone-picture").hidden = false;
  $("zone-live").setAttribute("aria-pressed", "false");
  if (why) $("zones-result").textContent = why;
  if (!live) return;
  live.pc.close();
  if (live.session) ask("POST", "live-end", { session: live.session }).catch(() => {});
}

/** "Live": the live picture on or off (off: the still picture, refreshed on demand). */
async function live() {
  const button = $("zone-live");
  if (button.getAttribute("aria-pressed") === "true") {
    stopLive("");
    await refreshPicture().catch(() => {});
    return;
  }
  button.setAttribute("aria-pressed", "true");
  try {
    await startLive();
  } catch (err) {
    stopLive(`No live picture: ${err.message ?? err}`);
  }
}

function saveRedaction() {
  return saveSettings({ "privacy.redact_all_outputs": $("redact").checked }, $("zones-result"));
}

async function saveZones() {
  $("zones-result").textContent = "";
  try {
    await ask("POST", "config", { changes: { "privacy.zones": con.zones } });
    showRefusals([], $("zones-result"));
    $("zones-result").textContent = "Saved: every output is masked from now on.";
    if (con.zones.length) $("check-zones").checked = true;
    await refreshPicture();
  } catch (err) {
    showRefusals(err.answer?.refused, $("zones-result"));
    if (!err.answer?.refused) $("zones-result").textContent = String(err.message ?? err);
  }
}

async function makeSheets() {
  $("sheets-result").textContent = "Making the sheets…";
  try {
    const answer = await ask("POST", "sheets", {});
    const bytes = Uint8Array.from(atob(answer.pdf), (c) => c.charCodeAt(0));
    const link = $("sheets-link");
    if (link.href) URL.revokeObjectURL(link.href);
    link.href = URL.createObjectURL(new Blob([bytes], { type: "application/pdf" }));
    link.hidden = false;
    $("sheets-result").textContent = `Sheets for flats ${answer.flats.join(", ")}.`;
    $("sheets-result").dataset.flats = String(answer.flats.length);
  } catch (err) {
    $("sheets-result").textContent = String(err.message ?? err);
  }
}

// --- audio check: the microphone's level, a test tone --------------------------------

async function listen() {
  const button = $("mic-go");
  const on = button.getAttribute("aria-pressed") !== "true";
  button.setAttribute("aria-pressed", String(on));
  button.textContent = on ? "Stop listening" : "Listen";
  while (button.getAttribute("aria-pressed") === "true") {
    try {
      const level = await ask("GET", "audio-level");
      $("mic-level").value = level.peak;
      $("mic-result").textContent = level.dbfs === null ? "silence" : `${level.dbfs} dBFS`;
      $("mic-result").dataset.peak = String(level.peak);
    } catch (err) {
      $("mic-result").textContent = String(err.message ?? err);
    }
    await new Promise((resolve) => { setTimeout(resolve, 300); });
  }
}

async function playTone() {
  $("tone-result").textContent = "Playing…";
  try {
    const answer = await ask("POST", "tone", {});
    $("tone-result").textContent = `Played ${answer.played_s} s at ${answer.hz} Hz: `
      + "did you hear it at the door?";
    $("tone-result").dataset.played = "true";
  } catch (err) {
    $("tone-result").textContent = String(err.message ?? err);
  }
}

// --- network: the MQTT broker and the public URL --------------------------------------

function showNetwork(state) {
  const mqtt = state.mqtt ?? {};
  $("mqtt-host").value = mqtt.host ?? "";
  $("mqtt-port").value = mqtt.port ?? "";
  $("mqtt-username").value = mqtt.username ?? "";
  $("mqtt-password-file").value = mqtt.password_file ?? "";
  $("mqtt-tls").checked = Boolean(mqtt.tls);
  $("public-url").value = state.public_url ?? "";
  $("url-now").textContent = state.url ? `Now: ${state.url}` : "";
}

function mqttGiven() {
  const given = { host: $("mqtt-host").value.trim(), tls: $("mqtt-tls").checked };
  const port = $("mqtt-port").value.trim();
  if (port) given.port = /^\d+$/.test(port) ? Number(port) : port;
  for (const [id, key] of [["mqtt-username", "username"], ["mqtt-password-file", "password_file"]]) {
    const value = $(id).value.trim();
    if (value) given[key] = value;
  }
  return given;
}

async function testMqtt() {
  $("mqtt-result").textContent = "Connecting…";
  try {
    const answer = await ask("POST", "mqtt-test", { mqtt: mqttGiven() });
    showRefusals([], $("mqtt-result"));
    $("mqtt-result").textContent = `${answer.broker}${answer.tls ? " (TLS)" : ""}: ${answer.detail}`;
    $("mqtt-result").dataset.ok = String(answer.ok);
  } catch (err) {
    showRefusals(err.answer?.refused, $("mqtt-result"));
    if (!err.answer?.refused) $("mqtt-result").textContent = String(err.message ?? err);
  }
}

async function saveSettings(changes, result) {
  try {
    const answer = await ask("POST", "config", { changes });
    showRefusals([], result);
    result.textContent = answer.at_restart?.length
      ? "Saved; takes effect when the station restarts." : "Saved.";
  } catch (err) {
    showRefusals(err.answer?.refused, result);
    if (!err.answer?.refused) result.textContent = String(err.message ?? err);
  }
}

function saveMqtt(event) {
  event.preventDefault();
  const given = mqttGiven();
  const changes = {};
  for (const key of ["host", "port", "username", "password_file", "tls"]) {
    changes[`mqtt.${key}`] = given[key] ?? null; // null: the key is removed
  }
  return saveSettings(changes, $("mqtt-result"));
}

function saveUrl() {
  const url = $("public-url").value.trim();
  return saveSettings({ "web.public_url": url || null }, $("url-result"));
}

// --- hand-off --------------------------------------------------------------------------

async function handOff() {
  const checklist = {};
  stopLive("");
  for (const box of $("checklist").querySelectorAll("input[data-item]")) {
    checklist[box.dataset.item] = box.checked;
  }
  try {
    const answer = await ask("POST", "handoff", { checklist });
    const ended = answer.missing.length
      ? `Installer access ended. Not done: ${answer.missing.join(", ")}.`
      : "Installer access ended. The door station is handed over.";
    // Confirm: the station must now refuse this phone's next request.
    const refused = await ask("GET", "state").then(() => false, () => true);
    await forgetInstaller();
    noAccess(refused ? `${ended} The station refuses this phone now.` : ended);
    document.body.dataset.handoff = refused ? "confirmed" : "unconfirmed";
  } catch (err) {
    $("handoff-result").textContent = String(err.message ?? err);
  }
}

function wire() {
  $("relay-go").onclick = relayTest;
  $("buttons-form").onsubmit = saveButtons;
  $("selftest-go").onclick = runSelftest;
  $("zone-canvas").addEventListener("pointerdown", pointerDown);
  $("zone-canvas").addEventListener("pointermove", pointerMove);
  $("zone-canvas").addEventListener("pointerup", pointerUp);
  $("zone-canvas").addEventListener("pointercancel", pointerUp);
  $("zone-close").onclick = () => {
    if (con.drawing.length >= 3) con.zones.push(con.drawing);
    con.drawing = [];
    drawZones();
  };
  $("zone-undo").onclick = removePoint;
  $("zone-clear").onclick = () => { con.zones = []; con.drawing = []; select(null); drawZones(); };
  $("zone-live").onclick = live;
  $("redact").onchange = saveRedaction;
  $("zone-save").onclick = saveZones;
  $("sheets-go").onclick = makeSheets;
  $("mic-go").onclick = listen;
  $("tone-go").onclick = playTone;
  $("mqtt-test").onclick = testMqtt;
  $("mqtt-form").onsubmit = saveMqtt;
  $("url-save").onclick = saveUrl;
  $("handoff-go").onclick = handOff;
}

async function main() {
  wire();
  const link = pairingLink();
  if (link) {
    startPairing(link);
    return;
  }
  con.device = await loadInstaller();
  if (con.device) await startConsole();
  else show("none");
}

main();
