import { type Handler, Parser, type ParserOptions } from 'htmlparser2';

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
/** Whether an element's edges break the text (a paragraph or a line). */
const breaks = (name: string) => BLOCKS.has(name) || LINES.has(name);
/** The elements whose end the reader acts on; only these are kept open in the parser. */
const STRUCTURE = new Set([...HIDDEN, ...BLOCKS, ...HEAD_CONTENT, ...LINES, ...CELLS, ...HEADINGS, 'head']);

/**
 * HTML's "special" elements among those the reader keeps open: an <li>, <dd> or <dt> start tag
 * looks for the item to close through none of them but <address>, <div> and <p> (the <li> start
 * tag's loop in the tree construction).
 */
const SPECIAL = new Set([...BLOCKS, ...HEAD_CONTENT, ...LINES, ...CELLS, ...HEADINGS, 'head', 'script', 'style', 'noscript', 'template', 'iframe', 'object', 'select', 'nav']);
for (const through of ['address', 'div', 'p', 'option']) SPECIAL.delete(through);
/** What ends a cell's or a row's search: its table (or a template), or (for a cell) its row. */
const TABLE_SCOPE = ['html', 'table', 'template', 'tbody', 'thead', 'tfoot'];

/**
 * A start tag that closes an open sibling (with everything open in it) unless an element at
 * which the search stops is open nearer. The open ones of each kind are kept as their depths, so
 * the test costs the same at any depth (a walk down the parser's stack at every such tag let a
 * 20 MB page of `<li></li>` under 1,000 open <div>s hold a thread for minutes).
 */
class SiblingClose {
  private readonly siblings: number[] = [];
  private readonly stops: number[] = [];

  constructor(
    private readonly closes: ReadonlySet<string>,
    private readonly stopsAt: ReadonlySet<string>,
  ) {}

  opened(name: string, depth: number): void {
    if (this.closes.has(name)) this.siblings.push(depth);
    else if (this.stopsAt.has(name)) this.stops.push(depth);
  }

  closed(depth: number): void {
    if (this.siblings.at(-1) === depth) this.siblings.pop();
    else if (this.stops.at(-1) === depth) this.stops.pop();
  }

  /** The depth of the sibling to close, if any. */
  sibling(): number | undefined {
    const sibling = this.siblings.at(-1);
    return sibling !== undefined && sibling > (this.stops.at(-1) ?? 0) ? sibling : undefined;
  }
}

/** What TextParser uses of htmlparser2's parser that its types keep private. */
interface ParserInternals {
  readTagName(start: number, endIndex: number): string;
  popElement(implied: boolean): void;
}

/**
 * htmlparser2's parser, keeping open only the elements the reader acts on. Every other one (<b>,
 * <font>, <a>, <span>, an unknown element) changes no text, so it opens and closes at its start
 * tag, and its end tag does nothing. Without this, old pages that leave <font> unclosed by the
 * thousand nested past MAX_HTML_DEPTH and were refused, though the HTML spec nests them too (its
 * "Noah's Ark" clause bounds only the formatting elements re-opened in each new block, at three
 * alike; Blink shows elements past 512 deep beside the 512th).
 *
 * And htmlparser2 lets an <li> close an open <li>, a <dd> a <dd>, a <td> a <td>, a <tr> a <tr>,
 * only when that sibling is the innermost element: `<li><p>x<li>y` nested each item in the one
 * before, past MAX_HTML_DEPTH in a long list (refused). The HTML spec closes the sibling through
 * the blocks left open in it (<p>, <div>; a cell or row through anything in it), so this parser
 * does that before opening such an element.
 */
class TextParser extends Parser {
  /** Each rule by the elements it closes a sibling of. */
  private readonly rules: Map<string, SiblingClose>;
  /** Each rule once (two names may share one), to tell of every element opened and closed. */
  private readonly closers: SiblingClose[];
  /** Elements open in the parser (its stack is private), as the depths SiblingClose records. */
  private open = 0;

  constructor(handler: Partial<Handler>, options: ParserOptions) {
    const { onopentagname, onclosetag } = handler;
    super(
      {
        ...handler,
        // The parser reports each element it puts on its stack by name, and each it takes off.
        onopentagname: (name) => {
          if (!this.isVoidElement(name)) {
            this.open++;
            for (const rule of this.closers) rule.opened(name, this.open);
          }
          onopentagname?.(name);
        },
        onclosetag: (name, implied) => {
          if (!this.isVoidElement(name)) {
            for (const rule of this.closers) rule.closed(this.open);
            this.open--;
          }
          onclosetag?.(name, implied);
        },
      },
      options,
    );
    const item = new SiblingClose(new Set(['li']), new Set([...SPECIAL].filter((name) => name !== 'li')));
    const definition = new SiblingClose(new Set(['dd', 'dt']), new Set([...SPECIAL].filter((name) => name !== 'dd' && name !== 'dt')));
    const cell = new SiblingClose(CELLS, new Set([...TABLE_SCOPE, 'tr']));
    const row = new SiblingClose(new Set(['tr']), new Set(TABLE_SCOPE));
    this.rules = new Map([['li', item], ['dd', definition], ['dt', definition], ['td', cell], ['th', cell], ['tr', row]]);
    this.closers = [item, definition, cell, row];
  }

  protected override isVoidElement(name: string): boolean {
    return !STRUCTURE.has(name) || super.isVoidElement(name);
  }

  override onopentagname(start: number, endIndex: number): void {
    // readTagName and popElement are private to htmlparser2 (pinned in package.json); a change
    // there fails the tests of `<li><p>` lists.
    const parser = this as unknown as ParserInternals;
    const sibling = this.rules.get(parser.readTagName(start, endIndex))?.sibling();
    if (sibling !== undefined) {
      // Elements above the sibling close first (the parser reports each), then the sibling.
      for (let depth = this.open; depth >= sibling; depth--) parser.popElement(true);
    }
    super.onopentagname(start, endIndex);
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
  /**
   * Table cells open: a browser shows a row's cells side by side whatever blocks they hold, so in
   * a cell a block or line break reads as a space (`<td><p>a</p><td><p>b` as "a | b", as DOCX
   * tables come from mammoth) rather than splitting the row across paragraphs.
   */
  private openCells = 0;
  /** Elements open in the parser: it reports every one it closes, void and implied ones too. */
  private depth = 0;
  /**
   * The open list item's bullet, until the item's first text: it is written with that text, so
   * the blocks an item opens before its words (`<li><p>`, as Markdown renderers and CMSs write
   * lists) leave the bullet on their line ("- first") rather than alone above it. An item with no
   * text shows no bullet.
   */
  private marker: string | null = null;
  /**
   * The depths of the blocks (and line breaks) the open item opened before its first text: they
   * break neither from the bullet nor, at their end, more than the item's own line does.
   */
  private leads: number[] = [];

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
    if (name === 'li') {
      // An outer item with no text yet (`<li><ul><li>`) keeps no bullet of its own.
      this.marker = null;
      this.leads = [];
    }
    if (CELLS.has(name)) {
      this.openCells++;
      if (this.cellsInRow++ > 0) {
        this.out.separate('space');
        this.bullet('|');
      }
    } else if (this.marker !== null && breaks(name)) this.leads.push(this.depth);
    else this.breakFor(name);
    if (name === 'li') this.marker = '-';
    if (name === 'img') this.out.separate('space');
  }

  /** A marker with a space either side that text around it does not double. */
  private bullet(marker: string): void {
    this.emit(marker);
    this.out.separate('space');
  }

  /** Text as it reads, after the open list item's bullet if this is the item's first. */
  private emit(text: string): void {
    if (text.length === 0) return;
    if (this.marker !== null) {
      this.out.write(this.marker);
      this.out.separate('space');
      this.marker = null;
    }
    this.out.write(text);
  }

  private close(name: string): void {
    const depth = this.depth--;
    if (this.hiddenDepth > 0) {
      this.hiddenDepth--;
      return;
    }
    if (name === 'head') {
      this.head = 'after';
      return;
    }
    if (this.heading && HEADINGS.has(name)) {
      // A heading that is an item's first content carries the item's bullet on its line.
      if (this.out.heading(this.heading.level, this.heading.text, this.marker ?? undefined)) this.marker = null;
      this.heading = null;
      return;
    }
    if (name === 'pre') this.preDepth = Math.max(0, this.preDepth - 1);
    if (CELLS.has(name)) this.openCells = Math.max(0, this.openCells - 1);
    else if (this.leads.at(-1) === depth) {
      this.leads.pop();
      // The item's first block ends as the item's bare text would: at a line, before anything else in it.
      if (this.marker === null) this.out.separate(this.openCells > 0 ? 'space' : 'line');
    } else this.breakFor(name);
    if (name === 'li') {
      this.marker = null;
      this.leads = [];
    }
  }

  /** The break a block or line element's edge makes (a space in a table cell). */
  private breakFor(name: string): void {
    const gap = BLOCKS.has(name) ? 'paragraph' : LINES.has(name) ? 'line' : undefined;
    if (gap) this.out.separate(this.openCells > 0 ? 'space' : gap);
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
        this.emit(line);
      });
      return;
    }
    // Whitespace between words reads as one space; at a block's edge it reads as nothing.
    // (HTML's whitespace is these five characters: a no-break space is text.)
    if (/^[ \t\n\r\f]/.test(raw)) this.out.separate('space');
    const words = raw.replace(/[ \t\n\r\f]+/g, ' ').replace(/^ | $/g, '');
    this.emit(words);
    if (words.length > 0 && /[ \t\n\r\f]$/.test(raw)) this.out.separate('space');
  }
}
