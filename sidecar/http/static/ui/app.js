// The inspection page (SPEC §10): plain DOM, no framework, nothing fetched but this sidecar's own
// admin API. Every value from the API is put in the page as text (textContent, attributes set one
// by one), never parsed as HTML, so a hostile customer id, reason or name shows as itself.
// The admin token is entered once and kept in this tab's sessionStorage; it travels only in the
// Authorization header of same-origin requests, never in a URL or a cookie.
"use strict";

const TOKEN_KEY = "quota-sidecar.admin-token";
const PAGE_SIZE = 20;
const SVG = "http://www.w3.org/2000/svg";
const $ = (selector) => document.querySelector(selector);

// -- DOM helpers: text only -------------------------------------------------------------------
function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs || {})) node.setAttribute(name, String(value));
  for (const child of children) node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  return node;
}

function svg(tag, attrs, text) {
  const node = document.createElementNS(SVG, tag);
  for (const [name, value] of Object.entries(attrs || {})) node.setAttribute(name, String(value));
  if (text !== undefined) node.textContent = String(text);
  return node;
}

function clear(node) { node.replaceChildren(); return node; }

function say(message, isError) {
  const status = $("#status");
  status.textContent = message || "";
  status.className = isError ? "error" : "";
}

// -- the admin API ------------------------------------------------------------------------------
class Unauthorized extends Error {}

async function api(path, options) {
  const headers = { Accept: "application/json" };
  const token = sessionStorage.getItem(TOKEN_KEY);
  if (token) headers.Authorization = "Bearer " + token;
  const response = await fetch(path, { cache: "no-store", credentials: "omit", ...options, headers });
  if (response.status === 401) throw new Unauthorized("the admin token was refused");
  const body = await response.json().catch(() => ({}));
  if (!response.ok) throw new Error(body.detail || body.title || "HTTP " + response.status);
  return body;
}

function customerPath(id, tail) { return "/admin/customers/" + encodeURIComponent(id) + tail; }

// -- views ---------------------------------------------------------------------------------------
const VIEWS = ["login", "customers", "customer", "outbox"];

function show(view) {
  for (const name of VIEWS) $("#" + name).hidden = name !== view;
}

async function route() {
  say("");
  const hash = location.hash || "#/customers";
  try {
    if (hash.startsWith("#/customer/")) await openCustomer(decodeURIComponent(hash.slice("#/customer/".length)));
    else if (hash === "#/outbox") await openOutbox();
    else await openCustomers();
  } catch (error) {
    if (error instanceof Unauthorized) {
      show("login");
      say(sessionStorage.getItem(TOKEN_KEY) ? "The admin token was refused; enter it again." : "");
      sessionStorage.removeItem(TOKEN_KEY);
      $("#token").focus();
    } else {
      say(error.message, true);
    }
  }
}

// -- customers: search by id prefix or plan, paged -------------------------------------------------
async function openCustomers(cursor) {
  show("customers");
  const query = new URLSearchParams({ prefix: $("#prefix").value, limit: PAGE_SIZE, cursor: cursor || "" });
  if ($("#plan").value) query.set("plan", $("#plan").value);
  const page = await api("/admin/customers?" + query);
  const rows = clear($("#customer-table tbody"));
  for (const customer of page.customers) {
    const link = el("a", { href: "#/customer/" + encodeURIComponent(customer.id), "data-customer": customer.id }, customer.id);
    rows.append(el("tr", {}, el("td", {}, link), el("td", {}, customer.plan), el("td", {}, customer.keys), el("td", {}, customer.source)));
  }
  if (!page.customers.length) rows.append(el("tr", {}, el("td", { colspan: 4 }, "No customers match.")));
  const next = $("#next-page");
  next.hidden = !page.cursor;
  next.dataset.cursor = page.cursor || "";
}

// -- one customer: limits, credit, history, notifications -------------------------------------------
let current = null;

async function openCustomer(id) {
  current = id;
  show("customer");
  $("#customer-title").textContent = id;
  const [usage, notes] = await Promise.all([api(customerPath(id, "/usage")), api(customerPath(id, "/notifications"))]);
  $("#customer-plan").textContent = "Plan " + usage.plan;
  drawLimits(usage.limits);
  drawNotifications(notes.notifications);
  await drawHistory(id);
}

function drawLimits(limits) {
  const box = clear($("#limits"));
  for (const row of limits) {
    const prepaid = row.period === "prepaid";
    const name = row.meter + (prepaid ? " credit" : " per " + row.period) + (row.feature ? " (" + row.feature + ")" : "");
    const share = row.limit > 0 ? row.used / row.limit : (row.used > 0 ? 1 : 0);
    const numbers = prepaid
      ? row.used + " of " + row.limit + " granted used, " + row.remaining + " left"
      : row.used + " / " + row.limit + " used, resets " + row.reset;
    const id = row.meter + "-" + row.period + (row.feature ? "-" + row.feature : "");
    box.append(el("div", { class: "limit", "data-limit": id },
      el("span", { class: "name" }, name), bar(share), el("span", { class: "numbers" }, numbers)));
  }
  if (!limits.length) box.append(el("p", { class: "hint" }, "This plan has no limits or credit."));
}

function bar(share) {
  const picture = svg("svg", { class: "bar", viewBox: "0 0 100 10", preserveAspectRatio: "none", role: "img" });
  const width = Math.max(0, Math.min(100, share * 100));
  const level = share >= 1 ? "fill over" : share >= 0.8 ? "fill high" : "fill";
  picture.append(svg("rect", { class: "track", x: 0, y: 0, width: 100, height: 10 }));
  picture.append(svg("rect", { class: level, x: 0, y: 0, width: width.toFixed(2), height: 10 }));
  picture.append(svg("title", {}, Math.round(share * 100) + "%"));
  return picture;
}

function drawNotifications(notes) {
  const list = clear($("#notifications"));
  for (const n of notes) {
    const what = n.type === "credit.exhausted" ? "credit exhausted" : n.threshold + "% of " + n.limit_name;
    list.append(el("li", { "data-type": n.type, "data-threshold": n.threshold },
      n.type + ": " + what + " — " + n.used + " / " + n.limit + " at " + n.at));
  }
  if (!notes.length) list.append(el("li", {}, "None yet."));
}

const RANGES = { window: { from: 3600, step: "" }, 3600: { from: 2 * 86400, step: "3600" }, 86400: { from: 0, step: "86400" } };

async function drawHistory(id) {
  const range = RANGES[$("#history-step").value];
  const query = new URLSearchParams();
  if (range.from) query.set("from", String(Math.floor(Date.now() / 1000) - range.from));
  if (range.step) query.set("step", range.step);
  const history = await api(customerPath(id, "/history?" + query));
  const rows = clear($("#history-table tbody"));
  for (const w of history.windows.slice(-50).reverse()) {
    rows.append(el("tr", {}, el("td", {}, w.window_start), el("td", {}, w.meter), el("td", {}, w.feature), el("td", {}, w.value)));
  }
  drawChart(history.windows);
}

function drawChart(windows) {
  const chart = clear($("#chart"));
  const meters = [...new Set(windows.map((w) => w.meter))].sort();
  for (const meter of meters) {
    const totals = new Map();
    for (const w of windows.filter((x) => x.meter === meter)) totals.set(w.window_start, (totals.get(w.window_start) || 0) + w.value);
    const points = [...totals.entries()].sort((a, b) => (a[0] < b[0] ? -1 : 1));
    const most = Math.max(1, ...points.map((p) => p[1]));
    const picture = svg("svg", { viewBox: "0 0 600 180", preserveAspectRatio: "none", "data-meter": meter, role: "img" });
    picture.append(svg("title", {}, meter + " per window"));
    const width = Math.min(40, 580 / Math.max(points.length, 1));
    points.forEach(([start, value], i) => {
      const height = (value / most) * 140;
      const column = svg("rect", { class: "column", x: 10 + i * width, y: 160 - height, width: Math.max(width - 1, 1), height });
      column.append(svg("title", {}, start + ": " + value));
      picture.append(column);
    });
    picture.append(svg("text", { class: "axis", x: 10, y: 14 }, meter + " (most " + most + ")"));
    if (points.length) {
      picture.append(svg("text", { class: "axis", x: 10, y: 175 }, points[0][0]));
      picture.append(svg("text", { class: "axis", x: 590, y: 175, "text-anchor": "end" }, points[points.length - 1][0]));
    }
    chart.append(picture);
  }
  if (!meters.length) chart.append(el("p", { class: "hint" }, "No closed windows in this range yet."));
}

// -- the outbox: pending, dead letters, redrive with a confirmation ----------------------------------
async function openOutbox() {
  show("outbox");
  const [summary, billing, notes] = await Promise.all([
    api("/admin/billing/outbox"), api("/admin/billing/dead-letters"), api("/admin/notifications/dead-letters"),
  ]);
  $("#outbox-summary").textContent = summary.pending_summaries + " summaries waiting for billing, " +
    summary.billing_dead_letters + " billing dead letters; " + summary.notifications_waiting +
    " customers with notifications waiting, " + summary.notification_dead_letters + " notification dead letters.";
  const billingRows = clear($("#billing-dead tbody"));
  for (const letter of billing.dead_letters) {
    const s = letter.summary;
    billingRows.append(el("tr", { "data-id": s.id }, el("td", {}, s.customer), el("td", {}, s.meter),
      el("td", {}, new Date(s.window_start * 1000).toISOString()), el("td", {}, s.value), el("td", { class: "reason" }, letter.reason)));
  }
  const noteRows = clear($("#notify-dead tbody"));
  for (const letter of notes.dead_letters) {
    const n = letter.notification;
    noteRows.append(el("tr", { "data-id": n.id }, el("td", {}, n.customer), el("td", {}, n.type + " " + n.limit_name),
      el("td", {}, n.threshold + "%"), el("td", { class: "reason" }, letter.reason)));
  }
  for (const box of document.querySelectorAll(".redrive")) {
    const count = box.dataset.kind === "billing" ? billing.dead_letters.length : notes.dead_letters.length;
    box.querySelector(".redrive-ask").disabled = count === 0;
    box.querySelector(".redrive-question").textContent = "Redrive " + count + " dead letter" + (count === 1 ? "" : "s") + "?";
  }
}

const REDRIVE = { billing: "/admin/billing/dead-letters/redrive", notifications: "/admin/notifications/dead-letters/redrive" };

async function redrive(box) {
  box.querySelector(".redrive-confirm").hidden = true;
  const answer = await api(REDRIVE[box.dataset.kind], { method: "POST" });
  box.querySelector(".redrive-result").textContent = "Redriven " + answer.redriven + ".";
  await openOutbox();
}

// -- wiring ------------------------------------------------------------------------------------------
function guarded(action) {
  return (event) => {
    if (event) event.preventDefault();
    Promise.resolve(action(event)).catch((error) => (error instanceof Unauthorized ? route() : say(error.message, true)));
  };
}

document.addEventListener("DOMContentLoaded", () => {
  $("#token-form").addEventListener("submit", guarded(() => {
    sessionStorage.setItem(TOKEN_KEY, $("#token").value);
    $("#token").value = "";
    return route();
  }));
  $("#forget-token").addEventListener("click", guarded(() => { sessionStorage.removeItem(TOKEN_KEY); return route(); }));
  $("#search-form").addEventListener("submit", guarded(() => openCustomers("")));
  $("#next-page").addEventListener("click", guarded(() => openCustomers($("#next-page").dataset.cursor)));
  $("#refresh").addEventListener("click", guarded(() => openCustomer(current)));
  $("#history-step").addEventListener("change", guarded(() => drawHistory(current)));
  for (const box of document.querySelectorAll(".redrive")) {
    box.querySelector(".redrive-ask").addEventListener("click", guarded(() => { box.querySelector(".redrive-confirm").hidden = false; }));
    box.querySelector(".redrive-no").addEventListener("click", guarded(() => { box.querySelector(".redrive-confirm").hidden = true; }));
    box.querySelector(".redrive-yes").addEventListener("click", guarded(() => redrive(box)));
  }
  window.addEventListener("hashchange", route);
  route();
});
