/**
 * A small in-process cache of database rows by id, for rows read on every request and rarely
 * written (the authenticated user). It is only trusted while something tells it about every change:
 * disabled, it reads through; an eviction also voids loads already in flight, so a row read before
 * a change can never be stored after it.
 */
export class RowCache<T> {
  private readonly rows = new Map<string, { row: T; expiresAt: number }>();
  /** Bumped by every eviction; a load stores its row only if no eviction happened meanwhile. */
  private generation = 0;
  private enabled: boolean;

  constructor(
    private readonly options: { ttlMs: number; maxEntries: number; enabled?: boolean },
  ) {
    this.enabled = options.enabled ?? true;
  }

  async load(id: string, read: () => Promise<T | undefined>): Promise<T | undefined> {
    if (!this.enabled) return read();
    const hit = this.rows.get(id);
    if (hit && hit.expiresAt > Date.now()) return hit.row;
    const generation = this.generation;
    const row = await read();
    if (row !== undefined && this.enabled && generation === this.generation) {
      if (this.rows.size >= this.options.maxEntries) {
        const oldest = this.rows.keys().next();
        if (!oldest.done) this.rows.delete(oldest.value);
      }
      this.rows.set(id, { row, expiresAt: Date.now() + this.options.ttlMs });
    }
    return row;
  }

  evict(id: string): void {
    this.generation++;
    this.rows.delete(id);
  }

  /** Stops caching (and forgets everything) while changes might go unnoticed, e.g. a lost listener. */
  setEnabled(enabled: boolean): void {
    this.generation++;
    this.rows.clear();
    this.enabled = enabled;
  }

  get isEnabled(): boolean {
    return this.enabled;
  }
}
