// The enrolment's confirm step: the station checks the code the resident types from the
// authenticator app. The page cannot: it keeps no TOTP secret (the authenticator app is
// the second factor), so only the station can tell whether the scan worked.

const ANSWER_TIMEOUT_MS = 10000;
const SIGN_IN_WAIT_MS = 15000; // enrolment signs in as it starts: a quick resident waits

let waiting = null; // settles the check in flight

/**
 * Ask the station whether `code` is this device's current code, over the signed-in
 * signalling socket. Resolves to the station's answer ("right", "wrong", "wait",
 * "locked", "unavailable"), or "offline" (not sent) or "no answer".
 */
export async function check(signal, code) {
  if (waiting) waiting("no answer"); // one at a time: a newer check replaces it
  if (!signal || !(await signal.signedIn(SIGN_IN_WAIT_MS))) return "offline";
  if (!signal.send({ type: "totp-check", code })) return "offline";
  return new Promise((resolve) => {
    const done = (result) => {
      clearTimeout(timer);
      if (waiting === done) waiting = null;
      resolve(result);
    };
    const timer = setTimeout(() => done("no answer"), ANSWER_TIMEOUT_MS);
    waiting = done;
  });
}

/** The station's `totp-check` answer. */
export function answered(message) {
  const result = typeof message.result === "string" ? message.result
    : message.ok === true ? "right" : "wrong";
  waiting?.(result);
}

/** What the resident should do after an answer other than "right". */
export function advice(result) {
  switch (result) {
    case "wrong":
      return "That is not this door's current code. Scan the QR code again (or add the "
        + "link by hand), make sure the phone sets its clock automatically, then type the "
        + "code the app shows now.";
    case "wait":
      return "Too many tries for now: wait a minute, then type the code the app shows then.";
    case "locked":
      return "Too many wrong codes: this device may not open the door until your installer "
        + "or building manager resets it.";
    default:
      return "The station could not check the code just now (not connected?). Wait a "
        + "moment and try again.";
  }
}
