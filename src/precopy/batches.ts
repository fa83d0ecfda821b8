// Page-list helpers for the pre-copy rounds.

/** Merges two ascending page lists into one without duplicates. */
export function mergePages(a: Uint32Array, b: Uint32Array): Uint32Array {
  if (a.length === 0) return b;
  if (b.length === 0) return a;
  const out = new Uint32Array(a.length + b.length);
  let i = 0;
  let j = 0;
  let n = 0;
  while (i < a.length && j < b.length) {
    const x = a[i]!;
    const y = b[j]!;
    if (x < y) {
      out[n++] = x;
      i++;
    } else if (y < x) {
      out[n++] = y;
      j++;
    } else {
      out[n++] = x;
      i++;
      j++;
    }
  }
  while (i < a.length) out[n++] = a[i++]!;
  while (j < b.length) out[n++] = b[j++]!;
  return out.subarray(0, n);
}

/** Index of the first page that is not above the one before it, or -1: page lists go out in ascending order, each page once. */
export function firstOutOfOrder(pages: Uint32Array): number {
  for (let i = 1; i < pages.length; i++) if (pages[i]! <= pages[i - 1]!) return i;
  return -1;
}
