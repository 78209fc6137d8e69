// The RAST column's tokens: one span per token, shaded by KL(P_RAST ‖ P_base) at its position,
// underlined above a threshold, with a tooltip (hover or keyboard focus) of its log-probs and of
// the tokens the shift promotes and suppresses there. Arrow keys, Home and End move between
// tokens (one tab stop for the column); Escape closes the tooltip.

export const KL_SCALE = 1.0; // nats at which the shade is full

export function fmt(x, digits = 3, sign = false) { // a real minus sign; null is a log-prob of −∞
  if (x === null || x === undefined) return "−∞";
  return (x < 0 ? "−" : sign ? "+" : "") + Math.abs(x).toFixed(digits);
}

function tipLine(label, value) {
  const row = document.createElement("div");
  row.className = "tip-row";
  const k = document.createElement("span");
  k.className = "tip-key";
  k.textContent = label;
  const v = document.createElement("span");
  v.textContent = value;
  row.append(k, v);
  return row;
}

export class ShiftView {
  constructor(out, tip) {
    this.out = out;
    this.tip = tip;
    this.shift = null;
    const tokenOf = (event) => (event.target.closest ? event.target.closest(".tok") : null);
    for (const on of ["mouseover", "focusin"]) {
      out.addEventListener(on, (event) => {
        const span = tokenOf(event);
        if (span && this.shift) this.show(span);
      });
    }
    out.addEventListener("mouseout", (event) => { // back to the focused token's tip, if one is focused
      const span = tokenOf(event);
      if (!span) return;
      const focused = document.activeElement;
      if (focused && focused !== span && out.contains(focused) && focused.classList.contains("tok")) this.show(focused);
      else if (focused !== span) this.hide(span);
    });
    out.addEventListener("focusout", (event) => {
      const span = tokenOf(event);
      if (span) this.hide(span);
    });
    out.addEventListener("keydown", (event) => this.keys(event));
  }

  clear() {
    this.shift = null;
    this.hide();
  }

  // Replaces the column's streamed text by its tokens (the text itself is unchanged: a stop
  // token such as eos is shown by CSS from data-label, not as text).
  render(text, shift, threshold) {
    this.shift = shift;
    this.out.replaceChildren();
    let pos = 0;
    shift.tokens.forEach((tok, i) => {
      const span = document.createElement("span");
      span.className = "tok";
      if (tok.length && text.startsWith(tok, pos)) {
        span.textContent = tok;
        pos += tok.length;
        if (tok === "\n") span.classList.add("nl");
      } else {
        span.classList.add("special");
        span.dataset.label = tok;
      }
      const kl = shift.kl[i];
      Object.assign(span.dataset, {i: String(i), token: tok, kl: String(kl),
        logpBase: String(shift.logprob_base[i]), logpRast: String(shift.logprob_rast[i])});
      span.style.setProperty("--shade", String(Math.min(1, kl / KL_SCALE)));
      span.tabIndex = i === 0 ? 0 : -1;
      span.setAttribute("aria-label", `${JSON.stringify(tok)}, KL ${fmt(kl)}`);
      this.out.append(span);
    });
    if (pos < text.length) this.out.append(text.slice(pos));
    this.mark(threshold);
  }

  mark(threshold) {
    this.out.querySelectorAll(".tok").forEach((el) => el.classList.toggle("above", Number(el.dataset.kl) > threshold));
  }

  show(span) {
    const {shift, tip} = this;
    const i = Number(span.dataset.i);
    const tops = (list) => list.map(([t, v]) => `${JSON.stringify(t)} ${fmt(v, 2, true)}`).join("  ");
    const head = document.createElement("div");
    head.className = "tip-head";
    head.textContent = `token ${JSON.stringify(shift.tokens[i])} (step ${i})`;
    tip.replaceChildren(head,
      tipLine("KL(RAST‖base)", fmt(shift.kl[i], 4)),
      tipLine("log p base", fmt(shift.logprob_base[i])),
      tipLine("log p RAST", fmt(shift.logprob_rast[i])),
      tipLine("promoted", tops(shift.promoted[i])),
      tipLine("suppressed", tops(shift.suppressed[i])));
    tip.hidden = false;
    const r = span.getBoundingClientRect();
    const width = document.documentElement.clientWidth;
    tip.style.left = `${Math.max(4, Math.min(window.scrollX + r.left, window.scrollX + width - tip.offsetWidth - 4))}px`;
    // below the column's text (never over it) when the window has room there, else above it
    const box = this.out.getBoundingClientRect();
    const below = document.documentElement.clientHeight - box.bottom - 6 >= tip.offsetHeight ||
      box.top < tip.offsetHeight + 6;
    tip.style.top = `${window.scrollY + (below ? box.bottom + 6 : box.top - tip.offsetHeight - 6)}px`;
    span.setAttribute("aria-describedby", tip.id);
    tip.dataset.i = String(i);
  }

  hide(span) {
    this.tip.hidden = true;
    if (span) span.removeAttribute("aria-describedby");
  }

  keys(event) {
    const spans = [...this.out.querySelectorAll(".tok")];
    const at = spans.indexOf(document.activeElement);
    if (at < 0) return;
    if (event.key === "Escape") {
      this.hide(spans[at]);
      return;
    }
    const moves = {ArrowRight: at + 1, ArrowDown: at + 1, ArrowLeft: at - 1, ArrowUp: at - 1, Home: 0,
      End: spans.length - 1};
    if (!(event.key in moves)) return;
    event.preventDefault();
    const next = spans[Math.max(0, Math.min(spans.length - 1, moves[event.key]))];
    spans[at].tabIndex = -1;
    next.tabIndex = 0;
    next.focus();
  }
}
