// Checking a code the resident types against the enrolment just shown (RFC 6238), in the
// page and only during enrolment: the secret is never stored on this device.

function base32(text) {
  const alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";
  let bits = 0;
  let value = 0;
  const out = [];
  for (const char of text.replace(/=+$/, "").toUpperCase()) {
    const index = alphabet.indexOf(char);
    if (index < 0) throw new Error("not base32");
    value = (value << 5) | index;
    bits += 5;
    if (bits >= 8) {
      out.push((value >>> (bits - 8)) & 0xff);
      bits -= 8;
    }
  }
  return new Uint8Array(out);
}

async function codeAt(key, counter, digits) {
  const message = new DataView(new ArrayBuffer(8));
  message.setUint32(0, Math.floor(counter / 2 ** 32));
  message.setUint32(4, counter >>> 0);
  const mac = new Uint8Array(await crypto.subtle.sign("HMAC", key, message.buffer));
  const offset = mac[mac.length - 1] & 0x0f;
  const number = ((mac[offset] & 0x7f) << 24) | (mac[offset + 1] << 16)
    | (mac[offset + 2] << 8) | mac[offset + 3];
  return String(number % 10 ** digits).padStart(digits, "0");
}

/** Whether ``code`` is the authenticator's code for ``uri`` now (one step either way). */
export async function matches(uri, code, now = Date.now() / 1000) {
  const params = new URL(uri).searchParams;
  const digits = Number(params.get("digits") ?? 6);
  const period = Number(params.get("period") ?? 30);
  const hash = { SHA1: "SHA-1", SHA256: "SHA-256", SHA512: "SHA-512" }[
    (params.get("algorithm") ?? "SHA1").toUpperCase()];
  if (!hash || !/^[0-9]+$/.test(code) || code.length !== digits) return false;
  const key = await crypto.subtle.importKey(
    "raw", base32(params.get("secret") ?? ""), { name: "HMAC", hash }, false, ["sign"],
  );
  const step = Math.floor(now / period);
  for (const counter of [step, step - 1, step + 1]) {
    if (await codeAt(key, counter, digits) === code) return true;
  }
  return false;
}
