// node-shop: a small Express shop for changeover.
//
//   sign-in      POST /login {"user": "ada"}        session in Redis (express-session + connect-redis)
//   who am I     GET  /me
//   cart         POST /cart {"item": "book"}        rows in PostgreSQL (pg), see cart.js
//                GET  /cart
//                DELETE /cart                       empty it (the smoke flow cleans up with it)
//   health       GET  /health                       {"status", "version", "db", "redis"}
//
// changeover starts it with PORT set (one port per instance) and API_VERSION set to the release
// name; /health reports that version, which the deploy checks before any user reaches it. The
// database state is reported in "db" because the monitor reads that field after the switch.
"use strict";

const express = require("express");
const session = require("express-session");
const { RedisStore } = require("connect-redis");
const { createClient } = require("redis");
const { Pool } = require("pg");
const cart = require("./cart");

const VERSION = process.env.API_VERSION || "dev";
const PORT = Number(process.env.PORT || 3000);
const SECRET = process.env.SESSION_SECRET;
if (!SECRET) {
  console.error("SESSION_SECRET is not set (see .env.example)");
  process.exit(1);
}

// Both slots hold a pool during a deploy: PG_POOL_SIZE x instances x 2 must fit max_connections
// ([checks.pre.connections] in changeover.toml checks that before a deploy starts).
const pool = new Pool({
  connectionString: process.env.DATABASE_URL,
  max: Number(process.env.PG_POOL_SIZE || 5),
  connectionTimeoutMillis: 2000,
});
pool.on("error", (e) => console.error("pg pool:", e.message));

const redis = createClient({ url: process.env.REDIS_URL });
redis.on("error", (e) => console.error("redis:", e.message));

const app = express();
// changeover's proxy sets X-Forwarded-For / -Proto / -Host; trust it (it runs on this host).
app.set("trust proxy", "loopback");
app.disable("x-powered-by");
app.use(express.json());
app.use((req, res, next) => {
  res.set("X-Version", VERSION);
  next();
});

// Sessions live in Redis, so a user signed in on the old release is still signed in on the new
// one after the switch (changeover's [checks.session] proves it on every deploy).
app.use(
  session({
    store: new RedisStore({ client: redis, prefix: "shop:sess:" }),
    name: "shop.sid",
    secret: SECRET,
    resave: false,
    saveUninitialized: false,
    cookie: { httpOnly: true, sameSite: "lax", secure: process.env.COOKIE_SECURE === "1", maxAge: 86400000 },
  }),
);

function signedIn(req, res, next) {
  if (!req.session.user) return res.status(401).json({ error: "not signed in" });
  next();
}

app.get("/", (req, res) => res.type("text").send(`node-shop ${VERSION}\n`));

app.get("/health", async (req, res) => {
  const body = { status: "ok", version: VERSION, db: "ok", redis: "ok" };
  let status = 200;
  try {
    await pool.query("SELECT 1");
  } catch (e) {
    Object.assign(body, { status: "failing", db: "down", db_error: String(e.message).slice(0, 200) });
    status = 503;
  }
  try {
    await redis.ping();
  } catch (e) {
    Object.assign(body, { status: "failing", redis: "down", redis_error: String(e.message).slice(0, 200) });
    status = 503;
  }
  res.status(status).json(body);
});

app.post("/login", (req, res, next) => {
  const user = String((req.body && req.body.user) || "").trim();
  if (!user) return res.status(400).json({ error: "user is required" });
  // A new session id at sign-in (no session fixation).
  req.session.regenerate((err) => {
    if (err) return next(err);
    req.session.user = user;
    res.json({ user, version: VERSION });
  });
});

app.post("/logout", (req, res, next) => {
  req.session.destroy((err) => (err ? next(err) : res.json({ ok: true })));
});

app.get("/me", signedIn, (req, res) => res.json({ user: req.session.user, version: VERSION }));

app.get("/cart", signedIn, async (req, res) => {
  res.json({ user: req.session.user, items: await cart.list(pool, req.session.user), version: VERSION });
});

app.post("/cart", signedIn, async (req, res) => {
  const item = String((req.body && req.body.item) || "").trim();
  if (!item) return res.status(400).json({ error: "item is required" });
  await cart.add(pool, req.session.user, item);
  res.status(201).json({ user: req.session.user, added: item, version: VERSION });
});

app.delete("/cart", signedIn, async (req, res) => {
  res.json({ removed: await cart.clear(pool, req.session.user), version: VERSION });
});

// Express 5 passes rejected promises of async handlers here.
app.use((err, req, res, next) => {
  console.error(err);
  res.status(500).json({ error: String(err.message || err) });
});

async function main() {
  await redis.connect();
  const server = app.listen(PORT, "127.0.0.1", () => {
    console.log(`node-shop ${VERSION} listening on 127.0.0.1:${PORT} (pid ${process.pid})`);
  });

  // Graceful stop: changeover sends SIGTERM once the slot gets no new requests. Stop accepting,
  // let requests in flight finish, then close the pool and Redis. stop_timeout (changeover.toml)
  // is the hard limit: SIGKILL follows it.
  let stopping = false;
  const stop = (signal) => {
    if (stopping) return;
    stopping = true;
    console.log(`${signal}: closing (pid ${process.pid})`);
    server.close(async () => {
      await pool.end().catch(() => {});
      await redis.quit().catch(() => {});
      process.exit(0);
    });
    server.closeIdleConnections(); // idle keep-alive connections would hold server.close open
  };
  process.on("SIGTERM", () => stop("SIGTERM"));
  process.on("SIGINT", () => stop("SIGINT"));
}

main().catch((e) => {
  console.error("node-shop failed to start:", e.message);
  process.exit(1);
});
