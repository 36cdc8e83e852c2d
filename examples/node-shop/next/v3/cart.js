// Release 3 (switch): reads and writes sku only. item is no longer used by this code; release 2,
// the warm standby while this one is observed, still reads COALESCE(item, sku), so a rollback
// shows these rows too. Migration 0003 drops item once release 2 is gone (`migrate contract`).
"use strict";

async function list(pool, user) {
  const r = await pool.query("SELECT sku FROM cart_items WHERE user_name = $1 ORDER BY id", [user]);
  return r.rows.map((row) => row.sku);
}

async function add(pool, user, item) {
  await pool.query("INSERT INTO cart_items (user_name, sku) VALUES ($1, $2)", [user, item]);
}

async function clear(pool, user) {
  const r = await pool.query("DELETE FROM cart_items WHERE user_name = $1", [user]);
  return r.rowCount;
}

module.exports = { list, add, clear };
