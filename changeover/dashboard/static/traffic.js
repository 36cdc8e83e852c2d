// The Traffic page: per-slot req/s, error rate and latency over 10 minutes (uPlot), updated every
// second from the event stream; switch moments drawn as dashed vertical lines.
(function () {
  "use strict";
  const COLORS = {blue: ["#1f6feb", "#58a6ff", "#9ecbff"], green: ["#1a7f37", "#3fb950", "#8ddb8c"]};
  let switches = [];
  const charts = {};

  const markSwitches = {
    hooks: {
      draw: [(u) => {
        const ctx = u.ctx;
        ctx.save();
        for (const s of switches) {
          const x = u.valToPos(s.ts, "x", true);
          if (x < u.bbox.left || x > u.bbox.left + u.bbox.width) continue;
          ctx.strokeStyle = (COLORS[s.slot] || ["#888"])[0];
          ctx.setLineDash([6, 4]);
          ctx.lineWidth = 2;
          ctx.beginPath();
          ctx.moveTo(x, u.bbox.top);
          ctx.lineTo(x, u.bbox.top + u.bbox.height);
          ctx.stroke();
          ctx.setLineDash([]);
          ctx.fillStyle = ctx.strokeStyle;
          ctx.font = "12px sans-serif";
          ctx.fillText("→ " + s.slot, x + 4, u.bbox.top + 14);
        }
        ctx.restore();
      }],
    },
  };

  function align(slots, key) {
    // one x axis for both slots: the union of their seconds
    const xs = new Set();
    for (const s of Object.values(slots)) s.t.forEach((t) => xs.add(Math.round(t)));
    const x = [...xs].sort((a, b) => a - b);
    const cols = [x];
    for (const name of Object.keys(slots)) {
      const s = slots[name];
      const byT = new Map(s.t.map((t, i) => [Math.round(t), s[key][i]]));
      cols.push(x.map((t) => (byT.has(t) ? byT.get(t) : null)));
    }
    return cols;
  }

  function make(id, series, data) {
    const el = document.getElementById(id);
    const opts = {width: Math.max(400, el.clientWidth - 8), height: 200, series: [{}, ...series],
      scales: {x: {time: true}}, axes: [{}, {size: 60}], plugins: [markSwitches], legend: {live: true}};
    charts[id] = new uPlot(opts, data, el);
    el.dataset.points = String(data[0].length);
  }

  function update(id, series, data) {
    const c = charts[id];
    if (!c || c.series.length !== series.length + 1) {
      if (c) c.destroy();
      make(id, series, data);
    } else {
      c.setData(data);
      document.getElementById(id).dataset.points = String(data[0].length);
    }
  }

  window.changeoverTraffic = function (data) {
    switches = data.switches.map((s) => ({ts: s.ts, slot: s.slot}));
    document.getElementById("chart-rps").dataset.switches = String(switches.length);
    const slots = data.slots;
    const names = Object.keys(slots);
    const label = (n) => n + (slots[n].version ? " (" + slots[n].version + ")" : "");
    const per = (k) => names.map((n) => ({label: label(n), stroke: (COLORS[n] || ["#888"])[0], width: 2, spanGaps: false}));
    update("chart-rps", per("rps"), align(slots, "rps"));
    update("chart-errors", per("error_rate"), align(slots, "error_rate"));
    const lat = [];
    const latData = [];
    let x = null;
    for (const [i, q] of ["p50", "p95", "p99"].entries()) {
      const cols = align(slots, q);
      x = cols[0];
      names.forEach((n, j) => {
        lat.push({label: n + " " + q, stroke: (COLORS[n] || ["#888", "#aaa", "#ccc"])[i], width: i === 1 ? 2 : 1});
        latData.push(cols[j + 1]);
      });
    }
    if (x) update("chart-latency", lat, [x, ...latData]);
    const note = document.getElementById("traffic-note");
    note.textContent = names.length ? "" : "No traffic recorded yet.";
  };

  fetch("/api/traffic", {credentials: "same-origin"}).then((r) => r.json()).then(window.changeoverTraffic);
})();
