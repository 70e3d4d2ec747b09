// The explorer page's backend when a vaelab server serves it: every call is one GET to its API (docs/explore.md).
"use strict";

(function () {
  async function get(url) {
    const r = await fetch(url);
    if (!r.ok) throw new Error(`${url.split("?")[0]}: ${(await r.text()).trim()}`);
    return r;
  }
  const getJSON = async url => (await get(url)).json();
  const getStrip = async url => createImageBitmap(await (await get(url)).blob(),
                                                  { colorSpaceConversion: "none", premultiplyAlpha: "none" });
  const zText = z => z.map(v => v.toFixed(5)).join(",");

  window.vaelabBackend = {
    fixedPlane: false,
    note: null,
    info: () => getJSON("api/info"),
    codes: () => getJSON("api/codes"),
    decode: zs => getStrip("api/decode?z=" + zs.map(zText).join(";")),
    sample: (z, sigma, seed, n) => getStrip(`api/sample?z=${zText(z)}&seed=${seed}&n=${n}` +
                                            (sigma === null ? "" : `&sigma=${sigma}`)),
    encode: i => getJSON(`api/encode?index=${i}`),
    imageURL: i => `api/image?index=${i}`,
  };
})();
