/**
 * `new Date(ms).toISOString()`, remembered for the last millisecond asked: Date's formatting costs
 * about a microsecond, and under load several calls in a row ask for the same millisecond (log
 * lines, usage rows settled together). Each caller keeps a formatter of its own, so that two
 * clocks read in turn (a call's start and end) do not evict each other.
 */
export function isoFormatter(): (ms: number) => string {
  let lastMs = Number.NaN;
  let lastIso = '';
  return (ms) => {
    if (ms !== lastMs) {
      lastIso = new Date(ms).toISOString();
      lastMs = ms;
    }
    return lastIso;
  };
}
