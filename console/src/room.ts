// The live room view: joins with a subscribe-only token minted by the API and shows the
// avatar's video with its captions and plays its audio, as a viewer of the room sees and
// hears it.

import { RemoteTrack, Room, RoomEvent, Track } from "livekit-client";
import { request } from "./api";
import { showCaptions } from "./captions";
import { $ } from "./dom";

interface ViewerToken {
  url: string;
  token: string;
  room: string;
  identity: string;
}

let room: Room | null = null;
let frames = 0;

function status(text: string): void {
  $("watch-status").textContent = text;
}

/** Count decoded frames as they are presented (the browser tests read `data-frames`). */
function countFrames(video: HTMLVideoElement): void {
  const tick = (): void => {
    frames += 1;
    video.dataset.frames = String(frames);
    if (room) video.requestVideoFrameCallback(tick);
  };
  video.requestVideoFrameCallback(tick);
}

function attach(track: RemoteTrack, from: string): void {
  const video = $("video") as HTMLVideoElement;
  if (track.kind === Track.Kind.Video) {
    track.attach(video);
    video.dataset.participant = from;
    status(`watching ${room?.name}: video from ${from}`);
  } else if (track.kind === Track.Kind.Audio) {
    const audio = track.attach();
    audio.dataset.participant = from;
    $("stage").append(audio);
  }
}

export async function watch(name: string): Promise<void> {
  await leave();
  const grant = await request<ViewerToken>("POST", "/console/api/viewer-token", { room: name });
  const video = $("video") as HTMLVideoElement;
  frames = 0;
  video.dataset.frames = "0";
  room = new Room({ adaptiveStream: false });
  room
    .on(RoomEvent.TrackSubscribed, (track, _pub, participant) => attach(track, participant.identity))
    .on(RoomEvent.TrackUnsubscribed, (track) => {
      track.detach().forEach((el) => el !== video && el.remove());
      status(`watching ${name}: waiting for the avatar`);
    })
    .on(RoomEvent.Disconnected, () => status("not watching"));
  showCaptions(room);
  status(`joining ${name}…`);
  await room.connect(grant.url, grant.token);
  // The Watch click is the user gesture browsers want before they play sound.
  await room.startAudio().catch(() => undefined);
  countFrames(video);
  $("leave").hidden = false;
  status(`watching ${name}: waiting for the avatar`);
  for (const participant of room.remoteParticipants.values()) {
    for (const pub of participant.trackPublications.values()) {
      if (pub.track) attach(pub.track, participant.identity);
    }
  }
}

export async function leave(): Promise<void> {
  const current = room;
  room = null;
  $("leave").hidden = true;
  if (current) await current.disconnect();
  status("not watching");
}
