// Calls to the server's HTTP API, shared by the chat page and the console. Errors come back in OpenAI's shape
// ({"error": {"message", "type", "param", "code"}}); every failure here becomes an ApiError whose message a person
// can act on.

export class ApiError extends Error {
  constructor(status, message, code = null) {
    super(message);
    this.status = status; // 0: the server could not be reached
    this.code = code;
  }
}

// A random key for idempotent retries. Not crypto.randomUUID: that exists only on https or localhost pages.
export function newKey() {
  const bytes = crypto.getRandomValues(new Uint8Array(16));
  return Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
}

function headers(token, json) {
  const h = {};
  if (json) h["Content-Type"] = "application/json";
  if (token) h["Authorization"] = `Bearer ${token}`;
  return h;
}

async function errorOf(response) {
  let message = `${response.status} ${response.statusText}`;
  let code = null;
  try {
    const body = await response.json();
    if (body && body.error) {
      message = body.error.message || message;
      code = body.error.code || null;
    }
  } catch {
    // not JSON: keep the status line
  }
  return new ApiError(response.status, message, code);
}

async function send(url, init) {
  let response;
  try {
    response = await fetch(url, init);
  } catch {
    throw new ApiError(0, "The server cannot be reached. Is it running?");
  }
  if (!response.ok) throw await errorOf(response);
  return response;
}

export async function getJson(url, token = null) {
  const response = await send(url, { headers: headers(token, false) });
  return response.json();
}

// POST a JSON body; returns {status, body} (201 new, 200 a retry the server recognised).
export async function postJson(url, body, token = null) {
  const response = await send(url, { method: "POST", headers: headers(token, true), body: JSON.stringify(body) });
  return { status: response.status, body: await response.json() };
}

// POST a streamed chat request and call onChunk with each server-sent event's parsed data until "[DONE]". An error
// the server sends inside the stream (after its 200) is thrown as an ApiError; so is a stream that ends early.
export async function streamChat(body, token, onChunk) {
  const response = await send("/v1/chat/completions", {
    method: "POST",
    headers: headers(token, true),
    body: JSON.stringify({ ...body, stream: true }),
  });
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    let read;
    try {
      read = await reader.read();
    } catch {
      throw new ApiError(0, "The connection to the server was lost while the answers were written.");
    }
    if (read.done) break;
    // Events end with a blank line; a proxy on the way may have turned "\n" into "\r\n".
    buffer += decoder.decode(read.value, { stream: true }).replace(/\r\n?/g, "\n");
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      for (const line of event.split("\n")) {
        if (!line.startsWith("data:")) continue;
        const data = line.slice(5).replace(/^ /, "");
        if (data === "[DONE]") return;
        const parsed = JSON.parse(data);
        if (parsed.error) {
          const status = parsed.error.type === "invalid_request_error" ? 400 : 503;
          throw new ApiError(status, parsed.error.message, parsed.error.code);
        }
        onChunk(parsed);
      }
    }
  }
  throw new ApiError(0, "The answers stopped before the server finished them.");
}
