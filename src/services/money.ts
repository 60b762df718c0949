/** Money on the wire: decimal strings, never floats. */
import { addCosts } from '../modules/ai-models/index.js';

/** A stored `numeric(_, 12)` as clients see it: `"12.500000000000"` → `"12.5"`. */
export function formatMoney(value: string): string {
  return addCosts(value);
}

const isZero = (value: string) => /^0(\.0*)?$/.test(value);

/** Whether `value` (a decimal string) is zero or less. */
export function nothingLeft(value: string): boolean {
  const sum = addCosts(value);
  return sum === '0' || sum.startsWith('-');
}

/** An account's credits: its balance and what calls in progress hold of it. */
export interface CreditsFigures {
  balance: string;
  reserved: string;
}

/** What an account's credits leave to spend. */
export const availableCredits = ({ balance, reserved }: CreditsFigures): string => addCosts(balance, `-${reserved}`);

/**
 * The 402 for an account short of credits, with its figures; the caller adds what needed them
 * (`; this call to … needs up to …`). The meter's words, and every early refusal's.
 */
export function notEnoughCreditsMessage(credits: CreditsFigures): string {
  const held = isZero(credits.reserved) ? '' : ` (${formatMoney(credits.reserved)} of it held for calls not yet settled)`;
  return `Not enough credits: balance ${formatMoney(credits.balance)}${held}, available ${formatMoney(availableCredits(credits))}`;
}

/** An API key's spend: charged so far, and held by its calls in progress. */
export interface KeySpendFigures {
  spent: string;
  reserved: string;
}

/** What a key's `max_budget` leaves to spend. */
export const budgetLeft = (maxBudget: string, spend: KeySpendFigures): string => addCosts(maxBudget, `-${spend.spent}`, `-${spend.reserved}`);

/** The 402 for an API key whose `max_budget` does not cover a call, with its figures; the caller adds what needed it. */
export function overBudgetMessage(maxBudget: string, spend: KeySpendFigures): string {
  const held = isZero(spend.reserved) ? '' : `, ${formatMoney(spend.reserved)} held for calls not yet settled`;
  return `API key budget exceeded: max_budget ${formatMoney(maxBudget)}, spent ${formatMoney(spend.spent)}${held}`;
}
