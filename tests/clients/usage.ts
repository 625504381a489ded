// Type-checked (tsc --noEmit --strict) against the types openapi-typescript generates from the
// live /openapi.json (scripts/generated-clients.sh). The `@ts-expect-error` lines prove that the
// generated types carry the document's rules: tsc fails if any of them starts to type-check.
import type { components, operations, paths } from "./keygate-admin";

type Schemas = components["schemas"];

const createKey: Schemas["CreateKey"] = {
  name: "billing backend",
  client_id: "acme",
  permissions: ["invoices:read"],
  expires_days: 30,
  rate_limit: { per_minute: 600, burst: 20 },
  metadata: { team: "billing", nested: { any: ["json"] } },
};

const createClient: Schemas["CreateClient"] = { client_id: "acme", license: "pro" };
const patchClient: Schemas["UpdateClient"] = { license: null, metadata: null };
const patchKey: Schemas["UpdateKey"] = { enabled: false, expires_at: null, rate_limit: null };
const rotate: Schemas["RotateKey"] = { grace_period_seconds: 3600 };
const kixote: Schemas["KxCreateClient"] = { client_id: "acme", license: "free" };
const login: Schemas["LoginRequest"] = { api_key: "kg_example" };

// @ts-expect-error `name` is required
const noName: Schemas["CreateKey"] = { client_id: "acme" };
// @ts-expect-error `client_id` is required
const noClient: Schemas["CreateKey"] = { name: "x" };
// @ts-expect-error a license is one of the configured plans
const badLicense: Schemas["CreateClient"] = { client_id: "acme", license: "platinum" };
// @ts-expect-error unknown fields are refused
const extra: Schemas["RotateKey"] = { grace_period_seconds: 1, colour: "red" };

// Answers: the created key carries its plaintext once; a page carries items and counts.
type Created = operations["create_key"]["responses"][201]["content"]["application/json"];
type Page = paths["/v1/api-keys"]["get"]["responses"][200]["content"]["application/json"];
type NotFound = operations["get_key"]["responses"][404]["content"]["application/problem+json"];

function describe(k: Created, p: Page, e: NotFound): string {
  const secret: string | undefined = k.key;
  const total: number = p.total;
  const ids: string[] = p.data.map((item) => item.id);
  const code: Schemas["ProblemCode"] = e.code;
  const fields: string[] = (e.errors ?? []).map((f) => f.field);
  return [secret, total, ids.join(","), code, fields.join(",")].join(" ");
}

// Every problem code is a known one.
const codes: Schemas["ProblemCode"][] = ["not_found", "validation_failed", "unauthorized"];
// @ts-expect-error not a code the API answers
const badCode: Schemas["ProblemCode"] = "teapot";

// Query parameters are numbers.
type ListQuery = NonNullable<operations["list_keys"]["parameters"]["query"]>;
const q: ListQuery = { page: 2, per_page: 100, client_id: "acme" };

// Credits, webhooks and import: one credit change is one number; events are the known types.
const addCredits: Schemas["CreditsChange"] = { add: 5000 };
const setCredits: Schemas["CreditsChange"] = { set: 0 };
// @ts-expect-error a credit change is a number, never null
const nullCredits: Schemas["CreditsChange"] = { add: null };
const terms: Schemas["CreditsBody"] = { remaining: 100, refill: { amount: 1000, interval: "monthly", day: 1 } };
const hook: Schemas["CreateWebhook"] = { url: "https://hooks.example.com/keygate", events: ["key.created", "key.revoked"] };
const allEvents: Schemas["CreateWebhook"] = { url: "https://hooks.example.com/keygate", events: "*" };
// @ts-expect-error not an event type
const badEvent: Schemas["CreateWebhook"] = { url: "https://hooks.example.com/x", events: ["key.eaten"] };
const importing: Schemas["ImportRequest"] = { keys: [{ client_id: "acme", name: "from kong", key: "kong-0123456789abcdef" }], atomic: true };
type Usage = operations["client_usage"]["responses"][200]["content"]["application/json"];
type Hooks = operations["list_webhooks"]["responses"][200]["content"]["application/json"];
function remaining(u: Usage, h: Hooks): number {
  const secrets: (string | undefined)[] = h.data.map((w) => w.secret);
  return u.credits.reduce((n, k) => n + k.credits.remaining, secrets.length);
}

export {
  addCredits, setCredits, nullCredits, terms, hook, allEvents, badEvent, importing, remaining,
  createKey, createClient, patchClient, patchKey, rotate, kixote, login, describe, codes, q,
  noName, noClient, badLicense, extra, badCode,
};
