/**
 * What ingestion passes between its steps: extract (bytes → structured text) and chunk
 * (structured text → passages to index). Implemented in extract.ts and chunk.ts; the ingestion
 * job (services) stores the chunks, indexes them for full-text search and embeds them.
 */

/** Formats Keel extracts text from; the type is sniffed from the bytes, not trusted from the client. */
export const DOCUMENT_FORMATS = ['text', 'markdown', 'html', 'pdf', 'docx', 'csv', 'json'] as const;
export type DocumentFormat = (typeof DOCUMENT_FORMATS)[number];

/** A block of text under the headings that contain it (outermost first). */
export interface DocumentSection {
  headingPath: string[];
  text: string;
}

export interface ExtractedDocument {
  format: DocumentFormat;
  /** The readable text of the whole document (what `GET .../content` returns). */
  text: string;
  /** The same text by structure, in document order. */
  sections: DocumentSection[];
}

/** One passage to index: its place in the document, its text, and the headings above it. */
export interface DocumentChunk {
  index: number;
  text: string;
  headingPath: string[];
  tokenCount: number;
  /** How much of `text`'s start (UTF-16 units) repeats the end of the chunk before (the overlap); the rest is this chunk's own. */
  leadLength: number;
}

/** Thrown for a document that cannot be ingested; `message` is shown to the user as the entry's `error`. */
export class DocumentRejectedError extends Error {
  override readonly name = 'DocumentRejectedError';
}
