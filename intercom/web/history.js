// The call history of this device: call ids, states, times and why a call was cut, in
// localStorage. No pictures, no names.

const KEY = "intercom.history";
const KEEP = 50;
const OPEN = new Set(["ringing", "answered"]); // a call not over yet

/** All remembered calls, newest first. */
export function calls() {
  try {
    const list = JSON.parse(localStorage.getItem(KEY) ?? "[]");
    return Array.isArray(list) ? list : [];
  } catch {
    return [];
  }
}

function save(list) {
  localStorage.setItem(KEY, JSON.stringify(list.slice(0, KEEP)));
}

/**
 * Record what happened to a call: its state plus fields (the times rang, answered,
 * ended, alive; the reason a call was cut).
 */
export function note(call, state, fields = {}) {
  const list = calls();
  let entry = list.find((item) => item.call === call);
  if (!entry) {
    entry = { call, rang: Date.now() / 1000 };
    list.unshift(entry);
  }
  Object.assign(entry, fields, { state });
  save(list);
  return entry;
}

/** Stamp an answered call as still going at `at` (the end a reload will find). */
export function alive(call, at) {
  const list = calls();
  const entry = list.find((item) => item.call === call);
  if (!entry || !OPEN.has(entry.state)) return;
  entry.alive = at;
  save(list);
}

/**
 * Close the calls that a cut left open (the page was closed or reloaded, or the browser
 * killed, in the middle of them): an answered one ended when it was last stamped alive,
 * a ringing one was missed. They are never left "answered" for ever.
 */
export function closeOpen(reason) {
  const list = calls();
  const open = list.filter((entry) => OPEN.has(entry.state));
  for (const entry of open) {
    entry.state = entry.answered ? "ended" : "missed";
    entry.ended = entry.alive ?? entry.answered ?? entry.rang;
    entry.reason = reason;
  }
  if (open.length) save(list);
  return open.length;
}

/** How an entry reads in the list: its state, the length of a call, why it was cut. */
export function describe(entry) {
  const notes = [];
  if (entry.answered && entry.ended) {
    notes.push(`${Math.max(0, Math.round(entry.ended - entry.answered))} s`);
  }
  if (entry.reason) notes.push(entry.reason);
  return notes.length ? `${entry.state} (${notes.join(", ")})` : entry.state;
}

/** Forget all calls. */
export function clear() {
  localStorage.removeItem(KEY);
}
