// Line charts as SVG, drawn from (unix time, value) points: enough for an operator to see a trend, no library.

const SVG = "http://www.w3.org/2000/svg";
const WIDTH = 360;
const HEIGHT = 160;
const PAD = { left: 44, right: 10, top: 10, bottom: 24 };

function element(name, attributes = {}) {
  const node = document.createElementNS(SVG, name);
  for (const [key, value] of Object.entries(attributes)) node.setAttribute(key, String(value));
  return node;
}

function label(value) {
  if (Math.abs(value) >= 1000) return `${(value / 1000).toFixed(1)}k`;
  return Number.isInteger(value) ? String(value) : value.toFixed(2);
}

function clock(seconds) {
  return new Date(seconds * 1000).toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" });
}

// A <figure> with the chart of `points` ([[t, v], ...]) titled `title`.
export function lineChart(title, points) {
  const figure = document.createElement("figure");
  figure.className = "chart-figure";
  const caption = document.createElement("figcaption");
  caption.textContent = `${title} (last: ${label(points[points.length - 1][1])})`;
  const svg = element("svg", { viewBox: `0 0 ${WIDTH} ${HEIGHT}`, class: "chart", role: "img", "aria-label": title });
  const times = points.map((p) => p[0]);
  const values = points.map((p) => p[1]);
  const [t0, t1] = [Math.min(...times), Math.max(...times)];
  let [v0, v1] = [Math.min(...values), Math.max(...values)];
  if (v0 === v1) [v0, v1] = [v0 - 1, v1 + 1];
  const x = (t) => PAD.left + ((t - t0) / (t1 - t0 || 1)) * (WIDTH - PAD.left - PAD.right);
  const y = (v) => HEIGHT - PAD.bottom - ((v - v0) / (v1 - v0)) * (HEIGHT - PAD.top - PAD.bottom);
  svg.append(
    element("line", { class: "axis", x1: PAD.left, y1: HEIGHT - PAD.bottom, x2: WIDTH - PAD.right, y2: HEIGHT - PAD.bottom }),
    element("line", { class: "axis", x1: PAD.left, y1: PAD.top, x2: PAD.left, y2: HEIGHT - PAD.bottom }),
  );
  const path = points.map(([t, v], i) => `${i ? "L" : "M"}${x(t).toFixed(1)},${y(v).toFixed(1)}`).join(" ");
  svg.append(element("path", { class: "line", d: path }));
  if (points.length < 40) {
    for (const [t, v] of points) svg.append(element("circle", { cx: x(t), cy: y(v), r: 2.5, fill: "currentColor" }));
  }
  const texts = [
    [PAD.left - 4, y(v1) + 4, "end", label(v1)],
    [PAD.left - 4, y(v0), "end", label(v0)],
    [PAD.left, HEIGHT - 6, "start", clock(t0)],
    [WIDTH - PAD.right, HEIGHT - 6, "end", clock(t1)],
  ];
  for (const [tx, ty, anchor, text] of texts) {
    const node = element("text", { x: tx, y: ty, "text-anchor": anchor });
    node.textContent = text;
    svg.append(node);
  }
  figure.append(caption, svg);
  return figure;
}
