// Service worker: keeps the app shell for fast starts, and rings the phone by Web Push
// while the app is closed. Never touches /api or /ws in its cache.

const CACHE = "intercom-shell-v5";
const SHELL = [
  "./", "index.html", "app.js", "call.js", "keys.js", "signal.js", "history.js", "totp.js",
  "push.js", "style.css", "manifest.webmanifest", "icon.svg",
];

self.addEventListener("install", (event) => {
  event.waitUntil(caches.open(CACHE).then((cache) => cache.addAll(SHELL)));
  self.skipWaiting();
});

self.addEventListener("activate", (event) => {
  event.waitUntil(
    caches.keys().then((names) => Promise.all(
      names.filter((name) => name !== CACHE).map((name) => caches.delete(name)),
    )).then(() => self.clients.claim()),
  );
});

self.addEventListener("fetch", (event) => {
  const url = new URL(event.request.url);
  if (event.request.method !== "GET" || url.origin !== location.origin) return;
  if (url.pathname.startsWith("/api") || url.pathname.startsWith("/ws")) return;
  // Network first, so an updated station serves its new client; the cache when offline.
  event.respondWith(
    fetch(event.request).then((response) => {
      if (response.ok) {
        const copy = response.clone();
        caches.open(CACHE).then((cache) => cache.put(event.request, copy));
      }
      return response;
    }).catch(() => caches.match(event.request, { ignoreSearch: true })),
  );
});

// --- Web Push: the station's messages (docs/webclient.md, "Ringing with the app closed") ---
//   {"v": 1, "type": "ring", "call": "c-...", "door": "front", "at": ..., "until": ...,
//    "label": "Main entrance"}  (label: the installer's name for the button, when set)
//   {"v": 1, "type": "clear", "call": "c-...", "state": "taken" | "missed"}

// One ringing notification at a time: a newer ring closes the older ones. Each call has
// its own tag, because Chromium names a tagged notification by origin and tag: a ring
// shown with the tag of a notification closed a moment before (a call declined from its
// notification, the next press) could be removed by that close, shown and then gone.
const TAG = "intercom-ring:";

async function ringing() {
  return (await self.registration.getNotifications())
    .filter((notification) => notification.tag.startsWith(TAG));
}

async function onPush(msg) {
  if (msg.type === "ring") {
    if (typeof msg.until === "number" && Date.now() / 1000 > msg.until) {
      return; // the ring is over (a phone that was offline): nothing to show
    }
    for (const notification of await ringing()) {
      if (notification.data?.call !== msg.call) notification.close();
    }
    await self.registration.showNotification("Someone is at the door", {
      body: `${typeof msg.label === "string" && msg.label ? msg.label.slice(0, 40)
        : `${msg.door} door`}: tap to see who it is`,
      tag: TAG + msg.call,
      renotify: true,
      requireInteraction: true,
      timestamp: (msg.at ?? Date.now() / 1000) * 1000,
      icon: "icon.svg",
      data: { call: msg.call, door: msg.door, until: msg.until },
      actions: [{ action: "answer", title: "Answer" }, { action: "decline", title: "Decline" }],
    });
  } else if (msg.type === "clear") {
    for (const notification of await ringing()) {
      if (notification.data?.call === msg.call) notification.close();
    }
  }
}

self.addEventListener("push", (event) => {
  let msg = null;
  try {
    msg = event.data?.json() ?? null;
  } catch {
    msg = null;
  }
  if (msg && msg.v === 1) event.waitUntil(onPush(msg));
});

// The device record keys.js keeps in IndexedDB (the key is non-extractable: it signs
// here without ever leaving the browser).
function loadDevice() {
  return new Promise((resolve, reject) => {
    const open = indexedDB.open("intercom", 1);
    open.onupgradeneeded = () => open.result.createObjectStore("device");
    open.onerror = () => reject(open.error);
    open.onsuccess = () => {
      const db = open.result;
      const get = db.transaction("device", "readonly").objectStore("device").get("device");
      get.onsuccess = () => { db.close(); resolve(get.result ?? null); };
      get.onerror = () => { db.close(); reject(get.error); };
    };
  });
}

function b64url(bytes) {
  let text = "";
  for (const byte of new Uint8Array(bytes)) text += String.fromCharCode(byte);
  return btoa(text).replaceAll("+", "-").replaceAll("/", "_").replace(/=+$/, "");
}

/** Decline from the notification: signed with the device key, no app opened. */
async function decline(call) {
  const device = await loadDevice();
  if (!device) return;
  const params = device.alg === "EdDSA" ? { name: "Ed25519" } : { name: "ECDSA", hash: "SHA-256" };
  const message = new TextEncoder().encode(`intercom-decline:${device.station}:${call}`);
  const signature = await crypto.subtle.sign(params, device.privateKey, message);
  await fetch(new URL("api/push/decline", self.registration.scope), {
    method: "POST",
    headers: { "Content-Type": "application/json" },
    body: JSON.stringify({ principal: device.principal, call, signature: b64url(signature) }),
    cache: "no-store",
  });
}

/** Where the app opens on a ringing call; with ``answer`` it answers it too. */
function callUrl(call, answer) {
  const url = new URL(self.registration.scope);
  url.searchParams.set("call", call);
  if (answer) url.searchParams.set("answer", "1");
  return url;
}

/** Open the app on the ringing call (or bring an open one forward and tell it). */
async function open(call, answer) {
  const url = callUrl(call, answer);
  const windows = await self.clients.matchAll({ type: "window", includeUncontrolled: true });
  for (const client of windows) {
    if (new URL(client.url).pathname === url.pathname && "focus" in client) {
      client.postMessage({ type: "open-call", call, answer });
      return client.focus();
    }
  }
  return self.clients.openWindow(url.href);
}

self.addEventListener("notificationclick", (event) => {
  const { call } = event.notification.data ?? {};
  event.notification.close();
  if (!call) return;
  if (event.action === "decline") {
    event.waitUntil(decline(call));
  } else {
    event.waitUntil(open(call, event.action === "answer"));
  }
});
