import { Parser } from 'htmlparser2';

import type { ExtractedSpans, TextBuilder } from './document-builder.js';
import { DocumentRejectedError } from './types.js';

/** Elements whose content is not text a reader sees, or (nav) is the site's menu rather than the page. */
const HIDDEN = new Set(['script', 'style', 'noscript', 'template', 'svg', 'math', 'iframe', 'object', 'canvas', 'select', 'datalist', 'nav']);
const BLOCKS = new Set([
  'p', 'div', 'section', 'article', 'header', 'footer', 'main', 'aside', 'blockquote', 'pre', 'ul', 'ol', 'dl', 'dd',
  'table', 'thead', 'tbody', 'tfoot', 'figure', 'figcaption', 'form', 'fieldset', 'address', 'details', 'summary', 'hr',
  'caption', 'body', 'html',
]);
/**
 * What HTML allows in <head> ("in head" insertion mode): any other element, or text that is not
 * whitespace, ends the head, whose end tag (and <body>'s start tag) may be left out.
 */
const HEAD_CONTENT = new Set(['base', 'basefont', 'bgsound', 'link', 'meta', 'title', 'noscript', 'noframes', 'style', 'script', 'template']);
/**
 * How many elements may be open at once. htmlparser2 keeps the open elements in an array it
 * unshifts and searches from the front at every tag, so its work grows with the square of the
 * depth: 200,000 nested `<div>`s (1 MB) kept an extraction thread busy for its whole time limit
 * (KB_EXTRACT_TIMEOUT_SECONDS), to fail then. Browsers stop nesting at 512; real pages stay far
 * below. At this depth a 20 MB page of stray end tags (each searched for down the stack) parses in
 * seconds.
 */
export const MAX_HTML_DEPTH = 1024;

const LINES = new Set(['li', 'tr', 'dt', 'br', 'option']);
const CELLS = new Set(['td', 'th']);
const HEADINGS = new Set(['h1', 'h2', 'h3', 'h4', 'h5', 'h6']);
/** The elements whose end the reader acts on; only these are kept open in the parser. */
const STRUCTURE = new Set([...HIDDEN, ...BLOCKS, ...HEAD_CONTENT, ...LINES, ...CELLS, ...HEADINGS, 'head']);

/**
 * htmlparser2's parser, keeping open only the elements the reader acts on. Every other one (<b>,
 * <font>, <a>, <span>, an unknown element) changes no text, so it opens and closes at its start
 * tag, and its end tag does nothing. Without this, old pages that leave <font> unclosed by the
 * thousand nested past MAX_HTML_DEPTH and were refused, though the HTML spec nests them too (its
 * "Noah's Ark" clause bounds only the formatting elements re-opened in each new block, at three
 * alike; Blink shows elements past 512 deep beside the 512th). And htmlparser2 lets a <p> close
 * an open <p>, an <li> an <li>, a <td> a <td>, only when that sibling is the innermost element:
 * an inline one left open in it nested every paragraph in the one before. The HTML spec closes
 * the sibling through such elements (and re-opens formatting ones inside the new sibling).
 */
class TextParser extends Parser {
  protected override isVoidElement(name: string): boolean {
    return !STRUCTURE.has(name) || super.isVoidElement(name);
  }
}

/**
 * Reads HTML as text a person would read: scripts, styles and hidden parts dropped, whitespace
 * collapsed as a browser does (except in <pre>), blocks and list items on their own lines, table
 * cells separated by " | ", and h1–h6 as the headings of the sections. A SAX parser: fed in
 * pieces, it never holds a tree of the page.
 */
export class HtmlTextReader {
  private readonly parser: Parser;
  private hiddenDepth = 0;
  /**
   * Where the parser is with respect to <head>, whose content is hidden. htmlparser2 ends it only
   * at </head> or <body>, both optional: the head's end is followed here as a browser does.
   */
  private head: 'before' | 'in' | 'after' = 'before';
  private preDepth = 0;
  private heading: { level: number; text: string } | null = null;
  private cellsInRow = 0;
  /** Elements open in the parser: it reports every one it closes, void and implied ones too. */
  private depth = 0;

  constructor(private readonly out: TextBuilder) {
    this.parser = new TextParser(
      {
        onopentag: (name) => this.open(name),
        onclosetag: (name) => this.close(name),
        ontext: (text) => this.text(text),
      },
      // `<span/>` closes itself: pages written as XHTML repeat such tags by the thousand in one
      // element, and read as opening tags they nested past MAX_HTML_DEPTH and were refused.
      { decodeEntities: true, lowerCaseTags: true, recognizeSelfClosing: true },
    );
  }

  write(html: string): void {
    this.parser.write(html);
  }

  finish(): ExtractedSpans {
    this.parser.end();
    return this.out.finish();
  }

  private open(name: string): void {
    if (++this.depth > MAX_HTML_DEPTH) {
      throw new DocumentRejectedError(`the HTML nests elements more than ${MAX_HTML_DEPTH.toLocaleString('en-US')} deep (browsers stop at 512); it is damaged or built to exhaust the reader`);
    }
    if (this.hiddenDepth > 0) {
      this.hiddenDepth++;
      return;
    }
    if (name === 'head') {
      // A <head> once the head has ended is ignored (a browser shows what it holds).
      if (this.head === 'before') this.head = 'in';
      return;
    }
    // A <title> or <meta> before any <head> opens one implicitly, as in a browser.
    if (this.head !== 'after' && name !== 'html') this.head = HEAD_CONTENT.has(name) ? 'in' : 'after';
    if (HIDDEN.has(name) || (this.head === 'in' && HEAD_CONTENT.has(name))) {
      this.hiddenDepth++;
      return;
    }
    const level = HEADINGS.has(name) ? name[1] : undefined;
    if (level) this.heading = { level: Number(level), text: '' };
    else if (name === 'pre') this.preDepth++;
    if (name === 'tr') this.cellsInRow = 0;
    if (CELLS.has(name)) {
      if (this.cellsInRow++ > 0) {
        this.out.separate('space');
        this.bullet('|');
      }
    } else if (BLOCKS.has(name)) this.out.separate('paragraph');
    else if (LINES.has(name)) this.out.separate('line');
    if (name === 'li') this.bullet('-');
    if (name === 'img') this.out.separate('space');
  }

  /** A marker with a space either side that text around it does not double. */
  private bullet(marker: string): void {
    this.out.write(marker);
    this.out.separate('space');
  }

  private close(name: string): void {
    this.depth--;
    if (this.hiddenDepth > 0) {
      this.hiddenDepth--;
      return;
    }
    if (name === 'head') {
      this.head = 'after';
      return;
    }
    if (this.heading && HEADINGS.has(name)) {
      this.out.heading(this.heading.level, this.heading.text);
      this.heading = null;
      return;
    }
    if (name === 'pre') this.preDepth = Math.max(0, this.preDepth - 1);
    if (BLOCKS.has(name)) this.out.separate('paragraph');
    else if (LINES.has(name)) this.out.separate('line');
  }

  private text(raw: string): void {
    if (this.hiddenDepth > 0) return;
    if (this.head !== 'after') {
      // Whitespace may stand before and in the head; any other text is the body's.
      if (!/[^ \t\n\r\f]/.test(raw)) return;
      this.head = 'after';
    }
    if (this.heading) {
      this.heading.text += raw;
      return;
    }
    if (this.preDepth > 0) {
      const lines = raw.split('\n');
      lines.forEach((line, i) => {
        if (i > 0) this.out.separate('line');
        this.out.write(line);
      });
      return;
    }
    // Whitespace between words reads as one space; at a block's edge it reads as nothing.
    // (HTML's whitespace is these five characters: a no-break space is text.)
    if (/^[ \t\n\r\f]/.test(raw)) this.out.separate('space');
    const words = raw.replace(/[ \t\n\r\f]+/g, ' ').replace(/^ | $/g, '');
    this.out.write(words);
    if (words.length > 0 && /[ \t\n\r\f]$/.test(raw)) this.out.separate('space');
  }
}
