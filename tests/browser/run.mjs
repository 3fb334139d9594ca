// Drives examples/web (the live topic viewer, MQTT.js over WebSocket) in headless
// Chromium through playwright-core, against a running actimq node.
//
//   node tests/browser/run.mjs <ws-url> <tcp-host:port>   the test (exit 0 = passed)
//   node tests/browser/run.mjs --serve [port]             just serve the page, for a person
//
// The test: serve examples/web and MQTT.js's browser bundle from a static server on
// 127.0.0.1, open the page with ?url=<ws-url>&topic=browser/#, wait until it has
// subscribed, publish with `mosquitto_pub` over TCP and wait until the page shows that
// message; then make the page publish (its form) and check that `mosquitto_sub` over
// TCP receives it. The browser is Debian's /usr/bin/chromium (or $CHROMIUM), never one
// that Playwright downloads. A screenshot goes to $SCREENSHOT when that is set.
//
// Everything is bounded: each wait has a timeout, and the whole run is cut at 90 s.

import { spawn } from "node:child_process";
import { createServer } from "node:http";
import { mkdtempSync, readFileSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { dirname, join, normalize } from "node:path";
import { fileURLToPath } from "node:url";

const here = dirname(fileURLToPath(import.meta.url));
const webDir = join(here, "..", "..", "examples", "web");
const bundle = join(here, "node_modules", "mqtt", "dist", "mqtt.min.js");
const CHROMIUM = process.env.CHROMIUM || "/usr/bin/chromium";
const WAIT_MS = 20000;

function fail(msg) {
  console.error(`browser test FAILED: ${msg}`);
  process.exit(1);
}

// A static server for the page and the bundle; nothing else.
function serve(port = 0) {
  const types = { ".html": "text/html", ".js": "text/javascript", ".css": "text/css" };
  const server = createServer((req, res) => {
    let path = new URL(req.url, "http://x").pathname;
    if (path === "/") path = "/index.html";
    const file = path === "/mqtt.min.js" ? bundle : join(webDir, normalize(path));
    if (!file.startsWith(webDir) && file !== bundle) {
      res.writeHead(404).end("not found");
      return;
    }
    try {
      const body = readFileSync(file);
      const ext = file.slice(file.lastIndexOf("."));
      res.writeHead(200, { "Content-Type": types[ext] || "application/octet-stream" });
      res.end(body);
    } catch {
      res.writeHead(404).end("not found");
    }
  });
  return new Promise((resolve) => server.listen(port, "127.0.0.1", () => resolve(server)));
}

// Run a command to completion; resolves with { code, stdout, stderr }.
function run(cmd, args, timeoutMs) {
  return new Promise((resolve) => {
    const child = spawn(cmd, args, { stdio: ["ignore", "pipe", "pipe"] });
    let stdout = "";
    let stderr = "";
    child.stdout.on("data", (d) => (stdout += d));
    child.stderr.on("data", (d) => (stderr += d));
    const timer = setTimeout(() => child.kill("SIGKILL"), timeoutMs);
    child.on("error", (e) => {
      clearTimeout(timer);
      resolve({ code: -1, stdout, stderr: String(e) });
    });
    child.on("close", (code) => {
      clearTimeout(timer);
      resolve({ code, stdout, stderr });
    });
  });
}

async function test(wsUrl, tcp) {
  const [host, port] = tcp.split(":");
  const { chromium } = await import("playwright-core");
  const server = await serve();
  const pageUrl =
    `http://127.0.0.1:${server.address().port}/index.html` +
    `?url=${encodeURIComponent(wsUrl)}&topic=${encodeURIComponent("browser/#")}`;
  const profile = mkdtempSync(join(tmpdir(), "actimq-chromium-"));
  let context;
  try {
    context = await chromium.launchPersistentContext(profile, {
      executablePath: CHROMIUM,
      headless: true,
      args: [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
      ],
      timeout: WAIT_MS,
    });
    const page = context.pages()[0] || (await context.newPage());
    page.on("console", (m) => console.log(`[page ${m.type()}] ${m.text()}`));
    page.on("pageerror", (e) => console.log(`[page error] ${e}`));
    await page.goto(pageUrl, { timeout: WAIT_MS });

    // 1. The page connects over WebSocket and subscribes.
    try {
      await page.waitForFunction(() => window.viewer && window.viewer.status === "subscribed", null, {
        timeout: WAIT_MS,
      });
    } catch {
      const state = await page.evaluate(() => window.viewer && { status: window.viewer.status, errors: window.viewer.errors });
      fail(`the page did not subscribe: ${JSON.stringify(state)}`);
    }
    console.log("page subscribed over WebSocket");

    // 2. mosquitto_pub over TCP -> the page.
    const text = `hello from mosquitto_pub ${Date.now()}`;
    const pub = await run(
      "mosquitto_pub",
      ["-h", host, "-p", port, "-q", "1", "-t", "browser/greeting", "-m", text],
      WAIT_MS,
    );
    if (pub.code !== 0) fail(`mosquitto_pub exited ${pub.code}: ${pub.stderr}`);
    try {
      await page.waitForFunction(
        (t) => window.viewer.messages.some((m) => m.topic === "browser/greeting" && m.payload === t),
        text,
        { timeout: WAIT_MS },
      );
    } catch {
      const got = await page.evaluate(() => window.viewer.messages);
      fail(`the page did not receive "${text}"; it has ${JSON.stringify(got)}`);
    }
    // And it is on screen, not only in the page's state.
    const cell = await page.locator("#topics td.payload").first().textContent();
    if (cell !== text) fail(`the table shows ${JSON.stringify(cell)}, not ${JSON.stringify(text)}`);
    console.log(`page received: ${text}`);

    // 3. The page publishes (through its form) -> mosquitto_sub over TCP.
    const fromPage = `hello from the browser ${Date.now()}`;
    const sub = run(
      "mosquitto_sub",
      ["-h", host, "-p", port, "-q", "1", "-t", "browser/from-page", "-C", "1", "-W", "20"],
      WAIT_MS + 5000,
    );
    // mosquitto_sub has no "subscribed" signal: give it a moment to subscribe, then
    // publish until it has received (a QoS 1 publish before its SUBSCRIBE would be lost).
    let result;
    for (let i = 0; i < 10 && result === undefined; i++) {
      await new Promise((r) => setTimeout(r, 300));
      await page.fill("#pub-payload", fromPage);
      await page.click("#pub-send");
      result = await Promise.race([sub, new Promise((r) => setTimeout(() => r(undefined), 500))]);
    }
    result = result || (await sub);
    if (result.code !== 0 || result.stdout.trim() !== fromPage) {
      fail(`mosquitto_sub got ${JSON.stringify(result)} instead of "${fromPage}"`);
    }
    console.log(`mosquitto_sub received: ${fromPage}`);

    if (process.env.SCREENSHOT) {
      await page.screenshot({ path: process.env.SCREENSHOT, fullPage: true });
      console.log(`screenshot: ${process.env.SCREENSHOT}`);
    }
    const errors = await page.evaluate(() => window.viewer.errors);
    if (errors.length) fail(`the page reported errors: ${JSON.stringify(errors)}`);
  } finally {
    if (context) await context.close().catch(() => {});
    server.close();
    rmSync(profile, { recursive: true, force: true });
  }
  console.log("browser test passed");
}

const args = process.argv.slice(2);
if (args[0] === "--serve") {
  const server = await serve(Number(args[1] || 8080));
  console.log(`serving examples/web at http://127.0.0.1:${server.address().port}/?url=ws://127.0.0.1:8083/mqtt`);
} else if (args.length === 2) {
  setTimeout(() => fail("timed out after 90 s"), 90000).unref();
  try {
    await test(args[0], args[1]);
    process.exit(0);
  } catch (e) {
    fail(e && e.stack ? e.stack : String(e));
  }
} else {
  console.error("usage: node tests/browser/run.mjs <ws-url> <tcp-host:port> | --serve [port]");
  process.exit(2);
}
