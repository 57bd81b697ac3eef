// Talking to `avatarq api`: the key (entered once, kept in this tab's sessionStorage), JSON
// requests with it, and a job's server-sent events read through fetch (EventSource cannot send
// the key header).

const KEY_STORE = "avatarq.apiKey";

export class KeyRefused extends Error {}

/** The key from the URL fragment (`#key=...`, as `avatarq demo --keep` prints it), else the stored one. */
export function loadKey(): string | null {
  const fromHash = new URLSearchParams(location.hash.slice(1)).get("key");
  if (fromHash) {
    sessionStorage.setItem(KEY_STORE, fromHash);
    // Out of the address bar (and so out of history and screenshots).
    history.replaceState(null, "", location.pathname + location.search);
  }
  return sessionStorage.getItem(KEY_STORE);
}

export function saveKey(key: string): void {
  sessionStorage.setItem(KEY_STORE, key);
}

export function forgetKey(): void {
  sessionStorage.removeItem(KEY_STORE);
}

function headers(extra: Record<string, string> = {}): Record<string, string> {
  return { "X-API-Key": sessionStorage.getItem(KEY_STORE) ?? "", ...extra };
}

/** A readable message from an error body: FastAPI's `detail` is a string or a list of field errors. */
function describe(status: number, body: unknown): string {
  const detail = (body as { detail?: unknown } | null)?.detail;
  if (typeof detail === "string") return detail;
  if (Array.isArray(detail)) {
    return detail
      .map((e: { loc?: unknown[]; msg?: string }) => `${(e.loc ?? []).slice(1).join(".")}: ${e.msg}`)
      .join("; ");
  }
  return `HTTP ${status}`;
}

export async function request<T>(method: string, path: string, body?: unknown): Promise<T> {
  const res = await fetch(path, {
    method,
    headers: headers(body === undefined ? {} : { "Content-Type": "application/json" }),
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  const parsed: unknown = await res.json().catch(() => null);
  if (res.status === 401 || res.status === 403) throw new KeyRefused(describe(res.status, parsed));
  if (!res.ok) throw new Error(describe(res.status, parsed));
  return parsed as T;
}

export interface JobEvent {
  event: string;
  job_id: string;
  data: Record<string, unknown>;
}

/** Follow `/jobs/{id}/events` until the stream ends or `signal` aborts; calls `onEvent` per frame. */
export async function followEvents(
  jobId: string,
  onEvent: (e: JobEvent) => void,
  signal: AbortSignal,
): Promise<void> {
  const res = await fetch(`/jobs/${encodeURIComponent(jobId)}/events`, { headers: headers(), signal });
  if (!res.ok || !res.body) return;
  const reader = res.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += value;
    let end: number;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const frame = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      const data = frame
        .split("\n")
        .filter((line) => line.startsWith("data: "))
        .map((line) => line.slice(6))
        .join("\n");
      if (data) onEvent(JSON.parse(data) as JobEvent);
    }
  }
}
