#!/usr/bin/env node
// Train y = 2x - 1 with optserve from Node.js (18+, built-in fetch; no npm packages):
// Adam with a cosine schedule after a linear warm-up, the gradients computed here.
//
//   OPTSERVE_URL      the server (default http://127.0.0.1:8000)
//   OPTSERVE_API_KEY  sent as "Authorization: Bearer <key>" when set
//
// Prints "session <id>", then one line per step, then the final params as JSON on the
// last line. Exits non-zero on any error, showing the server's problem detail.

const BASE = (process.env.OPTSERVE_URL || "http://127.0.0.1:8000").replace(/\/+$/, "");
const API_KEY = process.env.OPTSERVE_API_KEY || "";

const STEPS = 60;
const WARMUP = 5;
const XS = [-1, 0, 1, 2, 3]; // the data: y = 2x - 1 at these points
const YS = XS.map((x) => 2 * x - 1);

const SESSION = {
  optimizer: { name: "adam", lr: 0.3, betas: [0.8, 0.99] },
  // the warm-up takes the first WARMUP steps, the cosine the remaining ones
  schedule: {
    name: "cosine",
    T_max: STEPS - WARMUP,
    warmup: { steps: WARMUP, start_factor: 0.1 },
  },
  params: { w: 0.0, b: 0.0 },
  dtype: "float64",
};

class ApiError extends Error {}

/** One request; the parsed JSON body, or an ApiError that says what the server said. */
async function api(method, path, body, headers = {}) {
  const init = { method, headers: { Accept: "application/json", ...headers } };
  if (API_KEY) init.headers.Authorization = `Bearer ${API_KEY}`;
  if (body !== undefined) {
    init.headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  let res;
  try {
    res = await fetch(BASE + path, init);
  } catch (err) {
    throw new ApiError(`${method} ${path}: ${err.cause?.message ?? err.message}`);
  }
  const text = await res.text();
  if (!res.ok) {
    let msg = `${method} ${path}: HTTP ${res.status}`;
    try {
      const problem = JSON.parse(text); // application/problem+json (RFC 9457)
      msg += ` ${problem.title}: ${problem.detail}`;
      for (const e of problem.errors ?? []) msg += `\n  at ${JSON.stringify(e.loc)}: ${e.msg}`;
      msg += `\n${text}`;
    } catch {
      msg += `\n${text}`;
    }
    throw new ApiError(msg);
  }
  return text ? JSON.parse(text) : null;
}

/** The mean squared error of w*x + b on the data, and its gradient. */
function lossAndGrads(w, b) {
  let l = 0;
  let gw = 0;
  let gb = 0;
  for (let i = 0; i < XS.length; i++) {
    const r = w * XS[i] + b - YS[i];
    l += r * r;
    gw += r * XS[i];
    gb += r;
  }
  const n = XS.length;
  return { loss: l / n, grads: { w: (2 * gw) / n, b: (2 * gb) / n } };
}

async function main() {
  const session = await api("POST", "/v1/sessions", SESSION);
  console.log(`session ${session.id}`);
  let { w, b } = SESSION.params;
  for (let t = 1; t <= STEPS; t++) {
    const { loss, grads } = lossAndGrads(w, b);
    // a retry of this request with the same key would not be applied twice
    const step = await api(
      "POST",
      `/v1/sessions/${session.id}/step`,
      { grads, loss },
      { "Idempotency-Key": `train-mjs-${session.id}-${t}` },
    );
    ({ w, b } = step.params);
    console.log(`step ${t} lr ${step.lr} loss ${loss}`);
  }
  const final = await api("GET", `/v1/sessions/${session.id}/params`);
  console.log(JSON.stringify(final.params));
}

main().catch((err) => {
  console.error(`train.mjs: ${err instanceof ApiError ? err.message : err.stack}`);
  process.exit(1);
});
