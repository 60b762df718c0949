import { type ExtractedSpans, HeadingStack, type SectionSpan } from './document-builder.js';

const ATX_HEADING = /^ {0,3}(#{1,6})(?:[ \t]+(.*?))?(?:[ \t]+#+)?[ \t]*$/;
const SETEXT_UNDERLINE = /^ {0,3}(=+|-+)[ \t]*$/;
const FENCE = /^ {0,3}(`{3,}|~{3,})/;
const FENCE_CLOSE = /^ {0,3}(`{3,}|~{3,})[ \t]*$/;

/** A heading's words without the Markdown around them: `[Install](#install)` reads "Install". */
function headingTitle(raw: string): string {
  return raw
    // No `[` inside the brackets nor `(` inside the parentheses: each match attempt stops at the
    // next one, so a heading of many `[` or `[a](` is read in linear time (it was quadratic, on
    // the main thread: 100,000 `[` held the event loop for 9 s).
    .replace(/!?\[([^[\]]*)\]\([^()]*\)/g, '$1')
    .replace(/[*_`]+/g, '')
    .replace(/\s+/g, ' ')
    .trim();
}

/** Lines read between looks at the clock: a look costs more than a line. */
const LINES_PER_CLOCK_LOOK = 1024;

/**
 * Sections of a Markdown text under its headings (ATX `#` and setext underlines), by one pass over
 * the lines: no syntax tree, so a 50 MB file costs its string and the spans. Fenced code is body
 * (a `# comment` in a shell block is not a heading), and so is a leading YAML front matter.
 * The text stays the Markdown as written; sections are the spans between heading lines.
 *
 * Read in slices of `sliceMs` with the event loop let in between: it runs on the main thread, and
 * a file of short headings took ~200 ms a MB in one go (a 20 MB upload, the default
 * KB_MAX_FILE_BYTES, held every request and run stream for seconds).
 */
export async function markdownSpans(text: string, sliceMs = 20): Promise<ExtractedSpans> {
  const headings = new HeadingStack();
  const spans: SectionSpan[] = [];
  let path: string[] = [];
  let sectionStart = 0;
  let fence: string | null = null;
  let previousLineStart = -1;
  /** The previous line was ordinary text (not blank, a heading or a fence): it may be underlined. */
  let previousLinePlain = false;
  let previousLineBlank = true;
  let lineBeforePreviousBlank = true;

  const openSection = (level: number, title: string, headingStart: number, bodyStart: number) => {
    if (headingStart > sectionStart) spans.push([path, sectionStart, headingStart]);
    headings.enter(level, title);
    path = headings.path();
    sectionStart = bodyStart;
  };

  let position = 0;
  const frontMatter = /^---\r?\n[\s\S]*?\r?\n(---|\.\.\.)[ \t]*(\r?\n|$)/.exec(text);
  if (frontMatter) position = frontMatter[0].length;

  let sliceEnd = performance.now() + sliceMs;
  for (let lines = 1; position < text.length; lines++) {
    if (lines % LINES_PER_CLOCK_LOOK === 0 && performance.now() >= sliceEnd) {
      await new Promise((resolve) => setImmediate(resolve));
      sliceEnd = performance.now() + sliceMs;
    }
    const newline = text.indexOf('\n', position);
    const lineEnd = newline < 0 ? text.length : newline;
    const next = newline < 0 ? text.length : newline + 1;
    const line = text.slice(position, lineEnd).replace(/\r$/, '');
    const blank = line.trim().length === 0;
    let plain = false;

    if (fence !== null) {
      const close = FENCE_CLOSE.exec(line)?.[1];
      if (close && close[0] === fence[0] && close.length >= fence.length) fence = null;
    } else {
      const fenceOpen = FENCE.exec(line);
      const atx = fenceOpen ? null : ATX_HEADING.exec(line);
      const setext = fenceOpen || atx ? null : SETEXT_UNDERLINE.exec(line);
      if (fenceOpen) {
        fence = fenceOpen[1]!;
      } else if (atx) {
        const title = headingTitle(atx[2] ?? '');
        if (title) openSection(atx[1]!.length, title, position, next);
      } else if (setext && previousLinePlain && lineBeforePreviousBlank) {
        // One line of text underlined with === or --- is a heading (a --- after a blank line is a rule).
        const title = headingTitle(text.slice(previousLineStart, position).trim());
        if (title) openSection(setext[1]!.startsWith('=') ? 1 : 2, title, previousLineStart, next);
      } else {
        plain = !blank;
      }
    }

    lineBeforePreviousBlank = previousLineBlank;
    previousLineBlank = blank;
    previousLinePlain = plain;
    previousLineStart = position;
    position = next;
  }
  if (text.length > sectionStart) spans.push([path, sectionStart, text.length]);
  return { format: 'markdown', text, spans };
}
