/** Money on the wire: decimal strings, never floats. */
import { addCosts } from '../modules/ai-models/index.js';

/** A stored `numeric(_, 12)` as clients see it: `"12.500000000000"` → `"12.5"`. */
export function formatMoney(value: string): string {
  return addCosts(value);
}
