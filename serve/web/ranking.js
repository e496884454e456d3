// A ranking being built: answers picked best first (each may tie with the one above it), the rest not ranked.
// Every change keeps the state before it, so that Backspace undoes keyboard picks and drags alike.

export class Ranking {
  constructor(k) {
    this.ranked = []; // [{index, tie}] best first; tie: same place as the answer above
    this.unranked = Array.from({ length: k }, (_, i) => i);
    this.past = [];
  }

  snapshot() {
    this.past.push({ ranked: this.ranked.map((r) => ({ ...r })), unranked: [...this.unranked] });
  }

  // Move answer `index` to the end of the ranked list. False when it is ranked already.
  pick(index) {
    if (!this.unranked.includes(index)) return false;
    this.snapshot();
    this.unranked = this.unranked.filter((i) => i !== index);
    this.ranked.push({ index, tie: false });
    return true;
  }

  // Tie the last pick with the one before it. False when fewer than two are ranked or they are tied already.
  tieLast() {
    const last = this.ranked[this.ranked.length - 1];
    if (this.ranked.length < 2 || last.tie) return false;
    this.snapshot();
    this.ranked[this.ranked.length - 1] = { ...last, tie: true };
    return true;
  }

  // Tie (or untie) answer `index` with the one above it.
  toggleTie(index) {
    const position = this.ranked.findIndex((r) => r.index === index);
    if (position < 1) return false;
    this.snapshot();
    this.ranked[position] = { index, tie: !this.ranked[position].tie };
    return true;
  }

  // The order after a drag: the ranked and unranked answers as the lists now show them; ties kept where an answer
  // still has one above it.
  reorder(ranked, unranked) {
    this.snapshot();
    const ties = new Map(this.ranked.map((r) => [r.index, r.tie]));
    this.ranked = ranked.map((index, position) => ({ index, tie: position > 0 && Boolean(ties.get(index)) }));
    this.unranked = unranked;
  }

  undo() {
    const previous = this.past.pop();
    if (!previous) return false;
    this.ranked = previous.ranked;
    this.unranked = previous.unranked;
    return true;
  }

  // Tiers best first: [[2], [0, 3]] for "2, then 0 and 3 tied".
  tiers() {
    const tiers = [];
    for (const { index, tie } of this.ranked) {
      if (tie && tiers.length) tiers[tiers.length - 1].push(index);
      else tiers.push([index]);
    }
    return tiers;
  }

  // The body's `ranking`: one index per place, a list where answers tie ([2, [0, 3]]).
  payload() {
    return this.tiers().map((tier) => (tier.length === 1 ? tier[0] : tier));
  }

  // Submittable: two answers or more ranked, in at least two places or one tie.
  ready() {
    return this.ranked.length >= 2;
  }
}
