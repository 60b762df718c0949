import { type DocumentFormat, DocumentRejectedError, type DocumentSection, type ExtractedDocument } from './types.js';

/**
 * A section as a span of the document's text: extractors build the text once and describe the
 * sections by offsets, so a section is a slice of the same string (V8 shares the characters of a
 * slice) rather than a second copy; and a worker posts offsets, not the text twice.
 */
export type SectionSpan = [headingPath: string[], start: number, end: number];

export interface ExtractedSpans {
  format: DocumentFormat;
  text: string;
  spans: SectionSpan[];
}

/** Turns offsets back into sections, dropping the ones with no text (a heading followed by another). */
export function materialize({ format, text, spans }: ExtractedSpans): ExtractedDocument {
  const sections: DocumentSection[] = [];
  for (const [headingPath, start, end] of spans) {
    const body = text.slice(start, end);
    if (/\S/.test(body)) sections.push({ headingPath, text: body });
  }
  return { format, text, sections };
}

export function tooMuchText(maxTextChars: number): DocumentRejectedError {
  return new DocumentRejectedError(
    `the document holds more than ${maxTextChars.toLocaleString('en-US')} characters of text (the limit per document); split it into smaller files`,
  );
}

/** Keeps the open headings: a heading closes every heading of its level or deeper. */
export class HeadingStack {
  private readonly open: { level: number; title: string }[] = [];

  enter(level: number, title: string): void {
    while (this.open.length > 0 && this.open.at(-1)!.level >= level) this.open.pop();
    this.open.push({ level, title });
  }

  /** Closes the headings deeper than `level` (0: all). */
  rise(level: number): void {
    while (this.open.length > 0 && this.open.at(-1)!.level > level) this.open.pop();
  }

  path(): string[] {
    return this.open.map((heading) => heading.title);
  }
}

type Gap = 'none' | 'space' | 'line' | 'paragraph';
const GAP_TEXT: Record<Gap, string> = { none: '', space: ' ', line: '\n', paragraph: '\n\n' };
const GAP_RANK: Record<Gap, number> = { none: 0, space: 1, line: 2, paragraph: 3 };

/**
 * Writes readable text from a parse that emits inline text, breaks and headings (HTML, DOCX via
 * HTML, PDF, CSV, JSON): collapses the breaks asked for between two pieces of text into the
 * strongest one, puts each heading on its own paragraph, and records the sections' spans.
 */
export class TextBuilder {
  private parts: string[] = [];
  private length = 0;
  /** Characters of `parts` (the text written since the last `drain`). */
  private pending = 0;
  private gap: Gap = 'none';
  private readonly headings = new HeadingStack();
  private readonly spans: SectionSpan[] = [];
  private sectionPath: string[] = [];
  private sectionStart = -1;

  constructor(
    private readonly format: DocumentFormat,
    private readonly maxTextChars: number,
  ) {}

  /** Asks for at least this much separation before the next text. */
  separate(gap: Gap): void {
    if (GAP_RANK[gap] > GAP_RANK[this.gap]) this.gap = gap;
  }

  /** Text as it reads; a break asked for before it is written first (never at the very start). */
  write(text: string): void {
    if (text.length === 0) return;
    if (this.length > 0 && this.gap !== 'none') this.push(GAP_TEXT[this.gap]);
    this.gap = 'none';
    if (this.sectionStart < 0) this.sectionStart = this.length;
    this.push(text);
  }

  heading(level: number, title: string): void {
    const clean = title.replace(/\s+/g, ' ').trim();
    if (clean.length === 0) return;
    this.closeSection();
    this.headings.enter(level, clean);
    this.separate('paragraph');
    // The heading belongs to the text (what a reader sees) but not to a section's body: its words
    // travel with every chunk below it as the heading path.
    if (this.length > 0) this.push(GAP_TEXT[this.gap]);
    this.push(clean);
    this.gap = 'paragraph';
    this.sectionPath = this.headings.path();
  }

  /** What follows belongs under the headings of `level` and above only (0: under none). */
  rise(level: number): void {
    this.headings.rise(level);
    const path = this.headings.path();
    if (path.length === this.sectionPath.length) return;
    this.closeSection();
    this.sectionPath = path;
    this.separate('paragraph');
  }

  /**
   * The text written since the last call, once there is at least `minChars` of it (else null),
   * handed over and no longer kept: a parser of a large document passes its text on as it goes.
   * `finish` then returns the rest; the spans count from the start of the first piece.
   */
  drain(minChars: number): string | null {
    if (this.pending < minChars || this.pending === 0) return null;
    const piece = this.parts.join('');
    this.parts = [];
    this.pending = 0;
    return piece;
  }

  finish(): ExtractedSpans {
    this.closeSection();
    return { format: this.format, text: this.parts.join(''), spans: this.spans };
  }

  private closeSection(): void {
    if (this.sectionStart >= 0) this.spans.push([this.sectionPath, this.sectionStart, this.length]);
    this.sectionStart = -1;
  }

  private push(text: string): void {
    this.length += text.length;
    if (this.length > this.maxTextChars) throw tooMuchText(this.maxTextChars);
    this.parts.push(text);
    this.pending += text.length;
  }
}
