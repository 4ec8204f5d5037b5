// The peer connection to the station: answer its offers, the microphone, the data channel.

let micStream = null;

/** Ask for the microphone once (before any answer: without it Chromium offers mDNS names). */
export async function microphone() {
  if (micStream) return micStream;
  try {
    micStream = await navigator.mediaDevices.getUserMedia({
      audio: { echoCancellation: true, noiseSuppression: true }, video: false,
    });
  } catch (err) {
    console.warn(`no microphone: ${err}`);
    micStream = null;
  }
  return micStream;
}

function withoutMdns(sdp) {
  // Without microphone permission host candidates are *.local names, which the station
  // would spend a second each resolving: leave them out.
  return sdp.split("\r\n").filter((line) => !/^a=candidate:.* [^ ]+\.local /.test(line))
    .join("\r\n");
}

/**
 * The offer with the video in a stream of its own. The station offers audio and video as
 * one stream, and Chromium then holds every video frame back to keep it in step with the
 * door audio, whose buffer grows from call to call (measured: the preview's delay rose
 * from 24 to 333 ms over 8 calls). The preview is about now, not lip sync.
 */
export function ownVideoStream(sdp) {
  let video = false;
  return sdp.split("\r\n").map((line) => {
    if (line.startsWith("m=")) video = line.startsWith("m=video");
    if (!video || !line.startsWith("a=msid:")) return line;
    const [stream, track] = line.slice("a=msid:".length).split(" ");
    return `a=msid:${stream}-video ${track}`;
  }).join("\r\n");
}

// The answer carries every candidate (no trickle), so it waits for the gathering; but
// not for ever: a TURN allocation tried over an interface that cannot reach the server
// (a dead Wi-Fi, a VPN's) takes ~40 s to fail. After GATHER_CAP_MS the answer goes with
// the candidates gathered so far (a working server answers within a few round trips).
const GATHER_CAP_MS = 4000;

function gathered(pc) {
  if (pc.iceGatheringState === "complete") return Promise.resolve();
  return new Promise((resolve) => {
    const done = () => {
      clearTimeout(timer);
      pc.removeEventListener("icegatheringstatechange", check);
      resolve();
    };
    const check = () => {
      if (pc.iceGatheringState === "complete") done();
    };
    const timer = setTimeout(done, GATHER_CAP_MS);
    pc.addEventListener("icegatheringstatechange", check);
  });
}

/** One station peer connection: video while ringing, two-way audio once answered. */
export class StationPeer {
  constructor({ number, iceServers, icePolicy, video, audio, onControl, onState }) {
    this.number = number; // the station's number for this connection
    this.pc = new RTCPeerConnection({
      iceServers: iceServers ?? [],
      iceTransportPolicy: icePolicy === "relay" ? "relay" : "all",
    });
    this.video = video;
    this.audio = audio;
    this.mic = null;
    this.audioSender = null;
    this.muted = false;
    this.channel = null;
    this.onControl = onControl;
    this.remote = new MediaStream();
    this.streams = {}; // diagnostics: the stream id of each kind of track
    this.pc.ontrack = (event) => {
      this.streams[event.track.kind] = event.streams[0]?.id ?? null;
      this.attach(event.track, event.receiver);
    };
    this.pc.ondatachannel = (event) => {
      if (event.channel.label !== "control") return;
      this.channel = event.channel;
      this.channel.onmessage = (msg) => {
        try {
          this.onControl(JSON.parse(msg.data));
        } catch {
          console.warn("control channel: not JSON");
        }
      };
    };
    this.pc.onconnectionstatechange = () => onState(this.pc.connectionState);
  }

  attach(track, receiver) {
    if (track.kind === "video") {
      // Show each frame as soon as it is decoded: the preview is about now, not smoothness.
      if ("jitterBufferTarget" in receiver) receiver.jitterBufferTarget = 0;
      if ("playoutDelayHint" in receiver) receiver.playoutDelayHint = 0;
      this.video.srcObject = new MediaStream([track]);
      this.video.play().catch(() => {});
    } else {
      this.audio.srcObject = new MediaStream([track]);
    }
  }

  /**
   * Answer one of the station's offers (full SDP, non-trickle) and return our answer SDP.
   * The first sets the connection up with its media inactive; a ring's turns them on.
   */
  async answer(offerSdp) {
    const stream = await microphone();
    await this.pc.setRemoteDescription({ type: "offer", sdp: ownVideoStream(offerSdp) });
    const audioTx = this.pc.getTransceivers().find(
      (t) => t.receiver.track.kind === "audio",
    );
    if (audioTx && stream && !this.mic) {
      // The microphone is kept ready but not attached: an attached track, even a disabled
      // one, sends silence 50 times a second, which a station with a building's worth of
      // idle devices would have to receive and decrypt. It is attached when a call is
      // answered (replaceTrack needs no renegotiation) and detached when it ends.
      this.mic = stream.getAudioTracks()[0].clone();
      this.audioSender = audioTx.sender;
      audioTx.direction = "sendrecv";
    }
    await this.pc.setLocalDescription(await this.pc.createAnswer());
    await gathered(this.pc);
    return withoutMdns(this.pc.localDescription.sdp);
  }

  /** Switch our microphone on (answered, not muted) or off. */
  talk(on) {
    if (this.mic) {
      this.mic.enabled = on && !this.muted;
      this.audioSender?.replaceTrack(on ? this.mic : null).catch((err) => {
        console.warn(`microphone: ${err}`);
      });
    }
    if (on) {
      this.audio.muted = false;
      this.audio.play().catch(() => {});
    } else {
      this.audio.muted = true;
    }
  }

  setMuted(muted, inCall) {
    this.muted = muted;
    if (this.mic) this.mic.enabled = inCall && !muted;
  }

  /** Send a text message on the control data channel; false when it is not open. */
  sendControl(text) {
    if (this.channel?.readyState !== "open") return false;
    this.channel.send(text);
    return true;
  }

  close() {
    this.mic?.stop();
    this.pc.close();
  }
}
