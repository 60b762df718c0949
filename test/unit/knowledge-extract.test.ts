import { execFile } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { mkdtemp, readFile, rm, symlink, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join, resolve } from 'node:path';
import { promisify } from 'node:util';
import { brotliCompressSync, deflateSync } from 'node:zlib';

import { afterAll, beforeAll, describe, expect, it } from 'vitest';

import { ServiceUnavailableError } from '../../src/core/errors.js';

import { bundle, ENTRY_POINTS } from '../../scripts/bundle.mjs';
import { type DrainedText, PieceAssembler } from '../../src/modules/knowledge/document-builder.js';
import { extractDocument, type ExtractLimits } from '../../src/modules/knowledge/extract.js';
import { MAX_HTML_DEPTH } from '../../src/modules/knowledge/html.js';
import { markdownSpans } from '../../src/modules/knowledge/markdown.js';
import { MAX_PACKED_OBJECTS, MAX_PDF_PAGES, pdfSpans } from '../../src/modules/knowledge/pdf.js';
import { sniffFormat } from '../../src/modules/knowledge/sniff.js';
import { DocumentRejectedError, type DocumentSection, type ExtractedDocument } from '../../src/modules/knowledge/types.js';
import { ascii85Encode, type Block, deflateStoringFirst, lzwEncode, pdfPageTree, pdfWithObjectStream, pdfWithStream, runLengthEncode, writeDocx, writePdf, writePdfWithContent, writeZip, writeZipBomb } from '../helpers/documents.js';

const LIMITS: ExtractLimits = { maxTextChars: 1_000_000, timeoutMs: 20_000, maxMemoryMb: 128, maxTotalMemoryMb: 512 };
let dir: string;

beforeAll(async () => {
  dir = await mkdtemp(join(tmpdir(), 'keel-extract-'));
});
afterAll(async () => {
  await rm(dir, { recursive: true, force: true });
});

async function file(name: string, content: string | Buffer): Promise<string> {
  const path = join(dir, name);
  await writeFile(path, content);
  return path;
}

function extract(path: string, filename: string, limits: Partial<ExtractLimits> = {}, declaredMime?: string): Promise<ExtractedDocument> {
  return extractDocument({ path, filename, ...(declaredMime ? { declaredMime } : {}) }, { ...LIMITS, ...limits });
}

const WORD_MAIN = 'http://schemas.openxmlformats.org/wordprocessingml/2006/main';

/** A DOCX whose package relationships name `main` as its main document (a decoy word/document.xml beside it). */
function docxWithMainPart(main: string, body: Buffer | string): Record<string, Buffer | string> {
  return {
    '[Content_Types].xml':
      '<?xml version="1.0"?><Types xmlns="http://schemas.openxmlformats.org/package/2006/content-types"><Default Extension="rels" ContentType="application/vnd.openxmlformats-package.relationships+xml"/><Default Extension="bin" ContentType="application/vnd.openxmlformats-officedocument.wordprocessingml.document.main+xml"/></Types>',
    '_rels/.rels': `<?xml version="1.0"?><Relationships xmlns="http://schemas.openxmlformats.org/package/2006/relationships"><Relationship Id="rId1" Type="http://schemas.openxmlformats.org/officeDocument/2006/relationships/officeDocument" Target="${main}"/></Relationships>`,
    'word/document.xml': `<w:document xmlns:w="${WORD_MAIN}"><w:body><w:p><w:r><w:t>decoy</w:t></w:r></w:p></w:body></w:document>`,
    [main]: body,
  };
}

async function rejection(promise: Promise<unknown>): Promise<string> {
  const error = await promise.then(
    () => expect.unreachable('the document was accepted'),
    (e: unknown) => e,
  );
  expect(error).toBeInstanceOf(DocumentRejectedError);
  return (error as Error).message;
}

/** `text` as UTF-16 with its byte-order mark, little-endian (Windows' "Unicode") or big-endian. */
const utf16 = (text: string, endian: 'le' | 'be' = 'le') => {
  const units = Buffer.from(text, 'utf16le');
  return endian === 'le' ? Buffer.concat([Buffer.from([0xff, 0xfe]), units]) : Buffer.concat([Buffer.from([0xfe, 0xff]), units.swap16()]);
};

const paths = (doc: ExtractedDocument) => doc.sections.map((s) => s.headingPath.join(' > '));
const sectionText = (doc: ExtractedDocument, path: string) => doc.sections.find((s) => s.headingPath.join(' > ') === path)?.text ?? '';

const HANDBOOK: Block[] = [
  { heading: 1, text: 'Keel Robotics Handbook' },
  { text: 'This handbook explains how the K-7 arm works. It is written for operators.' },
  { heading: 2, text: 'Safety' },
  { text: 'Always wear goggles near the arm. Stop the arm with the red button on the controller.' },
  { heading: 3, text: 'Emergency stop' },
  { text: 'The emergency stop cuts power to all twelve joints within 40 milliseconds.' },
  { heading: 2, text: 'Maintenance' },
  { text: 'Oil the joints every 200 hours of operation with synthetic grease.' },
];
const HANDBOOK_PATHS = [
  'Keel Robotics Handbook',
  'Keel Robotics Handbook > Safety',
  'Keel Robotics Handbook > Safety > Emergency stop',
  'Keel Robotics Handbook > Maintenance',
];

// ==================== Sniffing ====================

describe('sniffFormat', () => {
  const bytes = (text: string) => new TextEncoder().encode(text);

  it('tells the text formats apart by name and type, with a look at the content', async () => {
    expect(await sniffFormat(bytes('hello'), 'notes.txt')).toBe('text');
    expect(await sniffFormat(bytes('hello'), 'notes')).toBe('text');
    expect(await sniffFormat(bytes('# Title'), 'README.md')).toBe('markdown');
    expect(await sniffFormat(bytes('# Title'), 'readme', 'text/markdown; charset=utf-8')).toBe('markdown');
    expect(await sniffFormat(bytes('<p>hi</p>'), 'page.htm')).toBe('html');
    expect(await sniffFormat(bytes('<!DOCTYPE html><p>hi</p>'), 'page')).toBe('html');
    expect(await sniffFormat(bytes('plain words, no tags'), 'page.html')).toBe('text');
    expect(await sniffFormat(bytes('a,b\n1,2'), 'table.csv')).toBe('csv');
    expect(await sniffFormat(bytes('{"a": 1}'), 'data.json')).toBe('json');
    expect(await sniffFormat(bytes('<?xml version="1.0"?><a/>'), 'feed.xml')).toBe('text');
  });

  it('reads UTF-16 with its byte-order mark as text (file-type takes FF FE for an MP3 frame), and binary behind a mark as binary', async () => {
    for (const endian of ['le', 'be'] as const) {
      expect(await sniffFormat(utf16('hello world', endian), 'notes.txt', 'text/plain'), endian).toBe('text');
      expect(await sniffFormat(utf16('# Title', endian), 'README.md'), endian).toBe('markdown');
      expect(await sniffFormat(utf16('<!DOCTYPE html><p>hi</p>', endian), 'page'), endian).toBe('html');
      expect(await sniffFormat(utf16('{"a": 1}', endian), 'data.json'), endian).toBe('json');
    }
    // A lone surrogate, and NUL characters: not UTF-16 text, whatever the mark says.
    expect(await rejection(sniffFormat(Buffer.from([0xff, 0xfe, 0x00, 0xdc, 0x41, 0x00]), 'a.txt'))).toMatch(/^not a text file: a\.txt holds binary data \(it is not UTF-16 text\)/);
    expect(await rejection(sniffFormat(Buffer.from([0xfe, 0xff, 0x00, 0x00, 0x00, 0x41]), 'a.txt'))).toMatch(/^not a text file: a\.txt holds binary data \(NUL bytes\)/);
  });

  it('trusts the bytes over the name for binaries', async () => {
    expect(await sniffFormat(bytes('%PDF-1.7\n%âãÏÓ\n'), 'scan.txt')).toBe('pdf');
  });

  it('refuses an empty file, binaries that are not documents, and a .json that is not JSON', async () => {
    expect(await rejection(sniffFormat(new Uint8Array(), 'a.txt'))).toBe('the file is empty');
    // A real 1×1 PNG (file-type reads its chunks, so random bytes after the signature would not do).
    const png = Buffer.from('iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNkYPhfDwAChwGA60e6kgAAAABJRU5ErkJggg==', 'base64');
    expect(await rejection(sniffFormat(png, 'photo.png'))).toMatch(/^photo\.png is of type image\/png, which is not supported; accepted formats: plain text/);
    expect(await rejection(sniffFormat(png, 'notes.txt'))).toMatch(/^not a text file: notes\.txt holds image\/png data/);
    expect(await rejection(sniffFormat(Buffer.from('d0cf11e0a1b11ae1', 'hex'), 'old.doc'))).toMatch(/old Word \.doc or a password-protected Office file; save it as an unprotected \.docx/);
    expect(await rejection(sniffFormat(bytes('hello there'), 'data.json'))).toMatch(/not valid JSON/);
    expect(await rejection(sniffFormat(Buffer.from('a,b\u0000c,d'), 'x.csv'))).toMatch(/^not a text file: x\.csv holds binary data/);
  });
});

// ==================== Text formats ====================

describe('extractDocument: text formats', () => {
  it('reads plain text as one section and drops a BOM', async () => {
    const doc = await extract(await file('notes.txt', '\uFEFFFirst line.\n\nSecond paragraph, with ünïcödé.\n'), 'notes.txt');
    expect(doc.format).toBe('text');
    expect(doc.text).toBe('First line.\n\nSecond paragraph, with ünïcödé.\n');
    expect(doc.sections).toEqual([{ headingPath: [], text: doc.text }]);
  });

  it('reads UTF-16 text with its byte-order mark (either byte order), as it streams: a pair cut by a read and markup too', async () => {
    const text = 'Grüße, naïve café 😀\r\nSecond line.';
    for (const endian of ['le', 'be'] as const) {
      const doc = await extract(await file(`notes-${endian}.txt`, utf16(text, endian)), `notes-${endian}.txt`, {}, 'text/plain');
      expect(doc, endian).toMatchObject({ format: 'text', text });
      const html = await extract(await file(`page-${endian}.html`, utf16('<html><body><h1>Title</h1><p>Body text</p></body></html>', endian)), `page-${endian}.html`);
      expect(html.sections.map((s) => [s.headingPath.join(' > '), s.text]), endian).toEqual([['Title', 'Body text']]);
    }
    // The file is read a MiB at a time: the emoji's two code units sit either side of the first read's end.
    const long = `${'a'.repeat((1024 * 1024 - 2) / 2 - 1)}😀${'b'.repeat(10)}`;
    expect((await extract(await file('long.txt', utf16(long)), 'long.txt')).text).toBe(long);
  });

  it('reads Markdown in slices, letting the event loop run between them (it reads on the main thread)', async () => {
    // Short headings cost the most a byte: ~200 ms a MB held the event loop in one go.
    const text = Array.from({ length: 50_000 }, (_, i) => `## Heading ${i}\nBody ${i}.\n`).join('');
    let ticks = 0;
    const ticking = setInterval(() => ticks++, 0);
    try {
      const { spans } = await markdownSpans(text, 1);
      expect(spans).toHaveLength(50_000);
      expect(spans[49_999]).toEqual([['Heading 49999'], text.length - 'Body 49999.\n'.length, text.length]);
    } finally {
      clearInterval(ticking);
    }
    expect(ticks).toBeGreaterThan(0);
  });

  it('gives Markdown sections their heading paths (ATX and setext), not fooled by code blocks', async () => {
    const markdown = [
      '---', 'title: front matter', '---', 'Preface.', '',
      '# Guide', 'Intro.', '',
      '## Install *fast*', 'Run it.', '', '```sh', '# a comment, not a heading', '```', '',
      '### Linux', 'Use apt.', '',
      '## [Configure](#configure)', 'Edit the file.', '',
      'Troubleshooting', '---------------', 'Read the logs.', '',
      'Appendix', '========', 'More.', '',
    ].join('\n');
    const doc = await extract(await file('guide.md', markdown), 'guide.md');
    expect(doc.format).toBe('markdown');
    expect(doc.text).toBe(markdown);
    expect(paths(doc)).toEqual(['', 'Guide', 'Guide > Install fast', 'Guide > Install fast > Linux', 'Guide > Configure', 'Guide > Troubleshooting', 'Appendix']);
    expect(sectionText(doc, 'Guide > Install fast')).toContain('# a comment, not a heading');
    expect(sectionText(doc, '')).toContain('Preface.');
    expect(sectionText(doc, 'Appendix').trim()).toBe('More.');
  });

  it('reads a Markdown heading built against its link pattern in linear time, and keeps 500 characters of a heading in its path', async () => {
    // Quadratic, 60,000 `[` held the event loop (Markdown is read on the main thread) for 4 s, and
    // these 300,000 for well past the test's timeout; with links inside, each still read as its words.
    for (const heading of ['['.repeat(300_000), '[a]('.repeat(75_000), `[Install](#install) ${'[x'.repeat(150_000)}`]) {
      const doc = await extract(await file('slow.md', `# ${heading}\n\nbody\n`), 'slow.md');
      const [path] = doc.sections.at(-1)!.headingPath;
      expect(path!.length).toBeLessThanOrEqual(501);
      expect(path!.endsWith('…')).toBe(true);
    }
    const doc = await extract(await file('links.md', '# [Install](#install) and ![logo](x.png) [a [b] c](d)\n\nbody\n'), 'links.md');
    expect(paths(doc)).toEqual(['Install and logo [a [b] c](d)']);
  });

  it('reads HTML as text: scripts, styles, the head and the site menu dropped, headings kept as sections, entities decoded', async () => {
    const html = `<!doctype html><html><head><title>Hidden title</title><style>p { color: red }</style>
      <script>alert("x")</script></head><body><nav><a href="/">Home</a> <a href="/shop">Shop</a></nav>
      <h1>Returns</h1><p>Items can be returned within <b>30&nbsp;days</b> &amp; refunded.</p>
      <noscript>Enable JavaScript</noscript>
      <h2>Exceptions</h2><ul><li>Opened software</li><li>Gift cards</li></ul>
      <table><tr><th>Item</th><th>Days</th></tr><tr><td>Arm</td><td>60</td></tr></table>
      <pre>line one
  indented</pre><script type="module">import x from "y";</script></body></html>`;
    const doc = await extract(await file('returns.html', html), 'returns.html');
    expect(doc.format).toBe('html');
    expect(paths(doc)).toEqual(['Returns', 'Returns > Exceptions']);
    expect(sectionText(doc, 'Returns')).toBe('Items can be returned within 30\u00a0days & refunded.');
    expect(sectionText(doc, 'Returns > Exceptions')).toBe('- Opened software\n- Gift cards\n\nItem | Days\nArm | 60\n\nline one\n  indented');
    expect(doc.text).not.toMatch(/alert|color|Hidden title|JavaScript|import|Home|Shop/);
  });

  it('reads a list item whose first content is a block (<li><p>, as Markdown renderers and CMSs write) as one without it: "- first"', async () => {
    const text = async (html: string) => (await extract(await file('list.html', html), 'list.html')).text;
    // The bullet stays on the line of the item's first words, whatever blocks open before them;
    // the item ends at a line, as an item of bare text does.
    expect(await text('<ul><li><p>first</p></li><li><p>second</p></li></ul>')).toBe('- first\n- second');
    for (const [loose, tight] of [
      ['<ul><li><p>first</p></li><li><p>second</p></li></ul><p>after</p>', '<ul><li>first</li><li>second</li></ul><p>after</p>'],
      ['<ol><li><div><p>deep</p></div></li><li><blockquote>quoted</blockquote></li></ol>', '<ol><li>deep</li><li>quoted</li></ol>'],
      // A second paragraph of an item reads as one after an item's bare text does: its own paragraph.
      ['<ul><li><p>first</p><p>more of it</p></li><li><p>second</p></li></ul>', '<ul><li>first<p>more of it</p></li><li>second</li></ul>'],
      // Nested lists (a loose Markdown list nests <p>s at every level).
      ['<ul><li><p>a</p><ul><li><p>b</p></li><li><p>c</p></li></ul></li><li><p>d</p></li></ul>', '<ul><li>a<ul><li>b<li>c</ul><li>d</ul>'],
      ['<ul><li><p></p><p>x</p></li><li><p><br>y</p></li></ul>', '<ul><li>x<li>y</ul>'],
      ['<ul><li><table><tr><td>a<td>b</table></li></ul>', '<ul><li><span>a</span> | b</li></ul>'],
    ]) {
      expect(await text(loose!)).toBe(await text(tight!));
    }
    expect(await text('<ul><li><p>a</p><ul><li><p>b</p></li><li><p>c</p></li></ul></li><li><p>d</p></li></ul>')).toBe('- a\n\n- b\n- c\n\n- d');
    expect(await text('<ul><li><pre>code\n  line</pre></li></ul>')).toBe('- code\n  line');
    // A heading as an item's first content keeps the bullet on its line and still heads a section.
    const steps = await extract(await file('steps.html', '<ol><li><h3>Step one</h3><p>Open the lid.</p></li><li><h3>Step two</h3><p>Close it.</p></li></ol>'), 'steps.html');
    expect(steps.text).toBe('- Step one\n\nOpen the lid.\n\n- Step two\n\nClose it.');
    expect(steps.sections).toEqual([
      { headingPath: ['Step one'], text: 'Open the lid.' },
      { headingPath: ['Step two'], text: 'Close it.' },
    ]);
  });

  it('reads the body of HTML that leaves out the optional </head> and <body>, as a browser shows it', async () => {
    const text = async (html: string) => (await extract(await file('page.html', html), 'page.html')).text;
    // An element that cannot be in <head> ends it, and so does text that is not whitespace.
    expect(await text('<!doctype html><html><head><meta charset=utf-8><title>T</title>\n  <link rel=stylesheet href=a.css>\n<p>Visible body text</p></html>')).toBe('Visible body text');
    expect(await text('<html><head><title>T</title><style>p{}</style>Loose words<p>then a paragraph')).toBe('Loose words\n\nthen a paragraph');
    // A <title> with no <head> written opens one (it is still not shown).
    expect(await text('<title>T</title><h1>Guide</h1><p>Body.')).toBe('Guide\n\nBody.');
    // A <head> after the body has begun is ignored (its content shown); <body> still ends the head.
    expect(await text('<p>one</p><head><p>two</p>')).toBe('one\n\ntwo');
    expect(await text('<head><title>T</title><body><p>Visible body text</p></body>')).toBe('Visible body text');
  });

  it('reads CSV rows as "column: value" lines, one paragraph a row, quoted delimiters kept', async () => {
    const csv = 'sku;name;price\nK7;"Arm; 12 joints";4999\nK8;Gripper;\n';
    const doc = await extract(await file('parts.csv', csv), 'parts.csv');
    expect(doc.format).toBe('csv');
    expect(doc.text).toBe('sku: K7\nname: Arm; 12 joints\nprice: 4999\n\nsku: K8\nname: Gripper');
  });

  it('reads JSON as paths to values, keys of the first two levels as headings, a paragraph per record', async () => {
    const json = {
      title: 'Specs',
      products: { 'K-7': { payload: 7, 'max load': 12 }, note: 'all arms', 'G-3': { fingers: 3 } },
      faq: [{ q: 'Warranty?', a: 'Two years.' }, { q: 'Colour?', a: null }],
      tags: [],
    };
    const doc = await extract(await file('data.json', JSON.stringify(json)), 'data.json');
    expect(doc.format).toBe('json');
    expect(doc.sections.map((s) => [s.headingPath.join(' > '), s.text])).toEqual([
      ['', 'title: Specs'],
      ['products > K-7', 'products["K-7"].payload: 7\nproducts["K-7"]["max load"]: 12'],
      ['products', 'products.note: all arms'],
      ['products > G-3', 'products["G-3"].fingers: 3'],
      ['faq', 'faq[0].q: Warranty?\nfaq[0].a: Two years.\n\nfaq[1].q: Colour?\nfaq[1].a: null'],
      ['', 'tags: []'],
    ]);
  });

  it('reads JSON nested far deeper than any call stack', async () => {
    const depth = 200_000;
    const doc = await extract(await file('deep.json', `${'['.repeat(depth)}"bottom"${']'.repeat(depth)}`), 'deep.json');
    expect(doc.text).toBe(`…${"[0]".repeat(16)}: bottom`);
  });

  it('refuses a .json that does not parse, with the parser\'s reason', async () => {
    expect(await rejection(extract(await file('broken.json', '{"a": 1,'), 'broken.json'))).toMatch(/^the file is not valid JSON: /);
  });
});

// ==================== Hostile and broken input ====================

describe('extractDocument: what it refuses', () => {
  it('refuses an empty file and a file with only whitespace', async () => {
    expect(await rejection(extract(await file('empty.pdf', ''), 'empty.pdf'))).toBe('the file is empty');
    expect(await rejection(extract(await file('blank.txt', ' \n\n\t\n'), 'blank.txt'))).toBe('the document holds no text');
  });

  it('refuses a binary file named .txt', async () => {
    const binary = Buffer.concat([Buffer.from('ELF'), randomBytes(4096), Buffer.alloc(16)]);
    expect(await rejection(extract(await file('notes.txt', binary), 'notes.txt'))).toMatch(/^not a text file: notes\.txt holds binary data/);
  });

  it('refuses text whose start is UTF-8 but whose body is not', async () => {
    const path = await file('late.txt', Buffer.concat([Buffer.from('a'.repeat(100_000)), Buffer.from([0xc3, 0x28]), Buffer.from('tail')]));
    expect(await rejection(extract(path, 'late.txt'))).toMatch(/^not a text file: late\.txt is not valid UTF-8 \(near byte 100,000\)/);
  });

  it('refuses UTF-16 text whose body is not UTF-16, saying where', async () => {
    // A lone low surrogate at byte 2 + 2 × 50,000 (after the mark and 50,000 characters).
    const lone = Buffer.concat([utf16('a'.repeat(50_000)), Buffer.from([0x00, 0xdc]), Buffer.from('tail', 'utf16le')]);
    expect(await rejection(extract(await file('lone.txt', lone), 'lone.txt'))).toMatch(/^not a text file: lone\.txt is not valid UTF-16 \(near byte 100,002\)/);
    // An odd number of bytes: the last is half a character.
    const odd = Buffer.concat([utf16('a'.repeat(10)), Buffer.from([0x41])]);
    expect(await rejection(extract(await file('odd.txt', odd), 'odd.txt'))).toMatch(/^not a text file: odd\.txt is not valid UTF-16 \(near byte 23\)/);
  });

  it('refuses text longer than the limit, saying the limit', async () => {
    const path = await file('long.txt', 'word '.repeat(3_000));
    expect(await rejection(extract(path, 'long.txt', { maxTextChars: 10_000 }))).toBe('the document holds more than 10,000 characters of text (the limit per document); split it into smaller files');
    const html = await file('long.html', `<p>${'word '.repeat(3_000)}</p>`);
    expect(await rejection(extract(html, 'long.html', { maxTextChars: 10_000 }))).toMatch(/more than 10,000 characters/);
  });

  it('refuses HTML nesting elements past MAX_HTML_DEPTH at once (the parser slows quadratically with depth), and reads a page nested up to it', async () => {
    // 1 MB of nested <div>s: parsed, htmlparser2's stack made this take minutes of a thread (the
    // extraction's whole time limit) for one small upload. Here 10 s, half the limit, is ample.
    const started = Date.now();
    const deep = await file('deep.html', `<html><body>${'<div>'.repeat(200_000)}deep${'</div>'.repeat(200_000)}</body></html>`);
    expect(await rejection(extract(deep, 'deep.html'))).toBe('the HTML nests elements more than 1,024 deep (browsers stop at 512); it is damaged or built to exhaust the reader');
    expect(Date.now() - started).toBeLessThan(10_000);
    // Unclosed elements count as open (a void one, <br>, does not): with <html> and <body>, one
    // <div> more than this is past the limit.
    const unclosed = await file('unclosed.html', `<html><body>${'<div>'.repeat(MAX_HTML_DEPTH - 1)}${'<br>'.repeat(5_000)}`);
    expect(await rejection(extract(unclosed, 'unclosed.html'))).toMatch(/nests elements more than 1,024 deep/);
    const atLimit = await file('nested.html', `<html><body>${'<div>'.repeat(MAX_HTML_DEPTH - 2)}inner words${'</div>'.repeat(MAX_HTML_DEPTH - 2)}${'<br>'.repeat(5_000)}</body></html>`);
    expect((await extract(atLimit, 'nested.html')).text).toBe('inner words');
    // Self-closed tags (XHTML written as HTML) open nothing, however many.
    const selfClosed = await file('xhtml.html', `<html><body><p>${'<span class="x"/>'.repeat(MAX_HTML_DEPTH + 100)}flat words</p></body></html>`);
    expect((await extract(selfClosed, 'xhtml.html')).text).toBe('flat words');
  });

  it('reads old pages that leave thousands of <font>, <p> and <li> unclosed, as a browser shows them', async () => {
    const text = async (name: string, html: string) => (await extract(await file(name, html), name)).text;
    const count = 2 * MAX_HTML_DEPTH;
    // Formatting and other inline elements change no text: the reader keeps them off the parser's
    // stack, so unclosed ones never count towards MAX_HTML_DEPTH, however many.
    const fonts = await text('fonts.html', `<html><body>${Array.from({ length: count }, (_, i) => `<font size="${i % 7}">w${i} `).join('')}`);
    expect(fonts.split(' ')).toEqual(Array.from({ length: count }, (_, i) => `w${i}`));
    const inline = await text('inline.html', `<p>${'<span><b><i><u><a href="#">x'.repeat(count)}`);
    expect(inline).toBe('x'.repeat(count));
    // A <p> closes the open <p> and an <li> the open <li>, through the formatting element left open
    // in it, as HTML's tree construction does ("close a p element"; the <li> start tag's loop).
    const paragraphs = await text('paragraphs.html', Array.from({ length: count }, (_, i) => `<p><font color=red>paragraph ${i}`).join(''));
    expect(paragraphs.split('\n\n')).toEqual(Array.from({ length: count }, (_, i) => `paragraph ${i}`));
    const items = await text('items.html', `<ul>${Array.from({ length: count }, (_, i) => `<li><span><b>item ${i}`).join('')}</ul><p>after`);
    expect(items.split('\n')).toEqual([...Array.from({ length: count }, (_, i) => `- item ${i}`), '', 'after']);
    const cells = await text('cells.html', `<table><tr>${'<td><em>a<td><small>b<tr>'.repeat(count)}</table>`);
    expect(cells.split('\n')).toEqual(Array(count).fill('a | b'));
    // An <li> closes the open <li> through the <p> or <div> left open in it, a <dd>/<dt> the open
    // one, a cell the open cell and a row the open row through anything (the <li> start tag's loop,
    // "close the cell"): htmlparser2 alone nested each in the one before, refused past the depth.
    const blockItems = await text('block-items.html', `<ul>${Array.from({ length: count }, (_, i) => `<li><${i % 2 ? 'div' : 'p'}>item ${i}`).join('')}</ul><p>after`);
    expect(blockItems.split('\n')).toEqual([...Array.from({ length: count }, (_, i) => `- item ${i}`), '', 'after']);
    const terms = await text('terms.html', `<dl>${'<dt><p>term<dd><div>meaning'.repeat(count)}</dl>`);
    expect(terms.split('\n\n')).toEqual(Array(count).fill(['term', 'meaning']).flat());
    const blockCells = await text('block-cells.html', `<table>${'<tr><td><div><p>a<th><p>b'.repeat(count)}</table>`);
    // (A browser shows a row's cells side by side whatever blocks they hold.)
    expect(blockCells.split('\n')).toEqual(Array(count).fill('a | b'));
    // Only the nearest sibling of the same list or table: an <li> in a nested list, or a cell in a
    // table within a cell, leaves the outer one open (so lists nested past the depth still nest).
    expect(await text('nested.html', '<ul><li>a<ul><li>b<li>c</ul><li>d</ul>')).toBe('- a\n\n- b\n- c\n\n- d');
    expect(await text('nested-table.html', '<table><tr><td>a<table><tr><td>b<td>c</table><td>d</table>')).toBe('a b | c | d');
    expect(await text('cell-list.html', '<ul><li>a<table><tr><td><li>b</table><li>c</ul>')).toBe('- a\n\n- b\n\n- c');
    expect(await rejection(extract(await file('nested-lists.html', '<ul><li><p>x'.repeat(MAX_HTML_DEPTH / 2)), 'nested-lists.html'))).toMatch(/nests elements more than 1,024 deep/);
    expect(await rejection(extract(await file('nested-tables.html', '<table><tr><td><div>x'.repeat(MAX_HTML_DEPTH / 3)), 'nested-tables.html'))).toMatch(/nests elements more than 1,024 deep/);
    // Many inline tags in a 1 MB page cost the parser no depth either.
    expect(await text('many.html', `${'<b>'.repeat(300_000)}end`)).toBe('end');
  });

  it('refuses a malformed PDF with pdf.js\'s reason', async () => {
    const path = await file('broken.pdf', Buffer.concat([Buffer.from('%PDF-1.7\n'), randomBytes(2048)]));
    expect(await rejection(extract(path, 'broken.pdf'))).toMatch(/^could not read the PDF: .+; it may be damaged/);
  });

  it('refuses an encrypted PDF', async () => {
    const path = join(dir, 'locked.pdf');
    await writePdf(path, HANDBOOK, { userPassword: 'open sesame' });
    expect(await rejection(extract(path, 'locked.pdf'))).toBe('the PDF is encrypted (password-protected); upload a copy without a password');
  });

  it('refuses a PDF whose page unpacks past a quarter of the memory allowance, before pdf.js decodes it', async () => {
    const text = Buffer.from('BT /F1 12 Tf 72 712 Td (Hello from a bomb) Tj ET');
    const path = join(dir, 'bomb.pdf');
    await writePdfWithContent(path, Buffer.concat([Buffer.alloc(40 * 1024 * 1024, 0x20), text]));
    expect((await readFile(path)).length).toBeLessThan(100 * 1024);
    expect(await rejection(extract(path, 'bomb.pdf', { maxMemoryMb: 64 }))).toBe(
      'the PDF expands to more than 16 MB when one of its parts is unpacked (the limit per part); it is damaged or built to exhaust the reader',
    );
    // The same page within the allowance is read.
    const small = join(dir, 'small-stream.pdf');
    await writePdfWithContent(small, Buffer.concat([Buffer.alloc(1024 * 1024, 0x20), text]));
    expect((await extract(small, 'small-stream.pdf', { maxMemoryMb: 64 })).text).toBe('Hello from a bomb');
  });

  describe('refuses a Flate page past the allowance however its dictionary is written', () => {
    const page = Buffer.concat([Buffer.alloc(40 * 1024 * 1024, 0x20), Buffer.from('BT /F1 12 Tf 72 712 Td (Hello from a bomb) Tj ET')]);
    let bomb: Buffer;
    beforeAll(() => {
      bomb = deflateSync(page, { level: 9 });
    });
    const refused = 'the PDF expands to more than 16 MB when one of its parts is unpacked (the limit per part); it is damaged or built to exhaust the reader';
    it.each([
      ['a filter name with a #xx escape (the same name to pdf.js)', () => pdfWithStream('/Filter /Flate#44ecode', bomb)],
      ['behind ASCIIHexDecode in a filter chain', () => pdfWithStream('/Filter [/ASCIIHexDecode /FlateDecode]', Buffer.from(`${bomb.toString('hex')}>`))],
      ['with a comment saying it is an image', () => pdfWithStream('/Filter /FlateDecode %/Subtype /Image\n', bomb)],
      ['with a string saying it is an image', () => pdfWithStream('/Filter /FlateDecode /Note (a (nested) /Subtype /Image)', bomb)],
      ['in a dictionary padded past a few KB', () => pdfWithStream(`/Filter /FlateDecode /Pad (${'x'.repeat(3_000)})`, bomb)],
      // pdf.js reads the data to its /Length when `endstream` follows there; the first `endstream` ended it for the check.
      ['with the bytes `endstream` in its data before its /Length ends', () => pdfWithStream('/Filter /FlateDecode', deflateStoringFirst(Buffer.concat([Buffer.from('% endstream\n'), page]), 12))],
      // pdf.js follows the /Length into the object stream; the check, not unpacking it, ended the data at the first `endstream`.
      ['with those bytes and its /Length packed in a compressed object stream', () => {
        const data = deflateStoringFirst(Buffer.concat([Buffer.from('% endstream\n'), page]), 12);
        return pdfWithObjectStream('/Length 6 0 R /Filter /FlateDecode', data, { extra: [String(data.length)], inObjectStream: [6] });
      }],
      // The standard forbids a stream in an object stream; pdf.js reads it there, where the check never looked: a 1 KB file.
      ['packed itself in a compressed object stream', () => pdfWithObjectStream(`/Length ${bomb.length} /Filter /FlateDecode`, bomb, { inObjectStream: [4] })],
      // A predictor (pdf.js applies it after Flate) leaves the content unreadable unless applied too.
      // The Flate pass counts a chain's first Flate only.
      ['Flate inside Flate (a chain of two)', () => pdfWithStream('/Filter [/FlateDecode /Fl]', deflateSync(bomb))],
      ['packed in an object stream behind a PNG predictor', () => pdfWithObjectStream(`/Length ${bomb.length} /Filter /FlateDecode`, bomb, { inObjectStream: [4], columns: 7 })],
    ])('%s', async (name, pdf) => {
      const path = await file(`${name.replaceAll(/\W+/g, '-')}.pdf`, pdf());
      expect(await rejection(extract(path, 'bomb.pdf', { maxMemoryMb: 64 }))).toBe(refused);
    });

    it('but not a stream its own dictionary calls an image (text extraction never decodes pictures)', async () => {
      const path = await file('picture.pdf', pdfWithStream('/Subtype /Image /Filter /FlateDecode', deflateSync(page.subarray(page.length - 20 * 1024 * 1024))));
      expect((await extract(path, 'picture.pdf', { maxMemoryMb: 64 })).text).toBe('Hello from a bomb');
    });
  });

  describe('refuses an LZW, ASCII85, run-length or Brotli page past the allowance up front, as a Flate one', () => {
    const text = Buffer.from('BT /F1 12 Tf 72 712 Td (Hello from a bomb) Tj ET');
    const page = Buffer.concat([Buffer.alloc(20 * 1024 * 1024, 0x20), text]);
    const refused = 'the PDF expands to more than 16 MB when one of its parts is unpacked (the limit per part); it is damaged or built to exhaust the reader';
    let lzwBomb: Buffer;
    let lzwBombEarly0: Buffer;
    let flateBomb: Buffer;
    let runLengthBomb: Buffer;
    // Encoded once for the cases below (run-length's in JavaScript: ~0.2 s a time on Node 20).
    beforeAll(() => {
      lzwBomb = lzwEncode(page);
      runLengthBomb = runLengthEncode(page);
      lzwBombEarly0 = lzwEncode(page, 0);
      flateBomb = deflateSync(page, { level: 9 });
    });
    it.each([
      ['LZWDecode', () => pdfWithStream('/Filter /LZWDecode', lzwBomb)],
      ['LZWDecode with EarlyChange 0', () => pdfWithStream('/Filter /LZWDecode /DecodeParms << /EarlyChange 0 >>', lzwBombEarly0)],
      ['LZW behind ASCII85', () => pdfWithStream('/Filter [/A85 /LZW]', ascii85Encode(lzwBomb))],
      ['Flate behind ASCII85', () => pdfWithStream('/Filter [/ASCII85Decode /FlateDecode]', ascii85Encode(flateBomb))],
      ['Flate behind LZW', () => pdfWithStream('/Filter [/LZWDecode /FlateDecode]', lzwEncode(flateBomb))],
      ['filters behind a reference (pdf.js follows it)', () => pdfWithStream('/Filter 6 0 R', lzwBomb, '[/LZWDecode]')],
      ['a decoy /F name before the real key', () => pdfWithStream('/Name /F /Filter /LZWDecode', lzwBomb)],
      ['RunLengthDecode', () => pdfWithStream('/Filter /RunLengthDecode', runLengthBomb)],
      ['run-length behind Flate', () => pdfWithStream('/Filter [/Fl /RL]', deflateSync(runLengthBomb, { level: 9 }))],
      ['run-length behind ASCII85', () => pdfWithStream('/Filter [/A85 /RL]', ascii85Encode(runLengthBomb))],
      ['run-length behind a reference', () => pdfWithStream('/Filter 6 0 R', runLengthBomb, '[/RunLengthDecode]')],
      // pdf.js reads the filter from the object stream; the check cannot, and tries the guessed chains.
      ['run-length behind a reference into a compressed object stream', () => pdfWithStream('/Filter 6 0 R', runLengthBomb, '[/RunLengthDecode]', { compressed: true })],
      // Run-length around a Flate bomb: literal runs, which neither pass alone sees grow.
      ['Flate inside run-length behind a reference into a compressed object stream', () => pdfWithStream('/Filter 6 0 R', runLengthEncode(deflateSync(page, { level: 9 })), '[/RunLengthDecode /FlateDecode]', { compressed: true })],
      ['BrotliDecode', () => pdfWithStream('/Filter /BrotliDecode', brotliCompressSync(page))],
      ['LZW packed in a compressed object stream with its filter', () => pdfWithObjectStream(`/Length ${lzwBomb.length} /Filter 6 0 R`, lzwBomb, { extra: ['/LZWDecode'], inObjectStream: [4, 6] })],
    ])('%s', async (name, pdf) => {
      const bytes = pdf();
      // Run-length packs at most 64 to 1: its 20 MB page takes 320 KB.
      expect(bytes.length).toBeLessThan(800 * 1024);
      const path = await file(`${name.replaceAll(/\W+/g, '-')}.pdf`, bytes);
      expect(await rejection(extract(path, 'bomb.pdf', { maxMemoryMb: 64 }))).toBe(refused);
    });

    it('refuses an object stream packed in another, which pdf.js would unpack and the check does not look into', async () => {
      const pdf = pdfWithObjectStream('/Length 1', Buffer.from(' '), { extra: ['<< /N 1 /First 4 /Length 14 >>\nstream\n9 0 (not read)\nendstream'], inObjectStream: [6] });
      expect(await rejection(extract(await file('nested-object-streams.pdf', pdf), 'nested.pdf'))).toBe('the PDF packs an object stream inside another (the standard forbids it); it is damaged or built to exhaust the reader');
    });

    /** An object stream (object 6) beside a plain page: `entries` its /N, /First and more, `content` what it unpacks to (Flate). */
    const besideObjectStream = (entries: string, content: Buffer) => {
      const data = deflateSync(content);
      const objectStream = Buffer.concat([Buffer.from(`<< ${entries} /Filter /FlateDecode /Length ${data.length} >>\nstream\n`), data, Buffer.from('\nendstream')]);
      return pdfWithObjectStream(`/Length ${text.length}`, text, { extra: [objectStream] });
    };

    it('applies a predictor with rows of any width in one pass', async () => {
      // Rows of 30 MB over 60 MB: the check took 12-34 s (rows joined anew at every 64 KB) and
      // hundreds of MB. Rows of 60 MB over 120 MB here, bounded by the extraction's own time limit
      // rather than a clock in the test: one pass takes a fraction of it, joining anew several times it.
      const pdf = besideObjectStream('/N 1 /First 4 /DecodeParms << /Predictor 12 /Columns 60000000 >>', Buffer.alloc(120 * 1024 * 1024));
      expect((await extract(await file('wide-predictor.pdf', pdf), 'wide.pdf', { maxMemoryMb: 512, timeoutMs: 20_000 })).text).toBe('Hello from a bomb');
    }, 40_000);

    it('reads a PDF whose object stream declares rows wider than numbers go, as pdf.js reads it', async () => {
      // pdf.js counts a row's bytes in 32 bits: 8 billion bits is a negative width, and it reads no
      // rows; the check allocated the row and failed ('The value of "size" is out of range').
      const pdf = besideObjectStream('/N 1 /First 4 /DecodeParms << /Predictor 12 /Columns 1000000000 >>', Buffer.alloc(100));
      expect((await extract(await file('overflowing-columns.pdf', pdf), 'columns.pdf')).text).toBe('Hello from a bomb');
    });

    it('refuses object streams that pack more objects than any real PDF, before reading them all', async () => {
      // /N and the pairs are the file's to say: 15 million pairs in 58 KB took 15 s and 1 GB to read.
      const header = '1 0 '.repeat(MAX_PACKED_OBJECTS + 1);
      const pdf = besideObjectStream(`/N ${MAX_PACKED_OBJECTS + 1} /First ${header.length}`, Buffer.from(header));
      expect(await rejection(extract(await file('many-packed.pdf', pdf), 'many.pdf'))).toBe('the PDF packs more than 1,000,000 objects in its object streams; it is damaged or built to exhaust the reader');
    });

    it('stops reading an object stream at an offset that goes back, as pdf.js does', async () => {
      // Offsets 0, 1000, 0, 1000…: each object spanned the same 1 KB array again (2 GB of values from 480 KB).
      const pairs = Array.from({ length: 200_000 }, (_, i) => `${i + 10} ${i % 2 ? 1000 : 0} `).join('');
      // Read past the going-back offsets, it runs out of the extraction's memory and is refused.
      const pdf = besideObjectStream(`/N 200000 /First ${pairs.length}`, Buffer.from(`${pairs}[${'1 '.repeat(499)}]`));
      expect((await extract(await file('offsets-back.pdf', pdf), 'back.pdf')).text).toBe('Hello from a bomb');
    }, 30_000);

    it('reads the same pages within the allowance (the check decodes as pdf.js does)', async () => {
      const small = Buffer.concat([Buffer.alloc(1024 * 1024, 0x20), text]);
      for (const [name, pdf] of [
        ['lzw', pdfWithStream('/Filter /LZWDecode', lzwEncode(small))],
        ['lzw-early0', pdfWithStream('/Filter /LZWDecode /DecodeParms << /EarlyChange 0 >>', lzwEncode(small, 0))],
        ['a85-flate', pdfWithStream('/Filter [/ASCII85Decode /FlateDecode]', ascii85Encode(deflateSync(small)))],
        ['a85-lzw', pdfWithStream('/Filter [/A85 /LZW]', ascii85Encode(lzwEncode(small)))],
        ['rl', pdfWithStream('/Filter /RunLengthDecode', runLengthEncode(small))],
        ['flate-rl', pdfWithStream('/Filter [/Fl /RL]', deflateSync(runLengthEncode(small)))],
        ['rl-object-stream', pdfWithStream('/Filter 6 0 R', runLengthEncode(small), '[/RunLengthDecode]', { compressed: true })],
        ['brotli', pdfWithStream('/Filter /BrotliDecode', brotliCompressSync(small))],
        ['packed', pdfWithObjectStream('/Length 6 0 R /Filter 7 0 R', lzwEncode(small), { extra: [String(lzwEncode(small).length), '/LZWDecode'], inObjectStream: [1, 2, 3, 4, 5, 6, 7] })],
        ['packed-predictor', pdfWithObjectStream('/Length 6 0 R /Filter 7 0 R', lzwEncode(small), { extra: [String(lzwEncode(small).length), '/LZWDecode'], inObjectStream: [4, 6, 7], columns: 5 })],
      ] as const) {
        expect((await extract(await file(`${name}-small.pdf`, pdf), `${name}.pdf`, { maxMemoryMb: 64 })).text, name).toBe('Hello from a bomb');
      }
    });
  });

  it('stops a parse whose unpacked parts outgrow the memory allowance, whatever the checks before pdf.js miss', async () => {
    // A run-length page that calls itself an image, which the PDF check does not unpack (pdf.js
    // ignores the claim): 300 MB of page in 5 MB. pdf.js holds the decoded page in typed arrays,
    // outside the 64 MB heap limit.
    const spaces = Buffer.alloc((300 * 1024 * 1024) / 64, Buffer.from([257 - 128, 0x20])); // runs of 128 spaces
    const text = Buffer.from('BT /F1 12 Tf 72 712 Td (Hello from a bomb) Tj ET');
    const runLength = Buffer.concat([spaces, Buffer.from([text.length - 1]), text, Buffer.from([128])]);
    const path = await file('run-length.pdf', pdfWithStream('/Subtype /Image /Filter /RunLengthDecode', runLength));
    expect(await rejection(extract(path, 'run-length.pdf', { maxMemoryMb: 64, maxTotalMemoryMb: 200 }))).toBe(
      'reading the document needed more than 200 MB of memory in all (the limit); it may be damaged or built to exhaust the reader — split it or re-save it and upload again',
    );
    // The same page, short, is read within the same limits.
    const small = await file('run-length-small.pdf', pdfWithStream('/Subtype /Image /Filter /RunLengthDecode', Buffer.concat([spaces.subarray(0, 1024), runLength.subarray(spaces.length)])));
    expect((await extract(small, 'run-length-small.pdf', { maxMemoryMb: 64, maxTotalMemoryMb: 200 })).text).toBe('Hello from a bomb');
    // Read beside another parse, the growth measured may be the other's: stopped, but to be tried
    // again (a 503, which ingestion retries), not refused for good.
    const both = await Promise.allSettled([extract(path, 'run-length.pdf', { maxMemoryMb: 64, maxTotalMemoryMb: 200 }), extract(path, 'run-length.pdf', { maxMemoryMb: 64, maxTotalMemoryMb: 200 })]);
    const reasons = both.map((outcome) => (outcome.status === 'rejected' ? (outcome.reason as Error) : null));
    expect(reasons.some((reason) => reason instanceof ServiceUnavailableError && /while other documents were read beside it; it is tried again/.test(reason.message))).toBe(true);
    expect(reasons.some((reason) => reason instanceof DocumentRejectedError)).toBe(false);
  });

  it('refuses a PDF of more than MAX_PDF_PAGES pages at once, however small the file (a page tree naming one page a million times), and reads one at the limit', async () => {
    const started = Date.now();
    // 1.4 KB, 10^6 pages: read, it took a thread past the time limit (~0.5 ms a page).
    const million = await file('million.pdf', pdfPageTree(6, 10));
    expect(await rejection(extract(million, 'million.pdf'))).toBe('the PDF has 1,000,000 pages (at most 10,000 are read); split it into smaller files');
    expect(Date.now() - started).toBeLessThan(10_000);
    const atLimit = await extract(await file('ten-thousand.pdf', pdfPageTree(4, 10)), 'ten-thousand.pdf');
    expect(atLimit.text.split('Hello page').length - 1).toBe(MAX_PDF_PAGES);
  }, 30_000);

  it('refuses a PDF without a text layer', async () => {
    const path = join(dir, 'scan.pdf');
    await writePdf(path, []);
    expect(await rejection(extract(path, 'scan.pdf'))).toMatch(/^the PDF has no text layer/);
  });

  it('refuses a DOCX that unpacks past the bound it declares, before unpacking it', async () => {
    const path = join(dir, 'bomb.docx');
    await writeZipBomb(path, 64 * 1024, 1024 * 1024 * 1024);
    expect(await rejection(extract(path, 'bomb.docx', { maxTextChars: 100_000 }))).toBe(
      'the document expands to more than 16 MB when unpacked (word/document.xml: 1,024 MB); it is damaged or built to exhaust the reader',
    );
  });

  it('refuses a DOCX that is a real zip bomb (its markup is 40 MB of nothing)', async () => {
    const path = join(dir, 'honest-bomb.docx');
    await writeZipBomb(path, 40 * 1024 * 1024);
    expect((await readFile(path)).length).toBeLessThan(100 * 1024);
    expect(await rejection(extract(path, 'honest-bomb.docx', { maxTextChars: 100_000 }))).toMatch(/^the document expands to more than 16 MB when unpacked \(word\/document\.xml: 40 MB\)/);
  });

  it('refuses a DOCX whose relationships make a part not named .xml its main document, a bomb', async () => {
    const body = Buffer.alloc(40 * 1024 * 1024, 0x20);
    body.write(`<w:document xmlns:w="${WORD_MAIN}"><w:body><w:p><w:r><w:t>hi</w:t></w:r></w:p></w:body>`, 0);
    body.write('</w:document>', body.length - 13);
    const path = join(dir, 'renamed-bomb.docx');
    await writeZip(path, docxWithMainPart('word/main.bin', body));
    expect((await readFile(path)).length).toBeLessThan(100 * 1024);
    expect(await rejection(extract(path, 'renamed-bomb.docx', { maxTextChars: 100_000 }))).toMatch(/^the document expands to more than 16 MB when unpacked \(word\/main\.bin: 40 MB\)/);
    // The same part, small, is read: the main document is where the relationships say.
    const small = join(dir, 'renamed.docx');
    await writeZip(small, docxWithMainPart('word/main.bin', `<w:document xmlns:w="${WORD_MAIN}"><w:body><w:p><w:r><w:t>Read from main.bin</w:t></w:r></w:p></w:body></w:document>`));
    expect((await extract(small, 'renamed.docx', { maxTextChars: 100_000 })).text).toBe('Read from main.bin');
  });

  it('refuses a DOCX whose zip directory understates what an entry unpacks to', async () => {
    const path = join(dir, 'lying-bomb.docx');
    await writeZipBomb(path, 8 * 1024 * 1024, 1000);
    expect(await rejection(extract(path, 'lying-bomb.docx'))).toMatch(/^could not read the Word document: .*too many bytes/);
  });

  it('refuses a DOCX whose XML defines entities that expand a billion times', async () => {
    let dtd = '<!ENTITY lol0 "lollollollollollollollollollol">';
    for (let i = 1; i < 10; i++) dtd += `<!ENTITY lol${i} "${`&lol${i - 1};`.repeat(10)}">`;
    const path = join(dir, 'laughs.docx');
    await writeZip(path, {
      '[Content_Types].xml': '<?xml version="1.0"?><Types xmlns="http://schemas.openxmlformats.org/package/2006/content-types"/>',
      'word/document.xml': `<?xml version="1.0"?><!DOCTYPE w:document [${dtd}]><w:document xmlns:w="http://schemas.openxmlformats.org/wordprocessingml/2006/main"><w:body><w:p><w:r><w:t>&lol9;</w:t></w:r></w:p></w:body></w:document>`,
    });
    expect(await rejection(extract(path, 'laughs.docx'))).toMatch(/^could not read the Word document: error: \[xmldom error\] entity not found:&lol9;; it may be damaged/);
  });

  it('refuses a zip named .docx that is not a Word document', async () => {
    const path = join(dir, 'archive.docx');
    await writeZip(path, { 'readme.txt': 'hello', 'data/x.xml': '<x/>' });
    expect(await rejection(extract(path, 'archive.docx'))).toMatch(/^not a Word document: the archive has no word\/document\.xml/);
  });

  it('abandons a parse at the time limit and says how long it waited', async () => {
    const path = join(dir, 'slow.pdf');
    await writePdf(path, HANDBOOK);
    expect(await rejection(extract(path, 'slow.pdf', { timeoutMs: 30 }))).toMatch(/^reading the document took longer than 30 ms \(the limit\); it may be damaged or too complex/);
  });

  it('stops a parse that needs more memory than allowed, and the process goes on', async () => {
    const big = { rows: Array.from({ length: 200_000 }, (_, i) => ({ id: i, name: `item ${i}`, tags: ['a', 'b'] })) };
    const path = await file('big.json', JSON.stringify(big));
    expect(await rejection(extract(path, 'big.json', { maxMemoryMb: 32, maxTextChars: 100_000_000 }))).toBe('reading the document needed more than 32 MB of memory (the limit); split it into smaller files');
    // The same process still extracts.
    expect((await extract(await file('after.txt', 'still here'), 'after.txt')).text).toBe('still here');
  });

  it('stops when the caller aborts', async () => {
    const path = join(dir, 'aborted.pdf');
    await writePdf(path, HANDBOOK);
    const controller = new AbortController();
    const pending = extractDocument({ path, filename: 'aborted.pdf', signal: controller.signal }, LIMITS);
    controller.abort(new Error('shutting down'));
    await expect(pending).rejects.toThrow('shutting down');
  });
});

// ==================== PDF and DOCX ====================

describe('extractDocument: PDF and DOCX', () => {
  it('reads a multi-page PDF made by pdfkit, with headings from the font sizes', async () => {
    const path = join(dir, 'handbook.pdf');
    await writePdf(path, HANDBOOK, { newPageBefore: ['Maintenance'] });
    const doc = await extract(path, 'handbook.pdf');
    expect(doc.format).toBe('pdf');
    expect(paths(doc)).toEqual(HANDBOOK_PATHS);
    expect(sectionText(doc, 'Keel Robotics Handbook > Maintenance')).toBe('Oil the joints every 200 hours of operation with synthetic grease.');
    expect(doc.text).toMatch(/^Keel Robotics Handbook\n\nThis handbook explains/);
  });

  it('reads a PDF of over a million characters as it goes: its text handed on in pieces, headings found past the first pages', async () => {
    // 1.3 M characters: more than pdf.ts holds back to settle the body size, and than a piece.
    const words = 'joint torque sensor calibration controller gripper firmware operator payload bearing encoder voltage'.split(' ');
    const paragraph = (n: number) => Array.from({ length: 700 }, (_, i) => words[(i * 7 + n) % words.length]).join(' ') + '.';
    const blocks: Block[] = [];
    for (let chapter = 1; chapter <= 130; chapter++) {
      blocks.push({ heading: 1, text: `Chapter ${chapter}` }, { text: paragraph(chapter) }, { text: paragraph(chapter + 1) });
      // A heading size first met after the sample ranks below the larger one, as it would in the whole.
      if (chapter === 125) blocks.push({ heading: 2, text: 'Late appendix' }, { text: 'Spare parts are listed by serial number.' });
    }
    const path = join(dir, 'long.pdf');
    await writePdf(path, blocks);
    const pieces: DrainedText[] = [];
    const file = await readFile(path);
    const direct = await pdfSpans(new Uint8Array(file.buffer, file.byteOffset, file.byteLength), 5_000_000, 64 * 1024 * 1024, (piece) => pieces.push(piece));
    expect(pieces.length).toBeGreaterThan(1);
    // Sections leave with the pieces, not only at the end.
    expect(pieces[0]!.spans.length).toBeGreaterThan(0);
    const assembled = new PieceAssembler();
    for (const piece of pieces) assembled.add(piece);
    const whole = assembled.finish(direct);
    expect(whole.text).toBe(pieces.map((piece) => piece.text).join('') + direct.text);

    // Through the thread, sections handed over while it reads: with the ones returned at the end,
    // they are the whole document's, in order.
    const early: DocumentSection[] = [];
    let handedOverBeforeTheEnd = 0;
    let finished = false;
    const extracting = extractDocument({ path, filename: 'long.pdf' }, { ...LIMITS, maxTextChars: 5_000_000, timeoutMs: 300_000 }, (sections) => {
      early.push(...sections);
      if (!finished) handedOverBeforeTheEnd++;
    });
    const rest = await extracting;
    finished = true;
    expect(handedOverBeforeTheEnd).toBeGreaterThan(1);
    expect(early.length).toBeGreaterThan(100);
    const doc = { ...rest, sections: [...early, ...rest.sections] };
    expect(doc).toEqual(whole);
    expect(doc.text.length).toBeGreaterThan(1_300_000);
    const chapters = Array.from({ length: 130 }, (_, i) => `Chapter ${i + 1}`);
    expect(paths(doc)).toEqual([...chapters.slice(0, 125), 'Chapter 125 > Late appendix', ...chapters.slice(125)]);
    expect(sectionText(doc, 'Chapter 125 > Late appendix')).toBe('Spare parts are listed by serial number.');
    expect(sectionText(doc, 'Chapter 130').replace(/\s+/g, ' ')).toBe(`${paragraph(130)} ${paragraph(131)}`);
  }, 180_000); // ~15 s of parsing on a quiet machine, twice

  it('reads a DOCX made by the docx library, with its heading styles as sections', async () => {
    const path = join(dir, 'handbook.docx');
    await writeDocx(path, HANDBOOK);
    const doc = await extract(path, 'handbook.docx');
    expect(doc.format).toBe('docx');
    expect(paths(doc)).toEqual(HANDBOOK_PATHS);
    // Known by its content, not its name.
    expect((await extract(path, 'handbook', {}, 'application/octet-stream')).format).toBe('docx');
    expect(sectionText(doc, 'Keel Robotics Handbook > Safety > Emergency stop')).toBe('The emergency stop cuts power to all twelve joints within 40 milliseconds.');
  });

  it('reads a DOCX list with each bullet on its item\'s line (mammoth writes an item\'s text straight into its <li>)', async () => {
    const path = join(dir, 'list.docx');
    await writeDocx(path, [{ text: 'Bring:' }, { text: 'goggles', bullet: 0 }, { text: 'tinted', bullet: 1 }, { text: 'gloves', bullet: 0 }, { text: 'Then start.' }]);
    expect((await extract(path, 'list.docx')).text).toBe('Bring:\n\n- goggles\n\n- tinted\n\n- gloves\n\nThen start.');
  });
});

// ==================== The compiled build ====================

describe('extractDocument from the bundled build', () => {
  it('starts its worker from the file beside the bundle (as in dist/)', async () => {
    // The knowledge modules bundled as `npm run build` bundles dist/ (its worker an entry of its
    // own, shared modules in chunks beside it), beside a node_modules link so the packages left
    // out of the bundle resolve; then a plain `node` (no TypeScript loader) extracts a PDF.
    const root = resolve(import.meta.dirname, '../..');
    const out = await mkdtemp(join(tmpdir(), 'keel-dist-'));
    try {
      await bundle(root, out, { extract: 'src/modules/knowledge/extract.ts', 'extract-worker': ENTRY_POINTS['extract-worker']! });
      await symlink(join(root, 'node_modules'), join(out, 'node_modules'));
      await writeFile(join(out, 'package.json'), '{"type": "module"}');
      const pdf = join(dir, 'compiled.pdf');
      await writePdf(pdf, HANDBOOK);
      const script = `import { extractDocument } from ${JSON.stringify(join(out, 'extract.js'))};
        const doc = await extractDocument({ path: ${JSON.stringify(pdf)}, filename: 'compiled.pdf' }, ${JSON.stringify(LIMITS)});
        console.log(JSON.stringify(doc.sections.map((s) => s.headingPath.join(' > '))));`;
      const { stdout } = await promisify(execFile)(process.execPath, ['--input-type=module', '-e', script], { cwd: out });
      expect(JSON.parse(stdout)).toEqual(HANDBOOK_PATHS);
    } finally {
      await rm(out, { recursive: true, force: true });
    }
  });
});
