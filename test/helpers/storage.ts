import { MAX_PART_BYTES } from '../../src/services/storage/keys.js';

/** Each escape attempt, and why it is refused. */
export const BAD_PARTS: Array<[string, unknown]> = [
  ['parent', '..'],
  ['current', '.'],
  ['empty', ''],
  ['only dots', '...'],
  ['dots and a space', '.. '],
  ['absolute path', '/etc/passwd'],
  ['slash inside', 'a/b'],
  ['traversal inside', '../../etc'],
  ['backslash', 'a\\b'],
  ['windows traversal', '..\\..\\x'],
  ['NUL', 'a\u0000b'],
  ['newline', 'a\nb'],
  ['DEL', 'a\u007fb'],
  ['C1 control', 'a\u0085b'],
  ['bidi override', 'exe\u202Etxt.pdf'],
  ['zero-width space', 'a\u200Bb'],
  ['lone surrogate', 'a\uD800b'],
  ['fullwidth solidus (NFKC → /)', 'a\uFF0Fb'],
  ['fullwidth reverse solidus (NFKC → \\)', 'a\uFF3Cb'],
  ['fullwidth full stops (NFKC → ..)', '\uFF0E\uFF0E'],
  ['one-dot leaders (NFKC → ..)', '\u2024\u2024'],
  ['division slash', 'a\u2215b'],
  ['fraction slash', 'a\u2044b'],
  ['small reverse solidus', 'a\uFE68b'],
  ['not NFKC (ligature)', '\uFB01le.txt'],
  ['too long', 'x'.repeat(MAX_PART_BYTES + 1)],
  ['too long in bytes', 'é'.repeat(MAX_PART_BYTES / 2 + 1)],
  ['not a string', 42],
];

