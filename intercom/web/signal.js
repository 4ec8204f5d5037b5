// The signalling WebSocket: challenge-response login, JSON messages, reconnect with backoff.

import { signChallenge } from "./keys.js";

const FIRST_DELAY_MS = 500;
const MAX_DELAY_MS = 30000;
const PING_EVERY_MS = 25000;
const PONG_TIMEOUT_MS = 10000;
const LOGIN_TIMEOUT_MS = 15000;

/** Keeps one authenticated WebSocket to the station open, reconnecting with backoff. */
export class Signal {
  constructor(device, handlers) {
    this.device = device;
    this.handlers = handlers; // { message(msg), state(name, detail) }
    this.ws = null;
    this.delay = FIRST_DELAY_MS;
    this.timer = null;
    this.pinger = null;
    this.deadline = null;
    this.stopped = false;
    this.refused = false;
    this.authed = false; // the current socket signed the station's challenge
    this.lastHeard = 0; // when the station last sent anything (epoch ms)
    this.waiters = new Set(); // signedIn() promises waiting for the next login
  }

  start() {
    this.stopped = false;
    this.connect();
  }

  stop() {
    this.stopped = true;
    clearTimeout(this.timer);
    this.ws?.close(1000);
  }

  /** Resolves true once a socket is signed in (at once if one is), false after `ms`. */
  signedIn(ms) {
    if (this.authed) return Promise.resolve(true);
    return new Promise((resolve) => {
      const done = (ok) => {
        clearTimeout(timer);
        this.waiters.delete(done);
        resolve(ok);
      };
      const timer = setTimeout(() => done(false), ms);
      this.waiters.add(done);
    });
  }

  /**
   * Send one JSON message; false when the socket is not open and signed in (anything
   * but the login before that would make the station refuse the socket).
   */
  send(message) {
    if (!this.authed || this.ws?.readyState !== WebSocket.OPEN) return false;
    this.ws.send(JSON.stringify(message));
    return true;
  }

  connect() {
    const url = new URL("ws", location.href);
    url.protocol = "wss:";
    if (!this.refused) this.handlers.state("connecting");
    const ws = new WebSocket(url);
    this.ws = ws;
    this.authed = false;
    // A silent network (a phone changing Wi-Fi) never closes the socket: give up on it.
    this.watchdog(ws, LOGIN_TIMEOUT_MS);
    ws.onmessage = async (event) => {
      this.lastHeard = Date.now();
      let msg;
      try {
        msg = JSON.parse(event.data);
      } catch {
        console.warn("station sent a message that is not JSON");
        return;
      }
      if (!this.authed && msg.type === "challenge") {
        const signature = await signChallenge(this.device, msg.station, msg.nonce);
        ws.send(JSON.stringify({ type: "auth", principal: this.device.principal, signature }));
        return;
      }
      if (msg.type === "ready") {
        this.authed = true;
        this.refused = false;
        this.delay = FIRST_DELAY_MS;
        clearTimeout(this.deadline);
        this.handlers.state("online", msg);
        for (const done of [...this.waiters]) done(true);
        clearInterval(this.pinger);
        this.pinger = setInterval(() => this.check(), PING_EVERY_MS);
      }
      if (msg.type === "pong") {
        clearTimeout(this.deadline);
        return;
      }
      this.handlers.message(msg);
    };
    ws.onclose = (event) => this.lost(ws, event.code);
  }

  watchdog(ws, ms) {
    clearTimeout(this.deadline);
    this.deadline = setTimeout(() => this.lost(ws, 4000), ms);
  }

  /** Ask the station for a pong; no answer in time counts as a lost connection. */
  check() {
    if (!this.ws) {
      this.nudge();
      return;
    }
    if (this.send({ type: "ping" })) this.watchdog(this.ws, PONG_TIMEOUT_MS);
  }

  lost(ws, code) {
    if (this.ws !== ws) return;
    clearInterval(this.pinger);
    clearTimeout(this.deadline);
    this.ws = null;
    this.authed = false;
    ws.onclose = null;
    ws.close();
    this.refused = code === 4401; // key unknown or revoked: try again, but rarely
    this.handlers.state(this.refused ? "refused" : "offline", { code });
    if (this.stopped) return;
    if (this.refused) this.delay = MAX_DELAY_MS;
    const wait = this.delay * (0.75 + Math.random() * 0.5);
    this.delay = Math.min(this.delay * 2, MAX_DELAY_MS);
    this.timer = setTimeout(() => this.connect(), wait);
  }

  /** Reconnect now (e.g. the network came back), skipping the remaining backoff. */
  nudge() {
    if (this.ws || this.stopped) return;
    clearTimeout(this.timer);
    this.delay = FIRST_DELAY_MS;
    this.connect();
  }
}
