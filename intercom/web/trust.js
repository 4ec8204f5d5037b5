// The trust page: shows the fingerprint of the station's CA as computed from the very
// file offered for download, and compares it with the pairing link's when given one
// (trust.html#fp=HEX). The page cannot prove who it talks to (an attacker in the middle
// could serve his own page); the person comparing the fingerprint with the pairing
// sheet can, which is why the steps ask for it before installing.

const $ = (id) => document.getElementById(id);

function hex(buffer) {
  return Array.from(new Uint8Array(buffer), (b) => b.toString(16).padStart(2, "0")).join("");
}

function grouped(text) {
  return (text.toUpperCase().match(/.{1,2}/g) ?? []).join(":");
}

function linkFingerprint() {
  const params = new URLSearchParams(location.hash.slice(1));
  return (params.get("fp") ?? "").toLowerCase().replace(/[^0-9a-f]/g, "");
}

async function json(path) {
  const response = await fetch(path, { cache: "no-store" });
  if (!response.ok) throw new Error(`${path}: ${response.status}`);
  return response.json();
}

async function showOwn(info) {
  const response = await fetch("ca.crt", { cache: "no-store" });
  if (!response.ok) throw new Error(`ca.crt: ${response.status}`);
  const der = await response.arrayBuffer();
  const sha256 = hex(await crypto.subtle.digest("SHA-256", der));
  $("fp").textContent = grouped(sha256);
  $("fp").dataset.hex = sha256;
  $("fp-sha1").textContent = grouped(hex(await crypto.subtle.digest("SHA-1", der)));
  const expected = linkFingerprint();
  const check = $("fp-check");
  if (expected && expected !== sha256) {
    check.textContent = "This is NOT the fingerprint of your pairing link. Do not install it.";
    check.className = "error";
  } else if (info.fingerprint !== sha256) {
    check.textContent = "The station reports another fingerprint than this file has. "
      + "Do not install it; ask your building manager.";
    check.className = "error";
  } else if (expected) {
    check.textContent = "It matches your pairing link.";
  } else {
    check.textContent = "Compare it with the fingerprint on your pairing sheet or link.";
  }
}

async function main() {
  try {
    const info = await json("api/info");
    $("station").textContent = info.station;
    if (info.certificate === "owner") {
      $("own-ca").hidden = true;
      $("owner-ca").hidden = false;
      $("owner-fp").textContent = grouped(info.fingerprint);
    } else {
      await showOwn(info);
    }
  } catch (err) {
    $("error").textContent = `Could not read the station's certificate: ${err.message}`;
  } finally {
    document.body.dataset.ready = "1";
  }
}

main();
