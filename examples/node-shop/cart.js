// Release 1: cart_items.item holds what was added (migrations/0001_cart_items.up.sql).
"use strict";

async function list(pool, user) {
  const r = await pool.query("SELECT item FROM cart_items WHERE user_name = $1 ORDER BY id", [user]);
  return r.rows.map((row) => row.item);
}

async function add(pool, user, item) {
  await pool.query("INSERT INTO cart_items (user_name, item) VALUES ($1, $2)", [user, item]);
}

async function clear(pool, user) {
  const r = await pool.query("DELETE FROM cart_items WHERE user_name = $1", [user]);
  return r.rowCount;
}

module.exports = { list, add, clear };
