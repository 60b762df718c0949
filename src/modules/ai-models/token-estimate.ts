/**
 * How many tokens a text is likely to cost, without the model's tokenizer (each provider's differs,
 * and most are not published): what a call reserves before it goes upstream, and what it is charged
 * when the provider reports no usage.
 *
 * A quarter of a token per UTF-16 unit (OpenAI's "4 characters a token" for English and code), plus
 * half a token per UTF-8 byte beyond the first of each character: byte-level tokenizers spend far
 * more tokens on a character outside ASCII. So a Cyrillic, Greek, Arabic or accented letter (2
 * bytes) counts ¾ of a token, a CJK, Devanagari or Thai character (3 bytes) 1¼, an emoji (4 bytes,
 * 2 units) 1½ — where 4 characters a token counted a CJK prompt 4–6 times too short, and a
 * reservation held that much too little.
 */
export function estimateTextTokens(text: string): number {
  if (text.length === 0) return 0;
  // Buffer.byteLength is native: no walk over the characters in JavaScript, whatever the prompt's size.
  return estimateTokensOfSize(text.length, Buffer.byteLength(text, 'utf8'));
}

/** estimateTextTokens of a text known only by its size (`chars` characters, `bytes` UTF-8 bytes): texts the database sums up. */
export function estimateTokensOfSize(chars: number, bytes: number): number {
  return chars / 4 + (bytes - chars) / 2;
}
