// The resident web client: pairing, the ring screen, the call, opening the door.

import * as history from "./history.js";
import * as totp from "./totp.js";
import { StationPeer, microphone } from "./call.js";
import { loadDevice, makeKeyPair, saveDevice, unlockToken } from "./keys.js";
import { Signal } from "./signal.js";
import * as push from "./push.js";

const $ = (id) => document.getElementById(id);
const UNLOCK_TIMEOUT_MS = 10000;
const HISTORY_DELAY_MS = 250;
const ALIVE_EVERY_MS = 2000; // an answered call is stamped in the history this often
// What the header says before the device has a connection of its own to show.
const PHASES = { pairing: "pairing…", enrolling: "enrolling" };

const app = {
  device: null,
  signal: null,
  peer: null, // the StationPeer: its number is the station's for that connection
  iceServers: [],
  icePolicy: "all",
  call: null, // the call id while ringing or in a call
  state: "idle", // idle | ringing | in_call
  muted: false,
  link: "not paired", // the signalling link: connecting | online | offline | refused
  phase: null, // pairing | enrolling: what the header says instead of the link meanwhile
  pendingUnlock: null, // { jti, resolve }
  historyLater: [], // call history updates waiting until the ring is on screen
  // Diagnostics, epoch ms on this machine's wall clock (performance.timeOrigin + now):
  rings: [], // { call, pressed, at, shown, painted }: the station's press stamp, ring
  //            message handled, ring screen set, the animation frame that paints it
  frames: [], // the latest video frames: when presented (requestVideoFrameCallback's now)
  received: [], // when their last packet arrived (same order as frames)
  decoded: [], // that plus the decoder's time (processingDuration: no jitter buffer wait)
  composited: [], // when they were handed to the compositor (presentationTime)
};

// ---------- screens ----------

/** Now, in epoch ms, with sub-millisecond resolution (Date.now() has whole ms). */
const clock = () => performance.timeOrigin + performance.now();

function show(screen) {
  for (const el of document.querySelectorAll(".screen")) el.hidden = el.id !== `screen-${screen}`;
}

function setLink(state) {
  app.link = state;
  showLink();
}

/** The header: pairing or enrolling while the device does that, else the link. */
function setPhase(phase) {
  app.phase = phase;
  showLink();
}

function showLink() {
  const shown = app.phase ?? app.link;
  $("link-state").textContent = PHASES[shown] ?? shown;
  $("link-state").dataset.state = shown;
  document.body.dataset.link = shown;
}

function setCallState(state, text) {
  if (app.state === "ringing" && state !== "ringing") navigator.vibrate?.(0);
  app.state = state;
  document.body.dataset.call = state;
  $("stage").className = `stage ${state === "idle" ? "idle" : "live"}`; // the cover
  $("call-state").textContent = text;
  $("ring-actions").hidden = state !== "ringing";
  $("call-actions").hidden = state !== "in_call";
  if (state !== "in_call") $("unlock-form").hidden = true;
  document.title = state === "ringing" ? "Ringing: someone is at the door" : "Door";
}

/** The ring screen's words: with the name the installer gave the button, when it has one. */
function ringText(label) {
  return typeof label === "string" && label
    ? `${label.slice(0, 40)}: someone is at the door` : "Someone is at the door";
}

function formatFingerprint(hex) {
  return hex.toUpperCase().match(/.{2}/g)?.join(":") ?? "";
}

function normalFingerprint(text) {
  return (text ?? "").toLowerCase().replace(/[^0-9a-f]/g, "");
}

/**
 * Note in the call history later (HISTORY_DELAY_MS, or at once before the next note):
 * storing and re-listing the history takes the page's main thread for milliseconds, in
 * which it cannot paint the ring screen or the first video frame.
 */
function deferHistory(update) {
  app.historyLater.push(update);
  if (app.historyLater.length === 1) setTimeout(flushHistory, HISTORY_DELAY_MS);
}

function flushHistory() {
  const updates = app.historyLater.splice(0);
  for (const update of updates) update();
  if (updates.length) renderHistory();
}

function renderHistory() {
  const list = $("history");
  list.replaceChildren();
  const entries = history.calls();
  if (!entries.length) {
    const item = document.createElement("li");
    item.className = "empty";
    item.textContent = "No calls yet.";
    list.append(item);
    return;
  }
  for (const entry of entries) {
    const item = document.createElement("li");
    const when = new Date(entry.rang * 1000).toLocaleString();
    item.textContent = `${when}: ${history.describe(entry)}`;
    item.title = `call ${entry.call}`;
    list.append(item);
  }
}

// ---------- pairing ----------

function pairingFromLink() {
  const params = new URLSearchParams(location.hash.slice(1));
  const code = params.get("pair");
  const fp = normalFingerprint(params.get("fp"));
  return code && fp.length === 64 ? { code, fp } : null;
}

async function showPairing(link) {
  show("pair");
  $("pair-fp").textContent = formatFingerprint(link.fp);
  const check = $("pair-fp-check");
  try {
    const info = await (await fetch("api/info", { cache: "no-store" })).json();
    if (normalFingerprint(info.fingerprint) !== link.fp) {
      check.textContent = "This station reports a different fingerprint than your pairing "
        + "link. Do not pair; ask whoever gave you the link.";
      check.className = "error";
      $("pair-go").disabled = true;
      return;
    }
    check.textContent = `Station ${info.station}, door ${info.door}. The station reports the `
      + "same fingerprint, but only your browser's certificate view can prove it.";
  } catch {
    check.textContent = "Could not reach the station.";
  }
  $("pair-trust").href = `trust.html#fp=${encodeURIComponent(link.fp)}`; // it checks the link's
  $("pair-go").onclick = () => pair(link);
}

async function pair(link) {
  const button = $("pair-go");
  button.disabled = true;
  $("pair-error").textContent = "";
  $("pair-home").hidden = true;
  setPhase("pairing");
  try {
    const key = await makeKeyPair();
    const body = { code: link.code, jwk: key.jwk };
    const response = await fetch("api/pair", {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify(body),
      cache: "no-store",
    });
    const answer = await response.json().catch(() => ({}));
    if (!response.ok) throw new Error(pairingRefused(response.status, answer.error));
    const device = {
      privateKey: key.privateKey, alg: key.alg, jwk: key.jwk,
      principal: answer.principal, station: answer.station, door: answer.door,
      flat: answer.flat, fingerprint: link.fp, pairedAt: Date.now() / 1000,
    };
    await saveDevice(device);
    app.device = device;
    history.clear();
    window.history.replaceState(null, "", location.pathname); // the code is spent
    showEnrolment(answer);
  } catch (err) {
    setPhase(null);
    $("pair-error").textContent = String(err.message ?? err);
    $("pair-home").hidden = !app.device; // paired before: the link is simply spent
    button.disabled = false;
  }
}

/** Why pairing was refused, and what to do about it. */
function pairingRefused(status, error) {
  const why = error ?? `pairing refused (${status})`;
  if (status === 403) {
    return `${why}. A pairing link works once, and for 10 minutes (a printed pairing sheet's `
      + "for two weeks). Ask your installer or building manager for a new pairing link.";
  }
  if (status === 429) return `${why}. Too many tries from this network: wait a minute.`;
  return why;
}

function showEnrolment(answer) {
  show("enrol");
  setPhase("enrolling");
  connect(); // signed in now: the station checks the typed code over this connection
  let markup = answer.totp_qr_svg ?? "";
  if (markup.startsWith("<svg") && !markup.includes("xmlns=")) {
    markup = markup.replace("<svg", '<svg xmlns="http://www.w3.org/2000/svg"'); // as an image
  }
  const svg = new TextEncoder().encode(markup);
  let text = "";
  for (const byte of svg) text += String.fromCharCode(byte);
  $("enrol-qr").src = `data:image/svg+xml;base64,${btoa(text)}`;
  $("enrol-uri").textContent = answer.totp_uri ?? "";
  const finish = () => {
    $("enrol-qr").removeAttribute("src");
    $("enrol-uri").textContent = ""; // shown once: not kept anywhere on this device
    $("enrol-code").value = "";
    startHome();
  };
  $("enrol-check").onsubmit = async (event) => {
    event.preventDefault();
    const code = $("enrol-code").value.trim();
    const error = $("enrol-error");
    if (!/^[0-9]{6}$/.test(code)) {
      error.textContent = "Type the 6 digits your authenticator app shows.";
      return;
    }
    const button = $("enrol-done");
    button.disabled = true;
    button.textContent = "Checking with the station…";
    error.textContent = "";
    delete error.dataset.result;
    const result = await totp.check(app.signal, code);
    button.disabled = false;
    button.textContent = "Check and finish";
    if (result === "right") {
      finish();
    } else {
      error.textContent = totp.advice(result);
      error.dataset.result = result;
    }
  };
  $("enrol-skip").onclick = () => {
    const warning = $("enrol-skip-warning");
    if (warning.hidden) { // warned first: a failed scan would show only at the door
      warning.hidden = false;
      $("enrol-skip").textContent = "Skip anyway";
      return;
    }
    finish();
  };
}

// ---------- the call ----------

/** Whether this device rings with the app closed (docs/push.md), and the button to ask. */
function showPush(state, error) {
  const texts = {
    on: "This device rings even when the app is closed.",
    off: "This device rings only while the app is open.",
    denied: "Notifications are blocked for this site: allow them in the browser's site "
      + "settings to be rung while the app is closed.",
    unsupported: "This browser cannot ring while the app is closed (on an iPhone, add the "
      + "app to the home screen first).",
  };
  $("push-state").textContent = error ? `The station refused push: ${error}` : texts[state] ?? "";
  $("push-enable").hidden = ["on", "denied", "unsupported"].includes(state);
}

function refreshPush(ask = false) {
  push.enable(app.signal, ask)
    .then((state) => showPush(state))
    .catch((err) => showPush("off", String(err.message ?? err)));
}

function startHome() {
  show("home");
  setPhase(null);
  const d = app.device;
  $("info-station").textContent = d.station;
  $("info-door").textContent = d.door;
  $("info-flat").textContent = d.flat;
  $("info-principal").textContent = d.principal;
  $("info-fp").textContent = formatFingerprint(d.fingerprint ?? "");
  if (app.state === "idle") setCallState("idle", "No call"); // a ring while enrolling stays
  renderHistory();
  watchFrames();
  microphone(); // ask now, so the first answer to the station needs no prompt
  connect();
}

/** Sign in to the station and stay connected (once: enrolment starts it already). */
function connect() {
  if (app.signal) return;
  app.signal = new Signal(app.device, { message: onMessage, state: onLink });
  app.signal.start();
  window.addEventListener("online", () => app.signal.nudge());
  document.addEventListener("visibilitychange", () => {
    if (!document.hidden) app.signal.check(); // back on screen: is the station still there?
  });
  setInterval(stampAlive, ALIVE_EVERY_MS);
  window.addEventListener("pagehide", stampAlive);
}

/** Note in the history that the call is still on: a reload or a crash ends it there. */
function stampAlive() {
  if (app.state === "in_call") history.alive(app.call, Date.now() / 1000);
}

/**
 * When the station was last seen (epoch s): its last message or, in a call, the last
 * video frame shown. A silent network is noticed only seconds later; the call ended then.
 */
function lastSeen() {
  const heard = Math.max(app.signal?.lastHeard ?? 0, app.frames.at(-1) ?? 0) / 1000;
  return heard > 0 ? Math.min(heard, Date.now() / 1000) : Date.now() / 1000;
}

function onLink(state, detail) {
  setLink(state);
  if (state === "offline" || state === "refused") {
    app.peer?.close();
    app.peer = null;
    if (app.state !== "idle") {
      // A call cut by the network ends here too, in the history as well (not "answered"
      // for ever); a ring that was never answered counts as missed.
      const ended = app.state === "in_call" ? "ended" : "missed";
      endCall(ended, { ended: lastSeen(), reason: "connection lost" });
      $("call-state").textContent = ended === "ended" ? "Call cut: connection lost"
        : "Missed: connection lost";
    }
  }
  if (state === "refused") {
    $("call-state").textContent = "The station refused this device: it may have been "
      + "removed. Ask for a new pairing link.";
  }
  if (state === "online" && detail) {
    for (const key of ["station", "door", "flat"]) if (detail[key]) app.device[key] = detail[key];
  }
}

/** The ICE servers (short-lived TURN credentials among them) and policy the station gives. */
function takeIce(msg) {
  app.iceServers = Array.isArray(msg.ice_servers) ? msg.ice_servers : [];
  app.icePolicy = msg.ice_policy === "relay" ? "relay" : "all";
}

async function onMessage(msg) {
  switch (msg.type) {
    case "ready":
      app.peer?.close();
      app.peer = null;
      takeIce(msg);
      refreshPush(); // renew the push subscription at each sign-in
      break;
    case "ice": // fresh TURN credentials: the next connection (offered next) uses them
      takeIce(msg);
      break;
    case "offer": {
      // A new connection number: the station replaced the connection (after a call, the
      // idle one again); the same number: it renegotiates it (a ring turns media on).
      if (app.peer?.number !== msg.peer) {
        app.peer?.close();
        const peer = new StationPeer({
          number: msg.peer,
          iceServers: app.iceServers,
          icePolicy: app.icePolicy,
          video: $("preview"),
          audio: $("door-audio"),
          onControl,
          onState: (state) => { // reconnect: a fresh sign-in, a fresh connection
            if (state === "failed" && peer === app.peer) app.signal.ws?.close(4000);
          },
        });
        peer.setMuted(app.muted, false);
        app.peer = peer;
      }
      const peer = app.peer;
      const sdp = await peer.answer(msg.sdp);
      if (peer === app.peer) app.signal.send({ type: "answer", sdp, peer: msg.peer });
      break;
    }
    case "ring": {
      // The ring screen first, then nothing else until it and the first picture had
      // their chance to be painted: the call history waits (see deferHistory).
      const ring = { call: msg.call, at: clock(), pressed: (msg.at ?? 0) * 1000 };
      app.call = msg.call;
      clearUnlockResult(); // the last call's result is old news
      setCallState("ringing", ringText(msg.label));
      ring.shown = clock();
      requestAnimationFrame(() => { ring.painted = clock(); }); // the frame that paints it
      app.rings.push(ring);
      if (app.opened?.call === msg.call) { // opened from the notification
        const take = app.opened.answer;
        app.opened = null;
        if (take) answer(); // its Answer action: answer the ring the station just sent
      }
      navigator.vibrate?.([300, 200, 300]);
      const rang = msg.at ?? Date.now() / 1000;
      deferHistory(() => history.note(msg.call, "ringing", { rang }));
      break;
    }
    case "call":
      onCallState(msg);
      break;
    case "push":
      showPush(msg.subscribed ? "on" : "off", msg.error);
      break;
    case "totp-check":
      totp.answered(msg);
      break;
    default:
      break;
  }
}

function onCallState(msg) {
  if (msg.call !== app.call) return;
  flushHistory(); // in order: the ring's note first
  const now = Date.now() / 1000;
  if (msg.state === "answered") {
    history.note(msg.call, "answered", { answered: now, alive: now });
    setCallState("in_call", "In call");
    app.peer?.talk(true);
    renderHistory();
  } else if (["taken", "missed", "ended"].includes(msg.state)) {
    endCall(msg.state, { ended: now });
  }
}

/** The call is over (`state`: how): the history notes it, the page goes idle. */
function endCall(state, fields) {
  flushHistory(); // in order: the ring's note first
  history.note(app.call, state, fields);
  endLocally(state);
  renderHistory();
}

function endLocally(reason) {
  app.peer?.talk(false);
  app.call = null;
  app.pendingUnlock?.resolve("call over");
  clearUnlockResult(); // the call's result goes with the call
  const texts = { taken: "Answered on another device", missed: "Missed", ended: "Call ended" };
  setCallState("idle", texts[reason] ?? "No call");
}

function clearUnlockResult() {
  $("unlock-form").hidden = true;
  $("unlock-result").textContent = "";
  delete $("unlock-result").dataset.result;
}

function answer() {
  if (app.state !== "ringing") return;
  $("door-audio").play().catch(() => {}); // within the tap, so the browser allows sound
  $("call-state").textContent = "Connecting…";
  app.signal.send({ type: "accept", call: app.call });
}

function decline() {
  if (app.state !== "ringing") return;
  app.signal.send({ type: "decline", call: app.call });
  endCall("declined", { ended: Date.now() / 1000 });
}

function hangup() {
  if (app.state !== "in_call") return;
  app.signal.send({ type: "hangup", call: app.call });
  endCall("ended", { ended: Date.now() / 1000 });
}

function toggleMute() {
  app.muted = !app.muted;
  app.peer?.setMuted(app.muted, app.state === "in_call");
  $("btn-mute").setAttribute("aria-pressed", String(app.muted));
  $("btn-mute").textContent = app.muted ? "Unmute" : "Mute";
}

// ---------- opening the door ----------

function askCode() {
  $("unlock-form").hidden = false;
  $("unlock-result").textContent = "";
  $("unlock-code").value = "";
  $("unlock-code").focus();
}

async function sendUnlock(event) {
  event.preventDefault();
  const code = $("unlock-code").value.trim();
  const result = $("unlock-result");
  if (!/^[0-9]{6}$/.test(code)) {
    result.textContent = "Enter the 6 digits from your authenticator.";
    return;
  }
  $("unlock-form").hidden = true;
  result.textContent = "Opening…";
  result.dataset.result = "pending";
  const call = app.call;
  const { token, jti } = await unlockToken(app.device, code);
  if (app.call !== call) return; // the call ended while the command was signed
  const outcome = new Promise((resolve) => {
    app.pendingUnlock = { jti, resolve };
    setTimeout(() => resolve("no answer"), UNLOCK_TIMEOUT_MS);
  });
  if (!app.peer?.sendControl(token)) {
    app.pendingUnlock = null;
    result.textContent = "Not connected to the door.";
    result.dataset.result = "error";
    return;
  }
  const verdict = await outcome;
  if (app.pendingUnlock?.jti === jti) app.pendingUnlock = null;
  if (app.call !== call || verdict === "call over") return; // the call ended meanwhile
  result.dataset.result = verdict;
  result.textContent = verdict === "granted" ? "Door opened"
    : verdict === "denied" ? "Refused: wrong or used code?" : "The door did not answer.";
}

function onControl(msg) {
  if (msg.type === "unlock-result" && app.pendingUnlock?.jti === msg.jti) {
    app.pendingUnlock.resolve(msg.result === "granted" ? "granted" : "denied");
  }
}

// ---------- diagnostics (read by the tests and scripts/bench call) ----------

function watchFrames() {
  const video = $("preview");
  if (!("requestVideoFrameCallback" in video)) return;
  const onFrame = (now, meta) => {
    app.frames.push(performance.timeOrigin + now);
    const received = performance.timeOrigin + (meta.receiveTime ?? meta.presentationTime);
    app.received.push(received);
    app.decoded.push(received + (meta.processingDuration ?? 0) * 1000);
    app.composited.push(performance.timeOrigin + meta.presentationTime);
    if (app.frames.length > 200) {
      for (const list of [app.frames, app.received, app.decoded, app.composited]) {
        list.splice(0, 100);
      }
    }
    video.requestVideoFrameCallback(onFrame);
  };
  video.requestVideoFrameCallback(onFrame);
}

async function stats() {
  const out = { connection: app.peer?.pc.connectionState ?? "none", framesDecoded: 0 };
  if (!app.peer) return out;
  out.streams = { ...app.peer.streams };
  const report = await app.peer.pc.getStats();
  let pairId = null;
  report.forEach((s) => {
    if (s.type === "inbound-rtp" && s.kind === "video") {
      out.framesDecoded = s.framesDecoded;
      out.freezeCount = s.freezeCount;
      out.totalFreezesDuration = s.totalFreezesDuration;
      out.packetsLost = s.packetsLost;
      out.nackCount = s.nackCount;
      out.pliCount = s.pliCount;
      out.keyFramesDecoded = s.keyFramesDecoded;
      out.framesDropped = s.framesDropped;
      out.framesPerSecond = s.framesPerSecond;
    }
    if (s.type === "inbound-rtp" && s.kind === "audio") out.audioBytesReceived = s.bytesReceived;
    if (s.type === "outbound-rtp" && s.kind === "audio") out.audioBytesSent = s.bytesSent;
    if (s.type === "transport") {
      out.dtlsState = s.dtlsState;
      out.srtpCipher = s.srtpCipher;
      out.tlsVersion = s.tlsVersion;
      pairId = s.selectedCandidatePairId;
    }
  });
  // the path the media takes: host, srflx, prflx or relay at each end
  const pair = pairId ? report.get(pairId) : null;
  if (pair) {
    const local = report.get(pair.localCandidateId);
    out.localCandidate = local?.candidateType;
    out.relayProtocol = local?.relayProtocol; // udp, tcp or tls to the TURN server
    out.remoteCandidate = report.get(pair.remoteCandidateId)?.candidateType;
    out.rtt = pair.currentRoundTripTime;
  }
  return out;
}

window.intercom = {
  get state() { return app.state; },
  get call() { return app.call; },
  rings: app.rings,
  frames: app.frames,
  received: app.received,
  decoded: app.decoded,
  composited: app.composited,
  stats,
};

// ---------- start ----------

async function main() {
  for (const [id, action] of [["btn-answer", answer], ["btn-decline", decline],
    ["btn-hangup", hangup], ["btn-mute", toggleMute], ["btn-open", askCode]]) {
    $(id).addEventListener("click", action);
  }
  $("unlock-form").addEventListener("submit", sendUnlock);
  $("unlock-cancel").addEventListener("click", () => { $("unlock-form").hidden = true; });
  setLink("not paired");
  // Calls that a closed page or a crash left open end where they were last seen alive.
  history.closeOpen("interrupted");
  if ("serviceWorker" in navigator) {
    navigator.serviceWorker.register("sw.js").catch((err) => {
      console.info(`no service worker (the certificate must be trusted): ${err}`);
    });
  }
  $("push-enable").addEventListener("click", () => refreshPush(true));
  app.opened = push.openedOn(); // opened from a notification: {call, answer}
  push.onOpened((opened) => { // tapped while the app was open in the background
    app.opened = opened;
    if (opened.call === app.call && app.state === "ringing" && opened.answer) {
      app.opened = null;
      answer();
    }
  });
  // A pairing link opened in the app's own tab changes only the fragment: start again.
  window.addEventListener("hashchange", () => { if (pairingFromLink()) location.reload(); });
  const link = pairingFromLink();
  app.device = await loadDevice().catch(() => null);
  if (link) {
    await showPairing(link);
  } else if (app.device) {
    startHome();
  } else {
    show("unpaired");
  }
}

main();
