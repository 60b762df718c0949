import { pairSafeEnd } from '../../utils/text.js';
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

/** Text handed on before the end of a parse, and the sections whose text it completes. */
export interface DrainedText {
  text: string;
  spans: SectionSpan[];
}

/** Turns offsets back into sections, dropping the ones with no text (a heading followed by another). */
export function materialize({ format, text, spans }: ExtractedSpans): ExtractedDocument {
  return { format, text, sections: sectionsOf(spans, (start, end) => text.slice(start, end)) };
}

function sectionsOf(spans: SectionSpan[], slice: (start: number, end: number) => string): DocumentSection[] {
  const sections: DocumentSection[] = [];
  for (const [headingPath, start, end] of spans) {
    const body = slice(start, end);
    if (/\S/.test(body)) sections.push({ headingPath, text: body });
  }
  return sections;
}

/**
 * A document's text as it arrives in pieces (see TextBuilder.drain). With `onSections`, each span
 * becomes a section as soon as its text is there and is handed on (the finished document then
 * holds only the later ones); without, the spans wait for the whole text. `finish` joins the
 * pieces once, at the end.
 */
export class PieceAssembler {
  private pieces: string[] = [];
  /** Where each piece starts in the document's text. */
  private starts: number[] = [];
  private length = 0;
  private readonly heldSpans: SectionSpan[] = [];

  constructor(private readonly onSections?: (sections: DocumentSection[]) => void) {}

  add(piece: DrainedText): void {
    this.pieces.push(piece.text);
    this.starts.push(this.length);
    this.length += piece.text.length;
    if (!this.onSections) {
      for (const span of piece.spans) this.heldSpans.push(span);
      return;
    }
    const sections = sectionsOf(piece.spans, (start, end) => this.slice(start, end));
    if (sections.length > 0) this.onSections(sections);
  }

  /** The whole document from the parse's outcome (the text and spans that followed the pieces). */
  finish({ format, text, spans }: ExtractedSpans): ExtractedDocument {
    if (this.pieces.length === 0) return materialize({ format, text, spans });
    this.pieces.push(text);
    const whole = this.pieces.join('');
    this.pieces = [];
    this.starts = [];
    return materialize({ format, text: whole, spans: this.heldSpans.length > 0 ? [...this.heldSpans, ...spans] : spans });
  }

  private slice(start: number, end: number): string {
    // The last piece that starts at or before `start` (a section is usually in the newest pieces).
    let at = this.starts.length - 1;
    while (at > 0 && this.starts[at]! > start) at--;
    const parts: string[] = [];
    for (let i = at; i < this.pieces.length && this.starts[i]! < end; i++) {
      const from = this.starts[i]!;
      parts.push(this.pieces[i]!.slice(Math.max(0, start - from), Math.min(this.pieces[i]!.length, end - from)));
    }
    return parts.join('');
  }
}

export function tooMuchText(maxTextChars: number): DocumentRejectedError {
  return new DocumentRejectedError(
    `the document holds more than ${maxTextChars.toLocaleString('en-US')} characters of text (the limit per document); split it into smaller files`,
  );
}

/** Characters of a heading kept in the heading path (the text keeps it whole). */
export const MAX_HEADING_CHARS = 500;

/** Keeps the open headings: a heading closes every heading of its level or deeper. */
export class HeadingStack {
  private readonly open: { level: number; title: string }[] = [];

  enter(level: number, title: string): void {
    while (this.open.length > 0 && this.open.at(-1)!.level >= level) this.open.pop();
    // Every chunk under a heading stores its path again (heading_path): a heading as long as the
    // document would be stored once per chunk.
    const kept = title.length > MAX_HEADING_CHARS ? `${title.slice(0, pairSafeEnd(title, MAX_HEADING_CHARS))}…` : title;
    this.open.push({ level, title: kept });
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
  /** How many of `spans` the last `drain` handed over. */
  private spansDrained = 0;
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

  /**
   * A heading on its own paragraph, after `marker` (a list item's bullet) if given; false if the
   * title is blank and nothing was written.
   */
  heading(level: number, title: string, marker?: string): boolean {
    const clean = title.replace(/\s+/g, ' ').trim();
    if (clean.length === 0) return false;
    this.closeSection();
    this.headings.enter(level, clean);
    this.separate('paragraph');
    // The heading belongs to the text (what a reader sees) but not to a section's body: its words
    // travel with every chunk below it as the heading path (without the marker).
    if (this.length > 0) this.push(GAP_TEXT[this.gap]);
    this.push(marker === undefined ? clean : `${marker} ${clean}`);
    this.gap = 'paragraph';
    this.sectionPath = this.headings.path();
    return true;
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
   * handed over and no longer kept, with the sections closed meanwhile (all their text is in this
   * piece or an earlier one): a parser of a large document passes its text on as it goes, and the
   * reader can index each section as soon as it is whole. `finish` then returns the rest of the
   * text and the spans not yet handed over; spans count from the start of the first piece.
   */
  drain(minChars: number): DrainedText | null {
    if (this.pending < minChars || this.pending === 0) return null;
    const text = this.parts.join('');
    this.parts = [];
    this.pending = 0;
    const spans = this.spans.slice(this.spansDrained);
    this.spansDrained = this.spans.length;
    return { text, spans };
  }

  finish(): ExtractedSpans {
    this.closeSection();
    return { format: this.format, text: this.parts.join(''), spans: this.spans.slice(this.spansDrained) };
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
