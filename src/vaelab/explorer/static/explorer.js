// vaelab explore: the page. Plain JavaScript and canvas, no libraries. It asks a backend for everything it
// shows: server-backend.js calls the local server's API; an exported file carries static-backend.js instead
// (the decoder's weights or a precomputed grid, embedded). Backend interface, all promises unless noted:
//   info(), codes() -> {codes, labels}, decode(zs) -> strip, sample(z, sigma, seed, n) -> strip,
//   encode(i) -> {mean, std, label?}; plain values: imageURL(i), fixedPlane (true when the plane can't change),
//   note (a line for the top of the page), extent and nImages (set where the backend fixes them)
// A strip is an ImageBitmap holding images of the run's size side by side.
"use strict";

const PALETTE = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
                 "#bcbd22", "#17becf"];
const QUANTILES = [0.05, 0.15, 0.25, 0.35, 0.45, 0.55, 0.65, 0.75, 0.85, 0.95];
const N_STRIP = 24, N_DRAWS = 3, N_Q = 8, N_PATH = 10;
const $ = id => document.getElementById(id);

// ---------------------------------------------------------------------------------------------- small maths
const dot = (a, b) => a.reduce((s, v, i) => s + v * b[i], 0);
const colour = k => k < PALETTE.length ? PALETTE[k] : `hsl(${(k * 137.5) % 360} 60% 45%)`;

function invNormal(p) {  // Acklam's rational approximation of the standard normal quantile (|error| < 1.2e-9)
  const a = [-39.6968302866538, 220.946098424521, -275.928510446969, 138.357751867269, -30.6647980661472,
             2.50662827745924];
  const b = [-54.4760987982241, 161.585836858041, -155.698979859887, 66.8013118877197, -13.2806815528857];
  const c = [-0.00778489400243029, -0.322396458041136, -2.40075827716184, -2.54973253934373, 4.37466414146497,
             2.93816398269878];
  const d = [0.00778469570904146, 0.32246712907004, 2.445134137143, 3.75440866190742];
  const lo = 0.02425;
  if (p < lo) {
    const q = Math.sqrt(-2 * Math.log(p));
    return (((((c[0] * q + c[1]) * q + c[2]) * q + c[3]) * q + c[4]) * q + c[5]) /
      ((((d[0] * q + d[1]) * q + d[2]) * q + d[3]) * q + 1);
  }
  if (p > 1 - lo) return -invNormal(1 - p);
  const q = p - 0.5, r = q * q;
  return (((((a[0] * r + a[1]) * r + a[2]) * r + a[3]) * r + a[4]) * r + a[5]) * q /
    (((((b[0] * r + b[1]) * r + b[2]) * r + b[3]) * r + b[4]) * r + 1);
}

function randn() {  // Box-Muller, for z ~ q(z|x) drawn in the page
  let u = 0;
  while (u === 0) u = Math.random();
  return Math.sqrt(-2 * Math.log(u)) * Math.cos(2 * Math.PI * Math.random());
}

function percentile(values, p) {
  const s = Float64Array.from(values).sort();
  return s.length ? s[Math.min(s.length - 1, Math.floor(p * s.length))] : 0;
}

// Calls `task(job)` one job at a time; a job arriving meanwhile replaces any waiting one (latest wins), so
// requests never pile up behind a fast-moving pointer.
function latestOnly(task) {
  let busy = false, next = null;
  const go = async job => {
    busy = true;
    try { await task(job); } catch (err) { showStatus(err.message); }
    busy = false;
    if (next) { const j = next; next = null; go(j); }
  };
  return job => { if (busy) next = job; else go(job); };
}

function showStatus(text) { $("status").textContent = text || ""; }

// ---------------------------------------------------------------------------------------------- the page
async function main() {
  const backend = window.vaelabBackend;
  const info = await backend.info();
  const { codes, labels, factors } = await backend.codes();
  const L = info.latent_dim, [C, H, W] = info.shape;
  const S = {                         // everything the drawing reads
    kind: info.basis_kind,            // "pca" or "axes"
    axes: [0, 1],                     // which basis rows span the plane
    basis: null,                      // (L, L) rows: the plane's two directions first, then the others
    others: [],                       // z along basis rows 2..L-1 (the sliders)
    extent: 3.5,                      // the plane shows [-extent, extent]^2
    pointer: null,                    // z under the pointer
    sigma: info.sigma, seed: 1,
    selected: null, qSamples: [], ends: [], offset: 0,
    colourBy: -1,                     // -1: the label; k: factor k (a colour ramp over its range)
  };
  window.vaelabExplorer = { info, state: S, latencies: [] };

  // ---- header
  $("run-name").textContent = "— " + info.run;
  $("run-info").textContent = `${info.dataset} · ${C}×${H}×${W} · latent dimension ${L} · ` +
    `${info.likelihood_text} · ${codes.length} test codes (posterior means)`;
  if (backend.note) { $("note").textContent = backend.note; $("note").hidden = false; }

  // ---- canvases sized to the run's images (CSS scales them up without smoothing)
  for (const id of ["fz", "x-orig", "x-recon"]) { $(id).width = W; $(id).height = H; }
  const big = 224 / Math.max(H, W);
  $("fz").style.width = `${W * big}px`;
  for (let k = 0; k < N_DRAWS; k++) {
    const cv = document.createElement("canvas");
    cv.width = W; cv.height = H; $("draws").appendChild(cv);
  }
  const setRow = (cv, n) => { cv.width = n * W; cv.height = H; cv.style.height = "64px"; };

  // ---- the plane: basis, extent, coordinates
  const eye = i => Array.from({ length: L }, (_, j) => +(i === j));
  function setPlane() {
    const rows = S.kind === "pca" ? [...info.basis] : Array.from({ length: L }, (_, i) => eye(i));
    if (L === 1) rows.push([0]);      // one latent dimension: the vertical direction adds nothing to z
    const [i, j] = S.axes;
    S.basis = [rows[i], rows[j], ...rows.filter((_, k) => k !== i && k !== j)];
    S.others = S.basis.slice(2).map(b => dot(info.centre, b));  // the mean code, seen along the other rows
    const uv = codes.map(z => [dot(z, S.basis[0]), dot(z, S.basis[1])]);
    S.uv = uv;
    const reach = percentile(uv.map(([u, v]) => Math.max(Math.abs(u), Math.abs(v))), 0.99) * 1.15;
    S.extent = backend.extent || Math.min(info.limits.max_abs_z, Math.max(3.5, reach));
    $("plane").dataset.extent = S.extent;
    buildSliders();
    drawBase();
    drawOverlay();
    const name = k => S.kind === "pca" ? `principal axis ${k + 1}` : `z${k + 1}`;
    const vertical = L > 1 ? name(j) : "unused (one latent dimension)";
    $("plane-caption").textContent = `horizontal: ${name(i)}, vertical: ${vertical}; plane coordinates ` +
      `measured from z = 0; ${priorText()}; grid lines at the 5%, ` +
      "15%, …, 95% quantiles of N(0, 1); " +
      "the mouse wheel zooms" +
      (L > 2 ? "; the other dimensions are set by the sliders (default: the mean code)" : "");
  }
  const zAt = (u, v) => {             // z = u b0 + v b1 + sum_k others_k b_{k+2}
    const z = S.basis[0].map((b, d) => u * b + v * S.basis[1][d]);
    S.others.forEach((s, k) => S.basis[k + 2].forEach((b, d) => { z[d] += s * b; }));
    return z;
  };
  const planeOf = z => [dot(z, S.basis[0]), dot(z, S.basis[1])];
  const base = $("plane-base"), over = $("plane");
  const toPx = (u, v) => [(u + S.extent) / (2 * S.extent) * base.width,
                          (S.extent - v) / (2 * S.extent) * base.height];
  function eventUV(e) {
    const r = over.getBoundingClientRect();
    return [-S.extent + (e.clientX - r.left) / r.width * 2 * S.extent,
            S.extent - (e.clientY - r.top) / r.height * 2 * S.extent];
  }

  function priorText() {
    if (Object.keys(info.prior_radii).length) return "circles hold 68%, 95%, 99.7% of the prior's mass in the plane";
    if (info.prior_density) {
      return `shaded: the prior's log-density log p(z) (${info.prior_text}), from its peak down ${DENSITY_NATS} nats`;
    }
    return `the prior is ${info.prior_text}`;
  }

  const DENSITY_NATS = 6;             // the shading's range: the peak of log p(z) down to this many nats below
  function drawPriorDensity(g) {      // a learned prior in two dimensions: log p(z) on the server's grid, shaded
    const { extent: E, log_p: rows } = info.prior_density, n = rows.length;
    const top = Math.max(...rows.map(r => Math.max(...r)));
    const swap = S.axes[0] === 1;     // z2 horizontal: the grid is seen transposed
    const img = new ImageData(n, n);
    for (let r = 0; r < n; r++) {
      for (let c = 0; c < n; c++) {
        const lp = swap ? rows[n - 1 - c][n - 1 - r] : rows[r][c], k = 4 * (r * n + c);
        img.data.set([31, 119, 180, Math.round(120 * Math.max(0, 1 + (lp - top) / DENSITY_NATS))], k);
      }
    }
    const grid = document.createElement("canvas");
    grid.width = grid.height = n;
    grid.getContext("2d").putImageData(img, 0, 0);
    const [x0, y0] = toPx(-E, E), [x1, y1] = toPx(E, -E);
    g.drawImage(grid, x0, y0, x1 - x0, y1 - y0);
  }

  function drawBase() {
    const g = base.getContext("2d"), w = base.width, h = base.height, px = w / (2 * S.extent);
    g.clearRect(0, 0, w, h);
    g.lineWidth = 1;
    g.strokeStyle = "#e4e4e4";
    for (const q of QUANTILES) {
      const t = invNormal(q);
      const [x] = toPx(t, 0), [, y] = toPx(0, t);
      g.beginPath(); g.moveTo(x, 0); g.lineTo(x, h); g.moveTo(0, y); g.lineTo(w, y); g.stroke();
    }
    const [ox, oy] = toPx(0, 0);
    g.strokeStyle = "#bbb";
    g.beginPath(); g.moveTo(ox, 0); g.lineTo(ox, h); g.moveTo(0, oy); g.lineTo(w, oy); g.stroke();
    if (info.prior_density) drawPriorDensity(g);
    for (let i = 0; i < S.uv.length; i++) {
      const [x, y] = toPx(...S.uv[i]);
      g.fillStyle = S.colourBy >= 0 ? ramp(factors[i][S.colourBy], S.colourBy)
        : labels ? colour(labels[i]) : "#1f77b4";
      g.globalAlpha = 0.55;
      g.fillRect(x - 1.5, y - 1.5, 3, 3);
    }
    g.globalAlpha = 1;
    g.setLineDash([5, 4]);
    g.strokeStyle = "#444";
    g.fillStyle = "#444";
    g.font = "11px system-ui";
    for (const [mass, r] of Object.entries(info.prior_radii)) {  // of the prior's mass in any plane through 0
      g.beginPath(); g.arc(ox, oy, r * px, 0, 2 * Math.PI); g.stroke();
      g.fillText(`${mass}%`, ox + r * px * Math.SQRT1_2 + 3, oy - r * px * Math.SQRT1_2 - 3);
    }
    g.setLineDash([]);
  }

  function drawOverlay() {
    const g = over.getContext("2d");
    g.clearRect(0, 0, over.width, over.height);
    const px = over.width / (2 * S.extent);
    if (S.selected) {                 // q(z|x) seen in the plane: the 2x2 covariance of the projection
      const { mean, std } = S.selected;
      const [b0, b1] = S.basis;
      const var2 = std.map(s => s * s);
      const a = dot(var2, b0.map(v => v * v)), c = dot(var2, b1.map(v => v * v));
      const b = dot(var2, b0.map((v, d) => v * b1[d]));
      const tr = (a + c) / 2, disc = Math.sqrt(((a - c) / 2) ** 2 + b * b);
      const l1 = tr + disc, l2 = Math.max(tr - disc, 0), angle = Math.atan2(l1 - a, b || 1e-300);
      const [x, y] = toPx(...planeOf(mean));
      g.strokeStyle = "#d62728"; g.lineWidth = 2;
      for (const k of [1, 2]) {
        g.beginPath();
        g.ellipse(x, y, k * Math.sqrt(l1) * px, k * Math.sqrt(l2) * px, -angle, 0, 2 * Math.PI);
        g.stroke();
      }
      g.fillStyle = "#d62728";
      for (const z of S.qSamples) {
        const [qx, qy] = toPx(...planeOf(z));
        g.fillRect(qx - 3, qy - 3, 6, 6);
      }
    }
    if (S.ends.length) {
      const pts = S.ends.map(z => toPx(...planeOf(z)));
      g.strokeStyle = "#111"; g.fillStyle = "#111"; g.lineWidth = 2;
      g.beginPath(); g.moveTo(...pts[0]); if (pts[1]) g.lineTo(...pts[1]); g.stroke();
      pts.forEach(([x, y], k) => {
        g.beginPath(); g.arc(x, y, 4, 0, 2 * Math.PI); g.fill();
        g.fillText("AB"[k], x + 6, y - 6);
      });
    }
    if (S.pointer) {
      const [x, y] = toPx(...planeOf(S.pointer));
      g.strokeStyle = "#000"; g.lineWidth = 1.5;
      g.beginPath(); g.arc(x, y, 6, 0, 2 * Math.PI); g.moveTo(x - 10, y); g.lineTo(x + 10, y);
      g.moveTo(x, y - 10); g.lineTo(x, y + 10); g.stroke();
    }
  }

  // ---- decoding under the pointer
  const zText = z => z.map(v => v.toFixed(5)).join(",");
  const tile = (cv, strip, k) => {
    const g = cv.getContext("2d");
    g.clearRect(0, 0, cv.width, cv.height);
    g.drawImage(strip, k * W, 0, W, H, 0, 0, W, H);
  };
  const showMean = latestOnly(async ({ z, t0 }) => {
    const strip = await backend.decode([z]);
    tile($("fz"), strip, 0);
    $("fz").dataset.z = zText(z);
    showDraws({ z });                 // after f(z): the draws never hold up the decoder mean
    if (t0 === null) return;          // not a pointer's: nothing to time
    requestAnimationFrame(() => {     // the new image is on screen at the next frame
      const lat = window.vaelabExplorer.latencies;  // every measurement, for scripts and tests
      lat.push(performance.now() - t0);
      if (lat.length > 20000) lat.splice(0, 10000);
      if (lat.length % 10 === 0) {
        const recent = lat.slice(-100);
        $("latency").textContent = `pointer → new f(z) on screen: median ${percentile(recent, 0.5).toFixed(1)} ` +
          `ms over the last ${recent.length} images`;
      }
    });
  });
  const showDraws = latestOnly(async ({ z }) => {
    // at the run's own value, no override: the run's observation model draws (a per-pixel σ stays per pixel)
    const sigma = info.sigma === null || S.sigma === info.sigma ? null : S.sigma;
    const strip = await backend.sample(z, sigma, S.seed, N_DRAWS);
    [...$("draws").children].forEach((cv, k) => tile(cv, strip, k));
    $("draws").dataset.z = zText(z);
    $("draws").dataset.sigma = sigma === null ? "" : sigma;
  });
  function pointAt(z, t0) {           // t0: the pointer event's time, or null when no pointer moved
    S.pointer = z.map(v => +v.toFixed(5));
    $("z-readout").textContent = "z = (" + S.pointer.map(v => v.toFixed(3)).join(", ") + ")";
    drawOverlay();
    showMean({ z: S.pointer, t0 });
  }
  over.addEventListener("pointermove", e => {
    const t0 = e.timeStamp || performance.now();
    pointAt(zAt(...eventUV(e)), t0);
  });
  over.addEventListener("wheel", e => {  // zoom about z = 0, so the circles stay centred
    e.preventDefault();
    S.extent = Math.min(info.limits.max_abs_z, Math.max(0.5, S.extent * Math.exp(e.deltaY * 0.001)));
    over.dataset.extent = S.extent;
    drawBase();
    drawOverlay();
  }, { passive: false });
  let down = null;
  over.addEventListener("pointerdown", e => { down = [e.clientX, e.clientY]; });
  over.addEventListener("pointerup", e => {   // a click (not a drag) sets a path end
    if (down && Math.hypot(e.clientX - down[0], e.clientY - down[1]) < 4) setEnd(zAt(...eventUV(e)));
    down = null;
  });

  // ---- σ of the draws
  if (info.sigma === null) {
    $("sigma-row").hidden = true;
    $("draws-caption").textContent = `draws from this run's ${info.likelihood} observation model`;
  } else {
    $("sigma-name").textContent = info.sigma_name || "σ";
    const setSigma = s => {
      S.sigma = s;
      $("sigma").value = Math.log10(Math.max(s, 1e-3));
      $("sigma-value").textContent = s.toPrecision(3);
      $("draws-caption").textContent = `f(z) + ${info.sigma_name || "σ"}·noise with ${info.sigma_name || "σ"} = ` +
        `${s.toPrecision(3)} (the run's: ${info.sigma.toPrecision(3)}${info.sigma_per_pixel ?
          ", its per-pixel σ averaged at the mean code" : ""}); the noise is the same for every value, ` +
        "so only its size changes, and f(z) never does";
    };
    setSigma(info.sigma);
    $("sigma").addEventListener("input", () => {
      setSigma(+(10 ** +$("sigma").value).toPrecision(4));
      if (S.pointer) showDraws({ z: S.pointer });
    });
    $("sigma-reset").addEventListener("click", () => { setSigma(info.sigma); if (S.pointer) showDraws({ z: S.pointer }); });
  }
  $("reseed").addEventListener("click", () => { S.seed += 1; if (S.pointer) showDraws({ z: S.pointer }); });

  // ---- plane controls for L > 2
  function buildSliders() {
    const box = $("sliders");
    box.textContent = "";
    const names = S.kind === "pca" ? info.basis.map((_, k) => `principal axis ${k + 1}`)
      : info.basis.map((_, k) => `z${k + 1}`);
    const rest = names.filter((_, k) => !S.axes.includes(k));
    S.others.forEach((value, k) => {
      const label = document.createElement("label");
      const input = Object.assign(document.createElement("input"),
        { type: "range", min: -4, max: 4, step: 0.01, value });
      const out = document.createElement("output");
      out.textContent = value.toFixed(2);
      input.addEventListener("input", () => {
        S.others[k] = +input.value;
        out.textContent = (+input.value).toFixed(2);
        if (S.pointer) pointAt(zAt(...planeOf(S.pointer)), performance.now());
      });
      label.append(rest[k] + " ", input, " ", out);
      box.appendChild(label);
    });
  }
  if (L > 2 && !backend.fixedPlane) {
    $("plane-controls").hidden = false;
    const nameAxes = () => {          // option values are indices; labels say which kind of axis
      for (const id of ["axis-1", "axis-2"]) {
        [...$(id).options].forEach((o, k) => { o.text = S.kind === "pca" ? `principal axis ${k + 1}` : `z${k + 1}`; });
      }
    };
    for (const id of ["axis-1", "axis-2"]) {
      for (let k = 0; k < L; k++) $(id).add(new Option("", k));
    }
    $("axis-2").value = 1;
    nameAxes();
    const replot = () => {
      const i = +$("axis-1").value, j = +$("axis-2").value;
      if (i === j) { showStatus("choose two different axes"); return; }
      showStatus("");
      S.kind = $("plane-kind").value; S.axes = [i, j];
      nameAxes();
      setPlane();
    };
    for (const id of ["plane-kind", "axis-1", "axis-2"]) $(id).addEventListener("change", replot);
    $("reset-sliders").addEventListener("click", () => setPlane());
  }

  // ---- colours and legend: the label, or one factor of variation on a ramp from its smallest to largest value
  const ranges = factors ? info.factor_names.map((_, k) => {
    const v = factors.map(f => f[k]);
    return [Math.min(...v), Math.max(...v)];
  }) : [];
  function ramp(value, k) {
    const [lo, hi] = ranges[k], t = hi > lo ? (value - lo) / (hi - lo) : 0.5;
    return `hsl(${250 - 200 * t} 75% ${35 + 20 * t}%)`;  // blue (lowest) to yellow-green (highest)
  }
  function legend() {
    const box = $("legend");
    box.textContent = "";
    const add = (c, text) => {
      const s = document.createElement("span");
      s.style.setProperty("--c", c);
      s.textContent = text;
      box.appendChild(s);
    };
    if (S.colourBy >= 0) {
      const [lo, hi] = ranges[S.colourBy];
      add(ramp(lo, S.colourBy), `${info.factor_names[S.colourBy]} = ${+lo.toFixed(3)}`);
      add(ramp((lo + hi) / 2, S.colourBy), `${+((lo + hi) / 2).toFixed(3)}`);
      add(ramp(hi, S.colourBy), `${+hi.toFixed(3)}`);
    } else if (labels) {
      for (const k of [...new Set(labels)].sort((a, b) => a - b)) {
        add(colour(k), info.labels && info.labels[k] !== undefined ? info.labels[k] : `label ${k}`);
      }
    }
  }
  if (factors && info.factor_names) {
    $("colour-row").hidden = false;
    $("colour-by").add(new Option(labels ? "label" : "nothing", -1));
    info.factor_names.forEach((name, k) => $("colour-by").add(new Option(`factor: ${name}`, k)));
    $("colour-by").addEventListener("change", () => { S.colourBy = +$("colour-by").value; legend(); drawBase(); });
  }
  legend();

  // ---- test images -> q(z|x)
  function fillStrip() {
    const box = $("strip");
    box.textContent = "";
    const n = Math.min(codes.length, backend.nImages || codes.length);
    for (let k = 0; k < Math.min(N_STRIP, n); k++) {
      const i = (S.offset + k) % n;
      const img = Object.assign(document.createElement("img"), { src: backend.imageURL(i), alt: `test image ${i}` });
      img.dataset.index = i;
      img.addEventListener("click", () => select(i, img));
      box.appendChild(img);
    }
  }
  $("more-images").addEventListener("click", () => { S.offset += N_STRIP; fillStrip(); });
  async function select(i, img) {
    document.querySelectorAll("#strip img.selected").forEach(el => el.classList.remove("selected"));
    img.classList.add("selected");
    const q = await backend.encode(i);
    S.selected = q; S.qSamples = [];
    $("posterior").hidden = false;
    const g = $("x-orig").getContext("2d");
    g.clearRect(0, 0, W, H);
    g.drawImage(img, 0, 0, W, H);
    tile($("x-recon"), await backend.decode([q.mean]), 0);
    $("posterior-text").textContent = `test image ${i}${q.label_name ? ` (${q.label_name})` : ""}\n` +
      `mean = (${q.mean.map(v => v.toFixed(3)).join(", ")})\nstd  = (${q.std.map(v => v.toFixed(3)).join(", ")})\n` +
      "ellipses: 1 and 2 standard deviations of q(z|x) projected on the plane";
    $("q-row").getContext("2d").clearRect(0, 0, $("q-row").width, $("q-row").height);
    drawOverlay();
  }
  $("q-sample").addEventListener("click", async () => {
    const { mean, std } = S.selected;
    S.qSamples = Array.from({ length: N_Q }, () => mean.map((m, d) => +(m + std[d] * randn()).toFixed(5)));
    drawOverlay();
    const strip = await backend.decode(S.qSamples);
    setRow($("q-row"), N_Q);          // sized once the images are here: a test or a script can wait for it
    $("q-row").getContext("2d").drawImage(strip, 0, 0);
  });
  $("set-a").addEventListener("click", () => { S.ends[0] = S.selected.mean; S.ends.length = Math.max(S.ends.length, 1); decodePath(); });
  $("set-b").addEventListener("click", () => {
    if (!S.ends[0]) S.ends[0] = S.pointer || info.centre;
    S.ends[1] = S.selected.mean; decodePath();
  });

  // ---- paths
  function setEnd(z) {
    S.ends = S.ends.length === 1 ? [S.ends[0], z] : [z];
    decodePath();
  }
  async function decodePath() {
    drawOverlay();
    if (S.ends.length < 2) {
      $("path-caption").textContent = "A is set: click a second point (B)";
      return;
    }
    const [a, b] = S.ends;
    const zs = Array.from({ length: N_PATH }, (_, k) => a.map((v, d) => +(v + (b[d] - v) * k / (N_PATH - 1)).toFixed(5)));
    const strip = await backend.decode(zs);
    setRow($("path-row"), N_PATH);
    $("path-row").getContext("2d").drawImage(strip, 0, 0);
    $("path-caption").textContent = `f(z) at ${N_PATH} evenly spaced points from A to B (|A − B| = ` +
      `${Math.hypot(...a.map((v, d) => v - b[d])).toFixed(2)}); click the plane to start a new path`;
  }

  setPlane();
  fillStrip();
  pointAt(zAt(0, 0), null);           // f at the plane's origin and its draws, before the pointer moves
  $("z-readout").textContent += " (the plane's origin: move the pointer over the plane)";
  document.body.dataset.ready = "1";
}

main().catch(err => { showStatus(`vaelab explore: ${err.message}`); console.error(err); });
