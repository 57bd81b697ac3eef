// Captions under the room view: the room's `lk.transcription` text streams, as avatarq's
// workers and livekit-agents send them (one stream per segment, `lk.segment_id` naming it,
// `lk.transcription_final` "true" on its trailer). The current segment's text is shown; a
// final segment clears once it ends unless a newer one took its place.

import type { Room, TextStreamReader } from "livekit-client";
import { $ } from "./dom";

const TOPIC = "lk.transcription";
const SEGMENT_ID = "lk.segment_id";
const FINAL = "lk.transcription_final";

let segments = 0;

export function showCaptions(room: Room): void {
  const box = $("captions");
  segments = 0;
  box.textContent = "";
  box.dataset.segments = "0";
  delete box.dataset.segment;
  room.registerTextStreamHandler(TOPIC, (reader) => {
    void read(reader, box).catch(() => undefined); // a stream cut off by leaving the room
  });
}

async function read(reader: TextStreamReader, box: HTMLElement): Promise<void> {
  const segment = reader.info.attributes?.[SEGMENT_ID] ?? reader.info.id;
  let text = "";
  for await (const chunk of reader) {
    if (!text) {
      segments += 1;
      box.dataset.segments = String(segments);
    }
    text += chunk;
    box.textContent = text;
    box.dataset.segment = segment;
    box.dataset.final = "false";
  }
  if (box.dataset.segment !== segment) return; // a newer segment is showing
  const final = reader.info.attributes?.[FINAL] === "true";
  box.dataset.final = String(final);
  if (final) box.textContent = "";
}
