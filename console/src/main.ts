// The operator console: queue per room, playing jobs with live progress, recent outcomes,
// dead letters, enqueue / cancel / retry, and a live view of a room.

import "./style.css";
import { followEvents, forgetKey, KeyRefused, loadKey, request, saveKey, type JobEvent } from "./api";
import { $, clock, h, seconds } from "./dom";
import { leave, watch } from "./room";

interface JobStatus {
  job_id: string;
  status: string;
  avatar_id?: string;
  source?: string;
  seconds_streamed?: number;
  total_seconds?: number | null;
  cancel_requested?: boolean;
}
interface Ended {
  job_id: string;
  ts: number;
  status: string;
  room?: string;
  reason?: string | null;
  error?: string | null;
  cancelled_while?: string | null;
  audio_duration?: number | null;
}
interface Dead {
  job_id: string;
  reason?: string;
  error?: string;
  attempt?: number;
  ts?: number;
  job?: { room?: string };
}
interface Capacity {
  server: string;
  sessions: number;
  quota: number;
  waiting: number;
}
interface Overview {
  /** `others`: jobs in the room's order sent by other producers (they take turns too). */
  rooms: { room: string; jobs: JobStatus[]; others: number }[];
  recent: Ended[];
  dead: Dead[];
  /** The fleet-wide session quota of each avatar server. */
  avatar_servers: Capacity[];
}

const REFRESH_MS = 2000;
/** Event streams open at once, for playing jobs; jobs past this show the overview's progress
 * (every 2 s). Small: each stream holds one of the browser's ~6 connections to the API. */
const MAX_FOLLOWED = 3;
const TERMINAL = new Set(["job.completed", "job.failed", "job.cancelled"]);

const progress = new Map<string, { streamed: number; total: number | null }>();
const followers = new Map<string, AbortController>();
let timer: number | undefined;

function showKeyForm(message = ""): void {
  stop();
  $("console").hidden = true;
  $("forget").hidden = true;
  $("key-form").hidden = false;
  $("key-error").textContent = message;
}

function showConsole(): void {
  $("key-form").hidden = true;
  $("console").hidden = false;
  $("forget").hidden = false;
}

function stop(): void {
  window.clearInterval(timer);
  timer = undefined;
  followers.forEach((c) => c.abort());
  followers.clear();
}

/** Run an action; a refused key sends the operator back to the key form, other errors are shown. */
async function guarded(action: () => Promise<void>, errorTarget?: HTMLElement): Promise<void> {
  try {
    await action();
  } catch (e) {
    if (e instanceof KeyRefused) {
      forgetKey();
      showKeyForm(`key refused: ${e.message}`);
    } else if (errorTarget) {
      errorTarget.textContent = String((e as Error).message ?? e);
      errorTarget.className = "error";
    } else {
      console.error(e);
    }
  }
}

// --- live progress ---------------------------------------------------------------------------

/** Job rows by id, kept across refreshes: while a job's state stays the same its row (and its
 * buttons) stay the same elements, so a click is never lost to a re-render. */
const rows = new Map<string, HTMLElement>();

function updateBar(jobId: string): void {
  const p = progress.get(jobId);
  const row = rows.get(jobId);
  if (!p || !row) return;
  const bar = row.querySelector("progress");
  if (bar) {
    if (p.total) bar.max = p.total;
    bar.value = p.streamed;
  }
  const label = row.querySelector(".played");
  if (label) label.textContent = played(p);
}

function played(p: { streamed: number; total: number | null }): string {
  return `${seconds(p.streamed)} of ${seconds(p.total)}`;
}

function onJobEvent(e: JobEvent): void {
  if (e.event === "job.progress") {
    const total = e.data.total_seconds;
    progress.set(e.job_id, {
      streamed: Number(e.data.seconds_streamed ?? 0),
      total: typeof total === "number" ? total : null,
    });
    updateBar(e.job_id);
  }
  // An ended job moves from Playing to Recently ended.
  if (TERMINAL.has(e.event)) void refresh();
}

function follow(jobId: string): void {
  if (followers.has(jobId) || followers.size >= MAX_FOLLOWED) return;
  const control = new AbortController();
  followers.set(jobId, control);
  followEvents(jobId, onJobEvent, control.signal)
    .catch(() => undefined)
    .finally(() => {
      if (followers.get(jobId) === control) followers.delete(jobId);
    });
}

// --- rendering -------------------------------------------------------------------------------

function cancelButton(jobId: string): HTMLElement {
  return h("button", {
    type: "button",
    class: "danger cancel",
    "data-job-id": jobId,
    onclick: () => guarded(async () => {
      await request("DELETE", `/jobs/${encodeURIComponent(jobId)}`);
      await refresh();
    }),
  }, "Cancel");
}

function watchButton(room: string): HTMLElement {
  return h("button", {
    type: "button",
    class: "watch",
    onclick: () => {
      ($("watch-room") as HTMLInputElement).value = room;
      void guarded(() => watch(room), $("watch-status"));
    },
  }, "Watch");
}

function jobRow(job: JobStatus, room: string): HTMLElement {
  const known = progress.get(job.job_id)?.streamed ?? -1;
  if (job.status === "playing" && job.seconds_streamed !== undefined && known < job.seconds_streamed) {
    // Ahead of the event stream (or the job has none: past MAX_FOLLOWED).
    progress.set(job.job_id, { streamed: job.seconds_streamed, total: job.total_seconds ?? null });
  }
  const state = `${job.status}|${job.cancel_requested ? "cancelling" : ""}`;
  const kept = rows.get(job.job_id);
  if (kept?.dataset.state === state) {
    updateBar(job.job_id);
    return kept;
  }
  const p = progress.get(job.job_id);
  const playing = job.status === "playing";
  const row = h(
    "div",
    { class: "job", "data-job-id": job.job_id, "data-status": job.status, "data-state": state },
    h("span", { class: "id" }, job.job_id),
    h(
      "span",
      { class: "meta" },
      `${room} · avatar ${job.avatar_id ?? "?"} · `,
      h("span", { class: `status-${job.status}` }, job.cancel_requested ? "cancelling" : job.status),
      job.source ? ` · ${job.source}` : "",
    ),
    // Indeterminate until the first progress event says how far and how long.
    playing ? h("progress", p?.total ? { max: p.total, value: p.streamed } : {}) : null,
    playing ? h("span", { class: "meta played" }, p ? played(p) : "starting…") : null,
    h("div", { class: "actions" }, playing ? watchButton(room) : null, cancelButton(job.job_id)),
  );
  rows.set(job.job_id, row);
  return row;
}

function renderQueue(data: Overview): void {
  const playing: HTMLElement[] = [];
  const rooms: HTMLElement[] = [];
  for (const { room, jobs, others } of data.rooms) {
    const waiting = jobs.filter((j) => j.status !== "playing");
    for (const job of jobs.filter((j) => j.status === "playing")) {
      playing.push(jobRow(job, room));
      follow(job.job_id);
    }
    if (waiting.length) {
      rooms.push(
        h(
          "div",
          { class: "room", "data-room": room },
          h(
            "h3",
            {},
            room,
            h("span", { class: "meta" }, `${waiting.length} waiting`),
            others ? h("span", { class: "meta" }, `· ${others} of other producers in turn`) : null,
          ),
          ...waiting.map((j) => jobRow(j, room)),
        ),
      );
    }
  }
  const shown = new Set(data.rooms.flatMap((r) => r.jobs.map((j) => j.job_id)));
  for (const id of [...rows.keys()].filter((id) => !shown.has(id))) {
    rows.delete(id);
    progress.delete(id);
  }
  const empty = (text: string): HTMLElement[] => [h("p", { class: "empty" }, text)];
  $("playing").replaceChildren(...(playing.length ? playing : empty("nothing playing")));
  $("queue").replaceChildren(...(rooms.length ? rooms : empty("no jobs waiting")));
}

function headings(...names: string[]): HTMLElement {
  return h("tr", {}, ...names.map((name) => h("th", {}, name)));
}

function renderRecent(recent: Ended[]): void {
  if (!recent.length) {
    $("recent").replaceChildren(h("tr", {}, h("td", { class: "empty" }, "nothing ended yet")));
    return;
  }
  const head = headings("ended", "job", "room", "status", "reason", "error");
  const lines = recent.map((e) =>
    h(
      "tr",
      { "data-job-id": e.job_id, "data-status": e.status },
      h("td", { class: "time" }, clock(e.ts)),
      h("td", { class: "id", title: e.job_id }, e.job_id),
      h("td", { class: "room" }, e.room ?? ""),
      h("td", { class: `status-${e.status}` }, e.status),
      h("td", {}, [e.reason, e.cancelled_while && `while ${e.cancelled_while}`].filter(Boolean).join(" ")),
      h("td", {}, e.error ?? ""),
    ),
  );
  $("recent").replaceChildren(head, ...lines);
}

function renderDead(dead: Dead[]): void {
  if (!dead.length) {
    $("dead").replaceChildren(h("tr", {}, h("td", { class: "empty" }, "no dead letters")));
    return;
  }
  const head = headings("job", "room", "reason", "error", "attempt", "");
  const lines = dead.map((d) =>
    h(
      "tr",
      { "data-job-id": d.job_id },
      h("td", { class: "id", title: d.job_id }, d.job_id),
      h("td", { class: "room" }, d.job?.room ?? ""),
      h("td", {}, d.reason ?? ""),
      h("td", {}, d.error ?? ""),
      h("td", {}, d.attempt ?? ""),
      h("td", {}, h("button", {
        type: "button",
        class: "retry",
        onclick: () => guarded(async () => {
          await request("POST", `/console/api/dead/${encodeURIComponent(d.job_id)}/retry`);
          await refresh();
        }),
      }, "Retry")),
    ),
  );
  $("dead").replaceChildren(head, ...lines);
}

function renderCapacity(servers: Capacity[]): void {
  const head = headings("avatar server", "sessions", "quota", "waiting");
  const lines = servers.map((c) =>
    h(
      "tr",
      { "data-server": c.server },
      h("td", {}, c.server),
      h("td", { class: "sessions" }, String(c.sessions)),
      h("td", { class: "quota" }, String(c.quota)),
      h("td", { class: "waiting" }, String(c.waiting)),
    ),
  );
  $("capacity").replaceChildren(head, ...lines);
}

async function refresh(): Promise<void> {
  await guarded(async () => {
    const data = await request<Overview>("GET", "/console/api/overview");
    showConsole();
    renderQueue(data);
    renderRecent(data.recent);
    renderDead(data.dead);
    renderCapacity(data.avatar_servers);
    $("updated").textContent = `updated ${new Date().toLocaleTimeString()}`;
    timer ??= window.setInterval(() => void refresh(), REFRESH_MS);
  });
}

// --- forms -----------------------------------------------------------------------------------

function jobSource(kind: string, value: string): unknown {
  if (kind === "tts") return { type: "tts", engine: "espeak", text: value };
  if (kind === "s3") return value.startsWith("s3://") ? value : `s3://${value}`;
  return value;
}

$("enqueue").addEventListener("submit", (e) => {
  e.preventDefault();
  const out = $("enqueue-result");
  const value = (id: string): string => ($(id) as HTMLInputElement).value.trim();
  void guarded(async () => {
    const job = {
      room: value("room"),
      avatar_id: value("avatar"),
      source: jobSource(value("source-kind"), value("source")),
    };
    const status = await request<JobStatus>("POST", "/jobs", job);
    out.className = "";
    out.textContent = `enqueued ${status.job_id} (${status.status})`;
    out.dataset.jobId = status.job_id;
    await refresh();
  }, out);
});

$("key-form").addEventListener("submit", (e) => {
  e.preventDefault();
  saveKey(($("key") as HTMLInputElement).value.trim());
  void refresh();
});

$("forget").addEventListener("click", () => {
  forgetKey();
  void leave();
  showKeyForm();
});

$("watch").addEventListener("submit", (e) => {
  e.preventDefault();
  void guarded(() => watch(($("watch-room") as HTMLInputElement).value.trim()), $("watch-status"));
});

$("leave").addEventListener("click", () => void leave());

// A link with `#key=` pasted into an open tab changes only the fragment: no reload.
window.addEventListener("hashchange", () => {
  if (location.hash.includes("key=") && loadKey()) void refresh();
});

if (loadKey()) void refresh();
else showKeyForm();
