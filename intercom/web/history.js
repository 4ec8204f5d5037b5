// The call history of this device: call ids and times only, in localStorage.

const KEY = "intercom.history";
const KEEP = 50;

/** All remembered calls, newest first. */
export function calls() {
  try {
    const list = JSON.parse(localStorage.getItem(KEY) ?? "[]");
    return Array.isArray(list) ? list : [];
  } catch {
    return [];
  }
}

/** Record what happened to a call: state plus a time field (rang, answered, ended). */
export function note(call, state, fields = {}) {
  const list = calls();
  let entry = list.find((item) => item.call === call);
  if (!entry) {
    entry = { call, rang: Date.now() / 1000 };
    list.unshift(entry);
  }
  Object.assign(entry, fields, { state });
  localStorage.setItem(KEY, JSON.stringify(list.slice(0, KEEP)));
  return entry;
}

/** Forget all calls. */
export function clear() {
  localStorage.removeItem(KEY);
}
