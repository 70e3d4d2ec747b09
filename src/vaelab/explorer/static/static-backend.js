// The explorer page's backend in an exported file: no server. The data sits in the page (#vaelab-data): an MLP
// decoder's weights, run here in plain JavaScript, or f(z) precomputed on a grid over the plane.
"use strict";

(function () {
  const D = JSON.parse(document.getElementById("vaelab-data").textContent);
  const info = D.info, [C, H, W] = info.shape, P = C * H * W;

  function floats(b64) {
    const bin = atob(b64), bytes = new Uint8Array(bin.length);
    for (let i = 0; i < bin.length; i++) bytes[i] = bin.charCodeAt(i);
    return new Float32Array(bytes.buffer);
  }

  function mulberry32(seed) {  // a small seeded generator: the same seed gives the same noise
    let a = seed >>> 0;
    return () => {
      a = (a + 0x6D2B79F5) >>> 0;
      let t = a;
      t = Math.imul(t ^ (t >>> 15), t | 1);
      t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
      return (((t ^ (t >>> 14)) >>> 0) + 0.5) / 4294967296;  // in (0, 1)
    };
  }

  // Pixel values in [0, 1] (one array of C*H*W, channel-major as torch stores it) -> a strip of images.
  function strip(images) {
    const canvas = document.createElement("canvas");
    canvas.width = W * images.length; canvas.height = H;
    const g = canvas.getContext("2d"), out = g.createImageData(W * images.length, H);
    images.forEach((x, k) => {
      for (let y = 0; y < H; y++) {
        for (let xx = 0; xx < W; xx++) {
          const o = 4 * (y * W * images.length + k * W + xx), p = y * W + xx;
          const value = c => Math.round(Math.min(1, Math.max(0, x[c * H * W + p])) * 255);
          if (C === 3) { out.data[o] = value(0); out.data[o + 1] = value(1); out.data[o + 2] = value(2); }
          else {
            let s = 0;
            for (let c = 0; c < C; c++) s += value(c);
            out.data[o] = out.data[o + 1] = out.data[o + 2] = C === 1 ? s : Math.round(s / C);
          }
          out.data[o + 3] = 255;
        }
      }
    });
    return createImageBitmap(out);
  }

  // ---- MLP decoder: Linear and ReLU layers, then the likelihood's mean, as vaelab computes them
  function mlpDecoder(spec) {
    const layers = spec.layers.map(l => ({ ...l, w: floats(l.weight), b: floats(l.bias) }));
    const forward = z => {
      let h = Float64Array.from(z);
      for (const { in: n, out: m, w, b, relu } of layers) {
        const o = new Float64Array(m);
        for (let j = 0; j < m; j++) {
          let s = b[j];
          const row = j * n;
          for (let i = 0; i < n; i++) s += w[row + i] * h[i];
          o[j] = relu && s < 0 ? 0 : s;
        }
        h = o;
      }
      return h;  // n_params blocks of C*H*W
    };
    const sigmoid = t => 1 / (1 + Math.exp(-t));
    const cbMean = eta => {  // the continuous Bernoulli's mean, as torch computes it from probabilities
      const p = Math.min(Math.max(sigmoid(eta), 1.1920929e-7), 1 - 1.1920929e-7);
      if (p > 0.499 && p < 0.501) { const x = p - 0.5; return 0.5 + (1 / 3 + 16 / 45 * x * x) * x; }
      return p / (2 * p - 1) + 1 / (Math.log1p(-p) - Math.log(p));
    };
    const meanOf = { "identity": t => t, "sigmoid": sigmoid, "cb-mean": cbMean };  // the likelihood's page_mean
    const mean = out => Float64Array.from(out.subarray(0, P), meanOf[spec.mean]);
    return {
      note: "Exported explorer: the decoder's weights are in this file and f(z) is computed in the page.",
      decode: z => mean(forward(z)),
      params: z => forward(z).subarray(0, P),  // the first parameter block (logits for the Bernoulli family)
    };
  }

  // ---- grid decoder: f(z) precomputed at n x n points of the plane, shown at the nearest one
  function gridDecoder(spec) {
    const n = spec.n, R = spec.extent;
    const img = new Image();
    const loaded = new Promise((ok, fail) => { img.onload = ok; img.onerror = () => fail(new Error("grid image")); });
    img.src = spec.sheet;
    let pixels = null;
    const ready = loaded.then(() => {
      const c = document.createElement("canvas");
      c.width = img.width; c.height = img.height;
      const g = c.getContext("2d");
      g.drawImage(img, 0, 0);
      pixels = g.getImageData(0, 0, img.width, img.height).data;
    });
    const b0 = info.basis[0], b1 = info.basis[1] || [0];  // one latent dimension: no vertical direction
    const dot = (a, b) => a.reduce((s, v, i) => s + v * b[i], 0);
    const near = t => Math.min(n - 1, Math.max(0, Math.round(t * (n - 1))));
    return {
      ready,
      note: `Exported explorer with a precomputed grid: this run's decoder is not a plain MLP, so f(z) was ` +
        `decoded at ${n} × ${n} points over [−${R.toFixed(2)}, ${R.toFixed(2)}]² of this plane (other directions at the mean code), ` +
        "and every image shown is the one at the nearest grid point.",
      decode: z => {
        const col = near((dot(z, b0) + R) / (2 * R)), row = near((R - dot(z, b1)) / (2 * R));
        const x = new Float64Array(P), stride = n * W * 4;
        for (let y = 0; y < H; y++) {
          for (let xx = 0; xx < W; xx++) {
            const o = (row * H + y) * stride + (col * W + xx) * 4;
            for (let c = 0; c < C; c++) x[c * H * W + y * W + xx] = pixels[o + (C === 3 ? c : 0)] / 255;
          }
        }
        return x;
      },
    };
  }

  const dec = D.decoder.kind === "mlp" ? mlpDecoder(D.decoder) : gridDecoder(D.decoder);

  // x ~ p(x|z) the way the likelihood's page_draw (D.draw) says; sigma (when given) replaces the run's σ or b
  function draw(z, sigma, rand) {
    const m = dec.decode(z), kind = D.draw, x = new Float64Array(P);
    const normal = () => Math.sqrt(-2 * Math.log(rand())) * Math.cos(2 * Math.PI * rand());
    for (let i = 0; i < P; i++) {
      if (kind === "normal") x[i] = m[i] + sigma * normal();
      else if (kind === "double-exponential") { const u = rand() - 0.5; x[i] = m[i] - sigma * Math.sign(u) * Math.log(1 - 2 * Math.abs(u)); }
      else if (kind === "coin-flip") x[i] = +(rand() < m[i]);
      else x[i] = m[i];
    }
    if (kind === "cb-inverse-cdf" && dec.params) {  // inverse CDF from the logits
      const eta = dec.params(z);
      for (let i = 0; i < P; i++) {
        const u = rand(), l = 1 / (1 + Math.exp(-eta[i]));
        x[i] = Math.abs(eta[i]) < 1e-3 ? u : Math.log1p(u * (2 * l - 1) / (1 - l)) / eta[i];
      }
    }
    return x;
  }

  window.vaelabBackend = {
    fixedPlane: D.decoder.kind !== "mlp",
    extent: D.decoder.kind === "mlp" ? null : D.decoder.extent,
    note: dec.note,
    nImages: D.images.length,
    info: async () => { await dec.ready; return info; },
    codes: async () => ({ codes: D.codes, labels: D.labels, factors: D.factors }),
    decode: async zs => strip(zs.map(dec.decode)),
    sample: async (z, sigma, seed, n) => {
      const rand = mulberry32(seed * 9973 + 1);
      return strip(Array.from({ length: n }, () => draw(z, sigma === null ? info.sigma : sigma, rand)));
    },
    encode: async i => D.posteriors[i],
    imageURL: i => D.images[i],
  };
})();
