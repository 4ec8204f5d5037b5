// The device key pair (WebCrypto, non-extractable) and what pairing gave us, in IndexedDB.

const DB_NAME = "intercom";
const STORE = "device";
const RECORD = "device";

const encoder = new TextEncoder();

/** Bytes to base64url without padding. */
export function b64url(bytes) {
  const view = bytes instanceof Uint8Array ? bytes : new Uint8Array(bytes);
  let text = "";
  for (const byte of view) text += String.fromCharCode(byte);
  return btoa(text).replaceAll("+", "-").replaceAll("/", "_").replace(/=+$/, "");
}

/** A string's UTF-8 bytes as base64url. */
export function b64urlText(text) {
  return b64url(encoder.encode(text));
}

function openDb() {
  return new Promise((resolve, reject) => {
    const request = indexedDB.open(DB_NAME, 1);
    request.onupgradeneeded = () => request.result.createObjectStore(STORE);
    request.onsuccess = () => resolve(request.result);
    request.onerror = () => reject(request.error);
  });
}

async function withStore(mode, action) {
  const db = await openDb();
  try {
    return await new Promise((resolve, reject) => {
      const tx = db.transaction(STORE, mode);
      const request = action(tx.objectStore(STORE));
      tx.oncomplete = () => resolve(request.result);
      tx.onerror = () => reject(tx.error);
      tx.onabort = () => reject(tx.error);
    });
  } finally {
    db.close();
  }
}

/** The stored device record, or null before pairing. */
export function loadDevice() {
  return withStore("readonly", (store) => store.get(RECORD)).then((record) => record ?? null);
}

/** Store the device record (CryptoKey objects are structured-cloneable). */
export function saveDevice(record) {
  return withStore("readwrite", (store) => store.put(record, RECORD));
}

/** Forget this device: the private key is gone for good. */
export function forgetDevice() {
  return withStore("readwrite", (store) => store.delete(RECORD));
}

/** A fresh non-extractable key pair: Ed25519 where the browser has it, else ECDSA P-256. */
export async function makeKeyPair() {
  try {
    const pair = await crypto.subtle.generateKey({ name: "Ed25519" }, false, ["sign", "verify"]);
    const jwk = await crypto.subtle.exportKey("jwk", pair.publicKey);
    return { privateKey: pair.privateKey, alg: "EdDSA", jwk: publicJwk(jwk) };
  } catch (err) {
    console.info(`Ed25519 unavailable (${err}); using ECDSA P-256`);
  }
  const pair = await crypto.subtle.generateKey(
    { name: "ECDSA", namedCurve: "P-256" }, false, ["sign", "verify"],
  );
  const jwk = await crypto.subtle.exportKey("jwk", pair.publicKey);
  return { privateKey: pair.privateKey, alg: "ES256", jwk: publicJwk(jwk) };
}

function publicJwk(jwk) {
  // Only the public members; WebCrypto adds key_ops and ext, which the station needs not.
  return jwk.kty === "OKP"
    ? { kty: "OKP", crv: jwk.crv, x: jwk.x }
    : { kty: "EC", crv: jwk.crv, x: jwk.x, y: jwk.y };
}

/** Sign bytes with the device key: Ed25519 (64 bytes) or ECDSA P-256 raw r||s (64 bytes). */
export async function sign(device, bytes) {
  const params = device.alg === "EdDSA"
    ? { name: "Ed25519" }
    : { name: "ECDSA", hash: "SHA-256" };
  return new Uint8Array(await crypto.subtle.sign(params, device.privateKey, bytes));
}

/** The signature (base64url) answering the station's WebSocket challenge. */
export async function signChallenge(device, station, nonce) {
  const message = encoder.encode(`intercom-auth:${station}:${nonce}`);
  return b64url(await sign(device, message));
}

/** A compact JWS unlock command (claims as in docs/security.md), signed in the browser. */
export async function unlockToken(device, totp, lifetime = 30) {
  const iat = Math.floor(Date.now() / 1000);
  const jti = b64url(crypto.getRandomValues(new Uint8Array(16)));
  const header = { alg: device.alg, kid: device.principal };
  const claims = {
    aud: device.station, cmd: "unlock", door: device.door, iat, exp: iat + lifetime, jti, totp,
  };
  const input = `${b64urlText(JSON.stringify(header))}.${b64urlText(JSON.stringify(claims))}`;
  const signature = await sign(device, encoder.encode(input));
  return { token: `${input}.${b64url(signature)}`, jti };
}
