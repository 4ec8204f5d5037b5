// Web Push on the page: subscribe this browser so the station can ring it while the app
// is closed, and read which call a notification opened the app on.

/** base64url text to bytes (the station's VAPID key). */
function fromB64url(text) {
  const plain = atob(text.replaceAll("-", "+").replaceAll("_", "/"));
  return Uint8Array.from(plain, (c) => c.charCodeAt(0));
}

/** Whether this browser can be rung with the app closed at all. */
export function supported() {
  return "serviceWorker" in navigator && "PushManager" in window && "Notification" in window;
}

/** "granted", "denied", "default", or "unsupported". */
export function permission() {
  return supported() ? Notification.permission : "unsupported";
}

/**
 * Subscribe (or renew the subscription) and hand it to the station over the signalling
 * socket. ``ask``: request the notification permission if not yet decided (call it from
 * a tap). Resolves to a short state for the page: "on", "off", "denied", "unsupported".
 */
export async function enable(signal, ask = false) {
  if (!supported()) return "unsupported";
  let allowed = Notification.permission;
  if (allowed === "default" && ask) allowed = await Notification.requestPermission();
  if (allowed !== "granted") return allowed === "denied" ? "denied" : "off";
  const info = await (await fetch("api/info", { cache: "no-store" })).json();
  if (!info.push_key) return "unsupported"; // the station has push turned off
  const registration = await navigator.serviceWorker.ready;
  const key = fromB64url(info.push_key);
  let subscription = await registration.pushManager.getSubscription();
  const same = subscription?.options?.applicationServerKey
    && new Uint8Array(subscription.options.applicationServerKey).join() === key.join();
  if (subscription && !same) {
    await subscription.unsubscribe(); // made for another station key
    subscription = null;
  }
  subscription ??= await registration.pushManager.subscribe({
    userVisibleOnly: true, applicationServerKey: key,
  });
  signal.send({ type: "push-subscribe", subscription: subscription.toJSON() });
  return "on";
}

/** Stop being rung while the app is closed. */
export async function disable(signal) {
  if (!supported()) return "unsupported";
  const registration = await navigator.serviceWorker.ready;
  const subscription = await registration.pushManager.getSubscription();
  await subscription?.unsubscribe();
  signal.send({ type: "push-unsubscribe" });
  return "off";
}

/**
 * The call a notification opened the app on ({call, answer}), or null; read from the
 * address once (and removed from it), or later from the service worker's message.
 */
export function openedOn() {
  const params = new URLSearchParams(location.search);
  const call = params.get("call");
  if (!call) return null;
  window.history.replaceState(null, "", location.pathname + location.hash);
  return { call, answer: params.get("answer") === "1" };
}

/** Call ``handler({call, answer})`` when a notification is tapped while the app is open. */
export function onOpened(handler) {
  navigator.serviceWorker?.addEventListener("message", (event) => {
    if (event.data?.type === "open-call") handler({ call: event.data.call, answer: event.data.answer });
  });
}
