// Release 2 (expand): a new column, sku, is written next to item. Reads prefer item and fall
// back to sku, so this release also shows what release 3 (which writes sku only) added, should
// it be rolled back to.
"use strict";

async function list(pool, user) {
  const r = await pool.query("SELECT COALESCE(item, sku) AS item FROM cart_items WHERE user_name = $1 ORDER BY id",
    [user]);
  return r.rows.map((row) => row.item);
}

async function add(pool, user, item) {
  await pool.query("INSERT INTO cart_items (user_name, item, sku) VALUES ($1, $2, $2)", [user, item]);
}

async function clear(pool, user) {
  const r = await pool.query("DELETE FROM cart_items WHERE user_name = $1", [user]);
  return r.rowCount;
}

module.exports = { list, add, clear };
